//! Health endpoints (`/healthz`, `/livez`) and Prometheus `/metrics`.
//!
//! Datapath counters are read from the pinned maps on each scrape, so they
//! are right even across daemon restarts; the daemon's own metrics
//! (reconciles, source updates) live in this process.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use forwarder_common::{map_names, Reason};
use log::warn;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use serde::Serialize;

use crate::{datapath::Attached, inspect, maps::Maps};

/// What `/healthz` and `/livez` answer from, updated by the daemon loop.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    last_programmed: Mutex<Option<SystemTime>>,
    /// When a change arrived that is not programmed yet.
    pending_since: Mutex<Option<SystemTime>>,
    /// Unix seconds of the daemon loop's last pass.
    heartbeat: AtomicU64,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Health {
            timeout,
            last_programmed: Mutex::new(None),
            pending_since: Mutex::new(None),
            heartbeat: AtomicU64::new(0),
        }
    }

    pub fn beat(&self) {
        self.heartbeat
            .store(unix(SystemTime::now()), Ordering::Relaxed);
    }

    /// A change is waiting to be programmed (kept from its first arrival).
    pub fn pending(&self) {
        let mut p = self.pending_since.lock().unwrap_or_else(|e| e.into_inner());
        p.get_or_insert_with(SystemTime::now);
    }

    pub fn programmed(&self) {
        *self
            .last_programmed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
        *self.pending_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// kube-proxy's rule: healthy unless a change has waited longer than the
    /// timeout; never healthy before the first programming.
    pub fn report(&self, now: SystemTime) -> (bool, HealthBody) {
        let last = *self
            .last_programmed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let pending = *self.pending_since.lock().unwrap_or_else(|e| e.into_inner());
        let late =
            pending.is_some_and(|p| now.duration_since(p).unwrap_or_default() > self.timeout);
        let healthy = last.is_some() && !late;
        (
            healthy,
            HealthBody {
                last_updated: last.map(rfc3339).unwrap_or_default(),
                current_time: rfc3339(now),
                pending_since: pending.map(rfc3339),
            },
        )
    }

    pub fn alive(&self, now: SystemTime) -> bool {
        let beat = self.heartbeat.load(Ordering::Relaxed);
        beat != 0 && unix(now).saturating_sub(beat) <= 10
    }
}

/// The JSON kube-proxy's /healthz answers with, in its field names.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub last_updated: String,
    pub current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_since: Option<String>,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The daemon's own metrics.
#[derive(Debug, Default)]
pub struct DaemonMetrics {
    pub reconcile_seconds: ReconcileHistogram,
    pub reconciles_ok: Counter,
    pub reconciles_failed: Counter,
    pub source_updates: Counter,
    pub source_problems: Gauge,
    pub pending: Gauge,
    pub services_skipped: crate::skips::SkippedGauges,
    pub sweep_seconds: ReconcileHistogram,
    pub sweep_walks_cut: Counter,
}

#[derive(Debug)]
pub struct ReconcileHistogram(pub Histogram);

impl Default for ReconcileHistogram {
    fn default() -> Self {
        ReconcileHistogram(Histogram::new(exponential_buckets(0.0005, 2.0, 16)))
    }
}

/// Reads the pinned maps on each scrape.
#[derive(Debug)]
struct DatapathCollector {
    pin_dir: PathBuf,
    object_hash: u64,
}

fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    rows: impl IntoIterator<Item = (Vec<(&'a str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, ty)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        family(
            &mut encoder,
            "forwarder_build_info",
            "Version of the daemon and hash of its eBPF object",
            MetricType::Gauge,
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("object_hash", format!("{:016x}", self.object_hash)),
                ],
                ConstGauge::new(1i64),
            )],
        )?;
        use crate::kube_source::{WATCH_ERRORS, WATCH_EVENTS, WATCH_RELISTS};
        family(
            &mut encoder,
            "forwarder_watch_events",
            "Kubernetes watch events received (list items, changes, deletions)",
            MetricType::Counter,
            [(
                vec![],
                ConstCounter::new(WATCH_EVENTS.load(Ordering::Relaxed)),
            )],
        )?;
        family(
            &mut encoder,
            "forwarder_watch_errors",
            "Failed Kubernetes lists and watches (retried with backoff)",
            MetricType::Counter,
            [(
                vec![],
                ConstCounter::new(WATCH_ERRORS.load(Ordering::Relaxed)),
            )],
        )?;
        family(
            &mut encoder,
            "forwarder_watch_relists",
            "Routine Kubernetes relists: an expired watch (410 Gone), or a relist falling back to a consistent read",
            MetricType::Counter,
            [(
                vec![],
                ConstCounter::new(WATCH_RELISTS.load(Ordering::Relaxed)),
            )],
        )?;
        let maps = match Maps::open_pinned(&self.pin_dir) {
            Ok(m) => m,
            Err(e) => {
                warn!("metrics: {e:#}");
                return Ok(());
            }
        };
        let Ok(report) = inspect::services(&maps) else {
            return Ok(());
        };
        let svc = |f: fn(&inspect::ServiceRow) -> u64| {
            report.iter().map(move |s| {
                (
                    vec![("service", s.service.clone())],
                    ConstCounter::new(f(s)),
                )
            })
        };
        family(
            &mut encoder,
            "forwarder_service_packets",
            "Packets forwarded per service port",
            MetricType::Counter,
            svc(|s| s.packets),
        )?;
        family(
            &mut encoder,
            "forwarder_service_bytes",
            "Bytes forwarded per service port",
            MetricType::Counter,
            svc(|s| s.bytes),
        )?;
        let backends: Vec<&inspect::BackendRow> = {
            let mut seen = std::collections::BTreeSet::new();
            report
                .iter()
                .flat_map(|s| s.backends.iter())
                .filter(|b| seen.insert(b.backend.clone()))
                .collect()
        };
        let be = |f: fn(&inspect::BackendRow) -> u64| {
            backends.iter().map(move |b| {
                (
                    vec![("backend", b.backend.clone())],
                    ConstCounter::new(f(b)),
                )
            })
        };
        family(
            &mut encoder,
            "forwarder_backend_packets",
            "Packets forwarded per backend (address:port)",
            MetricType::Counter,
            be(|b| b.packets),
        )?;
        family(
            &mut encoder,
            "forwarder_backend_bytes",
            "Bytes forwarded per backend (address:port)",
            MetricType::Counter,
            be(|b| b.bytes),
        )?;
        if let Ok(reasons) = maps.reason_totals() {
            let rows = Reason::ALL.iter().map(|r| {
                let kind = if r.is_drop() {
                    "drop"
                } else if r.name().starts_with("pass_") {
                    "pass"
                } else if r.name().starts_with("ct_") {
                    "conntrack"
                } else if !r.is_verdict() {
                    "event"
                } else {
                    "forward"
                };
                (
                    vec![
                        ("reason", r.name().to_string()),
                        ("verdict", kind.to_string()),
                    ],
                    ConstCounter::new(reasons.get(r.name()).copied().unwrap_or(0)),
                )
            });
            family(
                &mut encoder,
                "forwarder_datapath_packets",
                "Datapath decisions by reason",
                MetricType::Counter,
                rows,
            )?;
        }
        if let Ok(reasons) = maps.reason_totals() {
            family(
                &mut encoder,
                "forwarder_conntrack_evictions",
                "Conntrack entries lost to LRU pressure, by table (inferred at each sweep from the datapath's insert and delete counts and the entries found; half_open: handshakes not completed, established: live flows)",
                MetricType::Counter,
                [
                    ("half_open", Reason::CtHalfOpenEvicted),
                    ("established", Reason::CtEstablishedEvicted),
                ]
                .map(|(table, r)| {
                    (
                        vec![("table", table.to_string())],
                        ConstCounter::new(reasons.get(r.name()).copied().unwrap_or(0)),
                    )
                }),
            )?;
        }
        if let Ok(passes) = maps.flow_pass_totals() {
            family(
                &mut encoder,
                "forwarder_flow_packets_to_kernel",
                "Packets of tracked flows handed to the kernel, by reason (netfilter sees them mid-flow)",
                MetricType::Counter,
                passes.iter().map(|(reason, n)| {
                    (
                        vec![("reason", reason.to_string())],
                        ConstCounter::new(*n),
                    )
                }),
            )?;
        }
        if let Ok(fill) = inspect::map_fill(&maps, &self.pin_dir) {
            family(
                &mut encoder,
                "forwarder_map_entries",
                "Entries in each BPF hash map",
                MetricType::Gauge,
                fill.iter().map(|m| {
                    (
                        vec![("map", m.name.to_string())],
                        ConstGauge::new(m.entries as i64),
                    )
                }),
            )?;
            family(
                &mut encoder,
                "forwarder_map_capacity",
                "Capacity of each BPF hash map",
                MetricType::Gauge,
                fill.iter().map(|m| {
                    (
                        vec![("map", m.name.to_string())],
                        ConstGauge::new(m.capacity as i64),
                    )
                }),
            )?;
            let ct_entries: usize = fill
                .iter()
                .filter(|m| matches!(m.name, map_names::CONNTRACK | map_names::CT_HALF_OPEN))
                .map(|m| m.entries)
                .sum();
            family(
                &mut encoder,
                "forwarder_conntrack_entries",
                "Conntrack entries, both tables (a flow has two)",
                MetricType::Gauge,
                [(vec![], ConstGauge::new(ct_entries as i64))],
            )?;
        }
        if let Ok(ifaces) = inspect::interfaces(&maps, &self.pin_dir) {
            family(
                &mut encoder,
                "forwarder_interface_info",
                "Devices the datapath is attached to, with their role and XDP mode",
                MetricType::Gauge,
                ifaces.iter().map(|i| {
                    (
                        vec![
                            ("interface", i.name.clone()),
                            ("role", i.role.to_string()),
                            ("mode", i.mode.map_or("tc", Attached::name).to_string()),
                        ],
                        ConstGauge::new(1i64),
                    )
                }),
            )?;
        }
        Ok(())
    }
}

