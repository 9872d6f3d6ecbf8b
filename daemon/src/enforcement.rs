//! Keeps the segmentation datapath in step with the inventory and the policy files: compiles,
//! syncs the maps as a diff (adds before removes) and attaches the cgroup_skb programs to every
//! endpoint cgroup, with pinned links so enforcement outlives the daemon. Policy files load
//! document by document: a rejected document (or unreadable file) keeps the last good version of
//! what it held, the rest is enforced, and the status lists what was rejected. Peer-only endpoints (pods
//! on other nodes) are peers in the maps but never attached to: they have no cgroup here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use palisade_common::{CGROUP_ENDPOINT, CGROUP_EXEMPT, CGROUP_PARENT, CgroupValue, MAP_SEG_EVENTS, PolicyVerdictEvent};
use serde::Serialize;

use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::probes::host::{HostError, ProbeHost};
use crate::quarantine::datapath::{EscapeHooks, attach_backstop_hook, attach_escape_hooks, attach_socket_hooks};
use crate::segmentation::datapath::{Datapath, DatapathError, SyncStats};
use crate::segmentation::{Capacity, Compiled, PolicyError, PolicyReport, PolicySet, Segmentation, Usage};

#[derive(Debug, thiserror::Error)]
pub enum EnforcementError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("the datapath went to the eBPF owner task with a job and did not come back (the task stopped)")]
    DatapathLost,
}

/// What status shows about segmentation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnforcementStatus {
    pub policy_paths: Vec<String>,
    pub policies: usize,
    /// Compiled endpoints, peer-only ones included.
    pub endpoints: usize,
    /// Of those, peer-only endpoints (peers only: not attached, not isolated here).
    pub peer_endpoints: usize,
    pub isolated_endpoints: usize,
    pub policy_entries: usize,
    pub attached_cgroups: usize,
    /// Where the datapath is attached for every pod below it (new pods fail closed until their
    /// endpoint is written); None: attached per pod.
    pub pods_parent: Option<PodsParent>,
    /// Endpoints whose datapath, socket hooks or TC backstop are not (yet) attached, and why.
    pub unattached: Vec<Unattached>,
    /// What stops a quarantined pod's raw and packet sockets on this kernel (see
    /// docs/quarantine-coverage.md).
    pub escape_paths: EscapePaths,
    pub last_sync: Option<String>,
    pub last_sync_ms: Option<f64>,
    pub last_error: Option<String>,
    /// What the last policy load rejected, kept at its last good version, or ignored.
    pub policy_report: PolicyReport,
    /// Map entries the set in force needs, against the capacity.
    pub usage: Usage,
    /// The set in force does not fit (new pods pushed the last good set over, or the set on
    /// disk at start did not fit): its pods are isolated and only the allows that fit are in.
    pub degraded: Option<String>,
    /// Link pins of cgroups removed while no daemon ran, removed at start-up.
    pub stale_link_pins_removed: usize,
}

/// The pods parent, for status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PodsParent {
    pub cgroup: String,
    /// Its programs are attached (else pods are attached one by one, and `last_error` says why).
    pub attached: bool,
    /// Endpoints judged by the parent's programs.
    pub covered_endpoints: usize,
    /// Why its programs could not be attached.
    pub error: Option<String>,
}

/// What one `apply` did on the eBPF owner task.
struct Applied {
    sync: Result<SyncStats, DatapathError>,
    /// The parent's programs are in place (with its socket hooks' coverage).
    parent: Option<EscapeHooks>,
    parent_error: Option<String>,
    attached: Vec<PathBuf>,
    covered: Vec<PathBuf>,
    failed: Vec<(PathBuf, String)>,
    hooks: Vec<(PathBuf, EscapeHooks)>,
    backstops: Vec<(PathBuf, Result<String, String>)>,
    /// The map sync's time (the POLICY, IPCACHE, endpoint and cgroup maps).
    map_sync: std::time::Duration,
}

impl Applied {
    fn new(sync: Result<SyncStats, DatapathError>) -> Applied {
        Applied {
            sync,
            parent: None,
            parent_error: None,
            attached: Vec::new(),
            covered: Vec::new(),
            failed: Vec::new(),
            hooks: Vec::new(),
            backstops: Vec::new(),
            map_sync: std::time::Duration::ZERO,
        }
    }
}

