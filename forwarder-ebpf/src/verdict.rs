//! The decision a hook takes for a packet, made in one place per hook.
use forwarder_common::Reason;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// XDP: out of the device it came in on.
    Tx,
    /// Out of another device (XDP redirect, or tc's egress redirect).
    Redirect,
    /// tc: into a local pod's namespace (`bpf_redirect_peer`).
    Peer,
    /// tc: out of a device, the kernel resolving the next hop.
    Neigh,
    Pass,
    Drop,
}

/// Every field is always set: the verifier rejects copies of values that
/// are only partly initialised (as enum payloads can be).
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: Action,
    pub reason: Reason,
    pub ifindex: u32,
    pub nexthop: u32,
    /// The packet belongs to a flow we track: passing it to the kernel is
    /// counted separately (netfilter would see the middle of a flow).
    pub tracked: bool,
}

impl Verdict {
    /// Not translated: passed to the kernel, or dropped for a drop reason.
    pub const fn not_ours(reason: Reason) -> Self {
        Verdict {
            action: if reason.is_drop() {
                Action::Drop
            } else {
                Action::Pass
            },
            reason,
            ifindex: 0,
            nexthop: 0,
            tracked: false,
        }
    }

    /// A tracked flow's packet that goes to the kernel after all.
    pub const fn flow_to_kernel(reason: Reason) -> Self {
        let mut v = Self::not_ours(reason);
        v.tracked = true;
        v
    }

    /// Translated and to be sent with `action`.
    pub const fn forward(action: Action, reason: Reason, ifindex: u32, nexthop: u32) -> Self {
        Verdict {
            action,
            reason,
            ifindex,
            nexthop,
            tracked: true,
        }
    }
}
