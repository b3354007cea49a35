//! The Kubernetes source against a scripted API server: kube-rs's client
//! over a `tower-test` mock service, so every list and watch request the
//! watchers make is seen, checked and answered here. After each step the
//! published `ObjectSet` goes through translate + plan onto a `Snapshot`
//! (as the daemon does onto the maps), and the maps must converge to the
//! expected frontends.
use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, OnceLock,
};

use forwarder::{
    kube_source::{
        watch_kubernetes_counted, PolicyWatch, WatchCounters, WatchOptions, LABEL_SELECTOR,
    },
    model::{NodeContext, Protocol},
    plan::{self, Snapshot},
    policy::Enforcement,
    skips::{SkipLog, SkipReason},
    source::ObjectSet,
    translate::{translate_with, ServiceSelection},
};
use forwarder_common::{BackendKey, BACKEND_F_POLICED};
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{json, Value};
use tokio::{sync::watch, task::JoinHandle, time::timeout};
use tower_test::mock;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResponseBody = BoxBody<Bytes, BoxError>;
type Handle = mock::Handle<Request<kube::client::Body>, Response<ResponseBody>>;
type Respond = mock::SendResponse<Response<ResponseBody>>;

/// How long any single expected thing may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

const OPTIONS: WatchOptions = WatchOptions {
    debounce: Duration::from_millis(50),
    backoff_min: Duration::from_millis(100),
    backoff_max: Duration::from_millis(400),
    backoff_reset: Duration::from_secs(60),
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Services,
    Slices,
    Pods,
    Policies,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One request from the client, to be answered.
struct Call {
    kind: Kind,
    watch: bool,
    query: BTreeMap<String, String>,
    respond: Respond,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ASCII");
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("UTF-8 query")
}

impl Call {
    fn new(request: Request<kube::client::Body>, respond: Respond) -> Self {
        let uri = request.uri();
        assert_eq!(request.method(), http::Method::GET, "{uri}");
        let kind = match uri.path() {
            "/api/v1/services" => Kind::Services,
            "/apis/discovery.k8s.io/v1/endpointslices" => Kind::Slices,
            "/api/v1/pods" => Kind::Pods,
            "/apis/networking.k8s.io/v1/networkpolicies" => Kind::Policies,
            other => panic!("unexpected request for {other} ({uri})"),
        };
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        // Every request, list or watch, carries its kind's selector:
        // kube-proxy's, this node's Pods, every NetworkPolicy.
        let selectors = (
            query.get("labelSelector").map(String::as_str),
            query.get("fieldSelector").map(String::as_str),
        );
        let expected = match kind {
            Kind::Services | Kind::Slices => (Some(LABEL_SELECTOR), None),
            Kind::Pods => (None, Some("spec.nodeName=node1")),
            Kind::Policies => (None, None),
        };
        assert_eq!(selectors, expected, "{uri}");
        let watch = query.get("watch").is_some_and(|v| v == "true");
        Call {
            kind,
            watch,
            query,
            respond,
        }
    }

    fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }

    fn expect_list(&self) {
        assert!(!self.watch, "{} list expected, got a watch", self.kind);
    }

    /// A list not older than `resource_version` (client-go's relist).
    fn expect_list_not_older_than(&self, resource_version: &str) {
        self.expect_list();
        assert_eq!(
            (
                self.resource_version(),
                self.query.get("resourceVersionMatch").map(String::as_str)
            ),
            (Some(resource_version), Some("NotOlderThan")),
            "{} relist",
            self.kind
        );
    }

    /// A consistent read: no resourceVersion at all.
    fn expect_consistent_list(&self) {
        self.expect_list();
        assert_eq!(self.resource_version(), None, "{} list", self.kind);
        assert!(
            !self.query.contains_key("resourceVersionMatch"),
            "{:?}",
            self.query
        );
    }

    /// Answers with an API error (a `Status` object).
    fn status(self, code: u16, reason: &str, message: &str) {
        let body = json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "reason": reason, "code": code, "message": message,
        });
        self.respond.send_response(json_response(
            StatusCode::from_u16(code).expect("status code"),
            &body,
        ));
    }

    fn expect_watch_from(&self, resource_version: &str) {
        assert!(self.watch, "{} watch expected, got a list", self.kind);
        assert_eq!(
            self.resource_version(),
            Some(resource_version),
            "{} watch",
            self.kind
        );
    }

    /// Answers a list request with one complete page.
    fn list(self, resource_version: &str, items: Vec<Value>) {
        self.expect_list();
        let kind = match self.kind {
            Kind::Services => json!({"apiVersion": "v1", "kind": "ServiceList"}),
            Kind::Slices => {
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList"})
            }
            Kind::Pods => json!({"apiVersion": "v1", "kind": "PodList"}),
            Kind::Policies => {
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList"})
            }
        };
        let mut body = kind;
        body["metadata"] = json!({"resourceVersion": resource_version});
        body["items"] = Value::Array(items);
        self.respond
            .send_response(json_response(StatusCode::OK, &body));
    }

    /// Answers a watch request with these events, then ends the response
    /// (as the API server does when a watch times out).
    fn events(self, events: &[Value]) {
        assert!(self.watch, "{} watch expected", self.kind);
        let text: String = events.iter().map(|e| format!("{e}\n")).collect();
        self.respond.send_response(Response::new(
            Full::new(Bytes::from(text)).map_err(|e| match e {}).boxed(),
        ));
    }

    /// Answers a watch request with a response that stays open.
    fn stream(self) -> WatchStream {
        assert!(self.watch, "{} watch expected", self.kind);
        let (tx, rx) = mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        self.respond
            .send_response(Response::new(BodyExt::boxed(StreamBody::new(rx))));
        WatchStream { tx }
    }

    /// The connection fails before any response.
    fn fail(self) {
        self.respond.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    let bytes = Bytes::from(serde_json::to_vec(body).expect("JSON"));
    let mut response = Response::new(Full::new(bytes).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response
}

/// An open watch response.
struct WatchStream {
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
}

impl WatchStream {
    fn send(&self, event: Value) {
        self.tx
            .unbounded_send(Ok(Frame::data(Bytes::from(format!("{event}\n")))))
            .expect("watch response still read");
    }

    /// The connection drops in the middle of the response.
    fn break_connection(self) {
        let _ = self.tx.unbounded_send(Err(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        ))));
    }
}

