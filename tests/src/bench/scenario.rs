//! The Services every variant is measured with, as manifests for the
//! forwarder and as kube-proxy's model for its rules: one measured Service
//! (`http` TCP 80 → nodePort 30000, `dns` UDP 5353 → nodePort 30001, one
//! endpoint: the pod on this node) and fillers (one TCP port, one endpoint
//! on another node each). Fillers get the nodePorts 30002..=32767 while they
//! last (2,767 NodePort Services in all: the whole default range); beyond
//! that they are ClusterIP-only. The measured Service sorts first
//! (`aaa-measured`) or last (`zzz-measured`) among the Service ports, which
//! is its position in kube-proxy's chains.

use std::{fmt::Write as _, net::Ipv4Addr};

use crate::kube_proxy::{Cidr, KpConfig, KpEndpoint, KpPort, KpService};

pub const NODE_NAME: &str = "node1";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const HTTP_NODE_PORT: u16 = 30000;
pub const UDP_NODE_PORT: u16 = 30001;
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 5353;
const FIRST_FILLER_NODE_PORT: u32 = 30002;
const LAST_NODE_PORT: u32 = 32767;

/// Where the measured Service sits in kube-proxy's chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    First,
    Last,
}

impl Position {
    pub fn name(self) -> &'static str {
        match self {
            Position::First => "first",
            Position::Last => "last",
        }
    }

    fn service_name(self) -> &'static str {
        match self {
            Position::First => "aaa-measured",
            Position::Last => "zzz-measured",
        }
    }
}

/// `services` Services in all (at least the measured one).
#[derive(Clone, Debug)]
pub struct Scenario {
    pub services: u64,
    pub position: Position,
    /// The measured Service's endpoint (changed by [`Scenario::with_endpoint`]).
    pub endpoint: Ipv4Addr,
}

struct Filler {
    name: String,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
    endpoint: Ipv4Addr,
}

impl Scenario {
    pub fn new(services: u64, position: Position) -> Scenario {
        Scenario {
            services: services.max(1),
            position,
            endpoint: POD_IP,
        }
    }

    pub fn with_endpoint(mut self, endpoint: Ipv4Addr) -> Scenario {
        self.endpoint = endpoint;
        self
    }

    fn fillers(&self) -> impl Iterator<Item = Filler> {
        (0..self.services - 1).map(|i| {
            let i32_ = u32::try_from(i).unwrap_or(u32::MAX - 1);
            let node_port = FIRST_FILLER_NODE_PORT
                .checked_add(i32_)
                .filter(|p| *p <= LAST_NODE_PORT)
                .map(|p| p as u16);
            Filler {
                name: format!("svc-{i:06}"),
                cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 0)) + i32_),
                node_port,
                endpoint: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 3, 0)) + i32_),
            }
        })
    }

    /// The Services and EndpointSlices as the API would list them (YAML).
    pub fn manifest(&self) -> String {
        let mut y = String::with_capacity(self.services as usize * 900);
        let name = self.position.service_name();
        let _ = write!(
            y,
            "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: bench
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - name: http
    protocol: TCP
    port: {HTTP_PORT}
    targetPort: {HTTP_PORT}
    nodePort: {HTTP_NODE_PORT}
  - name: dns
    protocol: UDP
    port: {UDP_PORT}
    targetPort: {UDP_PORT}
    nodePort: {UDP_NODE_PORT}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: bench
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: {HTTP_PORT}
- name: dns
  protocol: UDP
  port: {UDP_PORT}
endpoints:
- addresses: [\"{ep}\"]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: {NODE_NAME}
",
            ep = self.endpoint
        );
        for f in self.fillers() {
            let (kind, np) = match f.node_port {
                Some(p) => ("NodePort", format!("\n    nodePort: {p}")),
                None => ("ClusterIP", String::new()),
            };
            let _ = write!(
                y,
                "---
apiVersion: v1
kind: Service
metadata:
  name: {n}
  namespace: bench
spec:
  type: {kind}
  clusterIP: {ip}
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: 8080{np}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {n}-abcde
  namespace: bench
  labels:
    kubernetes.io/service-name: {n}
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
endpoints:
- addresses: [\"{ep}\"]
  conditions: {{ready: true, serving: true, terminating: false}}
  nodeName: node2
",
                n = f.name,
                ip = f.cluster_ip,
                ep = f.endpoint,
            );
        }
        y
    }

    /// The same Services as kube-proxy sees them.
    pub fn kube_proxy_services(&self) -> Vec<KpService> {
        let mut out = Vec::with_capacity(self.services as usize);
        out.push(
            KpService::new(
                "bench",
                self.position.service_name(),
                Ipv4Addr::new(10, 96, 0, 10),
            )
            .port(KpPort::tcp("http", HTTP_PORT).with_node_port(HTTP_NODE_PORT))
            .port(KpPort::udp("dns", UDP_PORT).with_node_port(UDP_NODE_PORT))
            .endpoint(
                KpEndpoint::new(self.endpoint)
                    .tcp("http", HTTP_PORT)
                    .udp("dns", UDP_PORT)
                    .on_node(NODE_NAME),
            ),
        );
        for f in self.fillers() {
            let mut port = KpPort::tcp("http", 80);
            if let Some(p) = f.node_port {
                port = port.with_node_port(p);
            }
            out.push(
                KpService::new("bench", &f.name, f.cluster_ip)
                    .port(port)
                    .endpoint(
                        KpEndpoint::new(f.endpoint)
                            .tcp("http", 8080)
                            .on_node("node2"),
                    ),
            );
        }
        out
    }

    /// kube-proxy's `iptables-restore` input for these Services on node1.
    pub fn kube_proxy_rules(&self) -> String {
        crate::kube_proxy::restore_input(&kube_proxy_config(), &self.kube_proxy_services())
    }
}

/// A default kube-proxy on node1 with `--cluster-cidr 10.244.0.0/16`.
pub fn kube_proxy_config() -> KpConfig {
    KpConfig::new(NODE_NAME, Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn manifest_and_rules_agree_on_the_scale() {
        let s = Scenario::new(3000, Position::Last);
        let set = forwarder::manifest::parse_str(Path::new("bench.yaml"), &s.manifest());
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        assert_eq!(set.services.len(), 3000);
        assert_eq!(set.endpoint_slices.len(), 3000);
        let node = forwarder::model::NodeContext {
            node_name: NODE_NAME.into(),
            node_addresses: vec![NODE_IP],
            ..Default::default()
        };
        let t = forwarder::translate::translate(&set.services, &set.endpoint_slices, &node);
        // 2 ports of the measured Service + 2,766 filler nodePorts.
        assert_eq!(t.desired.frontends.len(), 2 + 2766);
        let kp = s.kube_proxy_services();
        assert_eq!(kp.len(), 3000);
        assert_eq!(
            kp.iter().filter(|s| s.ports[0].node_port.is_some()).count(),
            2767
        );
        let rules = s.kube_proxy_rules();
        assert!(rules.contains("--dport 30001"));
    }
}
