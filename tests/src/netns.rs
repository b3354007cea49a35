//! Network namespaces with Drop guards, and small helpers to run commands and
//! change settings inside them.
//!
//! Everything the tests create lives in namespaces made here: a [`Netns`] is
//! deleted (with the veths inside it) when dropped, even when a test panics.
//! Settings are changed from a helper thread that joined the namespace
//! (`setns`), so no sysctl, route or address ever touches the root namespace.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

/// Why the network tests cannot run here (not root, no `ip`), or `None`.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`ip -V` failed ({s})")),
        Err(e) => Some(format!("`ip` (iproute2) not available: {e}")),
    }
}

/// Returns from the calling test with `skipped: <reason>` printed when the
/// network tests cannot run here.
#[macro_export]
macro_rules! skip_unless_netns_capable {
    () => {
        if let Some(reason) = $crate::netns::skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// A short prefix unique to this process and call: `fwd<pid>x<k>`, where `k`
/// counts the calls in this process. Namespace names built from it do not
/// collide with a parallel run (other pid) nor with an earlier cluster of the
/// same process that is still being torn down.
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let k = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("fwd{}x{k}", std::process::id())
}

/// The pid in a name made from [`unique_prefix`] (`fwd<pid>x<k>...`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("fwd")?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Left behind: its process is gone and it is older than a few minutes (a
/// margin against a process we cannot see, e.g. in another pid namespace).
fn stale(name: &str, path: &Path) -> bool {
    const MIN_AGE: std::time::Duration = std::time::Duration::from_secs(300);
    owner_pid(name).is_some_and(|pid| !process_alive(pid))
        && std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= MIN_AGE)
}

/// Removes what a run killed by a signal (so its Drop guards never ran) left
/// behind: namespaces named `fwd<pid>x...` and temp directories `fwd<pid>x<k>`
/// whose process no longer exists and that are older than 5 minutes. Processes started by the test library die
/// with their parent (PR_SET_PDEATHSIG), which lets these namespaces go.
pub fn reap_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split_whitespace().next() else {
                continue;
            };
            if stale(name, &Path::new("/run/netns").join(name)) {
                eprintln!("removing netns {name} left by a killed run");
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let well_formed = name
                .strip_prefix("fwd")
                .and_then(|r| r.split_once('x'))
                .is_some_and(|(p, k)| {
                    !p.is_empty()
                        && !k.is_empty()
                        && p.bytes().all(|b| b.is_ascii_digit())
                        && k.bytes().all(|b| b.is_ascii_digit())
                });
            if well_formed && stale(&name, &entry.path()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Makes a command's process get `signal` when the thread that spawned it
/// ends (test threads own their clusters), so nothing outlives a killed test.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a command and returns its output; fails (with stderr) on a non-zero exit.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// `ip <args>` in the root namespace's view (only used with `-n <ns>` or
/// `netns ...` so that nothing changes outside our namespaces).
fn ip(args: &[&str]) -> Result<Output> {
    run_checked(Command::new("ip").args(args))
}

/// An ethtool feature toggled through the `SIOCETHTOOL` ioctl (what
/// `ethtool -K` does), so the tests need no ethtool binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// `tx`: transmit checksum offload. Off means every locally generated
    /// packet leaves with a complete checksum, as on a real wire.
    TxChecksum,
    /// `gro`: on a veth this also enables NAPI on its receive side, which
    /// lets a peer's XDP program transmit into it (XDP_TX / redirect).
    Gro,
    /// `tso`: TCP segmentation offload (all TSO variants). Off means a TCP
    /// super-packet sent through the device is cut to MTU-sized segments.
    Tso,
    /// `gso`: generic segmentation offload (segmentation in software just
    /// before the device transmits, for packets it cannot segment itself).
    Gso,
}

impl Offload {
    /// (get, set) ethtool commands of linux/ethtool.h.
    fn commands(self) -> (u32, u32) {
        match self {
            Offload::TxChecksum => (0x16, 0x17), // ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM
            Offload::Gro => (0x2b, 0x2c),        // ETHTOOL_GGRO, ETHTOOL_SGRO
            Offload::Tso => (0x1e, 0x1f),        // ETHTOOL_GTSO, ETHTOOL_STSO
            Offload::Gso => (0x23, 0x24),        // ETHTOOL_GGSO, ETHTOOL_SGSO
        }
    }
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// One ethtool get/set on `iface` in the current thread's namespace.
fn ethtool_value(iface: &str, cmd: u32, data: u32) -> Result<u32> {
    if iface.len() >= libc::IFNAMSIZ {
        bail!("interface name {iface:?} too long");
    }
    // SAFETY: plain socket(2) call; the fd is closed by File's Drop.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket for SIOCETHTOOL");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { File::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req points at a valid ifreq whose data points at a valid
    // ethtool_value, both alive for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("SIOCETHTOOL cmd {cmd:#x} on {iface}"));
    }
    Ok(value.data)
}

/// A network namespace created with `ip netns add`; `ip netns del` on Drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace (fails if the name exists) and brings `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip_in(&self.name, args)
    }

    /// Runs `args` inside the namespace, returning stdout; fails on a non-zero exit.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        exec_in(&self.name, args)
    }

    /// Runs `f` on a helper thread that joined this namespace (network only):
    /// sockets, ioctls and /proc/sys/net writes made by `f` apply here.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
        run_in(&self.name, f)
    }

    /// Sets `net.<key>` (e.g. `ipv4.ip_forward`) to `value` in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sysctl_in(&self.name, key, value)
    }

    /// Reads `net.<key>` in this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        sysctl_get_in(&self.name, key)
    }

    /// `ethtool -K <iface> <offload> on|off` in this namespace.
    pub fn set_offload(&self, iface: &str, offload: Offload, on: bool) -> Result<()> {
        set_offload_in(&self.name, iface, offload, on)
    }

    /// Current state of an offload (`ethtool -k`).
    pub fn offload(&self, iface: &str, offload: Offload) -> Result<bool> {
        offload_in(&self.name, iface, offload)
    }
}

