//! Types shared by the eBPF datapath and the userspace daemon.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding, and a
//! compile-time size check so both sides agree on the layout. Fields holding
//! addresses or ports in network byte order end in `_be`: they are stored
//! exactly as they appear in the packet, so the datapath compares and writes
//! them without conversion.
#![no_std]

pub mod csum;
pub mod hash;

use bytemuck::{Pod, Zeroable};

/// IP protocol numbers we translate.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// ICMP errors about translated flows are translated with them.
pub const IPPROTO_ICMP: u8 = 1;

/// Map names, as the eBPF object defines them and as they are pinned.
pub mod map_names {
    pub const FRONTENDS: &str = "FRONTENDS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const CT_HALF_OPEN: &str = "CT_HALF_OPEN";
    pub const IFACES: &str = "IFACES";
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const SERVICE_LABELS: &str = "SERVICE_LABELS";
    pub const STATUS: &str = "STATUS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const BACKEND_MEMBERS: &str = "BACKEND_MEMBERS";
    pub const FLOW_PASS_STATS: &str = "FLOW_PASS_STATS";
    pub const POLICED_PODS: &str = "POLICED_PODS";
    /// Every map the daemon pins, in a stable order.
    pub const ALL: [&str; 15] = [
        FRONTENDS,
        BACKENDS,
        CONNTRACK,
        CT_HALF_OPEN,
        IFACES,
        CONFIG,
        SERVICE_STATS,
        REASON_STATS,
        SERVICE_LABELS,
        STATUS,
        BACKEND_STATS,
        AFFINITY,
        BACKEND_MEMBERS,
        FLOW_PASS_STATS,
        POLICED_PODS,
    ];
}

/// Name of the read-only global holding the datapath generation.
pub const GENERATION_GLOBAL: &str = "DATAPATH_GENERATION";

/// Program names in the eBPF object.
pub mod program_names {
    pub const XDP: &str = "xdp_ingress";
    pub const TC: &str = "tc_ingress";
}

pub const MAX_FRONTENDS: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
/// Default conntrack capacity (established flows); the daemon may size it
/// differently at load.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// Default capacity of the half-open table (flows whose handshake, or first
/// reply, is still to come): a quarter of the established one.
pub const DEFAULT_CT_HALF_OPEN_ENTRIES: u32 = DEFAULT_CONNTRACK_ENTRIES / 4;
pub const MAX_IFACES: u32 = 4_096;
/// Slots in the per-service counters array; slot 0 is never handed out.
pub const MAX_STATS_SLOTS: u32 = 65_536;
/// Slots in the per-backend counters array (per CPU, so kept modest);
/// backends past it share slot 0, which is not reported.
pub const MAX_BACKEND_SLOTS: u32 = 16_384;
/// Upper bound on backends of one frontend (keeps the choice loop-free).
pub const MAX_BACKENDS_PER_FRONTEND: u32 = 65_535;
/// Default capacity of the sessionAffinity ClientIP table (LRU).
pub const DEFAULT_AFFINITY_ENTRIES: u32 = 65_536;
/// Local pods whose policing reason `forwarder services` can show.
pub const MAX_POLICED_PODS: u32 = 4_096;

/// Key of the frontends map: one entry per (address, port, protocol) we accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct FrontendKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 8);

/// The frontend will not source-NAT (externalTrafficPolicy: Local).
pub const FRONTEND_F_NO_SNAT: u32 = 1 << 0;
/// With no backend, drop instead of passing to the kernel.
pub const FRONTEND_F_DROP_IF_EMPTY: u32 = 1 << 1;

