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
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "flanneld is ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready")
    }
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
    axum::serve(listener, app).await
}
