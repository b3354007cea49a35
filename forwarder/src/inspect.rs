//! `forwarder status | services | conntrack`: what the datapath holds, read
//! from the pinned maps (with or without a running daemon).
use std::{collections::BTreeMap, fmt::Write as _, fs, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    maps::MapData,
    programs::links::{FdLink, PinnedLink},
};
use forwarder_common::{
    map_names, BackendKey, BACKEND_F_LOCAL, BACKEND_F_POLICED, CT_F_REPLY, CT_F_SNAT,
    CT_STATE_CLOSED, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_SYN_RECV, IFACE_F_EXTERNAL,
    IFACE_F_VETH_PEER, IFACE_F_XDP_TX,
};
use serde::Serialize;

use crate::{
    datapath::{self, links_dir, Attached, TcWay},
    maps::{pin_path, Maps},
    model::Protocol,
    netdev,
};

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

fn endpoint(addr_be: u32, port_be: u16) -> String {
    format!("{}:{}", ip(addr_be), u16::from_be(port_be))
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub backend: String,
    pub local: bool,
    /// A local pod under ingress NetworkPolicy: its new flows go to
    /// kube-proxy, and this says which policies (or why in doubt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policed: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ServiceRow {
    pub service: String,
    pub frontends: Vec<String>,
    pub backends: Vec<BackendRow>,
    /// Drop when empty (externalTrafficPolicy: Local).
    pub local_policy: bool,
    /// sessionAffinity ClientIP timeout in seconds (0: no affinity).
    pub affinity_timeout_seconds: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// Every programmed service port: its frontends, its backends and counters.
pub fn services(maps: &Maps) -> Result<Vec<ServiceRow>> {
    let snap = maps.snapshot()?;
    let policed = maps.policed_pods()?;
    let mut rows: BTreeMap<u32, ServiceRow> = BTreeMap::new();
    for (k, f) in &snap.frontends {
        let row = rows.entry(f.stats_slot).or_insert_with(|| ServiceRow {
            service: snap
                .labels
                .get(&f.stats_slot)
                .cloned()
                .unwrap_or_else(|| format!("slot {}", f.stats_slot)),
            frontends: Vec::new(),
            backends: Vec::new(),
            local_policy: f.flags & forwarder_common::FRONTEND_F_DROP_IF_EMPTY != 0,
            affinity_timeout_seconds: f.affinity_timeout_s,
            packets: 0,
            bytes: 0,
        });
        row.frontends.push(format!(
            "{}/{}",
            endpoint(k.addr_be, k.port_be),
            proto_name(k.proto)
        ));
        if row.backends.is_empty() {
            for index in 0..f.backend_count {
                let key = BackendKey {
                    backend_set: f.backend_set,
                    index,
                };
                if let Some(b) = snap.backends.get(&key) {
                    let c = maps.backend_totals(b.stats_slot).unwrap_or_default();
                    row.backends.push(BackendRow {
                        backend: endpoint(b.addr_be, b.port_be),
                        local: b.flags & BACKEND_F_LOCAL != 0,
                        policed: (b.flags & BACKEND_F_POLICED != 0).then(|| {
                            policed
                                .get(&b.addr_be)
                                .cloned()
                                .unwrap_or_else(|| "NetworkPolicy".into())
                        }),
                        packets: if b.stats_slot == 0 { 0 } else { c.packets },
                        bytes: if b.stats_slot == 0 { 0 } else { c.bytes },
                    });
                }
            }
        }
    }
    for (slot, row) in rows.iter_mut() {
        let c = maps.service_totals(*slot)?;
        row.packets = c.packets;
        row.bytes = c.bytes;
    }
    let mut out: Vec<ServiceRow> = rows.into_values().collect();
    out.sort_by(|a, b| a.service.cmp(&b.service));
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub protocol: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The node address:port the backend sees, for source-NATed flows.
    pub snat: Option<String>,
    pub state: &'static str,
    pub age_seconds: u64,
    pub idle_seconds: u64,
    pub generation: u16,
}

/// Live flows (one row per flow, from its forward entry).
pub fn conntrack(maps: &Maps) -> Result<Vec<FlowRow>> {
    let now = datapath::monotonic_ns()?;
    let mut rows = Vec::new();
    for item in maps.ct_half_open.iter().chain(maps.conntrack.iter()) {
        let Ok((k, e)) = item else { continue };
        if e.flags & CT_F_REPLY != 0 {
            continue;
        }
        let tcp = k.proto == forwarder_common::IPPROTO_TCP;
        rows.push(FlowRow {
            protocol: proto_name(k.proto),
            client: endpoint(k.saddr_be, k.sport_be),
            frontend: endpoint(k.daddr_be, k.dport_be),
            backend: endpoint(e.new_daddr_be, e.new_dport_be),
            snat: (e.flags & CT_F_SNAT != 0).then(|| endpoint(e.new_saddr_be, e.new_sport_be)),
            state: match (tcp, e.state) {
                (_, CT_STATE_ESTABLISHED) if tcp => "established",
                (_, CT_STATE_ESTABLISHED) => "replied",
                (true, CT_STATE_FIN) => "fin",
                (true, CT_STATE_CLOSED) => "closed",
                (true, CT_STATE_SYN_RECV) => "syn_recv",
                (true, _) => "syn",
                (false, _) => "unreplied",
            },
            age_seconds: now.saturating_sub(e.created_ns) / 1_000_000_000,
            idle_seconds: now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
            generation: e.generation,
        });
    }
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct InterfaceRow {
    pub name: String,
    pub ifindex: u32,
    pub role: &'static str,
    /// XDP mode on external devices.
    #[serde(serialize_with = "ser_mode")]
    pub mode: Option<Attached>,
    pub xdp_transmit: bool,
    /// Program ids attached through our pinned links (XDP, tc).
    pub xdp_program_id: Option<u32>,
    pub tc_program_id: Option<u32>,
    /// How its tc program is attached: `tcx` or `netlink`.
    pub tc_attach: &'static str,
}

fn ser_mode<S: serde::Serializer>(m: &Option<Attached>, s: S) -> Result<S::Ok, S::Error> {
    match m {
        Some(m) => s.serialize_str(m.name()),
        None => s.serialize_none(),
    }
}

fn link_program(pin_dir: &Path, kind: &str, ifname: &str) -> Option<u32> {
    let pin = links_dir(pin_dir).join(format!("{kind}-{ifname}"));
    let link: FdLink = PinnedLink::from_pin(pin).ok()?.into();
    link.info().ok().map(|i| i.program_id())
}

/// The devices in the interfaces map, with what is attached to them.
pub fn interfaces(maps: &Maps, pin_dir: &Path) -> Result<Vec<InterfaceRow>> {
    let mut rows = Vec::new();
    for item in maps.ifaces.iter() {
        let (ifindex, info) = item.context("reading IFACES")?;
        let name = netdev::ifname(ifindex).unwrap_or_else(|| format!("<gone: ifindex {ifindex}>"));
        let external = info.flags & IFACE_F_EXTERNAL != 0;
        rows.push(InterfaceRow {
            role: if external {
                "external"
            } else if info.flags & IFACE_F_VETH_PEER != 0 {
                "pod-veth"
            } else {
                "pod-device"
            },
            mode: external.then(|| Attached::from_flags(info.flags)),
            xdp_transmit: info.flags & IFACE_F_XDP_TX != 0,
            xdp_program_id: if external {
                link_program(pin_dir, "xdp", &name)
            } else {
                None
            },
            // A netlink filter's program id is not read back (no pin).
            tc_program_id: match TcWay::from_flags(info.flags) {
                TcWay::Tcx => link_program(pin_dir, "tc", &name),
                TcWay::Netlink => None,
            },
            tc_attach: TcWay::from_flags(info.flags).name(),
            name,
            ifindex,
        });
    }
    rows.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
    Ok(rows)
}

#[derive(Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// How full each hash map is.
pub fn map_fill(maps: &Maps, pin_dir: &Path) -> Result<Vec<MapFill>> {
    let capacity = |name: &str| {
        MapData::from_pin(pin_path(pin_dir, name))
            .and_then(|m| m.info())
            .map(|i| i.max_entries())
            .unwrap_or(0)
    };
    Ok(vec![
        MapFill {
            name: map_names::FRONTENDS,
            entries: maps.frontends.keys().count(),
            capacity: capacity(map_names::FRONTENDS),
        },
        MapFill {
            name: map_names::BACKENDS,
            entries: maps.backends.keys().count(),
            capacity: capacity(map_names::BACKENDS),
        },
        MapFill {
            name: map_names::CONNTRACK,
            entries: maps.conntrack.keys().count(),
            capacity: capacity(map_names::CONNTRACK),
        },
        MapFill {
            name: map_names::CT_HALF_OPEN,
            entries: maps.ct_half_open.keys().count(),
            capacity: capacity(map_names::CT_HALF_OPEN),
        },
        MapFill {
            name: map_names::IFACES,
            entries: maps.ifaces.keys().count(),
            capacity: capacity(map_names::IFACES),
        },
        MapFill {
            name: map_names::SERVICE_LABELS,
            entries: maps.service_labels.keys().count(),
            capacity: capacity(map_names::SERVICE_LABELS),
        },
        MapFill {
            name: map_names::AFFINITY,
            entries: maps.affinity.keys().count(),
            capacity: capacity(map_names::AFFINITY),
        },
        MapFill {
            name: map_names::BACKEND_MEMBERS,
            entries: maps.backend_members.keys().count(),
            capacity: capacity(map_names::BACKEND_MEMBERS),
        },
        MapFill {
            name: map_names::POLICED_PODS,
            entries: maps.policed_pods.keys().count(),
            capacity: capacity(map_names::POLICED_PODS),
        },
    ])
}

#[derive(Debug, Serialize)]
pub struct DaemonRow {
    /// A daemon refreshed its heartbeat within the last 5 s.
    pub running: bool,
    pub pid: u32,
    pub started: u64,
    pub last_programmed: u64,
    pub consecutive_failures: u32,
    pub object_hash: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub daemon: DaemonRow,
    pub interfaces: Vec<InterfaceRow>,
    pub frontends: usize,
    pub service_ports: usize,
    pub backends: usize,
    pub maps: Vec<MapFill>,
}

pub fn status(maps: &Maps, pin_dir: &Path) -> Result<Status> {
    let s = maps.status.get(&0, 0).unwrap_or_default();
    let svc = services(maps)?;
    let now = datapath::unix_now();
    Ok(Status {
        pin_dir: pin_dir.display().to_string(),
        daemon: DaemonRow {
            running: s.heartbeat_unix != 0 && now.saturating_sub(s.heartbeat_unix) <= 5,
            pid: s.pid,
            started: s.started_unix,
            last_programmed: s.programmed_unix,
            consecutive_failures: s.failures,
            object_hash: format!("{:016x}", s.object_hash),
        },
        interfaces: interfaces(maps, pin_dir)?,
        frontends: svc.iter().map(|r| r.frontends.len()).sum(),
        service_ports: svc.len(),
        backends: svc.iter().map(|r| r.backends.len()).sum(),
        maps: map_fill(maps, pin_dir)?,
    })
}

fn ago(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    format!("{} s ago", datapath::unix_now().saturating_sub(unix))
}

pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let d = &s.daemon;
    let _ = writeln!(o, "Pins: {}", s.pin_dir);
    let _ = writeln!(
        o,
        "Daemon: {} (pid {}), started {}, last programmed {}, {} consecutive failures, eBPF object {}",
        if d.running { "running" } else { "not running (the datapath forwards on its own)" },
        d.pid,
        ago(d.started),
        ago(d.last_programmed),
        d.consecutive_failures,
        d.object_hash
    );
    let _ = writeln!(o, "Interfaces:");
    for i in &s.interfaces {
        let _ = writeln!(
            o,
            "  {:<16} {:<11} {:<9} xdp-tx {:<3} xdp prog {:<6} tc prog {} ({})",
            i.name,
            i.role,
            i.mode.map_or("-", Attached::name),
            if i.xdp_transmit { "on" } else { "off" },
            i.xdp_program_id.map_or("-".into(), |p| p.to_string()),
            i.tc_program_id.map_or("-".into(), |p| p.to_string()),
            i.tc_attach,
        );
    }
    let _ = writeln!(
        o,
        "Programmed: {} service ports, {} frontends, {} backends",
        s.service_ports, s.frontends, s.backends
    );
    let _ = writeln!(o, "Maps:");
    for m in &s.maps {
        let pct = if m.capacity == 0 {
            0.0
        } else {
            100.0 * m.entries as f64 / m.capacity as f64
        };
        let _ = writeln!(
            o,
            "  {:<16} {:>8} / {:<8} ({pct:.1}%)",
            m.name, m.entries, m.capacity
        );
    }
    o
}

pub fn render_services(rows: &[ServiceRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<44} {:<24} {:<22} {:>10} {:>12}",
        "SERVICE", "FRONTEND", "BACKEND", "PACKETS", "BYTES"
    );
    for r in rows {
        let mut notes = Vec::new();
        if r.local_policy {
            notes.push("local policy".to_string());
        }
        if r.affinity_timeout_seconds != 0 {
            notes.push(format!("affinity {} s", r.affinity_timeout_seconds));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("({})", notes.join(", "))
        };
        let _ = writeln!(
            o,
            "{:<44} {:<24} {:<22} {:>10} {:>12}",
            r.service,
            r.frontends.join(","),
            notes,
            r.packets,
            r.bytes
        );
        for b in &r.backends {
            let _ = writeln!(
                o,
                "{:<44} {:<24} {:<22} {:>10} {:>12}",
                "",
                "",
                format!("{} {}", b.backend, if b.local { "local" } else { "remote" }),
                b.packets,
                b.bytes
            );
            if let Some(why) = &b.policed {
                // Its packets count under kube-proxy, not here.
                let _ = writeln!(o, "{:<44} {:<24}   policed, to kube-proxy: {why}", "", "");
            }
        }
    }
    o
}