/// One endpoint part that is not enforced, for status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Unattached {
    pub cgroup: String,
    /// `datapath` (cgroup_skb), `raw_ip_sockets`, `packet_sockets` or `backstop`.
    pub what: &'static str,
    pub why: String,
}

/// Coverage of a quarantined pod's ways out, over the attached endpoints.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EscapePaths {
    /// IP packets of every socket kind, unparsable ones and neighbour discovery included.
    pub cgroup_skb: usize,
    /// Raw IP sockets refused at creation (cgroup/sock_create).
    pub raw_ip_sockets_refused: usize,
    /// Packet sockets refused at creation (lsm_cgroup/socket_post_create; needs the BPF LSM).
    pub packet_sockets_refused: usize,
    /// Frames no cgroup hook sees (packet sockets, kernel-made ARP/ND) dropped on the pod's
    /// host-side interface.
    pub tc_backstop: usize,
}

pub struct Enforcer {
    segmentation: Segmentation,
    /// The maps' contents as last written. It travels with each job to the eBPF owner task and
    /// comes back with the job's result, so one owner holds it at a time and no lock guards it
    /// (None only while a job has it, or after the owner task stopped with it).
    datapath: Option<Datapath>,
    host: ProbeHost,
    policy_paths: Vec<PathBuf>,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    attached: BTreeSet<PathBuf>,
    policy_report: PolicyReport,
    /// The escape-path hooks of each attached cgroup (the backstop is retried at every sync
    /// until it is in place).
    escape_hooks: std::collections::BTreeMap<PathBuf, EscapeHooks>,
    /// Cgroups the cgroup_skb programs could not be attached to, and why.
    attach_errors: std::collections::BTreeMap<PathBuf, String>,
    /// Where the datapath is attached once for every pod below it (the lab's pods parent,
    /// kubepods), so a new pod is judged from its first packet: an unknown cgroup below it gets
    /// the fail-closed default until its endpoint is written. Pods outside it are attached one
    /// by one.
    pods_parent: Option<PathBuf>,
    /// The parent's programs are attached (pinned); its socket-creation hooks' coverage.
    parent_attached: Option<EscapeHooks>,
    parent_error: Option<String>,
    /// Cgroups below the parent that are not pods (the daemon's own): judged by address.
    exempt_cgroups: Vec<PathBuf>,
    /// Endpoint cgroups covered by the parent's programs.
    covered: BTreeSet<PathBuf>,
    /// The cgroup id each attached or covered cgroup's link pins are named by, recorded when it
    /// was attached: a cgroup removed before its endpoint leaves the inventory has no id to read
    /// any more, and its pins must still go.
    link_ids: BTreeMap<PathBuf, u64>,
    pub status: EnforcementStatus,
    /// Where each map sync's time goes (`map_sync_seconds{map="segmentation"}`).
    metrics: Option<Metrics>,
}

