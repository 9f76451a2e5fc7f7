//! The `host-gw` backend: no encapsulation, one route per peer subnet via the peer's public IP
//! on the external interface (all nodes must share one L2 network).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context};
use ipnetwork::{Ipv4Network, Ipv6Network};
use rtnetlink::Handle;

use super::route::{self, Route};
use super::{Backend, BackendNetwork};
use crate::config::NetworkConfig;
use crate::iface::ExternalInterface;
use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::subnet::PeerEvent;

pub const BACKEND_TYPE: &str = "host-gw";

pub struct HostGwBackend {
    ext: ExternalInterface,
}

impl HostGwBackend {
    pub fn new(ext: &ExternalInterface) -> Self {
        HostGwBackend { ext: ext.clone() }
    }
}

/// host-gw started for our lease: the routes it keeps to each peer.
pub struct HostGwNetwork {
    ext: ExternalInterface,
    network: Ipv4Network,
    handle: Handle,
    /// The route each peer subnet should have.
    routes: BTreeMap<Ipv4Network, Route<Ipv4Addr>>,
    /// Peers whose public IP is not on our link: reported once each, re-checked on resync.
    off_link: BTreeMap<Ipv4Network, Lease>,
    /// With EnableIPv6: the IPv6 route of each peer with IPv6, keyed by its lease key.
    routes6: BTreeMap<SubnetKey, Route<Ipv6Addr>>,
    /// EnableIPv4: false in an IPv6-only network, where the IPv4 side (routes, pruning of
    /// routes into the 0.0.0.0/0 "Network") must not run at all.
    ipv4: bool,
    ipv6: bool,
    /// IPv6Network with EnableIPv6: routes into it that no peer owns are stale.
    network6: Option<Ipv6Network>,
}

impl HostGwNetwork {
    /// Is the peer's public IP directly on our external interface's link (no gateway)?
    async fn on_our_link(&self, handle: &Handle, lease: &Lease) -> bool {
        matches!(
            route::lookup(handle, lease.attrs.public_ip).await,
            Ok((None, Some(oif))) if oif == self.ext.index
        )
    }

    /// `<v6 subnet> via <PublicIPv6> dev <ext>` for a dual-stack peer.
    fn route6_for(&self, lease: &Lease) -> Option<Route<Ipv6Addr>> {
        Some(Route {
            dst: lease.key.ipv6?,
            gateway: lease.attrs.public_ipv6?,
            oif: self.ext.index,
            onlink: false,
        })
    }

    /// Follow one peer event for IPv6 (logged, never failing the IPv4 side).
    async fn apply_v6(&mut self, handle: &Handle, ev: &PeerEvent) {
        if !self.ipv6 {
            return;
        }
        let (lease, added) = match ev {
            PeerEvent::Added(l) => (l, l.attrs.backend_type == BACKEND_TYPE),
            PeerEvent::Removed(l) => (l, false),
        };
        let want = if added { self.route6_for(lease) } else { None };
        let old = self.routes6.remove(&lease.key);
        if let Some(old) = old.filter(|o| Some(*o) != want) {
            if let Err(e) = old.delete(handle).await {
                log::warn!("host-gw: removing IPv6 route {}: {e}", old.dst);
            }
        }
        if let Some(r) = want {
            self.routes6.insert(lease.key, r);
            if let Err(e) = r.replace(handle).await {
                log::warn!("host-gw: IPv6 route {} via {}: {e}", r.dst, r.gateway);
            }
        }
    }

    fn route_for(&self, lease: &Lease) -> Route<Ipv4Addr> {
        Route {
            dst: lease.subnet(),
            gateway: lease.attrs.public_ip,
            oif: self.ext.index,
            onlink: false,
        }
    }
}

/// Refuse a public IP that is not the interface's own: peers could not route to it directly.
pub fn check_public_ip(ext: &ExternalInterface) -> anyhow::Result<()> {
    if ext.ext_addr != ext.iface_addr {
        bail!(
            "host-gw needs the public IP to be the address of interface {} ({}), got {}: \
             host-gw cannot work across NAT; drop --public-ip or use the vxlan backend",
            ext.name,
            ext.iface_addr,
            ext.ext_addr
        );
    }
    Ok(())
}

