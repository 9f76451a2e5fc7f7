//! The `vxlan` backend: a kernel VXLAN device `flannel.<VNI>` and, per peer, a permanent
//! neighbour entry, an FDB entry and an onlink route, as upstream installs them. With
//! EnableIPv6 a second device `flannel-v6.<VNI>` over the IPv6 underlay does the same for the
//! peers' IPv6 subnets (its MAC is published as BackendV6Data). An IPv6-only network
//! (EnableIPv4 false) has that device alone.
//!
//! Unlike upstream, the VTEP MAC is derived from the public IP, so it stays the same across
//! restarts and peers never keep stale neighbour/FDB entries for us (upstream issue #1795).
//!
//! Modules: `config` (options), `device` (the kernel device), `neigh` (neighbour and FDB
//! entries), `peers` / `peers6` (what each peer gets on the IPv4 / IPv6 device).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use anyhow::Context;
use rtnetlink::Handle;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Backend, BackendError, BackendNetwork, Repair, Repairs};
use crate::config::{BackendConfig, NetworkConfig};
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs};
use crate::subnet::PeerEvent;

pub mod config;
pub mod device;
pub mod neigh;
pub mod peers;
pub mod peers6;

pub use config::{VxlanConfig, ENCAP_OVERHEAD, KERNEL_DEFAULT_PORT};
use device::{DeviceSpec, VxlanDevice};
use peers::Peers;
use peers6::Peers6;

pub const BACKEND_TYPE: &str = "vxlan";

/// What went wrong setting up the device or a peer's entries.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("device {0} vanished right after being set up")]
    Vanished(String),
}

