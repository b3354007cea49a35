//! Hostile traffic on a node that also runs kube-proxy's rules: a SYN flood
//! from forged sources at the nodePort, as fast as the client's namespace
//! can write it, while keep-alive clients talk to the local and the remote
//! pod. The user-visible claims (no live connection breaks, new connections
//! keep being served during and after the flood, nothing stays locked out)
//! are checked with the forwarder and with kube-proxy's rules alone; with
//! the forwarder, its half-open table is sized far below the flood so the
//! flood overflows it, and the evictions must show in its counters while
//! the established table loses nothing.
//!
//! Run as root after building the binaries, one test at a time:
//!
//! ```text
//! cargo build --release -p forwarder -p integration-tests --bins
//! cargo test --release -p integration-tests --test hostile -- --test-threads=1
//! ```
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use integration_tests::{
    daemon::{workspace_binary, Daemon},
    kube_proxy::{install, restore_input, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService},
    netns, run_cluster_test,
    topology::{Cluster, ClusterOptions, HttpReply, Pod, HTTP_NODE_PORT, HTTP_PORT, NODE_IPS},
};

const SERVICE: &str = "productpage";
const CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Forged SYNs in the flood.
const FLOOD: u64 = 200_000;
/// The forwarder's half-open table in this test (entries; a flow takes
/// two): the flood overflows it about fifty times over.
const HALF_OPEN_ENTRIES: u32 = 4096;
/// Keep-alive connections across the flood, one request every PACE_MS.
const LIVE: usize = 16;
const PACE_MS: u64 = 200;
/// New connections right after the flood, of which 99% must succeed.
const AFTER: usize = 200;

fn install_kube_proxy(cluster: &Cluster, pods: &[&Pod]) -> Result<()> {
    let mut svc = KpService::new("default", SERVICE, CLUSTER_IP)
        .port(KpPort::tcp("http", HTTP_PORT).with_node_port(HTTP_NODE_PORT));
    for pod in pods {
        svc = svc.endpoint(
            KpEndpoint::new(pod.ip)
                .tcp("http", HTTP_PORT)
                .on_node(&pod.node)
                .conditions(true, true, false),
        );
    }
    let cidr: Cidr = CLUSTER_CIDR.parse()?;
    let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
    let rules = restore_input(&config, &[svc]);
    install(cluster.node_ns(1), &rules, Backend::Legacy).context("installing kube-proxy's rules")
}

type Replies = Vec<std::result::Result<HttpReply, String>>;

fn successes(replies: &Replies) -> usize {
    replies.iter().filter(|r| r.is_ok()).count()
}

/// What the run measured, for the test's output.
struct Measured {
    flood_line: String,
    during_ok: usize,
    during_total: usize,
    after_ok: usize,
}

fn syn_flood(forwarder: bool) -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    // kube-proxy's rules are there in both variants, as on a real node.
    install_kube_proxy(&cluster, &pods)?;
    let daemon = if forwarder {
        let mut options = cluster.daemon_options(1);
        options.extra_args.extend([
            "--conntrack-half-open-entries".to_string(),
            HALF_OPEN_ENTRIES.to_string(),
            format!("--metrics-addr={METRICS_ADDR}"),
        ]);
        Some(cluster.start_forwarder(1, &options)?)
    } else {
        None
    };
    let result = flood_while_serving(&cluster, daemon.as_ref());
    explain(daemon.as_ref(), result)
}

