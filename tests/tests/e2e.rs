//! End-to-end tests: a two-node cluster in network namespaces, real pods
//! running podserver, the forwarder daemon on node1, a client outside the
//! cluster. Run as root, one at a time:
//!
//! ```text
//! cargo build --release -p forwarder -p integration-tests --bins
//! cargo test --release -p integration-tests --test e2e -- --test-threads=1
//! ```
//!
//! Without root (or without `ip`) every test prints `skipped: <reason>`.
//! The `topology_*` tests check the test cluster itself, without the
//! forwarder. Clusters built with `wire_napi` run the daemon with
//! `--xdp-tx on` (their wire behaves as a NIC; the daemon's `auto` keeps XDP
//! transmit off for native XDP on a veth, not knowing the peer's side).
//! A failing test shows the daemon's log and `forwarder stats` output.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, ensure, Context, Result};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use integration_tests::{
    daemon::frontend_packets,
    daemon::{Daemon, DaemonOptions},
    netns::{self, Offload},
    skip_unless_netns_capable,
    topology::{
        Cluster, ClusterOptions, HttpReply, PodNet, CLIENT_IP, NODE_IPS, PAGE_TITLE, UDP_NODE_PORT,
    },
};
use serde_json::Value;

const SERVICE: &str = "productpage";
const HTTP_FRONTEND: &str = "192.0.2.1:31380/TCP";
const UDP_FRONTEND: &str = "192.0.2.1:31353/UDP";

/// Fails the test with the whole error chain.
fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

fn build(pod_net: PodNet, wire_napi: bool, pods_per_node: usize) -> Result<Cluster> {
    Cluster::build(ClusterOptions {
        pod_net,
        wire_napi,
        pods_per_node,
        ..ClusterOptions::default()
    })
    .context("building the cluster")
}

fn start(cluster: &Cluster, xdp_mode: Option<&str>) -> Result<Daemon> {
    let mut options: DaemonOptions = cluster.daemon_options(1);
    options.xdp_mode = xdp_mode.map(str::to_string);
    cluster
        .start_forwarder(1, &options)
        .context("starting the forwarder on node1")
}

/// Adds the daemon's log and stats to an error, for the test report.
fn explain<T>(daemon: &Daemon, result: Result<T>) -> Result<T> {
    result.map_err(|e| {
        let stats = daemon
            .stats_json()
            .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
            .unwrap_or_else(|e| format!("<stats failed: {e:#}>"));
        e.context(format!(
            "forwarder stats:\n{stats}\nforwarder log:\n{}",
            daemon.log()
        ))
    })
}

/// `reasons.<name>` of the stats (0 when absent).
fn reason(stats: &Value, name: &str) -> u64 {
    stats["reasons"][name].as_u64().unwrap_or(0)
}

/// The X-Client address a pod must see: the client's own when the pod is on
/// node1 (where the forwarder runs), node1's when the pod is elsewhere.
fn expected_client_ip(cluster: &Cluster, pod_name: &str) -> Result<String> {
    let pod = cluster
        .pods()
        .iter()
        .find(|p| p.name == pod_name)
        .ok_or_else(|| anyhow!("answer from unknown pod {pod_name:?}"))?;
    Ok(if pod.node == "node1" {
        CLIENT_IP.to_string()
    } else {
        NODE_IPS[0].to_string()
    })
}

/// Checks one reply: 200, the title, a known pod, the right client address.
fn check_reply(cluster: &Cluster, r: &HttpReply) -> Result<()> {
    ensure!(r.status == 200, "status {} (reply {r:?})", r.status);
    ensure!(r.title == PAGE_TITLE, "title {:?} (reply {r:?})", r.title);
    let expected = expected_client_ip(cluster, &r.pod)?;
    ensure!(
        r.client_ip() == expected,
        "pod {} saw client {} but should see {expected} (reply {r:?})",
        r.pod,
        r.client
    );
    Ok(())
}

