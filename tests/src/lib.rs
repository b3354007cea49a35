//! Test support for forwarder's integration tests, demo and benchmarks:
//! network namespaces with Drop guards, a two-node cluster topology with real
//! pods, the daemon as a child process, and kube-proxy's iptables rules.

pub mod bench;
pub mod daemon;
pub mod kube_proxy;
pub mod netns;
pub mod packet_rig;
pub mod pattern;
pub mod topology;

/// One cluster at a time in a test binary, whatever the test-thread count.
static CLUSTER_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs a cluster test: skipped (with a line saying why) where namespaces
/// cannot be made or `needs` (kube-proxy's iptables variant) is missing;
/// otherwise one at a time, panicking with `name` and the error on failure.
pub fn run_cluster_test(
    name: &str,
    needs: Option<kube_proxy::Backend>,
    test: impl FnOnce() -> anyhow::Result<()>,
) {
    if let Some(reason) = netns::skip_reason().or_else(|| needs.and_then(|b| b.missing())) {
        println!("skipped: {reason}");
        return;
    }
    let _serial = CLUSTER_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = test() {
        panic!("{name}: {e:?}");
    }
}
