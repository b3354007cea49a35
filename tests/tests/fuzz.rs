//! Fuzzing the datapath: seeded frames, generated from templates that hit
//! the interesting paths (new flows, flows in both directions, replies from
//! backend addresses, ICMP errors quoting translated flows) and mutated by
//! family, run through BPF_PROG_TEST_RUN on every attachment the daemon
//! makes: XDP on the external device, tc on the external device and tc on
//! the pod-facing device, each tc run once on a plain skb and once on a
//! CHECKSUM_COMPLETE one (the kernel then checks `skb->csum`).
//!
//! What must hold for every frame:
//! - no XDP_ABORTED, no unexpected tc code, no test-run error;
//! - a frame passed to the kernel is untouched; a drop is only for the
//!   externalTrafficPolicy-Local frontend without local backends;
//! - a forwarded frame was one the kernel would accept, as judged by a
//!   parser written here (not the eBPF code's), and comes out with a valid
//!   IPv4 checksum, its L4 checksum as valid as it came in (a UDP zero stays
//!   zero), the same length, TTL one less, and nothing changed but
//!   addresses, ports, TTL, MACs and checksums;
//! - a frame the kernel would refuse creates no flow;
//! - the verdict counters account for every run exactly.
//!
//! `FUZZ_FRAMES` (default 250,000: a few seconds here) sets how many frames are generated,
//! `FUZZ_SEED` the seed (default: a fixed one, so the suite is reproducible; printed either way).
//! `cargo xtask fuzz --frames N --seed S` sets both.
use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use anyhow::{bail, ensure, Context as _, Result};
use etherparse::{icmpv4, Icmpv4Type, Ipv4Header, Ipv4Options, TcpHeader};
use forwarder_common::{CtKey, Reason};
use integration_tests::{
    packet_rig::{
        self, icmp_error, src_port, tcp_flags_frame, udp_frame, Rig, RunOutcome, BACKEND_TCP_PORT,
        BACKEND_UDP_PORT, CALI_MAC, CLIENT, CLIENT_MAC, ETH0_MAC, LOCAL_POD, NODE, NODE2,
        NODE2_MAC, NP_LOCAL_POLICY_EMPTY, NP_LOCAL_TCP, NP_LOCAL_UDP, NP_REMOTE_TCP, NP_REMOTE_UDP,
        POD_MAC, REMOTE_POD, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_ABORTED, XDP_DROP,
        XDP_PASS, XDP_REDIRECT, XDP_TX,
    },
    skip_unless_netns_capable,
};

/// Frames `cargo xtask test` runs: a few seconds on a 2-vCPU machine
/// (10^6 take about 15 s there).
const DEFAULT_FRAMES: u64 = 250_000;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const L3: usize = 14;

// ---- a small PRNG (SplitMix64) -------------------------------------------

struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn port(&mut self) -> u16 {
        1024 + (self.next() % (65536 - 1024)) as u16
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// ---- checksums and an independent parser ---------------------------------

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The one's-complement checksum over `bytes` (and a pseudo-header sum).
fn checksum(pseudo: u32, bytes: &[u8]) -> u16 {
    !fold(pseudo + sum16(bytes))
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn addr(f: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[off], f[off + 1], f[off + 2], f[off + 3])
}

/// An IPv4 frame as the kernel reads it.
#[derive(Clone, Copy, Debug)]
struct Ip {
    ihl: usize,
    tot_len: usize,
    proto: u8,
    ttl: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: usize,
}

impl Ip {
    fn l4_len(&self) -> usize {
        self.tot_len - self.ihl
    }
    fn pseudo(&self, f: &[u8], len: usize) -> u32 {
        sum16(&f[L3 + 12..L3 + 20]) + u32::from(self.proto) + len as u32
    }
}

/// Reads the IPv4 header of an Ethernet frame if it is complete.
fn ip_of(f: &[u8]) -> Option<Ip> {
    if f.len() < L3 + 20 || be16(f, 12) != 0x0800 {
        return None;
    }
    let ihl = usize::from(f[L3] & 0x0f) * 4;
    Some(Ip {
        ihl,
        tot_len: usize::from(be16(f, L3 + 2)),
        proto: f[L3 + 9],
        ttl: f[L3 + 8],
        src: addr(f, L3 + 12),
        dst: addr(f, L3 + 16),
        l4: L3 + ihl,
    })
}

/// Why the kernel would not route this frame (None: it would), for a frame
/// arriving on a device with MAC `device_mac`. Written from the kernel's
/// rules (eth_type_trans, ip_rcv_core, ip_options_compile, the martian
/// checks of ip_route_input, nf_conntrack's tcp_error/udp_error), not from
/// the eBPF code.
fn refused(f: &[u8], device_mac: [u8; 6]) -> Option<&'static str> {
    if f.len() < L3 {
        return Some("no Ethernet header");
    }
    if f[0] & 1 != 0 {
        return Some("broadcast or multicast MAC");
    }
    if f[0..6] != device_mac {
        return Some("another host's MAC");
    }
    if be16(f, 12) != 0x0800 {
        return Some("not IPv4 (VLAN tags included)");
    }
    let Some(ip) = ip_of(f) else {
        return Some("IPv4 header cut short");
    };
    if f[L3] >> 4 != 4 || ip.ihl < 20 {
        return Some("IPv4 version or IHL");
    }
    if f.len() < L3 + ip.ihl {
        return Some("IPv4 options cut short");
    }
    if checksum(0, &f[L3..L3 + ip.ihl]) != 0 {
        return Some("IPv4 header checksum");
    }
    if ip.tot_len < ip.ihl || L3 + ip.tot_len > f.len() {
        return Some("IPv4 total length");
    }
    // Options other than padding make the kernel act (record route,
    // timestamps, source routes, router alert): not for us to forward.
    if f[L3 + 20..L3 + ip.ihl].iter().any(|&b| b > 1) {
        return Some("IPv4 options");
    }
    if be16(f, L3 + 6) & 0x3fff != 0 {
        return Some("fragment");
    }
    let s = ip.src.octets()[0];
    if s == 0 || s == 127 || s >= 224 {
        return Some("martian source");
    }
    if ip.ttl <= 1 {
        return Some("TTL expires");
    }
    let l4 = &f[ip.l4..L3 + ip.tot_len];
    match ip.proto {
        TCP => {
            if l4.len() < 20 {
                return Some("TCP header cut short");
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Some("TCP data offset");
            }
            // nf_conntrack's tcp_valid_flags (PSH, ECE, CWR aside).
            let flags = l4[13] & !(0x08 | 0xc0);
            if ![0x02, 0x22, 0x12, 0x04, 0x14, 0x11, 0x31, 0x10, 0x30].contains(&flags) {
                return Some("TCP flags");
            }
        }
        UDP => {
            if l4.len() < 8 {
                return Some("UDP header cut short");
            }
            let len = usize::from(be16(l4, 4));
            if len < 8 || len > l4.len() {
                return Some("UDP length");
            }
        }
        ICMP if l4.len() < 8 => return Some("ICMP header cut short"),
        _ => {}
    }
    None
}

