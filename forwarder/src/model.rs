//! The desired datapath state, independent of where it came from (manifests
//! or the Kubernetes API) and of how it is written into maps.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => forwarder_common::IPPROTO_TCP,
            Protocol::Udp => forwarder_common::IPPROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            forwarder_common::IPPROTO_TCP => Some(Protocol::Tcp),
            forwarder_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where clients connect: (address, port, protocol), host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DesiredBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint's `nodeName` is this node.
    pub local: bool,
    /// A local pod under ingress NetworkPolicy enforced in netfilter: its
    /// new flows are left to kube-proxy (see `policy`).
    pub policed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service port's name (may be empty for a single unnamed port).
    pub port_name: String,
    /// Sorted, without duplicates. May be empty only with `drop_if_empty`.
    pub backends: Vec<DesiredBackend>,
    /// externalTrafficPolicy: Local: keep the client address, never source-NAT.
    pub no_snat: bool,
    /// Drop (rather than pass to the kernel) when there is no backend.
    pub drop_if_empty: bool,
    /// sessionAffinity ClientIP: seconds a client stays on the backend of
    /// its last new connection; 0 without affinity.
    pub affinity_timeout_s: u32,
}

impl DesiredFrontend {
    /// The label used for counters: `namespace/name:port`.
    pub fn label(&self) -> String {
        if self.port_name.is_empty() {
            self.service.clone()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }
}

/// Everything the datapath should hold, keyed by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, DesiredFrontend>,
}

/// What the translation needs to know about this node.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub node_name: String,
    /// Addresses nodePorts are served on (already filtered by --nodeport-addresses).
    pub node_addresses: Vec<Ipv4Addr>,
    /// Which local pods NetworkPolicy guards.
    pub policing: crate::policy::Policing,
}
