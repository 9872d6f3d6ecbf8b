//! Tasks that keep status and metrics current and the endpoint table's readers in step: the
//! endpoint followers, the counter exporter, the loss monitor and the liveness watch.

use std::sync::Arc;

use crate::endpoints::EndpointTable;
use crate::events::kind::EventKind;
use crate::probes::loader;
use crate::status::DaemonState;

/// Keeps the stages that read the endpoint table in step with it, in this order: segmentation
/// (compiles, syncs the maps, attaches to new cgroups), the responder (endpoint ids, quarantines
/// that follow a re-created cgroup or end with a pod that left), then the probes' monitored set.
/// A monitored-set update that fails is retried until it holds.
pub(super) fn spawn_endpoint_followers(state: Arc<DaemonState>, mut endpoints: tokio::sync::watch::Receiver<Arc<EndpointTable>>) {
    tokio::spawn(async move {
        let mut retry = tokio::time::interval(crate::endpoints::RESOLVE_INTERVAL);
        let mut monitored_in_sync = true;
        loop {
            tokio::select! {
                changed = endpoints.changed() => {
                    if changed.is_err() { return; }
                    let table = endpoints.borrow_and_update().clone();
                    {
                        let mut enforcer = state.enforcer.lock().await;
                        if let Err(err) = enforcer.set_inventory(table.inventory().clone()).await {
                            tracing::error!(%err, "re-segmenting after an endpoint change");
                        }
                        state.quarantine.set_endpoint_ids(enforcer.compiled().endpoints.values().map(|ep| (ep.pod_key(), ep.endpoint_id())));
                    }
                    match state.quarantine.set_endpoints(table.clone()) {
                        Ok(removals) => {
                            for removal in &removals {
                                state.alerts.try_emit(crate::quarantine::api::removal_alert(removal));
                            }
                        }
                        Err(err) => tracing::error!(%err, "reconciling quarantines with the endpoints"),
                    }
                    monitored_in_sync = false;
                }
                _ = retry.tick(), if !monitored_in_sync => {}
            }
            if !monitored_in_sync {
                let monitored = endpoints.borrow().monitored();
                match state.host.set_monitored(monitored).await {
                    Ok(()) => monitored_in_sync = true,
                    Err(err) => tracing::error!(%err, "updating monitored cgroups; retrying"),
                }
            }
        }
    });
}

/// Feeds kernel per-kind counters and quarantine gauges into the metrics every few seconds.
pub(super) fn spawn_counter_exporter(state: Arc<DaemonState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Ok(status) = state.host.status().await {
                if let Some(counters) = status.counters {
                    state.metrics.observe_kernel_counters(&counters.emitted, &counters.lost);
                }
            }
            let active = state.quarantine.list_async().await.len();
            state.metrics.set_quarantines_active(active as i64);
            let sync_failing = state.enforcer.lock().await.status.last_error.is_some();
            state.metrics.set_datapath_sync_failing(sync_failing);
            if let Some(kube) = &state.kube_health {
                let connected = kube.borrow().connected;
                state.metrics.set_watchers_connected("kubernetes", connected);
            }
            let pods = state.conntrack.lock().map(|s| s.pods.clone()).unwrap_or_default();
            if !pods.is_empty() {
                let enforcer = state.enforcer.lock().await;
                let named: Vec<(String, crate::segmentation::conntrack::PodUsage)> = pods
                    .iter()
                    .map(|(id, u)| (enforcer.compiled().endpoints.get(id).map(|e| e.key()).unwrap_or_else(|| format!("endpoint-{id}")), *u))
                    .collect();
                drop(enforcer);
                state.metrics.observe_conntrack(&named);
            }
        }
    });
}

/// Samples the per-pod loss counters (kernel and reader) every second; raises `event_loss`
/// alerts (rate limited by the monitor) and counts user-space drops in the metrics.
pub(super) fn spawn_loss_monitor(state: Arc<DaemonState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut queue_seen: std::collections::BTreeMap<(u64, EventKind), u64> = Default::default();
        let mut loss_seen: std::collections::BTreeMap<loader::LossKey, u64> = Default::default();
        loop {
            tick.tick().await;
            let mut totals = match state.host.with(|ebpf| loader::read_pod_losses(ebpf)).await {
                Ok(Ok(totals)) => totals,
                Ok(Err(err)) => {
                    tracing::warn!(%err, "reading the per-pod loss counters");
                    continue;
                }
                Err(_) => return,
            };
            let queue = state.queue_drops.totals();
            for (&(cgroup, kind), &total) in &queue {
                let before = queue_seen.insert((cgroup, kind), total).unwrap_or(0);
                if total > before {
                    state.metrics.record_events_lost(kind.as_str(), total - before);
                }
            }
            totals.extend(crate::events::loss::queue_drop_totals(&queue));
            let table = state.endpoints.borrow().clone();
            for (key, &total) in &totals {
                let before = loss_seen.insert(*key, total).unwrap_or(0);
                if total > before {
                    let pod = table.index().get(key.cgroup_id).map(|p| format!("{}/{}", p.namespace, p.name));
                    let pod = pod.unwrap_or_else(|| format!("cgroup:{}", key.cgroup_id));
                    state.metrics.record_pod_events_lost(&pod, key.kind.as_str(), key.reason.as_str(), total - before);
                }
            }
            let report = match state.losses.lock() {
                Ok(mut monitor) => monitor.observe(&totals, std::time::Instant::now()),
                Err(_) => return,
            };
            if let Some(report) = report {
                let alert = report.alert(table.index());
                tracing::warn!(message = %alert.message, "event loss");
                let loss_alert_id = alert.id.clone();
                state.alerts.try_emit(alert);
                if state.quarantine.quarantines_flooding_pods() {
                    for (cgroup_id, over_budget) in report.flooding_cgroups() {
                        match table.index().get(cgroup_id) {
                            Some(pod) => respond_to_flood(&state, &pod, over_budget, &loss_alert_id),
                            // Not a pod (a host process with a monitored cgroup): nothing to isolate.
                            None => tracing::info!(cgroup_id, over_budget, "a flooding cgroup is no pod; not quarantined"),
                        }
                    }
                }
            }
        }
    });
}