/// Whether the L4 checksum of an accepted frame verifies; None for a UDP
/// datagram without one.
fn l4_checksum_ok(f: &[u8], ip: &Ip) -> Option<bool> {
    let l4 = &f[ip.l4..L3 + ip.tot_len];
    match ip.proto {
        TCP => Some(checksum(ip.pseudo(f, l4.len()), l4) == 0),
        UDP => {
            if be16(l4, 6) == 0 {
                return None;
            }
            let len = usize::from(be16(l4, 4));
            Some(checksum(ip.pseudo(f, len), &l4[..len]) == 0)
        }
        ICMP => Some(checksum(0, l4) == 0),
        _ => None,
    }
}

/// The quoted IPv4 header's checksum, for an ICMP error quoting one.
fn quoted_ip_checksum_ok(f: &[u8], ip: &Ip) -> Option<bool> {
    let q = ip.l4 + 8;
    (ip.proto == ICMP && L3 + ip.tot_len >= q + 20 && f[q] == 0x45)
        .then(|| checksum(0, &f[q..q + 20]) == 0)
}

/// Recomputes the IPv4 header checksum (when the header is there).
fn fix_ip_checksum(f: &mut [u8]) {
    let Some(ip) = ip_of(f) else { return };
    if ip.ihl < 20 || f.len() < L3 + ip.ihl {
        return;
    }
    f[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(0, &f[L3..L3 + ip.ihl]);
    f[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Recomputes the TCP or UDP checksum (a UDP zero stays zero), when the
/// lengths let one be computed, then the IPv4 one.
fn fix_checksums(f: &mut [u8]) {
    fix_ip_checksum(f);
    let Some(ip) = ip_of(f) else { return };
    if ip.ihl < 20 || ip.tot_len < ip.ihl || L3 + ip.tot_len > f.len() {
        return;
    }
    let end = L3 + ip.tot_len;
    match ip.proto {
        TCP if ip.l4_len() >= 20 => {
            f[ip.l4 + 16..ip.l4 + 18].copy_from_slice(&[0, 0]);
            let c = checksum(ip.pseudo(f, ip.l4_len()), &f[ip.l4..end]);
            f[ip.l4 + 16..ip.l4 + 18].copy_from_slice(&c.to_be_bytes());
        }
        UDP if ip.l4_len() >= 8 && be16(f, ip.l4 + 6) != 0 => {
            let len = usize::from(be16(f, ip.l4 + 4));
            if len < 8 || len > ip.l4_len() {
                return;
            }
            f[ip.l4 + 6..ip.l4 + 8].copy_from_slice(&[0, 0]);
            let c = checksum(ip.pseudo(f, len), &f[ip.l4..ip.l4 + len]);
            let c = if c == 0 { 0xffff } else { c };
            f[ip.l4 + 6..ip.l4 + 8].copy_from_slice(&c.to_be_bytes());
        }
        ICMP if ip.l4_len() >= 8 => {
            f[ip.l4 + 2..ip.l4 + 4].copy_from_slice(&[0, 0]);
            let c = checksum(0, &f[ip.l4..end]);
            f[ip.l4 + 2..ip.l4 + 4].copy_from_slice(&c.to_be_bytes());
        }
        _ => {}
    }
}

// ---- the programs' attachments -----------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hook {
    XdpEth0,
    TcEth0,
    TcEth0Complete,
    TcCali,
    TcCaliComplete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Eth0,
    Cali,
}

impl Device {
    fn mac(self) -> [u8; 6] {
        match self {
            Device::Eth0 => ETH0_MAC,
            Device::Cali => CALI_MAC,
        }
    }
    fn hooks(self) -> &'static [Hook] {
        match self {
            Device::Eth0 => &[Hook::XdpEth0, Hook::TcEth0, Hook::TcEth0Complete],
            Device::Cali => &[Hook::TcCali, Hook::TcCaliComplete],
        }
    }
}

impl Hook {
    fn is_xdp(self) -> bool {
        self == Hook::XdpEth0
    }
    fn run(self, rig: &Rig, frame: &[u8]) -> Result<RunOutcome> {
        match self {
            Hook::XdpEth0 => rig.run_xdp(rig.eth0, frame),
            Hook::TcEth0 => rig.run_tc(rig.eth0, frame, false),
            Hook::TcEth0Complete => rig.run_tc(rig.eth0, frame, true),
            Hook::TcCali => rig.run_tc(rig.cali, frame, false),
            Hook::TcCaliComplete => rig.run_tc(rig.cali, frame, true),
        }
    }
    /// Frames the kernel refuses to test-run at all (not the program's
    /// business): shorter than Ethernet, and for skbs an incomplete IPv4
    /// or IPv6 header.
    fn runnable(self, f: &[u8]) -> bool {
        if f.len() < L3 {
            return false;
        }
        if self.is_xdp() {
            return true;
        }
        match be16(f, 12) {
            0x0800 => f.len() >= L3 + 20,
            0x86dd => f.len() >= L3 + 40,
            _ => true,
        }
    }
}

// ---- templates: valid frames on the interesting paths ------------------

/// Flows opened at the start of each family.
#[derive(Default)]
struct Flows {
    /// (client port, source-NAT port)
    remote_tcp: Vec<(u16, u16)>,
    remote_udp: Vec<(u16, u16)>,
    local_tcp: Vec<u16>,
    local_udp: Vec<u16>,
}

fn payload(rng: &mut Prng) -> Vec<u8> {
    let len = if rng.percent(10) {
        rng.below(1400)
    } else {
        rng.below(64)
    };
    (0..len).map(|_| rng.byte()).collect()
}

fn tcp_flags(rng: &mut Prng) -> &'static [&'static str] {
    const SETS: [&[&str]; 8] = [
        &["ack"],
        &["ack"],
        &["ack", "psh"],
        &["ack"],
        &["syn", "ack"],
        &["fin", "ack"],
        &["rst"],
        &["syn"],
    ];
    // Closing flags rarely, so the flows live through most of a family.
    let i = if rng.percent(90) {
        rng.below(4)
    } else {
        rng.below(SETS.len())
    };
    SETS[i]
}

