//! A faithful generator of the rules kube-proxy writes in iptables mode
//! (Kubernetes ~1.28–1.33, `pkg/proxy/iptables/proxier.go`), so that tests and
//! benchmarks run against what a real node has and not a caricature, plus the
//! helpers to load those rules into a network namespace and read their packet
//! counters.
//!
//! # What is generated
//!
//! [`restore_input`] returns exactly the text kube-proxy's `syncProxyRules`
//! hands to `iptables-restore --noflush --counters`: the `*filter` table
//! first, then `*nat`, each with its chain declarations (`:CHAIN - [0:0]`,
//! which under `--noflush` create-or-flush that chain) followed by its rules,
//! and `COMMIT`. The rules are in kube-proxy's own argument order
//! (`-m comment --comment "…" -m tcp -p tcp -d 10.96.0.10 --dport 53 …`);
//! `iptables-save` prints the same rules normalised
//! (`-d 10.96.0.10/32 -p tcp -m comment --comment "…" -m tcp --dport 53 …`).
//!
//! kube-proxy does not put the jumps from the built-in chains (PREROUTING,
//! OUTPUT, POSTROUTING, INPUT, FORWARD) in that input: it first ensures each
//! of them with `iptables -C` / `iptables -I` (prepend), so that it never
//! owns the built-in chains. [`jump_rules`] lists them in kube-proxy's order
//! and [`install`] replays that sequence, then the restore.
//!
//! # Ordering
//!
//! kube-proxy walks its service map, a Go map, so the order of services in its
//! output changes from one sync to the next; kube-proxy's own tests compare
//! outputs only after a canonical sort. This generator fixes one order: service
//! ports sorted by their name (`ns/name:port`) and then protocol. Within a
//! service port every line is in the order kube-proxy writes it, and
//! endpoints are deduplicated by `ip:port` and sorted as strings, as
//! kube-proxy's endpoint-slice cache does.
//!
//! # Configuration mirrors the real daemon
//!
//! [`KpConfig::default`] is what a default kube-proxy writes on an IPv4 node:
//! masquerade bit 14 rendered as Go's `%#08x` (`0x00004000`, which
//! `iptables-save` prints as `0x4000`), `MASQUERADE --random-fully`
//! (iptables ≥ 1.6.2), localhost NodePorts enabled (hence the `KUBE-FIREWALL`
//! rule), and no `nfacct` matches (kube-proxy adds those only when it could
//! create the nfacct counters, which needs `nfnetlink_acct`).
//! [`KpConfig::fake_proxier`] reproduces the settings of the fake proxier in
//! kube-proxy's `proxier_test.go`, for comparisons with its expectations.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Chains kube-proxy owns.
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// Shared with kubelet, which creates an identical chain.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// Above this many endpoints in total kube-proxy enters "large cluster mode"
/// and drops the per-endpoint `-m comment` matches to shrink its output.
pub const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// nfacct counter names kube-proxy uses (when nfacct is available).
pub const NFACCT_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
pub const NFACCT_LOCALHOST_NODEPORT: &str = "localhost_nps_accepted_pkts";

