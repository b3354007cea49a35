//! Measurements 2, 3 and 6 on the path rig: forwarding throughput per
//! variant, cost per new flow, and the forwarding CPU per packet.
//!
//! Variants: A (XDP_DROP at the node), B (bare XDP redirect to the pod's
//! veth), C0 (kernel forwarding, no rules), F (the forwarder daemon), K
//! (kube-proxy's rules, iptables-legacy and iptables-nft, measured Service
//! first and last in the chains). A, B and C0 do not depend on the number
//! of Services; F and K are measured at 1, 1,000, 2,767 and 10,000.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{bail, Context, Result};

use super::{
    bpf::{self, Prog},
    rig::{self, Rig, RigOptions},
    scales,
    scenario::{self, Position, Scenario},
    Options, Results,
};
use crate::kube_proxy::Backend;

pub const SCALES: [u64; 4] = [1, 1_000, 2_767, 10_000];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    A,
    B,
    C0,
    F,
    K(Backend, Position),
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::A => "A".into(),
            Variant::B => "B".into(),
            Variant::C0 => "C0".into(),
            Variant::F => "F".into(),
            Variant::K(b, _) => format!("K-{}", b.name()),
        }
    }

    fn case(self) -> &'static str {
        match self {
            Variant::K(_, p) => p.name(),
            _ => "",
        }
    }

    /// Where its frames go: the nodePort, or the pod itself (no NAT).
    fn destination(self) -> (Ipv4Addr, u16) {
        match self {
            Variant::F | Variant::K(..) => (scenario::NODE_IP, scenario::UDP_NODE_PORT),
            _ => (scenario::POD_IP, scenario::UDP_PORT),
        }
    }
}

struct Sizes {
    frames: u32,
    flows: u32,
}

/// One throughput sample: frames delivered to the pod (to the node for A)
/// per second, and the forwarding CPU per delivered frame.
struct Sample {
    delivered: u64,
    mpps: f64,
    /// Delivered over wall time (includes the test run's setup/teardown).
    wall_mpps: f64,
    fwd_ns: Option<f64>,
    gen_ns: f64,
}

fn sample(rig: &Rig, variant: Variant, gen: &Prog, frame: &[u8], count: u32) -> Result<Sample> {
    let (ns, iface) = if variant == Variant::A {
        (rig.node.name(), "eth0")
    } else {
        (rig.pod.name(), "eth0")
    };
    let rx0 = rig::rx_packets(ns, iface)?;
    let cpu0 = rig.forwarding_cpu_ns();
    let start = Instant::now();
    let (gen_time, kernel_ns) = rig.send(gen, frame, count)?;
    // Wait for the queues to drain: until the counter stops moving.
    let mut last = rig::rx_packets(ns, iface)?;
    let mut last_change = Instant::now();
    let mut still = 0;
    for _ in 0..2000 {
        std::thread::sleep(std::time::Duration::from_millis(1));
        let now = rig::rx_packets(ns, iface)?;
        if now != last {
            last = now;
            last_change = Instant::now();
            still = 0;
        } else {
            still += 1;
            if still >= 5 {
                break;
            }
        }
    }
    let cpu1 = rig.forwarding_cpu_ns();
    let delivered = last.saturating_sub(rx0);
    let wall = (last_change.max(start + gen_time) - start).as_secs_f64();
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!(
            "bench: debug: {} sent {count} in {gen_time:?} ({kernel_ns} ns/frame in the kernel), \
             delivered {delivered}, wall {wall:.6}s",
            variant.name()
        );
    }
    if delivered == 0 {
        bail!(
            "{}: nothing delivered ({count} frames sent in {gen_time:?})",
            variant.name()
        );
    }
    // Inline (NAPI in softirq on the generator's CPU): the kernel's time
    // covers generator and path; threaded: only the generator, and the
    // delivered rate is what the path kept up with over the wall time.
    let mpps = if rig.threaded() {
        delivered as f64 / wall / 1e6
    } else {
        delivered as f64 * 1e3 / (kernel_ns * f64::from(count))
    };
    Ok(Sample {
        delivered,
        mpps,
        wall_mpps: delivered as f64 / wall / 1e6,
        fwd_ns: (rig.threaded() && rig.cpus.forwarding.is_some())
            .then(|| (cpu1.saturating_sub(cpu0)) as f64 / delivered as f64),
        gen_ns: kernel_ns,
    })
}

