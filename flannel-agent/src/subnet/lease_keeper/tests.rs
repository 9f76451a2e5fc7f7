//! The lease keeper against the in-memory registry, with the watch's own-key updates sent by
//! hand: expiry is reclaimed, a delete by hand or a new owner ends the agent.

use std::net::Ipv4Addr;

use super::*;
use crate::config::NetworkConfig;
use crate::lease::LeaseAttrs;
use crate::status::AgentStatus;
use crate::subnet::allocate::Previous;
use crate::subnet::memory::MemoryRegistry;

const OWN_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const DEADLINE: Duration = Duration::from_secs(10);

struct Kept {
    reg: MemoryRegistry,
    status: Arc<AgentStatus>,
    own: Lease,
    tx: mpsc::Sender<Option<Lease>>,
    task: tokio::task::JoinHandle<Result<(), KeeperError>>,
}

/// A keeper holding a freshly acquired lease with `ttl`, running.
async fn keeping(ttl: Duration) -> Kept {
    let reg = MemoryRegistry::new();
    let config = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)
        .expect("valid config");
    let status = Arc::new(AgentStatus::default());
    let manager = LeaseManager::new(reg.clone(), config, LeaseAttrs::new(OWN_IP), ttl, ttl);
    let keeper = LeaseKeeper::new(manager, reg.clone(), status.clone(), ttl);
    let own = keeper.acquire(Previous::default()).await.expect("acquired");
    assert_eq!(status.own(), Some(own.clone()));
    assert!(status.lease_expiry() > 0);
    let (tx, rx) = mpsc::channel(8);
    let (subnet_tx, _) = watch::channel(own.subnet());
    let task = tokio::spawn(keeper.run(own.clone(), rx, subnet_tx));
    Kept {
        reg,
        status,
        own,
        tx,
        task,
    }
}

async fn ended(k: Kept) -> Result<(), KeeperError> {
    drop(k.tx);
    tokio::time::timeout(DEADLINE, k.task)
        .await
        .expect("the keeper ends before the deadline")
        .expect("the keeper does not panic")
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_key_deleted_by_hand_ends_the_agent_and_frees_the_lease() {
    let k = keeping(Duration::from_secs(60)).await;
    k.reg.delete(&k.own.key);
    k.tx.send(None).await.expect("keeper runs");
    let r = tokio::time::timeout(DEADLINE, k.task).await.expect("ends");
    match r.expect("no panic") {
        Err(KeeperError::Manager(ManagerError::DeletedByHand(s))) => assert_eq!(s, k.own.key),
        other => panic!("expected DeletedByHand, got {other:?}"),
    }
    assert!(k.reg.live_leases().is_empty());
}

#[tokio::test]
async fn an_expired_key_reported_by_the_watch_is_put_back() {
    let k = keeping(Duration::from_secs(60)).await;
    k.reg.expire(k.own.etcd_lease);
    k.tx.send(None).await.expect("keeper runs");
    until("our key is back", || k.reg.lease_of(&k.own.key).is_some()).await;
    let back = k.reg.lease_of(&k.own.key).expect("back");
    assert_eq!(back.attrs.public_ip, OWN_IP);
    assert_eq!(k.reg.live_leases(), vec![back.etcd_lease]);
    assert!(matches!(ended(k).await, Err(KeeperError::WatchEnded)));
}

#[tokio::test]
async fn the_renewal_timer_notices_ttl_0_and_reclaims() {
    // A 1 s TTL renews every 500 ms.
    let k = keeping(Duration::from_secs(1)).await;
    k.reg.expire(k.own.etcd_lease);
    until("our key is back", || k.reg.lease_of(&k.own.key).is_some()).await;
    let back = k.reg.lease_of(&k.own.key).expect("back");
    until("the status shows the new etcd lease", || {
        k.status.own().map(|l| l.etcd_lease) == Some(back.etcd_lease)
    })
    .await;
    assert!(matches!(ended(k).await, Err(KeeperError::WatchEnded)));
}

#[tokio::test]
async fn a_reclaim_during_an_outage_is_retried_until_etcd_is_back() {
    let k = keeping(Duration::from_secs(60)).await;
    k.reg.expire(k.own.etcd_lease);
    k.reg.set_down(true);
    k.tx.send(None).await.expect("keeper runs");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!k.task.is_finished(), "an outage is not a reason to exit");
    k.reg.set_down(false);
    until("our key is back", || k.reg.lease_of(&k.own.key).is_some()).await;
}

#[tokio::test]
async fn a_new_owner_of_our_subnet_ends_the_agent() {
    let k = keeping(Duration::from_secs(60)).await;
    let mut theirs = k.own.clone();
    theirs.attrs = LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 7));
    k.tx.send(Some(theirs)).await.expect("keeper runs");
    let r = tokio::time::timeout(DEADLINE, k.task).await.expect("ends");
    match r.expect("no panic") {
        Err(KeeperError::TakenOver { subnet, owner }) => {
            assert_eq!(subnet, k.own.key);
            assert_eq!(owner, Ipv4Addr::new(192, 0, 2, 7));
        }
        other => panic!("expected TakenOver, got {other:?}"),
    }
}

#[tokio::test]
async fn a_subnet_taken_while_expired_ends_the_agent() {
    let k = keeping(Duration::from_secs(60)).await;
    k.reg.expire(k.own.etcd_lease);
    let id = k.reg.grant_now(60);
    k.reg.put(
        &k.own.key,
        &LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 8)),
        id,
    );
    // The watch reported the delete before the new owner's put.
    k.tx.send(None).await.expect("keeper runs");
    let r = tokio::time::timeout(DEADLINE, k.task).await.expect("ends");
    assert!(matches!(
        r.expect("no panic"),
        Err(KeeperError::Manager(ManagerError::SubnetTaken { .. }))
    ),);
}
