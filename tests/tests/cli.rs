//! What an operator sees when something is wrong: one clear line, non-zero exit.
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use integration_tests::{
    daemon::forwarder_bin,
    netns::{unique_prefix, Netns},
    skip_unless_netns_capable,
};

fn forwarder_in(ns: &str, args: &[&str]) -> Result<Output> {
    let bin = forwarder_bin()?;
    Ok(Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin)
        .args(args)
        .output()?)
}

/// Exactly one `forwarder: error:` line containing `needle`, and a failure exit.
fn assert_one_error_line(out: &Output, needle: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("forwarder: error:"))
        .collect();
    ensure!(
        !out.status.success(),
        "exit status {} for {needle:?}",
        out.status
    );
    ensure!(errors.len() == 1, "expected one error line, got:\n{stderr}");
    ensure!(
        errors[0].contains(needle),
        "error line {:?} lacks {needle:?}",
        errors[0]
    );
    Ok(())
}

#[test]
fn operator_mistakes_give_one_clear_error_line() {
    skip_unless_netns_capable!();
    let ns = Netns::create(&format!("{}cli", unique_prefix())).unwrap();
    let dir = std::env::temp_dir().join(format!("{}cli", unique_prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifests = dir.to_str().unwrap();
    let pin = format!("/run/{}pins/forwarder", unique_prefix());
    let base = |iface: &str| {
        vec![
            "run".to_string(),
            "--iface".into(),
            iface.into(),
            "--node-name".into(),
            "node1".into(),
            "--manifests".into(),
            manifests.into(),
            "--pin-dir".into(),
            pin.clone(),
        ]
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        forwarder_in(ns.name(), &refs).unwrap()
    };

    assert_one_error_line(&run(base("nosuch0")), "interface nosuch0 does not exist").unwrap();

    let mut missing = base("lo");
    missing[6] = "/nonexistent/manifests".into();
    assert_one_error_line(&run(missing), "/nonexistent/manifests does not exist").unwrap();

    let mut overlap = base("lo");
    overlap.extend(["--snat-port-range".into(), "40000-50000".into()]);
    assert_one_error_line(&run(overlap), "overlaps").unwrap();

    // clap reports its own usage errors (exit 2) before anything runs.
    let mut bad_cidr = base("lo");
    bad_cidr.extend(["--nodeport-addresses".into(), "fd00::/8".into()]);
    let out = run(bad_cidr);
    ensure_status(&out, 2).unwrap();

    // Without privileges: refused with the capabilities named.
    let bin = forwarder_bin().unwrap();
    let args = base("lo");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&bin)
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("setpriv: ") {
        println!("skipped the unprivileged case: setpriv unavailable: {stderr}");
    } else {
        assert_one_error_line(&out, "insufficient privileges").unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(std::path::Path::new(&pin).parent().unwrap());
}

fn ensure_status(out: &Output, code: i32) -> Result<()> {
    ensure!(
        out.status.code() == Some(code),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
