//! A small Kubernetes-like cluster built from network namespaces.
//!
//! ```text
//!                      lan namespace: bridge br0
//!        ┌──────────────────┼──────────────────┐
//!   client eth0        node1 eth0          node2 eth0
//!   192.0.2.100/24     192.0.2.1/24        192.0.2.2/24
//!                      pods 10.244.1.0/24  pods 10.244.2.0/24
//!                      pod 10.244.1.10...  pod 10.244.2.10...
//! ```
//!
//! The client, node and lan ends are veth pairs; the lan ends are ports of
//! br0. Transmit checksum offload is off on both ends of every one of them
//! (the client's and nodes' `eth0` and the lan ends), as on a physical wire
//! where checksums are always complete: a frame with a partial checksum (the
//! sender's offload left to finish) exists in no NIC's receive ring.
//!
//! The wire delivers frames to a node at the MTU, as a NIC receives them: TSO
//! and GSO are off on the lan end of each node's veth (whose transmit feeds
//! the node's `eth0`), so a TCP super-packet crossing the lan (GRO on the lan
//! ends merges what a node sends, and br0 forwards the result whole) is cut
//! into MTU-sized segments there; GRO is on on the node's `eth0`, where a NIC
//! has it, so the node's stack merges them again. Without this, the
//! testbed would change with the variant under test: a veth whose peer runs a
//! native XDP program drops GSO on its side (`veth_fix_features`), so a node
//! with the forwarder's XDP would receive MTU-sized frames while the same node
//! without it (kube-proxy's rules alone) would receive 64 KB super-packets.
//!
//! With `wire_napi`,
//! the lan ends of the nodes' veths get GRO (and so NAPI) and a trivial
//! XDP_PASS program, which lets an XDP program on a node's `eth0` transmit
//! (XDP_TX / redirect), as a NIC does: a veth drops XDP frames sent to a peer
//! without NAPI, and leaves XDP_TX frames queued (until some later packet
//! schedules the peer's NAPI) unless the peer has an XDP program.
//!
//! Nodes forward (`ip_forward=1`) and route the other node's pod CIDR via the
//! other node; the client only knows 192.0.2.0/24. Pods are real pods: an
//! address, routes and a `podserver` process, nothing else. Their network is
//! either Calico style ([`PodNet::RoutedVeth`]: /32 address, default via
//! 169.254.1.1 answered by proxy ARP on the host's `caliN`, a /32 route per
//! pod on the node) or bridge CNI style ([`PodNet::Bridge`]: bridge `cni0`
//! with 10.244.N.1/24 on the node, the pods' host veths are its ports).
//!
//! Each node also has a default route via 192.0.2.254, the lan's router
//! address on br0 (forwarding off there, so it goes nowhere): as on real
//! nodes, and needed by Calico-style proxy ARP, which only answers for
//! addresses the node has a route to.
//!
//! Dropping the [`Cluster`] kills the pod servers and deletes every namespace
//! (the veths go with them) and the working directory.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    daemon::{self, Daemon, DaemonOptions},
    netns::{self, Netns, Offload},
};

/// The client, outside the cluster.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
/// node1 and node2.
pub const NODE_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
/// The lan's router address (on br0 in the lan namespace; does not forward).
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
/// The Service's HTTP port, its nodePort, and the pods' HTTP port.
pub const HTTP_PORT: u16 = 80;
pub const HTTP_NODE_PORT: u16 = 31380;
/// The Service's UDP port (named `dns`), its nodePort, and the pods' UDP port.
pub const UDP_PORT: u16 = 5353;
pub const UDP_NODE_PORT: u16 = 31353;
/// The page the pods serve and its title.
pub const HTTP_PATH: &str = "/productpage";
pub const PAGE_TITLE: &str = "Simple Bookstore App";

