//! Quarantine made visible in the cluster: the quarantined pod gets the label
//! `palisade.io/quarantined=true` (plus annotations naming the rule and alert) and a Warning
//! Event; a release removes them and posts a Normal Event. The label is a view, never a way
//! out: anyone allowed to patch pods could remove it, so a removal palisade did not make (see
//! `source::LabelTracker`) is reported as a [`LabelRemoval`], which the daemon answers by putting
//! the label back and raising a `tamper` alert. Release goes through the root-only API socket.
//!
//! Enforcement never depends on this: the responder updates the kernel map first and calls the
//! sink afterwards; an API failure here is reported, not retried forever.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;

use super::{EVENT_COMPONENT, QUARANTINE_ALERT_ANNOTATION, QUARANTINE_LABEL, QUARANTINE_RULE_ANNOTATION};

/// The field manager palisade's patches are recorded under (`kubectl get pod -o yaml --show-managed-fields`).
pub const FIELD_MANAGER: &str = "palisade";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{pod:?} is not namespace/name")]
    BadPod { pod: String },
    #[error("{pod}: cannot {what}: {source}")]
    Api {
        pod: String,
        what: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// The quarantine label removed (or changed) in the cluster by someone other than palisade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRemoval {
    /// `namespace/name`.
    pub pod: String,
    /// What was seen (removed, or set to another value).
    pub change: String,
}

/// What the responder calls once a quarantine or release is in force in the kernel.
#[async_trait]
pub trait ClusterQuarantineSink: Send + Sync {
    /// `pod` is `namespace/name`.
    async fn quarantined(&self, pod: &str, rule_id: &str, alert_id: &str) -> Result<(), SinkError>;
    async fn released(&self, pod: &str, reason: &str) -> Result<(), SinkError>;
}

/// Pods whose label palisade itself is removing, so the watcher does not report that removal
/// back as a release request.
#[derive(Debug, Clone, Default)]
pub struct OwnLabelChanges(Arc<Mutex<BTreeSet<String>>>);

impl OwnLabelChanges {
    fn insert(&self, pod: &str) {
        self.lock().insert(pod.to_string());
    }

    /// Whether `pod` was expected (and forgets it).
    pub(crate) fn take(&self, pod: &str) -> bool {
        self.lock().remove(pod)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) fn split_pod(pod: &str) -> Result<(&str, &str), SinkError> {
    match pod.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => Ok((namespace, name)),
        _ => Err(SinkError::BadPod { pod: pod.to_string() }),
    }
}

/// The kube-rs implementation.
#[derive(Clone)]
pub struct KubeQuarantineSink {
    client: Client,
    node: String,
    labelled: Arc<Mutex<BTreeSet<String>>>,
    own: OwnLabelChanges,
}

impl KubeQuarantineSink {
    /// Normally made by `KubeSource::quarantine_sink`, which shares the label view with the watcher.
    pub fn new(client: Client, node: String, labelled: Arc<Mutex<BTreeSet<String>>>, own: OwnLabelChanges) -> Self {
        KubeQuarantineSink { client, node, labelled, own }
    }

    fn is_labelled(&self, pod: &str) -> bool {
        self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(pod)
    }
}

#[async_trait]
impl ClusterQuarantineSink for KubeQuarantineSink {
    async fn quarantined(&self, pod: &str, rule_id: &str, alert_id: &str) -> Result<(), SinkError> {
        let (namespace, name) = split_pod(pod)?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({
            "metadata": {
                "labels": {QUARANTINE_LABEL: "true"},
                "annotations": {QUARANTINE_RULE_ANNOTATION: rule_id, QUARANTINE_ALERT_ANNOTATION: alert_id},
            }
        });
        let labelled = pods.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await;
        let uid = labelled.as_ref().ok().and_then(|p| p.metadata.uid.clone());
        let message = format!("palisade quarantined this pod (all traffic denied, both directions): rule {rule_id}, alert {alert_id}");
        let event = pod_event(&self.node, namespace, name, uid, "Warning", "Quarantined", "Quarantine", &message);
        let event = Api::<Event>::namespaced(self.client.clone(), namespace).create(&PostParams::default(), &event).await;
        labelled.map_err(|source| SinkError::Api { pod: pod.to_string(), what: "label the pod", source })?;
        // The API server answered with the labelled pod: count it as labelled now, so the
        // reconciler does not patch again before the watch catches up.
        self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(pod.to_string());
        event.map_err(|source| SinkError::Api { pod: pod.to_string(), what: "post the quarantine Event", source })?;
        tracing::info!(%pod, rule = rule_id, alert = alert_id, "quarantine labelled and reported in the cluster");
        Ok(())
    }

    async fn released(&self, pod: &str, reason: &str) -> Result<(), SinkError> {
        let (namespace, name) = split_pod(pod)?;
        let mut uid = None;
        let mut label_result = Ok(());
        // A pod whose label is already gone has nothing to remove; patching anyway would leave
        // an "own change" expectation that a later removal would be mistaken for.
        if self.is_labelled(pod) {
            self.own.insert(pod);
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({
                "metadata": {
                    "labels": {QUARANTINE_LABEL: null},
                    "annotations": {QUARANTINE_RULE_ANNOTATION: null, QUARANTINE_ALERT_ANNOTATION: null},
                }
            });
            match pods.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await {
                Ok(p) => uid = p.metadata.uid,
                Err(source) => {
                    self.own.take(pod);
                    label_result = Err(SinkError::Api { pod: pod.to_string(), what: "remove the quarantine label", source });
                }
            }
        }
        let message = format!("palisade released this pod: {reason}");
        let event = pod_event(&self.node, namespace, name, uid, "Normal", "Released", "Release", &message);
        let event = Api::<Event>::namespaced(self.client.clone(), namespace).create(&PostParams::default(), &event).await;
        label_result?;
        event.map_err(|source| SinkError::Api { pod: pod.to_string(), what: "post the release Event", source })?;
        Ok(())
    }
}

/// A core/v1 Event about a pod (`kubectl describe pod` and `kubectl get events` show it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pod_event(
    node: &str,
    namespace: &str,
    name: &str,
    uid: Option<String>,
    type_: &str,
    reason: &str,
    action: &str,
    message: &str,
) -> Event {
    use k8s_openapi::api::core::v1::EventSource;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    // core/v1 style (first/last timestamp and count, no eventTime): the legacy validation
    // accepts it from any client version.
    let now = k8s_openapi::jiff::Timestamp::now();
    // Event names only need to be unique in the namespace; kubectl's convention is `<object>.<hex>`.
    let unique = format!("{:x}", now.as_nanosecond());
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{unique}")),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        involved_object: pod_reference(namespace, name, uid),
        type_: Some(type_.to_string()),
        reason: Some(reason.to_string()),
        action: Some(action.to_string()),
        // The API server caps messages at 1 KiB.
        message: Some(truncate(message, 1024)),
        source: Some(EventSource { component: Some(EVENT_COMPONENT.to_string()), host: Some(node.to_string()) }),
        reporting_component: Some(format!("palisade.io/{EVENT_COMPONENT}")),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        ..Default::default()
    }
}

/// The object reference of a pod, for an Event about it.
pub(crate) fn pod_reference(namespace: &str, name: &str, uid: Option<String>) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".to_string()),
        kind: Some("Pod".to_string()),
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        uid,
        ..Default::default()
    }
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
