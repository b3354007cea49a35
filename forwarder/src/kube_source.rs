//! Services and EndpointSlices from the Kubernetes API (`forwarder run`
//! without `--manifests`).
//!
//! Two list-watches (core/v1 Service, discovery.k8s.io/v1 EndpointSlice,
//! cluster-wide, with kube-proxy's label selector; client-go's reflector
//! semantics on kube-rs's `Api`) feed two kube-runtime reflector stores. Once both initial lists are complete the stores are
//! published as an [`ObjectSet`] on the same channel the manifest source
//! uses, so both sources go through the very same translation.
//!
//! - Nothing is published before both kinds are listed: an empty set would
//!   program "no Services" over whatever the maps hold.
//! - Changes are batched: after a change the next set is published
//!   [`WatchOptions::debounce`] later, so a burst of events becomes one or a
//!   few publications (the `watch` channel keeps only the newest anyway).
//! - The watchers resume from the last resourceVersion after a dropped
//!   connection. After `410 Gone` they relist at once (a routine event, not
//!   an error), not older than the last version seen, falling back to a
//!   consistent read, as client-go does; the stores keep the previous list
//!   until a relist is complete. Errors are retried with exponential
//!   backoff; meanwhile nothing new is published and the datapath keeps
//!   forwarding with what it was given last.
//! - Objects are read one by one ([`Tolerant`]): an object that does not
//!   deserialize is logged with its namespace/name, reported in
//!   [`ObjectSet::problems`] and skipped, and never fails a list or a watch.
use std::{
    borrow::Cow,
    collections::hash_map::RandomState,
    fmt,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    api::{ListParams, VersionMatch, WatchParams},
    runtime::{
        reflector::{self, Store},
        watcher,
    },
    Api, Client, ResourceExt as _,
};
use log::{debug, info, warn};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use serde_json::Value;
use tokio::{sync::watch, time::Instant};

use crate::source::ObjectSet;

/// kube-proxy's selector for both informers (cmd/kube-proxy/app/server.go):
/// objects meant for another service proxy, and the EndpointSlices of
/// headless Services (the EndpointSlice controller labels them), are not
/// the proxy's business. kube-proxy uses no other filter on EndpointSlices
/// (in particular not `endpointslice.kubernetes.io/managed-by`), so neither
/// does this.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Watch events received (list items, changes, deletions), for metrics.
pub static WATCH_EVENTS: AtomicU64 = AtomicU64::new(0);
/// Failed lists and watches (each retried with backoff), for metrics.
pub static WATCH_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Routine relists (an expired watch, a relist falling back to a consistent
/// read), for metrics.
pub static WATCH_RELISTS: AtomicU64 = AtomicU64::new(0);

/// Timing of the Kubernetes source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// How long after a change the next set is published; changes within
    /// that time are published together.
    pub debounce: Duration,
    /// First delay after a failed list or watch; doubles up to `backoff_max`
    /// (plus up to half again of random jitter, so the nodes of a cluster do
    /// not all come back at once).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The backoff starts over from `backoff_min` after this long without
    /// a failure.
    pub backoff_reset: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        // The backoff is client-go's reflector's (as kube-runtime's default).
        WatchOptions {
            debounce: Duration::from_millis(200),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            backoff_reset: Duration::from_secs(120),
        }
    }
}

/// An object read on its own: either the typed object or, if it does not
/// deserialize, its metadata and the error. Watched instead of `K` so that a
/// single malformed object cannot fail a whole list page or watch event.
#[derive(Clone, Debug)]
pub enum Tolerant<K> {
    Valid(K),
    /// Boxed: rare, and it keeps `Tolerant<K>` the size of `K`.
    Malformed(Box<Malformed>),
}

/// An object that did not deserialize.
#[derive(Clone, Debug, Default)]
pub struct Malformed {
    /// As much metadata as could be read (at least name, namespace and
    /// resourceVersion when they are strings: the watcher and the store
    /// need them to follow and forget the object).
    pub metadata: ObjectMeta,
    pub error: String,
}