impl Backend for HostGwBackend {
    type Network = HostGwNetwork;

    fn lease_attrs(&self, public_ip: Ipv4Addr) -> LeaseAttrs {
        let mut attrs = LeaseAttrs::new(public_ip);
        attrs.backend_type = BACKEND_TYPE.into();
        attrs
    }

    fn mtu(&self) -> u32 {
        self.ext.mtu
    }

    async fn start(self, _own: &Lease, config: &NetworkConfig) -> anyhow::Result<HostGwNetwork> {
        if config.enable_ipv4 {
            check_public_ip(&self.ext)?;
        }
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(HostGwNetwork {
            ext: self.ext,
            network: config.network,
            handle,
            routes: BTreeMap::new(),
            off_link: BTreeMap::new(),
            routes6: BTreeMap::new(),
            ipv4: config.enable_ipv4,
            ipv6: config.enable_ipv6,
            network6: config.ipv6_network.filter(|_| config.enable_ipv6),
        })
    }
}

impl BackendNetwork for HostGwNetwork {
    async fn handle_events(&mut self, events: &[PeerEvent]) -> anyhow::Result<()> {
        let handle = self.handle.clone();
        let mut first_error = None;
        for ev in events {
            self.apply_v6(&handle, ev).await;
            if !self.ipv4 {
                continue;
            }
            let result = match ev {
                PeerEvent::Added(lease) if lease.attrs.backend_type != BACKEND_TYPE => {
                    log::warn!(
                        "ignoring peer {} at {}: backend type {:?}, not {BACKEND_TYPE}",
                        lease.subnet(),
                        lease.attrs.public_ip,
                        lease.attrs.backend_type
                    );
                    // A peer that switched backends must not keep our old route.
                    match self.routes.remove(&lease.subnet()) {
                        Some(old) => old.delete(&handle).await,
                        None => Ok(()),
                    }
                }
                PeerEvent::Added(lease) if !self.on_our_link(&handle, lease).await => {
                    // Upstream refuses such a peer too; say so once, not at every resync.
                    let again = self
                        .off_link
                        .insert(lease.subnet(), lease.clone())
                        .is_some_and(|old| old.attrs.public_ip == lease.attrs.public_ip);
                    if !again {
                        log::error!(
                            "host-gw: peer {} at {} is not on our link ({}): no route to it; host-gw needs all hosts on one L2 network (vxlan with DirectRouting handles mixed networks)",
                            lease.subnet(),
                            lease.attrs.public_ip,
                            self.ext.name
                        );
                    }
                    match self.routes.remove(&lease.subnet()) {
                        Some(old) => old.delete(&handle).await,
                        None => Ok(()),
                    }
                }
                PeerEvent::Added(lease) => {
                    self.off_link.remove(&lease.subnet());
                    let route = self.route_for(lease);
                    self.routes.insert(route.dst, route);
                    route.replace(&handle).await
                }
                PeerEvent::Removed(lease) => {
                    self.off_link.remove(&lease.subnet());
                    match self.routes.remove(&lease.subnet()) {
                        Some(old) => old.delete(&handle).await,
                        None => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                let subnet = match ev {
                    PeerEvent::Added(l) | PeerEvent::Removed(l) => l.subnet(),
                };
                log::warn!("host-gw route for {subnet}: {e}");
                first_error.get_or_insert(anyhow::anyhow!("host-gw route for {subnet}: {e}"));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Put back routes someone deleted and drop routes into the network that no peer owns.
    async fn resync(&mut self, _repaired: &mut super::Repairs) -> anyhow::Result<()> {
        if self.ipv4 {
            self.resync_v4().await?;
        }
        self.resync_v6().await
    }
}

impl HostGwNetwork {
    /// Peers back on our link, missing routes restored, stale ones into the Network removed.
    async fn resync_v4(&mut self) -> anyhow::Result<()> {
        let handle = self.handle.clone();
        // A peer that was off our link may be reachable now (addresses or routes changed).
        let mut now_on_link = Vec::new();
        for lease in self.off_link.values() {
            if self.on_our_link(&handle, lease).await {
                now_on_link.push(lease.clone());
            }
        }
        for lease in now_on_link {
            log::info!(
                "host-gw: peer {} at {} is on our link now",
                lease.subnet(),
                lease.attrs.public_ip
            );
            self.off_link.remove(&lease.subnet());
            let route = self.route_for(&lease);
            self.routes.insert(route.dst, route);
        }
        let present = route::list_gateway_routes::<Ipv4Addr>(&handle).await?;
        for want in self.routes.values() {
            let installed = present
                .iter()
                .any(|r| r.dst == want.dst && r.gateway == want.gateway && r.oif == want.oif);
            if !installed {
                log::info!("host-gw: restoring route {} via {}", want.dst, want.gateway);
                if let Err(e) = want.replace(&handle).await {
                    log::warn!("host-gw: restoring route {}: {e}", want.dst);
                }
            }
        }
        // Resync runs once the first listing is applied: `routes` is the full peer view.
        let network = self.network;
        for stale in present.iter().filter(|r| {
            r.oif == self.ext.index
                && network.contains(r.dst.network())
                && r.dst.prefix() >= network.prefix()
        }) {
            let wanted = self
                .routes
                .get(&stale.dst)
                .is_some_and(|w| w.gateway == stale.gateway);
            if !wanted {
                log::info!(
                    "host-gw: removing stale route {} via {}",
                    stale.dst,
                    stale.gateway
                );
                if let Err(e) = stale.delete(&handle).await {
                    log::warn!("host-gw: removing stale route {}: {e}", stale.dst);
                }
            }
        }
        Ok(())
    }

    /// The same for the IPv6 routes.
    async fn resync_v6(&mut self) -> anyhow::Result<()> {
        if !self.ipv6 {
            return Ok(());
        }
        let handle = self.handle.clone();
        let present6 = route::list_gateway_routes::<Ipv6Addr>(&handle).await?;
        for want in self.routes6.values() {
            if !present6.contains(want) {
                log::info!(
                    "host-gw: restoring IPv6 route {} via {}",
                    want.dst,
                    want.gateway
                );
                if let Err(e) = want.replace(&handle).await {
                    log::warn!("host-gw: restoring IPv6 route {}: {e}", want.dst);
                }
            }
        }
        // Routes into the IPv6Network no peer owns: e.g. a previous run left to peers that are gone now.
        let Some(network6) = self.network6 else {
            return Ok(());
        };
        for stale in present6.iter().filter(|r| {
            r.oif == self.ext.index
                && network6.contains(r.dst.network())
                && r.dst.prefix() >= network6.prefix()
                && !self.routes6.values().any(|w| w == *r)
        }) {
            log::info!(
                "host-gw: removing stale IPv6 route {} via {}",
                stale.dst,
                stale.gateway
            );
            if let Err(e) = stale.delete(&handle).await {
                log::warn!("host-gw: removing stale IPv6 route {}: {e}", stale.dst);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(iface_addr: &str, ext_addr: &str) -> ExternalInterface {
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            iface_addr: iface_addr.parse().unwrap(),
            ext_addr: ext_addr.parse().unwrap(),
            iface_v6_addr: None,
            ext_v6_addr: None,
        }
    }

    #[test]
    fn lease_json_is_upstreams() {
        let b = HostGwBackend::new(&ext("192.0.2.10", "192.0.2.10"));
        assert_eq!(
            b.lease_attrs("172.30.0.11".parse().unwrap()).to_json(),
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"host-gw"}"#
        );
        assert_eq!(b.mtu(), 1500);
    }

    #[test]
    fn public_ip_must_be_the_interface_address() {
        assert!(check_public_ip(&ext("192.0.2.10", "192.0.2.10")).is_ok());
        let err = check_public_ip(&ext("192.0.2.10", "198.51.100.1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("198.51.100.1") && err.contains("eth0"),
            "{err}"
        );
    }
}
