//! `palisade operator` (issue 18, docs/peer-records.md): watches every Pod of the cluster once and
//! publishes them as `PeerSlice` records ([`super::slices`]), so agents started with `--peers
//! slices` never watch the cluster's pods.
//!
//! [`SlicePlan`] is the reconcile, with no I/O: pods in (watch events, kept slim as a
//! [`Member`] each: identity and addresses, nothing else), slice writes out ([`Write`]), only
//! for slices whose content changed. Membership is stable: a pod is placed in a slice of its
//! namespace with room (at most [`MAX_PEERS`]) when first seen and stays there until it goes, so
//! a label change rewrites one small object. A slice that becomes empty is deleted. The content
//! of a slice is a function of its members (identities sorted, ids 1.., peers sorted by pod), so
//! an operator that restarts adopts the slices it finds (listed before the pods), and with no pod
//! change writes nothing.
//!
//! [`Operator`] runs it against the API: writes are conditional (create, or replace / delete with
//! the `resourceVersion` last seen); a `409 Conflict` (someone else wrote the slice) re-reads it
//! and the next flush writes again from what is there. It watches the slices too: the first
//! list is adopted, and afterwards a slice someone else changed is written back, one deleted
//! created again, one the plan does not hold deleted ([`SlicePlan::slice_event`]). Every write,
//! conflict, repair, error and pod left out is counted in [`OperatorCounters`] and logged.
//!
//! [`ElectedOperator`] runs an [`Operator`] only while this replica holds the Lease
//! (`k8s::lease`). The process, `palisade operator` with its metrics and status, is wired in
//! `daemon::operator`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::lease::{LeaderElector, LeaderState, LeaseConfig, LeaseCounters, LeaseError};
use super::peers::PeerRecord;
use super::slices::{self, MAX_IPS, MAX_LABELS, MAX_NAMED_PORTS, MAX_PEERS, PeerSlice};
use crate::inventory::EndpointSpec;

/// The label on every slice the operator writes.
pub const MANAGED_BY_LABEL: &str = "palisade.io/managed-by";
pub const MANAGED_BY: &str = "palisade-operator";
/// The field manager of the operator's writes.
const FIELD_MANAGER: &str = "palisade-operator";

/// The label set, service account and named ports of a pod: what a slice's identity holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Identity {
    labels: BTreeMap<String, String>,
    service_account: Option<String>,
    /// `name=port/PROTOCOL`, sorted.
    named_ports: Vec<String>,
}

/// What a slice says of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    identity: Identity,
    ips: Vec<String>,
}

impl Member {
    /// The member an endpoint becomes, or why it cannot be one (a slice holding it would be
    /// refused by every agent): the CRD's bounds.
    fn from_endpoint(endpoint: &EndpointSpec) -> Result<Member, String> {
        if endpoint.ips.is_empty() || endpoint.ips.len() > MAX_IPS {
            return Err(format!("{} addresses, 1 to {MAX_IPS}", endpoint.ips.len()));
        }
        if endpoint.labels.len() > MAX_LABELS {
            return Err(format!("{} labels, at most {MAX_LABELS}", endpoint.labels.len()));
        }
        let mut named_ports = Vec::new();
        for port in &endpoint.ports {
            let Some(name) = &port.name else { continue };
            let text = format!("{name}={}/{}", port.port, port.protocol.as_str());
            slices::named_port(&text).map_err(|reason| format!("port: {reason}"))?;
            named_ports.push(text);
        }
        named_ports.sort();
        named_ports.dedup();
        if named_ports.len() > MAX_NAMED_PORTS {
            return Err(format!("{} named ports, at most {MAX_NAMED_PORTS}", named_ports.len()));
        }
        let service_account = endpoint.service_account.clone().filter(|sa| !sa.is_empty());
        if service_account.as_ref().is_some_and(|sa| sa.len() > 253) {
            return Err("service account name longer than 253".to_string());
        }
        Ok(Member {
            identity: Identity { labels: endpoint.labels.clone(), service_account, named_ports },
            ips: endpoint.ips.iter().map(|ip| ip.to_string()).collect(),
        })
    }
}

/// `{identities, peers}` of a slice with these members: identities sorted and numbered from 1,
/// peers sorted by pod name. A function of the members only, so the same members are the same
/// body (what lets a restarted operator write nothing).
fn render(members: &BTreeMap<String, Member>) -> Value {
    let identities: BTreeSet<&Identity> = members.values().map(|m| &m.identity).collect();
    let ids: BTreeMap<&Identity, usize> = identities.iter().enumerate().map(|(i, identity)| (*identity, i + 1)).collect();
    let identities: Vec<Value> = ids
        .iter()
        .map(|(identity, id)| {
            let mut item = json!({"id": id, "labels": identity.labels});
            if let Some(sa) = &identity.service_account {
                item["serviceAccount"] = json!(sa);
            }
            if !identity.named_ports.is_empty() {
                item["namedPorts"] = json!(identity.named_ports);
            }
            item
        })
        .collect();
    let peers: Vec<Value> =
        members.iter().map(|(pod, m)| json!({"pod": pod, "identity": ids[&m.identity], "ips": m.ips})).collect();
    json!({"identities": identities, "peers": peers})
}

fn body_of(slice: &PeerSlice) -> Value {
    json!({"identities": slice.identities, "peers": slice.peers})
}

/// What the API holds of a slice, as last seen: its uid, resourceVersion and body.
#[derive(Debug, Clone, PartialEq)]
struct Written {
    /// The object's uid: a watch event of another uid is of an earlier object of the same name.
    uid: Option<String>,
    resource_version: String,
    body: Value,
}

