//! `forwarder run`: program the datapath from a source of Services and
//! EndpointSlices and keep it in step.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use forwarder_common::Config;
use log::{error, info, warn};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use std::sync::Arc;

use crate::{
    datapath::{self, Datapath, OnExit, Options, TcAttachArg, XdpModeArg, XdpTxArg},
    kube_source,
    model::{Desired, NodeContext},
    netdev::{self, Ipv4Cidr},
    observe::{self, DaemonMetrics, Health},
    plan,
    policy::Enforcement,
    skips,
    source::{self, ObjectSet},
    translate::{self, ServiceSelection},
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceArg {
    Manifests(PathBuf),
    /// The Kubernetes API, through this kubeconfig file, else the default
    /// kubeconfig if there is one, else the in-cluster config (`Config::infer`).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
    },
}

pub struct RunArgs {
    pub ifaces: Vec<String>,
    pub node_name: String,
    pub source: SourceArg,
    pub services: ServiceSelection,
    pub xdp_mode: XdpModeArg,
    pub tc_attach: TcAttachArg,
    pub xdp_tx: XdpTxArg,
    pub nodeport_addresses: Vec<Ipv4Cidr>,
    pub pin_dir: PathBuf,
    pub snat_port_range: Option<(u16, u16)>,
    pub conntrack_entries: u32,
    /// The service maps' sizes (`--max-frontends`, ...).
    pub limits: plan::Limits,
    pub conntrack_half_open_entries: u32,
    pub conntrack_timeouts: ConntrackTimeouts,
    pub on_exit: OnExit,
    pub generation: u32,
    pub health_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub health_timeout: Duration,
    /// Where NetworkPolicy is enforced on this node.
    pub network_policy: Enforcement,
}

/// Conntrack timeouts by TCP state and for UDP, named as kube-proxy's flags
/// where it has one; defaults are kube-proxy's (established 24 h) and the
/// kernel's nf_conntrack ones elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct ConntrackTimeouts {
    /// Idle timeout of a TCP flow whose SYN was seen, no SYN-ACK yet.
    #[arg(
        long = "conntrack-tcp-timeout-syn-sent",
        value_name = "DURATION",
        default_value = "120s",
        value_parser = parse_timeout
    )]
    pub tcp_syn_sent: Duration,
    /// Idle timeout of a TCP flow whose SYN-ACK was seen, no ACK yet.
    #[arg(
        long = "conntrack-tcp-timeout-syn-recv",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = parse_timeout
    )]
    pub tcp_syn_recv: Duration,
    /// Idle timeout of an established TCP flow (kube-proxy's flag and default).
    #[arg(
        long = "conntrack-tcp-timeout-established",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = parse_timeout
    )]
    pub tcp_established: Duration,
    /// Idle timeout of a TCP flow after a FIN.
    #[arg(
        long = "conntrack-tcp-timeout-fin",
        value_name = "DURATION",
        default_value = "120s",
        value_parser = parse_timeout
    )]
    pub tcp_fin: Duration,
    /// Idle timeout of a TCP flow after a RST.
    #[arg(
        long = "conntrack-tcp-timeout-close",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = parse_timeout
    )]
    pub tcp_close: Duration,
    /// Idle timeout of a UDP flow without a reply (kube-proxy's flag).
    #[arg(
        long = "conntrack-udp-timeout",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_timeout
    )]
    pub udp: Duration,
    /// Idle timeout of a UDP flow once replied (kube-proxy's flag).
    #[arg(
        long = "conntrack-udp-timeout-stream",
        value_name = "DURATION",
        default_value = "120s",
        value_parser = parse_timeout
    )]
    pub udp_stream: Duration,
}

/// A timeout flag's value: a duration (`90s`, `24h`, `1h 30m`), above zero
/// and within what the datapath's nanosecond clock holds.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{text:?}: must be more than zero"));
    }
    if u64::try_from(d.as_nanos()).is_err() {
        return Err(format!("{text:?}: too long"));
    }
    Ok(d)
}

impl ConntrackTimeouts {
    /// Writes the timeouts into the datapath config.
    pub fn apply(&self, config: &mut Config) {
        // parse_timeout bounds every value to u64 nanoseconds.
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        config.tcp_syn_timeout_ns = ns(self.tcp_syn_sent);
        config.tcp_syn_recv_timeout_ns = ns(self.tcp_syn_recv);
        config.tcp_established_timeout_ns = ns(self.tcp_established);
        config.tcp_fin_timeout_ns = ns(self.tcp_fin);
        config.tcp_closed_timeout_ns = ns(self.tcp_close);
        config.udp_timeout_ns = ns(self.udp);
        config.udp_replied_timeout_ns = ns(self.udp_stream);
    }
}

