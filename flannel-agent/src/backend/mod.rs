//! Backends as in flannel's pkg/backend: a `Backend` exists before our lease (it says what goes
//! into the lease and the MTU) and, once the lease is known, is consumed by `start`, which sets
//! up its devices and hands back the running `BackendNetwork` that follows peer lease events.

use crate::config::NetworkConfig;
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs};
use crate::subnet::PeerEvent;

pub mod alloc;
pub mod dataplane;
pub mod hostgw;
pub mod network;
pub mod route;
pub mod udp;
pub mod vxlan;

pub use crate::repair::{Repair, Repairs};
pub use dataplane::{AttachMode, DataplaneKind, DataplanePaths, DataplaneSample, DecapMode};
pub use udp::DataplaneStats;

/// Settings from flags that backends need.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub udp_dataplane: crate::cli::UdpDataplaneKind,
    pub udp_decap: crate::cli::UdpDecap,
    pub udp_attach: crate::cli::UdpAttach,
    pub bpf_pin_dir: std::path::PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unknown backend type {0:?} (supported: udp, vxlan, host-gw, alloc)")]
    Unknown(String),
    #[error("backend {backend}: option {option}: {message}")]
    BadOption {
        backend: &'static str,
        option: &'static str,
        message: String,
    },
}

/// A backend before our lease is known.
#[allow(async_fn_in_trait)]
pub trait Backend: Sized {
    /// What `start` hands back.
    type Network: BackendNetwork;
    /// What goes into our lease (BackendType, BackendData) for `public_ip`.
    fn lease_attrs(&self, public_ip: std::net::Ipv4Addr) -> LeaseAttrs;
    /// With EnableIPv6, once `attrs.public_ipv6` is known: what the backend publishes for
    /// IPv6 (vxlan: BackendV6Data).
    fn add_ipv6_attrs(&self, _attrs: &mut LeaseAttrs) {}
    /// FLANNEL_MTU for subnet.env.
    fn mtu(&self) -> u32;
    /// Set up devices and routes for our lease: the network that runs on them.
    async fn start(self, own: &Lease, config: &NetworkConfig) -> anyhow::Result<Self::Network>;
}

/// A started backend: what it set up for our lease, following the peers.
#[allow(async_fn_in_trait)]
pub trait BackendNetwork {
    /// Follow peer lease changes.
    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()>;
    /// Make what is installed match the full peer view `peers` (after the first listing:
    /// state a previous agent left behind, e.g. adopted eBPF maps, may hold departed peers).
    async fn sync_peers(&mut self, _peers: &[Lease]) -> anyhow::Result<()> {
        Ok(())
    }
    /// Periodic repair of what the backend installed (devices, routes), dropping what no
    /// peer owns: only called once the first full listing has been applied. Each repair is
    /// logged where it is made and noted in `repaired` (counted even when a later step fails).
    async fn resync(&mut self, _repaired: &mut Repairs) -> anyhow::Result<()> {
        Ok(())
    }
    /// Which data plane runs and its counters, where the backend has a data plane of its own.
    fn stats(&self) -> Option<DataplaneSample> {
        None
    }
}

/// The configured backend (enum dispatch: async trait methods are not object safe).
pub enum AnyBackend {
    Alloc(alloc::AllocBackend),
    Udp(Box<udp::UdpBackend>),
    Vxlan(Box<vxlan::VxlanBackend>),
    HostGw(hostgw::HostGwBackend),
}

/// The started network of the configured backend.
pub enum AnyNetwork {
    Alloc(alloc::AllocNetwork),
    Udp(Box<udp::UdpNetwork>),
    Vxlan(Box<vxlan::VxlanNetwork>),
    HostGw(Box<hostgw::HostGwNetwork>),
}

impl AnyBackend {
    pub fn new(
        config: &NetworkConfig,
        ext: &ExternalInterface,
        opts: &BackendOptions,
    ) -> Result<Self, BackendError> {
        match config.backend.backend_type.as_str() {
            "alloc" => Ok(AnyBackend::Alloc(alloc::AllocBackend::new(ext))),
            "udp" => Ok(AnyBackend::Udp(Box::new(udp::UdpBackend::new(
                &config.backend,
                ext,
                opts,
            )?))),
            vxlan::BACKEND_TYPE => {
                let b = vxlan::VxlanBackend::new(&config.backend, ext, config.enable_ipv6)?;
                let b = if config.enable_ipv4 {
                    b
                } else {
                    b.without_ipv4()
                };
                Ok(AnyBackend::Vxlan(Box::new(b)))
            }
            hostgw::BACKEND_TYPE => Ok(AnyBackend::HostGw(hostgw::HostGwBackend::new(ext))),
            other => Err(BackendError::Unknown(other.to_owned())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AnyBackend::Alloc(_) => "alloc",
            AnyBackend::Udp(_) => "udp",
            AnyBackend::Vxlan(_) => vxlan::BACKEND_TYPE,
            AnyBackend::HostGw(_) => hostgw::BACKEND_TYPE,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Alloc($b) => $e,
            AnyBackend::Udp($b) => $e,
            AnyBackend::Vxlan($b) => $e,
            AnyBackend::HostGw($b) => $e,
        }
    };
}

macro_rules! dispatch_network {
    ($self:ident, $n:ident => $e:expr) => {
        match $self {
            AnyNetwork::Alloc($n) => $e,
            AnyNetwork::Udp($n) => $e,
            AnyNetwork::Vxlan($n) => $e,
            AnyNetwork::HostGw($n) => $e,
        }
    };
}

impl Backend for AnyBackend {
    type Network = AnyNetwork;
    fn lease_attrs(&self, public_ip: std::net::Ipv4Addr) -> LeaseAttrs {
        dispatch!(self, b => b.lease_attrs(public_ip))
    }
    fn add_ipv6_attrs(&self, attrs: &mut LeaseAttrs) {
        dispatch!(self, b => b.add_ipv6_attrs(attrs))
    }
    fn mtu(&self) -> u32 {
        dispatch!(self, b => b.mtu())
    }
    async fn start(self, own: &Lease, config: &NetworkConfig) -> anyhow::Result<AnyNetwork> {
        Ok(match self {
            AnyBackend::Alloc(b) => AnyNetwork::Alloc(b.start(own, config).await?),
            AnyBackend::Udp(b) => AnyNetwork::Udp(Box::new((*b).start(own, config).await?)),
            AnyBackend::Vxlan(b) => AnyNetwork::Vxlan(Box::new((*b).start(own, config).await?)),
            AnyBackend::HostGw(b) => AnyNetwork::HostGw(Box::new(b.start(own, config).await?)),
        })
    }
}

impl BackendNetwork for AnyNetwork {
    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()> {
        dispatch_network!(self, n => n.handle_events(events).await)
    }
    async fn sync_peers(&mut self, peers: &[Lease]) -> anyhow::Result<()> {
        dispatch_network!(self, n => n.sync_peers(peers).await)
    }
    async fn resync(&mut self, repaired: &mut Repairs) -> anyhow::Result<()> {
        dispatch_network!(self, n => n.resync(repaired).await)
    }
    fn stats(&self) -> Option<DataplaneSample> {
        dispatch_network!(self, n => n.stats())
    }
}
