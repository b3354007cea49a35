//! Measurement 4: real sockets through the nodePort. From the client
//! namespace, TCP connect + `GET /productpage` + close, one connection at a
//! time, and UDP request/response on one connected socket, to `podserver`
//! in the pod behind the nodePort; F (the forwarder) against K (kube-proxy's
//! rules, legacy and nft), at 1, 1,000 and 10,000 Services.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{
    quantile,
    rig::{Rig, RigOptions},
    scales,
    scenario::{self, Position, Scenario},
    Options, Results,
};
use crate::kube_proxy::Backend;

const M: u32 = 4;
pub const SCALES: [u64; 3] = [1, 1_000, 10_000];
const TIMEOUT: Duration = Duration::from_secs(2);

/// Latencies in microseconds of the successful requests, failures, wall time.
struct Load {
    latencies_us: Vec<f64>,
    failures: usize,
    wall: Duration,
}

fn tcp_once(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).context("connect")?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET /productpage HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .context("request")?;
    let mut buf = Vec::with_capacity(1024);
    s.read_to_end(&mut buf).context("response")?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!(
            "unexpected response {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        );
    }
    Ok(())
}

fn tcp_load(addr: SocketAddr, count: usize) -> Load {
    let mut latencies_us = Vec::with_capacity(count);
    let mut failures = 0;
    let start = Instant::now();
    for _ in 0..count {
        let t = Instant::now();
        match tcp_once(addr) {
            Ok(()) => latencies_us.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => failures += 1,
        }
    }
    Load {
        latencies_us,
        failures,
        wall: start.elapsed(),
    }
}

fn udp_load(addr: SocketAddr, count: usize) -> Result<Load> {
    let s = UdpSocket::bind("0.0.0.0:0").context("binding a UDP socket")?;
    s.connect(addr).context("connecting the UDP socket")?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut latencies_us = Vec::with_capacity(count);
    let mut failures = 0;
    let mut buf = [0u8; 512];
    let start = Instant::now();
    for i in 0..count {
        let t = Instant::now();
        s.send(format!("ping {i}").as_bytes()).context("send")?;
        match s.recv(&mut buf) {
            Ok(_) => latencies_us.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => failures += 1,
        }
    }
    Ok(Load {
        latencies_us,
        failures,
        wall: start.elapsed(),
    })
}

fn record(results: &mut Results, proto: &str, variant: &str, n: u64, mut load: Load) {
    load.latencies_us.sort_by(f64::total_cmp);
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)] {
        if let Some(v) = quantile(&load.latencies_us, q) {
            results.push(M, &format!("{proto}-{name}"), variant, n, "latency us", v);
        }
    }
    let done = load.latencies_us.len() as f64;
    results.push(
        M,
        proto,
        variant,
        n,
        "requests/s",
        done / load.wall.as_secs_f64().max(1e-9),
    );
    results.push(M, proto, variant, n, "failures", load.failures as f64);
}

fn measure(
    options: &Options,
    results: &mut Results,
    variant: &str,
    backend: Option<Backend>,
    n: u64,
) -> Result<()> {
    eprintln!("bench: [4] {variant} at {n} Services");
    let mut rig = Rig::build(&RigOptions {
        sink: false,
        server: true,
    })?;
    let sc = Scenario::new(n, Position::Last);
    match backend {
        None => rig.start_forwarder(&sc)?,
        Some(b) => {
            rig.install_kube_proxy(&sc, b)?;
        }
    }
    let (tcp_count, udp_count) = if options.quick {
        (200, 500)
    } else {
        (2_000, 5_000)
    };
    let tcp = SocketAddr::V4(SocketAddrV4::new(
        scenario::NODE_IP,
        scenario::HTTP_NODE_PORT,
    ));
    let udp = SocketAddr::V4(SocketAddrV4::new(
        scenario::NODE_IP,
        scenario::UDP_NODE_PORT,
    ));
    // Warm-up, and a check that the path works at all.
    rig.client
        .run(|| tcp_once(tcp).context("first TCP request through the nodePort"))?;
    for _ in 0..options.runs {
        let load = rig.client.run(|| Ok(tcp_load(tcp, tcp_count)))?;
        if load.latencies_us.is_empty() {
            bail!("{variant}: every TCP request failed");
        }
        record(results, "tcp", variant, n, load);
        let load = rig.client.run(|| udp_load(udp, udp_count))?;
        if load.latencies_us.is_empty() {
            bail!("{variant}: every UDP request failed");
        }
        record(results, "udp", variant, n, load);
    }
    Ok(())
}

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    let backends = Backend::available();
    let mut errors = Vec::new();
    let sc = scales(options, &SCALES);
    for &n in &sc {
        let mut variants: Vec<(String, Option<Backend>)> = vec![("F".into(), None)];
        variants.extend(
            backends
                .iter()
                .map(|b| (format!("K-{}", b.name()), Some(*b))),
        );
        for (v, b) in variants {
            if let Err(e) = measure(options, results, &v, b, n) {
                eprintln!("bench: [4] {v} at {n}: {e:#}");
                errors.push(format!("{v} at {n} Services: {e:#}"));
            }
        }
    }
    // Where the TCP tail comes from: equal for F and K at the smallest scale
    // means the end hosts, not the Service path.
    if let Some(&n) = sc.first() {
        let p99 = |v: &str| {
            results
                .find(M, "tcp-p99", v, n, "latency us")
                .and_then(|s| s.median())
        };
        let all: Vec<(String, f64)> = std::iter::once("F".to_string())
            .chain(backends.iter().map(|b| format!("K-{}", b.name())))
            .filter_map(|v| p99(&v).map(|x| (v, x)))
            .collect();
        let lo = all.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
        let hi = all.iter().map(|x| x.1).fold(0.0, f64::max);
        if all.len() > 1 && hi <= lo * 1.25 {
            results.note(
                M,
                format!(
                    "tcp p99 at {n} Services is about the same for every variant ({}): that tail \
                     does not come from the datapath that translates the packets, but from the \
                     client, the server or the shared machine",
                    all.iter()
                        .map(|(v, x)| format!("{v} {x:.0} µs"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
    // The target: our p99 below kube-proxy's p50, at the largest scale.
    if let Some(&n) = sc.last() {
        for proto in ["tcp", "udp"] {
            let ours = results
                .find(M, &format!("{proto}-p99"), "F", n, "latency us")
                .and_then(|s| s.median());
            for b in &backends {
                let k = format!("K-{}", b.name());
                let theirs = results
                    .find(M, &format!("{proto}-p50"), &k, n, "latency us")
                    .and_then(|s| s.median());
                if let (Some(a), Some(t)) = (ours, theirs) {
                    results.note(
                        M,
                        format!(
                            "{proto} at {n} Services: F p99 {a:.0} µs, {k} p50 {t:.0} µs \
                             (target F p99 < K p50: {})",
                            if a < t { "met" } else { "NOT met" }
                        ),
                    );
                }
            }
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}