/// How often addresses and pod devices are re-checked.
const POLL: Duration = Duration::from_secs(1);
/// How often idle conntrack entries are swept.
const SWEEP: Duration = Duration::from_secs(10);

pub async fn run(args: RunArgs) -> Result<()> {
    datapath::check_privileges()?;
    // `flags` stay 0: the datapath is loaded with this config, which clears
    // CONFIG_F_DRAINING. So a daemon that starts (or adopts) cancels a drain
    // in progress, and `forwarder uninstall` then leaves the datapath to it.
    let mut config = Config::default();
    args.conntrack_timeouts.apply(&mut config);
    let local_range = datapath::local_port_range();
    let ranges = match args.snat_port_range {
        Some(range) => vec![range],
        None => datapath::default_snat_ranges(local_range),
    };
    for &(min, max) in &ranges {
        datapath::check_snat_range(min, max, local_range)?;
    }
    match ranges.as_slice() {
        [] => anyhow::bail!(
            "no source-NAT ports are left outside net.ipv4.ip_local_port_range and the NodePort range; pick some with --snat-port-range"
        ),
        [(min, max)] => (config.snat_port_min, config.snat_port_max) = (*min, *max),
        [(min, max), (min2, max2), ..] => {
            (config.snat_port_min, config.snat_port_max) = (*min, *max);
            (config.snat2_port_min, config.snat2_port_max) = (*min2, *max2);
        }
    }
    info!(
        "source NAT to remote backends: ports {} ({} per backend)",
        ranges
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(", "),
        config.snat_ports()
    );
    let (tx, rx) = watch::channel(None);
    match &args.source {
        SourceArg::Manifests(path) => {
            if !path.exists() {
                anyhow::bail!("--manifests {} does not exist", path.display());
            }
            tokio::spawn(source::watch_manifests(path.clone(), tx));
        }
        SourceArg::Kubernetes { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let policy = match args.network_policy {
                Enforcement::Netfilter => kube_source::PolicyWatch::On {
                    node_name: args.node_name.clone(),
                },
                Enforcement::OutsideNetfilter => kube_source::PolicyWatch::Off,
            };
            tokio::spawn(kube_source::watch_kubernetes(
                client,
                tx,
                kube_source::WatchOptions::default(),
                policy,
            ));
        }
    }
    let opts = Options {
        ifaces: args.ifaces.clone(),
        xdp_mode: args.xdp_mode,
        tc_attach: args.tc_attach,
        xdp_tx: args.xdp_tx,
        pin_dir: args.pin_dir.clone(),
        config,
        conntrack_entries: args.conntrack_entries,
        limits: args.limits,
        conntrack_half_open_entries: args.conntrack_half_open_entries,
        generation: args.generation,
    };
    let mut dp = Datapath::load(&opts)?;
    let health = Arc::new(Health::new(args.health_timeout));
    let metrics = Arc::new(DaemonMetrics::default());
    let registry = observe::registry(args.pin_dir.clone(), dp.object_hash, &metrics);
    let (health_addr, metrics_addr) = (args.health_addr, args.metrics_addr);
    let h = health.clone();
    tokio::spawn(async move {
        if let Err(e) = observe::serve_health(health_addr, h).await {
            error!("{e:#}");
        }
    });
    tokio::spawn(async move {
        if let Err(e) = observe::serve_metrics(metrics_addr, registry).await {
            error!("{e:#}");
        }
    });
    info!("health on http://{health_addr}/healthz, metrics on http://{metrics_addr}/metrics");
    let result = serve(&mut dp, &args, &opts, rx, &health, &metrics).await;
    let on_exit = if result.is_err() && dp.adopted.is_none() && !dp.attached() {
        // Nothing was ever forwarding: leave nothing behind.
        OnExit::Cleanup {
            drain_timeout: Duration::ZERO,
        }
    } else {
        args.on_exit
    };
    // A drain waits: off the runtime's thread, so /healthz and /metrics
    // keep answering meanwhile.
    let shutdown = tokio::task::spawn_blocking(move || dp.shutdown(on_exit))
        .await
        .context("the shutdown task failed")?;
    result.and(shutdown)
}

