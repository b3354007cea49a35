//! The decision both hooks share: parse -> flow lookup (or frontend ->
//! backend) -> route. Nothing is tracked here: a new flow is committed by the
//! hook once it knows it can forward the packet.
use aya_ebpf::{cty::c_void, helpers::bpf_ktime_get_coarse_ns, macros::map, maps::PerCpuArray};
use forwarder_common::{
    Config, CtKey, IfaceInfo, Reason, CONFIG_F_DRAINING, FRONTEND_F_DROP_IF_EMPTY,
    IFACE_F_EXTERNAL, IPPROTO_ICMP, IPPROTO_TCP,
};

use crate::{
    conntrack::{self, NewFlow, Translation},
    fib::{self, Fib, FibQuery, Route},
    icmp::IcmpRewrite,
    kernel_ct::{self, CtOpts, Hook, SockTupleV4},
    maps::CONFIG,
    parse::{ipv4_csum_ok, Headers},
    select,
};

/// What a packet should become. It lives in a per-CPU map, not on the
/// stack: the hooks' code after `plan` reads the headers and the decision
/// back from there, so the verifier does not carry each path's precise
/// register values into what follows (it prunes far more states).
pub struct Plan {
    /// The packet's headers, as `parse` read them.
    pub h: Headers,
    /// The rewrite (for a new flow: toward the backend, before source NAT).
    pub t: Translation,
    pub fib: Fib,
    pub route: Route,
    /// For a new flow: what `conntrack::commit` needs.
    pub is_new: bool,
    pub stale: bool,
    pub stale_peer: CtKey,
    pub flow: NewFlow,
    pub by_affinity: bool,
    /// An ICMP error translated with its flow.
    pub is_icmp: bool,
    pub icmp: IcmpRewrite,
    pub now: u64,
    /// The tuple the route is looked up for.
    pub query: FibQuery,
    /// Room for the nf_conntrack lookup's arguments.
    pub ct_tuple: SockTupleV4,
    pub ct_opts: CtOpts,
}

/// Per-CPU room for the plan: the hooks' stacks (512 bytes) cannot hold it
/// beside everything else.
#[map]
static PLAN_SCRATCH: PerCpuArray<Plan> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's plan slot.
#[inline(always)]
pub fn scratch() -> Result<&'static mut Plan, Reason> {
    let p = PLAN_SCRATCH.get_ptr_mut(0).ok_or(Reason::PassNoService)?;
    // SAFETY: a per-CPU slot: only this program run on this CPU uses it
    // (XDP and tc do not preempt each other on one CPU), and it is valid for
    // the whole run.
    Ok(unsafe { &mut *p })
}

#[inline(always)]
fn config() -> Result<&'static Config, Reason> {
    // The array's one slot always exists.
    CONFIG.get(0).ok_or(Reason::PassNoService)
}

#[inline(always)]
pub fn plan(
    ctx: *mut c_void,
    hook: Hook,
    data: usize,
    data_end: usize,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    out: &mut Plan,
) -> Result<(), Reason> {
    let h = out.h;
    let h = &h;
    choose(ctx, hook, h, ingress_ifindex, ingress, out)?;
    // Only now, for packets that are ours: the kernel would drop a header
    // whose checksum fails, so we leave it to do so.
    if !ipv4_csum_ok(data, data_end, h) {
        return Err(Reason::PassMalformed);
    }
    out.query.ingress = ingress_ifindex;
    out.query.proto = h.proto;
    // The length the route's MTU is checked against: XDP's frames are the
    // packets themselves; tc passes 0, so the kernel checks the skb itself,
    // a GRO/TSO super-packet by its segments.
    out.query.tot_len = match hook {
        Hook::Xdp => h.ip_len,
        Hook::Tc => 0,
    };
    let (fib, route) = fib::lookup(ctx, &out.query);
    out.fib = fib;
    out.route = route;
    Ok(())
}