fn flood_while_serving(cluster: &Cluster, daemon: Option<&Daemon>) -> Result<()> {
    let url = cluster.node_url(1);
    let node_mac = cluster
        .exec(cluster.node_ns(1), &["cat", "/sys/class/net/eth0/address"])?
        .trim()
        .to_string();
    let flood_bin = workspace_binary("synflood")?.to_string_lossy().into_owned();
    let target = format!("{}:{HTTP_NODE_PORT}", NODE_IPS[0]);
    let flood_args = [
        flood_bin.as_str(),
        "--iface",
        "eth0",
        "--dst-mac",
        &node_mac,
        "--dst",
        &target,
        "--count",
        &FLOOD.to_string(),
        "--sources",
        "100.64.0.0/10",
    ];
    // Long enough to span the flood and the new connections after it.
    let live_count = 60;
    let flooding = AtomicBool::new(true);
    let (measured, live) = thread::scope(|s| -> Result<(Measured, Vec<Replies>)> {
        let live: Vec<_> = (0..LIVE)
            .map(|_| s.spawn(|| cluster.http_paced(&url, live_count, PACE_MS, true)))
            .collect();
        // Every keep-alive connection established before the flood.
        thread::sleep(Duration::from_millis(3 * PACE_MS));
        let during = s.spawn(|| -> Result<Vec<Replies>> {
            let mut rounds = Vec::new();
            while flooding.load(Ordering::Relaxed) {
                rounds.push(cluster.http_get_many(&url, 8, 4)?);
            }
            Ok(rounds)
        });
        let flood = netns::exec_in(cluster.client_ns(), &flood_args);
        flooding.store(false, Ordering::Relaxed);
        let flood_line = flood.context("the SYN flood")?.trim().to_string();
        let during = during
            .join()
            .map_err(|_| anyhow::anyhow!("the during-flood thread panicked"))??;
        // Right after the flood (its half-open flows still there).
        let after = cluster.http_get_many(&url, AFTER, 8)?;
        let mut replies = Vec::new();
        for t in live {
            replies.push(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a keep-alive thread panicked"))??,
            );
        }
        Ok((
            Measured {
                flood_line,
                during_ok: during.iter().map(successes).sum(),
                during_total: during.iter().map(Vec::len).sum(),
                after_ok: successes(&after),
            },
            replies,
        ))
    })?;
    println!(
        "flood: {}; new connections during it: {} of {}; right after: {} of {AFTER}",
        measured.flood_line, measured.during_ok, measured.during_total, measured.after_ok
    );

    // No keep-alive connection lost a request, and they reached both pods.
    let mut served = BTreeSet::new();
    for (i, conn) in live.iter().enumerate() {
        let failed: Vec<_> = conn.iter().filter_map(|r| r.as_ref().err()).collect();
        ensure!(
            conn.len() == live_count && failed.is_empty(),
            "keep-alive connection {i} answered {} of {live_count} requests across the flood: {failed:?}",
            successes(conn)
        );
        served.extend(
            conn.iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.pod.clone()),
        );
    }
    ensure!(
        served.len() == cluster.pods().len(),
        "the keep-alive connections reached only {served:?}"
    );
    ensure!(
        measured.during_ok > 0,
        "no new connection succeeded during the flood ({} tried)",
        measured.during_total
    );
    ensure!(
        measured.after_ok * 100 >= AFTER * 99,
        "only {} of {AFTER} new connections right after the flood succeeded",
        measured.after_ok
    );
    // Nothing stays locked out: once the flood's half-open flows have timed
    // out or been recycled, every new connection succeeds.
    let later = cluster.http_get_many(&url, 50, 5)?;
    ensure!(
        successes(&later) == later.len(),
        "new connections still failing after the flood: {:?}",
        later
            .iter()
            .filter_map(|r| r.as_ref().err())
            .collect::<Vec<_>>()
    );

    if let Some(daemon) = daemon {
        // The flood overflowed the half-open table: the next sweep (every
        // 10 s) infers the evictions; the established table lost nothing.
        let deadline = Instant::now() + Duration::from_secs(30);
        let reasons = loop {
            let reasons = daemon.maps()?.reason_totals()?;
            if reasons["ct_half_open_evicted"] > 0 || Instant::now() > deadline {
                break reasons;
            }
            thread::sleep(Duration::from_millis(500));
        };
        let evicted = reasons["ct_half_open_evicted"];
        println!(
            "half-open entries: {} added, {} evicted; established evicted: {}; pass_snat_exhausted: {}",
            reasons["ct_half_open_inserted"],
            evicted,
            reasons["ct_established_evicted"],
            reasons["pass_snat_exhausted"]
        );
        ensure!(
            evicted > 0,
            "no half-open eviction counted after {FLOOD} forged SYNs into a table of {HALF_OPEN_ENTRIES}"
        );
        ensure!(
            reasons["ct_half_open_inserted"] > u64::from(HALF_OPEN_ENTRIES),
            "the flood never reached the forwarder's half-open table"
        );
        ensure!(
            reasons["ct_established_evicted"] == 0,
            "{} established entries evicted by a SYN flood",
            reasons["ct_established_evicted"]
        );
        let metrics = daemon_metrics(cluster)?;
        let sample =
            format!("forwarder_conntrack_evictions_total{{table=\"half_open\"}} {evicted}");
        ensure!(
            metrics.lines().any(|l| l == sample),
            "/metrics lacks {sample:?}:\n{metrics}"
        );
    }
    Ok(())
}

/// Where the test's daemon serves /metrics (inside its node).
const METRICS_ADDR: &str = "127.0.0.1:10279";

/// The daemon's /metrics body, fetched from inside its node.
fn daemon_metrics(cluster: &Cluster) -> Result<String> {
    netns::run_in(cluster.node_ns(1), || {
        let mut s = TcpStream::connect(METRICS_ADDR)
            .with_context(|| format!("connecting to {METRICS_ADDR}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {METRICS_ADDR}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
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

#[test]
fn a_syn_flood_breaks_no_connection_and_locks_no_one_out() {
    run_cluster_test("syn flood (forwarder)", Some(Backend::Legacy), || {
        syn_flood(true)
    });
}

#[test]
fn a_syn_flood_breaks_no_connection_and_locks_no_one_out_with_kube_proxy_alone() {
    run_cluster_test(
        "syn flood (kube-proxy alone)",
        Some(Backend::Legacy),
        || syn_flood(false),
    );
}
