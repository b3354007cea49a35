//! Live connections through what operators do on a busy node: turning the
//! forwarder on next to kube-proxy, draining and uninstalling it, an
//! endpoint that terminates and leaves its slice, and sessionAffinity.
//! Each must behave as kube-proxy's rules do; the draining test runs against
//! kube-proxy's rules alone as well, so the claim itself is checked.
//!
//! Run as root after building the binaries, one test at a time:
//!
//! ```text
//! cargo build --release -p forwarder -p integration-tests --bins
//! cargo test --release -p integration-tests --test live -- --test-threads=1
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use integration_tests::{
    daemon::Daemon,
    kube_proxy::{
        self, install, restore_input, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService,
    },
    netns, run_cluster_test,
    topology::{
        service_manifest, write_atomically, Cluster, ClusterOptions, HttpReply, Pod, CLIENT_IP,
        HTTP_NODE_PORT, HTTP_PORT, NODE_IPS, UDP_NODE_PORT, UDP_PORT,
    },
};

const SERVICE: &str = "productpage";
const CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Long-lived connections per phase: keep-alive, one request every PACE.
const LIVE: usize = 8;
const PACE_MS: u64 = 200;

/// The Service as kube-proxy sees it, with `pods` as endpoints in the
/// given conditions (ready, serving, terminating).
fn kube_proxy_service(pods: &[(&Pod, (bool, bool, bool))]) -> KpService {
    let mut svc = KpService::new("default", SERVICE, CLUSTER_IP)
        .port(KpPort::tcp("http", HTTP_PORT).with_node_port(HTTP_NODE_PORT))
        .port(KpPort::udp("dns", UDP_PORT).with_node_port(UDP_NODE_PORT));
    for (pod, (ready, serving, terminating)) in pods {
        svc = svc.endpoint(
            KpEndpoint::new(pod.ip)
                .tcp("http", HTTP_PORT)
                .udp("dns", UDP_PORT)
                .on_node(&pod.node)
                .conditions(*ready, *serving, *terminating),
        );
    }
    svc
}

fn install_kube_proxy(cluster: &Cluster, pods: &[(&Pod, (bool, bool, bool))]) -> Result<()> {
    let cidr: Cidr = CLUSTER_CIDR.parse()?;
    let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
    let rules = restore_input(&config, &[kube_proxy_service(pods)]);
    install(cluster.node_ns(1), &rules, Backend::Legacy).context("installing kube-proxy's rules")
}

/// What one connection's requests got.
type Replies = Vec<std::result::Result<HttpReply, String>>;

/// `LIVE` keep-alive connections from the client, `count` requests each,
/// one every PACE_MS, while `during` runs; returns each connection's replies.
fn with_live_connections<T>(
    cluster: &Cluster,
    count: usize,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<Replies>)> {
    let url = cluster.node_url(1);
    thread::scope(|s| {
        let live: Vec<_> = (0..LIVE)
            .map(|_| s.spawn(|| cluster.http_paced(&url, count, PACE_MS, true)))
            .collect();
        // Let every connection be established before the change.
        thread::sleep(Duration::from_millis(2 * PACE_MS));
        let result = during();
        let mut replies = Vec::new();
        for t in live {
            replies.push(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a connection thread panicked"))??,
            );
        }
        Ok((result?, replies))
    })
}

/// Every connection answered all `count` requests, each from one pod.
/// Returns the pod of each connection.
fn all_survived(what: &str, replies: &[Replies], count: usize) -> Result<Vec<String>> {
    let mut pods = Vec::new();
    for (i, conn) in replies.iter().enumerate() {
        let failed: Vec<_> = conn.iter().filter_map(|r| r.as_ref().err()).collect();
        ensure!(
            conn.len() == count && failed.is_empty(),
            "{what}: connection {i} answered {} of {count} requests: {failed:?}",
            conn.iter().filter(|r| r.is_ok()).count()
        );
        let served: BTreeSet<&str> = conn
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| r.pod.as_str())
            .collect();
        ensure!(
            served.len() == 1,
            "{what}: connection {i} moved between pods {served:?}"
        );
        pods.push(served.into_iter().next().unwrap_or_default().to_string());
    }
    Ok(pods)
}

fn node1_nodeport_packets(cluster: &Cluster) -> Result<u64> {
    let rules = kube_proxy::counters(
        cluster.node_ns(1),
        Backend::Legacy,
        "nat",
        kube_proxy::KUBE_NODEPORTS,
    )?;
    Ok(rules.iter().map(|c| c.packets).sum())
}

