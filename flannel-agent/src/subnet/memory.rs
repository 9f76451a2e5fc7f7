//! An in-memory [`Registry`] with etcd's semantics where flannel relies on them: revisions,
//! TTL leases whose expiry or revocation deletes their keys, compare-and-create and
//! compare-and-replace, a watch from any revision (compacted history refused), and outages.
//! For unit tests of the lease manager and the peer watch; tests drive it with the `put`,
//! `delete`, `expire`, `compact` and `set_down` hooks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use super::etcd::subnet_change;
use super::registry::{
    ConfigState, ConfigWatch, LeaseListing, Registry, RegistryError, SubnetWatch, WatchResponse,
};
use crate::config::NetworkConfig;
use crate::lease::{Lease, LeaseAttrs, SubnetKey};

/// Upstream's default `--etcd-prefix`, which keys are named under.
pub const PREFIX: &str = "/coreos.com/network";
/// The prefix subnet keys are named under.
pub const SUBNETS_PREFIX: &str = "/coreos.com/network/subnets/";

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    etcd_lease: i64,
    mod_revision: i64,
}

/// One revision of history: a put (`Some` value) or a delete.
#[derive(Debug, Clone)]
struct Change {
    revision: i64,
    name: String,
    value: Option<Vec<u8>>,
    etcd_lease: i64,
}

type Hook = Box<dyn FnOnce(&MemoryRegistry) + Send>;

#[derive(Default)]
struct State {
    revision: i64,
    /// History below this revision is gone.
    compacted: i64,
    /// By key name under the prefix (not necessarily a valid subnet key).
    keys: BTreeMap<String, Entry>,
    /// Live TTL leases: id → TTL in seconds.
    leases: BTreeMap<i64, i64>,
    next_lease: i64,
    history: Vec<Change>,
    down: bool,
    /// `<prefix>/config`: its value and mod revision, if present.
    config: Option<(Vec<u8>, i64)>,
    /// Revision of the last write to the config key (put or delete).
    config_revision: i64,
    /// Bumped on each outage: watches opened before it break.
    epoch: u64,
    before_write: Option<Hook>,
}

impl State {
    fn write(&mut self, name: &str, value: Option<Vec<u8>>, etcd_lease: i64) {
        self.revision += 1;
        let revision = self.revision;
        match &value {
            Some(v) => {
                self.keys.insert(
                    name.to_owned(),
                    Entry {
                        value: v.clone(),
                        etcd_lease,
                        mod_revision: revision,
                    },
                );
            }
            None => {
                self.keys.remove(name);
            }
        }
        self.history.push(Change {
            revision,
            name: name.to_owned(),
            value,
            etcd_lease,
        });
    }

    fn drop_lease(&mut self, id: i64) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let attached: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, e)| e.etcd_lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for name in attached {
            self.write(&name, None, 0);
        }
    }

    fn lease(&self, name: &str) -> Option<Lease> {
        let e = self.keys.get(name)?;
        super::etcd::parse_lease(
            SUBNETS_PREFIX,
            format!("{SUBNETS_PREFIX}{name}").as_bytes(),
            &e.value,
            e.etcd_lease,
            e.mod_revision,
        )
    }
}

/// Shared handle: clones see the same store.
#[derive(Clone)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        MemoryRegistry {
            state: Arc::new(Mutex::new(State {
                next_lease: 0x1000,
                ..State::default()
            })),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

