//! What the agent publishes about itself — readiness, its own lease, the peer view and the
//! watch's health — for `/readyz`, `/peers` and `/metrics`. Writers are the lease keeper, the
//! backend network and the watch; readers never see a lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::br_netfilter::BridgeNetfilter;
use crate::lease::{Lease, SubnetKey};
use crate::repair::{Repair, Repairs};
use crate::subnet::watch::{PeerEvent, WatchStats};

#[derive(Default)]
pub struct AgentStatus {
    ready: AtomicBool,
    own: RwLock<Option<Lease>>,
    peers: RwLock<BTreeMap<SubnetKey, Lease>>,
    watch: Arc<WatchStats>,
    /// Unix time our lease expires unless renewed; 0 for a reservation (or no lease yet).
    lease_expiry: AtomicI64,
    /// What the start-up check found (iptables mode only).
    bridge_netfilter: OnceLock<Vec<BridgeNetfilter>>,
    /// How often the backend's resync repaired each thing.
    repairs: Mutex<BTreeMap<Repair, u64>>,
}

impl AgentStatus {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The first full peer listing is applied: the node serves its overlay.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn own(&self) -> Option<Lease> {
        self.own.read().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn set_own(&self, lease: &Lease) {
        *self.own.write().unwrap_or_else(|e| e.into_inner()) = Some(lease.clone());
    }

    /// The watch's counters and health (shared with the watcher, which updates them).
    pub fn watch(&self) -> &Arc<WatchStats> {
        &self.watch
    }

    /// Records that `lease` was just acquired or renewed with `ttl`.
    pub fn set_lease_expiry(&self, lease: &Lease, ttl: Duration) {
        let expiry = if lease.is_reservation() {
            0
        } else {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            i64::try_from((now + ttl).as_secs()).unwrap_or(i64::MAX)
        };
        self.lease_expiry.store(expiry, Ordering::Relaxed);
    }

    pub fn lease_expiry(&self) -> i64 {
        self.lease_expiry.load(Ordering::Relaxed)
    }

    /// Records the start-up `br_netfilter` check (the first call wins: it runs once).
    pub fn set_bridge_netfilter(&self, checks: Vec<BridgeNetfilter>) {
        let _ = self.bridge_netfilter.set(checks);
    }

    /// The `br_netfilter` check, if one ran (not in nftables mode).
    pub fn bridge_netfilter(&self) -> Option<&[BridgeNetfilter]> {
        self.bridge_netfilter.get().map(Vec::as_slice)
    }

    /// Counts what a resync repaired.
    pub fn count_repairs(&self, repaired: &Repairs) {
        if repaired.is_empty() {
            return;
        }
        let mut counts = self.repairs.lock().unwrap_or_else(|e| e.into_inner());
        for what in repaired.iter() {
            *counts.entry(what).or_default() += 1;
        }
    }

    /// How often each thing was repaired (only those repaired at least once).
    pub fn repairs(&self) -> Vec<(Repair, u64)> {
        let counts = self.repairs.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(w, n)| (*w, *n)).collect()
    }

    /// Follow peer changes in the published view.
    pub fn apply_peer_events(&self, events: &[PeerEvent]) {
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        for ev in events {
            match ev {
                PeerEvent::Added(l) => {
                    peers.insert(l.key, l.clone());
                }
                PeerEvent::Removed(l) => {
                    peers.remove(&l.key);
                }
            }
        }
    }

    /// The peer view, by subnet.
    pub fn peers(&self) -> Vec<Lease> {
        self.peers
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn peer_count(&self) -> usize {
        self.peers.read().map(|p| p.len()).unwrap_or(0)
    }

    /// `/peers`: the view as upstream-style lease JSON.
    pub fn peers_json(&self) -> String {
        let items: Vec<String> = self
            .peers()
            .iter()
            .map(|l| {
                format!(
                    "{{\"Subnet\":\"{}\",\"Lease\":{}}}",
                    l.key.subnet_text(),
                    l.attrs.to_json()
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }
}

impl crate::subnet::lease_keeper::OwnLeaseSink for AgentStatus {
    fn set_own(&self, lease: &Lease) {
        AgentStatus::set_own(self, lease)
    }
    fn set_lease_expiry(&self, lease: &Lease, ttl: Duration) {
        AgentStatus::set_lease_expiry(self, lease, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseAttrs, SubnetKey};
    use std::net::Ipv4Addr;

    fn lease(subnet: &str, etcd_lease: i64) -> Lease {
        Lease {
            key: SubnetKey::new(subnet.parse().expect("test constant")),
            attrs: LeaseAttrs::new(Ipv4Addr::new(192, 0, 2, 9)),
            etcd_lease,
            mod_revision: 1,
        }
    }

    #[test]
    fn peer_view_follows_events_and_renders_as_json() {
        let status = AgentStatus::default();
        let (a, b) = (lease("10.244.2.0/24", 5), lease("10.244.3.0/24", 5));
        status.apply_peer_events(&[PeerEvent::Added(a.clone()), PeerEvent::Added(b.clone())]);
        status.apply_peer_events(&[PeerEvent::Removed(a)]);
        assert_eq!(status.peers(), vec![b]);
        assert_eq!(
            status.peers_json(),
            r#"[{"Subnet":"10.244.3.0/24","Lease":{"PublicIP":"192.0.2.9","PublicIPv6":null}}]"#
        );
    }

    #[test]
    fn reservations_never_expire() {
        let status = AgentStatus::default();
        status.set_lease_expiry(&lease("10.244.1.0/24", 0), Duration::from_secs(60));
        assert_eq!(status.lease_expiry(), 0);
    }
}
