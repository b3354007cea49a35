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
