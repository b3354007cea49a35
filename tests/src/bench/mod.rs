//! `cargo xtask bench`: the forwarder against kube-proxy's own iptables
//! rules (legacy and nft) and against the physical limit of the path, on one
//! machine, in one run, every variant driven by the same generator.
//!
//! Measurements (each a module):
//! 1. [`progcost`]: per-packet cost of the XDP program (BPF_PROG_TEST_RUN).
//! 2. [`path`]: forwarding throughput client → node → pod (A, B, F, C0, K),
//!    with the forwarding CPU per packet (threaded NAPI, measurement 6).
//! 3. [`path`]: new-flow cost (every packet a new 5-tuple), F against K.
//! 4. [`sockets`]: TCP and UDP request/response latency through the nodePort.
//! 5. [`control`]: time to program N Services, one update, daemon memory.
//! 7. [`bulk`]: bulk TCP throughput through the nodePort, several flows, on
//!    the integration tests' wire-like cluster (F, K, C0).
//! 8. [`flows`]: 30,000 concurrent TCP connections through one node to one
//!    remote backend: how many the forwarder carried, how many fell back.
//!
//! Every number in the report comes from the run that wrote it: samples are
//! collected per run, summarised as median and min–max, ratios are taken
//! within a run.

pub mod bpf;
pub mod bulk;
pub mod control;
pub mod flows;
pub mod frames;
pub mod path;
pub mod progcost;
pub mod report;
pub mod rig;
pub mod scenario;
pub mod sockets;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Every measurement once at the smallest scale.
    pub quick: bool,
    /// Where the report goes.
    pub out: PathBuf,
    /// Repetitions of each measurement (median and min–max over these).
    pub runs: usize,
    /// Only these measurements (1..=8); empty: all.
    pub only: Vec<u32>,
    /// The command line that produced the report, for the report.
    pub command: String,
}

impl Options {
    pub fn wants(&self, measurement: u32) -> bool {
        self.only.is_empty() || self.only.contains(&measurement)
    }
}

/// One measured quantity of one case, one value per run.
#[derive(Clone, Debug)]
pub struct Series {
    pub measurement: u32,
    /// e.g. `established`, `udp-64B`.
    pub case: String,
    /// e.g. `F`, `K-legacy`, `ours`.
    pub variant: String,
    /// Number of Services programmed (0 where it does not apply).
    pub services: u64,
    /// e.g. `ns/packet`, `Mpps`.
    pub metric: String,
    pub values: Vec<f64>,
}

