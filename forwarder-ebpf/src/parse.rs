//! Header parsing over a packet's linear bytes, shared by XDP and tc.
use core::mem::size_of;

use forwarder_common::{Reason, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const L3_OFF: usize = ETH_LEN;
/// Bytes a tc program needs linear to parse the largest header stack we read.
pub const MAX_HEADERS_LEN: usize = ETH_LEN + 60 + size_of::<TcpHdr>();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the pipeline needs from a packet. Addresses and ports are kept as they
/// are on the wire (network byte order read natively).
#[derive(Clone, Copy)]
pub struct Headers {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ttl: u8,
    pub tcp_flags: u8,
    /// Offset of the L4 header from the start of the frame (IPv4 options included).
    pub l4_off: usize,
    /// IPv4 total length, host order (for the fib MTU check and byte counters).
    pub ip_len: u16,
}

/// A bounds-checked pointer to a `T` at `off`; the check the verifier wants.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Result<*mut T, Reason> {
    if data + off + size_of::<T>() > data_end {
        return Err(Reason::PassMalformed);
    }
    Ok((data + off) as *mut T)
}

#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Headers, Reason> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0)?;
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(Reason::PassNotIpv4);
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, L3_OFF)?;
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl = (ip.vihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(Reason::PassMalformed);
    }
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if (ip_len as usize) < ihl * 4 {
        return Err(Reason::PassMalformed);
    }
    // More-fragments set or a non-zero offset: no usable L4 header here.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let proto = ip.proto;
    let l4_off = L3_OFF + ihl * 4;
    let (sport, dport, tcp_flags) = if proto == IPPROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(data, data_end, l4_off)?;
        let raw: *const [u8; 20] = tcp.cast();
        let raw = unsafe { &*raw };
        (
            u16::from_ne_bytes([raw[0], raw[1]]),
            u16::from_ne_bytes([raw[2], raw[3]]),
            raw[13],
        )
    } else if proto == IPPROTO_UDP {
        let udp: *const UdpHdr = ptr_at(data, data_end, l4_off)?;
        let udp = unsafe { &*udp };
        (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), 0)
    } else {
        return Err(Reason::PassNotTcpUdp);
    };
    Ok(Headers {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        proto,
        ttl: ip.ttl,
        tcp_flags,
        l4_off,
        ip_len,
    })
}

/// Offset of the L4 checksum field.
#[inline(always)]
pub const fn l4_check_off(h: &Headers) -> usize {
    if h.proto == IPPROTO_TCP {
        h.l4_off + 16
    } else {
        h.l4_off + 6
    }
}
