//! The quarantine as the rest of the daemon sees it: the API server's [`QuarantineApi`] (list,
//! release and cancel with their audit alerts), the alert records of decisions, queue outcomes
//! and removals, and the worker that serves the rate-limit queue.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::responder::{MANUAL_RULE, CancelRecord, Decision, QuarantineError, QueueOutcome, ReleaseRecord, Removal};
use super::{QuarantineRecord, QuarantineService};
use crate::alerts::{Alert, AlertKind, AlertSink, Outcome as AlertOutcome, PodInfo};
use crate::api::{AddOutcome, BoxFuture, CancelOutcome, QuarantineApi, QuarantineApiError, QuarantineEntry, ReleaseOutcome, OperatorRequest};
use crate::rules::{Action, Severity};

fn pod_info(pod: &str) -> Option<PodInfo> {
    let (namespace, name) = pod.split_once('/')?;
    Some(PodInfo { namespace: namespace.into(), name: name.into(), labels: BTreeMap::new() })
}

/// The alerts for a rule alert once the responder decided: the rule alert itself with the
/// outcome and reason (`pending` when a rate limit queued it; a `quarantine` alert from
/// [`queue_alert`] follows when it is applied). Build the rule alert first
/// (`Alert::from_rule_hit`) and pass its `id` as the finding's `alert_id`, so the alert and the
/// quarantine record name each other.
pub fn alerts_for(rule_alert: Alert, decision: &Decision) -> Vec<Alert> {
    let mut reason = decision.reason.clone();
    if let Some(warning) = &decision.warning {
        reason.push_str("; ");
        reason.push_str(warning);
    }
    vec![rule_alert.with_outcome(decision.outcome, Some(reason))]
}

/// The alert for what became of a queued quarantine: applied (with how long it waited) or ended.
pub fn queue_alert(outcome: &QueueOutcome) -> Alert {
    let decision = &outcome.decision;
    let queued = &outcome.queued;
    let message = match decision.outcome {
        AlertOutcome::Quarantined => format!(
            "queued quarantine of {} applied after {:.1} s (rule {}, alert {})",
            decision.pod, outcome.queued_for_seconds, decision.rule_id, decision.alert_id
        ),
        other => format!(
            "queued quarantine of {} ended {} after {:.1} s: {}",
            decision.pod,
            other.as_str(),
            outcome.queued_for_seconds,
            decision.reason
        ),
    };
    let mut reason = decision.reason.clone();
    if let Some(warning) = &decision.warning {
        reason.push_str("; ");
        reason.push_str(warning);
    }
    let mut alert = Alert::new(AlertKind::Quarantine, queued.severity, message)
        .with_action(Action::Quarantine)
        .with_outcome(decision.outcome, Some(reason))
        .with_rule(decision.rule_id.clone(), decision.rule_id.clone())
        .with_event(json!({
            "queued_alert_id": queued.alert_id,
            "queued_at": queued.queued_at,
            "queued_for_seconds": outcome.queued_for_seconds,
            "held_by": queued.held_by,
            "cgroup_id": decision.cgroup_id,
            "enforced_at_ns": decision.enforced_at_ns,
        }));
    if let Some(pod) = pod_info(&decision.pod) {
        alert = alert.with_pod(pod);
    }
    alert
}

/// The alert for the quarantine label changed in the cluster by someone other than palisade: the
/// quarantine stays in force and the label is put back (`relabel_error` when that failed).
pub fn tamper_alert(record: &QuarantineRecord, change: &str, relabel_error: Option<String>) -> Alert {
    let done = match &relabel_error {
        None => "the label was put back".to_string(),
        Some(err) => format!("putting the label back failed ({err}); the reconciler retries"),
    };
    let mut alert = Alert::new(
        AlertKind::Tamper,
        Severity::High,
        format!("{change} on quarantined pod {} by someone other than palisade: {done}; the quarantine stays in force (release only with `palisade quarantine release`)", record.pod),
    )
    .with_action(Action::Quarantine)
    .with_outcome(AlertOutcome::AlreadyQuarantined, Some(format!("quarantined since {} (alert {}); {done}", record.since, record.alert_id)))
    .with_rule(record.rule_id.clone(), record.rule_id.clone())
    .with_event(json!({"change": change, "quarantine_alert_id": record.alert_id, "cgroup_id": record.cgroup_id, "relabelled": relabel_error.is_none()}));
    if let Some(pod) = pod_info(&record.pod) {
        alert = alert.with_pod(pod);
    }
    alert
}

