//! What a backend's own data plane says of itself for `/metrics`: which one runs, and its
//! counters. The backend knows; nothing outside it guesses from flags or pins.

use super::udp::DataplaneStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataplaneKind {
    Ebpf,
    Tun,
}

impl DataplaneKind {
    /// The `kind` label of `flannel_dataplane_info`.
    pub fn label(self) -> &'static str {
        match self {
            DataplaneKind::Ebpf => "ebpf",
            DataplaneKind::Tun => "tun",
        }
    }
}

pub use super::udp::ebpf::AttachMode;

/// Where decapsulation happens: native XDP on the external device, or its TC ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapMode {
    Xdp,
    Tc,
}

/// The paths the eBPF data plane took on this host after probing the kernel and the driver:
/// labels of `flannel_dataplane_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataplanePaths {
    pub attach: AttachMode,
    pub decap: DecapMode,
}

impl DecapMode {
    /// The `decap` label.
    pub fn label(self) -> &'static str {
        match self {
            DecapMode::Xdp => "xdp",
            DecapMode::Tc => "tc",
        }
    }
}

/// One reading of a data plane's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneSample {
    pub kind: DataplaneKind,
    pub stats: DataplaneStats,
    /// The eBPF data plane's paths (`None` for the TUN forwarder).
    pub paths: Option<DataplanePaths>,
}

impl DataplaneSample {
    /// Whether `stats` holds the counters only the eBPF programs keep (the TUN forwarder has
    /// no equivalent of them, so they are not shown as zeros there).
    pub fn has_ebpf_counters(&self) -> bool {
        self.kind == DataplaneKind::Ebpf
    }
}
