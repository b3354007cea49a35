//! The report: `README.md` with a table per measurement, SVG plots drawn
//! from the data with plotters, and the raw data (`results.json`,
//! `results.csv`).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{json, Value};

use super::{Options, Results, Series};

/// Machine, kernel and load, read from /proc.
pub fn machine_info() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let load = read("/proc/loadavg").trim().to_string();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let iptables = |bin: &str| {
        crate::netns::run_checked(std::process::Command::new(bin).arg("--version"))
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|_| "not available".into())
    };
    json!({
        "cpu": model,
        "cpus": cpus,
        "memory_mib": mem_kb / 1024,
        "kernel": kernel,
        "loadavg_at_start": load,
        "date": date,
        "iptables_legacy": iptables("iptables-legacy"),
        "iptables_nft": iptables("iptables-nft"),
    })
}

const TITLES: [(u32, &str); 8] = [
    (
        1,
        "1. Per-packet cost of the XDP program (BPF_PROG_TEST_RUN)",
    ),
    (
        2,
        "2. Forwarding throughput, client → node → pod (64-byte UDP frames)",
    ),
    (3, "3. New-flow cost (every packet a new 5-tuple)"),
    (4, "4. Real sockets through the nodePort"),
    (5, "5. Control plane: programming time and memory"),
    (6, "6. Where the CPU time goes (forwarding CPU per packet)"),
    (
        7,
        "7. Bulk TCP through the nodePort (several flows, wire-like cluster)",
    ),
    (
        8,
        "8. Concurrent connections through one node to one remote backend",
    ),
];

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn table(series: &[&Series]) -> String {
    let mut t = String::from(
        "| case | variant | Services | metric | median | min – max | runs |\n|---|---|---:|---|---:|---:|---:|\n",
    );
    for s in series {
        let (Some(med), Some(lo), Some(hi)) = (s.median(), s.min(), s.max()) else {
            continue;
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} – {} | {} |",
            s.case,
            s.variant,
            s.services,
            s.metric,
            fmt_num(med),
            fmt_num(lo),
            fmt_num(hi),
            s.values.len()
        );
    }
    t
}

/// One plot: for each (case, variant) the median of `metric` against the
/// Service count (log scale), with min–max bars.
struct PlotSpec {
    measurement: u32,
    metric: &'static str,
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    /// Keep only series whose case is in this list (empty: all).
    cases: &'static [&'static str],
    /// Leave these variants out (they would flatten the others).
    skip_variants: &'static [&'static str],
}

const PLOTS: [PlotSpec; 7] = [
    PlotSpec {
        measurement: 1,
        metric: "net ns/packet",
        file: "xdp-cost.svg",
        title: "XDP program cost per packet (minus empty program)",
        y_label: "ns per packet",
        cases: &[],
        skip_variants: &[],
    },
    PlotSpec {
        measurement: 2,
        metric: "Mpps",
        file: "throughput.svg",
        title: "Forwarding throughput per variant (A, the generator floor, in the table)",
        y_label: "Mpps delivered",
        cases: &[],
        skip_variants: &["A"],
    },
    PlotSpec {
        measurement: 6,
        metric: "forwarding ns/packet",
        file: "forwarding-cpu.svg",
        title: "Forwarding CPU per packet (node NAPI thread)",
        y_label: "ns of CPU per packet",
        cases: &[],
        skip_variants: &[],
    },
    PlotSpec {
        measurement: 3,
        metric: "ns/new flow (minus A)",
        file: "new-flow.svg",
        title: "Cost per new flow",
        y_label: "ns per new flow",
        cases: &[],
        skip_variants: &[],
    },
    PlotSpec {
        measurement: 4,
        metric: "latency us",
        file: "latency-tcp.svg",
        title: "TCP connect + request + close latency",
        y_label: "microseconds",
        cases: &["tcp-p50", "tcp-p90", "tcp-p99"],
        skip_variants: &[],
    },
    PlotSpec {
        measurement: 4,
        metric: "latency us",
        file: "latency-udp.svg",
        title: "UDP request/response latency",
        y_label: "microseconds",
        cases: &["udp-p50", "udp-p90", "udp-p99"],
        skip_variants: &[],
    },
    PlotSpec {
        measurement: 5,
        metric: "ms",
        file: "programming.svg",
        title: "Time to program N Services",
        y_label: "milliseconds",
        cases: &["program-all"],
        skip_variants: &[],
    },
];

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// (x, median, min, max) per Service count; `true` when the variant does
/// not depend on the Service count (measured once, drawn flat).
type Points = (Vec<(f64, f64, f64, f64)>, bool);

