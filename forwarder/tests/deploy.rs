//! The kustomizations in `deploy/` (the base and every overlay), rendered
//! with `kubectl kustomize` as `kubectl apply -k` would: every object must
//! be a known Kubernetes object that reads into the k8s-openapi types
//! without losing a field (so a misspelt field fails here, not on the
//! cluster), and the DaemonSet must give the daemon what it needs and a
//! node what it expects of a node agent: its arguments accepted by the
//! binary, the node name from the downward API, the host network, the named
//! capabilities only, bpffs under the pin directory, RBAC for what the
//! Kubernetes source watches, every node tolerated, node-critical priority,
//! a rolling update, resource requests and limits, probes on the health
//! port, and the image the crate's version builds.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
    config_maps: Vec<ConfigMap>,
}

/// The kustomizations a user applies: the base and each overlay.
const KUSTOMIZATIONS: [&str; 3] = ["base", "overlays/annotated", "overlays/manifests"];

/// Paths where `a` and `b` differ (what `b` lacks or has otherwise).
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => differences(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}: not a field of the type")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the type"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} reads back as {b}")),
    }
}

/// Reads `value` as a `T` and checks that nothing was dropped or changed.
fn typed<T: DeserializeOwned + Serialize>(what: &str, value: &Value) -> T {
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what}: does not read as its kind: {e}"));
    let back = serde_json::to_value(&object).expect("serializes");
    let mut diffs = Vec::new();
    differences(value, &back, "", &mut diffs);
    assert!(diffs.is_empty(), "{what}: {diffs:#?}");
    object
}

/// `kubectl kustomize deploy/<dir>`: the objects `kubectl apply -k` sends.
fn render(dir: &str) -> String {
    let path = deploy_dir().join(dir);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running `kubectl kustomize` (kubectl must be installed): {e}"));
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn parse(what: &str, text: &str) -> Objects {
    let mut objects = Objects::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let what = format!("{what} document {}", index + 1);
        let value =
            Value::deserialize(document).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
        if value.is_null() {
            continue;
        }
        let api_version = value["apiVersion"].as_str().unwrap_or("");
        let kind = value["kind"].as_str().unwrap_or("");
        match (api_version, kind) {
            ("v1", "Namespace") => objects.namespaces.push(typed(&what, &value)),
            ("v1", "ServiceAccount") => objects.service_accounts.push(typed(&what, &value)),
            ("v1", "ConfigMap") => objects.config_maps.push(typed(&what, &value)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                objects.cluster_roles.push(typed(&what, &value))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                objects.cluster_role_bindings.push(typed(&what, &value))
            }
            ("apps/v1", "DaemonSet") => objects.daemon_sets.push(typed(&what, &value)),
            _ => panic!("{what}: unexpected {api_version} {kind}"),
        }
    }
    objects
}

/// One rendered kustomization.
fn load_kustomization(dir: &str) -> Objects {
    parse(&format!("kubectl kustomize deploy/{dir}"), &render(dir))
}

/// Every kustomization, rendered: (directory, objects).
fn all() -> Vec<(&'static str, Objects)> {
    KUSTOMIZATIONS
        .iter()
        .map(|dir| (*dir, load_kustomization(dir)))
        .collect()
}

/// The base, as `kubectl apply -k deploy/base` applies it.
fn load() -> Objects {
    load_kustomization("base")
}

fn daemon_set<'a>(objects: &'a Objects, name: &str) -> &'a DaemonSet {
    let found: Vec<&DaemonSet> = objects
        .daemon_sets
        .iter()
        .filter(|d| d.metadata.name.as_deref() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "one DaemonSet named {name}");
    found[0]
}

/// The DaemonSet that runs the daemon.
fn the_daemon_set(objects: &Objects) -> &DaemonSet {
    daemon_set(objects, "forwarder")
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet has a pod template spec")
}

fn daemon_container(pod: &PodSpec) -> &Container {
    let found: Vec<&Container> = pod
        .containers
        .iter()
        .filter(|c| {
            c.command
                .as_deref()
                .and_then(|c| c.first())
                .is_some_and(|c| c.ends_with("/forwarder"))
        })
        .collect();
    assert_eq!(found.len(), 1, "one container runs the forwarder binary");
    found[0]
}

