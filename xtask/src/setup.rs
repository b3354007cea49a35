//! `cargo xtask setup`: idempotently installs what building and testing need:
//! the nightly toolchain with `rust-src` (the eBPF crate builds with
//! `-Z build-std=core`), clippy/rustfmt, bpf-linker built against nightly's own
//! LLVM, and the Debian packages the integration tests and demo use.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cmd::{self, say, warning},
    llvm::{self, LlvmLib},
};

/// The toolchain the eBPF crate builds with (aya-build's default).
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release this workspace is tested with.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// What setup found and did, printed at the end.
#[derive(Default)]
struct Report {
    installed: Vec<String>,
    present: Vec<String>,
    warnings: Vec<String>,
}

impl Report {
    fn present(&mut self, what: impl Into<String>) {
        let what = what.into();
        say!("{what} present");
        self.present.push(what);
    }

    fn installed(&mut self, what: impl Into<String>) {
        self.installed.push(what.into());
    }

    fn warn(&mut self, message: String) {
        warning!("{message}");
        self.warnings.push(message);
    }

    fn print(&self) {
        let list = |items: &[String]| {
            if items.is_empty() {
                "nothing".to_string()
            } else {
                items.join(", ")
            }
        };
        say!("setup done; installed: {}", list(&self.installed));
        say!("setup: already present: {}", list(&self.present));
        for warning in &self.warnings {
            warning!("{warning}");
        }
    }
}

/// Runs the whole setup.
pub fn setup() -> Result<()> {
    say!("setup: checking toolchains, bpf-linker and system packages");
    let mut report = Report::default();
    ensure_nightly(&mut report)?;
    ensure_components(&mut report)?;
    let (prefix, lib) = ensure_llvm_prefix(&mut report)?;
    ensure_bpf_linker(&prefix, &lib, &mut report)?;
    ensure_packages(&mut report)?;
    report.print();
    Ok(())
}

fn rustup() -> Command {
    Command::new("rustup")
}

fn toolchain_list() -> Result<String> {
    cmd::output(rustup().args(["toolchain", "list"]))
        .context("rustup manages the Rust toolchains here; install it from https://rustup.rs")
}

/// True when `rustup toolchain list` shows the floating `nightly` toolchain
/// (`nightly-<host>`; dated ones like `nightly-2025-01-01-<host>` do not count).
pub fn has_nightly(toolchain_list: &str) -> bool {
    toolchain_list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or_default();
        name == NIGHTLY
            || name
                .strip_prefix("nightly-")
                .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
    })
}

fn ensure_nightly(report: &mut Report) -> Result<()> {
    say!("checking for the nightly toolchain");
    if has_nightly(&toolchain_list()?) {
        report.present("nightly toolchain");
        return Ok(());
    }
    say!("installing the nightly toolchain (the eBPF programs build on nightly)");
    cmd::run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])).context(
        "could not install the nightly toolchain; install it by hand with \
         `rustup toolchain install nightly --profile minimal --component rust-src` and re-run",
    )?;
    if !has_nightly(&toolchain_list()?) {
        bail!(
            "`rustup toolchain list` still shows no nightly toolchain; install it by hand with \
             `rustup toolchain install nightly --profile minimal --component rust-src`"
        );
    }
    report.installed("nightly toolchain");
    Ok(())
}

/// True when `rustup component list --installed` lists `component`
/// (target-independent components appear bare, others as `<name>-<host>`).
pub fn has_component(installed: &str, component: &str, host: &str) -> bool {
    let with_host = format!("{component}-{host}");
    installed
        .lines()
        .map(str::trim)
        .any(|line| line == component || line == with_host)
}

/// The `host:` triple from `rustc -vV`.
pub fn parse_rustc_host(verbose_version: &str) -> Option<&str> {
    verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("host:"))
        .map(str::trim)
        .filter(|host| !host.is_empty())
}

/// The toolchain cargo-xtask runs on, e.g. `stable-x86_64-unknown-linux-gnu`.
fn active_toolchain() -> Result<String> {
    let out = cmd::output(rustup().args(["show", "active-toolchain"]))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("`rustup show active-toolchain` printed nothing"))
}

