//! IPv4 and IPv6 routes in the main table over rtnetlink, as the host-gw and vxlan backends
//! install them: host-gw `<subnet> via <peer public IP> dev <ext>`, vxlan
//! `<subnet> via <peer VTEP> dev flannel.<VNI> onlink` (and on `flannel-v6.<VNI>`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnetwork::{Ipv4Network, Ipv6Network};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteVia,
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

/// What a route needs of its address family: rtnetlink builds and reports each family's
/// addresses with its own types; all else about our routes is the same for both.
pub trait RouteFamily: Copy + Eq + fmt::Debug + fmt::Display {
    type Network: Copy + Eq + Ord + fmt::Debug + fmt::Display;
    const UNSPECIFIED: Self;
    /// The prefix length of one address (`ip route get`).
    const HOST_PREFIX: u8;

    /// A message of this family for `dst` (address, prefix length) and `gateway`, if given.
    fn builder(dst: Option<(Self, u8)>, gateway: Option<Self>) -> RouteMessageBuilder<Self>;
    fn split(net: Self::Network) -> (Self, u8);
    fn network(ip: Self, prefix: u8) -> Option<Self::Network>;
    fn contains(net: Self::Network, ip: Self) -> bool;
    /// An address of this family in a route attribute.
    fn address(a: &RouteAddress) -> Option<Self>;
    /// A gateway given as RTA_VIA: the kernel may report IPv6 gateways so; IPv4 routes are
    /// read without it.
    fn via(v: &RouteVia) -> Option<Self>;
}

impl RouteFamily for Ipv4Addr {
    type Network = Ipv4Network;
    const UNSPECIFIED: Self = Ipv4Addr::UNSPECIFIED;
    const HOST_PREFIX: u8 = 32;

    fn builder(dst: Option<(Self, u8)>, gateway: Option<Self>) -> RouteMessageBuilder<Self> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new();
        if let Some((ip, prefix)) = dst {
            b = b.destination_prefix(ip, prefix);
        }
        match gateway {
            Some(gw) => b.gateway(gw),
            None => b,
        }
    }

    fn split(net: Ipv4Network) -> (Self, u8) {
        (net.network(), net.prefix())
    }

    fn network(ip: Self, prefix: u8) -> Option<Ipv4Network> {
        Ipv4Network::new(ip, prefix).ok()
    }

    fn contains(net: Ipv4Network, ip: Self) -> bool {
        net.contains(ip)
    }

    fn address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet(ip) => Some(*ip),
            _ => None,
        }
    }

    fn via(_: &RouteVia) -> Option<Self> {
        None
    }
}

impl RouteFamily for Ipv6Addr {
    type Network = Ipv6Network;
    const UNSPECIFIED: Self = Ipv6Addr::UNSPECIFIED;
    const HOST_PREFIX: u8 = 128;

    fn builder(dst: Option<(Self, u8)>, gateway: Option<Self>) -> RouteMessageBuilder<Self> {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new();
        if let Some((ip, prefix)) = dst {
            b = b.destination_prefix(ip, prefix);
        }
        match gateway {
            Some(gw) => b.gateway(gw),
            None => b,
        }
    }

    fn split(net: Ipv6Network) -> (Self, u8) {
        (net.network(), net.prefix())
    }

    fn network(ip: Self, prefix: u8) -> Option<Ipv6Network> {
        Ipv6Network::new(ip, prefix).ok()
    }

    fn contains(net: Ipv6Network, ip: Self) -> bool {
        net.contains(ip)
    }

    fn address(a: &RouteAddress) -> Option<Self> {
        match a {
            RouteAddress::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }

    fn via(v: &RouteVia) -> Option<Self> {
        match v {
            RouteVia::Inet6(ip) => Some(*ip),
            _ => None,
        }
    }
}

/// `<dst> via <gateway> dev <oif> [onlink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<A: RouteFamily> {
    pub dst: A::Network,
    pub gateway: A,
    pub oif: u32,
    pub onlink: bool,
}

impl<A: RouteFamily> Route<A> {
    fn message(&self) -> RouteMessage {
        let b = A::builder(Some(A::split(self.dst)), Some(self.gateway)).output_interface(self.oif);
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

/// Routes of the main table of family `A` with a gateway and an output interface (what we
/// install).
pub async fn list_gateway_routes<A: RouteFamily>(
    handle: &Handle,
) -> Result<Vec<Route<A>>, rtnetlink::Error> {
    let mut routes = Vec::new();
    let mut stream = handle.route().get(A::builder(None, None).build()).execute();
    while let Some(msg) = stream.try_next().await? {
        if msg.header.table != 254 {
            continue;
        }
        let mut dst = A::UNSPECIFIED;
        let (mut gateway, mut oif) = (None, None);
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(a) => dst = A::address(a).unwrap_or(dst),
                RouteAttribute::Gateway(a) => gateway = A::address(a).or(gateway),
                RouteAttribute::Via(v) => gateway = A::via(v).or(gateway),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        let (Some(gateway), Some(oif)) = (gateway, oif) else {
            continue;
        };
        let Some(dst) = A::network(dst, msg.header.destination_prefix_length) else {
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
pub async fn lookup<A: RouteFamily>(
    handle: &Handle,
    ip: A,
) -> Result<(Option<A>, Option<u32>), rtnetlink::Error> {
    let msg = A::builder(Some((ip, A::HOST_PREFIX)), None).build();
    let mut stream = handle.route().get(msg).execute();
    let Some(route) = stream.try_next().await? else {
        return Ok((None, None));
    };
    let mut out = (None, None);
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(a) => out.0 = A::address(a).or(out.0),
            RouteAttribute::Via(v) => out.0 = A::via(v).or(out.0),
            RouteAttribute::Oif(i) => out.1 = Some(*i),
            _ => {}
        }
    }
    Ok(out)
}