/// The API server side of the mock: hands out the client's requests by
/// kind (the two watchers' requests interleave in any order).
struct ApiServer {
    handle: Handle,
    pending: Vec<Call>,
}

impl ApiServer {
    async fn next(&mut self, kind: Kind) -> Call {
        if let Some(i) = self.pending.iter().position(|c| c.kind == kind) {
            return self.pending.remove(i);
        }
        loop {
            let (request, respond) = timeout(PATIENCE, self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no {kind} request within {PATIENCE:?}"))
                .expect("the client is gone");
            let call = Call::new(request, respond);
            if call.kind == kind {
                return call;
            }
            self.pending.push(call);
        }
    }

    /// Asserts that no request of `kind` comes within `wait`.
    async fn quiet(&mut self, kind: Kind, wait: Duration) {
        assert!(
            !self.pending.iter().any(|c| c.kind == kind),
            "unexpected {kind} request"
        );
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(next) = tokio::time::timeout_at(deadline, self.handle.next_request()).await {
            let (request, respond) = next.expect("the client is gone");
            let call = Call::new(request, respond);
            assert_ne!(
                call.kind, kind,
                "unexpected {kind} request {:?}",
                call.query
            );
            self.pending.push(call);
        }
    }
}

// ---- objects ----

fn service(name: &str, resource_version: &str, node_port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": resource_version,
            "uid": format!("uid-{name}"),
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"}],
        },
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": node_port}],
        },
    })
}

fn slice(service: &str, resource_version: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node2"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"), "namespace": "shop",
            "resourceVersion": resource_version,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn bookmark(resource_version: &str) -> Value {
    json!({"type": "BOOKMARK", "object": {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"resourceVersion": resource_version},
    }})
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "reason": "Expired", "code": 410,
        "message": "too old resource version: 100 (5000)",
    }})
}

// ---- the daemon's side ----

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// What the maps would hold: translate + plan onto the previous state; the
/// skipped Services logged as the daemon logs them.
#[derive(Default)]
struct Maps {
    snapshot: Snapshot,
    skips: SkipLog,
}

impl Maps {
    fn program(&mut self, set: &ObjectSet) {
        let node = NodeContext {
            node_name: "node1".into(),
            node_addresses: vec![NODE_ADDR],
            ..Default::default()
        };
        let node = NodeContext {
            policing: set.policing(Enforcement::Netfilter, "node1"),
            ..node
        };
        let t = translate_with(
            &set.services,
            &set.endpoint_slices,
            &node,
            ServiceSelection::All,
        );
        let ops = plan::plan(&t.desired, &self.snapshot).expect("plan");
        self.snapshot = plan::apply_to_snapshot(&self.snapshot, &ops);
        self.skips.update(&t.skipped);
    }

