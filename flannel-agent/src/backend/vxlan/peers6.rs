//! The IPv6 side of each dual-stack (or IPv6-only) peer on `flannel-v6.<VNI>`, as upstream:
//! neighbour (peer's v6 VTEP address, the network address of its IPv6 subnet -> its v6 VTEP
//! MAC), FDB entry (that MAC -> its PublicIPv6) and `<v6 subnet> via <v6 VTEP> onlink`; with
//! DirectRouting a plain route via its PublicIPv6 when it shares our L2 network. Peers without
//! IPv6 get nothing here; their IPv4 side is unaffected.

use std::net::Ipv6Addr;

use rtnetlink::Handle;

use super::peers::{FamilyPeers, PeerPath};
use super::{LeaseDataError, VxlanError, VxlanLeaseData, BACKEND_TYPE};
use crate::backend::route::{self, Route};
use crate::lease::Lease;
use crate::subnet::PeerEvent;

/// Why a vxlan peer has no IPv6 path (a v4-only peer is normal in a dual-stack cluster).
#[derive(Debug, thiserror::Error)]
enum NoIpv6 {
    #[error("no IPv6 subnet in its key")]
    NoSubnet,
    #[error("no PublicIPv6")]
    NoPublicIpv6,
    #[error(transparent)]
    Data(#[from] LeaseDataError),
}

/// The IPv6 peers, keyed by their IPv6 subnet.
pub type Peers6 = FamilyPeers<Ipv6Addr>;

impl Peers6 {
    async fn path_for(&self, handle: &Handle, lease: &Lease) -> Result<PeerPath<Ipv6Addr>, NoIpv6> {
        let subnet = lease.key.ipv6.ok_or(NoIpv6::NoSubnet)?;
        let public_ipv6 = lease.attrs.public_ipv6.ok_or(NoIpv6::NoPublicIpv6)?;
        let mac = VxlanLeaseData::peer_mac_v6(&lease.attrs)?;
        if self.direct_routing {
            if let Ok((None, Some(oif))) = route::lookup(handle, public_ipv6).await {
                return Ok(PeerPath::Direct(Route {
                    dst: subnet,
                    gateway: public_ipv6,
                    oif,
                    onlink: false,
                }));
            }
        }
        Ok(PeerPath::Vxlan {
            mac,
            public_ip: public_ipv6,
        })
    }

    /// Follow one peer event on device `dev`.
    pub async fn apply(
        &mut self,
        handle: &Handle,
        dev: u32,
        ev: &PeerEvent,
    ) -> Result<(), VxlanError> {
        let (lease, added) = match ev {
            PeerEvent::Added(l) => (l, l.attrs.backend_type == BACKEND_TYPE),
            PeerEvent::Removed(l) => (l, false),
        };
        let wanted = if added {
            match self.path_for(handle, lease).await {
                Ok(p) => Some(p),
                Err(NoIpv6::Data(e)) => {
                    log::warn!("vxlan: no IPv6 path to peer {}: {e}", lease.key);
                    None
                }
                Err(why) => {
                    log::info!("vxlan: peer {} is IPv4 only ({why})", lease.key);
                    None
                }
            }
        } else {
            None
        };
        let Some(subnet) = lease.key.ipv6 else {
            return Ok(());
        };
        self.set_path(handle, dev, subnet, wanted).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::vxlan::Mac;
    use ipnetwork::Ipv6Network;

    const EXT: u32 = 2;

    fn net(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }

    fn route(dst: &str, gateway: &str, oif: u32) -> Route<Ipv6Addr> {
        Route {
            dst: net(dst),
            gateway: gateway.parse().unwrap(),
            oif,
            onlink: false,
        }
    }

    /// DirectRouting in fd00:10:244::/48 with one direct peer, fd00:10:244:1::/64 via
    /// 2001:db8::11, and one vxlan peer, fd00:10:244:2::/64.
    fn peers(direct_routing: bool, network: Option<&str>) -> Peers6 {
        let mut p = Peers6::new(direct_routing, EXT, network.map(net));
        let direct = route("fd00:10:244:1::/64", "2001:db8::11", EXT);
        p.paths.insert(direct.dst, PeerPath::Direct(direct));
        p.paths.insert(
            net("fd00:10:244:2::/64"),
            PeerPath::Vxlan {
                mac: Mac([0x0e, 0, 0, 0, 0, 2]),
                public_ip: "2001:db8:1::12".parse().unwrap(),
            },
        );
        p
    }

    #[test]
    fn a_direct_route_into_the_network_no_direct_peer_owns_is_stale() {
        let p = peers(true, Some("fd00:10:244::/48"));
        // Left for a peer that is gone.
        assert!(p.is_stale_direct_route(&route("fd00:10:244:ff::/64", "2001:db8::99", EXT)));
        // A current direct peer's subnet via another gateway (it moved).
        assert!(p.is_stale_direct_route(&route("fd00:10:244:1::/64", "2001:db8::99", EXT)));
        // A vxlan peer's subnet routed directly (it left our L2 network).
        assert!(p.is_stale_direct_route(&route("fd00:10:244:2::/64", "2001:db8::12", EXT)));
    }

    #[test]
    fn routes_flannel_does_not_own_and_current_direct_routes_stay() {
        let p = peers(true, Some("fd00:10:244::/48"));
        for kept in [
            route("fd00:10:244:1::/64", "2001:db8::11", EXT),
            // Outside the Network, or covering more than it (same first address).
            route("2001:db8:99::/64", "2001:db8::11", EXT),
            route("fd00:10:244::/47", "2001:db8::11", EXT),
            // Another interface.
            route("fd00:10:244:ff::/64", "2001:db8::99", EXT + 1),
        ] {
            assert!(!p.is_stale_direct_route(&kept), "{kept:?}");
        }
        // Without DirectRouting (or an IPv6 Network) no direct route is ours to remove.
        let stale = route("fd00:10:244:ff::/64", "2001:db8::99", EXT);
        assert!(!peers(false, Some("fd00:10:244::/48")).is_stale_direct_route(&stale));
        assert!(!peers(true, None).is_stale_direct_route(&stale));
    }
}
