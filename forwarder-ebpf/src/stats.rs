//! Per-CPU counters: why each packet went where it went, and per-service traffic.
use forwarder_common::Reason;

use crate::{
    conntrack::Translation,
    maps::{BACKEND_STATS, REASON_STATS, SERVICE_STATS},
};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

/// Counts a forwarded packet for its service port and its backend.
#[inline(always)]
pub fn count_forwarded(t: &Translation, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(t.stats_slot) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(t.backend_slot) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
