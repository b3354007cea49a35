//! Per-CPU counters: why each packet went where it went, and per-service traffic.
use forwarder_common::Reason;

use crate::maps::{REASON_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_service(slot: u32, bytes: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(slot) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}
