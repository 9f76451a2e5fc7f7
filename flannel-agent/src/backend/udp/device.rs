//! The udp backend's overlay device (`flannel0`), holding the lease's network address as /32
//! and the one route for the whole overlay network.
//!
//! The user-space forwarder reads and writes a TUN's queues. The eBPF programs attach to the
//! device and never read it, and a TUN nobody reads has no carrier: its route is `linkdown`,
//! and a host with `net.ipv4.conf.all.ignore_routes_with_linkdown=1` ignores it. So the eBPF
//! data plane uses an `ifb` instead: an Ethernet device without ARP whose carrier is up as long
//! as the device is, with no process attached, so it keeps forwarding while the agent restarts.
//! Setup is idempotent: an existing device of the wanted kind is adopted and its settings
//! corrected; one of the other kind (the other data plane ran before) is replaced.
//!
//! The TUN is created in the network namespace of the calling thread (where /dev/net/tun is
//! opened); `handle` must be connected in that same namespace.

use std::fs::OpenOptions;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkIfb, LinkUnspec, LinkVxlan, RouteMessageBuilder};

/// Largest interface name the kernel accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Offloads a TUN with virtio headers advertises: checksum offload and IPv4 TSO, so reads
/// return 64 KB TCP super-packets.
const TUN_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4;
/// VNI of the frames decap hands the overlay device's VXLAN receive (`CONFIG_F_KERNEL_RX`).
/// A plain (not collect-metadata) device: the kernel then attaches no per-packet tunnel
/// metadata, which it would allocate and free through RCU for every packet.
pub const KERNEL_RX_VNI: u32 = 1;
/// IPv4 minimum MTU (RFC 791).
const MIN_MTU: u32 = 68;

/// Which device carries the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayKind {
    /// A TUN: the user-space data plane reads and writes it.
    Tun,
    /// An ifb with ARP off: the eBPF data plane's, always with carrier.
    Ifb,
    /// A plain kernel VXLAN device (VNI 1) on the udp port, ARP off: the eBPF
    /// data plane's, with carrier, and the kernel's UDP tunnel receive for super-packets
    /// (see `CONFIG_F_KERNEL_RX`).
    Vxlan { port: u16 },
}

impl OverlayKind {
    fn label(self) -> &'static str {
        match self {
            OverlayKind::Tun => "tun",
            OverlayKind::Ifb => "ifb",
            OverlayKind::Vxlan { .. } => "vxlan",
        }
    }

    fn info_kind(self) -> InfoKind {
        match self {
            OverlayKind::Tun => InfoKind::Tun,
            OverlayKind::Ifb => InfoKind::Ifb,
            OverlayKind::Vxlan { .. } => InfoKind::Vxlan,
        }
    }
}

/// What the overlay device should look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDeviceConfig {
    /// Interface name, `flannel0` upstream.
    pub name: String,
    /// TUN or ifb; the TUN settings below apply to a TUN only.
    pub kind: OverlayKind,
    /// This node's lease; its network address goes on the device as /32.
    pub own_subnet: Ipv4Network,
    /// The whole overlay network, routed through the device.
    pub network: Ipv4Network,
    /// Device MTU: the external interface's MTU minus 28 (outer IPv4 + UDP).
    pub mtu: u32,
    /// Keep the device when its last descriptor closes (eBPF data plane, agent restarts).
    pub persistent: bool,
    /// TUN queues to open and keep for the user-space data plane; 0 keeps none (eBPF).
    pub queues: usize,
    /// Open the queues with virtio-net headers and TSO/checksum offloads (TUN data plane).
    pub vnet_hdr: bool,
}

impl OverlayDeviceConfig {
    /// Upstream's settings for a lease: `flannel0`, MTU = external MTU - 28, not persistent,
    /// one queue with offloads for the TUN data plane.
    pub fn for_lease(own_subnet: Ipv4Network, network: Ipv4Network, external_mtu: u32) -> Self {
        Self {
            name: "flannel0".to_string(),
            kind: OverlayKind::Tun,
            own_subnet,
            network,
            mtu: external_mtu.saturating_sub(28),
            persistent: false,
            queues: 1,
            vnet_hdr: true,
        }
    }

