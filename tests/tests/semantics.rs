//! kube-proxy's Service semantics end to end, through the datapath: traffic
//! policy Local, LoadBalancer ingress IPs and externalIPs routed to the node,
//! named target ports, and endpoints going not-ready then terminating.
use std::{collections::BTreeSet, fmt::Write as _, thread, time::Duration};

use anyhow::{ensure, Context, Result};
use integration_tests::{
    netns, skip_unless_netns_capable,
    topology::{
        write_atomically, Cluster, ClusterOptions, HttpReply, Pod, PodNet, CLIENT_IP, NODE_IPS,
    },
};

const LB_IP: &str = "203.0.113.10";
const EXTERNAL_IP: &str = "198.51.100.20";

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

fn cluster() -> Result<Cluster> {
    Cluster::build(ClusterOptions {
        pod_net: PodNet::RoutedVeth,
        wire_napi: true,
        pods_per_node: 1,
        ..ClusterOptions::default()
    })
    .context("building the cluster")
}

/// An endpoint's conditions in an EndpointSlice.
#[derive(Clone, Copy)]
struct Conditions {
    ready: bool,
    serving: bool,
    terminating: bool,
}

const READY: Conditions = Conditions {
    ready: true,
    serving: true,
    terminating: false,
};
const TERMINATING: Conditions = Conditions {
    ready: false,
    serving: true,
    terminating: true,
};
const GONE: Conditions = Conditions {
    ready: false,
    serving: false,
    terminating: true,
};

/// A LoadBalancer Service `web` (port `web` 80 → named targetPort `http-web`,
/// nodePort 31380), with an ingress IP and an externalIP, and its slice.
fn manifest(policy: &str, endpoints: &[(&Pod, Conditions)]) -> String {
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: LoadBalancer
  externalTrafficPolicy: {policy}
  externalIPs: [\"{EXTERNAL_IP}\"]
  selector: {{app: web}}
  ports:
  - name: web
    protocol: TCP
    port: 80
    targetPort: http-web
    nodePort: 31380
status:
  loadBalancer:
    ingress:
    - ip: {LB_IP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-xyz12
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- name: web
  protocol: TCP
  port: 80
endpoints:
"
    );
    for (pod, c) in endpoints {
        let _ = write!(
            y,
            "- addresses: [\"{}\"]
  nodeName: {}
  conditions: {{ready: {}, serving: {}, terminating: {}}}
",
            pod.ip, pod.node, c.ready, c.serving, c.terminating
        );
    }
    y
}

fn write(cluster: &Cluster, yaml: &str) -> Result<()> {
    write_atomically(&cluster.manifests_dir().join("web.yaml"), yaml)
}

fn pods_answering(replies: &[HttpReply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.pod.clone()).collect()
}

fn get_many(cluster: &Cluster, url: &str, n: usize) -> Result<Vec<HttpReply>> {
    let replies = cluster.http_get_many(url, n, 4)?;
    let failed: Vec<_> = replies.iter().filter_map(|r| r.as_ref().err()).collect();
    ensure!(failed.is_empty(), "{url}: {failed:?}");
    Ok(replies.into_iter().filter_map(Result::ok).collect())
}

#[test]
fn local_traffic_policy_serves_only_local_pods_with_the_client_address() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let (p1, p2) = (cluster.pod_on("node1")?, cluster.pod_on("node2")?);
        write(&cluster, &manifest("Local", &[(p1, READY), (p2, READY)]))?;
        let daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
        let replies = get_many(&cluster, &cluster.node_url(1), 30)?;
        ensure!(
            pods_answering(&replies) == BTreeSet::from([p1.name.clone()]),
            "{:?}",
            pods_answering(&replies)
        );
        for r in &replies {
            ensure!(
                r.client_ip() == CLIENT_IP.to_string(),
                "client address not kept: {r:?}"
            );
        }
        // Node2 has no forwarder: kube-proxy (absent here) would answer there;
        // on node1 the remote pod is never used, and no flow was source-NATed.
        let stats = daemon.stats_json()?;
        ensure!(
            stats["reasons"]["xdp_tx"] == 0,
            "a flow went to the remote pod: {stats}"
        );
        Ok(())
    })());
}

