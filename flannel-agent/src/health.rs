//! The health listener (`--healthz-ip`/`--healthz-port`): `/healthz` and `/readyz` like
//! upstream, plus `/peers` (this node's view of its peers, JSON) for operators and tests, and
//! `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics;
use crate::sampling::LatestSample;
use crate::status::AgentStatus;

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

/// What the handlers read.
#[derive(Clone)]
struct Published {
    status: Arc<AgentStatus>,
    dataplane: Arc<LatestSample>,
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(State(p): State<Published>) -> impl IntoResponse {
    let state = &p.status;
    if !state.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "flanneld is not ready".to_owned(),
        );
    }
    let down = state.watch().down_for();
    if down > WATCH_DOWN_GRACE {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "flanneld cannot see etcd changes for {}s: {}",
                down.as_secs(),
                state.watch().health().name()
            ),
        );
    }
    (StatusCode::OK, "flanneld is ready".to_owned())
}

async fn peers(State(p): State<Published>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        p.status.peers_json(),
    )
}

async fn metrics(State(p): State<Published>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&p.status, p.dataplane.get().as_ref()),
    )
}

/// Binds `--healthz-ip`/`--healthz-port` and serves there in its own task.
pub async fn listen(
    addr: SocketAddr,
    status: Arc<AgentStatus>,
    dataplane: Arc<LatestSample>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(serve(listener, status, dataplane));
    Ok(())
}

/// Serve on a bound listener until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    status: Arc<AgentStatus>,
    dataplane: Arc<LatestSample>,
) -> std::io::Result<()> {
    let state = Published { status, dataplane };
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
