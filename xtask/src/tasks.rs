//! `build`, `test`, `demo` and `bench` (`image` is in image.rs).

use std::{
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cmd::{self, say, Interrupted},
    image,
    setup::{self, NIGHTLY},
};

/// Where the workspace and its release artifacts are.
pub struct Paths {
    pub workspace: PathBuf,
    /// The target directory, absolute.
    pub target: PathBuf,
    /// `<target dir>/release`, absolute.
    pub release: PathBuf,
    /// The forwarder crate's version (the image's default tag).
    pub forwarder_version: String,
}

impl Paths {
    pub fn forwarder_bin(&self) -> PathBuf {
        self.release.join("forwarder")
    }

    /// A cargo command running in the workspace root.
    fn cargo(&self) -> Command {
        let mut cmd = cmd::cargo();
        cmd.current_dir(&self.workspace);
        cmd
    }

    /// The image `cargo xtask image` writes by default.
    pub fn image_archive(&self) -> PathBuf {
        image::default_archive(&self.target, &self.forwarder_version)
    }

    /// The environment the integration tests and the demo find binaries by.
    fn binary_env(&self, cmd: &mut Command) {
        cmd.env("FORWARDER_BIN", self.forwarder_bin())
            .env("FORWARDER_TARGET_DIR", &self.release)
            .env("FORWARDER_IMAGE", self.image_archive());
    }
}

/// The workspace root: the parent of xtask's manifest directory (`cargo run`
/// sets `CARGO_MANIFEST_DIR`; a directly started binary uses the build-time
/// value).
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().map(Path::to_path_buf).ok_or_else(|| {
        anyhow!(
            "xtask's manifest dir {} has no parent",
            manifest_dir.display()
        )
    })
}

/// The target directory from `cargo metadata` (honours `CARGO_TARGET_DIR`
/// and `build.target-dir`).
pub fn target_dir_from_metadata(metadata: &str) -> Result<PathBuf> {
    let value: serde_json::Value =
        serde_json::from_str(metadata).context("`cargo metadata` printed invalid JSON")?;
    value
        .get("target_directory")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`cargo metadata` output has no target_directory"))
}

/// The version of package `name` from `cargo metadata`.
pub fn package_version_from_metadata(metadata: &str, name: &str) -> Result<String> {
    let value: serde_json::Value =
        serde_json::from_str(metadata).context("`cargo metadata` printed invalid JSON")?;
    value
        .get("packages")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p.get("name").and_then(serde_json::Value::as_str) == Some(name))
        .and_then(|p| p.get("version").and_then(serde_json::Value::as_str))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("`cargo metadata` lists no package {name} with a version"))
}

pub fn paths() -> Result<Paths> {
    let workspace = workspace_root()?;
    let mut metadata = cmd::cargo();
    metadata
        .current_dir(&workspace)
        .args(["metadata", "--format-version", "1", "--no-deps"]);
    let metadata = cmd::output(&mut metadata)?;
    let target = target_dir_from_metadata(&metadata)?;
    Ok(Paths {
        workspace,
        release: target.join("release"),
        target,
        forwarder_version: package_version_from_metadata(&metadata, "forwarder")?,
    })
}

/// Builds the daemon (its build script builds the eBPF object on nightly) and
/// the integration-test helper binaries (`podserver`, `demo`).
pub fn build(paths: &Paths) -> Result<()> {
    say!("building forwarder (with its eBPF programs) and the integration-test binaries");
    cmd::run(paths.cargo().args([
        "build",
        "--release",
        "-p",
        "forwarder",
        "-p",
        "integration-tests",
        "--bins",
    ]))?;
    let bin = paths.forwarder_bin();
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    say!("forwarder binary: {}", bin.display());
    Ok(())
}

pub const NEEDS_ROOT: &str = "needs root: creates network namespaces and loads eBPF";

fn require_root(task: &str) -> Result<()> {
    if cmd::is_root() {
        Ok(())
    } else {
        bail!("`cargo xtask {task}` {NEEDS_ROOT} (try `sudo -E cargo xtask {task}`)")
    }
}

