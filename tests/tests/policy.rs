//! NetworkPolicy enforced in netfilter holds with the forwarder on.
//!
//! A CNI that enforces policy in the node's FORWARD chain (Calico in
//! iptables mode, kube-router, Flannel with a policy add-on) turns a
//! NetworkPolicy that denies one client into the local gateway pod into a
//! FORWARD rule. kube-proxy's nodePort path crosses that chain; the
//! forwarder's delivery into a local pod would not, so it leaves every new
//! flow to a policed pod to kube-proxy. The same test runs against
//! kube-proxy's rules alone: the claim "the denied client never reaches the
//! pod, everyone else still does" is kube-proxy's own behaviour.
//!
//! Run as root after building the binaries:
//!
//! ```text
//! cargo build --release -p forwarder -p integration-tests --bins
//! cargo test --release -p integration-tests --test policy -- --test-threads=1
//! ```
use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use integration_tests::{
    daemon::Daemon,
    kube_proxy::{
        self, install, restore_input, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService,
    },
    run_cluster_test,
    topology::{
        lan_client_ip, write_atomically, Cluster, ClusterOptions, HttpReply, Pod, HTTP_NODE_PORT,
        HTTP_PORT, UDP_NODE_PORT, UDP_PORT,
    },
};
use serde_json::Value;

const SERVICE: &str = "productpage";
const POLICY: &str = "deny-one-client";
const CLUSTER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 10);
const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// New connections per client.
const CONNECTIONS: usize = 24;

/// The Pods (each labelled with its own name) and the NetworkPolicy that
/// lets every client but `denied` into `guarded`.
fn policy_manifest(pods: &[&Pod], guarded: &Pod, denied: std::net::Ipv4Addr) -> String {
    let mut y = String::new();
    for pod in pods {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  \
             labels: {{app: {SERVICE}, pod: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  \
             - {{name: server, image: podserver}}\nstatus:\n  podIP: \"{ip}\"\n  podIPs: [{{ip: \"{ip}\"}}]\n",
            name = pod.name,
            node = pod.node,
            ip = pod.ip,
        ));
    }
    y.push_str(&format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {POLICY}\n  \
         namespace: default\nspec:\n  podSelector:\n    matchLabels: {{pod: {guarded}}}\n  \
         policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 0.0.0.0/0\n        \
         except: [{denied}/32]\n",
        guarded = guarded.name,
    ));
    y
}

fn install_kube_proxy(cluster: &Cluster, pods: &[&Pod]) -> Result<()> {
    let mut svc = KpService::new("default", SERVICE, CLUSTER_IP)
        .port(KpPort::tcp("http", HTTP_PORT).with_node_port(HTTP_NODE_PORT))
        .port(KpPort::udp("dns", UDP_PORT).with_node_port(UDP_NODE_PORT));
    for pod in pods {
        svc = svc.endpoint(
            KpEndpoint::new(pod.ip)
                .tcp("http", HTTP_PORT)
                .udp("dns", UDP_PORT)
                .on_node(&pod.node),
        );
    }
    let cidr: Cidr = CLUSTER_CIDR.parse()?;
    let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
    install(
        cluster.node_ns(1),
        &restore_input(&config, &[svc]),
        Backend::Legacy,
    )
    .context("installing kube-proxy's rules")
}

/// Packets the policy's FORWARD rule dropped on node1.
fn policy_drops(cluster: &Cluster) -> Result<u64> {
    let rules = kube_proxy::counters(cluster.node_ns(1), Backend::Legacy, "filter", "FORWARD")?;
    Ok(rules
        .iter()
        .filter(|r| r.rule.contains("-j DROP"))
        .map(|r| r.packets)
        .sum())
}

