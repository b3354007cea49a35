//! The forwarder next to kube-proxy: node1 carries kube-proxy's complete
//! iptables rules (as [`kube_proxy::restore_input`] writes them) for the same
//! Service the forwarder serves. The test checks that
//!
//! 1. before the forwarder starts, NodePort requests work through iptables
//!    alone (KUBE-NODEPORTS counts them, pods see node1's masqueraded
//!    address);
//! 2. with the forwarder running, the same requests all succeed, none of
//!    them reaches KUBE-NODEPORTS (the XDP path carries them; the local pod
//!    sees the real client address), and nothing is dropped as conntrack
//!    INVALID by KUBE-FORWARD (replies of flows conntrack never saw would
//!    be);
//! 3. once the forwarder stops, iptables carries the traffic again.
//!
//! Once per iptables backend (legacy, nft) present on the machine. Run as
//! root after building the binaries, one test at a time:
//!
//! ```text
//! cargo build --release -p forwarder -p integration-tests --bins
//! cargo test --release -p integration-tests --test coexistence -- --test-threads=1
//! ```
//!
//! Without root, `ip`, or the backend's iptables binaries, each test prints
//! `skipped: <reason>`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::{
    daemon::frontend_packets,
    daemon::Daemon,
    kube_proxy::{
        self, counters, install, restore_input, zero_counters, Backend, Cidr, KpConfig, KpEndpoint,
        KpPort, KpService,
    },
    netns,
    topology::{
        Cluster, ClusterOptions, CLIENT_IP, HTTP_NODE_PORT, HTTP_PORT, NODE_IPS, PAGE_TITLE,
        UDP_NODE_PORT, UDP_PORT,
    },
};

/// The Service, as the forwarder's manifests and kube-proxy's rules name it.
const SERVICE: &str = "productpage";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const HTTP_FRONTEND: &str = "192.0.2.1:31380/TCP";
const UDP_FRONTEND: &str = "192.0.2.1:31353/UDP";

/// HTTP requests (each on its own connection) per phase, and how many at once.
const HTTP_REQUESTS: usize = 60;
const HTTP_PARALLEL: usize = 6;
/// UDP sockets per phase (each a new flow) and datagrams per socket.
const UDP_FLOWS: usize = 16;
const UDP_PER_FLOW: usize = 5;

/// One cluster at a time, whatever the test-thread count.
static SERIAL: Mutex<()> = Mutex::new(());

/// The Service as kube-proxy sees it: ClusterIP 10.96.0.10, `http` TCP 80
/// (nodePort 31380) and `dns` UDP 5353 (nodePort 31353), the cluster's pods
/// as ready endpoints on their nodes.
fn kube_proxy_service(cluster: &Cluster) -> KpService {
    let mut svc = KpService::new("default", SERVICE, CLUSTER_IP)
        .port(KpPort::tcp("http", HTTP_PORT).with_node_port(HTTP_NODE_PORT))
        .port(KpPort::udp("dns", UDP_PORT).with_node_port(UDP_NODE_PORT));
    for pod in cluster.pods() {
        svc = svc.endpoint(
            KpEndpoint::new(pod.ip)
                .tcp("http", HTTP_PORT)
                .udp("dns", UDP_PORT)
                .on_node(&pod.node),
        );
    }
    svc
}

/// The iptables counters this test watches on node1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    /// KUBE-NODEPORTS rule of the TCP nodePort (nat: one packet per new flow).
    nodeport_tcp: u64,
    /// KUBE-NODEPORTS rule of the UDP nodePort.
    nodeport_udp: u64,
    /// All KUBE-NODEPORTS rules.
    nodeports_total: u64,
    /// KUBE-FORWARD's `--ctstate INVALID -j DROP`.
    invalid_dropped: u64,
}

fn watched(ns: &str, backend: Backend) -> Result<Watched> {
    let nodeports = counters(ns, backend, "nat", kube_proxy::KUBE_NODEPORTS)?;
    let by_port = |proto: &str, port: u16| -> Result<u64> {
        let needle = format!("--dport {port} ");
        let rule = nodeports
            .iter()
            .find(|c| c.rule.contains(&format!("-p {proto} ")) && c.rule.contains(&needle))
            .with_context(|| format!("no KUBE-NODEPORTS rule for {port}/{proto}: {nodeports:?}"))?;
        Ok(rule.packets)
    };
    let forward = counters(ns, backend, "filter", kube_proxy::KUBE_FORWARD)?;
    let invalid = forward
        .iter()
        .find(|c| c.rule.contains("--ctstate INVALID") && c.rule.ends_with("-j DROP"))
        .with_context(|| format!("no INVALID drop rule in KUBE-FORWARD: {forward:?}"))?;
    Ok(Watched {
        nodeport_tcp: by_port("tcp", HTTP_NODE_PORT)?,
        nodeport_udp: by_port("udp", UDP_NODE_PORT)?,
        nodeports_total: nodeports.iter().map(|c| c.packets).sum(),
        invalid_dropped: invalid.packets,
    })
}