/// Value of the frontends map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Frontend {
    /// Id of the backend set in [`BackendKey::backend_set`]. A new set is
    /// written in full before the frontend points at it, so a packet never
    /// sees a half-written list.
    pub backend_set: u32,
    pub backend_count: u32,
    /// Index into the per-service counters.
    pub stats_slot: u32,
    /// `FRONTEND_F_*`.
    pub flags: u32,
    /// sessionAffinity ClientIP: how long (seconds) a client's last new
    /// connection keeps it on its backend; 0 means no affinity.
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct BackendKey {
    pub backend_set: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);

/// Key of the backend-membership map: is `addr:port` in backend set
/// `backend_set`, and at which index? Written only for the sets of
/// frontends with session affinity, so a client's remembered backend can be
/// checked without walking the set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MemberKey {
    pub backend_set: u32,
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<MemberKey>() == 12);

/// Key of the affinity map: one client of one Service port (the Service
/// port's counters slot names it, as it is shared by all its frontends).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct AffinityKey {
    pub client_addr_be: u32,
    pub service_slot: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);

/// Value of the affinity map: the backend of the client's last new
/// connection, and when that was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AffinityValue {
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
    /// `bpf_ktime_get_coarse_ns` of the client's last new connection.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// The backend runs on this node: keep the client address, no source NAT.
pub const BACKEND_F_LOCAL: u16 = 1 << 0;
/// A local pod that an ingress NetworkPolicy selects, on a node whose CNI
/// enforces policy in netfilter: its new flows are kube-proxy's, so the
/// policy's FORWARD rules see them.
pub const BACKEND_F_POLICED: u16 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    /// `BACKEND_F_*`.
    pub flags: u16,
    /// Index into the per-backend counters (one per backend address:port).
    pub stats_slot: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 12);

/// A flow as it appears on the wire, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct CtKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Two scalar pads rather than `[u8; 3]`: the eBPF build zeroes arrays with memset calls.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

impl CtKey {
    pub const fn new(
        saddr_be: u32,
        sport_be: u16,
        daddr_be: u32,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        CtKey {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// This entry translates replies (backend to client).
pub const CT_F_REPLY: u8 = 1 << 0;
/// The flow is source-NATed to a node address and port (remote backend).
pub const CT_F_SNAT: u8 = 1 << 1;

/// TCP and UDP flow states, shared by both entries of a flow.
/// TCP: the client's SYN was seen (nf_conntrack's SYN_SENT). UDP: no reply yet.
pub const CT_STATE_NEW: u8 = 0;
/// TCP: the client's ACK of the backend's SYN-ACK was seen. UDP: a reply was seen.
pub const CT_STATE_ESTABLISHED: u8 = 1;
/// TCP: a FIN was seen.
pub const CT_STATE_FIN: u8 = 2;
/// TCP: a RST was seen.
pub const CT_STATE_CLOSED: u8 = 3;
/// TCP: the backend's SYN-ACK was seen, the client's ACK not yet (SYN_RECV).
pub const CT_STATE_SYN_RECV: u8 = 4;

/// Value of the conntrack map: how to rewrite a packet matching [`CtKey`].
///
/// A flow has two entries: the forward one keyed by the client's packet and
/// the reply one keyed by the backend's packet. Each holds the addresses and
/// ports to write, so one rewrite routine serves both directions. The peer's
/// key is always `(new_daddr, new_dport) -> (new_saddr, new_sport)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    pub new_saddr_be: u32,
    pub new_daddr_be: u32,
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    pub stats_slot: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet in this direction.
    pub last_seen_ns: u64,
    pub created_ns: u64,
    /// `CT_F_*`.
    pub flags: u8,
    /// `CT_STATE_*`.
    pub state: u8,
    /// Low bits of the datapath generation whose programs created the flow
    /// (`--datapath-generation`): shows which version made an entry.
    pub generation: u16,
    /// Index into the per-backend counters.
    pub backend_slot: u32,
    /// The device this direction's packets must arrive on (0: any external
    /// device): a reply is translated only when it comes in where the
    /// backend's replies come in.
    pub ifindex: u32,
    /// The peer entry's `ifindex`, so either entry can rebuild the other.
    pub peer_ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 48);

impl CtEntry {
    /// The key of the other direction of this flow.
    pub const fn peer_key(&self, proto: u8) -> CtKey {
        CtKey::new(
            self.new_daddr_be,
            self.new_dport_be,
            self.new_saddr_be,
            self.new_sport_be,
            proto,
        )
    }
}

/// Packet and byte counters (per CPU in the maps).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 16);

/// Name of the service port a counters slot belongs to (`namespace/name:port`),
/// NUL-padded. Written by userspace so `forwarder stats` needs no daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceLabel {
    pub bytes: [u8; SERVICE_LABEL_LEN],
}
pub const SERVICE_LABEL_LEN: usize = 128;
const _: () = assert!(core::mem::size_of::<ServiceLabel>() == SERVICE_LABEL_LEN);

impl ServiceLabel {
    /// Truncates at a character boundary to fit.
    pub fn new(label: &str) -> Self {
        let mut end = label.len().min(SERVICE_LABEL_LEN);
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; SERVICE_LABEL_LEN];
        bytes[..end].copy_from_slice(&label.as_bytes()[..end]);
        ServiceLabel { bytes }
    }

