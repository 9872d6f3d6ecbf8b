//! Watches the API server (kube-runtime watchers feeding reflector stores) and publishes the
//! node's inventory and the cluster's policy set.
//!
//! Pods are watched twice (with `--peers pods`, the default; with `--peers slices` the
//! cluster-wide watch is replaced by a watch of the operator's PeerSlice records, [`super::slices`]).
//! The node-local watch (field selector `spec.nodeName=<node>`) feeds
//! what this node monitors and enforces: local endpoints with their cgroups, and the quarantine
//! label bookkeeping. The cluster-wide watch (no field selector) feeds the pods of every other
//! node as *peer-only* endpoints (namespace, name, labels, service account, IPs, named ports; no
//! cgroup), kept as slim records from the moment each event arrives, never as Pod objects
//! ([`super::peers`]): NetworkPolicy peers are matched by labels wherever they run, so a policy allowing
//! `app=frontend` must allow a frontend pod on another node. Peer-only endpoints are never
//! looked up in the cgroup tree, never unresolved, never monitored, attached or quarantined
//! here, and their quarantine label is not tracked. A pod on this node is taken
//! from the node-local watch only (the cluster-wide copy is ignored, also while the node-local
//! watch has not seen it yet). Host-network pods of other nodes are left out: they have no
//! addresses of their own.
//!
//! Robustness comes from kube-runtime's watcher, configured here: it lists, then watches from the
//! list's resourceVersion with bookmarks on (so a reconnect resumes from a recent version instead
//! of relisting); a dropped watch connection is resumed from the last version seen; a `410 Gone`
//! (the version was compacted away) restarts with a fresh list, which the reflector (and the
//! peer store) swaps in whole. Errors are retried with exponential backoff. The stores are never cleared on errors,
//! so during an outage the last known state stays published; [`SourceHealth`] says since when
//! the API has been unreachable and why.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy as KubeNetworkPolicy;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Client, Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, mpsc, watch};

use super::cgroup::{CgroupLocator, QosClass};
use super::convert::{self, PodView};
use super::peers::PeerStore;
use super::slices::{PeerSlice, SliceStore};
use super::quarantine::{KubeQuarantineSink, LabelRemoval, OwnLabelChanges};
use crate::inventory::{ChangeLog, ChangeSet, EndpointSpec, Inventory, InventoryFile};
use crate::segmentation::policy::{NetworkPolicy, PolicySet};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no complete list of {missing} from the API server within {timeout:?} (last error: {last_error})")]
    InitialSync { timeout: Duration, missing: String, last_error: String },
}

/// Where and how to watch.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// This node's name (`spec.nodeName` of its pods; the DaemonSet passes it via the downward API).
    pub node_name: String,
    /// The cgroup2 mount the pod cgroups are looked up under.
    pub cgroup_root: PathBuf,
    /// How often pods whose cgroup is not found yet are looked up again.
    pub cgroup_retry: Duration,
    /// `start` gives up when the first complete lists have not arrived by then.
    pub initial_sync_timeout: Duration,
    /// While a watch is failing, how often a one-item list checks whether the API is back (a
    /// resumed watch reports nothing until something changes).
    pub outage_probe_interval: Duration,
    /// Watch retry backoff: doubles from `backoff_min` up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Changes arriving within this time are published together. Zero (the default): what is
    /// pending when the builder wakes is published together, and changes during a build make
    /// exactly one more (a 50 ms wait here added to every change's latency).
    pub debounce: Duration,
    /// Where the pods of other nodes (policy peers) come from.
    pub peers: PeerMode,
}

/// Where an agent learns the pods of other nodes (docs/peer-records.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PeerMode {
    /// Watch every Pod of the cluster (small clusters; no operator needed).
    #[default]
    Pods,
    /// Watch the `PeerSlice` records `palisade operator` publishes; no cluster-wide pod watch.
    Slices,
}

impl SourceConfig {
    pub fn new(node_name: impl Into<String>, cgroup_root: impl Into<PathBuf>) -> SourceConfig {
        SourceConfig {
            node_name: node_name.into(),
            cgroup_root: cgroup_root.into(),
            cgroup_retry: Duration::from_secs(2),
            initial_sync_timeout: Duration::from_secs(120),
            outage_probe_interval: Duration::from_secs(5),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            debounce: Duration::ZERO,
            peers: PeerMode::Pods,
        }
    }
}

/// One watched resource's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WatchHealth {
    pub connected: bool,
    /// The first complete list arrived.
    pub synced: bool,
    /// RFC 3339, set while the watch fails.
    pub outage_since: Option<String>,
    #[serde(skip)]
    pub outage_since_unix_ns: Option<i128>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Lists after the first (after `410 Gone` or a failed resume).
    pub relists: u64,
    /// Objects in the store (for `cluster-pods`: the peers kept, pods of other nodes).
    pub objects: usize,
}

