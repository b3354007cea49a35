//! What an operator sees: health and metrics endpoints, the inspection
//! commands (with and without a running daemon), and a clear refusal to
//! replace someone else's XDP program.
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use integration_tests::{
    daemon::Daemon,
    netns, skip_unless_netns_capable,
    topology::{Cluster, ClusterOptions, PodNet},
};
use serde_json::Value;

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

/// A plain HTTP/1.0 GET from inside `ns`: (status, body).
fn http_get_in(ns: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    let (addr, path) = (addr.to_string(), path.to_string());
    netns::run_in(ns, move || {
        let mut s = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

fn json_of(daemon: &Daemon, args: &[&str]) -> Result<Value> {
    let out = daemon.forwarder(args)?;
    ensure!(
        out.status.success(),
        "forwarder {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("forwarder {args:?} output"))
}

/// The value of the first sample of `name` whose labels contain all `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn health_metrics_and_inspection_commands() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = Cluster::build(ClusterOptions {
            pod_net: PodNet::RoutedVeth,
            wire_napi: true,
            pods_per_node: 1,
            ..ClusterOptions::default()
        })?;
        let pods: Vec<_> = cluster.pods().iter().collect();
        cluster.write_service("gateway", &pods)?;
        let mut options = cluster.daemon_options(1);
        options.extra_args.extend([
            "--health-addr=127.0.0.1:10266".into(),
            "--metrics-addr=127.0.0.1:10269".into(),
        ]);
        let mut daemon = cluster.start_forwarder(1, &options)?;
        let node = cluster.node_ns(1).to_string();
        let replies = cluster.http_get_many(&cluster.node_url(1), 40, 4)?;
        ensure!(
            replies.iter().all(|r| r.is_ok()),
            "requests failed: {replies:?}"
        );

        let (code, body) = http_get_in(&node, "127.0.0.1:10266", "/healthz")?;
        ensure!(code == 200, "/healthz {code}: {body}");
        let health: Value = serde_json::from_str(&body).context("/healthz body")?;
        ensure!(
            health["lastUpdated"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z')),
            "{health}"
        );
        ensure!(health["currentTime"].as_str().is_some(), "{health}");
        let (code, _) = http_get_in(&node, "127.0.0.1:10266", "/livez")?;
        ensure!(code == 200, "/livez {code}");

        let (code, metrics) = http_get_in(&node, "127.0.0.1:10269", "/metrics")?;
        ensure!(code == 200, "/metrics {code}");
        let svc = "service=\"default/gateway:http\"";
        ensure!(
            sample(&metrics, "forwarder_service_packets_total", &[svc]).is_some_and(|v| v > 0.0),
            "no service packets:\n{metrics}"
        );
        for pod in cluster.pods() {
            let be = format!("backend=\"{}:80\"", pod.ip);
            ensure!(
                sample(&metrics, "forwarder_backend_packets_total", &[&be])
                    .is_some_and(|v| v > 0.0),
                "no packets for {be}:\n{metrics}"
            );
        }
        ensure!(
            sample(
                &metrics,
                "forwarder_datapath_packets_total",
                &["reason=\"xdp_tx\""]
            )
            .is_some_and(|v| v > 0.0),
            "{metrics}"
        );
        ensure!(
            sample(
                &metrics,
                "forwarder_interface_info",
                &["interface=\"eth0\"", "mode=\"native\""]
            ) == Some(1.0),
            "{metrics}"
        );
        ensure!(
            sample(&metrics, "forwarder_map_capacity", &["map=\"CONNTRACK\""])
                .is_some_and(|v| v > 0.0),
            "{metrics}"
        );
        ensure!(
            sample(&metrics, "forwarder_reconciles_succeeded_total", &[]).is_some_and(|v| v >= 1.0),
            "{metrics}"
        );
        ensure!(metrics.contains("forwarder_build_info"), "{metrics}");

        let pin = daemon.pin_dir().to_string_lossy().into_owned();
        let status = json_of(&daemon, &["status", "--pin-dir", &pin, "--output", "json"])?;
        ensure!(status["daemon"]["running"] == true, "{status}");
        let eth0 = status["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["name"] == "eth0")
            .context("eth0 in status")?;
        ensure!(
            eth0["role"] == "external" && eth0["mode"] == "native",
            "{eth0}"
        );
        ensure!(
            eth0["xdp_program_id"].as_u64().is_some_and(|id| id > 0),
            "{eth0}"
        );
        ensure!(
            eth0["tc_program_id"].as_u64().is_some_and(|id| id > 0),
            "{eth0}"
        );
        let pod_dev = &cluster.pod_on("node1")?.host_iface;
        ensure!(
            status["interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["name"] == pod_dev.as_str() && i["role"] == "pod-veth"),
            "the local pod's veth {pod_dev} is not listed: {status}"
        );

        let services = json_of(
            &daemon,
            &["services", "--pin-dir", &pin, "--output", "json"],
        )?;
        let gw = services
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == "default/gateway:http")
            .context("gateway in services")?;
        ensure!(
            gw["frontends"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "192.0.2.1:31380/TCP")),
            "{gw}"
        );
        let backends = gw["backends"].as_array().context("backends")?;
        ensure!(backends.len() == 2, "{gw}");
        ensure!(
            backends.iter().any(|b| b["local"] == true)
                && backends.iter().any(|b| b["local"] == false),
            "{gw}"
        );

        // A long-lived connection shows up as a flow with its translation.
        let ka = cluster.http_keep_alive(&cluster.node_url(1), 3)?;
        ensure!(ka.iter().all(|r| r.is_ok()), "{ka:?}");
        let flows = json_of(
            &daemon,
            &["conntrack", "--pin-dir", &pin, "--output", "json"],
        )?;
        let flows = flows.as_array().context("flows")?;
        ensure!(
            flows.iter().any(|f| f["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("192.0.2.100:"))
                && f["frontend"] == "192.0.2.1:31380"),
            "{flows:?}"
        );
        ensure!(
            flows.iter().any(|f| f["snat"]
                .as_str()
                .is_some_and(|s| s.starts_with("192.0.2.1:"))),
            "no source-NATed flow: {flows:?}"
        );

        // Without a daemon: the same commands work from the pins.
        daemon.stop()?;
        let status = json_of(&daemon, &["status", "--pin-dir", &pin, "--output", "json"])?;
        ensure!(status["daemon"]["running"] == false, "{status}");
        let services = json_of(
            &daemon,
            &["services", "--pin-dir", &pin, "--output", "json"],
        )?;
        ensure!(
            services.as_array().is_some_and(|s| !s.is_empty()),
            "{services}"
        );
        let text = daemon.forwarder(&["status", "--pin-dir", &pin])?;
        let text = String::from_utf8_lossy(&text.stdout);
        ensure!(
            text.contains("not running") && text.contains("eth0"),
            "{text}"
        );
        daemon.uninstall()
    })());
}

