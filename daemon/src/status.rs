//! The daemon's shared state (a handle to each stage's owner, as `palisade run` started them)
//! and what is rendered from it: `palisade status` (`status_json`, served by the API socket)
//! and the metrics listener's `/healthz` and `/readyz` (`Startup`, `health`). This module owns
//! no state of its own: it reads what the stages publish.

use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::alerts::AlertSink;
use crate::endpoints::EndpointTable;
use crate::events::loss::LossMonitor;
use crate::events::reader::{QueueBudget, QueueDrops, ReaderStats};
use crate::metrics::Metrics;
use crate::probes::host::ProbeHost;
use crate::quarantine::QuarantineService;
use crate::rules::evaluator::PackHandle;

/// Shared, read-mostly daemon state that status reports.
pub struct DaemonState {
    pub node: String,
    /// The endpoint table as the endpoints stage last published it.
    pub endpoints: tokio::sync::watch::Receiver<Arc<EndpointTable>>,
    pub reader: Arc<ReaderStats>,
    /// Bulk events the pipeline had no room for, per pod and kind.
    pub queue_drops: Arc<QueueDrops>,
    /// The byte budgets of the queues to the pipeline (each pod's share of the bulk queue).
    pub queue_budget: Arc<QueueBudget>,
    /// Loss totals per pod, kind and reason, as last sampled (status shows them).
    pub losses: Mutex<LossMonitor>,
    pub rules: Arc<PackHandle>,
    pub rules_last_reload: Mutex<serde_json::Value>,
    pub host: ProbeHost,
    pub pipeline: PipelineStats,
    pub enforcer: Arc<tokio::sync::Mutex<crate::enforcement::Enforcer>>,
    pub quarantine: QuarantineService,
    pub alerts: AlertSink,
    pub metrics: Metrics,
    /// Connection tracking: settings, sweeps, per-pod counts (the sweeper thread updates it).
    pub conntrack: Arc<Mutex<crate::segmentation::conntrack::ConntrackStatus>>,
    pub started: String,
    /// Kubernetes mode: the API source's health.
    pub kube_health: Option<tokio::sync::watch::Receiver<crate::k8s::SourceHealth>>,
    /// Whether the reader and the pipeline keep moving (sampled by a monitor task).
    pub liveness: crate::liveness::Liveness,
    /// Kubernetes mode: the Quarantine objects' watch (`quarantine::cluster`).
    pub quarantine_watch: Arc<crate::k8s::quarantine_resource::ResourceWatchHealth>,
}

#[derive(Default)]
pub struct PipelineStats {
    pub enriched: std::sync::atomic::AtomicU64,
    pub evaluated_with_hits: std::sync::atomic::AtomicU64,
    pub rule_errors: std::sync::atomic::AtomicU64,
    /// Rule runs repeated because the wall clock ran out before the rule had used its CPU
    /// budget (the evaluating thread waited for a CPU; `rules::pack::WALL_BACKSTOP`).
    pub rules_rejudged: std::sync::atomic::AtomicU64,
    /// Protected events a rule could not judge, each raised as a `rule_error` alert at the
    /// rule's severity (fail closed; `daemon::findings::report_unjudged`).
    pub unjudged_protected: std::sync::atomic::AtomicU64,
    pub record_errors: std::sync::atomic::AtomicU64,
    /// The priority ring could not be read (the pipeline ends and /healthz answers 503).
    pub source_errors: std::sync::atomic::AtomicU64,
    /// The process cache's counters (entries, bytes, misses, reused pids, evictions), as of
    /// the pipeline's last idle moment.
    pub process_cache: std::sync::Mutex<crate::events::enrich::ProcCacheStats>,
}
/// What the metrics listener's `/healthz` and `/readyz` report while the daemon starts (the
/// phase it is in), and once it runs ([`health`]).
#[derive(Default)]
pub struct Startup {
    phase: Mutex<&'static str>,
    since: std::sync::OnceLock<String>,
    running: std::sync::OnceLock<(Arc<DaemonState>, Arc<std::sync::atomic::AtomicBool>)>,
}

