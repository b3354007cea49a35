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
    conntrack::Translation,
    fib::Fib,
    icmp::{self, XdpBytes},
    kernel_ct::Hook,
    maps::IFACES,
    nat, parse, pipeline, stats,
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
            stats::count(verdict.reason);
            stats::count_forwarded(&t, len);
            XDP_TX
        }
        Action::Redirect => {
            // SAFETY: a helper taking plain integers.
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
            // Each packet is counted once, by the hook that decides its
            // fate. Every frame XDP passes meets tc ingress on this same
            // device, which decides again and counts that verdict (and a
            // tracked flow's pass to the kernel): XDP counts nothing for
            // it, only notes the frames it left to tc for delivery (an
            // event, not a verdict). tc counts skbs: where GRO merges
            // passed frames, one verdict stands for all of them.
            if matches!(verdict.reason, Reason::XdpToTc) {
                stats::count(Reason::XdpToTc);
            }
            XDP_PASS
        }
        Action::Drop => {
            stats::count(verdict.reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn iface(ifindex: u32) -> Option<IfaceInfo> {
    // SAFETY (get): a read-only copy of a map value of plain integers.
    unsafe { IFACES.get(ifindex) }.copied()
}

#[inline(always)]
fn classify(ctx: &XdpContext, out: &mut Translation) -> Result<Verdict, Reason> {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // Opaque to the optimiser: derived from data_end, it would let LLVM
    // prove later bounds checks redundant and drop them, which the
    // verifier cannot follow.
    let pkt_len = core::hint::black_box(data_end - data);
    let p = pipeline::scratch()?;
    p.h = parse::parse(data, data_end, pkt_len)?;
    let ingress_ifindex = ctx.ingress_ifindex() as u32;
    let ingress = iface(ingress_ifindex).ok_or(Reason::PassNoService)?;
    parse::dest_mac_is_host(data, data_end, &ingress.host_mac)?;
    if p.h.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    pipeline::plan(
        ctx.as_ptr(),
        Hook::Xdp,
        data,
        data_end,
        ingress_ifindex,
        &ingress,
        p,
    )?;
    // From here on everything is read back from the plan (see `Plan`).
    let h = &p.h;
    let can_tx_back = ingress.flags & IFACE_F_XDP_TX != 0;
    match p.fib {
        Fib::Forward => {}
        // tc resolves the neighbour with bpf_redirect_neigh.
        Fib::NoNeigh => return Ok(Verdict::not_ours(Reason::XdpToTc)),
        // A router's answer: the sender learns the path's MTU. The packet
        // itself is not forwarded, as a router would not.
        Fib::FragNeeded if !p.is_new && !p.is_icmp && can_tx_back => {
            icmp::frag_needed_xdp(ctx, h, p.route.mtu)?;
            return Ok(Verdict::forward(
                Action::Tx,
                Reason::XdpIcmpFragNeeded,
                ingress_ifindex,
                0,
            ));
        }
        Fib::FragNeeded | Fib::Fail => {
            return Ok(if p.is_new {
                Verdict::not_ours(Reason::PassFibFailed)
            } else {
                Verdict::flow_to_kernel(Reason::PassFibFailed)
            });
        }
    }
    let route = p.route;
    let can_transmit = if route.ifindex == ingress_ifindex {
        can_tx_back
    } else {
        iface(route.ifindex).is_some_and(|i| i.flags & IFACE_F_XDP_TX != 0)
    };
    if !can_transmit {
        // Delivery needs an skb (a local pod, a bridge): tc does it, and
        // tracks a new flow then.
        return Ok(Verdict::not_ours(Reason::XdpToTc));
    }
    let t = pipeline::commit(p)?;
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if p.is_icmp {
        let mut bytes = XdpBytes { data, data_end };
        icmp::rewrite(&mut bytes, h, &p.icmp)?;
        nat::set_macs_xdp(data, data_end, &route)?;
        stats::count(Reason::IcmpTranslated);
    } else {
        nat::rewrite_xdp(data, data_end, h, &t, &route)?;
    }
    *out = t;
    let action = if route.ifindex == ingress_ifindex {
        Action::Tx
    } else {
        Action::Redirect
    };
    Ok(Verdict::forward(action, Reason::XdpTx, route.ifindex, 0))
}