    pub fn as_str(&self) -> &str {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(SERVICE_LABEL_LEN);
        core::str::from_utf8(&self.bytes[..end]).unwrap_or("<invalid label>")
    }
}

/// What the daemon last did, kept in a pinned map so inspection commands and
/// a restarted daemon can read it without the daemon. Times are Unix seconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DaemonStatus {
    /// Hash of the eBPF object the attached programs came from.
    pub object_hash: u64,
    pub started_unix: u64,
    /// Refreshed every second while a daemon runs.
    pub heartbeat_unix: u64,
    /// When the desired state was last programmed completely (0: never).
    pub programmed_unix: u64,
    pub frontends: u32,
    pub backends: u32,
    pub pid: u32,
    /// Consecutive failed reconciles (0 when the last one succeeded).
    pub failures: u32,
}
const _: () = assert!(core::mem::size_of::<DaemonStatus>() == 48);

/// The device faces clients: frontends are looked up on it.
pub const IFACE_F_EXTERNAL: u32 = 1 << 0;
/// XDP may transmit out of this device (`XDP_TX` / redirect).
pub const IFACE_F_XDP_TX: u32 = 1 << 1;
/// A veth whose peer sits in another namespace: tc may `bpf_redirect_peer` to it.
pub const IFACE_F_VETH_PEER: u32 = 1 << 2;
/// Informational: XDP runs in generic (skb) mode here; native otherwise.
pub const IFACE_F_XDP_GENERIC: u32 = 1 << 3;
/// Informational: no XDP here (the device refused it); tc does everything.
pub const IFACE_F_TC_ONLY: u32 = 1 << 4;
/// Its tc program is a netlink filter on a clsact qdisc (no tcx): it stays
/// attached without a pin, and is found again by its priority and handle.
pub const IFACE_F_TC_NETLINK: u32 = 1 << 5;

/// Value of the interfaces map, keyed by ifindex (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IfaceInfo {
    /// Address used as the source of source-NATed flows leaving here (0: none).
    pub snat_addr_be: u32,
    /// `IFACE_F_*`.
    pub flags: u32,
    /// For a bridge port: the bridge's ifindex (routes name the bridge, a
    /// pod's replies come in on its port); 0 otherwise.
    pub master_ifindex: u32,
    /// The destination MAC of frames addressed to this node as they come in
    /// here: the device's own address, or for a bridge port its bridge's.
    /// A unicast frame to any other MAC is not the node's (the kernel marks
    /// it PACKET_OTHERHOST and drops it), so it is never translated.
    pub host_mac: [u8; 6],
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 20);

