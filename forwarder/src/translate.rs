//! Services + EndpointSlices -> desired datapath state.
//!
//! Pure (no I/O), so manifests and the Kubernetes API watcher share it. The
//! rules follow kube-proxy (iptables/nftables proxiers and its
//! EndpointSliceCache) closely: whatever this accelerates must behave as if
//! kube-proxy had handled the packet, and whatever it does not emit is
//! passed to the kernel where kube-proxy still handles it.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};

use crate::model::{Desired, DesiredBackend, DesiredFrontend, FrontendAddr, NodeContext, Protocol};

/// Per-Service opt-out (`"false"`), or opt-in with [`ServiceSelection::Annotated`].
pub const ACCELERATE_ANNOTATION: &str = "forwarder.dev/accelerate";

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Which externally reachable Services (NodePort, LoadBalancer, any with
/// externalIPs) are candidates for acceleration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServiceSelection {
    /// All of them, except those annotated `forwarder.dev/accelerate: "false"`.
    #[default]
    All,
    /// Only those annotated `forwarder.dev/accelerate: "true"`.
    Annotated,
}

/// The result of [`translate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub desired: Desired,
    /// Services (or parts of them) that qualify but are not accelerated,
    /// with the reason; one Service may appear several times.
    pub skipped: Vec<Skipped>,
    /// Services that are not candidates at all (ClusterIP without
    /// externalIPs, ExternalName, headless, not opted in): normal, so
    /// counted rather than listed.
    pub ignored_services: usize,
    /// Backends of `desired` that are policed local pods, and why.
    pub policed: BTreeMap<Ipv4Addr, String>,
}

/// Something not accelerated, for logging and counting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name` of the Service.
    pub service: String,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.service, self.reason)
    }
}

/// Translates with [`ServiceSelection::All`].
pub fn translate(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
) -> Translation {
    translate_with(services, slices, node, ServiceSelection::All)
}

/// Computes the frontends this node should accelerate.
///
/// The output does not depend on the order of `services` or `slices`
/// (except that of two objects with the same namespace/name the first is
/// used).
pub fn translate_with(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeContext,
    selection: ServiceSelection,
) -> Translation {
    let mut out = Translation::default();
    let slices = index_slices(slices, node, &mut out.skipped);

    let mut ordered: Vec<(String, &Service)> =
        services.iter().map(|s| (service_key(s), s)).collect();
    // Stable: among duplicates the first given wins.
    ordered.sort_by(|a, b| a.0.cmp(&b.0));

    let mut claims: HashMap<FrontendAddr, Claim> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (key, service) in &ordered {
        if !seen.insert(key.as_str()) {
            out.skip(
                key,
                "duplicate Service object; the first one is used".into(),
            );
            continue;
        }
        let service_slices = slices.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        translate_service(
            key,
            service,
            service_slices,
            node,
            selection,
            &mut claims,
            &mut out,
        );
    }
    out
}

/// Which Service port first took a frontend address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    service: String,
    port_index: usize,
}

impl Translation {
    fn skip(&mut self, service: &str, reason: String) {
        self.skipped.push(Skipped {
            service: service.to_owned(),
            reason,
        });
    }
}

/// `namespace/name`; a missing namespace is `default`, as `kubectl apply` would make it.
fn service_key(service: &Service) -> String {
    let meta = &service.metadata;
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("")
    )
}