/// `--flag=value` and `--flag value` arguments, by flag.
fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            match flag.split_once('=') {
                Some((k, v)) => {
                    out.insert(k.to_owned(), v.to_owned());
                }
                None => {
                    let value = args.get(i + 1).filter(|v| !v.starts_with("--"));
                    out.insert(flag.to_owned(), value.cloned().unwrap_or_default());
                    if value.is_some() {
                        i += 1;
                    }
                }
            }
        }
        i += 1;
    }
    out
}

/// The rendering reads from the Kubernetes API (not `--manifests`).
fn uses_the_api(objects: &Objects) -> bool {
    let c = daemon_container(pod_spec(the_daemon_set(objects)));
    !flags(&c.args.clone().unwrap_or_default()).contains_key("manifests")
}

#[test]
fn every_kustomization_renders_into_kubernetes_types_without_losing_a_field() {
    for (dir, objects) in all() {
        assert_eq!(objects.namespaces.len(), 1, "{dir}");
        assert_eq!(objects.service_accounts.len(), 1, "{dir}");
        let rbac = usize::from(uses_the_api(&objects));
        assert_eq!(objects.cluster_roles.len(), rbac, "{dir}");
        assert_eq!(objects.cluster_role_bindings.len(), rbac, "{dir}");
        the_daemon_set(&objects);
        daemon_set(&objects, "forwarder-off");
    }
}

#[test]
fn no_manifest_is_left_out_of_the_base() {
    let text = fs::read_to_string(deploy_dir().join("base/kustomization.yaml")).expect("base");
    let kustomization: Value = serde_yaml::from_str(&text).expect("YAML");
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for entry in fs::read_dir(deploy_dir().join("base")).expect("deploy/base") {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("UTF-8");
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{name} is not in resources"
            );
        }
    }
}

#[test]
fn a_misspelt_field_is_caught() {
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "namespce": "y"},
    });
    let result = std::panic::catch_unwind(|| typed::<ServiceAccount>("test", &value));
    assert!(result.is_err(), "an unknown field must not pass");
}

#[test]
fn namespaced_objects_live_in_a_namespace_that_is_deployed() {
    for (dir, objects) in all() {
        let namespaces: Vec<&str> = objects
            .namespaces
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        let used = objects
            .service_accounts
            .iter()
            .map(|o| &o.metadata)
            .chain(objects.daemon_sets.iter().map(|o| &o.metadata))
            .chain(objects.config_maps.iter().map(|o| &o.metadata));
        for meta in used {
            let ns = meta.namespace.as_deref().expect("namespace set explicitly");
            assert!(namespaces.contains(&ns), "{dir}: {ns} is not deployed");
        }
    }
}

#[test]
fn the_daemon_set_runs_the_daemon_as_it_expects() {
    for (_, objects) in all() {
        daemon_set_runs_the_daemon_as_it_expects(&objects);
    }
}

fn daemon_set_runs_the_daemon_as_it_expects(objects: &Objects) {
    let ds = the_daemon_set(objects);
    let spec = ds.spec.as_ref().expect("spec");
    let pod = pod_spec(ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "XDP attaches to the node's interfaces"
    );
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.and_then(|l| l.get(k)),
            Some(v),
            "selector {k}={v} matches the pod template"
        );
    }

    let c = daemon_container(pod);
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let flags = flags(&args);
    assert!(
        flags.get("iface").is_some_and(|v| !v.is_empty()),
        "--iface is set: {args:?}"
    );
    assert!(
        !flags.contains_key("cleanup-on-exit"),
        "a stopped pod leaves the datapath forwarding: rolling updates drop nothing"
    );

    // The node name: --node-name, or NODE_NAME from spec.nodeName.
    let node_name_from_downward_api = c.env.iter().flatten().any(|e| {
        e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .is_some_and(|f| f.field_path == "spec.nodeName")
    });
    assert!(
        node_name_from_downward_api || flags.contains_key("node-name"),
        "NODE_NAME from fieldRef spec.nodeName"
    );

    // What datapath::check_privileges asks for, without privileged mode.
    let security = c.security_context.as_ref().expect("securityContext");
    assert_ne!(
        security.privileged,
        Some(true),
        "the daemon is not privileged"
    );
    let caps = security.capabilities.as_ref().expect("capabilities");
    let added: Vec<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert!(added.contains(&"NET_ADMIN"), "{added:?}");
    assert!(
        added.contains(&"BPF") || added.contains(&"SYS_ADMIN"),
        "{added:?}"
    );
    assert!(
        caps.drop.iter().flatten().any(|d| d == "ALL"),
        "everything else dropped"
    );

    // The pin directory is on the host's /sys/fs/bpf.
    let pin_dir = flags
        .get("pin-dir")
        .cloned()
        .unwrap_or_else(|| "/sys/fs/bpf/forwarder".into());
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&pin_dir).starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing mounted over --pin-dir {pin_dir}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume exists");
    let host_path = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(host_path.path, "/sys/fs/bpf");
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
}

