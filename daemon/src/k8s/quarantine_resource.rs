//! Quarantine as a Kubernetes resource: `quarantines.palisade.io/v1`, namespaced, one object
//! per quarantined pod (named like the pod, owned by it, so it goes when the pod goes).
//!
//! - The agent that quarantines a pod creates its object (spec: pod, reason, rule, alert id,
//!   node) and keeps `status` current (`Enforced`, `Pending` or `DryRun`, since, node, and for
//!   an enforced one the packets dropped so far). A `DryRun` object is what the agent would
//!   have quarantined with dry run off; releasing or deleting it dismisses it.
//!   `kubectl get quarantines -A` is the cluster-wide list.
//! - **Release** is `spec.release: {reason, requestedBy}` set on the object (or deleting it),
//!   authorised by Kubernetes RBAC on `quarantines`. The release alert names `requestedBy` and
//!   the field managers that wrote `spec.release` (from `metadata.managedFields`); the shipped
//!   ValidatingAdmissionPolicy (`deploy/admission/quarantine-admission.yaml`) makes `requestedBy` the
//!   authenticated user where the cluster supports it.
//! - **Quarantine by hand**: an object created by someone else (it has no `status`: the API
//!   server drops status on create, and only palisade writes the status subresource) for a pod
//!   on this node quarantines that pod.
//! - The pod label `palisade.io/quarantined` stays a selector aid, never a release path.
//!
//! This module only talks to the API server and reports what it saw as [`ResourceChange`]s;
//! the daemon decides (through the same quarantine API as the root-only socket), so there is
//! one release path with one audit alert.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::Client;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::quarantine::{FIELD_MANAGER, SinkError, split_pod};

pub const GROUP: &str = "palisade.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "Quarantine";
pub const PLURAL: &str = "quarantines";

/// A `palisade.io/v1` Quarantine (the CRD is `deploy/crd-quarantine.yaml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quarantine {
    #[serde(rename = "apiVersion", default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: QuarantineSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<QuarantineStatus>,
}

fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

fn kind() -> String {
    KIND.to_string()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineSpec {
    /// The pod's name (the object has the same name; the CRD checks that they agree).
    #[serde(default)]
    pub pod: String,
    /// Why: the rule's message, or the operator's reason.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<String>,
    /// The node whose agent enforces it (set by the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Set to release the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseRequest>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub requested_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QuarantineStatus {
    /// `Enforced` (in the kernel maps), `Pending` (queued by the rate limit) or `DryRun` (not
    /// enforced: dry run is on for the node or the rule).
    pub phase: String,
    /// RFC 3339: since when it is enforced, or queued.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub since: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Pending: what holds it back; DryRun: why it is not enforced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Enforced: the packets the datapath dropped because of it (as its rate-limited drop
    /// records reported them), refreshed at most every [`DROPS_REFRESH`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<DropCounts>,
}

/// Packets dropped because of a quarantine, since the agent started (status.drops).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DropCounts {
    /// Sent by the pod.
    pub egress: u64,
    /// Sent to the pod.
    pub ingress: u64,
    /// RFC 3339: the last drop reported.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_drop: String,
}

pub const PHASE_ENFORCED: &str = "Enforced";
pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_DRY_RUN: &str = "DryRun";

/// Changed drop counts are written when they first appear, then at most this often (a pod
/// that keeps trying would otherwise cost a status write every reconciliation).
pub const DROPS_REFRESH: std::time::Duration = std::time::Duration::from_secs(15);

super::namespaced_resource!(Quarantine);

impl Quarantine {
    /// `namespace/name` of the pod it is about (`None` if the object is malformed).
    pub fn pod_key(&self) -> Option<String> {
        let namespace = self.metadata.namespace.as_deref()?;
        let name = self.metadata.name.as_deref()?;
        Some(format!("{namespace}/{name}"))
    }

    /// The field managers that wrote `spec.release` (who released, as the API server recorded it).
    pub fn release_managers(&self) -> Vec<String> {
        self.managers(|fields| fields.get("f:spec").and_then(|spec| spec.get("f:release")).is_some())
    }

    /// The field managers (sorted, once each) whose recorded fields (`fieldsV1`) pass `wrote`.
    fn managers(&self, wrote: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
        let mut managers: Vec<String> = self
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| entry.fields_v1.as_ref().is_some_and(|f| wrote(&f.0)))
            .filter_map(|entry| entry.manager.clone())
            .collect();
        managers.sort();
        managers.dedup();
        managers
    }
}

/// What the agent wants an object to say about one of its quarantines.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredQuarantine {
    /// `namespace/name`.
    pub pod: String,
    pub reason: String,
    pub rule: String,
    pub alert_id: String,
    pub phase: &'static str,
    pub since: String,
    /// status.message (see [`QuarantineStatus::message`]).
    pub message: String,
    pub drops: Option<DropCounts>,
}

