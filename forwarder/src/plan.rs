//! From the desired state and what the maps hold now to the ordered list of
//! map writes that gets there. Pure: no kernel, tested on the host.
//!
//! Ordering is what keeps every packet consistent: a backend set (and, for
//! frontends with session affinity, its membership entries) is written in
//! full before any frontend points at it, a frontend is switched in one
//! write, and old sets are deleted only after nothing points at them.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use forwarder_common::{
    Backend, BackendKey, Frontend, FrontendKey, MemberKey, BACKEND_F_LOCAL, BACKEND_F_POLICED,
    FRONTEND_F_DROP_IF_EMPTY, FRONTEND_F_NO_SNAT, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND,
    MAX_BACKEND_SLOTS, MAX_FRONTENDS, MAX_STATS_SLOTS,
};
use thiserror::Error;

use crate::model::{Desired, DesiredBackend, DesiredFrontend, FrontendAddr};

/// What the maps hold (read back from the kernel, or assumed empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub backends: BTreeMap<BackendKey, Backend>,
    /// (set, backend) -> index in the set, for the sets of frontends with
    /// session affinity (the datapath checks a remembered backend with it).
    pub members: BTreeMap<MemberKey, u32>,
    /// Counter slot -> service port label.
    pub labels: BTreeMap<u32, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A newly used counter slot: zero it, then name it.
    ClaimSlot(u32, String),
    /// A newly used per-backend counter slot: zero it.
    ClaimBackendSlot(u32),
    PutBackend(BackendKey, Backend),
    PutMember(MemberKey, u32),
    PutFrontend(FrontendKey, Frontend),
    DeleteFrontend(FrontendKey),
    DeleteMember(MemberKey),
    DeleteBackend(BackendKey),
    ReleaseSlot(u32),
}

/// How many entries the service maps hold: their sizes at load
/// (`--max-frontends`, `--max-backends`, `--max-service-ports`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// FRONTENDS.
    pub frontends: u32,
    /// BACKENDS, and BACKEND_MEMBERS.
    pub backends: u32,
    /// SERVICE_STATS and SERVICE_LABELS: counter slots, one per service port
    /// (slot 0 is never used).
    pub service_ports: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frontends: MAX_FRONTENDS,
            backends: MAX_BACKENDS,
            service_ports: MAX_STATS_SLOTS,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{0} frontends wanted, the frontends map holds {1} (--max-frontends)")]
    TooManyFrontends(usize, u32),
    #[error("{0} backend entries wanted, the backends map holds {1} (--max-backends)")]
    TooManyBackends(usize, u32),
    #[error(
        "{0} backend membership entries wanted, the membership map holds {1} (--max-backends)"
    )]
    TooManyMembers(usize, u32),
    #[error("{frontend} has {count} backends, at most {MAX_BACKENDS_PER_FRONTEND} are supported")]
    TooManyBackendsForFrontend {
        frontend: FrontendAddr,
        count: usize,
    },
    #[error("more than {} distinct service ports (--max-service-ports)", .0.saturating_sub(1))]
    OutOfStatsSlots(u32),
}

/// The map key for a frontend (network byte order in the map).
pub fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    FrontendKey {
        addr_be: u32::from_ne_bytes(f.addr.octets()),
        port_be: f.port.to_be(),
        proto: f.proto.number(),
        _pad: 0,
    }
}

/// The map value for a backend, counted in `stats_slot`.
pub fn backend_value(b: &DesiredBackend, stats_slot: u32) -> Backend {
    Backend {
        addr_be: u32::from_ne_bytes(b.addr.octets()),
        port_be: b.port.to_be(),
        flags: if b.local { BACKEND_F_LOCAL } else { 0 }
            | if b.policed { BACKEND_F_POLICED } else { 0 },
        stats_slot,
    }
}

/// The membership key of `be` in backend set `backend_set`.
pub fn member_key(backend_set: u32, be: &Backend) -> MemberKey {
    MemberKey {
        backend_set,
        addr_be: be.addr_be,
        port_be: be.port_be,
        _pad: 0,
    }
}