/// `status` `kubernetes.peers`: the source of the peers (pods of other nodes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeersHealth {
    pub source: PeerMode,
    /// Slices mode: PeerSlice objects held (refused ones included, with their last good content).
    pub slices: usize,
    /// Peer records held (before the inventory's checks).
    pub peers: usize,
    /// Slices mode: slices whose current version is refused (each also in `rejected`).
    pub refused_slices: usize,
    /// RFC 3339: the last change of the peers held (slices mode). While the operator is away
    /// this stays put and the agent enforces with what it holds.
    pub last_update: Option<String>,
}

/// A pod published without a cgroup (not monitored or segmented by cgroup yet); retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnresolvedCgroup {
    pub pod: String,
    pub uid: String,
    pub reason: String,
    /// RFC 3339: first time the lookup failed.
    pub since: String,
    pub attempts: u64,
}

/// What `palisade status` shows about the Kubernetes source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceHealth {
    pub node: String,
    /// Every watch is connected.
    pub connected: bool,
    /// RFC 3339: the earliest outage among the watches still failing.
    pub outage_since: Option<String>,
    /// The most recent error of any watch.
    pub last_error: Option<String>,
    /// Keyed `pods` (this node's), `cluster-pods` (every node's, for peers), `namespaces`,
    /// `networkpolicies`.
    pub watches: BTreeMap<String, WatchHealth>,
    /// Where the peers come from and how current they are.
    pub peers: PeersHealth,
    /// Published endpoints, peer-only ones included.
    pub endpoints: usize,
    /// Of those, peer-only endpoints (pods on other nodes).
    pub peer_endpoints: usize,
    pub policies: usize,
    pub unresolved_cgroups: Vec<UnresolvedCgroup>,
    /// Pods, namespaces or policies left out of what is published, and why.
    pub rejected: Vec<String>,
    /// How many times the inventory or the policy set was published (the first one included).
    pub publications: u64,
}

impl SourceHealth {
    fn recompute(&mut self) {
        self.connected = !self.watches.is_empty() && self.watches.values().all(|w| w.connected);
        let earliest = self
            .watches
            .values()
            .filter_map(|w| w.outage_since_unix_ns.zip(w.outage_since.clone()))
            .min_by_key(|(ns, _)| *ns);
        self.outage_since = earliest.map(|(_, s)| s);
        self.last_error = self
            .watches
            .values()
            .filter_map(|w| w.last_error_at.clone().zip(w.last_error.clone()))
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, e)| e);
    }
}

const PODS: &str = "pods";
const CLUSTER_PODS: &str = "cluster-pods";
const PEER_SLICES: &str = "peerslices";
const NAMESPACES: &str = "namespaces";
const NETWORK_POLICIES: &str = "networkpolicies";

struct Shared {
    health: watch::Sender<SourceHealth>,
    changed: Notify,
}

impl Shared {
    fn update(&self, kind: &str, f: impl FnOnce(&mut WatchHealth)) {
        self.health.send_modify(|health| {
            f(health.watches.entry(kind.to_string()).or_default());
            health.recompute();
        });
    }

    fn ok(&self, kind: &str, init: bool, objects: usize) {
        self.update(kind, |w| {
            if !w.connected {
                tracing::info!(watch = kind, "Kubernetes API watch connected");
            }
            w.connected = true;
            w.outage_since = None;
            w.outage_since_unix_ns = None;
            if init && w.synced {
                w.relists += 1;
            }
            w.objects = objects;
        });
    }

    fn synced(&self, kind: &str, objects: usize) {
        self.update(kind, |w| {
            w.synced = true;
            w.objects = objects;
        });
    }

    fn error(&self, kind: &str, error: String) {
        let now = now_ns();
        self.update(kind, |w| {
            if w.connected || w.outage_since.is_none() {
                tracing::warn!(watch = kind, %error, "Kubernetes API watch failing; keeping the last known state");
                w.outage_since = Some(crate::time::format_unix_ns(now));
                w.outage_since_unix_ns = Some(now);
            } else {
                tracing::debug!(watch = kind, %error, "Kubernetes API watch still failing");
            }
            w.connected = false;
            w.last_error = Some(error);
            w.last_error_at = Some(crate::time::format_unix_ns(now));
        });
    }

    fn in_outage(&self, kind: &str) -> bool {
        self.health.borrow().watches.get(kind).is_some_and(|w| !w.connected && w.outage_since.is_some())
    }
}

pub(super) fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

/// Exponential backoff for watch retries (kube-runtime's own constructor is private).
struct RetryBackoff {
    min: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let next = match self.current {
            None => self.min,
            Some(current) => (current * 2).min(self.max),
        };
        self.current = Some(next);
        Some(next)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.current = None;
    }
}