/// Which pods answered, and how many connections failed.
fn answered_by(
    replies: &[std::result::Result<HttpReply, String>],
) -> (BTreeMap<String, usize>, usize) {
    let mut by_pod = BTreeMap::new();
    let mut failed = 0;
    for r in replies {
        match r {
            Ok(r) => *by_pod.entry(r.pod.clone()).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (by_pod, failed)
}

fn reason(stats: &Value, name: &str) -> u64 {
    stats["reasons"][name].as_u64().unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// The forwarder next to kube-proxy, policy enforced in netfilter.
    Forwarder,
    /// kube-proxy's rules alone.
    KubeProxyAlone,
    /// The forwarder told the CNI enforces policy elsewhere
    /// (`--network-policy outside-netfilter`): it carries the guarded pod's
    /// flows itself, around the FORWARD rule, which shows the rule is what
    /// the other variants meet.
    PolicyElsewhere,
}

/// The denied client reaches only the remote pod (its connections that
/// kube-proxy sends to the guarded pod die in FORWARD, as with kube-proxy
/// alone); the other client reaches both pods.
fn policy_holds(variant: Variant) -> Result<()> {
    let cluster = Cluster::build(ClusterOptions::default())?;
    let pods: Vec<&Pod> = cluster.pods().iter().collect();
    let guarded = cluster.pod_on("node1")?.clone();
    let remote = cluster.pod_on("node2")?.clone();
    let denied_ip = lan_client_ip(0);
    let clients = cluster.lan_clients(1)?;
    let denied = clients[0].name().to_string();
    cluster.write_service(SERVICE, &pods)?;
    write_atomically(
        &cluster.manifests_dir().join("policy.yaml"),
        &policy_manifest(&pods, &guarded, denied_ip),
    )?;
    // kube-proxy's rules in both variants: the forwarder hands policed flows to them.
    install_kube_proxy(&cluster, &pods)?;
    // The FORWARD rule a netfilter CNI writes for the policy.
    cluster.exec(
        cluster.node_ns(1),
        &[
            Backend::Legacy.iptables(),
            "-I",
            "FORWARD",
            "1",
            "-s",
            &format!("{denied_ip}/32"),
            "-d",
            &format!("{}/32", guarded.ip),
            "-j",
            "DROP",
        ],
    )?;
    let daemon: Option<Daemon> = match variant {
        Variant::Forwarder => Some(cluster.start_forwarder(1, &cluster.daemon_options(1))?),
        Variant::PolicyElsewhere => {
            let mut options = cluster.daemon_options(1);
            options
                .extra_args
                .extend(["--network-policy".into(), "outside-netfilter".into()]);
            Some(cluster.start_forwarder(1, &options)?)
        }
        Variant::KubeProxyAlone => None,
    };
    let url = cluster.node_url(1);
    let result = (|| -> Result<()> {
        let (denied_seen, denied_failed) =
            answered_by(&cluster.http_get_many_from(&denied, &url, CONNECTIONS, 8)?);
        if variant == Variant::PolicyElsewhere {
            ensure!(
                denied_seen.contains_key(&guarded.name) && denied_failed == 0,
                "outside-netfilter: the forwarder did not carry the denied client to {} \
                 ({denied_failed} failed): {denied_seen:?}",
                guarded.name
            );
            let stats = daemon.as_ref().context("a daemon")?.stats_json()?;
            ensure!(
                reason(&stats, "pass_policed") == 0,
                "policed with outside-netfilter"
            );
            return Ok(());
        }
        ensure!(
            !denied_seen.contains_key(&guarded.name),
            "the denied client reached the guarded pod {}: {denied_seen:?}",
            guarded.name
        );
        ensure!(
            denied_seen.get(&remote.name).copied().unwrap_or(0) > 0,
            "the denied client reached no pod at all ({denied_failed} failed): the test proves nothing"
        );
        ensure!(
            policy_drops(&cluster)? > 0,
            "the FORWARD rule dropped nothing: no connection of the denied client was sent to {}",
            guarded.name
        );

        let allowed = cluster.http_get_many(&url, CONNECTIONS, 8)?;
        let (allowed_seen, allowed_failed) = answered_by(&allowed);
        ensure!(
            allowed_failed == 0,
            "{allowed_failed} of the allowed client's connections failed: {allowed:?}"
        );
        for pod in [&guarded, &remote] {
            ensure!(
                allowed_seen.get(&pod.name).copied().unwrap_or(0) > 0,
                "the allowed client never reached {}: {allowed_seen:?}",
                pod.name
            );
        }

        if let Some(d) = &daemon {
            let stats = d.stats_json()?;
            ensure!(
                reason(&stats, "pass_policed") > 0,
                "no flow was left to kube-proxy for the policy"
            );
            ensure!(
                reason(&stats, "xdp_tx") + reason(&stats, "xdp_redirect") > 0,
                "the remote pod's flows did not keep the fast path"
            );
            let pin_dir = d.pin_dir().to_string_lossy().into_owned();
            let out = d.forwarder(&["services", "--output", "json", "--pin-dir", &pin_dir])?;
            ensure!(
                out.status.success(),
                "forwarder services: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let services: Value = serde_json::from_slice(&out.stdout)?;
            let backends = services
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
                .collect::<Vec<_>>();
            let row = |ip: std::net::Ipv4Addr| {
                backends
                    .iter()
                    .find(|b| {
                        b["backend"]
                            .as_str()
                            .is_some_and(|a| a.starts_with(&format!("{ip}:")))
                    })
                    .cloned()
            };
            let policed = row(guarded.ip).context("the guarded pod in `forwarder services`")?;
            ensure!(
                policed["policed"]
                    .as_str()
                    .is_some_and(|why| why.contains(&format!("default/{POLICY}"))),
                "`forwarder services` does not say the guarded pod is policed: {policed}"
            );
            let free = row(remote.ip).context("the remote pod in `forwarder services`")?;
            ensure!(
                free.get("policed").is_none(),
                "the remote pod shown policed: {free}"
            );
        }
        Ok(())
    })();
    result.map_err(|e| match &daemon {
        Some(d) => anyhow::anyhow!(
            "{e:?}\nforwarder stats: {}\nforwarder log:\n{}",
            d.stats_json().map(|v| v.to_string()).unwrap_or_default(),
            d.log()
        ),
        None => e,
    })
}

#[test]
fn a_network_policy_enforced_in_forward_holds_with_the_forwarder() {
    run_cluster_test("policy with the forwarder", Some(Backend::Legacy), || {
        policy_holds(Variant::Forwarder)
    });
}

#[test]
fn a_network_policy_enforced_in_forward_holds_with_kube_proxy_alone() {
    run_cluster_test(
        "policy with kube-proxy alone",
        Some(Backend::Legacy),
        || policy_holds(Variant::KubeProxyAlone),
    );
}

#[test]
fn with_policy_enforced_outside_netfilter_the_forwarder_carries_the_guarded_pod() {
    run_cluster_test("policy enforced elsewhere", Some(Backend::Legacy), || {
        policy_holds(Variant::PolicyElsewhere)
    });
}