/// Sets `net.<key>` (e.g. `ipv4.ip_forward`) to `value` in namespace `ns`.
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/net/{}", key.replace('.', "/"));
    run_in(ns, || {
        std::fs::write(&path, value).with_context(|| format!("writing {path}"))?;
        Ok(())
    })
    .with_context(|| format!("sysctl net.{key}={value} in netns {ns}"))
}

/// Reads `net.<key>` in namespace `ns`.
pub fn sysctl_get_in(ns: &str, key: &str) -> Result<String> {
    let path = format!("/proc/sys/net/{}", key.replace('.', "/"));
    run_in(ns, || {
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_string())
    })
}

/// `ethtool -K <iface> <offload> on|off` in namespace `ns`; checks the result.
pub fn set_offload_in(ns: &str, iface: &str, offload: Offload, on: bool) -> Result<()> {
    let (get, set) = offload.commands();
    run_in(ns, || {
        ethtool_value(iface, set, u32::from(on))?;
        let now = ethtool_value(iface, get, 0)? != 0;
        if now != on {
            bail!("{offload:?} on {iface} is still {now} after setting it to {on}");
        }
        Ok(())
    })
    .with_context(|| format!("ethtool {offload:?}={on} on {iface} in {ns}"))
}

/// Whether an offload is on for `iface` in namespace `ns` (`ethtool -k`).
pub fn offload_in(ns: &str, iface: &str, offload: Offload) -> Result<bool> {
    let (get, _) = offload.commands();
    run_in(ns, || Ok(ethtool_value(iface, get, 0)? != 0))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Also removes every interface inside (veth peers go with them).
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// `ip -n <ns> <args>`, returning stdout.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let out = run_checked(Command::new("ip").arg("-n").arg(ns).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command `ip netns exec <ns> <args...>` (not yet spawned).
pub fn exec_command<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Runs `args` inside `ns` with `ip netns exec`, returning stdout; fails
/// (showing stderr) on a non-zero exit.
pub fn exec_in<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<String> {
    let out = run_checked(&mut exec_command(ns, args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` inside `ns`, returning the whole output whatever the exit status.
pub fn exec_output<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Result<Output> {
    let mut cmd = exec_command(ns, args);
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))
}

/// Runs `f` on a scoped thread that joined network namespace `ns` (by its
/// `ip netns` name). The calling thread's namespace is untouched.
pub fn run_in<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = Path::new("/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid netns fd; it only changes this
            // helper thread's network namespace, which ends with the thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {}", path.display()));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| bail!("thread inside netns {ns} panicked"))
    })
}

/// The packet and byte counters of a device, as `/proc/net/dev` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Frames the device refused (e.g. larger than its MTU).
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// [`LinkStats`] of `iface` in namespace `ns`.
pub fn link_stats(ns: &str, iface: &str) -> Result<LinkStats> {
    run_in(ns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .context("reading /proc/thread-self/net/dev")?;
        for line in text.lines() {
            let Some((name, rest)) = line.split_once(':') else {
                continue;
            };
            if name.trim() != iface {
                continue;
            }
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("malformed /proc/net/dev line {line:?}"))?;
            // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
            if fields.len() < 10 {
                bail!("short /proc/net/dev line {line:?}");
            }
            return Ok(LinkStats {
                rx_bytes: fields[0],
                rx_packets: fields[1],
                rx_dropped: fields[3],
                tx_bytes: fields[8],
                tx_packets: fields[9],
            });
        }
        bail!("no {iface} in /proc/net/dev")
    })
    .with_context(|| format!("reading the counters of {iface} in {ns}"))
}

/// A counter of `/proc/net/snmp` in namespace `ns`, e.g. (`Tcp`,
/// `InCsumErrors`): segments the namespace's stack dropped for a bad checksum.
pub fn snmp_counter(ns: &str, group: &str, name: &str) -> Result<u64> {
    run_in(ns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/snmp")
            .context("reading /proc/thread-self/net/snmp")?;
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no {group} lines in /proc/net/snmp");
        };
        let index = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("no {group} counter {name} in /proc/net/snmp"))?;
        let value = values
            .split_whitespace()
            .nth(index)
            .with_context(|| format!("short {group} values line {values:?}"))?;
        value
            .parse()
            .with_context(|| format!("{group} {name}: bad value {value:?}"))
    })
    .with_context(|| format!("in netns {ns}"))
}

/// A minimal XDP program (`return XDP_PASS;`) loaded with bpf(2) and attached
/// in native mode to `iface` in namespace `ns` through a BPF link.
///
/// It stands for the receive side of a NIC: a veth only flushes the frames
/// that its peer sends with XDP_TX when an XDP program is attached to it (NAPI
/// from GRO alone leaves them queued until some other packet arrives). The
/// program is detached when the returned link is closed, and in any case
/// with the namespace.
pub fn attach_xdp_pass(ns: &str, iface: &str) -> Result<OwnedFd> {
    run_in(ns, || {
        let ifindex = if_index(iface)?;
        let prog = load_xdp_pass().context("loading an XDP_PASS program")?;
        xdp_link_create(&prog, ifindex)
            .with_context(|| format!("attaching XDP_PASS to {iface} (native mode)"))
    })
    .with_context(|| format!("in netns {ns}"))
}

fn if_index(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).context("interface name")?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("no interface {iface}"));
    }
    Ok(index)
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the rest of the
/// 128 bytes stay zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 7],
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 14],
}

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> Result<OwnedFd> {
    // SAFETY: attr points at a zero-initialised attribute block of `size`
    // bytes, valid for the duration of the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bpf(cmd {cmd})"));
    }
    let fd = i32::try_from(fd).context("bpf(2) returned an impossible fd")?;
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn load_xdp_pass() -> Result<OwnedFd> {
    // r0 = XDP_PASS (2); exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"wire_pass");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    bpf(
        BPF_PROG_LOAD,
        (&mut attr as *mut ProgLoadAttr).cast(),
        std::mem::size_of::<ProgLoadAttr>(),
    )
}

fn xdp_link_create(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).context("negative fd")?,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
        ..Default::default()
    };
    bpf(
        BPF_LINK_CREATE,
        (&mut attr as *mut LinkCreateAttr).cast(),
        std::mem::size_of::<LinkCreateAttr>(),
    )
}

/// A node namespace for running the datapath's programs through
/// BPF_PROG_TEST_RUN: `eth0` (192.0.2.1/24, MAC 02:00:00:00:00:01) facing
/// the client (192.0.2.100) and node2 (192.0.2.2, behind which 10.244.2.0/24
/// lives), `cali1` (MAC 02:00:00:00:0c:01) leading to a local pod at
/// 10.244.1.10, with permanent neighbours so FIB lookups succeed, and
/// forwarding on. Named `<unique prefix><suffix>`.
pub fn test_run_node(suffix: &str) -> Result<Netns> {
    let ns = Netns::create(&format!("{}{suffix}", unique_prefix()))?;
    // No IPv6 on the devices: their router and multicast-listener
    // solicitations would reach the attached XDP program at random moments
    // and move the counters the tests account for exactly.
    ns.sysctl("ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("ipv6.conf.default.disable_ipv6", "1")?;
    let commands: [&[&str]; 14] = [
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "wire0",
        ],
        &[
            "link", "add", "cali1", "type", "veth", "peer", "name", "pod1",
        ],
        &["link", "set", "eth0", "address", "02:00:00:00:00:01"],
        &["link", "set", "cali1", "address", "02:00:00:00:0c:01"],
        &["link", "set", "eth0", "up"],
        &["link", "set", "wire0", "up"],
        &["link", "set", "cali1", "up"],
        &["link", "set", "pod1", "up"],
        &["addr", "add", "192.0.2.1/24", "dev", "eth0"],
        &["route", "add", "10.244.1.10/32", "dev", "cali1"],
        &[
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "192.0.2.2",
            "dev",
            "eth0",
        ],
        &[
            "neigh",
            "replace",
            "192.0.2.2",
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "replace",
            "192.0.2.100",
            "lladdr",
            "02:00:00:00:00:64",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "replace",
            "10.244.1.10",
            "lladdr",
            "02:00:00:00:01:10",
            "dev",
            "cali1",
            "nud",
            "permanent",
        ],
    ];
    for args in commands {
        ns.ip(args)?;
    }
    ns.sysctl("ipv4.ip_forward", "1")?;
    ns.sysctl("ipv4.conf.all.forwarding", "1")?;
    Ok(ns)
}

/// Fills the interfaces map as the daemon would for the devices of
/// [`test_run_node`]: `eth0` external (XDP transmit, source-NAT address
/// 192.0.2.1) and `cali1` a pod veth. Call from inside that namespace;
/// returns their ifindexes `(eth0, cali1)`.
pub fn configure_test_run_node(maps: &mut forwarder::maps::Maps) -> Result<(u32, u32)> {
    use forwarder_common::{IfaceInfo, IFACE_F_EXTERNAL, IFACE_F_VETH_PEER, IFACE_F_XDP_TX};
    let eth0 = forwarder::netdev::ifindex("eth0")?;
    let cali = forwarder::netdev::ifindex("cali1")?;
    let external = IfaceInfo {
        snat_addr_be: u32::from_ne_bytes([192, 0, 2, 1]),
        flags: IFACE_F_EXTERNAL | IFACE_F_XDP_TX,
        host_mac: forwarder::netdev::mac("eth0")?,
        ..IfaceInfo::default()
    };
    maps.ifaces.insert(eth0, external, 0)?;
    let pod = IfaceInfo {
        snat_addr_be: 0,
        flags: IFACE_F_VETH_PEER,
        host_mac: forwarder::netdev::mac("cali1")?,
        ..IfaceInfo::default()
    };
    maps.ifaces.insert(cali, pod, 0)?;
    Ok((eth0, cali))
}
