//! tc ingress: on the external devices it finishes what XDP left (delivery
//! into local pods, unresolved neighbours, devices without XDP); on the
//! devices facing local pods it translates their replies. Everything goes
//! around netfilter in both directions, so conntrack never sees half a flow.
//! tc counts the verdict of every packet it sees, also of those XDP passed
//! (XDP counts none of those: see `xdp_ingress`).
use aya_ebpf::{
    bindings::{bpf_redir_neigh, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use forwarder_common::{IfaceInfo, Reason, IFACE_F_VETH_PEER};

use crate::{
    conntrack::Translation,
    fib::Fib,
    icmp::{self, TcBytes},
    kernel_ct::Hook,
    maps::IFACES,
    nat,
    parse::{self, MAX_HEADERS_LEN},
    pipeline, stats,
    verdict::{Action, Verdict},
};

const AF_INET: u32 = 2;

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    let mut t = Translation::default();
    let verdict = match classify(&ctx, &mut t) {
        Ok(v) => v,
        Err(reason) => Verdict::not_ours(reason),
    };
    // SAFETY: `skb` is the program's own context, valid for its run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if stats::notable(verdict.reason) && stats::log_allowed() {
        aya_log_ebpf::debug!(
            &ctx,
            "tc: reason {} on ifindex {}",
            verdict.reason as u32,
            ifindex
        );
    }
    let action = match verdict.action {
        // XDP's own action; tc never decides it.
        Action::Tx | Action::Pass => {
            stats::count(verdict.reason);
            if verdict.tracked {
                stats::count_flow_pass(verdict.reason);
            }
            return TC_ACT_OK;
        }
        Action::Drop => {
            stats::count(verdict.reason);
            return TC_ACT_SHOT;
        }
        // SAFETY (the three helpers): plain integers and, for the
        // neighbour, a live parameter block of the size passed.
        Action::Peer => (unsafe { bpf_redirect_peer(verdict.ifindex, 0) }) as i32,
        Action::Redirect => (unsafe { bpf_redirect(verdict.ifindex, 0) }) as i32,
        Action::Neigh => {
            let mut nh = bpf_redir_neigh {
                nh_family: AF_INET,
                // SAFETY: a union of integers, for which zero is valid.
                __bindgen_anon_1: unsafe { core::mem::zeroed() },
            };
            nh.__bindgen_anon_1.ipv4_nh = verdict.nexthop;
            // SAFETY: as above.
            (unsafe {
                bpf_redirect_neigh(
                    verdict.ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }) as i32
        }
    };
    if action == TC_ACT_REDIRECT {
        stats::count(verdict.reason);
        stats::count_forwarded(&t, ctx.len() as u64);
    } else {
        // The packet is already rewritten: handing it to the stack would
        // show netfilter half a flow. Drop and count instead.
        stats::count(Reason::DropRedirectFailed);
        if stats::log_allowed() {
            aya_log_ebpf::debug!(
                &ctx,
                "tc: redirect to ifindex {} failed ({})",
                verdict.ifindex,
                action
            );
        }
    }
    action
}

/// The frame is addressed to this node, as the kernel decided on receive
/// (`pkt_type`). On a bridge port a frame to the bridge's MAC is the
/// host's too, though the port calls it another host's: the bridge hands
/// it up as the host's.
#[inline(always)]
fn link_layer_host(
    ctx: &TcContext,
    data: usize,
    data_end: usize,
    ingress: &IfaceInfo,
) -> Result<(), Reason> {
    // SAFETY: `skb` is the program's own context, valid for its run.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    match pkt_type {
        parse::PACKET_HOST => Ok(()),
        parse::PACKET_BROADCAST | parse::PACKET_MULTICAST => Err(Reason::PassNotUnicast),
        _ if ingress.master_ifindex != 0 => {
            parse::dest_mac_is_host(data, data_end, &ingress.host_mac)
        }
        _ => Err(Reason::PassOtherHost),
    }
}

#[inline(always)]
fn classify(ctx: &TcContext, out: &mut Translation) -> Result<Verdict, Reason> {
    // A VLAN-tagged frame reaches tc with its tag already taken out of the
    // bytes (skb_vlan_untag, or the NIC): it belongs to the VLAN's device,
    // to which the kernel delivers it after tc, not to this one.
    // SAFETY: `skb` is the program's own context, valid for its run.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return Err(Reason::PassNotIpv4);
    }
    // Direct access needs the headers linear (GRO'd or paged skbs may not be).
    let want = (ctx.len() as usize).min(MAX_HEADERS_LEN);
    if ctx.data_end() - ctx.data() < want {
        ctx.pull_data(want as u32)
            .map_err(|_| Reason::PassMalformed)?;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let p = pipeline::scratch()?;
    p.h = parse::parse(data, data_end, ctx.len() as usize)?;
    // SAFETY: `skb` is the program's own context, valid for its run.
    let ingress_ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY (get): a read-only copy of a map value of plain integers.
    let ingress: IfaceInfo =
        *unsafe { IFACES.get(ingress_ifindex) }.ok_or(Reason::PassNoService)?;
    link_layer_host(ctx, data, data_end, &ingress)?;
    if p.h.ttl <= 1 {
        return Err(Reason::PassTtl);
    }
    pipeline::plan(
        ctx.as_ptr(),
        Hook::Tc,
        data,
        data_end,
        ingress_ifindex,
        &ingress,
        p,
    )?;
    // From here on everything is read back from the plan (see `Plan`).
    if p.fib == Fib::Fail || p.fib == Fib::FragNeeded {
        return Ok(if p.is_new {
            Verdict::not_ours(Reason::PassFibFailed)
        } else {
            Verdict::flow_to_kernel(Reason::PassFibFailed)
        });
    }
    let t = pipeline::commit(p)?;
    *out = t;
    let route = p.route;
    if p.is_icmp {
        icmp::rewrite(&mut TcBytes(ctx), &p.h, &p.icmp)?;
        stats::count(Reason::IcmpTranslated);
    } else {
        nat::rewrite_tc(ctx, &p.h, &t)?;
    }
    if p.fib == Fib::NoNeigh {
        return Ok(Verdict::forward(
            Action::Neigh,
            Reason::TcRedirectNeigh,
            route.ifindex,
            route.nexthop,
        ));
    }
    nat::set_macs_tc(ctx, &route)?;
    // SAFETY (get): a read-only copy of a map value of plain integers.
    let peer =
        unsafe { IFACES.get(route.ifindex) }.is_some_and(|i| i.flags & IFACE_F_VETH_PEER != 0);
    Ok(if peer {
        Verdict::forward(Action::Peer, Reason::TcRedirectPeer, route.ifindex, 0)
    } else {
        Verdict::forward(Action::Redirect, Reason::TcRedirect, route.ifindex, 0)
    })
}
