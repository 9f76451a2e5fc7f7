//! The `vxlan` backend: a kernel VXLAN device `flannel.<VNI>` and, per peer, a permanent
//! neighbour entry, an FDB entry and an onlink route, as upstream installs them.
//!
//! Unlike upstream, the VTEP MAC is derived from the public IP, so it stays the same across
//! restarts and peers never keep stale neighbour/FDB entries for us (upstream issue #1795).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use anyhow::Context;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::route::{self, is_gone, Route};
use super::{Backend, BackendError};
use crate::config::{BackendConfig, NetworkConfig};
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs};
use crate::subnet::PeerEvent;

pub const BACKEND_TYPE: &str = "vxlan";
/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers.
pub const ENCAP_OVERHEAD: u32 = 50;
/// The port the kernel uses when none is configured (Linux's historic VXLAN port).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;
const MAX_VNI: u64 = (1 << 24) - 1;
const NUD_PERMANENT: u16 = 0x80;

/// The backend options of the network config (`Backend` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0: the kernel default (8472).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// None: external interface MTU minus the encapsulation overhead.
    pub mtu: Option<u32>,
}

fn bad(option: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::BadOption {
        backend: BACKEND_TYPE,
        option,
        message: message.into(),
    }
}

fn uint_option(
    cfg: &BackendConfig,
    option: &'static str,
    max: u64,
) -> Result<Option<u64>, BackendError> {
    match cfg.get(option) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(bad(
                option,
                format!("{v} is not an integer from 0 to {max}"),
            )),
        },
    }
}

fn bool_option(cfg: &BackendConfig, option: &'static str) -> Result<bool, BackendError> {
    match cfg.get(option) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(option, format!("{v} is not true or false"))),
    }
}

impl VxlanConfig {
    pub fn parse(cfg: &BackendConfig) -> Result<Self, BackendError> {
        let mtu = match uint_option(cfg, "MTU", 65535)? {
            None | Some(0) => None,
            Some(m) if m < 68 => {
                return Err(bad("MTU", format!("{m} is below the IPv4 minimum of 68")))
            }
            Some(m) => Some(m as u32),
        };
        Ok(VxlanConfig {
            vni: uint_option(cfg, "VNI", MAX_VNI)?.unwrap_or(1) as u32,
            port: uint_option(cfg, "Port", u16::MAX.into())?.unwrap_or(0) as u16,
            gbp: bool_option(cfg, "GBP")?,
            learning: bool_option(cfg, "Learning")?,
            direct_routing: bool_option(cfg, "DirectRouting")?,
            mtu,
        })
    }

    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

/// A VTEP (Ethernet) address, printed as upstream's Go `net.HardwareAddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Ours: a locally administered unicast address that embeds the public IP, so it is the
    /// same after every restart and unique among the nodes of a network.
    pub fn for_public_ip(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        Mac([0x0e, 0xf1, a, b, c, d])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("bad MAC {s:?}"))?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC {s:?}"));
        }
        Ok(Mac(out))
    }
}

/// The lease's BackendData, field order as upstream (Go struct order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLeaseData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

impl VxlanLeaseData {
    pub fn to_json(&self) -> String {
        format!("{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", self.vni, self.vtep_mac)
    }

    /// The peer's VTEP MAC from its lease, if the lease is a well-formed vxlan lease.
    pub fn peer_mac(attrs: &LeaseAttrs) -> Result<Mac, String> {
        let raw = attrs.backend_data.as_ref().ok_or("no BackendData")?;
        let data: VxlanLeaseData = serde_json::from_str(raw.get())
            .map_err(|e| format!("BackendData {}: {e}", raw.get()))?;
        data.vtep_mac.parse()
    }
}

/// How one peer subnet is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerPath {
    /// Through the VXLAN device: neighbour, FDB and onlink route.
    Vxlan { mac: Mac, public_ip: Ipv4Addr },
    /// DirectRouting to a peer on our L2 network: a plain route via its public IP.
    Direct(Route),
}

pub struct VxlanBackend {
    cfg: VxlanConfig,
    ext: ExternalInterface,
    mac: Mac,
    mtu: u32,
    handle: Option<Handle>,
    dev_index: u32,
    own_addr: Ipv4Addr,
    peers: BTreeMap<Ipv4Network, PeerPath>,
    /// Peer events seen at least once: only then may resync drop entries nobody owns.
    peers_known: bool,
    /// The Network (for recognising stale DirectRouting routes on the external interface).
    network: Option<Ipv4Network>,
}