impl Written {
    fn of(slice: &PeerSlice) -> Option<Written> {
        let resource_version = slice.metadata.resource_version.clone()?;
        Some(Written { uid: slice.metadata.uid.clone(), resource_version, body: body_of(slice) })
    }
}

/// The resourceVersions of a slice's own recent writes kept, to know their watch events.
const OWN_VERSIONS: usize = 8;
/// Slices the operator deleted, kept (by key and uid) to know their late watch events.
const RECENTLY_DELETED: usize = 1024;

type SliceKey = (String, String);

#[derive(Debug, Default)]
struct Slice {
    /// By pod name.
    members: BTreeMap<String, Member>,
    /// `None`: not in the API (as far as the operator knows).
    written: Option<Written>,
    /// The resourceVersions this operator wrote last (newest last): their watch events are its
    /// own writes coming back, not someone else's.
    own_versions: VecDeque<String>,
}

/// One write the plan wants made.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Create { namespace: String, name: String, body: Value },
    /// Conditional on `resource_version`.
    Replace { namespace: String, name: String, resource_version: String, body: Value },
    /// Conditional on `resource_version`; the slice has no members left.
    Delete { namespace: String, name: String, resource_version: String },
}

impl Write {
    pub fn target(&self) -> (&str, &str) {
        match self {
            Write::Create { namespace, name, .. } | Write::Replace { namespace, name, .. } | Write::Delete { namespace, name, .. } => {
                (namespace, name)
            }
        }
    }
}

/// The reconcile: the cluster's pods as slices, and the writes that make the API hold them.
#[derive(Debug, Default)]
pub struct SlicePlan {
    /// By (namespace, slice name).
    slices: BTreeMap<(String, String), Slice>,
    /// `namespace/pod` -> the name of its slice (in its namespace).
    member_of: HashMap<String, String>,
    /// While a (re)list of pods is under way: what it has listed so far (`None`: a pod left
    /// out, so its reason stays reported).
    listing: Option<BTreeMap<String, Option<Member>>>,
    /// Slices whose content may differ from what the API holds.
    dirty: BTreeSet<(String, String)>,
    /// Pods left out of every slice, and why (the CRD's bounds).
    left_out: BTreeMap<String, String>,
    /// The first list of the slices is taken (adopted); pods are applied only after it.
    adopted: bool,
    /// While a (re)list of the slices is under way: what it has listed so far.
    slice_listing: Option<Vec<PeerSlice>>,
    /// Slices this operator deleted (key, uid), oldest first, at most [`RECENTLY_DELETED`].
    recently_deleted: VecDeque<(SliceKey, Option<String>)>,
    /// Slices found changed, created or deleted by someone else, each put back (or deleted).
    repairs: u64,
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

impl SlicePlan {
    pub fn new() -> SlicePlan {
        SlicePlan::default()
    }

    /// Takes over a slice found in the API (before the pods are listed): its members stay where
    /// they are. A refused slice, or a pod already in another slice, is rewritten from the pods.
    pub fn adopt(&mut self, slice: &PeerSlice) {
        let (Some(namespace), Some(name)) = (slice.metadata.namespace.clone(), slice.metadata.name.clone()) else {
            return;
        };
        let key = (namespace.clone(), name.clone());
        let mut members = BTreeMap::new();
        match slice.records() {
            Ok(records) => {
                for (pod_key, record) in records {
                    let Ok(member) = Member::from_endpoint(&record.endpoint) else { continue };
                    if self.member_of.contains_key(&pod_key) {
                        continue;
                    }
                    self.member_of.insert(pod_key, name.clone());
                    members.insert(record.endpoint.name, member);
                }
            }
            Err(error) => tracing::warn!(%error, "a PeerSlice found at start is refused; it is rewritten from the pods"),
        }
        let written = Written::of(slice);
        self.slices.insert(key.clone(), Slice { members, written, own_versions: VecDeque::new() });
        self.dirty.insert(key);
    }

    /// Applies one event of the watch of every PeerSlice. The first complete list is adopted
    /// ([`Self::adopt`]); after it, the watch is how the operator learns that someone else
    /// changed, created or deleted a slice: a changed slice is written back over (the next
    /// [`Self::writes`] compares it with the plan's content), a deleted one created again, one
    /// the plan does not hold deleted. Its own writes coming back change nothing.
    pub fn slice_event(&mut self, event: &Event<PeerSlice>) {
        match event {
            Event::Init => self.slice_listing = Some(Vec::new()),
            Event::InitApply(slice) => self.slice_listing.get_or_insert_default().push(slice.clone()),
            Event::InitDone => {
                let listed = self.slice_listing.take().unwrap_or_default();
                if !self.adopted {
                    for slice in &listed {
                        self.adopt(slice);
                    }
                    self.adopted = true;
                    return;
                }
                // A relist (the watch was too old to resume): what it lists is what the API
                // holds; a slice it does not list was deleted meanwhile.
                let listed_keys: BTreeSet<SliceKey> = listed.iter().filter_map(slice_key).collect();
                let gone: Vec<SliceKey> = self
                    .slices
                    .iter()
                    .filter(|(key, slice)| slice.written.is_some() && !listed_keys.contains(*key))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in gone {
                    self.gone_underneath(&key);
                }
                for slice in &listed {
                    self.seen(slice, true);
                }
            }
            Event::Apply(slice) => self.seen(slice, false),
            Event::Delete(slice) => {
                let Some(key) = slice_key(slice) else { return };
                let ours = self.slices.get(&key).and_then(|s| s.written.as_ref()).is_some_and(|w| w.uid == slice.metadata.uid);
                if ours {
                    self.gone_underneath(&key);
                }
            }
        }
    }

