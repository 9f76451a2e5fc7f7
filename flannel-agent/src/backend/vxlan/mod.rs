//! The `vxlan` backend: a kernel VXLAN device `flannel.<VNI>` and, per peer, a permanent
//! neighbour entry, an FDB entry and an onlink route, as upstream installs them.
//!
//! Unlike upstream, the VTEP MAC is derived from the public IP, so it stays the same across
//! restarts and peers never keep stale neighbour/FDB entries for us (upstream issue #1795).
//!
//! Modules: `config` (options), `device` (the kernel device), `neigh` (neighbour and FDB
//! entries), `peers` (what each IPv4 peer gets).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use anyhow::Context;
use rtnetlink::Handle;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Backend, BackendError};
use crate::config::{BackendConfig, NetworkConfig};
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs};
use crate::subnet::PeerEvent;

pub mod config;
pub mod device;
pub mod neigh;
pub mod peers;

pub use config::{VxlanConfig, ENCAP_OVERHEAD, KERNEL_DEFAULT_PORT};
use device::{DeviceSpec, VxlanDevice};
use peers::Peers;

pub const BACKEND_TYPE: &str = "vxlan";

/// What went wrong setting up the device or a peer's entries.
#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("vxlan backend not started")]
    NotStarted,
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
}

pub struct VxlanBackend {
    cfg: VxlanConfig,
    mac: Mac,
    mtu: u32,
    handle: Option<Handle>,
    dev: VxlanDevice,
    peers: Peers,
    /// Peer events seen at least once: only then may resync drop entries nobody owns.
    peers_known: bool,
}

impl VxlanBackend {
    pub fn new(cfg: &BackendConfig, ext: &ExternalInterface) -> Result<Self, BackendError> {
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
            mac,
            mtu,
            handle: None,
            dev: VxlanDevice::new(spec, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            peers: Peers::new(cfg.direct_routing, ext.index),
            peers_known: false,
            cfg,
        })
    }

    fn handle(&self) -> Result<Handle, VxlanError> {
        self.handle.clone().ok_or(VxlanError::NotStarted)
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
        attrs.backend_data = data.raw();
        attrs
    }

    fn mtu(&self) -> u32 {
        self.mtu
    }

    async fn start(&mut self, own: &Lease, config: &NetworkConfig) -> anyhow::Result<()> {
        self.peers.set_network(config.network);
        log::info!(
            "vxlan: VNI {} port {} GBP {} learning {} DirectRouting {} MTU {} VTEP MAC {}",
            self.cfg.vni,
            self.cfg.effective_port(),
            self.cfg.gbp,
            self.cfg.learning,
            self.cfg.direct_routing,
            self.mtu,
            self.mac
        );
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        self.dev = VxlanDevice::new(self.dev.spec.clone(), IpAddr::V4(own.subnet().network()));
        self.dev.ensure(&handle).await?;
        self.handle = Some(handle);
        Ok(())
    }

    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()> {
        let handle = self.handle()?;
        self.peers_known = true;
        let mut first_error = None;
        for ev in events {
            if let Err(e) = self.peers.apply(&handle, self.dev.index(), ev).await {
                log::warn!("vxlan: {e}");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(anyhow::anyhow!("vxlan: {e}")))
    }

    /// Recreate the device if it went away, re-apply every peer's entries, drop stale ones.
    async fn resync(&mut self) -> anyhow::Result<()> {
        let handle = self.handle()?;
        if self.dev.ensure(&handle).await? {
            log::info!(
                "vxlan: device {} (re)created: reinstalling {} peers",
                self.dev.name(),
                self.peers.len()
            );
        }
        self.peers.restore(&handle, self.dev.index()).await;
        if self.peers_known {
            self.peers.prune(&handle, self.dev.index()).await?;
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
    fn mtu_is_the_interfaces_minus_the_encapsulation_or_the_option() {
        let b = VxlanBackend::new(&backend_config(r#"{"Type":"vxlan"}"#), &ext()).unwrap();
        assert_eq!(b.mtu(), 1450);
        let b =
            VxlanBackend::new(&backend_config(r#"{"Type":"vxlan","MTU":1400}"#), &ext()).unwrap();
        assert_eq!(b.mtu(), 1400);
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
