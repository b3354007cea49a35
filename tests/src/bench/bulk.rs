//! Measurement 7: bulk TCP throughput through the nodePort, several flows at
//! once, on the cluster testbed of the integration tests
//! ([`crate::topology`]: frames reach the nodes at the MTU as from a NIC, GRO
//! on their eth0), for every variant on the same wire.
//!
//! Variants: **F** the forwarder daemon on node1; **K-legacy / K-nft**
//! kube-proxy's rules on node1; **C0** plain routing, no rule and no NAT: the
//! client reaches the pods' addresses through node1 (a route on the client;
//! node2 routes the client through node1 too, so the remote path is the same
//! client → node1 → node2 → pod and back as with NAT). Cases: download
//! (pod → client) and upload (client → pod), to the pod on node1 (local) and
//! to the pod on node2 (remote). `podserver` in the pod serves `GET /zeros`
//! and takes `PUT /zeros` (no content to generate or check); the client runs
//! in this process, [`FLOWS`] connections, and counts the bytes moved after
//! a ramp-up.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{Options, Results};
use crate::{
    daemon::Daemon,
    kube_proxy::{self, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService},
    netns,
    topology::{
        Cluster, ClusterOptions, CLIENT_IP, HTTP_NODE_PORT, HTTP_PORT, UDP_NODE_PORT, UDP_PORT,
    },
};

const M: u32 = 7;
/// Connections at once.
pub const FLOWS: usize = 4;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes a connection asks for (more than any measurement moves).
const ENDLESS: u64 = 1 << 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    F,
    K(Backend),
    C0,
}

impl Variant {
    fn name(self) -> String {
        match self {
            Variant::F => "F".into(),
            Variant::K(b) => format!("K-{}", b.name()),
            Variant::C0 => "C0".into(),
        }
    }

    /// Services programmed (0: none, plain routing).
    fn services(self) -> u64 {
        match self {
            Variant::C0 => 0,
            _ => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Local,
    Remote,
}

impl Target {
    fn node(self) -> &'static str {
        match self {
            Target::Local => "node1",
            Target::Remote => "node2",
        }
    }

    fn service(self) -> &'static str {
        match self {
            Target::Local => "bulk-local",
            Target::Remote => "bulk-remote",
        }
    }

    fn node_ports(self) -> (u16, u16) {
        match self {
            Target::Local => (HTTP_NODE_PORT, UDP_NODE_PORT),
            Target::Remote => (HTTP_NODE_PORT + 1, UDP_NODE_PORT + 1),
        }
    }

