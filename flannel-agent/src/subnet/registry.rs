//! Thin typed access to flannel's keys in etcd v3.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
    WatchStream,
};

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::subnet::etcd_hint::{self, EtcdTarget};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("reading {flag} {path}: {source}")]
    TlsFile {
        flag: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{given} is set but {missing} is not: a client certificate needs both (or neither)")]
    TlsPair {
        given: &'static str,
        missing: &'static str,
    },
    #[error("--etcd-endpoints {0}: https:// needs --etcd-cafile (the CA that signed etcd's certificate)")]
    HttpsWithoutCa(String),
    #[error("--etcd-endpoints: none given")]
    NoEndpoints,
}

impl RegistryError {
    /// A mistake in the flags or files that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::Etcd(e) => etcd_hint::is_local_mistake(e),
            _ => true,
        }
    }
}

/// Connection settings (the `--etcd-*` flags).
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub keyfile: String,
    pub certfile: String,
    pub cafile: String,
    pub username: String,
    pub password: String,
}

/// What `<prefix>/config` holds.
#[derive(Debug, Clone)]
pub enum ConfigState {
    Missing,
    /// Present but unusable; `mod_revision` tells one bad value from the next.
    Invalid {
        error: ConfigError,
        mod_revision: i64,
    },
    Valid {
        config: NetworkConfig,
        mod_revision: i64,
    },
}

impl EtcdSettings {
    /// Where and how we connect, as error messages name it (never the password). With a CA
    /// file, `http://` endpoints are upgraded to `https://`, as upstream's client does.
    pub fn target(&self) -> EtcdTarget {
        EtcdTarget {
            endpoints: self
                .endpoints
                .iter()
                .map(|e| {
                    if self.cafile.is_empty() {
                        e.clone()
                    } else {
                        e.replacen("http://", "https://", 1)
                    }
                })
                .collect(),
            cafile: self.cafile.clone(),
            certfile: self.certfile.clone(),
            keyfile: self.keyfile.clone(),
            username: self.username.clone(),
            prefix: self.prefix.trim_end_matches('/').to_owned(),
        }
    }
}

/// A listing of all subnet keys at one etcd revision.
#[derive(Debug, Clone, Default)]
pub struct LeaseListing {
    pub leases: Vec<Lease>,
    pub revision: i64,
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    /// For error messages: where we talk to and with which flags.
    target: Arc<EtcdTarget>,
}

impl EtcdRegistry {
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, RegistryError> {
        if settings.endpoints.is_empty() {
            return Err(RegistryError::NoEndpoints);
        }
        if settings.cafile.is_empty() {
            if let Some(e) = settings
                .endpoints
                .iter()
                .find(|e| e.starts_with("https://"))
            {
                return Err(RegistryError::HttpsWithoutCa(e.clone()));
            }
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            // HTTP/2 pings notice a dead etcd (or a partition) while a watch is idle.
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if !settings.username.is_empty() {
            opts = opts.with_user(settings.username.clone(), settings.password.clone());
        }
        if !settings.cafile.is_empty()
            || !settings.certfile.is_empty()
            || !settings.keyfile.is_empty()
        {
            opts = opts.with_tls(tls_options(settings)?);
        }
        let target = Arc::new(settings.target());
        let client = Client::connect(target.endpoints.clone(), Some(opts)).await?;
        Ok(EtcdRegistry {
            client,
            prefix: target.prefix.clone(),
            target,
        })
    }

    /// One line for an error from this registry: endpoint, flag or file, likely fix.
    pub fn explain(&self, err: &RegistryError) -> String {
        explain_with(err, &self.target)
    }

    /// The `--etcd-prefix` in use (without a trailing slash).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn subnet_key(&self, key: &SubnetKey) -> String {
        format!("{}{}", self.subnets_prefix(), key)
    }

    /// The config as it is in etcd now, and the revision it was read at.
    pub async fn read_config(&self) -> Result<(ConfigState, i64), RegistryError> {
        let resp = self.client.kv_client().get(self.config_key(), None).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let state = match resp.kvs().first() {
            None => ConfigState::Missing,
            Some(kv) => match NetworkConfig::parse(kv.value()) {
                Ok(config) => ConfigState::Valid {
                    config,
                    mod_revision: kv.mod_revision(),
                },
                Err(e) => ConfigState::Invalid {
                    error: e,
                    mod_revision: kv.mod_revision(),
                },
            },
        };
        Ok((state, revision))
    }

    /// Watch the config key from `revision` on.
    pub async fn watch_config(&self, revision: i64) -> Result<WatchStream, RegistryError> {
        let opts = WatchOptions::new().with_start_revision(revision);
        Ok(self
            .client
            .watch_client()
            .watch(self.config_key(), Some(opts))
            .await?)
    }