    fn validate(&self) -> Result<(), DeviceError> {
        let bad = |m: String| Err(DeviceError::InvalidConfig(m));
        if self.name.is_empty()
            || self.name.len() > MAX_IFNAME_LEN
            || self.name.contains(['/', ' ', '\0'])
        {
            return bad(format!("bad interface name {:?}", self.name));
        }
        if self.mtu < MIN_MTU || self.mtu > 65_535 {
            return bad(format!("MTU {} out of range {MIN_MTU}..=65535", self.mtu));
        }
        if self.kind == OverlayKind::Tun && !self.persistent && self.queues == 0 {
            return bad(
                "a non-persistent device needs at least one queue, else it vanishes at once".into(),
            );
        }
        if self.queues > 256 {
            return bad(format!(
                "{} queues requested, a TUN has at most 256",
                self.queues
            ));
        }
        if !self.network.contains(self.own_subnet.network())
            || self.own_subnet.prefix() < self.network.prefix()
        {
            return bad(format!(
                "subnet {} is not inside network {}",
                self.own_subnet, self.network
            ));
        }
        Ok(())
    }
}

/// A configured overlay device, with the TUN queue descriptors when some were requested.
#[derive(Debug)]
pub struct OverlayDevice {
    pub name: String,
    pub ifindex: u32,
    /// The address on the device: the lease's network address.
    pub address: Ipv4Addr,
    /// The overlay network routed through the device.
    pub network: Ipv4Network,
    pub mtu: u32,
    /// Whether the queues carry virtio-net headers (and the device has TSO/csum offloads).
    pub vnet_hdr: bool,
    queues: Vec<OwnedFd>,
}

impl OverlayDevice {
    /// Number of open TUN queues still held by this value.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Hands the TUN queue descriptors over (to the data plane); the device keeps its settings.
    pub fn take_queues(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.queues)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid overlay device config: {0}")]
    InvalidConfig(String),
    #[error(
        "{name} exists but is a {kind} device, not a TUN, ifb or VXLAN; remove it or choose another name"
    )]
    NotTun { name: String, kind: String },
    #[error("TUN {op} on {name}: {source}")]
    Tun {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink {op} on {name}: {source}")]
    Netlink {
        op: &'static str,
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{name}: UDP port {port} is in use by another program (another flanneld, or a VXLAN device on that port); the eBPF data plane receives on it")]
    PortInUse { name: String, port: u16 },
    #[error("{name} was created but the netlink handle cannot see it (handle in another network namespace?)")]
    NotVisible { name: String },
}

/// Creates or adopts the overlay device and brings it to the configured state: TUN flags,
/// persistence, offloads, MTU, link up, address `own_subnet.network()/32` (other IPv4 addresses
/// removed) and the route `network dev <name>`.
pub async fn setup_overlay_device(
    handle: &rtnetlink::Handle,
    cfg: &OverlayDeviceConfig,
) -> Result<OverlayDevice, DeviceError> {
    cfg.validate()?;
    let name = cfg.name.as_str();
    let nl_err = |op: &'static str| {
        move |source| DeviceError::Netlink {
            op,
            name: name.to_string(),
            source,
        }
    };

    let mut existing = find_link(handle, name).await?;
    if let Some(link) = &existing {
        match link_kind(link) {
            Some(kind) if kind == cfg.kind.info_kind() && vxlan_settings_match(link, cfg.kind) => {}
            Some(kind @ (InfoKind::Tun | InfoKind::Ifb | InfoKind::Vxlan)) => {
                log::info!(
                    "{name} is a {} device: replacing it with a {} for this data plane",
                    format!("{kind:?}").to_lowercase(),
                    cfg.kind.label()
                );
                handle
                    .link()
                    .del(link.header.index)
                    .execute()
                    .await
                    .map_err(nl_err("delete link"))?;
                existing = None;
            }
            Some(kind) => {
                return Err(DeviceError::NotTun {
                    name: name.to_string(),
                    kind: format!("{kind:?}").to_lowercase(),
                });
            }
            None => {}
        }
    }

    let queues = match cfg.kind {
        OverlayKind::Tun => {
            let queues = open_queues(cfg, existing.is_some())?;
            if cfg.queues == 0 {
                Vec::new()
            } else {
                queues
            }
        }
        OverlayKind::Ifb => {
            if existing.is_none() {
                handle
                    .link()
                    .add(LinkIfb::new(name).build())
                    .execute()
                    .await
                    .map_err(nl_err("add ifb"))?;
            }
            Vec::new()
        }
        OverlayKind::Vxlan { port } => {
            if existing.is_none() {
                handle
                    .link()
                    .add(
                        LinkVxlan::new(name, KERNEL_RX_VNI)
                            .port(port)
                            .learning(false)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl_err("add vxlan"))?;
            }
            Vec::new()
        }
    };

    let link = find_link(handle, name)
        .await?
        .ok_or_else(|| DeviceError::NotVisible {
            name: name.to_string(),
        })?;
    let ifindex = link.header.index;
    if cfg.kind != OverlayKind::Tun {
        // No IPv6 on it: link-local autoconfiguration would only send packets encap drops.
        let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if let Err(e) = std::fs::write(&knob, "1") {
            log::debug!("{knob}: {e}");
        }
    }

    // MTU and up first: IPv4 refuses routes through a device that is down.
    let mut settings = LinkUnspec::new_with_index(ifindex).mtu(cfg.mtu).up();
    if cfg.kind != OverlayKind::Tun {
        // The ifb is Ethernet: without ARP, routed packets reach encap at once.
        settings = settings.arp(false);
    }
    if let Err(source) = handle.link().set(settings.build()).execute().await {
        return Err(match (cfg.kind, &source) {
            // A VXLAN device binds its UDP port when it goes up.
            (OverlayKind::Vxlan { port }, rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::EADDRINUSE =>
            {
                if existing.is_none() {
                    // Made just now and unusable: leave no down flannel0 behind.
                    if let Err(e) = handle.link().del(ifindex).execute().await {
                        log::warn!("removing {name}, which cannot go up: {e}");
                    }
                }
                DeviceError::PortInUse {
                    name: name.to_string(),
                    port,
                }
            }
            _ => nl_err("set mtu/up")(source),
        });
    }

    let address = cfg.own_subnet.network();
    ensure_single_address(handle, ifindex, name, address).await?;

    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(cfg.network.network(), cfg.network.prefix())
        .output_interface(ifindex)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl_err("route replace"))?;

    Ok(OverlayDevice {
        name: name.to_string(),
        ifindex,
        address,
        network: cfg.network,
        mtu: cfg.mtu,
        vnet_hdr: cfg.vnet_hdr,
        queues,
    })
}