/// The running source. Dropping it stops its tasks; receivers then see the channels closed.
pub struct KubeSource {
    client: Client,
    node: String,
    inventory: watch::Receiver<Arc<Inventory>>,
    policies: watch::Receiver<PolicySet>,
    health: watch::Receiver<SourceHealth>,
    label_removals: Option<mpsc::UnboundedReceiver<LabelRemoval>>,
    labelled: Arc<Mutex<BTreeSet<String>>>,
    own_label_changes: OwnLabelChanges,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The watch of every other node's pods (no label tracking: quarantines are per node), or of
/// the operator's PeerSlices.
fn spawn_peer_watch(peers: &Peers, client: &Client, shared: &Arc<Shared>, config: &SourceConfig) -> tokio::task::AbortHandle {
    match peers {
        Peers::Pods(store) => spawn_watch(
            CLUSTER_PODS,
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            Locked(store.clone()),
            shared.clone(),
            config,
            |_| {},
        ),
        Peers::Slices(store) => spawn_watch(
            PEER_SLICES,
            Api::<PeerSlice>::all(client.clone()),
            watcher::Config::default(),
            Locked(store.clone()),
            shared.clone(),
            config,
            |_| {},
        ),
    }
}

/// The error of a first sync that did not finish in time: the kinds not listed yet and the
/// last error a watch saw.
fn initial_sync_failed(shared: &Shared, peers_kind: &'static str, timeout: Duration) -> SourceError {
    let health = shared.health.borrow().clone();
    let missing: Vec<&str> = [PODS, peers_kind, NAMESPACES, NETWORK_POLICIES]
        .into_iter()
        .filter(|k| !health.watches.get(*k).is_some_and(|w| w.synced))
        .collect();
    SourceError::InitialSync {
        timeout,
        missing: missing.join(", "),
        last_error: health.last_error.unwrap_or_else(|| "none".to_string()),
    }
}

impl KubeSource {
    /// Starts the watchers and returns once pods, namespaces and policies have each been listed
    /// completely once (or fails after `config.initial_sync_timeout`).
    pub async fn start(client: Client, config: SourceConfig) -> Result<KubeSource, SourceError> {
        let (health_tx, health_rx) = watch::channel(SourceHealth { node: config.node_name.clone(), ..Default::default() });
        let shared = Arc::new(Shared { health: health_tx, changed: Notify::new() });
        let (removal_tx, removal_rx) = mpsc::unbounded_channel();
        let labelled = Arc::new(Mutex::new(BTreeSet::new()));
        let own_label_changes = OwnLabelChanges::default();
        let mut tasks = Vec::new();

        let (pods, pod_writer) = reflector::store::<Pod>();
        // Every other node's pods, slim: never whole Pod objects (see `peers`), or the
        // operator's PeerSlice records (see `slices`).
        let peers = match config.peers {
            PeerMode::Pods => Peers::Pods(Arc::new(Mutex::new(PeerStore::new(config.node_name.clone())))),
            PeerMode::Slices => Peers::Slices(Arc::new(Mutex::new(SliceStore::new()))),
        };
        let peers_kind = peers.kind();
        let (namespaces, namespace_writer) = reflector::store::<Namespace>();
        let (policies, policy_writer) = reflector::store::<KubeNetworkPolicy>();

        let pod_config = watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));
        let mut tracker = LabelTracker {
            labelled: labelled.clone(),
            own: own_label_changes.clone(),
            removals: removal_tx,
            seen_in_init: None,
        };
        tasks.push(spawn_watch(
            PODS,
            Api::<Pod>::all(client.clone()),
            pod_config,
            Reflected { writer: pod_writer, store: pods.clone() },
            shared.clone(),
            &config,
            move |event| tracker.observe(event),
        ));
        tasks.push(spawn_peer_watch(&peers, &client, &shared, &config));
        tasks.push(spawn_watch(
            NAMESPACES,
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            Reflected { writer: namespace_writer, store: namespaces.clone() },
            shared.clone(),
            &config,
            |_| {},
        ));
        let policy_changes = Arc::new(Mutex::new(PolicyChanges { all: true, keys: BTreeSet::new() }));
        tasks.push(spawn_watch(
            NETWORK_POLICIES,
            Api::<KubeNetworkPolicy>::all(client.clone()),
            watcher::Config::default(),
            Reflected { writer: policy_writer, store: policies.clone() },
            shared.clone(),
            &config,
            {
                let changes = policy_changes.clone();
                move |event: &Event<KubeNetworkPolicy>| locked(&changes, |changes| changes.note(event))
            },
        ));
        let abort_all = |tasks: &[tokio::task::AbortHandle]| tasks.iter().for_each(|t| t.abort());

