//! Rewriting a packet to its translation: addresses, ports, TTL, MACs and
//! checksums (incremental, RFC 1624). XDP writes the bytes itself; tc goes
//! through the skb helpers, which also keep the skb's checksum state right
//! (partial checksums from local pods, CHECKSUM_COMPLETE from NICs).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use forwarder_common::{csum, Reason, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    conntrack::Translation,
    fib::Route,
    parse::{l4_check_off, ptr_at, Headers, L3_OFF},
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
    let l4: *mut [u8; 4] = ptr_at(data, data_end, h.l4_off)?;
    let l4_check: *mut [u8; 2] = ptr_at(data, data_end, check_off)?;
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
        let ports = &mut *l4;
        ports[0..2].copy_from_slice(&t.sport.to_ne_bytes());
        ports[2..4].copy_from_slice(&t.dport.to_ne_bytes());
    }
    Ok(())
}

#[inline(always)]
pub fn rewrite_tc(ctx: &TcContext, h: &Headers, t: &Translation) -> Result<(), Reason> {
    const IP_CHECK: usize = L3_OFF + 10;
    let check_off = l4_check_off(h);
    let mangled = if h.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
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
        ctx.store(L3_OFF + 12, &t.saddr, 0).map_err(fail)?;
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
        ctx.store(L3_OFF + 16, &t.daddr, 0).map_err(fail)?;
    }
    if t.sport != h.sport {
        ctx.l4_csum_replace(check_off, h.sport as u64, t.sport as u64, mangled | 2)
            .map_err(fail)?;
        ctx.store(h.l4_off, &t.sport, 0).map_err(fail)?;
    }
    if t.dport != h.dport {
        ctx.l4_csum_replace(check_off, h.dport as u64, t.dport as u64, mangled | 2)
            .map_err(fail)?;
        ctx.store(h.l4_off + 2, &t.dport, 0).map_err(fail)?;
    }
    let old = ttl_word(h.ttl, h.proto);
    let new = ttl_word(h.ttl - 1, h.proto);
    ctx.l3_csum_replace(IP_CHECK, old as u64, new as u64, 2)
        .map_err(fail)?;
    ctx.store(L3_OFF + 8, &(h.ttl - 1), 0).map_err(fail)
}

#[inline(always)]
pub fn set_macs_tc(ctx: &TcContext, route: &Route) -> Result<(), Reason> {
    ctx.store(0, &route.dmac, 0)
        .map_err(|_| Reason::DropRedirectFailed)?;
    ctx.store(6, &route.smac, 0)
        .map_err(|_| Reason::DropRedirectFailed)
}
