//! The watch of `<prefix>/subnets/`: every event of every response, resumed at the last seen
//! revision + 1, re-listed and reconciled after compaction, reconnected with backoff. The
//! contract: after any sequence of events and outages, the view equals etcd's content.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::EventType;
use tokio::sync::mpsc;

use super::registry::{is_auth_error, EtcdRegistry, RegistryError};
use super::sanity::LeaseSanity;
use crate::lease::{Lease, SubnetKey};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// An idle watch is asked for its progress this often; a stream that answers nothing to two
/// requests in a row is given up (a member that stopped serving, a half-open connection).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A peer lease appeared or changed.
    Added(Lease),
    Removed(Lease),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchUpdate {
    /// Changes to other nodes' leases, in etcd order.
    Peers(Vec<PeerEvent>),
    /// Our own key changed (`Some`) or disappeared (`None`).
    OwnKey(Option<Lease>),
}

/// Whether the watch currently sees etcd's changes, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WatchHealth {
    /// Not connected yet.
    Connecting = 0,
    Up = 1,
    /// etcd unreachable or the stream broke.
    Unavailable = 2,
    /// The member we reached has no leader (cut off from its cluster).
    NoLeader = 3,
    /// etcd refused our credentials or token.
    Unauthenticated = 4,
    /// The stream stopped answering progress requests.
    Stalled = 5,
}

impl WatchHealth {
    pub const ALL: [WatchHealth; 6] = [
        WatchHealth::Connecting,
        WatchHealth::Up,
        WatchHealth::Unavailable,
        WatchHealth::NoLeader,
        WatchHealth::Unauthenticated,
        WatchHealth::Stalled,
    ];

    /// The label value in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            WatchHealth::Connecting => "connecting",
            WatchHealth::Up => "up",
            WatchHealth::Unavailable => "unavailable",
            WatchHealth::NoLeader => "no_leader",
            WatchHealth::Unauthenticated => "unauthenticated",
            WatchHealth::Stalled => "stalled",
        }
    }

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|h| *h as u8 == v)
            .unwrap_or(WatchHealth::Connecting)
    }

    /// Why an etcd call failed, as the watch's state.
    pub fn of_error(e: &RegistryError) -> Self {
        match e {
            RegistryError::Etcd(e) => Self::of_etcd_error(e),
            _ => WatchHealth::Unavailable,
        }
    }

    fn of_etcd_error(e: &etcd_client::Error) -> Self {
        if is_auth_error(e) {
            WatchHealth::Unauthenticated
        } else if e.to_string().contains("no leader") {
            WatchHealth::NoLeader
        } else {
            WatchHealth::Unavailable
        }
    }
}

/// Counters an operator can read (metrics).
#[derive(Debug, Default)]
pub struct WatchStats {
    pub reconnects: AtomicU64,
    pub relists: AtomicU64,
    pub revision: AtomicI64,
    health: AtomicU8,
    /// Since when the watch has not been up (None while up).
    down_since: Mutex<Option<Instant>>,
}

impl WatchStats {
    pub fn health(&self) -> WatchHealth {
        WatchHealth::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn set_health(&self, h: WatchHealth) {
        self.health.store(h as u8, Ordering::Relaxed);
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match (h, *since) {
            (WatchHealth::Up, _) => *since = None,
            (_, None) => *since = Some(Instant::now()),
            _ => {}
        }
    }

    /// How long the watch has been down (zero while up; counted from start before the first
    /// connection).
    pub fn down_for(&self) -> Duration {
        if self.health() == WatchHealth::Up {
            return Duration::ZERO;
        }
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        since.get_or_insert_with(Instant::now).elapsed()
    }
}

pub struct PeerWatcher {
    registry: EtcdRegistry,
    own: SubnetKey,
    sanity: Option<LeaseSanity>,
    view: BTreeMap<SubnetKey, Lease>,
    own_lease: Option<Lease>,
    revision: i64,
    stats: Arc<WatchStats>,
}

enum StreamEnd {
    /// The stream broke (etcd down, network, no leader, auth): resume from the last revision.
    Broken(WatchHealth),
    /// History we need is compacted away: re-list.
    Compacted,
}

impl PeerWatcher {
    pub fn new(registry: EtcdRegistry, own: SubnetKey, stats: Arc<WatchStats>) -> Self {
        PeerWatcher {
            registry,
            own,
            sanity: None,
            view: BTreeMap::new(),
            own_lease: None,
            revision: 0,
            stats,
        }
    }

