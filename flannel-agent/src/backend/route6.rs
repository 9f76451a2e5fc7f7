//! IPv6 routes in the main table over rtnetlink: what host-gw installs per dual-stack peer
//! (`<v6 subnet> via <peer PublicIPv6> dev <ext>`) and vxlan per IPv6 peer
//! (`<v6 subnet> via <peer v6 VTEP> dev flannel-v6.<VNI> onlink`).

use std::net::Ipv6Addr;

use futures::TryStreamExt;
use ipnetwork::Ipv6Network;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::route::is_gone;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route6 {
    pub dst: Ipv6Network,
    pub gateway: Ipv6Addr,
    pub oif: u32,
    pub onlink: bool,
}

impl Route6 {
    fn message(&self) -> RouteMessage {
        let b = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .gateway(self.gateway)
            .output_interface(self.oif);
        if self.onlink {
            b.onlink().build()
        } else {
            b.build()
        }
    }

    /// `ip -6 route replace`.
    pub async fn replace(&self, handle: &Handle) -> Result<(), rtnetlink::Error> {
        handle.route().add(self.message()).replace().execute().await
    }

    /// `ip -6 route del`; a route that is already gone is not an error.
    pub async fn delete(&self, handle: &Handle) -> Result<(), rtnetlink::Error> {
        let mut msg = self.message();
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match handle.route().del(msg).execute().await {
            Err(e) if is_gone(&e) => Ok(()),
            r => r,
        }
    }
}

/// IPv6 routes of the main table with a gateway and an output interface.
pub async fn list_gateway_routes(handle: &Handle) -> Result<Vec<Route6>, rtnetlink::Error> {
    let mut routes = Vec::new();
    let mut stream = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute();
    while let Some(msg) = stream.try_next().await? {
        if msg.header.table != 254 {
            continue;
        }
        let mut dst = Ipv6Addr::UNSPECIFIED;
        let (mut gateway, mut oif) = (None, None);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(*ip),
                RouteAttribute::Via(RouteVia::Inet6(ip)) => gateway = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(gateway), Some(oif)) = (gateway, oif) else {
            continue;
        };
        let Ok(dst) = Ipv6Network::new(dst, msg.header.destination_prefix_length) else {
            continue;
        };
        routes.push(Route6 {
            dst,
            gateway,
            oif,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
        });
    }
    Ok(routes)
}

/// The gateway and interface the kernel would use to reach `ip` (`ip -6 route get`).
pub async fn lookup(
    handle: &Handle,
    ip: Ipv6Addr,
) -> Result<(Option<Ipv6Addr>, Option<u32>), rtnetlink::Error> {
    let msg = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(ip, 128)
        .build();
    let mut stream = handle.route().get(msg).execute();
    let Some(route) = stream.try_next().await? else {
        return Ok((None, None));
    };
    let mut out = (None, None);
    for attr in route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => out.0 = Some(gw),
            RouteAttribute::Via(RouteVia::Inet6(gw)) => out.0 = Some(gw),
            RouteAttribute::Oif(i) => out.1 = Some(i),
            _ => {}
        }
    }
    Ok(out)
}
