//! Flow tracking: an existing flow's translation, and the entries of a new
//! flow once its backend and route are known.
//!
//! The TCP states follow nf_conntrack where it matters: only a client's SYN
//! creates a flow, the backend's SYN-ACK moves it to SYN_RECV and the
//! client's ACK to ESTABLISHED, each state with its own timeout. A packet
//! of a flow we do not track is never adopted mid-stream: it may be one that
//! kube-proxy carries (started before the forwarder, or while it drained).
//!
//! Two tables, so that a full one gives up half-open flows first, as
//! nf_conntrack's early_drop gives up flows that are not assured: a flow
//! starts in `CT_HALF_OPEN` and moves to `CONNTRACK` once assured (TCP:
//! ESTABLISHED; UDP: replied to and still active 2 s after it began, which
//! is when nf_conntrack calls a UDP flow a stream). Each table is its own
//! LRU: a flood of SYNs from forged sources (the backend answers, the client
//! never does) recycles half-open entries only, and an idle established flow
//! can only be pushed out by more established flows. One LRU cannot do this:
//! the kernel evicts by recency alone, and the flood is always more recent.
//! Both entries of a flow are always in the same table; a flow moves by
//! being written to `CONNTRACK` before it leaves `CT_HALF_OPEN`, and every
//! lookup tries `CONNTRACK` first, so a packet finds it throughout.
//!
//! Every entry added and removed is counted per table (`ct_*_inserted`,
//! `ct_*_deleted`; inserts never overwrite): the daemon compares those with
//! what the tables hold to infer how many entries LRU pressure took.
use aya_ebpf::{bindings::BPF_NOEXIST, maps::LruHashMap};
use forwarder_common::{
    Backend, Config, CtEntry, CtKey, Frontend, IfaceInfo, Reason, BACKEND_F_LOCAL, CT_F_REPLY,
    CT_F_SNAT, CT_STATE_CLOSED, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_NEW,
    CT_STATE_SYN_RECV, FRONTEND_F_NO_SNAT, IFACE_F_EXTERNAL, IPPROTO_TCP,
};

use crate::{
    fib::Route,
    maps::{CONNTRACK, CT_HALF_OPEN, IFACES},
    parse::{Headers, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// Refresh `last_seen` at most this often, to keep shared cache lines quiet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
/// Source ports tried for a new source-NATed flow before giving up: enough
/// that a backend's range fills to about 90% (30,000 concurrent flows with
/// the default ~33,500 ports) before a new flow finds every probe held
/// (0.9^64 = 0.1%); each probe is one insert attempt, paid only while ports
/// are busy.
const SNAT_PROBES: u32 = 64;

/// What to write into a packet, and whose counters it feeds.
#[derive(Clone, Copy, Default)]
pub struct Translation {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub stats_slot: u32,
    pub backend_slot: u32,
}

impl Translation {
    #[inline(always)]
    fn from_entry(e: &CtEntry) -> Self {
        Translation {
            saddr: e.new_saddr_be,
            daddr: e.new_daddr_be,
            sport: e.new_sport_be,
            dport: e.new_dport_be,
            stats_slot: e.stats_slot,
            backend_slot: e.backend_slot,
        }
    }
}

/// Set by the loader (`--datapath-generation`); read-only to the programs.
#[unsafe(no_mangle)]
static DATAPATH_GENERATION: u32 = 0;

#[inline(always)]
fn generation() -> u16 {
    // SAFETY: a read of a plain static; volatile because the loader patches
    // the value after compilation, so the compiler must not fold it.
    unsafe { core::ptr::read_volatile(&DATAPATH_GENERATION) as u16 }
}

/// Which conntrack map a flow's entries are in.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    HalfOpen,
    Established,
}

#[inline(always)]
fn map(table: Table) -> &'static LruHashMap<CtKey, CtEntry> {
    match table {
        Table::HalfOpen => &CT_HALF_OPEN,
        Table::Established => &CONNTRACK,
    }
}