/// The audit alert of a cancelled queued quarantine.
pub fn cancel_alert(record: &CancelRecord) -> Alert {
    let mut alert = Alert::new(
        AlertKind::Guardrail,
        Severity::High,
        format!("queued quarantine of {} cancelled by {}: {}", record.pod, record.by, record.reason),
    )
    .with_action(Action::Quarantine)
    .with_outcome(AlertOutcome::Suppressed, Some(format!("cancelled by {}: {}", record.by, record.reason)))
    .with_rule(record.rule_id.clone(), record.rule_id.clone())
    .with_event(serde_json::to_value(record).unwrap_or(Value::Null));
    if let Some(pod) = pod_info(&record.pod) {
        alert = alert.with_pod(pod);
    }
    alert
}

/// Serves the rate-limit queue for the daemon's lifetime: applies queued quarantines as soon as
/// the token buckets allow (waking when `next_due` says, at least every second) and writes an
/// alert for each outcome.
pub fn spawn_queue_worker(service: QuarantineService, alerts: AlertSink, metrics: crate::metrics::Metrics) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = service.blocking(|s| s.next_due()).await.unwrap_or(QUEUE_IDLE_CHECK);
            tokio::time::sleep(wait.clamp(QUEUE_MIN_SLEEP, QUEUE_IDLE_CHECK)).await;
            let outcomes = service.apply_due_async().await;
            for outcome in &outcomes {
                if outcome.decision.outcome == AlertOutcome::Quarantined {
                    metrics.record_quarantine();
                }
                if let Err(err) = alerts.emit(queue_alert(outcome)).await {
                    tracing::error!(%err, pod = %outcome.decision.pod, "a queued quarantine's alert could not be written");
                }
            }
            metrics.set_quarantines_pending(service.blocking(|s| s.pending().len()).await as i64);
        }
    })
}

/// The queue worker looks at least this often (a policy reload can make room).
const QUEUE_IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// And no more often than this.
const QUEUE_MIN_SLEEP: std::time::Duration = std::time::Duration::from_millis(10);

/// The audit alert of a release.
pub fn release_alert(record: &ReleaseRecord) -> Alert {
    let mut alert = Alert::new(
        AlertKind::Release,
        Severity::Info,
        format!("quarantine of {} lifted by {}: {}", record.pod, record.by, record.reason),
    )
    .with_action(Action::Quarantine)
    .with_outcome(AlertOutcome::Released, Some(record.reason.clone()))
    .with_rule(record.rule_id.clone(), record.rule_id.clone())
    .with_event(serde_json::to_value(record).unwrap_or(Value::Null));
    if let Some(pod) = pod_info(&record.pod) {
        alert = alert.with_pod(pod);
    }
    alert
}

/// The alert for a quarantine that ended because its endpoint left the inventory.
pub fn removal_alert(removal: &Removal) -> Alert {
    let mut alert = Alert::new(
        AlertKind::Release,
        Severity::Low,
        format!("quarantine of {} ended: {}", removal.record.pod, removal.reason),
    )
    .with_action(Action::Quarantine)
    .with_outcome(AlertOutcome::Released, Some(removal.reason.clone()))
    .with_rule(removal.record.rule_id.clone(), removal.record.rule_id.clone())
    .with_event(serde_json::to_value(removal).unwrap_or(Value::Null));
    if let Some(pod) = pod_info(&removal.record.pod) {
        alert = alert.with_pod(pod);
    }
    alert
}

/// What the API server calls for `GET /v1/quarantines` and `POST /v1/quarantines/release`.
/// Writes the release audit alert itself, waiting for room in the alert queue.
pub struct QuarantineApiHandler {
    service: QuarantineService,
    alerts: AlertSink,
    metrics: Option<crate::api::Metrics>,
    releases: Option<tokio::sync::mpsc::UnboundedSender<ReleaseRecord>>,
}

impl QuarantineApiHandler {
    pub fn new(service: QuarantineService, alerts: AlertSink) -> QuarantineApiHandler {
        QuarantineApiHandler { service, alerts, metrics: None, releases: None }
    }

    /// Counts operator quarantines and releases (`palisade_quarantines_total`,
    /// `palisade_releases_total`) like the responder's own.
    pub fn with_metrics(mut self, metrics: crate::api::Metrics) -> QuarantineApiHandler {
        self.metrics = Some(metrics);
        self
    }