fn explain<T>(daemon: Option<&Daemon>, result: Result<T>) -> Result<T> {
    result.map_err(|e| match daemon {
        Some(d) => anyhow::anyhow!(
            "{e:?}\nforwarder stats: {}\nforwarder log:\n{}",
            d.stats_json().map(|v| v.to_string()).unwrap_or_default(),
            d.log()
        ),
        None => e,
    })
}

/// Turning the forwarder on while kube-proxy carries long-lived connections
/// keeps them all with kube-proxy to the end; new connections go through the
/// forwarder. Then `forwarder uninstall` drains: it takes no new flows, and
/// the forwarder's long-lived connections keep working until they close
/// on their own, inside the deadline; afterwards kube-proxy carries new ones.
fn on_and_off() -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    let ready = (true, true, false);
    install_kube_proxy(
        &cluster,
        &pods.iter().map(|p| (*p, ready)).collect::<Vec<_>>(),
    )?;

    // On: 8 connections through kube-proxy live across the start.
    let count = 20;
    let (daemon, replies) = with_live_connections(&cluster, count, || {
        cluster.start_forwarder(1, &cluster.daemon_options(1))
    })?;
    let mut daemon = daemon;
    explain(
        Some(&daemon),
        all_survived("kube-proxy's connections across the start", &replies, count).map(|_| ()),
    )?;
    // New connections are the forwarder's: node1's pod sees the client.
    let before = node1_nodeport_packets(&cluster)?;
    let fresh = cluster.http_get_many(&cluster.node_url(1), 20, 4)?;
    for r in &fresh {
        let r = r
            .as_ref()
            .map_err(|e| anyhow::anyhow!("new connection failed: {e}"))?;
        if r.pod.ends_with("node1") {
            ensure!(
                r.client_ip() == CLIENT_IP.to_string(),
                "not through the forwarder: {r:?}"
            );
        }
    }
    ensure!(
        node1_nodeport_packets(&cluster)? == before,
        "new connections reached KUBE-NODEPORTS"
    );

    // Off: the daemon stops (the datapath stays), uninstall drains.
    daemon.stop()?;
    let count = 15;
    let drain_started = Instant::now();
    let pin_dir = daemon.pin_dir().to_string_lossy().into_owned();
    let (uninstall, replies) = with_live_connections(&cluster, count, || {
        thread::scope(|s| {
            let uninstall = s.spawn(|| {
                daemon.forwarder(&["uninstall", "--pin-dir", &pin_dir, "--drain-timeout", "30s"])
            });
            // A new connection while draining is kube-proxy's from its first packet.
            thread::sleep(Duration::from_millis(1000));
            let r = cluster
                .http_get(&cluster.node_url(1))
                .context("a new connection while draining")?;
            ensure!(
                r.client_ip() == NODE_IPS[0].to_string(),
                "the drain took a new flow: {r:?}"
            );
            let out = uninstall
                .join()
                .map_err(|_| anyhow::anyhow!("uninstall thread panicked"))??;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(out.status.success(), "uninstall failed: {text}");
            Ok(text)
        })
    })?;
    let drained = drain_started.elapsed();
    all_survived(
        "the forwarder's connections across the drain",
        &replies,
        count,
    )?;
    ensure!(
        drained < Duration::from_secs(25),
        "uninstall took {drained:?}: it waited for the deadline\n{uninstall}"
    );
    ensure!(
        !uninstall.contains("still open"),
        "uninstall cut flows:\n{uninstall}"
    );
    ensure!(!daemon.pin_dir_exists()?, "pins left after uninstall");

    // kube-proxy again.
    let before = node1_nodeport_packets(&cluster)?;
    for r in cluster.http_get_many(&cluster.node_url(1), 10, 2)? {
        let r = r.map_err(|e| anyhow::anyhow!("after uninstall: {e}"))?;
        ensure!(
            r.client_ip() == NODE_IPS[0].to_string(),
            "still the forwarder's: {r:?}"
        );
    }
    ensure!(
        node1_nodeport_packets(&cluster)? >= before + 10,
        "kube-proxy did not carry the new connections"
    );
    Ok(())
}

/// The manifest with `pod` in the given conditions, or left out.
fn manifest_with(pods: &[&Pod], pod: &Pod, conditions: Option<(bool, bool, bool)>) -> String {
    let kept: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|p| p.name != pod.name || conditions.is_some())
        .collect();
    let mut y = service_manifest(SERVICE, &kept);
    if let Some((ready, serving, terminating)) = conditions {
        let needle = format!("  - \"{}\"\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n", pod.ip);
        let with = format!(
            "  - \"{}\"\n  conditions:\n    ready: {ready}\n    serving: {serving}\n    terminating: {terminating}\n",
            pod.ip
        );
        y = y.replace(&needle, &with);
    }
    y
}

