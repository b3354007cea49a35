//! Rewriting a packet to its translation: addresses, ports, TTL, MACs and
//! checksums (incremental, RFC 1624). XDP writes the bytes itself; tc goes
//! through the skb helpers, which also keep the skb's checksum state right
//! (partial checksums from local pods, CHECKSUM_COMPLETE from NICs).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};
use forwarder_common::{csum, Reason, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack::Translation,
    fib::Route,
    parse::{ipv4, l4, l4_check_off, ptr_at, Headers, L3_OFF},
};

/// The 16-bit word holding TTL and protocol, as the IPv4 checksum sees it.
#[inline(always)]
fn ttl_word(ttl: u8, proto: u8) -> u16 {
    u16::from_ne_bytes([ttl, proto])
}

#[inline(always)]
pub fn rewrite_xdp(
    data: usize,
    data_end: usize,
    h: &Headers,
    t: &Translation,
    route: &Route,
) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, L3_OFF)?;
    let check_off = l4_check_off(h);
    let ports: *mut [u8; 4] = ptr_at(data, data_end, h.l4_off)?;
    let l4_check: *mut [u8; 2] = ptr_at(data, data_end, check_off)?;
    // SAFETY: each pointer was bounds-checked by `ptr_at` against the
    // packet, which XDP may write; the header types have alignment 1.
    unsafe {
        (*eth).dst_addr = route.dmac;
        (*eth).src_addr = route.smac;

        let ip = &mut *ip;
        let mut c = u16::from_ne_bytes(ip.check);
        c = csum::replace_u32(c, h.saddr, t.saddr);
        c = csum::replace_u32(c, h.daddr, t.daddr);
        c = csum::replace_u16(c, ttl_word(h.ttl, h.proto), ttl_word(h.ttl - 1, h.proto));
        ip.check = c.to_ne_bytes();
        ip.src_addr = t.saddr.to_ne_bytes();
        ip.dst_addr = t.daddr.to_ne_bytes();
        ip.ttl = h.ttl - 1;

        let old = u16::from_ne_bytes(*l4_check);
        // A zero UDP checksum means "none" and stays zero.
        if !(h.proto == IPPROTO_UDP && old == 0) {
            let mut c = old;
            c = csum::replace_u32(c, h.saddr, t.saddr);
            c = csum::replace_u32(c, h.daddr, t.daddr);
            c = csum::replace_u16(c, h.sport, t.sport);
            c = csum::replace_u16(c, h.dport, t.dport);
            if h.proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            *l4_check = c.to_ne_bytes();
        }
        let ports = &mut *ports;
        ports[0..2].copy_from_slice(&t.sport.to_ne_bytes());
        ports[2..4].copy_from_slice(&t.dport.to_ne_bytes());
    }
    Ok(())
}

#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, h: &Headers, t: &Translation) -> Result<(), Reason> {
    const IP_CHECK: usize = L3_OFF + ipv4::CHECK;
    let check_off = l4_check_off(h);
    let udp = h.proto == IPPROTO_UDP;
    let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    // Without a UDP checksum no checksum change offsets the ports' change:
    // the skb's CHECKSUM_COMPLETE sum must follow the bytes themselves.
    let udp_no_check = udp
        && ctx
            .load::<u16>(check_off)
            .map_err(|_| Reason::PassMalformed)?
            == 0;
    let port_store_flags = if udp_no_check {
        BPF_F_RECOMPUTE_CSUM as u64
    } else {
        0
    };
    let fail = |_| Reason::DropRedirectFailed;
    if t.saddr != h.saddr {
        ctx.l4_csum_replace(
            check_off,
            h.saddr as u64,
            t.saddr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(fail)?;
        ctx.l3_csum_replace(IP_CHECK, h.saddr as u64, t.saddr as u64, 4)
            .map_err(fail)?;
        ctx.store(L3_OFF + ipv4::SADDR, &t.saddr, 0).map_err(fail)?;
    }
    if t.daddr != h.daddr {
        ctx.l4_csum_replace(
            check_off,
            h.daddr as u64,
            t.daddr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled | 4,
        )
        .map_err(fail)?;
        ctx.l3_csum_replace(IP_CHECK, h.daddr as u64, t.daddr as u64, 4)
            .map_err(fail)?;
        ctx.store(L3_OFF + ipv4::DADDR, &t.daddr, 0).map_err(fail)?;
    }
    if t.sport != h.sport {
        ctx.l4_csum_replace(check_off, h.sport as u64, t.sport as u64, mangled | 2)
            .map_err(fail)?;
        ctx.store(h.l4_off + l4::SPORT, &t.sport, port_store_flags)
            .map_err(fail)?;
    }
    if t.dport != h.dport {
        ctx.l4_csum_replace(check_off, h.dport as u64, t.dport as u64, mangled | 2)
            .map_err(fail)?;
        ctx.store(h.l4_off + l4::DPORT, &t.dport, port_store_flags)
            .map_err(fail)?;
    }
    let old = ttl_word(h.ttl, h.proto);
    let new = ttl_word(h.ttl - 1, h.proto);
    ctx.l3_csum_replace(IP_CHECK, old as u64, new as u64, 2)
        .map_err(fail)?;
    ctx.store(L3_OFF + ipv4::TTL, &(h.ttl - 1), 0).map_err(fail)
}

#[inline(always)]
pub fn set_macs_tc(ctx: &TcContext, route: &Route) -> Result<(), Reason> {
    ctx.store(0, &route.dmac, 0)
        .map_err(|_| Reason::DropRedirectFailed)?;
    ctx.store(6, &route.smac, 0)
        .map_err(|_| Reason::DropRedirectFailed)
}

#[inline(always)]
pub fn set_macs_xdp(data: usize, data_end: usize, route: &Route) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(data, data_end, 0)?;
    // SAFETY: bounds-checked by `ptr_at`; the packet is writable in XDP.
    unsafe {
        (*eth).dst_addr = route.dmac;
        (*eth).src_addr = route.smac;
    }
    Ok(())
}
