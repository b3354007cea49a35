//! A node for running the datapath's programs on single frames through
//! `BPF_PROG_TEST_RUN` (tests/tests/packets.rs, fuzz.rs): a namespace made
//! by [`netns::test_run_node`], the programs loaded (XDP attached to eth0),
//! the maps programmed with a few frontends, and frame builders.
//!
//! The runs go through bpf(2) directly rather than aya's `test_run`, which
//! cannot pass flags: tc runs may ask for a CHECKSUM_COMPLETE skb
//! (`BPF_F_TEST_SKB_CHECKSUM_COMPLETE`), whose `skb->csum` the kernel checks
//! after the run (EBADMSG when the program left it stale).
use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    programs::{SchedClassifier, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use etherparse::{Icmpv4Type, PacketBuilder, PacketHeaders, TransportHeader};
use forwarder::{
    maps::Maps,
    model::{Desired, DesiredBackend, DesiredFrontend, FrontendAddr, Protocol},
    plan,
};
use forwarder_common::{map_names, program_names, Config, CtEntry, CtKey, Reason};

use crate::netns::{self, Netns};

pub const XDP_ABORTED: u32 = 0;

/// The rig's half-open table, small so a table-sized flood is quick.
pub const HALF_OPEN_ENTRIES: u32 = 256;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NODE2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

pub const ETH0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const CALI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x10];

// Frontends programmed on NODE.
pub const NP_REMOTE_TCP: u16 = 31380;
pub const NP_LOCAL_TCP: u16 = 31381;
pub const NP_REMOTE_UDP: u16 = 31353;
pub const NP_LOCAL_UDP: u16 = 31354;
/// externalTrafficPolicy Local without a local backend: dropped.
pub const NP_LOCAL_POLICY_EMPTY: u16 = 31390;
/// Backend ports behind them.
pub const BACKEND_TCP_PORT: u16 = 80;
pub const BACKEND_UDP_PORT: u16 = 53;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Run a tc program on a CHECKSUM_COMPLETE skb and check its `csum` after.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// A node namespace, the programs loaded, and the maps programmed.
pub struct Rig {
    // Field order: programs and maps go before the namespace is deleted.
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub eth0: u32,
    pub cali: u32,
    _ns: Netns,
}

pub fn frontend(
    port: u16,
    proto: Protocol,
    backends: Vec<DesiredBackend>,
) -> (FrontendAddr, DesiredFrontend) {
    (
        FrontendAddr {
            addr: NODE,
            port,
            proto,
        },
        DesiredFrontend {
            service: format!("test/np{port}"),
            port_name: String::new(),
            backends,
            no_snat: false,
            drop_if_empty: false,
            affinity_timeout_s: 0,
        },
    )
}

pub fn backend(addr: Ipv4Addr, port: u16, local: bool) -> DesiredBackend {
    DesiredBackend {
        addr,
        port,
        local,
        policed: false,
    }
}

/// What one test run returned, or the kernel's refusal of it.
pub type RunOutcome = std::result::Result<(u32, Vec<u8>), std::io::Error>;