/// Why a peer's lease gives no usable VTEP.
#[derive(Debug, thiserror::Error)]
pub enum LeaseDataError {
    #[error("no {0}")]
    Missing(&'static str),
    #[error("{field} {raw}: {source}")]
    Json {
        field: &'static str,
        raw: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Mac(#[from] BadMac),
}

#[derive(Debug, thiserror::Error)]
#[error("bad MAC {0:?}")]
pub struct BadMac(pub String);

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

    /// Ours for the IPv6 device: stable too, and unique among nodes whose public IPv6
    /// addresses share their first 96 bits (the last 32 bits are kept, XORed with a fold of
    /// the first 96 that is the same for all of them).
    pub fn for_public_ipv6(ip: Ipv6Addr) -> Self {
        let o = ip.octets();
        let word = |i: usize| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        let [a, b, c, d] = (word(12) ^ word(0) ^ word(4) ^ word(8)).to_be_bytes();
        Mac([0x0e, 0xf6, a, b, c, d])
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
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in out.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

/// The lease's BackendData (and BackendV6Data), field order as upstream (Go struct order).
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

    fn raw(&self) -> Option<Box<RawValue>> {
        RawValue::from_string(self.to_json()).ok()
    }

    fn mac_in(raw: Option<&RawValue>, field: &'static str) -> Result<Mac, LeaseDataError> {
        let raw = raw.ok_or(LeaseDataError::Missing(field))?;
        let data: VxlanLeaseData =
            serde_json::from_str(raw.get()).map_err(|source| LeaseDataError::Json {
                field,
                raw: raw.get().to_owned(),
                source,
            })?;
        Ok(data.vtep_mac.parse()?)
    }

    /// The peer's VTEP MAC from its lease, if the lease is a well-formed vxlan lease.
    pub fn peer_mac(attrs: &LeaseAttrs) -> Result<Mac, LeaseDataError> {
        Self::mac_in(attrs.backend_data.as_deref(), "BackendData")
    }

    /// The peer's IPv6 VTEP MAC (BackendV6Data).
    pub fn peer_mac_v6(attrs: &LeaseAttrs) -> Result<Mac, LeaseDataError> {
        Self::mac_in(attrs.backend_v6_data.as_deref(), "BackendV6Data")
    }
}

/// The IPv4 device and its peers (EnableIPv4).
struct V4Side {
    dev: VxlanDevice,
    peers: Peers,
}

/// The IPv6 device and its peers (EnableIPv6).
struct V6Side {
    dev: VxlanDevice,
    peers: Peers6,
}

pub struct VxlanBackend {
    cfg: VxlanConfig,
    ext: ExternalInterface,
    mac: Mac,
    mtu: u32,
    /// EnableIPv4 (default): run `flannel.<VNI>`.
    ipv4: bool,
    /// EnableIPv6: run `flannel-v6.<VNI>`.
    ipv6: bool,
    /// The IPv4 device to create (its address comes with our lease).
    spec: DeviceSpec,
}

/// vxlan started for our lease: its devices and what each peer has on them.
pub struct VxlanNetwork {
    handle: Handle,
    /// With EnableIPv4.
    v4: Option<V4Side>,
    /// With EnableIPv6.
    v6: Option<V6Side>,
}

impl VxlanBackend {
    /// `ipv6`: the network config's EnableIPv6.
    pub fn new(
        cfg: &BackendConfig,
        ext: &ExternalInterface,
        ipv6: bool,
    ) -> Result<Self, BackendError> {
        let cfg = VxlanConfig::parse(cfg)?;
        let mtu = cfg.mtu_v4(ext.mtu);
        let mac = Mac::for_public_ip(ext.ext_addr);
        let spec = DeviceSpec {
            name: cfg.device_name(),
            vni: cfg.vni,
            port: cfg.port,
            effective_port: cfg.effective_port(),
            gbp: cfg.gbp,
            learning: cfg.learning,
            ext_index: ext.index,
            local: IpAddr::V4(ext.iface_addr),
            mac,
            mtu,
        };
        Ok(VxlanBackend {
            ext: ext.clone(),
            mac,
            mtu,
            ipv4: true,
            ipv6,
            spec,
            cfg,
        })
    }

    /// An IPv6-only network (EnableIPv4 false): no `flannel.<VNI>`, no BackendData.
    pub fn without_ipv4(self) -> Self {
        VxlanBackend {
            ipv4: false,
            ..self
        }
    }

    fn v6_data(&self, public_ipv6: Ipv6Addr) -> VxlanLeaseData {
        VxlanLeaseData {
            vni: self.cfg.vni,
            vtep_mac: Mac::for_public_ipv6(public_ipv6).to_string(),
        }
    }

    /// `flannel-v6.<VNI>`: local = our PublicIPv6, same VNI, port and options as the IPv4
    /// device, address = our IPv6 subnet's network address /128 (upstream's).
    async fn start_v6(
        &self,
        handle: &Handle,
        own: &Lease,
        config: &NetworkConfig,
    ) -> anyhow::Result<V6Side> {
        let subnet6 = own
            .key
            .ipv6
            .with_context(|| format!("EnableIPv6, but our lease {} has no IPv6 subnet", own.key))?;
        let public_ipv6 = own
            .attrs
            .public_ipv6
            .with_context(|| format!("EnableIPv6, but our lease {} has no PublicIPv6", own.key))?;
        let spec = DeviceSpec {
            name: self.cfg.device_name_v6(),
            local: IpAddr::V6(public_ipv6),
            mac: Mac::for_public_ipv6(public_ipv6),
            mtu: self.cfg.mtu_v6(self.ext.mtu),
            ..self.spec.clone()
        };
        log::info!(
            "vxlan: IPv6 device {} local {public_ipv6} MTU {} VTEP MAC {}",
            spec.name,
            spec.mtu,
            spec.mac
        );
        let mut dev = VxlanDevice::new(spec, IpAddr::V6(subnet6.network()));
        dev.ensure(handle).await?;
        disable_router_advertisements(dev.name());
        let peers = Peers6::new(self.cfg.direct_routing, self.ext.index, config.ipv6_network);
        Ok(V6Side { dev, peers })
    }
}

impl VxlanNetwork {
    /// The IPv4 side of resync.
    async fn resync_v4(&mut self, repaired: &mut Repairs) -> anyhow::Result<()> {
        let Some(v4) = self.v4.as_mut() else {
            return Ok(());
        };
        if v4.dev.ensure(&self.handle).await? {
            repaired.note(Repair::VxlanDevice);
            log::info!(
                "vxlan: device {} (re)created: reinstalling {} peers",
                v4.dev.name(),
                v4.peers.len()
            );
        }
        v4.peers.restore(&self.handle, v4.dev.index()).await;
        Ok(v4.peers.prune(&self.handle, v4.dev.index()).await?)
    }

    /// The IPv6 side of resync: failures are logged, never stop the IPv4 side.
    async fn resync_v6(&mut self, repaired: &mut Repairs) {
        let handle = &self.handle;
        let Some(v6) = self.v6.as_mut() else {
            return;
        };
        match v6.dev.ensure(handle).await {
            Ok(true) => {
                repaired.note(Repair::VxlanDevice);
                disable_router_advertisements(v6.dev.name());
                log::info!(
                    "vxlan: device {} (re)created: reinstalling {} IPv6 peers",
                    v6.dev.name(),
                    v6.peers.len()
                );
            }
            Ok(false) => {}
            Err(e) => {
                log::warn!("vxlan: IPv6 device: {e}");
                return;
            }
        }
        v6.peers.restore(handle, v6.dev.index()).await;
        if let Err(e) = v6.peers.prune(handle, v6.dev.index()).await {
            log::warn!("vxlan: removing stale IPv6 entries: {e}");
        }
    }
}

/// Upstream turns router advertisements off on the IPv6 device: its routes are ours alone.
fn disable_router_advertisements(dev: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    if let Err(e) = std::fs::write(&path, "0") {
        log::warn!("vxlan: writing 0 to {path}: {e}");
    }
}

impl Backend for VxlanBackend {
    type Network = VxlanNetwork;

    fn lease_attrs(&self, public_ip: Ipv4Addr) -> LeaseAttrs {
        let mut attrs = LeaseAttrs::new(public_ip);
        attrs.backend_type = BACKEND_TYPE.into();
        if self.ipv4 {
            let data = VxlanLeaseData {
                vni: self.cfg.vni,
                vtep_mac: self.mac.to_string(),
            };
            attrs.backend_data = data.raw();
        }
        attrs
    }

    fn add_ipv6_attrs(&self, attrs: &mut LeaseAttrs) {
        if let Some(ip) = attrs.public_ipv6.filter(|_| self.ipv6) {
            attrs.backend_v6_data = self.v6_data(ip).raw();
        }
    }

    /// With IPv6 the smaller of the two devices' MTUs: pods have one MTU for both families.
    fn mtu(&self) -> u32 {
        match (self.ipv4, self.ipv6) {
            (true, true) => self.mtu.min(self.cfg.mtu_v6(self.ext.mtu)),
            (false, _) => self.cfg.mtu_v6(self.ext.mtu),
            (true, false) => self.mtu,
        }
    }

    async fn start(self, own: &Lease, config: &NetworkConfig) -> anyhow::Result<VxlanNetwork> {
        log::info!(
            "vxlan: VNI {} port {} GBP {} learning {} DirectRouting {}",
            self.cfg.vni,
            self.cfg.effective_port(),
            self.cfg.gbp,
            self.cfg.learning,
            self.cfg.direct_routing,
        );
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        let v4 = match self.ipv4 {
            true => {
                log::info!(
                    "vxlan: IPv4 device {} MTU {} VTEP MAC {}",
                    self.spec.name,
                    self.mtu,
                    self.mac
                );
                let mut dev =
                    VxlanDevice::new(self.spec.clone(), IpAddr::V4(own.subnet().network()));
                dev.ensure(&handle).await?;
                let peers = Peers::new(
                    self.cfg.direct_routing,
                    self.ext.index,
                    Some(config.network),
                );
                Some(V4Side { dev, peers })
            }
            false => None,
        };
        let v6 = match self.ipv6 {
            true => Some(self.start_v6(&handle, own, config).await?),
            false => None,
        };
        Ok(VxlanNetwork { handle, v4, v6 })
    }
}

impl BackendNetwork for VxlanNetwork {
    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()> {
        let handle = &self.handle;
        let mut first_error = None;
        for ev in events {
            if let Some(v4) = self.v4.as_mut() {
                if let Err(e) = v4.peers.apply(handle, v4.dev.index(), ev).await {
                    log::warn!("vxlan: {e}");
                    first_error.get_or_insert(e);
                }
            }
            // IPv6 trouble with a peer is logged and repaired by resync; it never fails the
            // batch (the IPv4 side reports its own).
            if let Some(v6) = self.v6.as_mut() {
                if let Err(e) = v6.peers.apply(handle, v6.dev.index(), ev).await {
                    log::warn!("vxlan: {e}");
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(anyhow::anyhow!("vxlan: {e}")))
    }

    /// Recreate the device if it went away, re-apply every peer's entries, drop stale ones
    /// (resync runs once the first listing is applied: `peers` is the full view).
    async fn resync(&mut self, repaired: &mut Repairs) -> anyhow::Result<()> {
        let v4 = self.resync_v4(repaired).await;
        self.resync_v6(repaired).await;
        v4
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
            iface_v6_addr: None,
            ext_v6_addr: None,
        }
    }

    #[test]
    fn mtu_is_the_interfaces_minus_the_encapsulation_or_the_option() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), false).unwrap();
        assert_eq!(b.mtu(), 1450);
        let b = VxlanBackend::new(
            &backend_config(r#"{"Type":"vxlan","MTU":1400}"#),
            &ext(),
            false,
        )
        .unwrap();
        assert_eq!(b.mtu(), 1400);
        // With IPv6 pods get the IPv6 device's MTU: its outer header is 20 bytes longer.
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), true).unwrap();
        assert_eq!(b.mtu(), 1430);
    }

