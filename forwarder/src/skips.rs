//! Services the translation did not accelerate (left to kube-proxy), as an
//! operator follows them: counted by a small fixed set of reasons for the
//! `forwarder_services_skipped{reason}` metric and `forwarder status`, and
//! logged only when a Service's reasons change, not on every reconcile.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use log::info;
use prometheus_client::metrics::{family::Family, gauge::Gauge};

use crate::translate::Skipped;

/// The metric's name.
pub const METRIC: &str = "forwarder_services_skipped";

/// Why a Service (or a port or address of it) is not accelerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// A port without ready or terminating endpoints: kube-proxy rejects.
    NoEndpoints,
    /// Annotated `forwarder.dev/accelerate: "false"`.
    OptedOut,
    /// The annotation has a value other than "true" or "false".
    BadAnnotation,
    /// A protocol the datapath does not carry (SCTP).
    Protocol,
    /// `loadBalancerSourceRanges`: kube-proxy's source filter stays in charge.
    SourceRanges,
    /// sessionAffinity with a backend under NetworkPolicy: kube-proxy
    /// carries that backend's flows, so it keeps the whole port.
    Policed,
    /// A frontend another Service already uses, or a duplicate object.
    Conflict,
    /// A field the translation cannot use (an invalid port or address, no
    /// nodePort, no name).
    Invalid,
    /// A reason this build does not classify.
    Other,
}

impl SkipReason {
    pub const ALL: [SkipReason; 9] = [
        SkipReason::NoEndpoints,
        SkipReason::OptedOut,
        SkipReason::BadAnnotation,
        SkipReason::Protocol,
        SkipReason::SourceRanges,
        SkipReason::Policed,
        SkipReason::Conflict,
        SkipReason::Invalid,
        SkipReason::Other,
    ];

