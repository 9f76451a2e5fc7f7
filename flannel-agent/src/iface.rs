//! Finding the external interface: `--iface` (name, IPv4 or IPv6 address, in order),
//! `--iface-regex` (matched against IPv4 addresses, IPv6 addresses, then names),
//! `--iface-can-reach` (an IPv4 or IPv6 route lookup), else the interface of the default route
//! (IPv4, else IPv6); `--public-ip` / `--public-ipv6` override the addresses other nodes use.
//! As upstream's ExternalInterface it carries both families' addresses; which are needed
//! depends on the network config (`check_stack`). Which IPv6 address of the interface:
//! `iface_ipv6` (no deprecated, tentative or temporary ones; permanent first).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::iface_ipv6::{self, Ipv6IfAddr};

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("invalid --iface-regex {0:?}: {1}")]
    BadRegex(String, regex::Error),
    #[error("no interface matches the --iface/--iface-regex options given ({0})")]
    NoMatch(String),
    #[error("no route to {0} (--iface-can-reach)")]
    Unreachable(IpAddr),
    #[error("no default route (IPv4 or IPv6): name the interface with --iface")]
    NoDefaultRoute,
    #[error("interface {0} has no usable IPv4 or IPv6 address")]
    NoAddress(String),
    #[error("interface {0} has no IPv4 address, which the network config needs (EnableIPv4); add one, or name another interface with --iface")]
    NoIpv4(String),
    #[error("interface {0} has no global IPv6 address, which the network config needs (EnableIPv6); add one or pass --public-ipv6")]
    NoIpv6(String),
    #[error("{flag} {value} is not an {want} address{hint}")]
    WrongFamily {
        flag: &'static str,
        value: IpAddr,
        want: &'static str,
        hint: &'static str,
    },
    #[error("{flag} {value}: {why}; name the interface that reaches the other hosts")]
    Unusable {
        flag: &'static str,
        value: String,
        why: String,
    },
}

/// One link with its addresses, as netlink reports them.
#[derive(Debug, Clone, Default)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    pub ipv4: Vec<Ipv4Addr>,
    /// With their flags and scope: which one is used depends on them (`iface_ipv6`).
    pub ipv6: Vec<Ipv6IfAddr>,
}

impl Link {
    fn holds(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.ipv4.contains(&a),
            IpAddr::V6(a) => self.ipv6.iter().any(|x| x.addr == a),
        }
    }
}

/// What the address checks need to know of one family; the rest is shared.
trait Family: Copy + Into<IpAddr> {
    /// The flag that overrides this family's public address.
    const PUBLIC_FLAG: &'static str;
    const NAME: &'static str;
    /// Where to give an address of the other family instead.
    const OTHER_FLAG_HINT: &'static str;

    fn of(ip: IpAddr) -> Option<Self>;
}

impl Family for Ipv4Addr {
    const PUBLIC_FLAG: &'static str = "--public-ip";
    const NAME: &'static str = "IPv4";
    const OTHER_FLAG_HINT: &'static str = " (use --public-ipv6 for IPv6)";

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }
}

impl Family for Ipv6Addr {
    const PUBLIC_FLAG: &'static str = "--public-ipv6";
    const NAME: &'static str = "IPv6";
    const OTHER_FLAG_HINT: &'static str = " (use --public-ip for IPv4)";

    fn of(ip: IpAddr) -> Option<Self> {
        match ip {
            IpAddr::V6(a) => Some(a),
            IpAddr::V4(_) => None,
        }
    }
}

fn first_usable<A: Family>(addrs: &[A]) -> Option<A> {
    addrs
        .iter()
        .copied()
        .find(|a| unusable_address((*a).into()).is_none())
}

/// Why an address cannot be the one other hosts send to (`None`: it can). For IPv6 only
/// global unicast addresses (ULAs included) qualify.
pub fn unusable_address(ip: IpAddr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address, which other hosts cannot reach")
    } else if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else {
        match ip {
            IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
            IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => {
                Some("a link-local address, which other hosts cannot route to")
            }
            _ => None,
        }
    }
}

