//! Which local pods NetworkPolicy guards, so the forwarder never carries
//! traffic around the rules that enforce it.
//!
//! Many CNIs (Calico in iptables mode, kube-router, Flannel with a policy
//! add-on) enforce NetworkPolicy in the node's netfilter FORWARD chain.
//! kube-proxy's nodePort path crosses that chain; the forwarder's delivery
//! into a local pod (`bpf_redirect_peer`) does not. So a local endpoint that
//! any ingress policy selects is marked policed: the datapath leaves each new
//! flow that would go to it to kube-proxy, whole, from its first packet.
//! Remote endpoints keep the fast path: their node's FORWARD chain still
//! sees every packet, as with kube-proxy.
//!
//! The reading is the safe one wherever the objects leave doubt: a local
//! endpoint with no Pod object known for its address is policed if any
//! ingress policy exists in its namespace, and a NetworkPolicy that cannot be
//! read polices every local endpoint of its namespace (of every namespace,
//! when even that is unknown).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{core::v1::Pod, networking::v1::NetworkPolicy},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

/// Where NetworkPolicy is enforced on this node (`--network-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Enforcement {
    /// In netfilter (the FORWARD chain): policed local endpoints are left
    /// to kube-proxy. The safe reading, and the default.
    #[default]
    Netfilter,
    /// Somewhere the forwarder's delivery still meets (an eBPF CNI that
    /// enforces inside the pod's own device path): nothing is policed here.
    OutsideNetfilter,
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enforcement::Netfilter => "netfilter",
            Enforcement::OutsideNetfilter => "outside-netfilter",
        })
    }
}

/// The NetworkPolicy objects as a source knows them.
#[derive(Clone, Copy, Debug)]
pub struct PolicyObjects<'a> {
    /// Pods; those of other nodes are ignored.
    pub pods: &'a [Pod],
    pub policies: &'a [NetworkPolicy],
    /// Namespaces of NetworkPolicies that could not be read (`None`: not
    /// even the namespace is known).
    pub unreadable: &'a [Option<String>],
}

/// Which local endpoints are policed, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policing {
    /// Local pods' addresses that an ingress policy selects -> the policies.
    policed: BTreeMap<Ipv4Addr, String>,
    /// Local pods' addresses that no ingress policy selects.
    unpoliced: BTreeSet<Ipv4Addr>,
    /// Namespaces with ingress policies -> why an unknown pod there is policed.
    namespaces: BTreeMap<String, String>,
    /// Set when a policy of an unknown namespace could not be read.
    everywhere: Option<String>,
}

/// At most this many policy names in one reason (the rest are counted).
const NAMES_SHOWN: usize = 3;

fn names(list: &[String]) -> String {
    let mut shown = list
        .iter()
        .take(NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > NAMES_SHOWN {
        shown.push_str(&format!(" and {} more", list.len() - NAMES_SHOWN));
    }
    shown
}

impl Policing {
    /// Nothing is policed (`--network-policy outside-netfilter`).
    pub fn none() -> Self {
        Policing::default()
    }

    /// The local pods of `node_name` that the policies police.
    pub fn of(objects: PolicyObjects<'_>, node_name: &str) -> Self {
        let mut ingress: BTreeMap<&str, Vec<&NetworkPolicy>> = BTreeMap::new();
        for policy in objects.policies {
            if affects_ingress(policy) {
                ingress
                    .entry(policy.metadata.namespace.as_deref().unwrap_or("default"))
                    .or_default()
                    .push(policy);
            }
        }
        let mut out = Policing::default();
        for (namespace, policies) in &ingress {
            let listed: Vec<String> = policies.iter().map(|p| qualified(p)).collect();
            out.namespaces.insert(
                namespace.to_string(),
                format!(
                    "no Pod known for this address; ingress NetworkPolicies in {namespace}: {}",
                    names(&listed)
                ),
            );
        }
        let mut unreadable: BTreeMap<&str, usize> = BTreeMap::new();
        for namespace in objects.unreadable {
            match namespace {
                Some(ns) => *unreadable.entry(ns.as_str()).or_default() += 1,
                None => {
                    out.everywhere =
                        Some("a NetworkPolicy of unknown namespace cannot be read".into())
                }
            }
        }
        for (namespace, count) in &unreadable {
            // Overrides: the unreadable one may select any pod there.
            out.namespaces.insert(
                namespace.to_string(),
                format!("{count} NetworkPolicy object(s) in {namespace} cannot be read"),
            );
        }

        for pod in objects.pods {
            let Some(spec) = pod.spec.as_ref() else {
                continue;
            };
            // kubelet's own pods on the host network are no NetworkPolicy's
            // subject; their address is the node's.
            if spec.node_name.as_deref() != Some(node_name) || spec.host_network == Some(true) {
                continue;
            }
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            let addrs = pod_ipv4s(pod);
            if addrs.is_empty() {
                continue;
            }
            let why = if let Some(why) = out.everywhere.clone() {
                Some(why)
            } else if unreadable.contains_key(namespace) {
                out.namespaces.get(namespace).cloned()
            } else {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                let selecting: Vec<String> = ingress
                    .get(namespace)
                    .into_iter()
                    .flatten()
                    .filter(|p| {
                        selects(
                            p.spec.as_ref().and_then(|s| s.pod_selector.as_ref()),
                            &labels,
                        )
                    })
                    .map(|p| qualified(p))
                    .collect();
                (!selecting.is_empty()).then(|| format!("NetworkPolicy {}", names(&selecting)))
            };
            for addr in addrs {
                match &why {
                    // Two pods may have held one address: policed wins.
                    Some(why) => {
                        out.unpoliced.remove(&addr);
                        out.policed.insert(addr, why.clone());
                    }
                    None => {
                        if !out.policed.contains_key(&addr) {
                            out.unpoliced.insert(addr);
                        }
                    }
                }
            }
        }
        out
    }

    /// Why the local endpoint `addr` of a Service in `namespace` is
    /// policed, or `None` if the forwarder may carry its traffic.
    pub fn reason(&self, addr: Ipv4Addr, namespace: &str) -> Option<String> {
        if let Some(why) = self.policed.get(&addr) {
            return Some(why.clone());
        }
        if self.unpoliced.contains(&addr) {
            return None;
        }
        self.everywhere
            .clone()
            .or_else(|| self.namespaces.get(namespace).cloned())
    }

    /// Local pods' addresses policed (for logging).
    pub fn policed_pods(&self) -> usize {
        self.policed.len()
    }
}

fn qualified(policy: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or("default"),
        policy.metadata.name.as_deref().unwrap_or("")
    )
}

