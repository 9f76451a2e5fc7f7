//! vxlan peers of either family (`FamilyPeers`: how each subnet is reached, through the
//! device or with DirectRouting a plain route when the peer shares our L2 network; installing
//! and removing its neighbour, FDB entry and route in upstream's order; pruning entries that no
//! current peer owns), and the IPv4 side of each peer on `flannel.<VNI>` (`Peers`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;

use super::neigh::{self, Table};
use super::{LeaseDataError, Mac, VxlanError, VxlanLeaseData, BACKEND_TYPE};
use crate::backend::route::{self, Route, RouteFamily};
use crate::lease::Lease;
use crate::subnet::PeerEvent;

/// How one peer subnet is reached (`A`: the family of the subnet and the peer's address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PeerPath<A: RouteFamily> {
    /// Through the VXLAN device: neighbour, FDB and onlink route.
    Vxlan { mac: Mac, public_ip: A },
    /// DirectRouting to a peer on our L2 network: a plain route via its public IP.
    Direct(Route<A>),
}

/// A family of vxlan peers: what their messages call them, their neighbours' family.
pub trait PeerFamily: RouteFamily + Into<IpAddr> {
    const PEER: &'static str;
    const ROUTE: &'static str;
    const NEIGH_FAMILY: AddressFamily;
}

impl PeerFamily for Ipv4Addr {
    const PEER: &'static str = "peer";
    const ROUTE: &'static str = "route";
    const NEIGH_FAMILY: AddressFamily = AddressFamily::Inet;
}

impl PeerFamily for Ipv6Addr {
    const PEER: &'static str = "IPv6 peer";
    const ROUTE: &'static str = "IPv6 route";
    const NEIGH_FAMILY: AddressFamily = AddressFamily::Inet6;
}

impl<A: PeerFamily> PeerPath<A> {
    /// `<subnet> via <its network address> dev <dev> onlink`: the VTEP neighbour is the way.
    fn vxlan_route(dev: u32, subnet: A::Network) -> Route<A> {
        Route {
            dst: subnet,
            gateway: A::split(subnet).0,
            oif: dev,
            onlink: true,
        }
    }

    /// Upstream's order: neighbour, FDB, route (the route is usable once it exists).
    async fn install(
        &self,
        handle: &Handle,
        dev: u32,
        subnet: A::Network,
    ) -> Result<(), rtnetlink::Error> {
        match self {
            PeerPath::Direct(r) => r.replace(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                let vtep = A::split(subnet).0.into();
                neigh::replace_neighbour(handle, dev, vtep, *mac).await?;
                neigh::replace_fdb(handle, dev, *mac, (*public_ip).into()).await?;
                Self::vxlan_route(dev, subnet).replace(handle).await
            }
        }
    }

    /// Undo `install`: route first, so nothing is sent through half-removed entries.
    async fn uninstall(
        &self,
        handle: &Handle,
        dev: u32,
        subnet: A::Network,
    ) -> Result<(), rtnetlink::Error> {
        match self {
            PeerPath::Direct(r) => r.delete(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                Self::vxlan_route(dev, subnet).delete(handle).await?;
                neigh::delete_fdb(handle, dev, *mac, (*public_ip).into()).await?;
                neigh::delete_neighbour(handle, dev, A::split(subnet).0.into()).await
            }
        }
    }
}

/// One family's peers on one device and what is installed for each, keyed by their subnet
/// of that family.
pub struct FamilyPeers<A: PeerFamily> {
    pub(super) direct_routing: bool,
    /// The external interface (DirectRouting routes go out through it).
    pub(super) ext_index: u32,
    /// The Network of this family (for recognising stale DirectRouting routes on the
    /// external interface); an IPv6 one only with EnableIPv6.
    pub(super) network: Option<A::Network>,
    pub(super) paths: BTreeMap<A::Network, PeerPath<A>>,
}