/// The interface flannel sends encapsulated traffic through (upstream's ExternalInterface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The interface's own IPv4 address (what packets leave from); 0.0.0.0 when it has none,
    /// which only an IPv6-only network accepts (`check_stack`).
    pub iface_addr: Ipv4Addr,
    /// The address other nodes reach us at (`--public-ip`, else `iface_addr`).
    pub ext_addr: Ipv4Addr,
    /// The interface's IPv6 address (the one `--iface`/`--iface-regex` matched, else its
    /// preferred global one: `iface_ipv6::preferred`).
    pub iface_v6_addr: Option<Ipv6Addr>,
    /// The IPv6 address other nodes reach us at (`--public-ipv6`, else `iface_v6_addr`).
    pub ext_v6_addr: Option<Ipv6Addr>,
}

impl ExternalInterface {
    /// Whether the interface can carry the families the network config enables.
    pub fn check_stack(&self, enable_ipv4: bool, enable_ipv6: bool) -> Result<(), IfaceError> {
        if enable_ipv4 && self.iface_addr.is_unspecified() {
            return Err(IfaceError::NoIpv4(self.name.clone()));
        }
        if enable_ipv6 && self.ext_v6_addr.is_none() {
            return Err(IfaceError::NoIpv6(self.name.clone()));
        }
        Ok(())
    }
}

/// How to pick the interface (the relevant flags).
#[derive(Debug, Clone, Default)]
pub struct IfaceSelector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    pub public_ipv6: Option<IpAddr>,
}

pub async fn list_links(handle: &Handle) -> Result<Vec<Link>, IfaceError> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await? {
        let mut link = Link {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            ..Link::default()
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Mtu(m) => link.mtu = m,
                _ => {}
            }
        }
        links.push(link);
    }
    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await? {
        // IPv4: the local address (on point-to-point links Address is the peer's); IPv6
        // reports only Address.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip @ IpAddr::V4(_)) => Some(*ip),
            _ => None,
        });
        let ip = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        let Some(link) = links.iter_mut().find(|l| l.index == msg.header.index) else {
            continue;
        };
        // IFA_FLAGS carries all 32 bits; older kernels send only the header's 8.
        let flags = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(f.bits()),
                _ => None,
            })
            .unwrap_or_else(|| u32::from(msg.header.flags.bits()));
        match ip {
            Some(IpAddr::V4(a)) => link.ipv4.push(a),
            Some(IpAddr::V6(addr)) => link.ipv6.push(Ipv6IfAddr {
                addr,
                flags,
                scope: u8::from(msg.header.scope),
            }),
            None => {}
        }
    }
    Ok(links)
}

