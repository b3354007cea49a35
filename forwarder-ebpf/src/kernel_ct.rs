//! Is a new flow already the kernel's? nf_conntrack lookups through the
//! `bpf_xdp_ct_lookup` / `bpf_skb_ct_lookup` kfuncs.
//!
//! A client's SYN whose tuple nf_conntrack already tracks belongs to a
//! connection kube-proxy carries (a retransmitted SYN of a handshake that
//! began before the forwarder, or while it drained): taking it would split
//! that flow. The loader resolves these calls against the kernel's BTF
//! (`forwarder::kfuncs`); where a kernel lacks them it turns each call into
//! `r0 = 0`, so the lookup answers "not the kernel's" and only the SYN-only
//! rule (an unknown non-SYN packet is never taken) protects such flows.
use aya_ebpf::cty::c_void;

use crate::parse::Headers;

/// `struct bpf_sock_tuple`'s IPv4 part, network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SockTupleV4 {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

/// `struct bpf_ct_opts` (16 bytes since Linux 6.5; older kernels take 12
/// and refuse 16: the lookup then fails, which reads as "not the kernel's").
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct CtOpts {
    pub netns_id: i32,
    pub error: i32,
    pub l4proto: u8,
    pub dir: u8,
    pub ct_zone_id: u16,
    pub ct_zone_dir: u8,
    pub _reserved0: u8,
    pub _reserved1: u16,
}

const TUPLE_V4_LEN: u32 = core::mem::size_of::<SockTupleV4>() as u32;
const OPTS_LEN: u32 = core::mem::size_of::<CtOpts>() as u32;
/// `BPF_F_CURRENT_NETNS`: look in the program's own network namespace.
const CURRENT_NETNS: i32 = -1;

unsafe extern "C" {
    fn bpf_xdp_ct_lookup(
        ctx: *mut c_void,
        tuple: *mut SockTupleV4,
        tuple_len: u32,
        opts: *mut CtOpts,
        opts_len: u32,
    ) -> *mut c_void;
    fn bpf_skb_ct_lookup(
        ctx: *mut c_void,
        tuple: *mut SockTupleV4,
        tuple_len: u32,
        opts: *mut CtOpts,
        opts_len: u32,
    ) -> *mut c_void;
    fn bpf_ct_release(ct: *mut c_void);
}

/// Which hook asks (each has its own kfunc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

/// Whether nf_conntrack tracks the packet's tuple. `tuple` and `opts` are
/// scratch room in a map value (the stack has none to spare).
#[inline(always)]
pub fn tracks(
    ctx: *mut c_void,
    hook: Hook,
    h: &Headers,
    tuple: &mut SockTupleV4,
    opts: &mut CtOpts,
) -> bool {
    *tuple = SockTupleV4 {
        saddr_be: h.saddr,
        daddr_be: h.daddr,
        sport_be: h.sport,
        dport_be: h.dport,
    };
    *opts = CtOpts {
        netns_id: CURRENT_NETNS,
        l4proto: h.proto,
        ..CtOpts::default()
    };
    // SAFETY: `ctx` is the hook's own context, of the kind its kfunc takes;
    // `tuple` and `opts` are valid for the sizes passed. A non-null result
    // is a referenced nf_conn, released right away.
    unsafe {
        let ct = match hook {
            Hook::Xdp => bpf_xdp_ct_lookup(ctx, tuple, TUPLE_V4_LEN, opts, OPTS_LEN),
            Hook::Tc => bpf_skb_ct_lookup(ctx, tuple, TUPLE_V4_LEN, opts, OPTS_LEN),
        };
        if ct.is_null() {
            return false;
        }
        bpf_ct_release(ct);
    }
    true
}
