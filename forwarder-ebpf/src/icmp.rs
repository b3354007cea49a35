//! ICMP errors about translated flows.
//!
//! An error that quotes a packet of one of our flows is translated with the
//! flow, as netfilter's NAT does it for RELATED packets: the quoted header
//! (addresses, ports, its checksums) is rewritten back to what the other
//! side sent or expects, and the outer header follows the flow. So a client
//! sees path-MTU and unreachable errors about node:nodePort, and a backend
//! sees them about its own connection.
//!
//! And when XDP itself cannot forward a packet of a flow because the route's
//! MTU is smaller (`Fib::FragNeeded`), it answers as a router would: ICMP
//! fragmentation needed, quoting the packet as it was received.
use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use forwarder_common::{csum, Reason, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::eth::EtherType;

use crate::{
    conntrack::Translation,
    parse::{ipv4, l4, ptr_at, read_at, Headers, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED_CODE, L3_OFF},
};

/// How an ICMP error is rewritten; addresses and ports in wire order.
#[derive(Clone, Copy, Default)]
pub struct IcmpRewrite {
    pub outer_saddr: u32,
    pub outer_daddr: u32,
    pub inner_saddr: u32,
    pub inner_daddr: u32,
    pub inner_sport: u16,
    pub inner_dport: u16,
}

impl IcmpRewrite {
    /// `t` is the translation of the entry keyed by the quoted packet's
    /// reverse tuple (the direction the error travels in).
    #[inline(always)]
    pub fn new(h: &Headers, t: &Translation) -> Self {
        IcmpRewrite {
            // The flow's endpoint itself reported: it takes the address the
            // other side knows. A router on the way keeps its own.
            outer_saddr: if h.saddr == h.quoted.daddr {
                t.saddr
            } else {
                h.saddr
            },
            outer_daddr: t.daddr,
            inner_saddr: t.daddr,
            inner_sport: t.dport,
            inner_daddr: t.saddr,
            inner_dport: t.sport,
        }
    }
}

/// Reads and writes packet bytes: raw in XDP, through the skb helpers in tc
/// (which keep a CHECKSUM_COMPLETE skb's checksum right).
pub trait PacketBytes {
    fn load<T: Copy>(&self, off: usize) -> Result<T, Reason>;
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), Reason>;
}

pub struct XdpBytes {
    pub data: usize,
    pub data_end: usize,
}

impl PacketBytes for XdpBytes {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, Reason> {
        read_at(self.data, self.data_end, off)
    }
    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), Reason> {
        let p: *mut T = ptr_at(self.data, self.data_end, off)?;
        // SAFETY: `ptr_at` checked the bytes lie inside the packet, which the
        // program may write; unaligned because packet fields have no alignment.
        unsafe { core::ptr::write_unaligned(p, *v) };
        Ok(())
    }
}

pub struct TcBytes<'a>(pub &'a TcContext);

impl PacketBytes for TcBytes<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, Reason> {
        self.0.load::<T>(off).map_err(|_| Reason::PassMalformed)
    }
    #[inline(always)]
    fn store<T: Copy>(&mut self, off: usize, v: &T) -> Result<(), Reason> {
        self.0
            .store(off, v, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| Reason::DropRedirectFailed)
    }
}

/// Rewrites an ICMP error (outer IPv4 header, ICMP checksum, the quoted
/// IPv4 header and ports, and the quoted L4 checksum where it is quoted).
#[inline(always)]
pub fn rewrite<P: PacketBytes>(p: &mut P, h: &Headers, r: &IcmpRewrite) -> Result<(), Reason> {
    let q = h.quoted;
    let il3 = h.inner_l3_off();
    let il4 = h.inner_l4_off();
    let quoted_l4_len = (h.ip_len as usize).saturating_sub(il4 - L3_OFF);

    let mut icmp_check: u16 = p.load(h.icmp_check_off())?;
    let inner_check: u16 = p.load(il3 + ipv4::CHECK)?;
    let mut new_inner_check = csum::replace_u32(inner_check, q.saddr, r.inner_saddr);
    new_inner_check = csum::replace_u32(new_inner_check, q.daddr, r.inner_daddr);
    icmp_check = csum::replace_u32(icmp_check, q.saddr, r.inner_saddr);
    icmp_check = csum::replace_u32(icmp_check, q.daddr, r.inner_daddr);
    icmp_check = csum::replace_u16(icmp_check, inner_check, new_inner_check);
    icmp_check = csum::replace_u16(icmp_check, q.sport, r.inner_sport);
    icmp_check = csum::replace_u16(icmp_check, q.dport, r.inner_dport);

    // The quoted L4 checksum, where the quote reaches it (a UDP zero stays zero).
    let check_off = if q.proto == IPPROTO_TCP {
        l4::TCP_CHECK
    } else {
        l4::UDP_CHECK
    };
    if quoted_l4_len >= check_off + 2 {
        let old: u16 = p.load(il4 + check_off)?;
        if !(q.proto == IPPROTO_UDP && old == 0) {
            let mut c = csum::replace_u32(old, q.saddr, r.inner_saddr);
            c = csum::replace_u32(c, q.daddr, r.inner_daddr);
            c = csum::replace_u16(c, q.sport, r.inner_sport);
            c = csum::replace_u16(c, q.dport, r.inner_dport);
            if q.proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            icmp_check = csum::replace_u16(icmp_check, old, c);
            p.store(il4 + check_off, &c)?;
        }
    }
    p.store(il3 + ipv4::SADDR, &r.inner_saddr)?;
    p.store(il3 + ipv4::DADDR, &r.inner_daddr)?;
    p.store(il3 + ipv4::CHECK, &new_inner_check)?;
    p.store(il4 + l4::SPORT, &r.inner_sport)?;
    p.store(il4 + l4::DPORT, &r.inner_dport)?;
    p.store(h.icmp_check_off(), &icmp_check)?;

    // The outer header: addresses and TTL (the ICMP checksum has no pseudo-header).
    let ttl_old = u16::from_ne_bytes([h.ttl, IPPROTO_ICMP]);
    let ttl_new = u16::from_ne_bytes([h.ttl - 1, IPPROTO_ICMP]);
    let mut c: u16 = p.load(L3_OFF + ipv4::CHECK)?;
    c = csum::replace_u32(c, h.saddr, r.outer_saddr);
    c = csum::replace_u32(c, h.daddr, r.outer_daddr);
    c = csum::replace_u16(c, ttl_old, ttl_new);
    p.store(L3_OFF + ipv4::SADDR, &r.outer_saddr)?;
    p.store(L3_OFF + ipv4::DADDR, &r.outer_daddr)?;
    p.store(L3_OFF + ipv4::TTL, &(h.ttl - 1))?;
    p.store(L3_OFF + ipv4::CHECK, &c)
}