fn ensure_components(report: &mut Report) -> Result<()> {
    let active = active_toolchain()?;
    let verbose_version = cmd::output(cmd::rustup_run(NIGHTLY, "rustc").arg("-vV"))?;
    let host = parse_rustc_host(&verbose_version)
        .ok_or_else(|| anyhow!("`rustc -vV` of the nightly toolchain shows no host triple"))?;
    // rust-src: the eBPF build rebuilds `core` for bpfel-unknown-none.
    // clippy (nightly): linting the eBPF crate. clippy/rustfmt (active): lint.
    let wanted = [
        (NIGHTLY, "rust-src"),
        (NIGHTLY, "clippy"),
        (active.as_str(), "clippy"),
        (active.as_str(), "rustfmt"),
    ];
    for (toolchain, component) in wanted {
        let installed = cmd::output(rustup().args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))?;
        let what = format!("{component} for {toolchain}");
        if has_component(&installed, component, host) {
            report.present(what);
            continue;
        }
        say!("installing {what}");
        cmd::run(rustup().args(["component", "add", component, "--toolchain", toolchain]))?;
        report.installed(what);
    }
    Ok(())
}

/// `$XDG_CACHE_HOME/forwarder`, else `$HOME/.cache/forwarder`.
pub fn cache_dir_from(xdg_cache_home: Option<&str>, home: Option<&str>) -> Result<PathBuf> {
    if let Some(xdg) = xdg_cache_home.filter(|d| Path::new(d).is_absolute()) {
        return Ok(Path::new(xdg).join("forwarder"));
    }
    match home.filter(|h| !h.is_empty()) {
        Some(home) => Ok(Path::new(home).join(".cache").join("forwarder")),
        None => bail!("neither XDG_CACHE_HOME nor HOME is set; cannot choose a cache directory"),
    }
}

fn cache_dir() -> Result<PathBuf> {
    let xdg = std::env::var("XDG_CACHE_HOME").ok();
    let home = std::env::var("HOME").ok();
    cache_dir_from(xdg.as_deref(), home.as_deref())
}

fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// Makes `<cache>/llvm-prefix/lib/` hold links to nightly's `libLLVM.so.<ver>`
/// so bpf-linker builds (and, via its rpath, runs) against exactly that LLVM.
fn ensure_llvm_prefix(report: &mut Report) -> Result<(PathBuf, LlvmLib)> {
    say!("locating the LLVM library of the nightly toolchain");
    let sysroot = cmd::output(cmd::rustup_run(NIGHTLY, "rustc").args(["--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let lib = LlvmLib::from_listing(file_names(&sysroot_lib)?)
        .with_context(|| format!("looking for nightly's LLVM in {}", sysroot_lib.display()))?;
    let target = sysroot_lib.join(&lib.file_name);

    let prefix = cache_dir()?.join("llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;

    let mut changed = false;
    for name in file_names(&prefix_lib)? {
        if llvm::is_llvm_link_name(&name) && !lib.link_names().contains(&name.as_str()) {
            let stale = prefix_lib.join(&name);
            say!("removing stale {}", stale.display());
            fs::remove_file(&stale).with_context(|| format!("removing {}", stale.display()))?;
            changed = true;
        }
    }
    for name in lib.link_names() {
        let link = prefix_lib.join(name);
        match fs::symlink_metadata(&link) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if fs::read_link(&link).is_ok_and(|t| t == target) {
                    continue;
                }
                fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
            }
            Ok(meta) if meta.is_dir() => {
                bail!("{} is a directory; remove it and re-run", link.display())
            }
            Ok(_) => {
                fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", link.display())),
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
        changed = true;
    }
    let what = format!("LLVM prefix {} ({})", prefix.display(), lib.file_name);
    if changed {
        say!("linked {what}");
        report.installed(what);
    } else {
        report.present(what);
    }
    Ok((prefix, lib))
}

/// How `bpf-linker --version` went.
enum LinkerState {
    Ok,
    Missing,
    Broken(String),
    WrongVersion(String),
}

fn bpf_linker_state() -> LinkerState {
    // rustc runs the `bpf-linker` it finds on PATH (main() appends cargo's
    // bin directory), so check exactly that one.
    let Some(path) = cmd::find_in_path("bpf-linker") else {
        return LinkerState::Missing;
    };
    let captured = match cmd::capture(Command::new(&path).arg("--version")) {
        Ok(captured) => captured,
        Err(err) => return LinkerState::Broken(format!("{err:#}")),
    };
    if !captured.status.success() {
        return LinkerState::Broken(format!(
            "`{} --version` failed: {}: {}",
            path.display(),
            cmd::describe_status(captured.status),
            captured.stderr.trim()
        ));
    }
    match llvm::parse_tool_version(&captured.stdout, "bpf-linker") {
        Some(BPF_LINKER_VERSION) => LinkerState::Ok,
        Some(other) => LinkerState::WrongVersion(format!("{} is {other}", path.display())),
        None => LinkerState::WrongVersion(format!(
            "`{} --version` printed {:?}",
            path.display(),
            captured.stdout.trim()
        )),
    }
}

fn ensure_bpf_linker(prefix: &Path, lib: &LlvmLib, report: &mut Report) -> Result<()> {
    say!("checking bpf-linker {BPF_LINKER_VERSION}");
    let reason = match bpf_linker_state() {
        LinkerState::Ok => {
            report.present(format!("bpf-linker {BPF_LINKER_VERSION}"));
            return Ok(());
        }
        LinkerState::Missing => "not found on PATH".to_string(),
        LinkerState::Broken(why) => format!("it does not run: {why}"),
        LinkerState::WrongVersion(why) => format!("wrong version: {why}"),
    };
    say!(
        "installing bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {} ({reason}); \
         this compiles for a few minutes",
        lib.version
    );
    let mut install = cmd::cargo();
    install
        .env("LLVM_PREFIX", prefix)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(lib.feature());
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker against the nightly LLVM {} (cargo feature {}) failed",
            lib.version,
            lib.feature()
        )
    })?;
    match bpf_linker_state() {
        LinkerState::Ok => {
            report.installed(format!("bpf-linker {BPF_LINKER_VERSION}"));
            Ok(())
        }
        LinkerState::Missing => bail!(
            "bpf-linker was installed into {} but is not on PATH",
            cmd::cargo_bin_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "cargo's bin directory".into())
        ),
        LinkerState::Broken(why) | LinkerState::WrongVersion(why) => bail!(
            "bpf-linker is still unusable after installing it ({why}); \
             another bpf-linker earlier on PATH may shadow cargo's"
        ),
    }
}

