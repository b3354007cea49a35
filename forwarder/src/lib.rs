//! forwarder: an XDP NodePort accelerator for Kubernetes nodes.
//!
//! Userspace side: reads the desired Services (manifests now, the Kubernetes
//! API later), translates them into datapath entries, writes the pinned eBPF
//! maps and attaches the programs.

pub mod daemon;
pub mod datapath;
pub mod inspect;
pub mod kfuncs;
pub mod kube_source;
pub mod manifest;
pub mod maps;
pub mod model;
pub mod netdev;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod skips;
pub mod source;
pub mod stats;
pub mod translate;

/// The compiled eBPF object (built by build.rs from forwarder-ebpf), as
/// built: load [`kfuncs::prepared_object`] instead, which resolves its kfunc
/// calls for the running kernel.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder"));