impl Enforcer {
    /// Adopts what pinned maps already hold, syncs `policies` and attaches. `policy_paths` are
    /// what `reload_policies` re-reads (empty when policies come from the Kubernetes API);
    /// `policy_report` is what loading `policies` rejected or ignored (shown in the status);
    /// `capacity` the map entries the compiler may use (the maps' sizes, or less); `pods_parent`
    /// the cgroup (absolute) to attach the datapath at for every pod below it (None: per pod);
    /// `metrics` receives each map sync's time.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        host: ProbeHost,
        inventory: Arc<Inventory>,
        policies: PolicySet,
        policy_report: PolicyReport,
        policy_paths: Vec<PathBuf>,
        pin_dir: PathBuf,
        cgroup_root: PathBuf,
        capacity: Capacity,
        pods_parent: Option<PathBuf>,
        metrics: Option<Metrics>,
    ) -> Result<Enforcer, EnforcementError> {
        let segmentation = Segmentation::with_capacity(inventory, policies, capacity);
        let datapath = host
            .with(|ebpf| {
                let datapath = Datapath::adopt(ebpf)?;
                Datapath::set_denied_events(ebpf, true, palisade_common::DENY_EVENTS_PER_WINDOW)?;
                Ok::<_, DatapathError>(datapath)
            })
            .await??;
        let mut enforcer = Enforcer {
            segmentation,
            datapath: Some(datapath),
            host,
            policy_paths,
            pin_dir,
            cgroup_root,
            attached: BTreeSet::new(),
            policy_report,
            escape_hooks: Default::default(),
            attach_errors: Default::default(),
            exempt_cgroups: pods_parent.as_deref().map(own_cgroups_below).unwrap_or_default(),
            pods_parent,
            parent_attached: None,
            parent_error: None,
            covered: BTreeSet::new(),
            link_ids: BTreeMap::new(),
            status: EnforcementStatus::default(),
            metrics,
        };
        enforcer.apply().await?;
        // Pins of cgroups removed while no daemon ran (their links hold dead cgroups).
        let removed = remove_stale_link_pins(&enforcer.pin_dir, &live_cgroup_ids(&enforcer.cgroup_root));
        if removed > 0 {
            tracing::info!(removed, pin_dir = %enforcer.pin_dir.display(), "removed the link pins of cgroups that no longer exist");
        }
        enforcer.status.stale_link_pins_removed = removed;
        Ok(enforcer)
    }

    pub fn compiled(&self) -> &Compiled {
        self.segmentation.compiled()
    }

    /// Re-reads the policy files document by document and syncs: every valid policy, the last
    /// good version of each rejected one. The report says what was rejected, kept and ignored.
    pub async fn reload_policies(&mut self) -> Result<(SyncStats, PolicyReport), EnforcementError> {
        self.policy_report = self.segmentation.load_policies(&self.policy_paths);
        let stats = self.apply().await?;
        Ok((stats, self.policy_report.clone()))
    }

    /// The file cache of the load that gave the policies in force (see
    /// [`Segmentation::set_policy_file_cache`]).
    pub fn set_policy_file_cache(&mut self, cache: crate::segmentation::policy::PolicyFileCache) {
        self.segmentation.set_policy_file_cache(cache);
    }

    /// [`Enforcer::reload_policies`] after the directory watcher reported changes to the
    /// entries `changed`: only those are looked at again when that gives the same result
    /// ([`Segmentation::load_policies_changed`]).
    pub async fn reload_policies_changed(&mut self, changed: &[PathBuf]) -> Result<(SyncStats, PolicyReport), EnforcementError> {
        self.policy_report = self.segmentation.load_policies_changed(&self.policy_paths, changed);
        let stats = self.apply().await?;
        Ok((stats, self.policy_report.clone()))
    }

    /// Puts an already validated policy set in force (the Kubernetes source validates each
    /// object and keeps the last good version of one that breaks).
    /// A set that does not fit the maps is rejected as a whole (logged, in the status) and the
    /// last good set stays.
    pub async fn set_policies(&mut self, policies: PolicySet) -> Result<SyncStats, EnforcementError> {
        self.policy_report.over_capacity = match self.segmentation.try_set_policies(policies) {
            Ok(_) => None,
            Err(over) => {
                tracing::error!(%over, "policy set rejected: over capacity; the last good set stays");
                Some(over.to_string())
            }
        };
        self.apply().await
    }

    /// Compiles against a new inventory (shared with the endpoint table: not copied) and syncs.
    pub async fn set_inventory(&mut self, inventory: Arc<Inventory>) -> Result<SyncStats, EnforcementError> {
        self.segmentation.set_inventory(inventory);
        self.apply().await
    }

    /// Syncs the maps, then attaches programs to new endpoint cgroups and lets go of gone ones.
    async fn apply(&mut self) -> Result<SyncStats, EnforcementError> {
        let started = std::time::Instant::now();
        let compiled = self.segmentation.compiled_shared();
        let parent = self.pods_parent.clone().filter(|p| p.exists());
        let wanted = self.wanted_cgroups(&compiled, parent.as_deref());
        let datapath = self.datapath.take().ok_or(EnforcementError::DatapathLost)?;
        let plan = KernelPlan {
            compiled,
            policy_capacity: self.segmentation.capacity().policy,
            cgroup_entries: wanted.entries.clone(),
            parent: parent.clone(),
            parent_before: self.parent_attached.clone(),
            pin_dir: self.pin_dir.clone(),
            new_cgroups: wanted.paths.iter().filter(|c| !self.attached.contains(*c) && !self.covered.contains(*c)).cloned().collect(),
            // Per pod or through the parent: either way not attached again.
            backstop_pending: self
                .escape_hooks
                .iter()
                .filter(|(c, h)| h.backstop_pending() && wanted.paths.contains(*c) && (self.attached.contains(*c) || self.covered.contains(*c)))
                .map(|(c, _)| c.clone())
                .collect(),
        };
        let (datapath, applied) = self.host.with(move |ebpf| plan.run(ebpf, datapath)).await?;
        self.datapath = Some(datapath);
        if let Some(metrics) = &self.metrics {
            metrics.observe_map_sync("segmentation", applied.map_sync);
        }
        let stats = self.take_applied(applied, &wanted, parent.as_deref())?;
        self.refresh_status(&stats, started);
        tracing::info!(?stats, attached = self.attached.len(), covered_by_parent = self.covered.len(), "datapath synced");
        Ok(stats)
    }

    /// The endpoint cgroups the compiled set wants attached and the SEG_CGROUPS entries: local
    /// endpoints with a cgroup here, the exempt cgroups and the pods parent.
    fn wanted_cgroups(&self, compiled: &Compiled, parent: Option<&Path>) -> WantedCgroups {
        let mut wanted = WantedCgroups::default();
        for ep in compiled.local_endpoints() {
            let Some(rel) = ep.cgroup.as_ref() else { continue };
            let path = self.cgroup_root.join(rel.trim_start_matches('/'));
            let Ok(id) = crate::sys::cgroup_id(&path) else { continue };
            wanted.entries.insert(id, CgroupValue { kind: CGROUP_ENDPOINT, endpoint_id: ep.id });
            wanted.ids.insert(path.clone(), id);
            wanted.paths.insert(path);
        }
        if let Some(parent) = parent {
            for exempt in &self.exempt_cgroups {
                if let Ok(id) = crate::sys::cgroup_id(exempt) {
                    wanted.entries.entry(id).or_insert(CgroupValue { kind: CGROUP_EXEMPT, endpoint_id: 0 });
                }
            }
            if let Ok(id) = crate::sys::cgroup_id(parent) {
                wanted.entries.insert(id, CgroupValue { kind: CGROUP_PARENT, endpoint_id: 0 });
            }
        }
        wanted
    }

    /// Takes in what the kernel step did: attachments, hooks and backstops recorded; after a
    /// good sync the links of gone cgroups are let go, and per-pod links of pods the parent now
    /// covers (an older run's) once the parent's are in place.
    fn take_applied(&mut self, applied: Applied, wanted: &WantedCgroups, parent: Option<&Path>) -> Result<SyncStats, EnforcementError> {
        self.parent_attached = applied.parent.clone();
        self.parent_error = applied.parent_error.clone();
        let below = |path: &Path| parent.is_some_and(|p| path.starts_with(p) && path != p);
        let to_release: Vec<PathBuf> = self.attached.iter().filter(|c| !wanted.paths.contains(*c)).cloned().collect();
        let migrated: Vec<PathBuf> = match &self.parent_attached {
            Some(_) => self.attached.iter().filter(|c| wanted.paths.contains(*c) && below(c)).cloned().collect(),
            None => Vec::new(),
        };
        let Applied { sync, attached, covered, failed, hooks, backstops, .. } = applied;
        for cgroup in attached.iter().chain(&covered) {
            self.attach_errors.remove(cgroup);
            if let Some(id) = wanted.ids.get(cgroup) {
                self.link_ids.insert(cgroup.clone(), *id);
            }
        }
        self.attached.extend(attached);
        self.covered.extend(covered);
        self.attach_errors.extend(failed);
        self.escape_hooks.extend(hooks);
        for (cgroup, outcome) in backstops {
            if let Some(h) = self.escape_hooks.get_mut(&cgroup) {
                h.set_backstop(outcome);
            }
        }
        let stats = match sync {
            Ok(stats) => stats,
            Err(err) => {
                self.status.attached_cgroups = self.attached.len() + self.covered.len();
                self.status.last_error = Some(err.to_string());
                return Err(err.into());
            }
        };
        for cgroup in to_release {
            release_pins(&self.pin_dir, &cgroup, self.link_ids.remove(&cgroup));
            self.attached.remove(&cgroup);
            self.escape_hooks.remove(&cgroup);
        }
        for cgroup in migrated {
            release_datapath_pins(&self.pin_dir, &cgroup, self.link_ids.get(&cgroup).copied());
            self.attached.remove(&cgroup);
            self.covered.insert(cgroup);
        }
        let gone: Vec<PathBuf> = self.covered.iter().filter(|c| !wanted.paths.contains(*c)).cloned().collect();
        for cgroup in gone {
            release_pins(&self.pin_dir, &cgroup, self.link_ids.remove(&cgroup));
            self.covered.remove(&cgroup);
            self.escape_hooks.remove(&cgroup);
        }
        self.attach_errors.retain(|cgroup, _| wanted.paths.contains(cgroup));
        Ok(stats)
    }

    /// The status after a good sync.
    fn refresh_status(&mut self, stats: &SyncStats, started: std::time::Instant) {
        let (unattached, escape_paths) = self.escape_status();
        let compiled = self.segmentation.compiled();
        self.status = EnforcementStatus {
            policy_paths: self.policy_paths.iter().map(|p| p.display().to_string()).collect(),
            policies: self.segmentation.policies().policies.len(),
            endpoints: compiled.endpoints.len(),
            peer_endpoints: compiled.endpoints.values().filter(|ep| ep.peer_only).count(),
            isolated_endpoints: compiled.endpoint_config.values().filter(|c| c.flags != 0).count(),
            policy_entries: compiled.policy.len(),
            attached_cgroups: self.attached.len() + self.covered.len(),
            pods_parent: self.pods_parent.as_ref().map(|p| PodsParent {
                cgroup: p.display().to_string(),
                attached: self.parent_attached.is_some(),
                covered_endpoints: self.covered.len(),
                error: self.parent_error.clone(),
            }),
            unattached,
            escape_paths,
            last_sync: Some(format!("{stats:?}")),
            last_sync_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            last_error: None,
            policy_report: self.policy_report.clone(),
            usage: compiled.usage,
            degraded: compiled.over_capacity.as_ref().map(|o| o.to_string()),
            stale_link_pins_removed: self.status.stale_link_pins_removed,
        };
        if let Some(over) = &compiled.over_capacity {
            tracing::error!(%over, "the policy set in force does not fit the maps: its pods are isolated, only the allows that fit are in");
        }
    }
}