impl<K: DeserializeOwned> Tolerant<K> {
    /// Reads one object. Managed fields are dropped first: they are large
    /// and unused.
    pub fn from_value(mut value: Value) -> Self {
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        match K::deserialize(&value) {
            Ok(object) => Tolerant::Valid(object),
            Err(err) => Tolerant::Malformed(Box::new(Malformed {
                metadata: salvage_metadata(&value),
                error: err.to_string(),
            })),
        }
    }
}

/// The metadata of an object that did not deserialize: all of it if
/// possible, else the identifying strings.
fn salvage_metadata(value: &Value) -> ObjectMeta {
    let Some(meta) = value.get("metadata") else {
        return ObjectMeta::default();
    };
    if let Ok(full) = ObjectMeta::deserialize(meta) {
        return full;
    }
    let text = |key: &str| meta.get(key).and_then(Value::as_str).map(str::to_owned);
    ObjectMeta {
        name: text("name"),
        namespace: text("namespace"),
        resource_version: text("resourceVersion"),
        uid: text("uid"),
        ..ObjectMeta::default()
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Tolerant<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Fails only if the input is not JSON at all (then nothing in the
        // response is usable anyway).
        Value::deserialize(deserializer).map(Tolerant::from_value)
    }
}

impl<K> kube::Resource for Tolerant<K>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        K::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        K::VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Tolerant::Valid(object) => object.metadata(),
            Tolerant::Malformed(m) => &m.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Tolerant::Valid(object) => object.metadata_mut(),
            Tolerant::Malformed(m) => &mut m.metadata,
        }
    }
}

/// `namespace/name` for messages.
fn object_name(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Pod,
    NetworkPolicy,
}

impl Kind {
    /// The name of one object of this kind.
    fn object(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Services",
            Kind::EndpointSlice => "EndpointSlices",
            Kind::Pod => "Pods",
            Kind::NetworkPolicy => "NetworkPolicies",
        })
    }
}

/// Whether the source also watches what NetworkPolicy enforcement needs
/// (see `policy`): every NetworkPolicy, and the Pods of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PolicyWatch {
    /// Services and EndpointSlices only.
    #[default]
    Off,
    /// Also NetworkPolicies, and Pods with `spec.nodeName` = `node_name`.
    On { node_name: String },
}

/// Which objects of a kind a list-watch asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Selector {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selector {
    /// kube-proxy's, for Services and EndpointSlices.
    fn proxy() -> Self {
        Selector {
            labels: Some(LABEL_SELECTOR.into()),
            fields: None,
        }
    }

    fn list(&self, mut params: ListParams) -> ListParams {
        if let Some(labels) = &self.labels {
            params = params.labels(labels);
        }
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        params
    }

    fn watch(&self, mut params: WatchParams) -> WatchParams {
        if let Some(labels) = &self.labels {
            params = params.labels(labels);
        }
        if let Some(fields) = &self.fields {
            params = params.fields(fields);
        }
        params
    }
}

/// What one step of a kind's list-watch means for publishing.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A list is complete and in the store.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// The watch expired (410 Gone) or a relist fell back: a list follows at
    /// once; the store still holds the previous list.
    Relisting,
    /// A request failed; it is retried after a backoff.
    Failed,
}

fn report_malformed<K>(kind: Kind, object: &Tolerant<K>) {
    if let Tolerant::Malformed(m) = object {
        warn!(
            "kubernetes: skipping {} {}: cannot be read: {}",
            kind.object(),
            object_name(&m.metadata),
            m.error
        );
    }
}

/// Exponential backoff with jitter for one kind's requests, as client-go's
/// reflector backs off (which kube-proxy uses): it starts over only after
/// `reset_after` without a failure.
struct ExponentialBackoff {
    min: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
    last_failure: Option<std::time::Instant>,
    random: RandomState,
    draws: u64,
}

