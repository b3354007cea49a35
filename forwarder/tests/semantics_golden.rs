//! Golden tests of the kube-proxy semantics, end to end on the map level:
//! a YAML fixture of Services and EndpointSlices goes through the same
//! translation the daemon uses, is planned onto empty maps, and the maps
//! that result (frontends -> backend sets, flags, counter labels) are
//! rendered as text and compared with a golden file.
//!
//! Fixtures: `tests/fixtures/semantics/NAME.yaml`; expected maps:
//! `NAME.golden` (or `NAME.CASE.golden` when one fixture is run several
//! ways). `UPDATE_GOLDEN=1 cargo test --test semantics_golden` rewrites the
//! golden files; review the diff before committing it.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use forwarder::{
    manifest,
    model::{NodeContext, Protocol},
    plan::{self, member_key, Snapshot},
    translate::{translate_with, ServiceSelection},
};
use forwarder_common::{BackendKey, BACKEND_F_LOCAL, FRONTEND_F_DROP_IF_EMPTY, FRONTEND_F_NO_SNAT};

/// This node: `node1`, at 192.0.2.1 (and 198.51.100.7 where a case says so).
const NODE_NAME: &str = "node1";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SECOND_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

struct Case {
    fixture: &'static str,
    /// `None`: the golden file is `FIXTURE.golden`; else `FIXTURE.VARIANT.golden`.
    variant: Option<&'static str>,
    selection: ServiceSelection,
    node_addresses: &'static [Ipv4Addr],
}

const fn case(fixture: &'static str) -> Case {
    Case {
        fixture,
        variant: None,
        selection: ServiceSelection::All,
        node_addresses: &[NODE_ADDR],
    }
}

const CASES: &[Case] = &[
    Case {
        node_addresses: &[NODE_ADDR, SECOND_NODE_ADDR],
        ..case("nodeport-lb-externalips")
    },
    case("allocate-lb-nodeports-false"),
    case("several-ports"),
    case("named-target-port"),
    case("multiple-slices"),
    case("duplicate-endpoints"),
    case("ipv6-fqdn-slices"),
    case("terminating-fallback"),
    case("external-traffic-policy-local"),
    case("no-usable-endpoints"),
    Case {
        variant: Some("all"),
        ..case("annotated-selection")
    },
    Case {
        variant: Some("annotated"),
        selection: ServiceSelection::Annotated,
        ..case("annotated-selection")
    },
    case("ignored-service-types"),
    case("cluster-ip-external-ips"),
    case("session-affinity"),
    case("istio-ingressgateway"),
];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/semantics")
}

/// The maps after programming `fixture` onto empty maps.
fn program(case: &Case) -> Snapshot {
    let path = fixtures_dir().join(format!("{}.yaml", case.fixture));
    let set = manifest::load_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        set.problems.is_empty(),
        "{}: {:?}",
        path.display(),
        set.problems
    );
    let node = NodeContext {
        node_name: NODE_NAME.into(),
        node_addresses: case.node_addresses.to_vec(),
        ..Default::default()
    };
    let t = translate_with(&set.services, &set.endpoint_slices, &node, case.selection);
    let empty = Snapshot::default();
    let ops =
        plan::plan(&t.desired, &empty).unwrap_or_else(|e| panic!("{}: plan: {e}", case.fixture));
    let maps = plan::apply_to_snapshot(&empty, &ops);
    // Programming the same objects again must change nothing.
    assert_eq!(
        plan::plan(&t.desired, &maps).map(|ops| ops.len()),
        Ok(0),
        "{}: replanning is not a no-op",
        case.fixture
    );
    maps
}