impl Startup {
    pub fn enter(&self, phase: &'static str) {
        let _ = self.since.set(now_rfc3339());
        if let Ok(mut current) = self.phase.lock() {
            *current = phase;
        }
        tracing::debug!(phase, "starting");
    }

    pub fn running(&self, state: Arc<DaemonState>, reader_running: Arc<std::sync::atomic::AtomicBool>) {
        let _ = self.running.set((state, reader_running));
    }

    pub async fn health(&self) -> crate::api::Health {
        match self.running.get() {
            Some((state, reader_running)) => health(state, reader_running.load(std::sync::atomic::Ordering::Relaxed)).await,
            None => {
                let phase = self.phase.lock().map(|p| *p).unwrap_or("?");
                crate::api::Health {
                    ok: false,
                    ready: false,
                    report: json!({"status": "starting", "phase": phase, "since": self.since.get()}),
                }
            }
        }
    }
}

/// What `/healthz` on the metrics listener reports: the event readers, the watchers (the
/// Kubernetes API's, or the local files') and the last datapath sync. A stopped reader, or a
/// reader or pipeline stuck on waiting work ([`crate::liveness`]), is unhealthy (503, the
/// kubelet restarts the daemon); an API outage or a failed sync is `degraded` with 200, since
/// enforcement carries on with the last good state. Ready (`/readyz`) once the reader runs and
/// the datapath has been synced at least once.
pub async fn health(state: &DaemonState, reader_running: bool) -> crate::api::Health {
    let stuck = state.liveness.stuck();
    let alive = reader_running && stuck.is_empty();
    let kube = state.kube_health.as_ref().map(|h| h.borrow().clone());
    let sync = state.enforcer.lock().await.status.clone();
    let quarantine_watch = kube.is_some().then(|| state.quarantine_watch.snapshot());
    let watchers_ok = kube.as_ref().is_none_or(|k| k.connected) && !quarantine_watch.as_ref().is_some_and(|q| q.is_down());
    let sync_ok = sync.last_error.is_none();
    let status = if !alive { "unhealthy" } else if watchers_ok && sync_ok { "ok" } else { "degraded" };
    let watchers = match &kube {
        Some(kube) => {
            let mut watchers = serde_json::to_value(kube).unwrap_or_default();
            watchers["quarantine_watch"] = serde_json::to_value(&quarantine_watch).unwrap_or_default();
            watchers
        }
        None => json!({"source": "files", "inventory_endpoints": state.endpoints.borrow().inventory().endpoints.len()}),
    };
    crate::api::Health {
        ok: alive,
        ready: alive && sync.last_sync.is_some(),
        report: json!({
            "status": status,
            "readers": {"running": reader_running, "events": state.reader.snapshot(), "stuck": stuck},
            "watchers": watchers,
            "last_sync": {"at": sync.last_sync, "ms": sync.last_sync_ms, "error": sync.last_error},
        }),
    }
}