impl ExponentialBackoff {
    fn new(options: &WatchOptions) -> Self {
        ExponentialBackoff {
            min: options.backoff_min,
            max: options.backoff_max.max(options.backoff_min),
            reset_after: options.backoff_reset,
            next: options.backoff_min,
            last_failure: None,
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The delay after a failure at `now`.
    fn delay_at(&mut self, now: std::time::Instant) -> Duration {
        if self
            .last_failure
            .is_some_and(|t| now.saturating_duration_since(t) >= self.reset_after)
        {
            self.next = self.min;
        }
        self.last_failure = Some(now);
        let base = self.next;
        self.next = base.saturating_mul(2).min(self.max);
        self.draws += 1;
        // RandomState is randomly keyed per process: a cheap source of jitter.
        let fraction = (self.random.hash_one(self.draws) % 1000) as f64 / 2000.0;
        base + base.mul_f64(fraction)
    }

    fn delay(&mut self) -> Duration {
        self.delay_at(std::time::Instant::now())
    }
}

/// Counters of one source, for metrics (the daemon's are the statics above).
#[derive(Debug)]
pub struct WatchCounters {
    /// List items, changes and deletions received.
    pub events: &'static AtomicU64,
    /// Failed lists and watches, each retried with backoff.
    pub errors: &'static AtomicU64,
    /// Routine relists: a watch expired (410 Gone), or a relist fell back
    /// to a consistent read. Not errors, and not backed off.
    pub relists: &'static AtomicU64,
}

/// The counters `/metrics` reports.
pub static COUNTERS: WatchCounters = WatchCounters {
    events: &WATCH_EVENTS,
    errors: &WATCH_ERRORS,
    relists: &WATCH_RELISTS,
};

impl WatchCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Which version a list asks for, as client-go's reflector chooses it
/// (kubernetes#83520).
#[derive(Clone, Debug, PartialEq, Eq)]
enum ListFrom {
    /// `resourceVersion=0`: whatever the API server's watch cache has. Only
    /// the first list: kind to the API server when every node of a large
    /// cluster starts at once.
    Cache,
    /// Not older than the last version this watcher saw: after a watch
    /// expired, a lagging cache cannot hand back a state older than what
    /// was already programmed (a deleted Service coming back).
    NotOlderThan(String),
    /// No resourceVersion: a consistent read, when the API server cannot
    /// serve `NotOlderThan` (the version is gone, or its cache is behind).
    Consistent,
}

impl ListFrom {
    fn params(&self, selector: &Selector) -> ListParams {
        // Unpaged: kube-rs leaves resourceVersion=0 out of a paged list,
        // which would make every list a quorum read from etcd.
        let params = selector.list(ListParams::default());
        match self {
            ListFrom::Cache => params.match_any(),
            ListFrom::NotOlderThan(version) => {
                params.matching(VersionMatch::NotOlderThan).at(version)
            }
            ListFrom::Consistent => params,
        }
    }
}

impl fmt::Display for ListFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListFrom::Cache => f.write_str("from the API server's cache"),
            ListFrom::NotOlderThan(v) => write!(f, "not older than resourceVersion {v}"),
            ListFrom::Consistent => f.write_str("with a consistent read"),
        }
    }
}

/// The API server cannot list at that version: expired (410), or newer
/// than its cache (client-go's `isTooLargeResourceVersionError`).
fn version_unavailable(err: &kube::Error) -> bool {
    let kube::Error::Api(status) = err else {
        return false;
    };
    status.code == 410
        || status.reason == "Expired"
        || status.reason == "Gone"
        || status.message.contains("Too large resource version")
        || status.details.as_ref().is_some_and(|d| {
            d.causes
                .iter()
                .any(|c| c.reason == "ResourceVersionTooLarge")
        })
}

/// A watch response, boxed.
type EventStream<K> =
    futures::stream::BoxStream<'static, kube::Result<kube::core::WatchEvent<Tolerant<K>>>>;

/// Where one kind's list-watch stands.
enum Phase<K> {
    List(ListFrom),
    /// Start a watch from this version.
    Watch(Resume),
    Watching {
        from: Resume,
        stream: EventStream<K>,
    },
}

/// The version a watch (re)starts from.
#[derive(Clone, Debug)]
struct Resume {
    version: String,
    /// The version is a list's, with no event since: a 410 now is not
    /// routine (the list itself is already expired) and is backed off, so
    /// a misbehaving API server does not get a tight list-watch loop.
    fresh: bool,
}

/// The API server ends a watch after this; a watch silent for longer (plus
/// a margin) is taken as a dead connection.
const WATCH_TIMEOUT_S: u32 = 290;
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_TIMEOUT_S as u64 + 5);

