//! The findings thread: each evaluation's rule hits become alerts after the responder decided
//! what to do about them; rule failures are counted and alerted (rate limited).

use std::sync::Arc;

use serde_json::json;

use crate::alerts::{Alert, AlertKind, Outcome};
use crate::events::context::EventContext;
use crate::quarantine::Finding;
use crate::rules::evaluator::{EvaluatorConfig, RuleEvaluator};
use crate::rules::model::Severity;
use crate::status::DaemonState;

/// One rule could not judge one event: counted per rule and reason, logged, and raised as a
/// `rule_error` alert when the limiter lets it through (the event's other rules already ran).
pub(super) fn report_rule_failure(
    state: &DaemonState,
    limiter: &mut crate::rules::failures::FailureLimiter,
    failure: &crate::rules::RuleFailure,
    context: &EventContext,
) {
    state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.metrics.record_rule_error(&failure.rule_id, failure.reason.as_str());
    let Some(count) = limiter.admit(failure, std::time::Instant::now()) else { return };
    tracing::warn!(rule = %failure.rule_id, event_type = %failure.event_type, reason = %failure.reason, detail = %failure.detail, count, "rule could not judge an event");
    let message = format!(
        "rule {} could not judge a {} event ({}): {}; the other rules still ran",
        failure.rule_id, failure.event_type, failure.reason, failure.detail
    );
    let (alert, _) = rule_error_alert(state, failure, context, message, Some(Severity::High));
    let alert = alert.with_event(json!({
        "rule": failure.rule_id,
        "event_type": failure.event_type,
        "reason": failure.reason,
        "detail": failure.detail,
        "failures": count,
    }));
    state.alerts.try_emit(alert);
}

/// A `rule_error` alert about `failure` on the event of `context`, named by the rule (its title
/// from the pack in force), at `severity` or else the rule's own; with the rule's MITRE ids.
fn rule_error_alert(
    state: &DaemonState,
    failure: &crate::rules::RuleFailure,
    context: &EventContext,
    message: String,
    severity: Option<Severity>,
) -> (Alert, Vec<String>) {
    let pack = state.rules.current();
    let meta = pack.rule(&failure.rule_id);
    let severity = severity.unwrap_or_else(|| meta.map_or(Severity::High, |r| r.severity));
    let title = meta.map(|r| r.title.clone()).unwrap_or_default();
    let mitre = meta.map(|r| r.mitre.clone()).unwrap_or_default();
    let alert = Alert::about_event(AlertKind::RuleError, severity, message, &state.node, context).with_rule(failure.rule_id.clone(), title);
    (alert, mitre)
}

/// Fail closed (issue 14): a rule that could not judge a protected event (an exec, a credential
/// read, a ptrace...) within its budget, even after a repeat for a descheduled thread, does not
/// let it pass with a rate-limited notice. Every such event raises a `rule_error` alert at the
/// rule's own severity with the event attached (`event.unjudged: true`, `event.input`), never
/// held back by the limiter (protected events are bounded per pod by the kernel's priority
/// share), and is counted (`events.unjudged_protected` in status,
/// `palisade_rule_unjudged_total{rule,reason}`).
pub(super) fn report_unjudged(
    state: &DaemonState,
    failure: &crate::rules::RuleFailure,
    context: &EventContext,
    input: &regorus::Value,
    evidence: &mut Option<serde_json::Value>,
) {
    state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.pipeline.unjudged_protected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.metrics.record_rule_error(&failure.rule_id, failure.reason.as_str());
    state.metrics.record_rule_unjudged(&failure.rule_id, failure.reason.as_str());
    tracing::warn!(rule = %failure.rule_id, event_type = %failure.event_type, reason = %failure.reason, detail = %failure.detail, "rule could not judge a protected event; alerted at its severity");
    let message = format!(
        "rule {} could not judge a protected {} event ({}): {}; treat the event as suspect",
        failure.rule_id, failure.event_type, failure.reason, failure.detail
    );
    let (alert, mitre) = rule_error_alert(state, failure, context, message, None);
    let alert = alert.with_mitre(mitre).with_event(json!({
        "rule": failure.rule_id,
        "event_type": failure.event_type,
        "reason": failure.reason,
        "detail": failure.detail,
        "failures": 1,
        "unjudged": true,
        "input": evidence.get_or_insert_with(|| crate::rules::input::to_json(input)).clone(),
    }));
    if let Err(err) = state.alerts.blocking_emit(alert) {
        tracing::error!(%err, "an unjudged-event alert could not be written (the writer stopped)");
    }
}

