//! The etcd v3 implementation of the [`Registry`](super::registry::Registry): flannel's keys
//! in etcd, with the connection settings and error explanations.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KvClient, PutOptions, Txn,
    TxnOp, WatchClient, WatchOptions, WatchStream,
};

use crate::config::{ConfigError, NetworkConfig};
use crate::lease::{Lease, LeaseAttrs, SubnetKey};
use crate::subnet::etcd_hint::{self, EtcdTarget};
use crate::subnet::registry::{
    ConfigWatch, LeaseListing, Registry, SubnetChange, SubnetWatch, WatchResponse,
};

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
    #[error("etcd did not answer a lease keep-alive within {0:?}")]
    KeepAliveTimeout(Duration),
    /// The store cannot be reached (the in-memory registry's outages).
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

impl RegistryError {
    /// A mistake in the flags or files that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            RegistryError::Etcd(e) => etcd_hint::is_local_mistake(e),
            RegistryError::Unavailable(_) => false,
            _ => true,
        }
    }

    /// etcd refused our credentials or token (expired, or etcd restarted and forgot it).
    pub fn is_auth(&self) -> bool {
        match self {
            RegistryError::Etcd(e) => is_auth_error(e),
            _ => false,
        }
    }
}

/// Whether an etcd error means "authenticate again" rather than "try again".
pub fn is_auth_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unauthenticated
                || s.message().contains("invalid auth token")
                || s.message().contains("permission denied")
        }
        _ => false,
    }
}

/// HTTP/2 pings: etcd's `--grpc-keepalive-min-time` defaults to 5 s and it answers pings that
/// come faster (or without an open stream) with GOAWAY `too_many_pings`, tearing down the watch.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Upstream's clientv3 accepts responses up to 2 GiB (`MaxCallRecvMsgSize` = math.MaxInt32);
/// tonic's default of 4 MiB stops a listing of a few large leases.
pub const MAX_DECODING_MESSAGE_SIZE: usize = i32::MAX as usize;
/// How long one lease keep-alive round trip may take before we call it failed.
const KEEPALIVE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub fn from_flags(flags: &crate::cli::Flags) -> Self {
        EtcdSettings {
            endpoints: flags.etcd_endpoint_list(),
            prefix: flags.etcd_prefix.clone(),
            keyfile: flags.etcd_keyfile.clone(),
            certfile: flags.etcd_certfile.clone(),
            cafile: flags.etcd_cafile.clone(),
            username: flags.etcd_username.clone(),
            password: flags.etcd_password.clone(),
        }
    }

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

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    kv: KvClient,
    watch: WatchClient,
    prefix: String,
    /// For error messages: where we talk to and with which flags.
    target: Arc<EtcdTarget>,
    authenticated: bool,
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
            // HTTP/2 pings notice a dead etcd (or a partition) while the watch stream is open;
            // within etcd's keepalive policy (see KEEPALIVE_INTERVAL), never on an idle connection.
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false)
            // A member cut off from its cluster refuses requests and ends watches ("no leader")
            // instead of serving stale data, so the retry goes to a member that has a leader.
            .with_require_leader(true);
        if !settings.username.is_empty() {
            opts = opts
                .with_user(settings.username.clone(), settings.password.clone())
                // Tokens expire and a restarted etcd forgets them: re-authenticate and retry.
                .with_auto_token_refresh(true);
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
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE),
            client,
            prefix: target.prefix.clone(),
            target,
            authenticated: !settings.username.is_empty(),
        })
    }

    /// Connects, retrying while etcd is unreachable; only a mistake in the flags or files
    /// (retrying cannot fix it) comes back as an error.
    pub async fn connect_when_up(settings: &EtcdSettings) -> Result<Self, RegistryError> {
        let target = settings.target();
        crate::retry::with_backoff(
            "connecting to etcd",
            |e: &RegistryError| explain_with(e, &target),
            RegistryError::is_permanent,
            || Self::connect(settings),
        )
        .await
    }

    /// One line for an error from this registry: endpoint, flag or file, likely fix.
    pub fn explain(&self, err: &RegistryError) -> String {
        explain_with(err, &self.target)
    }

    /// The `--etcd-prefix` in use (without a trailing slash).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether we log in with a username (tokens to refresh).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Get a fresh auth token (streams such as the watch do not refresh it by themselves).
    pub async fn refresh_token(&self) -> Result<(), RegistryError> {
        if self.authenticated {
            self.client.refresh_token().await?;
        }
        Ok(())
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
        let resp = self.kv.clone().get(self.config_key(), None).await?;
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
            .watch
            .clone()
            .watch(self.config_key(), Some(opts))
            .await?)
    }

    /// Parse one subnet key/value; `None` (with a warning) if it is not a valid lease.
    pub fn parse_kv(
        &self,
        key: &[u8],
        value: &[u8],
        etcd_lease: i64,
        mod_revision: i64,
    ) -> Option<Lease> {
        parse_lease(&self.subnets_prefix(), key, value, etcd_lease, mod_revision)
    }

    /// Parse a subnet key name only (for delete events, which carry no value).
    pub fn parse_key(&self, key: &[u8]) -> Option<SubnetKey> {
        parse_key(&self.subnets_prefix(), key)
    }

    /// Watch all subnet keys from `start_revision` on.
    async fn open_subnet_watch(&self, start_revision: i64) -> Result<WatchStream, RegistryError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            // etcd tells a watcher when it falls behind compaction or loses its leader; the
            // notifications also show an idle watch is still alive (see the watcher's checks).
            .with_progress_notify();
        Ok(self
            .watch
            .clone()
            .watch(self.subnets_prefix(), Some(opts))
            .await?)
    }
}

