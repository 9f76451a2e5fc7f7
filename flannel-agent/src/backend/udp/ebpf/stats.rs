//! Reading the data plane's per-CPU counters (`flannel_stats`) and summing them.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use flannel_common::{map_names, Stats};

use super::error::map_err;
use super::EbpfError;

/// The counters of `stats`, summed over the CPUs (every counter, eBPF-only ones included).
pub(super) fn total(stats: &PerCpuArray<MapData, Stats>) -> Result<Stats, EbpfError> {
    let per_cpu = stats.get(&0, 0).map_err(map_err(map_names::STATS))?;
    let mut total = Stats::default();
    for s in per_cpu.iter() {
        total.add(s);
    }
    Ok(total)
}

/// The counters of the map pinned in `pin_dir` (an agent running or gone), summed.
pub fn read_pinned_stats(pin_dir: &Path) -> Result<Stats, EbpfError> {
    let data =
        MapData::from_pin(pin_dir.join(map_names::STATS)).map_err(map_err(map_names::STATS))?;
    let map = aya::maps::Map::PerCpuArray(data);
    let array: PerCpuArray<MapData, Stats> =
        PerCpuArray::try_from(map).map_err(map_err(map_names::STATS))?;
    total(&array)
}
