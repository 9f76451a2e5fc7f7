use super::*;

#[test]
fn health_records_why_and_since_when_the_watch_is_down() {
    let stats = WatchStats::default();
    assert_eq!(stats.health(), WatchHealth::Connecting);
    stats.set_health(WatchHealth::Up);
    assert_eq!(stats.down_for(), Duration::ZERO);
    stats.set_health(WatchHealth::NoLeader);
    std::thread::sleep(Duration::from_millis(20));
    // A second failure for another reason keeps the time it went down.
    stats.set_health(WatchHealth::Unauthenticated);
    assert_eq!(stats.health(), WatchHealth::Unauthenticated);
    assert!(stats.down_for() >= Duration::from_millis(20));
    stats.set_health(WatchHealth::Up);
    assert_eq!(stats.down_for(), Duration::ZERO);
    for h in WatchHealth::ALL {
        assert_eq!(WatchHealth::from_u8(h as u8), h);
    }
}

// The watch against the in-memory registry: the view it reports must equal the store's content
// after any sequence of events, outages and compactions.

use std::collections::BTreeMap as Map;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::lease::LeaseAttrs;
use crate::subnet::memory::MemoryRegistry;
use crate::subnet::registry::Registry;

const DEADLINE: Duration = Duration::from_secs(20);
const NETWORK: &str = "10.244.0.0/16";

fn key(third: u8) -> SubnetKey {
    SubnetKey::new(Ipv4Network::new(Ipv4Addr::new(10, 244, third, 0), 24).expect("a /24"))
}

fn attrs(last: u8) -> LeaseAttrs {
    LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, last))
}

const OWN: u8 = 1;

/// A running watcher and what its updates add up to.
struct Watching {
    rx: mpsc::Receiver<WatchUpdate>,
    stats: Arc<WatchStats>,
    peers: Map<SubnetKey, LeaseAttrs>,
    /// Every update in arrival order.
    log: Vec<WatchUpdate>,
    task: tokio::task::JoinHandle<()>,
}

fn start(reg: &MemoryRegistry) -> Watching {
    let stats = Arc::new(WatchStats::default());
    let (tx, rx) = mpsc::channel(64);
    let network: Ipv4Network = NETWORK.parse().expect("network");
    let watcher = PeerWatcher::new(reg.clone(), key(OWN), stats.clone())
        .checked_by(LeaseSanity::new(network, attrs(OWN).public_ip));
    Watching {
        rx,
        stats,
        peers: Map::new(),
        log: Vec::new(),
        task: tokio::spawn(watcher.run(tx)),
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watching {
    async fn next(&mut self) -> WatchUpdate {
        let u = tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("an update before the deadline")
            .expect("the watcher runs");
        if let WatchUpdate::Peers(events) = &u {
            for ev in events {
                match ev {
                    PeerEvent::Added(l) => self.peers.insert(l.key, l.attrs.clone()),
                    PeerEvent::Removed(l) => self.peers.remove(&l.key),
                };
            }
        }
        self.log.push(u.clone());
        u
    }

    /// Receive until the view equals the peers the store holds now.
    async fn until_in_step(&mut self, reg: &MemoryRegistry) {
        let want = peers_in(reg).await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.peers != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "view {:?} never became {want:?}",
                self.peers
            );
            self.next().await;
        }
    }
}

/// Peer leases in the store that the watch admits (ours and insane ones left out).
async fn peers_in(reg: &MemoryRegistry) -> Map<SubnetKey, LeaseAttrs> {
    let network: Ipv4Network = NETWORK.parse().expect("network");
    let sanity = LeaseSanity::new(network, attrs(OWN).public_ip);
    reg.list_leases()
        .await
        .expect("store is up")
        .leases
        .into_iter()
        .filter(|l| l.key != key(OWN) && sanity.problem(l).is_none())
        .map(|l| (l.key, l.attrs))
        .collect()
}

/// The peers an update adds (`adds`) or removes.
fn changed(u: &WatchUpdate, adds: bool) -> Vec<SubnetKey> {
    let WatchUpdate::Peers(evs) = u else {
        return Vec::new();
    };
    evs.iter()
        .filter_map(|e| match e {
            PeerEvent::Added(l) if adds => Some(l.key),
            PeerEvent::Removed(l) if !adds => Some(l.key),
            _ => None,
        })
        .collect()
}

fn added(u: &WatchUpdate) -> Vec<SubnetKey> {
    changed(u, true)
}

fn removed(u: &WatchUpdate) -> Vec<SubnetKey> {
    changed(u, false)
}