/// Which path is expected to carry the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// kube-proxy's rules: every pod sees node1's masqueraded address.
    Iptables,
    /// The forwarder: the pod on node1 sees the client, the pod on node2
    /// sees node1 (source NAT for the way back).
    Forwarder,
}

impl Path {
    fn expected_source(self, cluster: &Cluster, pod_name: &str) -> Result<Ipv4Addr> {
        let pod = cluster
            .pods()
            .iter()
            .find(|p| p.name == pod_name)
            .with_context(|| format!("reply from unknown pod {pod_name:?}"))?;
        Ok(match self {
            Path::Forwarder if pod.node == "node1" => CLIENT_IP,
            _ => NODE_IPS[0],
        })
    }
}

/// Sends the phase's HTTP and UDP traffic to node1's nodePorts from the
/// client; every request must succeed, with the source address `path`
/// implies, and both pods must answer over each protocol.
fn traffic(cluster: &Cluster, path: Path) -> Result<()> {
    let pods: BTreeSet<String> = cluster.pods().iter().map(|p| p.name.clone()).collect();

    let replies = cluster.http_get_many(&cluster.node_url(1), HTTP_REQUESTS, HTTP_PARALLEL)?;
    ensure!(
        replies.len() == HTTP_REQUESTS,
        "{path:?}: {} HTTP replies for {HTTP_REQUESTS} requests",
        replies.len()
    );
    let mut http_pods = BTreeSet::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let r = reply.map_err(|e| anyhow::anyhow!("{path:?}: HTTP request {i} failed: {e}"))?;
        ensure!(
            r.status == 200 && r.title == PAGE_TITLE,
            "{path:?}: bad reply {r:?}"
        );
        let want = path.expected_source(cluster, &r.pod)?;
        ensure!(
            r.client_ip() == want.to_string(),
            "{path:?}: pod {} saw client {}, expected {want}",
            r.pod,
            r.client
        );
        http_pods.insert(r.pod);
    }
    ensure!(
        http_pods == pods,
        "{path:?}: HTTP answered by {http_pods:?}, expected all of {pods:?}"
    );

    let target = SocketAddrV4::new(NODE_IPS[0], UDP_NODE_PORT);
    let mut udp_pods = BTreeSet::new();
    for flow in 0..UDP_FLOWS {
        let replies = cluster
            .udp_request(target, UDP_PER_FLOW)
            .with_context(|| format!("{path:?}: UDP flow {flow}"))?;
        ensure!(
            replies.len() == UDP_PER_FLOW,
            "{path:?}: UDP flow {flow}: {} replies for {UDP_PER_FLOW} datagrams",
            replies.len()
        );
        for r in replies {
            let want = path.expected_source(cluster, &r.pod)?;
            ensure!(
                r.client_ip() == want.to_string(),
                "{path:?}: pod {} saw UDP client {}, expected {want}",
                r.pod,
                r.client
            );
            udp_pods.insert(r.pod);
        }
    }
    ensure!(
        udp_pods == pods,
        "{path:?}: UDP answered by {udp_pods:?}, expected all of {pods:?}"
    );
    Ok(())
}

/// Checks that iptables carried the phase's traffic: KUBE-NODEPORTS counted
/// the first packet of every TCP connection and of most UDP flows, nothing
/// was dropped as INVALID.
///
/// The nat table only sees a flow's first packet. A new TCP connection always
/// gets there (a SYN on a closed conntrack entry starts a new one), but a UDP
/// socket that happens to get the source port of an earlier phase's flow
/// reuses that flow's conntrack entry and NAT binding, so a few UDP flows may
/// legitimately go uncounted.
fn check_iptables_carried(phase: &str, w: Watched) -> Result<()> {
    println!("{phase}: {w:?}");
    ensure!(
        w.nodeport_tcp >= HTTP_REQUESTS as u64,
        "{phase}: KUBE-NODEPORTS counted {} TCP packets for {HTTP_REQUESTS} connections ({w:?})",
        w.nodeport_tcp
    );
    ensure!(
        w.nodeport_udp >= (UDP_FLOWS / 2) as u64,
        "{phase}: KUBE-NODEPORTS counted {} UDP packets for {UDP_FLOWS} flows ({w:?})",
        w.nodeport_udp
    );
    ensure!(
        w.invalid_dropped == 0,
        "{phase}: KUBE-FORWARD dropped {} INVALID packets ({w:?})",
        w.invalid_dropped
    );
    Ok(())
}