#[test]
fn someone_elses_xdp_program_is_never_replaced() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = Cluster::build(ClusterOptions::default())?;
        let pods: Vec<_> = cluster.pods().iter().collect();
        cluster.write_service("gateway", &pods)?;
        let node = cluster.node_ns(1).to_string();
        let _theirs = netns::attach_xdp_pass(&node, "eth0")?;
        let mut options = cluster.daemon_options(1);
        options.ready_timeout = Duration::from_secs(5);
        let err = match cluster.start_forwarder(1, &options) {
            Ok(d) => anyhow::bail!(
                "the forwarder started over another XDP program:\n{}",
                d.log()
            ),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("another XDP program is already attached"),
            "unclear error: {err}"
        );
        // Theirs is still there, and nothing of ours was left behind.
        let link = netns::ip_in(&node, &["-d", "link", "show", "eth0"])?;
        ensure!(link.contains("xdp"), "their XDP program is gone: {link}");
        Ok(())
    })());
}

#[test]
fn datapath_events_reach_the_log_at_debug_level() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = Cluster::build(ClusterOptions {
            pod_net: PodNet::RoutedVeth,
            wire_napi: true,
            pods_per_node: 1,
            ..ClusterOptions::default()
        })?;
        // Only the remote pod, and a single source port for it: the second
        // concurrent flow finds no free port and is passed to the kernel.
        let remote = cluster.pod_on("node2")?;
        cluster.write_service("gateway", &[remote])?;
        let mut options = cluster.daemon_options(1);
        options
            .extra_args
            .extend(["--snat-port-range".into(), "61000-61000".into()]);
        let previous = std::env::var("RUST_LOG").ok();
        // SAFETY (edition 2021: safe): the tests of this binary run one at a time.
        std::env::set_var("RUST_LOG", "info,forwarder=debug");
        let started = cluster.start_forwarder(1, &options);
        match previous {
            Some(v) => std::env::set_var("RUST_LOG", v),
            None => std::env::remove_var("RUST_LOG"),
        }
        let mut daemon = started?;
        let url = cluster.node_url(1);
        let second = std::thread::scope(|s| {
            let long = s.spawn(|| cluster.http_paced(&url, 20, 100, true));
            std::thread::sleep(Duration::from_millis(500));
            let second = cluster.http_get(&url);
            let _ = long.join();
            second
        });
        ensure!(
            second.is_err(),
            "a second flow got a source port from a range of one"
        );
        let stats = daemon.stats_json()?;
        ensure!(
            stats["reasons"]["pass_snat_exhausted"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "{stats}"
        );
        let exhausted = forwarder_common::Reason::PassSnatExhausted as u32;
        daemon.wait_for_log(
            &format!("reason {exhausted} on ifindex"),
            Duration::from_secs(5),
        )?;
        daemon.stop()?;
        Ok(())
    })());
}