/// The endpoint cgroups a compiled set wants, from [`Enforcer::wanted_cgroups`].
#[derive(Default)]
struct WantedCgroups {
    /// SEG_CGROUPS: endpoint, exempt and parent cgroups by id.
    entries: BTreeMap<u64, CgroupValue>,
    /// The endpoint cgroups to attach (or cover through the parent).
    paths: BTreeSet<PathBuf>,
    ids: BTreeMap<PathBuf, u64>,
}

/// What one sync does in the kernel, run on the probe host's thread (which owns the loaded
/// object): the maps, the parent's programs, new endpoints' programs, missing backstops.
struct KernelPlan {
    compiled: Arc<Compiled>,
    policy_capacity: usize,
    cgroup_entries: BTreeMap<u64, CgroupValue>,
    /// The pods parent, when it exists.
    parent: Option<PathBuf>,
    /// The parent's hooks when its programs are already in place.
    parent_before: Option<EscapeHooks>,
    pin_dir: PathBuf,
    /// Endpoint cgroups neither attached nor covered by the parent yet.
    new_cgroups: Vec<PathBuf>,
    /// Attached or covered cgroups whose backstop is still missing.
    backstop_pending: Vec<PathBuf>,
}

impl KernelPlan {
    fn run(self, ebpf: &mut Ebpf, mut datapath: Datapath) -> (Datapath, Applied) {
        let KernelPlan { compiled, policy_capacity, cgroup_entries, parent, parent_before, pin_dir, new_cgroups, backstop_pending } = self;
        // Maps first: a newly attached program must find its allows already in place.
        // The sync adds before it removes; when the old and new POLICY entries together
        // do not fit, the allows that go away are dropped first (a moment of drops,
        // never of allows), so the sync never fails half way on a full map.
        let step = (datapath.policy_union_len(&compiled) > policy_capacity).then(|| {
            let held = datapath.policy_entries();
            let mut step = Compiled::clone(&compiled);
            step.policy.retain(|k, _| held.contains_key(k));
            // Cut down by hand: synced by comparing every entry.
            step.sync = Default::default();
            step
        });
        let sync_started = std::time::Instant::now();
        let mut sync = match &step {
            Some(step) => datapath.sync(ebpf, step).and_then(|_| datapath.sync(ebpf, &compiled)),
            None => datapath.sync(ebpf, &compiled),
        };
        // Then which cgroups are endpoints: a pod below the parent turns from the
        // fail-closed default to its policy only once its maps are in (so not after a
        // failed sync).
        if sync.is_ok() {
            if let Err(err) = datapath.sync_cgroups(ebpf, &cgroup_entries) {
                sync = Err(err);
            }
        }
        let mut applied = Applied::new(sync);
        applied.map_sync = sync_started.elapsed();
        // The parent: attached (pinned, adopted when already there) before any per-pod
        // link below it is let go.
        if let Some(parent) = &parent {
            applied.parent = match parent_before {
                Some(hooks) => Some(hooks),
                None => attach_parent(ebpf, &mut datapath, parent, &pin_dir, &mut applied.parent_error),
            };
        }
        let parent_in_place = applied.parent.is_some();
        let covered_by_parent =
            |path: &Path| parent_in_place && parent.as_ref().is_some_and(|p| path.starts_with(p) && path != p);
        // New endpoints are attached even when the sync failed: an unattached pod
        // passes everything, an attached one at least gets what was written.
        for cgroup in new_cgroups {
            if covered_by_parent(&cgroup) {
                let mut hooks = applied.parent.clone().unwrap_or_default();
                hooks.set_backstop(attach_backstop_hook(ebpf, &cgroup, &pin_dir));
                applied.hooks.push((cgroup.clone(), hooks));
                applied.covered.push(cgroup);
                continue;
            }
            match datapath.attach_pinned(ebpf, &cgroup, &pin_dir) {
                Ok(()) => {
                    applied.hooks.push((cgroup.clone(), attach_escape_hooks(ebpf, &cgroup, &pin_dir)));
                    applied.attached.push(cgroup);
                }
                Err(err) => {
                    tracing::error!(cgroup = %cgroup.display(), %err, "attaching the datapath");
                    applied.failed.push((cgroup, err.to_string()));
                }
            }
        }
        // The backstop again where it is still missing.
        for cgroup in backstop_pending {
            let outcome = attach_backstop_hook(ebpf, &cgroup, &pin_dir);
            applied.backstops.push((cgroup, outcome));
        }
        (datapath, applied)
    }
}