    /// Every release through the API goes to `releases` too (the Kubernetes mirror posts the
    /// Released Event with who released and why).
    pub fn with_release_notices(mut self, releases: tokio::sync::mpsc::UnboundedSender<ReleaseRecord>) -> QuarantineApiHandler {
        self.releases = Some(releases);
        self
    }
}

impl QuarantineApi for QuarantineApiHandler {
    fn list(&self) -> BoxFuture<'_, Result<Vec<QuarantineEntry>, QuarantineApiError>> {
        Box::pin(async move {
            let drops = self.service.drops_async().await;
            let enforced = self.service.list_async().await.into_iter().map(|r| {
                let dropped = drops.get(&r.pod).copied().unwrap_or_default();
                QuarantineEntry {
                    namespace: r.namespace,
                    name: r.name,
                    since: r.since,
                    rule: Some(r.rule_id),
                    reason: r.reason,
                    alert_id: Some(r.alert_id),
                    dry_run: false,
                    pending: false,
                    extra: BTreeMap::from([
                        ("cgroup".to_string(), json!(r.cgroup)),
                        ("cgroup_id".to_string(), json!(r.cgroup_id)),
                        ("drops".to_string(), json!(dropped)),
                    ]),
                }
            });
            let pending = self.service.pending_async().await.into_iter().map(|p| QuarantineEntry {
                namespace: p.namespace,
                name: p.name,
                since: p.queued_at,
                rule: Some(p.rule_id),
                reason: p.reason,
                alert_id: Some(p.alert_id),
                dry_run: false,
                pending: true,
                extra: BTreeMap::from([("held_by".to_string(), json!(p.held_by))]),
            });
            let dry_run = self.service.dry_run_list_async().await.into_iter().map(|d| QuarantineEntry {
                namespace: d.namespace,
                name: d.name,
                since: d.since,
                rule: Some(d.rule_id),
                reason: d.reason,
                alert_id: Some(d.alert_id),
                dry_run: true,
                pending: false,
                extra: BTreeMap::from([("not_enforced".to_string(), json!(d.why_not)), ("hits".to_string(), json!(d.hits))]),
            });
            Ok(enforced.chain(pending).chain(dry_run).collect())
        })
    }

    fn add(&self, request: OperatorRequest) -> BoxFuture<'_, Result<AddOutcome, QuarantineApiError>> {
        Box::pin(async move {
            let pod = format!("{}/{}", request.namespace, request.name);
            // The audit alert exists first so the quarantine record can name it.
            let alert = Alert::new(
                AlertKind::Quarantine,
                Severity::High,
                format!("quarantine of {pod} by {}: {}", request.by, request.reason),
            )
            .with_action(Action::Quarantine)
            .with_rule(MANUAL_RULE.to_string(), "Quarantine by an operator".to_string());
            let alert = match pod_info(&pod) {
                Some(info) => alert.with_pod(info),
                None => alert,
            };
            let alert_id = alert.id.clone();
            let result = self.service.add_async(pod.clone(), request.reason.clone(), request.by.clone(), alert_id.clone()).await;
            let (alert, answer) = match result {
                Ok(decision) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.record_quarantine();
                    }
                    let mut message = format!("{pod} quarantined (alert {alert_id})");
                    if let Some(warning) = &decision.warning {
                        message.push_str("; ");
                        message.push_str(warning);
                    }
                    let event = json!({"by": request.by, "reason": request.reason, "cgroup_id": decision.cgroup_id, "enforced_at_ns": decision.enforced_at_ns});
                    let alert = alert.with_outcome(AlertOutcome::Quarantined, Some(decision.reason.clone())).with_event(event);
                    (alert, Ok(AddOutcome { quarantined: true, message, alert_id: Some(alert_id) }))
                }
                Err(err) => {
                    let alert = alert
                        .with_outcome(AlertOutcome::Failed, Some(err.to_string()))
                        .with_event(json!({"by": request.by, "reason": request.reason}));
                    let answer = match err {
                        QuarantineError::BadPodName(_) | QuarantineError::AlreadyQuarantined { .. } | QuarantineError::Refused { .. } => {
                            QuarantineApiError::Refused(err.to_string())
                        }
                        other => QuarantineApiError::Failed(other.to_string()),
                    };
                    (alert, Err(answer))
                }
            };
            if let Err(err) = self.alerts.emit(alert).await {
                tracing::error!(%err, %pod, "operator quarantine handled but its audit alert could not be written");
            }
            answer
        })
    }

    fn cancel(&self, request: OperatorRequest) -> BoxFuture<'_, Result<CancelOutcome, QuarantineApiError>> {
        Box::pin(async move {
            let pod = format!("{}/{}", request.namespace, request.name);
            match self.service.cancel_async(pod.clone(), request.reason, request.by).await {
                Ok(record) => {
                    let alert = cancel_alert(&record);
                    let alert_id = alert.id.clone();
                    if let Err(err) = self.alerts.emit(alert).await {
                        tracing::error!(%err, %pod, "cancel done but its audit alert could not be written");
                    }
                    let mut message = format!("queued quarantine of {pod} cancelled (queued since {})", record.queued_at);
                    if let Some(warning) = &record.warning {
                        message.push_str("; ");
                        message.push_str(warning);
                    }
                    Ok(CancelOutcome { cancelled: true, message, alert_id: Some(alert_id) })
                }
                Err(QuarantineError::NotPending { pod }) => Err(QuarantineApiError::NotPending(pod)),
                Err(err @ (QuarantineError::BadPodName(_) | QuarantineError::Policy(_))) => Err(QuarantineApiError::Refused(err.to_string())),
                Err(err) => Err(QuarantineApiError::Failed(err.to_string())),
            }
        })
    }

    fn release(&self, request: OperatorRequest) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>> {
        Box::pin(async move {
            let pod = format!("{}/{}", request.namespace, request.name);
            match self.service.release_async(pod.clone(), request.reason, request.by).await {
                Ok(record) => {
                    if let Some(metrics) = &self.metrics {
                        metrics.record_release();
                    }
                    if let Some(releases) = &self.releases {
                        let _ = releases.send(record.clone());
                    }
                    let alert = release_alert(&record);
                    let alert_id = alert.id.clone();
                    if let Err(err) = self.alerts.emit(alert).await {
                        tracing::error!(%err, %pod, "release done but its audit alert could not be written");
                    }
                    let mut message = format!("{pod} released (quarantined since {})", record.since);
                    if let Some(warning) = &record.warning {
                        message.push_str("; ");
                        message.push_str(warning);
                    }
                    Ok(ReleaseOutcome { released: true, message, alert_id: Some(alert_id) })
                }
                Err(QuarantineError::NotQuarantined { pod }) => Err(QuarantineApiError::NotQuarantined(pod)),
                Err(err @ (QuarantineError::BadPodName(_) | QuarantineError::Pending { .. })) => Err(QuarantineApiError::Refused(err.to_string())),
                Err(err) => Err(QuarantineApiError::Failed(err.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Outcome;
    use crate::quarantine::PendingQuarantine;

    fn decision(outcome: Outcome) -> Decision {
        Decision {
            outcome,
            reason: "rate limit: held back by the node ceiling".into(),
            pod: "shop/a".into(),
            rule_id: "reverse_shell".into(),
            alert_id: "x".into(),
            cgroup_id: Some(1),
            enforced_at_ns: None,
            warning: None,
            expected_in_seconds: Some(6.0),
        }
    }

    #[test]
    fn decisions_map_onto_alert_outcomes_and_queue_outcomes_name_the_wait() {
        let base = Alert::new(AlertKind::Rule, Severity::Critical, "hit");
        let alerts = alerts_for(base.clone(), &decision(Outcome::Quarantined));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].outcome, AlertOutcome::Quarantined);
        let alerts = alerts_for(base, &decision(Outcome::Pending));
        assert_eq!(alerts[0].outcome, AlertOutcome::Pending);
        let applied = QueueOutcome {
            decision: decision(Outcome::Quarantined),
            queued: PendingQuarantine {
                pod: "shop/a".into(),
                namespace: "shop".into(),
                name: "a".into(),
                rule_id: "reverse_shell".into(),
                severity: Severity::Critical,
                alert_id: "x".into(),
                reason: "shell".into(),
                queued_at: "2026-12-01T00:00:00Z".into(),
                queued_unix_ns: 0,
                seq: 0,
                held_by: "the node ceiling of 10 quarantines per minute".into(),
            },
            queued_for_seconds: 6.25,
        };
        let alert = queue_alert(&applied);
        assert_eq!((alert.kind, alert.outcome), (AlertKind::Quarantine, AlertOutcome::Quarantined));
        assert!(alert.message.contains("after 6.2 s") || alert.message.contains("after 6.3 s"), "{}", alert.message);
        assert_eq!(alert.pod.as_ref().map(PodInfo::qualified), Some("shop/a".into()));
    }
}
