//! Measurement 5: the control plane. Time from N Services to all of them
//! programmed, and for one update, ours against kube-proxy's
//! iptables-restore of the equivalent rules; the daemon's peak RSS and the
//! memory of its BPF maps.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use forwarder::{manifest, maps::Maps, model::NodeContext, plan, translate};

use super::{
    rig::{Rig, RigOptions},
    scales,
    scenario::{self, Position, Scenario},
    Options, Results,
};
use crate::{
    kube_proxy::{self, Backend},
    netns::{self, Netns},
};

const M: u32 = 5;
pub const SCALES: [u64; 3] = [1, 1_000, 10_000];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn node() -> NodeContext {
    NodeContext {
        node_name: scenario::NODE_NAME.into(),
        node_addresses: vec![scenario::NODE_IP],
        ..Default::default()
    }
}

/// Ours: parse + translate + plan + apply into fresh maps, then one update.
fn ours(results: &mut Results, n: u64, yaml: &str, updated_yaml: &str) -> Result<()> {
    // Loading the object (the verifier) is the daemon's start-up, not
    // programming: outside the timing.
    let mut ebpf = aya::Ebpf::load(&forwarder::kfuncs::prepared_object()?.0)
        .context("loading the eBPF object")?;
    let mut maps = Maps::take(&mut ebpf)?;
    let file = Path::new("services.yaml");
    let t0 = Instant::now();
    let set = manifest::parse_str(file, yaml);
    let t1 = Instant::now();
    let t = translate::translate(&set.services, &set.endpoint_slices, &node());
    let t2 = Instant::now();
    let ops = plan::plan(&t.desired, &maps.snapshot()?)?;
    let t3 = Instant::now();
    maps.apply(&ops)?;
    let t4 = Instant::now();
    results.push(M, "program-all", "ours", n, "ms", ms(t4 - t0));
    results.push(M, "parse", "ours", n, "ms", ms(t1 - t0));
    results.push(M, "translate", "ours", n, "ms", ms(t2 - t1));
    results.push(M, "snapshot+plan", "ours", n, "ms", ms(t3 - t2));
    results.push(M, "apply", "ours", n, "ms", ms(t4 - t3));
    results.push(M, "program-all", "ours", n, "map writes", ops.len() as f64);

    // One Service's endpoint changes: what the daemon does on a new state
    // (the API watcher hands it parsed objects: parsing is outside).
    let set2 = manifest::parse_str(file, updated_yaml);
    let u0 = Instant::now();
    let t = translate::translate(&set2.services, &set2.endpoint_slices, &node());
    let ops = plan::plan(&t.desired, &maps.snapshot()?)?;
    maps.apply(&ops)?;
    let u1 = Instant::now();
    results.push(M, "update-one", "ours", n, "ms", ms(u1 - u0));
    results.push(M, "update-one", "ours", n, "map writes", ops.len() as f64);
    Ok(())
}

/// kube-proxy: a full sync (ensure jump rules, iptables-restore) into an
/// empty namespace, then the sync after one endpoint changed.
fn kube_proxy_sync(
    results: &mut Results,
    n: u64,
    backend: Backend,
    rules: &str,
    updated: &str,
) -> Result<()> {
    let ns = Netns::create(&format!("{}b5", netns::unique_prefix()))?;
    let variant = format!("K-{}", backend.name());
    let t0 = Instant::now();
    kube_proxy::install(ns.name(), rules, backend)?;
    results.push(M, "program-all", &variant, n, "ms", ms(t0.elapsed()));
    let t1 = Instant::now();
    kube_proxy::install(ns.name(), updated, backend)?;
    results.push(M, "update-one", &variant, n, "ms", ms(t1.elapsed()));
    results.push(
        M,
        "program-all",
        &variant,
        n,
        "rules bytes",
        rules.len() as f64,
    );
    Ok(())
}

/// The pid of our child process named `comm`.
fn child_pid(comm: &str) -> Option<u32> {
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|(_, n)| n).unwrap_or_default();
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok());
        if name == comm && ppid == Some(me) {
            return Some(pid);
        }
    }
    None
}

/// `Vm...:` of /proc/<pid>/status in KiB.
fn status_kib(pid: u32, key: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Sum of `memlock` over the BPF map descriptors the process holds.
fn maps_memlock(pid: u32) -> Result<(u64, usize)> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut total = 0;
    let mut count = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = std::fs::read_to_string(e?.path()) else {
            continue;
        };
        if !text.lines().any(|l| l.starts_with("map_type:")) {
            continue;
        }
        if let Some(v) = text
            .lines()
            .find(|l| l.starts_with("memlock:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += v;
            count += 1;
        }
    }
    Ok((total, count))
}