/// All replies must be Ok and pass [`check_reply`]; returns them per pod.
fn check_replies(
    cluster: &Cluster,
    replies: &[std::result::Result<HttpReply, String>],
    expected: usize,
) -> Result<BTreeMap<String, Vec<HttpReply>>> {
    ensure!(
        replies.len() == expected,
        "{} replies for {expected} requests",
        replies.len()
    );
    let mut by_pod: BTreeMap<String, Vec<HttpReply>> = BTreeMap::new();
    let mut errors = Vec::new();
    for r in replies {
        match r {
            Ok(r) => match check_reply(cluster, r) {
                Ok(()) => by_pod.entry(r.pod.clone()).or_default().push(r.clone()),
                Err(e) => errors.push(format!("{e:#}")),
            },
            Err(e) => errors.push(e.clone()),
        }
    }
    ensure!(
        errors.is_empty(),
        "{} of {expected} requests failed, e.g.: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    Ok(by_pod)
}

/// `count` requests on their own connections (`parallel` at a time), all
/// must succeed and pass [`check_reply`]; returns the replies per pod.
fn requests_ok(
    cluster: &Cluster,
    count: usize,
    parallel: usize,
) -> Result<BTreeMap<String, Vec<HttpReply>>> {
    let replies = cluster.http_get_many(&cluster.node_url(1), count, parallel)?;
    check_replies(cluster, &replies, count)
}

fn counts(by_pod: &BTreeMap<String, Vec<HttpReply>>) -> BTreeMap<&str, usize> {
    by_pod.iter().map(|(k, v)| (k.as_str(), v.len())).collect()
}

// ------------------------------------------------------------------------
// The test cluster itself (no forwarder).
// ------------------------------------------------------------------------

fn topology_checks(pod_net: PodNet) -> Result<()> {
    let cluster = build(pod_net, true, 2)?;
    let pod1 = cluster.pod_on("node1")?.clone();
    let pod2 = cluster.pod_on("node2")?.clone();
    ensure!(cluster.pods().len() == 4, "pods: {:?}", cluster.pods());

    // The client is outside the cluster: no route to pod addresses.
    let url1 = format!("http://{}/productpage", pod1.ip);
    let url2 = format!("http://{}/productpage", pod2.ip);
    ensure!(
        cluster.http_get(&url1).is_err(),
        "the client reached a pod directly"
    );

    // node1 reaches its local pod and, via node2, the remote pod.
    let r = cluster.http_get_from(cluster.node_ns(1), &url1)?;
    ensure!(
        r.status == 200 && r.title == PAGE_TITLE && r.pod == pod1.name,
        "{r:?}"
    );
    let r = cluster.http_get_from(cluster.node_ns(1), &url2)?;
    ensure!(r.status == 200 && r.pod == pod2.name, "{r:?}");
    ensure!(r.client_ip() == NODE_IPS[0].to_string(), "{r:?}");

    // Pod to pod across nodes, unchanged addresses.
    let r = cluster.http_get_from(&pod1.ns, &url2)?;
    ensure!(
        r.pod == pod2.name && r.client_ip() == pod1.ip.to_string(),
        "{r:?}"
    );

    // Other paths are 404.
    let r = cluster.http_get_from(cluster.node_ns(2), &format!("http://{}/", pod2.ip))?;
    ensure!(r.status == 404, "{r:?}");

    // Keep-alive: one connection, one client port.
    let replies = cluster.http_keep_alive_from(&pod1.ns, &url2, 5)?;
    let clients: BTreeSet<String> = replies
        .iter()
        .map(|r| r.as_ref().map(|r| r.client.clone()).map_err(Clone::clone))
        .collect::<std::result::Result<_, String>>()
        .map_err(|e| anyhow!("keep-alive request failed: {e}"))?;
    ensure!(
        replies.len() == 5 && clients.len() == 1,
        "keep-alive replies: {replies:?}"
    );

    // UDP, on a connected socket.
    let udp = cluster.udp_request_from(cluster.node_ns(1), SocketAddrV4::new(pod1.ip, 5353), 3)?;
    ensure!(
        udp.len() == 3 && udp.iter().all(|u| u.pod == pod1.name),
        "{udp:?}"
    );
    let udp = cluster.udp_request_from(&pod1.ns, SocketAddrV4::new(pod2.ip, 5353), 1)?;
    ensure!(
        udp[0].pod == pod2.name && udp[0].client_ip() == pod1.ip.to_string(),
        "{udp:?}"
    );

    // The wire: complete checksums, NAPI on the lan side of the nodes.
    for ns in [cluster.client_ns(), cluster.node_ns(1), cluster.node_ns(2)] {
        ensure!(
            !netns::offload_in(ns, "eth0", Offload::TxChecksum)?,
            "tx checksum offload still on in {ns}"
        );
    }
    for lan_end in ["n1", "n2"] {
        ensure!(
            netns::offload_in(cluster.lan_ns(), lan_end, Offload::Gro)?,
            "GRO off on {lan_end}"
        );
        let link = netns::ip_in(cluster.lan_ns(), &["-d", "link", "show", lan_end])?;
        ensure!(link.contains("xdp"), "no XDP_PASS on {lan_end}: {link}");
    }
    Ok(())
}

#[test]
fn topology_routed_veth() {
    skip_unless_netns_capable!();
    check(topology_checks(PodNet::RoutedVeth));
}

#[test]
fn topology_bridge() {
    skip_unless_netns_capable!();
    check(topology_checks(PodNet::Bridge));
}

#[test]
fn topology_is_removed_on_drop() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = build(PodNet::RoutedVeth, false, 1)?;
        let names: Vec<String> = [cluster.client_ns(), cluster.lan_ns(), cluster.node_ns(1)]
            .iter()
            .map(|s| s.to_string())
            .chain(cluster.pods().iter().map(|p| p.ns.clone()))
            .collect();
        let dir = cluster.workdir().to_path_buf();
        drop(cluster);
        let list = String::from_utf8_lossy(
            &netns::run_checked(std::process::Command::new("ip").args(["netns", "list"]))?.stdout,
        )
        .into_owned();
        for n in &names {
            ensure!(
                !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
                "{n} still exists"
            );
        }
        ensure!(!dir.exists(), "{} still exists", dir.display());
        Ok(())
    })());
}