pub fn registry(pin_dir: PathBuf, object_hash: u64, daemon: &Arc<DaemonMetrics>) -> Registry {
    let mut r = Registry::default();
    r.register(
        "forwarder_reconcile_duration_seconds",
        "Time to translate and program one change",
        daemon.reconcile_seconds.0.clone(),
    );
    r.register(
        "forwarder_reconciles_succeeded",
        "Reconciles that programmed the desired state",
        daemon.reconciles_ok.clone(),
    );
    r.register(
        "forwarder_reconciles_failed",
        "Reconciles that failed (the previous state is kept)",
        daemon.reconciles_failed.clone(),
    );
    r.register(
        "forwarder_source_updates",
        "Object snapshots received from the source (watch events, coalesced)",
        daemon.source_updates.clone(),
    );
    r.register(
        "forwarder_source_problems",
        "Objects the source could not use in its last snapshot",
        daemon.source_problems.clone(),
    );
    r.register(
        "forwarder_reconcile_pending",
        "1 while a change waits to be programmed",
        daemon.pending.clone(),
    );
    r.register(
        "forwarder_conntrack_sweep_duration_seconds",
        "Time to walk the conntrack table and delete its idle entries (on a thread of its own)",
        daemon.sweep_seconds.0.clone(),
    );
    r.register(
        "forwarder_conntrack_sweep_walks_cut",
        "Sweeps whose walk of the conntrack table stopped at its step bound (entries churned under it)",
        daemon.sweep_walks_cut.clone(),
    );
    // Every reason's series exists (at 0) before the first translation.
    crate::skips::set_gauges(&daemon.services_skipped, &Default::default());
    r.register(
        crate::skips::METRIC,
        "Services with a port or address not accelerated (left to kube-proxy), by reason",
        daemon.services_skipped.clone(),
    );
    r.register_collector(Box::new(DatapathCollector {
        pin_dir,
        object_hash,
    }));
    r
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let (ok, body) = health.report(SystemTime::now());
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.alive(SystemTime::now()) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon loop is stuck\n",
        )
    }
}

/// Serves `/healthz` and `/livez` on `addr` until the process ends.
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --health-addr {addr}"))?;
    axum::serve(listener, app).await.context("health server")
}

/// Serves Prometheus `/metrics` on `addr` until the process ends.
pub async fn serve_metrics(addr: SocketAddr, registry: Registry) -> Result<()> {
    let registry = Arc::new(registry);
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [("content-type", "text/plain")],
                        e.to_string(),
                    ),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-addr {addr}"))?;
    axum::serve(listener, app).await.context("metrics server")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhealthy_before_programming_and_when_a_change_waits_too_long() {
        let h = Health::new(Duration::from_secs(2));
        let t0 = SystemTime::now();
        assert!(!h.report(t0).0, "healthy before anything was programmed");
        h.programmed();
        assert!(h.report(t0).0);
        h.pending();
        assert!(
            h.report(SystemTime::now()).0,
            "a fresh pending change is fine"
        );
        let (ok, body) = h.report(SystemTime::now() + Duration::from_secs(3));
        assert!(!ok, "a change pending for 3 s with a 2 s timeout");
        assert!(body.pending_since.is_some());
        h.programmed();
        assert!(h.report(SystemTime::now() + Duration::from_secs(3)).0);
    }

    #[test]
    fn body_uses_kube_proxy_field_names() {
        let h = Health::new(Duration::from_secs(1));
        h.programmed();
        let (_, body) = h.report(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["currentTime"], "2023-11-14T22:13:20Z");
        assert!(json["lastUpdated"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn liveness_follows_the_heartbeat() {
        let h = Health::new(Duration::from_secs(1));
        assert!(!h.alive(SystemTime::now()));
        h.beat();
        assert!(h.alive(SystemTime::now()));
        assert!(!h.alive(SystemTime::now() + Duration::from_secs(30)));
    }
}
