//! The udp backend: flannel's original encapsulation (outer IPv4/UDP, payload = inner IPv4).
//!
//! Two data planes share one device (`flannel0`, a TUN), one route and one wire format:
//! the eBPF programs (default) and a user-space TUN forwarder (fallback and baseline).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub mod device;
pub mod ebpf;
pub mod pin_lock;
pub mod tun;

/// Packet and drop counters of a data plane, summed over CPUs / threads: the one counter
/// table of `flannel_common::counters`. The TUN forwarder leaves the eBPF-only ones at 0.
pub type DataplaneStats = flannel_common::Stats;

/// What the udp backend needs from a data plane: the peer table and counters.
pub trait UdpDataplane: Send {
    /// Add or change the peer owning `subnet`.
    fn set_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> anyhow::Result<()>;
    /// Forget the peer owning `subnet`; traffic to it is dropped from now on.
    fn remove_peer(&mut self, subnet: Ipv4Network) -> anyhow::Result<()>;
    /// Make the peer table equal `peers` (after a re-list): adds, changes and removes.
    fn sync_peers(&mut self, peers: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()>;
    fn stats(&self) -> anyhow::Result<DataplaneStats>;
    /// Which data plane this is (what `/metrics` reports).
    fn kind(&self) -> super::DataplaneKind;
    /// The eBPF data plane's paths on this host.
    fn paths(&self) -> Option<super::DataplanePaths> {
        None
    }
}

/// Default udp port, as upstream.
pub const DEFAULT_PORT: u16 = 8285;
/// Outer IPv4 (20) + UDP (8) headers.
pub const ENCAP_OVERHEAD: u32 = 28;

pub struct UdpBackend {
    port: u16,
    ext: crate::iface::ExternalInterface,
    opts: super::BackendOptions,
}

/// udp started for our lease: the data plane that carries the traffic.
pub struct UdpNetwork {
    dataplane: Box<dyn UdpDataplane>,
    /// Held while we run: no other agent may use our pin dir. `None` only when the pin dir
    /// could not be made (no bpffs: the TUN data plane runs without pins).
    _pin_lock: Option<pin_lock::PinDirLock>,
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
        })
    }

    fn device_config(
        &self,
        own: &crate::lease::Lease,
        config: &crate::config::NetworkConfig,
    ) -> device::OverlayDeviceConfig {
        device::OverlayDeviceConfig::for_lease(own.subnet(), config.network, self.ext.mtu)
    }

    async fn start_ebpf(
        &self,
        handle: &rtnetlink::Handle,
        own: &crate::lease::Lease,
        config: &crate::config::NetworkConfig,
    ) -> anyhow::Result<Box<dyn UdpDataplane>> {
        if !ebpf::EbpfDataplane::embedded() {
            anyhow::bail!("this flanneld was built without the eBPF object (run `cargo xtask build-ebpf` before building it)");
        }
        // The eBPF programs never read the device: a kernel VXLAN device, which has carrier
        // with no reader, outlives the agent and receives what decap hands it (device.rs).
        let dev_cfg = device::OverlayDeviceConfig {
            kind: device::OverlayKind::Vxlan { port: self.port },
            persistent: true,
            queues: 0,
            vnet_hdr: false,
            ..self.device_config(own, config)
        };
        let dev = device::setup_overlay_device(handle, &dev_cfg).await?;
        let opts = ebpf::EbpfOptions {
            pin_dir: self.opts.bpf_pin_dir.clone(),
            overlay_ifindex: dev.ifindex,
            ext_ifindex: self.ext.index,
            // Upstream binds its socket to the interface address: that is the outer source.
            ext_ip: self.ext.iface_addr,
            port: self.port,
            network: config.network,
            own_subnet: own.subnet(),
            decap: self.opts.udp_decap,
            attach: self.opts.udp_attach,
        };
        match ebpf::EbpfDataplane::load(&opts) {
            Ok(dp) => Ok(Box::new(dp)),
            Err(e) => {
                // Leave no half-configured device behind for the TUN fallback.
                if let Err(del) = handle.link().del(dev.ifindex).execute().await {
                    log::warn!("removing {} after the failed eBPF load: {del}", dev.name);
                }
                Err(e.into())
            }
        }
    }

    async fn start_tun(
        &self,
        handle: &rtnetlink::Handle,
        own: &crate::lease::Lease,
        config: &crate::config::NetworkConfig,
    ) -> anyhow::Result<Box<dyn UdpDataplane>> {
        // Programs of an earlier eBPF run would otherwise still grab our UDP port.
        if let Err(e) = ebpf::EbpfDataplane::unload(&self.opts.bpf_pin_dir) {
            log::warn!("removing pinned eBPF data plane: {e}");
        }
        let dev = device::setup_overlay_device(handle, &self.device_config(own, config)).await?;
        Ok(Box::new(tun::TunDataplane::start(
            dev,
            self.ext.iface_addr,
            self.port,
        )?))
    }
}

