//! The per-CPU counters in `flannel_stats` (one slot of [`Stats`]).

use aya_ebpf::bindings::TC_ACT_SHOT;
use flannel_common::Stats;

use crate::maps::STATS;

/// Which counter a dropped packet goes to.
#[derive(Clone, Copy)]
pub enum Drop {
    NoPeer,
    NotIpv4,
    Malformed,
    UnknownSender,
    SpoofedSource,
    TtlExceeded,
    HelperError,
    NotConfigured,
    BadIpChecksum,
    OtherHost,
}

#[inline(always)]
fn stats() -> Option<&'static mut Stats> {
    // SAFETY: this CPU's slot of a preallocated array: valid for the whole run, and nothing
    // else writes it meanwhile (TC programs run with bottom halves off, on one CPU).
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Counts a drop for `reason` and gives TC's verdict for it.
#[inline(always)]
pub fn drop_packet(reason: Drop) -> i32 {
    count_drop(reason);
    TC_ACT_SHOT
}

#[inline(always)]
pub fn count_drop(reason: Drop) {
    if let Some(s) = stats() {
        let counter = match reason {
            Drop::NoPeer => &mut s.drop_no_peer,
            Drop::NotIpv4 => &mut s.drop_not_ipv4,
            Drop::Malformed => &mut s.drop_malformed,
            Drop::UnknownSender => &mut s.drop_unknown_sender,
            Drop::SpoofedSource => &mut s.drop_spoofed_source,
            Drop::TtlExceeded => &mut s.drop_ttl_exceeded,
            Drop::HelperError => &mut s.drop_helper_error,
            Drop::NotConfigured => &mut s.drop_not_configured,
            Drop::BadIpChecksum => &mut s.drop_bad_ip_checksum,
            Drop::OtherHost => &mut s.drop_other_host,
        };
        *counter += 1;
    }
}

/// One packet of `inner_len` inner bytes encapsulated.
#[inline(always)]
pub fn count_tx(inner_len: usize) {
    if let Some(s) = stats() {
        s.tx_packets += 1;
        s.tx_bytes += inner_len as u64;
    }
}

/// One packet of `inner_len` inner bytes decapsulated.
#[inline(always)]
pub fn count_rx(inner_len: usize) {
    if let Some(s) = stats() {
        s.rx_packets += 1;
        s.rx_bytes += inner_len as u64;
    }
}