/// Parse one subnet key/value under `subnets_prefix`; `None` (with a warning naming the key)
/// if it is not a valid lease.
pub(crate) fn parse_lease(
    subnets_prefix: &str,
    key: &[u8],
    value: &[u8],
    etcd_lease: i64,
    mod_revision: i64,
) -> Option<Lease> {
    let key_str = String::from_utf8_lossy(key);
    let name = key_str.strip_prefix(subnets_prefix)?;
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

/// The subnet key in a full etcd key under `subnets_prefix`, if it is one.
/// Whether two lease keys claim the same IPv4 subnet (IPv6-only keys claim none) or the
/// same IPv6 subnet.
fn shares_a_subnet(a: &SubnetKey, b: &SubnetKey) -> bool {
    let v4 = !a.is_ipv6_only() && !b.is_ipv6_only() && a.ipv4 == b.ipv4;
    let v6 = a.ipv6.is_some() && a.ipv6 == b.ipv6;
    v4 || v6
}

pub(crate) fn parse_key(subnets_prefix: &str, key: &[u8]) -> Option<SubnetKey> {
    let key_str = String::from_utf8_lossy(key);
    SubnetKey::parse(key_str.strip_prefix(subnets_prefix)?).ok()
}

/// One watch event as the registry seam carries it (values parsed, malformed ones as `None`).
pub(crate) fn subnet_change(
    subnets_prefix: &str,
    key: &[u8],
    value: Option<&[u8]>,
    etcd_lease: i64,
    mod_revision: i64,
) -> SubnetChange {
    let subnet = parse_key(subnets_prefix, key);
    let lease = match (value, &subnet) {
        (Some(v), Some(_)) => parse_lease(subnets_prefix, key, v, etcd_lease, mod_revision),
        _ => None,
    };
    SubnetChange {
        name: String::from_utf8_lossy(key).into_owned(),
        mod_revision,
        key: subnet,
        lease,
    }
}

impl Registry for EtcdRegistry {
    type Watch = EtcdSubnetWatch;
    type ConfigWatch = EtcdConfigWatch;

    fn prefix(&self) -> &str {
        EtcdRegistry::prefix(self)
    }
    async fn read_config(&self) -> Result<(ConfigState, i64), RegistryError> {
        EtcdRegistry::read_config(self).await
    }
    async fn watch_config(&self, start_revision: i64) -> Result<EtcdConfigWatch, RegistryError> {
        Ok(EtcdConfigWatch(
            EtcdRegistry::watch_config(self, start_revision).await?,
        ))
    }

    fn subnet_key(&self, key: &SubnetKey) -> String {
        EtcdRegistry::subnet_key(self, key)
    }
    fn authenticated(&self) -> bool {
        EtcdRegistry::authenticated(self)
    }
    fn explain(&self, err: &RegistryError) -> String {
        EtcdRegistry::explain(self, err)
    }
    async fn refresh_token(&self) -> Result<(), RegistryError> {
        EtcdRegistry::refresh_token(self).await
    }
    async fn list_leases(&self) -> Result<LeaseListing, RegistryError> {
        let resp = self
            .kv
            .clone()
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
    async fn get_lease(&self, key: &SubnetKey) -> Result<Option<Lease>, RegistryError> {
        let resp = self.kv.clone().get(self.subnet_key(key), None).await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| self.parse_kv(kv.key(), kv.value(), kv.lease(), kv.mod_revision())))
    }
    async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let ttl = ttl.as_secs().max(1) as i64;
        Ok(self.client.lease_client().grant(ttl, None).await?.id())
    }
    async fn revoke(&self, etcd_lease: i64) -> Result<(), RegistryError> {
        match self.client.lease_client().revoke(etcd_lease).await {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    async fn keep_alive_once(&self, etcd_lease: i64) -> Result<i64, RegistryError> {
        let call = async {
            // etcd-client sends the first keep-alive itself and reports TTL 0 (the lease is
            // gone) as an error, not as a response.
            let (mut keeper, mut stream) =
                match self.client.lease_client().keep_alive(etcd_lease).await {
                    Ok(v) => v,
                    Err(e) if is_lease_gone(&e) => return Ok(0),
                    Err(e) => return Err(e.into()),
                };
            keeper.keep_alive().await?;
            match stream.message().await {
                Ok(Some(resp)) => Ok(resp.ttl().max(0)),
                Ok(None) => Ok(0),
                Err(e) if is_lease_gone(&e) => Ok(0),
                Err(e) => Err(e.into()),
            }
        };
        // A keep-alive stream to a member without a leader can hang: give up and retry.
        tokio::time::timeout(KEEPALIVE_CALL_TIMEOUT, call)
            .await
            .unwrap_or(Err(RegistryError::KeepAliveTimeout(KEEPALIVE_CALL_TIMEOUT)))
    }
    async fn create_if_absent(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        etcd_lease: i64,
    ) -> Result<bool, RegistryError> {
        let k = self.subnet_key(key);
        let put = put_options(etcd_lease);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(k.clone(), attrs.to_json(), put)]);
        let resp = self.kv.clone().txn(txn).await?;
        if !resp.succeeded() {
            return Ok(false);
        }
        // The key only makes the pair of subnets unique: with two families, another node may
        // have created a key with the same IPv4 or IPv6 subnet and the other one different at
        // the same time. The older key keeps it; the younger one steps back (both see both).
        let ours = resp.header().map(|h| h.revision()).unwrap_or(0);
        let listing = self
            .kv
            .clone()
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        let clash = listing.kvs().iter().any(|kv| {
            kv.key() != k.as_bytes()
                && kv.create_revision() < ours
                && self
                    .parse_key(kv.key())
                    .is_some_and(|other| shares_a_subnet(key, &other))
        });
        if clash {
            let undo = Txn::new()
                .when([Compare::create_revision(k.clone(), CompareOp::Equal, ours)])
                .and_then([TxnOp::delete(k, None)]);
            self.kv.clone().txn(undo).await?;
            log::info!("subnet {key}: another node took one of its subnets at the same time; choosing again");
            return Ok(false);
        }
        Ok(true)
    }
    async fn replace_if_unchanged(
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
        Ok(self.kv.clone().txn(txn).await?.succeeded())
    }
    async fn watch_subnets(&self, start_revision: i64) -> Result<EtcdSubnetWatch, RegistryError> {
        Ok(EtcdSubnetWatch {
            stream: self.open_subnet_watch(start_revision).await?,
            subnets_prefix: self.subnets_prefix(),
        })
    }
}

