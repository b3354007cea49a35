//! The forwarder daemon as a child process inside a node's namespace, with a
//! Drop guard, and the paths of the binaries the tests run.
//!
//! `ip netns exec` gives each process it starts a private mount namespace with
//! the node's own /sys; the daemon mounts bpffs at its pin dir's parent inside
//! that mount namespace, which another `ip netns exec` would not see. So the
//! daemon runs inside an *anchor*: a `sleep` started with `ip netns exec` in the
//! node's namespace, whose mount and network namespaces the daemon, `forwarder
//! stats` and the pin-dir checks all join (`setns` before exec). The anchor
//! outlives the daemon, so the tests can check that the pin dir is gone.

use std::{
    ffi::OsStr,
    fs::File,
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::netns;

/// The directory holding the release binaries: `$FORWARDER_TARGET_DIR`, else
/// the parent of the running executable's directory when that is `deps`
/// (test executables live in target/<profile>/deps), else its own directory.
pub fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FORWARDER_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    if dir.file_name() == Some(OsStr::new("deps")) {
        if let Some(parent) = dir.parent() {
            return Ok(parent.to_path_buf());
        }
    }
    Ok(dir.to_path_buf())
}

/// A binary of this workspace (`podserver`, `forwarder`, ...) in [`target_dir`].
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let path = target_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release -p integration-tests --bins; \
             cargo build --release -p forwarder) or set FORWARDER_TARGET_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// The podserver binary.
pub fn podserver_bin() -> Result<PathBuf> {
    workspace_binary("podserver")
}

/// The forwarder binary: `$FORWARDER_BIN`, else `forwarder` in [`target_dir`].
pub fn forwarder_bin() -> Result<PathBuf> {
    match std::env::var_os("FORWARDER_BIN") {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("FORWARDER_BIN={} is not a file", p.display());
            }
            Ok(p)
        }
        None => workspace_binary("forwarder"),
    }
}

/// How to run the daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// `--iface` (comma separated list allowed).
    pub iface: String,
    /// `--node-name`.
    pub node_name: String,
    /// `--manifests` (file or directory).
    pub manifests: PathBuf,
    /// `--xdp-mode` (`auto`, `native`, `generic`); not passed when `None`.
    pub xdp_mode: Option<String>,
    /// `--xdp-tx` (`auto`, `on`, `off`); not passed when `None`. The
    /// daemon's `auto` keeps XDP transmit off for native XDP on a veth, as
    /// it cannot tell whether the peer has NAPI: pass `on` with a cluster
    /// built with `wire_napi` to exercise XDP_TX as on a NIC.
    pub xdp_tx: Option<String>,
    /// Further arguments appended to `forwarder run`.
    pub extra_args: Vec<String>,
    /// Where the daemon's stderr/stdout go (`<dir>/forwarder-<node>.log`).
    pub log_dir: PathBuf,
    /// How long to wait for the `ready` line.
    pub ready_timeout: Duration,
}

impl DaemonOptions {
    pub fn new(node_name: &str, manifests: &Path, log_dir: &Path) -> Self {
        DaemonOptions {
            iface: "eth0".into(),
            node_name: node_name.into(),
            manifests: manifests.to_path_buf(),
            xdp_mode: None,
            xdp_tx: None,
            extra_args: Vec::new(),
            log_dir: log_dir.to_path_buf(),
            // Loading and verifying the programs takes seconds, more on a
            // busy machine.
            ready_timeout: Duration::from_secs(60),
        }
    }
}

/// A process that holds a mount namespace (with the node's /sys) open for
/// the daemon and the checks; killed on Drop.
struct Anchor {
    child: Child,
    mnt: File,
    net: File,
}

impl Anchor {
    fn start(ns: &str) -> Result<Anchor> {
        let mut cmd = netns::exec_command(ns, &["sleep", "infinity"]);
        netns::die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the anchor process in {ns}"))?;
        let pid = child.id();
        // `ip netns exec` unshares the mount namespace, mounts /sys, then
        // execs sleep: wait until the process is sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("anchor `ip netns exec {ns} sleep infinity` exited: {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("anchor process in {ns} did not start within 5 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let open = |kind: &str| {
            File::open(format!("/proc/{pid}/ns/{kind}"))
                .with_context(|| format!("opening /proc/{pid}/ns/{kind}"))
        };
        let (mnt, net) = match (open("mnt"), open("net")) {
            (Ok(m), Ok(n)) => (m, n),
            (Err(e), _) | (_, Err(e)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Anchor { child, mnt, net })
    }

