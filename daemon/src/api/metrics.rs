//! Prometheus metrics: one registry handle the daemon's stages record into, served as text
//! exposition (OpenMetrics text, which Prometheus scrapes natively) on a TCP address, beside
//! `GET /healthz` (the daemon's readers, watchers and last sync, from a [`HealthProvider`]).
//!
//! The listener is reachable by whatever can reach its address, so it holds up against slow and
//! many clients ([`ListenerLimits`]): request headers must arrive within a timeout, a connection
//! lives at most so long, and at most so many are open: at the cap the oldest is closed to make
//! room, so a flood of idle connections cannot keep a health check out. Each close is counted
//! (`palisade_http_connections_closed_total{reason}`).
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::ApiError;
use crate::alerts::schema::Alert;

/// Default metrics address: loopback only, so nothing off the node can scrape it unless asked.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn latency_histogram() -> Histogram {
    // 5 µs .. ~2.6 s
    Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
}

fn sync_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

struct Inner {
    registry: Registry,
    events: Family<Labels, Counter>,
    events_lost: Family<Labels, Counter>,
    events_lost_by_pod: Family<Labels, Counter>,
    evaluation: Histogram,
    alerts: Family<Labels, Counter>,
    alerts_dropped: Counter,
    alert_write_errors: Counter,
    quarantines_active: Gauge,
    quarantines_pending: Gauge,
    quarantines: Counter,
    releases: Counter,
    policy_drops: Family<Labels, Counter>,
    map_sync: Family<Labels, Histogram, fn() -> Histogram>,
    rule_reloads: Family<Labels, Counter>,
    rule_errors: Family<Labels, Counter>,
    exports: Family<Labels, Counter>,
    conntrack_entries: Family<Labels, Gauge>,
    conntrack_drops: Family<Labels, Counter>,
    connections_closed: Family<Labels, Counter>,
    /// Last absolute value seen per kernel counter, to turn totals read from maps into increments.
    kernel_totals: Mutex<HashMap<(&'static str, String), u64>>,
}

/// The daemon's metrics registry; cheap to clone, safe to record into from any task.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("palisade");
        let events = Family::<Labels, Counter>::default();
        let events_lost = Family::<Labels, Counter>::default();
        let events_lost_by_pod = Family::<Labels, Counter>::default();
        let evaluation = latency_histogram();
        let alerts = Family::<Labels, Counter>::default();
        let alerts_dropped = Counter::default();
        let alert_write_errors = Counter::default();
        let quarantines_active = Gauge::default();
        let quarantines_pending = Gauge::default();
        let quarantines = Counter::default();
        let releases = Counter::default();
        let policy_drops = Family::<Labels, Counter>::default();
        let map_sync = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(sync_histogram as fn() -> Histogram);
        let rule_reloads = Family::<Labels, Counter>::default();
        let rule_errors = Family::<Labels, Counter>::default();
        let exports = Family::<Labels, Counter>::default();
        let conntrack_entries = Family::<Labels, Gauge>::default();
        let conntrack_drops = Family::<Labels, Counter>::default();
        let connections_closed = Family::<Labels, Counter>::default();
        registry.register("events", "Kernel events received, by type", events.clone());
        registry.register("events_lost", "Kernel events lost (ring buffer full), by type", events_lost.clone());
        registry.register(
            "events_lost_by_pod",
            "Events that did not reach the rules, by pod, kind and reason (ring_full, pod_budget, queue_full; demoted: protected events past the pod's priority share, not lost)",
            events_lost_by_pod.clone(),
        );
        registry.register("rule_evaluation_seconds", "Time to evaluate the rule pack on one event", evaluation.clone());
        registry.register("alerts", "Alerts written, by kind, rule and severity", alerts.clone());
        registry.register("alerts_dropped", "Alerts dropped because the alert queue was full", alerts_dropped.clone());
        registry.register("alert_write_errors", "Alerts that could not be written to the alert log", alert_write_errors.clone());
        registry.register("quarantines_active", "Pods quarantined now", quarantines_active.clone());
        registry.register("quarantines_pending", "Quarantines queued by the rate limit, not enforced yet", quarantines_pending.clone());
        registry.register("quarantines", "Quarantines applied", quarantines.clone());
        registry.register("quarantine_releases", "Quarantines released", releases.clone());
        registry.register("policy_drops", "Packets dropped by segmentation policy or quarantine, by direction and reason", policy_drops.clone());
        registry.register("map_sync_seconds", "Time to sync a set of eBPF maps, by map", map_sync.clone());
        registry.register("rule_reloads", "Rule pack loads and reloads, by result (ok, failed)", rule_reloads.clone());
        registry.register("rule_errors", "Rules that could not judge an event, by rule and reason (budget, timeout, error)", rule_errors.clone());
        registry.register("exports", "Alert exports, by exporter and result (sent, failed, dropped)", exports.clone());
        registry.register("conntrack_entries", "Connection-tracking entries held, by pod", conntrack_entries.clone());
        registry.register(
            "conntrack_drops",
            "New flows refused for lack of conntrack room, by pod and reason (quota: the pod's own quota; table_full: the node's table)",
            conntrack_drops.clone(),
        );
        registry.register(
            "http_connections_closed",
            "HTTP connections the daemon closed on the client, by listener and reason (evicted at the connection cap, header_timeout, connection_timeout)",
            connections_closed.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        build.get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))])).set(1);
        registry.register("build_info", "palisade build", build);
        Metrics {
            inner: Arc::new(Inner {
                registry,
                events,
                events_lost,
                events_lost_by_pod,
                evaluation,
                alerts,
                alerts_dropped,
                alert_write_errors,
                quarantines_active,
                quarantines_pending,
                quarantines,
                releases,
                policy_drops,
                map_sync,
                rule_reloads,
                rule_errors,
                exports,
                conntrack_entries,
                conntrack_drops,
                connections_closed,
                kernel_totals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// One event of `event_type` reached userspace.
    pub fn record_event(&self, event_type: &str) {
        self.inner.events.get_or_create(&labels(&[("type", event_type)])).inc();
    }

    /// Adds `count` to a pod's loss counter (the caller turns kernel totals into increments).
    pub fn record_pod_events_lost(&self, pod: &str, kind: &str, reason: &str, count: u64) {
        self.inner
            .events_lost_by_pod
            .get_or_create(&labels(&[("pod", pod), ("kind", kind), ("reason", reason)]))
            .inc_by(count);
    }

    pub fn record_events_lost(&self, event_type: &str, count: u64) {
        self.inner.events_lost.get_or_create(&labels(&[("type", event_type)])).inc_by(count);
    }

    /// Feeds the kernel's per-type totals (e.g. `ProbeStatus.counters`): the increase since the
    /// last call is added, so the daemon can poll the maps instead of counting every event.
    pub fn observe_kernel_counters(
        &self,
        emitted: &std::collections::BTreeMap<String, u64>,
        lost: &std::collections::BTreeMap<String, u64>,
    ) {
        for (kind, total) in emitted {
            let delta = self.kernel_delta("emitted", kind, *total);
            self.inner.events.get_or_create(&labels(&[("type", kind)])).inc_by(delta);
        }
        for (kind, total) in lost {
            let delta = self.kernel_delta("lost", kind, *total);
            self.inner.events_lost.get_or_create(&labels(&[("type", kind)])).inc_by(delta);
        }
    }

    /// Same for policy drops read as totals from the kernel (direction: ingress/egress).
    pub fn observe_policy_drop_total(&self, direction: &str, reason: &str, total: u64) {
        let delta = self.kernel_delta("policy_drops", &format!("{direction}/{reason}"), total);
        self.add_policy_drops(direction, reason, delta);
    }

    fn kernel_delta(&self, family: &'static str, key: &str, total: u64) -> u64 {
        let Ok(mut last) = self.inner.kernel_totals.lock() else { return 0 };
        let previous = last.insert((family, key.to_string()), total).unwrap_or(0);
        // A smaller total means the counter restarted (maps recreated): count it from zero.
        if total >= previous { total - previous } else { total }
    }

    /// Per-pod conntrack counts read from the kernel (entries now; drops as totals).
    pub fn observe_conntrack(&self, pods: &[(String, crate::segmentation::conntrack::PodUsage)]) {
        self.inner.conntrack_entries.clear();
        for (pod, usage) in pods {
            self.inner.conntrack_entries.get_or_create(&labels(&[("pod", pod)])).set(usage.entries as i64);
            for (reason, total) in [("quota", usage.quota_drops), ("table_full", usage.table_full_drops)] {
                let delta = self.kernel_delta("conntrack_drops", &format!("{pod}/{reason}"), total);
                if delta > 0 {
                    self.inner.conntrack_drops.get_or_create(&labels(&[("pod", pod), ("reason", reason)])).inc_by(delta);
                }
            }
        }
    }

    pub fn observe_evaluation(&self, elapsed: Duration) {
        self.inner.evaluation.observe(elapsed.as_secs_f64());
    }

    /// Called by the alert writer for every alert it writes.
    pub fn record_alert(&self, alert: &Alert) {
        let rule = alert.rule_id();
        let value = alert.count.max(1);
        self.inner
            .alerts
            .get_or_create(&labels(&[("kind", alert.kind.as_str()), ("rule", rule), ("severity", alert.severity.as_str())]))
            .inc_by(value);
    }

    pub fn record_alerts_dropped(&self, count: u64) {
        self.inner.alerts_dropped.inc_by(count);
    }

    pub fn record_alert_write_error(&self) {
        self.inner.alert_write_errors.inc();
    }

    pub fn set_quarantines_active(&self, active: i64) {
        self.inner.quarantines_active.set(active);
    }

    pub fn set_quarantines_pending(&self, pending: i64) {
        self.inner.quarantines_pending.set(pending);
    }

    pub fn record_quarantine(&self) {
        self.inner.quarantines.inc();
    }

    pub fn record_release(&self) {
        self.inner.releases.inc();
    }

    pub fn add_policy_drops(&self, direction: &str, reason: &str, count: u64) {
        self.inner.policy_drops.get_or_create(&labels(&[("direction", direction), ("reason", reason)])).inc_by(count);
    }

    pub fn observe_map_sync(&self, map: &str, elapsed: Duration) {
        self.inner.map_sync.get_or_create(&labels(&[("map", map)])).observe(elapsed.as_secs_f64());
    }

    pub fn record_rule_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.inner.rule_reloads.get_or_create(&labels(&[("result", result)])).inc();
    }

    /// One rule could not judge one event (reason: `budget`, `timeout`, `error`).
    pub fn record_rule_error(&self, rule: &str, reason: &str) {
        self.inner.rule_errors.get_or_create(&labels(&[("rule", rule), ("reason", reason)])).inc();
    }

    /// exporter: `webhook`, `stdout`; result: `sent`, `failed`, `dropped`, `retried`.
    pub fn record_export(&self, exporter: &str, result: &str) {
        self.inner.exports.get_or_create(&labels(&[("exporter", exporter), ("result", result)])).inc();
    }

    /// A connection `listener` (metrics, api) closed on the client for `reason`.
    pub fn record_connection_closed(&self, listener: &str, reason: &str) {
        self.inner.connections_closed.get_or_create(&labels(&[("listener", listener), ("reason", reason)])).inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &self.inner.registry) {
            tracing::warn!(%err, "encoding metrics failed");
        }
        out
    }
}

/// The daemon's health as `/healthz` reports it.
#[derive(Debug, Clone)]
pub struct Health {
    /// False when the daemon cannot do its job (e.g. the event reader stopped): `/healthz`
    /// answers 503, so the kubelet restarts it. Degraded-but-working states (an API outage, a
    /// failed sync) stay 200 and say so in the report.
    pub ok: bool,
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
pub async fn serve_metrics(addr: SocketAddr, metrics: Metrics, health: HealthProvider) -> Result<(), ApiError> {
    let listener = bind_metrics(addr).await?;
    tracing::info!(%addr, "serving Prometheus metrics");
    serve_metrics_on(listener, metrics, health, ListenerLimits::default()).await
}

pub async fn serve_metrics_on(listener: TcpListener, metrics: Metrics, health: HealthProvider, limits: ListenerLimits) -> Result<(), ApiError> {
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

async fn metrics_response(req: &Request<hyper::body::Incoming>, metrics: &Metrics, health: &HealthProvider) -> Response<Full<Bytes>> {
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        let Health { ok, report } = health().await;
        let mut r = Response::new(Full::new(Bytes::from(format!("{report}\n"))));
        if !ok {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        return r;
    }
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found: try GET /metrics or /healthz\n")));
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