// ---------------------------------------------------------------------------
// Input model
// ---------------------------------------------------------------------------

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Lower-case name, as kube-proxy uses it in hashes and matches.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An IPv4 CIDR, printed like Go's `net.IPNet.String()` (address masked to
/// the prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// A CIDR from its parts; `None` if the prefix is longer than 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32).then_some(Cidr { addr, prefix })
    }

    fn mask(self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }

    /// The network address (host bits cleared).
    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;

    /// Parses `a.b.c.d/n`; surrounding whitespace is ignored, as kube-proxy
    /// trims `loadBalancerSourceRanges`.
    fn from_str(s: &str) -> Result<Cidr> {
        let s = s.trim();
        let (addr, prefix) = s
            .split_once('/')
            .with_context(|| format!("CIDR {s:?} has no '/'"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("bad address in CIDR {s:?}"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("bad prefix in CIDR {s:?}"))?;
        Cidr::new(addr, prefix).with_context(|| format!("prefix too long in CIDR {s:?}"))
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpPort {
    /// The port's name; may be empty for a single-port service (then the
    /// service port name is just `ns/name`).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Allocated NodePort (type NodePort or LoadBalancer).
    pub node_port: Option<u16>,
}

impl KpPort {
    pub fn new(name: &str, protocol: Protocol, port: u16) -> KpPort {
        KpPort {
            name: name.to_string(),
            protocol,
            port,
            node_port: None,
        }
    }

    pub fn tcp(name: &str, port: u16) -> KpPort {
        KpPort::new(name, Protocol::Tcp, port)
    }

    pub fn udp(name: &str, port: u16) -> KpPort {
        KpPort::new(name, Protocol::Udp, port)
    }

    pub fn with_node_port(mut self, node_port: u16) -> KpPort {
        self.node_port = Some(node_port);
        self
    }
}

/// A port of an endpoint (an EndpointSlice port): matched to the service port
/// with the same name and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpEndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint (pod) of a Service, with its EndpointSlice conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpEndpoint {
    pub ip: Ipv4Addr,
    pub ports: Vec<KpEndpointPort>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// The node the endpoint runs on; it is "local" when this equals
    /// [`KpConfig::node_name`].
    pub node_name: Option<String>,
}

impl KpEndpoint {
    /// A ready, serving, non-terminating endpoint on no particular node.
    pub fn new(ip: Ipv4Addr) -> KpEndpoint {
        KpEndpoint {
            ip,
            ports: Vec::new(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
        }
    }

    pub fn port(mut self, name: &str, protocol: Protocol, port: u16) -> KpEndpoint {
        self.ports.push(KpEndpointPort {
            name: name.to_string(),
            protocol,
            port,
        });
        self
    }

    pub fn tcp(self, name: &str, port: u16) -> KpEndpoint {
        self.port(name, Protocol::Tcp, port)
    }

    pub fn udp(self, name: &str, port: u16) -> KpEndpoint {
        self.port(name, Protocol::Udp, port)
    }

    pub fn on_node(mut self, node: &str) -> KpEndpoint {
        self.node_name = Some(node.to_string());
        self
    }

    /// Sets the EndpointSlice conditions.
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> KpEndpoint {
        self.ready = ready;
        self.serving = serving;
        self.terminating = terminating;
        self
    }
}

/// A Service as kube-proxy sees it after its own normalisation (IPv4 only).
///
/// `external_traffic_policy_local` and `health_check_node_port` only make
/// sense for NodePort/LoadBalancer services (kube-proxy ignores them
/// otherwise); the health-check port is kube-proxy's for `type:
/// LoadBalancer` with `externalTrafficPolicy: Local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpService {
    pub namespace: String,
    pub name: String,
    /// `None` for a headless service, which kube-proxy skips.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<KpPort>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (VIP mode).
    pub lb_ingress: Vec<Ipv4Addr>,
    pub lb_source_ranges: Vec<Cidr>,
    pub external_traffic_policy_local: bool,
    pub internal_traffic_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// `Some(timeout_seconds)` for `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    pub endpoints: Vec<KpEndpoint>,
}

impl KpService {
    pub fn new(namespace: &str, name: &str, cluster_ip: Ipv4Addr) -> KpService {
        KpService {
            namespace: namespace.to_string(),
            name: name.to_string(),
            cluster_ip: Some(cluster_ip),
            ports: Vec::new(),
            external_ips: Vec::new(),
            lb_ingress: Vec::new(),
            lb_source_ranges: Vec::new(),
            external_traffic_policy_local: false,
            internal_traffic_policy_local: false,
            health_check_node_port: None,
            session_affinity_timeout: None,
            endpoints: Vec::new(),
        }
    }

    pub fn port(mut self, port: KpPort) -> KpService {
        self.ports.push(port);
        self
    }

    pub fn endpoint(mut self, endpoint: KpEndpoint) -> KpService {
        self.endpoints.push(endpoint);
        self
    }

    pub fn lb_ingress(mut self, ip: Ipv4Addr) -> KpService {
        self.lb_ingress.push(ip);
        self
    }

    pub fn external_ip(mut self, ip: Ipv4Addr) -> KpService {
        self.external_ips.push(ip);
        self
    }
}

/// kube-proxy's settings that change what it writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KpConfig {
    /// `--hostname-override`: endpoints with this node name are local.
    pub node_name: String,
    /// The node's primary IP (used for loadBalancerSourceRanges).
    pub node_ip: Option<Ipv4Addr>,
    /// `--cluster-cidr` (local-traffic detection by CIDR); `None` means
    /// kube-proxy cannot tell pod traffic apart and writes no such rules.
    pub cluster_cidr: Option<Cidr>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// The masquerade mark as kube-proxy formats it.
    pub masquerade_mark: String,
    /// Whether iptables supports `MASQUERADE --random-fully`.
    pub random_fully: bool,
    /// `--iptables-localhost-nodeports` (default true).
    pub localhost_node_ports: bool,
    /// The node IPs `--nodeport-addresses` resolves to; empty means all local
    /// addresses (`-m addrtype --dst-type LOCAL`).
    pub node_port_addresses: Vec<Ipv4Addr>,
    /// Whether kube-proxy managed to create its nfacct counters.
    pub nfacct: bool,
    /// Whether `net.netfilter.nf_conntrack_tcp_be_liberal` is set (then no
    /// INVALID drop rule).
    pub conntrack_tcp_liberal: bool,
}

impl Default for KpConfig {
    fn default() -> KpConfig {
        KpConfig {
            node_name: String::new(),
            node_ip: None,
            cluster_cidr: None,
            masquerade_all: false,
            masquerade_mark: masquerade_mark(14),
            random_fully: true,
            localhost_node_ports: true,
            node_port_addresses: Vec::new(),
            nfacct: false,
            conntrack_tcp_liberal: false,
        }
    }
}

impl KpConfig {
    /// A default kube-proxy on node `node_name` with `--cluster-cidr`.
    pub fn new(node_name: &str, cluster_cidr: Option<Cidr>) -> KpConfig {
        KpConfig {
            node_name: node_name.to_string(),
            cluster_cidr,
            ..KpConfig::default()
        }
    }

    /// The settings of `NewFakeProxier` in kube-proxy's `proxier_test.go`:
    /// node "test-node" at 192.168.0.2, cluster CIDR 10.0.0.0/8, mark
    /// `0x4000`, a fake iptables without `--random-fully`, nfacct counters
    /// present.
    pub fn fake_proxier() -> KpConfig {
        KpConfig {
            node_name: "test-node".to_string(),
            node_ip: Some(Ipv4Addr::new(192, 168, 0, 2)),
            cluster_cidr: Cidr::new(Ipv4Addr::new(10, 0, 0, 0), 8),
            masquerade_all: false,
            masquerade_mark: "0x4000".to_string(),
            random_fully: false,
            localhost_node_ports: true,
            node_port_addresses: Vec::new(),
            nfacct: true,
            conntrack_tcp_liberal: false,
        }
    }

    /// Localhost NodePorts are only in effect when the NodePort addresses
    /// include loopback (kube-proxy turns the flag off otherwise).
    fn effective_localhost_node_ports(&self) -> bool {
        self.localhost_node_ports
            && (self.node_port_addresses.is_empty()
                || self.node_port_addresses.iter().any(|ip| ip.is_loopback()))
    }
}

/// The mark kube-proxy uses for `--iptables-masquerade-bit`, formatted as Go's
/// `fmt.Sprintf("%#08x", 1<<bit)` does: eight zero-padded digits after `0x`.
/// Bits above 31 are clamped to 31 (kube-proxy validates 0..=31).
pub fn masquerade_mark(bit: u8) -> String {
    format!("0x{:08x}", 1u32 << bit.min(31))
}

// ---------------------------------------------------------------------------
// Chain names
// ---------------------------------------------------------------------------

const BASE32_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
pub fn base32_std(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut block = [0u8; 5];
        block[..chunk.len()].copy_from_slice(chunk);
        let bits = block
            .iter()
            .fold(0u64, |acc, &byte| (acc << 8) | u64::from(byte));
        let emitted = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < emitted {
                let index = ((bits >> (35 - 5 * i)) & 0x1f) as usize;
                out.push(char::from(BASE32_ALPHABET[index]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// First 16 characters of base32(sha256(input)): 80 bits, i.e. the first ten
/// bytes of the digest.
fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    base32_std(&digest[..10])
}

/// kube-proxy's `portProtoHash(servicePortName, protocol)`.
pub fn port_proto_hash(service_port_name: &str, protocol: Protocol) -> String {
    hash16(&format!("{service_port_name}{protocol}"))
}

/// `ServicePortName.String()`: `ns/name` plus `:port` when the port is named.
pub fn service_port_name(namespace: &str, name: &str, port_name: &str) -> String {
    if port_name.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port_name}")
    }
}

/// `KUBE-SVC-…`: the Cluster-policy chain of a service port.
pub fn service_chain(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-SVL-…`: the Local-policy chain of a service port.
pub fn local_chain(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-SVL-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-EXT-…`: the external-destinations chain of a service port.
pub fn external_chain(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-EXT-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-FW-…`: the loadBalancerSourceRanges chain of a service port.
pub fn firewall_chain(service_port_name: &str, protocol: Protocol) -> String {
    format!("KUBE-FW-{}", port_proto_hash(service_port_name, protocol))
}

/// `KUBE-SEP-…`: the chain of one endpoint (`ip:port`) of a service port.
pub fn endpoint_chain(service_port_name: &str, protocol: Protocol, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{service_port_name}{protocol}{endpoint}"))
    )
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// An endpoint of one service port, after kube-proxy's slice-cache processing.
struct Ep {
    /// `ip:port`.
    addr: String,
    ip: Ipv4Addr,
    chain: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// One service port with everything derived from it.
struct SvcPort<'a> {
    svc: &'a KpService,
    cluster_ip: Ipv4Addr,
    port: &'a KpPort,
    name: String,
    endpoints: Vec<Ep>,
}

/// Builds kube-proxy's view: service ports keyed by (name, protocol), sorted,
/// each with its deduplicated, sorted endpoints.
fn service_ports<'a>(cfg: &KpConfig, services: &'a [KpService]) -> Vec<SvcPort<'a>> {
    let mut map: BTreeMap<(String, Protocol), SvcPort<'a>> = BTreeMap::new();
    for svc in services {
        let Some(cluster_ip) = svc.cluster_ip else {
            continue;
        };
        for port in &svc.ports {
            let name = service_port_name(&svc.namespace, &svc.name, &port.name);
            // EndpointSliceCache: one endpoint per "ip:port"; a later duplicate
            // replaces an earlier one unless it is terminating.
            let mut by_addr: BTreeMap<String, Ep> = BTreeMap::new();
            for ep in &svc.endpoints {
                for ep_port in &ep.ports {
                    if ep_port.name != port.name
                        || ep_port.protocol != port.protocol
                        || ep_port.port == 0
                    {
                        continue;
                    }
                    let addr = format!("{}:{}", ep.ip, ep_port.port);
                    if by_addr.contains_key(&addr) && ep.terminating {
                        continue;
                    }
                    let local = !cfg.node_name.is_empty()
                        && ep.node_name.as_deref() == Some(cfg.node_name.as_str());
                    let chain = endpoint_chain(&name, port.protocol, &addr);
                    by_addr.insert(
                        addr.clone(),
                        Ep {
                            addr,
                            ip: ep.ip,
                            chain,
                            ready: ep.ready,
                            serving: ep.serving,
                            terminating: ep.terminating,
                            local,
                        },
                    );
                }
            }
            let endpoints = by_addr.into_values().collect();
            map.insert(
                (name.clone(), port.protocol),
                SvcPort {
                    svc,
                    cluster_ip,
                    port,
                    name,
                    endpoints,
                },
            );
        }
    }
    map.into_values().collect()
}

/// Indices (into a service port's endpoints) of the Cluster-policy
/// endpoints, the Local-policy endpoints and all endpoints reachable from
/// this node, and whether the service has usable endpoints anywhere.
struct Categorized {
    cluster: Vec<usize>,
    local: Vec<usize>,
    reachable: Vec<usize>,
    has_any: bool,
}

/// kube-proxy's `CategorizeEndpoints` without topology hints: ready
/// endpoints, else serving-and-terminating ones, chosen separately for the
/// Cluster and the Local policy.
fn categorize(eps: &[Ep], uses_cluster: bool, uses_local: bool) -> Categorized {
    let pick = |pred: &dyn Fn(&Ep) -> bool| -> Vec<usize> {
        eps.iter()
            .enumerate()
            .filter(|(_, e)| pred(e))
            .map(|(i, _)| i)
            .collect()
    };
    let mut cluster = Vec::new();
    let mut has_any = false;
    if uses_cluster {
        cluster = pick(&|e| e.ready);
        if cluster.is_empty() {
            cluster = pick(&|e| e.serving && e.terminating);
        }
        has_any = !cluster.is_empty();
    }
    if !uses_local {
        return Categorized {
            reachable: cluster.clone(),
            cluster,
            local: Vec::new(),
            has_any,
        };
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for e in eps {
        if e.ready {
            has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            has_any = true;
            local_serving_terminating |= e.local;
        }
    }
    let mut use_serving_terminating = false;
    let local = if local_ready {
        pick(&|e| e.local && e.ready)
    } else if local_serving_terminating {
        use_serving_terminating = true;
        pick(&|e| e.local && e.serving && e.terminating)
    } else {
        Vec::new()
    };
    let reachable = if !uses_cluster {
        local.clone()
    } else if !use_serving_terminating {
        cluster.clone()
    } else {
        // kube-proxy merges through a Go map (random order); sorted here.
        let mut all: Vec<usize> = cluster.iter().chain(local.iter()).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    };
    Categorized {
        cluster,
        local,
        reachable,
        has_any,
    }
}

/// The four line buffers of one sync.
#[derive(Default)]
struct Buffers {
    filter_chains: String,
    filter_rules: String,
    nat_chains: String,
    nat_rules: String,
}

fn chain_line(buf: &mut String, chain: &str) {
    let _ = writeln!(buf, ":{chain} - [0:0]");
}

/// `1/n` with ten decimals, as kube-proxy's `computeProbability`.
fn probability(cache: &mut Vec<String>, n: usize) -> &str {
    while cache.len() <= n {
        let k = cache.len();
        cache.push(if k == 0 {
            String::new()
        } else {
            format!("{:.10}", 1.0 / k as f64)
        });
    }
    &cache[n]
}

/// The complete `iptables-restore` input kube-proxy writes for `services`:
/// `*filter` then `*nat`, each ending in `COMMIT`. See the module docs.
pub fn restore_input(cfg: &KpConfig, services: &[KpService]) -> String {
    let ports = service_ports(cfg, services);
    let mark = cfg.masquerade_mark.as_str();
    let localhost_node_ports = cfg.effective_localhost_node_ports();

    let total_endpoints: usize = ports.iter().map(|p| p.endpoints.len()).sum();
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    // Roughly 10 nat lines of ~130 bytes per service port plus 3 per endpoint.
    let mut b = Buffers {
        nat_rules: String::with_capacity(ports.len() * 1400 + total_endpoints * 400),
        nat_chains: String::with_capacity(ports.len() * 80 + total_endpoints * 30),
        ..Buffers::default()
    };
    let mut probabilities = Vec::new();

    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
    ] {
        chain_line(&mut b.filter_chains, chain);
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ] {
        chain_line(&mut b.nat_chains, chain);
    }

    let _ = writeln!(
        b.nat_rules,
        "-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(
        b.nat_rules,
        "-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}"
    );
    let _ = writeln!(
        b.nat_rules,
        "-A {KUBE_POSTROUTING} -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{}",
        if cfg.random_fully { " --random-fully" } else { "" }
    );
    let _ = writeln!(b.nat_rules, "-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}");

    if localhost_node_ports {
        chain_line(&mut b.filter_chains, KUBE_FIREWALL);
        let _ = writeln!(
            b.filter_rules,
            "-A {KUBE_FIREWALL} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }

    for sp in &ports {
        write_service_port(
            cfg,
            sp,
            large_cluster,
            localhost_node_ports,
            &mut b,
            &mut probabilities,
        );
    }

    // The tail call to KUBE-NODEPORTS, after every service rule.
    let nodeports_comment =
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    if cfg.node_port_addresses.is_empty() {
        let _ = writeln!(
            b.nat_rules,
            "-A {KUBE_SERVICES} -m comment --comment {nodeports_comment} -m addrtype --dst-type LOCAL{} -j {KUBE_NODEPORTS}",
            if localhost_node_ports { "" } else { " ! -d 127.0.0.0/8" }
        );
    } else {
        for ip in &cfg.node_port_addresses {
            if ip.is_loopback() && !localhost_node_ports {
                continue;
            }
            let _ = writeln!(
                b.nat_rules,
                "-A {KUBE_SERVICES} -m comment --comment {nodeports_comment} -d {ip} -j {KUBE_NODEPORTS}"
            );
        }
    }

    if !cfg.conntrack_tcp_liberal {
        let _ = writeln!(
            b.filter_rules,
            "-A {KUBE_FORWARD} -m conntrack --ctstate INVALID{} -j DROP",
            if cfg.nfacct {
                format!(" -m nfacct --nfacct-name {NFACCT_INVALID_DROPPED}")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        b.filter_rules,
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    let _ = writeln!(
        b.filter_rules,
        "-A {KUBE_FORWARD} -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    let mut out = String::with_capacity(
        b.filter_chains.len() + b.filter_rules.len() + b.nat_chains.len() + b.nat_rules.len() + 32,
    );
    out.push_str("*filter\n");
    out.push_str(&b.filter_chains);
    out.push_str(&b.filter_rules);
    out.push_str("COMMIT\n*nat\n");
    out.push_str(&b.nat_chains);
    out.push_str(&b.nat_rules);
    out.push_str("COMMIT\n");
    out
}

/// The rules of one service port, in the order `syncProxyRules` writes them.
fn write_service_port(
    cfg: &KpConfig,
    sp: &SvcPort<'_>,
    large_cluster: bool,
    localhost_node_ports: bool,
    b: &mut Buffers,
    probabilities: &mut Vec<String>,
) {
    let svc = sp.svc;
    let proto = sp.port.protocol;
    let name = sp.name.as_str();
    let port = sp.port.port;
    let cluster_ip = sp.cluster_ip;
    let node_port = sp.port.node_port.filter(|&p| p != 0);

    let externally_accessible =
        node_port.is_some() || !svc.lb_ingress.is_empty() || !svc.external_ips.is_empty();
    let external_policy_local = externally_accessible && svc.external_traffic_policy_local;
    let internal_policy_local = svc.internal_traffic_policy_local;
    let uses_cluster_endpoints = !internal_policy_local || externally_accessible;
    let uses_local_endpoints = internal_policy_local || external_policy_local;

    let cat = categorize(&sp.endpoints, uses_cluster_endpoints, uses_local_endpoints);
    let svc_chain = service_chain(name, proto);
    let svl_chain = local_chain(name, proto);
    let ext_chain = external_chain(name, proto);
    let fw_chain = firewall_chain(name, proto);

    let uses_cluster_chain = !cat.cluster.is_empty() && uses_cluster_endpoints;
    let uses_local_chain = !cat.local.is_empty() && uses_local_endpoints;
    let has_endpoints = cat.has_any;

    let (internal_chain, has_internal) = if internal_policy_local {
        (svl_chain.as_str(), has_endpoints && !cat.local.is_empty())
    } else {
        (svc_chain.as_str(), has_endpoints)
    };
    let (external_policy_chain, has_external) = if external_policy_local {
        (svl_chain.as_str(), has_endpoints && !cat.local.is_empty())
    } else {
        (svc_chain.as_str(), has_endpoints)
    };
    let uses_ext_chain = has_endpoints && externally_accessible;
    let uses_fw_chain =
        has_endpoints && !svc.lb_ingress.is_empty() && !svc.lb_source_ranges.is_empty();
    let lb_chain = if uses_fw_chain {
        fw_chain.as_str()
    } else {
        ext_chain.as_str()
    };

    let (internal_filter, external_filter) = if !has_endpoints {
        let comment = format!("\"{name} has no endpoints\"");
        (Some(("REJECT", comment.clone())), Some(("REJECT", comment)))
    } else {
        let comment = format!("\"{name} has no local endpoints\"");
        (
            (!has_internal).then(|| ("DROP", comment.clone())),
            (!has_external).then_some(("DROP", comment)),
        )
    };

    // Cluster IP.
    if has_internal {
        let _ = writeln!(
            b.nat_rules,
            "-A {KUBE_SERVICES} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j {internal_chain}"
        );
    } else if let Some((target, comment)) = &internal_filter {
        let _ = writeln!(
            b.filter_rules,
            "-A {KUBE_SERVICES} -m comment --comment {comment} -m {proto} -p {proto} -d {cluster_ip} --dport {port} -j {target}"
        );
    }

    // External IPs.
    for ip in &svc.external_ips {
        if has_endpoints {
            let _ = writeln!(
                b.nat_rules,
                "-A {KUBE_SERVICES} -m comment --comment \"{name} external IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {ext_chain}"
            );
        }
        if let Some((target, comment)) = &external_filter {
            let _ = writeln!(
                b.filter_rules,
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {target}"
            );
        }
    }

    // Load-balancer ingress.
    for ip in &svc.lb_ingress {
        if has_endpoints {
            let _ = writeln!(
                b.nat_rules,
                "-A {KUBE_SERVICES} -m comment --comment \"{name} loadbalancer IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {lb_chain}"
            );
        }
        if uses_fw_chain {
            let _ = writeln!(
                b.filter_rules,
                "-A {KUBE_PROXY_FIREWALL} -m comment --comment \"{name} traffic not accepted by {fw_chain}\" -m {proto} -p {proto} -d {ip} --dport {port} -j DROP"
            );
        }
    }
    if let Some((target, comment)) = &external_filter {
        for ip in &svc.lb_ingress {
            let _ = writeln!(
                b.filter_rules,
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {comment} -m {proto} -p {proto} -d {ip} --dport {port} -j {target}"
            );
        }
    }

    // NodePort.
    if let Some(node_port) = node_port {
        if has_endpoints {
            if localhost_node_ports && cfg.nfacct {
                let _ = writeln!(
                    b.nat_rules,
                    "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {NFACCT_LOCALHOST_NODEPORT} -j {ext_chain}"
                );
            }
            let _ = writeln!(
                b.nat_rules,
                "-A {KUBE_NODEPORTS} -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} -j {ext_chain}"
            );
        }
        if let Some((target, comment)) = &external_filter {
            let _ = writeln!(
                b.filter_rules,
                "-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {comment} -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j {target}"
            );
        }
    }

    // Health-check NodePort (LoadBalancer + externalTrafficPolicy Local).
    if let Some(hc) = svc.health_check_node_port.filter(|&p| p != 0) {
        if external_policy_local {
            let _ = writeln!(
                b.filter_rules,
                "-A {KUBE_NODEPORTS} -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"
            );
        }
    }

    // Internal traffic: masquerade off-cluster sources.
    if has_internal {
        let matches = format!(
            "-m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {cluster_ip} --dport {port}"
        );
        if cfg.masquerade_all {
            let _ = writeln!(
                b.nat_rules,
                "-A {internal_chain} {matches} -j {KUBE_MARK_MASQ}"
            );
        } else if let Some(cidr) = cfg.cluster_cidr {
            let _ = writeln!(
                b.nat_rules,
                "-A {internal_chain} {matches} ! -s {cidr} -j {KUBE_MARK_MASQ}"
            );
        }
    }

    // External traffic.
    if uses_ext_chain {
        chain_line(&mut b.nat_chains, &ext_chain);
        if !external_policy_local {
            let _ = writeln!(
                b.nat_rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
            );
        } else {
            if let Some(cidr) = cfg.cluster_cidr {
                let _ = writeln!(
                    b.nat_rules,
                    "-A {ext_chain} -m comment --comment \"pod traffic for {name} external destinations\" -s {cidr} -j {svc_chain}"
                );
            }
            let _ = writeln!(
                b.nat_rules,
                "-A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            );
            let _ = writeln!(
                b.nat_rules,
                "-A {ext_chain} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}"
            );
        }
        if has_external {
            let _ = writeln!(b.nat_rules, "-A {ext_chain} -j {external_policy_chain}");
        }
    }

    // loadBalancerSourceRanges.
    if uses_fw_chain {
        chain_line(&mut b.nat_chains, &fw_chain);
        let prefix = format!("-A {fw_chain} -m comment --comment \"{name} loadbalancer IP\"");
        let mut allow_from_node = false;
        for cidr in &svc.lb_source_ranges {
            let _ = writeln!(b.nat_rules, "{prefix} -s {cidr} -j {ext_chain}");
            if cfg.node_ip.is_some_and(|ip| cidr.contains(ip)) {
                allow_from_node = true;
            }
        }
        if allow_from_node {
            for ip in &svc.lb_ingress {
                let _ = writeln!(b.nat_rules, "{prefix} -s {ip} -j {ext_chain}");
            }
        }
        let _ = writeln!(
            b.nat_rules,
            "-A {fw_chain} -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
        );
    }

    let eps = &sp.endpoints;
    if uses_cluster_chain {
        chain_line(&mut b.nat_chains, &svc_chain);
        write_endpoint_jumps(
            &mut b.nat_rules,
            svc,
            name,
            &svc_chain,
            eps,
            &cat.cluster,
            large_cluster,
            probabilities,
        );
    }
    if uses_local_chain {
        chain_line(&mut b.nat_chains, &svl_chain);
        write_endpoint_jumps(
            &mut b.nat_rules,
            svc,
            name,
            &svl_chain,
            eps,
            &cat.local,
            large_cluster,
            probabilities,
        );
    }

    // Per-endpoint chains.
    for &i in &cat.reachable {
        let ep = &eps[i];
        chain_line(&mut b.nat_chains, &ep.chain);
        let comment = if large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        let _ = writeln!(
            b.nat_rules,
            "-A {}{comment} -s {} -j {KUBE_MARK_MASQ}",
            ep.chain, ep.ip
        );
        let affinity = if svc.session_affinity_timeout.is_some() {
            format!(" -m recent --name {} --set", ep.chain)
        } else {
            String::new()
        };
        let _ = writeln!(
            b.nat_rules,
            "-A {}{comment}{affinity} -m {proto} -p {proto} -j DNAT --to-destination {}",
            ep.chain, ep.addr
        );
    }
}

/// `writeServiceToEndpointRules`: session-affinity checks, then the
/// probabilistic jumps to each endpoint chain.
#[allow(clippy::too_many_arguments)]
fn write_endpoint_jumps(
    out: &mut String,
    svc: &KpService,
    name: &str,
    chain: &str,
    eps: &[Ep],
    selected: &[usize],
    large_cluster: bool,
    probabilities: &mut Vec<String>,
) {
    let comment = |ep: &Ep| {
        if large_cluster {
            String::new()
        } else {
            format!(" -m comment --comment \"{name} -> {}\"", ep.addr)
        }
    };
    if let Some(timeout) = svc.session_affinity_timeout {
        for &i in selected {
            let ep = &eps[i];
            let _ = writeln!(
                out,
                "-A {chain}{} -m recent --name {} --rcheck --seconds {timeout} --reap -j {}",
                comment(ep),
                ep.chain,
                ep.chain
            );
        }
    }
    let n = selected.len();
    for (k, &i) in selected.iter().enumerate() {
        let ep = &eps[i];
        if k + 1 < n {
            let _ = writeln!(
                out,
                "-A {chain}{} -m statistic --mode random --probability {} -j {}",
                comment(ep),
                probability(probabilities, n - k),
                ep.chain
            );
        } else {
            let _ = writeln!(out, "-A {chain}{} -j {}", comment(ep), ep.chain);
        }
    }
}

// ---------------------------------------------------------------------------
// Jump rules from the built-in chains
// ---------------------------------------------------------------------------

/// A rule kube-proxy ensures (with `iptables -C`, then `-I`, i.e. prepended)
/// in a built-in chain before each full sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: &'static str,
    /// The built-in chain holding the rule.
    pub chain: &'static str,
    /// kube-proxy's chain the rule jumps to.
    pub target: &'static str,
    /// The rule's arguments after the chain name, as separate words.
    pub args: Vec<String>,
}

impl JumpRule {
    fn new(
        table: &'static str,
        target: &'static str,
        chain: &'static str,
        comment: &str,
        ct_new: bool,
    ) -> JumpRule {
        let mut args: Vec<String> = Vec::new();
        if ct_new {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
        }
        if !comment.is_empty() {
            args.extend(["-m", "comment", "--comment", comment].map(String::from));
        }
        args.extend(["-j", target].map(String::from));
        JumpRule {
            table,
            chain,
            target,
            args,
        }
    }

    /// The rule as an `iptables-save`-style line (`-A CHAIN …`), comments
    /// quoted.
    pub fn to_line(&self) -> String {
        let mut line = format!("-A {}", self.chain);
        let mut after_comment_flag = false;
        for arg in &self.args {
            if after_comment_flag {
                let _ = write!(line, " \"{arg}\"");
            } else {
                let _ = write!(line, " {arg}");
            }
            after_comment_flag = arg == "--comment";
        }
        line
    }
}

/// kube-proxy's `iptablesJumpChains` followed by the kubelet duplicates it
/// also ensures, in the order it processes them. Each is prepended, so the
/// last one of a built-in chain ends up first in it.
pub fn jump_rules() -> Vec<JumpRule> {
    const FILTER: &str = "filter";
    const NAT: &str = "nat";
    let external = "kubernetes externally-visible service portals";
    let portals = "kubernetes service portals";
    let firewall = "kubernetes load balancer firewall";
    vec![
        JumpRule::new(FILTER, KUBE_EXTERNAL_SERVICES, "INPUT", external, true),
        JumpRule::new(FILTER, KUBE_EXTERNAL_SERVICES, "FORWARD", external, true),
        JumpRule::new(
            FILTER,
            KUBE_NODEPORTS,
            "INPUT",
            "kubernetes health check service ports",
            false,
        ),
        JumpRule::new(FILTER, KUBE_SERVICES, "FORWARD", portals, true),
        JumpRule::new(FILTER, KUBE_SERVICES, "OUTPUT", portals, true),
        JumpRule::new(
            FILTER,
            KUBE_FORWARD,
            "FORWARD",
            "kubernetes forwarding rules",
            false,
        ),
        JumpRule::new(FILTER, KUBE_PROXY_FIREWALL, "INPUT", firewall, true),
        JumpRule::new(FILTER, KUBE_PROXY_FIREWALL, "OUTPUT", firewall, true),
        JumpRule::new(FILTER, KUBE_PROXY_FIREWALL, "FORWARD", firewall, true),
        JumpRule::new(NAT, KUBE_SERVICES, "OUTPUT", portals, false),
        JumpRule::new(NAT, KUBE_SERVICES, "PREROUTING", portals, false),
        JumpRule::new(
            NAT,
            KUBE_POSTROUTING,
            "POSTROUTING",
            "kubernetes postrouting rules",
            false,
        ),
        JumpRule::new(FILTER, KUBE_FIREWALL, "INPUT", "", false),
        JumpRule::new(FILTER, KUBE_FIREWALL, "OUTPUT", "", false),
    ]
}

// ---------------------------------------------------------------------------
// Loading rules into a namespace and reading counters
// ---------------------------------------------------------------------------

/// Which iptables implementation to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-legacy` (x_tables).
    Legacy,
    /// `iptables-nft` (nf_tables with the xtables compatibility layer).
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    pub fn restore(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-save",
            Backend::Nft => "iptables-nft-save",
        }
    }

    /// The backends whose three binaries are on this machine.
    pub fn available() -> Vec<Backend> {
        [Backend::Legacy, Backend::Nft]
            .into_iter()
            .filter(|b| {
                [b.iptables(), b.restore(), b.save()]
                    .iter()
                    .all(|bin| find_binary(bin))
            })
            .collect()
    }

    /// Why a test of this backend cannot run here (its binaries missing).
    pub fn missing(self) -> Option<String> {
        (!Backend::available().contains(&self)).then(|| {
            format!(
                "{}, {} or {} not installed",
                self.iptables(),
                self.restore(),
                self.save()
            )
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `name` is an executable in `$PATH` or the usual sbin directories
/// (which a non-login root shell may lack in `$PATH`).
pub fn find_binary(name: &str) -> bool {
    resolve_binary(name).is_some()
}

/// The full path of executable `name`, looked up as [`find_binary`] does.
fn resolve_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `ip netns exec <netns> <program> <args>`, feeding `stdin`; returns
/// stdout, or an error carrying the command line, status and stderr.
fn netns_exec(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    use std::process::Stdio;

    let resolved = resolve_binary(program).unwrap_or_else(|| PathBuf::from(program));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .arg(&resolved)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = format!("ip netns exec {netns} {program} {}", args.join(" "));
    let mut child = cmd.spawn().with_context(|| format!("spawning `{line}`"))?;
    if let Some(input) = stdin {
        // Take the pipe so that it is closed (EOF) before waiting.
        let mut pipe = child.stdin.take().context("child stdin")?;
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("writing stdin of `{line}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `iptables-restore --test --noflush` with `rules` in `netns`: parses
/// and checks every rule (matches and targets must exist in the kernel)
/// without committing anything.
pub fn restore_test(netns: &str, rules: &str, backend: Backend) -> Result<()> {
    netns_exec(
        netns,
        backend.restore(),
        &["--test", "--noflush"],
        Some(rules),
    )
    .map(|_| ())
}

/// Loads kube-proxy rules into `netns` the way kube-proxy does on a full
/// sync: creates its canary chains, ensures each [`jump_rules`] entry
/// (create the target chain, `-C`, else `-I`), then
/// `iptables-restore --noflush --counters` with `rules` (the output of
/// [`restore_input`]). Safe to call again with new rules.
pub fn install(netns: &str, rules: &str, backend: Backend) -> Result<()> {
    let ipt = backend.iptables();
    // ipt.Monitor() keeps a canary chain in each table it watches.
    for table in ["mangle", "nat", "filter"] {
        ensure_chain(netns, backend, table, KUBE_PROXY_CANARY)?;
    }
    for jump in jump_rules() {
        ensure_chain(netns, backend, jump.table, jump.target)?;
        let args: Vec<&str> = jump.args.iter().map(String::as_str).collect();
        let mut check = vec!["-w", "5", "-t", jump.table, "-C", jump.chain];
        check.extend(&args);
        if netns_exec(netns, ipt, &check, None).is_err() {
            let mut insert = vec!["-w", "5", "-t", jump.table, "-I", jump.chain];
            insert.extend(&args);
            netns_exec(netns, ipt, &insert, None)
                .with_context(|| format!("ensuring jump rule `{}`", jump.to_line()))?;
        }
    }
    netns_exec(
        netns,
        backend.restore(),
        &["-w", "5", "--noflush", "--counters"],
        Some(rules),
    )
    .context("loading kube-proxy rules")?;
    Ok(())
}

/// `iptables -N`, tolerating an existing chain (kube-proxy's `EnsureChain`).
fn ensure_chain(netns: &str, backend: Backend, table: &str, chain: &str) -> Result<()> {
    let ipt = backend.iptables();
    let exists = netns_exec(netns, ipt, &["-w", "5", "-t", table, "-S", chain], None).is_ok();
    if !exists {
        netns_exec(netns, ipt, &["-w", "5", "-t", table, "-N", chain], None)
            .with_context(|| format!("creating chain {table}/{chain}"))?;
    }
    Ok(())
}

/// `iptables-save` of one table in `netns` (with `-c` when `counters`).
pub fn save(netns: &str, backend: Backend, table: &str, counters: bool) -> Result<String> {
    let mut args = vec!["-t", table];
    if counters {
        args.push("-c");
    }
    netns_exec(netns, backend.save(), &args, None)
}

/// The packet and byte counters of one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
    /// The rule as `iptables-save` prints it (`-A CHAIN …`).
    pub rule: String,
}

/// Counters of every rule of `chain` in `table`, in order, read with
/// `iptables-save -c` in `netns`.
pub fn counters(
    netns: &str,
    backend: Backend,
    table: &str,
    chain: &str,
) -> Result<Vec<RuleCounter>> {
    let dump = save(netns, backend, table, true)?;
    parse_counters(&dump, chain)
}

/// Extracts the `[packets:bytes] -A <chain> …` lines of an
/// `iptables-save -c` dump.
pub fn parse_counters(dump: &str, chain: &str) -> Result<Vec<RuleCounter>> {
    let prefix = format!("-A {chain} ");
    let mut out = Vec::new();
    for line in dump.lines() {
        let Some(rest) = line.strip_prefix('[') else {
            continue;
        };
        let Some((counts, rule)) = rest.split_once("] ") else {
            bail!("malformed counter line {line:?}");
        };
        if !rule.starts_with(&prefix) {
            continue;
        }
        let (packets, bytes) = counts
            .split_once(':')
            .with_context(|| format!("malformed counters in {line:?}"))?;
        out.push(RuleCounter {
            packets: packets
                .parse()
                .with_context(|| format!("bad packet count in {line:?}"))?,
            bytes: bytes
                .parse()
                .with_context(|| format!("bad byte count in {line:?}"))?,
            rule: rule.to_string(),
        });
    }
    Ok(out)
}

/// Zeroes every counter of the `filter` and `nat` tables in `netns`.
pub fn zero_counters(netns: &str, backend: Backend) -> Result<()> {
    for table in ["filter", "nat"] {
        netns_exec(
            netns,
            backend.iptables(),
            &["-w", "5", "-t", table, "-Z"],
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ];
        for (input, want) in cases {
            assert_eq!(base32_std(input.as_bytes()), want, "base32({input:?})");
        }
    }

    /// Chain names that appear in kube-proxy's own expectations
    /// (`proxier_test.go`, TestOverallIPTablesRules) and on real clusters.
    #[test]
    fn chain_names_match_kube_proxy() {
        let svc = [
            ("ns1/svc1:p80", Protocol::Tcp, "KUBE-SVC-XPGD46QRK7WJZT7O"),
            ("ns2/svc2:p80", Protocol::Tcp, "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
            ("ns3/svc3:p80", Protocol::Tcp, "KUBE-SVC-X27LE4BHSL4DOUIK"),
            ("ns4/svc4:p80", Protocol::Tcp, "KUBE-SVC-4SW47YFZTEDKD3PK"),
            ("ns5/svc5:p80", Protocol::Tcp, "KUBE-SVC-NUKIZ6OKUXPJNT4C"),
            // Every kubeadm cluster has these.
            (
                "default/kubernetes:https",
                Protocol::Tcp,
                "KUBE-SVC-NPX46M4PTMTKRN6Y",
            ),
            (
                "kube-system/kube-dns:dns",
                Protocol::Udp,
                "KUBE-SVC-TCOU7JCQXEZGVUNU",
            ),
            (
                "kube-system/kube-dns:dns-tcp",
                Protocol::Tcp,
                "KUBE-SVC-ERIFXISQEP7F7OF4",
            ),
        ];
        for (name, proto, want) in svc {
            assert_eq!(service_chain(name, proto), want, "{name} {proto}");
        }
        assert_eq!(
            external_chain("ns2/svc2:p80", Protocol::Tcp),
            "KUBE-EXT-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            firewall_chain("ns5/svc5:p80", Protocol::Tcp),
            "KUBE-FW-NUKIZ6OKUXPJNT4C"
        );
        let sep = [
            ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
            ("ns2/svc2:p80", "10.180.0.2:80", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
            ("ns3/svc3:p80", "10.180.0.3:80", "KUBE-SEP-OYPFS5VJICHGATKP"),
            ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
            ("ns4/svc4:p80", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
            ("ns5/svc5:p80", "10.180.0.3:80", "KUBE-SEP-I77PXRDZVX7PMWMN"),
        ];
        for (name, ep, want) in sep {
            assert_eq!(endpoint_chain(name, Protocol::Tcp, ep), want, "{name} {ep}");
        }
    }

    #[test]
    fn unnamed_port_has_no_colon() {
        assert_eq!(service_port_name("default", "nginx", ""), "default/nginx");
        assert_eq!(service_port_name("ns1", "svc1", "p80"), "ns1/svc1:p80");
    }

    #[test]
    fn masquerade_mark_is_formatted_like_go() {
        assert_eq!(masquerade_mark(14), "0x00004000");
        assert_eq!(masquerade_mark(0), "0x00000001");
        assert_eq!(masquerade_mark(31), "0x80000000");
        assert_eq!(masquerade_mark(200), "0x80000000");
    }

    #[test]
    fn probabilities_have_ten_decimals() {
        let mut cache = Vec::new();
        assert_eq!(probability(&mut cache, 2), "0.5000000000");
        assert_eq!(probability(&mut cache, 3), "0.3333333333");
        assert_eq!(probability(&mut cache, 6), "0.1666666667");
        assert_eq!(probability(&mut cache, 1), "1.0000000000");
    }

    #[test]
    fn cidr_parses_trims_and_masks() {
        let c: Cidr = " 203.0.113.7/25 ".parse().unwrap();
        assert_eq!(c.to_string(), "203.0.113.0/25");
        assert!(c.contains(Ipv4Addr::new(203, 0, 113, 100)));
        assert!(!c.contains(Ipv4Addr::new(203, 0, 113, 200)));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0/8".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(255, 1, 2, 3)));
    }

    #[test]
    fn parse_counters_reads_one_chain() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n\
            [3:180] -A KUBE-NODEPORTS -p tcp -m comment --comment ns/a:p -m tcp --dport 30001 -j KUBE-EXT-X\n\
            [0:0] -A KUBE-SERVICES -j KUBE-NODEPORTS\n\
            [12:720] -A KUBE-NODEPORTS -p udp -m udp --dport 30002 -j KUBE-EXT-Y\nCOMMIT\n";
        let c = parse_counters(dump, "KUBE-NODEPORTS").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].packets, c[0].bytes), (3, 180));
        assert_eq!(c[1].packets, 12);
        assert!(c[1].rule.ends_with("-j KUBE-EXT-Y"));
        assert!(parse_counters("[x:1] -A KUBE-NODEPORTS -j X\n", "KUBE-NODEPORTS").is_err());
    }

    #[test]
    fn jump_rule_lines_quote_comments() {
        let rules = jump_rules();
        let lines: Vec<String> = rules.iter().map(JumpRule::to_line).collect();
        assert!(lines.contains(
            &"-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                .to_string()
        ));
        assert!(lines.contains(
            &"-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"
                .to_string()
        ));
        assert!(lines.contains(&"-A INPUT -j KUBE-FIREWALL".to_string()));
    }
}
