//! The kube-proxy rule generator against kube-proxy's own expectations.
//!
//! The golden files in `golden/` hold expected `iptables-restore` inputs.
//! `proxier_test_*.rules` are expectations of tests in kube-proxy's
//! `pkg/proxy/iptables/proxier_test.go` (each file names its test); those
//! are compared after the same canonical sort that test file applies
//! (`sortIPTablesRules`), since kube-proxy's own order depends on Go map
//! iteration. `nodeport_lb.rules` is the small reference case in generation
//! order, for a real node's settings.
//!
//! The tests that load rules into the kernel need root; each uses a network
//! namespace of its own, deleted on drop, and skips (printing why) when it
//! cannot run.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::kube_proxy::{
    install, jump_rules, restore_input, restore_test, save, Backend, Cidr, KpConfig, KpEndpoint,
    KpPort, KpService, Protocol,
};
use integration_tests::netns::{self, Netns};

fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

fn cidr(s: &str) -> Cidr {
    s.parse().expect("valid CIDR literal")
}

/// A golden file without its `#` comment lines.
fn golden(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading golden file {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Line-by-line comparison that names the first differing line.
fn assert_same_lines(what: &str, expected: &str, actual: &str) {
    let exp: Vec<&str> = expected.lines().collect();
    let act: Vec<&str> = actual.lines().collect();
    for (i, (e, a)) in exp.iter().zip(&act).enumerate() {
        assert_eq!(
            e,
            a,
            "{what}: line {} differs\nexpected: {e}\n  actual: {a}\n--- full actual ---\n{actual}",
            i + 1
        );
    }
    assert_eq!(
        exp.len(),
        act.len(),
        "{what}: {} expected lines, {} actual\n--- full actual ---\n{actual}",
        exp.len(),
        act.len()
    );
}

// ---------------------------------------------------------------------------
// kube-proxy's canonical sort (proxier_test.go, sortIPTablesRules)
// ---------------------------------------------------------------------------

/// The value of a rule's `--comment` (quoted or not).
fn comment_of(rule: &str) -> Option<&str> {
    let rest = &rule[rule.find("--comment ")? + "--comment ".len()..];
    if let Some(quoted) = rest.strip_prefix('"') {
        quoted.split('"').next()
    } else {
        rest.split(' ').next()
    }
}

/// The service a rule's comment names: the comment up to its first space or
/// colon (kube-proxy's `orderByCommentServiceName`).
fn comment_service(rule: &str) -> String {
    let c = comment_of(rule).unwrap_or("");
    c.split([' ', ':']).next().unwrap_or("").to_string()
}

/// One table of a restore input: chains in declaration order, and the rules
/// of each chain.
type Table = (Vec<String>, BTreeMap<String, Vec<String>>);

/// Sorts an iptables-restore input as kube-proxy's tests do before comparing:
/// tables by name; chains KUBE-NODEPORTS, KUBE-SERVICES, then other KUBE-*
/// alphabetically, then the rest; the rules of KUBE-NODEPORTS and
/// KUBE-SERVICES stably by the service in their comment (nat's "must be the
/// last rule" rule last); all other rules keep their order. Output is per
/// table: chain lines, then the rules chain by chain.
fn canonical_sort(input: &str) -> String {
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in input.lines() {
        if let Some(name) = line.strip_prefix('*') {
            current = Some(name.to_string());
            tables.entry(name.to_string()).or_default();
        } else if line == "COMMIT" {
            current = None;
        } else {
            let table = current.as_ref().expect("line outside a table");
            let (order, rules) = tables.get_mut(table).expect("table exists");
            let chain = if let Some(decl) = line.strip_prefix(':') {
                decl.split(' ').next().expect("chain name").to_string()
            } else if let Some(rule) = line.strip_prefix("-A ") {
                rule.split(' ').next().expect("chain name").to_string()
            } else {
                panic!("unexpected line {line:?}");
            };
            if !rules.contains_key(&chain) {
                order.push(chain.clone());
                rules.insert(chain.clone(), Vec::new());
            }
            if line.starts_with("-A ") {
                rules
                    .get_mut(&chain)
                    .expect("chain exists")
                    .push(line.to_string());
            }
        }
    }
    let chain_key = |name: &str| -> (u8, String) {
        match name {
            "KUBE-NODEPORTS" => (0, String::new()),
            "KUBE-SERVICES" => (1, String::new()),
            n if n.starts_with("KUBE-") => (2, n.to_string()),
            n => (3, n.to_string()),
        }
    };
    let mut out = String::new();
    for (table, (mut order, mut rules)) in tables {
        order.sort_by_key(|c| chain_key(c));
        for chain in ["KUBE-NODEPORTS", "KUBE-SERVICES"] {
            if let Some(r) = rules.get_mut(chain) {
                let nat_services = table == "nat" && chain == "KUBE-SERVICES";
                r.sort_by_key(|rule| {
                    let last = nat_services
                        && comment_of(rule).is_some_and(|c| c.contains("must be the last rule"));
                    (last, comment_service(rule))
                });
            }
        }
        out.push_str(&format!("*{table}\n"));
        for chain in &order {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &order {
            for rule in &rules[chain] {
                out.push_str(rule);
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// The six services and endpoint slices of kube-proxy's
/// TestOverallIPTablesRules.
fn overall_services() -> Vec<KpService> {
    let ep = |a, b, c, d| KpEndpoint::new(ip(a, b, c, d)).tcp("p80", 80);
    let mut svc2 = KpService::new("ns2", "svc2", ip(172, 30, 0, 42))
        .port(KpPort::tcp("p80", 80).with_node_port(3001))
        .lb_ingress(ip(1, 2, 3, 4))
        .external_ip(ip(192, 168, 99, 22))
        // No node name: not local, so "has no local endpoints".
        .endpoint(ep(10, 180, 0, 2));
    svc2.external_traffic_policy_local = true;
    svc2.health_check_node_port = Some(30000);

    let mut svc5 = KpService::new("ns5", "svc5", ip(172, 30, 0, 45))
        .port(KpPort::tcp("p80", 80).with_node_port(3002))
        .lb_ingress(ip(5, 6, 7, 8))
        .endpoint(ep(10, 180, 0, 3));
    // Ignored by kube-proxy: externalTrafficPolicy is Cluster.
    svc5.health_check_node_port = Some(30000);
    // The test's source range has extra whitespace, which kube-proxy trims.
    svc5.lb_source_ranges = vec![cidr(" 203.0.113.0/25")];
    svc5.session_affinity_timeout = Some(10800);

    vec![
        KpService::new("ns1", "svc1", ip(172, 30, 0, 41))
            .port(KpPort::tcp("p80", 80))
            .endpoint(ep(10, 180, 0, 1)),
        svc2,
        KpService::new("ns3", "svc3", ip(172, 30, 0, 43))
            .port(KpPort::tcp("p80", 80).with_node_port(3003))
            .endpoint(ep(10, 180, 0, 3)),
        KpService::new("ns4", "svc4", ip(172, 30, 0, 44))
            .port(KpPort::tcp("p80", 80))
            .external_ip(ip(192, 168, 99, 33))
            .endpoint(ep(10, 180, 0, 4))
            .endpoint(ep(10, 180, 0, 5).on_node("test-node")),
        svc5,
        KpService::new("ns6", "svc6", ip(172, 30, 0, 46)).port(KpPort::tcp("p80", 80)),
    ]
}

/// The fake proxier of the 1.28-era proxier_test.go: no nfacct counters.
fn fake_proxier_1_28() -> KpConfig {
    KpConfig {
        nfacct: false,
        ..KpConfig::fake_proxier()
    }
}

/// onlyLocalNodePorts() of proxier_test.go: NodePort, externalTrafficPolicy
/// Local, one remote and one local endpoint.
fn only_local_nodeport_service() -> KpService {
    let mut svc = KpService::new("ns1", "svc1", ip(172, 30, 0, 41))
        .port(KpPort::tcp("p80", 80).with_node_port(3001))
        .endpoint(KpEndpoint::new(ip(10, 180, 0, 1)).tcp("p80", 80))
        .endpoint(
            KpEndpoint::new(ip(10, 180, 2, 1))
                .tcp("p80", 80)
                .on_node("test-node"),
        );
    svc.external_traffic_policy_local = true;
    svc
}

fn only_local_nodeports_config() -> KpConfig {
    KpConfig {
        node_port_addresses: vec![ip(192, 168, 0, 2)],
        localhost_node_ports: false,
        ..fake_proxier_1_28()
    }
}

/// TestInternalTrafficPolicyE2E's service: an unnamed port, three endpoints
/// on the given nodes.
fn itp_service(local: bool, nodes: [&str; 3]) -> KpService {
    let mut svc = KpService::new("ns1", "svc1", ip(172, 30, 1, 1)).port(KpPort::tcp("", 80));
    for (i, node) in nodes.into_iter().enumerate() {
        let last = u8::try_from(i + 1).expect("small index");
        svc = svc.endpoint(
            KpEndpoint::new(ip(10, 0, 1, last))
                .tcp("", 80)
                .on_node(node),
        );
    }
    svc.internal_traffic_policy_local = local;
    svc
}

/// The small reference case: a NodePort service with two endpoints and a
/// LoadBalancer service with one endpoint and an ingress IP.
fn nodeport_lb_services() -> Vec<KpService> {
    vec![
        KpService::new("ns4", "svc4", ip(172, 30, 0, 44))
            .port(KpPort::tcp("p80", 80).with_node_port(3001))
            .endpoint(KpEndpoint::new(ip(10, 180, 0, 4)).tcp("p80", 80))
            .endpoint(KpEndpoint::new(ip(10, 180, 0, 5)).tcp("p80", 80)),
        KpService::new("ns5", "svc5", ip(172, 30, 0, 45))
            .port(KpPort::tcp("p80", 80).with_node_port(3002))
            .lb_ingress(ip(5, 6, 7, 8))
            .endpoint(KpEndpoint::new(ip(10, 180, 0, 3)).tcp("p80", 80)),
    ]
}

fn real_node_config() -> KpConfig {
    KpConfig::new("test-node", Some(cidr("10.0.0.0/8")))
}

/// `n` NodePort services with `eps` endpoints each, TCP and UDP alternating.
fn many_services(n: usize, eps: usize) -> Vec<KpService> {
    (0..n)
        .map(|i| {
            let i = u32::try_from(i).expect("fits u32");
            let cluster_ip = Ipv4Addr::from(u32::from(ip(10, 96, 0, 0)) + 1 + i);
            let node_port = 30000 + u16::try_from(i % 2700).expect("fits u16");
            let port = if i % 2 == 0 {
                KpPort::tcp("http", 80)
            } else {
                KpPort::udp("dns", 53)
            };
            let proto = port.protocol;
            let target = port.port;
            let mut svc = KpService::new(&format!("ns{}", i % 50), &format!("svc{i}"), cluster_ip)
                .port(port.with_node_port(node_port));
            for e in 0..eps {
                let e = u32::try_from(e).expect("fits u32");
                let pod = Ipv4Addr::from(u32::from(ip(10, 244, 0, 0)) + i * 8 + e + 2);
                let name = if proto == Protocol::Tcp {
                    "http"
                } else {
                    "dns"
                };
                svc = svc.endpoint(KpEndpoint::new(pod).port(name, proto, target));
            }
            svc
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Golden comparisons (no root needed)
// ---------------------------------------------------------------------------

#[test]
fn matches_test_overall_iptables_rules() {
    let out = restore_input(&KpConfig::fake_proxier(), &overall_services());
    assert_same_lines(
        "TestOverallIPTablesRules",
        &golden("proxier_test_overall.rules"),
        &canonical_sort(&out),
    );
}

#[test]
fn matches_test_only_local_nodeports() {
    let out = restore_input(
        &only_local_nodeports_config(),
        &[only_local_nodeport_service()],
    );
    assert_same_lines(
        "TestOnlyLocalNodePorts",
        &golden("proxier_test_only_local_nodeports.rules"),
        &canonical_sort(&out),
    );

    let no_cidr = KpConfig {
        cluster_cidr: None,
        ..only_local_nodeports_config()
    };
    let out = restore_input(&no_cidr, &[only_local_nodeport_service()]);
    assert_same_lines(
        "TestOnlyLocalNodePortsNoClusterCIDR",
        &golden("proxier_test_only_local_nodeports_no_cluster_cidr.rules"),
        &canonical_sort(&out),
    );
}

#[test]
fn matches_test_internal_traffic_policy_e2e() {
    let cfg = fake_proxier_1_28();
    let cases = [
        (
            false,
            ["test-node", "host1", "host2"],
            "proxier_test_itp_cluster.rules",
        ),
        (
            true,
            ["test-node", "host1", "host2"],
            "proxier_test_itp_local.rules",
        ),
        (
            true,
            ["host0", "host1", "host2"],
            "proxier_test_itp_local_no_local_endpoints.rules",
        ),
    ];
    for (local, nodes, file) in cases {
        let out = restore_input(&cfg, &[itp_service(local, nodes)]);
        assert_same_lines(file, &golden(file), &canonical_sort(&out));
    }
}

#[test]
fn nodeport_and_loadbalancer_golden() {
    let out = restore_input(&real_node_config(), &nodeport_lb_services());
    assert_same_lines("nodeport_lb.rules", &golden("nodeport_lb.rules"), &out);
}

#[test]
fn output_does_not_depend_on_input_order() {
    let mut services = overall_services();
    let a = restore_input(&real_node_config(), &services);
    services.reverse();
    for svc in &mut services {
        svc.endpoints.reverse();
    }
    let b = restore_input(&real_node_config(), &services);
    assert_eq!(a, b);
}

#[test]
fn udp_service_uses_udp_matches() {
    let svc = KpService::new("kube-system", "kube-dns", ip(10, 96, 0, 10))
        .port(KpPort::udp("dns", 53).with_node_port(31353))
        .endpoint(KpEndpoint::new(ip(10, 244, 1, 10)).udp("dns", 53))
        // A TCP port of the same name is a different service port.
        .endpoint(KpEndpoint::new(ip(10, 244, 2, 10)).tcp("dns", 53));
    let out = restore_input(&real_node_config(), &[svc]);
    let chain = "KUBE-SVC-TCOU7JCQXEZGVUNU";
    for want in [
        format!("-A KUBE-SERVICES -m comment --comment \"kube-system/kube-dns:dns cluster IP\" -m udp -p udp -d 10.96.0.10 --dport 53 -j {chain}"),
        "-A KUBE-NODEPORTS -m comment --comment kube-system/kube-dns:dns -m udp -p udp --dport 31353 -j KUBE-EXT-TCOU7JCQXEZGVUNU".to_string(),
        format!("-A {chain} -m comment --comment \"kube-system/kube-dns:dns -> 10.244.1.10:53\" -j "),
        "-m udp -p udp -j DNAT --to-destination 10.244.1.10:53".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in\n{out}");
    }
    assert!(
        !out.contains("10.244.2.10"),
        "TCP endpoint leaked into UDP port:\n{out}"
    );
}

#[test]
fn services_without_usable_endpoints_are_rejected_in_filter() {
    let svc = KpService::new("ns1", "svc1", ip(172, 30, 0, 41))
        .port(KpPort::tcp("p80", 80).with_node_port(3001))
        .lb_ingress(ip(1, 2, 3, 4))
        .external_ip(ip(192, 168, 99, 11))
        // Not ready and not terminating: unusable.
        .endpoint(
            KpEndpoint::new(ip(10, 180, 0, 1))
                .tcp("p80", 80)
                .conditions(false, false, false),
        );
    let out = restore_input(&real_node_config(), &[svc]);
    let (filter, nat) = out.split_once("*nat\n").expect("two tables");
    let comment = "-m comment --comment \"ns1/svc1:p80 has no endpoints\"";
    for want in [
        format!("-A KUBE-SERVICES {comment} -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT"),
        format!("-A KUBE-EXTERNAL-SERVICES {comment} -m tcp -p tcp -d 192.168.99.11 --dport 80 -j REJECT"),
        format!("-A KUBE-EXTERNAL-SERVICES {comment} -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT"),
        format!("-A KUBE-EXTERNAL-SERVICES {comment} -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j REJECT"),
    ] {
        assert!(filter.contains(&want), "missing {want:?} in\n{filter}");
    }
    assert!(
        !nat.contains("ns1/svc1"),
        "nat rules for a service without endpoints:\n{nat}"
    );
}

#[test]
fn terminating_endpoints_are_used_only_as_fallback() {
    let base = KpService::new("ns1", "svc1", ip(172, 30, 0, 41)).port(KpPort::tcp("p80", 80));
    let serving_terminating = KpEndpoint::new(ip(10, 180, 0, 9))
        .tcp("p80", 80)
        .conditions(false, true, true);
    let with_ready = base
        .clone()
        .endpoint(KpEndpoint::new(ip(10, 180, 0, 1)).tcp("p80", 80))
        .endpoint(serving_terminating.clone());
    let out = restore_input(&real_node_config(), &[with_ready]);
    assert!(out.contains("--to-destination 10.180.0.1:80"));
    assert!(
        !out.contains("10.180.0.9"),
        "terminating endpoint used:\n{out}"
    );

    let only_terminating = base.endpoint(serving_terminating);
    let out = restore_input(&real_node_config(), &[only_terminating]);
    assert!(
        out.contains("--to-destination 10.180.0.9:80"),
        "no fallback to the serving terminating endpoint:\n{out}"
    );
}

#[test]
fn headless_services_are_skipped() {
    let mut svc = KpService::new("ns1", "headless", ip(0, 0, 0, 0))
        .port(KpPort::tcp("p80", 80))
        .endpoint(KpEndpoint::new(ip(10, 180, 0, 1)).tcp("p80", 80));
    svc.cluster_ip = None;
    let out = restore_input(&real_node_config(), &[svc]);
    assert!(!out.contains("headless"), "{out}");
}

#[test]
fn probabilities_follow_endpoint_count() {
    let mut svc = KpService::new("ns1", "big", ip(172, 30, 0, 50)).port(KpPort::tcp("p", 8080));
    for i in 1..=4 {
        svc = svc.endpoint(KpEndpoint::new(ip(10, 244, 0, i)).tcp("p", 8080));
    }
    let out = restore_input(&real_node_config(), &[svc]);
    let chain = integration_tests::kube_proxy::service_chain("ns1/big:p", Protocol::Tcp);
    let jumps: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("-j KUBE-SEP-"))
        .collect();
    assert_eq!(jumps.len(), 4, "{out}");
    for (line, p) in jumps
        .iter()
        .zip(["0.2500000000", "0.3333333333", "0.5000000000"])
    {
        assert!(line.contains(&format!("--probability {p} ")), "{line}");
    }
    assert!(!jumps[3].contains("statistic"), "{}", jumps[3]);
}

/// 10,000 services: quick to generate, one chain per service port and per
/// endpoint, and large-cluster mode (no per-endpoint comments) as kube-proxy
/// switches to above 1,000 endpoints.
#[test]
fn ten_thousand_services() {
    let services = many_services(10_000, 2);
    let start = Instant::now();
    let out = restore_input(&real_node_config(), &services);
    let took = start.elapsed();
    println!(
        "generated {} bytes, {} lines for 10000 services in {took:?}",
        out.len(),
        out.lines().count()
    );
    // Linear work; even an unoptimised build takes well under a second here.
    assert!(took < Duration::from_secs(20), "generation took {took:?}");
    let count = |prefix: &str| out.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(count(":KUBE-SVC-"), 10_000);
    assert_eq!(count(":KUBE-EXT-"), 10_000);
    assert_eq!(count(":KUBE-SEP-"), 20_000);
    assert_eq!(count("-A KUBE-NODEPORTS "), 10_000);
    // Every nat chain declared once.
    let (_, nat) = out.split_once("*nat\n").expect("nat table");
    let mut decls: Vec<&str> = nat.lines().filter(|l| l.starts_with(':')).collect();
    let n = decls.len();
    decls.sort_unstable();
    decls.dedup();
    assert_eq!(decls.len(), n, "duplicate chain declarations");
    // Large-cluster mode: endpoint rules carry no comment, service rules do.
    assert!(out
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SEP-"))
        .all(|l| !l.contains("--comment")));
    assert!(out
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SERVICES "))
        .all(|l| l.contains("--comment")));

    // At or below the threshold, comments stay.
    let small = restore_input(&real_node_config(), &many_services(500, 2));
    assert!(small
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SEP-"))
        .all(|l| l.contains("--comment")));
}

// ---------------------------------------------------------------------------
// Against the kernel (root)
// ---------------------------------------------------------------------------

/// The backends to test, or `None` after printing why the test is skipped.
fn backends_or_skip() -> Option<Vec<Backend>> {
    if let Some(reason) = netns::skip_reason() {
        println!("skipped: {reason}");
        return None;
    }
    let backends = Backend::available();
    if backends.is_empty() {
        println!("skipped: neither iptables-legacy nor iptables-nft is installed (apt-get install iptables)");
        return None;
    }
    Some(backends)
}

fn fresh_netns(tag: &str) -> Netns {
    let name = format!("{}kp{tag}", netns::unique_prefix());
    Netns::create(&name).expect("create netns")
}

/// Rule sets `iptables-restore --test` must accept. nfacct matches are left
/// out: they need nfacct objects, which kube-proxy creates over netlink.
fn rule_sets() -> Vec<(&'static str, String)> {
    let mut overall_cfg = KpConfig::fake_proxier();
    overall_cfg.nfacct = false;
    overall_cfg.random_fully = true;
    vec![
        (
            "nodeport_lb",
            restore_input(&real_node_config(), &nodeport_lb_services()),
        ),
        ("overall", restore_input(&overall_cfg, &overall_services())),
        (
            "only_local_nodeports",
            restore_input(
                &only_local_nodeports_config(),
                &[only_local_nodeport_service()],
            ),
        ),
        (
            "large_cluster",
            restore_input(&real_node_config(), &many_services(600, 3)),
        ),
    ]
}

#[test]
fn iptables_restore_accepts_output() {
    let Some(backends) = backends_or_skip() else {
        return;
    };
    for backend in backends {
        let ns = fresh_netns(backend.name());
        for (name, rules) in rule_sets() {
            restore_test(ns.name(), &rules, backend).unwrap_or_else(|e| {
                panic!("{backend}: iptables-restore --test rejected {name}: {e:#}")
            });
        }
        // And a real load of the largest set.
        let (_, large) = rule_sets().pop().expect("non-empty");
        install(ns.name(), &large, backend).unwrap_or_else(|e| panic!("{backend}: {e:#}"));
        let nat = save(ns.name(), backend, "nat", false).expect("iptables-save");
        assert_eq!(
            nat.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
            1800,
            "{backend}: KUBE-SEP chains in the kernel"
        );
    }
}

/// Strips what differs between runs and backends from `iptables-save`:
/// comment lines and the built-in chains' policy counters.
fn normalise_save(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_prefix(':') {
            Some(decl) => {
                let mut parts = decl.split(' ');
                format!(
                    ":{} {}\n",
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or("")
                )
            }
            None => format!("{l}\n"),
        })
        .collect()
}

/// What the kernel holds after `install`: compared with `iptables-save`
/// output, which normalises kube-proxy's argument order and values
/// (`-d 172.30.0.44/32 -p tcp -m comment …`, `--set-xmark 0x4000/0x4000`,
/// probabilities with eleven decimals); the jumps from the built-in chains
/// are in kube-proxy's order; loading twice changes nothing.
#[test]
fn install_loads_rules_and_jumps_like_kube_proxy() {
    let Some(backends) = backends_or_skip() else {
        return;
    };
    let rules = restore_input(&real_node_config(), &nodeport_lb_services());
    for backend in backends {
        let ns = fresh_netns(backend.name());
        install(ns.name(), &rules, backend).unwrap_or_else(|e| panic!("{backend}: {e:#}"));
        let nat = normalise_save(&save(ns.name(), backend, "nat", false).expect("save nat"));
        let filter =
            normalise_save(&save(ns.name(), backend, "filter", false).expect("save filter"));
        assert_same_lines(
            &format!("{backend} nat"),
            &golden("nodeport_lb.nat.save"),
            &nat,
        );
        assert_same_lines(
            &format!("{backend} filter"),
            &golden("nodeport_lb.filter.save"),
            &filter,
        );

        // A second sync (same rules) must not duplicate anything.
        install(ns.name(), &rules, backend).unwrap_or_else(|e| panic!("{backend}: {e:#}"));
        let nat2 = normalise_save(&save(ns.name(), backend, "nat", false).expect("save nat"));
        let filter2 =
            normalise_save(&save(ns.name(), backend, "filter", false).expect("save filter"));
        assert_eq!(nat, nat2, "{backend}: nat changed on reinstall");
        assert_eq!(filter, filter2, "{backend}: filter changed on reinstall");

        // Every jump rule is in its built-in chain exactly once.
        let all = format!("{nat}{filter}");
        for jump in jump_rules() {
            let line = jump.to_line();
            assert_eq!(
                all.lines().filter(|l| *l == line).count(),
                1,
                "{backend}: {line}"
            );
        }
    }
}
