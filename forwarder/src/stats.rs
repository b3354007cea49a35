//! `forwarder stats`: counters read from the pinned maps.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Result;
use forwarder_common::Reason;
use serde::Serialize;

use crate::{maps::Maps, model::Protocol};

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
    let snapshot = maps.snapshot()?;
    let mut frontends_of: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (k, v) in &snapshot.frontends {
        let proto =
            Protocol::from_number(k.proto).map_or_else(|| k.proto.to_string(), |p| p.to_string());
        frontends_of.entry(v.stats_slot).or_default().push(format!(
            "{}:{}/{}",
            Ipv4Addr::from(k.addr_be.to_ne_bytes()),
            u16::from_be(k.port_be),
            proto
        ));
    }
    let mut services = Vec::new();
    for (slot, label) in &snapshot.labels {
        let totals = maps.service_totals(*slot)?;
        let frontends = frontends_of.remove(slot).unwrap_or_default();
        services.push(ServiceStats {
            service: label.clone(),
            frontend: frontends.first().cloned().unwrap_or_default(),
            frontends,
            packets: totals.packets,
            bytes: totals.bytes,
        });
    }
    services.sort_by(|a, b| a.service.cmp(&b.service));
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