/// The ifindex of device `name`, if there is one.
pub async fn link_index(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<u32>, DeviceError> {
    Ok(find_link(handle, name).await?.map(|l| l.header.index))
}

/// What [`check_overlay_device`] found and put right on an overlay device that exists.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCheck {
    /// It was down or had another MTU.
    pub settings: bool,
    /// Its address was missing (or others were on it).
    pub address: bool,
    /// The overlay network's route through it was missing.
    pub route: bool,
}

/// Whether the overlay device `ifindex` is still there as [`setup_overlay_device`] left it
/// (`None`: gone, replaced or of another kind; set it up again), and if so puts right what
/// differs: up and MTU, its address, the route. Touches nothing that is as it should be.
pub async fn check_overlay_device(
    handle: &rtnetlink::Handle,
    cfg: &OverlayDeviceConfig,
    ifindex: u32,
) -> Result<Option<DeviceCheck>, DeviceError> {
    let name = cfg.name.as_str();
    let nl_err = |op: &'static str| {
        move |source| DeviceError::Netlink {
            op,
            name: name.to_string(),
            source,
        }
    };
    let Some(link) = find_link(handle, name).await? else {
        return Ok(None);
    };
    if link.header.index != ifindex
        || link_kind(&link) != Some(cfg.kind.info_kind())
        || !vxlan_settings_match(&link, cfg.kind)
    {
        return Ok(None);
    }
    let mut check = DeviceCheck::default();
    let up = link
        .header
        .flags
        .contains(rtnetlink::packet_route::link::LinkFlags::Up);
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    if !up || mtu != Some(cfg.mtu) {
        let settings = LinkUnspec::new_with_index(ifindex).mtu(cfg.mtu).up();
        handle
            .link()
            .set(settings.build())
            .execute()
            .await
            .map_err(nl_err("set mtu/up"))?;
        check.settings = true;
    }
    check.address = ensure_single_address(handle, ifindex, name, cfg.own_subnet.network()).await?;
    if !has_network_route(handle, cfg.network, ifindex)
        .await
        .map_err(nl_err("list routes"))?
    {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(cfg.network.network(), cfg.network.prefix())
            .output_interface(ifindex)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl_err("route replace"))?;
        check.route = true;
    }
    Ok(Some(check))
}

/// Whether the main table routes `network` through device `ifindex`.
async fn has_network_route(
    handle: &rtnetlink::Handle,
    network: Ipv4Network,
    ifindex: u32,
) -> Result<bool, rtnetlink::Error> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes.try_next().await? {
        if route.header.destination_prefix_length != network.prefix() {
            continue;
        }
        let mut dst = None;
        let mut oif = None;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if dst == Some(network.network()) && oif == Some(ifindex) {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn find_link(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>, DeviceError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(source) => Err(DeviceError::Netlink {
            op: "get link",
            name: name.to_string(),
            source,
        }),
    }
}

/// For a VXLAN overlay, whether `link` has the VNI and port we want (another port: the udp
/// port changed in the network config); true for the other kinds.
fn vxlan_settings_match(link: &LinkMessage, kind: OverlayKind) -> bool {
    let OverlayKind::Vxlan { port } = kind else {
        return true;
    };
    let data: Vec<&InfoVxlan> = link
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos),
            _ => None,
        })
        .flatten()
        .filter_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
            _ => None,
        })
        .flatten()
        .collect();
    data.contains(&&InfoVxlan::Id(KERNEL_RX_VNI)) && data.contains(&&InfoVxlan::Port(port))
}