#[inline(always)]
fn entry_ptr(table: Table, key: &CtKey) -> Option<*mut CtEntry> {
    map(table).get_ptr_mut(key)
}

#[inline(always)]
fn entry_ref(table: Table, key: &CtKey) -> Option<&'static CtEntry> {
    // SAFETY: a pointer the map just returned; the entry stays allocated
    // while the program runs (RCU), and a concurrent writer can at worst
    // make us read a mix of two valid entries, which every field tolerates.
    entry_ptr(table, key).map(|e| unsafe { &*e })
}

/// Adds `e` at `key` unless an entry is there already; counted.
#[inline(always)]
fn insert_new(table: Table, key: &CtKey, e: &CtEntry) -> bool {
    let added = map(table).insert(key, e, BPF_NOEXIST as u64).is_ok();
    if added {
        stats::count(match table {
            Table::HalfOpen => Reason::CtHalfOpenInserted,
            Table::Established => Reason::CtEstablishedInserted,
        });
    }
    added
}

/// Removes the entry at `key`, if any; counted.
#[inline(always)]
fn remove(table: Table, key: &CtKey) {
    if map(table).remove(key).is_ok() {
        stats::count(match table {
            Table::HalfOpen => Reason::CtHalfOpenDeleted,
            Table::Established => Reason::CtEstablishedDeleted,
        });
    }
}

/// Where the flow of `key` is, established first (see the module comment).
#[inline(always)]
fn find(key: &CtKey) -> Option<(Table, *mut CtEntry)> {
    if let Some(e) = entry_ptr(Table::Established, key) {
        return Some((Table::Established, e));
    }
    entry_ptr(Table::HalfOpen, key).map(|e| (Table::HalfOpen, e))
}

/// The outcome of looking a packet's tuple up.
pub struct Lookup {
    /// Set when the packet belongs to a live flow: write this.
    pub hit: bool,
    pub t: Translation,
    /// A closed flow whose tuple a new SYN reuses: replaced on commit.
    pub stale: bool,
    pub stale_peer: CtKey,
}

/// Whether a packet arriving on `ingress_ifindex` may use `entry`: a
/// client's packets come in on an external device, a backend's where its
/// replies come back (the route toward it, or a port of that bridge).
#[inline(always)]
fn arrived_where_expected(entry: &CtEntry, ingress_ifindex: u32, ingress: &IfaceInfo) -> bool {
    if entry.ifindex == 0 {
        ingress.flags & IFACE_F_EXTERNAL != 0
    } else {
        entry.ifindex == ingress_ifindex || ingress.master_ifindex == entry.ifindex
    }
}

