//! Operating the daemon: restarts, crashes and upgrades drop nothing; a
//! stopped daemon leaves forwarding in place until `forwarder uninstall`.
use std::{collections::BTreeSet, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use integration_tests::{
    daemon::Daemon,
    skip_unless_netns_capable,
    topology::{Cluster, ClusterOptions, HttpReply, PodNet, CLIENT_IP},
};

const SERVICE: &str = "gateway";

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

fn cluster() -> Result<Cluster> {
    let cluster = Cluster::build(ClusterOptions {
        pod_net: PodNet::RoutedVeth,
        wire_napi: true,
        pods_per_node: 1,
        ..ClusterOptions::default()
    })
    .context("building the cluster")?;
    let pods: Vec<_> = cluster.pods().iter().collect();
    cluster.write_service(SERVICE, &pods)?;
    Ok(cluster)
}

/// Everything that failed, for the report.
fn failures(replies: &[std::result::Result<HttpReply, String>]) -> Vec<&String> {
    replies.iter().filter_map(|r| r.as_ref().err()).collect()
}

/// Runs paced traffic (fresh connections and one long-lived connection)
/// while `disrupt` runs, then checks nothing failed and the long connection
/// stayed on one pod.
fn traffic_survives(
    cluster: &Cluster,
    daemon: &mut Daemon,
    disrupt: impl FnOnce(&mut Daemon) -> Result<()>,
) -> Result<()> {
    let url = cluster.node_url(1);
    let (fresh, long, disrupted) = thread::scope(|s| {
        let fresh = s.spawn(|| cluster.http_paced(&url, 60, 100, false));
        let long = s.spawn(|| cluster.http_paced(&url, 60, 100, true));
        // Let both start, then disrupt in the middle of the traffic.
        thread::sleep(Duration::from_millis(1500));
        let disrupted = disrupt(daemon);
        (fresh.join(), long.join(), disrupted)
    });
    disrupted.context("disrupting the daemon")?;
    let fresh = fresh.map_err(|_| anyhow::anyhow!("fresh-connection client panicked"))??;
    let long = long.map_err(|_| anyhow::anyhow!("long-connection client panicked"))??;
    ensure!(
        fresh.len() == 60,
        "{} of 60 fresh requests reported",
        fresh.len()
    );
    ensure!(
        failures(&fresh).is_empty(),
        "fresh connections failed: {:?}",
        failures(&fresh)
    );
    ensure!(
        long.len() == 60,
        "the long connection broke after {} requests: {:?}",
        long.len(),
        long.last()
    );
    ensure!(
        failures(&long).is_empty(),
        "the long connection failed: {:?}",
        failures(&long)
    );
    let pods: BTreeSet<&str> = long
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.pod.as_str())
        .collect();
    ensure!(
        pods.len() == 1,
        "the long connection moved between pods: {pods:?}"
    );
    let pods: BTreeSet<&str> = fresh
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.pod.as_str())
        .collect();
    ensure!(
        pods.len() == 2,
        "fresh connections did not reach both pods: {pods:?}"
    );
    Ok(())
}

fn conntrack_entries(daemon: &Daemon) -> Result<u64> {
    let stats = daemon.stats_json()?;
    stats["conntrack_entries"]
        .as_u64()
        .context("no conntrack_entries in stats")
}

#[test]
fn sigkill_and_restart_drop_no_request_and_keep_connections() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let options = cluster.daemon_options(1);
        let mut daemon = cluster.start_forwarder(1, &options)?;
        traffic_survives(&cluster, &mut daemon, |d| {
            d.kill()?;
            // The datapath forwards on its own while no daemon runs.
            thread::sleep(Duration::from_millis(1500));
            let flows = conntrack_entries(d)?;
            ensure!(
                flows >= 2,
                "conntrack emptied by the crash ({flows} entries)"
            );
            d.restart(&options)?;
            ensure!(
                d.log().contains("adopting the datapath"),
                "the new daemon did not adopt: {}",
                d.log()
            );
            Ok(())
        })?;
        daemon.stop()
    })());
}

#[test]
fn upgrade_to_a_different_object_drops_no_request() {
    skip_unless_netns_capable!();
    check(upgrade(&[]));
}

/// The same where tc attaches through netlink (kernels without tcx): the
/// new daemon replaces the program of the filter in place.
#[test]
fn upgrade_with_netlink_tc_filters_drops_no_request() {
    skip_unless_netns_capable!();
    check((|| {
        upgrade(&["--tc-attach", "netlink"])?;
        Ok(())
    })());
}