fn link_kind(link: &LinkMessage) -> Option<InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// Leaves exactly `address/32` as the device's IPv4 address.
async fn ensure_single_address(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    name: &str,
    address: Ipv4Addr,
) -> Result<bool, DeviceError> {
    let nl_err = |op: &'static str| {
        move |source| DeviceError::Netlink {
            op,
            name: name.to_string(),
            source,
        }
    };
    let current: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("list addresses"))?;
    let mut present = false;
    let mut changed = false;
    for msg in current {
        if msg.header.index != ifindex {
            continue;
        }
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        let Some(ip) = ip else { continue };
        if ip == address && msg.header.prefix_len == 32 {
            present = true;
        } else {
            log::info!(
                "{name}: removing stale address {ip}/{}",
                msg.header.prefix_len
            );
            handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl_err("delete address"))?;
            changed = true;
        }
    }
    if !present {
        handle
            .address()
            .add(ifindex, IpAddr::V4(address), 32)
            .execute()
            .await
            .map_err(nl_err("add address"))?;
        changed = true;
    }
    Ok(changed)
}

/// Opens (creating the device if needed) the TUN queues and applies flags, offloads and
/// persistence. Returns at least one descriptor.
fn open_queues(cfg: &OverlayDeviceConfig, exists: bool) -> Result<Vec<OwnedFd>, DeviceError> {
    let name = cfg.name.as_str();
    let want = cfg.queues.max(1);
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if cfg.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    // Multi-queue always, so any later run can attach as many queues as it wants. A device made
    // by someone else without it can only be adopted single-queue.
    let mut multi_queue = true;
    let mut queues = Vec::with_capacity(want);
    match tun_attach(name, flags | libc::IFF_MULTI_QUEUE) {
        Ok(fd) => queues.push(fd),
        Err(e) if exists && e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!("{name} is a single-queue TUN; adopting it with one queue");
            multi_queue = false;
            queues.push(tun_attach(name, flags).map_err(tun_err("attach", name))?);
        }
        Err(e) => return Err(tun_err("attach", name)(e)),
    }
    if multi_queue {
        while queues.len() < want {
            queues.push(
                tun_attach(name, flags | libc::IFF_MULTI_QUEUE)
                    .map_err(tun_err("attach queue", name))?,
            );
        }
    }
    let fd = queues[0].as_raw_fd();
    // Offloads are per device: on with virtio headers, off without (else reads would return
    // super-packets with no header saying how to split them).
    let offloads = if cfg.vnet_hdr { TUN_OFFLOADS } else { 0 };
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offloads as libc::c_ulong) } < 0 {
        return Err(tun_err("set offload", name)(io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, libc::c_ulong::from(cfg.persistent)) } < 0 {
        return Err(tun_err("set persist", name)(io::Error::last_os_error()));
    }
    Ok(queues)
}

fn tun_err(op: &'static str, name: &str) -> impl FnOnce(io::Error) -> DeviceError {
    let name = name.to_string();
    move |source| DeviceError::Tun { op, name, source }
}

/// Opens /dev/net/tun and attaches it to (creating if needed) the TUN `name` with `flags`.
fn tun_attach(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(MAX_IFNAME_LEN))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which lives for the call.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut libc::ifreq,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OverlayDeviceConfig {
        OverlayDeviceConfig::for_lease(
            "10.244.5.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            1500,
        )
    }

    #[test]
    fn upstream_defaults_for_a_lease() {
        let c = cfg();
        assert_eq!(c.name, "flannel0");
        assert_eq!(c.mtu, 1472);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_configs_are_refused_before_touching_the_system() {
        type Mutation = Box<dyn Fn(&mut OverlayDeviceConfig)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|c| c.name = "a-name-longer-than-15".into()),
            Box::new(|c| c.name = String::new()),
            Box::new(|c| c.mtu = 20),
            Box::new(|c| c.queues = 0),
            Box::new(|c| c.own_subnet = "10.245.5.0/24".parse().unwrap()),
            Box::new(|c| c.own_subnet = "10.0.0.0/8".parse().unwrap()),
        ];
        for mutate in cases {
            let mut c = cfg();
            mutate(&mut c);
            assert!(
                matches!(c.validate(), Err(DeviceError::InvalidConfig(_))),
                "{c:?}"
            );
        }
        let mut persistent_no_queues = cfg();
        persistent_no_queues.queues = 0;
        persistent_no_queues.persistent = true;
        assert!(persistent_no_queues.validate().is_ok());
    }
}