/// One kind's list and watch: client-go's reflector on kube-rs's `Api`.
///
/// - The first list reads the API server's cache (`resourceVersion=0`).
/// - The watch resumes from the last version seen (events and bookmarks)
///   after a dropped connection or the API server's watch timeout.
/// - A watch that expires (410 Gone) is routine: relisted at once, not
///   backed off and not counted as an error, from a version not older than
///   the last one seen; if the API server cannot serve that, with a
///   consistent read.
/// - Failed requests are retried with [`ExponentialBackoff`].
struct ListWatch<K>
where
    K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Clone + 'static,
{
    api: Api<Tolerant<K>>,
    kind: Kind,
    selector: Selector,
    writer: reflector::store::Writer<Tolerant<K>>,
    backoff: ExponentialBackoff,
    counters: &'static WatchCounters,
    phase: Phase<K>,
    /// Waited out before the next request (after a failure).
    pause: Option<Duration>,
}

impl<K> ListWatch<K>
where
    K: k8s_openapi::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + DeserializeOwned
        + Clone
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    fn failed(&mut self, phase: Phase<K>, what: fmt::Arguments<'_>) -> Step {
        warn!(
            "kubernetes: {}: {what}; retrying with backoff, the datapath keeps the last programmed state",
            self.kind
        );
        WatchCounters::add(self.counters.errors, 1);
        self.phase = phase;
        self.pause = Some(self.backoff.delay());
        Step::Failed
    }

    fn relist(&mut self, from: ListFrom, why: fmt::Arguments<'_>) -> Step {
        info!(
            "kubernetes: {}: {why}; relisting {from}, keeping the current state until then",
            self.kind
        );
        WatchCounters::add(self.counters.relists, 1);
        self.phase = Phase::List(from);
        Step::Relisting
    }

    /// The watch from `from` expired: relist at once, unless it is the
    /// version of the list just made.
    fn expired(&mut self, from: Resume, why: fmt::Arguments<'_>) -> Step {
        let relist = ListFrom::NotOlderThan(from.version);
        if from.fresh {
            self.failed(
                Phase::List(relist),
                format_args!("{why}, right after a list"),
            )
        } else {
            self.relist(relist, why)
        }
    }

    /// Makes requests until there is something to report.
    async fn step(&mut self) -> Step {
        if let Some(pause) = self.pause.take() {
            tokio::time::sleep(pause).await;
        }
        loop {
            match std::mem::replace(&mut self.phase, Phase::List(ListFrom::Consistent)) {
                Phase::List(from) => return self.list(from).await,
                Phase::Watch(from) => {
                    let params = self
                        .selector
                        .watch(WatchParams::default().timeout(WATCH_TIMEOUT_S));
                    match self.api.watch(&params, &from.version).await {
                        Ok(stream) => {
                            self.phase = Phase::Watching {
                                from,
                                stream: stream.boxed(),
                            }
                        }
                        Err(err) if version_unavailable(&err) => {
                            return self.expired(from, format_args!("watch refused: {err}"));
                        }
                        Err(err) => {
                            return self.failed(Phase::Watch(from), format_args!("{err}"));
                        }
                    }
                }
                Phase::Watching {
                    mut from,
                    mut stream,
                } => {
                    use kube::core::WatchEvent;
                    let next = match tokio::time::timeout(WATCH_IDLE, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            debug!(
                                "kubernetes: watching {}: silent for {WATCH_IDLE:?}, reconnecting",
                                self.kind
                            );
                            None
                        }
                    };
                    let (event, object_version) = match next {
                        // The response ended (the API server's watch timeout):
                        // resume from the last version seen.
                        None => {
                            self.phase = Phase::Watch(from);
                            continue;
                        }
                        Some(Ok(WatchEvent::Added(o) | WatchEvent::Modified(o))) => {
                            report_malformed(self.kind, &o);
                            let v = o.resource_version();
                            (watcher::Event::Apply(o), v)
                        }
                        Some(Ok(WatchEvent::Deleted(o))) => {
                            let v = o.resource_version();
                            (watcher::Event::Delete(o), v)
                        }
                        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                            self.phase = Phase::Watching {
                                from: Resume {
                                    version: bookmark.metadata.resource_version,
                                    fresh: false,
                                },
                                stream,
                            };
                            continue;
                        }
                        Some(Ok(WatchEvent::Error(status))) if status.code == 410 => {
                            return self.expired(
                                from,
                                format_args!("watch expired (410 Gone: {})", status.message),
                            );
                        }
                        Some(Ok(WatchEvent::Error(status))) => {
                            return self.failed(
                                Phase::Watch(from),
                                format_args!("watch error {}: {}", status.code, status.message),
                            );
                        }
                        Some(Err(err)) => {
                            return self.failed(Phase::Watch(from), format_args!("{err}"));
                        }
                    };
                    if let Some(version) = object_version.filter(|v| !v.is_empty()) {
                        from.version = version;
                    }
                    from.fresh = false;
                    self.writer.apply_watcher_event(&event);
                    WatchCounters::add(self.counters.events, 1);
                    self.phase = Phase::Watching { from, stream };
                    return Step::Changed;
                }
            }
        }
    }

    async fn list(&mut self, from: ListFrom) -> Step {
        debug!("kubernetes: listing {} {from}", self.kind);
        match self.api.list(&from.params(&self.selector)).await {
            Ok(list) => {
                let Some(version) = list.metadata.resource_version.filter(|v| !v.is_empty()) else {
                    return self.failed(
                        Phase::List(from),
                        format_args!("the list has no resourceVersion"),
                    );
                };
                self.writer.apply_watcher_event(&watcher::Event::Init);
                let count = list.items.len() as u64;
                for object in list.items {
                    report_malformed(self.kind, &object);
                    self.writer
                        .apply_watcher_event(&watcher::Event::InitApply(object));
                }
                self.writer.apply_watcher_event(&watcher::Event::InitDone);
                WatchCounters::add(self.counters.events, count);
                self.phase = Phase::Watch(Resume {
                    version,
                    fresh: true,
                });
                Step::Listed
            }
            Err(err) if from != ListFrom::Consistent && version_unavailable(&err) => self.relist(
                ListFrom::Consistent,
                format_args!("the API server cannot list {from}: {err}"),
            ),
            Err(err) => {
                let what = format!("list {from}: {err}");
                self.failed(Phase::List(from), format_args!("{what}"))
            }
        }
    }
}