/// BPF_PROG_TEST_RUN of program `prog_fd` on `frame` with context `ctx`.
pub fn test_run(prog_fd: i32, frame: &[u8], ctx: &[u8], flags: u32) -> RunOutcome {
    // Room for what XDP may prepend or append (an ICMP answer is shorter).
    let mut out = vec![0u8; frame.len() + 256];
    // union bpf_attr, the `test` member: prog_fd, retval, data_size_in,
    // data_size_out; data_in; data_out; repeat, duration; ctx_size_in,
    // ctx_size_out; ctx_in; ctx_out; flags, cpu; batch_size.
    let mut attr = [0u8; 80];
    let mut put_u32 = |off: usize, v: u32| attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    put_u32(0, prog_fd as u32);
    put_u32(8, frame.len() as u32);
    put_u32(12, out.len() as u32);
    put_u32(32, 1);
    put_u32(40, ctx.len() as u32);
    put_u32(64, flags);
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(&(ctx.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is a zero-initialised `union bpf_attr` prefix of the
    // size passed; the pointers in it name live buffers of the sizes
    // given, `out` writable, all valid for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let word = |off: usize| u32::from_ne_bytes(attr[off..off + 4].try_into().expect("4 bytes"));
    out.truncate(word(12) as usize);
    Ok((word(4), out))
}

/// struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
fn xdp_ctx(len: usize, ifindex: u32) -> Vec<u8> {
    [0u32, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect()
}

/// struct __sk_buff up to and including `ifindex` (offset 40); the kernel
/// requires the fields before it to be zero.
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

impl Rig {
    /// Must run inside the namespace (fib lookups use the caller's).
    pub fn new(ns: Netns) -> Result<Rig> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::CT_HALF_OPEN, HALF_OPEN_ENTRIES)
            .load(&forwarder::kfuncs::prepared_object()?.0)
            .context("loading the eBPF object")?;
        let mut maps = Maps::take(&mut ebpf)?;
        let (eth0, cali) = netns::configure_test_run_node(&mut maps)?;
        maps.config.set(0, Config::default(), 0)?;
        let mut local_policy = frontend(NP_LOCAL_POLICY_EMPTY, Protocol::Tcp, vec![]);
        local_policy.1.no_snat = true;
        local_policy.1.drop_if_empty = true;
        let desired = Desired {
            frontends: [
                frontend(
                    NP_REMOTE_TCP,
                    Protocol::Tcp,
                    vec![backend(REMOTE_POD, BACKEND_TCP_PORT, false)],
                ),
                frontend(
                    NP_LOCAL_TCP,
                    Protocol::Tcp,
                    vec![backend(LOCAL_POD, BACKEND_TCP_PORT, true)],
                ),
                frontend(
                    NP_REMOTE_UDP,
                    Protocol::Udp,
                    vec![backend(REMOTE_POD, BACKEND_UDP_PORT, false)],
                ),
                frontend(
                    NP_LOCAL_UDP,
                    Protocol::Udp,
                    vec![backend(LOCAL_POD, BACKEND_UDP_PORT, true)],
                ),
                local_policy,
            ]
            .into_iter()
            .collect(),
        };
        let ops = plan::plan(&desired, &maps.snapshot()?)?;
        maps.apply(&ops)?;

        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP)
            .context("xdp program")?
            .try_into()?;
        xdp.load()?;
        // Attached so the veth registers its XDP receive queue, which a test
        // run with an ingress ifindex requires.
        xdp.attach_to_if_index(eth0, XdpMode::Driver)
            .context("attaching XDP to eth0")?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::TC)
            .context("tc program")?
            .try_into()?;
        tc.load()?;
        Ok(Rig {
            ebpf,
            maps,
            eth0,
            cali,
            _ns: ns,
        })
    }

    pub fn xdp_fd(&self) -> Result<i32> {
        let prog: &Xdp = self
            .ebpf
            .program(program_names::XDP)
            .context("xdp program")?
            .try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    pub fn tc_fd(&self) -> Result<i32> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(program_names::TC)
            .context("tc program")?
            .try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    /// XDP on `frame` arriving on `ifindex`, the kernel's refusal as is.
    pub fn run_xdp(&self, ifindex: u32, frame: &[u8]) -> Result<RunOutcome> {
        Ok(test_run(
            self.xdp_fd()?,
            frame,
            &xdp_ctx(frame.len(), ifindex),
            0,
        ))
    }

    /// tc ingress on `frame` arriving on `ifindex`, on a CHECKSUM_COMPLETE
    /// skb if asked; the kernel's refusal as is.
    pub fn run_tc(
        &self,
        ifindex: u32,
        frame: &[u8],
        checksum_complete: bool,
    ) -> Result<RunOutcome> {
        let flags = if checksum_complete {
            BPF_F_TEST_SKB_CHECKSUM_COMPLETE
        } else {
            0
        };
        Ok(test_run(self.tc_fd()?, frame, &skb_ctx(ifindex), flags))
    }

    pub fn xdp(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_xdp(ifindex, frame)?.context("XDP test run")
    }

    /// tc on a CHECKSUM_COMPLETE skb: the kernel also checks that the
    /// program kept `skb->csum` right.
    pub fn tc(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_tc(ifindex, frame, true)?.context("tc test run")
    }

    pub fn count(&self, r: Reason) -> Result<u64> {
        Ok(self.maps.reason_totals()?[r.name()])
    }

    pub fn has_flow(&self, key: CtKey) -> bool {
        self.entry(key).is_some()
    }

    /// A flow's entry at `key` and whether it is in the established table.
    pub fn entry(&self, key: CtKey) -> Option<(CtEntry, bool)> {
        if let Ok(e) = self.maps.conntrack.get(&key, 0) {
            return Some((e, true));
        }
        self.maps.ct_half_open.get(&key, 0).ok().map(|e| (e, false))
    }

    /// Every conntrack key, in both tables.
    pub fn flows(&self) -> Result<Vec<CtKey>> {
        let mut keys: Vec<CtKey> = self
            .maps
            .conntrack
            .keys()
            .collect::<Result<_, _>>()
            .context("listing conntrack")?;
        for k in self.maps.ct_half_open.keys() {
            keys.push(k.context("listing the half-open table")?);
        }
        Ok(keys)
    }

    pub fn clear_flows(&mut self) -> Result<()> {
        for k in self.flows()? {
            let _ = self.maps.conntrack.remove(&k);
            let _ = self.maps.ct_half_open.remove(&k);
        }
        Ok(())
    }

    /// A client's SYN to the remote TCP frontend, sent back out with XDP_TX;
    /// returns the flow's source-NAT port.
    pub fn open_remote_flow(&self, client: (Ipv4Addr, u16)) -> Result<u16> {
        let syn = tcp_frame(client, (NODE, NP_REMOTE_TCP), 64, true, &[]);
        let (v, out) = self.xdp(self.eth0, &syn)?;
        ensure!(v == XDP_TX, "SYN from {client:?}: verdict {v}");
        src_port(&out)
    }

    /// Every verdict counted so far (events such as `ct_created` aside).
    pub fn verdicts(&self) -> Result<u64> {
        let totals = self.maps.reason_totals()?;
        Ok(Reason::ALL
            .iter()
            .filter(|r| r.is_verdict())
            .map(|r| totals[r.name()])
            .sum())
    }

    /// Runs `frame` through XDP and then tc on eth0, as the kernel does with
    /// a frame XDP passes: each must pass it to the kernel untouched, and
    /// the packet is counted once, by tc, with `reason`.
    pub fn passes_in_both_hooks(&self, what: &str, frame: &[u8], reason: Reason) -> Result<()> {
        let (before, verdicts) = (self.count(reason)?, self.verdicts()?);
        let (v, out) = self.xdp(self.eth0, frame)?;
        ensure!(v == XDP_PASS, "{what} (xdp): verdict {v}");
        ensure!(out == frame, "{what} (xdp): frame changed");
        ensure!(
            self.verdicts()? == verdicts,
            "{what} (xdp): XDP counted a frame it passed to tc"
        );
        let (v, out) = self.tc(self.eth0, frame)?;
        ensure!(v == TC_ACT_OK, "{what} (tc): verdict {v}");
        ensure!(out == frame, "{what} (tc): frame changed");
        ensure!(
            self.count(reason)? == before + 1,
            "{what} (tc): {} not counted",
            reason.name()
        );
        ensure!(
            self.verdicts()? == verdicts + 1,
            "{what}: {} verdicts counted for one packet",
            self.verdicts()? - verdicts
        );
        Ok(())
    }
}

