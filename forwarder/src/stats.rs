//! `forwarder stats`: counters read from the pinned maps.
use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Result;
use forwarder_common::Reason;
use serde::Serialize;

use crate::{inspect, maps::Maps};

#[derive(Debug, Serialize)]
pub struct ServiceStats {
    pub service: String,
    /// The first of `frontends`, for quick reading.
    pub frontend: String,
    pub frontends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub reasons: BTreeMap<&'static str, u64>,
    /// Packets of tracked flows handed to the kernel, by reason (non-zero
    /// only): netfilter saw each in the middle of a flow it never saw begin.
    pub flow_packets_to_kernel: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceStats>,
    pub conntrack_entries: usize,
}

pub fn collect(maps: &Maps) -> Result<Stats> {
    let services = inspect::services(maps)?
        .into_iter()
        .map(|row| ServiceStats {
            service: row.service,
            frontend: row.frontends.first().cloned().unwrap_or_default(),
            frontends: row.frontends,
            packets: row.packets,
            bytes: row.bytes,
        })
        .collect();
    Ok(Stats {
        reasons: maps.reason_totals()?,
        flow_packets_to_kernel: maps.flow_pass_totals()?,
        services,
        conntrack_entries: [&maps.conntrack, &maps.ct_half_open]
            .iter()
            .map(|m| m.keys().filter(|k| k.is_ok()).count())
            .sum(),
    })
}

pub fn render_text(s: &Stats) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Services");
    if s.services.is_empty() {
        let _ = writeln!(out, "  (none programmed)");
    }
    for svc in &s.services {
        let _ = writeln!(
            out,
            "  {:<48} {:>10} packets {:>12} bytes  {}",
            svc.service,
            svc.packets,
            svc.bytes,
            svc.frontends.join(", ")
        );
    }
    let _ = writeln!(out, "Datapath decisions (non-zero)");
    for r in Reason::ALL {
        let n = s.reasons.get(r.name()).copied().unwrap_or(0);
        if n > 0 {
            let _ = writeln!(out, "  {:<24} {:>10}  {}", r.name(), n, r.description());
        }
    }
    let _ = writeln!(
        out,
        "Packets of tracked flows handed to the kernel (non-zero)"
    );
    if s.flow_packets_to_kernel.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for r in Reason::ALL {
        if let Some(n) = s.flow_packets_to_kernel.get(r.name()) {
            let _ = writeln!(out, "  {:<24} {:>10}  {}", r.name(), n, r.description());
        }
    }
    let _ = writeln!(out, "Conntrack entries: {}", s.conntrack_entries);
    out
}

pub fn run(pin_dir: &Path, json: bool) -> Result<()> {
    let maps = Maps::open_pinned(pin_dir)?;
    let stats = collect(&maps)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", render_text(&stats));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_non_zero_decisions_and_flow_packets_to_the_kernel() {
        let s = Stats {
            reasons: BTreeMap::from([("xdp_tx", 7), ("pass_no_service", 0)]),
            flow_packets_to_kernel: BTreeMap::from([("pass_wrong_device", 3)]),
            services: Vec::new(),
            conntrack_entries: 4,
        };
        let text = render_text(&s);
        assert!(text.contains("xdp_tx"), "{text}");
        assert!(!text.contains("pass_no_service"), "{text}");
        let (_, flows) = text
            .split_once("Packets of tracked flows handed to the kernel")
            .expect("flow section");
        assert!(
            flows.contains("pass_wrong_device") && flows.contains(" 3 "),
            "{text}"
        );
        assert!(text.contains("Conntrack entries: 4"), "{text}");
        let none = render_text(&Stats {
            flow_packets_to_kernel: BTreeMap::new(),
            ..s
        });
        assert!(
            none.contains("handed to the kernel (non-zero)\n  (none)"),
            "{none}"
        );
    }
}