/// The flow a packet belongs to, or the new flow it starts, and the tuple
/// its route is looked up for.
#[inline(always)]
fn choose(
    ctx: *mut c_void,
    hook: Hook,
    h: &Headers,
    ingress_ifindex: u32,
    ingress: &IfaceInfo,
    out: &mut Plan,
) -> Result<(), Reason> {
    let cfg = config()?;
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    out.now = now;
    out.is_new = false;
    out.is_icmp = false;
    if h.proto == IPPROTO_ICMP {
        let quoted = &h.quoted;
        // The error travels against the quoted packet: its reverse tuple is
        // the entry of the direction the error goes.
        let key = CtKey::new(
            quoted.daddr,
            quoted.dport,
            quoted.saddr,
            quoted.sport,
            quoted.proto,
        );
        let t = conntrack::peek(&key, ingress_ifindex, ingress, cfg, now)?;
        let icmp = IcmpRewrite::new(h, &t);
        out.t = t;
        out.is_icmp = true;
        out.icmp = icmp;
        out.query.saddr = icmp.outer_saddr;
        out.query.daddr = icmp.outer_daddr;
        out.query.sport = 0;
        out.query.dport = 0;
        return Ok(());
    }

    let key = CtKey::new(h.saddr, h.sport, h.daddr, h.dport, h.proto);
    let lookup = conntrack::lookup(&key, h, ingress_ifindex, ingress, cfg, now)?;
    if lookup.hit {
        let t = lookup.t;
        out.t = t;
        out.query.saddr = t.saddr;
        out.query.daddr = t.daddr;
        out.query.sport = t.sport;
        out.query.dport = t.dport;
        return Ok(());
    }

    // A new flow: only from clients, only to a frontend, only a SYN.
    if ingress.flags & IFACE_F_EXTERNAL == 0 {
        return Err(Reason::PassNoService);
    }
    let fe = select::lookup_frontend(h).ok_or(Reason::PassNoService)?;
    if fe.backend_count == 0 {
        return Err(if fe.flags & FRONTEND_F_DROP_IF_EMPTY != 0 {
            Reason::DropNoLocalBackend
        } else {
            Reason::PassNoBackend
        });
    }
    if h.proto == IPPROTO_TCP && !conntrack::is_syn(h) {
        return Err(Reason::PassNotSyn);
    }
    if cfg.flags & CONFIG_F_DRAINING != 0 {
        return Err(Reason::PassDraining);
    }
    if h.proto == IPPROTO_TCP
        && kernel_ct::tracks(ctx, hook, h, &mut out.ct_tuple, &mut out.ct_opts)
    {
        return Err(Reason::PassKernelFlow);
    }
    let selected = select::select_backend(h, &fe, now)?;
    let be = selected.be;
    out.t = Translation {
        saddr: h.saddr,
        daddr: be.addr_be,
        sport: h.sport,
        dport: be.port_be,
        stats_slot: fe.stats_slot,
        backend_slot: be.stats_slot,
    };
    // Routed toward the backend from the client; the route's device then
    // picks the source-NAT address (commit).
    out.query.saddr = h.saddr;
    out.query.daddr = be.addr_be;
    out.query.sport = h.sport;
    out.query.dport = be.port_be;
    out.is_new = true;
    out.stale = lookup.stale;
    out.stale_peer = lookup.stale_peer;
    out.flow = NewFlow {
        key,
        fe,
        be,
        hash: selected.hash,
    };
    out.by_affinity = selected.by_affinity;
    Ok(())
}

/// Tracks the plan's new flow (if it is one) and returns the final rewrite.
#[inline(always)]
pub fn commit(p: &Plan) -> Result<Translation, Reason> {
    let h = &p.h;
    if !p.is_new {
        return Ok(p.t);
    }
    let t = conntrack::commit(
        &p.flow,
        p.stale,
        &p.stale_peer,
        h,
        &p.route,
        config()?,
        p.now,
    )?;
    select::remember_affinity(h, &p.flow.fe, &p.flow.be, p.now);
    if p.by_affinity {
        crate::stats::count(Reason::AffinityHit);
    }
    Ok(t)
}