/// A UDP frame, without a checksum now and then.
fn udp(rng: &mut Prng, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut f = udp_frame(src, dst, 64, &payload(rng));
    if rng.percent(30) {
        f[L3 + 20 + 6..L3 + 20 + 8].copy_from_slice(&[0, 0]);
    }
    f
}

/// A TCP SYN with IPv4 options of padding only (NOP, EOL).
fn with_padding_options(rng: &mut Prng, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let words = 1 + rng.below(10);
    let opts: Vec<u8> = (0..words * 4).map(|_| rng.pick(&[0u8, 1])).collect();
    let mut ip = Ipv4Header::new(
        0,
        64,
        etherparse::IpNumber::TCP,
        src.0.octets(),
        dst.0.octets(),
    )
    .expect("a valid header");
    ip.options = Ipv4Options::try_from(&opts[..]).expect("at most 40 bytes");
    let mut tcp = TcpHeader::new(src.1, dst.1, 1000, 64240);
    tcp.syn = true;
    ip.set_payload_len(tcp.header_len()).expect("small");
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).expect("small");
    let (smac, dmac) = packet_rig::macs_for(src.0);
    let mut f = Vec::new();
    etherparse::Ethernet2Header {
        source: smac,
        destination: dmac,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut f)
    .expect("a Vec");
    ip.write(&mut f).expect("a Vec");
    tcp.write(&mut f).expect("a Vec");
    f
}

/// An ICMP error quoting `quoted` (an IPv4 packet), as a router or the
/// endpoint sends it: the first 28 bytes or the whole packet.
fn icmp_quoting(rng: &mut Prng, from: Ipv4Addr, to: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let ty =
        match rng.below(4) {
            0 => Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ),
            1 => Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
            2 => Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host),
            _ => Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit),
        };
    let cut = if rng.percent(50) {
        28.min(quoted.len())
    } else {
        quoted.len()
    };
    icmp_error(from, to, ty, &quoted[..cut])
}

/// The IPv4 packet (no Ethernet) of a TCP or UDP frame built here.
fn packet_of(f: &[u8]) -> Vec<u8> {
    f[L3..].to_vec()
}