/// Something someone else did to a Quarantine object, for the daemon to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ResourceChange {
    /// `spec.release` is set.
    ReleaseRequested { pod: String, reason: String, requested_by: String, managers: Vec<String> },
    /// An object without status: created by an operator (or by palisade a moment ago, before it
    /// wrote the status: the daemon ignores it for pods it already quarantines).
    QuarantineRequested { pod: String, reason: String, managers: Vec<String> },
    /// The object was deleted by someone other than this agent.
    Deleted { pod: String },
}

/// How often a Quarantine watch that failed asks the API server directly whether it is back (a
/// resumed watch says nothing until an object changes). The pod source's default is the same.
const OUTAGE_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The Quarantine watch's health, for `palisade status` and `/healthz` (a watch that fails
/// degrades the daemon: releases and hand-made quarantines through the resource wait for it).
#[derive(Debug, Default)]
pub struct ResourceWatchHealth {
    state: Mutex<ResourceWatchState>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ResourceWatchState {
    pub connected: bool,
    /// The first complete list arrived.
    pub synced: bool,
    /// Watch errors since start (each logged and counted in `palisade_kube_quarantine_errors_total`).
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Quarantine objects seen (all nodes').
    pub objects: usize,
}

impl ResourceWatchState {
    /// The watch failed and has not come back (before its first call it is only starting).
    pub fn is_down(&self) -> bool {
        !self.connected && self.errors > 0
    }
}

impl ResourceWatchHealth {
    pub fn snapshot(&self) -> ResourceWatchState {
        lock(&self.state).clone()
    }

    /// See [`ResourceWatchState::is_down`].
    pub fn is_down(&self) -> bool {
        lock(&self.state).is_down()
    }

    fn update(&self, f: impl FnOnce(&mut ResourceWatchState)) {
        f(&mut lock(&self.state));
    }
}

/// The agent's side of the Quarantine resource: a watch of every Quarantine (they are few) and
/// the calls that create, update and delete this node's objects.
#[derive(Clone)]
pub struct QuarantineResources {
    client: Client,
    node: String,
    health: Arc<ResourceWatchHealth>,
    /// Objects as last seen by the watch, by `namespace/name`.
    objects: Arc<Mutex<BTreeMap<String, Quarantine>>>,
    /// Objects this agent is deleting, so the watch does not report them as releases.
    own_deletions: Arc<Mutex<BTreeSet<String>>>,
    /// When the drop counts of an object were last written (see [`DROPS_REFRESH`]).
    drops_written: Arc<Mutex<BTreeMap<String, std::time::Instant>>>,
}

impl QuarantineResources {
    /// Starts the watch; changes made by others arrive on the returned receiver. The task stops
    /// when the receiver is dropped.
    pub fn start(client: Client, node: impl Into<String>) -> (QuarantineResources, mpsc::UnboundedReceiver<ResourceChange>) {
        QuarantineResources::start_reporting(client, node, Arc::default(), None)
    }

    /// [`start`](Self::start), reporting the watch's health into `health` and counting its
    /// errors in `errors` (the daemon's metrics).
    pub fn start_reporting(
        client: Client,
        node: impl Into<String>,
        health: Arc<ResourceWatchHealth>,
        errors: Option<crate::metrics::Metrics>,
    ) -> (QuarantineResources, mpsc::UnboundedReceiver<ResourceChange>) {
        let this = QuarantineResources {
            client,
            node: node.into(),
            health,
            objects: Arc::default(),
            own_deletions: Arc::default(),
            drops_written: Arc::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let watching = this.clone();
        tokio::spawn(async move { watching.watch(tx, errors).await });
        (this, rx)
    }

    /// The watch's health (see [`ResourceWatchHealth`]).
    pub fn health(&self) -> Arc<ResourceWatchHealth> {
        self.health.clone()
    }

    async fn watch(self, changes: mpsc::UnboundedSender<ResourceChange>, errors: Option<crate::metrics::Metrics>) {
        let api: Api<Quarantine> = Api::all(self.client.clone());
        let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut probe = tokio::time::interval(OUTAGE_PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A relist after an outage reports no deletions: what was there before and is missing
        // from the new list was deleted while the watch was down.
        let mut relisted: Option<BTreeSet<String>> = None;
        loop {
            let in_outage = self.health.is_down();
            let item = tokio::select! {
                item = stream.next() => item,
                _ = probe.tick(), if in_outage => {
                    // A resumed watch is silent until something changes: ask directly.
                    match api.list(&kube::api::ListParams::default().limit(1)).await {
                        Ok(_) => self.health.update(|h| h.connected = true),
                        Err(err) => self.watch_failed(&format!("outage probe: {err}"), errors.as_ref()),
                    }
                    continue;
                }
            };
            let Some(item) = item else { return };
            let event = match item {
                Ok(event) => event,
                Err(err) => {
                    self.watch_failed(&err.to_string(), errors.as_ref());
                    continue;
                }
            };
            // A complete list (or a watch event after it) means the watch works.
            let synced = matches!(event, Event::InitDone | Event::Apply(_) | Event::Delete(_));
            let found = match event {
                Event::Init => {
                    relisted = Some(BTreeSet::new());
                    Vec::new()
                }
                Event::InitApply(object) => {
                    if let (Some(seen), Some(pod)) = (relisted.as_mut(), object.pod_key()) {
                        seen.insert(pod);
                    }
                    self.applied(object)
                }
                Event::InitDone => {
                    let seen = relisted.take().unwrap_or_default();
                    let gone: Vec<String> = self.lock_objects().keys().filter(|pod| !seen.contains(*pod)).cloned().collect();
                    gone.into_iter().filter_map(|pod| self.deleted(&pod)).collect()
                }
                Event::Apply(object) => self.applied(object),
                Event::Delete(object) => object.pod_key().and_then(|pod| self.deleted(&pod)).into_iter().collect(),
            };
            let objects = self.lock_objects().len();
            self.health.update(|h| {
                h.connected = true;
                h.synced |= synced;
                h.objects = objects;
            });
            for change in found {
                if changes.send(change).is_err() {
                    return;
                }
            }
        }
    }

    /// One failed watch call (or outage probe): logged, counted, and the watch marked down.
    fn watch_failed(&self, err: &str, errors: Option<&crate::metrics::Metrics>) {
        tracing::warn!(%err, "watching Quarantine objects (retrying)");
        if let Some(metrics) = errors {
            metrics.record_kube_quarantine_error();
        }
        let at = crate::time::format_unix_ns(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0),
        );
        self.health.update(|h| {
            h.connected = false;
            h.errors += 1;
            h.last_error = Some(err.to_owned());
            h.last_error_at = Some(at);
        });
    }

    fn applied(&self, object: Quarantine) -> Vec<ResourceChange> {
        let Some(pod) = object.pod_key() else { return Vec::new() };
        let change = if object.spec.pod != object.metadata.name.clone().unwrap_or_default() {
            tracing::warn!(%pod, spec_pod = %object.spec.pod, "Quarantine object whose spec.pod is not its name: ignored");
            None
        } else if let Some(release) = &object.spec.release {
            Some(ResourceChange::ReleaseRequested {
                pod: pod.clone(),
                reason: release.reason.clone(),
                requested_by: release.requested_by.clone(),
                managers: object.release_managers(),
            })
        } else if object.status.is_none() {
            let managers = object.managers(|_| true);
            // Created by this agent, its status not written yet (the watch can show that
            // version first): not a request.
            let ours = managers.iter().any(|m| m == FIELD_MANAGER);
            (!ours).then(|| ResourceChange::QuarantineRequested { pod: pod.clone(), reason: object.spec.reason.clone(), managers })
        } else {
            None
        };
        self.lock_objects().insert(pod, object);
        change.into_iter().collect()
    }

    fn deleted(&self, pod: &str) -> Option<ResourceChange> {
        self.lock_objects().remove(pod);
        if lock(&self.own_deletions).remove(pod) {
            return None;
        }
        Some(ResourceChange::Deleted { pod: pod.to_string() })
    }

    fn lock_objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Quarantine>> {
        lock(&self.objects)
    }

    /// The objects as last seen, by `namespace/name`.
    pub fn current(&self) -> BTreeMap<String, Quarantine> {
        self.lock_objects().clone()
    }

    /// Makes the object of one of this node's quarantines say what `desired` says: creates it
    /// (owned by the pod) if missing, then writes the status if it differs.
    pub async fn ensure(&self, desired: &DesiredQuarantine, pod_uid: Option<String>) -> Result<(), SinkError> {
        let (namespace, name) = split_pod(&desired.pod)?;
        let api: Api<Quarantine> = Api::namespaced(self.client.clone(), namespace);
        let existing = self.lock_objects().get(&desired.pod).cloned();
        let existing = match existing {
            Some(object) => object,
            None => {
                let object = self.new_object(desired, pod_uid);
                match api.create(&PostParams { field_manager: Some(FIELD_MANAGER.to_string()), ..Default::default() }, &object).await {
                    Ok(created) => created,
                    // The watch has not shown it yet.
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        api.get(name).await.map_err(|source| api_error(&desired.pod, "read its Quarantine object", source))?
                    }
                    Err(source) => return Err(api_error(&desired.pod, "create its Quarantine object", source)),
                }
            }
        };
        let status = QuarantineStatus {
            phase: desired.phase.to_string(),
            since: desired.since.clone(),
            node: self.node.clone(),
            message: desired.message.clone(),
            drops: desired.drops.clone(),
        };
        if existing.status.as_ref() == Some(&status) || self.drops_wait(&desired.pod, existing.status.as_ref(), &status) {
            return Ok(());
        }
        let patch = serde_json::json!({ "status": status });
        let updated = api
            .patch_status(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
            .await
            .map_err(|source| api_error(&desired.pod, "update its Quarantine status", source))?;
        self.lock_objects().insert(desired.pod.clone(), updated);
        if status.drops.is_some() {
            lock(&self.drops_written).insert(desired.pod.clone(), std::time::Instant::now());
        }
        Ok(())
    }

    /// Whether only the drop counts changed, and were written less than [`DROPS_REFRESH`] ago.
    fn drops_wait(&self, pod: &str, written: Option<&QuarantineStatus>, wanted: &QuarantineStatus) -> bool {
        let Some(written) = written else { return false };
        let only_drops = written.drops.is_some()
            && QuarantineStatus { drops: None, ..written.clone() } == QuarantineStatus { drops: None, ..wanted.clone() };
        only_drops && lock(&self.drops_written).get(pod).is_some_and(|at| at.elapsed() < DROPS_REFRESH)
    }

    fn new_object(&self, desired: &DesiredQuarantine, pod_uid: Option<String>) -> Quarantine {
        let (namespace, name) = desired.pod.split_once('/').unwrap_or(("", &desired.pod));
        Quarantine {
            api_version: api_version(),
            kind: kind(),
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                labels: Some(BTreeMap::from([("palisade.io/node".to_string(), self.node.clone())])),
                // Owned by the pod: the garbage collector deletes it with the pod.
                owner_references: pod_uid.map(|uid| {
                    vec![OwnerReference {
                        api_version: "v1".to_string(),
                        kind: "Pod".to_string(),
                        name: name.to_string(),
                        uid,
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: QuarantineSpec {
                pod: name.to_string(),
                reason: desired.reason.clone(),
                rule: Some(desired.rule.clone()).filter(|r| !r.is_empty()),
                alert_id: Some(desired.alert_id.clone()).filter(|a| !a.is_empty()),
                node: Some(self.node.clone()),
                release: None,
            },
            status: None,
        }
    }

    /// Deletes the object of a pod this agent released (a missing object is fine).
    pub async fn delete(&self, pod: &str) -> Result<(), SinkError> {
        let (namespace, name) = split_pod(pod)?;
        lock(&self.own_deletions).insert(pod.to_string());
        lock(&self.drops_written).remove(pod);
        let api: Api<Quarantine> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => {
                lock(&self.own_deletions).remove(pod);
                self.lock_objects().remove(pod);
                Ok(())
            }
            Err(source) => {
                lock(&self.own_deletions).remove(pod);
                Err(api_error(pod, "delete its Quarantine object", source))
            }
        }
    }

    /// Objects this node's agent wrote (its status names this node).
    pub fn ours(&self) -> Vec<Quarantine> {
        self.lock_objects().values().filter(|q| q.status.as_ref().is_some_and(|s| s.node == self.node)).cloned().collect()
    }
}

fn api_error(pod: &str, what: &'static str, source: kube::Error) -> SinkError {
    SinkError::Api { pod: pod.to_string(), what, source }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: serde_json::Value) -> Quarantine {
        serde_json::from_value(json).expect("a Quarantine")
    }

    #[test]
    fn release_managers_are_those_that_wrote_spec_release() {
        let q = object(serde_json::json!({
            "apiVersion": "palisade.io/v1", "kind": "Quarantine",
            "metadata": {"name": "web", "namespace": "shop", "managedFields": [
                {"manager": "palisade", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:pod": {}, "f:reason": {}}}},
                {"manager": "kubectl-patch", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:release": {"f:reason": {}, "f:requestedBy": {}}}}},
            ]},
            "spec": {"pod": "web", "release": {"reason": "fixed", "requestedBy": "alice"}},
        }));
        assert_eq!(q.release_managers(), vec!["kubectl-patch".to_string()]);
        assert_eq!(q.pod_key().as_deref(), Some("shop/web"));
    }

    #[test]
    fn unknown_fields_and_missing_status_parse() {
        let q = object(serde_json::json!({"metadata": {"name": "a", "namespace": "b"}, "spec": {"pod": "a", "future": 1}}));
        assert!(q.status.is_none());
        assert_eq!(q.api_version, "palisade.io/v1");
    }
}
