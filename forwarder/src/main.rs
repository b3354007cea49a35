use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};
use forwarder::{
    daemon::{self, ConntrackTimeouts, RunArgs, SourceArg},
    datapath::{self, OnExit, TcAttachArg, XdpModeArg, XdpTxArg},
    inspect,
    netdev::Ipv4Cidr,
    policy::Enforcement,
    skips, stats,
    translate::ServiceSelection,
};

/// XDP NodePort accelerator for Kubernetes nodes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: human-readable, or one JSON object per line.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once at start-up: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Attach to the interfaces and forward NodePort traffic for the Services in the
    /// Kubernetes API (or in manifest files).
    Run {
        /// Interfaces that face clients (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        iface: Vec<String>,
        /// This node's name, as in EndpointSlice `nodeName` (decides local or remote backends).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Service and EndpointSlice manifests (YAML or JSON): a file or a directory. Reloaded on change.
        /// Without it, Services and EndpointSlices are watched in the Kubernetes API.
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Kubeconfig file for the Kubernetes API (default: $KUBECONFIG or ~/.kube/config
        /// if there is one, else the in-cluster service account).
        #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
        kubeconfig: Option<PathBuf>,
        /// Which Services to accelerate: all (except those annotated
        /// forwarder.dev/accelerate: "false"), or only those annotated "true".
        #[arg(long, value_enum, default_value = "all")]
        services: Services,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpModeArg,
        /// How tc programs attach: tcx (pinned bpf links, Linux 6.6 or later), netlink (a
        /// filter on a clsact qdisc, any kernel), or auto (tcx where the kernel has it).
        #[arg(long, value_enum, default_value = "auto")]
        tc_attach: TcAttachArg,
        /// Whether XDP transmits translated packets itself (else tc does).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_tx: XdpTxArg,
        /// Serve nodePorts only on node addresses inside these prefixes (as kube-proxy's flag).
        #[arg(long, value_delimiter = ',')]
        nodeport_addresses: Vec<Ipv4Cidr>,
        /// Where the maps are pinned (on a bpffs; mounted if needed).
        #[arg(long, default_value = "/sys/fs/bpf/forwarder")]
        pin_dir: PathBuf,
        /// Source ports for flows to remote backends, e.g. 61000-65535 (default:
        /// every port from 1024 up outside net.ipv4.ip_local_port_range and
        /// the NodePort range, in at most two ranges).
        #[arg(long, value_parser = parse_port_range)]
        snat_port_range: Option<(u16, u16)>,
        /// Capacity of the conntrack table of established flows (entries; a
        /// flow takes two).
        #[arg(long, default_value_t = forwarder_common::DEFAULT_CONNTRACK_ENTRIES)]
        conntrack_entries: u32,
        /// Capacity of the frontends map: node address (or LoadBalancer IP, externalIP)
        /// × service port, each protocol apart.
        #[arg(long, default_value_t = forwarder_common::MAX_FRONTENDS)]
        max_frontends: u32,
        /// Capacity of the backends map (each distinct list of a port's endpoints once).
        #[arg(long, default_value_t = forwarder_common::MAX_BACKENDS)]
        max_backends: u32,
        /// Distinct service ports (each has its counters).
        #[arg(long, default_value_t = forwarder_common::MAX_STATS_SLOTS)]
        max_service_ports: u32,
        /// Capacity of the table of flows not established yet (entries; a flow
        /// takes two): a SYN flood recycles these and never established ones.
        #[arg(long, default_value_t = forwarder_common::DEFAULT_CT_HALF_OPEN_ENTRIES)]
        conntrack_half_open_entries: u32,
        #[command(flatten)]
        conntrack_timeouts: ConntrackTimeouts,
        /// On SIGTERM/SIGINT drain (see --drain-timeout), then detach everything
        /// and remove the pins. By default the datapath stays in place so
        /// restarts and upgrades drop nothing.
        #[arg(long)]
        cleanup_on_exit: bool,
        /// With --cleanup-on-exit: how long to wait for open TCP flows to end
        /// before detaching (new flows go to kube-proxy meanwhile); 0: detach at once.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// A number patched into the programs' read-only data (and recorded in
        /// new flows): loading another value is an upgrade to a different
        /// eBPF object, which restart tests use.
        #[arg(long, default_value_t = 0, hide = true)]
        datapath_generation: u32,
        /// Where /healthz and /livez are served (kube-proxy's own is on 10256).
        #[arg(long, default_value = "0.0.0.0:10266")]
        health_addr: SocketAddr,
        /// Where Prometheus /metrics is served (kube-proxy's own is on 10249).
        #[arg(long, default_value = "0.0.0.0:10269")]
        metrics_addr: SocketAddr,
        /// /healthz answers 503 while a change has waited longer than this
        /// to be programmed (and before the first programming).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        health_timeout: Duration,
        /// Where this node's CNI enforces NetworkPolicy. netfilter (Calico in iptables
        /// mode, kube-router, Flannel with a policy add-on): new flows to local pods that
        /// an ingress policy selects are left to kube-proxy, so the FORWARD chain judges
        /// them (Pods of this node and NetworkPolicies are watched, or read from the
        /// manifests). outside-netfilter: the CNI enforces policy where the forwarder's
        /// delivery into the pod still meets it; nothing is left to kube-proxy for policy.
        #[arg(long, value_enum, default_value_t = Enforcement::Netfilter)]
        network_policy: Enforcement,
    },
    /// Interfaces and attach modes, program ids, what is programmed, map fill, daemon health,
    /// and the Services left to kube-proxy by reason (from the running daemon's /metrics).
    Status {
        #[command(flatten)]
        inspect: Inspect,
        /// Where the daemon serves /metrics (its `run --metrics-addr`); a wildcard
        /// address is asked on loopback.
        #[arg(long, default_value = "0.0.0.0:10269")]
        metrics_addr: SocketAddr,
    },
    /// Frontends (address:port/protocol) and their backends, with counters.
    Services(Inspect),
    /// Live flows: client, frontend, backend, source NAT, state, age.
    Conntrack(Inspect),
    /// Drain, then detach every program and remove the pins: kube-proxy handles all
    /// traffic again. Draining sends new flows to kube-proxy and waits for open TCP
    /// flows to end; a forwarder daemon that starts meanwhile cancels it.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/forwarder")]
        pin_dir: PathBuf,
        /// How long to wait for open TCP flows to end before detaching; 0: detach at once.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_timeout: Duration,
        /// Then keep running until SIGTERM (as a DaemonSet's container).
        #[arg(long)]
        stay: bool,
    },
    /// Print the datapath's counters from the pinned maps.
    Stats(Inspect),
}

