//! The path rig: a client, a node and a pod, each in a namespace of its
//! own, with the generator on the client and counters at the receiver.
//!
//! ```text
//!  client ns                node ns                          pod ns
//!  eth0 192.0.2.100/24 ──── eth0 192.0.2.1/24
//!  (XDP_PASS: registers       cali1 (proxy ARP) ───────────── eth0 10.244.1.10/32
//!   the test-run rx queue)    route 10.244.1.10/32 dev cali1  default via 169.254.1.1
//! ```
//!
//! The node's eth0 has GRO on (NAPI, so it accepts XDP frames from the
//! client's XDP_TX) and, when asked, threaded NAPI with its kthread pinned
//! to a CPU of its own. Neighbours are permanent (no ARP during a
//! measurement). Everything lives in namespaces named after this process,
//! removed on Drop with the processes and links.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::fd::OwnedFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use super::{
    bpf::{self, ArrayMap, Prog},
    frames::{self, Mac},
    scenario::{self, Scenario},
};
use crate::{
    daemon::{self, Daemon, DaemonOptions},
    kube_proxy::{self, Backend},
    netns::{self, Netns, Offload},
};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x64];
pub const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
pub const CALI_MAC: Mac = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
pub const POD_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x10];

fn mac_str(m: Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Which CPUs the generator and the node's NAPI thread run on.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub generator: usize,
    /// `None` on a single-CPU machine: no separation possible.
    pub forwarding: Option<usize>,
}

impl Cpus {
    pub fn detect() -> Cpus {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cpus {
            generator: 0,
            forwarding: (n > 1).then_some(1),
        }
    }
}

/// Pins thread/process `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; the CPU_* helpers only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning pid {pid} to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Kernel threads whose name starts with `prefix`.
fn kthreads(prefix: &str) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim_end().starts_with(prefix) {
                out.insert(pid);
            }
        }
    }
    out
}

/// Nanoseconds thread `pid` has run (first field of schedstat).
fn runtime_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// rx_packets of `iface` in namespace `ns` (/proc/net/dev as the namespace
/// sees it).
pub fn rx_packets(ns: &str, iface: &str) -> Result<u64> {
    let wanted = iface.to_string();
    netns::run_in(ns, move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev")
            .context("reading /proc/thread-self/net/dev")?;
        for line in text.lines() {
            if let Some((name, rest)) = line.split_once(':') {
                if name.trim() == wanted {
                    return rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| anyhow!("malformed /proc/net/dev line {line:?}"));
                }
            }
        }
        bail!("no {wanted} in /proc/net/dev")
    })
    .with_context(|| format!("reading rx_packets of {iface} in {ns}"))
}

/// A temporary directory removed on Drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct RigOptions {
    /// A tc program dropping everything at the pod's eth0 ingress (the pod
    /// counts and discards: no ICMP, no socket).
    pub sink: bool,
    /// Run `podserver serve` in the pod (HTTP 80, UDP 5353).
    pub server: bool,
}

pub struct Rig {
    // Drop order: the daemon and the server, the links, then the namespaces.
    daemon: Option<Daemon>,
    server: Option<Server>,
    links: Vec<OwnedFd>,
    node_xdp: Option<OwnedFd>,
    pod_xdp: Option<OwnedFd>,
    pub pod: Netns,
    pub node: Netns,
    pub client: Netns,
    workdir: WorkDir,
    pub client_eth0: u32,
    pub node_cali: u32,
    pub cpus: Cpus,
    napi_before: BTreeSet<i32>,
    threaded: bool,
}

