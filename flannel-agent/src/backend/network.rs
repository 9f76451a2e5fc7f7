//! The running backend for our lease (upstream's `backend.Network`): its own loop applies peer
//! changes in etcd order, reconciles once after the first full listing, repairs what it
//! installed every few seconds and answers the sampler's requests for counters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{AnyNetwork, BackendNetwork};
use crate::status::AgentStatus;
use crate::subnet::PeerEvent;

/// A request for the running data plane's counters (answered None: no data plane of its own).
pub type StatsRequest = tokio::sync::oneshot::Sender<Option<super::DataplaneSample>>;

const RESYNC_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("lease watch ended")]
    WatchEnded,
}

/// Generic so that the loop can be tested without a kernel; the agent runs an `AnyNetwork`.
pub struct Network<N = AnyNetwork> {
    backend: N,
    status: Arc<AgentStatus>,
}

impl<N: BackendNetwork> Network<N> {
    /// `backend`: what `Backend::start` handed back for our lease.
    pub fn new(backend: N, status: Arc<AgentStatus>) -> Self {
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
                    let mut repaired = super::Repairs::default();
                    let result = self.backend.resync(&mut repaired).await;
                    self.status.count_repairs(&repaired);
                    if let Err(e) = result {
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
        let subnet = self.status.own().map(|l| l.key.subnet_text());
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
                    l.key.subnet_text(),
                    l.attrs.owner(),
                    if l.is_reservation() {
                        "(reservation)"
                    } else {
                        ""
                    }
                ),
                PeerEvent::Removed(l) => {
                    log::info!(
                        "peer {} at {} removed",
                        l.key.subnet_text(),
                        l.attrs.owner()
                    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A network that records which calls the loop made, in order.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<&'static str>>>);

    impl Recorder {
        fn push(&self, call: &'static str) -> anyhow::Result<()> {
            self.0.lock().unwrap().push(call);
            Ok(())
        }
        fn calls(&self) -> Vec<&'static str> {
            self.0.lock().unwrap().clone()
        }
    }

    impl BackendNetwork for Recorder {
        async fn handle_events(&mut self, _events: &[PeerEvent]) -> anyhow::Result<()> {
            self.push("handle_events")
        }
        async fn sync_peers(&mut self, _peers: &[crate::lease::Lease]) -> anyhow::Result<()> {
            self.push("sync_peers")
        }
        async fn resync(&mut self, repaired: &mut super::super::Repairs) -> anyhow::Result<()> {
            repaired.note(super::super::Repair::PeerMap);
            self.push("resync")
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resync_runs_only_after_the_first_listing_is_reconciled() {
        let network = Recorder::default();
        let status = Arc::new(AgentStatus::default());
        let (peers_tx, peers_rx) = mpsc::channel(4);
        let (_stats_tx, stats_rx) = mpsc::channel(1);
        let task =
            tokio::spawn(Network::new(network.clone(), status.clone()).run(peers_rx, stats_rx));

        // A slow first listing: no resync (it would prune against an empty view), not ready.
        tokio::time::sleep(3 * RESYNC_INTERVAL).await;
        assert_eq!(network.calls(), Vec::<&str>::new());
        assert!(!status.is_ready());

        peers_tx.send(Vec::new()).await.unwrap();
        tokio::time::sleep(RESYNC_INTERVAL + Duration::from_secs(1)).await;
        let calls = network.calls();
        assert_eq!(calls[..2], ["handle_events", "sync_peers"], "{calls:?}");
        assert!(status.is_ready());
        // Then the periodic repair: one for the ticks missed while waiting, one a period later.
        assert_eq!(calls[2..], ["resync", "resync"], "{calls:?}");
        // What the resyncs repaired is counted.
        assert_eq!(
            status.repairs(),
            vec![(super::super::Repair::PeerMap, 2)],
            "{calls:?}"
        );

        drop(peers_tx);
        assert!(matches!(task.await.unwrap(), Err(NetworkError::WatchEnded)));
    }
}