/// A valid frame on one of the interesting paths, and the device it comes in on.
fn template(rng: &mut Prng, flows: &Flows) -> (Vec<u8>, Device) {
    let client = |port| (CLIENT, port);
    let remote_tcp = rng.pick(&flows.remote_tcp);
    let remote_udp = rng.pick(&flows.remote_udp);
    let local_tcp = rng.pick(&flows.local_tcp);
    let local_udp = rng.pick(&flows.local_udp);
    match rng.below(17) {
        // New flows, to each frontend.
        0 => (
            tcp_flags_frame(client(rng.port()), (NODE, NP_REMOTE_TCP), &["syn"], &[]),
            Device::Eth0,
        ),
        1 => (
            tcp_flags_frame(client(rng.port()), (NODE, NP_LOCAL_TCP), &["syn"], &[]),
            Device::Eth0,
        ),
        2 => {
            let dst = (NODE, rng.pick(&[NP_REMOTE_UDP, NP_LOCAL_UDP]));
            let src = client(rng.port());
            (udp(rng, src, dst), Device::Eth0)
        }
        // Clients of open flows.
        3 => (
            tcp_flags_frame(
                client(remote_tcp.0),
                (NODE, NP_REMOTE_TCP),
                tcp_flags(rng),
                &payload(rng),
            ),
            Device::Eth0,
        ),
        4 => (
            tcp_flags_frame(
                client(local_tcp),
                (NODE, NP_LOCAL_TCP),
                tcp_flags(rng),
                &payload(rng),
            ),
            Device::Eth0,
        ),
        5 => (
            udp(rng, client(remote_udp.0), (NODE, NP_REMOTE_UDP)),
            Device::Eth0,
        ),
        6 => (
            udp(rng, client(local_udp), (NODE, NP_LOCAL_UDP)),
            Device::Eth0,
        ),
        // Replies from backend addresses: the remote pod's to our source-NAT
        // port on eth0, the local pod's to the client on cali1.
        7 => (
            tcp_flags_frame(
                (REMOTE_POD, BACKEND_TCP_PORT),
                (NODE, remote_tcp.1),
                tcp_flags(rng),
                &payload(rng),
            ),
            Device::Eth0,
        ),
        8 => (
            udp(rng, (REMOTE_POD, BACKEND_UDP_PORT), (NODE, remote_udp.1)),
            Device::Eth0,
        ),
        9 => (
            tcp_flags_frame(
                (LOCAL_POD, BACKEND_TCP_PORT),
                client(local_tcp),
                tcp_flags(rng),
                &payload(rng),
            ),
            Device::Cali,
        ),
        10 => (
            udp(rng, (LOCAL_POD, BACKEND_UDP_PORT), client(local_udp)),
            Device::Cali,
        ),
        // ICMP errors quoting translated flows: about what we sent the
        // remote backend (from it, or from a router on the way), about
        // what we sent the client, about what the local pod received.
        11 => {
            let sent = tcp_flags_frame(
                (NODE, remote_tcp.1),
                (REMOTE_POD, BACKEND_TCP_PORT),
                &["ack"],
                &payload(rng),
            );
            let from = rng.pick(&[REMOTE_POD, NODE2]);
            (
                icmp_quoting(rng, from, NODE, &packet_of(&sent)),
                Device::Eth0,
            )
        }
        12 => {
            let sent = udp(rng, (NODE, NP_REMOTE_UDP), client(remote_udp.0));
            (
                icmp_quoting(rng, CLIENT, NODE, &packet_of(&sent)),
                Device::Eth0,
            )
        }
        13 => {
            let received = tcp_flags_frame(
                client(local_tcp),
                (LOCAL_POD, BACKEND_TCP_PORT),
                &["ack"],
                &payload(rng),
            );
            (
                icmp_quoting(rng, LOCAL_POD, CLIENT, &packet_of(&received)),
                Device::Cali,
            )
        }
        // The Local-policy frontend without local backends (dropped), a
        // port that is no frontend, IPv4 options of padding.
        14 => (
            tcp_flags_frame(
                client(rng.port()),
                (NODE, NP_LOCAL_POLICY_EMPTY),
                &["syn"],
                &[],
            ),
            Device::Eth0,
        ),
        15 => (
            tcp_flags_frame(client(rng.port()), (NODE, rng.port()), &["syn"], &[]),
            Device::Eth0,
        ),
        _ => {
            let src = client(rng.port());
            (
                with_padding_options(rng, src, (NODE, NP_REMOTE_TCP)),
                Device::Eth0,
            )
        }
    }
}

// ---- families -----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    Valid,
    BitFlips,
    HeaderBytes,
    Truncation,
    Ihl,
    TotalLength,
    TcpDataOffset,
    UdpLength,
    Fragments,
    Ttl,
    Vlan,
    IcmpQuotes,
    BackendReplies,
    Martians,
    Macs,
    RandomBytes,
}

impl Family {
    const ALL: [Family; 16] = [
        Family::Valid,
        Family::BitFlips,
        Family::HeaderBytes,
        Family::Truncation,
        Family::Ihl,
        Family::TotalLength,
        Family::TcpDataOffset,
        Family::UdpLength,
        Family::Fragments,
        Family::Ttl,
        Family::Vlan,
        Family::IcmpQuotes,
        Family::BackendReplies,
        Family::Martians,
        Family::Macs,
        Family::RandomBytes,
    ];

    /// Every frame of the family is one the kernel refuses: afterwards the
    /// conntrack map must hold exactly what it held before.
    fn all_refused(self) -> bool {
        matches!(
            self,
            Family::Fragments | Family::Vlan | Family::Martians | Family::Macs
        )
    }
}

/// A template of `proto` (TCP or UDP) on eth0 or cali1.
fn template_of(rng: &mut Prng, flows: &Flows, proto: u8) -> (Vec<u8>, Device) {
    loop {
        let (f, dev) = template(rng, flows);
        if f[L3 + 9] == proto && f[L3] == 0x45 {
            return (f, dev);
        }
    }
}

