//! Measurement 1: per-packet cost of the XDP program `xdp_ingress` through
//! BPF_PROG_TEST_RUN, at 1, 1,000, 10,000 and 100,000 Services.
//!
//! The program runs in a node namespace (eth0 towards clients, cali1 to a
//! local pod, a route to a remote pod via node2) with the forwarder's own
//! maps. Two measured frontends on 192.0.2.1 (TCP 30000 → remote pod
//! 10.244.2.10:80, source-NATed and sent back out with XDP_TX; TCP 30001 →
//! local pod 10.244.1.10:80, which XDP classifies and hands to tc) plus
//! fillers up to the Service count (one TCP frontend and one backend each,
//! on other addresses).
//!
//! Cases:
//! - `established`: an ACK of a flow whose conntrack entry exists (remote
//!   backend): parse, conntrack hit, FIB, source-NAT rewrite, XDP_TX.
//! - `new-flow`: a SYN with a source port never seen: parse, frontend hit,
//!   backend choice, source port allocation, two conntrack inserts, FIB,
//!   rewrite, XDP_TX.
//! - `established-local`: an ACK of an existing flow to the local pod: XDP
//!   finds the flow and leaves delivery to tc (XDP_PASS), no rewrite.
//! - `miss`: TCP to a port with no frontend and no flow (XDP_PASS).
//! - `non-ip`: an ARP request (XDP_PASS).
//! - `empty`: an XDP program that only returns XDP_PASS, same harness.
//!
//! Harness: a BPF_PROG_TEST_RUN with a large repeat runs the program again
//! on the *same* buffer, so a program that rewrites the packet would measure
//! the rewritten packet from the second repetition on. So every case is
//! measured single-shot (repeat 1, a fresh copy of the frame per call, many
//! calls, median of the kernel-measured duration), and the cases that leave
//! the packet untouched also with a large repeat (mean per repetition).
//! Net cost = case − empty, within the same run.

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};
use aya::{
    programs::{Xdp, XdpMode},
    EbpfLoader,
};
use forwarder::{
    maps::Maps,
    model::{Desired, DesiredBackend, DesiredFrontend, FrontendAddr, Protocol},
    plan,
};
use forwarder_common::{
    map_names, program_names, Backend, BackendKey, Config, CtKey, Frontend, FrontendKey,
    IPPROTO_TCP,
};

use super::{
    bpf::{self, Prog},
    frames, median, scales, Options, Results,
};
use crate::netns::{self, Netns};

const M: u32 = 1;
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const CLIENT_MAC: frames::Mac = [0x02, 0, 0, 0, 0, 0x64];
const ETH0_MAC: frames::Mac = [0x02, 0, 0, 0, 0, 0x01];
const NP_REMOTE: u16 = 30000;
const NP_LOCAL: u16 = 30001;
const NP_MISS: u16 = 29999;

