//! Keeping our own lease, as one task: acquire at start, renew before expiry, put the key back
//! when it expired, exit when an operator deleted it or another node now holds our subnet.

use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::manager::{LeaseManager, ManagerError, RenewOutcome};
use super::registry::Registry;
use crate::lease::Lease;

/// Pause before the next try after a renewal or reclaim failed for a reason that may pass.
const RETRY: Duration = Duration::from_secs(1);

/// Why the agent must stop using its subnet.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Deleted by hand, or taken by another node while we could not put it back.
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error("our subnet {} is now leased to {owner}: exiting rather than using it", .subnet.subnet_text())]
    TakenOver {
        subnet: crate::lease::SubnetKey,
        owner: std::net::IpAddr,
    },
    #[error("lease watch ended")]
    WatchEnded,
}

/// Where the keeper publishes our lease for health and metrics (the agent's status), so that
/// the control plane does not depend on what reads it.
pub trait OwnLeaseSink: Send + Sync {
    fn set_own(&self, lease: &Lease);
    fn set_lease_expiry(&self, lease: &Lease, ttl: Duration);
}

pub struct LeaseKeeper<R: Registry> {
    manager: LeaseManager<R>,
    registry: R,
    status: Arc<dyn OwnLeaseSink>,
    ttl: Duration,
}

impl<R: Registry> LeaseKeeper<R> {
    pub fn new(
        manager: LeaseManager<R>,
        registry: R,
        status: Arc<dyn OwnLeaseSink>,
        ttl: Duration,
    ) -> Self {
        LeaseKeeper {
            manager,
            registry,
            status,
            ttl,
        }
    }

    /// Our lease, retrying while etcd is unreachable or contended; a full network is final.
    pub async fn acquire(
        &self,
        previous: super::allocate::Previous,
    ) -> Result<Lease, ManagerError> {
        let own = crate::retry::with_backoff(
            "acquiring a subnet lease",
            |e: &ManagerError| match e {
                ManagerError::Registry(r) => self.registry.explain(r),
                other => crate::error_line::one_line(other),
            },
            |e| matches!(e, ManagerError::NoFreeSubnet { .. }),
            || self.manager.acquire(previous),
        )
        .await?;
        log::info!("lease acquired: {}", own.key.subnet_text());
        self.kept(&own);
        Ok(own)
    }

    /// Published after each acquire, renewal or reclaim.
    fn kept(&self, own: &Lease) {
        self.status.set_own(own);
        self.status.set_lease_expiry(own, self.ttl);
    }

    /// Renew `own` and follow what the watch says of our key (`None`: gone) until the subnet
    /// must be given up (the error says why).
    /// `subnet` tells what follows our subnet (firewall rules, blackhole route) of a change.
    pub async fn run(
        self,
        mut own: Lease,
        mut own_key: mpsc::Receiver<Option<Lease>>,
        subnet: watch::Sender<Ipv4Network>,
    ) -> Result<(), KeeperError> {
        let mut renew_at = Instant::now() + self.manager.renew_interval();
        // Our key is gone and putting it back failed for a reason that may pass (etcd down):
        // the renewal timer retries the reclaim instead of renewing.
        let mut reclaim_pending = false;
        loop {
            tokio::select! {
                update = own_key.recv() => {
                    match update.ok_or(KeeperError::WatchEnded)? {
                        None => match self.own_key_gone(&own).await {
                            Ok(l) => {
                                own = l;
                                reclaim_pending = false;
                                self.status.set_lease_expiry(&own, self.ttl);
                            }
                            Err(e) => {
                                let e = fatal(e)?;
                                log::warn!("putting our lease {} back: {e}; retrying", own.key.subnet_text());
                                reclaim_pending = true;
                                renew_at = Instant::now() + RETRY;
                            }
                        },
                        Some(current) => {
                            if current.attrs.owner() != own.attrs.owner() {
                                return Err(KeeperError::TakenOver {
                                    subnet: own.key,
                                    owner: current.attrs.owner(),
                                });
                            }
                            own = current;
                        }
                    }
                    self.status.set_own(&own);
                }
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = Instant::now() + self.renew_or_reclaim(&mut own, &mut reclaim_pending).await?;
                }
            }
            subnet.send_if_modified(|s| std::mem::replace(s, own.subnet()) != own.subnet());
        }
    }

    /// One renewal (or pending reclaim); how long until the next.
    async fn renew_or_reclaim(
        &self,
        own: &mut Lease,
        reclaim_pending: &mut bool,
    ) -> Result<Duration, KeeperError> {
        let outcome = if *reclaim_pending {
            Ok(RenewOutcome::Lost)
        } else {
            self.manager.renew(own).await
        };
        match outcome {
            Ok(RenewOutcome::Renewed) => {
                self.status.set_lease_expiry(own, self.ttl);
                Ok(self.manager.renew_interval())
            }
            Ok(RenewOutcome::Lost) => {
                if !*reclaim_pending {
                    log::warn!(
                        "our etcd lease for {} expired or was revoked",
                        own.key.subnet_text()
                    );
                }
                match self.manager.reclaim(own).await {
                    Ok(l) => {
                        *own = l;
                        *reclaim_pending = false;
                        self.kept(own);
                        Ok(self.manager.renew_interval())
                    }
                    Err(e) => {
                        let e = fatal(e)?;
                        log::warn!(
                            "putting our lease {} back: {e}; retrying",
                            own.key.subnet_text()
                        );
                        *reclaim_pending = true;
                        Ok(RETRY)
                    }
                }
            }
            Err(e) => {
                log::warn!("renewing lease {}: {e}; retrying", own.key.subnet_text());
                Ok(RETRY)
            }
        }
    }

    /// Our key is gone. Deleted by hand while our etcd lease lives: the operator wants us off
    /// it, so exit as upstream does (a restart acquires afresh). Expired: put it back if free.
    async fn own_key_gone(&self, own: &Lease) -> Result<Lease, ManagerError> {
        // The event may be stale: the renewal path can already have put the key back.
        if let Ok(Some(current)) = self.registry.get_lease(&own.key).await {
            if current.attrs.owner() == own.attrs.owner() {
                return Ok(current);
            }
        }
        if !own.is_reservation()
            && self
                .registry
                .keep_alive_once(own.etcd_lease)
                .await
                .unwrap_or(0)
                > 0
        {
            if let Err(e) = self.manager.release(own).await {
                log::warn!("revoking our etcd lease: {e}");
            }
            return Err(ManagerError::DeletedByHand(own.key));
        }
        self.manager.reclaim(own).await
    }
}

/// Exit (the error) when our subnet was deleted by hand or now belongs to someone else;
/// anything else is passed back to be retried.
fn fatal(e: ManagerError) -> Result<ManagerError, KeeperError> {
    match e {
        e @ (ManagerError::SubnetTaken { .. } | ManagerError::DeletedByHand(_)) => Err(e.into()),
        e => Ok(e),
    }
}

#[cfg(test)]
mod tests;
