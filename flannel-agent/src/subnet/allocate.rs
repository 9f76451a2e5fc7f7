//! Choosing a subnet, as upstream does: our own lease (by PublicIP; in an IPv6-only network
//! by PublicIPv6, see `LeaseAttrs::owner`), then the subnets of the
//! previous subnet.env if free (IPv4 and, with IPv6, IPv6 each on its own), then a random free
//! one among the first 100 free.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::config::NetworkConfig;
use crate::lease::{Lease, SubnetKey};

/// How many free subnets the random pick chooses among (upstream's number).
const RANDOM_POOL: usize = 100;

/// The subnets a previous run recorded in subnet.env (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Previous {
    pub ipv4: Option<Ipv4Network>,
    pub ipv6: Option<Ipv6Network>,
}

impl Previous {
    /// Only an IPv4 subnet known.
    pub fn v4(ipv4: Ipv4Network) -> Self {
        Previous {
            ipv4: Some(ipv4),
            ipv6: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A key in etcd that already names our PublicIP (a lease of ours, or a reservation).
    Existing(Lease),
    /// A subnet (and, with IPv6, an IPv6 subnet) nobody holds: create it.
    Free(SubnetKey),
}

/// Does `lease` belong to us and fit the current config?
fn is_ours(config: &NetworkConfig, lease: &Lease, owner: IpAddr) -> bool {
    let v6_fits = match lease.key.ipv6 {
        Some(v6) => config.contains_ipv6_subnet(v6),
        None => !config.enable_ipv6,
    };
    lease.attrs.owner() == owner
        && lease.key.is_ipv6_only() != config.enable_ipv4
        && lease.subnet().prefix() == config.subnet_len
        && config.network.contains(lease.subnet().network())
        && v6_fits
}

/// With IPv6: the previous IPv6 subnet if it fits and is free, else a random free one among
/// the first 100 free (upstream picks it independently of the IPv4 one). `Some(None)` without
/// IPv6; `None` when none is free.
fn choose_ipv6(
    config: &NetworkConfig,
    leases: &[Lease],
    previous: Option<Ipv6Network>,
    rng: &mut impl Rng,
) -> Option<Option<Ipv6Network>> {
    if !config.enable_ipv6 {
        return Some(None);
    }
    let taken: HashSet<Ipv6Network> = leases.iter().filter_map(|l| l.key.ipv6).collect();
    if let Some(prev) = previous {
        if config.contains_ipv6_subnet(prev) && !taken.contains(&prev) {
            return Some(Some(prev));
        }
    }
    let mut pool = Vec::with_capacity(RANDOM_POOL);
    let mut i = 0;
    while pool.len() < RANDOM_POOL {
        let Some(subnet) = config.nth_ipv6_subnet(i) else {
            break;
        };
        if !taken.contains(&subnet) {
            pool.push(subnet);
        }
        i += 1;
    }
    pool.choose(rng).copied().map(Some)
}

pub fn choose(
    config: &NetworkConfig,
    leases: &[Lease],
    owner: impl Into<IpAddr>,
    previous: Previous,
    rng: &mut impl Rng,
) -> Option<Choice> {
    let owner = owner.into();
    // A reservation for us beats a dynamic lease of ours.
    let mut ours: Vec<&Lease> = leases
        .iter()
        .filter(|l| is_ours(config, l, owner))
        .collect();
    ours.sort_by_key(|l| (!l.is_reservation(), l.subnet()));
    if let Some(l) = ours.first() {
        return Some(Choice::Existing((*l).clone()));
    }

    // Every key in etcd (leases and reservations, any owner) is taken.
    let taken: HashSet<Ipv4Network> = leases.iter().map(|l| l.subnet()).collect();
    let ipv6 = choose_ipv6(config, leases, previous.ipv6, rng)?;
    if !config.enable_ipv4 {
        // IPv6-only: every key has the IPv4 part 0.0.0.0-0; the IPv6 subnet tells them apart.
        return ipv6.map(|v6| Choice::Free(SubnetKey::ipv6_only(v6)));
    }
    let free = |ipv4| Choice::Free(SubnetKey { ipv4, ipv6 });
    if let Some(prev) = previous.ipv4 {
        if config.contains_subnet(prev) && !taken.contains(&prev) {
            return Some(free(prev));
        }
    }

    let mut pool = Vec::with_capacity(RANDOM_POOL);
    let mut i = 0;
    while pool.len() < RANDOM_POOL {
        let Some(subnet) = config.nth_subnet(i) else {
            break;
        };
        if !taken.contains(&subnet) {
            pool.push(subnet);
        }
        i += 1;
    }
    pool.choose(rng).copied().map(free)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, SubnetKey};

    fn config() -> NetworkConfig {
        NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.3.0"}"#,
        )
        .unwrap()
    }

