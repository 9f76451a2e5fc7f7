//! The udp backend: flannel's original encapsulation (outer IPv4/UDP, payload = inner IPv4).
//!
//! Two data planes share one device (`flannel0`, a TUN), one route and one wire format:
//! the eBPF programs (default) and a user-space TUN forwarder (fallback and baseline).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub mod device;
pub mod ebpf;
pub mod tun;

/// Packet and drop counters of a data plane, summed over CPUs / threads.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DataplaneStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub drop_no_peer: u64,
    pub drop_not_ipv4: u64,
    pub drop_malformed: u64,
    pub drop_unknown_sender: u64,
    pub drop_spoofed_source: u64,
}

/// What the udp backend needs from a data plane: the peer table and counters.
pub trait UdpDataplane: Send {
    /// Add or change the peer owning `subnet`.
    fn set_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> anyhow::Result<()>;
    /// Forget the peer owning `subnet`; traffic to it is dropped from now on.
    fn remove_peer(&mut self, subnet: Ipv4Network) -> anyhow::Result<()>;
    /// Make the peer table equal `peers` (after a re-list): adds, changes and removes.
    fn sync_peers(&mut self, peers: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()>;
    fn stats(&self) -> anyhow::Result<DataplaneStats>;
}