/// etcd's watch stream on `<prefix>/config`.
pub struct EtcdConfigWatch(WatchStream);

impl ConfigWatch for EtcdConfigWatch {
    async fn changed(&mut self) -> Result<bool, RegistryError> {
        loop {
            match self.0.message().await? {
                // Progress notifications carry no event.
                Some(resp) if resp.events().is_empty() => continue,
                Some(_) => return Ok(true),
                None => return Ok(false),
            }
        }
    }
}

/// etcd's watch stream on `<prefix>/subnets/`, its events parsed.
pub struct EtcdSubnetWatch {
    stream: WatchStream,
    subnets_prefix: String,
}

impl SubnetWatch for EtcdSubnetWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, RegistryError> {
        let Some(resp) = self.stream.message().await? else {
            return Ok(None);
        };
        let events = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                Some(subnet_change(
                    &self.subnets_prefix,
                    kv.key(),
                    value,
                    kv.lease(),
                    kv.mod_revision(),
                ))
            })
            .collect();
        Ok(Some(WatchResponse {
            compact_revision: resp.compact_revision(),
            canceled: resp.canceled().then(|| resp.cancel_reason().to_owned()),
            events,
        }))
    }

    async fn request_progress(&mut self) -> Result<(), RegistryError> {
        Ok(self.stream.request_progress().await?)
    }
}

/// "lease not found" from etcd-client (TTL 0 on the keep-alive stream) or etcd itself.
fn is_lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
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

#[cfg(test)]
mod clash_tests {
    use super::*;

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).expect("key")
    }

    #[test]
    fn keys_clash_on_either_family_but_ipv6_only_keys_share_no_ipv4_subnet() {
        let a = key("10.244.6.0-24&fd00:10:244:25::-64");
        assert!(shares_a_subnet(
            &a,
            &key("10.244.7.0-24&fd00:10:244:25::-64")
        ));
        assert!(shares_a_subnet(
            &a,
            &key("10.244.6.0-24&fd00:10:244:26::-64")
        ));
        assert!(!shares_a_subnet(
            &a,
            &key("10.244.7.0-24&fd00:10:244:26::-64")
        ));
        let v6a = key("0.0.0.0-0&fd00:10:244:25::-64");
        assert!(!shares_a_subnet(
            &v6a,
            &key("0.0.0.0-0&fd00:10:244:26::-64")
        ));
        assert!(shares_a_subnet(&v6a, &key("0.0.0.0-0&fd00:10:244:25::-64")));
        assert!(!shares_a_subnet(
            &key("10.244.6.0-24"),
            &key("10.244.7.0-24")
        ));
    }
}
