//! The per-CPU counters in `flannel_stats` (one slot of [`Stats`], whose fields and the
//! [`Counter`]s naming them are defined once in `flannel_common::counters`).

use aya_ebpf::bindings::TC_ACT_SHOT;
use flannel_common::{Counter, Stats};

use crate::maps::STATS;

#[inline(always)]
fn stats() -> Option<&'static mut Stats> {
    // SAFETY: this CPU's slot of a preallocated array: valid for the whole run, and nothing
    // else writes it meanwhile (TC programs run with bottom halves off, on one CPU).
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Counts a drop for `reason` and gives TC's verdict for it.
#[inline(always)]
pub fn drop_packet(reason: Counter) -> i32 {
    count_drop(reason);
    TC_ACT_SHOT
}

/// Counts a drop for `reason` (a `Counter::Drop*`).
#[inline(always)]
pub fn count_drop(reason: Counter) {
    if let Some(s) = stats() {
        *s.get_mut(reason) += 1;
    }
}

/// One packet of `inner_len` inner bytes encapsulated.
#[inline(always)]
pub fn count_tx(inner_len: usize) {
    if let Some(s) = stats() {
        *s.get_mut(Counter::TxPackets) += 1;
        *s.get_mut(Counter::TxBytes) += inner_len as u64;
    }
}

/// One packet of `inner_len` inner bytes decapsulated.
#[inline(always)]
pub fn count_rx(inner_len: usize) {
    if let Some(s) = stats() {
        *s.get_mut(Counter::RxPackets) += 1;
        *s.get_mut(Counter::RxBytes) += inner_len as u64;
    }
}
