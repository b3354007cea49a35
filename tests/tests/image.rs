//! The container image `cargo xtask image` writes (an oci-archive), checked
//! with the tools an operator loads it with: skopeo reads its labels and
//! entrypoint, umoci unpacks it into a runtime bundle, the binary runs in a
//! chroot of the unpacked root filesystem (nothing else is in there), and
//! the daemon started from that root filesystem forwards the demo's
//! traffic to both pods. Its `/metrics` then has every metric the Grafana
//! dashboard queries.
//!
//! The archive: `$FORWARDER_IMAGE` (set by `cargo xtask test`), else
//! `target/image/forwarder-<version>.tar`.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use integration_tests::{
    daemon::target_dir,
    netns::{self, run_checked},
    skip_unless_netns_capable,
    topology::{Cluster, ClusterOptions, PodNet, CLIENT_IP, NODE_IPS},
};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BINARY: &str = "usr/local/bin/forwarder";
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/istio-ingressgateway.yaml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/dashboards/forwarder.json"
);

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

fn archive() -> Result<PathBuf> {
    let path = match std::env::var_os("FORWARDER_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => target_dir()?
            .parent()
            .context("the target directory")?
            .join("image")
            .join(format!("forwarder-{VERSION}.tar")),
    };
    ensure!(
        path.is_file(),
        "{} not found: run `cargo xtask image` first (or set FORWARDER_IMAGE)",
        path.display()
    );
    Ok(path)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = run_checked(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A scratch directory, removed on Drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("fwd-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The image name in the archive's index (`org.opencontainers.image.ref.name`).
fn reference(layout: &Path) -> Result<String> {
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifests = index["manifests"].as_array().context("index.manifests")?;
    ensure!(manifests.len() == 1, "one image in the archive: {index}");
    manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .map(str::to_string)
        .context("no ref.name annotation")
}

/// The archive unpacked by umoci: (scratch dir, bundle with rootfs/ and
/// config.json).
fn unpack(archive: &Path) -> Result<(Scratch, PathBuf)> {
    let scratch = Scratch::new("image")?;
    let layout = scratch.0.join("layout");
    std::fs::create_dir_all(&layout)?;
    // An oci-archive is a tar of an OCI image layout.
    output(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
    )?;
    let reference = reference(&layout)?;
    let bundle = scratch.0.join("bundle");
    output(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{reference}", layout.display()))
            .arg(&bundle),
    )
    .context("umoci unpack")?;
    Ok((scratch, bundle))
}

/// Regular files and symlinks under `root`, relative.
fn files(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else {
                out.push(
                    entry
                        .path()
                        .strip_prefix(root)?
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn skopeo_reads_the_labels_entrypoint_and_one_small_layer() {
    check((|| {
        let archive = archive()?;
        let source = format!("oci-archive:{}", archive.display());
        let inspect: Value =
            serde_json::from_str(&output(Command::new("skopeo").args(["inspect", &source]))?)?;
        let labels = &inspect["Labels"];
        ensure!(
            labels["org.opencontainers.image.version"] == VERSION,
            "{inspect:#}"
        );
        let revision = labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap_or("");
        let commit = revision.trim_end_matches("-dirty");
        ensure!(
            commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "revision {revision:?}"
        );
        ensure!(
            labels["org.opencontainers.image.source"]
                .as_str()
                .is_some_and(|s| s.contains("://")),
            "source {:?}",
            labels["org.opencontainers.image.source"]
        );
        ensure!(
            inspect["Architecture"] == "amd64" && inspect["Os"] == "linux",
            "{inspect:#}"
        );
        let manifest: Value = serde_json::from_str(&output(
            Command::new("skopeo").args(["inspect", "--raw", &source]),
        )?)?;
        let layers = manifest["layers"].as_array().context("manifest layers")?;
        ensure!(layers.len() == 1, "one layer: {layers:?}");
        ensure!(
            layers[0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip",
            "{manifest}"
        );
        ensure!(
            inspect["Digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{inspect:#}"
        );
        let size = layers[0]["size"].as_u64().context("layer size")?;
        eprintln!(
            "image: compressed layer {:.1} MB, archive {:.1} MB",
            size as f64 / 1e6,
            std::fs::metadata(&archive)?.len() as f64 / 1e6
        );
        let config: Value = serde_json::from_str(&output(
            Command::new("skopeo").args(["inspect", "--config", &source]),
        )?)?;
        ensure!(
            config["config"]["Entrypoint"] == serde_json::json!([format!("/{BINARY}")]),
            "{config:#}"
        );
        ensure!(
            config["config"]["Labels"] == *labels,
            "the config carries the labels"
        );
        // The same timestamp everywhere: the commit's.
        ensure!(
            config["created"] == labels["org.opencontainers.image.created"],
            "{config:#}"
        );
        Ok(())
    })());
}

#[test]
fn the_unpacked_root_filesystem_holds_one_static_binary_that_runs_in_a_chroot() {
    check((|| {
        let (_scratch, bundle) = unpack(&archive()?)?;
        let rootfs = bundle.join("rootfs");
        ensure!(files(&rootfs)? == [BINARY], "{:?}", files(&rootfs)?);
        let runtime: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
        ensure!(
            runtime["process"]["args"] == serde_json::json!([format!("/{BINARY}")]),
            "umoci's runtime config runs the entrypoint: {}",
            runtime["process"]
        );
        // Nothing but the binary in the root: a dynamically linked one
        // would not even start.
        let chroot = |args: &[&str]| {
            output(
                Command::new("chroot")
                    .arg(&rootfs)
                    .arg(format!("/{BINARY}"))
                    .args(args),
            )
        };
        let version = chroot(&["--version"])?;
        ensure!(
            version.trim() == format!("forwarder {VERSION}"),
            "{version:?}"
        );
        let help = chroot(&["run", "--help"])?;
        for flag in ["--iface", "--manifests", "--pin-dir", "--metrics-addr"] {
            ensure!(help.contains(flag), "`run --help` lacks {flag}:\n{help}");
        }
        Ok(())
    })());
}

/// A plain HTTP/1.0 GET from inside `ns`: the body of a 200 answer.
fn http_get_in(ns: &str, addr: &str, path: &str) -> Result<String> {
    let (addr, path) = (addr.to_string(), path.to_string());
    netns::run_in(ns, move || {
        let mut s = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        Ok(body.to_string())
    })
}

/// Series names in a Prometheus text exposition.
fn exposed_series(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every `forwarder_*` metric name the dashboard's queries use.
fn dashboard_metrics(dashboard: &Value) -> BTreeSet<String> {
    let mut exprs = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(e)) = map.get("expr") {
                    exprs.push(e.clone());
                }
                stack.extend(map.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("forwarder_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

/// Sum of the kernel memory (`memlock`) of the maps the daemon pinned.
fn pinned_map_bytes(daemon: &integration_tests::daemon::Daemon) -> Result<u64> {
    let pin = daemon.pin_dir().to_string_lossy().into_owned();
    let out = daemon.exec(
        "/bin/sh",
        &[
            "-c",
            "for m in \"$0\"/*; do bpftool -j map show pinned \"$m\" 2>/dev/null; echo; done",
            &pin,
        ],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|m| m["bytes_memlock"].as_u64())
        .sum())
}

#[test]
fn the_daemon_from_the_image_forwards_the_demo_traffic_to_both_pods() {
    skip_unless_netns_capable!();
    check((|| {
        let (_scratch, bundle) = unpack(&archive()?)?;
        let binary = bundle.join("rootfs").join(BINARY);
        // This test process runs alone (its own test binary, one thread
        // at a time): the daemon helper starts $FORWARDER_BIN.
        std::env::set_var("FORWARDER_BIN", &binary);

        let cluster = Cluster::build(ClusterOptions {
            pod_net: PodNet::RoutedVeth,
            wire_napi: true,
            pods_per_node: 1,
            pod_name_prefix: "istio-ingressgateway-7d8f9c".into(),
        })?;
        let mut options = cluster.daemon_options(1);
        options.manifests = PathBuf::from(MANIFEST);
        options
            .extra_args
            .push("--metrics-addr=127.0.0.1:10269".into());
        let daemon = cluster.start_forwarder(1, &options)?;
        ensure!(
            daemon.log().contains("ready: "),
            "the image's daemon did not get ready:\n{}",
            daemon.log()
        );

        // The demo's check: every request answered, local pods see the
        // client, remote ones node1 (source NAT), and both pods answer.
        let url = cluster.node_url(1);
        let mut by_pod = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..20 {
            let r = cluster.http_get(&url)?;
            let pod = cluster
                .pods()
                .iter()
                .find(|p| p.name == r.pod)
                .with_context(|| format!("answered by an unknown pod {:?}", r.pod))?;
            let expected = if pod.node == "node1" {
                CLIENT_IP.to_string()
            } else {
                NODE_IPS[0].to_string()
            };
            ensure!(
                r.status == 200 && r.client_ip() == expected,
                "{} from {}: client {} (want {expected})",
                r.status,
                r.pod,
                r.client
            );
            *by_pod.entry(r.pod).or_default() += 1;
        }
        ensure!(by_pod.len() == 2, "requests reached {by_pod:?}");

        // forwarder status from the image, with the skipped Services.
        let pin = daemon.pin_dir().to_string_lossy().into_owned();
        let status = daemon.forwarder(&[
            "status",
            "--pin-dir",
            &pin,
            "--metrics-addr",
            "127.0.0.1:10269",
        ])?;
        let status_text = String::from_utf8_lossy(&status.stdout);
        ensure!(
            status.status.success()
                && status_text.contains("Skipped Services (left to kube-proxy)"),
            "forwarder status: {status_text}{}",
            String::from_utf8_lossy(&status.stderr)
        );

        // Every metric a dashboard panel queries is exported.
        let metrics = http_get_in(cluster.node_ns(1), "127.0.0.1:10269", "/metrics")?;
        let exposed = exposed_series(&metrics);
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD)?)
            .context("the dashboard is JSON")?;
        let queried = dashboard_metrics(&dashboard);
        ensure!(queried.len() >= 10, "the dashboard queries {queried:?}");
        let missing: Vec<&String> = queried.iter().filter(|m| !exposed.contains(*m)).collect();
        if !missing.is_empty() {
            bail!(
                "the dashboard queries metrics the daemon does not export: {missing:?}\n{metrics}"
            );
        }
        eprintln!(
            "maps pinned by the image's daemon: {:.1} MiB of kernel memory",
            pinned_map_bytes(&daemon)? as f64 / (1024.0 * 1024.0)
        );
        Ok(())
    })());
}
