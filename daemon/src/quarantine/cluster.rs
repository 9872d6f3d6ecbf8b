//! Kubernetes mode: the node's quarantines made visible and controllable in the cluster.
//!
//! - The pod label and the Quarantined/Released Events (`k8s::quarantine`): label removals by
//!   anyone else are undone with a `tamper` alert; the label is never a way out.
//! - The `Quarantine` objects (`k8s::quarantine_resource`): created and kept current for every
//!   quarantine of this node (enforced, queued, or held back by dry run, with the drop counts of
//!   enforced ones); `spec.release` set on one (or its deletion) releases the pod (dismisses a
//!   dry-run one), an object created by an operator quarantines it. Both go through the same quarantine API as
//!   the root-only socket (`quarantine release` / `quarantine add`), so there is one audit alert
//!   per release, naming who asked.
//!
//! A periodic reconciliation makes the labels and objects follow the responder, also across
//! restarts and API outages.

use std::sync::Arc;
use std::time::Duration;

use super::{QuarantineRecord, QuarantineService, ReleaseRecord};
use crate::alerts::AlertSink;
use crate::api::{OperatorRequest, QuarantineApi};
use crate::endpoints::EndpointTable;
use crate::k8s::quarantine_resource::{
    DesiredQuarantine, DropCounts, PHASE_DRY_RUN, PHASE_ENFORCED, PHASE_PENDING, QuarantineResources, ResourceChange,
};
use crate::k8s::{ClusterQuarantineSink, KubeQuarantineSink};
use crate::metrics::Metrics;

const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// What the Kubernetes mirror of the quarantines reads and reports to.
#[derive(Clone)]
pub struct ClusterQuarantine {
    pub quarantine: QuarantineService,
    pub alerts: AlertSink,
    pub metrics: Metrics,
    /// To tell this node's pods (an object created by hand quarantines only those).
    pub endpoints: tokio::sync::watch::Receiver<Arc<EndpointTable>>,
    /// Where the Quarantine watch reports its health (status and `/healthz` read it).
    pub watch_health: Arc<crate::k8s::quarantine_resource::ResourceWatchHealth>,
}

impl ClusterQuarantine {
    /// Starts the task. `releases` carries every release made through the quarantine API;
    /// `quarantine_api` is the handler the API socket uses.
    pub fn spawn(
        self,
        source: &mut crate::k8s::KubeSource,
        mut releases: tokio::sync::mpsc::UnboundedReceiver<ReleaseRecord>,
        quarantine_api: Arc<dyn QuarantineApi>,
    ) {
        let state = self;
        let sink = source.quarantine_sink();
        let labels = source.labelled_pods();
        let Some(mut removals) = source.take_label_removals() else {
            return;
        };
        let client = source.client();
        let node = source.node().to_string();
        tokio::spawn(async move {
            let (resources, mut changes) =
                QuarantineResources::start_reporting(client.clone(), node, state.watch_health.clone(), Some(state.metrics.clone()));
            let mut tick = tokio::time::interval(RECONCILE_EVERY);
            loop {
                tokio::select! {
                    removal = removals.recv() => {
                        let Some(removal) = removal else { return };
                        let quarantined = state.quarantine.list_async().await.into_iter().find(|r| r.pod == removal.pod);
                        if let Some(record) = quarantined {
                            // The reconciler below may have put it back already.
                            let relabel = if labels.current().contains(&record.pod) {
                                Ok(())
                            } else {
                                sink.quarantined(&record.pod, &record.rule_id, &record.alert_id).await.map_err(|e| e.to_string())
                            };
                            if let Err(err) = &relabel {
                                tracing::error!(pod = %record.pod, %err, "putting the quarantine label back");
                            }
                            state.alerts.try_emit(super::api::tamper_alert(&record, &removal.change, relabel.err()));
                        }
                    }
                    Some(record) = releases.recv() => {
                        released(&sink, &resources, &record).await;
                    }
                    Some(change) = changes.recv() => {
                        act_on(&state, quarantine_api.as_ref(), &resources, change).await;
                    }
                    _ = tick.tick() => {}
                }
                // Releases not handled yet go first, so their Event names who released and why
                // rather than the reconciler's "not quarantined on this node".
                while let Ok(record) = releases.try_recv() {
                    released(&sink, &resources, &record).await;
                }
                let quarantined = state.quarantine.list_async().await;
                reconcile_labels(&quarantined, &sink, &labels).await;
                reconcile_objects(&state, &quarantined, &client, &resources).await;
            }
        });
    }
}

