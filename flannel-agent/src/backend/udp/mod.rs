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

/// Default udp port, as upstream.
pub const DEFAULT_PORT: u16 = 8285;
/// Outer IPv4 (20) + UDP (8) headers.
pub const ENCAP_OVERHEAD: u32 = 28;

pub struct UdpBackend {
    port: u16,
    ext: crate::iface::ExternalInterface,
    opts: super::BackendOptions,
    dataplane: Option<Box<dyn UdpDataplane>>,
}

impl UdpBackend {
    pub fn new(
        cfg: &crate::config::BackendConfig,
        ext: &crate::iface::ExternalInterface,
        opts: &super::BackendOptions,
    ) -> Result<Self, super::BackendError> {
        let port = match cfg.get("Port") {
            None => DEFAULT_PORT,
            Some(v) => match v.as_u64() {
                Some(0) => DEFAULT_PORT,
                Some(p) if p <= u64::from(u16::MAX) => p as u16,
                _ => {
                    return Err(super::BackendError::BadOption {
                        backend: "udp",
                        option: "Port",
                        message: format!("{v} is not a port number"),
                    })
                }
            },
        };
        Ok(UdpBackend {
            port,
            ext: ext.clone(),
            opts: opts.clone(),
            dataplane: None,
        })
    }
}

impl super::Backend for UdpBackend {
    fn lease_attrs(&self, public_ip: Ipv4Addr) -> crate::lease::LeaseAttrs {
        // Upstream's udp backend never sets BackendType.
        crate::lease::LeaseAttrs::new(public_ip)
    }
    fn mtu(&self) -> u32 {
        self.ext.mtu.saturating_sub(ENCAP_OVERHEAD)
    }
    async fn start(
        &mut self,
        _own: &crate::lease::Lease,
        _config: &crate::config::NetworkConfig,
    ) -> anyhow::Result<()> {
        let _ = (&self.port, &self.opts);
        anyhow::bail!("udp data plane not wired yet")
    }
    async fn handle_events(&mut self, events: &[crate::subnet::PeerEvent]) -> anyhow::Result<()> {
        let Some(dp) = self.dataplane.as_mut() else {
            return Ok(());
        };
        for ev in events {
            match ev {
                crate::subnet::PeerEvent::Added(l) => dp.set_peer(l.subnet(), l.attrs.public_ip)?,
                crate::subnet::PeerEvent::Removed(l) => dp.remove_peer(l.subnet())?,
            }
        }
        Ok(())
    }
    fn stats(&self) -> Option<DataplaneStats> {
        self.dataplane.as_ref().and_then(|d| d.stats().ok())
    }
}
