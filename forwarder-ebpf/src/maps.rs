//! The maps shared with userspace (see forwarder-common for the layouts).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use forwarder_common::{
    AffinityKey, AffinityValue, Backend, BackendKey, Config, Counters, CtEntry, CtKey,
    DaemonStatus, Frontend, FrontendKey, IfaceInfo, MemberKey, Reason, ServiceLabel,
    DEFAULT_AFFINITY_ENTRIES, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_CT_HALF_OPEN_ENTRIES,
    MAX_BACKENDS, MAX_BACKEND_SLOTS, MAX_FRONTENDS, MAX_IFACES, MAX_POLICED_PODS, MAX_STATS_SLOTS,
};

#[map]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::with_max_entries(MAX_FRONTENDS, 0);

#[map]
pub static BACKENDS: HashMap<BackendKey, Backend> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Established flows (both directions; see `conntrack` for what counts).
/// LRU so a full table recycles the oldest flow instead of refusing new
/// ones; userspace also sweeps expired entries.
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);

/// Flows not established yet: a SYN flood fills and recycles this table
/// only, never the established one.
#[map]
pub static CT_HALF_OPEN: LruHashMap<CtKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_CT_HALF_OPEN_ENTRIES, 0);

/// Devices we are attached to or may forward to, by ifindex.
#[map]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_STATS_SLOTS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(MAX_BACKEND_SLOTS, 0);

#[map]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Counter slot -> service port name; only userspace reads and writes it.
#[map]
pub static SERVICE_LABELS: HashMap<u32, ServiceLabel> =
    HashMap::with_max_entries(MAX_STATS_SLOTS, 0);

/// The daemon's status (see `DaemonStatus`); only userspace reads and writes it.
#[map]
pub static STATUS: Array<DaemonStatus> = Array::with_max_entries(1, 0);

/// Per-CPU time of the last debug log line (rate limit).
#[map]
pub static LOG_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// sessionAffinity ClientIP: a client's backend per Service port (LRU).
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(DEFAULT_AFFINITY_ENTRIES, 0);

/// (backend set, backend) -> index in the set, for affinity frontends' sets.
#[map]
pub static BACKEND_MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Packets of tracked flows handed to the kernel, by reason: each one is a
/// packet netfilter sees in the middle of a flow it never saw begin.
/// Policed local pod address -> why NetworkPolicy guards it (the datapath
/// reads `BACKEND_F_POLICED`); only userspace reads and writes it.
#[map]
pub static POLICED_PODS: HashMap<u32, ServiceLabel> =
    HashMap::with_max_entries(MAX_POLICED_PODS, 0);

#[map]
pub static FLOW_PASS_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