/// How pods are connected to their node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNet {
    /// Calico style: a routed veth per pod (`caliN` on the node, proxy ARP).
    RoutedVeth,
    /// Bridge CNI style: the pods' host veths are ports of `cni0`.
    Bridge,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub pod_net: PodNet,
    /// GRO/NAPI on the lan ends of the nodes' veths (XDP_TX works, as on a NIC).
    pub wire_napi: bool,
    /// Pods per node (at least 1): 10.244.N.10, .11, ...
    pub pods_per_node: usize,
    /// Pod names are `<prefix>-node<N>` (first pod) or `<prefix>-node<N>-<i>`.
    pub pod_name_prefix: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            pod_net: PodNet::RoutedVeth,
            wire_napi: true,
            pods_per_node: 1,
            pod_name_prefix: "productpage".into(),
        }
    }
}

/// A node: its name (`node1`), address, namespace and pod CIDR.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: String,
    pub pod_cidr: String,
}

/// A pod: its name, address, node name and namespace.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// `node1` or `node2`.
    pub node: String,
    pub ns: String,
    /// The pod veth's end in the node namespace (`caliN` or `vethN`).
    pub host_iface: String,
}

/// One HTTP response as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    /// `X-Pod`: the pod that answered.
    pub pod: String,
    /// `X-Client`: the peer address as the pod saw it (`ip:port`).
    pub client: String,
    /// The client's own address of the connection (`ip:port`).
    pub local: String,
    /// The page's `<title>` (empty if none).
    pub title: String,
}

impl HttpReply {
    /// The address part of `X-Client`.
    pub fn client_ip(&self) -> &str {
        self.client
            .rsplit_once(':')
            .map_or(&self.client, |(ip, _)| ip)
    }

    fn parse(line: &str) -> std::result::Result<HttpReply, String> {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["ERR", rest @ ..] => Err(rest.join(" ")),
            [status, pod, client, local, title] => Ok(HttpReply {
                status: status
                    .parse()
                    .map_err(|_| format!("bad status in {line:?}"))?,
                pod: pod.to_string(),
                client: client.to_string(),
                local: local.to_string(),
                title: title.to_string(),
            }),
            _ => Err(format!("unexpected podserver output {line:?}")),
        }
    }
}

/// How `podserver bulk` moves bytes on each connection (see podserver).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkMode {
    /// Upload with `PUT /bytes` (the pod checks), then download with
    /// `GET /bytes` (the client checks), on one connection.
    UpDown,
    /// `POST /echo`: both directions at once, the echo checked.
    Echo,
    /// Alternately `UpDown` and `Echo`.
    Mixed,
    /// Upload only (`PUT /bytes`, checked by the pod).
    Up,
    /// Download only (`GET /bytes`, checked by the client).
    Down,
}

impl BulkMode {
    fn arg(self) -> &'static str {
        match self {
            BulkMode::UpDown => "updown",
            BulkMode::Echo => "echo",
            BulkMode::Mixed => "mixed",
            BulkMode::Up => "up",
            BulkMode::Down => "down",
        }
    }
}

/// Parallel bulk transfers with `podserver bulk`.
#[derive(Clone, Debug)]
pub struct Bulk {
    pub mode: BulkMode,
    /// Connections at once.
    pub connections: usize,
    /// Bytes per connection and direction.
    pub bytes: u64,
    /// Connection `i` moves the stream of seed `seed + i`.
    pub seed: u64,
    /// Bounds every connect, read and write (a stalled transfer fails).
    pub timeout: Duration,
    /// Bounds each connection as a whole (a crawling transfer fails).
    pub deadline: Duration,
}

/// One bulk connection that completed: every byte it received was checked
/// (by the pod for an upload, by the client for a download or an echo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkReply {
    /// `updown`, `echo`, `up` or `down`.
    pub mode: String,
    /// `X-Pod`: the pod that served it.
    pub pod: String,
    /// `X-Client`: the peer address as the pod saw it (`ip:port`).
    pub client: String,
    /// The client's own address of the connection (`ip:port`).
    pub local: String,
    pub sent: u64,
    pub received: u64,
    pub millis: u64,
}