/// Per-backend counter slots: one per backend address:port, kept while the
/// backend is in use; new backends take the lowest free slot (0 when none is
/// left: counted nowhere, forwarded all the same).
fn backend_slots(
    desired: &Desired,
    current: &Snapshot,
    ops: &mut Vec<Op>,
) -> BTreeMap<(u32, u16), u32> {
    let mut slots: BTreeMap<(u32, u16), u32> = BTreeMap::new();
    for b in current.backends.values() {
        if b.stats_slot != 0 {
            slots.entry((b.addr_be, b.port_be)).or_insert(b.stats_slot);
        }
    }
    let wanted: BTreeSet<(u32, u16)> = desired
        .frontends
        .values()
        .flat_map(|f| f.backends.iter())
        .map(|b| (u32::from_ne_bytes(b.addr.octets()), b.port.to_be()))
        .collect();
    slots.retain(|k, _| wanted.contains(k));
    let used: BTreeSet<u32> = slots.values().copied().collect();
    let mut free = (1..MAX_BACKEND_SLOTS).filter(|s| !used.contains(s));
    for key in wanted {
        if let std::collections::btree_map::Entry::Vacant(e) = slots.entry(key) {
            let slot = free.next().unwrap_or(0);
            if slot != 0 {
                ops.push(Op::ClaimBackendSlot(slot));
            }
            e.insert(slot);
        }
    }
    slots
}

fn frontend_flags(f: &DesiredFrontend) -> u32 {
    let mut flags = 0;
    if f.no_snat {
        flags |= FRONTEND_F_NO_SNAT;
    }
    if f.drop_if_empty {
        flags |= FRONTEND_F_DROP_IF_EMPTY;
    }
    flags
}

/// The content of each backend set currently referenced by a frontend, for
/// sets that are complete (every index below the count present).
fn current_sets(current: &Snapshot) -> HashMap<u32, Vec<Backend>> {
    let mut sets = HashMap::new();
    for fe in current.frontends.values() {
        if fe.backend_count == 0 || sets.contains_key(&fe.backend_set) {
            continue;
        }
        let content: Option<Vec<Backend>> = (0..fe.backend_count)
            .map(|index| {
                current
                    .backends
                    .get(&BackendKey {
                        backend_set: fe.backend_set,
                        index,
                    })
                    .copied()
            })
            .collect();
        if let Some(content) = content {
            sets.insert(fe.backend_set, content);
        }
    }
    sets
}

/// [`plan_within`] the default map sizes.
pub fn plan(desired: &Desired, current: &Snapshot) -> Result<Vec<Op>, PlanError> {
    plan_within(desired, current, &Limits::default())
}