impl Rig {
    pub fn build(options: &RigOptions) -> Result<Rig> {
        let prefix = netns::unique_prefix();
        let workdir = WorkDir(std::env::temp_dir().join(&prefix));
        std::fs::create_dir_all(workdir.0.join("manifests"))
            .with_context(|| format!("creating {}", workdir.0.display()))?;
        let client = Netns::create(&format!("{prefix}c"))?;
        let node = Netns::create(&format!("{prefix}n"))?;
        let pod = Netns::create(&format!("{prefix}p"))?;
        for (a, a_ns, b, b_ns) in [
            ("eth0", client.name(), "eth0", node.name()),
            ("eth0", pod.name(), "cali1", node.name()),
        ] {
            netns::run_checked(Command::new("ip").args([
                "link", "add", "name", a, "netns", a_ns, "type", "veth", "peer", "name", b,
                "netns", b_ns,
            ]))
            .with_context(|| format!("creating veth {a_ns}/{a} <-> {b_ns}/{b}"))?;
        }
        let client_mac = mac_str(CLIENT_MAC);
        let node_mac = mac_str(NODE_MAC);
        let cali_mac = mac_str(CALI_MAC);
        let pod_mac = mac_str(POD_MAC);
        client.ip(&["link", "set", "eth0", "address", &client_mac])?;
        client.ip(&["addr", "add", "192.0.2.100/24", "dev", "eth0"])?;
        client.ip(&["link", "set", "eth0", "up"])?;
        client.ip(&[
            "neigh",
            "replace",
            "192.0.2.1",
            "lladdr",
            &node_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        node.ip(&["link", "set", "eth0", "address", &node_mac])?;
        node.ip(&["link", "set", "cali1", "address", &cali_mac])?;
        node.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
        node.ip(&["link", "set", "eth0", "up"])?;
        node.ip(&["link", "set", "cali1", "up"])?;
        node.ip(&[
            "route",
            "add",
            "10.244.1.10/32",
            "dev",
            "cali1",
            "scope",
            "link",
        ])?;
        node.ip(&[
            "neigh",
            "replace",
            "10.244.1.10",
            "lladdr",
            &pod_mac,
            "dev",
            "cali1",
            "nud",
            "permanent",
        ])?;
        node.ip(&[
            "neigh",
            "replace",
            "192.0.2.100",
            "lladdr",
            &client_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        for (k, v) in [
            ("ipv4.ip_forward", "1"),
            ("ipv4.conf.all.forwarding", "1"),
            ("ipv4.conf.all.rp_filter", "0"),
            ("ipv4.conf.default.rp_filter", "0"),
            ("ipv4.conf.eth0.rp_filter", "0"),
            ("ipv4.conf.cali1.rp_filter", "0"),
            ("ipv4.conf.cali1.proxy_arp", "1"),
        ] {
            node.sysctl(k, v)?;
        }
        pod.ip(&["link", "set", "eth0", "address", &pod_mac])?;
        pod.ip(&["addr", "add", "10.244.1.10/32", "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        pod.ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        pod.ip(&[
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            &cali_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        // A wire: complete checksums (as topology.rs does).
        client.set_offload("eth0", Offload::TxChecksum, false)?;
        node.set_offload("eth0", Offload::TxChecksum, false)?;
        node.set_offload("eth0", Offload::Gro, true)?;

        let client_eth0 = client.run(|| Ok(forwarder::netdev::ifindex("eth0")?))?;
        let node_cali = node.run(|| Ok(forwarder::netdev::ifindex("cali1")?))?;
        let mut rig = Rig {
            daemon: None,
            server: None,
            links: Vec::new(),
            node_xdp: None,
            pod_xdp: None,
            pod,
            node,
            client,
            workdir,
            client_eth0,
            node_cali,
            cpus: Cpus::detect(),
            napi_before: BTreeSet::new(),
            threaded: false,
        };
        // The generator's test runs name the client's eth0 as ingress, which
        // needs its XDP receive queue: an XDP_PASS program registers it.
        let ifindex = rig.client_eth0;
        let link = rig.client.run(move || {
            let prog = Prog::xdp_const("bench_pass", bpf::XDP_PASS)?;
            prog.attach_xdp(ifindex)
        })?;
        rig.links.push(link);
        if options.sink {
            let link = rig.pod.run(|| {
                let prog = Prog::tc_drop()?;
                prog.attach_tcx_ingress(forwarder::netdev::ifindex("eth0")?)
            })?;
            rig.links.push(link);
        }
        if options.server {
            rig.start_server()?;
        }
        Ok(rig)
    }

    /// Threaded NAPI on the node's eth0 (its kthread pinned to the
    /// forwarding CPU), or back to NAPI in softirq context, which runs on
    /// the CPU that scheduled it: the generator's.
    pub fn set_threaded(&mut self, on: bool) -> Result<()> {
        if on && !self.threaded {
            self.napi_before = kthreads("napi/");
        }
        let cmd = format!("echo {} > /sys/class/net/eth0/threaded", u8::from(on));
        netns::exec_in(self.node.name(), &["sh", "-c", &cmd])
            .with_context(|| format!("setting threaded NAPI to {on} on the node's eth0"))?;
        self.threaded = on;
        if on {
            self.pin_napi()?;
        }
        Ok(())
    }

    pub fn threaded(&self) -> bool {
        self.threaded
    }

    fn start_server(&mut self) -> Result<()> {
        let podserver = daemon::podserver_bin()?;
        let mut cmd = netns::exec_command(self.pod.name(), &[podserver.as_os_str()]);
        cmd.args(["serve", "--name", "bench-pod"])
            .args(["--http-port", &scenario::HTTP_PORT.to_string()])
            .args(["--udp-port", &scenario::UDP_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        netns::die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd.spawn().context("starting podserver in the pod")?;
        let stdout = child.stdout.take();
        self.server = Some(Server(child));
        let stdout = stdout.ok_or_else(|| anyhow!("podserver without stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Ok(line))) if line.contains("listening") => Ok(()),
            other => bail!("podserver did not start: {other:?}"),
        }
    }

    /// The node's NAPI kthreads (created since threaded NAPI was enabled).
    pub fn napi_threads(&self) -> Vec<i32> {
        kthreads("napi/eth0-")
            .difference(&self.napi_before)
            .copied()
            .collect()
    }

    /// Pins the node's NAPI threads to the forwarding CPU (again: attaching
    /// XDP may recreate them).
    pub fn pin_napi(&self) -> Result<()> {
        let Some(cpu) = self.cpus.forwarding.filter(|_| self.threaded) else {
            return Ok(());
        };
        let threads = self.napi_threads();
        if threads.is_empty() {
            bail!("no NAPI thread of the node's eth0 after enabling threaded NAPI");
        }
        for t in threads {
            pin(t, cpu)?;
        }
        Ok(())
    }

    /// CPU time spent forwarding so far: the node's NAPI threads plus the
    /// forwarding CPU's ksoftirqd (softirq work deferred from them).
    pub fn forwarding_cpu_ns(&self) -> u64 {
        let mut total: u64 = self.napi_threads().into_iter().map(runtime_ns).sum();
        if let Some(cpu) = self.cpus.forwarding {
            total += kthreads(&format!("ksoftirqd/{cpu}"))
                .into_iter()
                .map(runtime_ns)
                .sum::<u64>();
        }
        total
    }

    /// Attaches `prog` as the node's eth0 XDP program (replacing the last).
    pub fn set_node_xdp(&mut self, prog: &Prog) -> Result<()> {
        self.node_xdp = None;
        self.node_xdp = Some(
            self.node
                .run(|| prog.attach_xdp(forwarder::netdev::ifindex("eth0")?))?,
        );
        self.pin_napi()
    }

    /// An XDP_PASS program on the pod's eth0: the veth then accepts XDP
    /// frames redirected to its peer (variant B only).
    pub fn set_pod_xdp_pass(&mut self) -> Result<()> {
        self.pod_xdp = Some(self.pod.run(|| {
            let prog = Prog::xdp_const("bench_pod_pass", bpf::XDP_PASS)?;
            prog.attach_xdp(forwarder::netdev::ifindex("eth0")?)
        })?);
        Ok(())
    }

    /// Starts the forwarder daemon on the node with the scenario's Services.
    pub fn start_forwarder(&mut self, scenario: &Scenario) -> Result<()> {
        let manifest = self.workdir.0.join("manifests").join("services.yaml");
        std::fs::write(&manifest, scenario.manifest())
            .with_context(|| format!("writing {}", manifest.display()))?;
        let mut opts = DaemonOptions::new(scenario::NODE_NAME, &manifest, &self.workdir.0);
        opts.xdp_tx = Some("on".into());
        opts.ready_timeout = Duration::from_secs(300);
        self.daemon = Some(Daemon::start(self.node.name(), &opts)?);
        self.pin_napi()
    }

    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// Loads kube-proxy's rules for the scenario into the node.
    pub fn install_kube_proxy(&self, scenario: &Scenario, backend: Backend) -> Result<Duration> {
        let rules = scenario.kube_proxy_rules();
        let start = Instant::now();
        kube_proxy::install(self.node.name(), &rules, backend)?;
        Ok(start.elapsed())
    }

    /// Forgets the node's connections (`conntrack -F`).
    pub fn flush_conntrack(&self) -> Result<()> {
        netns::exec_output(self.node.name(), &["conntrack", "-F"]).map(|_| ())
    }

    /// Sends `count` frames with `gen` from the client (pinned to the
    /// generator CPU), in batches of 64. Returns the wall time of the call
    /// and the kernel-measured nanoseconds per frame: the time of the batch
    /// loop (without the test run's setup and teardown, and without the
    /// time the thread was descheduled), which includes the NAPI work that
    /// runs in softirq context when each batch is flushed (all of the path
    /// unless the node's NAPI is threaded).
    pub fn send(&self, gen: &Prog, frame: &[u8], count: u32) -> Result<(Duration, f64)> {
        let cpu = self.cpus.generator;
        let ifindex = self.client_eth0;
        let fd = gen.fd();
        self.client.run(move || {
            pin(0, cpu)?;
            let start = Instant::now();
            let r = bpf::test_run(fd, frame, ifindex, count, Some(64))
                .context("generating frames (XDP live frames)")?;
            Ok((start.elapsed(), f64::from(r.duration_ns)))
        })
    }
}

/// The generator: XDP_TX of `frame`'s 42-byte header template, optionally
/// with a new source port per frame.
pub fn generator(frame: &[u8], new_flows: bool) -> Result<(Prog, Option<ArrayMap>)> {
    let header = frame.get(..42).context("frame shorter than 42 bytes")?;
    let map = if new_flows {
        Some(ArrayMap::counter()?)
    } else {
        None
    };
    let prog = Prog::xdp_generator(header, map.as_ref())?;
    Ok((prog, map))
}

/// A 60-byte UDP frame from the client (or `src`) to `dst`.
pub fn udp_frame(src: Ipv4Addr, dst: (Ipv4Addr, u16)) -> Result<Vec<u8>> {
    frames::udp((CLIENT_MAC, NODE_MAC), (src, 10_000), dst, 18)
}
