//! The lease manager against the in-memory registry: acquire, compare-and-create races,
//! renewal, TTL-0 loss, reclaim and take-over, with no etcd lease ever leaked.

use std::net::Ipv4Addr;

use super::*;
use crate::lease::SubnetKey;
use crate::subnet::allocate::Previous;
use crate::subnet::memory::MemoryRegistry;
use ipnetwork::Ipv4Network;

const OWN_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const TTL: Duration = Duration::from_secs(60);

fn config(json: &str) -> NetworkConfig {
    NetworkConfig::parse(json.as_bytes()).expect("a valid test config")
}

/// Two subnets to choose from: 10.244.1.0/24 and 10.244.2.0/24.
fn two_subnets() -> NetworkConfig {
    config(
        r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.2.0","Backend":{"Type":"udp"}}"#,
    )
}

fn manager(reg: &MemoryRegistry, config: NetworkConfig) -> LeaseManager<MemoryRegistry> {
    LeaseManager::new(
        reg.clone(),
        config,
        LeaseAttrs::new(OWN_IP),
        TTL,
        Duration::from_secs(60),
    )
}

fn key(third: u8) -> SubnetKey {
    SubnetKey::new(Ipv4Network::new(Ipv4Addr::new(10, 244, third, 0), 24).expect("a /24"))
}

#[tokio::test]
async fn acquire_creates_a_free_subnet_under_a_fresh_etcd_lease() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    assert!(own.subnet() == key(1).ipv4 || own.subnet() == key(2).ipv4);
    let stored = reg.lease_of(&own.key).expect("stored");
    assert_eq!(stored.attrs, LeaseAttrs::new(OWN_IP));
    assert_eq!(stored.etcd_lease, own.etcd_lease);
    assert_eq!(reg.live_leases(), vec![own.etcd_lease]);
}

#[tokio::test]
async fn acquire_prefers_the_subnet_of_the_previous_run() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m
        .acquire(Previous::v4(key(2).ipv4))
        .await
        .expect("acquired");
    assert_eq!(own.key, key(2));
}

#[tokio::test]
async fn acquire_reuses_our_lease_and_revokes_the_etcd_lease_it_had() {
    let reg = MemoryRegistry::new();
    let old = reg.grant_now(60);
    reg.put(&key(2), &LeaseAttrs::new(OWN_IP), old);
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    assert_eq!(own.key, key(2));
    assert_ne!(own.etcd_lease, old);
    assert_eq!(reg.live_leases(), vec![own.etcd_lease]);
    assert_eq!(
        reg.lease_of(&key(2)).map(|l| l.etcd_lease),
        Some(own.etcd_lease)
    );
}

#[tokio::test]
async fn acquire_uses_a_reservation_without_any_etcd_lease() {
    let reg = MemoryRegistry::new();
    reg.put(&key(1), &LeaseAttrs::new(OWN_IP), 0);
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    assert_eq!(own.key, key(1));
    assert!(own.is_reservation());
    assert!(reg.live_leases().is_empty());
    // Renewing a reservation needs nothing from the store.
    reg.set_down(true);
    assert_eq!(m.renew(&own).await.expect("no call"), RenewOutcome::Renewed);
}

#[tokio::test]
async fn a_racing_writer_between_listing_and_create_makes_us_pick_again() {
    let reg = MemoryRegistry::new();
    // Whichever subnet we chose, someone else takes 10.244.1.0 just before we write.
    reg.before_next_write(|r| {
        let id = r.grant_now(60);
        r.put(&key(1), &LeaseAttrs::new(OTHER_IP), id);
    });
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    assert_eq!(own.key, key(2));
    assert_eq!(
        reg.lease_of(&key(1)).map(|l| l.attrs.public_ip),
        Some(OTHER_IP)
    );
    // Ours and the other writer's: the one granted for the lost race was revoked.
    assert_eq!(reg.live_leases().len(), 2);
}

#[tokio::test]
async fn a_full_network_is_an_error_and_leaks_no_lease() {
    let reg = MemoryRegistry::new();
    reg.before_next_write(|r| {
        for third in [1, 2] {
            let id = r.grant_now(60);
            r.put(&key(third), &LeaseAttrs::new(OTHER_IP), id);
        }
    });
    let m = manager(&reg, two_subnets());
    match m.acquire(Previous::default()).await {
        Err(ManagerError::NoFreeSubnet { min, max }) => {
            assert_eq!((min, max), (key(1).ipv4.ip(), key(2).ipv4.ip()));
        }
        other => panic!("expected NoFreeSubnet, got {other:?}"),
    }
    assert_eq!(reg.live_leases().len(), 2);
}