        let mut peers_health = shared.health.subscribe();
        let ready = async {
            // A writer is only dropped when its task ends, which cannot happen before abort.
            let _ = pods.wait_until_ready().await;
            let _ = peers_health.wait_for(|h| h.watches.get(peers_kind).is_some_and(|w| w.synced)).await;
            let _ = namespaces.wait_until_ready().await;
            let _ = policies.wait_until_ready().await;
        };
        if tokio::time::timeout(config.initial_sync_timeout, ready).await.is_err() {
            abort_all(&tasks);
            return Err(initial_sync_failed(&shared, peers_kind, config.initial_sync_timeout));
        }

        let mut builder = Builder {
            locator: CgroupLocator::new(&config.cgroup_root),
            pods,
            peers,
            namespaces,
            policies,
            policy_changes,
            published_policies: BTreeMap::new(),
            policy_rejections: BTreeMap::new(),
            last_good_policies: BTreeMap::new(),
            cgroups: BTreeMap::new(),
            unresolved: BTreeMap::new(),
            log: ChangeLog::new(),
        };
        let (mut inventory, policy_set, report) = builder.build();
        inventory.history = Some(Arc::new(builder.log.clone()));
        let (inventory_tx, inventory_rx) = watch::channel(Arc::new(inventory));
        let (policies_tx, policies_rx) = watch::channel(policy_set);
        report.record(&shared, true);
        tracing::info!(
            node = %config.node_name,
            endpoints = inventory_rx.borrow().endpoints.len(),
            peer_endpoints = inventory_rx.borrow().endpoints.iter().filter(|e| e.peer_only).count(),
            policies = policies_rx.borrow().policies.len(),
            "Kubernetes source synced"
        );
        let task = tokio::spawn(builder.run(shared.clone(), inventory_tx, policies_tx, config.debounce, config.cgroup_retry));
        tasks.push(task.abort_handle());

        Ok(KubeSource {
            client,
            node: config.node_name,
            inventory: inventory_rx,
            policies: policies_rx,
            health: health_rx,
            label_removals: Some(removal_rx),
            labelled,
            own_label_changes,
            tasks,
        })
    }

    /// Every new inventory (starts at the current one), shared (nobody copies it), each with
    /// its generation and what changed since the ones before
    /// ([`Inventory::changes_since`]).
    pub fn inventory(&self) -> watch::Receiver<Arc<Inventory>> {
        self.inventory.clone()
    }

    /// Every new policy set (starts at the current one).
    pub fn policies(&self) -> watch::Receiver<PolicySet> {
        self.policies.clone()
    }

    pub fn health(&self) -> watch::Receiver<SourceHealth> {
        self.health.clone()
    }

    /// The quarantine label removed in the cluster by someone other than palisade (tampering:
    /// the label is no way out). Only the first call gets the receiver.
    pub fn take_label_removals(&mut self) -> Option<mpsc::UnboundedReceiver<LabelRemoval>> {
        self.label_removals.take()
    }

    /// Pods on this node that carry the quarantine label now (`namespace/name`): at start-up the
    /// daemon can compare them with the responder's list.
    pub fn labelled_quarantined(&self) -> BTreeSet<String> {
        self.labelled_pods().current()
    }

    /// A live view of the labelled pods, for a task that outlives this borrow.
    pub fn labelled_pods(&self) -> LabelledPods {
        LabelledPods(self.labelled.clone())
    }

    /// The client the source watches with (for the Quarantine resource, which shares it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// This node's name, as its pods' `spec.nodeName` says it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The sink that makes this node's quarantines visible in the cluster. It shares the
    /// source's view of the label, so its own label removals are not mistaken for releases.
    pub fn quarantine_sink(&self) -> KubeQuarantineSink {
        KubeQuarantineSink::new(self.client.clone(), self.node.clone(), self.labelled.clone(), self.own_label_changes.clone())
    }
}

/// Where a watch's events go.
trait WatchSink<K>: Send + 'static {
    /// Applies one event; true when what the builder publishes may have changed.
    fn apply(&mut self, event: &Event<K>) -> bool;
    /// Objects held (for the health).
    fn objects(&self) -> usize;
}

/// A reflector store: whole objects (this node's pods, namespaces, policies: few or small).
struct Reflected<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: reflector::store::Writer<K>,
    store: Store<K>,
}

impl<K> WatchSink<K> for Reflected<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    fn apply(&mut self, event: &Event<K>) -> bool {
        self.writer.apply_watcher_event(event);
        matches!(event, Event::Apply(_) | Event::Delete(_) | Event::InitDone)
    }

    fn objects(&self) -> usize {
        self.store.len()
    }
}

/// A store shared with the builder.
struct Locked<T>(Arc<Mutex<T>>);