/// How one step of `cargo xtask test` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed(Duration),
    Failed(String),
    Skipped(&'static str),
    NotRun,
}

/// One summary line, e.g. `  ok       unit tests               12.3s`.
pub fn summary_line(step: &str, outcome: &Outcome) -> String {
    let (tag, detail) = match outcome {
        Outcome::Passed(d) => ("ok", format!("{:.1}s", d.as_secs_f64())),
        Outcome::Failed(why) => ("FAILED", why.clone()),
        Outcome::Skipped(why) => ("skipped", why.to_string()),
        Outcome::NotRun => ("not run", "an earlier step failed".to_string()),
    };
    format!("  {tag:<8} {step:<24} {detail}")
}

type StepFn<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

struct Step<'a> {
    name: &'static str,
    /// Later steps cannot run when this one fails.
    prerequisite: bool,
    run: Option<StepFn<'a>>,
    skip_reason: &'static str,
}

impl<'a> Step<'a> {
    fn new(name: &'static str, prerequisite: bool, run: StepFn<'a>) -> Self {
        Self {
            name,
            prerequisite,
            run: Some(run),
            skip_reason: "",
        }
    }

    fn lint(name: &'static str, prerequisite: bool, run: StepFn<'a>, no_lint: bool) -> Self {
        Self {
            name,
            prerequisite,
            run: (!no_lint).then_some(run),
            skip_reason: "--no-lint",
        }
    }
}

pub struct TestOptions {
    pub no_lint: bool,
    pub integration_args: Vec<String>,
}

