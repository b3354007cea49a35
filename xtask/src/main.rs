//! Developer tasks for the forwarder workspace: `cargo xtask <command>`.
//!
//! - `setup`: install the nightly toolchain pieces, bpf-linker and the Debian
//!   packages (idempotent).
//! - `build`: setup, then build the daemon and the integration-test binaries.
//! - `test`: setup, build, lint, unit tests, integration tests and a quick
//!   benchmark into a temporary directory (root).
//! - `image [--name N] [--tag T] [--out FILE]`: setup, then the daemon as a
//!   reproducible OCI image (oci-archive) under `target/image/`.
//! - `demo`: setup, build, then run the NodePort demo (root).
//! - `fuzz [--frames N] [--seed S]`: setup, then the datapath fuzz test
//!   (tests/tests/fuzz.rs) with N frames (default 1,000,000) (root).
//! - `bench [--quick] [--out DIR]`: setup, build, then the benchmark against
//!   kube-proxy's iptables rules; the report goes to `bench/` (root).

mod cmd;
mod image;
mod llvm;
mod setup;
mod tasks;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, test, demo and benchmark the forwarder"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: the nightly toolchain with
    /// rust-src, bpf-linker built against nightly's LLVM, and the Debian
    /// packages (apt only as root). Idempotent.
    Setup,
    /// Setup, then build target/release/forwarder (with its eBPF programs)
    /// and the integration-test helper binaries.
    Build,
    /// Setup, build, rustfmt + clippy, unit tests, integration tests and
    /// `bench --quick` into a temporary directory (fails only if the
    /// benchmark harness fails, never on timings). Needs root: creates
    /// network namespaces and loads eBPF.
    Test {
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Passed to the integration test run (e.g. test name filters).
        #[arg(last = true)]
        integration_args: Vec<String>,
    },
    /// Setup, then build the daemon as a static binary (musl) and write it as
    /// a reproducible OCI image: an oci-archive under target/image/.
    Image {
        /// Repository part of the image name.
        #[arg(long, default_value = image::DEFAULT_NAME)]
        name: String,
        /// Tag (default: the forwarder crate's version).
        #[arg(long)]
        tag: Option<String>,
        /// Where to write the archive (default: target/image/forwarder-<tag>.tar).
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// The org.opencontainers.image.source label (default: the git
        /// remote `origin`).
        #[arg(long, value_name = "URL")]
        source: Option<String>,
    },
    /// Setup, build, then run the istio-ingressgateway NodePort demo in
    /// network namespaces; exits with the demo's exit code. Needs root.
    Demo {
        /// Passed to the demo binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then the datapath fuzz test (tests/tests/fuzz.rs) with many
    /// frames: seeded frames through every attachment of the programs
    /// (BPF_PROG_TEST_RUN). Needs root.
    Fuzz {
        /// Frames to generate (`cargo xtask test` runs the test's default).
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// The seed (default: from the clock); the test prints it.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Setup, build, then benchmark the forwarder against kube-proxy's
    /// iptables rules (legacy and nft) and the path's physical limit; writes
    /// the report (Markdown tables, SVG plots, raw data). Needs root.
    Bench {
        /// Every measurement once at the smallest scale (under five minutes).
        #[arg(long)]
        quick: bool,
        /// Where the report goes (default: bench/ in the workspace).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Passed to the bench binary (e.g. `--runs 7`, `--only 1,5`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn run(task: Task) -> Result<ExitCode> {
    match task {
        Task::Setup => setup::setup()?,
        Task::Build => {
            let paths = tasks::paths()?;
            setup::setup()?;
            tasks::build(&paths)?;
        }
        Task::Test {
            no_lint,
            integration_args,
        } => tasks::test(&tasks::TestOptions {
            no_lint,
            integration_args,
        })?,
        Task::Image {
            name,
            tag,
            out,
            source,
        } => {
            let paths = tasks::paths()?;
            setup::setup()?;
            let out = match out {
                Some(p) if p.is_relative() => Some(
                    std::env::current_dir()
                        .context("current directory")?
                        .join(p),
                ),
                other => other,
            };
            image::image(
                &paths,
                &image::ImageOptions {
                    name,
                    tag,
                    out,
                    source,
                },
            )?;
        }
        Task::Demo { args } => return tasks::demo(&args),
        Task::Fuzz { frames, seed } => tasks::fuzz(frames, seed)?,
        Task::Bench { quick, out, args } => tasks::bench(quick, out, &args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = cmd::add_cargo_bin_to_path().and_then(|()| run(cli.command));
    match result {
        Ok(code) => code,
        Err(err) if err.chain().any(|e| e.is::<cmd::Interrupted>()) => {
            eprintln!("xtask: {err}");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("xtask:   caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