impl VxlanBackend {
    pub fn new(cfg: &BackendConfig, ext: &ExternalInterface) -> Result<Self, BackendError> {
        let cfg = VxlanConfig::parse(cfg)?;
        let mtu = cfg.mtu.unwrap_or(ext.mtu.saturating_sub(ENCAP_OVERHEAD));
        Ok(VxlanBackend {
            mac: Mac::for_public_ip(ext.ext_addr),
            mtu,
            ext: ext.clone(),
            cfg,
            handle: None,
            dev_index: 0,
            own_addr: Ipv4Addr::UNSPECIFIED,
            peers: BTreeMap::new(),
            peers_known: false,
            network: None,
        })
    }

    fn handle(&self) -> anyhow::Result<Handle> {
        self.handle.clone().context("vxlan backend not started")
    }

    /// Does an existing link match what we would create?
    fn compatible(&self, link: &LinkMessage) -> Result<(), String> {
        let mut kind = None;
        let mut data = Vec::new();
        let mut mac = None;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(d)) => data = d.clone(),
                            _ => {}
                        }
                    }
                }
                LinkAttribute::Address(a) => mac = Some(a.clone()),
                _ => {}
            }
        }
        if kind != Some(InfoKind::Vxlan) {
            return Err(format!("kind {kind:?}, not vxlan"));
        }
        let want_port = if self.cfg.port == 0 {
            KERNEL_DEFAULT_PORT
        } else {
            self.cfg.port
        };
        let has = |x: &InfoVxlan| data.contains(x);
        let checks = [
            (has(&InfoVxlan::Id(self.cfg.vni)), "VNI"),
            (has(&InfoVxlan::Link(self.ext.index)), "dev"),
            (has(&InfoVxlan::Local(self.ext.iface_addr)), "local address"),
            (has(&InfoVxlan::Port(want_port)), "port"),
            (has(&InfoVxlan::Learning(self.cfg.learning)), "learning"),
            (has(&InfoVxlan::Gbp) == self.cfg.gbp, "GBP"),
            (mac.as_deref() == Some(&self.mac.0[..]), "VTEP MAC"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(format!("different {what}")),
            None => Ok(()),
        }
    }

    async fn create_device(&self, handle: &Handle) -> anyhow::Result<()> {
        let name = self.cfg.device_name();
        let mut b = LinkVxlan::new(&name, self.cfg.vni)
            .dev(self.ext.index)
            .local(self.ext.iface_addr)
            .learning(self.cfg.learning)
            .mtu(self.mtu)
            .address(self.mac.0.to_vec());
        if self.cfg.port != 0 {
            b = b.port(self.cfg.port);
        }
        if self.cfg.gbp {
            b = b.gbp();
        }
        handle
            .link()
            .add(b.build())
            .execute()
            .await
            .with_context(|| format!("creating vxlan device {name}"))
    }

    /// Make `flannel.<VNI>` exist, compatible, up, with our address. Returns true when the
    /// device is new (its neighbours, FDB entries and routes must be installed again).
    async fn ensure_device(&mut self, handle: &Handle) -> anyhow::Result<bool> {
        let name = self.cfg.device_name();
        let mut fresh = true;
        if let Some(link) = find_link(handle, &name).await? {
            match self.compatible(&link) {
                Ok(()) => fresh = link.header.index != self.dev_index,
                Err(why) => {
                    log::warn!("replacing existing device {name}: {why}");
                    handle
                        .link()
                        .del(link.header.index)
                        .execute()
                        .await
                        .or_else(|e| if is_gone(&e) { Ok(()) } else { Err(e) })?;
                    self.create_device(handle).await?;
                }
            }
        } else {
            if self.dev_index != 0 {
                log::warn!("device {name} disappeared: creating it again");
            }
            self.create_device(handle).await?;
        }
        let link = find_link(handle, &name)
            .await?
            .with_context(|| format!("device {name} vanished"))?;
        self.dev_index = link.header.index;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(self.dev_index)
                    .mtu(self.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("setting {name} up"))?;
        self.ensure_address(handle).await?;
        Ok(fresh)
    }

    /// Exactly one IPv4 address on the device: our subnet's network address /32.
    async fn ensure_address(&self, handle: &Handle) -> anyhow::Result<()> {
        let mut present = false;
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(self.dev_index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = addrs.try_next().await? {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            match ip {
                Some(ip) if ip == self.own_addr && msg.header.prefix_len == 32 => present = true,
                Some(_) => stale.push(msg),
                None => {}
            }
        }
        for msg in stale {
            if let Err(e) = handle.address().del(msg).execute().await {
                log::warn!(
                    "removing an old address from {}: {e}",
                    self.cfg.device_name()
                );
            }
        }
        if !present {
            handle
                .address()
                .add(self.dev_index, IpAddr::V4(self.own_addr), 32)
                .execute()
                .await
                .with_context(|| {
                    format!("adding {}/32 to {}", self.own_addr, self.cfg.device_name())
                })?;
        }
        Ok(())
    }

    async fn path_for(&self, handle: &Handle, lease: &Lease) -> Result<PeerPath, String> {
        let mac = VxlanLeaseData::peer_mac(&lease.attrs)?;
        let public_ip = lease.attrs.public_ip;
        if self.cfg.direct_routing {
            // On our L2 network the kernel reaches the peer without a gateway.
            if let Ok((None, Some(oif))) = route::lookup(handle, public_ip).await {
                return Ok(PeerPath::Direct(Route {
                    dst: lease.subnet(),
                    gateway: public_ip,
                    oif,
                    onlink: false,
                }));
            }
        }
        Ok(PeerPath::Vxlan { mac, public_ip })
    }

    fn vxlan_route(&self, subnet: Ipv4Network) -> Route {
        Route {
            dst: subnet,
            gateway: subnet.network(),
            oif: self.dev_index,
            onlink: true,
        }
    }

    /// Upstream's order: neighbour, FDB, route (the route is usable once it exists).
    async fn install(
        &self,
        handle: &Handle,
        subnet: Ipv4Network,
        path: &PeerPath,
    ) -> Result<(), rtnetlink::Error> {
        match path {
            PeerPath::Direct(r) => r.replace(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                handle
                    .neighbours()
                    .add(self.dev_index, IpAddr::V4(subnet.network()))
                    .link_layer_address(&mac.0)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await?;
                handle
                    .neighbours()
                    .add_bridge(self.dev_index, &mac.0)
                    .destination(IpAddr::V4(*public_ip))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await?;
                self.vxlan_route(subnet).replace(handle).await
            }
        }
    }

    /// Undo `install`: route first, so nothing is sent through half-removed entries.
    async fn uninstall(
        &self,
        handle: &Handle,
        subnet: Ipv4Network,
        path: &PeerPath,
    ) -> Result<(), rtnetlink::Error> {
        match path {
            PeerPath::Direct(r) => r.delete(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                self.vxlan_route(subnet).delete(handle).await?;
                ignore_gone(
                    handle
                        .neighbours()
                        .del(fdb_message(self.dev_index, *mac, Some(*public_ip)))
                        .execute()
                        .await,
                )?;
                ignore_gone(
                    handle
                        .neighbours()
                        .del(neigh_message(self.dev_index, subnet.network()))
                        .execute()
                        .await,
                )
            }
        }
    }

    async fn apply(&mut self, handle: &Handle, ev: &PeerEvent) -> Result<(), String> {
        let (lease, added) = match ev {
            PeerEvent::Added(l) => (l, true),
            PeerEvent::Removed(l) => (l, false),
        };
        let subnet = lease.subnet();
        let wanted = if !added {
            None
        } else if lease.attrs.backend_type != BACKEND_TYPE {
            log::warn!(
                "ignoring peer {subnet} at {}: backend type {:?}, not {BACKEND_TYPE}",
                lease.attrs.public_ip,
                lease.attrs.backend_type
            );
            None
        } else {
            match self.path_for(handle, lease).await {
                Ok(p) => Some(p),
                Err(e) => {
                    log::warn!("ignoring peer {subnet} at {}: {e}", lease.attrs.public_ip);
                    None
                }
            }
        };
        if let Some(old) = self.peers.get(&subnet).cloned() {
            if Some(&old) == wanted.as_ref() {
                return Ok(());
            }
            self.peers.remove(&subnet);
            self.uninstall(handle, subnet, &old)
                .await
                .map_err(|e| format!("removing peer {subnet}: {e}"))?;
        }
        if let Some(path) = wanted {
            self.peers.insert(subnet, path.clone());
            self.install(handle, subnet, &path)
                .await
                .map_err(|e| format!("adding peer {subnet}: {e}"))?;
        }
        Ok(())
    }

    /// A route into the Network via the external interface that no DirectRouting peer owns
    /// (a peer that left, or moved off our L2 network, while we were not looking).
    fn is_stale_direct_route(&self, r: &Route) -> bool {
        let Some(network) = self.network.filter(|_| self.cfg.direct_routing) else {
            return false;
        };
        r.oif == self.ext.index
            && network.contains(r.dst.network())
            && r.dst.prefix() >= network.prefix()
            && !matches!(self.peers.get(&r.dst), Some(PeerPath::Direct(d)) if d.gateway == r.gateway)
    }

    /// Remove neighbours, FDB entries and routes on our device that no current peer owns
    /// (left by an earlier run while peers went away).
    async fn prune(&self, handle: &Handle) -> anyhow::Result<()> {
        let mut vxlan_peers: BTreeMap<Ipv4Network, (Mac, Ipv4Addr)> = BTreeMap::new();
        for (subnet, path) in &self.peers {
            if let PeerPath::Vxlan { mac, public_ip } = path {
                vxlan_peers.insert(*subnet, (*mac, *public_ip));
            }
        }
        for r in route::list_gateway_routes(handle).await? {
            if r.oif == self.dev_index && !vxlan_peers.contains_key(&r.dst) {
                log::info!("removing stale route {} via {}", r.dst, r.gateway);
                r.delete(handle).await?;
            } else if self.is_stale_direct_route(&r) {
                log::info!("removing stale direct route {} via {}", r.dst, r.gateway);
                r.delete(handle).await?;
            }
        }
        let neigh_ips: Vec<Ipv4Addr> = vxlan_peers.keys().map(|s| s.network()).collect();
        let macs: Vec<(Mac, Ipv4Addr)> = vxlan_peers.values().copied().collect();
        for (family, is_fdb) in [(AddressFamily::Inet, false), (AddressFamily::Bridge, true)] {
            let mut dump = handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute();
            let mut stale = Vec::new();
            while let Some(msg) = dump.try_next().await? {
                // Permanent entries only (`bridge fdb append ... permanent` also sets NOARP).
                let permanent = u16::from(msg.header.state) & NUD_PERMANENT != 0;
                if msg.header.ifindex != self.dev_index || !permanent {
                    continue;
                }
                let (mut ip, mut mac) = (None, None);
                for attr in &msg.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            ip = Some(Ipv4Addr::from(a.octets()))
                        }
                        // Bridge-family (FDB) messages carry the destination as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            mac = Some(Mac([l[0], l[1], l[2], l[3], l[4], l[5]]))
                        }
                        _ => {}
                    }
                }
                let owned = if is_fdb {
                    matches!((mac, ip), (Some(m), Some(ip)) if macs.contains(&(m, ip)))
                } else {
                    ip.is_some_and(|ip| neigh_ips.contains(&ip))
                };
                // FDB: only remote entries (MAC and destination), as we add them.
                let ours = if is_fdb {
                    mac.is_some() && ip.is_some()
                } else {
                    ip.is_some()
                };
                if ours && !owned {
                    stale.push(msg);
                }
            }
            for msg in stale {
                log::info!(
                    "removing stale {} entry {:?}",
                    if is_fdb { "FDB" } else { "neighbour" },
                    msg.attributes
                );
                ignore_gone(handle.neighbours().del(msg).execute().await)?;
            }
        }
        Ok(())
    }
}