/// One frame of `family` and the device it arrives on.
fn generate(rng: &mut Prng, flows: &Flows, family: Family) -> (Vec<u8>, Device) {
    let (mut f, dev) = template(rng, flows);
    match family {
        Family::Valid | Family::Truncation => {}
        Family::BitFlips => {
            for _ in 0..1 + rng.below(3) {
                let bit = rng.below(f.len() * 8);
                f[bit / 8] ^= 1 << (bit % 8);
            }
            if rng.percent(50) {
                fix_checksums(&mut f);
            }
        }
        Family::HeaderBytes => {
            let ip = ip_of(&f).expect("templates are IPv4");
            let end = (ip.l4 + 20).min(f.len());
            for _ in 0..1 + rng.below(2) {
                let i = rng.below(end);
                f[i] = rng.byte();
            }
            if rng.percent(70) {
                fix_checksums(&mut f);
            }
        }
        Family::Ihl => {
            f[L3] = 0x40 | rng.below(16) as u8;
            if rng.percent(70) {
                fix_ip_checksum(&mut f);
            }
        }
        Family::TotalLength => {
            let tot = be16(&f, L3 + 2) as i32;
            let new = if rng.percent(50) {
                tot + rng.below(17) as i32 - 8
            } else {
                rng.below(65536) as i32
            };
            f[L3 + 2..L3 + 4].copy_from_slice(&(new.clamp(0, 65535) as u16).to_be_bytes());
            if rng.percent(80) {
                fix_ip_checksum(&mut f);
            }
        }
        Family::TcpDataOffset => {
            let (t, d) = template_of(rng, flows, TCP);
            f = t;
            let l4 = ip_of(&f).expect("IPv4").l4;
            f[l4 + 12] = (rng.below(16) as u8) << 4 | (f[l4 + 12] & 0x0f);
            if rng.percent(80) {
                fix_checksums(&mut f);
            }
            return (f, d);
        }
        Family::UdpLength => {
            let (t, d) = template_of(rng, flows, UDP);
            f = t;
            let l4 = ip_of(&f).expect("IPv4").l4;
            let len = be16(&f, l4 + 4) as i32;
            let new = if rng.percent(60) {
                len + rng.below(17) as i32 - 8
            } else {
                rng.below(65536) as i32
            };
            f[l4 + 4..l4 + 6].copy_from_slice(&(new.clamp(0, 65535) as u16).to_be_bytes());
            if rng.percent(80) {
                fix_checksums(&mut f);
            }
            return (f, d);
        }
        Family::Fragments => {
            let mut frag = be16(&f, L3 + 6) & 0x4000;
            match rng.below(3) {
                0 => frag |= 0x2000,
                1 => frag |= 1 + rng.below(0x1fff) as u16,
                _ => frag |= 0x2000 | (1 + rng.below(0x1fff) as u16),
            }
            f[L3 + 6..L3 + 8].copy_from_slice(&frag.to_be_bytes());
            fix_ip_checksum(&mut f);
        }
        Family::Ttl => {
            f[L3 + 8] = rng.pick(&[0, 1, 1, 2, 255]);
            fix_ip_checksum(&mut f);
        }
        Family::Vlan => {
            // 802.1Q, or QinQ (802.1ad outside 802.1Q), before the IPv4 type.
            let tci = (rng.below(4096) as u16).to_be_bytes();
            let mut tags = Vec::new();
            if rng.percent(40) {
                tags.extend_from_slice(&[0x88, 0xa8, tci[0], tci[1]]);
            }
            tags.extend_from_slice(&[0x81, 0x00, tci[0], tci[1]]);
            f.splice(12..12, tags);
        }
        Family::IcmpQuotes => {
            (f, _) = loop {
                let t = template(rng, flows);
                if t.0[L3 + 9] == ICMP {
                    break t;
                }
            };
            // Mutate the quote: its addresses, ports, header, type; keep the
            // outer checksums right half of the time.
            let ip = ip_of(&f).expect("IPv4");
            let q = ip.l4 + 8;
            match rng.below(5) {
                0 => {}
                1 => {
                    let i = q + rng.below(f.len() - q);
                    f[i] = rng.byte();
                }
                2 => f[q] = 0x40 | rng.below(16) as u8,
                3 => f[ip.l4] = rng.byte(),
                _ => f.truncate(q + rng.below(f.len() - q)),
            }
            if rng.percent(50) {
                let tot = (f.len() - L3) as u16;
                f[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
                fix_checksums(&mut f);
            }
            let device = if addr(&f, L3 + 12) == LOCAL_POD {
                Device::Cali
            } else {
                Device::Eth0
            };
            return (f, device);
        }
        Family::BackendReplies => {
            // Replies from backend addresses with any port and flags, on
            // either device.
            let from = rng.pick(&[REMOTE_POD, LOCAL_POD]);
            let any = rng.port();
            let port = rng.pick(&[BACKEND_TCP_PORT, BACKEND_UDP_PORT, any]);
            let (p1, p2) = (rng.port(), rng.port());
            let to = rng.pick(&[(NODE, p1), (CLIENT, p2)]);
            let to = match (rng.below(3), flows.remote_tcp.first()) {
                (0, Some(&(_, snat))) => (NODE, snat),
                _ => to,
            };
            let mut g = if rng.percent(50) {
                tcp_flags_frame((from, port), to, tcp_flags(rng), &payload(rng))
            } else {
                udp(rng, (from, port), to)
            };
            let device = rng.pick(&[Device::Eth0, Device::Cali]);
            g[0..6].copy_from_slice(&device.mac());
            return (g, device);
        }
        Family::Martians => {
            let martian = match rng.below(5) {
                0 => Ipv4Addr::new(0, rng.byte(), rng.byte(), rng.byte()),
                1 => Ipv4Addr::new(127, rng.byte(), rng.byte(), rng.byte()),
                2 => Ipv4Addr::new(224 + rng.below(16) as u8, rng.byte(), 0, 1),
                3 => Ipv4Addr::new(240 + rng.below(15) as u8, rng.byte(), 0, 1),
                _ => Ipv4Addr::BROADCAST,
            };
            f[L3 + 12..L3 + 16].copy_from_slice(&martian.octets());
            fix_checksums(&mut f);
        }
        Family::Macs => {
            let dmac = match rng.below(4) {
                0 => [0xff; 6],
                1 => [0x01, 0x00, 0x5e, rng.byte() & 0x7f, rng.byte(), rng.byte()],
                2 => [0x33, 0x33, rng.byte(), rng.byte(), rng.byte(), rng.byte()],
                _ => loop {
                    let m = [
                        rng.byte() & 0xfe,
                        rng.byte(),
                        rng.byte(),
                        rng.byte(),
                        rng.byte(),
                        rng.byte(),
                    ];
                    if m != dev.mac() {
                        break m;
                    }
                },
            };
            f[0..6].copy_from_slice(&dmac);
        }
        Family::RandomBytes => {
            let len = 14 + rng.below(120);
            let mut g: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
            // Mostly an IPv4 frame to us, so the bytes get past the first checks.
            if rng.percent(80) {
                g[0..12].copy_from_slice(&f[0..12]);
                g[12..14].copy_from_slice(&[0x08, 0x00]);
                if g.len() > L3 && rng.percent(80) {
                    g[L3] = 0x45;
                }
                if g.len() > L3 + 20 && rng.percent(50) {
                    g[L3 + 12..L3 + 20].copy_from_slice(&f[L3 + 12..L3 + 20]);
                    g[L3 + 9] = rng.pick(&[TCP, UDP, ICMP]);
                    g[L3 + 8] = 64;
                    let tot = (g.len() - L3) as u16;
                    g[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
                    g[L3 + 6..L3 + 8].copy_from_slice(&[0, 0]);
                    fix_checksums(&mut g);
                }
            }
            return (g, dev);
        }
    }
    (f, dev)
}

// ---- judging one run ----------------------------------------------------

/// Bytes a translation may change in an accepted frame `f`.
fn may_change(f: &[u8], ip: &Ip, i: usize) -> bool {
    let l4 = ip.l4;
    let outer =
        i < 12 || i == L3 + 8 || (L3 + 10..L3 + 12).contains(&i) || (L3 + 12..L3 + 20).contains(&i);
    outer
        || match ip.proto {
            TCP => (l4..l4 + 4).contains(&i) || (l4 + 16..l4 + 18).contains(&i),
            UDP => (l4..l4 + 4).contains(&i) || (l4 + 6..l4 + 8).contains(&i),
            ICMP => {
                // The ICMP checksum; the quote's addresses and checksum,
                // its ports and its L4 checksum.
                let q = l4 + 8;
                let ql4 = q + 20;
                let quoted_proto = f.get(q + 9).copied().unwrap_or(0);
                let ql4_check = if quoted_proto == TCP { 16 } else { 6 };
                (l4 + 2..l4 + 4).contains(&i)
                    || (q + 10..q + 20).contains(&i)
                    || (ql4..ql4 + 4).contains(&i)
                    || (ql4 + ql4_check..ql4 + ql4_check + 2).contains(&i)
            }
            _ => false,
        }
}

const FRONTENDS: [u16; 4] = [NP_REMOTE_TCP, NP_LOCAL_TCP, NP_REMOTE_UDP, NP_LOCAL_UDP];

/// Checks a forwarded frame against its input.
fn judge_forwarded(input: &[u8], out: &[u8], device: Device) -> Result<()> {
    if let Some(why) = refused(input, device.mac()) {
        bail!("forwarded a frame the kernel refuses ({why})");
    }
    let ip = ip_of(input).expect("accepted frames are IPv4");
    ensure!(out.len() == input.len(), "length changed");
    let oip = ip_of(out).context("output not IPv4")?;
    ensure!(
        oip.ihl == ip.ihl && oip.tot_len == ip.tot_len && oip.proto == ip.proto,
        "IPv4 header length, total length or protocol changed"
    );
    ensure!(
        checksum(0, &out[L3..L3 + oip.ihl]) == 0,
        "bad IPv4 header checksum"
    );
    ensure!(oip.ttl == ip.ttl - 1, "TTL {} -> {}", ip.ttl, oip.ttl);
    for i in 0..input.len() {
        ensure!(
            input[i] == out[i] || may_change(input, &ip, i),
            "byte {i} changed ({:#04x} -> {:#04x})",
            input[i],
            out[i]
        );
    }
    // New MACs from the route, or (tc, the neighbour unresolved) the
    // input's, for bpf_redirect_neigh to fill in.
    let smac: [u8; 6] = out[6..12].try_into().expect("6 bytes");
    let dmac: [u8; 6] = out[0..6].try_into().expect("6 bytes");
    ensure!(
        out[0..12] == input[0..12]
            || ([ETH0_MAC, CALI_MAC].contains(&smac)
                && [NODE2_MAC, CLIENT_MAC, POD_MAC].contains(&dmac)),
        "MACs {smac:02x?} -> {dmac:02x?}"
    );
    let in_sum = l4_checksum_ok(input, &ip);
    let out_sum = l4_checksum_ok(out, &oip);
    ensure!(
        in_sum == out_sum,
        "L4 checksum validity {in_sum:?} -> {out_sum:?} (a UDP zero must stay zero)"
    );
    if ip.proto == UDP && be16(input, ip.l4 + 6) != 0 {
        ensure!(be16(out, oip.l4 + 6) != 0, "a UDP checksum became zero");
    }
    if ip.proto == ICMP {
        ensure!(
            quoted_ip_checksum_ok(input, &ip) == quoted_ip_checksum_ok(out, &oip),
            "the quoted IPv4 header's checksum validity changed"
        );
    } else {
        // Toward a backend, or from a frontend toward the client.
        let dst = (oip.dst, be16(out, oip.l4 + 2));
        let src = (oip.src, be16(out, oip.l4));
        let to_backend = [REMOTE_POD, LOCAL_POD].contains(&dst.0)
            && [BACKEND_TCP_PORT, BACKEND_UDP_PORT].contains(&dst.1);
        let from_frontend = src.0 == NODE && FRONTENDS.contains(&src.1);
        ensure!(
            to_backend || from_frontend,
            "translated to {src:?} -> {dst:?}"
        );
    }
    Ok(())
}

/// Whether a (TCP) frame is for the Local-policy frontend without backends.
fn to_dropping_frontend(f: &[u8]) -> bool {
    ip_of(f).is_some_and(|ip| {
        ip.proto == TCP
            && ip.dst == NODE
            && ip.ihl >= 20
            && f.len() >= ip.l4 + 4
            && be16(f, ip.l4 + 2) == NP_LOCAL_POLICY_EMPTY
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Passed,
    Forwarded,
    Dropped,
}

fn judge(hook: Hook, device: Device, input: &[u8], run: RunOutcome) -> Result<Outcome> {
    let (verdict, out) = match run {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EBADMSG) => {
            bail!("the program left skb->csum stale (EBADMSG)")
        }
        Err(e) => bail!("test run failed: {e}"),
    };
    let (pass, drop, forwarded) = if hook.is_xdp() {
        ensure!(verdict != XDP_ABORTED, "XDP_ABORTED");
        (
            verdict == XDP_PASS,
            verdict == XDP_DROP,
            verdict == XDP_TX || verdict == XDP_REDIRECT,
        )
    } else {
        (
            verdict == TC_ACT_OK,
            verdict == TC_ACT_SHOT,
            verdict == TC_ACT_REDIRECT,
        )
    };
    if pass {
        ensure!(out == input, "passed to the kernel, but changed");
        Ok(Outcome::Passed)
    } else if drop {
        ensure!(
            to_dropping_frontend(input),
            "dropped a frame that is not for the Local-policy frontend"
        );
        Ok(Outcome::Dropped)
    } else if forwarded {
        judge_forwarded(input, &out, device)?;
        Ok(Outcome::Forwarded)
    } else {
        bail!("unexpected verdict {verdict}")
    }
}

// ---- the run ------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
}

fn ct_created(rig: &Rig) -> Result<u64> {
    let values = rig
        .maps
        .reason_stats
        .get(&(Reason::CtCreated as u32), 0)
        .context("reading ct_created")?;
    Ok(values.iter().sum())
}

/// Opens the flows the templates refer to, on an empty conntrack map.
fn open_flows(rig: &mut Rig, rng: &mut Prng) -> Result<Flows> {
    rig.clear_flows()?;
    let mut flows = Flows::default();
    let base = 20000 + rng.below(20000) as u16;
    for i in 0..8 {
        let client = (CLIENT, base + i);
        let port = rig.open_remote_flow(client)?;
        if i % 2 == 0 {
            // Established: the backend's SYN-ACK, the client's ACK.
            let synack = tcp_flags_frame(
                (REMOTE_POD, BACKEND_TCP_PORT),
                (NODE, port),
                &["syn", "ack"],
                &[],
            );
            ensure!(rig.xdp(rig.eth0, &synack)?.0 == XDP_TX, "SYN-ACK");
            let ack = tcp_flags_frame(client, (NODE, NP_REMOTE_TCP), &["ack"], &[]);
            ensure!(rig.xdp(rig.eth0, &ack)?.0 == XDP_TX, "ACK");
        }
        flows.remote_tcp.push((client.1, port));
    }
    for i in 0..4 {
        let client = (CLIENT, base + 100 + i);
        let (v, out) = rig.xdp(
            rig.eth0,
            &udp_frame(client, (NODE, NP_REMOTE_UDP), 64, b"q"),
        )?;
        ensure!(v == XDP_TX, "UDP query: {v}");
        flows.remote_udp.push((client.1, src_port(&out)?));
        let client = (CLIENT, base + 200 + i);
        let syn = tcp_flags_frame(client, (NODE, NP_LOCAL_TCP), &["syn"], &[]);
        ensure!(rig.tc(rig.eth0, &syn)?.0 == TC_ACT_REDIRECT, "local SYN");
        flows.local_tcp.push(client.1);
        let client = (CLIENT, base + 300 + i);
        let q = udp_frame(client, (NODE, NP_LOCAL_UDP), 64, b"q");
        ensure!(rig.tc(rig.eth0, &q)?.0 == TC_ACT_REDIRECT, "local UDP");
        flows.local_udp.push(client.1);
    }
    Ok(flows)
}

/// The suite's seed.
const DEFAULT_SEED: u64 = 0x5eed_2026_1202;

#[derive(Default, Clone, Copy)]
struct Tally {
    frames: u64,
    runs: u64,
    /// XDP runs that passed their frame: tc counts its verdict, XDP none.
    xdp_passed: u64,
    passed: u64,
    forwarded: u64,
    dropped: u64,
    refused: u64,
}

struct Fuzzer<'a> {
    rig: &'a mut Rig,
    rng: Prng,
    seed: u64,
    tallies: BTreeMap<Family, Tally>,
}

impl Fuzzer<'_> {
    /// Runs `frame` on every hook of `device`, judging each run.
    fn run_frame(
        &mut self,
        family: Family,
        index: u64,
        frame: &[u8],
        device: Device,
    ) -> Result<()> {
        let refusal = refused(frame, device.mac());
        if family.all_refused() {
            ensure!(
                refusal.is_some(),
                "generator: a {family:?} frame the kernel accepts: {}",
                hex(frame)
            );
        }
        let tally = self.tallies.entry(family).or_default();
        tally.frames += 1;
        tally.refused += u64::from(refusal.is_some());
        for &hook in device.hooks() {
            if !hook.runnable(frame) {
                continue;
            }
            let created = if refusal.is_some() {
                Some(ct_created(self.rig)?)
            } else {
                None
            };
            let run = hook.run(self.rig, frame)?;
            let out = run.as_ref().map(|(_, o)| o.clone()).unwrap_or_default();
            let outcome = judge(hook, device, frame, run).and_then(|o| {
                if let (Some(before), Some(why)) = (created, refusal) {
                    ensure!(
                        ct_created(self.rig)? == before,
                        "a frame the kernel refuses ({why}) created a flow"
                    );
                }
                Ok(o)
            });
            let outcome = outcome.with_context(|| {
                format!(
                    "FUZZ_SEED={} family {family:?}, frame {index}, {hook:?}\n  in:  {}\n  out: {}",
                    self.seed,
                    hex(frame),
                    hex(&out)
                )
            })?;
            let tally = self.tallies.entry(family).or_default();
            tally.runs += 1;
            if hook.is_xdp() && matches!(outcome, Outcome::Passed) {
                tally.xdp_passed += 1;
            }
            match outcome {
                Outcome::Passed => tally.passed += 1,
                Outcome::Forwarded => tally.forwarded += 1,
                Outcome::Dropped => tally.dropped += 1,
            }
        }
        Ok(())
    }

    fn family(&mut self, family: Family, frames: u64) -> Result<()> {
        let flows = open_flows(self.rig, &mut self.rng)?;
        let keys_before: Vec<CtKey> = sorted(self.rig.flows()?);
        let counters_before = self.rig.maps.reason_totals()?;
        let before = self.tallies.get(&family).copied().unwrap_or_default();
        if family == Family::Truncation {
            // Every length of templates, then random cuts.
            let mut index = 0;
            while index < frames {
                let (f, device) = template(&mut self.rng, &flows);
                for len in (L3..f.len()).rev() {
                    self.run_frame(family, index, &f[..len], device)?;
                    index += 1;
                }
            }
        } else {
            for index in 0..frames {
                let (f, device) = generate(&mut self.rng, &flows, family);
                self.run_frame(family, index, &f, device)?;
            }
        }
        let after = self.tallies[&family];
        let counters = self.rig.maps.reason_totals()?;
        let delta = |r: Reason| counters[r.name()] - counters_before[r.name()];
        let verdicts: u64 = Reason::ALL
            .iter()
            .filter(|r| r.is_verdict())
            .map(|&r| delta(r))
            .sum();
        let forwards: u64 = [
            Reason::XdpTx,
            Reason::XdpRedirect,
            Reason::TcRedirectPeer,
            Reason::TcRedirect,
            Reason::TcRedirectNeigh,
            Reason::XdpIcmpFragNeeded,
        ]
        .iter()
        .map(|&r| delta(r))
        .sum();
        let drops: u64 = Reason::ALL
            .iter()
            .filter(|r| r.is_drop())
            .map(|&r| delta(r))
            .sum();
        let seed = self.seed;
        // Each run counts one verdict, except an XDP run that passes its
        // frame: the kernel hands that frame to tc, which counts it.
        let expected = (after.runs - before.runs) - (after.xdp_passed - before.xdp_passed);
        ensure!(
            verdicts == expected,
            "FUZZ_SEED={seed} {family:?}: {verdicts} verdicts counted for {expected} runs that decide (of {})",
            after.runs - before.runs
        );
        ensure!(
            forwards == after.forwarded - before.forwarded
                && drops == after.dropped - before.dropped,
            "FUZZ_SEED={seed} {family:?}: counted {forwards} forwarded and {drops} dropped, saw {} and {}",
            after.forwarded - before.forwarded,
            after.dropped - before.dropped
        );
        if family.all_refused() {
            let keys = sorted(self.rig.flows()?);
            ensure!(
                keys == keys_before,
                "FUZZ_SEED={seed} {family:?}: refused frames changed the conntrack map ({} keys before, {} after)",
                keys_before.len(),
                keys.len()
            );
        }
        Ok(())
    }
}