/// The map writes from `current` to `desired`, in an order that keeps every
/// packet consistent, refused if the maps (sized `limits`) cannot hold it.
pub fn plan_within(
    desired: &Desired,
    current: &Snapshot,
    limits: &Limits,
) -> Result<Vec<Op>, PlanError> {
    if desired.frontends.len() > limits.frontends as usize {
        return Err(PlanError::TooManyFrontends(
            desired.frontends.len(),
            limits.frontends,
        ));
    }
    let mut ops = Vec::new();

    // Counter slots: one per service port label, kept across plans.
    let mut slot_of: BTreeMap<&str, u32> = current
        .labels
        .iter()
        .map(|(slot, label)| (label.as_str(), *slot))
        .collect();
    let wanted_labels: BTreeMap<String, ()> = desired
        .frontends
        .values()
        .map(|f| (f.label(), ()))
        .collect();
    let mut free_slots = (1..limits.service_ports).filter(|s| !current.labels.contains_key(s));
    for label in wanted_labels.keys() {
        if !slot_of.contains_key(label.as_str()) {
            let slot = free_slots
                .next()
                .ok_or(PlanError::OutOfStatsSlots(limits.service_ports))?;
            ops.push(Op::ClaimSlot(slot, label.clone()));
            slot_of.insert(label.as_str(), slot);
        }
    }

    let backend_slot = backend_slots(desired, current, &mut ops);

    // Backend sets: identical lists share one set (every node address of a
    // service port points at the same backends).
    let existing = current_sets(current);
    let mut set_by_content: HashMap<Vec<Backend>, u32> =
        existing.iter().map(|(id, c)| (c.clone(), *id)).collect();
    let mut next_set = current
        .backends
        .keys()
        .map(|k| k.backend_set)
        .chain(current.frontends.values().map(|f| f.backend_set))
        .chain(current.members.keys().map(|k| k.backend_set))
        .max()
        .unwrap_or(0)
        .wrapping_add(1)
        .max(1);
    let mut referenced: BTreeSet<u32> = BTreeSet::new();
    let mut wanted_members: BTreeMap<MemberKey, u32> = BTreeMap::new();
    let mut backend_ops = Vec::new();
    let mut frontend_ops = Vec::new();
    for (addr, f) in &desired.frontends {
        if f.backends.len() > MAX_BACKENDS_PER_FRONTEND as usize {
            return Err(PlanError::TooManyBackendsForFrontend {
                frontend: *addr,
                count: f.backends.len(),
            });
        }
        let content: Vec<Backend> = f
            .backends
            .iter()
            .map(|b| {
                let slot = backend_slot[&(u32::from_ne_bytes(b.addr.octets()), b.port.to_be())];
                backend_value(b, slot)
            })
            .collect();
        let backend_set = if content.is_empty() {
            0
        } else if let Some(id) = set_by_content.get(&content) {
            *id
        } else {
            let id = next_set;
            next_set = next_set.wrapping_add(1).max(1);
            for (index, be) in content.iter().enumerate() {
                backend_ops.push(Op::PutBackend(
                    BackendKey {
                        backend_set: id,
                        index: index as u32,
                    },
                    *be,
                ));
            }
            set_by_content.insert(content.clone(), id);
            id
        };
        if backend_set != 0 {
            referenced.insert(backend_set);
            if f.affinity_timeout_s != 0 {
                for (index, be) in content.iter().enumerate() {
                    // A backend listed twice keeps its first index.
                    wanted_members
                        .entry(member_key(backend_set, be))
                        .or_insert(index as u32);
                }
            }
        }
        let value = Frontend {
            backend_set,
            backend_count: content.len() as u32,
            stats_slot: slot_of[f.label().as_str()],
            flags: frontend_flags(f),
            affinity_timeout_s: f.affinity_timeout_s,
            ..Frontend::default()
        };
        let key = frontend_key(addr);
        if current.frontends.get(&key) != Some(&value) {
            frontend_ops.push(Op::PutFrontend(key, value));
        }
    }

    // New sets are written before old ones are deleted: the map must hold both.
    let peak_entries = current.backends.len() + backend_ops.len();
    if peak_entries > limits.backends as usize {
        return Err(PlanError::TooManyBackends(peak_entries, limits.backends));
    }
    // Membership of a set is complete before a frontend with affinity
    // points at it (or gets its timeout); the same peak rule applies.
    let member_ops: Vec<Op> = wanted_members
        .iter()
        .filter(|(k, v)| current.members.get(k) != Some(v))
        .map(|(k, v)| Op::PutMember(*k, *v))
        .collect();
    let peak_members = current.members.len()
        + wanted_members
            .keys()
            .filter(|k| !current.members.contains_key(k))
            .count();
    if peak_members > limits.backends as usize {
        return Err(PlanError::TooManyMembers(peak_members, limits.backends));
    }

    ops.extend(backend_ops);
    ops.extend(member_ops);
    ops.extend(frontend_ops);
    let wanted_keys: BTreeSet<FrontendKey> = desired.frontends.keys().map(frontend_key).collect();
    for key in current.frontends.keys() {
        if !wanted_keys.contains(key) {
            ops.push(Op::DeleteFrontend(*key));
        }
    }
    // Anything not referenced now goes, including orphans of an interrupted
    // run; membership first, so it never names a missing backend.
    for key in current.members.keys() {
        if !wanted_members.contains_key(key) {
            ops.push(Op::DeleteMember(*key));
        }
    }
    for key in current.backends.keys() {
        if !referenced.contains(&key.backend_set) {
            ops.push(Op::DeleteBackend(*key));
        }
    }
    for (slot, label) in &current.labels {
        if !wanted_labels.contains_key(label) {
            ops.push(Op::ReleaseSlot(*slot));
        }
    }
    Ok(ops)
}