/// Whether `e` rules out the TUN fallback: another program holds the udp port (TUN needs it
/// too), or a path the operator forced (`--udp-decap=xdp`, `--udp-attach=tcx`) cannot run,
/// which TUN would not honour either.
fn rules_out_fallback(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<device::DeviceError>(),
        Some(device::DeviceError::PortInUse { .. })
    ) || e
        .downcast_ref::<ebpf::EbpfError>()
        .is_some_and(ebpf::EbpfError::is_forced_path)
}

impl super::Backend for UdpBackend {
    type Network = UdpNetwork;
    fn lease_attrs(&self, public_ip: Ipv4Addr) -> crate::lease::LeaseAttrs {
        // Upstream's udp backend never sets BackendType.
        crate::lease::LeaseAttrs::new(public_ip)
    }
    fn mtu(&self) -> u32 {
        self.ext.mtu.saturating_sub(ENCAP_OVERHEAD)
    }
    async fn start(
        self,
        own: &crate::lease::Lease,
        config: &crate::config::NetworkConfig,
    ) -> anyhow::Result<UdpNetwork> {
        use crate::cli::UdpDataplaneKind;
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let kind = self.opts.udp_dataplane;
        // Before touching the pins (eBPF adopts them, TUN removes them).
        let mut lock = pin_lock::PinDirLock::acquire(&self.opts.bpf_pin_dir)?;
        let (dp, name) = match kind {
            UdpDataplaneKind::Tun => (self.start_tun(&handle, own, config).await?, "TUN"),
            UdpDataplaneKind::Ebpf => (self.start_ebpf(&handle, own, config).await?, "eBPF"),
            UdpDataplaneKind::Auto => {
                match self.start_ebpf(&handle, own, config).await {
                    Ok(dp) => (dp, "eBPF"),
                    // The TUN data plane needs the same port, or would ignore what the
                    // operator forced: falling back would only fail again, or mislead.
                    Err(e) if rules_out_fallback(&e) => return Err(e),
                    Err(e) => {
                        log::warn!("eBPF data plane unavailable ({e:#}); falling back to the TUN data plane");
                        (self.start_tun(&handle, own, config).await?, "TUN")
                    }
                }
            }
        };
        if lock.is_none() && self.opts.bpf_pin_dir.exists() {
            // The loader has just mounted bpffs and made the directory.
            lock = pin_lock::PinDirLock::acquire(&self.opts.bpf_pin_dir)?;
        }
        log::info!("udp backend: port {}, {name} data plane", self.port);
        Ok(UdpNetwork {
            dataplane: dp,
            _pin_lock: lock,
        })
    }
}

impl super::BackendNetwork for UdpNetwork {
    async fn handle_events(&mut self, events: &[crate::subnet::PeerEvent]) -> anyhow::Result<()> {
        let dp = &mut self.dataplane;
        // One bad lease (e.g. another subnet length) must not keep the others out.
        let mut failed = 0;
        for ev in events {
            let r = match ev {
                crate::subnet::PeerEvent::Added(l) => dp.set_peer(l.subnet(), l.attrs.public_ip),
                crate::subnet::PeerEvent::Removed(l) => dp.remove_peer(l.subnet()),
            };
            if let Err(e) = r {
                log::warn!("udp data plane: {e:#}");
                failed += 1;
            }
        }
        if failed > 0 {
            anyhow::bail!(
                "{failed} of {} peer changes could not be applied",
                events.len()
            );
        }
        Ok(())
    }
    async fn sync_peers(&mut self, peers: &[crate::lease::Lease]) -> anyhow::Result<()> {
        let table: BTreeMap<Ipv4Network, Ipv4Addr> = peers
            .iter()
            .map(|l| (l.subnet(), l.attrs.public_ip))
            .collect();
        self.dataplane.sync_peers(&table)
    }
    fn stats(&self) -> Option<super::DataplaneSample> {
        let d = &self.dataplane;
        Some(super::DataplaneSample {
            kind: d.kind(),
            stats: d.stats().ok()?,
            paths: d.paths(),
        })
    }
}
