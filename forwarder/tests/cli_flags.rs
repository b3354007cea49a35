//! Flags an operator sets: accepted where valid, refused before anything
//! runs (clap's usage error, exit 2) where not, naming the flag.
use std::process::{Command, Output};

fn forwarder(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_forwarder"))
        .args(args)
        .output()
        .expect("runs the binary")
}

/// `run` with its required flags; nothing here gets far enough to use them.
fn run_with(extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--iface",
        "nosuch0",
        "--node-name",
        "node1",
        "--manifests",
        "/nonexistent/manifests",
    ];
    args.extend_from_slice(extra);
    forwarder(&args)
}

/// A usage error (exit 2) whose `error:` line names `flag` and says `why`.
fn assert_refused(out: &Output, flag: &str, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0].contains(flag) && errors[0].contains(why),
        "{flag}: {:?} lacks {why:?}",
        errors[0]
    );
}

const TIMEOUT_FLAGS: [&str; 7] = [
    "--conntrack-tcp-timeout-syn-sent",
    "--conntrack-tcp-timeout-syn-recv",
    "--conntrack-tcp-timeout-established",
    "--conntrack-tcp-timeout-fin",
    "--conntrack-tcp-timeout-close",
    "--conntrack-udp-timeout",
    "--conntrack-udp-timeout-stream",
];

#[test]
fn conntrack_timeouts_and_the_drain_timeout_are_accepted_as_durations() {
    // humantime's forms: "90s", "1h 30m".
    let mut args: Vec<String> = TIMEOUT_FLAGS
        .iter()
        .map(|f| format!("{f}=1h 30s"))
        .collect();
    args.extend(["--cleanup-on-exit".into(), "--drain-timeout=0s".into()]);
    args.push("--help".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with(&refs);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in TIMEOUT_FLAGS {
        assert!(help.contains(flag), "{flag} is documented: {help}");
    }
    assert!(
        help.contains("[default: 24h]"),
        "kube-proxy's established default: {help}"
    );
    let out = forwarder(&["uninstall", "--drain-timeout", "45s", "--help"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn zero_or_malformed_timeouts_are_refused_naming_the_flag() {
    for flag in TIMEOUT_FLAGS {
        assert_refused(&run_with(&[flag, "0s"]), flag, "must be more than zero");
        assert_refused(&run_with(&[flag, "soon"]), flag, "\"soon\"");
    }
    assert_refused(
        &run_with(&["--conntrack-udp-timeout", "600000years"]),
        "--conntrack-udp-timeout",
        "too long",
    );
    assert_refused(
        &forwarder(&["uninstall", "--drain-timeout", "later"]),
        "--drain-timeout",
        "later",
    );
}