    /// `addr:port/proto -> backend, backend` per frontend, sorted.
    fn render(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .snapshot
            .frontends
            .iter()
            .map(|(key, fe)| {
                let proto = Protocol::from_number(key.proto).expect("known protocol");
                let backends: Vec<String> = (0..fe.backend_count)
                    .map(|index| {
                        let b = self.snapshot.backends[&BackendKey {
                            backend_set: fe.backend_set,
                            index,
                        }];
                        format!(
                            "{}:{}{}",
                            Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                            u16::from_be(b.port_be),
                            if b.flags & BACKEND_F_POLICED != 0 {
                                " policed"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect();
                format!(
                    "{}:{}/{proto} -> {}",
                    Ipv4Addr::from(key.addr_be.to_ne_bytes()),
                    u16::from_be(key.port_be),
                    backends.join(", ")
                )
            })
            .collect();
        lines.sort();
        lines
    }
}

/// The daemon's end of the channel.
struct Daemon {
    rx: watch::Receiver<Option<ObjectSet>>,
    maps: Maps,
    last: Option<ObjectSet>,
    task: JoinHandle<()>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Daemon {
    fn generation(&self) -> Option<u64> {
        self.rx.borrow().as_ref().map(|s| s.generation)
    }

    /// Follows publications (programming each, as the daemon does) until
    /// the maps hold `want`; returns the last set.
    async fn converge(&mut self, want: &[&str]) -> ObjectSet {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let latest = self.rx.borrow_and_update().clone();
            if let Some(set) = latest {
                if self.last.as_ref().map(|l| l.generation) != Some(set.generation) {
                    self.maps.program(&set);
                    self.last = Some(set);
                }
                if self.maps.render() == want {
                    return self.last.clone().expect("a set");
                }
            }
            if tokio::time::timeout_at(deadline, self.rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "maps did not converge within {PATIENCE:?}\nwant: {want:#?}\nhave: {:#?}\nlast set: {:?}",
                    self.maps.render(),
                    self.last.as_ref().map(|s| (s.generation, &s.problems))
                );
            }
        }
    }

    /// Asserts that nothing new is published within `wait`.
    async fn nothing_published(&mut self, wait: Duration) {
        let before = self.generation();
        let _ = timeout(wait, async {
            while self.rx.changed().await.is_ok() {
                let now = self.rx.borrow().as_ref().map(|s| s.generation);
                assert_eq!(now, before, "published while it should not");
            }
        })
        .await;
        assert_eq!(self.generation(), before, "published while it should not");
    }
}

/// Counters of one test's source (the tests run in parallel).
fn new_counters() -> &'static WatchCounters {
    let counter = || -> &'static AtomicU64 { Box::leak(Box::new(AtomicU64::new(0))) };
    Box::leak(Box::new(WatchCounters {
        events: counter(),
        errors: counter(),
        relists: counter(),
    }))
}

fn start(options: WatchOptions) -> (ApiServer, Daemon) {
    start_counted(options, new_counters())
}

fn start_counted(options: WatchOptions, counters: &'static WatchCounters) -> (ApiServer, Daemon) {
    start_watching(options, PolicyWatch::Off, counters)
}

fn start_watching(
    options: WatchOptions,
    policy: PolicyWatch,
    counters: &'static WatchCounters,
) -> (ApiServer, Daemon) {
    let (service, handle) = mock::pair::<Request<kube::client::Body>, Response<ResponseBody>>();
    let client = kube::Client::new(service, "default");
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(watch_kubernetes_counted(
        client, tx, options, policy, counters,
    ));
    (
        ApiServer {
            handle,
            pending: Vec::new(),
        },
        Daemon {
            rx,
            maps: Maps::default(),
            last: None,
            task,
        },
    )
}

/// Both initial lists with one Service `web` (nodePort 30080, backend
/// 10.244.2.5); returns the open watch responses.
async fn initial_sync(api: &mut ApiServer, daemon: &mut Daemon) -> (WatchStream, WatchStream) {
    let list = api.next(Kind::Services).await;
    list.list("100", vec![service("web", "90", 30080)]);
    let list = api.next(Kind::Slices).await;
    list.list("200", vec![slice("web", "190", &["10.244.2.5"])]);
    let set = daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    assert_eq!(set.generation, 1);
    assert!(set.problems.is_empty(), "{:?}", set.problems);
    assert_eq!(set.services[0].metadata.managed_fields, None, "dropped");
    let services = api.next(Kind::Services).await;
    services.expect_watch_from("100");
    let slices = api.next(Kind::Slices).await;
    slices.expect_watch_from("200");
    (services.stream(), slices.stream())
}

#[tokio::test]
async fn nothing_is_published_before_both_initial_lists() {
    let (mut api, mut daemon) = start(OPTIONS);
    let list = api.next(Kind::Services).await;
    // The initial list is served from the watch cache, like kube-proxy's.
    assert_eq!(list.resource_version(), Some("0"));
    list.list("100", vec![service("web", "90", 30080)]);
    // The EndpointSlice list fails twice: Services alone are not published
    // (they would program Services without endpoints).
    let first_failure = Instant::now();
    api.next(Kind::Slices).await.fail();
    api.next(Kind::Slices).await.fail();
    let retry = api.next(Kind::Slices).await;
    // Two backoffs: 100 ms, then 200 ms (jitter only adds).
    assert!(
        first_failure.elapsed() >= Duration::from_millis(300),
        "retried after {:?}",
        first_failure.elapsed()
    );
    retry.expect_list();
    daemon.nothing_published(Duration::from_millis(200)).await;
    assert_eq!(daemon.generation(), None);
    retry.list("200", vec![slice("web", "190", &["10.244.2.5"])]);
    let set = daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    assert_eq!(set.generation, 1, "one publication for both lists");
}

#[tokio::test]
async fn watch_events_are_followed() {
    let (mut api, mut daemon) = start(OPTIONS);
    let (services, slices) = initial_sync(&mut api, &mut daemon).await;

    // ADDED
    services.send(event("ADDED", service("api", "101", 30081)));
    slices.send(event("ADDED", slice("api", "201", &["10.244.2.6"])));
    daemon
        .converge(&[
            "192.0.2.1:30080/TCP -> 10.244.2.5:8080",
            "192.0.2.1:30081/TCP -> 10.244.2.6:8080",
        ])
        .await;

    // MODIFIED: a backend added to web, api's nodePort changed.
    slices.send(event(
        "MODIFIED",
        slice("web", "202", &["10.244.2.5", "10.244.3.5"]),
    ));
    services.send(event("MODIFIED", service("api", "102", 30082)));
    daemon
        .converge(&[
            "192.0.2.1:30080/TCP -> 10.244.2.5:8080, 10.244.3.5:8080",
            "192.0.2.1:30082/TCP -> 10.244.2.6:8080",
        ])
        .await;

    // DELETED
    services.send(event("DELETED", service("web", "103", 30080)));
    let set = daemon
        .converge(&["192.0.2.1:30082/TCP -> 10.244.2.6:8080"])
        .await;
    assert_eq!(set.services.len(), 1);
    assert_eq!(set.endpoint_slices.len(), 2, "web's slice is still there");

    // BOOKMARK: no change to publish, but the watch resumes from it when
    // the response ends (the API server's watch timeout).
    let generation = daemon.generation();
    services.send(bookmark("150"));
    drop(services);
    let rewatch = api.next(Kind::Services).await;
    rewatch.expect_watch_from("150");
    daemon.nothing_published(Duration::from_millis(200)).await;
    assert_eq!(daemon.generation(), generation);
    let services = rewatch.stream();
    services.send(event("ADDED", service("web", "151", 30080)));
    daemon
        .converge(&[
            "192.0.2.1:30080/TCP -> 10.244.2.5:8080, 10.244.3.5:8080",
            "192.0.2.1:30082/TCP -> 10.244.2.6:8080",
        ])
        .await;
    drop(slices);
}

#[tokio::test]
async fn gone_relists_and_keeps_the_state_until_the_new_list() {
    let (mut api, mut daemon) = start(OPTIONS);
    let (services, _slices) = initial_sync(&mut api, &mut daemon).await;
    let generation = daemon.generation();

    // 410 Gone: the resourceVersion is too old; the watcher relists, not
    // older than what it has seen.
    services.send(gone());
    let relist = api.next(Kind::Services).await;
    relist.expect_list_not_older_than("100");
    // Until the relist completes, nothing changes.
    daemon.nothing_published(Duration::from_millis(200)).await;
    assert_eq!(daemon.generation(), generation);
    // While the watch was gone, web was deleted and shop/new created.
    relist.list(
        "5000",
        vec![service("new", "4990", 30090), service("api", "4991", 30091)],
    );
    let set = daemon.converge(&[]).await;
    assert_eq!(
        set.services
            .iter()
            .map(|s| s.metadata.name.as_deref().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["api", "new"]
    );
    // The watch resumes from the new list; a watch response that ends by
    // itself resumes from its last event.
    let rewatch = api.next(Kind::Services).await;
    rewatch.expect_watch_from("5000");
    rewatch.events(&[event("ADDED", service("web", "5001", 30080))]);
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    api.next(Kind::Services).await.expect_watch_from("5001");
}

#[tokio::test]
async fn a_dropped_connection_backs_off_and_resumes_where_it_was() {
    let counters = new_counters();
    let (mut api, mut daemon) = start_counted(OPTIONS, counters);
    let (services, slices) = initial_sync(&mut api, &mut daemon).await;
    services.send(event("ADDED", service("api", "101", 30081)));
    slices.send(event("ADDED", slice("api", "201", &["10.244.2.6"])));
    let want = [
        "192.0.2.1:30080/TCP -> 10.244.2.5:8080",
        "192.0.2.1:30081/TCP -> 10.244.2.6:8080",
    ];
    daemon.converge(&want).await;
    let generation = daemon.generation();

    // The connection drops mid-watch, then the API server is unreachable.
    let errors_before = counters.errors.load(Ordering::Relaxed);
    let dropped = Instant::now();
    services.break_connection();
    let again = api.next(Kind::Services).await;
    again.expect_watch_from("101");
    again.fail();
    let again = api.next(Kind::Services).await;
    again.expect_watch_from("101");
    again.fail();
    let again = api.next(Kind::Services).await;
    // Backed off between attempts: 100 + 200 + 400 ms at least.
    assert!(
        dropped.elapsed() >= Duration::from_millis(700),
        "retried after {:?}",
        dropped.elapsed()
    );
    // Meanwhile the last state stays, and nothing is published.
    assert_eq!(daemon.generation(), generation);
    // The failures are counted for the metrics: the broken connection and
    // the two refused ones.
    let errors = counters.errors.load(Ordering::Relaxed);
    assert_eq!(errors, errors_before + 3, "watch errors");
    assert_eq!(counters.relists.load(Ordering::Relaxed), 0);
    assert_eq!(daemon.maps.render(), want);

    // Back: it resumes from the last resourceVersion (no relist) and
    // follows events again.
    again.expect_watch_from("101");
    let services = again.stream();
    services.send(event("DELETED", service("api", "102", 30081)));
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    api.quiet(Kind::Services, Duration::from_millis(100)).await;
    drop(slices);
}

#[tokio::test]
async fn a_malformed_object_is_skipped_and_counted_while_the_others_are_published() {
    let (mut api, mut daemon) = start(OPTIONS);
    let mut broken = service("broken", "91", 30099);
    broken["spec"]["ports"] = json!("80");
    let list = api.next(Kind::Services).await;
    list.list("100", vec![service("web", "90", 30080), broken]);
    let list = api.next(Kind::Slices).await;
    list.list(
        "200",
        vec![
            slice("web", "190", &["10.244.2.5"]),
            slice("broken", "191", &["10.244.2.9"]),
        ],
    );
    let set = daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    assert_eq!(set.services.len(), 1);
    assert_eq!(set.problems.len(), 1, "{:?}", set.problems);
    assert!(
        set.problems[0].contains("shop/broken"),
        "{:?}",
        set.problems
    );

    let services = api.next(Kind::Services).await;
    services.expect_watch_from("100");
    let services = services.stream();
    let slices = api.next(Kind::Slices).await;
    slices.expect_watch_from("200");
    let slices = slices.stream();

    // A malformed object in a watch event does not stop the watch either.
    let mut bad_slice = slice("web", "201", &["10.244.2.5"]);
    bad_slice["endpoints"] = json!({"addresses": "10.244.2.5"});
    slices.send(event("MODIFIED", bad_slice));
    services.send(event("ADDED", service("api", "101", 30081)));
    slices.send(event("ADDED", slice("api", "202", &["10.244.2.6"])));
    let set = daemon
        .converge(&["192.0.2.1:30081/TCP -> 10.244.2.6:8080"])
        .await;
    assert_eq!(set.problems.len(), 2, "{:?}", set.problems);
    assert!(
        set.problems.iter().any(|p| p.contains("shop/web-abcde")),
        "{:?}",
        set.problems
    );

    // Fixed objects are used again and no longer counted.
    services.send(event("MODIFIED", service("broken", "102", 30099)));
    slices.send(event("MODIFIED", slice("web", "203", &["10.244.2.5"])));
    let set = daemon
        .converge(&[
            "192.0.2.1:30080/TCP -> 10.244.2.5:8080",
            "192.0.2.1:30081/TCP -> 10.244.2.6:8080",
            "192.0.2.1:30099/TCP -> 10.244.2.9:8080",
        ])
        .await;
    assert!(set.problems.is_empty(), "{:?}", set.problems);
}

#[tokio::test]
async fn a_burst_of_changes_becomes_a_few_publications() {
    let options = WatchOptions {
        debounce: Duration::from_millis(200),
        ..OPTIONS
    };
    let (mut api, mut daemon) = start(options.clone());
    let (_services, slices) = initial_sync(&mut api, &mut daemon).await;
    let before = daemon.generation().expect("published");

    // 10,000 changes to web's slice, arriving over about a second (in 50
    // chunks, as a busy API server streams them); the last one counts.
    let started = Instant::now();
    let mut text = String::new();
    for i in 0..10_000u32 {
        let last = format!("10.244.{}.{}", 3 + i / 250, 1 + i % 250);
        let body = event(
            "MODIFIED",
            slice("web", &(1000 + i).to_string(), &["10.244.2.5", &last]),
        );
        text.push_str(&format!("{body}\n"));
        if i % 200 == 199 {
            slices
                .tx
                .unbounded_send(Ok(Frame::data(Bytes::from(std::mem::take(&mut text)))))
                .expect("open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080, 10.244.42.250:8080"])
        .await;
    let elapsed = started.elapsed();
    let publications = daemon.generation().expect("published") - before;
    // At most one publication per debounce interval (plus the edges).
    let bound = 2 + (elapsed.as_millis() / options.debounce.as_millis()) as u64;
    assert!(
        publications <= bound,
        "{publications} publications in {elapsed:?}"
    );
}

/// A lagging API server cache after a 410: a list at resourceVersion 0
/// could be served from a cache that still holds a Service deleted since,
/// and would program it again. The relist asks for a state not older than
/// the last version seen; if the API server cannot serve that, a
/// consistent read. Neither is a watch error.
#[tokio::test]
async fn a_relist_after_gone_is_not_older_than_what_was_seen() {
    let counters = new_counters();
    let (mut api, mut daemon) = start_counted(OPTIONS, counters);
    let (services, _slices) = initial_sync(&mut api, &mut daemon).await;
    services.send(event("ADDED", service("api", "120", 30081)));
    services.send(event("DELETED", service("web", "150", 30080)));
    daemon.converge(&[]).await;
    let errors = counters.errors.load(Ordering::Relaxed);

    services.send(gone());
    let relist = api.next(Kind::Services).await;
    // Not "0": a cache lagging behind 150 could still list web.
    relist.expect_list_not_older_than("150");
    relist.list("5000", vec![service("api", "120", 30081)]);
    let set = daemon.converge(&[]).await;
    assert_eq!(set.services.len(), 1, "web stays deleted");
    let rewatch = api.next(Kind::Services).await;
    rewatch.expect_watch_from("5000");
    let services = rewatch.stream();
    services.send(event("ADDED", service("web", "5001", 30080)));
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;

    // Expired again, and the API server cannot serve "not older than 5001"
    // (compacted, or its cache is behind): a consistent read, at once.
    services.send(gone());
    let relist = api.next(Kind::Services).await;
    relist.expect_list_not_older_than("5001");
    let refused = Instant::now();
    relist.status(410, "Expired", "too old resource version: 5001 (6000)");
    let relist = api.next(Kind::Services).await;
    assert!(
        refused.elapsed() < OPTIONS.backoff_min,
        "the fallback waited {:?}",
        refused.elapsed()
    );
    relist.expect_consistent_list();
    relist.list("6000", vec![service("api", "120", 30081)]);
    daemon.converge(&[]).await;
    api.next(Kind::Services).await.expect_watch_from("6000");

    assert_eq!(counters.errors.load(Ordering::Relaxed), errors, "no errors");
    assert_eq!(counters.relists.load(Ordering::Relaxed), 3);
}

/// A routine 410 right after an outage: it relists at once, not after the
/// backoff the outage built up, and is not counted as an error. A watch
/// that expires again without any event is not routine and is backed off
/// (no tight list-watch loop against a misbehaving API server).
#[tokio::test]
async fn a_routine_gone_after_an_outage_relists_at_once_and_is_no_error() {
    let options = WatchOptions {
        backoff_max: Duration::from_millis(1600),
        ..OPTIONS
    };
    let counters = new_counters();
    let (mut api, mut daemon) = start_counted(options.clone(), counters);
    let (services, _slices) = initial_sync(&mut api, &mut daemon).await;

    // The outage: a broken watch and three refused connections (backoff
    // 100, 200, 400, 800 ms: the next failure would wait 1.6 s or more).
    services.send(event("ADDED", service("api", "300", 30081)));
    services.break_connection();
    for _ in 0..3 {
        let again = api.next(Kind::Services).await;
        again.expect_watch_from("300");
        again.fail();
    }
    // Back, but the watch window has moved on: the resumed watch expires
    // at once, which is routine.
    let again = api.next(Kind::Services).await;
    again.expect_watch_from("300");
    let errors = counters.errors.load(Ordering::Relaxed);
    assert_eq!(errors, 4);
    let expired = Instant::now();
    again.events(&[gone()]);
    let relist = api.next(Kind::Services).await;
    let waited = expired.elapsed();
    assert!(
        waited < Duration::from_millis(400),
        "relisted after {waited:?}: the 410 went through the failure backoff"
    );
    relist.expect_list_not_older_than("300");
    assert_eq!(
        counters.errors.load(Ordering::Relaxed),
        errors,
        "not an error"
    );
    assert_eq!(counters.relists.load(Ordering::Relaxed), 1);
    relist.list(
        "400",
        vec![service("web", "90", 30080), service("api", "300", 30081)],
    );
    let rewatch = api.next(Kind::Services).await;
    rewatch.expect_watch_from("400");
    let services = rewatch.stream();

    // Expired again before any event: backed off, and an error.
    let expired = Instant::now();
    services.send(gone());
    let relist = api.next(Kind::Services).await;
    let waited = expired.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "a repeated 410 was relisted after {waited:?}, without backoff"
    );
    relist.expect_list_not_older_than("400");
    assert_eq!(counters.errors.load(Ordering::Relaxed), errors + 1);
    relist.list("500", vec![service("web", "90", 30080)]);
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
}

/// Log records of this test binary (the tests run in parallel: each looks
/// for its own namespace).
struct CapturedLogs(Mutex<Vec<(log::Level, String)>>);

impl log::Log for CapturedLogs {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

fn captured_logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<&'static CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static CapturedLogs = Box::leak(Box::new(CapturedLogs(Mutex::new(Vec::new()))));
        log::set_logger(logs).expect("the only logger of this test binary");
        log::set_max_level(log::LevelFilter::Info);
        logs
    })
}

/// INFO lines that name a Service of namespace `namespace`.
fn info_lines_about(namespace: &str) -> Vec<String> {
    let needle = format!("{namespace}/");
    captured_logs()
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(level, line)| *level == log::Level::Info && line.contains(&needle))
        .map(|(_, line)| line.clone())
        .collect()
}