/// The forwarder phase: traffic, then the counters.
fn with_forwarder(cluster: &Cluster, daemon: &Daemon, backend: Backend) -> Result<()> {
    let ns = cluster.node_ns(1);
    zero_counters(ns, backend)?;
    ensure!(
        watched(ns, backend)?
            == Watched {
                nodeport_tcp: 0,
                nodeport_udp: 0,
                nodeports_total: 0,
                invalid_dropped: 0
            },
        "counters not zeroed"
    );
    traffic(cluster, Path::Forwarder)?;
    let w = watched(ns, backend)?;
    println!("with the forwarder: {w:?}");
    ensure!(
        w.nodeports_total == 0,
        "with the forwarder running, KUBE-NODEPORTS still counted {} packets ({w:?})",
        w.nodeports_total
    );
    ensure!(
        w.invalid_dropped == 0,
        "with the forwarder running, KUBE-FORWARD dropped {} INVALID packets ({w:?})",
        w.invalid_dropped
    );
    let stats = daemon.stats_json()?;
    for frontend in [HTTP_FRONTEND, UDP_FRONTEND] {
        ensure!(
            frontend_packets(&stats, frontend) > 0,
            "the forwarder counted no packets for {frontend}: {stats}"
        );
    }
    Ok(())
}

fn coexistence(backend: Backend) -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default()).context("building the cluster")?;
    let node1 = cluster.node_ns(1).to_string();
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;

    let cidr: Cidr = CLUSTER_CIDR.parse()?;
    let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
    let rules = restore_input(&config, &[kube_proxy_service(&cluster)]);
    install(&node1, &rules, backend).context("installing kube-proxy's rules on node1")?;

    // 1. iptables alone.
    zero_counters(&node1, backend)?;
    traffic(&cluster, Path::Iptables).context("before the forwarder")?;
    check_iptables_carried("before the forwarder", watched(&node1, backend)?)?;

    // 2. The forwarder in front.
    let mut daemon = cluster
        .start_forwarder(1, &cluster.daemon_options(1))
        .context("starting the forwarder on node1")?;
    if let Err(e) = with_forwarder(&cluster, &daemon, backend) {
        let stats = daemon
            .stats_json()
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("<stats failed: {e:#}>"));
        bail!(
            "{e:?}\nforwarder stats: {stats}\nforwarder log:\n{}",
            daemon.log()
        );
    }
    // A plain stop leaves our datapath forwarding (restarts drop nothing);
    // uninstall, while requests keep coming, hands everything back.
    daemon.stop().context("stopping the forwarder")?;
    let url = cluster.node_url(1);
    let during = std::thread::scope(|s| -> Result<_> {
        let requests = s.spawn(|| cluster.http_paced(&url, 30, 50, false));
        std::thread::sleep(std::time::Duration::from_millis(400));
        daemon.uninstall().context("forwarder uninstall")?;
        requests
            .join()
            .map_err(|_| anyhow::anyhow!("request thread panicked"))?
    })?;
    let failed: Vec<_> = during.iter().filter_map(|r| r.as_ref().err()).collect();
    ensure!(
        during.len() == 30 && failed.is_empty(),
        "new requests failed during uninstall: {failed:?} ({} answered)",
        during.len()
    );

    // 3. iptables again.
    zero_counters(&node1, backend)?;
    traffic(&cluster, Path::Iptables).context("after the forwarder was uninstalled")?;
    check_iptables_carried(
        "after the forwarder was uninstalled",
        watched(&node1, backend)?,
    )?;
    Ok(())
}

fn run(backend: Backend) {
    if let Some(reason) = netns::skip_reason() {
        println!("skipped: {reason}");
        return;
    }
    if let Some(reason) = backend.missing() {
        println!("skipped: {reason}");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = coexistence(backend) {
        panic!("iptables-{backend}: {e:?}");
    }
}

#[test]
fn coexists_with_kube_proxy_iptables_legacy() {
    run(Backend::Legacy);
}

#[test]
fn coexists_with_kube_proxy_iptables_nft() {
    run(Backend::Nft);
}
