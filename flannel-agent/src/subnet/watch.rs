//! The watch of `<prefix>/subnets/`: every event of every response, resumed at the last seen
//! revision + 1, re-listed and reconciled after compaction, reconnected with backoff. The
//! contract: after any sequence of events and outages, the view equals etcd's content.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;
use tokio::sync::mpsc;

use super::registry::EtcdRegistry;
use crate::lease::{Lease, SubnetKey};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

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

/// Counters an operator can read (metrics).
#[derive(Debug, Default)]
pub struct WatchStats {
    pub reconnects: AtomicU64,
    pub relists: AtomicU64,
    pub revision: AtomicI64,
}

pub struct PeerWatcher {
    registry: EtcdRegistry,
    own: SubnetKey,
    view: BTreeMap<SubnetKey, Lease>,
    own_lease: Option<Lease>,
    revision: i64,
    stats: Arc<WatchStats>,
}

enum StreamEnd {
    /// The stream broke (etcd down, network): resume from the last revision.
    Broken,
    /// History we need is compacted away: re-list.
    Compacted,
}

impl PeerWatcher {
    pub fn new(registry: EtcdRegistry, own: SubnetKey, stats: Arc<WatchStats>) -> Self {
        PeerWatcher {
            registry,
            own,
            view: BTreeMap::new(),
            own_lease: None,
            revision: 0,
            stats,
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
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let end = loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break StreamEnd::Broken,
                    Err(e) => {
                        log::warn!("subnet watch broke: {e}");
                        break StreamEnd::Broken;
                    }
                };
                if resp.compact_revision() > 0 {
                    log::warn!(
                        "subnet watch: revision {} is compacted (oldest {}); re-listing",
                        self.revision + 1,
                        resp.compact_revision()
                    );
                    break StreamEnd::Compacted;
                }
                if resp.canceled() {
                    log::warn!("subnet watch canceled by etcd: {}", resp.cancel_reason());
                    break StreamEnd::Broken;
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
                StreamEnd::Broken => {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
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
                fresh.insert(l.key, l);
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