/// Looks `key` up for a packet with headers `h`.
#[inline(always)]
pub fn lookup(
    key: &CtKey,
    h: &Headers,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    cfg: &Config,
    now: u64,
) -> Result<Lookup, Reason> {
    let mut out = Lookup {
        hit: false,
        t: Translation::default(),
        stale: false,
        stale_peer: CtKey::default(),
    };
    // One call per table, each with its table a constant: nothing after
    // the lookup depends on which table the flow was in, so the verifier
    // does not walk the rest of the program once per table.
    if let Some(entry) = entry_ptr(Table::Established, key) {
        lookup_in(
            Table::Established,
            entry,
            key,
            h,
            ingress_ifindex,
            ingress,
            cfg,
            now,
            &mut out,
        )?;
    } else if let Some(entry) = entry_ptr(Table::HalfOpen, key) {
        lookup_in(
            Table::HalfOpen,
            entry,
            key,
            h,
            ingress_ifindex,
            ingress,
            cfg,
            now,
            &mut out,
        )?;
    }
    Ok(out)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lookup_in(
    table: Table,
    entry: *mut CtEntry,
    key: &CtKey,
    h: &Headers,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    cfg: &Config,
    now: u64,
    out: &mut Lookup,
) -> Result<(), Reason> {
    // SAFETY: a pointer the map just returned for this key; the entry stays
    // allocated while the program runs (RCU), and a concurrent writer can at
    // worst make us read a mix of two valid entries, which every field tolerates.
    let entry = unsafe { &mut *entry };
    if !arrived_where_expected(entry, ingress_ifindex, ingress) {
        return Err(Reason::PassWrongDevice);
    }
    let is_reply = entry.flags & CT_F_REPLY != 0;
    let closed = entry.state == CT_STATE_FIN || entry.state == CT_STATE_CLOSED;
    let new_syn = h.proto == IPPROTO_TCP && is_syn(h) && closed;
    if !new_syn && !expired(entry, table, h.proto, now, cfg) {
        track(key, entry, table, h, is_reply, now);
        out.hit = true;
        out.t = Translation::from_entry(entry);
        return Ok(());
    }
    if is_reply {
        return Err(Reason::PassStaleReply);
    }
    // A new connection reusing an old one's tuple: both entries are replaced.
    out.stale = true;
    out.stale_peer = entry.peer_key(h.proto);
    Ok(())
}

/// The translation of a live flow's entry at `key`, for a packet that only
/// refers to the flow (an ICMP error quoting it): no state changes.
#[inline(always)]
pub fn peek(
    key: &CtKey,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    cfg: &Config,
    now: u64,
) -> Result<Translation, Reason> {
    if let Some(entry) = entry_ptr(Table::Established, key) {
        return peek_in(
            Table::Established,
            entry,
            key,
            ingress_ifindex,
            ingress,
            cfg,
            now,
        );
    }
    match entry_ptr(Table::HalfOpen, key) {
        Some(entry) => peek_in(
            Table::HalfOpen,
            entry,
            key,
            ingress_ifindex,
            ingress,
            cfg,
            now,
        ),
        None => Err(Reason::PassIcmp),
    }
}

#[inline(always)]
fn peek_in(
    table: Table,
    entry: *mut CtEntry,
    key: &CtKey,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    cfg: &Config,
    now: u64,
) -> Result<Translation, Reason> {
    // SAFETY: as in `lookup`; only read here.
    let entry = unsafe { &*entry };
    if !arrived_where_expected(entry, ingress_ifindex, ingress) {
        return Err(Reason::PassWrongDevice);
    }
    if expired(entry, table, key.proto, now, cfg) {
        return Err(Reason::PassIcmp);
    }
    Ok(Translation::from_entry(entry))
}

/// A TCP SYN without ACK: the only packet that starts a flow.
#[inline(always)]
pub const fn is_syn(h: &Headers) -> bool {
    h.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// A new flow chosen but not yet tracked: tracked by [`commit`] once the
/// route is known, so a packet that cannot be forwarded leaves nothing behind.
#[derive(Clone, Copy)]
pub struct NewFlow {
    pub key: CtKey,
    pub fe: Frontend,
    pub be: Backend,
    pub hash: u32,
}

/// Removes both entries of a closed flow whose tuple a new SYN reuses, when
/// that SYN goes to the kernel: left behind, they would translate the
/// kernel's connection from its second packet on.
#[inline(always)]
pub fn forget(key: &CtKey, peer: &CtKey) {
    for table in [Table::Established, Table::HalfOpen] {
        remove(table, key);
        remove(table, peer);
    }
}

/// Creates both entries of `flow`, leaving through `route`; returns the
/// packet's translation. A closed flow on the same tuple (`stale`) is
/// removed first, from whichever table holds it, so it is gone even if the
/// new flow cannot be tracked, and every insert below is a plain
/// insert-if-absent.
#[inline(always)]
pub fn commit(
    flow: &NewFlow,
    stale: bool,
    stale_peer: &CtKey,
    h: &Headers,
    route: &Route,
    cfg: &Config,
    now: u64,
) -> Result<Translation, Reason> {
    let (fe, be) = (&flow.fe, &flow.be);
    if stale {
        for table in [Table::Established, Table::HalfOpen] {
            remove(table, &flow.key);
            remove(table, stale_peer);
        }
        stats::count(Reason::CtRecycled);
    }
    let state = CT_STATE_NEW;
    let snat = be.flags & BACKEND_F_LOCAL == 0 && fe.flags & FRONTEND_F_NO_SNAT == 0;
    let (src_addr, src_port, reply_key) = if snat {
        // SAFETY (get): a read-only copy of a map value of plain integers.
        let snat_addr = unsafe { IFACES.get(route.ifindex) }
            .map(|i| i.snat_addr_be)
            .unwrap_or(0);
        if snat_addr == 0 {
            return Err(Reason::PassNoSnatAddr);
        }
        let reply = reply_entry(h, fe, be, now, route.ifindex, CT_F_SNAT);
        let (port, rkey) = claim_snat_port(cfg, flow.hash, be, snat_addr, h.proto, &reply, now)?;
        (snat_addr, port, rkey)
    } else {
        let rkey = CtKey::new(be.addr_be, be.port_be, h.saddr, h.sport, h.proto);
        let reply = reply_entry(h, fe, be, now, route.ifindex, 0);
        if !insert_new(Table::HalfOpen, &rkey, &reply) {
            return Err(Reason::PassCtCollision);
        }
        if entry_ptr(Table::Established, &rkey).is_some() {
            remove(Table::HalfOpen, &rkey);
            return Err(Reason::PassCtCollision);
        }
        (h.saddr, h.sport, rkey)
    };

    let forward = CtEntry {
        new_saddr_be: src_addr,
        new_daddr_be: be.addr_be,
        new_sport_be: src_port,
        new_dport_be: be.port_be,
        stats_slot: fe.stats_slot,
        last_seen_ns: now,
        created_ns: now,
        flags: if snat { CT_F_SNAT } else { 0 },
        state,
        generation: generation(),
        backend_slot: be.stats_slot,
        // Any external device: a client's packets may come in on any of them.
        ifindex: 0,
        peer_ifindex: route.ifindex,
    };
    if !insert_new(Table::HalfOpen, &flow.key, &forward) {
        // Another CPU created this flow first (or the map refused): use theirs.
        remove(Table::HalfOpen, &reply_key);
        return match find(&flow.key) {
            // SAFETY: as in `lookup`; only read here.
            Some((_, e)) => Ok(Translation::from_entry(unsafe { &*e })),
            None => Err(Reason::PassCtFull),
        };
    }
    stats::count(Reason::CtCreated);
    Ok(Translation::from_entry(&forward))
}

/// The reply direction's entry: whatever the backend sends back is rewritten
/// to come from the frontend the client addressed, to the client.
#[inline(always)]
fn reply_entry(
    h: &Headers,
    fe: &Frontend,
    be: &Backend,
    now: u64,
    reply_ifindex: u32,
    flags: u8,
) -> CtEntry {
    CtEntry {
        new_saddr_be: h.daddr,
        new_daddr_be: h.saddr,
        new_sport_be: h.dport,
        new_dport_be: h.sport,
        stats_slot: fe.stats_slot,
        last_seen_ns: now,
        created_ns: now,
        flags: CT_F_REPLY | flags,
        state: CT_STATE_NEW,
        generation: generation(),
        backend_slot: be.stats_slot,
        ifindex: reply_ifindex,
        peer_ifindex: 0,
    }
}

/// Picks a free source port for a source-NATed flow by claiming its reply
/// tuple; the claim is the reply entry itself, so two flows never share one.
/// When every probe is held, the first probe's port is taken over if its
/// flow is closed, expired, or a handshake past its grace period.
#[inline(always)]
fn claim_snat_port(
    cfg: &Config,
    hash: u32,
    be: &Backend,
    snat_addr: u32,
    proto: u8,
    reply: &CtEntry,
    now: u64,
) -> Result<(u16, CtKey), Reason> {
    let span = cfg.snat_ports();
    if span == 0 {
        return Err(Reason::PassSnatExhausted);
    }
    let mut i = 0;
    while i < SNAT_PROBES {
        let rkey = snat_probe(cfg, hash, i, span, be, snat_addr, proto)?;
        if insert_new(Table::HalfOpen, &rkey, reply) {
            // Claimed among half-open flows; checked after the insert, so a
            // flow moving to the established table meanwhile is seen there.
            if entry_ptr(Table::Established, &rkey).is_none() {
                return Ok((rkey.dport_be, rkey));
            }
            remove(Table::HalfOpen, &rkey);
        }
        i += 1;
    }
    // Every probe is held. The first probe's holder may be done with it;
    // checked once here rather than in each probe, which keeps the loop the
    // verifier walks SNAT_PROBES times small.
    let rkey = snat_probe(cfg, hash, 0, span, be, snat_addr, proto)?;
    for table in [Table::Established, Table::HalfOpen] {
        if let Some(old) = entry_ref(table, &rkey) {
            if reclaimable(old, table, proto, now, cfg) {
                let old_peer = old.peer_key(proto);
                remove(table, &old_peer);
                remove(table, &rkey);
                if insert_new(Table::HalfOpen, &rkey, reply) {
                    stats::count(Reason::CtRecycled);
                    return Ok((rkey.dport_be, rkey));
                }
            }
            break;
        }
    }
    Err(Reason::PassSnatExhausted)
}

/// The reply tuple of the `i`th source port tried for a flow with `hash`.
#[inline(always)]
fn snat_probe(
    cfg: &Config,
    hash: u32,
    i: u32,
    span: u32,
    be: &Backend,
    snat_addr: u32,
    proto: u8,
) -> Result<CtKey, Reason> {
    // Odd stride: successive probes walk distinct ports.
    let offset = hash
        .wrapping_add(i.wrapping_mul(7919))
        .checked_rem(span)
        .ok_or(Reason::PassSnatExhausted)?;
    let port_be = cfg.snat_port(offset).to_be();
    Ok(CtKey::new(
        be.addr_be, be.port_be, snat_addr, port_be, proto,
    ))
}

/// How long a TCP handshake may stay half-open before its source port may
/// go to a new flow: a SYN flood's entries (the backend answers, the forged
/// client never does) must not hold the ports for their whole timeout.
const HALF_OPEN_GRACE_NS: u64 = 3_000_000_000;

/// A source port held by `old` may be taken over: closed, expired, or a
/// TCP handshake that never completed within the grace period.
#[inline(always)]
fn reclaimable(old: &CtEntry, table: Table, proto: u8, now: u64, cfg: &Config) -> bool {
    let half_open = proto == IPPROTO_TCP
        && (old.state == CT_STATE_NEW || old.state == CT_STATE_SYN_RECV)
        && now.saturating_sub(old.created_ns) > HALF_OPEN_GRACE_NS;
    old.state == CT_STATE_CLOSED || half_open || expired(old, table, proto, now, cfg)
}

/// Idle past the timeout for its state, in both directions (`table` holds both).
#[inline(always)]
fn expired(entry: &CtEntry, table: Table, proto: u8, now: u64, cfg: &Config) -> bool {
    let timeout = cfg.timeout_ns(proto, entry.state);
    if now.saturating_sub(entry.last_seen_ns) <= timeout {
        return false;
    }
    // One-way traffic keeps a flow alive through the other direction's entry.
    match entry_ref(table, &entry.peer_key(proto)) {
        Some(peer) => now.saturating_sub(peer.last_seen_ns) > timeout,
        None => true,
    }
}

/// How long a replied UDP flow stays half-open: nf_conntrack assures it
/// only once it is a stream, traffic seen 2 s after it began.
const UDP_STREAM_NS: u64 = 2_000_000_000;

/// Whether a flow in `state`, created at `created_ns`, belongs in the
/// established table.
#[inline(always)]
fn assured(proto: u8, state: u8, created_ns: u64, now: u64) -> bool {
    state == CT_STATE_ESTABLISHED
        && (proto == IPPROTO_TCP || now.saturating_sub(created_ns) > UDP_STREAM_NS)
}

/// Updates state and age for a packet of an existing flow, keeping the peer
/// entry present and in the same state, and moving a newly assured flow to
/// the established table.
#[inline(always)]
fn track(key: &CtKey, entry: &mut CtEntry, table: Table, h: &Headers, is_reply: bool, now: u64) {
    let next = next_state(entry.state, h, is_reply);
    let changed = next != entry.state;
    if !changed && now.saturating_sub(entry.last_seen_ns) < TOUCH_INTERVAL_NS {
        return;
    }
    entry.state = next;
    entry.last_seen_ns = now;
    let peer_key = entry.peer_key(h.proto);
    let promote = table == Table::HalfOpen && assured(h.proto, next, entry.created_ns, now);
    match entry_ptr(table, &peer_key) {
        Some(peer) => {
            if changed {
                // SAFETY: as in `lookup`: a live entry of this map; a racing
                // writer can only store another valid state.
                unsafe { (*peer).state = next };
            }
            if promote {
                // SAFETY: as above; read only, copied by the insert.
                let peer = unsafe { &*peer };
                promote_flow(key, entry, &peer_key, peer);
            }
        }
        None => {
            // Evicted by LRU pressure: rebuild it, since each entry fully
            // determines the other (and this one was found, so the flow is ours).
            let peer = CtEntry {
                new_saddr_be: key.daddr_be,
                new_daddr_be: key.saddr_be,
                new_sport_be: key.dport_be,
                new_dport_be: key.sport_be,
                stats_slot: entry.stats_slot,
                last_seen_ns: now,
                created_ns: entry.created_ns,
                flags: (entry.flags & CT_F_SNAT) | if is_reply { 0 } else { CT_F_REPLY },
                state: next,
                generation: entry.generation,
                backend_slot: entry.backend_slot,
                ifindex: entry.peer_ifindex,
                peer_ifindex: entry.ifindex,
            };
            if promote {
                promote_flow(key, entry, &peer_key, &peer);
            } else {
                let _ = insert_new(table, &peer_key, &peer);
            }
        }
    }
}

/// Moves a flow from the half-open table to the established one: written
/// there first, removed here only once both entries are there (or already
/// were, another CPU moving it too), so no packet misses it meanwhile.
#[inline(always)]
fn promote_flow(key: &CtKey, entry: &CtEntry, peer_key: &CtKey, peer: &CtEntry) {
    let forward_there =
        insert_new(Table::Established, key, entry) || entry_ptr(Table::Established, key).is_some();
    let peer_there = insert_new(Table::Established, peer_key, peer)
        || entry_ptr(Table::Established, peer_key).is_some();
    if forward_there && peer_there {
        remove(Table::HalfOpen, key);
        remove(Table::HalfOpen, peer_key);
    }
}

#[inline(always)]
fn next_state(state: u8, h: &Headers, is_reply: bool) -> u8 {
    if h.proto != IPPROTO_TCP {
        return if is_reply {
            CT_STATE_ESTABLISHED
        } else {
            state
        };
    }
    let f = h.tcp_flags;
    if f & TCP_RST != 0 {
        CT_STATE_CLOSED
    } else if f & TCP_FIN != 0 {
        if state == CT_STATE_CLOSED {
            state
        } else {
            CT_STATE_FIN
        }
    } else if state == CT_STATE_NEW && is_reply && f & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        CT_STATE_SYN_RECV
    } else if state == CT_STATE_SYN_RECV && !is_reply && f & (TCP_SYN | TCP_ACK) == TCP_ACK {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}