/// Attaches the datapath and the socket hooks at the pods parent (`None` and the error kept
/// when the datapath cannot be attached there: pods are then attached one by one).
fn attach_parent(ebpf: &mut Ebpf, datapath: &mut Datapath, parent: &Path, pin_dir: &Path, error: &mut Option<String>) -> Option<EscapeHooks> {
    match datapath.attach_pinned(ebpf, parent, pin_dir) {
        Ok(()) => {
            let hooks = attach_socket_hooks(ebpf, parent, pin_dir);
            tracing::info!(parent = %parent.display(), "datapath attached at the pods parent: new pods are judged from their first packet");
            Some(hooks)
        }
        Err(err) => {
            tracing::error!(parent = %parent.display(), %err, "attaching the datapath at the pods parent; attaching per pod");
            *error = Some(err.to_string());
            None
        }
    }
}

impl Enforcer {
    /// What is not attached and why; what covers the escape paths.
    fn escape_status(&self) -> (Vec<Unattached>, EscapePaths) {
        let mut unattached: Vec<Unattached> = self
            .attach_errors
            .iter()
            .map(|(c, why)| Unattached { cgroup: c.display().to_string(), what: "datapath", why: why.clone() })
            .collect();
        let mut paths = EscapePaths { cgroup_skb: self.attached.len() + self.covered.len(), ..EscapePaths::default() };
        for (cgroup, hooks) in &self.escape_hooks {
            for (what, missing, covered) in [
                ("raw_ip_sockets", &hooks.raw_ip_sockets, &mut paths.raw_ip_sockets_refused),
                ("packet_sockets", &hooks.packet_sockets, &mut paths.packet_sockets_refused),
                ("backstop", &hooks.backstop, &mut paths.tc_backstop),
            ] {
                match missing {
                    None => *covered += 1,
                    Some(why) => unattached.push(Unattached { cgroup: cgroup.display().to_string(), what, why: why.clone() }),
                }
            }
        }
        (unattached, paths)
    }
}