/// Builds the rig inside a fresh namespace named after `suffix` and runs `f`
/// there.
pub fn with_rig(suffix: &str, f: impl FnOnce(&mut Rig) -> Result<()> + Send) -> Result<()> {
    let ns = netns::test_run_node(suffix)?;
    let name = ns.name().to_string();
    netns::run_in(&name, move || {
        let mut rig = Rig::new(ns)?;
        f(&mut rig)
    })
}

// ---- frames -------------------------------------------------------------

pub fn tcp_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    ttl: u8,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let (smac, dmac) = macs_for(src.0);
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), ttl)
        .tcp(src.1, dst.1, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(2000) };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

pub fn tcp_flags_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: &[&str],
    payload: &[u8],
) -> Vec<u8> {
    let (smac, dmac) = macs_for(src.0);
    let mut b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    for f in flags {
        b = match *f {
            "syn" => b.syn(),
            "ack" => b.ack(2000),
            "fin" => b.fin(),
            "rst" => b.rst(),
            "psh" => b.psh(),
            other => panic!("unknown flag {other}"),
        };
    }
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

pub fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_for(src.0);
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.0.octets(), dst.0.octets(), ttl)
        .udp(src.1, dst.1);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("writing to a Vec");
    out
}

/// An ICMP error from `src` to `dst` quoting `quoted` (an IPv4 packet, no Ethernet).
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, ty: Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let (smac, dmac) = macs_for(src);
    let b = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.octets(), dst.octets(), 64)
        .icmpv4(ty);
    let mut out = Vec::with_capacity(b.size(quoted.len()));
    b.write(&mut out, quoted).expect("writing to a Vec");
    out
}

/// MACs a frame from `src` arrives with at our node: a local pod's on
/// cali1, everyone else's on eth0, each addressed to that device.
pub fn macs_for(src: Ipv4Addr) -> ([u8; 6], [u8; 6]) {
    if src == LOCAL_POD {
        (POD_MAC, CALI_MAC)
    } else if src == REMOTE_POD {
        (NODE2_MAC, ETH0_MAC)
    } else {
        (CLIENT_MAC, ETH0_MAC)
    }
}

pub fn src_port(frame: &[u8]) -> Result<u16> {
    let h = PacketHeaders::from_ethernet_slice(frame).map_err(|e| anyhow::anyhow!("{e}"))?;
    match h.transport {
        Some(TransportHeader::Tcp(t)) => Ok(t.source_port),
        Some(TransportHeader::Udp(u)) => Ok(u.source_port),
        other => anyhow::bail!("no ports in {other:?}"),
    }
}

pub fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> CtKey {
    CtKey::new(
        u32::from_ne_bytes(src.0.octets()),
        src.1.to_be(),
        u32::from_ne_bytes(dst.0.octets()),
        dst.1.to_be(),
        proto,
    )
}