fn plot(dir: &Path, spec: &PlotSpec, results: &Results) -> Result<bool> {
    let mut lines: BTreeMap<String, Points> = BTreeMap::new();
    for s in results.series.iter().filter(|s| {
        s.measurement == spec.measurement
            && s.metric == spec.metric
            && (spec.cases.is_empty() || spec.cases.contains(&s.case.as_str()))
            && !spec.skip_variants.contains(&s.variant.as_str())
    }) {
        let (Some(m), Some(lo), Some(hi)) = (s.median(), s.min(), s.max()) else {
            continue;
        };
        let label = if s.case.is_empty() {
            s.variant.clone()
        } else {
            format!("{} {}", s.case, s.variant)
        };
        let entry = lines.entry(label).or_insert_with(|| (Vec::new(), true));
        entry.0.push((s.services.max(1) as f64, m, lo, hi));
        entry.1 &= s.services == 0;
    }
    if lines.is_empty() {
        return Ok(false);
    }
    let x_max = lines
        .values()
        .flat_map(|l| &l.0)
        .map(|p| p.0)
        .fold(1.0f64, f64::max)
        .max(10_000.0)
        * 2.0;
    let y_max = lines
        .values()
        .flat_map(|l| &l.0)
        .map(|p| p.3)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let path = dir.join(spec.file);
    let root = SVGBackend::new(&path, (900, 540)).into_drawing_area();
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(spec.title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(70)
            .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max)?;
        chart
            .configure_mesh()
            .x_desc("Services (log scale)")
            .y_desc(spec.y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        for (i, (label, (mut pts, flat))) in lines.into_iter().enumerate() {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let color = COLORS[i % COLORS.len()];
            if flat {
                // Independent of the Service count: a horizontal line.
                let (y, lo, hi) = (pts[0].1, pts[0].2, pts[0].3);
                let label = format!("{label} (any count)");
                chart
                    .draw_series(DashedLineSeries::new(
                        [(1.0, y), (x_max, y)],
                        8,
                        5,
                        color.stroke_width(2),
                    ))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                chart.draw_series([PathElement::new(vec![(1.0, lo), (1.0, hi)], color)])?;
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, p.1)),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
            )?;
            chart.draw_series(
                pts.iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color)),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    Ok(true)
}

