//! The running backend for our lease (upstream's `backend.Network`): its own loop applies peer
//! changes in etcd order, reconciles once after the first full listing, repairs what it
//! installed every few seconds and answers the sampler's requests for counters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{AnyNetwork, BackendNetwork};
use crate::sampling::StatsRequest;
use crate::status::AgentStatus;
use crate::subnet::PeerEvent;

const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("lease watch ended")]
    WatchEnded,
}

pub struct Network {
    backend: AnyNetwork,
    status: Arc<AgentStatus>,
}

impl Network {
    /// `backend`: what `Backend::start` handed back for our lease.
    pub fn new(backend: AnyNetwork, status: Arc<AgentStatus>) -> Self {
        Network { backend, status }
    }

    /// Run until the watch ends.
    pub async fn run(
        mut self,
        mut peers: mpsc::Receiver<Vec<PeerEvent>>,
        mut stats: mpsc::Receiver<StatsRequest>,
    ) -> Result<(), NetworkError> {
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        // The ticks missed while waiting for the listing make one resync, not a burst.
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listed = false;
        loop {
            tokio::select! {
                // Peer changes first when several things are due.
                biased;
                events = peers.recv() => {
                    self.apply(&events.ok_or(NetworkError::WatchEnded)?).await;
                    if !listed {
                        self.first_listing_applied().await;
                        listed = true;
                    }
                }
                Some(reply) = stats.recv() => {
                    // The sampler may have given up waiting; nothing to do then.
                    let _ = reply.send(self.backend.stats());
                }
                // Only with the full peer view may a resync drop what no peer owns.
                _ = resync.tick(), if listed => {
                    if let Err(e) = self.backend.resync().await {
                        log::warn!("backend resync: {e:#}");
                    }
                }
            }
        }
    }

    /// The first listing is the full view: drop what a previous agent left installed for
    /// peers that went away while it was down, then say we are ready.
    async fn first_listing_applied(&mut self) {
        if let Err(e) = self.backend.sync_peers(&self.status.peers()).await {
            log::warn!("reconciling peers after start: {e:#}");
        }
        self.status.set_ready();
        crate::notify::ready();
        let subnet = self.status.own().map(|l| l.subnet().to_string());
        log::info!(
            "running: subnet {}, {} peers",
            subnet.unwrap_or_default(),
            self.status.peer_count()
        );
    }

    async fn apply(&mut self, events: &[PeerEvent]) {
        for ev in events {
            match ev {
                PeerEvent::Added(l) => log::info!(
                    "peer {} at {} {}",
                    l.subnet(),
                    l.attrs.public_ip,
                    if l.is_reservation() {
                        "(reservation)"
                    } else {
                        ""
                    }
                ),
                PeerEvent::Removed(l) => {
                    log::info!("peer {} at {} removed", l.subnet(), l.attrs.public_ip)
                }
            }
        }
        // The backend logs and counts its own failures; the view follows etcd regardless, and
        // the periodic resync repairs what could not be applied.
        if let Err(e) = self.backend.handle_events(events).await {
            log::warn!("applying peer changes: {e:#}");
        }
        self.status.apply_peer_events(events);
    }
}
