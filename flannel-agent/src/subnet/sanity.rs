//! Leases that cannot be right for this node (a subnet outside the Network, our own public IP
//! under another subnet) are left out of the peer view, with one warning per key.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::Ipv4Network;

use crate::lease::{Lease, SubnetKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseProblem {
    #[error("subnet {subnet} lies outside the network {network}")]
    OutsideNetwork {
        subnet: Ipv4Network,
        network: Ipv4Network,
    },
    #[error("it names our own public IP {0} under another subnet (traffic would loop to us)")]
    OurPublicIp(IpAddr),
}

/// Checks peer leases against the network config and our own public IP.
#[derive(Debug, Clone)]
pub struct LeaseSanity {
    network: Ipv4Network,
    /// Our `LeaseAttrs::owner` (PublicIP, or PublicIPv6 in an IPv6-only network).
    own_ip: IpAddr,
    /// Keys we already warned about, with the problem we warned of.
    warned: BTreeMap<SubnetKey, LeaseProblem>,
}

impl LeaseSanity {
    pub fn new(network: Ipv4Network, own_ip: impl Into<IpAddr>) -> Self {
        let own_ip = own_ip.into();
        LeaseSanity {
            network,
            own_ip,
            warned: BTreeMap::new(),
        }
    }

    /// What is wrong with `lease` as a peer's lease, if anything.
    pub fn problem(&self, lease: &Lease) -> Option<LeaseProblem> {
        let subnet = lease.subnet();
        if subnet.prefix() < self.network.prefix() || !self.network.contains(subnet.network()) {
            return Some(LeaseProblem::OutsideNetwork {
                subnet,
                network: self.network,
            });
        }
        if lease.attrs.owner() == self.own_ip {
            return Some(LeaseProblem::OurPublicIp(self.own_ip));
        }
        None
    }

    /// Whether a peer lease may be used; warns (once per key and problem) when not.
    pub fn admit(&mut self, key_name: &str, lease: &Lease) -> bool {
        match self.problem(lease) {
            None => {
                self.warned.remove(&lease.key);
                true
            }
            Some(p) => {
                if self.warned.get(&lease.key) != Some(&p) {
                    log::warn!("ignoring lease {key_name}: {p}");
                    self.warned.insert(lease.key, p);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use std::net::Ipv4Addr;

    fn lease(subnet: &str, ip: [u8; 4]) -> Lease {
        let subnet: Ipv4Network = subnet.parse().unwrap();
        Lease {
            key: SubnetKey::new(subnet),
            attrs: LeaseAttrs::new(Ipv4Addr::from(ip)),
            etcd_lease: 0,
            mod_revision: 0,
        }
    }

    #[test]
    fn rejects_outside_network_and_our_own_ip_and_warns_once() {
        let mut s = LeaseSanity::new(
            "10.244.0.0/16".parse().unwrap(),
            Ipv4Addr::new(192, 0, 2, 11),
        );
        assert!(s.admit("a", &lease("10.244.3.0/24", [192, 0, 2, 12])));
        let outside = lease("10.99.0.0/24", [192, 0, 2, 12]);
        assert!(matches!(
            s.problem(&outside),
            Some(LeaseProblem::OutsideNetwork { .. })
        ));
        assert!(!s.admit("b", &outside));
        assert!(s.warned.contains_key(&outside.key));
        let wide = lease("10.0.0.0/8", [192, 0, 2, 12]);
        assert!(s.problem(&wide).is_some());
        let ours = lease("10.244.9.0/24", [192, 0, 2, 11]);
        assert_eq!(
            s.problem(&ours),
            Some(LeaseProblem::OurPublicIp(
                Ipv4Addr::new(192, 0, 2, 11).into()
            ))
        );
        assert!(!s.admit("c", &ours));
        assert!(!s.admit("c", &ours));
        assert_eq!(s.warned.len(), 2);
    }

    /// IPv6-only: every lease has PublicIP 0.0.0.0; peers are told apart by PublicIPv6.
    #[test]
    fn ipv6_only_peers_are_not_mistaken_for_us() {
        let v6 = |ip6: &str| Lease {
            key: SubnetKey::ipv6_only("fd00:10:244:1::/64".parse().unwrap()),
            attrs: LeaseAttrs {
                public_ipv6: Some(ip6.parse().unwrap()),
                ..LeaseAttrs::new(Ipv4Addr::UNSPECIFIED)
            },
            etcd_lease: 0,
            mod_revision: 0,
        };
        let me: IpAddr = "2001:db8::10".parse().unwrap();
        let s = LeaseSanity::new("0.0.0.0/0".parse().unwrap(), me);
        assert_eq!(s.problem(&v6("2001:db8::11")), None);
        assert_eq!(
            s.problem(&v6("2001:db8::10")),
            Some(LeaseProblem::OurPublicIp(me))
        );
    }
}
