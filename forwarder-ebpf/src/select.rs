//! A new flow's frontend and backend: `lookup_frontend` -> `select_backend`.
//!
//! Backend choice is its own step (Katran's and Cilium's
//! `lb4_select_backend_id`): sessionAffinity ClientIP first, as kube-proxy's
//! `-m recent --rcheck --seconds T` does it, else the flow hash.
use forwarder_common::{
    hash::flow_hash, AffinityKey, AffinityValue, Backend, BackendKey, Frontend, FrontendKey,
    MemberKey, Reason, BACKEND_F_POLICED,
};

use crate::{
    maps::{AFFINITY, BACKENDS, BACKEND_MEMBERS, FRONTENDS},
    parse::Headers,
};

const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn lookup_frontend(h: &Headers) -> Option<Frontend> {
    let key = FrontendKey {
        addr_be: h.daddr,
        port_be: h.dport,
        proto: h.proto,
        _pad: 0,
    };
    // SAFETY (get): a read-only copy of a map value of plain integers.
    unsafe { FRONTENDS.get(key) }.copied()
}

/// The chosen backend, and whether the client's affinity chose it.
pub struct Selected {
    pub be: Backend,
    pub hash: u32,
    pub by_affinity: bool,
}

/// A backend under NetworkPolicy is never the forwarder's: the flow goes to
/// kube-proxy from this first packet, so the policy's netfilter rules judge
/// it. The hash is the flow's own, so every later packet of the flow (a SYN
/// retransmit, the next UDP datagram) comes to the same answer.
#[inline(always)]
pub fn select_backend(h: &Headers, fe: &Frontend, now: u64) -> Result<Selected, Reason> {
    let hash = flow_hash(h.saddr, h.daddr, h.sport, h.dport, h.proto);
    let mut chosen = None;
    if fe.affinity_timeout_s != 0 {
        chosen = affinity_backend(h, fe, now);
    }
    let by_affinity = chosen.is_some();
    let be = match chosen {
        Some(be) => be,
        None => {
            let index = hash
                .checked_rem(fe.backend_count)
                .ok_or(Reason::PassNoBackend)?;
            backend_at(fe.backend_set, index)?
        }
    };
    if be.flags & BACKEND_F_POLICED != 0 {
        return Err(Reason::PassPoliced);
    }
    Ok(Selected {
        be,
        hash,
        by_affinity,
    })
}

#[inline(always)]
fn backend_at(backend_set: u32, index: u32) -> Result<Backend, Reason> {
    let key = BackendKey { backend_set, index };
    // SAFETY (get): a read-only copy of a map value of plain integers.
    unsafe { BACKENDS.get(key) }
        .copied()
        .ok_or(Reason::PassNoBackend)
}

#[inline(always)]
const fn affinity_key(h: &Headers, fe: &Frontend) -> AffinityKey {
    AffinityKey {
        client_addr_be: h.saddr,
        service_slot: fe.stats_slot,
    }
}

/// The backend of the client's last new connection to this Service port,
/// if that was within the timeout and the backend is still in the set.
#[inline(always)]
fn affinity_backend(h: &Headers, fe: &Frontend, now: u64) -> Option<Backend> {
    // SAFETY (get): a read-only copy of a map value of plain integers.
    let last: AffinityValue = *unsafe { AFFINITY.get(affinity_key(h, fe)) }?;
    if now.saturating_sub(last.last_ns) > fe.affinity_timeout_s as u64 * NS_PER_SEC {
        return None;
    }
    let member = MemberKey {
        backend_set: fe.backend_set,
        addr_be: last.backend_addr_be,
        port_be: last.backend_port_be,
        _pad: 0,
    };
    // SAFETY (get): a read-only copy of a map value of plain integers.
    let index = *unsafe { BACKEND_MEMBERS.get(member) }?;
    backend_at(fe.backend_set, index).ok()
}

/// Records the backend of a client's new connection (the timeout counts
/// from the last one, as kube-proxy's `--set` on every new connection).
#[inline(always)]
pub fn remember_affinity(h: &Headers, fe: &Frontend, be: &Backend, now: u64) {
    if fe.affinity_timeout_s == 0 {
        return;
    }
    let value = AffinityValue {
        backend_addr_be: be.addr_be,
        backend_port_be: be.port_be,
        _pad: 0,
        last_ns: now,
    };
    let _ = AFFINITY.insert(affinity_key(h, fe), value, 0);
}