/// A client for `--kubeconfig FILE`, else the inferred configuration
/// (a kubeconfig from `KUBECONFIG` or `~/.kube/config`, else in-cluster).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using --kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (neither in-cluster nor a kubeconfig); use --kubeconfig or --manifests")?,
    };
    info!("kubernetes: API server {}", config.cluster_url);
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

#[derive(Default)]
struct State {
    generation: Option<u64>,
    addresses: Vec<Ipv4Addr>,
    desired: Desired,
    /// Local pods that conntrack entries lead to (refreshed at each sweep):
    /// a pod that left every backend set keeps its device's tc program
    /// while its flows last, or their replies would meet netfilter mid-flow.
    flow_local_backends: BTreeSet<Ipv4Addr>,
    /// When a reconcile last read `flow_local_backends` from the table.
    flow_local_backends_read: Option<Instant>,
    skips: skips::SkipLog,
}

/// A conntrack sweep running on a blocking thread: it hands the sweeper
/// (its handles and eviction tallies) back with its result.
struct SweepTask {
    started: Instant,
    task: tokio::task::JoinHandle<(datapath::Sweeper, Result<datapath::Sweep>)>,
}

impl SweepTask {
    fn start(mut sweeper: datapath::Sweeper, config: Config) -> Self {
        SweepTask {
            started: Instant::now(),
            task: tokio::task::spawn_blocking(move || {
                let result = sweeper.sweep(&config);
                (sweeper, result)
            }),
        }
    }
}

/// Takes a finished sweep's findings.
fn sweep_finished(
    state: &mut State,
    metrics: &DaemonMetrics,
    started: Instant,
    result: Result<datapath::Sweep>,
) {
    let sweep = match result {
        Ok(sweep) => sweep,
        Err(e) => {
            warn!("conntrack sweep: {e:#}");
            return;
        }
    };
    let took = started.elapsed();
    metrics.sweep_seconds.0.observe(took.as_secs_f64());
    if sweep.walk_cut {
        metrics.sweep_walks_cut.inc();
        warn!(
            "conntrack sweep: walk cut at its bound after {} entries (entries churned under it); the next sweep goes on",
            sweep.walked
        );
    }
    if sweep.removed != 0 {
        info!(
            "conntrack: removed {} idle entries of {} in {} ms",
            sweep.removed,
            sweep.walked,
            took.as_millis()
        );
    }
    // A reconcile that read the table after this walk began knows flows the
    // walk may have missed (new ones to a pod that left since): keep those.
    if state
        .flow_local_backends_read
        .is_some_and(|read| read > started)
    {
        state.flow_local_backends.extend(sweep.local_backends);
    } else {
        state.flow_local_backends = sweep.local_backends;
    }
}