/// Bytes of the answer: Ethernet, IPv4, ICMP, the quoted IPv4 header and 8
/// bytes of its payload.
const QUOTE_LEN: usize = 20 + 8;
const ICMP_HDR_LEN: usize = 8;
const ANSWER_IP_LEN: usize = 20 + ICMP_HDR_LEN + QUOTE_LEN;
const ANSWER_LEN: usize = L3_OFF + ANSWER_IP_LEN;
/// What the answer prepends to the received packet's IPv4 header.
const GROW: usize = 20 + ICMP_HDR_LEN;

/// Turns the received packet into an ICMP "fragmentation needed" answer to
/// its sender, from the address it was sent to, quoting its IPv4 header and
/// 8 bytes of TCP/UDP. The caller transmits it out of the ingress device.
/// Only for headers without options (a fixed layout the verifier follows).
#[inline(always)]
pub fn frag_needed_xdp(ctx: &XdpContext, h: &Headers, mtu: u16) -> Result<(), Reason> {
    if h.ihl_len != 20 {
        return Err(Reason::PassFibFailed);
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let macs: [u8; 12] = read_at(data, data_end, 0)?;
    // The quote (IPv4 header + 8 bytes) must be there before we move anything.
    let _: [u8; QUOTE_LEN] = read_at(data, data_end, L3_OFF)?;
    // SAFETY: the helper takes the program's own context; it moves the
    // packet's start within the buffer's headroom or fails.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(GROW as i32)) } != 0 {
        return Err(Reason::PassFibFailed);
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: as above; shrinking to a length the packet has.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, ANSWER_LEN as i32 - len) } != 0 {
        return Err(Reason::PassFibFailed);
    }
    // One bounds check for the whole answer; every access below is at a
    // constant offset inside it (what the verifier follows best).
    let frame: *mut [u8; ANSWER_LEN] = ptr_at(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: `ptr_at` checked that ANSWER_LEN bytes lie inside the packet,
    // which XDP may write; a byte array has alignment 1.
    let f = unsafe { &mut *frame };
    // Ethernet: back to where the packet came from.
    f[0..6].copy_from_slice(&macs[6..12]);
    f[6..12].copy_from_slice(&macs[0..6]);
    f[12..14].copy_from_slice(&(EtherType::Ipv4 as u16).to_ne_bytes());

    // IPv4: from the address the packet was sent to, back to its sender,
    // precedence "internetwork control" as the kernel's own ICMP.
    let ip = L3_OFF;
    f[ip] = 0x45;
    f[ip + 1] = 0xc0;
    f[ip + 2..ip + 4].copy_from_slice(&(ANSWER_IP_LEN as u16).to_be_bytes());
    f[ip + 4..ip + 8].copy_from_slice(&[0, 0, 0, 0]);
    f[ip + ipv4::TTL] = 64;
    f[ip + ipv4::TTL + 1] = IPPROTO_ICMP;
    f[ip + ipv4::CHECK..ip + ipv4::CHECK + 2].copy_from_slice(&[0, 0]);
    f[ip + ipv4::SADDR..ip + ipv4::SADDR + 4].copy_from_slice(&h.daddr.to_ne_bytes());
    f[ip + ipv4::DADDR..ip + ipv4::DADDR + 4].copy_from_slice(&h.saddr.to_ne_bytes());
    let check = !csum::fold(sum_words(f, ip, 20));
    f[ip + ipv4::CHECK..ip + ipv4::CHECK + 2].copy_from_slice(&check.to_ne_bytes());

    // ICMP: type, code, checksum, unused, next-hop MTU; the quote follows.
    let icmp = ip + 20;
    f[icmp] = ICMP_DEST_UNREACH;
    f[icmp + 1] = ICMP_FRAG_NEEDED_CODE;
    f[icmp + 2..icmp + 6].copy_from_slice(&[0, 0, 0, 0]);
    f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    let check = !csum::fold(sum_words(f, icmp, ICMP_HDR_LEN + QUOTE_LEN));
    f[icmp + 2..icmp + 4].copy_from_slice(&check.to_ne_bytes());
    Ok(())
}

/// The one's-complement sum (unfolded) of `len` bytes at `off`, read as
/// 16-bit words in memory order like `csum`'s functions.
#[inline(always)]
fn sum_words(f: &[u8; ANSWER_LEN], off: usize, len: usize) -> u32 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < len {
        if off + i + 1 >= ANSWER_LEN {
            break;
        }
        sum += u16::from_ne_bytes([f[off + i], f[off + i + 1]]) as u32;
        i += 2;
    }
    sum
}
