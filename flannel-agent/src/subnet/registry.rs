//! The registry seam: what the lease manager and the peer watch need from the store of
//! flannel's subnet leases. [`EtcdRegistry`](super::etcd::EtcdRegistry) is the real one;
//! [`MemoryRegistry`](super::memory::MemoryRegistry) keeps the same contract in memory so the
//! control-plane logic is unit-tested without root or etcd.

use std::future::Future;
use std::time::Duration;

use crate::lease::{Lease, LeaseAttrs, SubnetKey};

pub use super::etcd::{explain_with, ConfigState, EtcdRegistry, EtcdSettings, RegistryError};

/// A listing of all subnet keys at one revision.
#[derive(Debug, Clone, Default)]
pub struct LeaseListing {
    pub leases: Vec<Lease>,
    pub revision: i64,
}

/// One change to a key under `<prefix>/subnets/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetChange {
    /// The full key, for log lines.
    pub name: String,
    pub mod_revision: i64,
    /// `None`: the key is not a subnet key.
    pub key: Option<SubnetKey>,
    /// The lease now stored; `None` when deleted or when the new value is malformed.
    pub lease: Option<Lease>,
}

/// One message of a subnet watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchResponse {
    /// Non-zero: the requested start revision is compacted away (oldest kept revision).
    pub compact_revision: i64,
    /// The store ended the watch, and why.
    pub canceled: Option<String>,
    /// In store order; empty for a progress notification.
    pub events: Vec<SubnetChange>,
}

/// A stream of changes under `<prefix>/subnets/` from some revision on.
pub trait SubnetWatch: Send {
    /// The next message; `Ok(None)` when the stream ended.
    fn message(
        &mut self,
    ) -> impl Future<Output = Result<Option<WatchResponse>, RegistryError>> + Send;
    /// Ask for a progress notification (answered with an empty message).
    fn request_progress(&mut self) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// A watch on `<prefix>/config` from some revision on.
pub trait ConfigWatch: Send {
    /// Resolves once the config key changed: `Ok(true)`; `Ok(false)` when the stream ended,
    /// `Err` when it broke.
    fn changed(&mut self) -> impl Future<Output = Result<bool, RegistryError>> + Send;
}

/// Subnet leases with TTLs, compare-and-set writes and a watch: the operations flannel's
/// subnet manager uses on etcd; and the network config next to them.
pub trait Registry: Clone + Send + Sync + 'static {
    type Watch: SubnetWatch;
    type ConfigWatch: ConfigWatch;

    /// The `--etcd-prefix` in use (without a trailing slash).
    fn prefix(&self) -> &str;
    /// The full key name of the network config.
    fn config_key(&self) -> String {
        format!("{}/config", self.prefix())
    }
    /// The config as it is now, and the revision it was read at.
    fn read_config(&self)
        -> impl Future<Output = Result<(ConfigState, i64), RegistryError>> + Send;
    /// Watch the config key from `start_revision` on.
    fn watch_config(
        &self,
        start_revision: i64,
    ) -> impl Future<Output = Result<Self::ConfigWatch, RegistryError>> + Send;

    /// The full key name of a subnet (for log lines and the sanity check).
    fn subnet_key(&self, key: &SubnetKey) -> String;
    /// Whether we log in (tokens to refresh).
    fn authenticated(&self) -> bool;
    /// One line for an error from this registry.
    fn explain(&self, err: &RegistryError) -> String;
    /// Get a fresh auth token (streams do not refresh it by themselves).
    fn refresh_token(&self) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// All subnet leases (malformed ones skipped with a warning) and the revision read at.
    fn list_leases(&self) -> impl Future<Output = Result<LeaseListing, RegistryError>> + Send;
    /// Current value of one subnet key.
    fn get_lease(
        &self,
        key: &SubnetKey,
    ) -> impl Future<Output = Result<Option<Lease>, RegistryError>> + Send;
    /// A new TTL lease; its id.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<i64, RegistryError>> + Send;
    /// Drop a TTL lease and the keys attached to it (already gone is fine).
    fn revoke(&self, etcd_lease: i64) -> impl Future<Output = Result<(), RegistryError>> + Send;
    /// Refresh a TTL lease once: the new TTL in seconds, 0 if the lease is gone.
    fn keep_alive_once(
        &self,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<i64, RegistryError>> + Send;
    /// Create `key` only if it does not exist.
    fn create_if_absent(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Replace `key` only if it is still at `mod_revision`.
    fn replace_if_unchanged(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
        mod_revision: i64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
    /// Watch all subnet keys from `start_revision` on.
    fn watch_subnets(
        &self,
        start_revision: i64,
    ) -> impl Future<Output = Result<Self::Watch, RegistryError>> + Send;
}
