//! Flow decisions: an existing flow's translation, or a new flow's backend,
//! source port and conntrack entries.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use forwarder_common::{
    hash::flow_hash, Backend, BackendKey, Config, CtEntry, CtKey, Frontend, FrontendKey, IfaceInfo,
    Reason, BACKEND_F_LOCAL, CT_F_REPLY, CT_F_SNAT, CT_STATE_CLOSED, CT_STATE_ESTABLISHED,
    CT_STATE_FIN, CT_STATE_NEW, FRONTEND_F_DROP_IF_EMPTY, FRONTEND_F_NO_SNAT, IFACE_F_EXTERNAL,
    IPPROTO_TCP,
};

use crate::{
    maps::{BACKENDS, CONFIG, CONNTRACK, FRONTENDS, IFACES},
    parse::{Headers, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// Refresh `last_seen` at most this often, to keep shared cache lines quiet.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;
/// Source ports tried for a new source-NATed flow before giving up.
const SNAT_PROBES: u32 = 16;

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

/// The route a new remote flow will take, needed to pick its source address.
pub trait EgressLookup {
    /// ifindex of the device that reaches `daddr` coming from `saddr`, if routable.
    fn egress_ifindex(&self, h: &Headers, daddr: u32, dport: u16) -> Option<u32>;
}

#[inline(always)]
fn config() -> Config {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => Config::default(),
    }
}

/// Set by the loader (`--datapath-generation`); read-only to the programs.
#[unsafe(no_mangle)]
static DATAPATH_GENERATION: u32 = 0;

#[inline(always)]
fn generation() -> u16 {
    // Volatile: the loader patches the value after compilation.
    unsafe { core::ptr::read_volatile(&DATAPATH_GENERATION) as u16 }
}

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Finds or creates the translation for `h` arriving on `ingress`.
#[inline(always)]
pub fn decide<E: EgressLookup>(
    h: &Headers,
    ingress: &IfaceInfo,
    egress: &E,
) -> Result<Translation, Reason> {
    let cfg = config();
    let now = now_ns();
    let key = CtKey::new(h.saddr, h.sport, h.daddr, h.dport, h.proto);
    let mut stale_peer: Option<CtKey> = None;

    if let Some(entry) = CONNTRACK.get_ptr_mut(key) {
        let entry = unsafe { &mut *entry };
        let is_reply = entry.flags & CT_F_REPLY != 0;
        let new_syn = h.proto == IPPROTO_TCP
            && h.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            && entry.state >= CT_STATE_FIN;
        if !new_syn && !expired(entry, h.proto, now, &cfg) {
            track(&key, entry, h, is_reply, now);
            return Ok(Translation::from_entry(entry));
        }
        if is_reply {
            return Err(Reason::PassStaleReply);
        }
        // A new connection reusing an old one's tuple: replace both entries.
        stale_peer = Some(entry.peer_key(h.proto));
    }

    if ingress.flags & IFACE_F_EXTERNAL == 0 {
        return Err(Reason::PassNoService);
    }
    let fkey = FrontendKey {
        addr_be: h.daddr,
        port_be: h.dport,
        proto: h.proto,
        _pad: 0,
    };
    let fe: Frontend = match unsafe { FRONTENDS.get(fkey) } {
        Some(fe) => *fe,
        None => return Err(Reason::PassNoService),
    };
    if fe.backend_count == 0 {
        return Err(if fe.flags & FRONTEND_F_DROP_IF_EMPTY != 0 {
            Reason::DropNoLocalBackend
        } else {
            Reason::PassNoBackend
        });
    }
    let hash = flow_hash(h.saddr, h.daddr, h.sport, h.dport, h.proto);
    let index = match hash.checked_rem(fe.backend_count) {
        Some(i) => i,
        None => return Err(Reason::PassNoBackend),
    };
    let bkey = BackendKey {
        backend_set: fe.backend_set,
        index,
    };
    let be: Backend = match unsafe { BACKENDS.get(bkey) } {
        Some(be) => *be,
        None => return Err(Reason::PassNoBackend),
    };

    if let Some(old) = stale_peer {
        let _ = CONNTRACK.remove(old);
        stats::count(Reason::CtRecycled);
    }

    let state = initial_state(h);
    let snat = be.flags & BACKEND_F_LOCAL == 0 && fe.flags & FRONTEND_F_NO_SNAT == 0;
    let (src_addr, src_port, reply_key) = if snat {
        let snat_addr = egress
            .egress_ifindex(h, be.addr_be, be.port_be)
            .and_then(|ifindex| unsafe { IFACES.get(ifindex) })
            .map(|i| i.snat_addr_be)
            .unwrap_or(0);
        if snat_addr == 0 {
            return Err(Reason::PassNoSnatAddr);
        }
        let reply = reply_entry(h, &fe, &be, now, state, CT_F_SNAT);
        let (port, rkey) = claim_snat_port(&cfg, hash, be, snat_addr, h.proto, &reply)?;
        (snat_addr, port, rkey)
    } else {
        let rkey = CtKey::new(be.addr_be, be.port_be, h.saddr, h.sport, h.proto);
        let reply = reply_entry(h, &fe, &be, now, state, 0);
        if CONNTRACK.insert(rkey, reply, BPF_NOEXIST as u64).is_err() {
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
    };
    let flags = if stale_peer.is_some() {
        0
    } else {
        BPF_NOEXIST as u64
    };
    if CONNTRACK.insert(key, forward, flags).is_err() {
        // Another CPU created this flow first (or the map refused): use theirs.
        let _ = CONNTRACK.remove(reply_key);
        return match unsafe { CONNTRACK.get(key) } {
            Some(e) => Ok(Translation::from_entry(e)),
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
    state: u8,
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
        state,
        generation: generation(),
        backend_slot: be.stats_slot,
    }
}

/// Picks a free source port for a source-NATed flow by claiming its reply
/// tuple; the claim is the reply entry itself, so two flows never share one.
#[inline(always)]
fn claim_snat_port(
    cfg: &Config,
    hash: u32,
    be: Backend,
    snat_addr: u32,
    proto: u8,
    reply: &CtEntry,
) -> Result<(u16, CtKey), Reason> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if min == 0 || max < min {
        return Err(Reason::PassSnatExhausted);
    }
    let span = max - min + 1;
    let mut i = 0;
    while i < SNAT_PROBES {
        // Odd stride: successive probes walk distinct ports.
        let offset = match hash.wrapping_add(i.wrapping_mul(7919)).checked_rem(span) {
            Some(o) => o,
            None => return Err(Reason::PassSnatExhausted),
        };
        let port = min + offset;
        let port_be = (port as u16).to_be();
        let rkey = CtKey::new(be.addr_be, be.port_be, snat_addr, port_be, proto);
        if CONNTRACK.insert(rkey, reply, BPF_NOEXIST as u64).is_ok() {
            return Ok((port_be, rkey));
        }
        i += 1;
    }
    Err(Reason::PassSnatExhausted)
}

#[inline(always)]
fn initial_state(h: &Headers) -> u8 {
    let tcp_midstream = h.proto == IPPROTO_TCP && h.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN;
    if tcp_midstream {
        // Picked up mid-stream (e.g. after the table was flushed).
        CT_STATE_ESTABLISHED
    } else {
        CT_STATE_NEW
    }
}

/// Idle past the timeout for its state, in both directions.
#[inline(always)]
fn expired(entry: &CtEntry, proto: u8, now: u64, cfg: &Config) -> bool {
    let timeout = cfg.timeout_ns(proto, entry.state);
    if now.saturating_sub(entry.last_seen_ns) <= timeout {
        return false;
    }
    // One-way traffic keeps a flow alive through the other direction's entry.
    match unsafe { CONNTRACK.get(entry.peer_key(proto)) } {
        Some(peer) => now.saturating_sub(peer.last_seen_ns) > timeout,
        None => true,
    }
}

/// Updates state and age for a packet of an existing flow, keeping the peer
/// entry present and in the same state.
#[inline(always)]
fn track(key: &CtKey, entry: &mut CtEntry, h: &Headers, is_reply: bool, now: u64) {
    let next = next_state(entry.state, h, is_reply);
    let changed = next != entry.state;
    if !changed && now.saturating_sub(entry.last_seen_ns) < TOUCH_INTERVAL_NS {
        return;
    }
    entry.state = next;
    entry.last_seen_ns = now;
    let peer_key = entry.peer_key(h.proto);
    match CONNTRACK.get_ptr_mut(peer_key) {
        Some(peer) => {
            if changed {
                unsafe { (*peer).state = next };
            }
        }
        None => {
            // Evicted by LRU pressure: rebuild it, since each entry fully
            // determines the other.
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
            };
            let _ = CONNTRACK.insert(peer_key, peer, BPF_NOEXIST as u64);
        }
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
    } else if state == CT_STATE_NEW && is_reply && f & TCP_ACK != 0 {
        CT_STATE_ESTABLISHED
    } else {
        state
    }
}