/// An endpoint turns terminating (ready false, serving true), then leaves
/// the slice while its pod still runs: its connections live on (kube-proxy
/// never flushes TCP conntrack entries), new connections avoid it.
fn draining_endpoint(forwarder: bool) -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    let leaving = cluster.pod_on("node2")?.clone();
    let manifest = cluster.manifests_dir().join(format!("{SERVICE}.yaml"));
    cluster.write_service(SERVICE, &pods)?;
    let ready = (true, true, false);
    let terminating = (false, true, true);
    let daemon = if forwarder {
        Some(cluster.start_forwarder(1, &cluster.daemon_options(1))?)
    } else {
        install_kube_proxy(
            &cluster,
            &pods.iter().map(|p| (*p, ready)).collect::<Vec<_>>(),
        )?;
        None
    };
    let set = |conditions: Option<(bool, bool, bool)>| -> Result<()> {
        if forwarder {
            write_atomically(&manifest, &manifest_with(&pods, &leaving, conditions))?;
            // The daemon reloads on change; give it a moment.
            thread::sleep(Duration::from_millis(1500));
            Ok(())
        } else {
            let eps: Vec<_> = pods
                .iter()
                .filter(|p| p.name != leaving.name || conditions.is_some())
                .map(|p| {
                    (
                        *p,
                        if p.name == leaving.name {
                            conditions.unwrap_or(ready)
                        } else {
                            ready
                        },
                    )
                })
                .collect();
            install_kube_proxy(&cluster, &eps)
        }
    };
    let new_connections = || -> Result<BTreeMap<String, usize>> {
        let mut by_pod = BTreeMap::new();
        for r in cluster.http_get_many(&cluster.node_url(1), 16, 4)? {
            let r = r.map_err(|e| anyhow::anyhow!("new connection failed: {e}"))?;
            *by_pod.entry(r.pod).or_insert(0) += 1;
        }
        Ok(by_pod)
    };
    let count = 30; // 6 s of traffic per connection
    let (seen, replies) = with_live_connections(&cluster, count, || {
        set(Some(terminating))?;
        let while_terminating = new_connections()?;
        set(None)?;
        let after_removal = new_connections()?;
        Ok((while_terminating, after_removal))
    })?;
    let result = (|| {
        let served = all_survived("connections through the draining endpoint", &replies, count)?;
        ensure!(
            served.contains(&leaving.name),
            "no long-lived connection went to {} (served: {served:?}); the test proves nothing",
            leaving.name
        );
        for (phase, by_pod) in [("terminating", &seen.0), ("removed", &seen.1)] {
            ensure!(
                !by_pod.contains_key(&leaving.name),
                "{phase}: new connections reached {}: {by_pod:?}",
                leaving.name
            );
        }
        Ok(())
    })();
    explain(daemon.as_ref(), result)
}

/// sessionAffinity ClientIP: each client's new connections stay on one
/// backend; after that backend leaves, they move to another one and stay
/// there; after the timeout without new connections, the choice is free
/// again (here: only checked to still succeed).
fn affinity() -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    let manifest = cluster.manifests_dir().join(format!("{SERVICE}.yaml"));
    let sticky = |pods: &[&Pod]| {
        service_manifest(SERVICE, pods).replace(
            "  type: NodePort\n",
            "  type: NodePort\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 4\n",
        )
    };
    write_atomically(&manifest, &sticky(&pods))?;
    let daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
    // Several clients: extra namespaces on the lan, one address each.
    let clients = cluster.lan_clients(3)?;
    let result = (|| -> Result<()> {
        let mut first: BTreeMap<String, String> = BTreeMap::new();
        for ns in clients
            .iter()
            .map(|c| c.name().to_string())
            .chain([cluster.client_ns().to_string()])
        {
            let pods_seen = pods_of(&cluster, &ns, 12)?;
            ensure!(pods_seen.len() == 1, "client {ns} reached {pods_seen:?}");
            first.insert(ns, pods_seen.into_iter().next().unwrap_or_default());
        }
        // The backend of some clients leaves: they move, and stick again.
        let leaving = first.values().next().cloned().unwrap_or_default();
        let staying: Vec<&Pod> = pods.iter().copied().filter(|p| p.name != leaving).collect();
        write_atomically(&manifest, &sticky(&staying))?;
        thread::sleep(Duration::from_millis(1500));
        for ns in first.keys() {
            let pods_seen = pods_of(&cluster, ns, 8)?;
            ensure!(
                pods_seen.len() == 1 && !pods_seen.contains(&leaving),
                "after {leaving} left, client {ns} reached {pods_seen:?}"
            );
        }
        // Expiry: the timeout (4 s) counts from a client's last new
        // connection; past it, its next connection is chosen afresh (no
        // affinity hit), and the one after that sticks again.
        let hits = |d: &Daemon| -> Result<u64> {
            Ok(d.stats_json()?["reasons"]["affinity_hit"]
                .as_u64()
                .unwrap_or(0))
        };
        let ns = cluster.client_ns().to_string();
        thread::sleep(Duration::from_millis(4500));
        let before = hits(&daemon)?;
        pods_of(&cluster, &ns, 1)?;
        ensure!(
            hits(&daemon)? == before,
            "an expired affinity still chose the backend"
        );
        pods_of(&cluster, &ns, 1)?;
        ensure!(
            hits(&daemon)? == before + 1,
            "the renewed affinity was not used"
        );
        Ok(())
    })();
    explain(Some(&daemon), result)
}