/// Datapath settings, the single entry of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// Source ports for source-NATed flows, host byte order, inclusive: a
    /// first range and an optional second one (both 0: none), so the ports
    /// on both sides of the node's local port range can serve.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub snat2_port_min: u16,
    pub snat2_port_max: u16,
    /// `CONFIG_F_*`.
    pub flags: u32,
    pub _pad: u32,
    pub tcp_syn_timeout_ns: u64,
    pub tcp_syn_recv_timeout_ns: u64,
    pub tcp_established_timeout_ns: u64,
    pub tcp_fin_timeout_ns: u64,
    pub tcp_closed_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    pub udp_replied_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Config>() == 72);

/// Draining: take no new flows (they go to the kernel, so kube-proxy), keep
/// translating the existing ones.
pub const CONFIG_F_DRAINING: u32 = 1 << 0;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Ports in `min..=max`; 0 for an empty range or one starting at 0.
const fn range_len(min: u16, max: u16) -> u32 {
    if min == 0 || max < min {
        0
    } else {
        (max - min) as u32 + 1
    }
}

impl Default for Config {
    /// kube-proxy's conntrack settings where it sets them (established 24 h),
    /// the kernel's elsewhere. Source ports above the default local port range
    /// (32768-60999) and the NodePort range (30000-32767).
    fn default() -> Self {
        Config {
            snat_port_min: 61_000,
            snat_port_max: 65_535,
            snat2_port_min: 0,
            snat2_port_max: 0,
            flags: 0,
            _pad: 0,
            tcp_syn_timeout_ns: 120 * NS_PER_SEC,
            tcp_syn_recv_timeout_ns: 60 * NS_PER_SEC,
            tcp_established_timeout_ns: 86_400 * NS_PER_SEC,
            tcp_fin_timeout_ns: 120 * NS_PER_SEC,
            tcp_closed_timeout_ns: 10 * NS_PER_SEC,
            udp_timeout_ns: 30 * NS_PER_SEC,
            udp_replied_timeout_ns: 120 * NS_PER_SEC,
        }
    }
}

impl Config {
    /// How many source-NAT ports the two ranges hold.
    pub const fn snat_ports(&self) -> u32 {
        range_len(self.snat_port_min, self.snat_port_max)
            + range_len(self.snat2_port_min, self.snat2_port_max)
    }

    /// The `index`th source-NAT port (host order), `index < snat_ports()`.
    pub const fn snat_port(&self, index: u32) -> u16 {
        let first = range_len(self.snat_port_min, self.snat_port_max);
        if index < first {
            (self.snat_port_min as u32 + index) as u16
        } else {
            (self.snat2_port_min as u32 + (index - first)) as u16
        }
    }

    /// How long an entry in `state` for `proto` may sit idle.
    pub const fn timeout_ns(&self, proto: u8, state: u8) -> u64 {
        if proto == IPPROTO_TCP {
            match state {
                CT_STATE_NEW => self.tcp_syn_timeout_ns,
                CT_STATE_SYN_RECV => self.tcp_syn_recv_timeout_ns,
                CT_STATE_ESTABLISHED => self.tcp_established_timeout_ns,
                CT_STATE_FIN => self.tcp_fin_timeout_ns,
                _ => self.tcp_closed_timeout_ns,
            }
        } else if state == CT_STATE_ESTABLISHED {
            self.udp_replied_timeout_ns
        } else {
            self.udp_timeout_ns
        }
    }
}

