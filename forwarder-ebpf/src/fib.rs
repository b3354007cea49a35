//! Next-hop lookup through the kernel's FIB (`bpf_fib_lookup`).
use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    cty::c_void,
    helpers::bpf_fib_lookup,
};

use crate::{conntrack::EgressLookup, parse::Headers};

const AF_INET: u8 = 2;

pub struct Route {
    pub ifindex: u32,
    /// Next hop: the gateway, or the destination itself when on-link.
    pub nexthop: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

pub enum Fib {
    /// Route and neighbour known: forward with these MACs.
    Forward(Route),
    /// Route known, neighbour not resolved (only `ifindex`/`nexthop` are valid).
    NoNeigh(Route),
    /// No route we can use (unreachable, blackhole, forwarding off, MTU ...).
    Fail,
}

/// Looks up where a packet with this tuple, arriving on `ingress`, is forwarded.
#[inline(always)]
pub fn lookup(
    ctx: *mut c_void,
    ingress: u32,
    h: &Headers,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
) -> Fib {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = h.proto;
    p.sport = sport;
    p.dport = dport;
    p.__bindgen_anon_1.tot_len = h.ip_len;
    p.ifindex = ingress;
    p.__bindgen_anon_3.ipv4_src = saddr;
    p.__bindgen_anon_4.ipv4_dst = daddr;
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, size_of::<FibParams>() as i32, 0) };
    let route = Route {
        ifindex: p.ifindex,
        nexthop: unsafe { p.__bindgen_anon_4.ipv4_dst },
        smac: p.smac,
        dmac: p.dmac,
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Fib::Forward(route)
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Fib::NoNeigh(route)
    } else {
        Fib::Fail
    }
}

/// Egress lookups for new flows, through the same FIB.
pub struct FibEgress {
    pub ctx: *mut c_void,
    pub ingress: u32,
}

impl EgressLookup for FibEgress {
    #[inline(always)]
    fn egress_ifindex(&self, h: &Headers, daddr: u32, dport: u16) -> Option<u32> {
        match lookup(self.ctx, self.ingress, h, h.saddr, daddr, h.sport, dport) {
            Fib::Forward(r) | Fib::NoNeigh(r) => Some(r.ifindex),
            Fib::Fail => None,
        }
    }
}