// ------------------------------------------------------------------------
// The forwarder on node1.
// ------------------------------------------------------------------------

/// Stats must show the frontend's packets and `reasons` counted.
fn stats_show(daemon: &Daemon, frontend: &str, reasons: &[&str]) -> Result<Value> {
    let stats = daemon.stats_json()?;
    eprintln!(
        "stats: {frontend} {} packets; reasons {}",
        frontend_packets(&stats, frontend),
        stats["reasons"]
            .as_object()
            .map(|o| o
                .iter()
                .filter(|(_, v)| v.as_u64() != Some(0))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default()
    );
    ensure!(
        frontend_packets(&stats, frontend) > 0,
        "no packets counted for {frontend}"
    );
    for r in reasons {
        ensure!(reason(&stats, r) > 0, "reason {r} not counted");
    }
    Ok(stats)
}

fn tcp_local_pod() -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let pod = cluster.pod_on("node1")?.clone();
    cluster.write_service(SERVICE, &[&pod])?;
    let mut daemon = start(&cluster, None)?;
    explain(
        &daemon,
        (|| {
            for _ in 0..5 {
                let r = cluster.http_get(&cluster.node_url(1))?;
                check_reply(&cluster, &r)?;
                ensure!(r.pod == pod.name, "answered by {}", r.pod);
                ensure!(
                    r.client_ip() == CLIENT_IP.to_string(),
                    "client address not preserved: {r:?}"
                );
            }
            stats_show(&daemon, HTTP_FRONTEND, &["tc_redirect_peer"])?;
            Ok(())
        })(),
    )?;
    daemon.stop()
}

fn tcp_remote_pod() -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let pod = cluster.pod_on("node2")?.clone();
    cluster.write_service(SERVICE, &[&pod])?;
    let mut daemon = start(&cluster, None)?;
    explain(
        &daemon,
        (|| {
            for _ in 0..5 {
                let r = cluster.http_get(&cluster.node_url(1))?;
                check_reply(&cluster, &r)?;
                ensure!(r.pod == pod.name, "answered by {}", r.pod);
                ensure!(
                    r.client_ip() == NODE_IPS[0].to_string(),
                    "not source-NATed to node1: {r:?}"
                );
            }
            stats_show(&daemon, HTTP_FRONTEND, &["xdp_tx"])?;
            Ok(())
        })(),
    )?;
    daemon.stop()
}