/// Everything `palisade status` shows, as JSON (sections by name).
pub async fn status_json(state: &DaemonState) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let probes = match state.host.status().await {
        Ok(status) => serde_json::to_value(status).unwrap_or_default(),
        Err(err) => json!({"error": err.to_string()}),
    };
    let pack = state.rules.current();
    let table = state.endpoints.borrow().clone();
    let endpoints: Vec<serde_json::Value> = table
        .inventory()
        .endpoints
        .iter()
        .map(|e| json!({"pod": e.key(), "ips": e.ips, "cgroup": e.cgroup, "peer_only": e.peer_only}))
        .collect();
    let monitored = table.index().len();
    let unresolved = table.unresolved();
    let segmentation = serde_json::to_value(&state.enforcer.lock().await.status).unwrap_or_default();
    let conntrack = conntrack_status(state).await;
    let kubernetes = state.kube_health.as_ref().map(|h| {
        let mut kubernetes = serde_json::to_value(&*h.borrow()).unwrap_or_default();
        kubernetes["quarantine_watch"] = serde_json::to_value(state.quarantine_watch.snapshot()).unwrap_or_default();
        kubernetes
    });
    let quarantine = json!({
        "responder": serde_json::to_value(state.quarantine.status()).unwrap_or_default(),
        "quarantined": serde_json::to_value(state.quarantine.list_async().await).unwrap_or_default(),
    });
    json!({
        "node": state.node,
        "version": env!("CARGO_PKG_VERSION"),
        "started": state.started,
        "probes": probes,
        "events": {
            "reader": state.reader.snapshot(),
            "enriched": state.pipeline.enriched.load(Relaxed),
            "evaluations_with_hits": state.pipeline.evaluated_with_hits.load(Relaxed),
            "rule_errors": state.pipeline.rule_errors.load(Relaxed),
            "rules_rejudged": state.pipeline.rules_rejudged.load(Relaxed),
            "unjudged_protected": state.pipeline.unjudged_protected.load(Relaxed),
            "record_errors": state.pipeline.record_errors.load(Relaxed),
            "source_errors": state.pipeline.source_errors.load(Relaxed),
            "process_cache": state.pipeline.process_cache.lock().map(|s| serde_json::to_value(*s).unwrap_or_default()).unwrap_or_default(),
            "loss": loss_status(state),
            "stuck": state.liveness.stuck(),
            "stuck_after_seconds": state.liveness.stuck_after().as_secs_f64(),
            "queues": state.queue_budget.snapshot(),
        },
        "rules": {
            "generation": pack.generation(),
            "rules": pack.rules().len(),
            "subscribed_types": pack.subscribed_types(),
            "last_reload": state.rules_last_reload.lock().map(|v| v.clone()).unwrap_or_default(),
        },
        "endpoints": {"monitored": monitored, "unresolved": unresolved, "inventory": endpoints},
        "policies": segmentation,
        "conntrack": conntrack,
        "quarantine": quarantine,
        "kubernetes": kubernetes,
    })
}

/// Loss totals per pod, kind and reason (demotions included: they say a pod is past its share).
pub fn loss_status(state: &DaemonState) -> serde_json::Value {
    let Ok(monitor) = state.losses.lock() else { return serde_json::Value::Null };
    let table = state.endpoints.borrow().clone();
    let rows: Vec<serde_json::Value> = monitor
        .totals()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(key, n)| {
            let pod = table.index().get(key.cgroup_id).map(|p| format!("{}/{}", p.namespace, p.name));
            json!({"pod": pod, "cgroup_id": key.cgroup_id, "kind": key.kind, "reason": key.reason, "protected": key.protected, "count": n})
        })
        .collect();
    json!(rows)
}

/// Connection tracking for status: settings, sweeps, and the pods holding entries or refused
/// flows, by name.
pub async fn conntrack_status(state: &DaemonState) -> serde_json::Value {
    let Ok(status) = state.conntrack.lock().map(|s| s.clone()) else {
        return json!({"error": "conntrack status lock poisoned"});
    };
    let enforcer = state.enforcer.lock().await;
    let endpoints = &enforcer.compiled().endpoints;
    let pods: Vec<serde_json::Value> = status
        .pods
        .iter()
        .filter(|(_, u)| u.entries > 0 || u.quota_drops > 0 || u.table_full_drops > 0)
        .map(|(id, u)| {
            let pod = endpoints.get(id).map(|e| e.key()).unwrap_or_else(|| format!("endpoint {id} (gone)"));
            json!({"pod": pod, "entries": u.entries, "quota_drops": u.quota_drops, "table_full_drops": u.table_full_drops})
        })
        .collect();
    json!({
        "established_flows": status.settings.established_flows,
        "per_pod_quota": status.settings.per_pod,
        "table_size": status.table_size,
        "timeouts_s": status.settings.timeouts,
        "sweep_interval_s": status.sweep_interval_s,
        "sweeps": status.sweeps,
        "last_sweep": status.last_sweep,
        "pods": pods,
    })
}

/// Now, as events and alerts write times.
pub fn now_rfc3339() -> String {
    crate::time::format_micros(crate::time::now_micros())
}
