//! Header parsing over a packet's linear bytes, shared by XDP and tc.
//!
//! `parse` reads what every packet needs for its lookups and refuses what
//! the kernel itself would refuse (lengths, TCP data offset and flags, UDP
//! length, martian sources), so nothing the kernel would drop is ever
//! translated or tracked. The IPv4 header checksum is checked only for
//! packets that matched a flow or a frontend (`ipv4_header_ok`): a miss does
//! not pay for it.
use core::mem::size_of;

use forwarder_common::Reason;
use forwarder_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const L3_OFF: usize = ETH_LEN;
const IPV4_MIN_LEN: usize = size_of::<Ipv4Hdr>();
const ICMP_LEN: usize = size_of::<Icmpv4Hdr>();
/// Bytes a tc program needs linear to parse the largest header stack we
/// read: IPv4 with options and TCP, or an ICMP error quoting IPv4 and 8
/// bytes of its L4 header.
pub const MAX_HEADERS_LEN: usize = ETH_LEN + 60 + size_of::<TcpHdr>();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// ICMP errors that quote a packet and are translated with its flow.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_FRAG_NEEDED_CODE: u8 = 4;

/// Byte offsets of fields inside an IPv4 header (from `Ipv4Hdr`'s layout).
pub mod ipv4 {
    pub const TTL: usize = 8;
    pub const CHECK: usize = 10;
    pub const SADDR: usize = 12;
    pub const DADDR: usize = 16;
}

/// Byte offsets inside the TCP and UDP headers.
pub mod l4 {
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const UDP_CHECK: usize = 6;
    pub const TCP_CHECK: usize = 16;
}

/// What the pipeline needs from a packet. Addresses and ports are kept as they
/// are on the wire (network byte order read natively).
#[derive(Clone, Copy)]
pub struct Headers {
    pub saddr: u32,
    pub daddr: u32,
    /// TCP/UDP ports; 0 for ICMP.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame (IPv4 options included).
    pub l4_off: usize,
    /// IPv4 header length in bytes.
    pub ihl_len: usize,
    /// IPv4 total length, host order (for the fib MTU check and byte counters).
    pub ip_len: u16,
    /// For an ICMP error: the quoted packet (as it was sent) and its type.
    pub quoted: Quoted,
}

/// The packet an ICMP error quotes: an IPv4 header without options and the
/// first 8 bytes of its TCP or UDP header. `proto` is 0 when there is none.
#[derive(Clone, Copy, Default)]
pub struct Quoted {
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Offsets inside an ICMP error whose quote we translate.
impl Headers {
    pub const fn icmp_check_off(&self) -> usize {
        self.l4_off + 2
    }
    pub const fn inner_l3_off(&self) -> usize {
        self.l4_off + ICMP_LEN
    }
    pub const fn inner_l4_off(&self) -> usize {
        self.l4_off + ICMP_LEN + IPV4_MIN_LEN
    }
}

/// A bounds-checked pointer to a `T` at `off`; the check the verifier wants.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Result<*mut T, Reason> {
    // Offsets come from headers (at most a few hundred bytes); the mask
    // gives the verifier a bound for offsets it reads back from a map.
    let off = off & 0x3fff;
    if data + off + size_of::<T>() > data_end {
        return Err(Reason::PassMalformed);
    }
    Ok((data + off) as *mut T)
}