fn udp_local_and_remote() -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let frontend = SocketAddrV4::new(NODE_IPS[0], UDP_NODE_PORT);
    for (node, expected_client) in [("node1", CLIENT_IP), ("node2", NODE_IPS[0])] {
        let pod = cluster.pod_on(node)?.clone();
        cluster.write_service(SERVICE, &[&pod])?;
        let mut daemon = start(&cluster, None)?;
        explain(
            &daemon,
            (|| {
                // Several sockets (source ports), several datagrams each; the
                // sockets are connected to 192.0.2.1:31353, so every reply
                // received came from there.
                for _ in 0..3 {
                    let replies = cluster
                        .udp_request(frontend, 3)
                        .with_context(|| format!("UDP to the pod on {node}"))?;
                    ensure!(replies.len() == 3, "{replies:?}");
                    for r in &replies {
                        ensure!(r.pod == pod.name, "answered by {r:?}");
                        ensure!(
                            r.client_ip() == expected_client.to_string(),
                            "the pod on {node} saw {} instead of {expected_client}",
                            r.client
                        );
                    }
                }
                stats_show(&daemon, UDP_FRONTEND, &[])?;
                Ok(())
            })(),
        )
        .with_context(|| format!("UDP with the pod on {node}"))?;
        daemon.stop()?;
    }
    Ok(())
}

/// IPv4 verdicts counted so far, by reason: every reason that is a
/// packet's verdict, except `pass_not_ipv4` (ARP and IPv6 neighbour
/// discovery on the testbed's links come and go at their own pace).
fn ipv4_verdicts(daemon: &Daemon) -> Result<BTreeMap<&'static str, u64>> {
    let totals = daemon.maps()?.reason_totals()?;
    Ok(forwarder_common::Reason::ALL
        .iter()
        .filter(|r| r.is_verdict() && **r != forwarder_common::Reason::PassNotIpv4)
        .map(|r| (r.name(), totals[r.name()]))
        .filter(|(_, n)| *n != 0)
        .collect())
}

/// N UDP datagrams and their N replies move the verdict counters by exactly
/// 2N, whichever hooks carry them: XDP both ways (remote pod), or XDP
/// handing the requests to tc and tc catching the replies on the pod's
/// device (local pod), or tc alone (no XDP transmit on the wire).
fn each_packet_counted_once(wire_napi: bool) -> Result<()> {
    const N: usize = 40;
    let cluster = build(PodNet::RoutedVeth, wire_napi, 1)?;
    let frontend = SocketAddrV4::new(NODE_IPS[0], UDP_NODE_PORT);
    for node in ["node1", "node2"] {
        let pod = cluster.pod_on(node)?.clone();
        cluster.write_service(SERVICE, &[&pod])?;
        let mut daemon = start(&cluster, None)?;
        explain(
            &daemon,
            (|| {
                // One datagram first: neighbours resolved, flow tracked.
                cluster.udp_request(frontend, 1)?;
                let before = ipv4_verdicts(&daemon)?;
                let replies = cluster.udp_request(frontend, N)?;
                ensure!(replies.len() == N, "{} of {N} replies", replies.len());
                let after = ipv4_verdicts(&daemon)?;
                let moved: BTreeMap<&str, u64> = after
                    .iter()
                    .map(|(r, n)| (*r, n - before.get(r).copied().unwrap_or(0)))
                    .filter(|(_, n)| *n != 0)
                    .collect();
                let total: u64 = moved.values().sum();
                eprintln!("{N} datagrams to the pod on {node} (wire NAPI {wire_napi}): {moved:?}");
                ensure!(
                    total == 2 * N as u64,
                    "{N} datagrams and {N} replies moved the verdicts by {total}: {moved:?}"
                );
                Ok(())
            })(),
        )
        .with_context(|| format!("UDP with the pod on {node}"))?;
        daemon.stop()?;
    }
    Ok(())
}

fn many_connections_and_keep_alive() -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    let mut daemon = start(&cluster, None)?;
    explain(
        &daemon,
        (|| {
            const N: usize = 200;
            let replies = cluster.http_get_many(&cluster.node_url(1), N, 12)?;
            let ports: BTreeSet<&str> =
                replies.iter().flatten().map(|r| r.local.as_str()).collect();
            let by_pod: BTreeMap<String, usize> = check_replies(&cluster, &replies, N)?
                .into_iter()
                .map(|(k, v)| (k, v.len()))
                .collect();
            ensure!(
                ports.len() >= N / 2,
                "only {} distinct client ports",
                ports.len()
            );
            for pod in &pods {
                let n = by_pod.get(&pod.name).copied().unwrap_or(0);
                ensure!(
                    n * 5 >= N,
                    "{} answered {n} of {N} requests (< 20%): {by_pod:?}",
                    pod.name
                );
            }

            // Long-lived connections stay on their pod.
            for _ in 0..4 {
                let replies = cluster.http_keep_alive(&cluster.node_url(1), 30)?;
                ensure!(replies.len() == 30, "keep-alive: {replies:?}");
                let mut seen = BTreeSet::new();
                for r in &replies {
                    let r = r
                        .as_ref()
                        .map_err(|e| anyhow!("keep-alive request failed: {e}"))?;
                    check_reply(&cluster, r)?;
                    seen.insert((r.pod.clone(), r.client.clone(), r.local.clone()));
                }
                ensure!(
                    seen.len() == 1,
                    "one connection, several pods/addresses: {seen:?}"
                );
            }
            stats_show(&daemon, HTTP_FRONTEND, &[])?;
            Ok(())
        })(),
    )?;
    daemon.stop()
}