    fn cluster_ip(self) -> Ipv4Addr {
        match self {
            Target::Local => Ipv4Addr::new(10, 96, 0, 10),
            Target::Remote => Ipv4Addr::new(10, 96, 0, 11),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Local => "local",
            Target::Remote => "remote",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Pod → client (`GET /zeros`).
    Download,
    /// Client → pod (`PUT /zeros`).
    Upload,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// A cluster set up for one variant. Fields drop in order: the daemon
/// before the cluster.
struct Testbed {
    daemon: Option<Daemon>,
    cluster: Cluster,
    variant: Variant,
}

impl Testbed {
    fn build(variant: Variant) -> Result<Testbed> {
        let cluster = Cluster::build(ClusterOptions::default()).context("building the cluster")?;
        let node1 = cluster.node_ns(1).to_string();
        let targets = [Target::Local, Target::Remote];
        for t in targets {
            let pod = cluster.pod_on(t.node())?;
            let (http, udp) = t.node_ports();
            cluster.write_service_with_node_ports(t.service(), &[pod], http, udp)?;
        }
        // No ICMP redirects: node1 forwards out of the interface it received
        // on for the remote pod, and a redirect would shorten C0's path.
        for key in [
            "ipv4.conf.all.send_redirects",
            "ipv4.conf.eth0.send_redirects",
        ] {
            netns::sysctl_in(&node1, key, "0")?;
        }
        let mut daemon = None;
        match variant {
            Variant::F => {
                daemon = Some(cluster.start_forwarder(1, &cluster.daemon_options(1))?);
            }
            Variant::K(backend) => {
                let cidr: Cidr = "10.244.0.0/16".parse()?;
                let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
                let services = targets
                    .iter()
                    .map(|&t| kube_proxy_service(&cluster, t))
                    .collect::<Result<Vec<_>>>()?;
                kube_proxy::install(
                    &node1,
                    &kube_proxy::restore_input(&config, &services),
                    backend,
                )?;
            }
            Variant::C0 => {
                netns::ip_in(
                    cluster.client_ns(),
                    &[
                        "route",
                        "add",
                        "10.244.0.0/16",
                        "via",
                        &cluster.node(1).ip.to_string(),
                    ],
                )?;
                netns::ip_in(
                    cluster.node_ns(2),
                    &[
                        "route",
                        "add",
                        &format!("{CLIENT_IP}/32"),
                        "via",
                        &cluster.node(1).ip.to_string(),
                    ],
                )?;
            }
        }
        Ok(Testbed {
            daemon,
            cluster,
            variant,
        })
    }

    /// Where the client connects for `target`: the nodePort on node1, or
    /// (C0) the pod itself.
    fn destination(&self, target: Target) -> Result<SocketAddr> {
        Ok(SocketAddr::V4(match self.variant {
            Variant::C0 => SocketAddrV4::new(self.cluster.pod_on(target.node())?.ip, HTTP_PORT),
            _ => SocketAddrV4::new(self.cluster.node(1).ip, target.node_ports().0),
        }))
    }
}

fn kube_proxy_service(cluster: &Cluster, target: Target) -> Result<KpService> {
    let pod = cluster.pod_on(target.node())?;
    let (http, udp) = target.node_ports();
    Ok(
        KpService::new("default", target.service(), target.cluster_ip())
            .port(KpPort::tcp("http", HTTP_PORT).with_node_port(http))
            .port(KpPort::udp("dns", UDP_PORT).with_node_port(udp))
            .endpoint(
                KpEndpoint::new(pod.ip)
                    .tcp("http", HTTP_PORT)
                    .udp("dns", UDP_PORT)
                    .on_node(&pod.node),
            ),
    )
}

/// One connection of a measurement, connected from the client namespace,
/// with its request sent.
fn open(cluster: &Cluster, addr: SocketAddr, direction: Direction) -> Result<TcpStream> {
    let stream = netns::run_in(cluster.client_ns(), move || {
        TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = match direction {
        Direction::Download => format!(
            "GET /zeros?size={ENDLESS} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        ),
        Direction::Upload => format!(
            "PUT /zeros HTTP/1.1\r\nHost: bench\r\nContent-Length: {ENDLESS}\r\n\
             Connection: close\r\n\r\n"
        ),
    };
    (&stream)
        .write_all(request.as_bytes())
        .context("sending the request")?;
    Ok(stream)
}

/// [`FLOWS`] connections moving bytes in `direction` for `ramp + duration`;
/// the rate is what they moved together during `duration`, in Gbit/s.
fn measure_once(
    tb: &Testbed,
    target: Target,
    direction: Direction,
    ramp: Duration,
    duration: Duration,
) -> Result<f64> {
    let addr = tb.destination(target)?;
    let streams = (0..FLOWS)
        .map(|_| open(&tb.cluster, addr, direction))
        .collect::<Result<Vec<_>>>()?;
    let moved: Vec<Arc<AtomicU64>> = (0..FLOWS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let stop = AtomicBool::new(false);
    let total =
        |moved: &[Arc<AtomicU64>]| moved.iter().map(|m| m.load(Ordering::Relaxed)).sum::<u64>();
    let (bytes, elapsed, errors) = std::thread::scope(|s| {
        let workers: Vec<_> = streams
            .iter()
            .zip(&moved)
            .map(|(stream, counter)| {
                let stop = &stop;
                s.spawn(move || -> std::io::Result<()> {
                    let mut buf = vec![0u8; 256 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        let n = match direction {
                            Direction::Download => (&*stream).read(&mut buf)?,
                            Direction::Upload => (&*stream).write(&buf)?,
                        };
                        if n == 0 {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the pod closed the connection",
                            ));
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(ramp);
        let (b0, t0) = (total(&moved), Instant::now());
        std::thread::sleep(duration);
        let (b1, t1) = (total(&moved), Instant::now());
        stop.store(true, Ordering::Relaxed);
        for stream in &streams {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let errors: Vec<String> = workers
            .into_iter()
            .filter_map(|w| match w.join() {
                Ok(Ok(())) => None,
                // Shutting the sockets down may interrupt a read or write.
                Ok(Err(_)) if stop.load(Ordering::Relaxed) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("a worker panicked".into()),
            })
            .collect();
        (b1.saturating_sub(b0), t1 - t0, errors)
    });
    if !errors.is_empty() {
        bail!("{} to {target:?}: {}", direction.name(), errors.join("; "));
    }
    if bytes == 0 {
        bail!(
            "{} to {target:?}: nothing moved in {duration:?}",
            direction.name()
        );
    }
    Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

fn cases() -> Vec<(Direction, Target)> {
    let mut v = Vec::new();
    for target in [Target::Local, Target::Remote] {
        for direction in [Direction::Download, Direction::Upload] {
            v.push((direction, target));
        }
    }
    v
}

fn case_name(direction: Direction, target: Target) -> String {
    format!("{}-{}", direction.name(), target.name())
}

fn measure(options: &Options, results: &mut Results, variant: Variant) -> Result<()> {
    eprintln!("bench: [7] {}", variant.name());
    let tb = Testbed::build(variant).with_context(|| format!("setting up {}", variant.name()))?;
    let (ramp, duration) = if options.quick {
        (Duration::from_millis(200), Duration::from_millis(500))
    } else {
        (Duration::from_millis(500), Duration::from_secs(3))
    };
    for run in 0..options.runs {
        for (direction, target) in cases() {
            let gbps = measure_once(&tb, target, direction, ramp, duration)
                .with_context(|| format!("{} run {run}", variant.name()))?;
            results.push(
                M,
                &case_name(direction, target),
                &variant.name(),
                variant.services(),
                "Gbit/s",
                gbps,
            );
        }
    }
    if let Some(d) = &tb.daemon {
        let reasons = match d.stats_json() {
            Ok(v) => v["reasons"]
                .as_object()
                .map(|r| {
                    r.iter()
                        .filter_map(|(k, c)| {
                            c.as_u64().filter(|c| *c > 0).map(|c| format!("{k} {c}"))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            Err(e) => format!("<stats failed: {e:#}>"),
        };
        let pass = match d.flow_pass_totals() {
            Ok(t) if t.is_empty() => "none".to_string(),
            Ok(t) => format!("{t:?}"),
            Err(e) => format!("<{e:#}>"),
        };
        results.note(
            M,
            format!(
                "F, forwarder counters after the bulk runs: {reasons}; packets of its flows \
                 handed to the kernel: {pass}"
            ),
        );
    }
    Ok(())
}

/// Per-run ratios of two variants' Gbit/s in one case.
fn ratios(results: &mut Results, case: &str, num: Variant, den: Variant) {
    let get = |r: &Results, v: Variant| {
        r.find(M, case, &v.name(), v.services(), "Gbit/s")
            .map(|s| s.values.clone())
    };
    if let (Some(a), Some(b)) = (get(results, num), get(results, den)) {
        let name = format!("{}/{}", num.name(), den.name());
        for (x, y) in a.iter().zip(&b) {
            if *y > 0.0 {
                results.push(M, case, &name, 0, "ratio Gbit/s", x / y);
            }
        }
    }
}

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    let backends = Backend::available();
    if backends.is_empty() {
        results.note(M, "no iptables-legacy nor iptables-nft here: no K variant");
    }
    let mut variants = vec![Variant::F];
    variants.extend(backends.iter().map(|&b| Variant::K(b)));
    variants.push(Variant::C0);
    let mut errors = Vec::new();
    for &v in &variants {
        if let Err(e) = measure(options, results, v) {
            eprintln!("bench: [7] {}: {e:#}", v.name());
            errors.push(format!("{}: {e:#}", v.name()));
        }
    }
    for (direction, target) in cases() {
        let case = case_name(direction, target);
        for &v in variants.iter().filter(|v| **v != Variant::F) {
            ratios(results, &case, Variant::F, v);
        }
        let medians: Vec<String> = variants
            .iter()
            .filter_map(|&v| {
                results
                    .find(M, &case, &v.name(), v.services(), "Gbit/s")
                    .and_then(|s| s.median())
                    .map(|m| format!("{} {m:.2}", v.name()))
            })
            .collect();
        if !medians.is_empty() {
            results.note(
                M,
                format!("{case}, Gbit/s with {FLOWS} flows: {}", medians.join(", ")),
            );
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}