async fn reconcile_labels(
    quarantined: &[QuarantineRecord],
    sink: &KubeQuarantineSink,
    labels: &crate::k8s::source::LabelledPods,
) {
    let labelled = labels.current();
    for record in quarantined.iter().filter(|r| !labelled.contains(&r.pod)) {
        if let Err(err) = sink
            .quarantined(&record.pod, &record.rule_id, &record.alert_id)
            .await
        {
            tracing::warn!(pod = %record.pod, %err, "labelling a quarantined pod");
        }
    }
    for pod in labelled
        .iter()
        .filter(|p| !quarantined.iter().any(|r| &r.pod == *p))
    {
        if let Err(err) = sink.released(pod, "not quarantined on this node").await {
            tracing::warn!(%pod, %err, "removing a stale quarantine label");
        }
    }
}

/// Every quarantine (enforced, queued or held back by dry run) of this node has an object
/// saying so; objects this node wrote for quarantines that no longer exist go.
async fn reconcile_objects(
    state: &ClusterQuarantine,
    quarantined: &[QuarantineRecord],
    client: &kube::Client,
    resources: &QuarantineResources,
) {
    let observed = Observed {
        pending: state.quarantine.pending_async().await,
        dry_run: state.quarantine.dry_run_list_async().await,
        drops: state.quarantine.drops_async().await,
    };
    let desired = desired_objects(quarantined, observed);
    let current = resources.current();
    for want in &desired {
        // A release asked for on the object is being acted on: do not rewrite it.
        if current
            .get(&want.pod)
            .is_some_and(|q| q.spec.release.is_some())
        {
            continue;
        }
        let uid = if current.contains_key(&want.pod) {
            None
        } else {
            pod_uid(client, &want.pod).await
        };
        if let Err(err) = resources.ensure(want, uid).await {
            state.metrics.record_kube_quarantine_error();
            tracing::warn!(pod = %want.pod, %err, "writing the pod's Quarantine object");
        }
    }
    for stale in resources.ours() {
        let Some(pod) = stale.pod_key() else { continue };
        if desired.iter().any(|d| d.pod == pod) {
            continue;
        }
        if let Err(err) = resources.delete(&pod).await {
            state.metrics.record_kube_quarantine_error();
            tracing::warn!(%pod, %err, "deleting the Quarantine object of a pod no longer quarantined");
        }
    }
}

/// What the responder reports besides its records, for [`desired_objects`].
struct Observed {
    pending: Vec<super::PendingQuarantine>,
    dry_run: Vec<super::DryRunRecord>,
    drops: std::collections::BTreeMap<String, super::QuarantineDrops>,
}

/// The objects the node's quarantines should have. A pod both enforced and in another list
/// (a moment's overlap) gets the first: enforced, then pending, then dry run.
fn desired_objects(quarantined: &[QuarantineRecord], observed: Observed) -> Vec<DesiredQuarantine> {
    let drop_counts = |pod: &str| {
        let drops = observed.drops.get(pod).copied().unwrap_or_default();
        // None until the first drop, so that the first one is written at once.
        (drops.total() > 0).then(|| DropCounts {
            egress: drops.egress,
            ingress: drops.ingress,
            last_drop: crate::time::format_unix_ns(drops.last_unix_ns),
        })
    };
    let enforced = quarantined.iter().map(|r| DesiredQuarantine {
        pod: r.pod.clone(),
        reason: r.reason.clone(),
        rule: r.rule_id.clone(),
        alert_id: r.alert_id.clone(),
        phase: PHASE_ENFORCED,
        since: r.since.clone(),
        message: String::new(),
        drops: drop_counts(&r.pod),
    });
    let pending = observed.pending.into_iter().map(|p| DesiredQuarantine {
        pod: p.pod,
        reason: p.reason,
        rule: p.rule_id,
        alert_id: p.alert_id,
        phase: PHASE_PENDING,
        since: p.queued_at,
        message: format!("held back by {}", p.held_by),
        drops: None,
    });
    let dry_run = observed.dry_run.into_iter().map(|d| DesiredQuarantine {
        pod: d.pod,
        reason: d.reason,
        rule: d.rule_id,
        alert_id: d.alert_id,
        phase: PHASE_DRY_RUN,
        since: d.since,
        message: format!("not enforced: {}", d.why_not),
        drops: None,
    });
    let mut desired: Vec<DesiredQuarantine> = Vec::new();
    for want in enforced.chain(pending).chain(dry_run) {
        if !desired.iter().any(|d| d.pod == want.pod) {
            desired.push(want);
        }
    }
    desired
}

