//! Subnet leases as flannel stores them in etcd: key `<prefix>/subnets/<ip>-<len>` and a JSON
//! value whose bytes must match upstream's (field order, `"PublicIPv6":null`, omitted empties).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("subnet key {0:?} is not of the form <a.b.c.d>-<len>[&<ipv6>-<len>]")]
    BadKey(String),
    #[error("lease value of {key} is not valid lease JSON: {source}")]
    BadValue {
        key: String,
        source: serde_json::Error,
    },
}

/// The JSON value of a lease. Field order is upstream's (Go struct order).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Box<RawValue>>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map(|r| r.get().to_owned());
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}
impl Eq for LeaseAttrs {}

impl LeaseAttrs {
    pub fn new(public_ip: Ipv4Addr) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        }
    }

    /// The node holding the lease: its PublicIP, or in an IPv6-only network (PublicIP
    /// 0.0.0.0 on every node) its PublicIPv6. Upstream's etcd manager compares PublicIP
    /// alone, so there its IPv6-only nodes take each other's leases; we do not.
    pub fn owner(&self) -> IpAddr {
        match self.public_ipv6 {
            Some(v6) if self.public_ip.is_unspecified() => IpAddr::V6(v6),
            _ => IpAddr::V4(self.public_ip),
        }
    }

    /// The bytes stored in etcd.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, IPs and already-valid raw JSON cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(value).map_err(|source| LeaseError::BadValue {
            key: key.to_owned(),
            source,
        })
    }
}

/// The subnet(s) a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetKey {
    pub ipv4: Ipv4Network,
    pub ipv6: Option<Ipv6Network>,
}

impl SubnetKey {
    pub fn new(ipv4: Ipv4Network) -> Self {
        SubnetKey { ipv4, ipv6: None }
    }

    /// The key of an IPv6-only network (EnableIPv4 false): upstream writes the absent IPv4
    /// subnet as `0.0.0.0-0`.
    pub fn ipv6_only(ipv6: Ipv6Network) -> Self {
        SubnetKey {
            ipv4: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is a valid prefix"),
            ipv6: Some(ipv6),
        }
    }

    /// The subnet for messages: the IPv4 one (`10.244.58.0/24`), or the IPv6 one when the key
    /// has no IPv4 part.
    pub fn subnet_text(&self) -> String {
        match self.ipv6 {
            Some(v6) if self.is_ipv6_only() => v6.to_string(),
            _ => self.ipv4.to_string(),
        }
    }

    /// Whether the key names no IPv4 subnet (`0.0.0.0-0&...`).
    pub fn is_ipv6_only(&self) -> bool {
        self.ipv4.prefix() == 0 && self.ipv6.is_some()
    }

    /// Parse the last path element of a subnet key, e.g. `10.244.58.0-24`.
    pub fn parse(name: &str) -> Result<Self, LeaseError> {
        let bad = || LeaseError::BadKey(name.to_owned());
        let (v4, v6) = match name.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (name, None),
        };
        let (ip, len) = v4.split_once('-').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let ipv4 = Ipv4Network::new(ip, len).map_err(|_| bad())?;
        if ipv4.network() != ip {
            return Err(bad());
        }
        let ipv6 = match v6 {
            None => None,
            Some(v6) => {
                let (ip, len) = v6.rsplit_once('-').ok_or_else(bad)?;
                let ip: Ipv6Addr = ip.parse().map_err(|_| bad())?;
                let len: u8 = len.parse().map_err(|_| bad())?;
                Some(Ipv6Network::new(ip, len).map_err(|_| bad())?)
            }
        };
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.network(), self.ipv4.prefix())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix())?;
        }
        Ok(())
    }
}

/// A subnet lease as seen in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    /// etcd lease ID holding the key; 0 means no TTL: a reservation.
    pub etcd_lease: i64,
    /// etcd revision of the key's last change (for compare-and-swap).
    pub mod_revision: i64,
}