#[test]
fn bidirectional_mounts_are_only_in_privileged_containers() {
    // The API server refuses the pod otherwise.
    for (_, objects) in all() {
        bidirectional_mounts_only_privileged(&objects);
    }
}

fn bidirectional_mounts_only_privileged(objects: &Objects) {
    let pod = pod_spec(the_daemon_set(objects));
    let mut bidirectional = 0;
    for c in pod.init_containers.iter().flatten().chain(&pod.containers) {
        for m in c.volume_mounts.iter().flatten() {
            if m.mount_propagation.as_deref() == Some("Bidirectional") {
                bidirectional += 1;
                let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
                assert_eq!(
                    privileged,
                    Some(true),
                    "{}: Bidirectional {}",
                    c.name,
                    m.mount_path
                );
            }
        }
    }
    assert_eq!(bidirectional, 1, "the bpffs init container only");
}

/// The real binary parses `args`: clap checks every argument before it
/// reaches --help, which then stops it from running anything.
fn assert_binary_accepts(args: &[String]) {
    let out = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args(args)
        .arg("--help")
        .output()
        .expect("runs the binary");
    assert!(
        out.status.success(),
        "forwarder {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_binary_accepts_the_daemon_set_arguments() {
    for (_, objects) in all() {
        let c = daemon_container(pod_spec(the_daemon_set(&objects)));
        assert_binary_accepts(&c.args.clone().unwrap_or_default());
    }
    let objects = load();
    let c = daemon_container(pod_spec(the_daemon_set(&objects)));
    let args = c.args.clone().unwrap_or_default();
    // And the check is real: a bad argument fails it.
    let out = Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args(&args)
        .args(["--no-such-flag", "--help"])
        .output()
        .expect("runs the binary");
    assert!(!out.status.success());
}

#[test]
fn rbac_grants_what_the_kubernetes_source_watches() {
    for (dir, objects) in all() {
        if uses_the_api(&objects) {
            rbac_grants_what_the_source_watches(&objects);
        } else {
            assert!(objects.cluster_roles.is_empty(), "{dir}: reads no API");
        }
    }
}

fn rbac_grants_what_the_source_watches(objects: &Objects) {
    let ds = the_daemon_set(objects);
    let pod = pod_spec(ds);
    let account = pod
        .service_account_name
        .as_deref()
        .expect("serviceAccountName");
    let namespace = ds.metadata.namespace.as_deref().expect("namespace");
    assert!(
        objects.service_accounts.iter().any(|sa| {
            sa.metadata.name.as_deref() == Some(account)
                && sa.metadata.namespace.as_deref() == Some(namespace)
        }),
        "ServiceAccount {namespace}/{account} is deployed"
    );
    let binding = objects
        .cluster_role_bindings
        .iter()
        .find(|b| {
            b.subjects.iter().flatten().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == account
                    && s.namespace.as_deref() == Some(namespace)
            })
        })
        .expect("a ClusterRoleBinding for the ServiceAccount");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let role = objects
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some(binding.role_ref.name.as_str()))
        .expect("the bound ClusterRole is deployed");
    let rules = role.rules.as_deref().unwrap_or(&[]);
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["list", "watch"] {
        assert!(allows("", "services", verb), "{verb} services");
        assert!(
            allows("discovery.k8s.io", "endpointslices", verb),
            "{verb} endpointslices"
        );
        // NetworkPolicy enforced in netfilter (the default) needs both.
        assert!(allows("", "pods", verb), "{verb} pods");
        assert!(
            allows("networking.k8s.io", "networkpolicies", verb),
            "{verb} networkpolicies"
        );
    }
    // Read-only: the daemon writes nothing to the API.
    for rule in rules {
        for verb in &rule.verbs {
            assert!(["get", "list", "watch"].contains(&verb.as_str()), "{verb}");
        }
    }
}