/// The pod's uid, for the object's owner reference (so it is deleted with the pod).
async fn pod_uid(client: &kube::Client, pod: &str) -> Option<String> {
    let (namespace, name) = pod.split_once('/')?;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), namespace);
    match pods.get_metadata(name).await {
        Ok(meta) => meta.metadata.uid,
        Err(err) => {
            tracing::warn!(%pod, %err, "reading the pod's uid (its Quarantine object gets no owner)");
            None
        }
    }
}

/// After a release through the quarantine API: label removed, Released Event, object deleted.
async fn released(
    sink: &KubeQuarantineSink,
    resources: &QuarantineResources,
    record: &ReleaseRecord,
) {
    let reason = format!("released by {}: {}", record.by, record.reason);
    if let Err(err) = sink.released(&record.pod, &reason).await {
        tracing::warn!(pod = %record.pod, %err, "removing the quarantine label after a release");
    }
    if let Err(err) = resources.delete(&record.pod).await {
        tracing::warn!(pod = %record.pod, %err, "deleting the Quarantine object after a release");
    }
}

/// Someone else changed a Quarantine object: release, quarantine or cancel through the
/// quarantine API, for pods of this node only.
async fn act_on(
    state: &ClusterQuarantine,
    api: &dyn QuarantineApi,
    resources: &QuarantineResources,
    change: ResourceChange,
) {
    match change {
        ResourceChange::ReleaseRequested { pod, reason, requested_by, managers } => {
            let by = release_requester(&requested_by, &managers);
            let reason = if reason.is_empty() { "spec.release set on its Quarantine object".to_string() } else { reason };
            let stale = match release_or_cancel(state, api, &pod, reason, by).await {
                Some(Lifted::Released) => false,
                // A cancelled quarantine was never enforced: no release notice deletes its object.
                Some(Lifted::Cancelled) => true,
                None if dismiss_dry_run(state, &pod).await => true,
                // Released already (e.g. through the socket while the API was away).
                None => resources.ours().iter().any(|q| q.pod_key().as_deref() == Some(pod.as_str())),
            };
            if stale && let Err(err) = resources.delete(&pod).await {
                tracing::warn!(%pod, %err, "deleting the Quarantine object of a pod no longer quarantined");
            }
        }
        ResourceChange::QuarantineRequested { pod, reason, managers } => {
            let local = pod
                .parse()
                .ok()
                .is_some_and(|key| state.endpoints.borrow().get(&key).is_some_and(|e| !e.is_peer()));
            if !local || quarantined_or_pending(state, &pod).await.is_some() {
                return;
            }
            let by = format!("Kubernetes: Quarantine object created by {}", list_or_unknown(&managers));
            let reason = if reason.is_empty() { "Quarantine object created".to_string() } else { reason };
            report(state, &pod, "quarantine", api.add(request(&pod, reason, by)).await.map(|o| o.message));
        }
        ResourceChange::Deleted { pod } => {
            let by = "Kubernetes: its Quarantine object was deleted (the API server's audit log names who)".to_string();
            if release_or_cancel(state, api, &pod, "Quarantine object deleted".to_string(), by).await.is_none() {
                dismiss_dry_run(state, &pod).await;
            }
        }
    }
}