#[test]
fn load_balancer_ingress_ip_and_external_ip_routed_to_the_node() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let (p1, p2) = (cluster.pod_on("node1")?, cluster.pod_on("node2")?);
        write(&cluster, &manifest("Cluster", &[(p1, READY), (p2, READY)]))?;
        // Upstream routing (a cloud LB, BGP) sends these addresses to node1.
        let node1 = NODE_IPS[0].to_string();
        for ip in [LB_IP, EXTERNAL_IP] {
            netns::ip_in(cluster.client_ns(), &["route", "add", ip, "via", &node1])?;
        }
        let daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
        for ip in [LB_IP, EXTERNAL_IP] {
            let url = format!("http://{ip}:80/productpage");
            let replies = get_many(&cluster, &url, 30).context(ip)?;
            ensure!(
                pods_answering(&replies).len() == 2,
                "{ip}: {:?}",
                pods_answering(&replies)
            );
            for r in &replies {
                let expected = if r.pod == p1.name {
                    CLIENT_IP
                } else {
                    NODE_IPS[0]
                };
                ensure!(r.client_ip() == expected.to_string(), "{ip}: {r:?}");
            }
        }
        // The nodePort still works alongside them.
        get_many(&cluster, &cluster.node_url(1), 10)?;
        let services = daemon.forwarder(&[
            "services",
            "--pin-dir",
            &daemon.pin_dir().to_string_lossy(),
            "--output",
            "json",
        ])?;
        let text = String::from_utf8_lossy(&services.stdout);
        for f in [
            format!("{LB_IP}:80/TCP"),
            format!("{EXTERNAL_IP}:80/TCP"),
            "192.0.2.1:31380/TCP".to_string(),
        ] {
            ensure!(text.contains(&f), "frontend {f} missing: {text}");
        }
        Ok(())
    })());
}

#[test]
fn named_target_port_and_endpoints_going_not_ready_then_terminating() {
    skip_unless_netns_capable!();
    check((|| {
        let cluster = cluster()?;
        let (p1, p2) = (cluster.pod_on("node1")?, cluster.pod_on("node2")?);
        write(&cluster, &manifest("Cluster", &[(p1, READY), (p2, READY)]))?;
        let _daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
        // The named targetPort resolved through the slice: both pods answer.
        let replies = get_many(&cluster, &cluster.node_url(1), 30)?;
        ensure!(
            pods_answering(&replies).len() == 2,
            "{:?}",
            pods_answering(&replies)
        );

        let url = cluster.node_url(1);
        let paced = thread::scope(|s| -> Result<_> {
            let traffic = s.spawn(|| cluster.http_paced(&url, 80, 50, false));
            // node2's pod starts terminating: it is no longer used while a ready one exists.
            thread::sleep(Duration::from_millis(800));
            write(
                &cluster,
                &manifest("Cluster", &[(p1, READY), (p2, TERMINATING)]),
            )?;
            thread::sleep(Duration::from_millis(1500));
            // Now none is ready: fall back to the serving, terminating one.
            write(
                &cluster,
                &manifest("Cluster", &[(p1, TERMINATING), (p2, GONE)]),
            )?;
            traffic
                .join()
                .map_err(|_| anyhow::anyhow!("traffic thread panicked"))?
        })?;
        let failed: Vec<_> = paced.iter().filter_map(|r| r.as_ref().err()).collect();
        ensure!(
            paced.len() == 80 && failed.is_empty(),
            "requests failed across the changes: {failed:?}"
        );
        // After the last change has settled, only node1's pod answers.
        thread::sleep(Duration::from_millis(1500));
        let replies = get_many(&cluster, &cluster.node_url(1), 20)?;
        ensure!(
            pods_answering(&replies) == BTreeSet::from([p1.name.clone()]),
            "{:?}",
            pods_answering(&replies)
        );
        Ok(())
    })());
}
