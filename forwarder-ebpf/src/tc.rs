//! tc ingress: on the external devices it finishes what XDP left (delivery
//! into local pods, unresolved neighbours, devices without XDP); on the
//! devices facing local pods it translates their replies. Everything goes
//! around netfilter in both directions, so conntrack never sees half a flow.
use aya_ebpf::{
    bindings::{bpf_redir_neigh, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use forwarder_common::{IfaceInfo, Reason, IFACE_F_VETH_PEER};

use crate::{
    conntrack::{decide, Translation},
    fib::{self, Fib, FibEgress},
    maps::IFACES,
    nat,
    parse::{self, Headers, MAX_HEADERS_LEN},
    stats,
};

const AF_INET: u32 = 2;

enum Verdict {
    /// Rewritten; forward with the helper that fits the egress device.
    Peer(u32, Translation),
    Redirect(u32, Translation),
    Neigh(u32, u32, Translation),
    Pass(Reason),
    Drop(Reason),
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let verdict = match classify(&ctx) {
        Ok(v) => v,
        Err(reason) if reason.is_drop() => Verdict::Drop(reason),
        Err(reason) => Verdict::Pass(reason),
    };
    let len = ctx.len() as u64;
    let (action, reason, slot) = match verdict {
        Verdict::Peer(ifindex, t) => (
            unsafe { bpf_redirect_peer(ifindex, 0) } as i32,
            Reason::TcRedirectPeer,
            t.stats_slot,
        ),
        Verdict::Redirect(ifindex, t) => (
            unsafe { bpf_redirect(ifindex, 0) } as i32,
            Reason::TcRedirect,
            t.stats_slot,
        ),
        Verdict::Neigh(ifindex, nexthop, t) => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            nh.__bindgen_anon_1.ipv4_nh = nexthop;
            let rc = unsafe {
                bpf_redirect_neigh(
                    ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            };
            (rc as i32, Reason::TcRedirectNeigh, t.stats_slot)
        }
        Verdict::Pass(reason) => {
            stats::count(reason);
            return TC_ACT_OK;
        }
        Verdict::Drop(reason) => {
            stats::count(reason);
            return TC_ACT_SHOT;
        }
    };
    if action == TC_ACT_REDIRECT {
        stats::count(reason);
        stats::count_service(slot, len);
    } else {
        // The packet is already rewritten: handing it to the stack would
        // show netfilter half a flow. Drop and count instead.
        stats::count(Reason::DropRedirectFailed);
    }
    action
}

#[inline(always)]
fn classify(ctx: &TcContext) -> Result<Verdict, Reason> {
    // Direct access needs the headers linear (GRO'd or paged skbs may not be).
    let want = (ctx.len() as usize).min(MAX_HEADERS_LEN);
    if ctx.data_end() - ctx.data() < want {
        ctx.pull_data(want as u32)
            .map_err(|_| Reason::PassMalformed)?;
    }
    let h: Headers = parse::parse(ctx.data(), ctx.data_end())?;
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ingress: IfaceInfo = match unsafe { IFACES.get(ingress_ifindex) } {
        Some(i) => *i,
        None => return Ok(Verdict::Pass(Reason::PassNoService)),
    };
    if h.ttl <= 1 {
        return Ok(Verdict::Pass(Reason::PassTtl));
    }
    let egress = FibEgress {
        ctx: ctx.as_ptr(),
        ingress: ingress_ifindex,
    };
    let t = match decide(&h, &ingress, &egress) {
        Ok(t) => t,
        Err(r) if r.is_drop() => return Ok(Verdict::Drop(r)),
        Err(r) => return Ok(Verdict::Pass(r)),
    };
    match fib::lookup(
        ctx.as_ptr(),
        ingress_ifindex,
        &h,
        t.saddr,
        t.daddr,
        t.sport,
        t.dport,
    ) {
        Fib::Forward(route) => {
            nat::rewrite_tc(ctx, &h, &t)?;
            nat::set_macs_tc(ctx, &route)?;
            let peer = unsafe { IFACES.get(route.ifindex) }
                .is_some_and(|i| i.flags & IFACE_F_VETH_PEER != 0);
            if peer {
                Ok(Verdict::Peer(route.ifindex, t))
            } else {
                Ok(Verdict::Redirect(route.ifindex, t))
            }
        }
        Fib::NoNeigh(route) => {
            nat::rewrite_tc(ctx, &h, &t)?;
            Ok(Verdict::Neigh(route.ifindex, route.nexthop, t))
        }
        Fib::Fail => Ok(Verdict::Pass(Reason::PassFibFailed)),
    }
}