/// Unpins a pod's own cgroup_skb and socket-creation links (the parent's now cover it); its TC
/// backstop stays.
fn release_datapath_pins(pin_dir: &Path, cgroup: &Path, recorded: Option<u64>) {
    let Some(id) = recorded.or_else(|| crate::sys::cgroup_id(cgroup).ok()) else { return };
    for suffix in ["ingress", "egress", "inet-sock-create", "sock-create"] {
        let _ = std::fs::remove_file(pin_dir.join(format!("{id}-{suffix}")));
    }
}

/// This process's cgroups below `parent` (a daemon running in a pod below kubepods): exempt
/// from the fail-closed default, which would otherwise cut its own API traffic.
fn own_cgroups_below(parent: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return Vec::new() };
    let Some(mount) = crate::sys::cgroup2_mount().ok() else { return Vec::new() };
    text.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .map(|rel| mount.join(rel.trim_start_matches('/')))
        .filter(|p| p.starts_with(parent) && p != parent)
        .collect()
}

/// Unpins the links of a cgroup that left the inventory (the kernel detaches them when the last
/// reference goes). The pins are named by the cgroup id recorded at attach (`recorded`): the
/// cgroup may be gone already, and a removed cgroup's links stay pinned (and its id unreadable)
/// until their pins are removed.
fn release_pins(pin_dir: &Path, cgroup: &Path, recorded: Option<u64>) {
    let Some(id) = recorded.or_else(|| crate::probes::loader::cgroup_id(cgroup).ok()) else {
        tracing::warn!(cgroup = %cgroup.display(), "no cgroup id recorded or readable: its link pins (if any) go at the next start");
        return;
    };
    for suffix in crate::quarantine::datapath::LINK_SUFFIXES {
        let _ = std::fs::remove_file(pin_dir.join(format!("{id}-{suffix}")));
    }
}