macro_rules! reasons {
    ($($variant:ident = $name:literal : $doc:literal,)*) => {
        /// Why the datapath did what it did with a packet; each has a per-CPU counter.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $(#[doc = $doc] $variant,)*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable snake_case name for output and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// The packet is dropped (every other reason passes or forwards it).
            pub const fn is_drop(self) -> bool {
                matches!(self, Reason::DropNoLocalBackend | Reason::DropRedirectFailed)
            }

            /// The reason is a packet's verdict: each packet the programs
            /// see counts exactly one verdict, in the hook that decided its
            /// fate (a frame XDP passes, tc decides). The other reasons
            /// count events: flows created, ICMP translated, frames XDP
            /// left to tc.
            pub const fn is_verdict(self) -> bool {
                !matches!(
                    self,
                    Reason::XdpToTc
                        | Reason::CtCreated
                        | Reason::CtRecycled
                        | Reason::IcmpTranslated
                        | Reason::AffinityHit
                        | Reason::CtHalfOpenInserted
                        | Reason::CtHalfOpenDeleted
                        | Reason::CtEstablishedInserted
                        | Reason::CtEstablishedDeleted
                        | Reason::CtHalfOpenEvicted
                        | Reason::CtEstablishedEvicted
                )
            }

            pub const fn description(self) -> &'static str {
                match self { $(Reason::$variant => $doc,)* }
            }
        }
    };
}