/// Builds the rig for `variant` at `services`.
fn setup(variant: Variant, services: u64) -> Result<Rig> {
    let mut rig = Rig::build(&RigOptions {
        sink: true,
        server: false,
    })?;
    match variant {
        Variant::A => {
            let drop = Prog::xdp_const("bench_drop", bpf::XDP_DROP)?;
            rig.set_node_xdp(&drop)?;
        }
        Variant::B => {
            rig.set_pod_xdp_pass()?;
            let redirect = Prog::xdp_redirect(rig.node_cali)?;
            rig.set_node_xdp(&redirect)?;
        }
        Variant::C0 => {}
        Variant::F => rig.start_forwarder(&Scenario::new(services, Position::Last))?,
        Variant::K(backend, position) => {
            let took = rig.install_kube_proxy(&Scenario::new(services, position), backend)?;
            eprintln!(
                "bench: kube-proxy rules ({}, {services} Services) loaded in {took:?}",
                backend.name()
            );
        }
    }
    Ok(rig)
}

/// Throughput (and forwarding CPU) runs, then new-flow bursts.
fn measure(
    options: &Options,
    results: &mut Results,
    variant: Variant,
    services: u64,
    sizes: &Sizes,
) -> Result<()> {
    let label = format!(
        "{} {} at {services} Services",
        variant.name(),
        variant.case()
    );
    eprintln!("bench: [2] {label}");
    let mut rig = setup(variant, services).with_context(|| format!("setting up {label}"))?;
    let frame = rig::udp_frame(rig::CLIENT_IP, variant.destination())?;
    let (gen, _) = rig::generator(&frame, false)?;
    // Warm-up: the flow's first packet, caches, conntrack.
    sample(&rig, variant, &gen, &frame, sizes.frames / 10 + 1)
        .with_context(|| format!("warm-up of {label}"))?;
    let (name, case) = (variant.name(), variant.case());
    if options.wants(2) || options.wants(3) {
        // Generator and path on one CPU (NAPI in softirq right after each
        // batch): ns/packet is generator + path; A is the floor.
        for _ in 0..options.runs {
            let s = sample(&rig, variant, &gen, &frame, sizes.frames)?;
            results.push(2, case, &name, services, "Mpps", s.mpps);
            results.push(2, case, &name, services, "ns/packet", 1e3 / s.mpps);
            results.push(2, case, &name, services, "wall-clock Mpps", s.wall_mpps);
            results.push(
                2,
                case,
                &name,
                services,
                "delivered %",
                s.delivered as f64 * 100.0 / f64::from(sizes.frames),
            );
        }
    }
    if options.wants(3) && matches!(variant, Variant::F | Variant::K(..) | Variant::C0) {
        for run in 0..options.runs {
            // A source address no earlier burst used, a new port per frame.
            let src = Ipv4Addr::new(198, 18, (run / 250) as u8, (run % 250 + 1) as u8);
            let frame = rig::udp_frame(src, variant.destination())?;
            let (gen, _map) = rig::generator(&frame, true)?;
            if matches!(variant, Variant::K(..) | Variant::C0) {
                rig.flush_conntrack()?;
            }
            let s = sample(&rig, variant, &gen, &frame, sizes.flows)?;
            results.push(3, case, &name, services, "Mpps new flows", s.mpps);
            results.push(3, case, &name, services, "ns/packet", 1e3 / s.mpps);
            results.push(
                3,
                case,
                &name,
                services,
                "delivered %",
                s.delivered as f64 * 100.0 / f64::from(sizes.flows),
            );
        }
    }
    if let Some(d) = rig.daemon() {
        datapath_counters(results, d, services, "after throughput and new flows");
    }
    if !options.wants(6) || rig.cpus.forwarding.is_none() {
        return Ok(());
    }
    rig.set_threaded(true)?;
    sample(&rig, variant, &gen, &frame, sizes.frames / 10 + 1)
        .with_context(|| format!("warm-up of {label} with threaded NAPI"))?;
    for _ in 0..options.runs {
        let s = sample(&rig, variant, &gen, &frame, sizes.frames)?;
        results.push(6, case, &name, services, "generator ns/frame", s.gen_ns);
        if let Some(f) = s.fwd_ns {
            results.push(6, case, &name, services, "forwarding ns/packet", f);
            if f > 0.0 {
                results.push(
                    6,
                    case,
                    &name,
                    services,
                    "forwarding capacity Mpps",
                    1e3 / f,
                );
            }
        }
    }
    Ok(())
}