/// A Debian package the integration tests or the demo need, found by the
/// program it provides.
struct Package {
    name: &'static str,
    binary: &'static str,
    optional: bool,
}

const PACKAGES: &[Package] = &[
    Package {
        name: "iproute2",
        binary: "ip",
        optional: false,
    },
    Package {
        name: "iptables",
        binary: "iptables",
        optional: false,
    },
    Package {
        name: "ethtool",
        binary: "ethtool",
        optional: false,
    },
    Package {
        name: "conntrack",
        binary: "conntrack",
        optional: false,
    },
    Package {
        name: "bpftool",
        binary: "bpftool",
        optional: false,
    },
    Package {
        name: "curl",
        binary: "curl",
        optional: false,
    },
    // `cargo xtask image`: the C compiler for the musl target, and the tools
    // its tests inspect and unpack the image with.
    Package {
        name: "musl-tools",
        binary: "musl-gcc",
        optional: false,
    },
    Package {
        name: "skopeo",
        binary: "skopeo",
        optional: false,
    },
    Package {
        name: "umoci",
        binary: "umoci",
        optional: false,
    },
    // forwarder/tests/deploy.rs renders deploy/ with `kubectl kustomize`.
    Package {
        name: "kubectl",
        binary: "kubectl",
        optional: false,
    },
    Package {
        name: "tcpdump",
        binary: "tcpdump",
        optional: true,
    },
];

impl Package {
    /// Debian/Ubuntu package names that may provide the program, preferred first.
    fn apt_names(&self) -> Vec<String> {
        let mut names = vec![self.name.to_string()];
        if self.name == "bpftool" {
            // Ubuntu ships bpftool in the kernel-specific tools package.
            if let Ok(release) = fs::read_to_string("/proc/sys/kernel/osrelease") {
                names.push(format!("linux-tools-{}", release.trim()));
            }
        }
        names
    }
}