fn locked<T, R>(store: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> R {
    f(&mut store.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
}

/// The pods of every other node, kept as peer records: a pod event that changes nothing a peer
/// is made of (status heartbeats, annotations, pods on this node) wakes no build.
impl WatchSink<Pod> for Locked<PeerStore> {
    fn apply(&mut self, event: &Event<Pod>) -> bool {
        locked(&self.0, |store| store.apply(event))
    }

    fn objects(&self) -> usize {
        locked(&self.0, |store| store.len())
    }
}

/// The operator's PeerSlice records, validated as they arrive.
impl WatchSink<PeerSlice> for Locked<SliceStore> {
    fn apply(&mut self, event: &Event<PeerSlice>) -> bool {
        locked(&self.0, |store| store.apply(event))
    }

    fn objects(&self) -> usize {
        locked(&self.0, |store| store.slices())
    }
}

/// Where the builder takes the peers from (one of the two, as `SourceConfig::peers` says).
enum Peers {
    Pods(Arc<Mutex<PeerStore>>),
    Slices(Arc<Mutex<SliceStore>>),
}

impl Peers {
    /// The watch's name in the health.
    fn kind(&self) -> &'static str {
        match self {
            Peers::Pods(_) => CLUSTER_PODS,
            Peers::Slices(_) => PEER_SLICES,
        }
    }

    /// Appends the peers not in `local_keys` to `endpoints`, sorted by key, and what was left
    /// out of them to `rejected`; returns the health.
    fn collect(&self, local_keys: &BTreeSet<String>, endpoints: &mut Vec<EndpointSpec>, rejected: &mut Vec<String>) -> PeersHealth {
        match self {
            Peers::Pods(store) => locked(store, |peers| {
                endpoints.reserve(peers.len());
                for (key, record) in peers.iter().filter(|(key, _)| !local_keys.contains(*key)) {
                    for note in &record.notes {
                        rejected.push(format!("peer pod {key}: {note}"));
                    }
                    endpoints.push(record.endpoint.clone());
                }
                PeersHealth { source: PeerMode::Pods, peers: peers.len(), ..PeersHealth::default() }
            }),
            Peers::Slices(store) => locked(store, |slices| {
                let (records, notes) = slices.records();
                rejected.extend(notes);
                rejected.extend(slices.refused().map(|refusal| format!("{refusal}; its previous content stays")));
                endpoints.reserve(records.len());
                for (_, record) in records.into_iter().filter(|(key, _)| !local_keys.contains(*key)) {
                    endpoints.push(record.endpoint.clone());
                }
                PeersHealth {
                    source: PeerMode::Slices,
                    slices: slices.slices(),
                    peers: slices.peers(),
                    refused_slices: slices.refused().count(),
                    last_update: slices.last_update().map(str::to_string),
                }
            }),
        }
    }
}

fn spawn_watch<K>(
    kind: &'static str,
    api: Api<K>,
    watch_config: watcher::Config,
    mut sink: impl WatchSink<K>,
    shared: Arc<Shared>,
    config: &SourceConfig,
    mut on_event: impl FnMut(&Event<K>) + Send + 'static,
) -> tokio::task::AbortHandle
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let backoff = RetryBackoff { min: config.backoff_min, max: config.backoff_max, current: None };
    let mut probe_params = ListParams::default().limit(1);
    if let Some(fields) = &watch_config.field_selector {
        probe_params = probe_params.fields(fields);
    }
    let probe_interval = config.outage_probe_interval;
    let task = tokio::spawn(async move {
        let stream = watcher(api.clone(), watch_config)
            .modify(|object: &mut K| object.managed_fields_mut().clear())
            .backoff(backoff);
        let mut stream = std::pin::pin!(stream);
        let mut probe = tokio::time::interval(probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        let changed = sink.apply(&event);
                        on_event(&event);
                        let objects = sink.objects();
                        // Not per listed object: the health is one shared value (with a
                        // notification per update) and a list has as many objects as the cluster.
                        if !matches!(event, Event::InitApply(_)) {
                            shared.ok(kind, matches!(event, Event::Init), objects);
                        }
                        match event {
                            Event::Init | Event::InitApply(_) => {}
                            Event::InitDone => {
                                shared.synced(kind, objects);
                                shared.changed.notify_one();
                            }
                            Event::Apply(_) | Event::Delete(_) if changed => shared.changed.notify_one(),
                            Event::Apply(_) | Event::Delete(_) => {}
                        }
                    }
                    Some(Err(err)) => shared.error(kind, err.to_string()),
                    None => break,
                },
                _ = probe.tick(), if shared.in_outage(kind) => {
                    // A resumed watch is silent until something changes: ask directly.
                    match api.list(&probe_params).await {
                        Ok(_) => shared.ok(kind, false, sink.objects()),
                        Err(err) => shared.error(kind, format!("outage probe: {err}")),
                    }
                }
            }
        }
    });
    task.abort_handle()
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl futures::Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher::watcher(api, config)
}