impl BulkReply {
    /// The address part of `X-Client`.
    pub fn client_ip(&self) -> &str {
        self.client
            .rsplit_once(':')
            .map_or(&self.client, |(ip, _)| ip)
    }

    fn parse(line: &str) -> std::result::Result<BulkReply, String> {
        let fields: Vec<&str> = line.split('\t').collect();
        let number = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("bad number {s:?} in {line:?}"))
        };
        match fields.as_slice() {
            ["ERR", rest @ ..] => Err(rest.join(" ")),
            ["OK", mode, pod, client, local, sent, received, millis] => Ok(BulkReply {
                mode: mode.to_string(),
                pod: pod.to_string(),
                client: client.to_string(),
                local: local.to_string(),
                sent: number(sent)?,
                received: number(received)?,
                millis: number(millis)?,
            }),
            _ => Err(format!("unexpected podserver output {line:?}")),
        }
    }
}

/// One UDP reply: `<pod-name> <peer ip:port>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    pub pod: String,
    /// The client address as the pod saw it.
    pub client: String,
}

impl UdpReply {
    pub fn client_ip(&self) -> &str {
        self.client
            .rsplit_once(':')
            .map_or(&self.client, |(ip, _)| ip)
    }
}

/// Which side of the lan a veth connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Client,
    Node,
}