/// A watcher past its first listing and the own-key update that follows it.
async fn listed(reg: &MemoryRegistry) -> Watching {
    let mut w = start(reg);
    while !matches!(w.next().await, WatchUpdate::OwnKey(_)) {}
    w
}

/// Takes the store down and waits until the watch says so.
async fn outage_noticed(reg: &MemoryRegistry, w: &Watching) {
    reg.set_down(true);
    wait_for("the watch notices the outage", || {
        w.stats.health() == WatchHealth::Unavailable
    })
    .await;
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn first_update_is_the_full_listing_then_our_own_key() {
    let reg = MemoryRegistry::new();
    reg.put(&key(OWN), &attrs(OWN), 0);
    reg.put(&key(2), &attrs(2), 0);
    reg.put(&key(3), &attrs(3), 0);
    let mut w = start(&reg);
    let first = w.next().await;
    assert_eq!(added(&first), vec![key(2), key(3)]);
    match w.next().await {
        WatchUpdate::OwnKey(Some(l)) => assert_eq!(l.key, key(OWN)),
        other => panic!("expected our own key, got {other:?}"),
    }
    assert_eq!(w.stats.relists.load(Ordering::Relaxed), 1);
    assert_eq!(w.stats.revision.load(Ordering::Relaxed), reg.revision());
}

#[tokio::test]
async fn an_empty_store_still_gives_a_first_listing_and_no_own_key() {
    let reg = MemoryRegistry::new();
    let mut w = start(&reg);
    assert_eq!(w.next().await, WatchUpdate::Peers(Vec::new()));
    assert_eq!(w.next().await, WatchUpdate::OwnKey(None));
}

#[tokio::test]
async fn puts_changes_and_deletes_arrive_in_store_order() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    let mut w = listed(&reg).await;
    reg.put(&key(3), &attrs(3), 0);
    assert_eq!(added(&w.next().await), vec![key(3)]);
    // A renewal put with the same content says nothing; a new owner does.
    reg.put(&key(3), &attrs(3), 0);
    reg.put(&key(3), &attrs(33), 0);
    let u = w.next().await;
    assert_eq!(added(&u), vec![key(3)]);
    assert_eq!(w.peers.get(&key(3)), Some(&attrs(33)));
    reg.delete(&key(2));
    assert_eq!(removed(&w.next().await), vec![key(2)]);
    // Deleting what is not there is no event.
    reg.delete(&key(9));
    reg.put(&key(4), &attrs(4), 0);
    assert_eq!(added(&w.next().await), vec![key(4)]);
    assert_eq!(w.stats.relists.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn delete_then_put_of_one_key_in_one_response_ends_present() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    let mut w = start(&reg);
    w.until_in_step(&reg).await;
    // Queued while the watcher is busy elsewhere: one response, both events, in order.
    reg.delete(&key(2));
    reg.put(&key(2), &attrs(22), 0);
    w.until_in_step(&reg).await;
    assert_eq!(w.peers.get(&key(2)), Some(&attrs(22)));
}

#[tokio::test]
async fn malformed_values_remove_the_peer_and_foreign_keys_are_ignored() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    let mut w = listed(&reg).await;
    reg.put_raw("not-a-subnet", b"{}", 0);
    reg.put_raw(&key(2).to_string(), b"not json", 0);
    let u = w.next().await;
    assert_eq!(removed(&u), vec![key(2)]);
    assert!(w.peers.is_empty());
    // The foreign key still moved the revision on.
    wait_for("revision follows the store", || {
        w.stats.revision.load(Ordering::Relaxed) == reg.revision()
    })
    .await;
}

#[tokio::test]
async fn leases_that_cannot_be_right_are_left_out() {
    let reg = MemoryRegistry::new();
    // Outside the network, and one naming our own public IP under another subnet.
    let outside = SubnetKey::new("10.99.0.0/24".parse().expect("subnet"));
    reg.put(&outside, &attrs(5), 0);
    reg.put(&key(6), &attrs(OWN), 0);
    reg.put(&key(7), &attrs(7), 0);
    let mut w = start(&reg);
    assert_eq!(added(&w.next().await), vec![key(7)]);
}

#[tokio::test]
async fn own_key_deleted_expired_and_put_back_is_reported() {
    let reg = MemoryRegistry::new();
    let ttl = reg.grant_now(10);
    reg.put(&key(OWN), &attrs(OWN), ttl);
    let mut w = start(&reg);
    w.next().await;
    assert!(matches!(w.next().await, WatchUpdate::OwnKey(Some(_))));
    reg.expire(ttl);
    assert_eq!(w.next().await, WatchUpdate::OwnKey(None));
    reg.put(&key(OWN), &attrs(OWN), 0);
    assert!(matches!(w.next().await, WatchUpdate::OwnKey(Some(l)) if l.is_reservation()));
    // Our own key never shows up as a peer.
    assert!(w.peers.is_empty());
}