fn ignore_gone(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}

fn neigh_message(ifindex: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    msg
}

fn fdb_message(ifindex: u32, mac: Mac, dst: Option<Ipv4Addr>) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = ifindex;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    if let Some(ip) = dst {
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    }
    msg
}

async fn find_link(handle: &Handle, name: &str) -> anyhow::Result<Option<LinkMessage>> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up device {name}")),
    }
}

impl Backend for VxlanBackend {
    fn lease_attrs(&self, public_ip: Ipv4Addr) -> LeaseAttrs {
        let data = VxlanLeaseData {
            vni: self.cfg.vni,
            vtep_mac: self.mac.to_string(),
        };
        let mut attrs = LeaseAttrs::new(public_ip);
        attrs.backend_type = BACKEND_TYPE.into();
        attrs.backend_data = serde_json::value::RawValue::from_string(data.to_json()).ok();
        attrs
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn start(&mut self, own: &Lease, config: &NetworkConfig) -> anyhow::Result<()> {
        self.network = Some(config.network);
        log::info!(
            "vxlan: VNI {} port {} GBP {} learning {} DirectRouting {} MTU {} VTEP MAC {}",
            self.cfg.vni,
            if self.cfg.port == 0 {
                KERNEL_DEFAULT_PORT
            } else {
                self.cfg.port
            },
            self.cfg.gbp,
            self.cfg.learning,
            self.cfg.direct_routing,
            self.mtu,
            self.mac
        );
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        self.own_addr = own.subnet().network();
        self.ensure_device(&handle).await?;
        self.handle = Some(handle);
        Ok(())
    }

    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()> {
        let handle = self.handle()?;
        self.peers_known = true;
        let mut first_error = None;
        for ev in events {
            if let Err(e) = self.apply(&handle, ev).await {
                log::warn!("vxlan: {e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(anyhow::anyhow!("vxlan: {e}")))
    }

    /// Recreate the device if it went away, re-apply every peer's entries, drop stale ones.
    async fn resync(&mut self) -> anyhow::Result<()> {
        let handle = self.handle()?;
        if self.ensure_device(&handle).await? {
            log::info!(
                "vxlan: device {} (re)created: reinstalling {} peers",
                self.cfg.device_name(),
                self.peers.len()
            );
        }
        for (subnet, path) in &self.peers {
            if let Err(e) = self.install(&handle, *subnet, path).await {
                log::warn!("vxlan: restoring peer {subnet}: {e}");
            }
        }
        if self.peers_known {
            self.prune(&handle).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_config(json: &str) -> BackendConfig {
        let cfg = NetworkConfig::parse(
            format!(r#"{{"Network":"10.244.0.0/16","Backend":{json}}}"#).as_bytes(),
        )
        .unwrap();
        cfg.backend
    }

    fn ext() -> ExternalInterface {
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            iface_addr: "172.30.0.11".parse().unwrap(),
            ext_addr: "172.30.0.11".parse().unwrap(),
        }
    }

    #[test]
    fn options_default_like_upstream() {
        let c = VxlanConfig::parse(&backend_config(r#"{"Type":"vxlan"}"#)).unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 1,
                port: 0,
                gbp: false,
                learning: false,
                direct_routing: false,
                mtu: None
            }
        );
        assert_eq!(c.device_name(), "flannel.1");
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext()).unwrap();
        assert_eq!(b.mtu(), 1450);
    }

    #[test]
    fn options_parse_case_insensitively() {
        let c = VxlanConfig::parse(&backend_config(
            r#"{"type":"vxlan","vni":4096,"port":4789,"gbp":true,"Learning":true,"directRouting":true,"mtu":1400}"#,
        ))
        .unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 4096,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: Some(1400)
            }
        );
        let b =
            VxlanBackend::new(&backend_config(r#"{"Type":"vxlan","MTU":1400}"#), &ext()).unwrap();
        assert_eq!(b.mtu(), 1400);
    }

    #[test]
    fn bad_options_are_clear_errors() {
        for (json, option) in [
            (r#"{"Type":"vxlan","VNI":16777216}"#, "VNI"),
            (r#"{"Type":"vxlan","VNI":-1}"#, "VNI"),
            (r#"{"Type":"vxlan","Port":"8472"}"#, "Port"),
            (r#"{"Type":"vxlan","Port":70000}"#, "Port"),
            (r#"{"Type":"vxlan","DirectRouting":"yes"}"#, "DirectRouting"),
            (r#"{"Type":"vxlan","MTU":10}"#, "MTU"),
        ] {
            let err = VxlanConfig::parse(&backend_config(json))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(option) && err.contains("vxlan"),
                "{json}: {err}"
            );
        }
    }

    #[test]
    fn lease_json_is_byte_identical_to_upstream() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext()).unwrap();
        let attrs = b.lease_attrs("172.30.0.11".parse().unwrap());
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:f1:ac:1e:00:0b"}}"#
        );
        let data = VxlanLeaseData {
            vni: 1,
            vtep_mac: "f6:ee:c7:fe:16:40".into(),
        };
        assert_eq!(data.to_json(), r#"{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}"#);
        assert_eq!(serde_json::to_string(&data).unwrap(), data.to_json());
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast_and_per_ip() {
        let a = Mac::for_public_ip("192.0.2.10".parse().unwrap());
        assert_eq!(a, Mac::for_public_ip("192.0.2.10".parse().unwrap()));
        assert_ne!(a, Mac::for_public_ip("192.0.2.11".parse().unwrap()));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered, unicast");
    }

    #[test]
    fn peer_macs_come_from_upstream_lease_data() {
        let upstream = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}}"#,
        )
        .unwrap();
        assert_eq!(
            VxlanLeaseData::peer_mac(&upstream).unwrap(),
            Mac([0xf6, 0xee, 0xc7, 0xfe, 0x16, 0x40])
        );
        for bad in [
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan"}"#,
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1}}"#,
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16"}}"#,
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:ee:c7:fe:16:40"}}"#,
        ] {
            let attrs = LeaseAttrs::from_json("k", bad.as_bytes()).unwrap();
            assert!(VxlanLeaseData::peer_mac(&attrs).is_err(), "{bad}");
        }
    }
}