/// Reads a `T` at `off` (bounds-checked).
#[inline(always)]
pub fn read_at<T: Copy>(data: usize, data_end: usize, off: usize) -> Result<T, Reason> {
    let p: *const T = ptr_at(data, data_end, off)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` lie inside
    // the packet; `read_unaligned` because packet fields have no alignment.
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

/// TCP flag combinations nf_conntrack accepts (`tcp_valid_flags`); any other
/// makes the packet INVALID there, so it is not ours to forward either.
#[inline(always)]
const fn tcp_flags_valid(flags: u8) -> bool {
    let f = flags & !(TCP_PSH | 0xc0); // PSH, ECE and CWR do not matter.
    matches!(
        f,
        TCP_SYN
            | 0x22 // SYN|URG
            | 0x12 // SYN|ACK
            | TCP_RST
            | 0x14 // RST|ACK
            | 0x11 // FIN|ACK
            | 0x31 // FIN|ACK|URG
            | TCP_ACK
            | 0x30 // ACK|URG
    )
}

/// Sources the kernel treats as martians on input: 0/8, loopback,
/// multicast, class E and broadcast.
#[inline(always)]
const fn martian_source(saddr_be: u32) -> bool {
    let first = saddr_be.to_ne_bytes()[0];
    first == 0 || first == 127 || first >= 224
}

/// `pkt_len` is the whole packet's length (the skb's for tc, whose linear
/// part may be shorter); lengths in the headers are checked against it.
#[inline(always)]
pub fn parse(data: usize, data_end: usize, pkt_len: usize) -> Result<Headers, Reason> {
    let eth: EthHdr = read_at(data, data_end, 0)?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    let ip: Ipv4Hdr = read_at(data, data_end, L3_OFF)?;
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl_len = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl_len < IPV4_MIN_LEN {
        return Err(Reason::PassMalformed);
    }
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if (ip_len as usize) < ihl_len || L3_OFF + ip_len as usize > pkt_len {
        return Err(Reason::PassMalformed);
    }
    // More-fragments set or a non-zero offset: no usable L4 header here.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let saddr = u32::from_ne_bytes(ip.src_addr);
    if martian_source(saddr) {
        return Err(Reason::PassMalformed);
    }
    let proto = ip.proto;
    let l4_off = L3_OFF + ihl_len;
    let l4_len = ip_len as usize - ihl_len;
    let mut quoted = Quoted::default();
    let (sport, dport, tcp_flags) = if proto == IPPROTO_TCP {
        let tcp: TcpHdr = read_at(data, data_end, l4_off)?;
        let raw: [u8; 20] = read_at(data, data_end, l4_off)?;
        let doff = (raw[12] >> 4) as usize * 4;
        if doff < size_of::<TcpHdr>() || doff > l4_len || !tcp_flags_valid(raw[13]) {
            return Err(Reason::PassMalformed);
        }
        (
            u16::from_ne_bytes(tcp.source),
            u16::from_ne_bytes(tcp.dest),
            raw[13],
        )
    } else if proto == IPPROTO_UDP {
        let udp: UdpHdr = read_at(data, data_end, l4_off)?;
        let ulen = u16::from_be_bytes(udp.len) as usize;
        // nf_conntrack's udp_error: shorter than its header, or longer than the packet.
        if ulen < size_of::<UdpHdr>() || ulen > l4_len {
            return Err(Reason::PassMalformed);
        }
        (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), 0)
    } else if proto == IPPROTO_ICMP {
        quoted = parse_quoted(data, data_end, l4_off, l4_len)?;
        (0, 0, 0)
    } else {
        return Err(Reason::PassNotTcpUdp);
    };
    Ok(Headers {
        saddr,
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        proto,
        ttl: ip.ttl,
        tcp_flags,
        l4_off,
        ihl_len,
        ip_len,
        quoted,
    })
}

/// An ICMP error we may translate: destination unreachable or time
/// exceeded, quoting an IPv4 header without options and TCP or UDP ports.
/// Anything else (echo, other types, odd quotes) is the kernel's.
#[inline(always)]
fn parse_quoted(
    data: usize,
    data_end: usize,
    l4_off: usize,
    l4_len: usize,
) -> Result<Quoted, Reason> {
    let icmp: Icmpv4Hdr = read_at(data, data_end, l4_off)?;
    if icmp.type_ != ICMP_DEST_UNREACH && icmp.type_ != ICMP_TIME_EXCEEDED {
        return Err(Reason::PassIcmp);
    }
    if l4_len < ICMP_LEN + IPV4_MIN_LEN + 8 {
        return Err(Reason::PassIcmp);
    }
    let inner: Ipv4Hdr = read_at(data, data_end, l4_off + ICMP_LEN)?;
    if inner.vihl != 0x45 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return Err(Reason::PassIcmp);
    }
    let ports: [u8; 4] = read_at(data, data_end, l4_off + ICMP_LEN + IPV4_MIN_LEN)?;
    Ok(Quoted {
        proto: inner.proto,
        saddr: u32::from_ne_bytes(inner.src_addr),
        daddr: u32::from_ne_bytes(inner.dst_addr),
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
    })
}

/// `skb->pkt_type` values (linux/if_packet.h).
pub const PACKET_HOST: u32 = 0;
pub const PACKET_BROADCAST: u32 = 1;
pub const PACKET_MULTICAST: u32 = 2;

/// A frame's destination MAC is the node's own (`host_mac`): the kernel
/// drops unicast to other hosts (PACKET_OTHERHOST), and broadcast or
/// multicast frames are no client's connection. Compared as two integers
/// (an array comparison would call memcmp, which eBPF does not have).
#[inline(always)]
pub fn dest_mac_is_host(data: usize, data_end: usize, host_mac: &[u8; 6]) -> Result<(), Reason> {
    let dst: [u8; 6] = read_at(data, data_end, 0)?;
    if dst[0] & 1 != 0 {
        return Err(Reason::PassNotUnicast);
    }
    if !same_mac(&dst, host_mac) {
        return Err(Reason::PassOtherHost);
    }
    Ok(())
}

#[inline(always)]
pub fn same_mac(a: &[u8; 6], b: &[u8; 6]) -> bool {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) == u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        && u16::from_ne_bytes([a[4], a[5]]) == u16::from_ne_bytes([b[4], b[5]])
}

/// The IPv4 header of a packet that is ours verifies (the kernel drops it
/// otherwise), and its options, if any, are padding only (NOP, EOL): the
/// kernel acts on the others when it forwards (record route, timestamps,
/// source routes, router alert) and drops malformed ones, so a packet
/// carrying them is the kernel's.
#[inline(always)]
pub fn ipv4_header_ok(data: usize, data_end: usize, h: &Headers) -> Result<(), Reason> {
    // The fixed header in one bounds check; options, rare, word by word.
    let fixed = read_at::<[u32; 5]>(data, data_end, L3_OFF)?;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 5 {
        sum += (fixed[i] & 0xffff) + (fixed[i] >> 16);
        i += 1;
    }
    if h.ihl_len > IPV4_MIN_LEN {
        let mut i = 0;
        // Bounded: at most 10 words of options.
        while i < 10 {
            if IPV4_MIN_LEN + i * 4 >= h.ihl_len {
                break;
            }
            let word = read_at::<u32>(data, data_end, L3_OFF + IPV4_MIN_LEN + i * 4)?;
            // Every byte 0 (EOL) or 1 (NOP).
            if word & 0xfefe_fefe != 0 {
                return Err(Reason::PassIpOptions);
            }
            sum += (word & 0xffff) + (word >> 16);
            i += 1;
        }
    }
    if forwarder_common::csum::fold(sum) != 0xffff {
        return Err(Reason::PassMalformed);
    }
    Ok(())
}

/// Offset of the L4 checksum field.
#[inline(always)]
pub const fn l4_check_off(h: &Headers) -> usize {
    if h.proto == IPPROTO_TCP {
        h.l4_off + l4::TCP_CHECK
    } else {
        h.l4_off + l4::UDP_CHECK
    }
}