/// Notes the forwarder's own reason counters (what its datapath did with the
/// packets: translated in XDP/tc, or passed to the kernel), so that F is
/// known to be the forwarder's work.
fn datapath_counters(results: &mut Results, daemon: &crate::daemon::Daemon, n: u64, when: &str) {
    match daemon.stats_json() {
        Ok(v) => {
            let mut parts = Vec::new();
            if let Some(reasons) = v.get("reasons").and_then(|r| r.as_object()) {
                for (k, c) in reasons {
                    if let Some(c) = c.as_u64().filter(|c| *c > 0) {
                        parts.push(format!("{k} {c}"));
                    }
                }
            }
            results.note(
                2,
                format!(
                    "F at {n} Services, forwarder counters {when}: {}",
                    parts.join(", ")
                ),
            );
        }
        Err(e) => results.note(
            2,
            format!("F at {n} Services: no forwarder counters: {e:#}"),
        ),
    }
}

/// Per-run ratios `num / den` of `metric` (pairing the i-th runs).
fn ratios(
    results: &mut Results,
    m: u32,
    metric: &str,
    num: (&str, &str),
    den: (&str, &str),
    services: (u64, u64),
    name: &str,
) {
    let a = results
        .find(m, num.0, num.1, services.0, metric)
        .map(|s| s.values.clone());
    let b = results
        .find(m, den.0, den.1, services.1, metric)
        .map(|s| s.values.clone());
    if let (Some(a), Some(b)) = (a, b) {
        for (x, y) in a.iter().zip(&b) {
            if *y > 0.0 {
                results.push(m, "", name, services.0, &format!("ratio {metric}"), x / y);
            }
        }
    }
}

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    let sizes = if options.quick {
        Sizes {
            frames: 200_000,
            flows: 5_000,
        }
    } else {
        Sizes {
            frames: 2_000_000,
            flows: 20_000,
        }
    };
    let backends = Backend::available();
    if backends.is_empty() {
        results.note(2, "no iptables-legacy nor iptables-nft here: no K variant");
    }
    if rig::Cpus::detect().forwarding.is_none() {
        results.note(
            6,
            "a single CPU: the generator and the forwarding cannot be separated",
        );
    }
    let mut errors = Vec::new();
    let mut attempt = |results: &mut Results, v: Variant, n: u64| {
        if let Err(e) = measure(options, results, v, n, &sizes) {
            eprintln!("bench: {} {} at {n}: {e:#}", v.name(), v.case());
            errors.push(format!("{} {} at {n} Services: {e:#}", v.name(), v.case()));
        }
    };
    for v in [Variant::A, Variant::B, Variant::C0] {
        attempt(results, v, 0);
    }
    let full_scales = scales(options, &SCALES);
    for &n in &full_scales {
        attempt(results, Variant::F, n);
        for &b in &backends {
            for p in [Position::First, Position::Last] {
                attempt(results, Variant::K(b, p), n);
            }
        }
    }
    // Path cost above the floor (A), within each run.
    let floor = results
        .find(2, "", "A", 0, "ns/packet")
        .map(|s| s.values.clone());
    if let Some(floor) = floor {
        let others: Vec<(u32, String, String, u64, Vec<f64>)> = results
            .series
            .iter()
            .filter(|s| {
                (s.measurement == 2 || s.measurement == 3)
                    && s.metric == "ns/packet"
                    && s.variant != "A"
            })
            .map(|s| {
                (
                    s.measurement,
                    s.case.clone(),
                    s.variant.clone(),
                    s.services,
                    s.values.clone(),
                )
            })
            .collect();
        for (m, case, variant, n, values) in others {
            let metric = if m == 2 {
                "path ns/packet (minus A)"
            } else {
                "ns/new flow (minus A)"
            };
            for (v, f) in values.iter().zip(&floor) {
                results.push(m, &case, &variant, n, metric, v - f);
            }
        }
    } else if options.wants(2) || options.wants(3) {
        results.note(2, "no floor (A) measured: no path cost above the floor");
    }
    // Ratios within the run, and the targets.
    for &n in &full_scales {
        ratios(results, 2, "Mpps", ("", "F"), ("", "B"), (n, 0), "F/B");
        ratios(
            results,
            6,
            "forwarding capacity Mpps",
            ("", "F"),
            ("", "B"),
            (n, 0),
            "F/B",
        );
        for &b in &backends {
            let k = format!("K-{}", b.name());
            ratios(
                results,
                2,
                "Mpps",
                ("", "F"),
                ("last", &k),
                (n, n),
                &format!("F/{k}"),
            );
            ratios(
                results,
                6,
                "forwarding capacity Mpps",
                ("", "F"),
                ("last", &k),
                (n, n),
                &format!("F/{k}"),
            );
            ratios(
                results,
                3,
                "ns/new flow (minus A)",
                ("last", &k),
                ("", "F"),
                (n, n),
                &format!("{k}/F"),
            );
        }
    }
    notes(results, &full_scales, &backends);
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn notes(results: &mut Results, scales: &[u64], backends: &[Backend]) {
    let med = |r: &Results, m: u32, case: &str, v: &str, n: u64, metric: &str| {
        r.find(m, case, v, n, metric).and_then(|s| s.median())
    };
    let mut out = Vec::new();
    for &n in scales {
        if let Some(r) = med(results, 2, "", "F/B", n, "ratio Mpps") {
            out.push((
                2,
                format!(
                    "F/B (Mpps, generator and path on one CPU) at {n} Services: {r:.2} \
                     (target ≥ 0.85: {})",
                    if r >= 0.85 { "met" } else { "NOT met" }
                ),
            ));
        }
        if let Some(r) = med(results, 6, "", "F/B", n, "ratio forwarding capacity Mpps") {
            out.push((
                6,
                format!(
                    "F/B (forwarding capacity = 1 / forwarding CPU per packet) at {n} Services: \
                     {r:.2} (target ≥ 0.85: {})",
                    if r >= 0.85 { "met" } else { "NOT met" }
                ),
            ));
        }
        for b in backends {
            let k = format!("K-{}", b.name());
            if let Some(r) = med(results, 2, "", &format!("F/{k}"), n, "ratio Mpps") {
                out.push((
                    2,
                    format!(
                        "F/{k} (one flow) at {n} Services: {r:.2}x (target ≥ 5x at 10,000: {})",
                        if r >= 5.0 { "met" } else { "NOT met" }
                    ),
                ));
            }
            if let Some(r) = med(
                results,
                3,
                "",
                &format!("{k}/F"),
                n,
                "ratio ns/new flow (minus A)",
            ) {
                out.push((
                    3,
                    format!(
                        "{k}/F per new flow at {n} Services: {r:.2}x (target ≥ 50x at 10,000: {})",
                        if r >= 50.0 { "met" } else { "NOT met" }
                    ),
                ));
            }
        }
    }
    for (m, t) in out {
        results.note(m, t);
    }
}