/// The snapshot `ops` lead to from `current` (what the maps hold afterwards).
pub fn apply_to_snapshot(current: &Snapshot, ops: &[Op]) -> Snapshot {
    let mut s = current.clone();
    for op in ops {
        match op {
            Op::ClaimSlot(slot, label) => {
                s.labels.insert(*slot, label.clone());
            }
            Op::ClaimBackendSlot(_) => {}
            Op::PutBackend(k, v) => {
                s.backends.insert(*k, *v);
            }
            Op::PutMember(k, v) => {
                s.members.insert(*k, *v);
            }
            Op::PutFrontend(k, v) => {
                s.frontends.insert(*k, *v);
            }
            Op::DeleteFrontend(k) => {
                s.frontends.remove(k);
            }
            Op::DeleteMember(k) => {
                s.members.remove(k);
            }
            Op::DeleteBackend(k) => {
                s.backends.remove(k);
            }
            Op::ReleaseSlot(slot) => {
                s.labels.remove(slot);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::Protocol;

    fn fa(addr: [u8; 4], port: u16) -> FrontendAddr {
        FrontendAddr {
            addr: Ipv4Addr::from(addr),
            port,
            proto: Protocol::Tcp,
        }
    }

    fn be(last: u8, local: bool) -> DesiredBackend {
        DesiredBackend {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port: 80,
            local,
            policed: false,
        }
    }

    fn fe(service: &str, backends: Vec<DesiredBackend>) -> DesiredFrontend {
        DesiredFrontend {
            service: service.into(),
            port_name: "http2".into(),
            backends,
            no_snat: false,
            drop_if_empty: false,
            affinity_timeout_s: 0,
        }
    }

    fn desired(entries: Vec<(FrontendAddr, DesiredFrontend)>) -> Desired {
        Desired {
            frontends: entries.into_iter().collect(),
        }
    }

    /// The backends a frontend resolves to in a snapshot, as the datapath sees them.
    fn resolve(s: &Snapshot, addr: &FrontendAddr) -> Option<Vec<Backend>> {
        let f = s.frontends.get(&frontend_key(addr))?;
        (0..f.backend_count)
            .map(|index| {
                s.backends
                    .get(&BackendKey {
                        backend_set: f.backend_set,
                        index,
                    })
                    .copied()
            })
            .collect()
    }

    #[test]
    fn first_plan_writes_backends_before_the_frontend_that_uses_them() {
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(a, fe("ns/gw", vec![be(10, true), be(11, false)]))]);
        let ops = plan(&d, &Snapshot::default()).unwrap();
        let put_fe = ops
            .iter()
            .position(|o| matches!(o, Op::PutFrontend(..)))
            .unwrap();
        let last_be = ops
            .iter()
            .rposition(|o| matches!(o, Op::PutBackend(..)))
            .unwrap();
        assert!(last_be < put_fe);
        let s = apply_to_snapshot(&Snapshot::default(), &ops);
        let backends = resolve(&s, &a).unwrap();
        assert_eq!(
            backends,
            vec![
                backend_value(&be(10, true), 1),
                backend_value(&be(11, false), 2)
            ]
        );
        assert_eq!(backends[0].flags, BACKEND_F_LOCAL);
        assert_eq!(s.labels.values().collect::<Vec<_>>(), vec!["ns/gw:http2"]);
    }

    #[test]
    fn node_addresses_of_one_port_share_a_backend_set_and_a_counter_slot() {
        let a = fa([192, 0, 2, 1], 31380);
        let b = fa([198, 51, 100, 1], 31380);
        let d = desired(vec![
            (a, fe("ns/gw", vec![be(10, true)])),
            (b, fe("ns/gw", vec![be(10, true)])),
        ]);
        let s = apply_to_snapshot(
            &Snapshot::default(),
            &plan(&d, &Snapshot::default()).unwrap(),
        );
        assert_eq!(s.backends.len(), 1);
        assert_eq!(
            s.frontends[&frontend_key(&a)],
            s.frontends[&frontend_key(&b)]
        );
    }

    #[test]
    fn replanning_the_same_state_is_a_no_op() {
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(a, fe("ns/gw", vec![be(10, true), be(11, false)]))]);
        let s = apply_to_snapshot(
            &Snapshot::default(),
            &plan(&d, &Snapshot::default()).unwrap(),
        );
        assert_eq!(plan(&d, &s).unwrap(), vec![]);
    }

    #[test]
    fn a_changed_backend_list_is_switched_in_one_frontend_write() {
        let a = fa([192, 0, 2, 1], 31380);
        let d1 = desired(vec![(a, fe("ns/gw", vec![be(10, true), be(11, false)]))]);
        let s1 = apply_to_snapshot(
            &Snapshot::default(),
            &plan(&d1, &Snapshot::default()).unwrap(),
        );
        let d2 = desired(vec![(a, fe("ns/gw", vec![be(11, false)]))]);
        let ops = plan(&d2, &s1).unwrap();
        assert_consistent_throughout(&s1, &ops);
        // No write touches the set the frontend still points at until it is switched.
        let old_set = s1.frontends[&frontend_key(&a)].backend_set;
        let switch = ops
            .iter()
            .position(|o| matches!(o, Op::PutFrontend(..)))
            .unwrap();
        for op in &ops[..switch] {
            if let Op::PutBackend(k, _) | Op::DeleteBackend(k) = op {
                assert_ne!(k.backend_set, old_set, "{op:?} before the switch");
            }
        }
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::PutFrontend(..)))
                .count(),
            1
        );
        let s2 = apply_to_snapshot(&s1, &ops);
        assert_eq!(
            resolve(&s2, &a).unwrap(),
            vec![backend_value(&be(11, false), 2)],
            "the remaining backend keeps its counters slot"
        );
        assert_eq!(s2.backends.len(), 1, "old set deleted: {:?}", s2.backends);
        assert_eq!(s2.labels.len(), 1, "slot kept");
    }

    #[test]
    fn removed_services_leave_nothing_behind() {
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(a, fe("ns/gw", vec![be(10, true)]))]);
        let s = apply_to_snapshot(
            &Snapshot::default(),
            &plan(&d, &Snapshot::default()).unwrap(),
        );
        let empty = apply_to_snapshot(&s, &plan(&Desired::default(), &s).unwrap());
        assert_eq!(empty, Snapshot::default());
    }

    #[test]
    fn orphaned_backends_from_an_interrupted_run_are_removed() {
        let mut s = Snapshot::default();
        s.backends.insert(
            BackendKey {
                backend_set: 7,
                index: 0,
            },
            backend_value(&be(9, false), 5),
        );
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(a, fe("ns/gw", vec![be(10, true)]))]);
        let after = apply_to_snapshot(&s, &plan(&d, &s).unwrap());
        assert_eq!(
            resolve(&after, &a).unwrap(),
            vec![backend_value(&be(10, true), 1)]
        );
        assert_eq!(after.backends.len(), 1);
        assert_ne!(
            after.frontends[&frontend_key(&a)].backend_set,
            7,
            "new ids avoid old ones"
        );
    }

    #[test]
    fn local_policy_frontends_may_be_empty_and_carry_their_flags() {
        let a = fa([192, 0, 2, 1], 31380);
        let mut f = fe("ns/gw", vec![]);
        f.no_snat = true;
        f.drop_if_empty = true;
        let s = apply_to_snapshot(
            &Snapshot::default(),
            &plan(&desired(vec![(a, f)]), &Snapshot::default()).unwrap(),
        );
        let v = s.frontends[&frontend_key(&a)];
        assert_eq!(v.backend_count, 0);
        assert_eq!(v.flags, FRONTEND_F_NO_SNAT | FRONTEND_F_DROP_IF_EMPTY);
    }

    #[test]
    fn each_backend_gets_one_counters_slot_across_services_and_new_ones_are_zeroed() {
        let a = fa([192, 0, 2, 1], 31380);
        let b = fa([192, 0, 2, 1], 31390);
        let d = desired(vec![
            (a, fe("ns/gw", vec![be(10, true), be(11, false)])),
            (b, fe("ns/other", vec![be(11, false)])),
        ]);
        let ops = plan(&d, &Snapshot::default()).unwrap();
        let claimed: Vec<u32> = ops
            .iter()
            .filter_map(|o| match o {
                Op::ClaimBackendSlot(s) => Some(*s),
                _ => None,
            })
            .collect();
        assert_eq!(claimed, vec![1, 2]);
        let s = apply_to_snapshot(&Snapshot::default(), &ops);
        assert_eq!(
            resolve(&s, &b).unwrap()[0].stats_slot,
            resolve(&s, &a).unwrap()[1].stats_slot
        );
        // A new backend later takes a free slot; the others keep theirs.
        let d2 = desired(vec![(a, fe("ns/gw", vec![be(11, false), be(12, false)]))]);
        let ops2 = plan(&d2, &s).unwrap();
        assert!(
            ops2.contains(&Op::ClaimBackendSlot(1)),
            "slot 1 freed by .10 and reused: {ops2:?}"
        );
        let s2 = apply_to_snapshot(&s, &ops2);
        let slots: Vec<u32> = resolve(&s2, &a)
            .unwrap()
            .iter()
            .map(|b| b.stats_slot)
            .collect();
        assert_eq!(slots, vec![2, 1]);
    }

    #[test]
    fn the_map_sizes_bound_the_plan_and_larger_ones_take_more() {
        let many: Vec<(FrontendAddr, DesiredFrontend)> = (0..70_000u32)
            .map(|i| {
                let port = 30_000 + (i % 30_000) as u16;
                let addr = [10, 1, (i / 30_000) as u8, 1];
                (fa(addr, port), fe(&format!("ns/s{i}"), vec![be(10, false)]))
            })
            .collect();
        let d = desired(many);
        let err = plan(&d, &Snapshot::default()).unwrap_err();
        assert_eq!(err, PlanError::TooManyFrontends(70_000, MAX_FRONTENDS));
        assert!(err.to_string().contains("--max-frontends"), "{err}");
        let small_slots = Limits {
            frontends: 100_000,
            ..Limits::default()
        };
        assert_eq!(
            plan_within(&d, &Snapshot::default(), &small_slots).unwrap_err(),
            PlanError::OutOfStatsSlots(MAX_STATS_SLOTS)
        );
        let roomy = Limits {
            frontends: 100_000,
            backends: 100_000,
            service_ports: 100_001,
        };
        let ops = plan_within(&d, &Snapshot::default(), &roomy).unwrap();
        let s = apply_to_snapshot(&Snapshot::default(), &ops);
        assert_eq!(s.frontends.len(), 70_000);
        let tight = Limits {
            backends: 0,
            ..roomy
        };
        assert_eq!(
            plan_within(&d, &Snapshot::default(), &tight).unwrap_err(),
            PlanError::TooManyBackends(1, 0)
        );
    }

    #[test]
    fn keys_are_in_network_byte_order() {
        let k = frontend_key(&fa([192, 0, 2, 1], 31380));
        assert_eq!(k.addr_be.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(k.port_be.to_ne_bytes(), 31380u16.to_be_bytes());
        assert_eq!(k.proto, 6);
    }

    #[test]
    fn too_many_backends_for_one_frontend_is_an_error_not_a_truncation() {
        let a = fa([192, 0, 2, 1], 31380);
        let many: Vec<DesiredBackend> = (0..=MAX_BACKENDS_PER_FRONTEND)
            .map(|i| DesiredBackend {
                addr: Ipv4Addr::from(0x0a00_0000 + i),
                port: 80,
                local: false,
                policed: false,
            })
            .collect();
        let err = plan(
            &desired(vec![(a, fe("ns/big", many))]),
            &Snapshot::default(),
        )
        .unwrap_err();
        assert!(matches!(err, PlanError::TooManyBackendsForFrontend { .. }));
    }

    /// What a packet can see between any two writes of `ops`: every
    /// frontend resolves to a complete set, and one with affinity finds
    /// each backend of its set in the membership, at its index.
    fn assert_consistent_throughout(current: &Snapshot, ops: &[Op]) {
        let mut s = current.clone();
        for (i, op) in ops.iter().enumerate() {
            s = apply_to_snapshot(&s, std::slice::from_ref(op));
            for (k, f) in &s.frontends {
                for index in 0..f.backend_count {
                    let key = BackendKey {
                        backend_set: f.backend_set,
                        index,
                    };
                    let b = s.backends.get(&key).unwrap_or_else(|| {
                        panic!("after write {i} ({op:?}): frontend {k:?} lacks {key:?}")
                    });
                    if f.affinity_timeout_s != 0 {
                        assert_eq!(
                            s.members.get(&member_key(f.backend_set, b)),
                            Some(&index),
                            "after write {i} ({op:?}): frontend {k:?}, backend {index}"
                        );
                    }
                }
            }
        }
    }

    fn with_affinity(mut f: DesiredFrontend, timeout: u32) -> DesiredFrontend {
        f.affinity_timeout_s = timeout;
        f
    }

    /// Plans `d` onto `s`, checking the writes' order, and returns the result.
    fn program(d: &Desired, s: &Snapshot) -> (Vec<Op>, Snapshot) {
        let ops = plan(d, s).unwrap();
        assert_consistent_throughout(s, &ops);
        let after = apply_to_snapshot(s, &ops);
        assert_eq!(plan(d, &after).unwrap(), vec![], "replanning is a no-op");
        (ops, after)
    }

    fn position(ops: &[Op], want: impl Fn(&Op) -> bool) -> Vec<usize> {
        ops.iter()
            .enumerate()
            .filter(|(_, o)| want(o))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn affinity_frontends_carry_their_timeout_and_their_set_membership() {
        let a = fa([192, 0, 2, 1], 31380);
        let b = fa([192, 0, 2, 1], 31390);
        let d = desired(vec![
            (
                a,
                with_affinity(fe("ns/gw", vec![be(10, true), be(11, false)]), 10_800),
            ),
            (b, fe("ns/plain", vec![be(12, false)])),
        ]);
        let (ops, s) = program(&d, &Snapshot::default());
        let fa_ = s.frontends[&frontend_key(&a)];
        assert_eq!(fa_.affinity_timeout_s, 10_800);
        assert_eq!(s.frontends[&frontend_key(&b)].affinity_timeout_s, 0);
        // Exactly the affinity frontend's set, by address and port as the
        // backends map holds them.
        let set = fa_.backend_set;
        let want: BTreeMap<MemberKey, u32> = BTreeMap::from([
            (
                MemberKey {
                    backend_set: set,
                    addr_be: u32::from_ne_bytes([10, 244, 1, 10]),
                    port_be: 80u16.to_be(),
                    _pad: 0,
                },
                0,
            ),
            (
                MemberKey {
                    backend_set: set,
                    addr_be: u32::from_ne_bytes([10, 244, 1, 11]),
                    port_be: 80u16.to_be(),
                    _pad: 0,
                },
                1,
            ),
        ]);
        assert_eq!(s.members, want);
        let members = position(&ops, |o| matches!(o, Op::PutMember(..)));
        let backends = position(&ops, |o| matches!(o, Op::PutBackend(..)));
        let frontends = position(&ops, |o| matches!(o, Op::PutFrontend(..)));
        assert!(backends.iter().max() < members.iter().min(), "{ops:?}");
        assert!(members.iter().max() < frontends.iter().min(), "{ops:?}");
    }

    #[test]
    fn membership_follows_a_changing_set_and_goes_with_it() {
        let a = fa([192, 0, 2, 1], 31380);
        let v1 = desired(vec![(
            a,
            with_affinity(fe("ns/gw", vec![be(10, true), be(11, false)]), 60),
        )]);
        let (_, s1) = program(&v1, &Snapshot::default());
        let old_set = s1.frontends[&frontend_key(&a)].backend_set;
        // .10 leaves, .12 joins: a new set, with its own membership.
        let v2 = desired(vec![(
            a,
            with_affinity(fe("ns/gw", vec![be(11, false), be(12, false)]), 60),
        )]);
        let (ops, s2) = program(&v2, &s1);
        let new_set = s2.frontends[&frontend_key(&a)].backend_set;
        assert_ne!(new_set, old_set);
        let switch = position(&ops, |o| matches!(o, Op::PutFrontend(..)))[0];
        for (i, op) in ops.iter().enumerate() {
            if let Op::DeleteMember(k) = op {
                assert_eq!(k.backend_set, old_set);
                assert!(
                    i > switch,
                    "old membership deleted after the switch: {ops:?}"
                );
            }
        }
        assert_eq!(s2.members.len(), 2);
        assert!(s2.members.keys().all(|k| k.backend_set == new_set));
        let gone = apply_to_snapshot(&s2, &plan(&Desired::default(), &s2).unwrap());
        assert_eq!(gone, Snapshot::default(), "nothing left behind");
    }

    #[test]
    fn turning_affinity_on_and_off_keeps_the_set_and_adds_or_removes_its_membership() {
        let a = fa([192, 0, 2, 1], 31380);
        let backends = vec![be(10, true), be(11, false)];
        let off = desired(vec![(a, fe("ns/gw", backends.clone()))]);
        let on = desired(vec![(a, with_affinity(fe("ns/gw", backends), 30))]);
        let (_, s_off) = program(&off, &Snapshot::default());
        assert!(s_off.members.is_empty(), "no affinity, no membership");
        let (ops, s_on) = program(&on, &s_off);
        // The set is kept: only membership and the frontend are written.
        assert!(
            ops.iter()
                .all(|o| matches!(o, Op::PutMember(..) | Op::PutFrontend(..))),
            "{ops:?}"
        );
        assert!(matches!(ops.last(), Some(Op::PutFrontend(..))), "{ops:?}");
        assert_eq!(s_on.members.len(), 2);
        let (ops, s_back) = program(&off, &s_on);
        assert!(matches!(ops.first(), Some(Op::PutFrontend(..))), "{ops:?}");
        assert_eq!(s_back, s_off);
    }

    #[test]
    fn a_set_shared_with_a_frontend_without_affinity_gets_one_membership() {
        let a = fa([192, 0, 2, 1], 31380);
        let b = fa([203, 0, 113, 1], 80);
        let backends = vec![be(10, true), be(11, false)];
        let d = desired(vec![
            (a, with_affinity(fe("ns/gw", backends.clone()), 30)),
            (b, fe("ns/other", backends)),
        ]);
        let (_, s) = program(&d, &Snapshot::default());
        assert_eq!(
            s.frontends[&frontend_key(&a)].backend_set,
            s.frontends[&frontend_key(&b)].backend_set
        );
        assert_eq!(s.members.len(), 2);
    }

    #[test]
    fn orphaned_membership_is_removed_and_new_sets_avoid_its_ids() {
        let mut s = Snapshot::default();
        let orphan = MemberKey {
            backend_set: 9,
            addr_be: u32::from_ne_bytes([10, 244, 1, 99]),
            port_be: 80u16.to_be(),
            _pad: 0,
        };
        s.members.insert(orphan, 3);
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(
            a,
            with_affinity(fe("ns/gw", vec![be(10, true)]), 30),
        )]);
        let (_, after) = program(&d, &s);
        assert!(!after.members.contains_key(&orphan));
        assert!(after.frontends[&frontend_key(&a)].backend_set > 9);
        assert_eq!(after.members.len(), 1);
    }

    #[test]
    fn a_wrong_membership_index_is_rewritten() {
        let a = fa([192, 0, 2, 1], 31380);
        let d = desired(vec![(
            a,
            with_affinity(fe("ns/gw", vec![be(10, true), be(11, false)]), 30),
        )]);
        let (_, mut s) = program(&d, &Snapshot::default());
        // The first key is .10's, index 0.
        let k = *s.members.keys().next().unwrap();
        s.members.insert(k, 7);
        assert_eq!(plan(&d, &s).unwrap(), vec![Op::PutMember(k, 0)]);
    }
}
