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
    /// `flannel0` was re-created (it was deleted): carry on with `device`.
    fn follow_overlay(&mut self, device: device::OverlayDevice) -> anyhow::Result<()>;
    /// The external interface was re-created under its name with `ifindex`: follow it.
    fn follow_external(&mut self, _ifindex: u32) -> anyhow::Result<()> {
        Ok(())
    }
    /// The resync's check of what the data plane installed itself (eBPF: the programs on
    /// their hooks, the config and peer maps), repairing what is wrong; devices are the
    /// backend's.
    fn repair(&mut self, _repaired: &mut super::Repairs) -> anyhow::Result<()> {
        Ok(())
    }
    /// The peer table the data plane sends by.
    fn peer_table(&self) -> BTreeMap<Ipv4Network, Ipv4Addr>;
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

/// udp started for our lease: the data plane that carries the traffic, and what the resync
/// checks it against.
pub struct UdpNetwork {
    dataplane: Box<dyn UdpDataplane>,
    handle: rtnetlink::Handle,
    /// `flannel0` as set up at start (the resync re-creates it so).
    device: device::OverlayDeviceConfig,
    /// Its ifindex now.
    overlay_ifindex: u32,
    /// The external interface's name and its ifindex now.
    ext_name: String,
    ext_ifindex: u32,
    /// The peers in etcd (normalised subnets), what the data plane's table must hold.
    peers: BTreeMap<Ipv4Network, Ipv4Addr>,
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
    ) -> anyhow::Result<Started> {
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
            Ok(dp) => Ok(Started {
                dataplane: Box::new(dp),
                device: dev_cfg,
                ifindex: dev.ifindex,
            }),
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
    ) -> anyhow::Result<Started> {
        // Programs of an earlier eBPF run would otherwise still grab our UDP port.
        if let Err(e) = ebpf::EbpfDataplane::unload(&self.opts.bpf_pin_dir) {
            log::warn!("removing pinned eBPF data plane: {e}");
        }
        let dev_cfg = self.device_config(own, config);
        let dev = device::setup_overlay_device(handle, &dev_cfg).await?;
        let ifindex = dev.ifindex;
        Ok(Started {
            dataplane: Box::new(tun::TunDataplane::start(
                dev,
                self.ext.iface_addr,
                self.port,
            )?),
            device: dev_cfg,
            ifindex,
        })
    }
}

/// A data plane just started, on the overlay device `device` made as `ifindex`.
struct Started {
    dataplane: Box<dyn UdpDataplane>,
    device: device::OverlayDeviceConfig,
    ifindex: u32,
}

/// A subnet as the data planes key it (host bits cleared).
fn normalised(subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(subnet.network(), subnet.prefix()).unwrap_or(subnet)
}

impl UdpNetwork {
    /// `flannel0` and the external interface: re-created, followed or corrected where they
    /// are not as at start.
    async fn resync_devices(&mut self, repaired: &mut super::Repairs) -> anyhow::Result<()> {
        use super::Repair;
        let name = self.device.name.clone();
        let tun = self.dataplane.kind() == super::DataplaneKind::Tun;
        match device::check_overlay_device(&self.handle, &self.device, self.overlay_ifindex).await?
        {
            None => {
                let dev = device::setup_overlay_device(&self.handle, &self.device).await?;
                log::warn!(
                    "{name} was gone or replaced (ifindex {} before): re-created as ifindex {} with its address, MTU and route{}",
                    self.overlay_ifindex,
                    dev.ifindex,
                    if tun {
                        "; the TUN forwarder moves onto it"
                    } else {
                        "; the programs on its hooks are attached again"
                    }
                );
                self.overlay_ifindex = dev.ifindex;
                self.dataplane.follow_overlay(dev)?;
                repaired.note(if tun {
                    Repair::TunDevice
                } else {
                    Repair::OverlayDevice
                });
            }
            Some(check) => {
                if check.settings || check.address {
                    log::warn!(
                        "{name} was {}: corrected",
                        match (check.settings, check.address) {
                            (true, true) => "down or of another MTU, and without its address",
                            (true, false) => "down or of another MTU",
                            _ => "without its address",
                        }
                    );
                    repaired.note(Repair::OverlayDevice);
                }
                if check.route {
                    log::warn!(
                        "the route of {} through {name} was gone: added again",
                        self.device.network
                    );
                    repaired.note(Repair::Route);
                }
            }
        }
        if tun {
            // The TUN forwarder's socket is bound to the address, not the device.
            return Ok(());
        }
        match device::link_index(&self.handle, &self.ext_name).await? {
            Some(index) if index != self.ext_ifindex => {
                log::warn!(
                    "external interface {} was re-created (ifindex {} before, {index} now): decap attached there and the config map follows it",
                    self.ext_name,
                    self.ext_ifindex
                );
                self.dataplane.follow_external(index)?;
                self.ext_ifindex = index;
                repaired.note(Repair::ExternalInterface);
            }
            Some(_) => {}
            None => anyhow::bail!(
                "external interface {} is gone; waiting for it to come back",
                self.ext_name
            ),
        }
        Ok(())
    }

    /// The data plane's peer table against the peers in etcd.
    fn resync_peers(&mut self, repaired: &mut super::Repairs) -> anyhow::Result<()> {
        let before = self.dataplane.peer_table();
        if before == self.peers {
            return Ok(());
        }
        // Peers the data plane refuses (another subnet length) stay out: only a change counts.
        let result = self.dataplane.sync_peers(&self.peers);
        if self.dataplane.peer_table() != before {
            log::warn!(
                "the udp peer table differed from the {} peers in etcd: synced again",
                self.peers.len()
            );
            repaired.note(super::Repair::PeerMap);
        }
        result
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
        let (started, name) = match kind {
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
            dataplane: started.dataplane,
            handle,
            device: started.device,
            overlay_ifindex: started.ifindex,
            ext_name: self.ext.name.clone(),
            ext_ifindex: self.ext.index,
            peers: BTreeMap::new(),
            _pin_lock: lock,
        })
    }
}

impl super::BackendNetwork for UdpNetwork {
    async fn handle_events(&mut self, events: &[crate::subnet::PeerEvent]) -> anyhow::Result<()> {
        for ev in events {
            match ev {
                crate::subnet::PeerEvent::Added(l) => {
                    self.peers.insert(normalised(l.subnet()), l.attrs.public_ip)
                }
                crate::subnet::PeerEvent::Removed(l) => self.peers.remove(&normalised(l.subnet())),
            };
        }
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
            .map(|l| (normalised(l.subnet()), l.attrs.public_ip))
            .collect();
        self.peers = table.clone();
        self.dataplane.sync_peers(&table)
    }

    /// Puts back what udp set up and someone removed or changed: the overlay device (with its
    /// address, MTU and route), the data plane on a re-created external interface, the
    /// programs on their hooks and the peer table (see [`UdpNetwork::resync_devices`] and
    /// `UdpDataplane::repair`).
    async fn resync(&mut self, repaired: &mut super::Repairs) -> anyhow::Result<()> {
        let devices = self.resync_devices(repaired).await;
        let dataplane = self.dataplane.repair(repaired);
        let peers = self.resync_peers(repaired);
        devices.and(dataplane).and(peers)
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