impl Lease {
    pub fn subnet(&self) -> Ipv4Network {
        self.key.ipv4
    }

    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }

    /// Same owner and content (ignores the revision, which changes on every renewal put).
    pub fn same_content(&self, other: &Lease) -> bool {
        self.key == other.key && self.attrs == other.attrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_lease_json_is_byte_identical_to_upstream() {
        let attrs = LeaseAttrs::new("172.30.0.12".parse().unwrap());
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"172.30.0.12","PublicIPv6":null}"#
        );
    }

    #[test]
    fn vxlan_and_hostgw_lease_json_round_trip_byte_identical() {
        for upstream in [
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}}"#,
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"host-gw"}"#,
            r#"{"PublicIP":"172.30.0.12","PublicIPv6":null}"#,
        ] {
            let attrs = LeaseAttrs::from_json("k", upstream.as_bytes()).unwrap();
            assert_eq!(attrs.to_json(), upstream);
        }
        let attrs = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}}"#,
        )
        .unwrap();
        assert_eq!(attrs.backend_type, "vxlan");
        assert_eq!(
            attrs.backend_data.unwrap().get(),
            r#"{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}"#
        );
    }

    #[test]
    fn malformed_values_are_errors_naming_the_key() {
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"PublicIP":"1.2.3"}"#,
            b"\xff\xfe",
        ] {
            let err = LeaseAttrs::from_json("/coreos.com/network/subnets/10.0.1.0-24", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("10.0.1.0-24"), "{err}");
        }
    }

    /// Upstream's etcd subnet manager with EnableIPv4 false: `MakeSubnetKey` of an empty
    /// IPv4 subnet is `0.0.0.0-0`, followed by the IPv6 subnet; the lease's PublicIP is the zero
    /// address and only BackendV6Data is set (vxlan's `newSubnetAttrs`).
    #[test]
    fn upstream_ipv6_only_keys_and_lease_json_parse_and_round_trip() {
        let k = SubnetKey::parse("0.0.0.0-0&fd00:10:244:5::-64").unwrap();
        assert_eq!(k.ipv4, "0.0.0.0/0".parse().unwrap());
        assert_eq!(k.ipv6, Some("fd00:10:244:5::/64".parse().unwrap()));
        assert_eq!(k.to_string(), "0.0.0.0-0&fd00:10:244:5::-64");
        let upstream = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::10","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"5a:3b:1c:9e:01:77"}}"#;
        let attrs = LeaseAttrs::from_json("k", upstream.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip, Ipv4Addr::UNSPECIFIED);
        assert!(attrs.backend_data.is_none());
        assert_eq!(attrs.to_json(), upstream);
        assert!(k.is_ipv6_only());
        assert_eq!(SubnetKey::ipv6_only(k.ipv6.unwrap()), k);
        assert!(!SubnetKey::parse("10.244.58.0-24&fc00:0:0:3a::-64")
            .unwrap()
            .is_ipv6_only());
    }

    #[test]
    fn the_owner_is_the_public_ip_or_in_ipv6_only_leases_the_public_ipv6() {
        let v6_only = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::10","BackendType":"vxlan"}"#,
        )
        .unwrap();
        assert_eq!(v6_only.owner(), "2001:db8::10".parse::<IpAddr>().unwrap());
        let dual = LeaseAttrs::from_json(
            "k",
            br#"{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan"}"#,
        )
        .unwrap();
        assert_eq!(dual.owner(), "192.0.2.10".parse::<IpAddr>().unwrap());
        let other = LeaseAttrs {
            public_ipv6: Some("2001:db8::11".parse().unwrap()),
            ..v6_only.clone()
        };
        assert_ne!(v6_only.owner(), other.owner());
    }

    #[test]
    fn dual_stack_vxlan_lease_json_round_trips_byte_identical() {
        let upstream = r#"{"PublicIP":"172.30.0.11","PublicIPv6":"fc00::11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"},"BackendV6Data":{"VNI":1,"VtepMAC":"5a:3b:1c:9e:01:77"}}"#;
        let attrs = LeaseAttrs::from_json("k", upstream.as_bytes()).unwrap();
        assert_eq!(attrs.to_json(), upstream);
    }

    #[test]
    fn subnet_keys_parse_and_print() {
        let k = SubnetKey::parse("10.244.58.0-24").unwrap();
        assert_eq!(k.ipv4, "10.244.58.0/24".parse().unwrap());
        assert_eq!(k.to_string(), "10.244.58.0-24");
        let k = SubnetKey::parse("10.244.58.0-24&fc00:0:0:3a::-64").unwrap();
        assert_eq!(k.to_string(), "10.244.58.0-24&fc00:0:0:3a::-64");
        for bad in [
            "",
            "10.244.58.0",
            "10.244.58.1-24",
            "10.244.58.0-33",
            "x-24",
            "10.0.0.0-24&zz-64",
        ] {
            assert!(SubnetKey::parse(bad).is_err(), "{bad}");
        }
    }
}