/// Every policy affects ingress unless its `policyTypes` lists only Egress
/// (networking/v1: without `policyTypes`, all policies affect ingress).
fn affects_ingress(policy: &NetworkPolicy) -> bool {
    match policy.spec.as_ref().and_then(|s| s.policy_types.as_ref()) {
        None => true,
        Some(types) if types.is_empty() => true,
        Some(types) => types.iter().any(|t| t == "Ingress"),
    }
}

fn pod_ipv4s(pod: &Pod) -> Vec<Ipv4Addr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut addrs: Vec<Ipv4Addr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// A label selector as the API server reads it; an absent or empty one
/// selects every pod. An operator the API does not define selects too
/// (the API server refuses such a policy; doubt polices).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or(&[]);
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => true,
        }
    });
    labels_match && expressions_match
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("test Pod")
    }

    fn policy(yaml: &str) -> NetworkPolicy {
        serde_yaml::from_str(yaml).expect("test NetworkPolicy")
    }

    fn gateway(node: &str, ip: &str, labels: &str) -> Pod {
        pod(&format!(
            "metadata: {{name: gw-{ip}, namespace: istio-system, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {node}, containers: []}}\n\
             status: {{podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n"
        ))
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn of(pods: &[Pod], policies: &[NetworkPolicy], unreadable: &[Option<String>]) -> Policing {
        Policing::of(
            PolicyObjects {
                pods,
                policies,
                unreadable,
            },
            "node1",
        )
    }

    const DENY: &str = "metadata: {name: deny-one, namespace: istio-system}\n\
        spec:\n  podSelector: {matchLabels: {app: gw}}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 0.0.0.0/0, except: [192.0.2.66/32]}\n";

    #[test]
    fn a_selected_local_pod_is_policed_and_says_by_which_policy() {
        let pods = [
            gateway("node1", "10.244.1.10", "app: gw"),
            gateway("node1", "10.244.1.11", "app: other"),
        ];
        let p = of(&pods, &[policy(DENY)], &[]);
        assert_eq!(
            p.reason(ip("10.244.1.10"), "istio-system").as_deref(),
            Some("NetworkPolicy istio-system/deny-one")
        );
        assert_eq!(p.reason(ip("10.244.1.11"), "istio-system"), None);
        assert_eq!(p.policed_pods(), 1);
    }

    #[test]
    fn pods_of_other_nodes_and_other_namespaces_are_not_policed() {
        let mut elsewhere = gateway("node1", "10.244.1.12", "app: gw");
        elsewhere.metadata.namespace = Some("shop".into());
        let pods = [gateway("node2", "10.244.2.10", "app: gw"), elsewhere];
        let p = of(&pods, &[policy(DENY)], &[]);
        assert_eq!(p.reason(ip("10.244.1.12"), "shop"), None);
        assert_eq!(p.policed_pods(), 0);
    }

    #[test]
    fn egress_only_policies_do_not_police() {
        let egress = policy(
            "metadata: {name: out, namespace: istio-system}\n\
             spec: {podSelector: {}, policyTypes: [Egress]}\n",
        );
        let both = policy(
            "metadata: {name: both, namespace: istio-system}\n\
             spec: {podSelector: {}, policyTypes: [Egress, Ingress]}\n",
        );
        let pods = [gateway("node1", "10.244.1.10", "app: gw")];
        assert_eq!(
            of(&pods, std::slice::from_ref(&egress), &[]).reason(ip("10.244.1.10"), "istio-system"),
            None
        );
        assert!(of(&pods, &[egress, both], &[])
            .reason(ip("10.244.1.10"), "istio-system")
            .is_some());
    }

    #[test]
    fn selectors_follow_the_api() {
        let labels: BTreeMap<String, String> =
            [("app".into(), "gw".into()), ("tier".into(), "edge".into())].into();
        let sel = |yaml: &str| -> LabelSelector { serde_yaml::from_str(yaml).expect("selector") };
        assert!(selects(None, &labels));
        assert!(selects(Some(&sel("{}")), &labels));
        assert!(selects(Some(&sel("{matchLabels: {app: gw}}")), &labels));
        assert!(!selects(Some(&sel("{matchLabels: {app: db}}")), &labels));
        let expr = |op: &str, values: &str| {
            sel(&format!(
                "{{matchExpressions: [{{key: tier, operator: {op}, values: [{values}]}}]}}"
            ))
        };
        assert!(selects(Some(&expr("In", "edge, core")), &labels));
        assert!(!selects(Some(&expr("In", "core")), &labels));
        assert!(selects(Some(&expr("NotIn", "core")), &labels));
        assert!(!selects(Some(&expr("NotIn", "edge")), &labels));
        assert!(selects(
            Some(&sel("{matchExpressions: [{key: tier, operator: Exists}]}")),
            &labels
        ));
        assert!(!selects(
            Some(&sel(
                "{matchExpressions: [{key: tier, operator: DoesNotExist}]}"
            )),
            &labels
        ));
        assert!(selects(
            Some(&sel(
                "{matchExpressions: [{key: zone, operator: NotIn, values: [a]}]}"
            )),
            &labels
        ));
        // Unknown operators: doubt polices.
        assert!(selects(
            Some(&sel(
                "{matchExpressions: [{key: tier, operator: Near, values: [x]}]}"
            )),
            &labels
        ));
    }

    #[test]
    fn an_unknown_local_endpoint_in_a_policed_namespace_is_policed() {
        let p = of(&[], &[policy(DENY)], &[]);
        let why = p
            .reason(ip("10.244.1.99"), "istio-system")
            .expect("policed");
        assert!(why.contains("no Pod known"), "{why}");
        assert!(why.contains("istio-system/deny-one"), "{why}");
        assert_eq!(p.reason(ip("10.244.1.99"), "shop"), None);
    }

    #[test]
    fn unreadable_policies_police_their_namespace_or_everything() {
        let pods = [gateway("node1", "10.244.1.11", "app: other")];
        let p = of(&pods, &[], &[Some("istio-system".into())]);
        let why = p
            .reason(ip("10.244.1.11"), "istio-system")
            .expect("policed");
        assert!(why.contains("cannot be read"), "{why}");
        assert_eq!(p.reason(ip("10.244.1.50"), "shop"), None);
        let p = of(&pods, &[], &[None]);
        assert!(p.reason(ip("10.244.1.50"), "shop").is_some());
        assert!(p.reason(ip("10.244.1.11"), "istio-system").is_some());
    }

    #[test]
    fn host_network_pods_are_not_policed() {
        let mut host = gateway("node1", "192.0.2.1", "app: gw");
        if let Some(spec) = host.spec.as_mut() {
            spec.host_network = Some(true);
        }
        let p = of(&[host], &[policy(DENY)], &[]);
        assert_eq!(p.policed_pods(), 0);
    }

    #[test]
    fn one_address_of_two_pods_is_policed_if_either_is() {
        let pods = [
            gateway("node1", "10.244.1.10", "app: other"),
            gateway("node1", "10.244.1.10", "app: gw"),
        ];
        assert!(of(&pods, &[policy(DENY)], &[])
            .reason(ip("10.244.1.10"), "istio-system")
            .is_some());
        let reversed = [pods[1].clone(), pods[0].clone()];
        assert!(of(&reversed, &[policy(DENY)], &[])
            .reason(ip("10.244.1.10"), "istio-system")
            .is_some());
    }

    #[test]
    fn many_policies_are_named_briefly() {
        let policies: Vec<NetworkPolicy> = (0..5)
            .map(|i| {
                policy(&format!(
                    "metadata: {{name: p{i}, namespace: istio-system}}\nspec: {{podSelector: {{}}}}\n"
                ))
            })
            .collect();
        let pods = [gateway("node1", "10.244.1.10", "app: gw")];
        let why = of(&pods, &policies, &[])
            .reason(ip("10.244.1.10"), "istio-system")
            .expect("policed");
        assert_eq!(
            why,
            "NetworkPolicy istio-system/p0, istio-system/p1, istio-system/p2 and 2 more"
        );
    }
}
