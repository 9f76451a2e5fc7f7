//! Finding the external interface: `--iface` (name or IP, in order), `--iface-regex`,
//! `--iface-can-reach`, else the interface of the default route; `--public-ip` overrides the
//! address other nodes use.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, RouteMessageBuilder};

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
    #[error("no default route: name the interface with --iface")]
    NoDefaultRoute,
    #[error("interface {0} has no IPv4 address")]
    NoIpv4(String),
    #[error("only IPv4 is supported for --iface-can-reach and --public-ip, got {0}")]
    NotIpv4(IpAddr),
    #[error("{flag} {value}: {why}; name the interface that reaches the other hosts")]
    Unusable {
        flag: &'static str,
        value: String,
        why: String,
    },
}

/// One link with its IPv4 addresses, as netlink reports it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    pub loopback: bool,
    pub ipv4: Vec<Ipv4Addr>,
}

/// Why an address cannot be the one other hosts send to (`None`: it can).
pub fn unusable_address(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address, which other hosts cannot reach")
    } else if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

/// The interface flannel sends encapsulated traffic through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalInterface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// The interface's own address (what packets leave from).
    pub iface_addr: Ipv4Addr,
    /// The address other nodes reach us at (`--public-ip`, else `iface_addr`).
    pub ext_addr: Ipv4Addr,
}

/// How to pick the interface (the relevant flags).
#[derive(Debug, Clone, Default)]
pub struct IfaceSelector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
}

pub async fn list_links(handle: &Handle) -> Result<Vec<Link>, IfaceError> {
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await? {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            loopback: msg.header.flags.contains(LinkFlags::Loopback),
            ipv4: Vec::new(),
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
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        });
        if let (Some(ip), Some(link)) = (ip, links.iter_mut().find(|l| l.index == msg.header.index))
        {
            link.ipv4.push(ip);
        }
    }
    Ok(links)
}

async fn route_oif(handle: &Handle, dst: Ipv4Addr, prefix: u8) -> Result<Option<u32>, IfaceError> {
    if prefix == 32 {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut stream = handle.route().get(msg).execute();
        return match stream.try_next().await {
            Ok(Some(route)) => Ok(route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })),
            Ok(None) => Ok(None),
            // ENETUNREACH and friends: no route.
            Err(rtnetlink::Error::NetlinkError(_)) => Ok(None),
            Err(e) => Err(e.into()),
        };
    }
    // Default route: dump the main table and take the 0.0.0.0/0 entry.
    let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let mut stream = handle.route().get(msg).execute();
    while let Some(route) = stream.try_next().await? {
        let is_default = route.header.destination_prefix_length == 0
            && route.header.table == 254
            && !route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(ip)) if !ip.is_unspecified()));
        if is_default {
            if let Some(oif) = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            }) {
                return Ok(Some(oif));
            }
        }
    }
    Ok(None)
}

/// Pure selection among `links` for --iface and --iface-regex: (link, address to use).
/// Options that matched something unusable, and why; `Err` if that was every match.
pub fn select_by_options(
    links: &[Link],
    sel: &IfaceSelector,
) -> Result<Option<(Link, Option<Ipv4Addr>)>, IfaceError> {
    let mut refused: Vec<(&'static str, String, String)> = Vec::new();
    for spec in &sel.ifaces {
        let found = if let Ok(ip) = spec.parse::<Ipv4Addr>() {
            links
                .iter()
                .find(|l| l.ipv4.contains(&ip))
                .map(|l| (l, Some(ip)))
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
        // Upstream matches addresses first, then names; loopback never qualifies.
        for l in links.iter().filter(|l| !l.loopback) {
            if let Some(ip) = l
                .ipv4
                .iter()
                .find(|ip| unusable_address(**ip).is_none() && re.is_match(&ip.to_string()))
            {
                return Ok(Some((l.clone(), Some(*ip))));
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
fn why_unusable(link: &Link, addr: Option<Ipv4Addr>) -> Option<String> {
    if link.loopback {
        return Some(format!(
            "{} is a loopback interface, which other hosts cannot reach",
            link.name
        ));
    }
    match addr {
        Some(a) => unusable_address(a).map(|why| format!("{a} is {why}")),
        None if !link.ipv4.iter().any(|a| unusable_address(*a).is_none()) => {
            Some(format!("{} has no usable IPv4 address", link.name))
        }
        None => None,
    }
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
            Some(IpAddr::V4(ip)) => route_oif(handle, ip, 32)
                .await?
                .ok_or(IfaceError::Unreachable(IpAddr::V4(ip)))?,
            Some(other) => return Err(IfaceError::NotIpv4(other)),
            None => route_oif(handle, Ipv4Addr::UNSPECIFIED, 0)
                .await?
                .ok_or(IfaceError::NoDefaultRoute)?,
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
    let iface_addr = match addr {
        Some(a) => a,
        None => *link
            .ipv4
            .iter()
            .find(|a| unusable_address(**a).is_none())
            .ok_or_else(|| IfaceError::NoIpv4(link.name.clone()))?,
    };
    let ext_addr = match sel.public_ip {
        None => iface_addr,
        Some(IpAddr::V4(ip)) => {
            if let Some(why) = unusable_address(ip) {
                return Err(IfaceError::Unusable {
                    flag: "--public-ip",
                    value: ip.to_string(),
                    why: why.into(),
                });
            }
            ip
        }
        Some(other) => return Err(IfaceError::NotIpv4(other)),
    };
    Ok(ExternalInterface {
        name: link.name,
        index: link.index,
        mtu: link.mtu,
        iface_addr,
        ext_addr,
    })
}

/// The first global IPv6 address of interface `index` (upstream's default PublicIPv6 when
/// `--public-ipv6` is not given); link-local and ULA-less corner cases are left to the flag.
pub async fn ipv6_address(
    handle: &Handle,
    index: u32,
) -> Result<Option<std::net::Ipv6Addr>, rtnetlink::Error> {
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs.try_next().await? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V6(ip)) = a {
                // fe80::/10 is link-local: other hosts cannot route to it.
                if (ip.segments()[0] & 0xffc0) != 0xfe80 && !ip.is_loopback() {
                    return Ok(Some(*ip));
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links() -> Vec<Link> {
        vec![
            Link {
                index: 1,
                name: "lo".into(),
                mtu: 65536,
                up: true,
                loopback: true,
                ipv4: vec![Ipv4Addr::LOCALHOST],
            },
            Link {
                index: 2,
                name: "eth0".into(),
                mtu: 1500,
                up: true,
                loopback: false,
                ipv4: vec!["192.0.2.10".parse().unwrap()],
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
}
