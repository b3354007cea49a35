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
    verdict::{Action, Verdict},
};

#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    let mut t = Translation::default();
    let verdict = match classify(&ctx, &mut t) {
        Ok(v) => v,
        Err(reason) => Verdict::not_ours(reason),
    };
    if stats::notable(verdict.reason) && stats::log_allowed() {
        aya_log_ebpf::debug!(
            &ctx,
            "xdp: reason {} on ifindex {}",
            verdict.reason as u32,
            ctx.ingress_ifindex() as u32
        );
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    match verdict.action {
        Action::Tx => {
            stats::count(Reason::XdpTx);
            stats::count_forwarded(&t, len);
            XDP_TX
        }
        Action::Redirect => {
            let action = unsafe { bpf_redirect(verdict.ifindex, 0) } as u32;
            if action == XDP_REDIRECT {
                stats::count(Reason::XdpRedirect);
                stats::count_forwarded(&t, len);
            } else {
                stats::count(Reason::DropRedirectFailed);
            }
            action
        }
        // tc's own actions; XDP never decides them.
        Action::Pass | Action::Peer | Action::Neigh => {
            stats::count(verdict.reason);
            XDP_PASS
        }
        Action::Drop => {
            stats::count(verdict.reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn classify(ctx: &XdpContext, out: &mut Translation) -> Result<Verdict, Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let h: Headers = parse::parse(data, data_end)?;
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
    let ingress: IfaceInfo = match unsafe { IFACES.get(ingress_ifindex) } {
        Some(i) => *i,
        None => return Ok(Verdict::not_ours(Reason::PassNoService)),
    };
    if h.ttl <= 1 {
        return Ok(Verdict::not_ours(Reason::PassTtl));
    }
    let egress = FibEgress {
        ctx: ctx.as_ptr(),
        ingress: ingress_ifindex,
    };
    let t = decide(&h, &ingress, &egress)?;
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
        Fib::NoNeigh(_) => return Ok(Verdict::not_ours(Reason::XdpToTc)),
        Fib::Fail => return Ok(Verdict::not_ours(Reason::PassFibFailed)),
    };
    let can_transmit = route.ifindex == ingress_ifindex && ingress.flags & IFACE_F_XDP_TX != 0
        || unsafe { IFACES.get(route.ifindex) }.is_some_and(|i| i.flags & IFACE_F_XDP_TX != 0);
    if !can_transmit {
        // Delivery needs an skb (a local pod, a bridge): tc does it.
        return Ok(Verdict::not_ours(Reason::XdpToTc));
    }
    nat::rewrite_xdp(data, data_end, &h, &t, &route)?;
    *out = t;
    let action = if route.ifindex == ingress_ifindex {
        Action::Tx
    } else {
        Action::Redirect
    };
    Ok(Verdict::forward(action, Reason::XdpTx, route.ifindex, 0))
}
