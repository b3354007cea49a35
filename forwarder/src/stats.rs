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
        services,
        conntrack_entries: maps.conntrack.keys().filter(|k| k.is_ok()).count(),
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
