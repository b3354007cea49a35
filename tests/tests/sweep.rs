//! The conntrack sweep is off the request path: `/livez` and `/healthz`
//! answer promptly while a full table is swept, the daemon loop keeps its
//! one-second pace meanwhile (a sweep on its thread stalled it for the
//! sweep's whole length: about 9 s for a million entries here), and the
//! sweep ends even while entries are evicted under it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use forwarder::maps::Maps;
use forwarder_common::{
    CtEntry, CtKey, CT_F_SNAT, CT_STATE_NEW, DEFAULT_CONNTRACK_ENTRIES, IPPROTO_UDP,
};
use integration_tests::{
    daemon::Daemon,
    netns, skip_unless_netns_capable,
    topology::{Cluster, ClusterOptions, PodNet},
};

const HEALTH: &str = "127.0.0.1:10256";
/// What each health answer must take at most, sweep or not.
const MAX_ANSWER: Duration = Duration::from_millis(50);

fn check(result: Result<()>) {
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

/// A UDP flow's entry from an address no test uses, idle since the clock's
/// start: every sweep finds it expired. Source-NATed, so it names no local
/// pod.
fn idle_entry(i: u32) -> (CtKey, CtEntry) {
    let client = Ipv4Addr::new(198, 18, (i >> 16) as u8, (i >> 8) as u8);
    let key = CtKey::new(
        u32::from_ne_bytes(client.octets()),
        (1024 + (i & 0xff) as u16).to_be(),
        u32::from_ne_bytes([192, 0, 2, 99]),
        31353u16.to_be(),
        IPPROTO_UDP,
    );
    let entry = CtEntry {
        new_saddr_be: u32::from_ne_bytes([192, 0, 2, 1]),
        new_daddr_be: u32::from_ne_bytes([10, 244, 2, 10]),
        new_sport_be: 40000u16.to_be(),
        new_dport_be: 53u16.to_be(),
        last_seen_ns: 1,
        created_ns: 1,
        flags: CT_F_SNAT,
        state: CT_STATE_NEW,
        ..CtEntry::default()
    };
    (key, entry)
}

/// One health answer: its status and how long the whole exchange took
/// (connect, request, the full answer).
fn ask(path: &str) -> Result<(u16, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(HEALTH).with_context(|| format!("connecting to {HEALTH}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {HEALTH}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let took = started.elapsed();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{path}: no status line in {text:?}"))?;
    Ok((status, took))
}

/// Asks `/livez` and `/healthz` in turn inside the node until `done`; returns
/// every answer's path, status and time.
fn poll_health(ns: &str, done: &AtomicBool) -> Result<Vec<(&'static str, u16, Duration)>> {
    netns::run_in(ns, || {
        let mut answers = Vec::new();
        for path in ["/livez", "/healthz"].into_iter().cycle() {
            if done.load(Ordering::Relaxed) {
                break;
            }
            let (status, took) = ask(path)?;
            answers.push((path, status, took));
            thread::sleep(Duration::from_millis(5));
        }
        Ok(answers)
    })
}

/// The longest the daemon loop's heartbeat (written to the STATUS map at
/// every pass, at least once a second) stood still while `done` was unset.
fn heartbeat_stall(maps: &Maps, done: &AtomicBool) -> Result<Duration> {
    let mut last = (Instant::now(), maps.status.get(&0, 0)?.heartbeat_unix);
    let mut longest = Duration::ZERO;
    while !done.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
        let beat = maps.status.get(&0, 0)?.heartbeat_unix;
        if beat != last.1 {
            last = (Instant::now(), beat);
        }
        longest = longest.max(last.0.elapsed());
    }
    Ok(longest)
}

/// The `(removed, walked, ms)` of each "conntrack: removed" line in the log.
fn sweeps(log: &str) -> Vec<(usize, usize, u64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("conntrack: removed ")?.1;
            let mut words = rest.split_whitespace();
            let removed = words.next()?.parse().ok()?;
            let walked = words.nth(3)?.parse().ok()?; // "idle entries of N"
            let ms = words.nth(1)?.parse().ok()?; // "in X ms"
            Some((removed, walked, ms))
        })
        .collect()
}

fn wait_for_sweeps(daemon: &Daemon, count: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while sweeps(&daemon.log()).len() < count {
        if Instant::now() > deadline {
            bail!("no sweep #{count} within {timeout:?}:\n{}", daemon.log());
        }
        thread::sleep(Duration::from_millis(50));
    }
    // Answers right after the sweep count too.
    thread::sleep(Duration::from_millis(500));
    Ok(())
}

fn check_answers(what: &str, answers: &[(&str, u16, Duration)]) -> Result<Duration> {
    ensure!(
        answers.len() > 100,
        "{what}: only {} answers",
        answers.len()
    );
    for path in ["/livez", "/healthz"] {
        ensure!(
            answers.iter().any(|(p, _, _)| *p == path),
            "{what}: no {path} answer"
        );
    }
    let bad: Vec<_> = answers.iter().filter(|(_, code, _)| *code != 200).collect();
    ensure!(bad.is_empty(), "{what}: answers other than 200: {bad:?}");
    let slow: Vec<_> = answers
        .iter()
        .filter(|(_, _, took)| *took > MAX_ANSWER)
        .collect();
    ensure!(
        slow.is_empty(),
        "{what}: {} of {} answers took over {MAX_ANSWER:?}: {slow:?}",
        slow.len(),
        answers.len()
    );
    Ok(answers.iter().map(|a| a.2).max().unwrap_or_default())
}

