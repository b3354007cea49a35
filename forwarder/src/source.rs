//! Where the Services and EndpointSlices come from. A source publishes whole
//! snapshots on a `watch` channel: bursts of changes coalesce into the
//! latest state, and the daemon translates whatever is newest.
use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use log::{info, warn};
use tokio::sync::watch;

use crate::{
    manifest,
    policy::{Enforcement, Policing, PolicyObjects},
};

/// The objects a source currently knows.
#[derive(Clone, Debug, Default)]
pub struct ObjectSet {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// This node's Pods and all NetworkPolicies (empty unless the source
    /// reads them: see `policy`).
    pub pods: Vec<Pod>,
    pub network_policies: Vec<NetworkPolicy>,
    /// Namespaces of NetworkPolicies that could not be read (`None`: unknown).
    pub unreadable_policies: Vec<Option<String>>,
    /// Objects that could not be used, one line each (already logged by the source).
    pub problems: Vec<String>,
    /// Bumped on every publication, so consumers can tell sets apart.
    pub generation: u64,
}

impl ObjectSet {
    /// Which local endpoints NetworkPolicy guards on node `node_name`.
    pub fn policing(&self, enforcement: Enforcement, node_name: &str) -> Policing {
        match enforcement {
            Enforcement::OutsideNetfilter => Policing::none(),
            Enforcement::Netfilter => Policing::of(
                PolicyObjects {
                    pods: &self.pods,
                    policies: &self.network_policies,
                    unreadable: &self.unreadable_policies,
                },
                node_name,
            ),
        }
    }
}

/// How often the manifest path is checked for changes.
const MANIFEST_POLL: Duration = Duration::from_secs(1);

/// Watches a manifest file or directory and publishes it whenever it changes.
/// Publishes nothing until the first successful read.
pub async fn watch_manifests(path: PathBuf, tx: watch::Sender<Option<ObjectSet>>) {
    let mut last: Option<u64> = None;
    let mut generation = 0;
    let mut tick = tokio::time::interval(MANIFEST_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let fp = manifest::fingerprint(&p)?;
            Ok::<_, anyhow::Error>((fp, p))
        })
        .await;
        let fingerprint = match read {
            Ok(Ok((fp, _))) => fp,
            Ok(Err(e)) => {
                warn!(
                    "manifests: {}: {e:#}; keeping the last state",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                warn!("manifests: {e}");
                continue;
            }
        };
        if last == Some(fingerprint) {
            continue;
        }
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || manifest::load_path(&p)).await;
        match loaded {
            Ok(Ok(set)) => {
                generation += 1;
                let problems: Vec<String> = set.problems.iter().map(|p| p.to_string()).collect();
                for p in &problems {
                    warn!("manifest: {p}");
                }
                info!(
                    "manifests: read {} Services, {} EndpointSlices, {} Pods, {} NetworkPolicies from {}",
                    set.services.len(),
                    set.endpoint_slices.len(),
                    set.pods.len(),
                    set.network_policies.len() + set.unreadable_policies.len(),
                    path.display()
                );
                last = Some(fingerprint);
                let published = ObjectSet {
                    services: set.services,
                    endpoint_slices: set.endpoint_slices,
                    pods: set.pods,
                    network_policies: set.network_policies,
                    unreadable_policies: set.unreadable_policies,
                    problems,
                    generation,
                };
                if tx.send(Some(published)).is_err() {
                    return;
                }
            }
            Ok(Err(e)) => warn!("manifests: {e:#}; keeping the last state"),
            Err(e) => warn!("manifests: {e}"),
        }
    }
}