    /// Whether the first list of the slices was adopted (pods may be applied).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// A slice the plan holds is no longer in the API.
    fn gone_underneath(&mut self, key: &SliceKey) {
        let Some(slice) = self.slices.get_mut(key) else { return };
        slice.written = None;
        if slice.members.is_empty() {
            // It was to be deleted anyway.
            self.slices.remove(key);
            return;
        }
        self.repairs += 1;
        tracing::warn!(slice = %format!("{}/{}", key.0, key.1), "operator: a PeerSlice was deleted by someone else; it is created again");
        self.dirty.insert(key.clone());
    }

    /// A version of a slice seen on the watch (`authoritative`: from a relist, which replaces
    /// whatever the plan thought the API held).
    fn seen(&mut self, slice: &PeerSlice, authoritative: bool) {
        let Some(key) = slice_key(slice) else { return };
        let Some(seen) = Written::of(slice) else { return };
        let Some(held) = self.slices.get_mut(&key) else {
            if self.recently_deleted.iter().any(|(k, uid)| *k == key && *uid == seen.uid) {
                return; // a late event of a slice this operator deleted
            }
            // Not the operator's: agents would take its peers. Delete it (conditionally).
            self.repairs += 1;
            tracing::warn!(slice = %format!("{}/{}", key.0, key.1), "operator: a PeerSlice it did not write; it is deleted");
            self.slices.insert(key.clone(), Slice { members: BTreeMap::new(), written: Some(seen), own_versions: VecDeque::new() });
            self.dirty.insert(key);
            return;
        };
        if held.own_versions.contains(&seen.resource_version) && !authoritative {
            return; // its own write coming back
        }
        if let Some(written) = &held.written {
            if written.resource_version == seen.resource_version {
                return;
            }
            if written.uid != seen.uid && !authoritative {
                return; // an earlier object of the same name
            }
        }
        let desired = if held.members.is_empty() { None } else { Some(render(&held.members)) };
        if desired.as_ref() != Some(&seen.body) {
            self.repairs += 1;
            tracing::warn!(slice = %format!("{}/{}", key.0, key.1), "operator: a PeerSlice was changed by someone else; it is written back");
        }
        held.written = Some(seen);
        self.dirty.insert(key);
    }

    /// Slices found changed, created or deleted by someone else since the start.
    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// The member `pod` becomes (`None`: not a peer, or left out, which is recorded).
    fn member(&mut self, pod: &Pod) -> Option<Member> {
        let key = pod_key(pod);
        // No node is named "": every scheduled pod with addresses is kept.
        let record = PeerRecord::from_pod(pod, "")?;
        match Member::from_endpoint(&record.endpoint) {
            Ok(member) => {
                self.left_out.remove(&key);
                Some(member)
            }
            Err(reason) => {
                if self.left_out.insert(key.clone(), reason.clone()).is_none() {
                    tracing::warn!(pod = %key, %reason, "pod left out of the PeerSlices");
                }
                None
            }
        }
    }

    /// Applies one Pod watch event.
    pub fn apply(&mut self, event: &Event<Pod>) {
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(pod) => {
                let key = pod_key(pod);
                match self.member(pod) {
                    Some(member) => {
                        self.listing.get_or_insert_default().insert(key, Some(member));
                    }
                    None if self.left_out.contains_key(&key) => {
                        self.listing.get_or_insert_default().insert(key, None);
                    }
                    None => {}
                }
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let gone: Vec<String> =
                    self.member_of.keys().filter(|k| !listed.get(*k).is_some_and(Option::is_some)).cloned().collect();
                for key in gone {
                    self.remove(&key);
                }
                self.left_out.retain(|k, _| listed.contains_key(k));
                for (key, member) in listed {
                    if let Some(member) = member {
                        self.upsert(&key, member);
                    }
                }
            }
            Event::Apply(pod) => match self.member(pod) {
                Some(member) => self.upsert(&pod_key(pod), member),
                None => self.remove(&pod_key(pod)),
            },
            Event::Delete(pod) => {
                self.left_out.remove(&pod_key(pod));
                self.remove(&pod_key(pod));
            }
        }
    }

    fn upsert(&mut self, key: &str, member: Member) {
        let (namespace, pod) = split_key(key);
        let name = match self.member_of.get(key) {
            Some(name) => name.clone(),
            None => {
                let name = self.place(namespace);
                self.member_of.insert(key.to_string(), name.clone());
                name
            }
        };
        let slice_key = (namespace.to_string(), name);
        let slice = self.slices.entry(slice_key.clone()).or_default();
        if slice.members.get(pod) != Some(&member) {
            slice.members.insert(pod.to_string(), member);
            self.dirty.insert(slice_key);
        }
    }

    fn remove(&mut self, key: &str) {
        let Some(name) = self.member_of.remove(key) else { return };
        let (namespace, pod) = split_key(key);
        let slice_key = (namespace.to_string(), name);
        if let Some(slice) = self.slices.get_mut(&slice_key) {
            slice.members.remove(pod);
        }
        self.dirty.insert(slice_key);
    }

