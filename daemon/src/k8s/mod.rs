//! Kubernetes: the node's pods, the namespaces and the NetworkPolicies from the API server,
//! published like the standalone inventory, plus every other node's pods as peer-only endpoints
//! (so policy peers match them by labels); quarantines made visible in the cluster.
//!
//! The daemon's use (DaemonSet mode):
//! 1. `let source = KubeSource::start(kube::Client::try_default().await?, SourceConfig::new(node, cgroup_root)).await?;`
//!    waits for the first complete list of pods, namespaces and policies (never publishes a
//!    half-synced, empty state), then keeps them current.
//! 2. `source.inventory()` / `source.policies()`: `tokio::sync::watch` receivers of
//!    `Arc<`[`crate::inventory::Inventory`]`>` and [`crate::segmentation::PolicySet`] — the same
//!    types and channel kind as the standalone `InventoryWatch`. Each inventory carries its
//!    generation and what changed since earlier ones (`Inventory::changes_since`: the pods and
//!    namespaces to look at again). During an API outage they keep the last state (never
//!    cleared).
//! 3. `source.health()`: a watch receiver of [`SourceHealth`] for `palisade status`.
//! 4. `source.quarantine_sink()`: a [`KubeQuarantineSink`] (the [`ClusterQuarantineSink`] trait)
//!    to call after the responder quarantined or released a pod; `source.take_label_removals()`
//!    yields a [`LabelRemoval`] when someone else removes the quarantine label: the daemon puts
//!    it back and raises a `tamper` alert (release only through the root-only API socket).
//! 5. [`ClusterAlertEvents`]: alerts as rate-limited Events written with kube's Recorder
//!    (events.k8s.io/v1, repeats folded into a series); the daemon feeds it through
//!    `alerts::kube_events` (`--alert-events`).
/// `kube::Resource` for one of palisade's own namespaced custom resources (a plain serde struct
/// with a `metadata` field), from the `GROUP`, `VERSION`, `KIND` and `PLURAL` constants of the
/// module it is used in; kube's derive would also generate the CRD schema, which `deploy/`
/// already holds.
macro_rules! namespaced_resource {
    ($type:ty) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed(KIND)
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Borrowed(PLURAL)
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
use namespaced_resource;

pub mod cgroup;
pub mod convert;
pub mod events;
pub mod lease;
pub mod operator;
pub mod peers;
pub mod quarantine;
pub mod plugin;
pub mod quarantine_resource;
pub mod slices;
pub mod source;

pub use cgroup::{CgroupLocator, PodCgroup, QosClass, kubepods_parent};
pub use events::{AlertEventOutcome, AlertEventsConfig, ClusterAlertEvents};
pub use quarantine::{ClusterQuarantineSink, KubeQuarantineSink, LabelRemoval, SinkError};
pub use quarantine_resource::{Quarantine, QuarantineResources, ResourceChange};
pub use source::{KubeSource, PeerMode, SourceConfig, SourceError, SourceHealth, UnresolvedCgroup, WatchHealth};

/// The label a quarantined pod carries (a view: removing it is tampering, undone by palisade).
pub const QUARANTINE_LABEL: &str = "palisade.io/quarantined";
/// Annotations beside the label, so `kubectl describe` says why.
pub const QUARANTINE_RULE_ANNOTATION: &str = "palisade.io/quarantine-rule";
pub const QUARANTINE_ALERT_ANNOTATION: &str = "palisade.io/quarantine-alert";
/// `source.component` / `reportingComponent` of the Events palisade writes.
pub const EVENT_COMPONENT: &str = "palisade";

/// Every (API group, resource, verb) this module's code sends to the API server, in one place:
/// the ClusterRole in `deploy/` must grant exactly these (a test compares them), and the API
/// stand-in tests check that every request the code makes is one of them.
pub const API_USES: &[(&str, &str, &str)] = &[
    // source: reflector list + watch, this node's pods (field selector) and every node's pods
    // (peers); the outage probe lists with limit=1.
    ("", "pods", "list"),
    ("", "pods", "watch"),
    // quarantine: the label patch (and its removal on release).
    ("", "pods", "patch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    ("networking.k8s.io", "networkpolicies", "list"),
    ("networking.k8s.io", "networkpolicies", "watch"),
    // quarantine/release Events (core/v1, one per quarantine and release).
    ("", "events", "create"),
    // alert Events through kube's Recorder (events.k8s.io/v1): repeats patch the series.
    ("events.k8s.io", "events", "create"),
    ("events.k8s.io", "events", "patch"),
];

/// What the Quarantine resource adds to [`API_USES`] (`quarantine_resource`): the watch of every
/// Quarantine, creating and deleting this node's objects, writing their status, and reading a
/// pod's uid for the owner reference. Kept apart so tests of the source alone can name it.
pub const QUARANTINE_RESOURCE_USES: &[(&str, &str, &str)] = &[
    ("", "pods", "get"),
    ("palisade.io", "quarantines", "list"),
    ("palisade.io", "quarantines", "watch"),
    ("palisade.io", "quarantines", "create"),
    ("palisade.io", "quarantines", "get"),
    ("palisade.io", "quarantines", "delete"),
    ("palisade.io", "quarantines/status", "patch"),
];

/// What `--peers slices` adds to [`API_USES`] (the source reads the operator's PeerSlice records
/// instead of every node's pods). Kept apart, as [`QUARANTINE_RESOURCE_USES`] is, so a test of
/// the default mode can check it used every one of [`API_USES`].
pub const PEER_SLICE_USES: &[(&str, &str, &str)] = &[("palisade.io", "peerslices", "list"), ("palisade.io", "peerslices", "watch")];

/// Everything `palisade operator` sends (`k8s::operator`; deploy/operator/rbac.yaml grants
/// exactly these, compared by a test): the watch of every Pod, the watch of every PeerSlice (the
/// first list adopted, later changes by others repaired), the conditional writes of slices (a
/// conflict re-reads one), and the leader election's Lease in its own namespace
/// ([`OPERATOR_LEASE_USES`], a namespaced Role).
pub const OPERATOR_USES: &[(&str, &str, &str)] = &[
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("palisade.io", "peerslices", "list"),
    ("palisade.io", "peerslices", "watch"),
    ("palisade.io", "peerslices", "get"),
    ("palisade.io", "peerslices", "create"),
    ("palisade.io", "peerslices", "update"),
    ("palisade.io", "peerslices", "delete"),
    ("coordination.k8s.io", "leases", "get"),
    ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
];

/// The part of [`OPERATOR_USES`] granted by a Role in the operator's namespace only (the
/// Lease), not cluster-wide.
pub const OPERATOR_LEASE_USES: &[(&str, &str, &str)] =
    &[("coordination.k8s.io", "leases", "get"), ("coordination.k8s.io", "leases", "create"), ("coordination.k8s.io", "leases", "update")];

/// Everything the agent may send: [`API_USES`], [`QUARANTINE_RESOURCE_USES`] and
/// [`PEER_SLICE_USES`].
pub fn all_api_uses() -> Vec<(&'static str, &'static str, &'static str)> {
    API_USES.iter().chain(QUARANTINE_RESOURCE_USES).chain(PEER_SLICE_USES).copied().collect()
}