    /// A command that runs `program` inside the anchor's network and mount
    /// namespaces.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        let (net, mnt): (RawFd, RawFd) = (self.net.as_raw_fd(), self.mnt.as_raw_fd());
        // SAFETY: between fork and exec we only call setns(2) and chdir(2),
        // which are async-signal-safe, on descriptors that stay open in the
        // parent until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(net, libc::CLONE_NEWNET) != 0
                    || libc::setns(mnt, libc::CLONE_NEWNS) != 0
                    || libc::chdir(c"/".as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Anchor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running daemon; SIGTERM (then SIGKILL after 5 s) on Drop.
pub struct Daemon {
    child: Option<Child>,
    anchor: Anchor,
    ns: String,
    pin_dir: PathBuf,
    log: PathBuf,
    bin: PathBuf,
}

impl Daemon {
    /// Starts `forwarder run` inside node namespace `ns` and waits for the
    /// `ready` line on its stderr (failing with the log on timeout or exit).
    pub fn start(ns: &str, opts: &DaemonOptions) -> Result<Daemon> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let bin = forwarder_bin()?;
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/fwdtest-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&opts.log_dir)
            .with_context(|| format!("creating {}", opts.log_dir.display()))?;
        let log = opts
            .log_dir
            .join(format!("forwarder-{}.log", opts.node_name));
        let anchor = Anchor::start(ns)?;
        let mut daemon = Daemon {
            child: None,
            anchor,
            ns: ns.to_string(),
            pin_dir,
            log,
            bin,
        };
        daemon.spawn(opts)?;
        Ok(daemon)
    }

