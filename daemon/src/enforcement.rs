//! Keeps the segmentation datapath in step with the inventory and the policy files: compiles,
//! syncs the maps as a diff (adds before removes) and attaches the cgroup_skb programs to every
//! endpoint cgroup, with pinned links so enforcement outlives the daemon. Policy files load
//! document by document: a rejected document (or unreadable file) keeps the last good version of
//! what it held, the rest is enforced, and the status lists what was rejected. Peer-only endpoints (pods
//! on other nodes) are peers in the maps but never attached to: they have no cgroup here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use palisade_common::{MAP_SEG_EVENTS, PolicyVerdictEvent};
use serde::Serialize;

use crate::inventory::Inventory;
use crate::probes::host::{HostError, ProbeHost};
use crate::quarantine::datapath::{EscapeHooks, attach_escape_hooks};
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
    #[error("the datapath state lock was poisoned")]
    Poisoned,
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
    /// Lives on the eBPF owner task (jobs run there one at a time).
    datapath: Arc<Mutex<Datapath>>,
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
    pub status: EnforcementStatus,
}

impl Enforcer {
    /// Adopts what pinned maps already hold, syncs `policies` and attaches. `policy_paths` are
    /// what `reload_policies` re-reads (empty when policies come from the Kubernetes API);
    /// `policy_report` is what loading `policies` rejected or ignored (shown in the status);
    /// `capacity` the map entries the compiler may use (the maps' sizes, or less).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        host: ProbeHost,
        inventory: Inventory,
        policies: PolicySet,
        policy_report: PolicyReport,
        policy_paths: Vec<PathBuf>,
        pin_dir: PathBuf,
        cgroup_root: PathBuf,
        capacity: Capacity,
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
            datapath: Arc::new(Mutex::new(datapath)),
            host,
            policy_paths,
            pin_dir,
            cgroup_root,
            attached: BTreeSet::new(),
            policy_report,
            escape_hooks: Default::default(),
            attach_errors: Default::default(),
            status: EnforcementStatus::default(),
        };
        enforcer.apply().await?;
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

    pub async fn set_inventory(&mut self, inventory: Inventory) -> Result<SyncStats, EnforcementError> {
        self.segmentation.set_inventory(inventory);
        self.apply().await
    }

    /// Syncs the maps, then attaches programs to new endpoint cgroups and lets go of gone ones.
    async fn apply(&mut self) -> Result<SyncStats, EnforcementError> {
        let started = std::time::Instant::now();
        let compiled = self.segmentation.compiled().clone();
        let wanted: BTreeSet<PathBuf> = compiled
            .local_endpoints()
            .filter_map(|ep| ep.cgroup.as_ref())
            .map(|rel| self.cgroup_root.join(rel))
            .filter(|path| path.exists())
            .collect();
        let datapath = self.datapath.clone();
        let pin_dir = self.pin_dir.clone();
        let capacity = self.segmentation.capacity();
        let to_attach: Vec<PathBuf> = wanted.difference(&self.attached).cloned().collect();
        let to_release: Vec<PathBuf> = self.attached.difference(&wanted).cloned().collect();
        // Escape hooks for new cgroups, and again where the backstop is still missing.
        let mut to_hook: Vec<PathBuf> = to_attach.clone();
        to_hook.extend(
            self.escape_hooks.iter().filter(|(c, h)| h.backstop_pending() && wanted.contains(*c)).map(|(c, _)| c.clone()),
        );
        type Applied = (Result<SyncStats, DatapathError>, Vec<PathBuf>, Vec<(PathBuf, String)>, Vec<(PathBuf, EscapeHooks)>);
        let result = self
            .host
            .with(move |ebpf| -> Result<Applied, EnforcementError> {
                let mut datapath = datapath.lock().map_err(|_| EnforcementError::Poisoned)?;
                // Maps first: a newly attached program must find its allows already in place.
                // The sync adds before it removes; when the old and new POLICY entries together
                // do not fit, the allows that go away are dropped first (a moment of drops,
                // never of allows), so the sync never fails half way on a full map.
                let step = {
                    let held = datapath.policy_entries();
                    let union = held.len() + compiled.policy.keys().filter(|k| !held.contains_key(k)).count();
                    (union > capacity.policy).then(|| {
                        let mut step = compiled.clone();
                        step.policy.retain(|k, _| held.contains_key(k));
                        step
                    })
                };
                let sync = match &step {
                    Some(step) => datapath.sync(ebpf, step).and_then(|_| datapath.sync(ebpf, &compiled)),
                    None => datapath.sync(ebpf, &compiled),
                };
                // New endpoints are attached even when the sync failed: an unattached pod
                // passes everything, an attached one at least gets what was written.
                let mut attached = Vec::new();
                let mut failed = Vec::new();
                for cgroup in to_attach {
                    match datapath.attach_pinned(ebpf, &cgroup, &pin_dir) {
                        Ok(()) => attached.push(cgroup),
                        Err(err) => {
                            tracing::error!(cgroup = %cgroup.display(), %err, "attaching the datapath");
                            failed.push((cgroup, err.to_string()));
                        }
                    }
                }
                let hooks = to_hook
                    .into_iter()
                    .filter(|cgroup| !failed.iter().any(|(f, _)| f == cgroup))
                    .map(|cgroup| {
                        let hooks = attach_escape_hooks(ebpf, &cgroup, &pin_dir);
                        (cgroup, hooks)
                    })
                    .collect();
                Ok((sync, attached, failed, hooks))
            })
            .await?;
        let (sync, attached, failed, hooks) = match result {
            Ok(ok) => ok,
            Err(err) => {
                self.status.last_error = Some(err.to_string());
                return Err(err);
            }
        };
        for cgroup in &attached {
            self.attach_errors.remove(cgroup);
        }
        self.attached.extend(attached);
        self.attach_errors.extend(failed);
        self.escape_hooks.extend(hooks);
        let stats = match sync {
            Ok(stats) => stats,
            Err(err) => {
                self.status.attached_cgroups = self.attached.len();
                self.status.last_error = Some(err.to_string());
                return Err(err.into());
            }
        };
        for cgroup in to_release {
            release_pins(&self.pin_dir, &cgroup);
            self.attached.remove(&cgroup);
            self.escape_hooks.remove(&cgroup);
        }
        self.attach_errors.retain(|cgroup, _| wanted.contains(cgroup));
        let (unattached, escape_paths) = self.escape_status();
        let compiled = self.segmentation.compiled();
        self.status = EnforcementStatus {
            policy_paths: self.policy_paths.iter().map(|p| p.display().to_string()).collect(),
            policies: self.segmentation.policies().policies.len(),
            endpoints: compiled.endpoints.len(),
            peer_endpoints: compiled.endpoints.values().filter(|ep| ep.peer_only).count(),
            isolated_endpoints: compiled.endpoint_config.values().filter(|c| c.flags != 0).count(),
            policy_entries: compiled.policy.len(),
            attached_cgroups: self.attached.len(),
            unattached,
            escape_paths,
            last_sync: Some(format!("{stats:?}")),
            last_sync_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
            last_error: None,
            policy_report: self.policy_report.clone(),
            usage: compiled.usage,
            degraded: compiled.over_capacity.as_ref().map(|o| o.to_string()),
        };
        if let Some(over) = &compiled.over_capacity {
            tracing::error!(%over, "the policy set in force does not fit the maps: its pods are isolated, only the allows that fit are in");
        }
        tracing::info!(?stats, attached = self.attached.len(), "datapath synced");
        Ok(stats)
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
        let mut paths = EscapePaths { cgroup_skb: self.attached.len(), ..EscapePaths::default() };
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

/// Unpins the links of a cgroup that left the inventory (the kernel detaches them when the last
/// reference goes; a removed cgroup takes them along anyway).
fn release_pins(pin_dir: &Path, cgroup: &Path) {
    let Ok(id) = crate::probes::loader::cgroup_id(cgroup) else { return };
    for suffix in crate::quarantine::datapath::LINK_SUFFIXES {
        let _ = std::fs::remove_file(pin_dir.join(format!("{id}-{suffix}")));
    }
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