/// How many cgroup directories `live_cgroup_ids` reads at most (a node has a few thousand).
const MAX_CGROUPS_WALKED: usize = 1_000_000;

/// The ids (inode numbers) of every cgroup below the cgroup2 mount `root`.
fn live_cgroup_ids(root: &Path) -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        ids.insert(meta.ino());
        if ids.len() >= MAX_CGROUPS_WALKED {
            tracing::warn!(walked = ids.len(), "cgroup walk stopped at its bound");
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    ids
}

/// Removes the link pins (`<cgroup id>-<suffix>`) under `pin_dir` whose cgroup is not in `live`:
/// links of a cgroup removed while no daemon ran, which nothing else would ever unpin. Returns
/// how many went. A walk that stopped at its bound keeps everything (it cannot tell).
fn remove_stale_link_pins(pin_dir: &Path, live: &BTreeSet<u64>) -> usize {
    if live.is_empty() || live.len() >= MAX_CGROUPS_WALKED {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, suffix)) = name.split_once('-') else { continue };
        let Ok(id) = id.parse::<u64>() else { continue };
        if !crate::quarantine::datapath::LINK_SUFFIXES.contains(&suffix) || live.contains(&id) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(err) => tracing::warn!(pin = %entry.path().display(), %err, "removing a stale link pin"),
        }
    }
    removed
}

/// Takes the policy-verdict ring buffer out of the object for its reader.
pub async fn take_verdict_ring(host: &ProbeHost) -> Result<RingBuf<MapData>, EnforcementError> {
    host.with(|ebpf| {
        let map = ebpf.take_map(MAP_SEG_EVENTS).ok_or(DatapathError::MissingMap { name: MAP_SEG_EVENTS })?;
        RingBuf::try_from(map).map_err(|source| DatapathError::Map { name: MAP_SEG_EVENTS, source })
    })
    .await?
    .map_err(EnforcementError::from)
}

/// Reads denied-flow records and hands each to `on_verdict`.
pub async fn read_verdicts(ring: RingBuf<MapData>, mut on_verdict: impl FnMut(PolicyVerdictEvent) + Send) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match crate::segmentation::datapath::decode_verdict(&item) {
                Some(verdict) => on_verdict(verdict),
                None => tracing::warn!(len = item.len(), "malformed policy verdict record"),
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_of_cgroups_that_are_gone_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("palisade-stale-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let names = ["7-ingress", "7-egress", "7-backstop-to-pod", "8-ingress", "8-sock-create", "9-other", "SEG_POLICY", "x-ingress"];
        for name in names {
            std::fs::write(dir.join(name), b"").expect("pin stand-in");
        }
        let live: BTreeSet<u64> = [8, 1].into_iter().collect();
        assert_eq!(remove_stale_link_pins(&dir, &live), 3, "cgroup 7's three link pins");
        let mut left: Vec<String> = std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["8-ingress", "8-sock-create", "9-other", "SEG_POLICY", "x-ingress"]);
        assert_eq!(remove_stale_link_pins(&dir, &BTreeSet::new()), 0, "an empty walk (no mount read) removes nothing");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