/// The pods that answered `count` new connections from namespace `ns`.
fn pods_of(cluster: &Cluster, ns: &str, count: usize) -> Result<BTreeSet<String>> {
    let mut pods = BTreeSet::new();
    for r in cluster.http_get_many_from(ns, &cluster.node_url(1), count, 1)? {
        pods.insert(r.map_err(|e| anyhow::anyhow!("{ns}: {e}"))?.pod);
    }
    Ok(pods)
}

#[test]
fn turning_on_keeps_kube_proxys_connections_and_uninstall_drains_its_own() {
    run_cluster_test("on and off", Some(Backend::Legacy), on_and_off);
}

#[test]
fn a_terminating_then_removed_endpoint_keeps_its_connections() {
    run_cluster_test("draining endpoint (forwarder)", None, || {
        draining_endpoint(true)
    });
}

#[test]
fn a_terminating_then_removed_endpoint_keeps_its_connections_with_kube_proxy_alone() {
    run_cluster_test(
        "draining endpoint (kube-proxy alone)",
        Some(Backend::Legacy),
        || draining_endpoint(false),
    );
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend() {
    run_cluster_test("affinity", None, affinity);
}

/// A UDP flow whose backend leaves the slice moves to a live backend at
/// once (kube-proxy flushes UDP conntrack entries of removed endpoints, or
/// the flow would black-hole): one connected socket, every datagram answered.
fn udp_flow_moves() -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let (pod1, pod2) = (
        cluster.pod_on("node1")?.clone(),
        cluster.pod_on("node2")?.clone(),
    );
    cluster.write_service(SERVICE, &[&pod2])?;
    let daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
    let target = format!("{}:{UDP_NODE_PORT}", NODE_IPS[0]);
    let podserver = integration_tests::daemon::podserver_bin()?;
    let podserver = podserver.to_string_lossy().into_owned();
    let result = (|| -> Result<()> {
        let lines = thread::scope(|s| -> Result<Vec<String>> {
            let flow = s.spawn(|| {
                let args = [
                    podserver.as_str(),
                    "udp-request",
                    &target,
                    "--count",
                    "40",
                    "--interval-ms",
                    "100",
                ];
                netns::exec_in(cluster.client_ns(), &args)
            });
            // The flow's backend leaves after a second; another takes over.
            thread::sleep(Duration::from_millis(1000));
            cluster.write_service(SERVICE, &[&pod1])?;
            Ok(flow
                .join()
                .map_err(|_| anyhow::anyhow!("the UDP flow's thread panicked"))?
                .context("the UDP flow lost a datagram")?
                .lines()
                .map(str::to_string)
                .collect())
        })?;
        ensure!(
            lines.len() == 40,
            "{} replies for 40 datagrams: {lines:?}",
            lines.len()
        );
        let pods: Vec<&str> = lines.iter().filter_map(|l| l.split(' ').next()).collect();
        ensure!(pods[0] == pod2.name, "the flow began on {}", pods[0]);
        ensure!(
            pods[39] == pod1.name,
            "the flow stayed on {} after it left",
            pods[39]
        );
        let moved = pods.iter().position(|p| *p == pod1.name).unwrap_or(40);
        ensure!(
            pods[moved..].iter().all(|p| *p == pod1.name),
            "the flow went back and forth: {pods:?}"
        );
        Ok(())
    })();
    explain(Some(&daemon), result)
}

#[test]
fn a_udp_flow_moves_when_its_backend_leaves() {
    run_cluster_test("udp flow moves", None, udp_flow_moves);
}