    /// A slice of `namespace` with room (the first by name), or the name of a new one
    /// (`<namespace>-<n>`, the smallest `n` not taken).
    fn place(&mut self, namespace: &str) -> String {
        let in_namespace = || {
            self.slices
                .range((namespace.to_string(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
        };
        if let Some(((_, name), _)) = in_namespace().find(|(_, s)| s.members.len() < MAX_PEERS) {
            return name.clone();
        }
        let taken: BTreeSet<&str> = in_namespace().map(|((_, name), _)| name.as_str()).collect();
        let name = (0..).map(|n| format!("{namespace}-{n}")).find(|n| !taken.contains(n.as_str())).unwrap_or_default();
        self.slices.insert((namespace.to_string(), name.clone()), Slice::default());
        name
    }

    /// The writes that make the API hold the plan (only slices that differ), clearing the
    /// dirty set; report each outcome with [`Self::written`], [`Self::deleted`],
    /// [`Self::observed`] or [`Self::failed`] before the next call.
    pub fn writes(&mut self) -> Vec<Write> {
        let mut writes = Vec::new();
        for key in std::mem::take(&mut self.dirty) {
            let Some(slice) = self.slices.get(&key) else { continue };
            let (namespace, name) = key.clone();
            if slice.members.is_empty() {
                match &slice.written {
                    Some(w) => writes.push(Write::Delete { namespace, name, resource_version: w.resource_version.clone() }),
                    None => {
                        self.slices.remove(&key);
                    }
                }
                continue;
            }
            let body = render(&slice.members);
            match &slice.written {
                Some(w) if w.body == body => {}
                Some(w) => writes.push(Write::Replace { namespace, name, resource_version: w.resource_version.clone(), body }),
                None => writes.push(Write::Create { namespace, name, body }),
            }
        }
        writes
    }

    /// A create or replace succeeded: the API now holds `slice`.
    pub fn written(&mut self, slice: &PeerSlice) {
        let key = (slice.metadata.namespace.clone().unwrap_or_default(), slice.metadata.name.clone().unwrap_or_default());
        if let Some(held) = self.slices.get_mut(&key) {
            held.written = Written::of(slice);
            if let Some(rv) = &slice.metadata.resource_version {
                if held.own_versions.len() >= OWN_VERSIONS {
                    held.own_versions.pop_front();
                }
                held.own_versions.push_back(rv.clone());
            }
        }
    }

    /// A delete succeeded (or the slice was gone already).
    pub fn deleted(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        match self.slices.get_mut(&key) {
            Some(slice) if slice.members.is_empty() => {
                let uid = slice.written.as_ref().and_then(|w| w.uid.clone());
                if self.recently_deleted.len() >= RECENTLY_DELETED {
                    self.recently_deleted.pop_front();
                }
                self.recently_deleted.push_back((key.clone(), uid));
                self.slices.remove(&key);
            }
            Some(slice) => {
                slice.written = None;
                self.dirty.insert(key);
            }
            None => {}
        }
    }

    /// A conditional write found someone else's version (`409 Conflict`, or the slice gone):
    /// `current` is what the API holds now; the next [`Self::writes`] writes again from it.
    pub fn observed(&mut self, namespace: &str, name: &str, current: Option<&PeerSlice>) {
        let key = (namespace.to_string(), name.to_string());
        if let Some(slice) = self.slices.get_mut(&key) {
            slice.written = current.and_then(Written::of);
            self.dirty.insert(key);
        }
    }

    /// A write failed (not a conflict): it is tried again by a later [`Self::writes`].
    pub fn failed(&mut self, namespace: &str, name: &str) {
        self.dirty.insert((namespace.to_string(), name.to_string()));
    }

    pub fn has_writes_pending(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Slices held (written or to be written).
    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    /// Pods in a slice.
    pub fn pods(&self) -> usize {
        self.member_of.len()
    }

    /// Pods left out of every slice, and why.
    pub fn left_out(&self) -> &BTreeMap<String, String> {
        &self.left_out
    }
}

fn slice_key(slice: &PeerSlice) -> Option<SliceKey> {
    Some((slice.metadata.namespace.clone()?, slice.metadata.name.clone()?))
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// What the operator did, for its metrics and status (`daemon::operator`), its logs and
/// the tests. Shared by the operator's terms as leader.
#[derive(Debug, Default)]
pub struct OperatorCounters {
    pub created: AtomicU64,
    pub replaced: AtomicU64,
    pub deleted: AtomicU64,
    /// Conditional writes that found another version (re-read, written again).
    pub conflicts: AtomicU64,
    /// Writes and reads that failed otherwise (retried after a pause).
    pub errors: AtomicU64,
    /// Pod and PeerSlice watch errors (the watchers retry with backoff).
    pub watch_errors: AtomicU64,
    /// Slices found changed, created or deleted by someone else (each put back or deleted).
    pub repairs: AtomicU64,
    /// As of the last event: slices held, pods in them, pods left out.
    pub slices: AtomicU64,
    pub pods: AtomicU64,
    pub left_out: AtomicU64,
}

impl OperatorCounters {
    /// Slice writes made (creates, replaces, deletes).
    pub fn writes(&self) -> u64 {
        self.created.load(Ordering::Relaxed) + self.replaced.load(Ordering::Relaxed) + self.deleted.load(Ordering::Relaxed)
    }

    fn observe(&self, plan: &SlicePlan, repairs_before: u64) {
        self.slices.store(plan.slices() as u64, Ordering::Relaxed);
        self.pods.store(plan.pods() as u64, Ordering::Relaxed);
        self.left_out.store(plan.left_out().len() as u64, Ordering::Relaxed);
        self.repairs.store(repairs_before + plan.repairs(), Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Changes are gathered for this long before slices are written (coalescing a burst of pod
    /// changes into one write per slice).
    pub flush_interval: Duration,
    /// After a failed write, the pause before writing again (doubling up to `retry_max`).
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl Default for OperatorConfig {
    fn default() -> OperatorConfig {
        OperatorConfig { flush_interval: Duration::from_millis(100), retry_min: Duration::from_millis(500), retry_max: Duration::from_secs(30) }
    }
}

/// `palisade operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Gather pod changes this long before writing slices (milliseconds).
    #[arg(long, default_value_t = 100)]
    pub flush_ms: u64,
    /// This replica's identity in the leader election (default: the pod name, else
    /// `<hostname>-<pid>`).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The namespace of the Lease the replicas elect a leader with.
    #[arg(long, env = "POD_NAMESPACE", default_value = "palisade-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "palisade-operator")]
    pub lease_name: String,
    /// How long a standby waits after the leader's last renewal before taking over (seconds).
    #[arg(long, default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// How long the leader tries to renew before it stops writing (milliseconds; shorter than
    /// the lease duration).
    #[arg(long, default_value_t = 10_000)]
    pub renew_deadline_ms: u64,
    /// How often the leader renews and a standby tries to acquire (milliseconds).
    #[arg(long, default_value_t = 2_000)]
    pub retry_period_ms: u64,
    /// Metrics (`/metrics`) and status (`/healthz`: leader or standby, slices, pods, writes,
    /// conflicts) address.
    #[arg(long, default_value = "127.0.0.1:9465")]
    pub metrics_addr: std::net::SocketAddr,
}

/// Writes may go out while this says so (the replica leads); checked before each write.
pub type WriteGate = Arc<dyn Fn() -> bool + Send + Sync>;

/// The running operator. Dropping it stops it (slices stay as they are).
pub struct Operator {
    counters: Arc<OperatorCounters>,
    synced: watch::Receiver<bool>,
    task: tokio::task::AbortHandle,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Operator {
    /// Starts an operator that writes unconditionally (one replica, no election).
    pub fn start(client: Client, config: OperatorConfig) -> Operator {
        Operator::start_gated(client, config, Arc::default(), Arc::new(|| true))
    }

    /// Lists the existing slices (adopted), then watches every Pod and every slice and writes
    /// slices while `gate` says so.
    pub fn start_gated(client: Client, config: OperatorConfig, counters: Arc<OperatorCounters>, gate: WriteGate) -> Operator {
        let (synced_tx, synced) = watch::channel(false);
        let task = tokio::spawn(run_loop(client, config, counters.clone(), synced_tx, gate));
        Operator { counters, synced, task: task.abort_handle() }
    }

    pub fn counters(&self) -> &OperatorCounters {
        &self.counters
    }

    /// Becomes true once the pods were listed and the slices written from them.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }
}

async fn run_loop(client: Client, config: OperatorConfig, counters: Arc<OperatorCounters>, synced: watch::Sender<bool>, gate: WriteGate) {
    let mut plan = SlicePlan::new();
    let repairs_before = counters.repairs.load(Ordering::Relaxed);
    // The slices are listed (and adopted) before the pods are read: the pods stream is not
    // polled, hence not started, until then.
    let slice_watch = watcher::watcher(Api::<PeerSlice>::all(client.clone()), watcher::Config::default()).default_backoff();
    let mut slice_watch = std::pin::pin!(slice_watch);
    let pods = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listed = false;
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        tokio::select! {
            item = slice_watch.next() => match item {
                Some(Ok(event)) => plan.slice_event(&event),
                Some(Err(error)) => {
                    counters.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "operator: PeerSlice watch error (retried)");
                }
                None => break,
            },
            item = pods.next(), if plan.adopted() => match item {
                Some(Ok(event)) => {
                    listed |= matches!(event, Event::InitDone);
                    plan.apply(&event);
                }
                Some(Err(error)) => {
                    counters.watch_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "operator: pod watch error (retried)");
                }
                None => break,
            },
            _ = tick.tick(), if listed && (plan.has_writes_pending() || !*synced.borrow()) => {
                if retry.is_some_and(|(at, _)| tokio::time::Instant::now() < at) {
                    continue;
                }
                let failed = flush(&client, &mut plan, &counters, &gate).await;
                retry = if failed {
                    let pause = retry.map_or(config.retry_min, |(_, p)| (p * 2).min(config.retry_max));
                    Some((tokio::time::Instant::now() + pause, pause))
                } else {
                    None
                };
                if !failed && !plan.has_writes_pending() && !*synced.borrow() {
                    tracing::info!(slices = plan.slices(), pods = plan.pods(), left_out = plan.left_out().len(), "operator: PeerSlices in sync");
                    let _ = synced.send(true);
                }
            }
        }
        counters.observe(&plan, repairs_before);
    }
}

/// `palisade operator` with leader election: every replica runs one; the one holding the
/// Lease runs an [`Operator`] (from a fresh plan: it adopts the slices it finds, so a takeover
/// with no pod change writes nothing), the others stand by without reading pods or slices.
/// Leadership lost stops the writes at once (each write checks the election first) and the
/// operator with them. Dropping it stops everything without releasing the Lease (a crash: a
/// standby takes over when the lease runs out); [`Self::shutdown`] releases it.
pub struct ElectedOperator {
    elector: Option<LeaderElector>,
    counters: Arc<OperatorCounters>,
    synced: watch::Receiver<bool>,
    supervisor: tokio::task::AbortHandle,
}

impl Drop for ElectedOperator {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl ElectedOperator {
    pub fn start(client: Client, config: OperatorConfig, lease: LeaseConfig) -> Result<ElectedOperator, OperatorError> {
        let elector = LeaderElector::start(client.clone(), lease)?;
        let counters = Arc::new(OperatorCounters::default());
        let (synced_tx, synced) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(client, config, counters.clone(), elector.state(), synced_tx));
        Ok(ElectedOperator { elector: Some(elector), counters, synced, supervisor: supervisor.abort_handle() })
    }

    pub fn counters(&self) -> &Arc<OperatorCounters> {
        &self.counters
    }

    pub fn lease_counters(&self) -> Option<Arc<LeaseCounters>> {
        self.elector.as_ref().map(|e| e.counters().clone())
    }

    /// The election as this replica sees it.
    pub fn state(&self) -> watch::Receiver<LeaderState> {
        self.elector.as_ref().map(LeaderElector::state).unwrap_or_else(|| watch::channel(LeaderState::default()).1)
    }

    /// True while this replica leads and its slices are in sync with the pods.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.clone()
    }

    /// Stops writing, then releases the Lease if this replica holds it (SIGTERM), so a standby
    /// takes over at once. Returns whether a Lease was released.
    pub async fn shutdown(mut self) -> Result<bool, OperatorError> {
        self.supervisor.abort();
        let Some(elector) = self.elector.take() else { return Ok(false) };
        Ok(elector.release().await?)
    }
}

async fn supervise(client: Client, config: OperatorConfig, counters: Arc<OperatorCounters>, mut state: watch::Receiver<LeaderState>, synced: watch::Sender<bool>) {
    loop {
        if state.wait_for(|s| s.leading).await.is_err() {
            return;
        }
        let gate_state = state.clone();
        let gate: WriteGate = Arc::new(move || gate_state.borrow().leading);
        let operator = Operator::start_gated(client.clone(), config.clone(), counters.clone(), gate);
        let mut operator_synced = operator.synced();
        loop {
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() || !state.borrow_and_update().leading {
                        break;
                    }
                }
                changed = operator_synced.changed() => {
                    if changed.is_ok() {
                        let now = *operator_synced.borrow_and_update();
                        synced.send_replace(now);
                    }
                }
            }
        }
        drop(operator);
        synced.send_replace(false);
        tracing::warn!("operator: no longer leading; slice writes stopped");
    }
}

/// The identity a replica takes when none is given: `<hostname>-<pid>`.
pub fn default_identity() -> String {
    format!("{}-{}", crate::sys::hostname(), std::process::id())
}

fn slice_object(namespace: &str, name: &str, resource_version: Option<&str>, body: &Value) -> PeerSlice {
    PeerSlice {
        api_version: format!("{}/{}", slices::GROUP, slices::VERSION),
        kind: slices::KIND.to_string(),
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into()),
            resource_version: resource_version.map(str::to_string),
            ..ObjectMeta::default()
        },
        identities: body["identities"].clone(),
        peers: body["peers"].clone(),
    }
}

/// Makes the plan's writes while `gate` allows; true when one failed otherwise than by a
/// conflict. Writes the gate stops stay pending.
async fn flush(client: &Client, plan: &mut SlicePlan, counters: &OperatorCounters, gate: &WriteGate) -> bool {
    let mut failed = false;
    let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_string()) };
    for write in plan.writes() {
        let (namespace, name) = write.target();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        if !gate() {
            plan.failed(&namespace, &name);
            continue;
        }
        let api: Api<PeerSlice> = Api::namespaced(client.clone(), &namespace);
        let result = match &write {
            Write::Create { body, .. } => api.create(&params, &slice_object(&namespace, &name, None, body)).await.map(|s| {
                counters.created.fetch_add(1, Ordering::Relaxed);
                plan.written(&s);
            }),
            Write::Replace { resource_version, body, .. } => {
                api.replace(&name, &params, &slice_object(&namespace, &name, Some(resource_version), body)).await.map(|s| {
                    counters.replaced.fetch_add(1, Ordering::Relaxed);
                    plan.written(&s);
                })
            }
            Write::Delete { resource_version, .. } => {
                let params = DeleteParams {
                    preconditions: Some(Preconditions { resource_version: Some(resource_version.clone()), uid: None }),
                    ..DeleteParams::default()
                };
                match api.delete(&name, &params).await {
                    Ok(_) => {
                        counters.deleted.fetch_add(1, Ordering::Relaxed);
                        plan.deleted(&namespace, &name);
                        Ok(())
                    }
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        plan.deleted(&namespace, &name);
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
        };
        match result {
            Ok(()) => {}
            // Someone else's version (or, for a replace, the slice gone): read what is there.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                counters.conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(slice = %format!("{namespace}/{name}"), code = status.code, "operator: PeerSlice changed underneath; re-read");
                match api.get_opt(&name).await {
                    Ok(current) => plan.observed(&namespace, &name, current.as_ref()),
                    Err(error) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(slice = %format!("{namespace}/{name}"), %error, "operator: re-reading a PeerSlice failed");
                        plan.failed(&namespace, &name);
                        failed = true;
                    }
                }
            }
            Err(error) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slice = %format!("{namespace}/{name}"), %error, "operator: writing a PeerSlice failed (retried)");
                plan.failed(&namespace, &name);
                failed = true;
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, node: &str, app: &str, ip: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"nodeName": node, "serviceAccountName": "sa",
                     "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9000}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .expect("pod json")
    }

    /// Makes the plan's writes against a pretend API (resourceVersions counting up), returning
    /// them.
    fn commit(plan: &mut SlicePlan, api: &mut BTreeMap<(String, String), PeerSlice>, rv: &mut u64) -> Vec<Write> {
        let writes = plan.writes();
        for write in &writes {
            let (ns, name) = write.target();
            let key = (ns.to_string(), name.to_string());
            match write {
                Write::Create { body, .. } | Write::Replace { body, .. } => {
                    *rv += 1;
                    let mut slice = slice_object(ns, name, Some(&rv.to_string()), body);
                    // The API server keeps an object's uid across replaces and gives a new one to a create.
                    slice.metadata.uid = match write {
                        Write::Create { .. } => Some(format!("uid-{rv}")),
                        _ => api.get(&key).and_then(|s| s.metadata.uid.clone()),
                    };
                    plan.written(&slice);
                    api.insert(key, slice);
                }
                Write::Delete { .. } => {
                    api.remove(&key);
                    plan.deleted(ns, name);
                }
            }
        }
        writes
    }

    fn listed(plan: &mut SlicePlan, pods: &[Pod]) {
        plan.apply(&Event::Init);
        for pod in pods {
            plan.apply(&Event::InitApply(pod.clone()));
        }
        plan.apply(&Event::InitDone);
    }

    #[test]
    fn pods_become_valid_slices_of_their_namespace_bounded_by_max_peers() {
        let mut plan = SlicePlan::new();
        let mut pods: Vec<Pod> = (0..MAX_PEERS + 1).map(|i| pod("shop", &format!("p{i:03}"), "n1", "web", &format!("10.0.{}.{}", i / 200, i % 200 + 1))).collect();
        pods.push(pod("db", "pg", "n2", "pg", "10.9.0.1"));
        pods.push(pod("db", "pending", "", "pg", "10.9.0.2"));
        listed(&mut plan, &pods);
        let (mut api, mut rv) = (BTreeMap::new(), 0);
        let writes = commit(&mut plan, &mut api, &mut rv);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert_eq!(api.keys().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(), ["db/db-0", "shop/shop-0", "shop/shop-1"]);
        let mut all = Vec::new();
        for slice in api.values() {
            let records = slice.records().expect("every slice the operator writes is valid to the agent");
            assert!(records.len() <= MAX_PEERS);
            all.extend(records);
        }
        assert_eq!(all.len(), MAX_PEERS + 2, "every scheduled pod once");
        let (_, pg) = all.iter().find(|(k, _)| k == "db/pg").expect("db/pg");
        assert_eq!(pg.endpoint.labels["app"], "pg");
        assert_eq!(pg.endpoint.service_account.as_deref(), Some("sa"));
        assert_eq!(pg.endpoint.ports.len(), 1, "named ports only");
        // One identity per label set: 64 web pods in one slice list it once.
        assert_eq!(api[&("shop".to_string(), "shop-0".to_string())].identities.as_array().map(Vec::len), Some(1));
        assert!(plan.writes().is_empty(), "nothing left to write");
    }

    #[test]
    fn a_label_change_rewrites_one_slice_and_nothing_else() {
        let mut plan = SlicePlan::new();
        let pods: Vec<Pod> = (0..3 * MAX_PEERS).map(|i| pod("shop", &format!("p{i:03}"), "n1", "web", &format!("10.0.{}.{}", i / 200, i % 200 + 1))).collect();
        listed(&mut plan, &pods);
        let (mut api, mut rv) = (BTreeMap::new(), 0);
        commit(&mut plan, &mut api, &mut rv);
        assert_eq!(api.len(), 3);
        let home = plan.member_of["shop/p100"].clone();
        plan.apply(&Event::Apply(pod("shop", "p100", "n1", "api", "10.0.0.101")));
        let writes = commit(&mut plan, &mut api, &mut rv);
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(matches!(&writes[0], Write::Replace { name, resource_version, .. } if *name == home && resource_version != "0"));
        let records = api[&("shop".to_string(), home.clone())].records().expect("valid");
        let (_, relabelled) = records.iter().find(|(k, _)| k == "shop/p100").expect("still in its slice");
        assert_eq!(relabelled.endpoint.labels["app"], "api");
        // A change a slice cannot see (the same identity and addresses) writes nothing.
        plan.apply(&Event::Apply(pod("shop", "p100", "n2", "api", "10.0.0.101")));
        assert!(commit(&mut plan, &mut api, &mut rv).is_empty());
        // A new pod fills the room a deleted one left; a slice that empties is deleted.
        plan.apply(&Event::Delete(pod("shop", "p000", "n1", "web", "10.0.0.1")));
        plan.apply(&Event::Apply(pod("shop", "new", "n1", "web", "10.0.9.1")));
        assert_eq!(commit(&mut plan, &mut api, &mut rv).len(), 1, "one slice: the freed place is reused");
        for i in 2 * MAX_PEERS..3 * MAX_PEERS {
            plan.apply(&Event::Delete(pod("shop", &format!("p{i:03}"), "n1", "web", "10.0.0.1")));
        }
        let writes = commit(&mut plan, &mut api, &mut rv);
        assert!(matches!(writes.as_slice(), [Write::Delete { .. }]), "{writes:?}");
        assert_eq!(api.len(), 2);
    }

    #[test]
    fn a_restarted_operator_adopts_the_slices_and_writes_nothing_when_no_pod_changed() {
        let pods: Vec<Pod> = (0..100).map(|i| pod(if i % 2 == 0 { "a" } else { "b" }, &format!("p{i}"), "n1", &format!("app{}", i % 5), &format!("10.0.0.{}", i + 1))).collect();
        let mut first = SlicePlan::new();
        listed(&mut first, &pods);
        let (mut api, mut rv) = (BTreeMap::new(), 0);
        commit(&mut first, &mut api, &mut rv);
        // The cluster changed while no operator ran: one pod gone, one new one.
        let mut changed = pods.clone();
        changed.retain(|p| p.name_any() != "p3");
        changed.push(pod("b", "late", "n1", "app0", "10.0.1.1"));

        let mut second = SlicePlan::new();
        for slice in api.values() {
            second.adopt(slice);
        }
        listed(&mut second, &pods);
        assert!(commit(&mut second, &mut api, &mut rv).is_empty(), "a restart with no pod change writes nothing");

        let mut third = SlicePlan::new();
        for slice in api.values() {
            third.adopt(slice);
        }
        listed(&mut third, &changed);
        let writes = commit(&mut third, &mut api, &mut rv);
        assert_eq!(writes.len(), 1, "the pod that went and the new one share slice b-0: {writes:?}");
        let names: Vec<String> = api.values().flat_map(|s| s.records().expect("valid")).map(|(k, _)| k).collect();
        assert!(names.contains(&"b/late".to_string()) && !names.contains(&"b/p3".to_string()));
    }

    #[test]
    fn a_conflict_writes_again_from_what_the_api_holds() {
        let mut plan = SlicePlan::new();
        listed(&mut plan, &[pod("shop", "a", "n1", "web", "10.0.0.1")]);
        let (mut api, mut rv) = (BTreeMap::new(), 0);
        commit(&mut plan, &mut api, &mut rv);
        // Someone else rewrote the slice (a hostile or stale writer).
        let key = ("shop".to_string(), "shop-0".to_string());
        let mut theirs = api[&key].clone();
        theirs.peers = json!([{"pod": "a", "identity": 1, "ips": ["10.6.6.6"]}]);
        theirs.metadata.resource_version = Some("99".into());
        api.insert(key.clone(), theirs.clone());
        plan.apply(&Event::Apply(pod("shop", "a", "n1", "api", "10.0.0.1")));
        let writes = plan.writes();
        assert!(matches!(&writes[0], Write::Replace { resource_version, .. } if resource_version == "1"));
        // The API answers 409: the operator reads theirs and writes its content over it.
        plan.observed("shop", "shop-0", Some(&theirs));
        let writes = plan.writes();
        assert!(matches!(&writes[0], Write::Replace { resource_version, body, .. }
            if resource_version == "99" && body["peers"][0]["ips"][0] == "10.0.0.1"), "{writes:?}");
        // A slice deleted underneath is created again.
        plan.observed("shop", "shop-0", None);
        assert!(matches!(plan.writes().as_slice(), [Write::Create { .. }]));
    }

    #[test]
    fn the_watch_of_the_slices_puts_back_what_someone_else_changed_and_ignores_its_own_writes() {
        let mut plan = SlicePlan::new();
        plan.slice_event(&Event::Init);
        plan.slice_event(&Event::InitDone);
        assert!(plan.adopted(), "an empty first list is adopted too");
        listed(&mut plan, &[pod("shop", "a", "n1", "web", "10.0.0.1")]);
        let (mut api, mut rv) = (BTreeMap::new(), 0);
        commit(&mut plan, &mut api, &mut rv);
        let key = ("shop".to_string(), "shop-0".to_string());
        let first = api[&key].clone();
        plan.apply(&Event::Apply(pod("shop", "a", "n1", "api", "10.0.0.1")));
        commit(&mut plan, &mut api, &mut rv);
        // Its own writes coming back, the older one late: nothing to do.
        plan.slice_event(&Event::Apply(first.clone()));
        plan.slice_event(&Event::Apply(api[&key].clone()));
        assert!(plan.writes().is_empty());
        assert_eq!(plan.repairs(), 0);

        // Someone else's version: written back over it, conditional on theirs.
        let mut theirs = api[&key].clone();
        theirs.peers = json!([{"pod": "a", "identity": 1, "ips": ["10.6.6.6"]}]);
        rv += 1;
        theirs.metadata.resource_version = Some(rv.to_string());
        api.insert(key.clone(), theirs.clone());
        plan.slice_event(&Event::Apply(theirs.clone()));
        assert_eq!(plan.repairs(), 1);
        let writes = commit(&mut plan, &mut api, &mut rv);
        assert!(
            matches!(&writes[..], [Write::Replace { resource_version, .. }] if Some(resource_version) == theirs.metadata.resource_version.as_ref()),
            "{writes:?}"
        );
        assert_eq!(api[&key].peers[0]["ips"][0], "10.0.0.1");

        // Deleted by someone else: created again. Late events of the earlier object of that
        // name change nothing.
        let gone = api.remove(&key).expect("slice");
        plan.slice_event(&Event::Delete(gone.clone()));
        let writes = commit(&mut plan, &mut api, &mut rv);
        assert!(matches!(&writes[..], [Write::Create { .. }]), "{writes:?}");
        assert_eq!(plan.repairs(), 2);
        plan.slice_event(&Event::Delete(gone));
        plan.slice_event(&Event::Apply(first));
        assert!(plan.writes().is_empty());

        // A slice it did not write (agents would take its peers): deleted, conditionally.
        let mut forged = api[&key].clone();
        forged.metadata.name = Some("shop-forged".into());
        forged.metadata.uid = Some("uid-forged".into());
        forged.metadata.resource_version = Some("99".into());
        plan.slice_event(&Event::Apply(forged));
        let writes = plan.writes();
        assert!(matches!(&writes[..], [Write::Delete { name, resource_version, .. }] if name == "shop-forged" && resource_version == "99"), "{writes:?}");
        plan.deleted("shop", "shop-forged");
        assert_eq!(plan.repairs(), 3);

        // A relist that does not list a slice: deleted meanwhile, created again.
        plan.slice_event(&Event::Init);
        plan.slice_event(&Event::InitDone);
        assert!(matches!(plan.writes().as_slice(), [Write::Create { name, .. }] if name == "shop-0"));
        assert_eq!(plan.repairs(), 4);
    }

    #[test]
    fn a_pod_a_slice_cannot_hold_is_left_out_and_reported() {
        let mut plan = SlicePlan::new();
        let mut many = pod("shop", "labels", "n1", "web", "10.0.0.1");
        many.metadata.labels = Some((0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".to_string())).collect());
        listed(&mut plan, &[many, pod("shop", "ok", "n1", "web", "10.0.0.2")]);
        assert_eq!(plan.pods(), 1);
        assert!(plan.left_out()["shop/labels"].contains("labels, at most 64"), "{:?}", plan.left_out());
        plan.apply(&Event::Delete(pod("shop", "labels", "n1", "web", "10.0.0.1")));
        assert!(plan.left_out().is_empty());
    }
}