/// One kind's list-watch: changes applied to `writer`'s store, classified.
fn watch_kind<K>(
    client: Client,
    kind: Kind,
    selector: Selector,
    writer: reflector::store::Writer<Tolerant<K>>,
    options: &WatchOptions,
    counters: &'static WatchCounters,
) -> futures::stream::BoxStream<'static, (Kind, Step)>
where
    K: k8s_openapi::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Metadata<Ty = ObjectMeta>
        + DeserializeOwned
        + Clone
        + fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let state = ListWatch {
        api: Api::<Tolerant<K>>::all(client),
        kind,
        selector,
        writer,
        backoff: ExponentialBackoff::new(options),
        counters,
        phase: Phase::List(ListFrom::Cache),
        pause: None,
    };
    stream::unfold(state, move |mut state| async move {
        let step = state.step().await;
        Some(((kind, step), state))
    })
    .boxed()
}

/// The valid objects of a store, sorted by namespace/name; malformed ones
/// go to `problems`.
fn collect<K: Clone>(kind: Kind, store: &Store<Tolerant<K>>, problems: &mut Vec<String>) -> Vec<K>
where
    Tolerant<K>: kube::Resource<DynamicType = ()>,
{
    collect_noting(kind, store, problems, &mut Vec::new())
}

/// [`collect`], also noting the namespace of each malformed object.
fn collect_noting<K: Clone>(
    kind: Kind,
    store: &Store<Tolerant<K>>,
    problems: &mut Vec<String>,
    malformed: &mut Vec<Option<String>>,
) -> Vec<K>
where
    Tolerant<K>: kube::Resource<DynamicType = ()>,
{
    use kube::Resource as _;
    let mut objects: Vec<Arc<Tolerant<K>>> = store.state();
    objects.sort_by(|a, b| {
        let (a, b) = (a.meta(), b.meta());
        (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name))
    });
    let mut valid = Vec::with_capacity(objects.len());
    for object in objects {
        match object.as_ref() {
            Tolerant::Valid(o) => valid.push(o.clone()),
            Tolerant::Malformed(m) => {
                problems.push(format!(
                    "{} {}: cannot be read: {}",
                    kind.object(),
                    object_name(&m.metadata),
                    m.error
                ));
                malformed.push(m.metadata.namespace.clone());
            }
        }
    }
    valid
}

