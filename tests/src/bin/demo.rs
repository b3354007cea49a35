//! The seed scenario, for a person to watch (`cargo xtask demo`, as root).
//!
//! A client and two nodes on one L2 network, an istio-ingressgateway pod on
//! each node, all in network namespaces of their own. The forwarder runs on
//! node1 with `examples/istio-ingressgateway.yaml`; the client sends requests
//! to http://192.0.2.1:31380/productpage. The pod on node1 sees the client's
//! own address (192.0.2.100); the pod on node2 sees node1's (192.0.2.1),
//! because node1 source-NATs what it sends to another node. Everything is
//! removed at the end, also on failure.

use std::{process::ExitCode, time::Instant};

use anyhow::{bail, Context, Result};
use integration_tests::{
    netns,
    topology::{Cluster, ClusterOptions, PodNet, CLIENT_IP, NODE_IPS},
};

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/istio-ingressgateway.yaml"
);
const REQUESTS: usize = 10;

fn main() -> ExitCode {
    if let Some(reason) = netns::skip_reason() {
        eprintln!("demo: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nDEMO FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn heading(title: &str) {
    println!(
        "\n== {title} {}",
        "=".repeat(70usize.saturating_sub(title.len()))
    );
}

fn run() -> Result<()> {
    let started = Instant::now();
    heading("Building the cluster (network namespaces)");
    let cluster = Cluster::build(ClusterOptions {
        pod_net: PodNet::RoutedVeth,
        wire_napi: true,
        pods_per_node: 1,
        pod_name_prefix: "istio-ingressgateway-7d8f9c".into(),
    })
    .context("building the cluster")?;
    println!("client  {CLIENT_IP:<15} netns {}", cluster.client_ns());
    for node in cluster.nodes() {
        println!(
            "{:<7} {:<15} netns {}  pods {}",
            node.name, node.ip, node.ns, node.pod_cidr
        );
    }
    for pod in cluster.pods() {
        println!("pod     {:<15} on {}  {}", pod.ip, pod.node, pod.name);
    }

    heading("Starting the forwarder on node1");
    let manifest = std::path::Path::new(MANIFEST);
    if !manifest.is_file() {
        bail!("{} not found", manifest.display());
    }
    println!("manifests: {}", manifest.display());
    let mut options = cluster.daemon_options(1);
    options.manifests = manifest.to_path_buf();
    let mut daemon = cluster
        .start_forwarder(1, &options)
        .context("starting the forwarder")?;
    println!(
        "forwarder is ready (pin dir {})",
        daemon.pin_dir().display()
    );

    let url = cluster.node_url(1);
    heading(&format!("{REQUESTS} requests from the client to {url}"));
    println!(
        "Expected: the pod on node1 sees the client's own address ({CLIENT_IP}); the pod on\n\
         node2 sees node1's address ({}), since node1 source-NATs what it sends on.\n",
        NODE_IPS[0]
    );
    println!(
        "{:<3} {:<6} {:<24} {:<36} {:<22} note",
        "#", "status", "title", "answered by (X-Pod)", "pod saw (X-Client)"
    );
    let mut failed = 0;
    let mut by_pod = std::collections::BTreeMap::<String, usize>::new();
    for i in 1..=REQUESTS {
        match cluster.http_get(&url) {
            Ok(r) => {
                let local = cluster
                    .pods()
                    .iter()
                    .find(|p| p.name == r.pod)
                    .map(|p| p.node == "node1");
                let (expected, note) = match local {
                    Some(true) => (CLIENT_IP.to_string(), "local pod: client address kept"),
                    Some(false) => (NODE_IPS[0].to_string(), "remote pod: source-NATed to node1"),
                    None => (String::new(), "unknown pod"),
                };
                let ok = r.status == 200 && r.client_ip() == expected;
                if !ok {
                    failed += 1;
                }
                *by_pod.entry(r.pod.clone()).or_default() += 1;
                println!(
                    "{i:<3} {:<6} {:<24} {:<36} {:<22} {}{note}",
                    r.status,
                    r.title,
                    r.pod,
                    r.client,
                    if ok { "" } else { "UNEXPECTED: " }
                );
            }
            Err(e) => {
                failed += 1;
                println!("{i:<3} FAILED {e:#}");
            }
        }
    }
    println!();
    for (pod, n) in &by_pod {
        println!("{pod}: {n} request(s)");
    }

    heading("forwarder stats (on node1)");
    match daemon.stats_text() {
        Ok(text) => print!("{text}"),
        Err(e) => {
            failed += 1;
            println!("forwarder stats failed: {e:#}");
        }
    }

    heading("Stopping the forwarder and removing the cluster");
    daemon.stop().context("stopping the forwarder")?;
    drop(daemon);
    drop(cluster);
    println!("done in {:.1} s", started.elapsed().as_secs_f64());

    if failed > 0 {
        bail!("{failed} of the checks failed");
    }
    println!("\nAll {REQUESTS} requests succeeded.");
    Ok(())
}