pub const SCALES: [u64; 4] = [1, 1_000, 10_000, 100_000];

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    let (calls, repeat) = if options.quick {
        (2_000, 100_000)
    } else {
        (20_000, 2_000_000)
    };
    for services in scales(options, &SCALES) {
        eprintln!("bench: [1] {services} Services");
        let ns = setup_namespace()?;
        let name = ns.name().to_string();
        netns::run_in(&name, || {
            let mut rig = Rig::new(services)?;
            for run in 0..options.runs {
                rig.measure(results, services, calls, repeat)
                    .with_context(|| format!("run {run} at {services} Services"))?;
            }
            Ok(())
        })?;
        drop(ns);
    }
    if scales(options, &SCALES)
        .iter()
        .any(|&n| n > u64::from(forwarder_common::MAX_FRONTENDS))
    {
        results.note(
            M,
            format!(
                "more than {} Services exceed the default map sizes: the daemon takes them with \
                 --max-frontends, --max-backends and --max-service-ports; here FRONTENDS and \
                 BACKENDS were sized at load (`map_max_entries`) and the fillers written directly",
                forwarder_common::MAX_FRONTENDS
            ),
        );
    }
    // Flatness: the net established cost at the largest scale against the smallest.
    let sc = scales(options, &SCALES);
    if let (Some(lo), Some(hi)) = (sc.first(), sc.last()) {
        for case in ["established", "new-flow", "miss"] {
            let get = |n: u64| {
                results
                    .find(M, case, "F", n, "net ns/packet")
                    .and_then(|s| s.median())
            };
            if let (Some(a), Some(b)) = (get(*lo), get(*hi)) {
                if lo != hi && a > 0.0 {
                    let change = (b - a) / a * 100.0;
                    results.note(
                        M,
                        format!(
                            "{case}: net cost {a:.1} ns at {lo} Services, {b:.1} ns at {hi} \
                             ({change:+.1}%; target: within ±10%: {})",
                            if change.abs() <= 10.0 {
                                "met"
                            } else {
                                "NOT met"
                            }
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

fn setup_namespace() -> Result<Netns> {
    netns::test_run_node("b1")
}

struct Rig {
    // Programs and maps before the namespace goes (the caller owns it).
    ebpf: aya::Ebpf,
    maps: Maps,
    empty: Prog,
    eth0: u32,
}

fn measured(port: u16, backend: Ipv4Addr, local: bool) -> (FrontendAddr, DesiredFrontend) {
    (
        FrontendAddr {
            addr: NODE,
            port,
            proto: Protocol::Tcp,
        },
        DesiredFrontend {
            service: format!("bench/measured-{port}"),
            port_name: String::new(),
            backends: vec![DesiredBackend {
                addr: backend,
                port: 80,
                local,
                policed: false,
            }],
            no_snat: false,
            drop_if_empty: false,
            affinity_timeout_s: 0,
        },
    )
}

impl Rig {
    /// Inside the namespace: loads the object with maps sized for
    /// `services`, programs them, attaches XDP to eth0 (a test run with an
    /// ingress ifindex needs the device's XDP receive queue).
    fn new(services: u64) -> Result<Rig> {
        let fillers = services.saturating_sub(2);
        let frontends = u32::try_from(fillers + 16)
            .context("too many Services")?
            .max(forwarder_common::MAX_FRONTENDS);
        let backends = frontends.max(forwarder_common::MAX_BACKENDS);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FRONTENDS, frontends)
            .map_max_entries(map_names::BACKENDS, backends)
            .load(&forwarder::kfuncs::prepared_object()?.0)
            .context("loading the forwarder's eBPF object")?;
        let mut maps = Maps::take(&mut ebpf)?;
        let (eth0, _cali) = netns::configure_test_run_node(&mut maps)?;
        let config = Config {
            snat_port_min: 1024,
            snat_port_max: 65_535,
            ..Config::default()
        };
        maps.config.set(0, config, 0)?;
        let desired = Desired {
            frontends: [
                measured(NP_REMOTE, REMOTE_POD, false),
                measured(NP_LOCAL, LOCAL_POD, true),
            ]
            .into_iter()
            .collect(),
        };
        let ops = plan::plan(&desired, &maps.snapshot()?)?;
        maps.apply(&ops)?;
        // Fillers: written directly (plan refuses more than MAX_FRONTENDS,
        // 65,536, which 100,000 Services exceed), with backend sets of their own.
        for i in 0..fillers {
            let i32_ = u32::try_from(i).context("filler index")?;
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(203, 0, 113, 0)) + i32_ / 2768);
            let port = 30000 + (i32_ % 2768) as u16;
            let set = 1_000_000 + i32_;
            maps.backends.insert(
                BackendKey {
                    backend_set: set,
                    index: 0,
                },
                Backend {
                    addr_be: u32::from_ne_bytes(
                        Ipv4Addr::new(10, 244, 2, 11 + (i % 200) as u8).octets(),
                    ),
                    port_be: 8080u16.to_be(),
                    ..Backend::default()
                },
                0,
            )?;
            maps.frontends
                .insert(
                    FrontendKey {
                        addr_be: u32::from_ne_bytes(addr.octets()),
                        port_be: port.to_be(),
                        proto: IPPROTO_TCP,
                        _pad: 0,
                    },
                    Frontend {
                        backend_set: set,
                        backend_count: 1,
                        ..Frontend::default()
                    },
                    0,
                )
                .with_context(|| format!("writing filler frontend {i}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::XDP)
            .context("xdp program")?
            .try_into()?;
        xdp.load().context("loading xdp_ingress")?;
        xdp.attach_to_if_index(eth0, XdpMode::Driver)
            .context("attaching XDP to eth0")?;
        let empty = Prog::xdp_const("bench_empty", bpf::XDP_PASS)?;
        Ok(Rig {
            ebpf,
            maps,
            empty,
            eth0,
        })
    }

    fn prog_fd(&self) -> Result<i32> {
        use std::os::fd::{AsFd, AsRawFd};
        let prog: &Xdp = self
            .ebpf
            .program(program_names::XDP)
            .context("xdp program")?
            .try_into()?;
        Ok(prog.fd()?.as_fd().as_raw_fd())
    }

    fn clear_conntrack(&mut self) -> Result<()> {
        for map in [&mut self.maps.conntrack, &mut self.maps.ct_half_open] {
            let keys: Vec<CtKey> = map
                .keys()
                .collect::<Result<_, _>>()
                .context("listing conntrack")?;
            for k in keys {
                let _ = map.remove(&k);
            }
        }
        Ok(())
    }

    /// Moves every half-open flow to the established table, as the datapath
    /// does once the handshake completes: the "established" cases measure
    /// flows found by the first lookup.
    fn establish_all(&mut self) -> Result<()> {
        let flows: Vec<(CtKey, forwarder_common::CtEntry)> = self
            .maps
            .ct_half_open
            .iter()
            .collect::<Result<_, _>>()
            .context("listing half-open flows")?;
        for (k, mut e) in flows {
            e.state = forwarder_common::CT_STATE_ESTABLISHED;
            self.maps
                .conntrack
                .insert(k, e, 0)
                .context("establishing a flow")?;
            let _ = self.maps.ct_half_open.remove(&k);
        }
        Ok(())
    }

    /// Median kernel duration of `calls` single runs, each on a fresh copy of
    /// the frame `frame(j)`; checks the verdict.
    fn single(
        &self,
        fd: i32,
        calls: u32,
        want: u32,
        frame: impl Fn(u32) -> Result<Vec<u8>>,
    ) -> Result<f64> {
        let mut d = Vec::with_capacity(calls as usize);
        for j in 0..calls {
            let f = frame(j)?;
            let r = bpf::test_run(fd, &f, self.eth0, 1, None)?;
            if r.retval != want {
                bail!("verdict {} instead of {want} (call {j})", r.retval);
            }
            d.push(f64::from(r.duration_ns));
        }
        median(&d).context("no samples")
    }

    fn repeated(&self, fd: i32, frame: &[u8], repeat: u32, want: u32) -> Result<f64> {
        let r = bpf::test_run(fd, frame, self.eth0, repeat, None)?;
        ensure!(r.retval == want, "verdict {} instead of {want}", r.retval);
        Ok(f64::from(r.duration_ns))
    }

    fn measure(
        &mut self,
        results: &mut Results,
        services: u64,
        calls: u32,
        repeat: u32,
    ) -> Result<()> {
        let fd = self.prog_fd()?;
        let empty = self.empty.fd();
        let macs = (CLIENT_MAC, ETH0_MAC);
        let pass = bpf::XDP_PASS as u32;
        let tx = bpf::XDP_TX as u32;
        self.clear_conntrack()?;
        // The established flows.
        let est_remote = frames::tcp(macs, (CLIENT, 40000), (NODE, NP_REMOTE), false, 0)?;
        let est_local = frames::tcp(macs, (CLIENT, 40001), (NODE, NP_LOCAL), false, 0)?;
        let syn_remote = frames::tcp(macs, (CLIENT, 40000), (NODE, NP_REMOTE), true, 0)?;
        let syn_local = frames::tcp(macs, (CLIENT, 40001), (NODE, NP_LOCAL), true, 0)?;
        ensure!(bpf::test_run(fd, &syn_remote, self.eth0, 1, None)?.retval == tx);
        ensure!(bpf::test_run(fd, &syn_local, self.eth0, 1, None)?.retval == pass);
        self.establish_all()?;
        let miss = frames::tcp(macs, (CLIENT, 40002), (NODE, NP_MISS), false, 0)?;
        let arp = frames::arp(CLIENT_MAC, CLIENT, NODE);

        let mut single = Vec::new();
        single.push((
            "empty",
            self.single(empty, calls, pass, |_| Ok(est_remote.clone()))?,
        ));
        single.push((
            "established",
            self.single(fd, calls, tx, |_| Ok(est_remote.clone()))?,
        ));
        single.push((
            "established-local",
            self.single(fd, calls, pass, |_| Ok(est_local.clone()))?,
        ));
        single.push(("miss", self.single(fd, calls, pass, |_| Ok(miss.clone()))?));
        single.push(("non-ip", self.single(fd, calls, pass, |_| Ok(arp.clone()))?));
        single.push((
            "new-flow",
            self.single(fd, calls, tx, |j| {
                frames::tcp(
                    macs,
                    (CLIENT, 1024 + (j % 60000) as u16),
                    (NODE, NP_REMOTE),
                    true,
                    0,
                )
            })?,
        ));
        self.clear_conntrack()?;
        let base = single[0].1;
        for (case, v) in &single {
            results.push(M, case, "F", services, "ns/packet single-shot", *v);
            if *case != "empty" {
                results.push(M, case, "F", services, "net ns/packet", v - base);
            }
        }
        // Large repeat, for the cases that leave the packet as it was.
        ensure!(bpf::test_run(fd, &syn_local, self.eth0, 1, None)?.retval == pass);
        self.establish_all()?;
        let empty_rep = self.repeated(empty, &est_local, repeat, pass)?;
        results.push(M, "empty", "F", services, "ns/packet repeat", empty_rep);
        for (case, frame) in [
            ("established-local", &est_local),
            ("miss", &miss),
            ("non-ip", &arp),
        ] {
            let v = self.repeated(fd, frame, repeat, pass)?;
            results.push(M, case, "F", services, "ns/packet repeat", v);
            results.push(
                M,
                case,
                "F",
                services,
                "net ns/packet repeat",
                v - empty_rep,
            );
        }
        self.clear_conntrack()?;
        Ok(())
    }
}