    /// The metric's `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::NoEndpoints => "no_endpoints",
            SkipReason::OptedOut => "opted_out",
            SkipReason::BadAnnotation => "bad_annotation",
            SkipReason::Protocol => "protocol",
            SkipReason::SourceRanges => "source_ranges",
            SkipReason::Policed => "policed",
            SkipReason::Conflict => "conflict",
            SkipReason::Invalid => "invalid",
            SkipReason::Other => "other",
        }
    }

    /// The category of one of the translation's reasons (its text: the
    /// translation words each reason in one fixed way; the unit tests below
    /// run the translation for every category).
    pub fn of(reason: &str) -> SkipReason {
        let has = |needle: &str| reason.contains(needle);
        if has("no ready or terminating endpoints") {
            SkipReason::NoEndpoints
        } else if has("accelerate: \"false\"") {
            SkipReason::OptedOut
        } else if has("expected \"true\" or \"false\"") {
            SkipReason::BadAnnotation
        } else if has("is not accelerated") && has("protocol") {
            SkipReason::Protocol
        } else if has("loadBalancerSourceRanges") {
            SkipReason::SourceRanges
        } else if has("under NetworkPolicy") {
            SkipReason::Policed
        } else if has("is already used by") || has("duplicate Service") {
            SkipReason::Conflict
        } else if has("invalid ")
            || has("is not an IP address")
            || has("is not IPv4")
            || has("no nodePort")
            || has("without metadata.name")
        {
            SkipReason::Invalid
        } else {
            SkipReason::Other
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Services (`namespace/name`) with at least one skip of each reason.
pub type SkipCounts = BTreeMap<SkipReason, usize>;

/// The gauges behind `forwarder_services_skipped{reason=...}`.
pub type SkippedGauges = Family<Vec<(String, String)>, Gauge>;

/// Sets every reason's gauge (0 for those absent), so each series exists
/// from the start and drops back to 0.
pub fn set_gauges(gauges: &SkippedGauges, counts: &SkipCounts) {
    for reason in SkipReason::ALL {
        let n = counts.get(&reason).copied().unwrap_or(0);
        gauges
            .get_or_create(&vec![("reason".to_string(), reason.name().to_string())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// What was skipped at the last translation, to log changes only.
#[derive(Debug, Default)]
pub struct SkipLog {
    /// The reasons of each skipped Service, as last logged.
    reasons: BTreeMap<String, BTreeSet<String>>,
    counts: SkipCounts,
}

impl SkipLog {
    /// Takes a translation's skips: logs each Service whose reasons differ
    /// from the previous translation (new, changed, or no longer skipped),
    /// and recounts. Returns how many Services were logged.
    pub fn update(&mut self, skipped: &[Skipped]) -> usize {
        let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in skipped {
            now.entry(s.service.clone())
                .or_default()
                .insert(s.reason.clone());
        }
        let mut logged = 0;
        for (service, reasons) in &now {
            if self.reasons.get(service) != Some(reasons) {
                let text: Vec<&str> = reasons.iter().map(String::as_str).collect();
                info!("not accelerated: {service}: {}", text.join("; "));
                logged += 1;
            }
        }
        for service in self.reasons.keys().filter(|s| !now.contains_key(*s)) {
            info!("{service}: no longer skipped (accelerated, or gone)");
            logged += 1;
        }
        let mut by_reason: BTreeMap<SkipReason, BTreeSet<&str>> = BTreeMap::new();
        for s in skipped {
            by_reason
                .entry(SkipReason::of(&s.reason))
                .or_default()
                .insert(s.service.as_str());
        }
        self.counts = by_reason.into_iter().map(|(r, s)| (r, s.len())).collect();
        self.reasons = now;
        logged
    }

    /// Services per reason at the last [`SkipLog::update`].
    pub fn counts(&self) -> &SkipCounts {
        &self.counts
    }
}

/// `forwarder_services_skipped` per reason from a Prometheus text exposition.
pub fn parse_metrics(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(METRIC).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let reason = labels.split(',').find_map(|l| {
            l.trim()
                .strip_prefix("reason=\"")
                .and_then(|v| v.strip_suffix('"'))
        });
        if let (Some(reason), Ok(value)) = (reason, value.trim().parse::<f64>()) {
            out.insert(reason.to_string(), value as u64);
        }
    }
    out
}

/// Reads the running daemon's skipped Services from its `/metrics` (the
/// counts live in the daemon, not in the pinned maps).
pub fn fetch_counts(addr: SocketAddr, timeout: Duration) -> Result<BTreeMap<String, u64>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to the daemon's metrics at {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading http://{addr}/metrics"))?;
    let status = response.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("http://{addr}/metrics answered {status:?}");
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let counts = parse_metrics(body);
    if counts.is_empty() {
        bail!("http://{addr}/metrics has no {METRIC} (another program on that port?)");
    }
    Ok(counts)
}

/// The address `forwarder status` asks: a wildcard listen address is asked
/// on loopback.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// The `forwarder status` lines for the skipped Services.
pub fn render(counts: &Result<BTreeMap<String, u64>>) -> String {
    match counts {
        Ok(counts) => {
            let total: Vec<String> = counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            if total.is_empty() {
                "Skipped Services (left to kube-proxy): none\n".to_string()
            } else {
                format!(
                    "Skipped Services (left to kube-proxy), by reason: {}\n",
                    total.join(", ")
                )
            }
        }
        Err(e) => format!("Skipped Services: unknown ({e:#})\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        manifest,
        model::NodeContext,
        translate::{translate_with, ServiceSelection},
    };

    fn translate_yaml(yaml: &str, selection: ServiceSelection) -> Vec<Skipped> {
        let set = manifest::parse_str(std::path::Path::new("test.yaml"), yaml);
        assert!(set.problems.is_empty(), "{:?}", set.problems);
        let node = NodeContext {
            node_name: "node1".into(),
            node_addresses: vec![std::net::Ipv4Addr::new(192, 0, 2, 1)],
            policing: crate::policy::Policing::of(set.policy_objects(), "node1"),
        };
        translate_with(&set.services, &set.endpoint_slices, &node, selection).skipped
    }

    fn service(name: &str, annotations: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{namespace: default, name: {name}, annotations: {{{annotations}}}}}\nspec: {spec}\n"
        )
    }

    fn slice(service: &str, addresses: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\nmetadata: {{namespace: default, name: {service}-x, labels: {{kubernetes.io/service-name: {service}}}}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{{addresses: [{addresses}]}}]\n"
        )
    }

    const PORT: &str = "[{name: http, port: 80, protocol: TCP, nodePort: 30080, targetPort: 8080}]";

    /// Every reason the translation gives, from real objects, lands in its
    /// category (and none in `other`).
    #[test]
    fn the_translation_reasons_fall_into_their_categories() {
        let cases: Vec<(SkipReason, String)> = vec![
            (
                SkipReason::NoEndpoints,
                service("a", "", &format!("{{type: NodePort, ports: {PORT}}}")),
            ),
            (
                SkipReason::OptedOut,
                service(
                    "a",
                    "forwarder.dev/accelerate: 'false'",
                    &format!("{{type: NodePort, ports: {PORT}}}"),
                ),
            ),
            (
                SkipReason::BadAnnotation,
                service(
                    "a",
                    "forwarder.dev/accelerate: 'maybe'",
                    &format!("{{type: NodePort, ports: {PORT}}}"),
                ),
            ),
            (
                SkipReason::Protocol,
                service(
                    "a",
                    "",
                    "{type: NodePort, ports: [{port: 80, protocol: SCTP, nodePort: 30080}]}",
                ),
            ),
            (
                SkipReason::SourceRanges,
                service(
                    "a",
                    "",
                    &format!("{{type: LoadBalancer, loadBalancerSourceRanges: [10.0.0.0/8], ports: {PORT}}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.7}}]}}}}"),
                ) + &slice("a", "10.244.1.5"),
            ),
            (
                SkipReason::Policed,
                service(
                    "a",
                    "",
                    &format!("{{type: NodePort, sessionAffinity: ClientIP, ports: {PORT}}}"),
                ) + &slice("a", "10.244.1.5").replace("]}]", "], nodeName: node1}]")
                    + "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: default, name: p}\nspec: {}\n",
            ),
            (
                SkipReason::Conflict,
                service("a", "", &format!("{{type: NodePort, ports: {PORT}}}"))
                    + &service("b", "", &format!("{{type: NodePort, ports: {PORT}}}"))
                    + &slice("a", "10.244.1.5")
                    + &slice("b", "10.244.1.6"),
            ),
            (
                SkipReason::Invalid,
                service(
                    "a",
                    "",
                    "{type: NodePort, ports: [{name: http, port: 80, protocol: TCP}]}",
                ),
            ),
            (
                SkipReason::Invalid,
                service(
                    "a",
                    "",
                    &format!("{{type: NodePort, externalIPs: [bogus], ports: {PORT}}}"),
                ) + &slice("a", "10.244.1.5"),
            ),
        ];
        for (want, yaml) in cases {
            let skipped = translate_yaml(&yaml, ServiceSelection::All);
            assert!(!skipped.is_empty(), "{want}: nothing skipped for\n{yaml}");
            let got: BTreeSet<SkipReason> =
                skipped.iter().map(|s| SkipReason::of(&s.reason)).collect();
            assert!(got.contains(&want), "{want}: {skipped:?}");
            assert!(
                !got.contains(&SkipReason::Other),
                "unclassified: {skipped:?}"
            );
        }
        assert_eq!(SkipReason::of("something new"), SkipReason::Other);
    }

    fn skip(service: &str, reason: &str) -> Skipped {
        Skipped {
            service: service.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn a_service_is_logged_when_its_reasons_change_and_counted_once_per_reason() {
        let mut log = SkipLog::default();
        let no_eps = "port \"http\": no ready or terminating endpoints; left to kube-proxy";
        let first = vec![
            skip("shop/a", no_eps),
            skip(
                "shop/a",
                "port \"dns\": no ready or terminating endpoints; left to kube-proxy",
            ),
            skip("shop/b", no_eps),
        ];
        assert_eq!(log.update(&first), 2, "two Services, logged once each");
        assert_eq!(log.counts().get(&SkipReason::NoEndpoints), Some(&2));
        assert_eq!(log.update(&first), 0, "nothing changed: nothing logged");
        let second = vec![
            skip("shop/a", no_eps),
            skip("shop/b", "annotated forwarder.dev/accelerate: \"false\""),
        ];
        // a lost one of its reasons, b changed reason.
        assert_eq!(log.update(&second), 2);
        assert_eq!(log.counts().get(&SkipReason::NoEndpoints), Some(&1));
        assert_eq!(log.counts().get(&SkipReason::OptedOut), Some(&1));
        assert_eq!(log.update(&second[..1]), 1, "b is no longer skipped");
        assert_eq!(log.counts().get(&SkipReason::OptedOut), None);
    }

    #[test]
    fn gauges_cover_every_reason() {
        let gauges = SkippedGauges::default();
        set_gauges(&gauges, &SkipCounts::from([(SkipReason::NoEndpoints, 3)]));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register(METRIC, "help", gauges.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let parsed = parse_metrics(&text);
        assert_eq!(parsed.len(), SkipReason::ALL.len(), "{text}");
        assert_eq!(parsed["no_endpoints"], 3);
        assert_eq!(parsed["opted_out"], 0);
        assert!(render(&Ok(parsed)).contains("no_endpoints 3"));
        assert!(render(&Ok(BTreeMap::new())).contains("none"));
    }

    #[test]
    fn status_asks_loopback_for_a_wildcard_listener() {
        assert_eq!(
            local_address("0.0.0.0:10269".parse().unwrap()),
            "127.0.0.1:10269".parse().unwrap()
        );
        assert_eq!(
            local_address("192.0.2.1:9000".parse().unwrap()),
            "192.0.2.1:9000".parse().unwrap()
        );
    }
}
