//! IPv4 routes in the main table over rtnetlink, as the host-gw and vxlan backends install them.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, RouteMessageBuilder};

/// Kernel errno values meaning "nothing to delete / no such thing".
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;

/// True when a netlink error only says the object is already gone.
pub fn is_gone(e: &rtnetlink::Error) -> bool {
    match e {
        rtnetlink::Error::NetlinkError(m) => matches!(-m.raw_code(), ENOENT | ESRCH | ENODEV),
        _ => false,
    }
}

/// `<dst> via <gateway> dev <oif> [onlink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub oif: u32,
    pub onlink: bool,
}

impl Route {
    fn message(&self) -> RouteMessage {
        let b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.dst.network(), self.dst.prefix())
            .gateway(self.gateway)
            .output_interface(self.oif);
        if self.onlink {
            b.onlink().build()
        } else {
            b.build()
        }
    }

    /// `ip route replace`.
    pub async fn replace(&self, handle: &Handle) -> Result<(), rtnetlink::Error> {
        handle.route().add(self.message()).replace().execute().await
    }

    /// `ip route del`; a route that is already gone is not an error.
    pub async fn delete(&self, handle: &Handle) -> Result<(), rtnetlink::Error> {
        // Match whoever installed it (upstream uses protocol boot) and any scope, as `ip route del`.
        let mut msg = self.message();
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match handle.route().del(msg).execute().await {
            Err(e) if is_gone(&e) => Ok(()),
            r => r,
        }
    }
}

/// Routes of the main table with a gateway and an output interface (what we install).
pub async fn list_gateway_routes(handle: &Handle) -> Result<Vec<Route>, rtnetlink::Error> {
    let mut routes = Vec::new();
    let mut stream = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = stream.try_next().await? {
        if msg.header.table != 254 {
            continue;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let (mut gateway, mut oif) = (None, None);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(gateway), Some(oif)) = (gateway, oif) else {
            continue;
        };
        let Ok(dst) = Ipv4Network::new(dst, msg.header.destination_prefix_length) else {
            continue;
        };
        routes.push(Route {
            dst,
            gateway,
            oif,
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
        });
    }
    Ok(routes)
}

/// The gateway and interface the kernel would use to reach `ip` (`ip route get`).
pub async fn lookup(
    handle: &Handle,
    ip: Ipv4Addr,
) -> Result<(Option<Ipv4Addr>, Option<u32>), rtnetlink::Error> {
    let msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .build();
    let mut stream = handle.route().get(msg).execute();
    let Some(route) = stream.try_next().await? else {
        return Ok((None, None));
    };
    let mut out = (None, None);
    for attr in route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(gw)) => out.0 = Some(gw),
            RouteAttribute::Oif(i) => out.1 = Some(i),
            _ => {}
        }
    }
    Ok(out)
}
