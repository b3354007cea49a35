//! Next-hop lookup through the kernel's FIB (`bpf_fib_lookup`).
use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    cty::c_void,
    helpers::bpf_fib_lookup,
};

const AF_INET: u8 = 2;

#[derive(Clone, Copy, Default)]
pub struct Route {
    pub ifindex: u32,
    /// Next hop: the gateway, or the destination itself when on-link.
    pub nexthop: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// With [`Fib::FragNeeded`]: the route's MTU.
    pub mtu: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fib {
    /// Route and neighbour known: forward with these MACs.
    Forward,
    /// Route known, neighbour not resolved (only `ifindex`/`nexthop` are valid).
    NoNeigh,
    /// The packet is larger than the route's MTU (`Route::mtu`).
    FragNeeded,
    /// No route we can use (unreachable, blackhole, forwarding off ...).
    Fail,
}

/// The tuple a lookup is made for: the packet as it will leave.
#[derive(Clone, Copy)]
pub struct FibQuery {
    pub ingress: u32,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// The packet's IPv4 length, checked against the route's MTU. tc passes
    /// 0: the kernel then checks the skb itself, GSO-aware, so a GRO/TSO
    /// super-packet whose segments fit is not refused.
    pub tot_len: u16,
}

/// Looks up where a packet with this tuple is forwarded.
#[inline(always)]
pub fn lookup(ctx: *mut c_void, q: &FibQuery) -> (Fib, Route) {
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions of
    // integers, for which all-zero bytes are a valid value.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = q.proto;
    p.sport = q.sport;
    p.dport = q.dport;
    p.__bindgen_anon_1.tot_len = q.tot_len;
    p.ifindex = q.ingress;
    p.__bindgen_anon_3.ipv4_src = q.saddr;
    p.__bindgen_anon_4.ipv4_dst = q.daddr;
    // SAFETY: `ctx` is the hook's own context pointer and `p` a live,
    // correctly sized parameter block, as the helper requires.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, size_of::<FibParams>() as i32, 0) };
    let route = Route {
        ifindex: p.ifindex,
        // SAFETY: the union holds IPv4 addresses for AF_INET lookups; both
        // variants are plain integers.
        nexthop: unsafe { p.__bindgen_anon_4.ipv4_dst },
        smac: p.smac,
        dmac: p.dmac,
        // SAFETY: as above; after FRAG_NEEDED the kernel stores the MTU here.
        mtu: unsafe { p.__bindgen_anon_1.mtu_result },
    };
    let fib = if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Fib::Forward
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Fib::NoNeigh
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        Fib::FragNeeded
    } else {
        Fib::Fail
    };
    (fib, route)
}