/// A pod that flooded its event budget while protected events were being lost, as a finding of
/// the built-in rule `event_flood` (`ResponsePolicy::quarantine_flooding_pods`): the responder
/// decides as for any rule (rate limits, protected namespaces, dry run, per-rule mode), and the
/// alert says what it decided.
fn respond_to_flood(state: &DaemonState, pod: &crate::events::enrich::PodRef, over_budget: u64, loss_alert_id: &str) {
    use crate::alerts::{Alert, AlertKind, PodInfo};
    use crate::rules::model::{Action, RuleHit, Severity};
    let title = "Event flood while protected events were lost";
    let message = format!(
        "pod {}/{} went {over_budget} events over its event budget while protected events were being lost on this node (event_loss alert {loss_alert_id})",
        pod.namespace, pod.name
    );
    // MITRE T1562.006 (Impair Defenses: Indicator Blocking): drowning the sensor.
    let hit = RuleHit {
        rule_id: crate::quarantine::responder::FLOOD_RULE.to_string(),
        title: title.to_string(),
        severity: Severity::Critical,
        message: message.clone(),
        mitre: vec!["T1562.006".to_string()],
        action: Action::Quarantine,
    };
    let mut alert = Alert::new(AlertKind::EventLoss, Severity::Critical, message)
        .with_node(state.node.clone())
        .with_rule(hit.rule_id.clone(), title)
        .with_action(Action::Quarantine)
        .with_pod(PodInfo { namespace: pod.namespace.clone(), name: pod.name.clone(), labels: pod.labels.clone() })
        .with_event(serde_json::json!({"over_budget": over_budget, "loss_alert": loss_alert_id}));
    alert.mitre = hit.mitre.clone();
    let finding = crate::quarantine::Finding { hit, namespace: pod.namespace.clone(), name: pod.name.clone(), alert_id: alert.id.clone() };
    let decision = state.quarantine.respond(&finding);
    if decision.outcome == crate::quarantine::Outcome::Quarantined {
        state.metrics.record_quarantine();
    }
    tracing::warn!(pod = %decision.pod, outcome = %decision.outcome.as_str(), reason = %decision.reason, "event flood");
    for alert in crate::quarantine::api::alerts_for(alert, &decision) {
        state.alerts.try_emit(alert);
    }
}

/// Samples whether the reader and the pipeline keep moving ([`crate::liveness`]): the reader's
/// work is what the kernel produced (emitted + lost records), its progress the records it read;
/// the pipeline's work is what the reader decoded, its progress the events it enriched. A stage
/// that becomes stuck is logged, counted (`palisade_stage_stuck`) and alerted (critical: the
/// node is blind while it lasts); so is its recovery.
pub(super) fn spawn_liveness_watch(state: Arc<DaemonState>) {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.liveness.sample_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = std::time::Instant::now();
            let reader = state.reader.snapshot();
            let produced = match state.host.with(|ebpf| loader::read_counters(ebpf)).await {
                Ok(Ok(counters)) => Some(counters.emitted.values().chain(counters.lost.values()).sum::<u64>()),
                Ok(Err(err)) => {
                    tracing::warn!(%err, "reading the kernel's event counters (liveness)");
                    None
                }
                Err(_) => return,
            };
            let mut transitions = Vec::new();
            if let Some(produced) = produced {
                transitions.extend(state.liveness.observe("reader", "ring buffer records: read / produced by the kernel", reader.records, produced, now));
            }
            let enriched = state.pipeline.enriched.load(Relaxed);
            transitions.extend(state.liveness.observe("pipeline", "events: enriched / decoded by the reader", enriched, reader.decoded, now));
            for transition in transitions {
                report_liveness(&state, transition);
            }
        }
    });
}

fn report_liveness(state: &DaemonState, transition: crate::liveness::Transition) {
    use crate::alerts::{Alert, AlertKind};
    use crate::rules::model::Severity;
    let alert = match transition {
        crate::liveness::Transition::Stuck(stuck) => {
            state.metrics.set_stage_stuck(stuck.stage, true);
            tracing::error!(stage = stuck.stage, seconds = stuck.seconds, waiting = stuck.waiting, "stage stuck: /healthz answers 503");
            Alert::new(
                AlertKind::Daemon,
                Severity::Critical,
                format!(
                    "the event {} has not moved for {:.0} s with {} waiting: no new events are judged while it lasts; /healthz answers 503 so the kubelet restarts palisade",
                    stuck.stage, stuck.seconds, stuck.waiting
                ),
            )
            .with_event(serde_json::json!({"stuck": stuck}))
        }
        crate::liveness::Transition::Recovered { stage, after_seconds } => {
            state.metrics.set_stage_stuck(stage, false);
            tracing::warn!(stage, after_seconds, "stage moving again");
            Alert::new(AlertKind::Daemon, Severity::Medium, format!("the event {stage} is moving again after {after_seconds:.0} s"))
                .with_event(serde_json::json!({"recovered": stage, "after_seconds": after_seconds}))
        }
    };
    state.alerts.try_emit(alert);
}