fn oif_of(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// The interface the kernel would send to `dst` through.
async fn route_oif(handle: &Handle, dst: IpAddr) -> Result<Option<u32>, IfaceError> {
    let msg = match dst {
        IpAddr::V4(ip) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .build(),
        IpAddr::V6(ip) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(ip, 128)
            .build(),
    };
    let mut stream = handle.route().get(msg).execute();
    match stream.try_next().await {
        Ok(Some(route)) => Ok(oif_of(&route)),
        Ok(None) => Ok(None),
        // ENETUNREACH and friends: no route.
        Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The interface of the main table's default route of one family (`v6`).
async fn default_route_oif(handle: &Handle, v6: bool) -> Result<Option<u32>, IfaceError> {
    let msg = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let mut stream = handle.route().get(msg).execute();
    while let Some(route) = stream.try_next().await? {
        let has_destination = route.attributes.iter().any(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => !ip.is_unspecified(),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => !ip.is_unspecified(),
            _ => false,
        });
        let is_default = route.header.destination_prefix_length == 0
            && route.header.table == 254
            && !has_destination;
        if let Some(oif) = oif_of(&route).filter(|_| is_default) {
            return Ok(Some(oif));
        }
    }
    Ok(None)
}

/// Pure selection among `links` for --iface and --iface-regex: (link, address to use).
/// Options that matched something unusable, and why; `Err` if that was every match.
pub fn select_by_options(
    links: &[Link],
    sel: &IfaceSelector,
) -> Result<Option<(Link, Option<IpAddr>)>, IfaceError> {
    let mut refused: Vec<(&'static str, String, String)> = Vec::new();
    for spec in &sel.ifaces {
        let found = if let Ok(ip) = spec.parse::<IpAddr>() {
            links.iter().find(|l| l.holds(ip)).map(|l| (l, Some(ip)))
        } else {
            links.iter().find(|l| &l.name == spec).map(|l| (l, None))
        };
        match found {
            Some((l, addr)) => match why_unusable(l, addr) {
                None => return Ok(Some((l.clone(), addr))),
                Some(why) => {
                    log::warn!("--iface {spec}: {why}, trying the next option");
                    refused.push(("--iface", spec.clone(), why));
                }
            },
            None => {
                log::warn!("--iface {spec}: no such interface or address, trying the next option")
            }
        }
    }
    for pattern in &sel.regexes {
        let re = Regex::new(pattern).map_err(|e| IfaceError::BadRegex(pattern.clone(), e))?;
        // Upstream matches addresses (IPv4, then IPv6) first, then names; loopback never
        // qualifies, nor an IPv6 address `iface_ipv6` would not use.
        let addresses = |l: &Link| -> Vec<IpAddr> {
            let v4 = l.ipv4.iter().map(|a| IpAddr::V4(*a));
            let v6 = iface_ipv6::usable_by_preference(&l.ipv6).into_iter();
            v4.chain(v6.map(IpAddr::V6)).collect()
        };
        for v6 in [false, true] {
            for l in links.iter().filter(|l| !l.loopback) {
                if let Some(ip) = addresses(l).into_iter().find(|ip| {
                    ip.is_ipv6() == v6
                        && unusable_address(*ip).is_none()
                        && re.is_match(&ip.to_string())
                }) {
                    return Ok(Some((l.clone(), Some(ip))));
                }
            }
        }
        if let Some(l) = links
            .iter()
            .find(|l| re.is_match(&l.name) && why_unusable(l, None).is_none())
        {
            return Ok(Some((l.clone(), None)));
        }
        log::warn!("--iface-regex {pattern}: nothing usable matches, trying the next option");
    }
    match refused.into_iter().next() {
        // Everything named was unusable: say why rather than "no match".
        Some((flag, value, why)) => Err(IfaceError::Unusable { flag, value, why }),
        None => Ok(None),
    }
}

/// Why `link` (with `addr`, or its first usable address) cannot carry the overlay.
fn why_unusable(link: &Link, addr: Option<IpAddr>) -> Option<String> {
    if link.loopback {
        return Some(format!(
            "{} is a loopback interface, which other hosts cannot reach",
            link.name
        ));
    }
    match addr {
        Some(a) => unusable_address(a).map(|why| format!("{a} is {why}")),
        None if first_usable(&link.ipv4).is_none()
            && iface_ipv6::preferred(&link.ipv6).is_none() =>
        {
            Some(format!("{} has no usable IPv4 or IPv6 address", link.name))
        }
        None => None,
    }
}

/// `--public-ip` / `--public-ipv6`: an address of that flag's family other hosts can reach.
fn public_address<A: Family>(value: IpAddr) -> Result<A, IfaceError> {
    let Some(addr) = A::of(value) else {
        return Err(IfaceError::WrongFamily {
            flag: A::PUBLIC_FLAG,
            value,
            want: A::NAME,
            hint: A::OTHER_FLAG_HINT,
        });
    };
    match unusable_address(value) {
        Some(why) => Err(IfaceError::Unusable {
            flag: A::PUBLIC_FLAG,
            value: value.to_string(),
            why: why.into(),
        }),
        None => Ok(addr),
    }
}

/// The addresses of the chosen `link`: `addr` (what an option matched) for its family, the
/// link's first usable IPv4 / preferred IPv6 address for the other; then the public overrides.
pub fn external_interface(
    link: Link,
    addr: Option<IpAddr>,
    sel: &IfaceSelector,
) -> Result<ExternalInterface, IfaceError> {
    let (iface_addr, iface_v6_addr) = match addr {
        Some(IpAddr::V4(a)) => (Some(a), iface_ipv6::preferred(&link.ipv6)),
        Some(IpAddr::V6(a)) => (first_usable(&link.ipv4), Some(a)),
        None => (first_usable(&link.ipv4), iface_ipv6::preferred(&link.ipv6)),
    };
    if iface_v6_addr.is_none() {
        for a in &link.ipv6 {
            if let Some(why) = iface_ipv6::why_not_public(a) {
                log::debug!("{}: IPv6 address {} not used: {why}", link.name, a.addr);
            }
        }
    }
    if iface_addr.is_none() && iface_v6_addr.is_none() {
        return Err(IfaceError::NoAddress(link.name));
    }
    let iface_addr = iface_addr.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let ext_addr = match sel.public_ip {
        None => iface_addr,
        Some(ip) => public_address(ip)?,
    };
    let ext_v6_addr = match sel.public_ipv6 {
        None => iface_v6_addr,
        Some(ip) => Some(public_address(ip)?),
    };
    Ok(ExternalInterface {
        name: link.name,
        index: link.index,
        mtu: link.mtu,
        iface_addr,
        ext_addr,
        iface_v6_addr,
        ext_v6_addr,
    })
}

pub async fn lookup_external_interface(
    handle: &Handle,
    sel: &IfaceSelector,
) -> Result<ExternalInterface, IfaceError> {
    let links = list_links(handle).await?;
    let (link, addr) = if !sel.ifaces.is_empty() || !sel.regexes.is_empty() {
        select_by_options(&links, sel)?.ok_or_else(|| {
            IfaceError::NoMatch(
                sel.ifaces
                    .iter()
                    .map(|s| format!("--iface {s}"))
                    .chain(sel.regexes.iter().map(|s| format!("--iface-regex {s}")))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?
    } else {
        let oif = match sel.can_reach {
            Some(ip) => route_oif(handle, ip)
                .await?
                .ok_or(IfaceError::Unreachable(ip))?,
            // IPv4's default route, else IPv6's (an IPv6-only host).
            None => match default_route_oif(handle, false).await? {
                Some(oif) => oif,
                None => default_route_oif(handle, true)
                    .await?
                    .ok_or(IfaceError::NoDefaultRoute)?,
            },
        };
        let link = links
            .iter()
            .find(|l| l.index == oif)
            .cloned()
            .ok_or(IfaceError::NoDefaultRoute)?;
        (link, None)
    };
    if link.loopback {
        return Err(IfaceError::Unusable {
            flag: if sel.can_reach.is_some() {
                "--iface-can-reach"
            } else {
                "the default route's interface"
            },
            value: link.name.clone(),
            why: "a loopback interface, which other hosts cannot reach".into(),
        });
    }
    external_interface(link, addr, sel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Addresses configured by hand (permanent).
    fn v6(addrs: &[&str]) -> Vec<Ipv6IfAddr> {
        addrs
            .iter()
            .map(|a| Ipv6IfAddr::permanent(a.parse().expect("test constant")))
            .collect()
    }

    fn links() -> Vec<Link> {
        vec![
            Link {
                index: 1,
                name: "lo".into(),
                mtu: 65536,
                up: true,
                loopback: true,
                ipv4: vec![Ipv4Addr::LOCALHOST],
                ipv6: v6(&["::1"]),
            },
            Link {
                index: 2,
                name: "eth0".into(),
                mtu: 1500,
                up: true,
                loopback: false,
                ipv4: vec!["192.0.2.10".parse().unwrap()],
                ipv6: v6(&["fe80::10", "2001:db8:1::10"]),
            },
            Link {
                index: 3,
                name: "eth1".into(),
                mtu: 9000,
                up: true,
                loopback: false,
                ipv4: vec![
                    "198.51.100.7".parse().unwrap(),
                    "198.51.100.8".parse().unwrap(),
                ],
                ipv6: vec![],
            },
            Link {
                index: 4,
                name: "eth6".into(),
                mtu: 1500,
                up: true,
                loopback: false,
                ipv4: vec![],
                ipv6: v6(&["fe80::6", "2001:db8:6::6"]),
            },
        ]
    }

    fn sel(ifaces: &[&str], regexes: &[&str]) -> IfaceSelector {
        IfaceSelector {
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            regexes: regexes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn first_usable_iface_option_wins() {
        let (l, a) = select_by_options(&links(), &sel(&["nope", "198.51.100.8", "eth0"], &[]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.name.as_str(), a),
            ("eth1", Some("198.51.100.8".parse().unwrap()))
        );
        let (l, a) = select_by_options(&links(), &sel(&["eth0"], &[]))
            .unwrap()
            .unwrap();
        assert_eq!((l.name.as_str(), a), ("eth0", None));
    }

    #[test]
    fn regexes_match_addresses_then_names_after_ifaces() {
        let (l, a) = select_by_options(&links(), &sel(&["missing"], &["^198\\.51"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l.name.as_str(), a),
            ("eth1", Some("198.51.100.7".parse().unwrap()))
        );
        let (l, _) = select_by_options(&links(), &sel(&[], &["^eth0$"]))
            .unwrap()
            .unwrap();
        assert_eq!(l.index, 2);
        assert!(select_by_options(&links(), &sel(&["x"], &["^wlan"]))
            .unwrap()
            .is_none());
        assert!(matches!(
            select_by_options(&links(), &sel(&[], &["("])),
            Err(IfaceError::BadRegex(..))
        ));
    }

    #[test]
    fn loopback_is_refused_and_the_next_option_used() {
        let (l, _) = select_by_options(&links(), &sel(&["lo", "eth0"], &[]))
            .unwrap()
            .unwrap();
        assert_eq!(l.name, "eth0");
        let (l, _) = select_by_options(&links(), &sel(&["127.0.0.1", "eth1"], &[]))
            .unwrap()
            .unwrap();
        assert_eq!(l.name, "eth1");
        // A regex matching everything still never picks lo.
        let (l, _) = select_by_options(&links(), &sel(&[], &[".*"]))
            .unwrap()
            .unwrap();
        assert_eq!(l.name, "eth0");
    }

    #[test]
    fn only_loopback_named_is_an_error_saying_why() {
        let e = select_by_options(&links(), &sel(&["lo"], &[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--iface lo: lo is a loopback interface, which other hosts cannot reach; name the interface that reaches the other hosts"
        );
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_address_in_iface_finds_the_link_holding_it() {
        let (l, a) = select_by_options(&links(), &sel(&["2001:db8:6::7", "2001:db8:6::6"], &[]))
            .unwrap()
            .unwrap();
        assert_eq!((l.name.as_str(), a), ("eth6", Some(ip("2001:db8:6::6"))));
        // A link-local address is not one other hosts can use.
        let e = select_by_options(&links(), &sel(&["fe80::6"], &[])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--iface fe80::6: fe80::6 is a link-local address, which other hosts cannot route to; name the interface that reaches the other hosts"
        );
    }

    #[test]
    fn regexes_match_ipv6_addresses_after_ipv4_ones() {
        let (l, a) = select_by_options(&links(), &sel(&[], &["^2001:db8:6:"]))
            .unwrap()
            .unwrap();
        assert_eq!((l.name.as_str(), a), ("eth6", Some(ip("2001:db8:6::6"))));
        // Matches both an IPv4 address (eth0) and IPv6 ones: IPv4 first, as upstream.
        let (l, a) = select_by_options(&links(), &sel(&[], &["^(192\\.0\\.2|2001:db8:6)"]))
            .unwrap()
            .unwrap();
        assert_eq!((l.name.as_str(), a), ("eth0", Some(ip("192.0.2.10"))));
        // Link-local addresses never match.
        assert!(select_by_options(&links(), &sel(&[], &["^fe80"]))
            .unwrap()
            .is_none());
        // A link with IPv6 addresses only is usable by name.
        let (l, a) = select_by_options(&links(), &sel(&[], &["^eth6$"]))
            .unwrap()
            .unwrap();
        assert_eq!((l.name.as_str(), a), ("eth6", None));
    }

    fn link(name: &str) -> Link {
        links().into_iter().find(|l| l.name == name).unwrap()
    }

    #[test]
    fn both_families_addresses_are_taken_from_the_chosen_link() {
        let ext = external_interface(link("eth0"), None, &IfaceSelector::default()).unwrap();
        assert_eq!(ext.iface_addr, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(ext.ext_addr, ext.iface_addr);
        assert_eq!(ext.iface_v6_addr, Some("2001:db8:1::10".parse().unwrap()));
        assert_eq!(ext.ext_v6_addr, ext.iface_v6_addr);
        assert!(ext.check_stack(true, true).is_ok());
        let ext = external_interface(
            link("eth0"),
            Some(ip("192.0.2.10")),
            &IfaceSelector {
                public_ip: Some(ip("198.51.100.99")),
                public_ipv6: Some(ip("2001:db8:99::1")),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ext.ext_addr, Ipv4Addr::new(198, 51, 100, 99));
        assert_eq!(ext.iface_v6_addr, Some("2001:db8:1::10".parse().unwrap()));
        assert_eq!(ext.ext_v6_addr, Some("2001:db8:99::1".parse().unwrap()));
    }

    #[test]
    fn an_ipv6_only_link_serves_an_ipv6_only_network_only() {
        let ext = external_interface(link("eth6"), None, &IfaceSelector::default()).unwrap();
        assert!(ext.iface_addr.is_unspecified());
        assert_eq!(ext.ext_v6_addr, Some("2001:db8:6::6".parse().unwrap()));
        assert!(ext.check_stack(false, true).is_ok());
        assert_eq!(
            ext.check_stack(true, true).unwrap_err().to_string(),
            "interface eth6 has no IPv4 address, which the network config needs (EnableIPv4); add one, or name another interface with --iface"
        );
        let v4_only = external_interface(link("eth1"), None, &IfaceSelector::default()).unwrap();
        assert_eq!(
            v4_only.check_stack(true, true).unwrap_err().to_string(),
            "interface eth1 has no global IPv6 address, which the network config needs (EnableIPv6); add one or pass --public-ipv6"
        );
        let none = Link {
            ipv6: v6(&["fe80::1"]),
            ..link("eth1")
        };
        let none = Link {
            ipv4: vec![],
            ..none
        };
        assert_eq!(
            external_interface(none, None, &IfaceSelector::default())
                .unwrap_err()
                .to_string(),
            "interface eth1 has no usable IPv4 or IPv6 address"
        );
    }

    #[test]
    fn the_interface_ipv6_address_skips_deprecated_tentative_and_temporary_ones() {
        use crate::iface_ipv6::{IFA_F_DEPRECATED, IFA_F_PERMANENT, IFA_F_TEMPORARY};
        use crate::iface_ipv6::{IFA_F_TENTATIVE, RT_SCOPE_UNIVERSE};
        let flagged = |a: &str, flags| Ipv6IfAddr {
            addr: a.parse().expect("test constant"),
            flags,
            scope: RT_SCOPE_UNIVERSE,
        };
        // As the kernel lists them: a privacy address, a SLAAC one, then a static one.
        let slaac = Link {
            ipv6: vec![
                Ipv6IfAddr::permanent("fe80::10".parse().expect("test constant")),
                flagged("2001:db8:1::aaaa", IFA_F_TEMPORARY),
                flagged("2001:db8:1::bbbb", 0),
                flagged("2001:db8:1::dead", IFA_F_PERMANENT | IFA_F_DEPRECATED),
                flagged("2001:db8:1::10", IFA_F_PERMANENT),
            ],
            ..link("eth0")
        };
        let ext = external_interface(slaac.clone(), None, &IfaceSelector::default()).unwrap();
        assert_eq!(ext.iface_v6_addr, Some("2001:db8:1::10".parse().unwrap()));
        assert_eq!(ext.ext_v6_addr, ext.iface_v6_addr);
        // A regex over addresses never matches one that would not be used.
        assert!(select_by_options(
            std::slice::from_ref(&slaac),
            &sel(&[], &["^2001:db8:1::(aaaa|dead)$"])
        )
        .unwrap()
        .is_none());
        // Only unusable global addresses: the same error as with none at all.
        let unusable = Link {
            ipv6: vec![
                flagged("2001:db8:1::aaaa", IFA_F_TEMPORARY),
                flagged("2001:db8:1::dead", IFA_F_PERMANENT | IFA_F_DEPRECATED),
                flagged("2001:db8:1::beef", IFA_F_PERMANENT | IFA_F_TENTATIVE),
            ],
            ..link("eth1")
        };
        let ext = external_interface(unusable.clone(), None, &IfaceSelector::default()).unwrap();
        assert_eq!(ext.ext_v6_addr, None);
        assert_eq!(
            ext.check_stack(true, true).unwrap_err().to_string(),
            "interface eth1 has no global IPv6 address, which the network config needs (EnableIPv6); add one or pass --public-ipv6"
        );
        let nothing = Link {
            ipv4: vec![],
            ..unusable
        };
        assert_eq!(
            external_interface(nothing, None, &IfaceSelector::default())
                .unwrap_err()
                .to_string(),
            "interface eth1 has no usable IPv4 or IPv6 address"
        );
    }

    #[test]
    fn public_addresses_of_the_wrong_family_are_one_line_errors() {
        let wrong = |public_ip, public_ipv6| {
            external_interface(
                link("eth0"),
                None,
                &IfaceSelector {
                    public_ip,
                    public_ipv6,
                    ..Default::default()
                },
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            wrong(Some(ip("2001:db8::1")), None),
            "--public-ip 2001:db8::1 is not an IPv4 address (use --public-ipv6 for IPv6)"
        );
        assert_eq!(
            wrong(None, Some(ip("192.0.2.1"))),
            "--public-ipv6 192.0.2.1 is not an IPv6 address (use --public-ip for IPv4)"
        );
        assert_eq!(
            wrong(None, Some(ip("::1"))),
            "--public-ipv6 ::1: a loopback address, which other hosts cannot reach; name the interface that reaches the other hosts"
        );
    }
}