    /// Leave out (with one warning per key) peer leases that cannot be right for this node.
    pub fn checked_by(mut self, sanity: LeaseSanity) -> Self {
        self.sanity = Some(sanity);
        self
    }

    /// Whether a peer's lease goes into the view.
    fn admit(&mut self, key: &[u8], lease: &Lease) -> bool {
        match self.sanity.as_mut() {
            None => true,
            Some(s) => s.admit(&String::from_utf8_lossy(key), lease),
        }
    }

    /// A watch or listing failed: record why, and get a new token when that is the reason.
    async fn failed(&self, health: WatchHealth) {
        self.stats.set_health(health);
        if health == WatchHealth::Unauthenticated || self.registry.authenticated() {
            // A broken stream after an etcd restart also means our token is gone; the
            // refresh is one cheap call and failures show on the next attempt.
            if let Err(e) = self.registry.refresh_token().await {
                log::warn!("re-authenticating with etcd: {e}");
            }
        }
    }

    /// Run until the receiver goes away. The first update is a full listing.
    pub async fn run(mut self, tx: mpsc::Sender<WatchUpdate>) {
        let mut backoff = BACKOFF_MIN;
        let mut need_relist = true;
        loop {
            if need_relist {
                match self.relist().await {
                    Ok(updates) => {
                        for u in updates {
                            if tx.send(u).await.is_err() {
                                return;
                            }
                        }
                        need_relist = false;
                        backoff = BACKOFF_MIN;
                    }
                    Err(e) => {
                        log::warn!("listing subnet leases: {e}; retrying in {backoff:?}");
                        self.failed(WatchHealth::of_error(&e)).await;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            let mut stream = match self.registry.watch_subnets(self.revision + 1).await {
                Ok(s) => s,
                Err(e) => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    log::warn!("watching subnet leases: {e}; retrying in {backoff:?}");
                    self.failed(WatchHealth::of_error(&e)).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            progress.tick().await;
            // Progress requests sent since etcd last said anything.
            let mut unanswered = 0u32;
            let end = loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = progress.tick() => {
                        if unanswered >= 2 {
                            log::warn!("subnet watch: no answer to progress requests; reconnecting");
                            break StreamEnd::Broken(WatchHealth::Stalled);
                        }
                        unanswered += 1;
                        if let Err(e) = stream.request_progress().await {
                            log::warn!("subnet watch: requesting progress: {e}");
                            break StreamEnd::Broken(WatchHealth::Unavailable);
                        }
                        continue;
                    }
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break StreamEnd::Broken(WatchHealth::Unavailable),
                    Err(e) => {
                        log::warn!("subnet watch broke: {e}");
                        break StreamEnd::Broken(WatchHealth::of_etcd_error(&e));
                    }
                };
                unanswered = 0;
                progress.reset();
                if resp.compact_revision() > 0 {
                    log::warn!(
                        "subnet watch: revision {} is compacted (oldest {}); re-listing",
                        self.revision + 1,
                        resp.compact_revision()
                    );
                    break StreamEnd::Compacted;
                }
                if resp.canceled() {
                    let reason = resp.cancel_reason();
                    log::warn!("subnet watch canceled by etcd: {reason}");
                    let health = if reason.contains("permission denied") || reason.contains("auth")
                    {
                        WatchHealth::Unauthenticated
                    } else if reason.contains("no leader") {
                        WatchHealth::NoLeader
                    } else {
                        WatchHealth::Unavailable
                    };
                    break StreamEnd::Broken(health);
                }
                if self.stats.health() != WatchHealth::Up {
                    self.stats.set_health(WatchHealth::Up);
                }
                backoff = BACKOFF_MIN;
                let updates = self.apply_events(resp.events());
                for u in updates {
                    if tx.send(u).await.is_err() {
                        return;
                    }
                }
            };
            match end {
                StreamEnd::Compacted => need_relist = true,
                StreamEnd::Broken(health) => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.failed(health).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    fn set_revision(&mut self, revision: i64) {
        if revision > self.revision {
            self.revision = revision;
            self.stats.revision.store(revision, Ordering::Relaxed);
        }
    }

    /// Turn one watch response into updates, keeping the view in step.
    fn apply_events(&mut self, events: &[etcd_client::Event]) -> Vec<WatchUpdate> {
        let mut peers = Vec::new();
        let mut updates = Vec::new();
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            self.set_revision(kv.mod_revision());
            let Some(key) = self.registry.parse_key(kv.key()) else {
                log::warn!(
                    "ignoring etcd key {}: not a subnet key",
                    String::from_utf8_lossy(kv.key())
                );
                continue;
            };
            let lease = match ev.event_type() {
                EventType::Put => {
                    self.registry
                        .parse_kv(kv.key(), kv.value(), kv.lease(), kv.mod_revision())
                }
                // A malformed value replaced what was there: etcd no longer holds a valid lease.
                EventType::Delete => None,
            };
            if key == self.own {
                if self.own_lease.as_ref() != lease.as_ref() {
                    self.own_lease = lease.clone();
                    updates.push(WatchUpdate::OwnKey(lease));
                }
                continue;
            }
            let lease = lease.filter(|l| self.admit(kv.key(), l));
            match lease {
                Some(l) => {
                    let changed = self.view.get(&key).is_none_or(|old| !old.same_content(&l));
                    self.view.insert(key, l.clone());
                    if changed {
                        peers.push(PeerEvent::Added(l));
                    }
                }
                None => {
                    if let Some(old) = self.view.remove(&key) {
                        peers.push(PeerEvent::Removed(old));
                    }
                }
            }
        }
        if !peers.is_empty() {
            updates.insert(0, WatchUpdate::Peers(peers));
        }
        updates
    }

    /// Re-read everything and emit the difference from the current view.
    async fn relist(&mut self) -> Result<Vec<WatchUpdate>, super::RegistryError> {
        let listing = self.registry.list_leases().await?;
        self.stats.relists.fetch_add(1, Ordering::Relaxed);
        // Resume after the listing even if it went backwards (a restored etcd): it is the truth now.
        self.revision = listing.revision;
        self.stats
            .revision
            .store(listing.revision, Ordering::Relaxed);
        let mut fresh: BTreeMap<SubnetKey, Lease> = BTreeMap::new();
        let mut own = None;
        for l in listing.leases {
            if l.key == self.own {
                own = Some(l);
            } else {
                let name = self.registry.subnet_key(&l.key);
                if self.admit(name.as_bytes(), &l) {
                    fresh.insert(l.key, l);
                }
            }
        }
        let mut events = Vec::new();
        for (key, old) in &self.view {
            if !fresh.contains_key(key) {
                events.push(PeerEvent::Removed(old.clone()));
            }
        }
        for (key, l) in &fresh {
            if self.view.get(key).is_none_or(|old| !old.same_content(l)) {
                events.push(PeerEvent::Added(l.clone()));
            }
        }
        self.view = fresh;
        let mut updates = vec![WatchUpdate::Peers(events)];
        if own.as_ref() != self.own_lease.as_ref() || self.own_lease.is_none() {
            self.own_lease = own.clone();
            updates.push(WatchUpdate::OwnKey(own));
        }
        Ok(updates)
    }
}

#[cfg(test)]
mod tests {
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
}
