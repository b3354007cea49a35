//! Measurement 8: many concurrent TCP connections through one node to one
//! remote backend (issue 9: 30,000), on the integration tests' cluster: how
//! many the forwarder carried itself, and how many fell back to kube-proxy
//! because no source port was free for them (`pass_snat_exhausted`).
//!
//! Node1 runs the forwarder and kube-proxy's rules (a connection the
//! forwarder cannot source-NAT goes to kube-proxy whole, and works). The
//! Service's only endpoint is the pod on node2, port [`HOLD_PORT`], where
//! this process listens with a backlog larger than the connection count and
//! accepts none: each connection completes its handshake and waits in the
//! accept queue, costing the pod no descriptor and no thread (its podserver
//! serves one thread per connection). The client side is split over child
//! processes (`bench hold-connections`, at most [`PER_HOLDER`] each, within
//! an unprivileged open-file limit) in the client namespace, which uses
//! local ports 1024-65535.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use forwarder_common::CT_F_REPLY;

use super::{Options, Results};
use crate::{
    kube_proxy::{self, Backend, Cidr, KpConfig, KpEndpoint, KpPort, KpService},
    netns,
    topology::{service_manifest_with_node_ports, write_atomically, Cluster, ClusterOptions},
};

const M: u32 = 8;
const SERVICE: &str = "many-flows";
const NODE_PORT: u16 = 31390;
/// The backend's port: the connections' holder, in the remote pod.
pub const HOLD_PORT: u16 = 8080;
/// Connections at once (full run; `--quick` opens a tenth).
pub const FLOWS: usize = 30_000;
/// Connections one holder process opens (under a 20,000-file hard limit).
const PER_HOLDER: usize = 10_000;
/// Threads opening connections in each holder.
const OPENERS: usize = 8;
/// Two SYN retransmits: a connect that gets no answer by then counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// Raises the soft open-file limit to the hard one.
fn raise_nofile() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain struct passed by pointer for the calls' duration.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
    }
    Ok(limit.rlim_cur)
}

