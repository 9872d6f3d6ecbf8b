//! The metrics listener: the crate's [`Metrics`] registry (`crate::metrics`) served as text
//! exposition (OpenMetrics text, which Prometheus scrapes natively) on a TCP address, beside
//! `GET /healthz` (liveness: the daemon's readers, watchers and last sync, from a [`HealthProvider`]) and
//! `GET /readyz` (readiness: started and synced once); both 503 with `"status": "starting"` and
//! the phase while the daemon starts.
//!
//! The listener is reachable by whatever can reach its address, so it holds up against slow and
//! many clients ([`ListenerLimits`]): request headers must arrive within a timeout, a connection
//! lives at most so long, and at most so many are open: at the cap the oldest is closed to make
//! room, so a flood of idle connections cannot keep a health check out. Each close is counted
//! (`palisade_http_connections_closed_total{reason}`).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::ApiError;
pub use crate::metrics::{DEFAULT_METRICS_ADDR, Metrics};

/// The daemon's health as `/healthz` reports it.
#[derive(Debug, Clone)]
pub struct Health {
    /// False when the daemon cannot do its job (e.g. the event reader stopped): `/healthz`
    /// answers 503, so the kubelet restarts it. Degraded-but-working states (an API outage, a
    /// failed sync) stay 200 and say so in the report.
    pub ok: bool,
    /// Enforcing: started, and the datapath synced at least once. `/readyz` answers 503 until
    /// then (a DaemonSet's rolling update waits for it).
    pub ready: bool,
    /// JSON: `status` plus the sections (`readers`, `watchers`, `last_sync`).
    pub report: serde_json::Value,
}

/// Produces the health on each `GET /healthz`.
pub type HealthProvider = Arc<dyn Fn() -> super::BoxFuture<'static, Health> + Send + Sync>;

/// Wraps an async closure as a [`HealthProvider`].
pub fn health_provider<F, Fut>(make: F) -> HealthProvider
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Health> + Send + 'static,
{
    Arc::new(move || Box::pin(make()))
}

/// What a metrics listener serves: the daemon's [`Metrics`], or `palisade operator`'s own
/// (`daemon::operator`), which has none of the daemon's stages.
pub trait Exposition: Clone + Send + Sync + 'static {
    /// The text exposition `GET /metrics` answers.
    fn encode(&self) -> String;
    /// A connection closed on the client for `reason` (counted where the exposition shows it).
    fn record_connection_closed(&self, listener: &str, reason: &str);
}

impl Exposition for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }
    fn record_connection_closed(&self, listener: &str, reason: &str) {
        Metrics::record_connection_closed(self, listener, reason)
    }
}

/// How much a listener lets one client hold.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections at most; at the cap the oldest is closed for the new one.
    pub max_connections: usize,
    /// A request's headers must be complete within this (slow-loris).
    pub header_timeout: Duration,
    /// A connection is closed after this, whatever it is doing (slow bodies, idle keep-alive).
    pub connection_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits { max_connections: 64, header_timeout: Duration::from_secs(5), connection_timeout: Duration::from_secs(30) }
    }
}

/// Open connections by age (ids grow), so the oldest can be closed at the cap.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, tokio::task::AbortHandle>,
}

/// Binds the metrics address (separate from `serve_metrics_on` so callers can learn the port).
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, ApiError> {
    TcpListener::bind(addr).await.map_err(|source| ApiError::Bind { what: format!("metrics address {addr}"), source })
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` until the task is dropped.
pub async fn serve_metrics<M: Exposition>(addr: SocketAddr, metrics: M, health: HealthProvider) -> Result<(), ApiError> {
    let listener = bind_metrics(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics");
    serve_metrics_on(listener, metrics, health, ListenerLimits::default()).await
}

pub async fn serve_metrics_on<M: Exposition>(listener: TcpListener, metrics: M, health: HealthProvider, limits: ListenerLimits) -> Result<(), ApiError> {
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%err, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Make room first: the oldest connection goes (an idle or slow one, in a flood).
        let id = {
            let mut open = lock_connections(&connections);
            while open.open.len() >= limits.max_connections.max(1) {
                let Some((_, oldest)) = open.open.pop_first() else { break };
                oldest.abort();
                metrics.record_connection_closed("metrics", "evicted");
            }
            open.next_id += 1;
            open.next_id
        };
        let (counter, metrics, health, tracked) = (metrics.clone(), metrics.clone(), health.clone(), connections.clone());
        // The task waits until its handle is registered, so it cannot finish (and unregister)
        // before it is registered.
        let (registered_tx, registered_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = registered_rx.await;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, health) = (metrics.clone(), health.clone());
                async move { Ok::<_, std::convert::Infallible>(metrics_response(&req, &metrics, &health).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, service);
            let reason = match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => None,
                Ok(Err(err)) if err.is_timeout() => Some("header_timeout"),
                Ok(Err(err)) => {
                    tracing::debug!(%err, "metrics connection ended");
                    None
                }
                Err(_) => Some("connection_timeout"),
            };
            if let Some(reason) = reason {
                tracing::debug!(reason, "metrics connection closed by the server");
                counter.record_connection_closed("metrics", reason);
            }
            lock_connections(&tracked).open.remove(&id);
        });
        lock_connections(&connections).open.insert(id, task.abort_handle());
        let _ = registered_tx.send(());
    }
}

fn lock_connections(connections: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn metrics_response<M: Exposition>(req: &Request<hyper::body::Incoming>, metrics: &M, health: &HealthProvider) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && matches!(req.uri().path(), "/healthz" | "/readyz") {
        let Health { ok, ready, report } = health().await;
        let good = if req.uri().path() == "/healthz" { ok } else { ready };
        let mut r = Response::new(Full::new(Bytes::from(format!("{report}\n"))));
        if !good {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        return r;
    }
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try GET /metrics, /healthz or /readyz\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod loss_tests {
    use super::*;

    #[test]
    fn losses_per_pod_kind_and_reason() {
        let metrics = Metrics::new();
        metrics.record_pod_events_lost("flood/noisy", "open", "pod_budget", 1000);
        metrics.record_pod_events_lost("flood/noisy", "open", "pod_budget", 500);
        let text = metrics.encode();
        assert!(text.contains(r#"palisade_events_lost_by_pod_total{pod="flood/noisy",kind="open",reason="pod_budget"} 1500"#), "{text}");
    }
}

#[cfg(test)]
mod conntrack_tests {
    use super::*;
    use crate::segmentation::conntrack::PodUsage;

    #[test]
    fn conntrack_entries_and_refusals_per_pod() {
        let metrics = Metrics::new();
        let pod = |entries, quota_drops| {
            vec![("webapp/db-1".to_string(), PodUsage { entries, quota_drops, table_full_drops: 0 })]
        };
        metrics.observe_conntrack(&pod(16_384, 1_500));
        // Kernel totals: the counter adds the difference.
        metrics.observe_conntrack(&pod(16_000, 2_000));
        let text = metrics.encode();
        assert!(text.contains(r#"palisade_conntrack_entries{pod="webapp/db-1"} 16000"#), "{text}");
        assert!(text.contains(r#"palisade_conntrack_drops_total{pod="webapp/db-1",reason="quota"} 2000"#), "{text}");
        // A pod gone from the kernel's counts no longer has an entries gauge.
        metrics.observe_conntrack(&[]);
        assert!(!metrics.encode().contains("palisade_conntrack_entries{"), "{}", metrics.encode());
    }
}
