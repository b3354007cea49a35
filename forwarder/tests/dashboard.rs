//! The Grafana dashboard (`deploy/dashboards/forwarder.json`) queries only
//! metrics the daemon exports. The daemon's own metrics come from its real
//! registry, encoded in-process; the datapath's (read from the pinned maps
//! on each scrape, so absent without them) from the families observe.rs
//! encodes. `tests/tests/image.rs` checks the same against a running
//! daemon's `/metrics`.
use std::{collections::BTreeSet, path::Path, sync::Arc};

use forwarder::observe::{self, DaemonMetrics};
use serde_json::Value;

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dashboards/forwarder.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard exists");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Sample names a metric family of this type exposes.
fn series(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{name}_total")],
        "histogram" => ["bucket", "sum", "count"]
            .iter()
            .map(|s| format!("{name}_{s}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

/// Series the daemon's registry exposes without pinned maps.
fn registry_series() -> BTreeSet<String> {
    let metrics = Arc::new(DaemonMetrics::default());
    let registry = observe::registry("/nonexistent/forwarder-pins".into(), 0, &metrics);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut parts = l.split_whitespace();
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            series(name, kind)
        })
        .collect()
}

/// Families observe.rs encodes from the maps: `family(&mut encoder, "name",
/// "help", MetricType::Kind, ...)`.
fn datapath_series() -> BTreeSet<String> {
    let source = include_str!("../src/observe.rs");
    let mut out = BTreeSet::new();
    for call in source.split("family(").skip(1) {
        let mut strings = call.split('"');
        let (Some(_), Some(name)) = (strings.next(), strings.next()) else {
            continue;
        };
        let Some(kind) = call
            .split("MetricType::")
            .nth(1)
            .and_then(|k| k.split(|c: char| !c.is_ascii_alphanumeric()).next())
        else {
            continue;
        };
        if name.starts_with("forwarder_") {
            out.extend(series(name, &kind.to_ascii_lowercase()));
        }
    }
    out
}

fn queried(dashboard: &Value) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut stack = vec![dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    let mut rest = expr.as_str();
                    while let Some(at) = rest.find("forwarder_") {
                        let name: String = rest[at..]
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        rest = &rest[at + name.len()..];
                        names.insert(name);
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    names
}

#[test]
fn every_metric_a_panel_queries_is_exported() {
    let registry = registry_series();
    let datapath = datapath_series();
    // The parse finds what it must (else the check below proves nothing).
    for known in [
        "forwarder_service_packets_total",
        "forwarder_datapath_packets_total",
        "forwarder_map_entries",
        "forwarder_watch_relists_total",
    ] {
        assert!(
            datapath.contains(known),
            "{known} not found in {datapath:?}"
        );
    }
    for known in [
        "forwarder_reconcile_duration_seconds_bucket",
        "forwarder_services_skipped",
        "forwarder_reconciles_failed_total",
    ] {
        assert!(
            registry.contains(known),
            "{known} not found in {registry:?}"
        );
    }
    let queried = queried(&dashboard());
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<&String> = queried
        .iter()
        .filter(|m| !registry.contains(*m) && !datapath.contains(*m))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    // And a misspelt name would be caught.
    assert!(
        !registry.contains("forwarder_service_packets")
            && !datapath.contains("forwarder_service_packets")
    );
}

#[test]
fn panels_use_the_datasource_variable_and_have_unique_ids() {
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "duplicate id {}",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(expr.contains("$instance"), "{}: {expr}", p["title"]);
        }
    }
    let variables: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "instance"]);
}