async fn serve(
    dp: &mut Datapath,
    args: &RunArgs,
    opts: &Options,
    mut objects: watch::Receiver<Option<ObjectSet>>,
    health: &Health,
    metrics: &DaemonMetrics,
) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State {
        // Flows an adopted datapath carries to local pods.
        flow_local_backends: dp.local_backends_with_flows(),
        ..State::default()
    };
    let mut ready = false;
    let mut last_sweep = Instant::now();
    let mut source_alive = true;
    // The sweep walks the whole table: it runs on a blocking thread with a
    // handle of its own, so the loop (and /livez's heartbeat) never waits.
    let mut sweep_handle: Option<datapath::Sweeper> = None;
    let mut sweeping: Option<SweepTask> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            done = async { (&mut sweeping.as_mut().expect("guarded by the condition").task).await },
                if sweeping.is_some() => {
                let started = sweeping.take().map_or_else(Instant::now, |s| s.started);
                match done {
                    Ok((handle, result)) => {
                        sweep_handle = Some(handle);
                        sweep_finished(&mut state, metrics, started, result);
                    }
                    // The next sweep opens the table again.
                    Err(e) => error!("the conntrack sweep task failed: {e}"),
                }
                continue;
            }
            changed = objects.changed(), if source_alive => {
                if changed.is_err() {
                    error!("the object source stopped; keeping the last programmed state");
                    source_alive = false;
                } else {
                    metrics.source_updates.inc();
                    health.pending();
                    metrics.pending.set(1);
                }
            }
            _ = tick.tick() => {}
        }
        let now = datapath::unix_now();
        health.beat();
        dp.flush_logs();
        if let Err(e) = dp.update_status(|s| s.heartbeat_unix = now) {
            warn!("{e:#}");
        }
        let latest = objects.borrow_and_update().clone();
        let Some(set) = latest else {
            continue; // nothing read yet: program nothing rather than an empty state
        };
        metrics.source_problems.set(set.problems.len() as i64);
        let started = Instant::now();
        let result = reconcile(dp, args, &mut state, &set);
        skips::set_gauges(&metrics.services_skipped, state.skips.counts());
        // Programs go on the external devices (or replace the adopted ones)
        // only once the maps hold the desired state. Failing that is fatal:
        // it is a problem of this node (a foreign XDP program, a device
        // refusing us), not of one change.
        if result.is_ok() && !dp.attached() {
            dp.attach_external(opts)?;
        }
        let changed = result.as_ref().is_ok_and(|c| *c);
        if changed || result.is_err() {
            metrics
                .reconcile_seconds
                .0
                .observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(_) => {
                if changed {
                    metrics.reconciles_ok.inc();
                }
                health.programmed();
                metrics.pending.set(0);
                let backends = state
                    .desired
                    .frontends
                    .values()
                    .map(|f| f.backends.len())
                    .sum::<usize>();
                let frontends = state.desired.frontends.len();
                if let Err(e) = dp.update_status(|s| {
                    s.programmed_unix = now;
                    s.frontends = frontends as u32;
                    s.backends = backends as u32;
                    s.failures = 0;
                }) {
                    warn!("{e:#}");
                }
                if !ready {
                    ready = true;
                    info!(
                        "ready: {frontends} frontends programmed on {}",
                        args.ifaces.join(",")
                    );
                }
            }
            // The datapath keeps what it had; the next tick tries again.
            Err(e) => {
                state.generation = None;
                metrics.reconciles_failed.inc();
                health.pending();
                metrics.pending.set(1);
                let _ = dp.update_status(|s| s.failures += 1);
                error!("reconcile failed, keeping the previous state: {e:#}");
            }
        }
        if last_sweep.elapsed() >= SWEEP && sweeping.is_none() {
            last_sweep = Instant::now();
            let handle = match sweep_handle.take() {
                Some(handle) => Ok(handle),
                None => dp.sweeper(),
            };
            match handle {
                Ok(handle) => sweeping = Some(SweepTask::start(handle, opts.config)),
                Err(e) => warn!("conntrack sweep: {e:#}"),
            }
        }
    }
    // A sweep in progress finishes first (it ends in bounded time).
    if let Some(task) = sweeping.take() {
        if let Ok((_, result)) = task.task.await {
            sweep_finished(&mut state, metrics, task.started, result);
        }
    }
    Ok(())
}

