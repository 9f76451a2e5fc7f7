//! The `alloc` backend: leases only, no data path (upstream's, for external routing setups).

use super::{Backend, BackendNetwork};
use crate::config::NetworkConfig;
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs};
use crate::subnet::PeerEvent;

pub struct AllocBackend {
    mtu: u32,
}

impl AllocBackend {
    pub fn new(ext: &ExternalInterface) -> Self {
        AllocBackend { mtu: ext.mtu }
    }
}

/// Nothing is set up, so nothing follows the peers.
pub struct AllocNetwork;

impl Backend for AllocBackend {
    type Network = AllocNetwork;
    fn lease_attrs(&self, public_ip: std::net::Ipv4Addr) -> LeaseAttrs {
        LeaseAttrs::new(public_ip)
    }
    fn mtu(&self) -> u32 {
        self.mtu
    }
    async fn start(self, _own: &Lease, _config: &NetworkConfig) -> anyhow::Result<AllocNetwork> {
        Ok(AllocNetwork)
    }
}

impl BackendNetwork for AllocNetwork {
    async fn handle_events(&mut self, _events: &[PeerEvent]) -> anyhow::Result<()> {
        Ok(())
    }
}
