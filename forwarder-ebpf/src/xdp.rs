//! XDP entry point on the external devices: translate and transmit what XDP
//! can transmit itself; leave the rest, untouched, to tc ingress.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
    helpers::bpf_redirect,
    macros::xdp,
    programs::XdpContext,
    EbpfContext,
};
use forwarder_common::{IfaceInfo, Reason, IFACE_F_XDP_TX};

use crate::{
    conntrack::{decide, Translation},
    fib::{self, Fib, FibEgress},
    maps::IFACES,
    nat,
    parse::{self, Headers},
    stats,
};

/// What XDP does with a packet, decided in one place.
enum Verdict {
    Tx(Translation),
    Redirect(u32, Translation),
    Pass(Reason),
    Drop(Reason),
}

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    let verdict = match classify(&ctx) {
        Ok(v) => v,
        Err(reason) if reason.is_drop() => Verdict::Drop(reason),
        Err(reason) => Verdict::Pass(reason),
    };
    match verdict {
        Verdict::Tx(t) => {
            stats::count(Reason::XdpTx);
            stats::count_service(t.stats_slot, (ctx.data_end() - ctx.data()) as u64);
            XDP_TX
        }
        Verdict::Redirect(ifindex, t) => {
            let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
            if action == XDP_REDIRECT {
                stats::count(Reason::XdpRedirect);
                stats::count_service(t.stats_slot, (ctx.data_end() - ctx.data()) as u64);
            } else {
                stats::count(Reason::DropRedirectFailed);
            }
            action
        }
        Verdict::Pass(reason) => {
            stats::count(reason);
            XDP_PASS
        }
        Verdict::Drop(reason) => {
            stats::count(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let h: Headers = parse::parse(data, data_end)?;
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
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
    let route = match fib::lookup(
        ctx.as_ptr(),
        ingress_ifindex,
        &h,
        t.saddr,
        t.daddr,
        t.sport,
        t.dport,
    ) {
        Fib::Forward(route) => route,
        // tc resolves the neighbour with bpf_redirect_neigh.
        Fib::NoNeigh(_) => return Ok(Verdict::Pass(Reason::XdpToTc)),
        Fib::Fail => return Ok(Verdict::Pass(Reason::PassFibFailed)),
    };
    let can_transmit = route.ifindex == ingress_ifindex && ingress.flags & IFACE_F_XDP_TX != 0
        || unsafe { IFACES.get(route.ifindex) }.is_some_and(|i| i.flags & IFACE_F_XDP_TX != 0);
    if !can_transmit {
        // Delivery needs an skb (a local pod, a bridge): tc does it.
        return Ok(Verdict::Pass(Reason::XdpToTc));
    }
    nat::rewrite_xdp(data, data_end, &h, &t, &route)?;
    if route.ifindex == ingress_ifindex {
        Ok(Verdict::Tx(t))
    } else {
        Ok(Verdict::Redirect(route.ifindex, t))
    }
}