/// Watches Services and EndpointSlices through `client` and publishes them
/// on `tx`, until the receiving side is gone; counts into [`COUNTERS`].
pub async fn watch_kubernetes(
    client: Client,
    tx: watch::Sender<Option<ObjectSet>>,
    options: WatchOptions,
    policy: PolicyWatch,
) {
    watch_kubernetes_counted(client, tx, options, policy, &COUNTERS).await
}

/// [`watch_kubernetes`], counting into `counters`.
pub async fn watch_kubernetes_counted(
    client: Client,
    tx: watch::Sender<Option<ObjectSet>>,
    options: WatchOptions,
    policy: PolicyWatch,
    counters: &'static WatchCounters,
) {
    let (services, services_writer) = reflector::store::<Tolerant<Service>>();
    let (slices, slices_writer) = reflector::store::<Tolerant<EndpointSlice>>();
    let (pods, pods_writer) = reflector::store::<Tolerant<Pod>>();
    let (policies, policies_writer) = reflector::store::<Tolerant<NetworkPolicy>>();
    let mut watches = vec![
        watch_kind(
            client.clone(),
            Kind::Service,
            Selector::proxy(),
            services_writer,
            &options,
            counters,
        ),
        watch_kind(
            client.clone(),
            Kind::EndpointSlice,
            Selector::proxy(),
            slices_writer,
            &options,
            counters,
        ),
    ];
    if let PolicyWatch::On { node_name } = &policy {
        watches.push(watch_kind(
            client.clone(),
            Kind::Pod,
            Selector {
                labels: None,
                fields: Some(format!("spec.nodeName={node_name}")),
            },
            pods_writer,
            &options,
            counters,
        ));
        watches.push(watch_kind(
            client,
            Kind::NetworkPolicy,
            Selector::default(),
            policies_writer,
            &options,
            counters,
        ));
    }
    // Nothing is published before every watched kind is listed.
    let mut unlisted: std::collections::BTreeSet<Kind> = [Kind::Service, Kind::EndpointSlice]
        .into_iter()
        .chain(
            matches!(policy, PolicyWatch::On { .. })
                .then_some([Kind::Pod, Kind::NetworkPolicy])
                .into_iter()
                .flatten(),
        )
        .collect();
    let mut events = stream::select_all(watches);

    let mut changed = false;
    let mut publish_at: Option<Instant> = None;
    let mut generation = 0u64;
    info!("kubernetes: watching Services (core/v1) and EndpointSlices (discovery.k8s.io/v1) with label selector {LABEL_SELECTOR:?}");
    if let PolicyWatch::On { node_name } = &policy {
        info!("kubernetes: watching NetworkPolicies (networking.k8s.io/v1) and the Pods of node {node_name} (core/v1), for policy enforced in netfilter");
    }
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            event = events.next() => {
                // The watchers retry forever: their streams do not end.
                let Some((kind, step)) = event else { return };
                match step {
                    Step::Relisting | Step::Failed => {}
                    Step::Listed => {
                        unlisted.remove(&kind);
                        changed = true;
                    }
                    Step::Changed => changed = true,
                }
            }
            _ = tokio::time::sleep_until(publish_at.unwrap_or_else(Instant::now)), if publish_at.is_some() => {
                publish_at = None;
                changed = false;
                generation += 1;
                let mut problems = Vec::new();
                let mut unreadable_policies = Vec::new();
                let set = ObjectSet {
                    services: collect(Kind::Service, &services, &mut problems),
                    endpoint_slices: collect(Kind::EndpointSlice, &slices, &mut problems),
                    pods: collect(Kind::Pod, &pods, &mut problems),
                    network_policies: collect_noting(
                        Kind::NetworkPolicy,
                        &policies,
                        &mut problems,
                        &mut unreadable_policies,
                    ),
                    unreadable_policies,
                    problems,
                    generation,
                };
                if generation == 1 {
                    info!(
                        "kubernetes: initial lists complete: {} Services, {} EndpointSlices{}",
                        set.services.len(),
                        set.endpoint_slices.len(),
                        if matches!(policy, PolicyWatch::On { .. }) {
                            format!(
                                ", {} Pods on this node, {} NetworkPolicies",
                                set.pods.len(),
                                set.network_policies.len() + set.unreadable_policies.len()
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                if !set.problems.is_empty() {
                    info!("kubernetes: {} objects skipped as unreadable", set.problems.len());
                }
                if tx.send(Some(set)).is_err() {
                    return;
                }
            }
        }
        if changed && publish_at.is_none() && unlisted.is_empty() {
            // The first set as soon as every list is in; later ones batched.
            publish_at = Some(if generation == 0 {
                Instant::now()
            } else {
                Instant::now() + options.debounce
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_object_keeps_its_identity_and_loses_nothing_else() {
        let value = serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {"type": "NodePort", "ports": "80"},
        });
        let Tolerant::<Service>::Malformed(m) = Tolerant::from_value(value) else {
            panic!("ports as a string must not deserialize");
        };
        assert_eq!(object_name(&m.metadata), "shop/web");
        assert_eq!(m.metadata.resource_version.as_deref(), Some("7"));
        assert!(m.error.contains("invalid type"), "{}", m.error);
    }

    #[test]
    fn broken_metadata_still_yields_the_name() {
        let value = serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7", "labels": "x"},
        });
        let Tolerant::<Service>::Malformed(m) = Tolerant::from_value(value) else {
            panic!("labels as a string must not deserialize");
        };
        assert_eq!(object_name(&m.metadata), "shop/web");
        assert_eq!(m.metadata.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn managed_fields_are_dropped() {
        let value = serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"type": "NodePort"},
        });
        let Tolerant::<Service>::Valid(s) = Tolerant::from_value(value) else {
            panic!("valid Service");
        };
        assert_eq!(s.metadata.managed_fields, None);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_bounded_jitter() {
        let options = WatchOptions {
            debounce: Duration::ZERO,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            backoff_reset: Duration::from_secs(60),
        };
        let mut b = ExponentialBackoff::new(&options);
        let start = std::time::Instant::now();
        let mut now = start;
        for base in [100, 200, 400, 400] {
            let d = b.delay_at(now);
            let base = Duration::from_millis(base);
            assert!(d >= base && d < base + base / 2, "{d:?} for base {base:?}");
            now += d;
        }
        // Failures close together keep the maximum...
        assert!(b.delay_at(now) >= Duration::from_millis(400));
        // ...a minute without failures does.
        let d = b.delay_at(now + Duration::from_secs(61));
        assert!(d < Duration::from_millis(150), "{d:?}");
    }
}

#[cfg(test)]
mod list_from_tests {
    use super::*;

    fn query(from: ListFrom) -> String {
        let request = kube::core::Request::new("/api/v1/services");
        request
            .list(&from.params(&Selector::proxy()))
            .expect("valid list request")
            .uri()
            .to_string()
    }

    #[test]
    fn each_list_asks_for_its_version() {
        let cache = query(ListFrom::Cache);
        assert!(
            cache.contains("resourceVersion=0&resourceVersionMatch=NotOlderThan"),
            "{cache}"
        );
        let not_older = query(ListFrom::NotOlderThan("150".into()));
        assert!(
            not_older.contains("resourceVersion=150&resourceVersionMatch=NotOlderThan"),
            "{not_older}"
        );
        let consistent = query(ListFrom::Consistent);
        assert!(!consistent.contains("resourceVersion"), "{consistent}");
        for q in [cache, not_older, consistent] {
            assert!(!q.contains("limit="), "unpaged: {q}");
        }
    }

    #[test]
    fn expired_and_too_large_versions_are_told_from_other_errors() {
        let status = |code: u16, reason: &str, message: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                reason: reason.into(),
                message: message.into(),
                ..kube::core::Status::failure(message, reason)
            }))
        };
        assert!(version_unavailable(&status(
            410,
            "Expired",
            "too old resource version: 1 (5)"
        )));
        assert!(version_unavailable(&status(
            504,
            "Timeout",
            "Too large resource version: 9, current: 5"
        )));
        assert!(!version_unavailable(&status(
            500,
            "InternalError",
            "etcd is sad"
        )));
        assert!(!version_unavailable(&status(403, "Forbidden", "no")));
    }
}
