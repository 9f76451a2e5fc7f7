//! Our own lease: acquire, renew (one etcd lease per node, never leaked), and reclaim when our
//! key disappears — without ever taking a subnet etcd now gives to someone else.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use rand::Rng;

use super::allocate::{choose, Choice, Previous};
use super::registry::{Registry, RegistryError};
use crate::config::NetworkConfig;
use crate::lease::{Lease, LeaseAttrs, SubnetKey};

const MAX_ATTEMPTS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("no free subnet left in {min}..{max} of the network config")]
    NoFreeSubnet { min: Ipv4Addr, max: Ipv4Addr },
    #[error("could not acquire a subnet after {0} attempts (too many conflicting writers)")]
    TooManyConflicts(usize),
    #[error("our subnet lease {} was deleted from etcd: exiting so that a restart acquires a lease afresh", .0.subnet_text())]
    DeletedByHand(SubnetKey),
    #[error("subnet {} is now leased to {owner}: refusing to keep using it", .subnet.subnet_text())]
    SubnetTaken { subnet: SubnetKey, owner: IpAddr },
}

/// The lease this node holds.
pub type OwnLease = Lease;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewOutcome {
    Renewed,
    /// The etcd lease expired or was revoked: the key is gone.
    Lost,
}

pub struct LeaseManager<R: Registry> {
    registry: R,
    config: NetworkConfig,
    attrs: LeaseAttrs,
    ttl: Duration,
    renew_margin: Duration,
}

impl<R: Registry> LeaseManager<R> {
    pub fn new(
        registry: R,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        renew_margin: Duration,
    ) -> Self {
        LeaseManager {
            registry,
            config,
            attrs,
            ttl,
            renew_margin,
        }
    }

    pub fn attrs(&self) -> &LeaseAttrs {
        &self.attrs
    }

    /// How often to refresh the etcd lease: upstream renews `margin` before expiry; with short
    /// TTLs (tests) a third of the TTL keeps several tries before expiry.
    pub fn renew_interval(&self) -> Duration {
        let third = self.ttl / 3;
        match self.ttl.checked_sub(self.renew_margin) {
            Some(d) if d > Duration::ZERO => d.min(third),
            _ => third,
        }
        .max(Duration::from_millis(500))
    }

    pub async fn acquire(&self, previous: Previous) -> Result<OwnLease, ManagerError> {
        let owner = self.attrs.owner();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // Conflicts mean others are writing right now: spread the retries.
                let ms = rand::thread_rng().gen_range(5..50);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let listing = self.registry.list_leases().await?;
            let choice = choose(
                &self.config,
                &listing.leases,
                owner,
                previous,
                &mut rand::thread_rng(),
            );
            match choice {
                None => {
                    return Err(ManagerError::NoFreeSubnet {
                        min: self.config.subnet_min,
                        max: self.config.subnet_max,
                    })
                }
                Some(Choice::Existing(old)) if old.is_reservation() => {
                    if old.attrs != self.attrs
                        && !self
                            .registry
                            .replace_if_unchanged(&old.key, &self.attrs, 0, old.mod_revision)
                            .await?
                    {
                        continue;
                    }
                    log::info!("using reserved subnet {}", old.key.subnet_text());
                    return Ok(Lease {
                        attrs: self.attrs.clone(),
                        ..old
                    });
                }
                Some(Choice::Existing(old)) => {
                    let id = self.registry.grant(self.ttl).await?;
                    if self
                        .registry
                        .replace_if_unchanged(&old.key, &self.attrs, id, old.mod_revision)
                        .await?
                    {
                        // The old etcd lease now holds nothing: drop it so none leaks.
                        if let Err(e) = self.registry.revoke(old.etcd_lease).await {
                            log::warn!("revoking previous etcd lease {:x}: {e}", old.etcd_lease);
                        }
                        log::info!("reusing our existing lease {}", old.key.subnet_text());
                        return Ok(Lease {
                            attrs: self.attrs.clone(),
                            etcd_lease: id,
                            ..old
                        });
                    }
                    self.revoke_quietly(id).await;
                }
                Some(Choice::Free(key)) => {
                    let id = self.registry.grant(self.ttl).await?;
                    let subnet = match key.ipv6 {
                        Some(v6) if !key.is_ipv6_only() => format!("{} and {v6}", key.ipv4),
                        _ => key.subnet_text(),
                    };
                    if self
                        .registry
                        .create_if_absent(&key, &self.attrs, id)
                        .await?
                    {
                        log::info!("acquired new lease {subnet}");
                        return Ok(Lease {
                            key,
                            attrs: self.attrs.clone(),
                            etcd_lease: id,
                            mod_revision: 0,
                        });
                    }
                    self.revoke_quietly(id).await;
                }
            }
        }
        Err(ManagerError::TooManyConflicts(MAX_ATTEMPTS))
    }

    async fn revoke_quietly(&self, id: i64) {
        if let Err(e) = self.registry.revoke(id).await {
            log::warn!("revoking unused etcd lease {id:x}: {e}");
        }
    }

    /// Refresh our etcd lease (reservations need nothing).
    pub async fn renew(&self, own: &OwnLease) -> Result<RenewOutcome, ManagerError> {
        if own.is_reservation() {
            return Ok(RenewOutcome::Renewed);
        }
        Ok(match self.registry.keep_alive_once(own.etcd_lease).await? {
            ttl if ttl > 0 => RenewOutcome::Renewed,
            _ => RenewOutcome::Lost,
        })
    }

    /// Our key was deleted or expired: put it back if, and only if, nobody else took it.
    pub async fn reclaim(&self, own: &OwnLease) -> Result<OwnLease, ManagerError> {
        let mut id = own.etcd_lease;
        if id != 0 && self.registry.keep_alive_once(id).await? <= 0 {
            id = self.registry.grant(self.ttl).await?;
        }
        if self
            .registry
            .create_if_absent(&own.key, &self.attrs, id)
            .await?
        {
            log::warn!(
                "our lease {} had disappeared from etcd; re-created it",
                own.key.subnet_text()
            );
            return Ok(Lease {
                etcd_lease: id,
                attrs: self.attrs.clone(),
                ..own.clone()
            });
        }
        if id != own.etcd_lease {
            self.revoke_quietly(id).await;
        }
        match self.registry.get_lease(&own.key).await? {
            Some(current) if current.attrs.owner() == self.attrs.owner() => Ok(current),
            Some(current) => Err(ManagerError::SubnetTaken {
                subnet: own.key,
                owner: current.attrs.owner(),
            }),
            // Deleted again in between, or malformed: try once more later.
            None => Ok(own.clone()),
        }
    }

    /// Give the lease back (not done on normal shutdown: a restart reuses it).
    pub async fn release(&self, own: &OwnLease) -> Result<(), ManagerError> {
        if !own.is_reservation() {
            self.registry.revoke(own.etcd_lease).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