/// Dismisses the pod's dry-run record, if it has one (nothing was enforced: no audit alert).
async fn dismiss_dry_run(state: &ClusterQuarantine, pod: &str) -> bool {
    let (service, pod) = (state.quarantine.clone(), pod.to_string());
    tokio::task::spawn_blocking(move || service.dismiss_dry_run(&pod).is_some()).await.unwrap_or(false)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifted {
    Released,
    Cancelled,
}

/// Whether `pod` is quarantined (`Released` is what lifting it would do) or queued (`Cancelled`).
async fn quarantined_or_pending(state: &ClusterQuarantine, pod: &str) -> Option<Lifted> {
    if state.quarantine.list_async().await.iter().any(|r| r.pod == pod) {
        Some(Lifted::Released)
    } else if state.quarantine.pending_async().await.iter().any(|p| p.pod == pod) {
        Some(Lifted::Cancelled)
    } else {
        None
    }
}

/// Releases `pod` if it is quarantined, or cancels its queued quarantine; says which it did.
async fn release_or_cancel(
    state: &ClusterQuarantine,
    api: &dyn QuarantineApi,
    pod: &str,
    reason: String,
    by: String,
) -> Option<Lifted> {
    let lifted = quarantined_or_pending(state, pod).await?;
    let request = request(pod, reason, by);
    match lifted {
        Lifted::Released => report(state, pod, "release", api.release(request).await.map(|o| o.message)),
        Lifted::Cancelled => report(state, pod, "cancel", api.cancel(request).await.map(|o| o.message)),
    }
    Some(lifted)
}

/// Who asked for a release, as the alert names it: the `requestedBy` the object carries (the
/// admission policy makes it the authenticated user) and the field managers that wrote it.
fn release_requester(requested_by: &str, managers: &[String]) -> String {
    let user = if requested_by.is_empty() {
        "(requestedBy not given)"
    } else {
        requested_by
    };
    format!(
        "{user} (Kubernetes spec.release, field manager {})",
        list_or_unknown(managers)
    )
}

fn list_or_unknown(items: &[String]) -> String {
    if items.is_empty() {
        "unknown".to_string()
    } else {
        items.join(", ")
    }
}

fn request(pod: &str, reason: String, by: String) -> OperatorRequest {
    let (namespace, name) = pod.split_once('/').unwrap_or(("", pod));
    OperatorRequest {
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason,
        by,
    }
}

fn report(
    state: &ClusterQuarantine,
    pod: &str,
    what: &str,
    result: Result<String, crate::api::QuarantineApiError>,
) {
    match result {
        Ok(message) => {
            tracing::info!(%pod, %message, "{what} requested through the Quarantine resource")
        }
        Err(err) => {
            state.metrics.record_kube_quarantine_error();
            tracing::error!(%pod, %err, "{what} requested through the Quarantine resource failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pod: &str) -> QuarantineRecord {
        let (namespace, name) = pod.split_once('/').expect("ns/name");
        QuarantineRecord {
            pod: pod.into(),
            namespace: namespace.into(),
            name: name.into(),
            cgroup: String::new(),
            cgroup_id: 1,
            since: "2026-12-02T00:00:00Z".into(),
            since_unix_ns: 0,
            rule_id: "reverse_shell".into(),
            alert_id: "a-1".into(),
            reason: "shell".into(),
        }
    }

    fn dry_run(pod: &str) -> super::super::DryRunRecord {
        let (namespace, name) = pod.split_once('/').expect("ns/name");
        super::super::DryRunRecord {
            pod: pod.into(),
            namespace: namespace.into(),
            name: name.into(),
            rule_id: "crypto_mining".into(),
            alert_id: "a-2".into(),
            reason: "miner".into(),
            why_not: "dry run is on for this node".into(),
            since: "2026-12-02T00:00:01Z".into(),
            since_unix_ns: 0,
            hits: 3,
        }
    }

    /// Issue 15: enforced objects carry their drop counts (none until the first drop, so that
    /// one is written at once), dry-run ones their reason, and a pod gets one object.
    #[test]
    fn desired_objects_carry_phase_drops_and_why() {
        let mut drops = std::collections::BTreeMap::new();
        let mut counted = super::super::QuarantineDrops::default();
        counted.add(true, 4, 1_764_633_600_000_000_000);
        drops.insert("shop/web".to_string(), counted);
        let observed = Observed { pending: Vec::new(), dry_run: vec![dry_run("shop/miner"), dry_run("shop/web")], drops };
        let desired = desired_objects(&[record("shop/web"), record("shop/quiet")], observed);
        let by_pod = |pod: &str| desired.iter().find(|d| d.pod == pod).expect(pod);
        assert_eq!(desired.len(), 3, "{desired:?}");
        let web = by_pod("shop/web");
        assert_eq!(web.phase, PHASE_ENFORCED, "enforced wins over a stale dry-run record");
        assert_eq!(web.drops.as_ref().map(|d| (d.egress, d.ingress)), Some((4, 0)));
        assert!(web.drops.as_ref().is_some_and(|d| d.last_drop.starts_with("2025-12-02")), "{web:?}");
        assert_eq!(by_pod("shop/quiet").drops, None);
        let miner = by_pod("shop/miner");
        assert_eq!(miner.phase, PHASE_DRY_RUN);
        assert!(miner.message.contains("dry run is on"), "{}", miner.message);
    }
}