fn bridge_pods() -> Result<()> {
    let cluster = build(PodNet::Bridge, true, 1)?;
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    let mut daemon = start(&cluster, None)?;
    explain(
        &daemon,
        (|| {
            let by_pod = requests_ok(&cluster, 40, 4)?;
            ensure!(
                by_pod.len() == 2,
                "not both pods answered: {:?}",
                counts(&by_pod)
            );
            let replies = cluster.udp_request(SocketAddrV4::new(NODE_IPS[0], UDP_NODE_PORT), 3)?;
            ensure!(replies.len() == 3, "{replies:?}");
            for r in &replies {
                ensure!(
                    r.client_ip() == expected_client_ip(&cluster, &r.pod)?,
                    "{r:?}"
                );
            }
            let stats = stats_show(&daemon, HTTP_FRONTEND, &["tc_redirect"])?;
            ensure!(
                reason(&stats, "tc_redirect_peer") == 0,
                "tc_redirect_peer counted with bridge CNI pods"
            );
            Ok(())
        })(),
    )?;
    daemon.stop()
}

/// Both pods answer through node1; `expect_reasons` are counted, `zero_reasons` not.
fn both_pods_work(
    wire_napi: bool,
    xdp_mode: Option<&str>,
    expect_reasons: &[&str],
    zero_reasons: &[&str],
) -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, wire_napi, 1)?;
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    let mut daemon = start(&cluster, xdp_mode)?;
    explain(
        &daemon,
        (|| {
            let by_pod = requests_ok(&cluster, 40, 4)?;
            ensure!(
                by_pod.len() == 2,
                "not both pods answered: {:?}",
                counts(&by_pod)
            );
            let replies = cluster.udp_request(SocketAddrV4::new(NODE_IPS[0], UDP_NODE_PORT), 2)?;
            ensure!(replies.len() == 2, "{replies:?}");
            let stats = stats_show(&daemon, HTTP_FRONTEND, expect_reasons)?;
            for r in zero_reasons {
                ensure!(reason(&stats, r) == 0, "reason {r} counted");
            }
            Ok(())
        })(),
    )?;
    daemon.stop()
}