fn unavailable() -> RegistryError {
    RegistryError::Unavailable("the in-memory registry is down".into())
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` on the state as one step, waking watches afterwards.
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|g| *g += 1);
        out
    }

    /// The state for one call, or the outage error.
    fn up(&self) -> Result<MutexGuard<'_, State>, RegistryError> {
        let state = self.lock();
        if state.down {
            return Err(unavailable());
        }
        Ok(state)
    }

    fn run_write_hook(&self) {
        let hook = self.lock().before_write.take();
        if let Some(hook) = hook {
            hook(self);
        }
    }

    /// A compare-and-put: writes when `cond` holds for what is stored now.
    fn write_if(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
        cond: impl FnOnce(Option<&Entry>) -> bool,
    ) -> Result<bool, RegistryError> {
        self.run_write_hook();
        drop(self.up()?);
        let name = key.to_string();
        self.mutate(|s| {
            if etcd_lease != 0 && !s.leases.contains_key(&etcd_lease) {
                return Err(RegistryError::Unavailable(
                    "requested lease not found".into(),
                ));
            }
            if !cond(s.keys.get(&name)) {
                return Ok(false);
            }
            s.write(&name, Some(attrs.to_json().into_bytes()), etcd_lease);
            Ok(true)
        })
    }

    /// Store `value` under `<prefix>/subnets/<name>` as another writer would.
    pub fn put_raw(&self, name: &str, value: &[u8], etcd_lease: i64) -> i64 {
        self.mutate(|s| {
            s.write(name, Some(value.to_vec()), etcd_lease);
            s.revision
        })
    }

    /// Store a lease for `key` as another node would.
    pub fn put(&self, key: &SubnetKey, attrs: &LeaseAttrs, etcd_lease: i64) -> i64 {
        self.put_raw(&key.to_string(), attrs.to_json().as_bytes(), etcd_lease)
    }

    /// Delete a key (an operator's `etcdctl del`).
    pub fn delete(&self, key: &SubnetKey) -> i64 {
        self.mutate(|s| {
            s.write(&key.to_string(), None, 0);
            s.revision
        })
    }

    /// Write `<prefix>/config` (an operator's `etcdctl put`); `None` deletes it.
    pub fn set_config(&self, value: Option<&[u8]>) -> i64 {
        self.mutate(|s| {
            s.revision += 1;
            s.config = value.map(|v| (v.to_vec(), s.revision));
            s.config_revision = s.revision;
            s.revision
        })
    }

    /// Grant a TTL lease outside the code under test (another node's).
    pub fn grant_now(&self, ttl_secs: i64) -> i64 {
        self.mutate(|s| {
            let id = s.next_lease;
            s.next_lease += 1;
            s.leases.insert(id, ttl_secs);
            id
        })
    }

    /// Let a TTL lease run out: it and its keys are gone.
    pub fn expire(&self, etcd_lease: i64) {
        self.mutate(|s| s.drop_lease(etcd_lease));
    }

    /// Forget history below `revision` (etcd's compaction).
    pub fn compact(&self, revision: i64) {
        self.mutate(|s| {
            s.compacted = revision;
            s.history.retain(|c| c.revision >= revision);
        });
    }

    /// Start or end an outage: while down every call fails and open watches break.
    pub fn set_down(&self, down: bool) {
        self.mutate(|s| {
            s.down = down;
            if down {
                s.epoch += 1;
            }
        });
    }

    /// Run `f` just before the next compare-and-create or compare-and-replace (a racing
    /// writer between our listing and our write).
    pub fn before_next_write(&self, f: impl FnOnce(&MemoryRegistry) + Send + 'static) {
        self.lock().before_write = Some(Box::new(f));
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// The lease stored for `key` now.
    pub fn lease_of(&self, key: &SubnetKey) -> Option<Lease> {
        self.lock().lease(&key.to_string())
    }

    /// TTL leases alive now (none may leak).
    pub fn live_leases(&self) -> Vec<i64> {
        self.lock().leases.keys().copied().collect()
    }

    /// Number of keys stored.
    pub fn key_count(&self) -> usize {
        self.lock().keys.len()
    }
}

impl Registry for MemoryRegistry {
    type Watch = MemoryWatch;
    type ConfigWatch = MemoryConfigWatch;

    fn prefix(&self) -> &str {
        PREFIX
    }
    async fn read_config(&self) -> Result<(ConfigState, i64), RegistryError> {
        let s = self.up()?;
        let state = match &s.config {
            None => ConfigState::Missing,
            Some((value, mod_revision)) => match NetworkConfig::parse(value) {
                Ok(config) => ConfigState::Valid {
                    config,
                    mod_revision: *mod_revision,
                },
                Err(error) => ConfigState::Invalid {
                    error,
                    mod_revision: *mod_revision,
                },
            },
        };
        Ok((state, s.revision))
    }
    async fn watch_config(&self, start_revision: i64) -> Result<MemoryConfigWatch, RegistryError> {
        let epoch = self.up()?.epoch;
        Ok(MemoryConfigWatch {
            registry: self.clone(),
            changed: self.changed.subscribe(),
            from: start_revision,
            epoch,
        })
    }

    fn subnet_key(&self, key: &SubnetKey) -> String {
        format!("{SUBNETS_PREFIX}{key}")
    }
    fn authenticated(&self) -> bool {
        false
    }
    fn explain(&self, err: &RegistryError) -> String {
        crate::error_line::one_line(err)
    }
    async fn refresh_token(&self) -> Result<(), RegistryError> {
        Ok(())
    }
    async fn list_leases(&self) -> Result<LeaseListing, RegistryError> {
        let s = self.up()?;
        let leases = s.keys.keys().filter_map(|name| s.lease(name)).collect();
        Ok(LeaseListing {
            leases,
            revision: s.revision,
        })
    }
    async fn get_lease(&self, key: &SubnetKey) -> Result<Option<Lease>, RegistryError> {
        Ok(self.up()?.lease(&key.to_string()))
    }
    async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        drop(self.up()?);
        Ok(self.grant_now(ttl.as_secs().max(1) as i64))
    }
    async fn revoke(&self, etcd_lease: i64) -> Result<(), RegistryError> {
        drop(self.up()?);
        self.expire(etcd_lease);
        Ok(())
    }
    async fn keep_alive_once(&self, etcd_lease: i64) -> Result<i64, RegistryError> {
        Ok(self.up()?.leases.get(&etcd_lease).copied().unwrap_or(0))
    }
    async fn create_if_absent(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<bool, RegistryError> {
        // As etcd's `version == 0`: only an absent key.
        self.write_if(key, attrs, etcd_lease, |current| current.is_none())
    }
    async fn replace_if_unchanged(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        // As etcd: an absent key has mod_revision 0.
        self.write_if(key, attrs, etcd_lease, |current| {
            current.map_or(0, |e| e.mod_revision) == mod_revision
        })
    }
    async fn watch_subnets(&self, start_revision: i64) -> Result<MemoryWatch, RegistryError> {
        let epoch = self.up()?.epoch;
        Ok(MemoryWatch {
            registry: self.clone(),
            changed: self.changed.subscribe(),
            next: start_revision,
            epoch,
            progress_requested: false,
            ended: false,
        })
    }
}

/// A watch on the in-memory registry.
pub struct MemoryWatch {
    registry: MemoryRegistry,
    changed: watch::Receiver<u64>,
    next: i64,
    epoch: u64,
    progress_requested: bool,
    ended: bool,
}

impl MemoryWatch {
    /// What is there to say now, if anything.
    fn poll_state(&mut self) -> Option<Result<Option<WatchResponse>, RegistryError>> {
        if self.ended {
            return Some(Ok(None));
        }
        let s = self.registry.lock();
        if s.down || s.epoch != self.epoch {
            return Some(Err(unavailable()));
        }
        if self.next < s.compacted {
            self.ended = true;
            return Some(Ok(Some(WatchResponse {
                compact_revision: s.compacted,
                canceled: None,
                events: Vec::new(),
            })));
        }
        let events: Vec<_> = s
            .history
            .iter()
            .filter(|c| c.revision >= self.next)
            .map(|c| {
                subnet_change(
                    SUBNETS_PREFIX,
                    format!("{SUBNETS_PREFIX}{}", c.name).as_bytes(),
                    c.value.as_deref(),
                    c.etcd_lease,
                    c.revision,
                )
            })
            .collect();
        if let Some(last) = events.last() {
            self.next = last.mod_revision + 1;
            return Some(Ok(Some(WatchResponse {
                events,
                ..WatchResponse::default()
            })));
        }
        if std::mem::take(&mut self.progress_requested) {
            return Some(Ok(Some(WatchResponse::default())));
        }
        None
    }
}

impl SubnetWatch for MemoryWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, RegistryError> {
        loop {
            self.changed.borrow_and_update();
            if let Some(out) = self.poll_state() {
                return out;
            }
            if self.changed.changed().await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn request_progress(&mut self) -> Result<(), RegistryError> {
        drop(self.registry.up()?);
        self.progress_requested = true;
        Ok(())
    }
}

/// A watch on the in-memory config key.
pub struct MemoryConfigWatch {
    registry: MemoryRegistry,
    changed: watch::Receiver<u64>,
    from: i64,
    epoch: u64,
}

impl ConfigWatch for MemoryConfigWatch {
    async fn changed(&mut self) -> Result<bool, RegistryError> {
        loop {
            self.changed.borrow_and_update();
            {
                let s = self.registry.lock();
                if s.down || s.epoch != self.epoch {
                    return Err(unavailable());
                }
                if s.config_revision >= self.from {
                    return Ok(true);
                }
            }
            if self.changed.changed().await.is_err() {
                return Ok(false);
            }
        }
    }
}