/// A restart that asks for other service map sizes (`--max-frontends`,
/// `--max-service-ports`) keeps the pinned maps as they are, so no map is
/// swapped under running programs, and says so; `forwarder uninstall` and
/// a new start give the new sizes.
#[test]
fn other_service_map_sizes_on_a_restart_keep_the_pinned_maps_and_drop_no_request() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let options = cluster.daemon_options(1);
        let mut daemon = cluster.start_forwarder(1, &options)?;
        let mut resized = options.clone();
        resized.extra_args.extend(
            ["--max-frontends", "131072", "--max-service-ports", "100000"].map(String::from),
        );
        traffic_survives(&cluster, &mut daemon, |d| {
            d.stop()?;
            d.restart(&resized)?;
            ensure!(
                d.log().contains(
                    "the pinned map FRONTENDS holds 65536 entries, not the 131072 asked for: keeping it"
                ),
                "no kept size logged: {}",
                d.log()
            );
            Ok(())
        })?;
        let capacity = |d: &Daemon, name: &str| -> Result<Option<u64>> {
            let pin_dir = d.pin_dir().to_string_lossy().into_owned();
            let out = d.forwarder(&["status", "--pin-dir", &pin_dir, "--output", "json"])?;
            let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(status["maps"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == name)
                .and_then(|m| m["capacity"].as_u64()))
        };
        ensure!(capacity(&daemon, "FRONTENDS")? == Some(65_536));
        // After an uninstall the next start creates them at the new size.
        daemon.stop()?;
        let pin_dir = daemon.pin_dir().to_string_lossy().into_owned();
        let out =
            daemon.forwarder(&["uninstall", "--pin-dir", &pin_dir, "--drain-timeout", "0s"])?;
        ensure!(
            out.status.success(),
            "uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        daemon.restart(&resized)?;
        ensure!(
            capacity(&daemon, "FRONTENDS")? == Some(131_072)
                && capacity(&daemon, "SERVICE_LABELS")? == Some(100_000),
            "map sizes after a fresh start"
        );
        let r = cluster.http_get(&cluster.node_url(1))?;
        ensure!(r.status == 200, "{r:?}");
        daemon.stop()
    })());
}

/// Stops the daemon in the middle of traffic and starts one with another
/// eBPF object (`extra` added to both daemons' flags).
fn upgrade(extra: &[&str]) -> Result<()> {
    {
        let cluster = cluster()?;
        let mut options = cluster.daemon_options(1);
        options
            .extra_args
            .extend(extra.iter().map(|a| a.to_string()));
        let mut daemon = cluster.start_forwarder(1, &options)?;
        let mut upgraded = options.clone();
        upgraded
            .extra_args
            .extend(["--datapath-generation".into(), "7".into()]);
        traffic_survives(&cluster, &mut daemon, |d| {
            d.stop()?;
            d.restart(&upgraded)?;
            let log = d.log();
            ensure!(
                log.contains("is replaced by"),
                "no program replacement logged: {log}"
            );
            Ok(())
        })?;
        if extra.contains(&"netlink") {
            // One filter per device, replaced in place: not a second one.
            let node = cluster.node_ns(1);
            let filters = integration_tests::netns::exec_in(
                node,
                &["tc", "filter", "show", "dev", "eth0", "ingress"],
            )?;
            ensure!(
                filters.matches("handle 0xf0d").count() == 1,
                "eth0's ingress filters after the upgrade: {filters}"
            );
        }
        daemon.stop()
    }
}

#[test]
fn a_stopped_daemon_keeps_forwarding_until_uninstall() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let mut daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
        daemon.stop()?;
        // Still forwarding, through the pinned programs and maps.
        let local_pod = cluster.pod_on("node1")?.name.clone();
        for _ in 0..5 {
            let r = cluster.http_get(&cluster.node_url(1))?;
            ensure!(r.status == 200, "{r:?}");
            if r.pod == local_pod {
                ensure!(
                    r.client_ip() == CLIENT_IP.to_string(),
                    "client address lost: {r:?}"
                );
            }
        }
        ensure!(daemon.pin_dir_exists()?, "pins gone after a plain stop");
        daemon.uninstall()?;
        ensure!(!daemon.pin_dir_exists()?, "pins left after uninstall");
        let link =
            integration_tests::netns::ip_in(cluster.node_ns(1), &["-d", "link", "show", "eth0"])?;
        ensure!(
            !link.contains("xdp"),
            "XDP left on eth0 after uninstall: {link}"
        );
        // No kube-proxy here: the nodePort is simply not served any more.
        ensure!(
            cluster.http_get(&cluster.node_url(1)).is_err(),
            "nodePort still answered after uninstall"
        );
        Ok(())
    })());
}
