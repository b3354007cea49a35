//! Typed handles on the datapath's maps, opened from a loaded object or from
//! their pins (so `forwarder stats` works with or without a daemon).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use forwarder_common::{
    map_names, AffinityKey, AffinityValue, Backend, BackendKey, Config, Counters, CtEntry, CtKey,
    DaemonStatus, Frontend, FrontendKey, IfaceInfo, MemberKey, Reason, ServiceLabel,
};

use crate::plan::{Op, Snapshot};

pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    /// Established flows.
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// Flows not established yet.
    pub ct_half_open: HashMap<MapData, CtKey, CtEntry>,
    pub ifaces: HashMap<MapData, u32, IfaceInfo>,
    pub config: Array<MapData, Config>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reason_stats: PerCpuArray<MapData, u64>,
    pub service_labels: HashMap<MapData, u32, ServiceLabel>,
    pub status: Array<MapData, DaemonStatus>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub backend_members: HashMap<MapData, MemberKey, u32>,
    pub flow_pass_stats: PerCpuArray<MapData, u64>,
    pub policed_pods: HashMap<MapData, u32, ServiceLabel>,
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(map: Map, name: &str) -> Result<T> {
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        Ok(Maps {
            frontends: typed(take(map_names::FRONTENDS)?, map_names::FRONTENDS)?,
            backends: typed(take(map_names::BACKENDS)?, map_names::BACKENDS)?,
            conntrack: typed(take(map_names::CONNTRACK)?, map_names::CONNTRACK)?,
            ct_half_open: typed(take(map_names::CT_HALF_OPEN)?, map_names::CT_HALF_OPEN)?,
            ifaces: typed(take(map_names::IFACES)?, map_names::IFACES)?,
            config: typed(take(map_names::CONFIG)?, map_names::CONFIG)?,
            service_stats: typed(take(map_names::SERVICE_STATS)?, map_names::SERVICE_STATS)?,
            backend_stats: typed(take(map_names::BACKEND_STATS)?, map_names::BACKEND_STATS)?,
            reason_stats: typed(take(map_names::REASON_STATS)?, map_names::REASON_STATS)?,
            service_labels: typed(take(map_names::SERVICE_LABELS)?, map_names::SERVICE_LABELS)?,
            status: typed(take(map_names::STATUS)?, map_names::STATUS)?,
            affinity: typed(take(map_names::AFFINITY)?, map_names::AFFINITY)?,
            backend_members: typed(
                take(map_names::BACKEND_MEMBERS)?,
                map_names::BACKEND_MEMBERS,
            )?,
            flow_pass_stats: typed(
                take(map_names::FLOW_PASS_STATS)?,
                map_names::FLOW_PASS_STATS,
            )?,
            policed_pods: typed(take(map_names::POLICED_PODS)?, map_names::POLICED_PODS)?,
        })
    }

    /// Opens the maps a daemon pinned under `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_path(pin_dir, name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening pinned map {} (is a forwarder running with --pin-dir {}?)",
                    path.display(),
                    pin_dir.display()
                )
            })?;
            Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
        };
        Ok(Maps {
            frontends: typed(open(map_names::FRONTENDS)?, map_names::FRONTENDS)?,
            backends: typed(open(map_names::BACKENDS)?, map_names::BACKENDS)?,
            conntrack: typed(open(map_names::CONNTRACK)?, map_names::CONNTRACK)?,
            ct_half_open: typed(open(map_names::CT_HALF_OPEN)?, map_names::CT_HALF_OPEN)?,
            ifaces: typed(open(map_names::IFACES)?, map_names::IFACES)?,
            config: typed(open(map_names::CONFIG)?, map_names::CONFIG)?,
            service_stats: typed(open(map_names::SERVICE_STATS)?, map_names::SERVICE_STATS)?,
            backend_stats: typed(open(map_names::BACKEND_STATS)?, map_names::BACKEND_STATS)?,
            reason_stats: typed(open(map_names::REASON_STATS)?, map_names::REASON_STATS)?,
            service_labels: typed(open(map_names::SERVICE_LABELS)?, map_names::SERVICE_LABELS)?,
            status: typed(open(map_names::STATUS)?, map_names::STATUS)?,
            affinity: typed(open(map_names::AFFINITY)?, map_names::AFFINITY)?,
            backend_members: typed(
                open(map_names::BACKEND_MEMBERS)?,
                map_names::BACKEND_MEMBERS,
            )?,
            flow_pass_stats: typed(
                open(map_names::FLOW_PASS_STATS)?,
                map_names::FLOW_PASS_STATS,
            )?,
            policed_pods: typed(open(map_names::POLICED_PODS)?, map_names::POLICED_PODS)?,
        })
    }

    /// What the service maps hold now.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        for item in self.frontends.iter() {
            let (k, v) = item.context("reading FRONTENDS")?;
            s.frontends.insert(k, v);
        }
        for item in self.backends.iter() {
            let (k, v) = item.context("reading BACKENDS")?;
            s.backends.insert(k, v);
        }
        for item in self.backend_members.iter() {
            let (k, v) = item.context("reading BACKEND_MEMBERS")?;
            s.members.insert(k, v);
        }
        for item in self.service_labels.iter() {
            let (k, v) = item.context("reading SERVICE_LABELS")?;
            s.labels.insert(k, v.as_str().to_string());
        }
        Ok(s)
    }

    /// Writes `ops` in order; stops at the first failure (the order keeps
    /// whatever was written consistent for packets).
    pub fn apply(&mut self, ops: &[Op]) -> Result<()> {
        let ncpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))?;
        for op in ops {
            match op {
                Op::ClaimSlot(slot, label) => {
                    let zeros = PerCpuValues::try_from(vec![Counters::default(); ncpus])
                        .context("per-CPU zero counters")?;
                    self.service_stats
                        .set(*slot, zeros, 0)
                        .with_context(|| format!("resetting counters slot {slot}"))?;
                    self.service_labels
                        .insert(slot, ServiceLabel::new(label), 0)
                        .with_context(|| format!("naming counters slot {slot}"))?;
                }
                Op::ClaimBackendSlot(slot) => {
                    let zeros = PerCpuValues::try_from(vec![Counters::default(); ncpus])
                        .context("per-CPU zero counters")?;
                    self.backend_stats
                        .set(*slot, zeros, 0)
                        .with_context(|| format!("resetting backend counters slot {slot}"))?;
                }
                Op::PutBackend(k, v) => self.backends.insert(k, v, 0).with_context(|| {
                    format!("writing backend {k:?} (is the BACKENDS map full?)")
                })?,
                Op::PutMember(k, v) => self.backend_members.insert(k, v, 0).with_context(|| {
                    format!("writing backend membership {k:?} (is the BACKEND_MEMBERS map full?)")
                })?,
                Op::PutFrontend(k, v) => self.frontends.insert(k, v, 0).with_context(|| {
                    format!("writing frontend {k:?} (is the FRONTENDS map full?)")
                })?,
                Op::DeleteFrontend(k) => ignore_missing(self.frontends.remove(k))
                    .with_context(|| format!("deleting frontend {k:?}"))?,
                Op::DeleteMember(k) => ignore_missing(self.backend_members.remove(k))
                    .with_context(|| format!("deleting backend membership {k:?}"))?,
                Op::DeleteBackend(k) => ignore_missing(self.backends.remove(k))
                    .with_context(|| format!("deleting backend {k:?}"))?,
                Op::ReleaseSlot(slot) => ignore_missing(self.service_labels.remove(slot))
                    .with_context(|| format!("releasing counters slot {slot}"))?,
            }
        }
        Ok(())
    }

    /// Makes POLICED_PODS hold `policed` (address -> why); returns how many
    /// did not fit (they are policed all the same, only not explained).
    pub fn set_policed_pods(
        &mut self,
        policed: &BTreeMap<std::net::Ipv4Addr, String>,
    ) -> Result<usize> {
        let wanted: BTreeMap<u32, &String> = policed
            .iter()
            .map(|(a, why)| (u32::from_ne_bytes(a.octets()), why))
            .collect();
        let present: Vec<u32> = self
            .policed_pods
            .keys()
            .collect::<Result<_, _>>()
            .context("reading POLICED_PODS")?;
        for key in present.iter().filter(|k| !wanted.contains_key(k)) {
            ignore_missing(self.policed_pods.remove(key)).context("deleting from POLICED_PODS")?;
        }
        let mut unexplained = 0;
        for (key, why) in wanted {
            let label = ServiceLabel::new(why);
            let same = self
                .policed_pods
                .get(&key, 0)
                .ok()
                .is_some_and(|l| l.as_str() == label.as_str());
            if !same && self.policed_pods.insert(key, label, 0).is_err() {
                unexplained += 1;
            }
        }
        Ok(unexplained)
    }

    /// Policed local pod address -> why, as the daemon last wrote it.
    pub fn policed_pods(&self) -> Result<BTreeMap<u32, String>> {
        let mut out = BTreeMap::new();
        for item in self.policed_pods.iter() {
            let (k, v) = item.context("reading POLICED_PODS")?;
            out.insert(k, v.as_str().to_string());
        }
        Ok(out)
    }

    /// Reason counters summed over CPUs.
    pub fn reason_totals(&self) -> Result<BTreeMap<&'static str, u64>> {
        totals_by_reason(&self.reason_stats)
    }

    /// One of the two conntrack tables.
    pub fn ct_table(&self, table: crate::datapath::CtTable) -> &HashMap<MapData, CtKey, CtEntry> {
        match table {
            crate::datapath::CtTable::HalfOpen => &self.ct_half_open,
            crate::datapath::CtTable::Established => &self.conntrack,
        }
    }

    pub fn ct_table_mut(
        &mut self,
        table: crate::datapath::CtTable,
    ) -> &mut HashMap<MapData, CtKey, CtEntry> {
        match table {
            crate::datapath::CtTable::HalfOpen => &mut self.ct_half_open,
            crate::datapath::CtTable::Established => &mut self.conntrack,
        }
    }

    /// Stores `total` as the count of `reason` (on the first CPU's slot, the
    /// others zero): for the counts the daemon keeps, which the datapath
    /// never touches.
    pub fn set_reason_total(&mut self, reason: Reason, total: u64) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut values = vec![0u64; cpus];
        values[0] = total;
        let values = PerCpuValues::try_from(values).context("per-CPU values")?;
        self.reason_stats
            .set(reason as u32, values, 0)
            .with_context(|| format!("writing the {} count", reason.name()))
    }

    /// Packets of tracked flows handed to the kernel, by reason, summed over
    /// CPUs (only reasons that occurred).
    pub fn flow_pass_totals(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut totals = totals_by_reason(&self.flow_pass_stats)?;
        totals.retain(|_, n| *n != 0);
        Ok(totals)
    }

    /// Packets and bytes of a counters slot, summed over CPUs.
    pub fn service_totals(&self, slot: u32) -> Result<Counters> {
        sum(&self.service_stats, slot)
    }

    /// Packets and bytes of a backend's counters slot, summed over CPUs.
    pub fn backend_totals(&self, slot: u32) -> Result<Counters> {
        sum(&self.backend_stats, slot)
    }
}

fn totals_by_reason(map: &PerCpuArray<MapData, u64>) -> Result<BTreeMap<&'static str, u64>> {
    let mut out = BTreeMap::new();
    for r in Reason::ALL {
        let values = map
            .get(&(*r as u32), 0)
            .with_context(|| format!("reading counter {}", r.name()))?;
        out.insert(r.name(), values.iter().sum());
    }
    Ok(out)
}

fn sum(map: &PerCpuArray<MapData, Counters>, slot: u32) -> Result<Counters> {
    let values = map
        .get(&slot, 0)
        .with_context(|| format!("reading counters slot {slot}"))?;
    Ok(values.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    }))
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

pub fn pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join(name)
}