#[test]
fn the_readme_explains_the_node_label() {
    let objects = load();
    let pod = pod_spec(the_daemon_set(&objects));
    let readme = fs::read_to_string(deploy_dir().join("README.md")).expect("deploy/README.md");
    for (k, v) in pod.node_selector.iter().flatten() {
        if k == "kubernetes.io/os" {
            continue;
        }
        assert!(
            readme.contains(&format!("{k}={v}")),
            "README shows how to set {k}={v}"
        );
    }
}

fn node_selector(ds: &DaemonSet) -> BTreeMap<String, String> {
    pod_spec(ds).node_selector.clone().unwrap_or_default()
}

#[test]
fn the_off_switch_uninstalls_where_the_forwarder_is_turned_off() {
    for (_, objects) in all() {
        off_switch_uninstalls(&objects);
    }
}

fn off_switch_uninstalls(objects: &Objects) {
    let on = the_daemon_set(objects);
    let off = daemon_set(objects, "forwarder-off");
    assert_eq!(
        node_selector(on)
            .get("forwarder.dev/enabled")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        node_selector(off)
            .get("forwarder.dev/enabled")
            .map(String::as_str),
        Some("false")
    );
    let c = daemon_container(pod_spec(off));
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("uninstall"),
        "{args:?}"
    );
    let f = flags(&args);
    assert!(
        f.contains_key("stay"),
        "the off switch keeps running: {args:?}"
    );
    let on_flags = flags(
        &daemon_container(pod_spec(on))
            .args
            .clone()
            .unwrap_or_default(),
    );
    assert_eq!(
        f.get("pin-dir"),
        on_flags.get("pin-dir"),
        "both use the same pin dir"
    );
    // The drain fits the grace period, with time left to detach.
    let drain = f
        .get("drain-timeout")
        .and_then(|v| humantime::parse_duration(v).ok())
        .unwrap_or_else(|| panic!("the off switch sets --drain-timeout: {args:?}"));
    let grace = pod_spec(off)
        .termination_grace_period_seconds
        .expect("the off switch sets terminationGracePeriodSeconds");
    assert!(
        drain.as_secs() + 10 <= grace as u64,
        "--drain-timeout {drain:?} does not fit terminationGracePeriodSeconds {grace}"
    );
    assert_binary_accepts(&args);
}

#[test]
fn probes_and_scraping_point_at_the_daemon_endpoints() {
    for (_, objects) in all() {
        probes_and_scraping(&objects);
    }
}

fn probes_and_scraping(objects: &Objects) {
    let ds = the_daemon_set(objects);
    let c = daemon_container(pod_spec(ds));
    let f = flags(&c.args.clone().unwrap_or_default());
    let port_of = |flag: &str| -> i32 {
        f.get(flag)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("--{flag} set with a port"))
    };
    let named = |name: &str| -> i32 {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    assert_eq!(named("health"), port_of("health-addr"));
    assert_eq!(named("metrics"), port_of("metrics-addr"));
    assert_ne!(port_of("health-addr"), 10256, "kube-proxy's healthz port");
    assert_ne!(port_of("metrics-addr"), 10249, "kube-proxy's metrics port");
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| h.path.clone().unwrap_or_default())
    };
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/livez"));
    // Both probes ask the health port, by name or number.
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| h.port.clone())
            .expect("an httpGet probe");
        let number = match port {
            IntOrString::Int(n) => n,
            IntOrString::String(name) => named(&name),
        };
        assert_eq!(number, port_of("health-addr"), "probe on the health port");
    }
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&port_of("metrics-addr").to_string())
    );
}