/// `cargo xtask test`: setup, build, lint, unit tests, integration tests.
pub fn test(options: &TestOptions) -> Result<()> {
    require_root("test")?;
    let paths = paths()?;
    let p = &paths;
    let no_lint = options.no_lint;
    let lint = |name, prerequisite, run| Step::lint(name, prerequisite, run, no_lint);
    let step = Step::new;
    let steps = vec![
        step("setup", true, Box::new(setup::setup)),
        step("build", true, Box::new(|| build(p))),
        // Before the integration tests, which check it (tests/tests/image.rs).
        step(
            "image",
            false,
            Box::new(|| {
                image::image(
                    p,
                    &image::ImageOptions {
                        name: image::DEFAULT_NAME.into(),
                        tag: None,
                        out: None,
                        source: None,
                    },
                )
                .map(drop)
            }),
        ),
        lint(
            "rustfmt",
            false,
            Box::new(|| cmd::run(p.cargo().args(["fmt", "--all", "--", "--check"]))),
        ),
        lint(
            "clippy (workspace)",
            false,
            Box::new(|| {
                cmd::run(p.cargo().args([
                    "clippy",
                    "--workspace",
                    "--exclude",
                    "forwarder-ebpf",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))
            }),
        ),
        lint(
            "clippy (eBPF, nightly)",
            false,
            Box::new(|| {
                let mut clippy = cmd::rustup_run(NIGHTLY, "cargo");
                clippy.current_dir(&p.workspace).args([
                    "clippy",
                    "-p",
                    "forwarder-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]);
                cmd::run(&mut clippy)
            }),
        ),
        step(
            "unit tests",
            false,
            Box::new(|| {
                cmd::run(p.cargo().args([
                    "test",
                    "--release",
                    "-p",
                    "forwarder-common",
                    "-p",
                    "forwarder",
                    "-p",
                    "xtask",
                ]))
            }),
        ),
        step(
            "integration tests",
            false,
            Box::new(|| {
                let mut cmd = p.cargo();
                cmd.args([
                    "test",
                    "--release",
                    "-p",
                    "integration-tests",
                    "--",
                    "--test-threads=1",
                ])
                .args(&options.integration_args);
                p.binary_env(&mut cmd);
                cmd::run(&mut cmd)
            }),
        ),
        step(
            "bench --quick",
            false,
            Box::new(|| {
                // A temporary report: the harness must work; timings are
                // never asserted (the bench exits non-zero only when a
                // measurement could not run).
                let out = std::env::temp_dir()
                    .join(format!("forwarder-bench-quick-{}", std::process::id()));
                let result = run_bench(p, true, &out, &[]);
                if result.is_ok() {
                    let _ = std::fs::remove_dir_all(&out);
                } else {
                    eprintln!(
                        "xtask: the quick benchmark's report is in {}",
                        out.display()
                    );
                }
                result
            }),
        ),
    ];

    let mut results: Vec<(&str, Outcome)> = Vec::new();
    let mut blocked = false;
    let mut interrupted = None;
    for step in steps {
        let outcome = match step.run {
            _ if blocked || interrupted.is_some() => Outcome::NotRun,
            None => Outcome::Skipped(step.skip_reason),
            Some(run) => {
                say!("=== step: {} ===", step.name);
                let start = Instant::now();
                match run() {
                    Ok(()) => Outcome::Passed(start.elapsed()),
                    Err(err) => {
                        if err.chain().any(|e| e.is::<Interrupted>()) {
                            interrupted = Some(err);
                            Outcome::Failed("interrupted".into())
                        } else {
                            eprintln!("xtask: step `{}` failed: {err:#}", step.name);
                            blocked |= step.prerequisite;
                            Outcome::Failed(short_reason(&format!("{err:#}")))
                        }
                    }
                }
            }
        };
        results.push((step.name, outcome));
    }

    say!("summary:");
    for (name, outcome) in &results {
        println!("{}", summary_line(name, outcome));
    }
    if let Some(err) = interrupted {
        return Err(err);
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
        .map(|(name, _)| *name)
        .collect();
    if failed.is_empty() {
        say!("all steps passed");
        Ok(())
    } else {
        bail!("failed steps: {}", failed.join(", "))
    }
}

/// The summary's failure reason: the error's first line, without the command
/// line that was already printed with the step's failure.
pub fn short_reason(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    match line
        .strip_prefix('`')
        .and_then(|rest| rest.rsplit_once("` failed: "))
    {
        Some((_, why)) => format!("{why} (command above)"),
        None => line.to_string(),
    }
}

/// `cargo xtask demo`: setup, build, then run the integration-tests crate's
/// `demo` binary and return its exit code.
pub fn demo(args: &[String]) -> Result<ExitCode> {
    require_root("demo")?;
    let paths = paths()?;
    setup::setup()?;
    build(&paths)?;
    let demo = paths.release.join("demo");
    if !demo.is_file() {
        bail!(
            "{} does not exist: the integration-tests crate (tests/) has no `demo` binary \
             (expected at tests/src/bin/demo.rs)",
            demo.display()
        );
    }
    let mut cmd = Command::new(&demo);
    cmd.current_dir(&paths.workspace).args(args);
    paths.binary_env(&mut cmd);
    let status = cmd::status(&mut cmd)?;
    let code = exit_code_of(status.code(), status.signal());
    if code != 0 {
        eprintln!(
            "xtask: `{}` ended with {}",
            cmd::display(&cmd),
            cmd::describe_status(status)
        );
    }
    Ok(ExitCode::from(code))
}

/// `cargo xtask fuzz`: setup, then tests/tests/fuzz.rs with `frames` frames
/// (`FUZZ_FRAMES`) and the seed (`FUZZ_SEED`; from the clock if not given).
pub fn fuzz(frames: u64, seed: Option<u64>) -> Result<()> {
    require_root("fuzz")?;
    let paths = paths()?;
    setup::setup()?;
    // A new seed each time explores new frames; the suite keeps a fixed one.
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    say!("fuzzing the datapath with {frames} frames, seed {seed}");
    let mut cmd = paths.cargo();
    cmd.args([
        "test",
        "--release",
        "-p",
        "integration-tests",
        "--test",
        "fuzz",
        "--",
        "--test-threads=1",
        "--nocapture",
    ])
    .env("FUZZ_FRAMES", frames.to_string())
    .env("FUZZ_SEED", seed.to_string());
    paths.binary_env(&mut cmd);
    cmd::run(&mut cmd)
}

/// Runs `target/release/bench` (as root) with the binaries' environment.
fn run_bench(paths: &Paths, quick: bool, out: &Path, extra: &[String]) -> Result<()> {
    let bench = paths.release.join("bench");
    if !bench.is_file() {
        bail!(
            "{} does not exist: the integration-tests crate (tests/) has no `bench` binary \
             (expected at tests/src/bin/bench.rs)",
            bench.display()
        );
    }
    let mut shown = String::from("cargo xtask bench");
    if quick {
        shown.push_str(" --quick");
    }
    let mut cmd = Command::new(&bench);
    cmd.current_dir(&paths.workspace).arg("--out").arg(out);
    if quick {
        cmd.arg("--quick");
    }
    if !extra.is_empty() {
        shown.push_str(" --");
        for a in extra {
            shown.push(' ');
            shown.push_str(&cmd::shell_quote(a));
        }
    }
    cmd.args(extra).env("BENCH_COMMAND", shown);
    paths.binary_env(&mut cmd);
    cmd::run(&mut cmd)
}

/// `cargo xtask bench`: setup, build, then the benchmark into `out`
/// (default `bench/` in the workspace).
pub fn bench(quick: bool, out: Option<PathBuf>, extra: &[String]) -> Result<()> {
    require_root("bench")?;
    let paths = paths()?;
    setup::setup()?;
    build(&paths)?;
    let out = out.unwrap_or_else(|| paths.workspace.join("bench"));
    let out = if out.is_absolute() {
        out
    } else {
        std::env::current_dir()
            .context("current directory")?
            .join(out)
    };
    say!("benchmark report: {}", out.display());
    run_bench(&paths, quick, &out, extra)
}

/// The exit code a shell would report: the code itself, or 128 + signal.
pub fn exit_code_of(code: Option<i32>, signal: Option<i32>) -> u8 {
    match (code, signal) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_target_dir() {
        let json = r#"{"packages":[],"target_directory":"/work/main/target","version":1}"#;
        assert_eq!(
            target_dir_from_metadata(json).unwrap(),
            Path::new("/work/main/target")
        );
        assert!(target_dir_from_metadata("{}").is_err());
        assert!(target_dir_from_metadata("not json").is_err());
        assert!(target_dir_from_metadata(r#"{"target_directory":3}"#).is_err());
    }

    #[test]
    fn metadata_package_version() {
        let json = r#"{"packages":[{"name":"xtask","version":"0.1.0"},
            {"name":"forwarder","version":"1.2.3"}],"target_directory":"/t"}"#;
        assert_eq!(
            package_version_from_metadata(json, "forwarder").unwrap(),
            "1.2.3"
        );
        assert!(package_version_from_metadata(json, "other").is_err());
        assert!(package_version_from_metadata("{}", "forwarder").is_err());
    }

    #[test]
    fn summary_lines() {
        assert_eq!(
            summary_line(
                "unit tests",
                &Outcome::Passed(Duration::from_millis(12_340))
            ),
            "  ok       unit tests               12.3s"
        );
        assert_eq!(
            summary_line("rustfmt", &Outcome::Skipped("--no-lint")),
            "  skipped  rustfmt                  --no-lint"
        );
        assert!(
            summary_line("build", &Outcome::Failed("`cargo build` failed".into()))
                .starts_with("  FAILED   build ")
        );
        assert!(summary_line("integration tests", &Outcome::NotRun).contains("not run"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code_of(Some(0), None), 0);
        assert_eq!(exit_code_of(Some(3), None), 3);
        assert_eq!(exit_code_of(Some(256 + 4), None), 4);
        assert_eq!(exit_code_of(None, Some(9)), 137);
        assert_eq!(exit_code_of(None, None), 1);
    }

    #[test]
    fn failure_reasons() {
        assert_eq!(
            short_reason("`/x/cargo test --release -p a` failed: exit status 101"),
            "exit status 101 (command above)"
        );
        assert_eq!(short_reason("no such file\ncaused by: x"), "no such file");
        assert_eq!(short_reason(""), "");
    }
}