/// 200 Services without endpoints, then five changes to another Service's
/// slice: each is logged once (it used to be 200 lines per reconcile),
/// again only when its reason changes, and counted by reason.
#[tokio::test]
async fn a_skipped_service_is_logged_once_until_its_reason_changes() {
    captured_logs();
    let (mut api, mut daemon) = start(OPTIONS);
    let quiet: Vec<Value> = (0..200)
        .map(|i| {
            let mut s = service(&format!("idle-{i}"), "10", 31000 + i);
            s["metadata"]["namespace"] = json!("quiet");
            s
        })
        .collect();
    let mut items = quiet.clone();
    items.push(service("web", "90", 30080));
    api.next(Kind::Services).await.list("100", items);
    api.next(Kind::Slices)
        .await
        .list("200", vec![slice("web", "190", &["10.244.2.5"])]);
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.2.5:8080"])
        .await;
    let lines = info_lines_about("quiet");
    assert_eq!(
        lines.len(),
        200,
        "one line per Service: {:?}",
        &lines[..3.min(lines.len())]
    );
    assert!(
        lines[0].contains("no ready or terminating endpoints"),
        "{}",
        lines[0]
    );
    assert_eq!(
        daemon.maps.skips.counts().get(&SkipReason::NoEndpoints),
        Some(&200)
    );

    let services = api.next(Kind::Services).await;
    services.expect_watch_from("100");
    let services = services.stream();
    let slices = api.next(Kind::Slices).await;
    slices.expect_watch_from("200");
    let slices = slices.stream();
    // Five changes to web's slice, each programmed on its own.
    for i in 0..5u8 {
        let backend = format!("10.244.3.{}", i + 1);
        slices.send(event(
            "MODIFIED",
            slice(
                "web",
                &(201 + u32::from(i)).to_string(),
                &["10.244.2.5", &backend],
            ),
        ));
        daemon
            .converge(&[&format!(
                "192.0.2.1:30080/TCP -> 10.244.2.5:8080, {backend}:8080"
            )])
            .await;
    }
    assert_eq!(info_lines_about("quiet").len(), 200, "nothing new to say");

    // One of them is opted out: its reason changed, one line.
    let mut opted_out = quiet[7].clone();
    opted_out["metadata"]["resourceVersion"] = json!("300");
    opted_out["metadata"]["annotations"] = json!({"forwarder.dev/accelerate": "false"});
    services.send(event("MODIFIED", opted_out));
    let deadline = Instant::now() + PATIENCE;
    while daemon.maps.skips.counts().get(&SkipReason::OptedOut) != Some(&1) {
        assert!(Instant::now() < deadline, "the opt-out was not translated");
        let _ = timeout(Duration::from_millis(100), daemon.rx.changed()).await;
        let set = daemon.rx.borrow_and_update().clone().expect("a set");
        if daemon.last.as_ref().map(|l| l.generation) != Some(set.generation) {
            daemon.maps.program(&set);
            daemon.last = Some(set);
        }
    }
    let lines = info_lines_about("quiet");
    assert_eq!(lines.len(), 201, "{:?}", &lines[200..]);
    assert!(
        lines[200].contains("quiet/idle-7") && lines[200].contains("\"false\""),
        "{}",
        lines[200]
    );
    assert_eq!(
        daemon.maps.skips.counts().get(&SkipReason::NoEndpoints),
        Some(&199)
    );
}