const DESCRIPTIONS: [(u32, &str); 8] = [
    (
        1,
        "`xdp_ingress` of the forwarder's own eBPF object run with BPF_PROG_TEST_RUN inside a \
         node namespace (routes and permanent neighbours as on a node), with the forwarder's maps \
         filled to the Service count (two measured frontends written through `plan`/`Maps::apply`, \
         the rest one frontend + one backend each written into FRONTENDS/BACKENDS directly, the \
         maps sized at load with `map_max_entries`). Cases: **established** = ACK of a flow whose \
         conntrack entry exists, remote backend: conntrack hit, FIB, source-NAT rewrite, XDP_TX; \
         **new-flow** = SYN with a never-seen source port: frontend hit, backend choice, source-port \
         allocation, two conntrack inserts, rewrite, XDP_TX; **established-local** = ACK of an \
         existing flow to a pod on this node: XDP finds the flow and leaves delivery to tc \
         (XDP_PASS); **miss** = TCP to a port that is no frontend; **non-ip** = ARP. \
         *single-shot*: repeat 1, a fresh copy of the frame per call, median of the kernel-measured \
         duration over many calls (a large repeat would re-run the program on the already \
         rewritten buffer). *repeat*: one call with a large repeat, for the cases that leave the \
         packet untouched. *net* = case − the empty XDP_PASS program under the same harness, \
         within the run.",
    ),
    (
        2,
        "Client namespace → node namespace → pod namespace (Calico-style routed veth: `cali1` on \
         the node, a /32 route, proxy ARP). The generator is BPF_PROG_TEST_RUN in XDP live-frames \
         mode on the client's eth0, running a ~20-instruction XDP_TX program that writes the 42-byte \
         header from a template into each frame (live frames are recycled with whatever the path \
         wrote into them) and sends it to the node: 60-byte UDP frames (64 on a wire), batches \
         of 64, one flow. Variants: **A** XDP_DROP on the node's eth0 (the floor: generator + \
         veth), **B** a bare XDP redirect to the pod's veth with no rewrite and an XDP_PASS program \
         on the pod's eth0 (the synthetic physical limit of this path), **F** the forwarder daemon \
         (nodePort → pod on this node), **C0** plain kernel forwarding to the pod's address with no \
         rules, **K-legacy / K-nft** kube-proxy's rules loaded with iptables-restore, the measured \
         Service first or last in its chains. The pod counts what it receives (rx counter of its \
         eth0) and drops it at tc ingress. The node's NAPI runs in softirq context on the \
         generator's CPU right after each batch is flushed, so nothing queues or overflows; the \
         kernel-measured time of the test run's batch loop (setup/teardown and time descheduled \
         excluded) covers generator and path: ns/packet = that time / delivered, Mpps its \
         inverse, path ns/packet = ns/packet − A's (same run). wall-clock Mpps (over the whole \
         call, setup included) is given for reference.",
    ),
    (
        3,
        "The same rig, generator and timing as measurement 2, but every frame carries a new UDP \
         source port (a counter in the generator; frames of one burst never repeat a port) from \
         a client address no earlier burst used: each packet creates a flow. Bursts of 20,000 \
         flows (5,000 with --quick), below the ~64,000 source ports MASQUERADE has for \
         kube-proxy's masquerading of external nodePort traffic; the node's conntrack is flushed \
         between bursts (K, C0); F's flows fit in its conntrack map (262,144 entries, two per \
         flow). ns/new flow = ns/packet − A's ns/packet (same run). C0 has no rule, so its \
         namespace runs no conntrack at all.",
    ),
    (
        4,
        "Real sockets from the client namespace to nodePorts on the node, served by `podserver` \
         in the pod: TCP connect + `GET /productpage` + close, one connection at a time, and UDP \
         request/response on one connected socket. Latency percentiles over all requests of a \
         run; rate = requests / wall time.",
    ),
    (
        5,
        "**program-all**: from N Services (manifest YAML already in memory) to all of them in \
         the maps: parse + translate + plan + apply into freshly loaded maps; against \
         kube-proxy's full `iptables-restore --noflush` (its jump rules ensured first) of the \
         equivalent rules into an empty namespace. **update-one**: one Service's endpoint changed: \
         ours = translate + plan (diff against the maps' snapshot) + apply; kube-proxy = its \
         sync, a full restore of all rules (kube-proxy's partial syncs still rewrite \
         KUBE-SERVICES/KUBE-NODEPORTS in full). **daemon**: the real daemon started with an N-Service \
         manifest: VmHWM (peak RSS) and the memlock of its BPF maps (`/proc/<pid>/fdinfo`).",
    ),
    (
        6,
        "The node's eth0 runs threaded NAPI (`/sys/class/net/eth0/threaded` = 1 inside the node \
         namespace) and its NAPI kthread is pinned to its own CPU; the generator runs on the \
         other. Everything the node does for a packet (XDP, tc, the stack, delivery into the pod \
         namespace, the pod's tc drop) runs in that thread: its CPU time (schedstat) per \
         delivered packet is the forwarding cost, without the generator's.",
    ),
    (
        7,
        "The integration tests' two-node cluster (client, lan bridge, node1 and node2, one pod \
         each): frames reach the nodes at the MTU, as from a NIC (TSO/GSO off on the lan side \
         of each node's veth), with GRO on the nodes' eth0, the same wire for every variant. \
         Two Services, one per pod: nodePort 31380 to the pod on node1 (**local**: delivered \
         into the pod on node1) and 31381 to the pod on node2 (**remote**: source-NATed on \
         node1 and sent on to node2). The client (this process, in the client namespace) opens \
         4 TCP connections at once and downloads (`GET /zeros` from `podserver`, pod → client) \
         or uploads (`PUT /zeros`, client → pod) without content checks; Gbit/s = payload \
         bytes moved by all 4 together during the measured window (after a ramp-up) / its \
         length. Variants: **F** the forwarder daemon on node1, **K-legacy / K-nft** \
         kube-proxy's rules on node1, **C0** plain routing without rules or NAT (the client \
         routes the pods' addresses via node1, node2 routes the client via node1: the same \
         hops as the NAT'd variants). ICMP redirects are off on node1 for all. Client, nodes \
         and pods share the machine's CPUs, so this is the throughput of the whole testbed, \
         where every variant pays the same endpoint costs. Toward a local pod F's XDP program \
         runs once per frame (before GRO merges them) and its tc program once per merged skb, \
         where K and C0 run the stack once per merged skb only; toward a remote pod F sends \
         every frame back out with XDP_TX, without an skb.",
    ),
    (
        8,
        "The integration tests' two-node cluster, node1 running the forwarder and kube-proxy's \
         rules. One Service, nodePort 31390, whose only endpoint is the pod on node2 (port 8080, \
         where the bench listens with a backlog above the connection count and accepts none: each handshake completes and waits in the accept queue). The client (this process, in \
         the client namespace, local ports 1024-65535, open-file limit raised) opens 30,000 TCP \
         connections (3,000 with --quick) from one address (child processes of 10,000 each, 8 at a time in each, 4 s connect timeout) and keeps them all open; \
         then the forwarder's established table is counted: **carried by the forwarder** = its \
         flows to that backend; **carried by kube-proxy** = the other open connections, whose SYN \
         the forwarder handed to the kernel because no source port was free (16 probes into \
         33,512 ports per backend; **SYNs passed** counts those SYNs, retransmits included, \
         `pass_snat_exhausted`); **failed** = connects without an answer within 4 s. A fresh cluster per \
         run (closed flows hold their ports for the FIN timeout).",
    ),
];