/// Every container of both DaemonSets.
fn containers(objects: &Objects) -> Vec<(String, &Container)> {
    objects
        .daemon_sets
        .iter()
        .flat_map(|ds| {
            let name = ds.metadata.name.clone().unwrap_or_default();
            let pod = pod_spec(ds);
            pod.init_containers
                .iter()
                .flatten()
                .chain(&pod.containers)
                .map(move |c| (format!("{name}/{}", c.name), c))
        })
        .collect()
}

#[test]
fn like_kube_proxy_it_runs_on_every_node_with_node_critical_priority() {
    for (dir, objects) in all() {
        for ds in &objects.daemon_sets {
            let name = ds.metadata.name.as_deref().unwrap_or("");
            let pod = pod_spec(ds);
            // `operator: Exists` without a key or effect tolerates every
            // taint: control-plane nodes, NoExecute and NoSchedule alike.
            let tolerates_all = pod.tolerations.iter().flatten().any(|t| {
                t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
            });
            assert!(tolerates_all, "{dir} {name}: {:?}", pod.tolerations);
            assert_eq!(
                pod.priority_class_name.as_deref(),
                Some("system-node-critical"),
                "{dir} {name}"
            );
        }
    }
}

#[test]
fn a_rolling_update_replaces_a_bounded_number_of_nodes_at_a_time() {
    for (dir, objects) in all() {
        let ds = the_daemon_set(&objects);
        let strategy = ds
            .spec
            .as_ref()
            .and_then(|s| s.update_strategy.as_ref())
            .expect("updateStrategy");
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{dir}");
        let max_unavailable = strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref())
            .expect("rollingUpdate.maxUnavailable");
        let bounded = match max_unavailable {
            IntOrString::Int(n) => *n >= 1,
            IntOrString::String(p) => p
                .strip_suffix('%')
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| (1..100).contains(&p)),
        };
        assert!(bounded, "{dir}: maxUnavailable {max_unavailable:?}");
    }
}

/// A quantity in bytes (Ki/Mi/Gi suffixes) or millicores (m suffix, or
/// whole cores).
fn quantity(q: &Quantity) -> f64 {
    let text = q.0.as_str();
    let units = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("m", 0.001),
    ];
    for (suffix, factor) in units {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<f64>().expect("a number") * factor;
        }
    }
    text.parse().unwrap_or_else(|_| panic!("quantity {text:?}"))
}

#[test]
fn the_daemon_has_resource_requests_and_limits() {
    for (dir, objects) in all() {
        let c = daemon_container(pod_spec(the_daemon_set(&objects)));
        let resources = c.resources.as_ref().expect("resources");
        let requests = resources.requests.as_ref().expect("requests");
        let limits = resources.limits.as_ref().expect("limits");
        for key in ["cpu", "memory"] {
            let request = quantity(
                requests
                    .get(key)
                    .unwrap_or_else(|| panic!("{dir}: request {key}")),
            );
            let limit = quantity(
                limits
                    .get(key)
                    .unwrap_or_else(|| panic!("{dir}: limit {key}")),
            );
            assert!(
                request > 0.0 && request <= limit,
                "{dir} {key}: {request} > {limit}"
            );
        }
        // The eBPF maps are charged to the container: about 100 MiB at the
        // default sizes (README.md); a smaller limit would OOM-kill it.
        assert!(
            quantity(&limits["memory"]) >= 256.0 * 1024.0 * 1024.0,
            "{dir}: memory limit {:?}",
            limits["memory"]
        );
    }
}