    fn lease(subnet: &str, ip: &str, etcd_lease: i64) -> Lease {
        Lease {
            key: SubnetKey::new(subnet.parse().unwrap()),
            attrs: LeaseAttrs::new(ip.parse().unwrap()),
            etcd_lease,
            mod_revision: 1,
        }
    }

    #[test]
    fn the_previous_ipv6_subnet_is_reused_when_it_fits_and_is_free() {
        let mut rng = rand::thread_rng();
        let config = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48"}"#,
        )
        .unwrap();
        let me: std::net::Ipv4Addr = "192.0.2.10".parse().unwrap();
        let prev6: Ipv6Network = "fd00:10:244:3a::/64".parse().unwrap();
        let previous = Previous {
            ipv4: Some("10.244.58.0/24".parse().unwrap()),
            ipv6: Some(prev6),
        };
        let pick =
            |leases: &[Lease], previous: Previous, rng: &mut rand::rngs::ThreadRng| match choose(
                &config, leases, me, previous, rng,
            ) {
                Some(Choice::Free(k)) => k,
                other => panic!("{other:?}"),
            };
        // Free: both subnets of the previous run come back (upstream does the same).
        let k = pick(&[], previous, &mut rng);
        assert_eq!((k.ipv4, k.ipv6), (previous.ipv4.unwrap(), Some(prev6)));
        // Taken by another node: a different IPv6 subnet, the IPv4 one still reused.
        let mut other = lease("10.244.9.0/24", "192.0.2.11", 5);
        other.key.ipv6 = Some(prev6);
        for _ in 0..20 {
            let k = pick(std::slice::from_ref(&other), previous, &mut rng);
            assert_eq!(k.ipv4, previous.ipv4.unwrap());
            assert!(k.ipv6.is_some_and(|v6| v6 != prev6), "{k:?}");
        }
        // Outside the IPv6Network now (the config changed): not reused.
        let outside = Previous {
            ipv6: Some("fd00:99::/64".parse().unwrap()),
            ..previous
        };
        let k = pick(&[], outside, &mut rng);
        assert!(
            k.ipv6.is_some_and(|v6| config.contains_ipv6_subnet(v6)),
            "{k:?}"
        );
    }

    /// IPv6-only: keys `0.0.0.0-0&<v6>`, every PublicIP 0.0.0.0; our lease is the one with our
    /// PublicIPv6 (upstream would take the first 0.0.0.0 lease, another node's).
    #[test]
    fn ipv6_only_keys_have_no_ipv4_part_and_our_lease_is_found_by_public_ipv6() {
        let mut rng = rand::thread_rng();
        let config = NetworkConfig::parse(
            br#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","IPv6SubnetMax":"fd00:10:244:3::"}"#,
        )
        .unwrap();
        let v6_lease = |subnet: &str, ip6: &str| {
            let mut l = lease("0.0.0.0/0", "0.0.0.0", 5);
            l.key = SubnetKey::ipv6_only(subnet.parse().unwrap());
            l.attrs.public_ipv6 = Some(ip6.parse().unwrap());
            l
        };
        let me: IpAddr = "2001:db8::10".parse().unwrap();
        let others = vec![
            v6_lease("fd00:10:244:1::/64", "2001:db8::11"),
            v6_lease("fd00:10:244:2::/64", "2001:db8::12"),
        ];
        for _ in 0..20 {
            match choose(&config, &others, me, Previous::default(), &mut rng) {
                Some(Choice::Free(k)) => {
                    assert!(k.is_ipv6_only(), "{k}");
                    assert_eq!(k.to_string(), "0.0.0.0-0&fd00:10:244:3::-64");
                }
                other => panic!("{other:?}"),
            }
        }
        let mut leases = others.clone();
        leases.push(v6_lease("fd00:10:244:3::/64", "2001:db8::10"));
        assert_eq!(
            choose(&config, &leases, me, Previous::default(), &mut rng),
            Some(Choice::Existing(leases[2].clone()))
        );
        // All three taken and none ours: nothing free.
        let stranger: IpAddr = "2001:db8::99".parse().unwrap();
        assert_eq!(
            choose(&config, &leases, stranger, Previous::default(), &mut rng),
            None
        );
    }

    #[test]
    fn own_lease_then_previous_then_random_free() {
        let mut rng = rand::thread_rng();
        let me: std::net::Ipv4Addr = "192.0.2.10".parse().unwrap();
        let leases = vec![
            lease("10.244.1.0/24", "192.0.2.11", 5),
            lease("10.244.2.0/24", "192.0.2.10", 6),
        ];
        assert_eq!(
            choose(&config(), &leases, me, Previous::default(), &mut rng),
            Some(Choice::Existing(leases[1].clone()))
        );
        let others = vec![lease("10.244.1.0/24", "192.0.2.11", 5)];
        assert_eq!(
            choose(
                &config(),
                &others,
                me,
                Previous::v4("10.244.3.0/24".parse().unwrap()),
                &mut rng
            ),
            Some(Choice::Free(SubnetKey::new(
                "10.244.3.0/24".parse().unwrap()
            )))
        );
        // previous subnet taken by someone else: pick a free one.
        for _ in 0..20 {
            let c = choose(
                &config(),
                &others,
                me,
                Previous::v4("10.244.1.0/24".parse().unwrap()),
                &mut rng,
            );
            assert!(
                matches!(c, Some(Choice::Free(k)) if k.ipv4 != "10.244.1.0/24".parse().unwrap())
            );
        }
    }

    #[test]
    fn reservations_are_never_handed_out_and_win_for_their_owner() {
        let mut rng = rand::thread_rng();
        let leases = vec![
            lease("10.244.1.0/24", "192.0.2.50", 0),
            lease("10.244.2.0/24", "192.0.2.51", 0),
        ];
        for _ in 0..20 {
            assert_eq!(
                choose(
                    &config(),
                    &leases,
                    "192.0.2.10".parse::<IpAddr>().unwrap(),
                    Previous::v4("10.244.1.0/24".parse().unwrap()),
                    &mut rng
                ),
                Some(Choice::Free(SubnetKey::new(
                    "10.244.3.0/24".parse().unwrap()
                )))
            );
        }
        let mut with_dynamic = leases.clone();
        with_dynamic.push(lease("10.244.3.0/24", "192.0.2.51", 9));
        assert_eq!(
            choose(
                &config(),
                &with_dynamic,
                "192.0.2.51".parse::<IpAddr>().unwrap(),
                Previous::default(),
                &mut rng
            ),
            Some(Choice::Existing(leases[1].clone()))
        );
    }

    #[test]
    fn full_network_gives_none() {
        let leases = vec![
            lease("10.244.1.0/24", "192.0.2.1", 1),
            lease("10.244.2.0/24", "192.0.2.2", 1),
            lease("10.244.3.0/24", "192.0.2.3", 1),
        ];
        assert_eq!(
            choose(
                &config(),
                &leases,
                "192.0.2.9".parse::<IpAddr>().unwrap(),
                Previous::default(),
                &mut rand::thread_rng()
            ),
            None
        );
    }
}
