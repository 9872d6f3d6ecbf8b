//! The quarantine as the rest of the daemon sees it: the API server's [`QuarantineApi`] (list,
//! release with its audit alert) and the alert records of decisions and removals.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::responder::{Decision, QuarantineError, ReleaseRecord, Removal};
use super::QuarantineService;
use crate::alerts::{Alert, AlertKind, AlertSink, Outcome as AlertOutcome, PodInfo};
use crate::api::{BoxFuture, QuarantineApi, QuarantineApiError, QuarantineEntry, ReleaseOutcome, ReleaseRequest};
use crate::rules::{Action, Severity};

fn pod_info(pod: &str) -> Option<PodInfo> {
    let (namespace, name) = pod.split_once('/')?;
    Some(PodInfo { namespace: namespace.into(), name: name.into(), labels: BTreeMap::new() })
}

/// The alerts for a rule alert once the responder decided: the rule alert itself with the
/// outcome and reason, plus a guardrail alert when this decision tripped the rate limit.
/// Build the rule alert first (`Alert::from_rule_hit`) and pass its `id` as the verdict's
/// `alert_id`, so the alert and the quarantine record name each other.
pub fn alerts_for(rule_alert: Alert, decision: &Decision) -> Vec<Alert> {
    let mut reason = decision.reason.clone();
    if let Some(warning) = &decision.warning {
        reason.push_str("; ");
        reason.push_str(warning);
    }
    let mut out = vec![rule_alert.with_outcome(decision.outcome, Some(reason))];
    if decision.breaker_tripped {
        let mut guardrail = Alert::new(
            AlertKind::Guardrail,
            Severity::Critical,
            format!("automatic quarantine suspended on this node: {}", decision.reason),
        )
        .with_action(Action::Quarantine)
        .with_outcome(AlertOutcome::Suppressed, Some("run `palisade quarantine resume` to re-arm it".into()))
        .with_rule(decision.rule_id.clone(), decision.rule_id.clone())
        .with_event(json!({"tripped_by_alert": decision.alert_id, "pod": decision.pod}));
        if let Some(pod) = pod_info(&decision.pod) {
            guardrail = guardrail.with_pod(pod);
        }
        out.push(guardrail);
    }
    out
}

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
}

impl QuarantineApiHandler {
    pub fn new(service: QuarantineService, alerts: AlertSink) -> QuarantineApiHandler {
        QuarantineApiHandler { service, alerts }
    }
}

impl QuarantineApi for QuarantineApiHandler {
    fn list(&self) -> BoxFuture<'_, Result<Vec<QuarantineEntry>, QuarantineApiError>> {
        Box::pin(async move {
            Ok(self
                .service
                .list_async()
                .await
                .into_iter()
                .map(|r| QuarantineEntry {
                    namespace: r.namespace,
                    name: r.name,
                    since: r.since,
                    rule: Some(r.rule_id),
                    reason: r.reason,
                    alert_id: Some(r.alert_id),
                    dry_run: false,
                    extra: BTreeMap::from([
                        ("cgroup".to_string(), json!(r.cgroup)),
                        ("cgroup_id".to_string(), json!(r.cgroup_id)),
                    ]),
                })
                .collect())
        })
    }

    fn resume(&self, by: String) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>> {
        Box::pin(async move {
            match self.service.resume_async(by.clone()).await {
                Some(was) => {
                    let alert = Alert::new(
                        AlertKind::Guardrail,
                        Severity::High,
                        format!(
                            "automatic quarantine re-armed by {by} (suspended since {}, {} quarantines suppressed meanwhile)",
                            was.since, was.suppressed
                        ),
                    )
                    .with_action(Action::Quarantine)
                    .with_outcome(AlertOutcome::Released, Some(format!("resumed by {by}")))
                    .with_event(json!({"suspended": was}));
                    let alert_id = alert.id.clone();
                    if let Err(err) = self.alerts.emit(alert).await {
                        tracing::error!(%err, "resume done but its audit alert could not be written");
                    }
                    Ok(ReleaseOutcome { released: true, message: "automatic quarantine re-armed".into(), alert_id: Some(alert_id) })
                }
                None => Ok(ReleaseOutcome { released: false, message: "automatic quarantine was not suspended".into(), alert_id: None }),
            }
        })
    }

    fn release(&self, request: ReleaseRequest) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>> {
        Box::pin(async move {
            let pod = format!("{}/{}", request.namespace, request.name);
            match self.service.release_async(pod.clone(), request.reason, request.by).await {
                Ok(record) => {
                    let alert = release_alert(&record);
                    let alert_id = alert.id.clone();
                    if let Err(err) = self.alerts.emit(alert).await {
                        tracing::error!(%err, %pod, "release done but its audit alert could not be written");
                    }
                    let mut message = format!("{pod} released (quarantined since {})", record.since);
                    if record.resumed {
                        message.push_str("; automatic quarantine re-armed");
                    }
                    if let Some(warning) = &record.warning {
                        message.push_str("; ");
                        message.push_str(warning);
                    }
                    Ok(ReleaseOutcome { released: true, message, alert_id: Some(alert_id) })
                }
                Err(QuarantineError::NotQuarantined { pod }) => Err(QuarantineApiError::NotQuarantined(pod)),
                Err(err @ QuarantineError::BadPodName(_)) => Err(QuarantineApiError::Refused(err.to_string())),
                Err(err) => Err(QuarantineApiError::Failed(err.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Outcome;

    fn decision(outcome: Outcome, tripped: bool) -> Decision {
        Decision {
            outcome,
            reason: "rate limit of 1 quarantines per minute reached".into(),
            pod: "shop/a".into(),
            rule_id: "reverse_shell".into(),
            alert_id: "x".into(),
            cgroup_id: Some(1),
            enforced_at_ns: None,
            warning: None,
            breaker_tripped: tripped,
        }
    }

    #[test]
    fn decisions_map_onto_alert_outcomes_and_a_trip_is_loud() {
        let base = Alert::new(AlertKind::Rule, Severity::Critical, "hit");
        let alerts = alerts_for(base.clone(), &decision(Outcome::Quarantined, false));
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].outcome, AlertOutcome::Quarantined);
        let alerts = alerts_for(base, &decision(Outcome::Suppressed, true));
        assert_eq!(alerts.iter().map(|a| a.kind).collect::<Vec<_>>(), [AlertKind::Rule, AlertKind::Guardrail]);
        assert_eq!(alerts[1].pod.as_ref().map(PodInfo::qualified), Some("shop/a".into()));
    }
}
