//! Reading the data plane's per-CPU counters (`flannel_stats`) and summing them.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use flannel_common::{map_names, Stats};

use super::super::DataplaneStats;
use super::error::map_err;
use super::EbpfError;

/// The counters of the loaded data plane, summed over the CPUs.
pub(super) fn total(stats: &PerCpuArray<MapData, Stats>) -> Result<DataplaneStats, EbpfError> {
    let per_cpu = stats.get(&0, 0).map_err(map_err(map_names::STATS))?;
    let mut total = DataplaneStats::default();
    for s in per_cpu.iter() {
        total.tx_packets += s.tx_packets;
        total.tx_bytes += s.tx_bytes;
        total.rx_packets += s.rx_packets;
        total.rx_bytes += s.rx_bytes;
        total.drop_no_peer += s.drop_no_peer;
        total.drop_not_ipv4 += s.drop_not_ipv4;
        total.drop_malformed += s.drop_malformed;
        total.drop_unknown_sender += s.drop_unknown_sender;
        total.drop_spoofed_source += s.drop_spoofed_source;
    }
    Ok(total)
}

/// Sums the per-CPU counters of the map pinned in `pin_dir`, all fields included (also those
/// [`DataplaneStats`] does not carry yet: TTL expiry, helper failures, not configured).
pub fn read_pinned_stats(pin_dir: &Path) -> Result<Stats, EbpfError> {
    let data =
        MapData::from_pin(pin_dir.join(map_names::STATS)).map_err(map_err(map_names::STATS))?;
    let map = aya::maps::Map::PerCpuArray(data);
    let array: PerCpuArray<MapData, Stats> =
        PerCpuArray::try_from(map).map_err(map_err(map_names::STATS))?;
    let per_cpu = array.get(&0, 0).map_err(map_err(map_names::STATS))?;
    let mut t = Stats::default();
    for s in per_cpu.iter() {
        t.tx_packets += s.tx_packets;
        t.tx_bytes += s.tx_bytes;
        t.rx_packets += s.rx_packets;
        t.rx_bytes += s.rx_bytes;
        t.drop_no_peer += s.drop_no_peer;
        t.drop_not_ipv4 += s.drop_not_ipv4;
        t.drop_malformed += s.drop_malformed;
        t.drop_unknown_sender += s.drop_unknown_sender;
        t.drop_spoofed_source += s.drop_spoofed_source;
        t.drop_ttl_exceeded += s.drop_ttl_exceeded;
        t.drop_helper_error += s.drop_helper_error;
        t.drop_not_configured += s.drop_not_configured;
        t.drop_bad_ip_checksum += s.drop_bad_ip_checksum;
        t.drop_other_host += s.drop_other_host;
    }
    Ok(t)
}