/// Notices the quarantine label disappearing from a pod (or turning into anything but "true").
struct LabelTracker {
    labelled: Arc<Mutex<BTreeSet<String>>>,
    own: OwnLabelChanges,
    removals: mpsc::UnboundedSender<LabelRemoval>,
    /// Pods listed since the current (re)list began.
    seen_in_init: Option<BTreeSet<String>>,
}

impl LabelTracker {
    fn observe(&mut self, event: &Event<Pod>) {
        match event {
            Event::Init => self.seen_in_init = Some(BTreeSet::new()),
            Event::InitApply(pod) => {
                if let Some(seen) = &mut self.seen_in_init {
                    seen.insert(pod_key(pod));
                }
                self.apply(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.seen_in_init.take() {
                    self.with_labelled(|labelled| labelled.retain(|pod| seen.contains(pod)));
                }
            }
            Event::Apply(pod) => self.apply(pod),
            Event::Delete(pod) => {
                let key = pod_key(pod);
                self.with_labelled(|labelled| labelled.remove(&key));
                self.own.take(&key);
            }
        }
    }

    fn apply(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        let now = pod.labels().get(super::QUARANTINE_LABEL).is_some_and(|v| v == "true");
        let before = self.with_labelled(|labelled| if now { !labelled.insert(key.clone()) } else { labelled.remove(&key) });
        if before && !now {
            if self.own.take(&key) {
                tracing::debug!(pod = %key, "quarantine label removed by palisade's own release");
                return;
            }
            let value = pod.labels().get(super::QUARANTINE_LABEL).cloned();
            let change = match value {
                Some(value) => format!("label {}={value:?} set in the cluster", super::QUARANTINE_LABEL),
                None => format!("label {} removed in the cluster", super::QUARANTINE_LABEL),
            };
            tracing::warn!(pod = %key, %change, "quarantine label changed by someone other than palisade");
            // The receiver is gone only when the daemon is shutting down.
            let _ = self.removals.send(LabelRemoval { pod: key, change });
        }
    }

    fn with_labelled<T>(&self, f: impl FnOnce(&mut BTreeSet<String>) -> T) -> T {
        let mut guard = self.labelled.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}

/// A NetworkPolicy's (namespace, name), borrowed.
fn policy_ref(p: &KubeNetworkPolicy) -> (&str, &str) {
    (p.metadata.namespace.as_deref().unwrap_or_default(), p.metadata.name.as_deref().unwrap_or_default())
}

/// NetworkPolicies the watch changed since the last build (by namespace and name), or all of
/// them (the list at the start and after a watch restarts).
#[derive(Debug, Default)]
struct PolicyChanges {
    all: bool,
    keys: BTreeSet<(String, String)>,
}

impl PolicyChanges {
    fn note(&mut self, event: &Event<KubeNetworkPolicy>) {
        match event {
            Event::Apply(p) | Event::Delete(p) => {
                let (namespace, name) = policy_ref(p);
                self.keys.insert((namespace.to_string(), name.to_string()));
            }
            Event::Init | Event::InitApply(_) | Event::InitDone => self.all = true,
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// What one build left out; goes into the health.
struct BuildReport {
    peers: PeersHealth,
    rejected: Vec<String>,
    unresolved: Vec<UnresolvedCgroup>,
    endpoints: usize,
    peer_endpoints: usize,
    policies: usize,
}

impl BuildReport {
    fn record(self, shared: &Shared, published: bool) {
        shared.health.send_modify(|health| {
            health.peers = self.peers;
            health.rejected = self.rejected;
            health.unresolved_cgroups = self.unresolved;
            health.endpoints = self.endpoints;
            health.peer_endpoints = self.peer_endpoints;
            health.policies = self.policies;
            if published {
                health.publications += 1;
            }
        });
    }
}

struct Unresolved {
    pod: String,
    reason: String,
    since: String,
    attempts: u64,
}

/// Turns the stores into the published inventory and policy set.
struct Builder {
    locator: CgroupLocator,
    /// This node's pods (local endpoints).
    pods: Store<Pod>,
    /// Every other node's pods, as peer records (peer-only endpoints).
    peers: Peers,
    namespaces: Store<Namespace>,
    policies: Store<KubeNetworkPolicy>,
    /// The policies the watch changed since the last build.
    policy_changes: Arc<Mutex<PolicyChanges>>,
    /// The policies published, by (namespace, name): the set is built from these, and only the
    /// changed ones are converted again.
    published_policies: BTreeMap<(String, String), Arc<NetworkPolicy>>,
    /// Why a policy is not published as it is (rejected; its last good version, if any, stays).
    policy_rejections: BTreeMap<(String, String), String>,
    /// Per policy key: the last version the segmentation parser accepted. A policy edited into
    /// something invalid keeps its previous meaning instead of vanishing (which would open up
    /// the pods it isolates).
    last_good_policies: BTreeMap<(String, String), (String, Arc<NetworkPolicy>)>,
    /// Pod UID -> cgroup path, once found (a pod's cgroup does not move).
    cgroups: BTreeMap<String, String>,
    unresolved: BTreeMap<String, Unresolved>,
    /// The generations published and what changed in each (by pod and namespace).
    log: ChangeLog,
}

impl Builder {
    /// `built` as the next publication after `current`, with its generation and changes; None
    /// when nothing differs (nothing to publish).
    fn next_publication(&mut self, current: &Inventory, mut built: Inventory) -> Option<Inventory> {
        if *current == built {
            return None;
        }
        self.log.record(ChangeSet::between(current, &built));
        built.history = Some(Arc::new(self.log.clone()));
        Some(built)
    }

    async fn run(
        mut self,
        shared: Arc<Shared>,
        inventory_tx: watch::Sender<Arc<Inventory>>,
        policies_tx: watch::Sender<PolicySet>,
        debounce: Duration,
        cgroup_retry: Duration,
    ) {
        loop {
            let retry = !self.unresolved.is_empty();
            tokio::select! {
                _ = shared.changed.notified() => {
                    if !debounce.is_zero() {
                        tokio::time::sleep(debounce).await;
                    }
                }
                _ = tokio::time::sleep(cgroup_retry), if retry => {}
            }
            // Off the runtime's two worker threads: a build copies and validates every peer,
            // and while it ran there the watch tasks could not read the events queued behind
            // it, so each build saw only the few changes that arrived in between.
            let current = inventory_tx.borrow().clone();
            let built = tokio::task::spawn_blocking(move || {
                let (inventory, policies, report) = self.build();
                let inventory = self.next_publication(&current, inventory);
                (self, (inventory, policies, report))
            })
            .await;
            let (inventory, policies, report) = match built {
                Ok((builder, built)) => {
                    self = builder;
                    built
                }
                // A panic in the build stays a panic of this task, as before; cancelled only at
                // shutdown.
                Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                Err(_) => return,
            };
            // The builder is the only sender: `current` is still what receivers see.
            let inventory_changed = inventory.map(|inventory| inventory_tx.send_replace(Arc::new(inventory))).is_some();
            let policies_changed = policies_tx.send_if_modified(|current| replace_if_different(current, policies));
            if inventory_changed || policies_changed {
                tracing::info!(
                    endpoints = report.endpoints,
                    peer_endpoints = report.peer_endpoints,
                    policies = report.policies,
                    unresolved_cgroups = report.unresolved.len(),
                    "Kubernetes inventory/policies published"
                );
            }
            report.record(&shared, inventory_changed || policies_changed);
        }
    }

    fn build(&mut self) -> (Inventory, PolicySet, BuildReport) {
        let mut rejected = Vec::new();
        let mut views: Vec<PodView> = self.pods.state().iter().filter_map(|pod| convert::pod_view(pod)).collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        let live: BTreeSet<&str> = views.iter().map(|v| v.uid.as_str()).collect();
        self.cgroups.retain(|uid, _| live.contains(uid.as_str()));
        self.unresolved.retain(|uid, _| live.contains(uid.as_str()));

        let mut endpoints = Vec::with_capacity(views.len());
        let mut local_keys = BTreeSet::new();
        for mut view in views {
            for note in &view.notes {
                rejected.push(format!("pod {}: {note}", view.key));
            }
            view.endpoint.cgroup = self.cgroup(&view);
            local_keys.insert(view.key.clone());
            endpoints.push(view.endpoint);
        }
        // Pods on other nodes, after the local ones: when an address clashes, the validator
        // leaves out the later endpoint, so a local pod is never displaced by a peer.
        // The peer store holds only pods scheduled on other nodes, sorted by key; a key also
        // seen here is skipped (a recreated pod's old copy).
        let peers = self.peers.collect(&local_keys, &mut endpoints, &mut rejected);
        let mut namespaces: Vec<_> = self.namespaces.state().iter().filter_map(|ns| convert::namespace_spec(ns)).collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        let (inventory, inventory_rejected) = convert::build_inventory(InventoryFile { namespaces, endpoints });
        rejected.extend(inventory_rejected);

        let changes = locked(&self.policy_changes, std::mem::take);
        if changes.all {
            // Listed again (the start, a watch restarted): every object looked at.
            let mut objects = self.policies.state();
            objects.sort_by(|a, b| policy_ref(a).cmp(&policy_ref(b)));
            let keys: BTreeSet<(String, String)> =
                objects.iter().map(|o| { let (ns, name) = policy_ref(o); (ns.to_string(), name.to_string()) }).collect();
            self.published_policies.retain(|key, _| keys.contains(key));
            self.policy_rejections.retain(|key, _| keys.contains(key));
            self.last_good_policies.retain(|key, _| keys.contains(key));
            for object in objects {
                self.convert_policy(&object);
            }
        } else {
            // Only what the watch changed: a policy event costs that policy, not the set.
            for (namespace, name) in changes.keys {
                let object = self.policies.get(&reflector::ObjectRef::new(&name).within(&namespace));
                let key = (namespace, name);
                match object {
                    Some(object) => self.convert_policy(&object),
                    None => {
                        self.published_policies.remove(&key);
                        self.policy_rejections.remove(&key);
                        self.last_good_policies.remove(&key);
                    }
                }
            }
        }
        rejected.extend(self.policy_rejections.values().cloned());
        let policies: Vec<Arc<NetworkPolicy>> = self.published_policies.values().cloned().collect();

        let unresolved = self
            .unresolved
            .iter()
            .map(|(uid, u)| UnresolvedCgroup {
                pod: u.pod.clone(),
                uid: uid.clone(),
                reason: u.reason.clone(),
                since: u.since.clone(),
                attempts: u.attempts,
            })
            .collect();
        let report = BuildReport {
            peers,
            rejected,
            unresolved,
            endpoints: inventory.endpoints.len(),
            peer_endpoints: inventory.endpoints.iter().filter(|e| e.peer_only).count(),
            policies: policies.len(),
        };
        (inventory, PolicySet { policies }, report)
    }

    /// Converts one NetworkPolicy object into what is published for it: the policy (the very
    /// one published before when its resourceVersion is the same), or, when the segmentation
    /// parser rejects it, its last good version with the rejection told.
    fn convert_policy(&mut self, object: &KubeNetworkPolicy) {
        let (namespace, name) = policy_ref(object);
        let key = (namespace.to_string(), name.to_string());
        let version = object.metadata.resource_version.as_deref().unwrap_or_default();
        if let Some((good_version, policy)) = self.last_good_policies.get(&key)
            && good_version == version
        {
            self.published_policies.insert(key.clone(), policy.clone());
            self.policy_rejections.remove(&key);
            return;
        }
        let shown = format!("{namespace}/{name}");
        match convert::network_policy(object).map(Arc::new) {
            Ok(policy) => {
                self.last_good_policies.insert(key.clone(), (version.to_string(), policy.clone()));
                self.published_policies.insert(key.clone(), policy);
                self.policy_rejections.remove(&key);
            }
            Err(error) => match self.last_good_policies.get(&key) {
                Some((_, previous)) => {
                    self.published_policies.insert(key.clone(), previous.clone());
                    self.policy_rejections.insert(key, format!("networkpolicy {shown}: {error}; its previous version stays in force"));
                }
                None => {
                    self.published_policies.remove(&key);
                    self.policy_rejections.insert(key, format!("networkpolicy {shown}: {error}; not enforced"));
                }
            },
        }
    }

    fn cgroup(&mut self, view: &PodView) -> Option<String> {
        if view.uid.is_empty() {
            return None;
        }
        if let Some(path) = self.cgroups.get(&view.uid) {
            return Some(path.clone());
        }
        let qos = QosClass::from_status(view.qos_class.as_deref());
        match self.locator.pod_cgroup(&view.uid, qos) {
            Ok(found) => {
                let missing: Vec<&String> = view.container_ids.iter().filter(|id| !found.containers.contains(id)).collect();
                if !missing.is_empty() {
                    tracing::debug!(pod = %view.key, ?missing, cgroup = %found.path, "containers not (yet) below the pod cgroup");
                }
                if let Some(previous) = self.unresolved.remove(&view.uid) {
                    tracing::info!(pod = %view.key, cgroup = %found.path, attempts = previous.attempts, "pod cgroup found");
                }
                self.cgroups.insert(view.uid.clone(), found.path.clone());
                Some(found.path)
            }
            Err(err) => {
                let entry = self.unresolved.entry(view.uid.clone()).or_insert_with(|| {
                    tracing::warn!(pod = %view.key, error = %err, "pod cgroup not found yet; retrying");
                    Unresolved {
                        pod: view.key.clone(),
                        reason: String::new(),
                        since: crate::time::format_unix_ns(now_ns()),
                        attempts: 0,
                    }
                });
                entry.attempts += 1;
                entry.reason = err.to_string();
                None
            }
        }
    }
}

fn replace_if_different<T: PartialEq>(current: &mut T, new: T) -> bool {
    if *current == new {
        false
    } else {
        *current = new;
        true
    }
}

/// Pods carrying the quarantine label, as the pod watcher last saw them.
#[derive(Clone)]
pub struct LabelledPods(Arc<Mutex<BTreeSet<String>>>);

impl LabelledPods {
    pub fn current(&self) -> BTreeSet<String> {
        self.0.lock().map(|set| set.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}