    #[test]
    fn lease_json_is_byte_identical_to_upstream() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), false).unwrap();
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
    fn dual_stack_lease_json_is_byte_identical_to_upstream() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), true).unwrap();
        let mut attrs = b.lease_attrs("172.30.0.11".parse().unwrap());
        attrs.public_ipv6 = Some("2001:db8::11".parse().unwrap());
        b.add_ipv6_attrs(&mut attrs);
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":"2001:db8::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:f1:ac:1e:00:0b"},"BackendV6Data":{"VNI":1,"VtepMAC":"0e:f6:20:01:0d:a9"}}"#
        );
        // Upstream's (Go json.Marshal of its vxlanLeaseAttrs) read back and written unchanged.
        let upstream = r#"{"PublicIP":"172.30.0.11","PublicIPv6":"fc00::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"},"BackendV6Data":{"VNI":1,"VtepMAC":"5a:3b:1c:9e:01:77"}}"#;
        let attrs = LeaseAttrs::from_json("k", upstream.as_bytes()).unwrap();
        assert_eq!(attrs.to_json(), upstream);
        assert_eq!(
            VxlanLeaseData::peer_mac_v6(&attrs).unwrap(),
            Mac([0x5a, 0x3b, 0x1c, 0x9e, 0x01, 0x77])
        );
        // Without EnableIPv6 nothing is added, as upstream (BackendV6Data omitted).
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), false).unwrap();
        let mut attrs = b.lease_attrs("172.30.0.11".parse().unwrap());
        b.add_ipv6_attrs(&mut attrs);
        assert!(attrs.backend_v6_data.is_none());
    }

    /// Upstream's vxlan lease for EnableIPv4 false: PublicIP 0.0.0.0, no BackendData.
    #[test]
    fn ipv6_only_lease_json_is_upstreams_and_the_mtu_the_v6_devices() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext(), true)
            .unwrap()
            .without_ipv4();
        let mut attrs = b.lease_attrs(Ipv4Addr::UNSPECIFIED);
        attrs.public_ipv6 = Some("2001:db8::11".parse().unwrap());
        b.add_ipv6_attrs(&mut attrs);
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::11","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0e:f6:20:01:0d:a9"}}"#
        );
        assert_eq!(b.mtu(), 1430);
    }

    #[test]
    fn v6_vtep_mac_is_stable_local_unicast_and_unique_within_a_prefix() {
        let ip = |s: &str| -> Ipv6Addr { s.parse().unwrap() };
        let a = Mac::for_public_ipv6(ip("2001:db8::10"));
        assert_eq!(a, Mac::for_public_ipv6(ip("2001:db8::10")));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered, unicast");
        assert_ne!(a, Mac::for_public_ipv6(ip("2001:db8::11")));
        assert_ne!(a, Mac::for_public_ipv6(ip("2001:db8::1:10")));
        assert_ne!(a, Mac::for_public_ip("192.0.2.10".parse().unwrap()));
    }

    #[test]
    fn peers_without_v6_data_have_no_v6_mac() {
        for v4_only in [
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}}"#,
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":"fc00::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"},"BackendV6Data":{"VNI":1}}"#,
        ] {
            let attrs = LeaseAttrs::from_json("k", v4_only.as_bytes()).unwrap();
            assert!(VxlanLeaseData::peer_mac_v6(&attrs).is_err(), "{v4_only}");
        }
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