fn translate_service(
    key: &str,
    service: &Service,
    slices: &[SliceView],
    node: &NodeContext,
    selection: ServiceSelection,
    claims: &mut HashMap<FrontendAddr, Claim>,
    out: &mut Translation,
) {
    let Some(spec) = &service.spec else {
        out.ignored_services += 1;
        return;
    };
    let has_external_ips = spec
        .external_ips
        .as_ref()
        .is_some_and(|ips| !ips.is_empty());
    // kube-proxy serves nodePorts and LoadBalancer IPs by type, and
    // externalIPs on every type that has a cluster IP (its
    // `ExternallyAccessible`), ClusterIP included.
    let kind = match spec.type_.as_deref() {
        Some("NodePort") => ServiceKind::NodePort,
        Some("LoadBalancer") => ServiceKind::LoadBalancer,
        // The API's default type.
        None | Some("ClusterIP") if has_external_ips => ServiceKind::ClusterIp,
        // ClusterIP without externalIPs, ExternalName, anything unknown.
        _ => {
            out.ignored_services += 1;
            return;
        }
    };
    if spec.cluster_ip.as_deref() == Some("None") {
        // Headless: kube-proxy skips it whatever it lists.
        out.ignored_services += 1;
        return;
    }
    if service.metadata.name.as_deref().unwrap_or("").is_empty() {
        out.skip(key, "Service without metadata.name".into());
        return;
    }
    let annotation = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACCELERATE_ANNOTATION));
    match (
        annotation.map(|v| v.to_ascii_lowercase()).as_deref(),
        selection,
    ) {
        (Some("false"), _) => {
            out.skip(key, format!("annotated {ACCELERATE_ANNOTATION}: \"false\""));
            return;
        }
        (Some("true"), _) | (None, ServiceSelection::All) => {}
        (None, ServiceSelection::Annotated) => {
            out.ignored_services += 1;
            return;
        }
        (Some(_), _) => {
            // Unclear intent: do not accelerate.
            let value = annotation.map(String::as_str).unwrap_or("");
            out.skip(
                key,
                format!("annotation {ACCELERATE_ANNOTATION} has value {value:?}, expected \"true\" or \"false\""),
            );
            return;
        }
    }

    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let affinity_timeout_s = match session_affinity_timeout(spec) {
        Ok(t) => t,
        Err(reason) => {
            out.skip(key, format!("{reason}; left to kube-proxy"));
            return;
        }
    };
    // kube-proxy's `ExternalPolicyLocal`: the policy applies to every
    // externally accessible Service, a ClusterIP one with externalIPs too
    // (the API accepts it there since it defaults it there).
    let local_policy = spec.external_traffic_policy.as_deref() == Some("Local");
    let is_load_balancer = kind == ServiceKind::LoadBalancer;
    let load_balancer_ips = if is_load_balancer {
        load_balancer_ips(key, service, out)
    } else {
        Vec::new()
    };
    let external_ips = parse_ipv4_list(
        key,
        "externalIPs",
        spec.external_ips.as_deref().unwrap_or(&[]),
        out,
    );

    for (port_index, port) in spec.ports.as_deref().unwrap_or(&[]).iter().enumerate() {
        let port_name = port.name.clone().unwrap_or_default();
        let label = if port_name.is_empty() {
            format!("port {}", port.port)
        } else {
            format!("port {port_name:?}")
        };
        let proto = match port.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some(other) => {
                out.skip(key, format!("{label}: protocol {other} is not accelerated"));
                continue;
            }
        };

        let mut frontends: Vec<FrontendAddr> = Vec::new();
        // A ClusterIP Service has no nodePorts (the API refuses them).
        let node_port = port.node_port.filter(|_| kind != ServiceKind::ClusterIp);
        match node_port {
            Some(node_port) => match valid_port(node_port) {
                Some(node_port) => {
                    frontends.extend(node.node_addresses.iter().map(|&addr| FrontendAddr {
                        addr,
                        port: node_port,
                        proto,
                    }))
                }
                None => out.skip(key, format!("{label}: invalid nodePort {node_port}")),
            },
            // With allocateLoadBalancerNodePorts: false this is normal.
            None if kind == ServiceKind::NodePort => {
                out.skip(key, format!("{label}: no nodePort allocated"))
            }
            None => {}
        }
        if !load_balancer_ips.is_empty() || !external_ips.is_empty() {
            match valid_port(port.port) {
                Some(service_port) => {
                    frontends.extend(load_balancer_ips.iter().chain(&external_ips).map(|&addr| {
                        FrontendAddr {
                            addr,
                            port: service_port,
                            proto,
                        }
                    }))
                }
                None => out.skip(key, format!("{label}: invalid port {}", port.port)),
            }
        }
        if frontends.is_empty() {
            continue;
        }

        let endpoints = endpoints_for_port(slices, &port_name, proto);
        let mut choice = choose_backends(&endpoints, local_policy);
        let policed = mark_policed(&mut choice.backends, namespace, node);
        // kube-proxy: no endpoints at all -> REJECT; Local policy with
        // endpoints elsewhere only -> DROP. Only the DROP is done here; the
        // REJECT (and Cluster with nothing usable) is left to kube-proxy.
        let mut emit = if local_policy {
            choice.has_any
        } else {
            !choice.backends.is_empty()
        };
        if !emit {
            out.skip(
                key,
                format!("{label}: no ready or terminating endpoints; left to kube-proxy"),
            );
        } else if affinity_timeout_s != 0 && !policed.is_empty() {
            // kube-proxy would carry the policed backend's flows and keep its
            // own record of each client's backend: two records, and a client
            // would not stick. The whole port stays with kube-proxy.
            emit = false;
            out.skip(
                key,
                format!("{label}: sessionAffinity with a local backend under NetworkPolicy; left to kube-proxy"),
            );
        }
        if emit {
            out.policed.extend(policed);
        }

        let claim = Claim {
            service: key.to_owned(),
            port_index,
        };
        for frontend in frontends {
            match claims.get(&frontend) {
                // The same address listed twice (node address and externalIP, ...).
                Some(existing) if *existing == claim => continue,
                Some(existing) => {
                    let reason = format!(
                        "{label}: frontend {frontend} is already used by {}",
                        existing.service
                    );
                    out.skip(key, reason);
                    continue;
                }
                None => {
                    claims.insert(frontend, claim.clone());
                }
            }
            if emit {
                out.desired.frontends.insert(
                    frontend,
                    DesiredFrontend {
                        service: key.to_owned(),
                        port_name: port_name.clone(),
                        backends: choice.backends.clone(),
                        no_snat: local_policy,
                        drop_if_empty: local_policy,
                        affinity_timeout_s,
                    },
                );
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceKind {
    NodePort,
    LoadBalancer,
    /// Only its externalIPs are served outside the cluster.
    ClusterIp,
}

/// sessionAffinityConfig.clientIP.timeoutSeconds when unset (the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest timeout the API accepts (`MaxClientIPServiceAffinitySeconds`).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The Service's sessionAffinity as a timeout (0: none), or why it cannot
/// be done as kube-proxy would do it.
fn session_affinity_timeout(spec: &ServiceSpec) -> Result<u32, String> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(0),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) => u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                    .ok_or_else(|| {
                        format!(
                            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
                        )
                    }),
            }
        }
        Some(other) => Err(format!(
            "sessionAffinity {other:?} is neither \"ClientIP\" nor \"None\""
        )),
    }
}

/// The LoadBalancer ingress IPs kube-proxy captures on the node.
fn load_balancer_ips(key: &str, service: &Service, out: &mut Translation) -> Vec<Ipv4Addr> {
    let has_source_ranges = service
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .is_some_and(|r| !r.is_empty());
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or(&[]);
    let ips: Vec<String> = ingress
        .iter()
        // ipMode Proxy: the load balancer proxies to the nodes itself;
        // kube-proxy does not capture the IP, nor do we.
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.clone())
        .collect();
    if has_source_ranges && !ips.is_empty() {
        // kube-proxy filters LoadBalancer traffic by source; the datapath
        // cannot, and accelerating would bypass that firewall.
        out.skip(
            key,
            "loadBalancerSourceRanges is set: LoadBalancer IPs left to kube-proxy".into(),
        );
        return Vec::new();
    }
    parse_ipv4_list(key, "status.loadBalancer.ingress", &ips, out)
}

/// IPv4 addresses of `list`; IPv6 ones are silently left out (dual-stack
/// is normal, the datapath is IPv4), malformed ones are reported.
fn parse_ipv4_list(key: &str, what: &str, list: &[String], out: &mut Translation) -> Vec<Ipv4Addr> {
    let mut ips = Vec::new();
    for text in list {
        match text.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ips.push(ip),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => out.skip(key, format!("{what}: {text:?} is not an IP address")),
        }
    }
    ips
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// An EndpointSlice reduced to what the translation uses.
#[derive(Debug)]
struct SliceView {
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug)]
struct SlicePort {
    name: String,
    proto: Protocol,
    port: u16,
}

#[derive(Clone, Copy, Debug)]
struct SliceEndpoint {
    addr: Ipv4Addr,
    state: EndpointState,
}

/// Endpoint conditions as kube-proxy reads them: ready and serving default
/// to true, terminating to false.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EndpointState {
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

impl EndpointState {
    fn serving_terminating(self) -> bool {
        self.serving && self.terminating
    }