pub fn render_conntrack(rows: &[FlowRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<5} {:<22} {:<22} {:<22} {:<22} {:<12} {:>7} {:>7}",
        "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "STATE", "AGE(s)", "IDLE(s)"
    );
    for r in rows {
        let _ = writeln!(
            o,
            "{:<5} {:<22} {:<22} {:<22} {:<22} {:<12} {:>7} {:>7}",
            r.protocol,
            r.client,
            r.frontend,
            r.backend,
            r.snat.as_deref().unwrap_or("-"),
            r.state,
            r.age_seconds,
            r.idle_seconds
        );
    }
    let _ = writeln!(o, "{} flows", rows.len());
    o
}

/// Whether a pin dir holds a datapath (for clear errors).
pub fn open(pin_dir: &Path) -> Result<Maps> {
    if !pin_dir.exists()
        || fs::read_dir(pin_dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    {
        anyhow::bail!(
            "nothing is pinned at {} (no forwarder installed here, or another --pin-dir)",
            pin_dir.display()
        );
    }
    Maps::open_pinned(pin_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(local_policy: bool, affinity_timeout_seconds: u32) -> ServiceRow {
        ServiceRow {
            service: "ns/web:http".into(),
            frontends: vec!["192.0.2.1:30080/TCP".into()],
            backends: vec![BackendRow {
                backend: "10.244.1.5:8080".into(),
                local: true,
                policed: None,
                packets: 1,
                bytes: 60,
            }],
            local_policy,
            affinity_timeout_seconds,
            packets: 1,
            bytes: 60,
        }
    }

    #[test]
    fn services_show_policed_backends_and_why() {
        let mut r = row(false, 0);
        r.backends[0].policed = Some("NetworkPolicy ns/deny-one".into());
        let text = render_services(&[r]);
        assert!(
            text.contains("policed, to kube-proxy: NetworkPolicy ns/deny-one"),
            "{text}"
        );
        assert!(!render_services(&[row(false, 0)]).contains("policed"));
    }

    #[test]
    fn services_show_the_policy_and_the_affinity_timeout() {
        let text = render_services(&[row(true, 10_800)]);
        assert!(text.contains("(local policy, affinity 10800 s)"), "{text}");
        let text = render_services(&[row(false, 60)]);
        assert!(text.contains("(affinity 60 s)"), "{text}");
        let text = render_services(&[row(false, 0)]);
        assert!(!text.contains("affinity") && !text.contains("()"), "{text}");
        let json = serde_json::to_value(row(false, 60)).unwrap();
        assert_eq!(json["affinity_timeout_seconds"], 60);
    }
}