/// Where to read the datapath's pinned state, and how to print it.
#[derive(clap::Args)]
struct Inspect {
    #[arg(long, default_value = "/sys/fs/bpf/forwarder")]
    pin_dir: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Services {
    All,
    Annotated,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `forwarder status`: the datapath's state and the daemon's skipped Services.
#[derive(serde::Serialize)]
struct StatusReport {
    #[serde(flatten)]
    status: inspect::Status,
    /// Services per reason (`forwarder_services_skipped`); absent when the
    /// daemon's metrics could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped_services: Option<std::collections::BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped_services_error: Option<String>,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 61000-65535"))?;
    let min = a.parse().map_err(|_| format!("{a:?} is not a port"))?;
    let max = b.parse().map_err(|_| format!("{b:?} is not a port"))?;
    Ok((min, max))
}

/// One line on what `uninstall` did, for whoever ran it.
fn uninstall_summary(done: &datapath::Uninstalled) -> String {
    use datapath::DrainOutcome;
    let drain = match done.drain {
        DrainOutcome::NothingToDrain => "nothing to drain".to_string(),
        DrainOutcome::Drained { waited } => {
            format!("drained in {:.1} s", waited.as_secs_f64())
        }
        DrainOutcome::DeadlinePassed { open } => {
            format!("drain timeout passed with {open} TCP flows still open (cut)")
        }
        DrainOutcome::Cancelled => {
            return "uninstall cancelled: a forwarder daemon started while draining and keeps the datapath".into()
        }
    };
    format!("{drain}; detached {} program attachments", done.detached)
}

fn print_as<T: serde::Serialize>(
    output: Output,
    value: &T,
    text: impl Fn(&T) -> String,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Text => print!("{}", text(value)),
    }
    Ok(())
}

/// Logs go through `tracing` (the `log` records of our modules and of aya
/// included), filtered by RUST_LOG (default info), to stderr.
fn init_logging(format: LogFormat) {
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forwarder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            iface,
            node_name,
            manifests,
            kubeconfig,
            services,
            xdp_mode,
            tc_attach,
            xdp_tx,
            nodeport_addresses,
            pin_dir,
            snat_port_range,
            conntrack_entries,
            max_frontends,
            max_backends,
            max_service_ports,
            conntrack_half_open_entries,
            conntrack_timeouts,
            cleanup_on_exit,
            drain_timeout,
            datapath_generation,
            health_addr,
            metrics_addr,
            health_timeout,
            network_policy,
        } => {
            if conntrack_entries < 2 {
                return Err(anyhow!("--conntrack-entries must be at least 2"));
            }
            for (flag, value) in [
                ("--max-frontends", max_frontends),
                ("--max-backends", max_backends),
                ("--max-service-ports", max_service_ports),
            ] {
                if value < 2 {
                    return Err(anyhow!("{flag} must be at least 2"));
                }
            }
            if conntrack_half_open_entries < 2 {
                return Err(anyhow!("--conntrack-half-open-entries must be at least 2"));
            }
            // Two workers: health and metrics keep answering while the
            // daemon's own loop reprograms a large table (the conntrack
            // sweep runs on a blocking thread of its own).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(RunArgs {
                ifaces: iface,
                node_name,
                source: match manifests {
                    Some(path) => SourceArg::Manifests(path),
                    None => SourceArg::Kubernetes { kubeconfig },
                },
                services: match services {
                    Services::All => ServiceSelection::All,
                    Services::Annotated => ServiceSelection::Annotated,
                },
                xdp_mode,
                tc_attach,
                xdp_tx,
                nodeport_addresses,
                pin_dir,
                snat_port_range,
                conntrack_entries,
                limits: forwarder::plan::Limits {
                    frontends: max_frontends,
                    backends: max_backends,
                    service_ports: max_service_ports,
                },
                conntrack_half_open_entries,
                conntrack_timeouts,
                generation: datapath_generation,
                health_addr,
                metrics_addr,
                health_timeout,
                network_policy,
                on_exit: if cleanup_on_exit {
                    OnExit::Cleanup { drain_timeout }
                } else {
                    OnExit::KeepForwarding
                },
            }))
        }
        Command::Uninstall {
            pin_dir,
            drain_timeout,
            stay,
        } => {
            datapath::check_privileges()?;
            if !stay {
                let done = datapath::uninstall(&pin_dir, drain_timeout)?;
                println!("{}", uninstall_summary(&done));
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                // Handled from here on: a SIGTERM during the drain (the pod
                // being deleted) lets the drain finish within the grace
                // period, then ends the process.
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                let done = tokio::task::spawn_blocking(move || {
                    datapath::uninstall(&pin_dir, drain_timeout)
                })
                .await??;
                println!("{}", uninstall_summary(&done));
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                Ok::<_, anyhow::Error>(())
            })
        }
        Command::Status {
            inspect: Inspect { pin_dir, output },
            metrics_addr,
        } => {
            let maps = inspect::open(&pin_dir)?;
            let status = inspect::status(&maps, &pin_dir)?;
            let skipped =
                skips::fetch_counts(skips::local_address(metrics_addr), Duration::from_secs(2));
            let report = StatusReport {
                skipped_services: skipped.as_ref().ok().cloned(),
                skipped_services_error: skipped.as_ref().err().map(|e| format!("{e:#}")),
                status,
            };
            print_as(output, &report, |r| {
                inspect::render_status(&r.status) + &skips::render(&skipped)
            })
        }
        Command::Services(Inspect { pin_dir, output }) => {
            let maps = inspect::open(&pin_dir)?;
            let rows = inspect::services(&maps)?;
            print_as(output, &rows, |r| inspect::render_services(r))
        }
        Command::Conntrack(Inspect { pin_dir, output }) => {
            let maps = inspect::open(&pin_dir)?;
            let rows = inspect::conntrack(&maps)?;
            print_as(output, &rows, |r| inspect::render_conntrack(r))
        }
        Command::Stats(Inspect { pin_dir, output }) => {
            stats::run(&pin_dir, matches!(output, Output::Json))
        }
    }
}
