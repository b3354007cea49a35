//! Per-CPU counters: why each packet went where it went, and per-service traffic.
use forwarder_common::Reason;

use crate::{
    conntrack::Translation,
    maps::{BACKEND_STATS, FLOW_PASS_STATS, LOG_RATE, REASON_STATS, SERVICE_STATS},
};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot of this map: no other writer runs on this
        // CPU while we do, and the pointer is valid for the program's run.
        unsafe { *c += 1 };
    }
}

/// Counts a packet of a tracked flow that goes to the kernel after all.
#[inline(always)]
pub fn count_flow_pass(reason: Reason) {
    if let Some(c) = FLOW_PASS_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: as in `count`.
        unsafe { *c += 1 };
    }
}

/// Counts a forwarded packet for its service port and its backend.
#[inline(always)]
pub fn count_forwarded(t: &Translation, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(t.stats_slot) {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(t.backend_slot) {
        // SAFETY: as in `count`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Reasons worth a debug log line: resource limits and helper failures, not
/// ordinary passes. Only these ever reach the logger, and only when the
/// loader enabled debug logging.
#[inline(always)]
pub fn notable(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::PassSnatExhausted
            | Reason::PassCtCollision
            | Reason::PassCtFull
            | Reason::PassNoSnatAddr
            | Reason::DropRedirectFailed
    )
}

/// At most one log line per CPU every 100 ms.
#[inline(always)]
pub fn log_allowed() -> bool {
    const MIN_GAP_NS: u64 = 100_000_000;
    if !aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug) {
        return false;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    match LOG_RATE.get_ptr_mut(0) {
        // SAFETY: as in `count`.
        Some(last) => unsafe {
            if now.saturating_sub(*last) < MIN_GAP_NS {
                return false;
            }
            *last = now;
            true
        },
        None => false,
    }
}