fn sorted(mut keys: Vec<CtKey>) -> Vec<CtKey> {
    keys.sort();
    keys
}

/// The CHECKSUM_COMPLETE runs can fail: a program that rewrites a byte
/// without carrying `skb->csum` along is refused with EBADMSG.
#[test]
fn checksum_complete_runs_catch_a_stale_csum() {
    skip_unless_netns_capable!();
    let prog = integration_tests::bench::bpf::Prog::tc_stale_csum().unwrap();
    let frame = tcp_flags_frame((CLIENT, 40000), (NODE, NP_REMOTE_TCP), &["syn"], &[]);
    let ctx = vec![0u8; 44];
    let run = |frame: &[u8], flags| packet_rig::test_run(prog.fd(), frame, &ctx, flags);
    let complete = packet_rig::BPF_F_TEST_SKB_CHECKSUM_COMPLETE;
    let (v, out) = run(&frame, 0).expect("a plain skb");
    assert_eq!((v, out[L3 + 8]), (TC_ACT_OK, 127));
    let err = run(&frame, complete).expect_err("a stale csum");
    assert_eq!(err.raw_os_error(), Some(libc::EBADMSG), "{err}");
    // Writing what is already there leaves the sum right.
    run(&out, complete).expect("nothing changed");
}

#[test]
fn fuzzed_frames_are_forwarded_correctly_or_passed_untouched() {
    skip_unless_netns_capable!();
    let frames = env_u64("FUZZ_FRAMES").unwrap_or(DEFAULT_FRAMES).max(1);
    // Fixed unless asked otherwise: the suite's run is reproducible
    // (`cargo xtask fuzz` explores with a new seed each time).
    let seed = env_u64("FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    println!("fuzz: FUZZ_SEED={seed} FUZZ_FRAMES={frames}");
    packet_rig::with_rig("fz", move |rig| {
        let start = Instant::now();
        let mut fuzzer = Fuzzer {
            rig,
            rng: Prng(seed),
            seed,
            tallies: BTreeMap::new(),
        };
        let per_family = (frames / Family::ALL.len() as u64).max(1);
        for family in Family::ALL {
            fuzzer.family(family, per_family)?;
        }
        let elapsed = start.elapsed();
        println!(
            "{:<16} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8}",
            "family", "frames", "refused", "runs", "forwarded", "dropped", "passed"
        );
        let mut total = Tally::default();
        for (family, t) in &fuzzer.tallies {
            println!(
                "{:<16} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8}",
                format!("{family:?}"),
                t.frames,
                t.refused,
                t.runs,
                t.forwarded,
                t.dropped,
                t.passed
            );
            total.frames += t.frames;
            total.runs += t.runs;
            total.forwarded += t.forwarded;
        }
        println!(
            "fuzz: {} frames, {} runs ({} forwarded) in {:.1} s, FUZZ_SEED={seed}",
            total.frames,
            total.runs,
            total.forwarded,
            elapsed.as_secs_f64()
        );
        // Every family reached the programs, and the valid frames were
        // forwarded for the most part (the templates hit real flows).
        let valid = fuzzer.tallies[&Family::Valid];
        ensure!(
            valid.forwarded * 2 > valid.runs,
            "only {} of {} runs of valid frames were forwarded",
            valid.forwarded,
            valid.runs
        );
        Ok(())
    })
    .unwrap();
}