fn backend_removed_while_traffic_flows() -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let pod1 = cluster.pod_on("node1")?.clone();
    let pod2 = cluster.pod_on("node2")?.clone();
    cluster.write_service(SERVICE, &[&pod1, &pod2])?;
    let mut daemon = start(&cluster, None)?;
    // The daemon polls the manifests about every second.
    const SETTLE: Duration = Duration::from_secs(4);
    explain(
        &daemon,
        (|| {
            let stop = AtomicBool::new(false);
            // (when the request started, its outcome)
            let log: Mutex<Vec<(Instant, std::result::Result<HttpReply, String>)>> =
                Mutex::new(Vec::new());
            let url = cluster.node_url(1);
            let changed_at = std::thread::scope(|s| -> Result<Instant> {
                s.spawn(|| {
                    // Bounded: stops when told, or after 2000 requests.
                    for _ in 0..2000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let started = Instant::now();
                        let r = cluster
                            .http_get_many(&url, 1, 1)
                            .map_err(|e| format!("{e:#}"))
                            .and_then(|mut v| v.pop().unwrap_or(Err("no output".into())));
                        log.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((started, r));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
                let result = (|| {
                    std::thread::sleep(Duration::from_secs(2));
                    cluster.write_service(SERVICE, &[&pod1])?;
                    let changed_at = Instant::now();
                    std::thread::sleep(SETTLE + Duration::from_secs(4));
                    Ok(changed_at)
                })();
                stop.store(true, Ordering::Relaxed);
                result
            })?;
            let log = log.into_inner().unwrap_or_else(|p| p.into_inner());
            let before: Vec<_> = log.iter().filter(|(t, _)| *t < changed_at).collect();
            let after: Vec<_> = log
                .iter()
                .filter(|(t, _)| *t > changed_at + SETTLE)
                .collect();
            let during_failures = log
                .iter()
                .filter(|(t, r)| *t >= changed_at && *t <= changed_at + SETTLE && r.is_err())
                .count();
            ensure!(
                before
                    .iter()
                    .any(|(_, r)| r.as_ref().is_ok_and(|r| r.pod == pod2.name)),
                "{} never answered before the change ({} requests)",
                pod2.name,
                before.len()
            );
            ensure!(
                after.len() >= 10,
                "only {} requests started after the reload settled",
                after.len()
            );
            for (t, r) in &after {
                let r = r.as_ref().map_err(|e| {
                    anyhow!(
                        "request started {:.1} s after the change failed: {e}",
                        t.duration_since(changed_at).as_secs_f64()
                    )
                })?;
                check_reply(&cluster, r)?;
                ensure!(
                    r.pod == pod1.name,
                    "{} answered a request started {:.1} s after it was removed",
                    r.pod,
                    t.duration_since(changed_at).as_secs_f64()
                );
            }
            eprintln!(
            "{} requests before the change, {during_failures} failed while the reload settled, \
             {} after (all to {})",
            before.len(),
            after.len(),
            pod1.name
        );
            Ok(())
        })(),
    )?;
    daemon.stop()
}

/// tc filters and tcx programs on every interface of namespace `ns`.
fn tc_programs(ns: &str) -> Result<Vec<String>> {
    let links = netns::ip_in(ns, &["-o", "link", "show"])?;
    let ifaces: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let mut found = Vec::new();
    for iface in &ifaces {
        for dir in ["ingress", "egress"] {
            let out = netns::exec_output(ns, &["tc", "filter", "show", "dev", iface, dir])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.trim().is_empty() {
                found.push(format!("tc {dir} filter on {iface}: {}", text.trim()));
            }
        }
        let tcx = netns::run_in(ns, || {
            let mut v = Vec::new();
            for at in [TcAttachType::Ingress, TcAttachType::Egress] {
                // An error means no tcx support here: then there is nothing attached.
                if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, at) {
                    for p in progs {
                        v.push(format!("tcx {at:?} program id {} on {iface}", p.id()));
                    }
                }
            }
            Ok(v)
        })?;
        found.extend(tcx);
    }
    Ok(found)
}