impl Series {
    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }
    pub fn min(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::min)
    }
    pub fn max(&self) -> Option<f64> {
        self.values.iter().copied().reduce(f64::max)
    }

    fn to_json(&self) -> Value {
        json!({
            "measurement": self.measurement,
            "case": self.case,
            "variant": self.variant,
            "services": self.services,
            "metric": self.metric,
            "values": self.values,
            "median": self.median(),
            "min": self.min(),
            "max": self.max(),
        })
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The value at quantile `q` (0..=1) of `sorted` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Everything a run collected: series, notes (shortfalls, explanations) and
/// measurements that could not run.
#[derive(Debug, Default)]
pub struct Results {
    pub series: Vec<Series>,
    pub notes: Vec<(u32, String)>,
    pub failures: Vec<(u32, String)>,
    pub durations: Vec<(u32, Duration)>,
}

impl Results {
    /// Appends `value` to the series with these keys (creating it).
    pub fn push(
        &mut self,
        measurement: u32,
        case: &str,
        variant: &str,
        services: u64,
        metric: &str,
        value: f64,
    ) {
        match self.series.iter_mut().find(|s| {
            s.measurement == measurement
                && s.case == case
                && s.variant == variant
                && s.services == services
                && s.metric == metric
        }) {
            Some(s) => s.values.push(value),
            None => self.series.push(Series {
                measurement,
                case: case.into(),
                variant: variant.into(),
                services,
                metric: metric.into(),
                values: vec![value],
            }),
        }
    }

    pub fn note(&mut self, measurement: u32, text: impl Into<String>) {
        let text = text.into();
        eprintln!("bench: note ({measurement}): {text}");
        self.notes.push((measurement, text));
    }

    pub fn find(
        &self,
        measurement: u32,
        case: &str,
        variant: &str,
        services: u64,
        metric: &str,
    ) -> Option<&Series> {
        self.series.iter().find(|s| {
            s.measurement == measurement
                && s.case == case
                && s.variant == variant
                && s.services == services
                && s.metric == metric
        })
    }

    pub fn to_json(&self, machine: &Value, options: &Options) -> Value {
        json!({
            "machine": machine,
            "command": options.command,
            "quick": options.quick,
            "runs": options.runs,
            "series": self.series.iter().map(Series::to_json).collect::<Vec<_>>(),
            "notes": self.notes.iter().map(|(m, t)| json!({"measurement": m, "text": t})).collect::<Vec<_>>(),
            "failures": self.failures.iter().map(|(m, t)| json!({"measurement": m, "error": t})).collect::<Vec<_>>(),
            "durations_s": self.durations.iter().map(|(m, d)| json!({"measurement": m, "seconds": d.as_secs_f64()})).collect::<Vec<_>>(),
        })
    }
}

/// Service counts of a measurement: the smallest only with `--quick`.
pub fn scales(options: &Options, full: &[u64]) -> Vec<u64> {
    if options.quick {
        full.iter().copied().take(1).collect()
    } else {
        full.to_vec()
    }
}

/// Runs every wanted measurement, writes the report into `options.out`.
/// A measurement that fails is recorded as failed (with its error) and the
/// others still run; the result is an error only when the harness itself
/// could not produce a report, or when a measurement failed.
pub fn run(options: &Options) -> Result<Results> {
    crate::netns::reap_stale();
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let machine = report::machine_info();
    let mut results = Results::default();
    type Measure = fn(&Options, &mut Results) -> Result<()>;
    let all: [(u32, &str, Measure); 6] = [
        (1, "XDP program cost", progcost::run),
        (5, "control plane", control::run),
        (
            2,
            "throughput, new flows and forwarding CPU (2, 3, 6)",
            path::run,
        ),
        (4, "real sockets", sockets::run),
        (7, "bulk TCP through the nodePort", bulk::run),
        (
            8,
            "concurrent connections to one remote backend",
            flows::run,
        ),
    ];
    for (m, name, f) in all {
        let wanted = options.wants(m) || (m == 2 && (options.wants(3) || options.wants(6)));
        if !wanted {
            continue;
        }
        eprintln!("bench: === measurement {m}: {name} ===");
        let start = Instant::now();
        if let Err(e) = f(options, &mut results) {
            eprintln!("bench: measurement {m} failed: {e:#}");
            results.failures.push((m, format!("{e:#}")));
        }
        results.durations.push((m, start.elapsed()));
    }
    report::write(options, &machine, &results)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), Some(50.0));
        assert_eq!(quantile(&sorted, 0.99), Some(99.0));
        assert_eq!(quantile(&sorted, 0.0), Some(1.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn series_collect_per_key() {
        let mut r = Results::default();
        r.push(2, "", "F", 1, "Mpps", 1.0);
        r.push(2, "", "F", 1, "Mpps", 3.0);
        r.push(2, "", "F", 10, "Mpps", 2.0);
        let s = r.find(2, "", "F", 1, "Mpps").unwrap();
        assert_eq!(s.values, vec![1.0, 3.0]);
        assert_eq!(
            (s.min(), s.max(), s.median()),
            (Some(1.0), Some(3.0), Some(2.0))
        );
        assert_eq!(r.series.len(), 2);
    }

    #[test]
    fn report_is_written_with_plots() {
        let dir = std::env::temp_dir().join(format!("bench-report-test-{}", std::process::id()));
        let options = Options {
            quick: true,
            out: dir.clone(),
            runs: 2,
            only: vec![],
            command: "bench --quick".into(),
        };
        let mut r = Results::default();
        for (n, v) in [(1, 100.0), (1000, 101.0), (100_000, 104.0)] {
            r.push(1, "established", "F", n, "net ns/packet", v);
            r.push(1, "established", "F", n, "net ns/packet", v + 2.0);
        }
        r.push(2, "", "B", 0, "Mpps", 2.0);
        r.push(2, "", "F", 1, "Mpps", 1.0);
        r.note(2, "a finding");
        r.failures.push((4, "could not run".into()));
        report::write(&options, &report::machine_info(), &r).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(
            md.contains("| established | F | 100000 | net ns/packet | 105.0 | 104.0 – 106.0 | 2 |")
        );
        assert!(md.contains("a finding"));
        assert!(md.contains("measurement 4: `could not run`"));
        assert!(md.contains("![xdp-cost.svg](xdp-cost.svg)"));
        let svg = std::fs::read_to_string(dir.join("xdp-cost.svg")).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(dir.join("throughput.svg").is_file());
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["series"].as_array().unwrap().len(), 5);
        assert!(std::fs::read_to_string(dir.join("results.csv"))
            .unwrap()
            .starts_with("measurement,case,variant,services,metric,run,value\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
