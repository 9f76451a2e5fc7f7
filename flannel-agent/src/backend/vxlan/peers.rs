//! The IPv4 side of each peer on `flannel.<VNI>`: how its subnet is reached (through the
//! device, or with DirectRouting a plain route when it shares our L2 network), installing and
//! removing its neighbour, FDB entry and route in upstream's order, and pruning entries that no
//! current peer owns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;

use super::neigh::{self, Table};
use super::{LeaseDataError, Mac, VxlanError, VxlanLeaseData, BACKEND_TYPE};
use crate::backend::route::{self, Route};
use crate::lease::Lease;
use crate::subnet::PeerEvent;

/// How one peer subnet is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PeerPath {
    /// Through the VXLAN device: neighbour, FDB and onlink route.
    Vxlan { mac: Mac, public_ip: Ipv4Addr },
    /// DirectRouting to a peer on our L2 network: a plain route via its public IP.
    Direct(Route),
}

/// The IPv4 peers and what is installed for each.
pub struct Peers {
    direct_routing: bool,
    /// The external interface (DirectRouting routes go out through it).
    ext_index: u32,
    /// The Network (for recognising stale DirectRouting routes on the external interface).
    network: Ipv4Network,
    paths: BTreeMap<Ipv4Network, PeerPath>,
}

impl Peers {
    pub fn new(direct_routing: bool, ext_index: u32, network: Ipv4Network) -> Self {
        Peers {
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

    async fn path_for(&self, handle: &Handle, lease: &Lease) -> Result<PeerPath, LeaseDataError> {
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

    fn vxlan_route(dev: u32, subnet: Ipv4Network) -> Route {
        Route {
            dst: subnet,
            gateway: subnet.network(),
            oif: dev,
            onlink: true,
        }
    }

    /// Upstream's order: neighbour, FDB, route (the route is usable once it exists).
    async fn install(
        handle: &Handle,
        dev: u32,
        subnet: Ipv4Network,
        path: &PeerPath,
    ) -> Result<(), rtnetlink::Error> {
        match path {
            PeerPath::Direct(r) => r.replace(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                neigh::replace_neighbour(handle, dev, IpAddr::V4(subnet.network()), *mac).await?;
                neigh::replace_fdb(handle, dev, *mac, IpAddr::V4(*public_ip)).await?;
                Self::vxlan_route(dev, subnet).replace(handle).await
            }
        }
    }

    /// Undo `install`: route first, so nothing is sent through half-removed entries.
    async fn uninstall(
        handle: &Handle,
        dev: u32,
        subnet: Ipv4Network,
        path: &PeerPath,
    ) -> Result<(), rtnetlink::Error> {
        match path {
            PeerPath::Direct(r) => r.delete(handle).await,
            PeerPath::Vxlan { mac, public_ip } => {
                Self::vxlan_route(dev, subnet).delete(handle).await?;
                neigh::delete_fdb(handle, dev, *mac, IpAddr::V4(*public_ip)).await?;
                neigh::delete_neighbour(handle, dev, IpAddr::V4(subnet.network())).await
            }
        }
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
        if let Some(old) = self.paths.get(&subnet).cloned() {
            if Some(&old) == wanted.as_ref() {
                return Ok(());
            }
            self.paths.remove(&subnet);
            Self::uninstall(handle, dev, subnet, &old)
                .await
                .map_err(|source| VxlanError::Netlink {
                    what: format!("removing peer {subnet}"),
                    source,
                })?;
        }
        if let Some(path) = wanted {
            self.paths.insert(subnet, path.clone());
            Self::install(handle, dev, subnet, &path)
                .await
                .map_err(|source| VxlanError::Netlink {
                    what: format!("adding peer {subnet}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Install every peer's entries again (a recreated device, or entries deleted by hand).
    pub async fn restore(&self, handle: &Handle, dev: u32) {
        for (subnet, path) in &self.paths {
            if let Err(e) = Self::install(handle, dev, *subnet, path).await {
                log::warn!("vxlan: restoring peer {subnet}: {e}");
            }
        }
    }

    /// A route into the Network via the external interface that no DirectRouting peer owns
    /// (a peer that left, or moved off our L2 network, while we were not looking).
    fn is_stale_direct_route(&self, r: &Route) -> bool {
        let network = self.network;
        self.direct_routing
            && r.oif == self.ext_index
            && network.contains(r.dst.network())
            && r.dst.prefix() >= network.prefix()
            && !matches!(self.paths.get(&r.dst), Some(PeerPath::Direct(d)) if d.gateway == r.gateway)
    }

    /// Remove neighbours, FDB entries and routes on device `dev` that no current peer owns
    /// (left by an earlier run while peers went away).
    pub async fn prune(&self, handle: &Handle, dev: u32) -> Result<(), rtnetlink::Error> {
        let mut vxlan_peers: BTreeMap<Ipv4Network, (Mac, Ipv4Addr)> = BTreeMap::new();
        for (subnet, path) in &self.paths {
            if let PeerPath::Vxlan { mac, public_ip } = path {
                vxlan_peers.insert(*subnet, (*mac, *public_ip));
            }
        }
        for r in route::list_gateway_routes(handle).await? {
            if r.oif == dev && !vxlan_peers.contains_key(&r.dst) {
                log::info!("removing stale route {} via {}", r.dst, r.gateway);
                r.delete(handle).await?;
            } else if self.is_stale_direct_route(&r) {
                log::info!("removing stale direct route {} via {}", r.dst, r.gateway);
                r.delete(handle).await?;
            }
        }
        let neigh_ips: Vec<IpAddr> = vxlan_peers
            .keys()
            .map(|s| IpAddr::V4(s.network()))
            .collect();
        let fdb: Vec<(Mac, IpAddr)> = vxlan_peers
            .values()
            .map(|(m, ip)| (*m, IpAddr::V4(*ip)))
            .collect();
        prune_entries(handle, dev, AddressFamily::Inet, &neigh_ips, &fdb).await
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