/// Turns one rule hit into its alert, after the responder decided what to do about it (the map
/// update, if any, has returned before the alert is written: alerts and enforcement agree).
/// The event's JSON (the alert's evidence, `evidence`: made once per event, for its first hit)
/// is made after the responder acted, so it is not on the way to the map update.
pub(super) fn respond(
    state: &DaemonState,
    hit: crate::rules::model::RuleHit,
    context: &EventContext,
    input: &regorus::Value,
    evidence: &mut Option<serde_json::Value>,
) {
    let mut alert = Alert::for_rule_hit(&hit, &state.node, context, &serde_json::Value::Null);
    let decision = context.pod.as_deref().map(|pod| {
        let finding = Finding { hit, namespace: pod.namespace.clone(), name: pod.name.clone(), alert_id: alert.id.clone() };
        state.quarantine.respond(&finding)
    });
    alert.event = Some(evidence.get_or_insert_with(|| crate::rules::input::to_json(input)).clone());
    let alerts = match decision {
        Some(decision) => {
            if decision.outcome == crate::quarantine::Outcome::Quarantined {
                state.metrics.record_quarantine();
            }
            crate::quarantine::api::alerts_for(alert, &decision)
        }
        // Host-mode events outside any pod: nothing to isolate.
        None => vec![alert.with_outcome(Outcome::Alerted, Some("not in a pod".into()))],
    };
    for alert in alerts {
        if let Err(err) = state.alerts.blocking_emit(alert) {
            tracing::error!(%err, "an alert could not be written (the writer stopped)");
        }
    }
}

/// Starts the rule workers and the findings thread (alert, decide on quarantine, record the
/// outcome); returns the evaluator the pipeline submits to.
pub(super) fn start(state: &Arc<DaemonState>, workers: usize) -> anyhow::Result<RuleEvaluator> {
    let config = EvaluatorConfig { workers: workers.max(1), ..EvaluatorConfig::default() };
    let (evaluator, judgements) = RuleEvaluator::start_observed(state.rules.clone(), config, Some(state.metrics.clone()))?;
    let state = state.clone();
    std::thread::Builder::new().name("palisade-findings".into()).spawn(move || {
        let mut failure_alerts = crate::rules::failures::FailureLimiter::default();
        for evaluation in judgements {
            act_on(&state, &mut failure_alerts, evaluation, false);
        }
    })?;
    Ok(evaluator)
}

/// What the findings thread (pool evaluations) and the pipeline (protected events, judged at
/// once) do with an evaluation: count repeats, report the rules that failed (a protected event
/// fails closed: `report_unjudged`), respond to each hit.
pub(super) fn act_on(
    state: &DaemonState,
    failure_alerts: &mut crate::rules::failures::FailureLimiter,
    evaluation: crate::rules::Evaluation,
    protected: bool,
) {
    if evaluation.rejudged > 0 {
        state.pipeline.rules_rejudged.fetch_add(u64::from(evaluation.rejudged), std::sync::atomic::Ordering::Relaxed);
        state.metrics.record_rule_rejudged(evaluation.rejudged);
    }
    // The pipeline submits every event with its context.
    let Some(context) = evaluation.context.as_deref() else {
        state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!("an evaluation came back without its event context; not acted on");
        return;
    };
    let mut evidence = None;
    for failure in &evaluation.failures {
        if protected {
            report_unjudged(state, failure, context, &evaluation.input, &mut evidence);
        } else {
            report_rule_failure(state, failure_alerts, failure, context);
        }
    }
    match evaluation.hits {
        Ok(hits) => {
            if hits.is_empty() {
                return;
            }
            state.pipeline.evaluated_with_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for hit in hits {
                respond(state, hit, context, &evaluation.input, &mut evidence);
            }
        }
        Err(err) => {
            state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%err, "rule evaluation failed");
        }
    }
}