    /// Starts `forwarder run` again on the same node, pin dir and mount
    /// namespace (after [`Daemon::stop`] or [`Daemon::kill`]): a restart, or
    /// an upgrade when `opts` differ. Waits for its `ready` line.
    pub fn restart(&mut self, opts: &DaemonOptions) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if child.try_wait()?.is_none() {
                self.child = Some(child);
                bail!("restart: the previous forwarder is still running");
            }
        }
        self.spawn(opts)
    }

    /// SIGKILL, as the OOM killer or a node drain would: nothing is cleaned up.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing forwarder")?;
            child.wait().context("reaping forwarder")?;
        }
        Ok(())
    }

    /// `forwarder uninstall` on the daemon's pin dir (no daemon needed).
    pub fn uninstall(&self) -> Result<()> {
        let pin = self.pin_dir.to_string_lossy().into_owned();
        let out = self.forwarder(&["uninstall", "--pin-dir", &pin])?;
        ensure!(
            out.status.success(),
            "forwarder uninstall failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn spawn(&mut self, opts: &DaemonOptions) -> Result<()> {
        // Each run appends to the log; `ready` is awaited after what is there.
        let skip = self.log_lines();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let log_out = log_file.try_clone().context("duplicating the log fd")?;
        let mut cmd = self.anchor.command(&self.bin);
        cmd.arg("run")
            .args(["--iface", &opts.iface])
            .args(["--node-name", &opts.node_name])
            .arg("--manifests")
            .arg(&opts.manifests)
            .arg("--pin-dir")
            .arg(&self.pin_dir);
        if let Some(mode) = &opts.xdp_mode {
            cmd.args(["--xdp-mode", mode]);
        }
        if let Some(tx) = &opts.xdp_tx {
            cmd.args(["--xdp-tx", tx]);
        }
        netns::die_with_parent(&mut cmd, libc::SIGTERM);
        cmd.args(&opts.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {}", self.ns))?;
        self.child = Some(child);
        self.wait_for_log_after("ready: ", skip, opts.ready_timeout)
    }

    /// The node namespace the daemon runs in.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Path of the file holding the daemon's stderr and stdout.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<{}: {e}>", self.log.display()))
    }

    /// Waits until a log line contains `needle`; fails (showing the log) when
    /// the daemon exits or the timeout passes.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_after(needle, 0, timeout)
    }

    /// Like [`Daemon::wait_for_log`], for lines after the first `skip_lines`.
    pub fn wait_for_log_after(
        &mut self,
        needle: &str,
        skip_lines: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self
                .log()
                .lines()
                .skip(skip_lines)
                .any(|l| l.contains(needle))
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "forwarder exited ({status}) before logging {needle:?}; its log:\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "forwarder did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of lines logged so far (for [`Daemon::wait_for_log_after`]).
    pub fn log_lines(&self) -> usize {
        self.log().lines().count()
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `forwarder <args>` in the daemon's namespaces.
    pub fn forwarder(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = self.anchor.command(&self.bin);
        cmd.args(args).stdin(Stdio::null());
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    /// Runs any program in the daemon's network and mount namespaces.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.anchor.command(Path::new(program));
        cmd.args(args).stdin(Stdio::null());
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    fn stats_output(&self, format: &str) -> Result<String> {
        let pin = self.pin_dir.to_string_lossy().into_owned();
        let out = self.forwarder(&["stats", "--pin-dir", &pin, "--output", format])?;
        if !out.status.success() {
            bail!(
                "forwarder stats failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `forwarder stats --output json`, parsed.
    pub fn stats_json(&self) -> Result<serde_json::Value> {
        let text = self.stats_output("json")?;
        serde_json::from_str(&text).with_context(|| format!("parsing stats JSON: {text}"))
    }

    /// `forwarder stats --output text`.
    pub fn stats_text(&self) -> Result<String> {
        self.stats_output("text")
    }

    /// The daemon's pinned maps, opened from the test process. The pin dir
    /// lives on the bpffs mounted in the anchor's mount namespace; the
    /// anchor's `/proc/<pid>/root` reaches it without joining that namespace.
    pub fn maps(&self) -> Result<forwarder::maps::Maps> {
        let relative = self.pin_dir.strip_prefix("/").unwrap_or(&self.pin_dir);
        let pin_dir =
            PathBuf::from(format!("/proc/{}/root", self.anchor.child.id())).join(relative);
        forwarder::maps::Maps::open_pinned(&pin_dir)
            .with_context(|| format!("opening the maps pinned in {}", pin_dir.display()))
    }

    /// Packets of tracked flows the datapath handed to the kernel, by reason
    /// (only reasons that occurred: empty when every packet of every flow
    /// stayed on the forwarder's path).
    pub fn flow_pass_totals(&self) -> Result<std::collections::BTreeMap<&'static str, u64>> {
        self.maps()?.flow_pass_totals()
    }

    /// Whether the pin dir exists (seen from the daemon's mount namespace,
    /// also after the daemon stopped).
    pub fn pin_dir_exists(&self) -> Result<bool> {
        let pin = self.pin_dir.to_string_lossy().into_owned();
        let out = self.exec("/bin/sh", &["-c", "test -e \"$0\"", &pin])?;
        Ok(out.status.success())
    }

    /// SIGTERM, then wait up to 5 s (SIGKILL after that). Fails unless the
    /// daemon exits with status 0. The namespaces stay available for checks.
    pub fn stop(&mut self) -> Result<()> {
        let status = self.terminate()?;
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!(
                "forwarder exited with {} after SIGTERM; its log:\n{}",
                describe(s),
                self.log()
            ),
            None => bail!("forwarder was not running; its log:\n{}", self.log()),
        }
    }

    /// Sends SIGTERM and reaps the daemon; `None` if it had already been reaped.
    fn terminate(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Ok(Some(s)) = child.try_wait() {
            return Ok(Some(s));
        }
        let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(s) = child.try_wait().context("waiting for forwarder")? {
                return Ok(Some(s));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let s = child
                    .wait()
                    .context("waiting for forwarder after SIGKILL")?;
                bail!(
                    "forwarder did not exit within 5 s of SIGTERM (killed: {}); its log:\n{}",
                    describe(s),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s}"),
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.terminate() {
            eprintln!("warning: stopping forwarder in {}: {e:#}", self.ns);
        }
        // The anchor (and with it the mount namespace holding the bpffs
        // mount) goes next, as a field.
    }
}

/// Packets `forwarder stats --output json` counted for the service port that
/// serves `frontend` (`"192.0.2.1:31380/TCP"`).
pub fn frontend_packets(stats: &serde_json::Value, frontend: &str) -> u64 {
    stats["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| {
                    s["frontends"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|f| f.as_str() == Some(frontend)))
                })
                .filter_map(|s| s["packets"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}