/// How to read the variants, and what the forwarder's datapath does on this
/// path (design facts, no numbers: those are in the tables).
const READING: &str = "## How to read this\n\n\
- **F** is the real daemon (`forwarder run`) on the node with the Services of the scenario. For a \
  pod on the same node behind a veth, its XDP program classifies the packet (frontend and \
  conntrack lookups, FIB) and leaves delivery to its tc program (`xdp_to_tc`), which rewrites the \
  packet and moves it into the pod's namespace with `bpf_redirect_peer` (`tc_redirect_peer`): an \
  skb is built for every packet, and the packet is parsed and looked up twice. The forwarder's \
  counters after each F setup are in the notes of measurement 2. **B** skips all of that: a bare \
  XDP redirect into the pod's veth, which is why F/B can be far from 1 on this path; on a \
  remote-backend path F transmits with XDP_TX and no skb.\n\
- **K** is kube-proxy's own ruleset from `tests/src/kube_proxy.rs` (the generator tested against \
  kube-proxy's golden outputs), loaded the way kube-proxy loads it. Only the first packet of a \
  connection walks the nat chains (KUBE-SERVICES, then KUBE-NODEPORTS); later packets only cost \
  conntrack and the filter chains, so the Service count matters for new flows (measurement 3) \
  and for rule loading (measurement 5) far more than for one established flow (measurement 2).\n\
- **C0** has no rule at all, and so no conntrack in its namespace: the kernel's forwarding cost \
  alone.\n\
- Targets are checked in each measurement's findings, from this run's medians; \
  \"NOT met\" is reported as measured.\n\n";