    /// The same address:port in two slices (e.g. while the controller moves
    /// it) counts once. kube-proxy keeps an arbitrary copy but prefers a
    /// local one; here the most usable state wins, independent of order.
    fn merge(self, other: Self) -> Self {
        EndpointState {
            ready: self.ready || other.ready,
            serving: self.serving || other.serving,
            terminating: self.terminating && other.terminating,
            local: self.local || other.local,
        }
    }
}

/// IPv4 EndpointSlices grouped by `namespace/service`, sorted by slice name.
fn index_slices(
    slices: &[EndpointSlice],
    node: &NodeContext,
    skipped: &mut Vec<Skipped>,
) -> HashMap<String, Vec<SliceView>> {
    let mut sorted: Vec<(String, &str, &EndpointSlice)> = slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .filter_map(|s| {
            let service = s.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
            let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
            let name = s.metadata.name.as_deref().unwrap_or("");
            Some((format!("{namespace}/{service}"), name, s))
        })
        .collect();
    sorted.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));

    let mut index: HashMap<String, Vec<SliceView>> = HashMap::new();
    for (key, name, slice) in sorted {
        let ports = slice
            .ports
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .filter_map(|p| {
                let proto = match p.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    _ => return None,
                };
                Some(SlicePort {
                    name: p.name.clone().unwrap_or_default(),
                    proto,
                    // kube-proxy ignores ports without a number.
                    port: valid_port(p.port?)?,
                })
            })
            .collect();
        let mut endpoints = Vec::new();
        for endpoint in &slice.endpoints {
            // kube-proxy uses the first address only.
            let Some(first) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(addr) = first.parse::<Ipv4Addr>() else {
                skipped.push(Skipped {
                    service: key.clone(),
                    reason: format!("EndpointSlice {name}: endpoint address {first:?} is not IPv4"),
                });
                continue;
            };
            let conditions = endpoint.conditions.as_ref();
            let state = EndpointState {
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                local: !node.node_name.is_empty()
                    && endpoint.node_name.as_deref() == Some(node.node_name.as_str()),
            };
            endpoints.push(SliceEndpoint { addr, state });
        }
        index
            .entry(key)
            .or_default()
            .push(SliceView { ports, endpoints });
    }
    index
}

/// The endpoints of one Service port: from each slice, the endpoints with
/// the port number of the slice port with the same name and protocol (the
/// EndpointSlice controller has already resolved named targetPorts).
fn endpoints_for_port(
    slices: &[SliceView],
    port_name: &str,
    proto: Protocol,
) -> BTreeMap<(Ipv4Addr, u16), EndpointState> {
    let mut endpoints: BTreeMap<(Ipv4Addr, u16), EndpointState> = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.proto == proto)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            endpoints
                .entry((endpoint.addr, port.port))
                .and_modify(|state| *state = state.merge(endpoint.state))
                .or_insert(endpoint.state);
        }
    }
    endpoints
}

struct BackendChoice {
    backends: Vec<DesiredBackend>,
    /// The Service has some usable endpoint anywhere (kube-proxy's
    /// `hasEndpoints`: without it, kube-proxy rejects rather than drops).
    has_any: bool,
}

/// Marks the local backends that NetworkPolicy guards; returns their reasons.
fn mark_policed(
    backends: &mut [DesiredBackend],
    namespace: &str,
    node: &NodeContext,
) -> BTreeMap<Ipv4Addr, String> {
    let mut policed = BTreeMap::new();
    for b in backends.iter_mut().filter(|b| b.local) {
        if let Some(why) = node.policing.reason(b.addr, namespace) {
            b.policed = true;
            policed.insert(b.addr, why);
        }
    }
    policed
}