/// One pass: translate the newest objects if they or the node addresses
/// changed, program the difference, follow pod devices.
/// Returns whether the maps were reprogrammed.
fn reconcile(
    dp: &mut Datapath,
    args: &RunArgs,
    state: &mut State,
    set: &ObjectSet,
) -> Result<bool> {
    let addresses: Vec<Ipv4Addr> = dp
        .external_addresses(&args.ifaces)?
        .into_iter()
        .filter(|a| {
            args.nodeport_addresses.is_empty()
                || args.nodeport_addresses.iter().any(|c| c.contains(*a))
        })
        .collect();
    let changed = state.generation != Some(set.generation) || state.addresses != addresses;
    if changed {
        if addresses.is_empty() {
            warn!(
                "no node address on {} matches --nodeport-addresses: nodePorts are not served",
                args.ifaces.join(",")
            );
        }
        let node = NodeContext {
            node_name: args.node_name.clone(),
            node_addresses: addresses.clone(),
            policing: set.policing(args.network_policy, &args.node_name),
        };
        let t =
            translate::translate_with(&set.services, &set.endpoint_slices, &node, args.services);
        state.skips.update(&t.skipped);
        let current = dp.maps.snapshot()?;
        let ops = plan::plan_within(&t.desired, &current, &dp.limits())?;
        dp.maps.apply(&ops)?;
        match dp.maps.set_policed_pods(&t.policed) {
            Ok(0) => {}
            Ok(n) => warn!("{n} policed local pods are policed but cannot be explained in `forwarder services` (POLICED_PODS is full)"),
            Err(e) => warn!("{e:#}"),
        }
        if !t.policed.is_empty() {
            info!(
                "NetworkPolicy: new flows to {} local pods under ingress policy go to kube-proxy ({})",
                t.policed.len(),
                t.policed
                    .keys()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let backends: usize = t.desired.frontends.values().map(|f| f.backends.len()).sum();
        info!(
            "programmed {} frontends, {} backend references ({} map writes) from {} Services, {} EndpointSlices",
            t.desired.frontends.len(),
            backends,
            ops.len(),
            set.services.len(),
            set.endpoint_slices.len()
        );
        for (addr, f) in &t.desired.frontends {
            log::debug!("{addr} -> {} {:?}", f.label(), f.backends);
        }
        match dp.purge_stale_flows(&t.desired) {
            Ok(0) => {}
            Ok(n) => info!("conntrack: removed {n} entries of UDP flows whose backend is gone"),
            Err(e) => warn!("conntrack purge: {e:#}"),
        }
        // A local pod that left: its flows may be younger than the last
        // sweep, so look now rather than detach under them.
        if local_backends(&state.desired)
            .difference(&local_backends(&t.desired))
            .next()
            .is_some()
        {
            state.flow_local_backends = dp.local_backends_with_flows();
            state.flow_local_backends_read = Some(Instant::now());
        }
        state.desired = t.desired;
        state.generation = Some(set.generation);
        state.addresses = addresses;
    }
    let mut local_pods = local_backends(&state.desired);
    let lingering: Vec<Ipv4Addr> = state
        .flow_local_backends
        .difference(&local_pods)
        .copied()
        .collect();
    if !lingering.is_empty() {
        // Only while the pod is still routed through a pod device: a
        // deleted pod's flows are dead, nothing to keep for them.
        let routes = netdev::routes()?;
        local_pods.extend(lingering.into_iter().filter(|pod| {
            netdev::route_device(&routes, *pod)
                .is_some_and(|dev| !args.ifaces.iter().any(|i| i == dev))
        }));
    }
    dp.sync_pod_devices(&local_pods)?;
    Ok(changed)
}

/// The local pods among the backends.
fn local_backends(desired: &Desired) -> BTreeSet<Ipv4Addr> {
    desired
        .frontends
        .values()
        .flat_map(|f| f.backends.iter().filter(|b| b.local).map(|b| b.addr))
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        timeouts: ConntrackTimeouts,
    }

    fn config_from(args: &[&str]) -> Result<Config, clap::Error> {
        let flags =
            Flags::try_parse_from(std::iter::once("forwarder").chain(args.iter().copied()))?;
        let mut config = Config::default();
        flags.timeouts.apply(&mut config);
        Ok(config)
    }

    #[test]
    fn default_timeouts_are_the_datapath_defaults() {
        assert_eq!(config_from(&[]).unwrap(), Config::default());
    }

    #[test]
    fn each_timeout_flag_sets_its_own_field() {
        let s = 1_000_000_000u64;
        let c = config_from(&[
            "--conntrack-tcp-timeout-syn-sent=1s",
            "--conntrack-tcp-timeout-syn-recv=2s",
            "--conntrack-tcp-timeout-established=1h 30m",
            "--conntrack-tcp-timeout-fin=4s",
            "--conntrack-tcp-timeout-close=5s",
            "--conntrack-udp-timeout=6s",
            "--conntrack-udp-timeout-stream=500ms",
        ])
        .unwrap();
        assert_eq!(c.tcp_syn_timeout_ns, s);
        assert_eq!(c.tcp_syn_recv_timeout_ns, 2 * s);
        assert_eq!(c.tcp_established_timeout_ns, 5400 * s);
        assert_eq!(c.tcp_fin_timeout_ns, 4 * s);
        assert_eq!(c.tcp_closed_timeout_ns, 5 * s);
        assert_eq!(c.udp_timeout_ns, 6 * s);
        assert_eq!(c.udp_replied_timeout_ns, s / 2);
        let untouched = Config::default();
        assert_eq!(
            (c.snat_port_min, c.snat_port_max, c.flags),
            (untouched.snat_port_min, untouched.snat_port_max, 0)
        );
    }

    #[test]
    fn zero_malformed_or_huge_timeouts_are_refused() {
        for (arg, needle) in [
            ("--conntrack-tcp-timeout-fin=0s", "must be more than zero"),
            ("--conntrack-udp-timeout=soon", "\"soon\""),
            ("--conntrack-tcp-timeout-established=1000years", "too long"),
        ] {
            let e = config_from(&[arg]).unwrap_err().to_string();
            assert!(e.contains(needle), "{arg}: {e}");
        }
    }
}