#[tokio::test]
async fn an_outage_fails_acquire_with_a_retryable_error() {
    let reg = MemoryRegistry::new();
    reg.set_down(true);
    let m = manager(&reg, two_subnets());
    match m.acquire(Previous::default()).await {
        Err(ManagerError::Registry(e)) => assert!(!e.is_permanent()),
        other => panic!("expected a registry error, got {other:?}"),
    }
    reg.set_down(false);
    assert!(m.acquire(Previous::default()).await.is_ok());
}

#[tokio::test]
async fn renew_reports_a_ttl_0_lease_as_lost() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    assert_eq!(m.renew(&own).await.expect("renewed"), RenewOutcome::Renewed);
    reg.expire(own.etcd_lease);
    assert_eq!(m.renew(&own).await.expect("answered"), RenewOutcome::Lost);
    reg.set_down(true);
    assert!(m.renew(&own).await.is_err());
}

#[tokio::test]
async fn reclaim_after_expiry_recreates_our_key_under_a_new_etcd_lease() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    reg.expire(own.etcd_lease);
    assert!(reg.lease_of(&own.key).is_none());
    let back = m.reclaim(&own).await.expect("reclaimed");
    assert_eq!(back.key, own.key);
    assert_ne!(back.etcd_lease, own.etcd_lease);
    assert_eq!(reg.live_leases(), vec![back.etcd_lease]);
    assert_eq!(
        reg.lease_of(&own.key).map(|l| l.etcd_lease),
        Some(back.etcd_lease)
    );
}

#[tokio::test]
async fn reclaim_after_a_delete_keeps_our_live_etcd_lease() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    reg.delete(&own.key);
    let back = m.reclaim(&own).await.expect("reclaimed");
    assert_eq!(back.etcd_lease, own.etcd_lease);
    assert_eq!(reg.live_leases(), vec![own.etcd_lease]);
}

#[tokio::test]
async fn reclaim_of_a_key_already_back_returns_what_is_stored() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    let back = m.reclaim(&own).await.expect("still ours");
    assert_eq!(back.key, own.key);
    assert_eq!(back.etcd_lease, own.etcd_lease);
    assert_eq!(reg.live_leases(), vec![own.etcd_lease]);
}

#[tokio::test]
async fn reclaim_never_takes_a_subnet_someone_else_now_holds() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    reg.expire(own.etcd_lease);
    let theirs = reg.grant_now(60);
    reg.put(&own.key, &LeaseAttrs::new(OTHER_IP), theirs);
    match m.reclaim(&own).await {
        Err(ManagerError::SubnetTaken { subnet, owner }) => {
            assert_eq!(subnet, own.key);
            assert_eq!(owner, std::net::IpAddr::V4(OTHER_IP));
        }
        other => panic!("expected SubnetTaken, got {other:?}"),
    }
    assert_eq!(
        reg.lease_of(&own.key).map(|l| l.attrs.public_ip),
        Some(OTHER_IP)
    );
    // The lease granted for the failed attempt is gone again.
    assert_eq!(reg.live_leases(), vec![theirs]);
}

#[tokio::test]
async fn release_revokes_the_etcd_lease_and_with_it_the_key() {
    let reg = MemoryRegistry::new();
    let m = manager(&reg, two_subnets());
    let own = m.acquire(Previous::default()).await.expect("acquired");
    m.release(&own).await.expect("released");
    assert!(reg.live_leases().is_empty());
    assert_eq!(reg.key_count(), 0);
}

#[test]
fn renewal_comes_well_before_expiry() {
    let reg = MemoryRegistry::new();
    let with = |ttl: u64, margin: u64| {
        LeaseManager::new(
            reg.clone(),
            two_subnets(),
            LeaseAttrs::new(OWN_IP),
            Duration::from_secs(ttl),
            Duration::from_secs(margin),
        )
        .renew_interval()
    };
    // Upstream's 24 h TTL with a 1 h margin: a third of the TTL comes first.
    assert_eq!(with(24 * 3600, 3600), Duration::from_secs(8 * 3600));
    assert_eq!(with(9, 3600), Duration::from_secs(3));
    assert_eq!(with(1, 0), Duration::from_millis(500));
}