impl<A: PeerFamily> FamilyPeers<A> {
    pub fn new(direct_routing: bool, ext_index: u32, network: Option<A::Network>) -> Self {
        FamilyPeers {
            direct_routing,
            ext_index,
            network,
            paths: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Make what `dev` has for `subnet` the `wanted` path (`None`: nothing), replacing what
    /// is installed; a path that stays the same is left alone.
    pub(super) async fn set_path(
        &mut self,
        handle: &Handle,
        dev: u32,
        subnet: A::Network,
        wanted: Option<PeerPath<A>>,
    ) -> Result<(), VxlanError> {
        if let Some(old) = self.paths.get(&subnet).cloned() {
            if Some(&old) == wanted.as_ref() {
                return Ok(());
            }
            self.paths.remove(&subnet);
            old.uninstall(handle, dev, subnet)
                .await
                .map_err(|source| VxlanError::Netlink {
                    what: format!("removing {} {subnet}", A::PEER),
                    source,
                })?;
        }
        if let Some(path) = wanted {
            self.paths.insert(subnet, path.clone());
            path.install(handle, dev, subnet)
                .await
                .map_err(|source| VxlanError::Netlink {
                    what: format!("adding {} {subnet}", A::PEER),
                    source,
                })?;
        }
        Ok(())
    }

    /// Install every peer's entries again (a recreated device, or entries deleted by hand).
    pub async fn restore(&self, handle: &Handle, dev: u32) {
        for (subnet, path) in &self.paths {
            if let Err(e) = path.install(handle, dev, *subnet).await {
                log::warn!("vxlan: restoring {} {subnet}: {e}", A::PEER);
            }
        }
    }

    /// A route into the Network via the external interface that no DirectRouting peer owns
    /// (a peer that left, or moved off our L2 network, while we were not looking).
    pub(super) fn is_stale_direct_route(&self, r: &Route<A>) -> bool {
        let Some(network) = self.network.filter(|_| self.direct_routing) else {
            return false;
        };
        let (dst, dst_prefix) = A::split(r.dst);
        r.oif == self.ext_index
            && A::contains(network, dst)
            && dst_prefix >= A::split(network).1
            && !matches!(self.paths.get(&r.dst), Some(PeerPath::Direct(d)) if d.gateway == r.gateway)
    }

    /// Remove neighbours, FDB entries and routes on device `dev` that no current peer owns
    /// (left by an earlier run while peers went away).
    pub async fn prune(&self, handle: &Handle, dev: u32) -> Result<(), rtnetlink::Error> {
        let mut neigh_ips = Vec::new();
        let mut fdb = Vec::new();
        for (subnet, path) in &self.paths {
            if let PeerPath::Vxlan { mac, public_ip } = path {
                neigh_ips.push(A::split(*subnet).0.into());
                fdb.push((*mac, (*public_ip).into()));
            }
        }
        for r in route::list_gateway_routes::<A>(handle).await? {
            let owned_vxlan = matches!(self.paths.get(&r.dst), Some(PeerPath::Vxlan { .. }));
            if r.oif == dev && !owned_vxlan {
                log::info!("removing stale {} {} via {}", A::ROUTE, r.dst, r.gateway);
                r.delete(handle).await?;
            } else if self.is_stale_direct_route(&r) {
                log::info!(
                    "removing stale direct {} {} via {}",
                    A::ROUTE,
                    r.dst,
                    r.gateway
                );
                r.delete(handle).await?;
            }
        }
        prune_entries(handle, dev, A::NEIGH_FAMILY, &neigh_ips, &fdb).await
    }
}

/// The IPv4 peers.
pub type Peers = FamilyPeers<Ipv4Addr>;

impl Peers {
    async fn path_for(
        &self,
        handle: &Handle,
        lease: &Lease,
    ) -> Result<PeerPath<Ipv4Addr>, LeaseDataError> {
        let mac = VxlanLeaseData::peer_mac(&lease.attrs)?;
        let public_ip = lease.attrs.public_ip;
        if self.direct_routing {
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

    /// Follow one peer event on device `dev`.
    pub async fn apply(
        &mut self,
        handle: &Handle,
        dev: u32,
        ev: &PeerEvent,
    ) -> Result<(), VxlanError> {
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
        self.set_path(handle, dev, subnet, wanted).await
    }
}

/// Remove the permanent neighbours of `family` and the remote FDB entries of that family on
/// `dev` that are not in `neigh_ips` / `fdb`.
pub async fn prune_entries(
    handle: &Handle,
    dev: u32,
    family: AddressFamily,
    neigh_ips: &[IpAddr],
    fdb: &[(Mac, IpAddr)],
) -> Result<(), rtnetlink::Error> {
    let v4 = family == AddressFamily::Inet;
    for table in [Table::Neighbours(family), Table::Fdb] {
        let mut stale = Vec::new();
        for e in neigh::permanent_entries(handle, dev, table).await? {
            let Some(ip) = e.ip.filter(|ip| ip.is_ipv4() == v4) else {
                continue;
            };
            let owned = match table {
                // FDB: only remote entries (MAC and destination), as we add them.
                Table::Fdb => match e.mac {
                    Some(m) => fdb.contains(&(m, ip)),
                    None => true,
                },
                Table::Neighbours(_) => neigh_ips.contains(&ip),
            };
            if !owned {
                stale.push(e.msg);
            }
        }
        for msg in stale {
            log::info!(
                "removing stale {} entry {:?}",
                if table == Table::Fdb {
                    "FDB"
                } else {
                    "neighbour"
                },
                msg.attributes
            );
            neigh::delete(handle, msg).await?;
        }
    }
    Ok(())
}
