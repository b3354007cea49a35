//! Golden test: the istio example manifest, read from disk and translated,
//! must give exactly the frontends the demo relies on.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use forwarder::{
    manifest,
    model::{Desired, DesiredBackend, DesiredFrontend, FrontendAddr, NodeContext, Protocol},
    translate::{translate, Translation},
};

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(129, 204, 7, 185);
const POD_NODE1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_NODE2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

/// (port name, Service port, nodePort, pod port) from the example.
const PORTS: [(&str, u16, u16, u16); 9] = [
    ("status-port", 15020, 30937, 15020),
    ("http2", 80, 31380, 80),
    ("https", 443, 31390, 443),
    ("tcp", 31400, 31400, 31400),
    ("https-kiali", 15029, 30721, 15029),
    ("https-prometheus", 15030, 31100, 15030),
    ("https-grafana", 15031, 31773, 15031),
    ("https-tracing", 15032, 30877, 15032),
    ("tls", 15443, 32541, 15443),
];

fn example() -> manifest::ManifestSet {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/istio-ingressgateway.yaml");
    let set = manifest::load_path(&path).expect("example manifest is readable");
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    assert_eq!(set.services.len(), 1);
    assert_eq!(set.endpoint_slices.len(), 1);
    assert_eq!(set.ignored_documents, 0);
    set
}

fn run_on(node_name: &str) -> Translation {
    let set = example();
    let node = NodeContext {
        node_name: node_name.into(),
        node_addresses: vec![NODE_ADDR],
        ..Default::default()
    };
    translate(&set.services, &set.endpoint_slices, &node)
}

fn tcp(addr: Ipv4Addr, port: u16) -> FrontendAddr {
    FrontendAddr {
        addr,
        port,
        proto: Protocol::Tcp,
    }
}

#[test]
fn demo_frontend_on_node1() {
    let t = run_on("node1");
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);

    let http2 = &t.desired.frontends[&tcp(NODE_ADDR, 31380)];
    assert_eq!(http2.service, "istio-system/istio-ingressgateway");
    assert_eq!(http2.port_name, "http2");
    assert_eq!(
        http2.backends,
        [
            DesiredBackend {
                addr: POD_NODE1,
                port: 80,
                local: true,
                policed: false,
            },
            DesiredBackend {
                addr: POD_NODE2,
                port: 80,
                local: false,
                policed: false,
            },
        ]
    );
    assert!(!http2.no_snat && !http2.drop_if_empty);

    assert!(t.desired.frontends.contains_key(&tcp(LB_ADDR, 80)));
    let node_port_frontends = t
        .desired
        .frontends
        .keys()
        .filter(|f| f.addr == NODE_ADDR)
        .count();
    assert_eq!(node_port_frontends, 9);
}

/// The whole translation, frontend by frontend.
fn expected(node1_local: bool, node2_local: bool) -> Desired {
    let mut frontends = BTreeMap::new();
    for (name, port, node_port, pod_port) in PORTS {
        let frontend = DesiredFrontend {
            service: "istio-system/istio-ingressgateway".into(),
            port_name: name.into(),
            backends: vec![
                DesiredBackend {
                    addr: POD_NODE1,
                    port: pod_port,
                    local: node1_local,
                    policed: false,
                },
                DesiredBackend {
                    addr: POD_NODE2,
                    port: pod_port,
                    local: node2_local,
                    policed: false,
                },
            ],
            no_snat: false,
            drop_if_empty: false,
            // The example says sessionAffinity: None.
            affinity_timeout_s: 0,
        };
        frontends.insert(tcp(NODE_ADDR, node_port), frontend.clone());
        frontends.insert(tcp(LB_ADDR, port), frontend);
    }
    Desired { frontends }
}

#[test]
fn whole_translation_is_golden() {
    assert_eq!(run_on("node1").desired, expected(true, false));
    assert_eq!(run_on("node2").desired, expected(false, true));
    assert_eq!(run_on("node3").desired, expected(false, false));
}

#[test]
fn local_policy_keeps_only_the_local_gateway() {
    let mut set = example();
    set.services[0]
        .spec
        .as_mut()
        .expect("example has a spec")
        .external_traffic_policy = Some("Local".into());
    let node = NodeContext {
        node_name: "node1".into(),
        node_addresses: vec![NODE_ADDR],
        ..Default::default()
    };
    let t = translate(&set.services, &set.endpoint_slices, &node);
    assert_eq!(t.desired.frontends.len(), 18);
    let http2 = &t.desired.frontends[&tcp(NODE_ADDR, 31380)];
    assert_eq!(
        http2.backends,
        [DesiredBackend {
            addr: POD_NODE1,
            port: 80,
            local: true,
            policed: false,
        }]
    );
    assert!(http2.no_snat && http2.drop_if_empty);

    // On a node without a gateway pod the frontends drop.
    let node3 = NodeContext {
        node_name: "node3".into(),
        node_addresses: vec![NODE_ADDR],
        ..Default::default()
    };
    let t = translate(&set.services, &set.endpoint_slices, &node3);
    assert_eq!(t.desired.frontends.len(), 18);
    assert!(t
        .desired
        .frontends
        .values()
        .all(|f| f.backends.is_empty() && f.drop_if_empty));
}