    /// All subnet leases. Malformed keys or values are skipped with a warning naming the key.
    pub async fn list_leases(&self) -> Result<LeaseListing, RegistryError> {
        let resp = self
            .client
            .kv_client()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let leases = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.parse_kv(kv.key(), kv.value(), kv.lease(), kv.mod_revision()))
            .collect();
        Ok(LeaseListing { leases, revision })
    }

    /// Parse one subnet key/value; `None` (with a warning) if it is not a valid lease.
    pub fn parse_kv(
        &self,
        key: &[u8],
        value: &[u8],
        etcd_lease: i64,
        mod_revision: i64,
    ) -> Option<Lease> {
        let key_str = String::from_utf8_lossy(key);
        let name = key_str.strip_prefix(&self.subnets_prefix())?;
        let subnet = match SubnetKey::parse(name) {
            Ok(k) => k,
            Err(e) => {
                log::warn!("ignoring etcd key {key_str}: {e}");
                return None;
            }
        };
        match LeaseAttrs::from_json(&key_str, value) {
            Ok(attrs) => Some(Lease {
                key: subnet,
                attrs,
                etcd_lease,
                mod_revision,
            }),
            Err(e) => {
                log::warn!("ignoring etcd key {key_str}: {e}");
                None
            }
        }
    }

    /// Parse a subnet key name only (for delete events, which carry no value).
    pub fn parse_key(&self, key: &[u8]) -> Option<SubnetKey> {
        let key_str = String::from_utf8_lossy(key);
        SubnetKey::parse(key_str.strip_prefix(&self.subnets_prefix())?).ok()
    }

    pub async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let ttl = ttl.as_secs().max(1) as i64;
        Ok(self.client.lease_client().grant(ttl, None).await?.id())
    }

    pub async fn revoke(&self, etcd_lease: i64) -> Result<(), RegistryError> {
        match self.client.lease_client().revoke(etcd_lease).await {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Refresh an etcd lease once. Returns the new TTL in seconds, 0 if the lease is gone.
    pub async fn keep_alive_once(&self, etcd_lease: i64) -> Result<i64, RegistryError> {
        let (mut keeper, mut stream) = self.client.lease_client().keep_alive(etcd_lease).await?;
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(resp) => Ok(resp.ttl()),
            None => Ok(0),
        }
    }

    /// Create `key` only if it does not exist (the compare-and-create of upstream).
    pub async fn create_if_absent(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<bool, RegistryError> {
        let k = self.subnet_key(key);
        let put = put_options(etcd_lease);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k, attrs.to_json(), put)]);
        Ok(self.client.kv_client().txn(txn).await?.succeeded())
    }

    /// Replace `key` only if it is still at `mod_revision` (nobody changed it since we read it).
    pub async fn replace_if_unchanged(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = self.subnet_key(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                k.clone(),
                CompareOp::Equal,
                mod_revision,
            )])
            .and_then([TxnOp::put(k, attrs.to_json(), put_options(etcd_lease))]);
        Ok(self.client.kv_client().txn(txn).await?.succeeded())
    }

    /// Current value of one subnet key.
    pub async fn get_lease(&self, key: &SubnetKey) -> Result<Option<Lease>, RegistryError> {
        let resp = self
            .client
            .kv_client()
            .get(self.subnet_key(key), None)
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| self.parse_kv(kv.key(), kv.value(), kv.lease(), kv.mod_revision())))
    }

    /// Watch all subnet keys from `start_revision` on.
    pub async fn watch_subnets(&self, start_revision: i64) -> Result<WatchStream, RegistryError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        Ok(self
            .client
            .watch_client()
            .watch(self.subnets_prefix(), Some(opts))
            .await?)
    }
}

fn put_options(etcd_lease: i64) -> Option<PutOptions> {
    // Lease 0 means no TTL (a reservation keeps none).
    (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease))
}

/// One line for `err` given where and how we connect (also before a registry exists).
pub fn explain_with(err: &RegistryError, target: &EtcdTarget) -> String {
    match err {
        RegistryError::Etcd(e) => etcd_hint::explain(e, target),
        other => crate::error_line::one_line(other),
    }
}

fn tls_options(s: &EtcdSettings) -> Result<etcd_client::TlsOptions, RegistryError> {
    use etcd_client::{Certificate, Identity, TlsOptions};
    let read = |flag: &'static str, path: &str| {
        std::fs::read(path).map_err(|source| RegistryError::TlsFile {
            flag,
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = TlsOptions::new();
    if !s.cafile.is_empty() {
        tls = tls.ca_certificate(Certificate::from_pem(read("--etcd-cafile", &s.cafile)?));
    }
    match (s.certfile.is_empty(), s.keyfile.is_empty()) {
        (false, false) => {
            tls = tls.identity(Identity::from_pem(
                read("--etcd-certfile", &s.certfile)?,
                read("--etcd-keyfile", &s.keyfile)?,
            ));
        }
        (false, true) => {
            return Err(RegistryError::TlsPair {
                given: "--etcd-certfile",
                missing: "--etcd-keyfile",
            })
        }
        (true, false) => {
            return Err(RegistryError::TlsPair {
                given: "--etcd-keyfile",
                missing: "--etcd-certfile",
            })
        }
        (true, true) => {}
    }
    Ok(tls)
}
