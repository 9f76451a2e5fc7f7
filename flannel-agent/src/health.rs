//! The health listener (`--healthz-ip`/`--healthz-port`): `/healthz` and `/readyz` like
//! upstream, plus `/peers` (this node's view of its peers, JSON) for operators and tests, and
//! `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ipnetwork::Ipv4Network;

use crate::lease::Lease;
use crate::metrics::{self, DataplaneSample};
use crate::subnet::watch::WatchStats;

/// `/readyz` stays 200 through short etcd blips; longer than this without seeing etcd's
/// changes (watch down, no leader, unauthenticated), the node is not ready.
pub const WATCH_DOWN_GRACE: Duration = Duration::from_secs(10);
/// A client must send its request headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this (idle, slow readers, slow writers).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; beyond that new ones are closed at once, so the health
/// listener can never take the process to its file descriptor limit.
pub const MAX_CONNECTIONS: usize = 64;

/// What the agent publishes about itself.
#[derive(Default)]
pub struct AgentState {
    pub ready: AtomicBool,
    pub own: RwLock<Option<Lease>>,
    pub peers: RwLock<BTreeMap<Ipv4Network, Lease>>,
    pub watch: Arc<WatchStats>,
    /// Unix time our lease expires unless renewed; 0 for a reservation (or no lease yet).
    pub lease_expiry: AtomicI64,
    /// Latest data plane counters, refreshed by the main loop (None: no udp data plane).
    pub dataplane: RwLock<Option<DataplaneSample>>,
}

impl AgentState {
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

    pub fn peers_json(&self) -> String {
        let peers = self.peers.read().map(|p| p.clone()).unwrap_or_default();
        let items: Vec<String> = peers
            .values()
            .map(|l| {
                format!(
                    "{{\"Subnet\":\"{}\",\"Lease\":{}}}",
                    l.subnet(),
                    l.attrs.to_json()
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    if !state.ready.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "flanneld is not ready".to_owned(),
        );
    }
    let down = state.watch.down_for();
    if down > WATCH_DOWN_GRACE {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "flanneld cannot see etcd changes for {}s: {}",
                down.as_secs(),
                state.watch.health().name()
            ),
        );
    }
    (StatusCode::OK, "flanneld is ready".to_owned())
}

async fn peers(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.peers_json(),
    )
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&state),
    )
}

/// Serve on a bound listener until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AgentState>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/peers", get(peers))
        .route("/metrics", get(metrics))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        log::info!("health listener on http://{addr}");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning; the cap makes it rare.
                log::debug!("health listener accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                // One request per connection: no idle keep-alive connections to hold.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}
