//! Running external commands: every failure names the full command line.

use std::{
    ffi::OsStr,
    fmt,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{anyhow, Context as _, Result};

/// Prints a progress line.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("xtask: {}", format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Prints a warning line (to stderr, so it stands out from command output).
macro_rules! warning {
    ($($arg:tt)*) => {
        eprintln!("xtask: warning: {}", format_args!($($arg)*))
    };
}
pub(crate) use warning;

/// The user interrupted a child command (Ctrl-C); everything stops.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted: `{}`", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Quotes `s` for a POSIX shell when it needs quoting.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn quote_os(s: &OsStr) -> String {
    shell_quote(&s.to_string_lossy())
}

/// The command line as a shell would read it, with explicitly set variables
/// in front (`LLVM_PREFIX=/x cargo install ...`).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote_os(value)));
        }
    }
    parts.push(quote_os(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote_os));
    parts.join(" ")
}

/// Ignores SIGINT in xtask while a foreground child runs, so Ctrl-C reaches
/// the child (same process group) and lets it clean up before xtask reports.
struct IgnoreSigint {
    previous: libc::sighandler_t,
}

impl IgnoreSigint {
    fn new() -> Self {
        // SAFETY: installs the SIG_IGN disposition; no handler code runs.
        let previous = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
        Self { previous }
    }
}

impl Drop for IgnoreSigint {
    fn drop(&mut self) {
        if self.previous != libc::SIG_ERR {
            // SAFETY: restores the disposition that was in place before.
            unsafe { libc::signal(libc::SIGINT, self.previous) };
        }
    }
}

/// Describes how a command ended, for error messages.
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("{status}"),
    }
}

/// Runs `cmd` in the foreground (inherited stdio) and returns how it ended.
/// Errors only when it cannot be started or was interrupted by Ctrl-C.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let line = display(cmd);
    say!("running: {line}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let guard = IgnoreSigint::new();
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for `{line}`"));
    drop(guard);
    let status = status?;
    if status.signal() == Some(libc::SIGINT) || status.code() == Some(128 + libc::SIGINT) {
        return Err(Interrupted(line).into());
    }
    Ok(status)
}

/// Runs `cmd` in the foreground and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "`{}` failed: {}",
            display(cmd),
            describe_status(status)
        ))
    }
}

/// What a quiet query command produced.
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` quietly, capturing its output, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Captured> {
    let line = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    Ok(Captured {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `cmd` quietly and returns its stdout; fails (with its stderr) unless
/// it exits successfully.
pub fn output(cmd: &mut Command) -> Result<String> {
    let captured = capture(cmd)?;
    if captured.status.success() {
        Ok(captured.stdout)
    } else {
        Err(anyhow!(
            "`{}` failed: {}{}",
            display(cmd),
            describe_status(captured.status),
            indent_stderr(&captured.stderr)
        ))
    }
}

fn indent_stderr(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(
            "\n{}",
            stderr
                .lines()
                .map(|l| format!("    {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// The cargo that runs xtask (`$CARGO`), so nested builds use the same
/// toolchain; falls back to `cargo` on PATH.
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(program)
}

/// `rustup run <toolchain> <program>`.
pub fn rustup_run(toolchain: &str, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", toolchain, program]);
    cmd
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, else
/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(root) = var("CARGO_INSTALL_ROOT") {
        return Some(PathBuf::from(root).join("bin"));
    }
    if let Some(home) = var("CARGO_HOME") {
        return Some(PathBuf::from(home).join("bin"));
    }
    var("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// Appends cargo's bin directory to this process's PATH (inherited by every
/// child) unless it is there already, so a freshly installed bpf-linker is
/// found by rustc.
pub fn add_cargo_bin_to_path() -> Result<()> {
    let Some(bin) = cargo_bin_dir() else {
        return Ok(());
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if dirs.contains(&bin) {
        return Ok(());
    }
    dirs.push(bin);
    let joined = std::env::join_paths(dirs).context("cargo's bin directory cannot go in PATH")?;
    // xtask is still single-threaded here.
    std::env::set_var("PATH", joined);
    Ok(())
}

/// Finds an executable named `name` in `$PATH` only, as `Command` would.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Finds an executable named `name` in `$PATH` and the sbin directories
/// (which a non-root PATH often lacks), like `command -v`.
pub fn find_executable(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .iter()
            .map(PathBuf::from),
        )
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when xtask runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--features"), "--features");
        assert_eq!(shell_quote("llvm-22"), "llvm-22");
        assert_eq!(shell_quote("/a/b.c"), "/a/b.c");
        assert_eq!(shell_quote("-f=${Status}"), "'-f=${Status}'");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn display_shows_env_and_args() {
        let mut cmd = Command::new("cargo");
        cmd.env("LLVM_PREFIX", "/tmp/p q")
            .args(["install", "bpf-linker"]);
        assert_eq!(
            display(&cmd),
            "LLVM_PREFIX='/tmp/p q' cargo install bpf-linker"
        );
    }

    #[test]
    fn failing_command_is_named() {
        let err = output(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("`sh -c 'echo oops >&2; exit 3'` failed: exit status 3"),
            "{msg}"
        );
        assert!(msg.contains("oops"), "{msg}");
    }

    #[test]
    fn child_killed_by_sigint_is_an_interruption() {
        let err = run(Command::new("sh").args(["-c", "kill -INT $$"])).expect_err("must fail");
        assert!(err.chain().any(|e| e.is::<Interrupted>()), "{err:#}");
        let err = run(Command::new("sh").args(["-c", "kill -TERM $$"])).expect_err("must fail");
        assert!(
            format!("{err:#}").ends_with("killed by signal 15"),
            "{err:#}"
        );
        assert!(run(&mut Command::new("true")).is_ok());
    }

    #[test]
    fn missing_program_is_named() {
        let err =
            output(&mut Command::new("/nonexistent/xtask-no-such-program")).expect_err("must fail");
        assert!(format!("{err:#}").contains("failed to start `/nonexistent/xtask-no-such-program`"));
    }
}