/// The `Candidate:` version from `apt-cache policy PKG`, if installable.
pub fn apt_candidate(policy: &str) -> Option<&str> {
    policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|c| !c.is_empty() && *c != "(none)")
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// The first of `pkg`'s package names apt can install.
fn resolve_apt_name(pkg: &Package) -> Result<Option<String>> {
    for name in pkg.apt_names() {
        let policy = cmd::output(Command::new("apt-cache").args(["policy", &name]))?;
        if apt_candidate(&policy).is_some() {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

fn ensure_packages(report: &mut Report) -> Result<()> {
    say!("checking system packages");
    let mut missing = Vec::new();
    for pkg in PACKAGES {
        match cmd::find_executable(pkg.binary) {
            Some(path) => report.present(format!("{} ({})", pkg.name, path.display())),
            None => {
                say!("{} missing (no `{}` program)", pkg.name, pkg.binary);
                missing.push(pkg);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names = |pkgs: &[&Package]| pkgs.iter().map(|p| p.name).collect::<Vec<_>>().join(" ");
    let required: Vec<&Package> = missing.iter().copied().filter(|p| !p.optional).collect();

    if !cmd::is_root() {
        report.warn(format!(
            "not root: skipping apt-get; missing packages: {} (the integration tests and \
             the demo need them; run `cargo xtask setup` as root to install them)",
            names(&missing)
        ));
        return Ok(());
    }
    if cmd::find_executable("apt-get").is_none() {
        let message = format!(
            "apt-get not found; install these packages with your package manager: {}",
            names(&missing)
        );
        if required.is_empty() {
            report.warn(message);
            return Ok(());
        }
        bail!(message);
    }

    say!("installing Debian packages: {}", names(&missing));
    cmd::run(apt_get().arg("update"))?;
    let mut install = Vec::new();
    let mut optional = Vec::new();
    let mut unavailable = Vec::new();
    for pkg in &missing {
        match resolve_apt_name(pkg)? {
            Some(name) if pkg.optional => optional.push(name),
            Some(name) => install.push(name),
            None if pkg.optional => report.warn(format!(
                "optional package {} is not available from apt",
                pkg.name
            )),
            None => unavailable.push(pkg.name),
        }
    }
    if !unavailable.is_empty() {
        bail!(
            "apt has no installation candidate for: {} (check /etc/apt/sources.list*)",
            unavailable.join(" ")
        );
    }
    let apt_install = |names: &[String]| {
        cmd::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(names),
        )
    };
    if !install.is_empty() {
        apt_install(&install)?;
    }
    if !optional.is_empty() {
        if let Err(err) = apt_install(&optional) {
            report.warn(format!("optional packages not installed: {err:#}"));
        }
    }
    for pkg in missing {
        match cmd::find_executable(pkg.binary) {
            Some(_) => report.installed(pkg.name),
            None if pkg.optional => {}
            None => bail!(
                "`{}` is still missing after installing package {}",
                pkg.binary,
                pkg.name
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_in_toolchain_list() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n\
                    1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly("stable-x86_64-unknown-linux-gnu (default)\n"));
        assert!(!has_nightly(
            "nightly-2025-01-01-x86_64-unknown-linux-gnu\n"
        ));
        assert!(has_nightly("nightly-aarch64-unknown-linux-gnu (active)\n"));
        assert!(!has_nightly("no installed toolchains\n"));
        assert!(!has_nightly(""));
    }

    #[test]
    fn components() {
        let installed = "cargo-x86_64-unknown-linux-gnu\n\
                         clippy-x86_64-unknown-linux-gnu\n\
                         rust-src\n\
                         rust-std-x86_64-unknown-linux-gnu\n\
                         rustc-x86_64-unknown-linux-gnu\n";
        let host = "x86_64-unknown-linux-gnu";
        assert!(has_component(installed, "rust-src", host));
        assert!(has_component(installed, "clippy", host));
        assert!(!has_component(installed, "rustfmt", host));
        assert!(!has_component(installed, "rust", host));
        assert!(!has_component(
            installed,
            "clippy",
            "aarch64-unknown-linux-gnu"
        ));
        assert!(!has_component(
            "rust-std-x86_64-unknown-linux-gnu\n",
            "rust-src",
            host
        ));
        assert!(!has_component("", "rust-src", host));
    }

    #[test]
    fn rustc_host() {
        let vv = "rustc 1.97.0-nightly (abc 2026-05-01)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.0\n";
        assert_eq!(parse_rustc_host(vv), Some("x86_64-unknown-linux-gnu"));
        assert_eq!(parse_rustc_host("host:\n"), None);
        assert_eq!(parse_rustc_host(""), None);
    }

    #[test]
    fn cache_dir_choice() {
        assert_eq!(
            cache_dir_from(Some("/x/cache"), Some("/root")).unwrap(),
            Path::new("/x/cache/forwarder")
        );
        assert_eq!(
            cache_dir_from(Some("relative"), Some("/root")).unwrap(),
            Path::new("/root/.cache/forwarder")
        );
        assert_eq!(
            cache_dir_from(None, Some("/home/u")).unwrap(),
            Path::new("/home/u/.cache/forwarder")
        );
        assert!(cache_dir_from(None, None).is_err());
        assert!(cache_dir_from(Some(""), Some("")).is_err());
    }

    #[test]
    fn apt_policy() {
        let available = "bpftool:\n  Installed: (none)\n  Candidate: 7.1.0+6.1.172-1\n  \
                         Version table:\n     7.1.0+6.1.172-1 500\n";
        assert_eq!(apt_candidate(available), Some("7.1.0+6.1.172-1"));
        assert_eq!(
            apt_candidate("foo:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(apt_candidate(""), None);
    }

    #[test]
    fn package_table() {
        assert!(PACKAGES
            .iter()
            .filter(|p| p.optional)
            .all(|p| p.name == "tcpdump"));
        let bpftool = PACKAGES.iter().find(|p| p.name == "bpftool").unwrap();
        assert_eq!(bpftool.apt_names()[0], "bpftool");
    }
}