fn daemon_memory(results: &mut Results, n: u64) -> Result<()> {
    let mut rig = Rig::build(&RigOptions {
        sink: false,
        server: false,
    })?;
    let start = Instant::now();
    rig.start_forwarder(&Scenario::new(n, Position::Last))?;
    results.push(
        M,
        "daemon start to ready",
        "ours",
        n,
        "ms",
        ms(start.elapsed()),
    );
    let pid = child_pid("forwarder").context("finding the daemon's pid")?;
    if let Some(v) = status_kib(pid, "VmHWM:") {
        results.push(M, "daemon", "ours", n, "peak RSS MiB", v / 1024.0);
    }
    if let Some(v) = status_kib(pid, "VmRSS:") {
        results.push(M, "daemon", "ours", n, "RSS MiB", v / 1024.0);
    }
    let (memlock, maps) = maps_memlock(pid)?;
    results.push(
        M,
        "daemon",
        "ours",
        n,
        "BPF maps MiB",
        memlock as f64 / 1048576.0,
    );
    results.push(M, "daemon", "ours", n, "BPF maps", maps as f64);
    drop(rig);
    Ok(())
}

pub fn run(options: &Options, results: &mut Results) -> Result<()> {
    let backends = Backend::available();
    let sc = scales(options, &SCALES);
    let mut errors = Vec::new();
    for &n in &sc {
        eprintln!("bench: [5] {n} Services");
        let base = Scenario::new(n, Position::Last);
        let updated = base.clone().with_endpoint(Ipv4Addr::new(10, 244, 1, 11));
        let (yaml, yaml2) = (base.manifest(), updated.manifest());
        let (rules, rules2) = (base.kube_proxy_rules(), updated.kube_proxy_rules());
        let ns = Netns::create(&format!("{}b5", netns::unique_prefix()))?;
        // A backend whose sync takes longer than this is synced once only
        // (iptables-nft takes minutes for 10,000 Services).
        const SLOW: Duration = Duration::from_secs(20);
        let mut slow: Vec<Backend> = Vec::new();
        for _ in 0..options.runs {
            if let Err(e) = netns::run_in(ns.name(), || ours(results, n, &yaml, &yaml2)) {
                errors.push(format!("programming {n} Services: {e:#}"));
                break;
            }
            for &b in &backends {
                if slow.contains(&b) {
                    continue;
                }
                let start = Instant::now();
                if let Err(e) = kube_proxy_sync(results, n, b, &rules, &rules2) {
                    errors.push(format!(
                        "kube-proxy {} sync of {n} Services: {e:#}",
                        b.name()
                    ));
                }
                if start.elapsed() > SLOW && options.runs > 1 {
                    results.note(
                        M,
                        format!(
                            "K-{} at {n} Services: a sync took {:.0} s, so it was synced once \
                             (one value, not a median over {} runs)",
                            b.name(),
                            start.elapsed().as_secs_f64(),
                            options.runs
                        ),
                    );
                    slow.push(b);
                }
            }
        }
        drop(ns);
        // Ratios within each run.
        for &b in &backends {
            let k = format!("K-{}", b.name());
            for case in ["program-all", "update-one"] {
                let ours = results
                    .find(M, case, "ours", n, "ms")
                    .map(|s| s.values.clone());
                let theirs = results.find(M, case, &k, n, "ms").map(|s| s.values.clone());
                if let (Some(a), Some(b)) = (ours, theirs) {
                    for (x, y) in a.iter().zip(&b) {
                        if *x > 0.0 {
                            results.push(M, case, &format!("{k}/ours"), n, "ratio ms", y / x);
                        }
                    }
                }
            }
        }
    }
    for &n in &sc {
        for _ in 0..options.runs.min(3) {
            if let Err(e) = daemon_memory(results, n) {
                errors.push(format!("daemon with {n} Services: {e:#}"));
                break;
            }
        }
    }
    if let Some(&n) = sc.last() {
        if let Some(v) = results
            .find(M, "program-all", "ours", n, "ms")
            .and_then(|s| s.median())
        {
            results.note(
                M,
                format!(
                    "{n} Services programmed (parse + translate + plan + apply) in {v:.0} ms \
                     (target for 10,000: under 1 s: {})",
                    if v < 1000.0 { "met" } else { "NOT met" }
                ),
            );
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}