// ---- NetworkPolicy ----

fn local_slice(service: &str, resource_version: &str, address: &str) -> Value {
    let mut s = slice(service, resource_version, &[address]);
    s["endpoints"][0]["nodeName"] = json!("node1");
    s
}

fn pod(name: &str, resource_version: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": resource_version,
            "labels": {"app": app}},
        "spec": {"nodeName": "node1", "containers": [{"name": "web", "image": "nginx"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn network_policy(name: &str, resource_version: &str, app: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": resource_version},
        "spec": {"podSelector": {"matchLabels": {"app": app}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["192.0.2.66/32"]}}]}]},
    })
}

#[tokio::test]
async fn network_policies_and_this_nodes_pods_decide_which_local_backends_are_policed() {
    let (mut api, mut daemon) = start_watching(
        OPTIONS,
        PolicyWatch::On {
            node_name: "node1".into(),
        },
        new_counters(),
    );
    api.next(Kind::Services)
        .await
        .list("100", vec![service("web", "90", 30080)]);
    api.next(Kind::Slices)
        .await
        .list("200", vec![local_slice("web", "190", "10.244.1.5")]);
    api.next(Kind::Pods)
        .await
        .list("300", vec![pod("web-1", "290", "10.244.1.5", "web")]);
    // Services without the policies would program a policed pod as ours.
    daemon.nothing_published(Duration::from_millis(200)).await;
    let policies = api.next(Kind::Policies).await;
    policies.list("400", vec![]);
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.1.5:8080"])
        .await;
    let policies = api.next(Kind::Policies).await;
    policies.expect_watch_from("400");
    let policies = policies.stream();

    // A policy selecting the pod: its flows become kube-proxy's.
    policies.send(event("ADDED", network_policy("deny-one", "401", "web")));
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.1.5:8080 policed"])
        .await;
    // One selecting other pods does not police it.
    policies.send(event("MODIFIED", network_policy("deny-one", "402", "db")));
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.1.5:8080"])
        .await;
    // A policy that cannot be read polices its namespace: doubt polices.
    let mut broken = network_policy("broken", "403", "web");
    broken["spec"]["podSelector"] = json!("app=web");
    policies.send(event("ADDED", broken.clone()));
    let set = daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.1.5:8080 policed"])
        .await;
    assert_eq!(set.unreadable_policies, vec![Some("shop".to_string())]);
    assert!(
        set.problems
            .iter()
            .any(|p| p.contains("NetworkPolicy shop/broken")),
        "{:?}",
        set.problems
    );
    policies.send(event("DELETED", broken));
    daemon
        .converge(&["192.0.2.1:30080/TCP -> 10.244.1.5:8080"])
        .await;
}

#[tokio::test]
async fn without_policy_watch_pods_and_policies_are_not_requested() {
    let (mut api, mut daemon) = start(OPTIONS);
    let _streams = initial_sync(&mut api, &mut daemon).await;
    api.quiet(Kind::Pods, Duration::from_millis(300)).await;
    api.quiet(Kind::Policies, Duration::from_millis(100)).await;
}