#[test]
fn containers_get_the_named_capabilities_only() {
    const NAMED: [&str; 3] = ["BPF", "PERFMON", "NET_ADMIN"];
    for (dir, objects) in all() {
        for (name, c) in containers(&objects) {
            let security = c.security_context.as_ref();
            if security.and_then(|s| s.privileged) == Some(true) {
                // Only the short bpffs mount; the daemon never is.
                assert!(
                    name.ends_with("/mount-bpffs"),
                    "{dir}: {name} is privileged"
                );
                continue;
            }
            let caps = security
                .and_then(|s| s.capabilities.as_ref())
                .unwrap_or_else(|| panic!("{dir}: {name} sets capabilities"));
            assert_eq!(
                caps.drop.as_deref(),
                Some(&["ALL".to_string()][..]),
                "{dir}: {name}"
            );
            for cap in caps.add.iter().flatten() {
                assert!(NAMED.contains(&cap.as_str()), "{dir}: {name} adds {cap}");
            }
        }
        let c = daemon_container(pod_spec(the_daemon_set(&objects)));
        let security = c.security_context.as_ref().expect("securityContext");
        assert_eq!(security.allow_privilege_escalation, Some(false), "{dir}");
        let added: Vec<&str> = security
            .capabilities
            .iter()
            .flat_map(|c| c.add.iter().flatten())
            .map(String::as_str)
            .collect();
        assert_eq!(added, NAMED, "{dir}: what check_privileges needs");
    }
}

#[test]
fn kustomize_sets_the_image_the_crate_version_builds() {
    // `cargo xtask image` tags localhost/forwarder:<crate version>.
    let want = format!("localhost/forwarder:{}", env!("CARGO_PKG_VERSION"));
    for (dir, objects) in all() {
        for ds in &objects.daemon_sets {
            for c in &pod_spec(ds).containers {
                assert_eq!(c.image.as_deref(), Some(want.as_str()), "{dir}: {}", c.name);
            }
        }
    }
    let text =
        fs::read_to_string(deploy_dir().join("base/kustomization.yaml")).expect("kustomization");
    let kustomization: Value = serde_yaml::from_str(&text).expect("YAML");
    assert_eq!(
        kustomization["images"][0]["newTag"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "the tag comes from the images: entry"
    );
}

#[test]
fn the_annotated_overlay_only_narrows_the_services() {
    let base = load_kustomization("base");
    let annotated = load_kustomization("overlays/annotated");
    let args = |o: &Objects| {
        daemon_container(pod_spec(the_daemon_set(o)))
            .args
            .clone()
            .unwrap_or_default()
    };
    assert_eq!(
        flags(&args(&annotated)).get("services").map(String::as_str),
        Some("annotated")
    );
    assert_eq!(
        flags(&args(&base)).get("services").map(String::as_str),
        Some("all")
    );
    // Everything else is the base's.
    let mut a = serde_json::to_value(the_daemon_set(&annotated)).unwrap();
    let b = serde_json::to_value(the_daemon_set(&base)).unwrap();
    a["spec"]["template"]["spec"]["containers"][0]["args"] =
        b["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert_eq!(a, b);
}

#[test]
fn the_manifests_overlay_reads_services_from_a_mounted_config_map() {
    let objects = load_kustomization("overlays/manifests");
    let ds = the_daemon_set(&objects);
    let pod = pod_spec(ds);
    let c = daemon_container(pod);
    let manifests = flags(&c.args.clone().unwrap_or_default())
        .get("manifests")
        .cloned()
        .expect("--manifests");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&manifests).starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("nothing mounted over --manifests {manifests}"));
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume exists");
    let config_map_name = &volume.config_map.as_ref().expect("a ConfigMap volume").name;
    let config_map = objects
        .config_maps
        .iter()
        .find(|m| m.metadata.name.as_ref() == Some(config_map_name))
        .unwrap_or_else(|| panic!("ConfigMap {config_map_name} is rendered"));
    assert_eq!(config_map.metadata.namespace, ds.metadata.namespace);
    // What the daemon will read there parses, and holds Services.
    let data = config_map.data.as_ref().expect("data");
    assert!(!data.is_empty());
    for (file, text) in data {
        let set = forwarder::manifest::parse_str(Path::new(file), text);
        assert!(set.problems.is_empty(), "{file}: {:?}", set.problems);
        assert!(!set.services.is_empty(), "{file} has no Service");
    }
}