/// A podserver process; killed on Drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The working directory (manifests, logs); removed on Drop unless
/// `FORWARDER_KEEP_TEST_DIR` is set.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::env::var_os("FORWARDER_KEEP_TEST_DIR").is_some() {
            eprintln!("keeping {}", self.0.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// The cluster; everything is torn down on Drop.
pub struct Cluster {
    // Drop order is field order: servers first, then the namespaces.
    servers: Vec<Server>,
    /// XDP_PASS links on the lan ends of the nodes' veths (with `wire_napi`).
    wire_links: Vec<OwnedFd>,
    namespaces: Vec<Netns>,
    workdir: WorkDir,
    client: String,
    lan: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    options: ClusterOptions,
    podserver: PathBuf,
}

impl Cluster {
    /// Builds the namespaces, links, addresses and routes, and starts a
    /// podserver in every pod. Whatever was created is removed again if a
    /// step fails.
    pub fn build(options: ClusterOptions) -> Result<Cluster> {
        if options.pods_per_node == 0 || options.pods_per_node > 100 {
            bail!("pods_per_node must be within 1..=100");
        }
        let podserver = daemon::podserver_bin()?;
        netns::reap_stale();
        let prefix = netns::unique_prefix();
        let workdir = WorkDir(std::env::temp_dir().join(&prefix));
        std::fs::create_dir_all(workdir.0.join("manifests"))
            .and_then(|()| std::fs::create_dir_all(workdir.0.join("logs")))
            .with_context(|| format!("creating {}", workdir.0.display()))?;
        let mut cluster = Cluster {
            servers: Vec::new(),
            wire_links: Vec::new(),
            namespaces: Vec::new(),
            workdir,
            client: format!("{prefix}c"),
            lan: format!("{prefix}lan"),
            nodes: (1..=2)
                .map(|n| Node {
                    name: format!("node{n}"),
                    ip: NODE_IPS[n - 1],
                    ns: format!("{prefix}n{n}"),
                    pod_cidr: format!("10.244.{n}.0/24"),
                })
                .collect(),
            pods: Vec::new(),
            options,
            podserver,
        };
        cluster.setup(&prefix)?;
        Ok(cluster)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        let ns = Netns::create(name)?;
        self.namespaces.push(ns);
        Ok(())
    }

    fn setup(&mut self, prefix: &str) -> Result<()> {
        // The L2 network.
        let lan = self.lan.clone();
        self.add_ns(&lan)?;
        let lan_ns = self.ns(&lan)?;
        lan_ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan_ns.ip(&["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", "br0"])?;
        lan_ns.ip(&["link", "set", "br0", "up"])?;

        // The client.
        let client = self.client.clone();
        self.add_ns(&client)?;
        self.wire(&client, "c0", CLIENT_IP, End::Client)?;

        // The nodes.
        for i in 0..self.nodes.len() {
            let node = self.nodes[i].clone();
            self.add_ns(&node.ns)?;
            let lan_end = format!("n{}", i + 1);
            self.wire(&node.ns, &lan_end, node.ip, End::Node)?;
            let ns = self.ns(&node.ns)?;
            ns.sysctl("ipv4.ip_forward", "1")?;
            ns.sysctl("ipv4.conf.all.forwarding", "1")?;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                ns.ip(&[
                    "route",
                    "add",
                    &other.pod_cidr,
                    "via",
                    &other.ip.to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &GATEWAY_IP.to_string(),
                "dev",
                "eth0",
            ])?;
            if self.options.pod_net == PodNet::Bridge {
                let gw = format!("10.244.{}.1/24", i + 1);
                ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
                ns.ip(&["addr", "add", &gw, "dev", "cni0"])?;
                ns.ip(&["link", "set", "cni0", "up"])?;
            }
        }

        // The pods.
        for i in 0..self.nodes.len() {
            for j in 0..self.options.pods_per_node {
                self.add_pod(prefix, i, j)?;
            }
        }

        // Their servers.
        for pod in self.pods.clone() {
            self.start_server(&pod)?;
        }
        Ok(())
    }

    /// Connects `ns`'s `eth0` (with `ip/24`) to br0 through `lan_end`.
    fn wire(&mut self, ns: &str, lan_end: &str, ip: Ipv4Addr, end: End) -> Result<()> {
        netns::run_checked(std::process::Command::new("ip").args([
            "link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", lan_end,
            "netns", &self.lan,
        ]))
        .with_context(|| format!("creating the veth {ns}/eth0 <-> {}/{lan_end}", self.lan))?;
        netns::ip_in(&self.lan, &["link", "set", lan_end, "master", "br0", "up"])?;
        netns::ip_in(ns, &["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns::ip_in(ns, &["link", "set", "eth0", "up"])?;
        netns::set_offload_in(ns, "eth0", Offload::TxChecksum, false)?;
        // Complete checksums in both directions, as on a wire: the lan end
        // re-segments what GRO merged on the lan (below), and with checksum
        // offload the segments would carry partial checksums into eth0.
        netns::set_offload_in(&self.lan, lan_end, Offload::TxChecksum, false)?;
        if end == End::Client {
            return Ok(());
        }
        // Frames at the MTU into the node, merged by GRO on its side, as a
        // NIC does (see the module doc: otherwise the forwarder's XDP alone
        // would change the size of what the node receives).
        netns::set_offload_in(&self.lan, lan_end, Offload::Tso, false)?;
        netns::set_offload_in(&self.lan, lan_end, Offload::Gso, false)?;
        netns::set_offload_in(ns, "eth0", Offload::Gro, true)?;
        if self.options.wire_napi {
            // GRO gives the veth NAPI, which XDP_REDIRECT into it needs; a
            // frame sent with XDP_TX is only flushed promptly to a peer that
            // has an XDP program, hence the XDP_PASS program too.
            netns::set_offload_in(&self.lan, lan_end, Offload::Gro, true)?;
            let link = netns::attach_xdp_pass(&self.lan, lan_end)?;
            self.wire_links.push(link);
        }
        Ok(())
    }

    fn ns(&self, name: &str) -> Result<&Netns> {
        self.namespaces
            .iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| anyhow!("no namespace {name} in this cluster"))
    }

    fn add_pod(&mut self, prefix: &str, node_index: usize, j: usize) -> Result<()> {
        let node = self.nodes[node_index].clone();
        let n = node_index + 1;
        let ip = Ipv4Addr::new(10, 244, n as u8, 10 + j as u8);
        let name = if j == 0 {
            format!("{}-node{n}", self.options.pod_name_prefix)
        } else {
            format!("{}-node{n}-{j}", self.options.pod_name_prefix)
        };
        let ns_name = format!("{prefix}n{n}p{j}");
        let bridge = self.options.pod_net == PodNet::Bridge;
        let host_iface = if bridge {
            format!("veth{j}")
        } else {
            format!("cali{j}")
        };
        self.add_ns(&ns_name)?;
        netns::run_checked(std::process::Command::new("ip").args([
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            &ns_name,
            "type",
            "veth",
            "peer",
            "name",
            &host_iface,
            "netns",
            &node.ns,
        ]))
        .with_context(|| format!("creating the veth of pod {name}"))?;
        let pod_ns = self.ns(&ns_name)?;
        let node_ns = self.ns(&node.ns)?;
        if bridge {
            node_ns.ip(&["link", "set", &host_iface, "master", "cni0", "up"])?;
            pod_ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            pod_ns.ip(&["link", "set", "eth0", "up"])?;
            pod_ns.ip(&["route", "add", "default", "via", &format!("10.244.{n}.1")])?;
        } else {
            node_ns.ip(&["link", "set", &host_iface, "up"])?;
            node_ns.sysctl(&format!("ipv4.conf.{host_iface}.proxy_arp"), "1")?;
            node_ns.ip(&[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &host_iface,
                "scope",
                "link",
            ])?;
            pod_ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            pod_ns.ip(&["link", "set", "eth0", "up"])?;
            pod_ns.ip(&[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            pod_ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
        }
        self.pods.push(Pod {
            name,
            ip,
            node: node.name,
            ns: ns_name,
            host_iface,
        });
        Ok(())
    }

    fn start_server(&mut self, pod: &Pod) -> Result<()> {
        let log = self.logs_dir().join(format!("{}.log", pod.name));
        let log =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = netns::exec_command(&pod.ns, &[self.podserver.as_os_str()]);
        cmd.args(["serve", "--name", &pod.name])
            .args(["--http-port", &HTTP_PORT.to_string()])
            .args(["--udp-port", &UDP_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        netns::die_with_parent(&mut cmd, libc::SIGKILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting podserver in {}", pod.ns))?;
        let stdout = child.stdout.take();
        self.servers.push(Server { child });
        let stdout = stdout.ok_or_else(|| anyhow!("podserver without stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the server never writes into a closed pipe.
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Ok(line))) if line.contains("listening") => Ok(()),
            Ok(other) => bail!(
                "podserver of {} did not start ({other:?}); its stderr: {}",
                pod.name,
                std::fs::read_to_string(self.logs_dir().join(format!("{}.log", pod.name)))
                    .unwrap_or_default()
            ),
            Err(_) => bail!("podserver of {} did not start within 10 s", pod.name),
        }
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    pub fn client_ns(&self) -> &str {
        &self.client
    }

    pub fn lan_ns(&self) -> &str {
        &self.lan
    }

    /// `n` is 1 or 2.
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n.clamp(1, self.nodes.len()) - 1]
    }

    /// Namespace of node `n` (1 or 2).
    pub fn node_ns(&self, n: usize) -> &str {
        &self.node(n).ns
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pods on `node` (`"node1"`).
    pub fn pods_on(&self, node: &str) -> Vec<&Pod> {
        self.pods.iter().filter(|p| p.node == node).collect()
    }

    /// The first pod on `node`.
    pub fn pod_on(&self, node: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.node == node)
            .ok_or_else(|| anyhow!("no pod on {node}"))
    }

    /// The working directory (removed on Drop).
    pub fn workdir(&self) -> &Path {
        &self.workdir.0
    }

    /// The directory to pass as `--manifests`.
    pub fn manifests_dir(&self) -> PathBuf {
        self.workdir.0.join("manifests")
    }

    /// Where the servers' and daemons' logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.workdir.0.join("logs")
    }

    /// `n` more clients on the lan: namespaces with 192.0.2.101, .102, ...,
    /// wired like the cluster's own client; each is removed when dropped.
    pub fn lan_clients(&self, n: usize) -> Result<Vec<Netns>> {
        let mut out = Vec::new();
        for i in 0..n {
            let ns = Netns::create(&format!("{}cl{i}", netns::unique_prefix()))?;
            let lan_end = format!("lc{}x{i}", std::process::id() % 10000);
            netns::ip_in(
                &self.lan,
                &[
                    "link",
                    "add",
                    &lan_end,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name(),
                ],
            )?;
            netns::ip_in(&self.lan, &["link", "set", &lan_end, "master", "br0", "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", lan_client_ip(i)),
                "dev",
                "eth0",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            // Complete checksums, as on a wire (like the cluster's own client).
            netns::set_offload_in(ns.name(), "eth0", Offload::TxChecksum, false)?;
            out.push(ns);
        }
        Ok(out)
    }

    /// Runs `args` inside `ns`, returning stdout (fails on a non-zero exit).
    pub fn exec<S: AsRef<std::ffi::OsStr>>(&self, ns: &str, args: &[S]) -> Result<String> {
        netns::exec_in(ns, args)
    }

    /// Runs podserver's client inside `ns` with `args`; returns its stdout
    /// lines and whether it exited 0 (its stderr is in the error when it
    /// printed nothing).
    fn podserver_client(&self, ns: &str, args: &[String]) -> Result<(Vec<String>, bool)> {
        let mut all = vec![self.podserver.to_string_lossy().into_owned()];
        all.extend(args.iter().cloned());
        let out = netns::exec_output(ns, &all)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
        if lines.is_empty() && !out.status.success() {
            bail!(
                "podserver {} in {ns} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok((lines, out.status.success()))
    }

    /// `count` HTTP GETs from namespace `ns`, each on its own connection,
    /// `parallel` at a time. One entry per request (Err: what failed).
    pub fn http_get_many_from(
        &self,
        ns: &str,
        url: &str,
        count: usize,
        parallel: usize,
    ) -> Result<Vec<std::result::Result<HttpReply, String>>> {
        let (lines, _) = self.podserver_client(
            ns,
            &[
                "http-get".into(),
                url.into(),
                "--count".into(),
                count.to_string(),
                "--parallel".into(),
                parallel.to_string(),
                "--timeout-ms".into(),
                "3000".into(),
            ],
        )?;
        Ok(lines.iter().map(|l| HttpReply::parse(l)).collect())
    }

    /// One HTTP GET from namespace `ns`.
    pub fn http_get_from(&self, ns: &str, url: &str) -> Result<HttpReply> {
        let mut replies = self.http_get_many_from(ns, url, 1, 1)?;
        match replies.pop() {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => bail!("GET {url} from {ns}: {e}"),
            None => bail!("GET {url} from {ns}: no output"),
        }
    }

    /// One HTTP GET from the client.
    pub fn http_get(&self, url: &str) -> Result<HttpReply> {
        self.http_get_from(&self.client, url)
    }

    /// `count` HTTP GETs from the client, each on its own connection.
    pub fn http_get_many(
        &self,
        url: &str,
        count: usize,
        parallel: usize,
    ) -> Result<Vec<std::result::Result<HttpReply, String>>> {
        self.http_get_many_from(&self.client, url, count, parallel)
    }

    /// `count` HTTP GETs from the client over one keep-alive connection.
    pub fn http_keep_alive(
        &self,
        url: &str,
        count: usize,
    ) -> Result<Vec<std::result::Result<HttpReply, String>>> {
        self.http_keep_alive_from(&self.client, url, count)
    }

    /// `count` HTTP GETs from namespace `ns` over one keep-alive connection
    /// (fewer entries if the connection broke; the last one is then an Err).
    pub fn http_keep_alive_from(
        &self,
        ns: &str,
        url: &str,
        count: usize,
    ) -> Result<Vec<std::result::Result<HttpReply, String>>> {
        let (lines, _) = self.podserver_client(
            ns,
            &[
                "http-get".into(),
                url.into(),
                "--keep-alive".into(),
                "--count".into(),
                count.to_string(),
            ],
        )?;
        Ok(lines.iter().map(|l| HttpReply::parse(l)).collect())
    }

    /// Paced HTTP GETs from the client, one every `interval_ms`: over one
    /// kept-alive connection when `keep_alive`, else each on its own
    /// connection. For traffic that spans a restart or a reload.
    pub fn http_paced(
        &self,
        url: &str,
        count: usize,
        interval_ms: u64,
        keep_alive: bool,
    ) -> Result<Vec<std::result::Result<HttpReply, String>>> {
        let mut args = vec![
            "http-get".into(),
            url.into(),
            "--count".into(),
            count.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
        ];
        if keep_alive {
            args.push("--keep-alive".into());
        }
        let (lines, _) = self.podserver_client(self.client_ns(), &args)?;
        Ok(lines.iter().map(|l| HttpReply::parse(l)).collect())
    }

    /// The transfers of `bulk` from namespace `ns` to `base`
    /// (`http://ip:port`). One entry per connection (Err: what failed, e.g.
    /// the first wrong byte).
    pub fn bulk_from(
        &self,
        ns: &str,
        base: &str,
        bulk: &Bulk,
    ) -> Result<Vec<std::result::Result<BulkReply, String>>> {
        let (lines, _) = self.podserver_client(
            ns,
            &[
                "bulk".into(),
                base.into(),
                "--mode".into(),
                bulk.mode.arg().into(),
                "--connections".into(),
                bulk.connections.to_string(),
                "--bytes".into(),
                bulk.bytes.to_string(),
                "--seed".into(),
                bulk.seed.to_string(),
                "--timeout-ms".into(),
                bulk.timeout.as_millis().to_string(),
                "--deadline-ms".into(),
                bulk.deadline.as_millis().to_string(),
            ],
        )?;
        Ok(lines.iter().map(|l| BulkReply::parse(l)).collect())
    }

    /// `count` datagrams from namespace `ns` to `addr` over one connected
    /// UDP socket; fails unless every one got a reply within 1 s.
    pub fn udp_request_from(
        &self,
        ns: &str,
        addr: SocketAddrV4,
        count: usize,
    ) -> Result<Vec<UdpReply>> {
        let args = [
            "udp-request".to_string(),
            addr.to_string(),
            "--count".into(),
            count.to_string(),
            "--timeout-ms".into(),
            "1000".into(),
        ];
        let mut all = vec![self.podserver.to_string_lossy().into_owned()];
        all.extend(args.iter().cloned());
        let out = netns::exec_output(ns, &all)?;
        if !out.status.success() {
            bail!(
                "UDP request to {addr} from {ns} failed ({}): {} (replies: {:?})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                let (pod, client) = l
                    .split_once(' ')
                    .ok_or_else(|| anyhow!("unexpected UDP reply {l:?}"))?;
                Ok(UdpReply {
                    pod: pod.to_string(),
                    client: client.to_string(),
                })
            })
            .collect()
    }

    /// UDP request(s) from the client.
    pub fn udp_request(&self, addr: SocketAddrV4, count: usize) -> Result<Vec<UdpReply>> {
        self.udp_request_from(&self.client, addr, count)
    }

    /// `http://<node n's address>:31380/productpage`.
    pub fn node_url(&self, n: usize) -> String {
        format!("http://{}:{HTTP_NODE_PORT}{HTTP_PATH}", self.node(n).ip)
    }

    /// Writes (atomically: temp file + rename) `<manifests>/<name>.yaml`
    /// with Service `default/<name>` (NodePort: TCP 80 → 31380 named `http`,
    /// UDP 5353 → 31353 named `dns`) and its EndpointSlice listing `pods`.
    pub fn write_service(&self, name: &str, pods: &[&Pod]) -> Result<PathBuf> {
        self.write_service_with_node_ports(name, pods, HTTP_NODE_PORT, UDP_NODE_PORT)
    }

    /// [`Cluster::write_service`] with other nodePorts for `http` and `dns`
    /// (several Services side by side).
    pub fn write_service_with_node_ports(
        &self,
        name: &str,
        pods: &[&Pod],
        http_node_port: u16,
        udp_node_port: u16,
    ) -> Result<PathBuf> {
        let path = self.manifests_dir().join(format!("{name}.yaml"));
        let yaml = service_manifest_with_node_ports(name, pods, http_node_port, udp_node_port);
        write_atomically(&path, &yaml)?;
        Ok(path)
    }

    /// Removes `<manifests>/<name>.yaml`.
    pub fn remove_service(&self, name: &str) -> Result<()> {
        let path = self.manifests_dir().join(format!("{name}.yaml"));
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Daemon options for node `n` with this cluster's manifests and logs;
    /// with `wire_napi`, `--xdp-tx on` (the wire behaves as a NIC, where the
    /// daemon's `auto` would choose XDP transmit too).
    pub fn daemon_options(&self, n: usize) -> DaemonOptions {
        let mut options =
            DaemonOptions::new(&self.node(n).name, &self.manifests_dir(), &self.logs_dir());
        if self.options.wire_napi {
            options.xdp_tx = Some("on".into());
        }
        options
    }

    /// Starts the forwarder on node `n`.
    pub fn start_forwarder(&self, n: usize, options: &DaemonOptions) -> Result<Daemon> {
        Daemon::start(self.node_ns(n), options)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Servers first (a namespace with processes inside would linger),
        // then the namespaces: the fields' order does the rest.
        self.servers.clear();
        self.wire_links.clear();
        self.namespaces.reverse();
        self.namespaces.clear();
    }
}

/// Writes `contents` to `path` via a temporary file in the parent's parent
/// directory and a rename, so a reader polling `path`'s directory never sees
/// a partial file nor the temporary.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    let tmp_dir = dir.parent().unwrap_or(dir);
    let tmp = tmp_dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// The address of the `i`-th of [`Cluster::lan_clients`].
pub fn lan_client_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 101 + i as u8)
}

/// The YAML of Service `default/<name>` of type NodePort (TCP 80 → nodePort
/// 31380 named `http`, UDP 5353 → nodePort 31353 named `dns`) and of its
/// EndpointSlice with `pods` as ready endpoints (with their nodeName).
pub fn service_manifest(name: &str, pods: &[&Pod]) -> String {
    service_manifest_with_node_ports(name, pods, HTTP_NODE_PORT, UDP_NODE_PORT)
}

/// [`service_manifest`] with nodePorts `http_node_port` (TCP) and
/// `udp_node_port` (UDP).
pub fn service_manifest_with_node_ports(
    name: &str,
    pods: &[&Pod],
    http_node_port: u16,
    udp_node_port: u16,
) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  type: NodePort
  selector:
    app: {name}
  ports:
  - name: http
    protocol: TCP
    port: {HTTP_PORT}
    targetPort: {HTTP_PORT}
    nodePort: {http_node_port}
  - name: dns
    protocol: UDP
    port: {UDP_PORT}
    targetPort: {UDP_PORT}
    nodePort: {udp_node_port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: {HTTP_PORT}
- name: dns
  protocol: UDP
  port: {UDP_PORT}
endpoints:"
    );
    if pods.is_empty() {
        y.push_str(" []\n");
    } else {
        y.push('\n');
    }
    for pod in pods {
        let _ = write!(
            y,
            "- addresses:
  - \"{ip}\"
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: {node}
  targetRef:
    kind: Pod
    name: {pod_name}
    namespace: default
",
            ip = pod.ip,
            node = pod.node,
            pod_name = pod.name,
        );
    }
    y
}