/// kube-proxy's `CategorizeEndpoints` for external traffic: ready
/// endpoints, else serving-and-terminating ones (graceful termination);
/// with the Local policy, only local endpoints, with the same fallback
/// applied to the local ones.
fn choose_backends(
    endpoints: &BTreeMap<(Ipv4Addr, u16), EndpointState>,
    local_policy: bool,
) -> BackendChoice {
    let pick = |want: &dyn Fn(EndpointState) -> bool| -> Vec<DesiredBackend> {
        endpoints
            .iter()
            .filter(|(_, &state)| want(state))
            .map(|(&(addr, port), state)| DesiredBackend {
                addr,
                port,
                local: state.local,
                policed: false,
            })
            .collect()
    };
    let has_any = endpoints
        .values()
        .any(|s| s.ready || s.serving_terminating());
    let mut backends = if local_policy {
        let ready = pick(&|s| s.local && s.ready);
        if ready.is_empty() {
            pick(&|s| s.local && s.serving_terminating())
        } else {
            ready
        }
    } else {
        let ready = pick(&|s| s.ready);
        if ready.is_empty() {
            pick(&|s| s.serving_terminating())
        } else {
            ready
        }
    };
    backends.sort();
    backends.dedup();
    BackendChoice { backends, has_any }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::manifest;

    const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node1".into(),
            node_addresses: vec![NODE_ADDR],
            ..Default::default()
        }
    }

    /// Parses test YAML with the manifest reader; any problem fails the test.
    fn objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let set = manifest::parse_str(Path::new("test.yaml"), yaml);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        (set.services, set.endpoint_slices)
    }

    fn run(yaml: &str) -> Translation {
        let (services, slices) = objects(yaml);
        translate(&services, &slices, &node())
    }

    /// A Service document; `body` holds `spec:` (and `status:`) lines.
    fn service(ns_name: &str, body: &str) -> String {
        let (ns, name) = ns_name.split_once('/').expect("ns/name");
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: {ns}, name: {name}}}\n{body}\n")
    }

    /// An IPv4 EndpointSlice document for Service `ns/service`.
    fn slice(ns_service: &str, name: &str, ports: &str, endpoints: &str) -> String {
        slice_typed(ns_service, name, "IPv4", ports, endpoints)
    }

    fn slice_typed(
        ns_service: &str,
        name: &str,
        address_type: &str,
        ports: &str,
        endpoints: &str,
    ) -> String {
        let (ns, service) = ns_service.split_once('/').expect("ns/service");
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{namespace: {ns}, name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    fn fe(addr: &str, port: u16, proto: Protocol) -> FrontendAddr {
        FrontendAddr {
            addr: addr.parse().expect("test address"),
            port,
            proto,
        }
    }

    fn be(addr: &str, port: u16, local: bool) -> DesiredBackend {
        DesiredBackend {
            addr: addr.parse().expect("test address"),
            port,
            local,
            policed: false,
        }
    }

    fn frontend_keys(t: &Translation) -> Vec<FrontendAddr> {
        t.desired.frontends.keys().copied().collect()
    }

    fn backends_of(t: &Translation, frontend: FrontendAddr) -> Vec<DesiredBackend> {
        t.desired
            .frontends
            .get(&frontend)
            .unwrap_or_else(|| panic!("no frontend {frontend} in {:?}", t.desired))
            .backends
            .clone()
    }

    fn has_skip(t: &Translation, service: &str, needle: &str) -> bool {
        t.skipped
            .iter()
            .any(|s| s.service == service && s.reason.contains(needle))
    }

    const WEB_PORT: &str = "[{name: http, port: 80, targetPort: 8080, nodePort: 30080}]";
    const WEB_SLICE_PORTS: &str = "[{name: http, port: 8080, protocol: TCP}]";
    const TWO_READY: &str =
        "[{addresses: [10.0.1.1], nodeName: node1, conditions: {ready: true}}, \
                             {addresses: [10.0.2.1], nodeName: node2, conditions: {ready: true}}]";

    fn web(service_type: &str) -> String {
        service(
            "default/web",
            &format!("spec: {{type: {service_type}, ports: {WEB_PORT}}}"),
        ) + &slice("default/web", "web-1", WEB_SLICE_PORTS, TWO_READY)
    }

    #[test]
    fn nodeport_service_gets_a_frontend_with_all_ready_backends() {
        let t = run(&web("NodePort"));
        assert_eq!(frontend_keys(&t), [fe("192.0.2.1", 30080, Protocol::Tcp)]);
        let frontend = &t.desired.frontends[&fe("192.0.2.1", 30080, Protocol::Tcp)];
        assert_eq!(frontend.service, "default/web");
        assert_eq!(frontend.port_name, "http");
        assert_eq!(
            frontend.backends,
            [be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)]
        );
        assert!(!frontend.no_snat && !frontend.drop_if_empty);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn only_externally_reachable_services_are_taken() {
        let yaml = web("ClusterIP")
            + &service(
                "default/ext",
                "spec: {type: ExternalName, externalName: example.com}",
            )
            + &service(
                "default/headless",
                "spec: {clusterIP: None, ports: [{port: 80}]}",
            )
            + &service(
                "default/untyped",
                "spec: {ports: [{port: 80, nodePort: 30001}]}",
            )
            + &service("default/nospec", "")
            + &service(
                "default/np",
                "spec: {type: NodePort, ports: [{name: http, port: 80, nodePort: 30090}]}",
            )
            + &slice("default/np", "np-1", WEB_SLICE_PORTS, TWO_READY)
            + &service(
                "default/lb",
                "spec: {type: LoadBalancer, ports: [{name: http, port: 80, nodePort: 30091}]}",
            )
            + &slice("default/lb", "lb-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        let keys = frontend_keys(&t);
        assert_eq!(
            keys,
            [
                fe("192.0.2.1", 30090, Protocol::Tcp),
                fe("192.0.2.1", 30091, Protocol::Tcp)
            ]
        );
        assert_eq!(t.desired.frontends[&keys[0]].service, "default/np");
        assert_eq!(t.desired.frontends[&keys[1]].service, "default/lb");
        assert_eq!(t.ignored_services, 5);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn one_frontend_per_node_address() {
        let (services, slices) = objects(&web("NodePort"));
        let node = NodeContext {
            node_name: "node1".into(),
            node_addresses: vec![NODE_ADDR, Ipv4Addr::new(198, 51, 100, 7), NODE_ADDR],
            ..Default::default()
        };
        let t = translate(&services, &slices, &node);
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30080, Protocol::Tcp),
                fe("198.51.100.7", 30080, Protocol::Tcp)
            ]
        );
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        let t = translate(&services, &slices, &NodeContext::default());
        assert!(t.desired.frontends.is_empty());
    }

    #[test]
    fn protocol_defaults_to_tcp_udp_is_taken_sctp_is_skipped() {
        let yaml = service(
            "default/mixed",
            "spec: {type: NodePort, ports: [{name: a, port: 1, nodePort: 30001}, \
             {name: b, port: 2, nodePort: 30002, protocol: UDP}, {name: c, port: 3, nodePort: 30003, protocol: SCTP}]}",
        ) + &slice(
            "default/mixed",
            "mixed-1",
            "[{name: a, port: 1001}, {name: b, port: 1002, protocol: UDP}, {name: c, port: 1003, protocol: SCTP}]",
            "[{addresses: [10.0.0.1]}]",
        );
        let t = run(&yaml);
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30001, Protocol::Tcp),
                fe("192.0.2.1", 30002, Protocol::Udp)
            ]
        );
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30001, Protocol::Tcp)),
            [be("10.0.0.1", 1001, false)]
        );
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30002, Protocol::Udp)),
            [be("10.0.0.1", 1002, false)]
        );
        assert!(
            has_skip(&t, "default/mixed", "protocol SCTP"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn loadbalancer_ingress_and_external_ips_use_the_service_port() {
        let yaml = service(
            "default/lb",
            &format!(
                "spec: {{type: LoadBalancer, externalIPs: [203.0.113.9, '2001:db8::9'], ports: {WEB_PORT}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}, {{ip: '2001:db8::1'}}, \
                 {{hostname: lb.example.com}}, {{ip: 203.0.113.2, ipMode: Proxy}}, {{ip: 203.0.113.3, ipMode: VIP}}]}}}}"
            ),
        ) + &slice("default/lb", "lb-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30080, Protocol::Tcp),
                fe("203.0.113.1", 80, Protocol::Tcp),
                fe("203.0.113.3", 80, Protocol::Tcp),
                fe("203.0.113.9", 80, Protocol::Tcp),
            ]
        );
        for frontend in frontend_keys(&t) {
            assert_eq!(
                backends_of(&t, frontend),
                [be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)]
            );
        }
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn nodeport_service_external_ips_are_taken_too() {
        let yaml = web("NodePort").replace(
            "type: NodePort,",
            "type: NodePort, externalIPs: [203.0.113.9],",
        );
        let t = run(&yaml);
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30080, Protocol::Tcp),
                fe("203.0.113.9", 80, Protocol::Tcp)
            ]
        );
    }

    #[test]
    fn allocate_load_balancer_node_ports_false_means_no_nodeport_frontend() {
        let yaml = service(
            "default/lb",
            "spec: {type: LoadBalancer, allocateLoadBalancerNodePorts: false, ports: [{name: http, port: 80}]}\n\
             status: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}",
        ) + &slice("default/lb", "lb-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        assert_eq!(frontend_keys(&t), [fe("203.0.113.1", 80, Protocol::Tcp)]);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    }

    #[test]
    fn nodeport_service_without_allocated_nodeport_is_reported() {
        let t = run(&web("NodePort").replace(", nodePort: 30080", ""));
        assert!(t.desired.frontends.is_empty());
        assert!(
            has_skip(&t, "default/web", "no nodePort"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn load_balancer_source_ranges_leave_lb_ips_to_kube_proxy() {
        let yaml = service(
            "default/lb",
            &format!(
                "spec: {{type: LoadBalancer, loadBalancerSourceRanges: [198.51.100.0/24], externalIPs: [203.0.113.9], ports: {WEB_PORT}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}]}}}}"
            ),
        ) + &slice("default/lb", "lb-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        // kube-proxy firewalls only the LoadBalancer IPs.
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30080, Protocol::Tcp),
                fe("203.0.113.9", 80, Protocol::Tcp)
            ]
        );
        assert!(
            has_skip(&t, "default/lb", "loadBalancerSourceRanges"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn only_ipv4_slices_of_the_same_service_and_namespace_are_used() {
        let endpoint = |ip: &str| format!("[{{addresses: ['{ip}']}}]");
        let yaml = web("NodePort").replace(TWO_READY, &endpoint("10.0.0.1"))
            + &slice("other/web", "web-x", WEB_SLICE_PORTS, &endpoint("10.9.9.1"))
            + &slice("default/web2", "web2-x", WEB_SLICE_PORTS, &endpoint("10.9.9.2"))
            + &slice_typed("default/web", "web-v6", "IPv6", WEB_SLICE_PORTS, &endpoint("fd00::1"))
            + &slice_typed("default/web", "web-fqdn", "FQDN", WEB_SLICE_PORTS, &endpoint("db.example.com"))
            // No service-name label at all.
            + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: default, name: stray}\n\
               addressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.9.9.3]}]\n";
        let t = run(&yaml);
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.0.1", 8080, false)]
        );
    }

    #[test]
    fn endpoints_from_several_slices_are_merged_and_counted_once() {
        let yaml = web("NodePort")
            + &slice(
                "default/web",
                "web-2",
                WEB_SLICE_PORTS,
                "[{addresses: [10.0.3.1], nodeName: node3}, {addresses: [10.0.1.1], nodeName: node1}]",
            );
        let t = run(&yaml);
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [
                be("10.0.1.1", 8080, true),
                be("10.0.2.1", 8080, false),
                be("10.0.3.1", 8080, false)
            ]
        );
    }

    #[test]
    fn same_address_with_another_port_in_another_slice_is_another_backend() {
        // A targetPort change being rolled out: old pods on 8080, new on 9090.
        let yaml = web("NodePort")
            + &slice(
                "default/web",
                "web-2",
                "[{name: http, port: 9090}]",
                "[{addresses: [10.0.1.1], nodeName: node1}]",
            );
        let t = run(&yaml);
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [
                be("10.0.1.1", 8080, true),
                be("10.0.1.1", 9090, true),
                be("10.0.2.1", 8080, false)
            ]
        );
    }

    #[test]
    fn target_port_comes_from_the_slice_port_with_the_same_name_and_protocol() {
        let yaml = service(
            "default/app",
            "spec: {type: NodePort, ports: [\
             {name: http, port: 80, targetPort: web, nodePort: 30080}, \
             {name: metrics, port: 9100, nodePort: 30091}, \
             {name: dns, port: 53, nodePort: 30053, protocol: UDP}]}",
        ) + &slice(
            "default/app",
            "app-1",
            // No metrics port; dns only over TCP.
            "[{name: dns, port: 5353, protocol: TCP}, {name: http, port: 8080, protocol: TCP}]",
            "[{addresses: [10.0.0.1]}]",
        ) + &slice(
            "default/app",
            "app-2",
            "[{name: http, port: 8081}]",
            "[{addresses: [10.0.0.2]}]",
        );
        let t = run(&yaml);
        assert_eq!(frontend_keys(&t), [fe("192.0.2.1", 30080, Protocol::Tcp)]);
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.0.1", 8080, false), be("10.0.0.2", 8081, false)]
        );
        assert!(
            has_skip(&t, "default/app", "port \"metrics\": no ready"),
            "{:?}",
            t.skipped
        );
        assert!(
            has_skip(&t, "default/app", "port \"dns\": no ready"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn single_unnamed_port_matches_empty_or_missing_name() {
        for slice_port in ["[{name: '', port: 8080}]", "[{port: 8080, protocol: TCP}]"] {
            let yaml = service(
                "default/one",
                "spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}",
            ) + &slice(
                "default/one",
                "one-1",
                slice_port,
                "[{addresses: [10.0.0.1]}]",
            );
            let t = run(&yaml);
            let frontend = &t.desired.frontends[&fe("192.0.2.1", 30080, Protocol::Tcp)];
            assert_eq!(frontend.port_name, "");
            assert_eq!(
                frontend.backends,
                [be("10.0.0.1", 8080, false)],
                "{slice_port}"
            );
        }
        // A named slice port does not match an unnamed Service port.
        let yaml = service(
            "default/one",
            "spec: {type: NodePort, ports: [{port: 80, nodePort: 30080}]}",
        ) + &slice(
            "default/one",
            "one-1",
            "[{name: http, port: 8080}]",
            "[{addresses: [10.0.0.1]}]",
        );
        assert!(run(&yaml).desired.frontends.is_empty());
    }

    #[test]
    fn ready_endpoints_are_used_and_unset_ready_counts_as_ready() {
        let endpoints = "[{addresses: [10.0.0.1], conditions: {ready: true}}, \
                          {addresses: [10.0.0.2]}, \
                          {addresses: [10.0.0.3], conditions: {}}, \
                          {addresses: [10.0.0.4], conditions: {ready: false, serving: false}}, \
                          {addresses: [10.0.0.5], conditions: {ready: false, serving: true, terminating: true}}]";
        let yaml = web("NodePort").replace(TWO_READY, endpoints);
        let t = run(&yaml);
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [
                be("10.0.0.1", 8080, false),
                be("10.0.0.2", 8080, false),
                be("10.0.0.3", 8080, false)
            ]
        );
    }

    #[test]
    fn without_ready_endpoints_serving_terminating_ones_are_used() {
        let endpoints = "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}, \
                          {addresses: [10.0.0.2], conditions: {ready: false, terminating: true}}, \
                          {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}, \
                          {addresses: [10.0.0.4], conditions: {ready: false, serving: true, terminating: false}}]";
        let t = run(&web("NodePort").replace(TWO_READY, endpoints));
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.0.1", 8080, false), be("10.0.0.2", 8080, false)]
        );
    }

    #[test]
    fn cluster_policy_without_usable_endpoints_emits_nothing() {
        for endpoints in [
            "[]",
            "[{addresses: [10.0.0.1], conditions: {ready: false}}]",
        ] {
            let t = run(&web("NodePort").replace(TWO_READY, endpoints));
            assert!(t.desired.frontends.is_empty(), "{endpoints}");
            assert!(
                has_skip(&t, "default/web", "left to kube-proxy"),
                "{:?}",
                t.skipped
            );
        }
        // No slice at all.
        let t = run(&service(
            "default/web",
            &format!("spec: {{type: NodePort, ports: {WEB_PORT}}}"),
        ));
        assert!(t.desired.frontends.is_empty());
    }

    #[test]
    fn only_the_first_address_of_an_endpoint_is_used() {
        let endpoints =
            "[{addresses: [10.0.0.1, 10.0.0.99]}, {addresses: []}, {addresses: [not-an-ip]}]";
        let t = run(&web("NodePort").replace(TWO_READY, endpoints));
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.0.1", 8080, false)]
        );
        assert!(
            has_skip(&t, "default/web", "\"not-an-ip\" is not IPv4"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn local_means_endpoint_on_this_node() {
        let t = run(&web("NodePort"));
        let backends = backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp));
        assert_eq!(
            backends.iter().map(|b| b.local).collect::<Vec<_>>(),
            [true, false]
        );
        // Another node name: nothing is local.
        let (services, slices) = objects(&web("NodePort"));
        let other = NodeContext {
            node_name: "node9".into(),
            node_addresses: vec![NODE_ADDR],
            ..Default::default()
        };
        let t = translate(&services, &slices, &other);
        assert!(backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp))
            .iter()
            .all(|b| !b.local));
    }

    /// Translates `yaml`, its Pod and NetworkPolicy documents included, as
    /// the daemon does on node1.
    fn run_policed(yaml: &str) -> Translation {
        let set = manifest::parse_str(Path::new("test.yaml"), yaml);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        let node = NodeContext {
            policing: crate::policy::Policing::of(set.policy_objects(), "node1"),
            ..node()
        };
        translate(&set.services, &set.endpoint_slices, &node)
    }

    const WEB_POD_NODE1: &str = "---\napiVersion: v1\nkind: Pod\n\
        metadata: {namespace: default, name: web-1, labels: {app: web}}\n\
        spec: {nodeName: node1, containers: []}\nstatus: {podIP: 10.0.1.1}\n";
    const DENY_WEB: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
        metadata: {namespace: default, name: deny-one}\n\
        spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0, except: [192.0.2.66/32]}}]}]}\n";

    #[test]
    fn a_local_backend_under_network_policy_is_policed_and_remote_ones_are_not() {
        let t = run_policed(&(web("NodePort") + WEB_POD_NODE1 + DENY_WEB));
        let f = &t.desired.frontends[&fe("192.0.2.1", 30080, Protocol::Tcp)];
        let mut local = be("10.0.1.1", 8080, true);
        local.policed = true;
        assert_eq!(f.backends, [local, be("10.0.2.1", 8080, false)]);
        assert_eq!(
            t.policed
                .get(&"10.0.1.1".parse().unwrap())
                .map(String::as_str),
            Some("NetworkPolicy default/deny-one")
        );
        // Without the policy (or with policy enforced elsewhere) nothing is.
        let t = run_policed(&(web("NodePort") + WEB_POD_NODE1));
        assert!(t.policed.is_empty());
        assert_eq!(
            t.desired.frontends[&fe("192.0.2.1", 30080, Protocol::Tcp)].backends,
            [be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)]
        );
    }

    #[test]
    fn session_affinity_with_a_policed_backend_is_left_to_kube_proxy() {
        let sticky = web("NodePort").replace(
            "spec: {type: NodePort,",
            "spec: {type: NodePort, sessionAffinity: ClientIP,",
        );
        let t = run_policed(&(sticky.clone() + WEB_POD_NODE1 + DENY_WEB));
        assert!(t.desired.frontends.is_empty(), "{:?}", t.desired);
        assert!(has_skip(
            &t,
            "default/web",
            "sessionAffinity with a local backend under NetworkPolicy"
        ));
        assert!(t.policed.is_empty());
        let t = run_policed(&(sticky + WEB_POD_NODE1));
        assert_eq!(t.desired.frontends.len(), 1);
    }

    fn local_policy_web(endpoints: &str) -> Translation {
        let yaml = service(
            "default/web",
            &format!(
                "spec: {{type: LoadBalancer, externalTrafficPolicy: Local, ports: {WEB_PORT}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}]}}}}"
            ),
        ) + &slice("default/web", "web-1", WEB_SLICE_PORTS, endpoints);
        run(&yaml)
    }

    #[test]
    fn local_policy_uses_local_endpoints_and_keeps_the_client_address() {
        let t = local_policy_web(TWO_READY);
        for frontend in [
            fe("192.0.2.1", 30080, Protocol::Tcp),
            fe("203.0.113.1", 80, Protocol::Tcp),
        ] {
            let f = &t.desired.frontends[&frontend];
            assert_eq!(f.backends, [be("10.0.1.1", 8080, true)]);
            assert!(f.no_snat && f.drop_if_empty);
        }
    }

    #[test]
    fn local_policy_without_local_endpoints_drops() {
        let t = local_policy_web("[{addresses: [10.0.2.1], nodeName: node2}]");
        assert_eq!(
            frontend_keys(&t),
            [
                fe("192.0.2.1", 30080, Protocol::Tcp),
                fe("203.0.113.1", 80, Protocol::Tcp)
            ]
        );
        for f in t.desired.frontends.values() {
            assert!(f.backends.is_empty() && f.drop_if_empty && f.no_snat);
        }
    }

    #[test]
    fn local_policy_without_any_endpoint_is_left_to_kube_proxy() {
        // kube-proxy rejects (rather than drops) when a Service has no
        // endpoint anywhere.
        for endpoints in [
            "[]",
            "[{addresses: [10.0.1.1], nodeName: node1, conditions: {ready: false}}]",
        ] {
            let t = local_policy_web(endpoints);
            assert!(t.desired.frontends.is_empty(), "{endpoints}");
            assert!(
                has_skip(&t, "default/web", "left to kube-proxy"),
                "{:?}",
                t.skipped
            );
        }
    }

    #[test]
    fn local_policy_falls_back_to_local_terminating_endpoints() {
        let t = local_policy_web(
            "[{addresses: [10.0.1.1], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}, \
              {addresses: [10.0.2.1], nodeName: node2, conditions: {ready: true}}]",
        );
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.1.1", 8080, true)]
        );
        // Ready local endpoints take precedence over terminating ones.
        let t = local_policy_web(
            "[{addresses: [10.0.1.1], nodeName: node1, conditions: {ready: false, serving: true, terminating: true}}, \
              {addresses: [10.0.1.2], nodeName: node1}]",
        );
        assert_eq!(
            backends_of(&t, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [be("10.0.1.2", 8080, true)]
        );
    }

    #[test]
    fn conflicting_frontends_go_to_the_first_service_by_name() {
        let lb = |ns_name: &str, target: u16| {
            let spec = format!(
                "spec: {{type: NodePort, externalIPs: [203.0.113.9], ports: [{{name: http, port: 80, nodePort: {}}}]}}",
                30000 + target
            );
            service(ns_name, &spec)
                + &slice(
                    ns_name,
                    "s-1",
                    &format!("[{{name: http, port: {target}}}]"),
                    "[{addresses: [10.0.0.1]}]",
                )
        };
        let forward = lb("b/second", 2) + &lb("a/first", 1);
        let t = run(&forward);
        let shared = fe("203.0.113.9", 80, Protocol::Tcp);
        assert_eq!(t.desired.frontends[&shared].service, "a/first");
        assert_eq!(backends_of(&t, shared), [be("10.0.0.1", 1, false)]);
        // Their nodePorts do not conflict.
        assert!(t
            .desired
            .frontends
            .contains_key(&fe("192.0.2.1", 30002, Protocol::Tcp)));
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(has_skip(
            &t,
            "b/second",
            "203.0.113.9:80/TCP is already used by a/first"
        ));
    }

    #[test]
    fn conflict_within_one_service_keeps_the_first_port() {
        // The externalIP is the node address, and each port's `port` is the
        // other's nodePort: port b's frontends were all taken by port a.
        let yaml = service(
            "default/odd",
            "spec: {type: NodePort, externalIPs: [192.0.2.1], ports: [\
             {name: a, port: 30081, nodePort: 30080}, {name: b, port: 30080, nodePort: 30081}]}",
        ) + &slice(
            "default/odd",
            "odd-1",
            "[{name: a, port: 1}, {name: b, port: 2}]",
            "[{addresses: [10.0.0.1]}]",
        );
        let t = run(&yaml);
        assert_eq!(
            t.desired.frontends[&fe("192.0.2.1", 30080, Protocol::Tcp)].port_name,
            "a"
        );
        assert_eq!(
            t.desired.frontends[&fe("192.0.2.1", 30081, Protocol::Tcp)].port_name,
            "a"
        );
        assert_eq!(frontend_keys(&t).len(), 2);
        let conflicts = t.skipped.iter().filter(|s| {
            s.reason.starts_with("port \"b\"") && s.reason.contains("already used by default/odd")
        });
        assert_eq!(conflicts.count(), 2, "{:?}", t.skipped);
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let yaml = web("NodePort")
            + &slice("default/web", "web-2", WEB_SLICE_PORTS, "[{addresses: [10.0.1.1], nodeName: node1, conditions: {ready: false}}, {addresses: [10.0.0.7]}]")
            + &service("a/other", "spec: {type: NodePort, externalIPs: [203.0.113.9], ports: [{name: http, port: 80, nodePort: 31000}]}")
            + &service("z/last", "spec: {type: NodePort, externalIPs: [203.0.113.9], ports: [{name: http, port: 80, nodePort: 31001}]}")
            + &slice("a/other", "o-1", WEB_SLICE_PORTS, "[{addresses: [10.1.0.1]}]")
            + &slice("z/last", "l-1", WEB_SLICE_PORTS, "[{addresses: [10.2.0.1]}]");
        let (mut services, mut slices) = objects(&yaml);
        let first = translate(&services, &slices, &node());
        services.reverse();
        slices.reverse();
        let second = translate(&services, &slices, &node());
        assert_eq!(first, second);
        assert_eq!(
            first.desired.frontends[&fe("203.0.113.9", 80, Protocol::Tcp)].service,
            "a/other"
        );
        // Merged duplicate 10.0.1.1: ready in one slice, not in the other.
        assert_eq!(
            backends_of(&first, fe("192.0.2.1", 30080, Protocol::Tcp)),
            [
                be("10.0.0.7", 8080, false),
                be("10.0.1.1", 8080, true),
                be("10.0.2.1", 8080, false)
            ]
        );
    }

    #[test]
    fn duplicate_service_objects_use_the_first() {
        let yaml = web("NodePort")
            + &service(
                "default/web",
                "spec: {type: NodePort, ports: [{name: http, port: 80, nodePort: 30999}]}",
            );
        let t = run(&yaml);
        assert_eq!(frontend_keys(&t), [fe("192.0.2.1", 30080, Protocol::Tcp)]);
        assert!(has_skip(&t, "default/web", "duplicate"), "{:?}", t.skipped);
    }

    #[test]
    fn accelerate_annotation() {
        let annotated = |value: &str| {
            web("NodePort").replace(
                "{namespace: default, name: web}",
                &format!("{{namespace: default, name: web, annotations: {{forwarder.dev/accelerate: '{value}'}}}}"),
            )
        };
        let t = run(&annotated("false"));
        assert!(t.desired.frontends.is_empty());
        assert!(has_skip(&t, "default/web", "\"false\""), "{:?}", t.skipped);

        let t = run(&annotated("maybe"));
        assert!(t.desired.frontends.is_empty());
        assert!(has_skip(&t, "default/web", "\"maybe\""), "{:?}", t.skipped);

        let select = |yaml: &str, selection| {
            let (services, slices) = objects(yaml);
            translate_with(&services, &slices, &node(), selection)
        };
        let t = select(&web("NodePort"), ServiceSelection::Annotated);
        assert!(t.desired.frontends.is_empty());
        assert_eq!(t.ignored_services, 1);
        assert!(t.skipped.is_empty());
        let t = select(&annotated("true"), ServiceSelection::Annotated);
        assert_eq!(frontend_keys(&t), [fe("192.0.2.1", 30080, Protocol::Tcp)]);
        let t = select(&annotated("false"), ServiceSelection::Annotated);
        assert!(t.desired.frontends.is_empty());
        let t = select(&annotated("true"), ServiceSelection::All);
        assert_eq!(t.desired.frontends.len(), 1);
    }

    #[test]
    fn out_of_range_numbers_are_skipped_not_panicking() {
        let yaml = service(
            "default/bad",
            "spec: {type: LoadBalancer, externalIPs: [bogus], ports: [\
             {name: a, port: 0, nodePort: 70000}, {name: b, port: 80, nodePort: -1}, {name: c, port: 81, nodePort: 30081}]}\n\
             status: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}",
        ) + &slice(
            "default/bad",
            "bad-1",
            "[{name: a, port: 1}, {name: b, port: 65536}, {name: c}]",
            "[{addresses: [10.0.0.1]}]",
        );
        let t = run(&yaml);
        // a: no valid frontend; b: LB frontend but its slice port is invalid;
        // c: slice port has no number.
        assert!(t.desired.frontends.is_empty(), "{:?}", t.desired);
        assert!(
            has_skip(&t, "default/bad", "invalid nodePort 70000"),
            "{:?}",
            t.skipped
        );
        assert!(
            has_skip(&t, "default/bad", "invalid port 0"),
            "{:?}",
            t.skipped
        );
        assert!(
            has_skip(&t, "default/bad", "\"bogus\" is not an IP"),
            "{:?}",
            t.skipped
        );
    }

    #[test]
    fn cluster_ip_service_external_ips_are_served_on_the_service_port() {
        for service_type in ["type: ClusterIP, ", ""] {
            // A nodePort on a ClusterIP Service is invalid (the API refuses
            // it): not served.
            let yaml = service(
                "default/web",
                &format!(
                    "spec: {{{service_type}clusterIP: 10.96.0.10, externalIPs: [203.0.113.9, '2001:db8::9'], ports: {WEB_PORT}}}"
                ),
            ) + &slice("default/web", "web-1", WEB_SLICE_PORTS, TWO_READY);
            let t = run(&yaml);
            assert_eq!(
                frontend_keys(&t),
                [fe("203.0.113.9", 80, Protocol::Tcp)],
                "{service_type:?}"
            );
            let f = &t.desired.frontends[&fe("203.0.113.9", 80, Protocol::Tcp)];
            assert_eq!(
                f.backends,
                [be("10.0.1.1", 8080, true), be("10.0.2.1", 8080, false)]
            );
            assert!(!f.no_snat && !f.drop_if_empty, "Cluster policy");
            assert_eq!(f.label(), "default/web:http");
            assert!(t.skipped.is_empty(), "{:?}", t.skipped);
            assert_eq!(t.ignored_services, 0);
        }
    }

    #[test]
    fn external_ips_of_headless_and_external_name_services_are_not_served() {
        let yaml = service(
            "default/headless",
            "spec: {clusterIP: None, externalIPs: [203.0.113.9], ports: [{name: http, port: 80}]}",
        ) + &slice("default/headless", "h-1", WEB_SLICE_PORTS, TWO_READY)
            + &service(
                "default/ext",
                "spec: {type: ExternalName, externalName: example.com, externalIPs: [203.0.113.10], ports: [{name: http, port: 80}]}",
            )
            + &slice("default/ext", "e-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        assert!(t.desired.frontends.is_empty(), "{:?}", t.desired);
        assert_eq!(t.ignored_services, 2);
    }

    #[test]
    fn local_policy_applies_to_a_cluster_ip_service_external_ips() {
        // kube-proxy's ExternalPolicyLocal: externally accessible (a
        // ClusterIP Service with externalIPs is) and Local.
        let yaml = service(
            "default/web",
            &format!(
                "spec: {{type: ClusterIP, externalTrafficPolicy: Local, externalIPs: [203.0.113.9], ports: {WEB_PORT}}}"
            ),
        ) + &slice("default/web", "web-1", WEB_SLICE_PORTS, TWO_READY);
        let t = run(&yaml);
        let f = &t.desired.frontends[&fe("203.0.113.9", 80, Protocol::Tcp)];
        assert_eq!(f.backends, [be("10.0.1.1", 8080, true)]);
        assert!(f.no_snat && f.drop_if_empty);
    }

    fn with_affinity(affinity: &str) -> Translation {
        let yaml = service(
            "default/web",
            &format!(
                "spec: {{type: LoadBalancer, {affinity}externalIPs: [203.0.113.9], ports: {WEB_PORT}}}\n\
                 status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}]}}}}"
            ),
        ) + &slice("default/web", "web-1", WEB_SLICE_PORTS, TWO_READY);
        run(&yaml)
    }

    #[test]
    fn session_affinity_client_ip_carries_its_timeout_on_every_frontend() {
        for (affinity, want) in [
            ("", 0),
            ("sessionAffinity: None, ", 0),
            ("sessionAffinity: ClientIP, ", DEFAULT_AFFINITY_TIMEOUT_S),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {}}, ",
                DEFAULT_AFFINITY_TIMEOUT_S,
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ",
                60,
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}, ",
                86_400,
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}, ",
                1,
            ),
        ] {
            let t = with_affinity(affinity);
            assert_eq!(t.desired.frontends.len(), 3, "{affinity}");
            for (addr, f) in &t.desired.frontends {
                assert_eq!(f.affinity_timeout_s, want, "{affinity} {addr}");
            }
            assert!(t.skipped.is_empty(), "{affinity}: {:?}", t.skipped);
        }
    }

    #[test]
    fn invalid_session_affinity_leaves_the_service_to_kube_proxy() {
        for (affinity, needle) in [
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ",
                "timeoutSeconds 0 is outside 1..=86400",
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ",
                "timeoutSeconds 86401 is outside",
            ),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: -5}}, ",
                "timeoutSeconds -5 is outside",
            ),
            (
                "sessionAffinity: Cookie, ",
                "sessionAffinity \"Cookie\" is neither",
            ),
        ] {
            let t = with_affinity(affinity);
            assert!(t.desired.frontends.is_empty(), "{affinity}: {:?}", t.desired);
            assert!(has_skip(&t, "default/web", needle), "{:?}", t.skipped);
            assert!(
                has_skip(&t, "default/web", "left to kube-proxy"),
                "{:?}",
                t.skipped
            );
            assert_eq!(t.skipped.len(), 1, "one reason per Service: {:?}", t.skipped);
        }
    }
}