#[tokio::test]
async fn an_expired_peer_lease_removes_the_peer() {
    let reg = MemoryRegistry::new();
    let ttl = reg.grant_now(10);
    reg.put(&key(2), &attrs(2), ttl);
    let mut w = listed(&reg).await;
    reg.expire(ttl);
    assert_eq!(removed(&w.next().await), vec![key(2)]);
}

#[tokio::test]
async fn an_outage_resumes_from_the_last_revision_without_relisting() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    let mut w = listed(&reg).await;
    outage_noticed(&reg, &w).await;
    // Changes while we cannot see them arrive once etcd is back.
    reg.put(&key(3), &attrs(3), 0);
    reg.delete(&key(2));
    reg.set_down(false);
    w.until_in_step(&reg).await;
    let removes: Vec<_> = w.log.iter().flat_map(removed).collect();
    assert_eq!(removes, vec![key(2)]);
    wait_for("the watch is up again", || {
        w.stats.health() == WatchHealth::Up
    })
    .await;
    assert_eq!(w.stats.relists.load(Ordering::Relaxed), 1);
    assert!(w.stats.reconnects.load(Ordering::Relaxed) >= 1);
    assert_eq!(w.stats.down_for(), Duration::ZERO);
}

#[tokio::test]
async fn compacted_history_is_relisted_and_only_the_difference_emitted() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    reg.put(&key(3), &attrs(3), 0);
    let mut w = listed(&reg).await;
    outage_noticed(&reg, &w).await;
    reg.delete(&key(2));
    reg.put(&key(4), &attrs(4), 0);
    reg.put(&key(3), &attrs(3), 0); // same content: no event after the re-list either
    reg.compact(reg.revision());
    reg.set_down(false);
    w.until_in_step(&reg).await;
    wait_for("a second listing", || {
        w.stats.relists.load(Ordering::Relaxed) == 2
    })
    .await;
    let after_first: Vec<_> = w.log[2..].iter().collect();
    let adds: Vec<_> = after_first.iter().flat_map(|u| added(u)).collect();
    let removes: Vec<_> = after_first.iter().flat_map(|u| removed(u)).collect();
    assert_eq!(adds, vec![key(4)]);
    assert_eq!(removes, vec![key(2)]);
}

#[tokio::test]
async fn a_store_restored_to_an_older_revision_is_the_truth() {
    let reg = MemoryRegistry::new();
    reg.put(&key(2), &attrs(2), 0);
    let mut w = listed(&reg).await;
    // Compacting everything forces a re-list; the listing's revision is taken as is.
    reg.set_down(true);
    reg.put(&key(5), &attrs(5), 0);
    reg.compact(reg.revision());
    reg.set_down(false);
    w.until_in_step(&reg).await;
    wait_for("resumes after the listing", || {
        w.stats.revision.load(Ordering::Relaxed) == reg.revision()
    })
    .await;
}

/// Random puts, deletes, expiries, outages and compactions, several seeds: the view always ends
/// equal to the store.
#[tokio::test]
async fn any_sequence_of_events_outages_and_compactions_ends_in_step() {
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let reg = MemoryRegistry::new();
        let mut ttls = Vec::new();
        let mut w = start(&reg);
        w.until_in_step(&reg).await;
        for round in 0..40 {
            match rng.gen_range(0..10) {
                0..=4 => {
                    let ttl = if rng.gen_bool(0.5) {
                        let id = reg.grant_now(30);
                        ttls.push(id);
                        id
                    } else {
                        0
                    };
                    reg.put(&key(rng.gen_range(2..12)), &attrs(rng.gen_range(2..6)), ttl);
                }
                5 | 6 => {
                    reg.delete(&key(rng.gen_range(2..12)));
                }
                7 if !ttls.is_empty() => {
                    let id = ttls.swap_remove(rng.gen_range(0..ttls.len()));
                    reg.expire(id);
                }
                8 => {
                    reg.set_down(true);
                    reg.put(&key(rng.gen_range(2..12)), &attrs(9), 0);
                    if rng.gen_bool(0.5) {
                        reg.compact(reg.revision());
                    }
                    reg.set_down(false);
                }
                _ => {
                    reg.put_raw(&key(rng.gen_range(2..12)).to_string(), b"garbage", 0);
                }
            }
            if round % 8 == 7 {
                w.until_in_step(&reg).await;
            }
        }
        w.until_in_step(&reg).await;
    }
}
