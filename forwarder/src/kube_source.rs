//! Services and EndpointSlices from the Kubernetes API (`forwarder run`
//! without `--manifests`).
//!
//! Two kube-runtime watchers (core/v1 Service, discovery.k8s.io/v1
//! EndpointSlice, cluster-wide, with kube-proxy's label selector) feed two
//! reflector stores. Once both initial lists are complete the stores are
//! published as an [`ObjectSet`] on the same channel the manifest source
//! uses, so both sources go through the very same translation.
//!
//! - Nothing is published before both kinds are listed: an empty set would
//!   program "no Services" over whatever the maps hold.
//! - Changes are batched: after a change the next set is published
//!   [`WatchOptions::debounce`] later, so a burst of events becomes one or a
//!   few publications (the `watch` channel keeps only the newest anyway).
//! - The watchers resume from the last resourceVersion after a dropped
//!   connection and relist after `410 Gone`; the stores keep the previous
//!   list until a relist is complete. Errors are retried with exponential
//!   backoff; meanwhile nothing new is published and the datapath keeps
//!   forwarding with what it was given last.
//! - Objects are read one by one ([`Tolerant`]): an object that does not
//!   deserialize is logged with its namespace/name, reported in
//!   [`ObjectSet::problems`] and skipped, and never fails a list or a watch.
use std::{
    borrow::Cow, collections::hash_map::RandomState, fmt, hash::BuildHasher, pin::pin, sync::Arc,
    time::Duration,
};

use futures::{stream, Stream, StreamExt};
use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher::{self, ListSemantic},
        WatchStreamExt,
    },
    Api, Client,
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
pub static WATCH_EVENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Failed lists and watches (each retried with backoff), for metrics.
pub static WATCH_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    /// The name of one object of this kind.
    fn object(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Services",
            Kind::EndpointSlice => "EndpointSlices",
        })
    }
}

/// What one watcher event means for publishing.
#[derive(Debug)]
enum Step {
    /// A (re)list is under way: the store still holds the previous list.
    Listing,
    /// A list is complete and in the store.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// A request failed; the watcher retries after a backoff.
    Failed,
}

fn classify<K>(kind: Kind, item: watcher::Result<watcher::Event<Tolerant<K>>>) -> (Kind, Step) {
    use watcher::Event;
    let step = match item {
        Ok(Event::Init) => {
            debug!("kubernetes: listing {kind}");
            Step::Listing
        }
        Ok(Event::InitApply(object)) => {
            report_malformed(kind, &object);
            Step::Listing
        }
        Ok(Event::InitDone) => Step::Listed,
        Ok(Event::Apply(object)) => {
            report_malformed(kind, &object);
            Step::Changed
        }
        Ok(Event::Delete(_)) => Step::Changed,
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            info!(
                "kubernetes: watching {kind}: resourceVersion expired (410 Gone); relisting, keeping the current state until then"
            );
            Step::Failed
        }
        Err(err) => {
            warn!(
                "kubernetes: {kind}: {err}; retrying with backoff, the datapath keeps the last programmed state"
            );
            Step::Failed
        }
    };
    (kind, step)
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

/// Exponential backoff with jitter for one watch stream, as client-go's
/// reflector backs off (which kube-proxy uses): it starts over only after
/// `reset_after` without a failure. The stream's own reset on every
/// successful event is ignored: a watcher emits a successful `Init` before
/// each list attempt, so that reset would keep an unreachable API server
/// retried at the minimum delay forever.
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
}

impl Iterator for ExponentialBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.delay_at(std::time::Instant::now()))
    }
}

impl Backoff for ExponentialBackoff {
    fn reset(&mut self) {
        // See the type's documentation: time resets, events do not.
    }
}

/// One kind's watcher: events applied to `writer`'s store, classified.
fn watch_kind<K>(
    client: Client,
    kind: Kind,
    writer: reflector::store::Writer<Tolerant<K>>,
    options: &WatchOptions,
) -> impl Stream<Item = (Kind, Step)> + Send
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
    // Lists at resourceVersion 0 (served from the API server's watch cache),
    // as client-go's reflector does for kube-proxy: kind to the API server
    // when every node of a large cluster starts at once. Unpaged: kube-rs
    // leaves resourceVersion=0 out of a paged list, which would make every
    // list a quorum read from etcd.
    let config = watcher::Config::default()
        .labels(LABEL_SELECTOR)
        .list_semantic(ListSemantic::Any);
    let config = watcher::Config {
        page_size: None,
        ..config
    };
    watcher::watcher(Api::<Tolerant<K>>::all(client), config)
        .backoff(ExponentialBackoff::new(options))
        .reflect(writer)
        .map(move |item| classify(kind, item))
}

/// The valid objects of a store, sorted by namespace/name; malformed ones
/// go to `problems`.
fn collect<K: Clone>(kind: Kind, store: &Store<Tolerant<K>>, problems: &mut Vec<String>) -> Vec<K>
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
            Tolerant::Malformed(m) => problems.push(format!(
                "{} {}: cannot be read: {}",
                kind.object(),
                object_name(&m.metadata),
                m.error
            )),
        }
    }
    valid
}

/// Watches Services and EndpointSlices through `client` and publishes them
/// on `tx`, until the receiving side is gone.
pub async fn watch_kubernetes(
    client: Client,
    tx: watch::Sender<Option<ObjectSet>>,
    options: WatchOptions,
) {
    let (services, services_writer) = reflector::store::<Tolerant<Service>>();
    let (slices, slices_writer) = reflector::store::<Tolerant<EndpointSlice>>();
    let events = stream::select(
        watch_kind(client.clone(), Kind::Service, services_writer, &options),
        watch_kind(client, Kind::EndpointSlice, slices_writer, &options),
    );
    let mut events = pin!(events);

    let mut services_listed = false;
    let mut slices_listed = false;
    let mut changed = false;
    let mut publish_at: Option<Instant> = None;
    let mut generation = 0u64;
    info!("kubernetes: watching Services (core/v1) and EndpointSlices (discovery.k8s.io/v1) with label selector {LABEL_SELECTOR:?}");
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            event = events.next() => {
                // The watchers retry forever: their streams do not end.
                let Some((kind, step)) = event else { return };
                let counter = if matches!(step, Step::Failed) { &WATCH_ERRORS } else { &WATCH_EVENTS };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match step {
                    Step::Listing | Step::Failed => {}
                    Step::Listed => {
                        match kind {
                            Kind::Service => services_listed = true,
                            Kind::EndpointSlice => slices_listed = true,
                        }
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
                let set = ObjectSet {
                    services: collect(Kind::Service, &services, &mut problems),
                    endpoint_slices: collect(Kind::EndpointSlice, &slices, &mut problems),
                    problems,
                    generation,
                };
                if generation == 1 {
                    info!(
                        "kubernetes: initial lists complete: {} Services, {} EndpointSlices",
                        set.services.len(),
                        set.endpoint_slices.len()
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
        if changed && publish_at.is_none() && services_listed && slices_listed {
            // The first set as soon as both lists are in; later ones batched.
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
        // A stream's reset (after every event, even between failed lists)
        // does not shorten the delay...
        b.reset();
        assert!(b.delay_at(now) >= Duration::from_millis(400));
        // ...a minute without failures does.
        let d = b.delay_at(now + Duration::from_secs(61));
        assert!(d < Duration::from_millis(150), "{d:?}");
    }
}
