//! `bench`: the benchmark of the forwarder against kube-proxy's iptables
//! rules and the path's physical limit (run by `cargo xtask bench`, as root).
//!
//! ```text
//! bench [--quick] [--out DIR] [--runs N] [--only 1,2,...]
//! ```
//!
//! Writes `README.md`, SVG plots, `results.json` and `results.csv` into
//! `DIR` (default `bench`). Exits non-zero only when the harness fails (a
//! measurement that could not run), never because of a timing.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use integration_tests::{bench, netns};

fn usage() -> &'static str {
    "usage: bench [--quick] [--out DIR] [--runs N] [--only 1,2,...]"
}

fn parse(args: &[String]) -> Result<bench::Options> {
    let mut options = bench::Options {
        quick: false,
        out: PathBuf::from("bench"),
        runs: 5,
        only: Vec::new(),
        command: std::env::var("BENCH_COMMAND").unwrap_or_else(|_| {
            std::iter::once("bench".to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ")
        }),
    };
    let mut runs_given = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => options.quick = true,
            "--out" => {
                options.out = PathBuf::from(it.next().context("--out needs a directory")?);
            }
            "--runs" => {
                let v = it.next().context("--runs needs a number")?;
                options.runs = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .with_context(|| format!("--runs: {v:?} is not a number within 1..=100"))?;
                runs_given = true;
            }
            "--only" => {
                let v = it.next().context("--only needs a list like 1,2")?;
                for part in v.split(',') {
                    let n: u32 = part
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| (1..=8).contains(n))
                        .with_context(|| format!("--only: {part:?} is not a measurement 1..=8"))?;
                    options.only.push(n);
                }
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if options.quick && !runs_given {
        options.runs = 1;
    }
    Ok(options)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // A helper of measurement 8, run by the bench itself in the client namespace.
    if args.first().map(String::as_str) == Some("hold-connections") {
        return match bench::flows::hold_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench hold-connections: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(reason) = netns::skip_reason() {
        eprintln!("bench: cannot run: {reason}");
        return ExitCode::FAILURE;
    }
    match bench::run(&options) {
        Ok(results) if results.failures.is_empty() => ExitCode::SUCCESS,
        Ok(results) => {
            for (m, e) in &results.failures {
                eprintln!("bench: measurement {m} failed: {e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
