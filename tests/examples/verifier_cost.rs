//! Loads the forwarder's programs and prints what the verifier spent on
//! each: instructions processed and load time. Run as root:
//! `cargo run --release -p integration-tests --example verifier_cost`.
use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, Xdp},
    Ebpf,
};
use forwarder_common::program_names;

fn main() -> Result<()> {
    let mut ebpf =
        Ebpf::load(&forwarder::kfuncs::prepared_object()?.0).context("loading the eBPF object")?;
    let start = Instant::now();
    let xdp: &mut Xdp = ebpf
        .program_mut(program_names::XDP)
        .context("xdp program")?
        .try_into()?;
    xdp.load().context("verifying the XDP program")?;
    let xdp_insns = xdp.info()?.verified_instruction_count();
    let xdp_time = start.elapsed();
    let start = Instant::now();
    let tc: &mut SchedClassifier = ebpf
        .program_mut(program_names::TC)
        .context("tc program")?
        .try_into()?;
    tc.load().context("verifying the tc program")?;
    let tc_insns = tc.info()?.verified_instruction_count();
    println!(
        "xdp: {xdp_insns:?} instructions verified in {:.2}s; tc: {tc_insns:?} in {:.2}s",
        xdp_time.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