/// The maps as text, one frontend per line, sorted by address, port and
/// protocol; backend set ids (arbitrary) are left out, their contents shown.
pub fn render(maps: &Snapshot) -> String {
    let mut lines = Vec::new();
    for (key, fe) in &maps.frontends {
        let addr = Ipv4Addr::from(key.addr_be.to_ne_bytes());
        let port = u16::from_be(key.port_be);
        let proto = match Protocol::from_number(key.proto) {
            Some(p) => p.to_string(),
            None => format!("proto{}", key.proto),
        };
        let label = maps
            .labels
            .get(&fe.stats_slot)
            .map(String::as_str)
            .unwrap_or("<no counter label>");
        let mut flags = Vec::new();
        if fe.flags & FRONTEND_F_NO_SNAT != 0 {
            flags.push("no-snat".to_owned());
        }
        if fe.flags & FRONTEND_F_DROP_IF_EMPTY != 0 {
            flags.push("drop-if-empty".to_owned());
        }
        if fe.affinity_timeout_s != 0 {
            flags.push(format!("affinity {}s", fe.affinity_timeout_s));
        }
        let backends: Vec<String> = (0..fe.backend_count)
            .map(|index| {
                match maps.backends.get(&BackendKey {
                    backend_set: fe.backend_set,
                    index,
                }) {
                    Some(b) => {
                        let a = Ipv4Addr::from(b.addr_be.to_ne_bytes());
                        let local = if b.flags & BACKEND_F_LOCAL != 0 {
                            " (local)"
                        } else {
                            ""
                        };
                        // The datapath finds a remembered backend through
                        // the membership: show where it would not.
                        let member = maps.members.get(&member_key(fe.backend_set, b));
                        let unlisted = if fe.affinity_timeout_s != 0 && member != Some(&index) {
                            " <not in the membership>"
                        } else {
                            ""
                        };
                        format!("{a}:{}{local}{unlisted}", u16::from_be(b.port_be))
                    }
                    None => format!("<missing backend {}/{index}>", fe.backend_set),
                }
            })
            .collect();
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", flags.join(", "))
        };
        let backends = if backends.is_empty() {
            "(no backends)".to_owned()
        } else {
            backends.join(", ")
        };
        lines.push((
            (addr, port, proto.clone()),
            format!("{addr}:{port}/{proto} {label}{flags} -> {backends}"),
        ));
    }
    lines.sort();
    let referenced: BTreeSet<u32> = maps.frontends.values().map(|f| f.backend_set).collect();
    let mut out = String::new();
    for (_, line) in &lines {
        out.push_str(line);
        out.push('\n');
    }
    if lines.is_empty() {
        out.push_str("(no frontends)\n");
    }
    let _ = writeln!(
        out,
        "-- {} frontends, {} backend entries in {} sets, {} membership entries, {} counter labels",
        maps.frontends.len(),
        maps.backends.len(),
        referenced.iter().filter(|&&s| s != 0).count(),
        maps.members.len(),
        maps.labels.len()
    );
    out
}

fn golden_path(case: &Case) -> PathBuf {
    let name = match case.variant {
        Some(v) => format!("{}.{v}.golden", case.fixture),
        None => format!("{}.golden", case.fixture),
    };
    fixtures_dir().join(name)
}

#[test]
fn map_contents_match_the_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for case in CASES {
        let got = render(&program(case));
        let path = golden_path(case);
        if update {
            fs::write(&path, &got).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            continue;
        }
        let want = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (UPDATE_GOLDEN=1 writes it; review it)",
                path.display()
            )
        });
        if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{got}",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every fixture and golden file belongs to a case, so none is silently unused.
#[test]
fn every_fixture_is_a_case() {
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for case in CASES {
        expected.insert(format!("{}.yaml", case.fixture));
        let golden = golden_path(case);
        let name = golden.file_name().and_then(|n| n.to_str()).expect("name");
        expected.insert(name.to_owned());
    }
    let found: BTreeSet<String> = fs::read_dir(fixtures_dir())
        .expect("fixture directory")
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect();
    assert_eq!(found, expected);
}

/// The renderer itself: flags, local backends and shared sets are visible.
#[test]
fn rendering_shows_flags_local_backends_and_shared_sets() {
    let yaml = "\
apiVersion: v1
kind: Service
metadata: {name: s, namespace: n}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  ports: [{name: p, port: 80, nodePort: 30000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, namespace: n, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{name: p, port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node1}]
";
    let set = manifest::parse_str(Path::new("inline.yaml"), yaml);
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    let node = NodeContext {
        node_name: NODE_NAME.into(),
        node_addresses: vec![NODE_ADDR, SECOND_NODE_ADDR],
        ..Default::default()
    };
    let t = translate_with(
        &set.services,
        &set.endpoint_slices,
        &node,
        ServiceSelection::All,
    );
    let maps = plan::apply_to_snapshot(
        &Snapshot::default(),
        &plan::plan(&t.desired, &Snapshot::default()).expect("plan"),
    );
    assert_eq!(
        render(&maps),
        "\
192.0.2.1:30000/TCP n/s:p [no-snat, drop-if-empty] -> 10.0.0.1:8080 (local)
198.51.100.7:30000/TCP n/s:p [no-snat, drop-if-empty] -> 10.0.0.1:8080 (local)
-- 2 frontends, 1 backend entries in 1 sets, 0 membership entries, 1 counter labels
"
    );
}