reasons! {
    XdpTx = "xdp_tx": "forwarded by XDP out of the device it came in on",
    XdpRedirect = "xdp_redirect": "forwarded by XDP to another device",
    TcRedirectPeer = "tc_redirect_peer": "forwarded by tc straight into a local pod's namespace",
    TcRedirect = "tc_redirect": "forwarded by tc to the egress device",
    TcRedirectNeigh = "tc_redirect_neigh": "forwarded by tc, the kernel resolving the next hop",
    XdpToTc = "xdp_to_tc": "left by XDP for tc, which counts the verdict: egress needs an skb, or no neighbour yet (not a verdict)",
    PassNotIpv4 = "pass_not_ipv4": "passed: not IPv4 (or IPv4 of a VLAN, tagged)",
    PassNotTcpUdp = "pass_not_tcp_udp": "passed: IPv4 but neither TCP nor UDP",
    PassNoService = "pass_no_service": "passed: no frontend and no flow for this packet",
    PassFragment = "pass_fragment": "passed: IPv4 fragment",
    PassMalformed = "pass_malformed": "passed: truncated or malformed headers",
    PassTtl = "pass_ttl": "passed: TTL would expire",
    PassNoBackend = "pass_no_backend": "passed: service has no usable backend",
    PassSnatExhausted = "pass_snat_exhausted": "passed: no free source port for a remote backend",
    PassCtCollision = "pass_ct_collision": "passed: another flow owns the reply tuple",
    PassCtFull = "pass_ct_full": "passed: the conntrack map refused an entry",
    PassFibFailed = "pass_fib_failed": "passed: no route, or the route needs the kernel",
    PassNoSnatAddr = "pass_no_snat_addr": "passed: no node address to source-NAT from",
    PassStaleReply = "pass_stale_reply": "passed: reply to a flow that has expired",
    PassNotSyn = "pass_not_syn": "passed: TCP packet of an untracked flow that is not a SYN (kube-proxy's flow, or nobody's)",
    PassDraining = "pass_draining": "passed: the forwarder is draining, new flows go to kube-proxy",
    PassKernelFlow = "pass_kernel_flow": "passed: nf_conntrack already tracks this SYN's connection (kube-proxy's)",
    PassWrongDevice = "pass_wrong_device": "passed: a flow's packet on a device its packets do not come in on",
    PassIcmp = "pass_icmp": "passed: ICMP that quotes no flow of ours (the kernel's)",
    PassPoliced = "pass_policed": "passed: the chosen backend is a local pod under NetworkPolicy (netfilter enforces it)",
    XdpIcmpFragNeeded = "xdp_icmp_frag_needed": "answered by XDP with ICMP fragmentation needed (the route's MTU is smaller)",
    DropNoLocalBackend = "drop_no_local_backend": "dropped: externalTrafficPolicy Local with no local backend",
    DropRedirectFailed = "drop_redirect_failed": "dropped: a redirect helper failed after the rewrite",
    CtCreated = "ct_created": "new flows tracked (not a verdict)",
    CtRecycled = "ct_recycled": "expired or closed flows replaced by a new one (not a verdict)",
    IcmpTranslated = "icmp_translated": "ICMP errors about a flow translated with it (not a verdict)",
    AffinityHit = "affinity_hit": "new flows sent to the client's sessionAffinity backend (not a verdict)",
    // Appended, so pinned counters of older versions keep their names.
    PassOtherHost = "pass_other_host": "passed: unicast to another host's MAC address (the kernel drops it)",
    PassNotUnicast = "pass_not_unicast": "passed: sent to a broadcast or multicast MAC address",
    PassIpOptions = "pass_ip_options": "passed: IPv4 options other than padding (the kernel acts on them)",
    CtHalfOpenInserted = "ct_half_open_inserted": "entries added to the half-open conntrack table (not a verdict)",
    CtHalfOpenDeleted = "ct_half_open_deleted": "entries the datapath removed from the half-open table (not a verdict)",
    CtEstablishedInserted = "ct_established_inserted": "entries added to the established conntrack table (not a verdict)",
    CtEstablishedDeleted = "ct_established_deleted": "entries the datapath removed from the established table (not a verdict)",
    CtHalfOpenEvicted = "ct_half_open_evicted": "half-open entries lost to LRU pressure, inferred by the daemon (not a verdict)",
    CtEstablishedEvicted = "ct_established_evicted": "established entries lost to LRU pressure, inferred by the daemon (not a verdict)",
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceLabel {}
    unsafe impl aya::Pod for DaemonStatus {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_and_snake_case() {
        for (i, a) in Reason::ALL.iter().enumerate() {
            assert_eq!(*a as u32, i as u32, "discriminants follow ALL");
            assert!(a
                .name()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            for b in &Reason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn events_beside_verdicts_say_so() {
        for r in Reason::ALL {
            assert_eq!(
                r.is_verdict(),
                !r.description().ends_with("(not a verdict)"),
                "{}",
                r.name()
            );
        }
    }

    #[test]
    fn labels_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(
            ServiceLabel::new("istio-system/istio-ingressgateway:http2").as_str(),
            "istio-system/istio-ingressgateway:http2"
        );
        let long = "é".repeat(100);
        let l = ServiceLabel::new(&long);
        assert_eq!(l.as_str().len(), 128);
        assert!(long.starts_with(l.as_str()));
    }

    #[test]
    fn peer_key_swaps_the_rewritten_tuple() {
        let e = CtEntry {
            new_saddr_be: 1,
            new_daddr_be: 2,
            new_sport_be: 3,
            new_dport_be: 4,
            ..Default::default()
        };
        assert_eq!(e.peer_key(IPPROTO_TCP), CtKey::new(2, 4, 1, 3, IPPROTO_TCP));
    }

    #[test]
    fn snat_ports_span_both_ranges() {
        let c = Config {
            snat_port_min: 61_000,
            snat_port_max: 61_002,
            snat2_port_min: 1024,
            snat2_port_max: 1025,
            ..Config::default()
        };
        assert_eq!(c.snat_ports(), 5);
        let ports: [u16; 5] = core::array::from_fn(|i| c.snat_port(i as u32));
        assert_eq!(ports, [61_000, 61_001, 61_002, 1024, 1025]);
        assert_eq!(Config::default().snat_ports(), 4536);
    }

    #[test]
    fn default_snat_range_avoids_nodeports_and_local_ports() {
        let c = Config::default();
        assert!(c.snat_port_min > 60_999 && c.snat_port_min <= c.snat_port_max);
        assert_eq!(
            c.timeout_ns(IPPROTO_TCP, CT_STATE_ESTABLISHED),
            86_400 * NS_PER_SEC
        );
        assert_eq!(c.timeout_ns(IPPROTO_UDP, CT_STATE_NEW), 30 * NS_PER_SEC);
    }
}