/// `bench hold-connections ADDR COUNT`: opens COUNT TCP connections to
/// ADDR, prints `open <n> failed <m>`, and holds them until stdin closes.
pub fn hold_main(args: &[String]) -> Result<()> {
    let [addr, count] = args else {
        bail!("usage: bench hold-connections ADDR COUNT");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let count: usize = count.parse().context("COUNT")?;
    let limit = raise_nofile()?;
    if count as u64 + 100 > limit {
        bail!("{count} connections need more than the open-file limit {limit}");
    }
    let (open, failed) = std::thread::scope(|s| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|i| {
                let share = count / OPENERS + usize::from(i < count % OPENERS);
                s.spawn(move || {
                    let mut open = Vec::with_capacity(share);
                    let mut failed = 0;
                    for _ in 0..share {
                        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                            Ok(c) => open.push(c),
                            Err(_) => failed += 1,
                        }
                    }
                    (open, failed)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(count);
        let mut failed = 0;
        for o in openers {
            let (open, f) = o.join().unwrap_or_default();
            all.extend(open);
            failed += f;
        }
        (all, failed)
    });
    println!("open {} failed {failed}", open.len());
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut rest);
    drop(open);
    Ok(())
}

/// The Service: nodePort [`NODE_PORT`] → the pod on node2, port [`HOLD_PORT`].
fn manifest(cluster: &Cluster) -> Result<String> {
    let pod = cluster.pod_on("node2")?;
    let y = service_manifest_with_node_ports(SERVICE, &[pod], NODE_PORT, NODE_PORT + 1);
    let http = crate::topology::HTTP_PORT;
    let y = y
        .replace(
            &format!("targetPort: {http}\n"),
            &format!("targetPort: {HOLD_PORT}\n"),
        )
        .replace(
            &format!("- name: http\n  protocol: TCP\n  port: {http}\n"),
            &format!("- name: http\n  protocol: TCP\n  port: {HOLD_PORT}\n"),
        );
    if !y.contains(&format!("port: {HOLD_PORT}\n")) {
        bail!("the Service manifest's layout changed: cannot set the target port");
    }
    Ok(y)
}

fn install_kube_proxy(cluster: &Cluster) -> Result<()> {
    let pod = cluster.pod_on("node2")?;
    let svc = KpService::new("default", SERVICE, std::net::Ipv4Addr::new(10, 96, 0, 20))
        .port(KpPort::tcp("http", crate::topology::HTTP_PORT).with_node_port(NODE_PORT))
        .endpoint(
            KpEndpoint::new(pod.ip)
                .tcp("http", HOLD_PORT)
                .on_node(&pod.node),
        );
    let cidr: Cidr = "10.244.0.0/16".parse()?;
    let config = KpConfig::new(&cluster.node(1).name, Some(cidr));
    let backend = *Backend::available()
        .first()
        .context("no iptables backend for kube-proxy's rules")?;
    kube_proxy::install(
        cluster.node_ns(1),
        &kube_proxy::restore_input(&config, &[svc]),
        backend,
    )
}

/// What one run found.
struct Found {
    opened: usize,
    failed: usize,
    carried: usize,
    exhausted: u64,
    seconds: f64,
}

fn measure_once(cluster: &Cluster, daemon: &crate::daemon::Daemon, flows: usize) -> Result<Found> {
    let pod = cluster.pod_on("node2")?;
    let backlog = flows + 1024;
    netns::sysctl_in(&pod.ns, "core.somaxconn", &backlog.to_string())?;
    let listener = netns::run_in(&pod.ns, || {
        TcpListener::bind(("0.0.0.0", HOLD_PORT)).context("binding the holder in the pod")
    })?;
    // Room for every connection in the accept queue (std listens with 128).
    // SAFETY: our listening socket's descriptor.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog as i32) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen");
    }
    let before = daemon.maps()?.reason_totals()?;
    let addr = SocketAddrV4::new(cluster.node(1).ip, NODE_PORT).to_string();
    let bench = std::env::current_exe().context("the bench binary")?;
    let bench = bench.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut left = flows;
    while left > 0 {
        let n = left.min(PER_HOLDER);
        left -= n;
        let mut cmd = netns::exec_command(
            cluster.client_ns(),
            &[bench.as_str(), "hold-connections", &addr, &n.to_string()],
        );
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a connection holder")?;
        holders.push(child);
    }
    let opened = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let read = std::thread::scope(|s| -> Result<()> {
        let readers: Vec<_> = holders
            .iter_mut()
            .map(|h| {
                let out = h.stdout.take();
                let (opened, failed) = (&opened, &failed);
                s.spawn(move || -> Result<()> {
                    let mut line = String::new();
                    BufReader::new(out.context("no stdout")?).read_line(&mut line)?;
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let [_, o, _, f] = words[..] else {
                        bail!("a holder said {line:?}");
                    };
                    opened.fetch_add(o.parse()?, Ordering::Relaxed);
                    failed.fetch_add(f.parse()?, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        for r in readers {
            r.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(())
    });
    let seconds = started.elapsed().as_secs_f64();
    // All open at once: count the forwarder's flows to the backend now.
    let counted = (|| -> Result<(usize, u64)> {
        read?;
        let maps = daemon.maps()?;
        let backend_be = u32::from(pod.ip).to_be();
        let port_be = HOLD_PORT.to_be();
        let carried = maps
            .conntrack
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(_, e)| {
                e.flags & CT_F_REPLY == 0
                    && e.new_daddr_be == backend_be
                    && e.new_dport_be == port_be
            })
            .count();
        let after = maps.reason_totals()?;
        Ok((
            carried,
            after["pass_snat_exhausted"] - before["pass_snat_exhausted"],
        ))
    })();
    for mut h in holders {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    drop(listener);
    let (carried, exhausted) = counted?;
    Ok(Found {
        opened: opened.into_inner(),
        failed: failed.into_inner(),
        carried,
        exhausted,
        seconds,
    })
}

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    if Backend::available().is_empty() {
        results.note(
            M,
            "no iptables here: no kube-proxy rules to fall back to, not run",
        );
        return Ok(());
    }
    let flows = if options.quick { FLOWS / 10 } else { FLOWS };
    let case = format!("{flows}-remote");
    for run in 0..options.runs {
        // A cluster per run: the last run's closed flows would hold their
        // source ports for the FIN timeout.
        let cluster = Cluster::build(ClusterOptions::default()).context("building the cluster")?;
        netns::sysctl_in(
            cluster.client_ns(),
            "ipv4.ip_local_port_range",
            "1024 65535",
        )?;
        write_atomically(
            &cluster.manifests_dir().join(format!("{SERVICE}.yaml")),
            &manifest(&cluster)?,
        )?;
        install_kube_proxy(&cluster)?;
        let daemon = cluster.start_forwarder(1, &cluster.daemon_options(1))?;
        let f = measure_once(&cluster, &daemon, flows).with_context(|| format!("run {run}"))?;
        let via_kube_proxy = f.opened.saturating_sub(f.carried);
        eprintln!(
            "bench: [8] run {run}: {} of {flows} connections open at once ({} failed) in {:.1} s; \
             the forwarder carried {}, kube-proxy {via_kube_proxy} ({} SYNs passed with \
             pass_snat_exhausted, retransmits included)",
            f.opened, f.failed, f.seconds, f.carried, f.exhausted
        );
        results.push(M, &case, "F", 1, "connections open", f.opened as f64);
        results.push(
            M,
            &case,
            "F",
            1,
            "carried by the forwarder",
            f.carried as f64,
        );
        results.push(
            M,
            &case,
            "F",
            1,
            "carried by kube-proxy",
            via_kube_proxy as f64,
        );
        results.push(
            M,
            &case,
            "F",
            1,
            "SYNs passed, snat exhausted",
            f.exhausted as f64,
        );
        results.push(M, &case, "F", 1, "failed", f.failed as f64);
        if f.failed > 0 {
            results.note(
                M,
                format!(
                    "run {run}: {} of {flows} connects failed (no answer within 4 s). Seen here: \
                     kube-proxy's MASQUERADE --random-fully picks node ports from 1024-65535, \
                     so a flow it carries to the same backend can get a port one of the \
                     forwarder's flows holds (and the reverse): the backend then sees a SYN for \
                     a connection it has, and the handshake never completes",
                    f.failed
                ),
            );
        }
        drop(daemon);
    }
    Ok(())
}
