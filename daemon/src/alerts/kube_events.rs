//! Kubernetes mode: alerts of at least a configured severity (`--alert-events`, default `high`)
//! also become Events on their pod, written by `k8s::ClusterAlertEvents` (kube's Recorder:
//! repeats of a rule on a pod fold into one Event's series; a per-node token bucket keeps an
//! alert storm from becoming an API-server storm). A view, never the record: the alert log has
//! every alert; what is not written here (queue full, over the rate limit, API errors) is
//! counted in the exporter's stats (`palisade status`, `exports.kube_events`) and in
//! `palisade_alert_exports_total{exporter="kube_events"}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::export::{ExportCounters, ExportStats};
use super::schema::{Alert, AlertKind};
use crate::k8s::{AlertEventOutcome, ClusterAlertEvents};
use crate::metrics::Metrics;
use crate::rules::Severity;

const EXPORTER: &str = "kube_events";
const QUEUE: usize = 1024;

#[derive(Clone)]
pub struct KubeEventExporter {
    tx: tokio::sync::mpsc::Sender<Alert>,
    min_severity: Severity,
    counters: Arc<ExportCounters>,
    metrics: Option<Metrics>,
}

impl KubeEventExporter {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(events: ClusterAlertEvents, min_severity: Severity, metrics: Option<Metrics>) -> KubeEventExporter {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Alert>(QUEUE);
        let counters = Arc::new(ExportCounters::default());
        let task_counters = counters.clone();
        let task_metrics = metrics.clone();
        tokio::spawn(async move {
            while let Some(alert) = rx.recv().await {
                let Some(pod) = &alert.pod else { continue };
                let rule = alert.rule.as_ref().map(|r| r.id.clone()).unwrap_or_else(|| alert.kind.as_str().to_string());
                let result = events.alert(&pod.qualified(), &rule, alert.severity.as_str(), &alert.message, &alert.id).await;
                let outcome = match result {
                    Ok(AlertEventOutcome::Published) => {
                        task_counters.sent.fetch_add(1, Ordering::Relaxed);
                        "sent"
                    }
                    // Over the node's rate limit: the alert log has it; counted as dropped.
                    Ok(AlertEventOutcome::Suppressed) => {
                        task_counters.dropped.fetch_add(1, Ordering::Relaxed);
                        "dropped"
                    }
                    Err(err) => {
                        task_counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%err, alert = %alert.id, "writing an alert Event");
                        "failed"
                    }
                };
                if let Some(metrics) = &task_metrics {
                    metrics.record_export(EXPORTER, outcome);
                }
            }
        });
        KubeEventExporter { tx, min_severity, counters, metrics }
    }

    /// Queues `alert` if it is about a pod and severe enough; never blocks the alert writer.
    pub fn offer(&self, alert: &Alert) {
        // Quarantine and release have Events of their own (Quarantined / Released).
        if alert.pod.is_none() || alert.severity < self.min_severity || matches!(alert.kind, AlertKind::Quarantine | AlertKind::Release) {
            return;
        }
        if self.tx.try_send(alert.clone()).is_err() {
            self.counters.record_dropped(EXPORTER, self.metrics.as_ref());
        }
    }

    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }
}