/// The daemon loop never waits for a sweep: its heartbeat (a tick a second)
/// never stands still this long, where a sweep of a million entries on the
/// loop's own thread takes seconds.
const MAX_LOOP_STALL: Duration = Duration::from_secs(3);

#[test]
fn health_answers_promptly_while_a_full_conntrack_table_is_swept() {
    skip_unless_netns_capable!();
    check(sweep_under_watch(DEFAULT_CONNTRACK_ENTRIES, true));
}

#[test]
fn the_daemon_loop_keeps_its_pace_while_a_table_of_a_million_entries_is_swept() {
    skip_unless_netns_capable!();
    check(sweep_under_watch(1 << 20, false));
}

/// Fills a table of `capacity` entries with idle flows and watches the
/// health answers and the daemon loop's heartbeat through its sweep; then,
/// with `churn`, through the next sweep while the table churns under it.
fn sweep_under_watch(capacity: u32, churn: bool) -> Result<()> {
    {
        let cluster = Cluster::build(ClusterOptions {
            pod_net: PodNet::RoutedVeth,
            wire_napi: true,
            pods_per_node: 1,
            ..ClusterOptions::default()
        })?;
        let pods: Vec<_> = cluster.pods().iter().collect();
        cluster.write_service("gateway", &pods)?;
        let mut options = cluster.daemon_options(1);
        options.extra_args.extend([
            format!("--health-addr={HEALTH}"),
            "--metrics-addr=127.0.0.1:10269".into(),
            format!("--conntrack-entries={capacity}"),
        ]);
        let daemon = cluster.start_forwarder(1, &options)?;
        let node = cluster.node_ns(1).to_string();
        let mut maps = daemon.maps()?;

        // A full table of idle flows, written before the first sweep (10 s
        // after the daemon's start).
        let filled = Instant::now();
        for i in 0..capacity {
            let (k, v) = idle_entry(i);
            maps.conntrack
                .insert(k, v, 0)
                .with_context(|| format!("writing entry {i}"))?;
        }
        let fill_time = filled.elapsed();
        let entries = maps.conntrack.keys().filter(|k| k.is_ok()).count();
        ensure!(
            entries as u32 == capacity,
            "{entries} entries in a table of {capacity}"
        );
        ensure!(
            sweeps(&daemon.log()).is_empty(),
            "a sweep ran before the table was full ({fill_time:?} to fill):\n{}",
            daemon.log()
        );

        // 1. A full table, nothing else moving.
        let done = AtomicBool::new(false);
        let (answers, stall) = thread::scope(|s| {
            let poller = s.spawn(|| poll_health(&node, &done));
            let beats = s.spawn(|| heartbeat_stall(&maps, &done));
            let waited = wait_for_sweeps(&daemon, 1, Duration::from_secs(40));
            done.store(true, Ordering::Relaxed);
            waited?;
            let stall = beats
                .join()
                .map_err(|_| anyhow::anyhow!("the heartbeat watcher panicked"))??;
            let answers = poller
                .join()
                .map_err(|_| anyhow::anyhow!("the health poller panicked"))??;
            Ok::<_, anyhow::Error>((answers, stall))
        })?;
        let (removed, walked, sweep_ms) = sweeps(&daemon.log())[0];
        ensure!(
            removed as u32 >= capacity,
            "the sweep removed {removed} of {capacity} idle entries (walked {walked})"
        );
        let max_quiet = check_answers("full table", &answers)?;
        eprintln!(
            "full table: {capacity} entries written in {fill_time:?}; swept ({removed} removed) in {sweep_ms} ms; {} health answers, slowest {max_quiet:?}; the loop's heartbeat stood still for at most {stall:?}",
            answers.len()
        );
        ensure!(
            stall <= MAX_LOOP_STALL,
            "the daemon loop stood still for {stall:?} during a sweep of {sweep_ms} ms"
        );
        if !churn {
            return Ok(());
        }

        // 2. The table refilled and kept churning through the next sweep:
        // every insert into the full LRU table evicts an entry, which makes
        // the walk start over. It must still end, and health still answer.
        for i in 0..capacity {
            let (k, v) = idle_entry(i);
            maps.conntrack.insert(k, v, 0)?;
        }
        let done = AtomicBool::new(false);
        let (answers, churned) = thread::scope(|s| {
            let poller = s.spawn(|| poll_health(&node, &done));
            let conntrack = &mut maps.conntrack;
            let done = &done;
            let writer = s.spawn(move || -> Result<u32> {
                let mut i = capacity;
                while !done.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let (k, v) = idle_entry(i % (4 * capacity));
                        conntrack.insert(k, v, 0)?;
                        i += 1;
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(i - capacity)
            });
            let waited = wait_for_sweeps(&daemon, 2, Duration::from_secs(60));
            done.store(true, Ordering::Relaxed);
            waited?;
            let churned = writer
                .join()
                .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
            let answers = poller
                .join()
                .map_err(|_| anyhow::anyhow!("the health poller panicked"))??;
            Ok::<_, anyhow::Error>((answers, churned))
        })?;
        let (removed, walked, sweep_ms) = sweeps(&daemon.log())[1];
        let cut = daemon.log().contains("walk cut at its bound");
        let max_churn = check_answers("churning table", &answers)?;
        eprintln!(
            "churning table: {churned} inserts meanwhile; swept ({removed} removed of {walked} seen, walk cut: {cut}) in {sweep_ms} ms; {} health answers, slowest {max_churn:?}",
            answers.len()
        );
        Ok(())
    }
}