fn daemon_stop_cleans_up(tc_attach: &str) -> Result<()> {
    let cluster = build(PodNet::RoutedVeth, true, 1)?;
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    let mut options: DaemonOptions = cluster.daemon_options(1);
    options.extra_args.push("--cleanup-on-exit".into());
    options
        .extra_args
        .extend(["--tc-attach".into(), tc_attach.into()]);
    let mut daemon = cluster.start_forwarder(1, &options)?;
    let node = cluster.node_ns(1).to_string();
    explain(
        &daemon,
        (|| {
            let r = cluster.http_get(&cluster.node_url(1))?;
            check_reply(&cluster, &r)?;
            // While running: the checks below can see what the daemon attached.
            let link = netns::ip_in(&node, &["-d", "link", "show", "eth0"])?;
            ensure!(
                link.contains("xdp"),
                "no XDP program on eth0 while running: {link}"
            );
            ensure!(
                daemon.pin_dir_exists()?,
                "pin dir {} missing while running",
                daemon.pin_dir().display()
            );
            let running = tc_programs(&node)?;
            eprintln!("while running: {running:?}");
            ensure!(!running.is_empty(), "no tc program found while running");
            let expected = if tc_attach == "netlink" {
                "netlink"
            } else {
                "tcx"
            };
            let way = if tc_attach == "netlink" {
                "tc ingress filter"
            } else {
                "tcx Ingress"
            };
            ensure!(
                running.iter().all(|p| p.starts_with(way)),
                "--tc-attach {tc_attach}: attached otherwise: {running:?}"
            );
            let status = daemon.forwarder(&[
                "status",
                "--pin-dir",
                &daemon.pin_dir().to_string_lossy(),
                "--output",
                "json",
            ])?;
            let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
            let ways: Vec<&str> = status["interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["tc_attach"].as_str())
                .collect();
            ensure!(
                !ways.is_empty() && ways.iter().all(|w| *w == expected),
                "forwarder status says {ways:?} for --tc-attach {tc_attach}: {status}"
            );
            Ok(())
        })(),
    )?;

    daemon.stop().context("stopping the forwarder")?;
    let link = netns::ip_in(&node, &["-d", "link", "show", "eth0"])?;
    ensure!(
        !link.contains("xdp"),
        "XDP program left on eth0 after stop: {link}"
    );
    let left = tc_programs(&node)?;
    ensure!(left.is_empty(), "tc programs left after stop: {left:?}");
    ensure!(
        !daemon.pin_dir_exists()?,
        "pin dir {} left after stop",
        daemon.pin_dir().display()
    );
    // And the node is an ordinary node again: traffic to the nodePort is
    // not answered (nothing listens there), pods are still reachable.
    ensure!(
        cluster.http_get(&cluster.node_url(1)).is_err(),
        "the nodePort still answers after stop"
    );
    let pod = cluster.pod_on("node1")?;
    let r = cluster.http_get_from(&node, &format!("http://{}/productpage", pod.ip))?;
    ensure!(r.status == 200, "{r:?}");
    Ok(())
}

/// 1. TCP to a pod on node1: client address preserved, redirect_peer used.
#[test]
fn tcp_to_local_pod_keeps_client_address() {
    skip_unless_netns_capable!();
    check(tcp_local_pod());
}

/// 2. TCP to a pod on node2: source-NATed to node1, sent back out with XDP_TX.
#[test]
fn tcp_to_remote_pod_is_source_natted() {
    skip_unless_netns_capable!();
    check(tcp_remote_pod());
}

/// 3. UDP to a local and to a remote pod; replies come from 192.0.2.1:31353.
#[test]
fn udp_to_local_and_remote_pod() {
    skip_unless_netns_capable!();
    check(udp_local_and_remote());
}

/// 3b. Each packet counts one verdict, on the XDP path and on the tc path.
#[test]
fn each_packet_is_counted_once() {
    skip_unless_netns_capable!();
    check(each_packet_counted_once(true));
    check(each_packet_counted_once(false));
}

/// 4. 200 connections spread over both pods; keep-alive stays on one pod.
#[test]
fn many_connections_spread_and_keep_alive_sticks() {
    skip_unless_netns_capable!();
    check(many_connections_and_keep_alive());
}

/// 5. Bridge CNI pods, local and remote.
#[test]
fn bridge_cni_pods() {
    skip_unless_netns_capable!();
    check(bridge_pods());
}

/// 6a. `--xdp-mode native`.
#[test]
fn xdp_native_mode() {
    skip_unless_netns_capable!();
    check(both_pods_work(true, Some("native"), &["xdp_tx"], &[]));
}

/// 6b. `--xdp-mode generic`.
#[test]
fn xdp_generic_mode() {
    skip_unless_netns_capable!();
    check(both_pods_work(true, Some("generic"), &["xdp_tx"], &[]));
}

/// 7. Without NAPI on the wire (XDP_TX impossible), the tc path takes over.
#[test]
fn without_wire_napi_tc_path_works() {
    skip_unless_netns_capable!();
    check(both_pods_work(
        false,
        None,
        &["xdp_to_tc", "tc_redirect"],
        &["xdp_tx"],
    ));
}

/// 8. A backend removed from the EndpointSlice while traffic flows.
#[test]
fn backend_removed_while_traffic_flows_goes_to_remaining_pod() {
    skip_unless_netns_capable!();
    check(backend_removed_while_traffic_flows());
}

/// 9. After SIGTERM: exit 0, no XDP or tc program left, pin dir removed.
#[test]
fn daemon_stop_removes_programs_and_pins() {
    skip_unless_netns_capable!();
    check(daemon_stop_cleans_up("auto"));
}

/// 9b. The same with tc attached through netlink (kernels without tcx):
/// the filters, which have no pins, are found and removed too.
#[test]
fn daemon_stop_removes_netlink_tc_filters_too() {
    skip_unless_netns_capable!();
    check(daemon_stop_cleans_up("netlink"));
}