pub fn write(options: &Options, machine: &Value, results: &Results) -> Result<()> {
    let dir = &options.out;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = results.to_json(machine, options);
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .context("writing results.json")?;
    let mut csv = String::from("measurement,case,variant,services,metric,run,value\n");
    for s in &results.series {
        for (i, v) in s.values.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{}",
                s.measurement, s.case, s.variant, s.services, s.metric, i, v
            );
        }
    }
    std::fs::write(dir.join("results.csv"), csv).context("writing results.csv")?;

    let mut plots: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for spec in &PLOTS {
        if plot(dir, spec, results)? {
            plots.entry(spec.measurement).or_default().push(spec.file);
        }
    }

    let m = |k: &str| {
        machine
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# forwarder benchmark: against kube-proxy (iptables mode) and the path's limit\n"
    );
    let _ =
        writeln!(
        md,
        "Produced by `{}` on {} ({} CPUs, {} MiB), kernel {}, at {}; load average at start: {}. \
         {} run(s) per measurement{}. {} / {}.\n",
        options.command,
        m("cpu"),
        machine.get("cpus").and_then(Value::as_u64).unwrap_or(0),
        machine.get("memory_mib").and_then(Value::as_u64).unwrap_or(0),
        m("kernel"),
        m("date"),
        m("loadavg_at_start"),
        options.runs,
        if options.quick {
            " (--quick: smallest scale only)"
        } else {
            ""
        },
        m("iptables_legacy"),
        m("iptables_nft"),
    );
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        md,
        "Load average when the report was written: {}. The machine is shared (2 vCPUs); a load \
         above ~0.5 at start or end means other work ran during the measurements and the \
         spread (min – max) shows how much it moved them.\n",
        load_end.trim()
    );
    md.push_str(READING);
    md.push_str(
        "Every number below comes from this run (raw values per run in `results.json` and \
         `results.csv`): median and min – max over the runs; ratios are computed within each run \
         and then summarised. Targets are checked in the notes, never asserted.\n\n",
    );
    if !results.failures.is_empty() {
        md.push_str("## Measurements that failed or are missing\n\n");
        for (mm, e) in &results.failures {
            let _ = writeln!(md, "- measurement {mm}: `{}`", e.replace('`', "'"));
        }
        md.push('\n');
    }
    for (mm, title) in TITLES {
        let series: Vec<&Series> = results
            .series
            .iter()
            .filter(|s| s.measurement == mm)
            .collect();
        let notes: Vec<&String> = results
            .notes
            .iter()
            .filter(|(n, _)| *n == mm)
            .map(|(_, t)| t)
            .collect();
        let _ = writeln!(md, "## {title}\n");
        if let Some((_, d)) = DESCRIPTIONS.iter().find(|(n, _)| *n == mm) {
            let _ = writeln!(md, "{d}\n");
        }
        if series.is_empty() && notes.is_empty() {
            let failed = results.failures.iter().any(|(n, _)| *n == mm);
            let _ = writeln!(
                md,
                "_Not measured in this run{}._\n",
                if failed { " (failed, see above)" } else { "" }
            );
            continue;
        }
        if !notes.is_empty() {
            md.push_str("**Findings of this run:**\n\n");
            for n in notes {
                let _ = writeln!(md, "- {n}");
            }
            md.push('\n');
        }
        for file in plots.get(&mm).into_iter().flatten() {
            let _ = writeln!(md, "![{file}]({file})\n");
        }
        let mut metrics: Vec<&str> = series.iter().map(|s| s.metric.as_str()).collect();
        metrics.dedup();
        let mut seen = Vec::new();
        for metric in metrics {
            if seen.contains(&metric) {
                continue;
            }
            seen.push(metric);
            let rows: Vec<&Series> = series
                .iter()
                .copied()
                .filter(|s| s.metric == metric)
                .collect();
            let _ = writeln!(md, "**{metric}**\n\n{}", table(&rows));
        }
    }
    std::fs::write(dir.join("README.md"), md).context("writing README.md")?;
    eprintln!("bench: report written to {}", dir.display());
    Ok(())
}
