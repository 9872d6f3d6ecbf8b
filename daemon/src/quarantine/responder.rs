//! The responder: turns rule findings into quarantine decisions, applies them to the datapath
//! before reporting them, keeps the quarantine set on disk, and reconciles it at start-up.
//!
//! Over a rate limit a quarantine is queued, never dropped: [`Responder::apply_due`] applies the
//! queue as the token buckets refill (the daemon's queue worker calls it and alerts each
//! outcome), and an operator can cancel a queued quarantine. Nothing latches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_common::QuarantineValue;
use serde::Serialize;

use super::datapath::{DatapathError, ForensicsEntry, QuarantineDatapath};
use super::policy::{Enforcement, RateLimitStatus, RateLimiter, ResponsePolicy};
use super::state::{self, PendingQuarantine, QuarantineRecord, StateError, StateFile, StateWriter};
use super::observed::{DryRunBook, DryRunRecord, QuarantineDrops};
use crate::endpoints::{CgroupId, EndpointId, EndpointTable, Placement, PodKey};
use crate::time::{format_unix_ns, monotonic_now_ns};
use crate::inventory::Inventory;
use crate::rules::{Action, RuleHit};

#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("{pod} is not quarantined")]
    NotQuarantined { pod: String },
    #[error("{pod} is not quarantined yet: its quarantine is queued by the rate limit (cancel it with `palisade quarantine cancel {pod}`)")]
    Pending { pod: String },
    #[error("{pod} has no queued quarantine")]
    NotPending { pod: String },
    #[error("{pod} is already quarantined (since {since}, alert {alert_id})")]
    AlreadyQuarantined { pod: String, since: String, alert_id: String },
    #[error("{pod}: {reason}")]
    Refused { pod: String, reason: String },
    #[error("pod must be NAMESPACE/NAME, got {0:?}")]
    BadPodName(String),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("quarantine state: {0}")]
    State(#[from] StateError),
    #[error("response policy: {0}")]
    Policy(String),
}

/// One rule finding about one pod, as the finding stage hands it over.
#[derive(Debug, Clone)]
pub struct Finding {
    pub hit: RuleHit,
    pub namespace: String,
    pub name: String,
    /// The id of the alert this finding becomes, so the alert and the quarantine name each other.
    pub alert_id: String,
}

/// What was done about a finding: the alert's own outcome type, so the decision goes into the
/// alert as it is. The responder produces `Alerted`, `Quarantined`, `AlreadyQuarantined`,
/// `Pending` (queued by a rate limit: NOT enforced yet, applied as the limit allows),
/// `WouldQuarantine`, `Suppressed` and `Failed` (the datapath refused the update, or the pod
/// cannot be located: NOT enforced).
pub use crate::alerts::Outcome;

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub outcome: Outcome,
    pub reason: String,
    pub pod: String,
    pub rule_id: String,
    pub alert_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// CLOCK_MONOTONIC ns at which the map update had returned (`quarantined` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_at_ns: Option<u64>,
    /// Something went wrong after enforcement (e.g. the state file could not be written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// `pending`: about how long until the rate limit lets it through (queue order aside).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_in_seconds: Option<f64>,
}

/// What became of a queued quarantine (from [`Responder::apply_due`]): applied (`quarantined`,
/// or `failed`), or ended without a token because things changed while it waited
/// (`already_quarantined`, `would_quarantine` after dry run was turned on, `suppressed` for a
/// namespace protected meanwhile, `failed` for a pod that left).
#[derive(Debug, Clone, Serialize)]
pub struct QueueOutcome {
    pub decision: Decision,
    pub queued: PendingQuarantine,
    pub queued_for_seconds: f64,
}

/// The audit record of a cancelled queued quarantine.
#[derive(Debug, Clone, Serialize)]
pub struct CancelRecord {
    pub pod: String,
    pub rule_id: String,
    pub alert_id: String,
    pub queued_at: String,
    pub cancelled_at: String,
    pub queued_for_seconds: f64,
    pub reason: String,
    pub by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The audit record of a release.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseRecord {
    pub pod: String,
    pub cgroup_id: u64,
    pub rule_id: String,
    pub alert_id: String,
    pub since: String,
    pub released_at: String,
    pub quarantined_for_seconds: f64,
    pub reason: String,
    pub by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A quarantine that ended without a release (its endpoint left the inventory, or it was stale).
#[derive(Debug, Clone, Serialize)]
pub struct Removal {
    pub record: QuarantineRecord,
    pub reason: String,
    pub at: String,
}

/// What start-up reconciliation did; the daemon logs it and writes the removals as alerts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Adoption {
    /// From the state file, still in force.
    pub adopted: Vec<QuarantineRecord>,
    /// In the map but not in the file (e.g. a crash between map update and file write): kept,
    /// failing closed.
    pub recovered_from_map: Vec<QuarantineRecord>,
    /// In the file but missing from the map (e.g. maps were not pinned): set again.
    pub reapplied: Vec<String>,
    pub removed: Vec<Removal>,
    /// Queued quarantines from the state file, applied as the rate limit allows.
    pub pending: Vec<PendingQuarantine>,
    /// Map entries of cgroups no endpoint has; cleared.
    pub stale_map_entries: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file_problem: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub quarantined: u64,
    pub already_quarantined: u64,
    pub would_quarantine: u64,
    pub suppressed: u64,
    pub failed: u64,
    pub released: u64,
    pub removed: u64,
    /// Held back by a rate limit and queued.
    pub queued: u64,
    /// Applied from the queue.
    pub applied_from_queue: u64,
    /// Queued quarantines an operator cancelled.
    pub cancelled: u64,
    /// State file writes that failed (each logged; the pinned map stays the source of truth).
    pub state_write_errors: u64,
    /// Dry-run records pushed out by their bound ([`super::observed::MAX_DRY_RUN_RECORDS`]).
    pub dry_run_evicted: u64,
}

/// How the state file is written after a rule's quarantine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateWrites {
    /// Handed to the background writer: the finding path never waits for the disk (default).
    #[default]
    Background,
    /// Written and fsynced before the finding returns (what palisade did before; kept for the
    /// latency benchmark's side-by-side figures).
    Synchronous,
}

/// For `palisade status`.
#[derive(Debug, Clone, Serialize)]
pub struct ResponderStatus {
    pub quarantined: usize,
    pub dry_run: bool,
    pub rule_modes: BTreeMap<String, super::policy::RuleMode>,
    pub protected_namespaces: Vec<String>,
    pub rate_limit: RateLimitStatus,
    /// Quarantines queued by the rate limit (not enforced yet).
    pub pending: usize,
    /// Quarantines dry run held back (listed as `dry-run`).
    pub dry_run_records: usize,
    /// The oldest queued quarantine's wait so far.
    pub oldest_pending_seconds: Option<f64>,
    pub forensics_exceptions: usize,
    pub counters: Counters,
}

#[derive(Debug, Clone)]
pub struct ResponderConfig {
    pub state_dir: PathBuf,
    /// The cgroup2 mount; inventory cgroup paths are relative to it.
    pub cgroup_root: PathBuf,
    pub policy: ResponsePolicy,
}

/// A pod about to be quarantined, located.
struct Target {
    pod: String,
    namespace: String,
    name: String,
    cgroup: String,
    cgroup_id: u64,
    rule_id: String,
    alert_id: String,
    message: String,
}

/// Where a local pod with a cgroup lives, from the endpoint table.
#[derive(Debug, Clone)]
struct Located {
    cgroup: String,
    /// None while the cgroup directory does not exist.
    cgroup_id: Option<u64>,
}

pub struct Responder<D: QuarantineDatapath> {
    datapath: D,
    state_dir: PathBuf,
    /// Only for [`Responder::set_inventory`] (callers without an endpoints stage).
    cgroup_root: PathBuf,
    policy: ResponsePolicy,
    /// By pod key.
    records: BTreeMap<String, QuarantineRecord>,
    /// The pods as the endpoints stage resolved them (peer-only pods, on other nodes, are never
    /// quarantinable from this node).
    endpoints: Arc<EndpointTable>,
    endpoint_ids: HashMap<PodKey, EndpointId>,
    limiter: RateLimiter,
    /// Queued quarantines by pod key (queue order: `seq`).
    pending: BTreeMap<String, PendingQuarantine>,
    next_seq: u64,
    /// Queue outcomes not yet collected by `apply_due` (the queue is also served at the start
    /// of `respond`, so earlier quarantines keep their place).
    outbox: Vec<QueueOutcome>,
    counters: Counters,
    writer: std::sync::Arc<StateWriter>,
    state_writes: StateWrites,
    /// Would-be quarantines of dry run, by pod key.
    dry_run: DryRunBook,
    /// Packets dropped because of a quarantine in `records`, by pod key.
    drops: BTreeMap<String, QuarantineDrops>,
}

/// The rule id an operator's quarantine is recorded under.
pub const MANUAL_RULE: &str = "manual";

/// The built-in rule id of a flood quarantine (`ResponsePolicy::quarantine_flooding_pods`).
pub const FLOOD_RULE: &str = "event_flood";

fn now_rfc3339() -> (String, i128) {
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    (format_unix_ns(unix_ns), unix_ns)
}

fn split_pod(pod: &str) -> Result<(&str, &str), QuarantineError> {
    match pod.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => Err(QuarantineError::BadPodName(pod.to_string())),
    }
}

impl<D: QuarantineDatapath> Responder<D> {
    /// Adopts what is there before anything else happens: the state file, the (pinned) map and
    /// the inventory are reconciled; nothing already quarantined is ever lifted here except for
    /// endpoints that no longer exist. Call before events flow.
    ///
    /// For callers without an endpoints stage (tests, tools): the inventory's cgroups are
    /// resolved through [`EndpointTable::resolve`]. The daemon uses [`Responder::start_with`].
    pub fn start(config: ResponderConfig, datapath: D, inventory: &Inventory) -> Result<(Responder<D>, Adoption), QuarantineError> {
        let table = EndpointTable::resolve(Arc::new(inventory.clone()), &config.cgroup_root);
        Responder::start_with(config, datapath, Arc::new(table))
    }

    /// [`Responder::start`] with the endpoint table the endpoints stage published.
    pub fn start_with(config: ResponderConfig, datapath: D, endpoints: Arc<EndpointTable>) -> Result<(Responder<D>, Adoption), QuarantineError> {
        config.policy.validate().map_err(QuarantineError::Policy)?;
        let writer = StateWriter::spawn(&config.state_dir)
            .map_err(|source| StateError::Io { what: "start the writer thread for", path: config.state_dir.clone(), source })?;
        let mut responder = Responder {
            datapath,
            state_dir: config.state_dir,
            cgroup_root: config.cgroup_root,
            policy: config.policy.clone(),
            records: BTreeMap::new(),
            endpoints,
            endpoint_ids: HashMap::new(),
            limiter: RateLimiter::new(
                config.policy.max_quarantines_per_minute,
                config.policy.max_quarantines_per_namespace_per_minute,
                Instant::now(),
            ),
            pending: BTreeMap::new(),
            next_seq: 0,
            outbox: Vec::new(),
            counters: Counters::default(),
            writer: std::sync::Arc::new(writer),
            state_writes: StateWrites::default(),
            dry_run: DryRunBook::default(),
            drops: BTreeMap::new(),
        };
        let mut adoption = Adoption::default();
        let file = match state::load(&responder.state_dir) {
            Ok(file) => file,
            Err(err) => {
                // Keep the evidence, recover from the map (which fails closed), carry on.
                let path = state::state_path(&responder.state_dir);
                let aside = path.with_extension(format!("json.unreadable-{}", now_rfc3339().1));
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(%err, moved_to = %aside.display(), "quarantine state file unreadable; recovering from the datapath map");
                adoption.state_file_problem = Some(format!("{err}; moved to {}", aside.display()));
                StateFile::default()
            }
        };
        if file.suspended.is_some() {
            tracing::warn!("the state file says automatic quarantine was suspended by the rate limit; ignored: over the limit quarantines are queued now, nothing suspends");
        }
        let in_map: HashMap<u64, QuarantineValue> = responder.datapath.entries()?.into_iter().collect();
        let (at, _) = now_rfc3339();

        // Map entries the file accounts for (including those removed below).
        let mut accounted: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for mut record in file.quarantined {
            accounted.insert(record.cgroup_id);
            let Some(located) = responder.located(&record.pod) else {
                responder.datapath.clear(record.cgroup_id)?;
                responder.counters.removed += 1;
                adoption.removed.push(Removal { record, reason: "endpoint is no longer in the inventory".into(), at: at.clone() });
                continue;
            };
            if let Some(id) = located.cgroup_id.filter(|id| *id != record.cgroup_id) {
                // Same pod, new cgroup (re-created): the quarantine follows the pod; add before
                // removing so it is never unprotected.
                responder.datapath.set(id, responder.map_value(&record.pod))?;
                responder.datapath.clear(record.cgroup_id)?;
                tracing::warn!(pod = %record.pod, old = record.cgroup_id, new = id, "quarantined pod has a new cgroup; quarantine moved");
                record.cgroup_id = id;
                record.cgroup = located.cgroup.clone();
            } else if !in_map.contains_key(&record.cgroup_id) {
                responder.datapath.set(record.cgroup_id, responder.map_value(&record.pod))?;
                adoption.reapplied.push(record.pod.clone());
            }
            adoption.adopted.push(record.clone());
            responder.records.insert(record.pod.clone(), record);
        }

        for pending in file.pending {
            if responder.records.contains_key(&pending.pod) || responder.pending.contains_key(&pending.pod) {
                continue;
            }
            responder.next_seq = responder.next_seq.max(pending.seq + 1);
            adoption.pending.push(pending.clone());
            responder.pending.insert(pending.pod.clone(), pending);
        }

        accounted.extend(responder.records.values().map(|r| r.cgroup_id));
        let by_cgroup: HashMap<u64, (String, String)> = responder
            .endpoints
            .entries()
            .filter_map(|e| Some((e.cgroup_id()?.get(), (e.pod.to_string(), e.cgroup()?.to_string()))))
            .collect();
        for (cgroup_id, _) in in_map {
            if accounted.contains(&cgroup_id) {
                continue;
            }
            match by_cgroup.get(&cgroup_id) {
                Some((pod, cgroup)) if !responder.records.contains_key(pod) => {
                    let (namespace, name) = split_pod(pod)?;
                    let (since, since_unix_ns) = now_rfc3339();
                    let record = QuarantineRecord {
                        pod: pod.clone(),
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        cgroup: cgroup.clone(),
                        cgroup_id,
                        since,
                        since_unix_ns,
                        rule_id: "unknown".into(),
                        alert_id: "unknown".into(),
                        reason: "found in the datapath map without a state record (recovered at start-up)".into(),
                    };
                    tracing::warn!(%pod, cgroup_id, "quarantine recovered from the datapath map");
                    adoption.recovered_from_map.push(record.clone());
                    responder.records.insert(pod.clone(), record);
                }
                _ => {
                    responder.datapath.clear(cgroup_id)?;
                    adoption.stale_map_entries.push(cgroup_id);
                }
            }
        }
        responder.apply_forensics()?;
        if let Err(err) = responder.persist() {
            tracing::error!(%err, "writing the quarantine state after adoption");
        }
        tracing::info!(
            adopted = adoption.adopted.len(),
            recovered = adoption.recovered_from_map.len(),
            reapplied = adoption.reapplied.len(),
            removed = adoption.removed.len(),
            pending = adoption.pending.len(),
            stale = adoption.stale_map_entries.len(),
            "quarantine state adopted"
        );
        Ok((responder, adoption))
    }

    /// A local pod with a cgroup (None: not in the table, on another node, or no cgroup named).
    fn located(&self, pod: &str) -> Option<Located> {
        let key = pod.parse::<PodKey>().ok()?;
        match &self.endpoints.get(&key)?.placement {
            Placement::Local { cgroup, cgroup_id } => Some(Located { cgroup: cgroup.clone(), cgroup_id: cgroup_id.map(CgroupId::get) }),
            Placement::LocalWithoutCgroup | Placement::Peer => None,
        }
    }

    /// A peer-only endpoint (a pod on another node).
    fn is_peer(&self, pod: &str) -> bool {
        pod.parse::<PodKey>().ok().and_then(|key| self.endpoints.get(&key).map(|e| e.is_peer())).unwrap_or(false)
    }

    /// Segmentation endpoint ids by pod (informational in the map value: the datapath uses it
    /// to rate-limit and attribute drop records).
    pub fn set_endpoint_ids(&mut self, ids: impl IntoIterator<Item = (PodKey, EndpointId)>) {
        self.endpoint_ids = ids.into_iter().collect();
    }

    fn map_value(&self, pod: &str) -> QuarantineValue {
        let endpoint_id = pod.parse::<PodKey>().ok().and_then(|key| self.endpoint_ids.get(&key).copied());
        QuarantineValue {
            since_ns: monotonic_now_ns(),
            endpoint_id: endpoint_id.map_or(0, EndpointId::get),
            flags: 0,
        }
    }

    fn snapshot(&self) -> StateFile {
        StateFile {
            version: state::STATE_VERSION,
            quarantined: self.records.values().cloned().collect(),
            pending: self.pending_in_order(),
            suspended: None,
        }
    }

    /// Writes the state file and waits until it is durable (operator actions, adoption).
    fn persist(&self) -> Result<(), StateError> {
        self.writer.write(self.snapshot())
    }

    /// Hands the state to the background writer (the finding path): errors are logged and
    /// counted by the writer, in `status` as `state_write_errors`.
    fn persist_later(&self) {
        match self.state_writes {
            StateWrites::Background => {
                self.writer.submit(self.snapshot());
            }
            StateWrites::Synchronous => {
                if let Err(err) = self.persist() {
                    tracing::error!(%err, "writing the quarantine state file");
                }
            }
        }
    }

    /// Chooses how the state file is written after a rule's quarantine.
    pub fn set_state_writes(&mut self, mode: StateWrites) {
        self.state_writes = mode;
    }

    /// Waits until every state change so far is on disk.
    pub fn flush_state(&self) -> Result<(), StateError> {
        self.persist()
    }

    fn apply_forensics(&mut self) -> Result<(), QuarantineError> {
        let mut entries = Vec::with_capacity(self.policy.forensics.len());
        for f in &self.policy.forensics {
            let (addr, len) = f.parse_cidr().map_err(QuarantineError::Policy)?;
            entries.push(ForensicsEntry::new(addr, len, f.port.unwrap_or(0), f.protocol.map(|p| p.ip_proto()).unwrap_or(0)));
        }
        Ok(self.datapath.set_forensics(&entries)?)
    }

    /// Decides and, when it comes to that, enforces. The datapath update has returned before
    /// this does, and a failed update is reported as `failed`, never as `quarantined`. Over a
    /// rate limit the quarantine is queued (`pending`) and applied by `apply_due`.
    pub fn respond(&mut self, finding: &Finding) -> Decision {
        let now = Instant::now();
        // Quarantines queued earlier go first (their outcomes wait in the outbox).
        self.serve_queue(now);
        let pod = format!("{}/{}", finding.namespace, finding.name);
        let rule_id = finding.hit.rule_id.clone();
        let decision = |outcome: Outcome, reason: String, cgroup_id: Option<u64>| Decision {
            outcome,
            reason,
            pod: pod.clone(),
            rule_id: rule_id.clone(),
            alert_id: finding.alert_id.clone(),
            cgroup_id,
            enforced_at_ns: None,
            warning: None,
            expected_in_seconds: None,
        };
        if finding.hit.action != Action::Quarantine {
            return decision(Outcome::Alerted, "the rule's action is alert".into(), None);
        }
        if self.is_peer(&pod) {
            // Events only come from this node's cgroups, so this is a caller's mistake; it must
            // still never reach the datapath (the pod's traffic is enforced on its own node).
            self.counters.suppressed += 1;
            tracing::warn!(%pod, rule = %rule_id, "quarantine suppressed: peer-only endpoint on another node");
            return decision(
                Outcome::Suppressed,
                "the pod runs on another node (peer-only endpoint): only palisade on its node can quarantine it".into(),
                None,
            );
        }
        if let Some(existing) = self.records.get(&pod) {
            self.counters.already_quarantined += 1;
            let reason = format!("quarantined since {} by rule {} (alert {})", existing.since, existing.rule_id, existing.alert_id);
            return decision(Outcome::AlreadyQuarantined, reason, Some(existing.cgroup_id));
        }
        if let Some(queued) = self.pending.get(&pod) {
            let reason = format!(
                "a quarantine is already queued since {} by rule {} (alert {}), held back by {}",
                queued.queued_at, queued.rule_id, queued.alert_id, queued.held_by
            );
            return decision(Outcome::Pending, reason, None);
        }
        if self.policy.is_protected(&finding.namespace) {
            self.counters.suppressed += 1;
            tracing::warn!(%pod, rule = %rule_id, "quarantine suppressed: protected namespace");
            return decision(Outcome::Suppressed, format!("namespace {} is protected", finding.namespace), None);
        }
        if let Enforcement::DryRun(why) = self.policy.enforcement(&rule_id) {
            self.counters.would_quarantine += 1;
            // Only this node's pods: a would-be quarantine of a pod that cannot be located
            // would not have been enforced either.
            if self.located(&pod).is_some() {
                let (since, since_unix_ns) = now_rfc3339();
                self.dry_run.note(DryRunRecord {
                    pod: pod.clone(),
                    namespace: finding.namespace.clone(),
                    name: finding.name.clone(),
                    rule_id: rule_id.clone(),
                    alert_id: finding.alert_id.clone(),
                    reason: finding.hit.message.clone(),
                    why_not: why.clone(),
                    since,
                    since_unix_ns,
                    hits: 1,
                });
            }
            return decision(Outcome::WouldQuarantine, why, None);
        }
        let (cgroup, cgroup_id) = match self.locate(&pod) {
            Ok(found) => found,
            Err(reason) => {
                self.counters.failed += 1;
                tracing::error!(%pod, rule = %rule_id, %reason, "cannot quarantine");
                return decision(Outcome::Failed, reason, None);
            }
        };

        // The rate limits: queue behind earlier quarantines of the namespace, or when a bucket
        // is empty. Queued, never dropped.
        let ahead = self.pending.values().filter(|p| p.namespace == finding.namespace).count();
        let held = if ahead > 0 {
            Some((format!("{ahead} earlier quarantine(s) queued in namespace {}", finding.namespace), None))
        } else {
            self.limiter.check(&finding.namespace, now).map(|(limited, wait)| (limited.to_string(), Some(wait)))
        };
        if let Some((held_by, wait)) = held {
            let (queued_at, queued_unix_ns) = now_rfc3339();
            let queued = PendingQuarantine {
                pod: pod.clone(),
                namespace: finding.namespace.clone(),
                name: finding.name.clone(),
                rule_id: rule_id.clone(),
                severity: finding.hit.severity,
                alert_id: finding.alert_id.clone(),
                reason: finding.hit.message.clone(),
                queued_at,
                queued_unix_ns,
                seq: self.next_seq,
                held_by: held_by.clone(),
            };
            self.next_seq += 1;
            self.pending.insert(pod.clone(), queued);
            self.counters.queued += 1;
            self.persist_later();
            let warning = None;
            let when = match wait {
                Some(wait) => format!("in about {:.1} s", wait.as_secs_f64()),
                None => "after them".to_string(),
            };
            let reason = format!(
                "rate limit: held back by {held_by}; queued, NOT enforced yet: applied {when} unless an operator cancels it (`palisade quarantine cancel {pod}`)"
            );
            tracing::warn!(%pod, rule = %rule_id, alert = %finding.alert_id, %held_by, "quarantine queued by the rate limit");
            return Decision {
                warning,
                expected_in_seconds: wait.map(|w| w.as_secs_f64()),
                ..decision(Outcome::Pending, reason, Some(cgroup_id))
            };
        }
        self.limiter.take(&finding.namespace, now);
        let target = Target {
            pod: pod.clone(),
            namespace: finding.namespace.clone(),
            name: finding.name.clone(),
            cgroup,
            cgroup_id,
            rule_id: rule_id.clone(),
            alert_id: finding.alert_id.clone(),
            message: finding.hit.message.clone(),
        };
        // The map first; the state file after, off the finding path.
        let enforced = self.enforce(target);
        if enforced.is_ok() {
            self.persist_later();
        }
        let warning = None;
        match enforced {
            Ok(enforced_at_ns) => Decision {
                enforced_at_ns: Some(enforced_at_ns),
                warning,
                ..decision(Outcome::Quarantined, format!("rule {rule_id}: {}", finding.hit.message), Some(cgroup_id))
            },
            Err(reason) => decision(Outcome::Failed, reason, Some(cgroup_id)),
        }
    }

    /// The pod's cgroup and its id, or why it cannot be found (a cgroup that appears later is
    /// in the next table the endpoints stage publishes: it retries every few seconds).
    fn locate(&self, pod: &str) -> Result<(String, u64), String> {
        let Some(located) = self.located(pod) else {
            return Err("the pod has no cgroup in the inventory".into());
        };
        match located.cgroup_id {
            Some(id) => Ok((located.cgroup, id)),
            None => Err(format!("cgroup {} does not exist", located.cgroup)),
        }
    }

    /// Enforce first, then record (the caller persists and reports). The monotonic time at
    /// which the map update had returned, or why it failed.
    fn enforce(&mut self, target: Target) -> Result<u64, String> {
        let value = self.map_value(&target.pod);
        if let Err(err) = self.datapath.set(target.cgroup_id, value) {
            self.counters.failed += 1;
            tracing::error!(pod = %target.pod, rule = %target.rule_id, cgroup_id = target.cgroup_id, %err, "QUARANTINE FAILED: datapath update refused");
            return Err(format!("datapath update failed: {err}"));
        }
        let enforced_at_ns = monotonic_now_ns();
        self.counters.quarantined += 1;
        let (since, since_unix_ns) = now_rfc3339();
        tracing::warn!(pod = %target.pod, rule = %target.rule_id, alert = %target.alert_id, cgroup_id = target.cgroup_id, "pod quarantined");
        let record = QuarantineRecord {
            pod: target.pod.clone(),
            namespace: target.namespace,
            name: target.name,
            cgroup: target.cgroup,
            cgroup_id: target.cgroup_id,
            since,
            since_unix_ns,
            rule_id: target.rule_id,
            alert_id: target.alert_id,
            reason: target.message,
        };
        // Enforced now: what dry run noted, and drops of an earlier quarantine, are history.
        self.dry_run.dismiss(&target.pod);
        self.drops.remove(&target.pod);
        self.records.insert(target.pod, record);
        Ok(enforced_at_ns)
    }

    fn persist_warning(&self, pod: &str) -> Option<String> {
        self.persist().err().map(|err| {
            tracing::error!(%pod, %err, "quarantine state changed but the state file could not be written");
            format!("enforced, but the state file could not be written: {err}")
        })
    }

    fn pending_in_order(&self) -> Vec<PendingQuarantine> {
        let mut queued: Vec<PendingQuarantine> = self.pending.values().cloned().collect();
        queued.sort_by_key(|p| p.seq);
        queued
    }

    /// Applies queued quarantines, oldest first, as far as the rate limits allow; what became
    /// of each goes to the outbox.
    fn serve_queue(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let mut changed = false;
        for queued in self.pending_in_order() {
            let pod = queued.pod.clone();
            // What changed while it waited can end it without spending a token.
            let ended = if let Some(existing) = self.records.get(&pod) {
                self.counters.already_quarantined += 1;
                Some((Outcome::AlreadyQuarantined, format!("quarantined meanwhile by rule {} (alert {})", existing.rule_id, existing.alert_id), Some(existing.cgroup_id)))
            } else if self.policy.is_protected(&queued.namespace) {
                self.counters.suppressed += 1;
                Some((Outcome::Suppressed, format!("namespace {} was made protected while the quarantine was queued", queued.namespace), None))
            } else if let Enforcement::DryRun(why) = self.policy.enforcement(&queued.rule_id) {
                self.counters.would_quarantine += 1;
                Some((Outcome::WouldQuarantine, format!("{why} (changed while the quarantine was queued)"), None))
            } else {
                match self.locate(&pod) {
                    Err(reason) => {
                        self.counters.failed += 1;
                        tracing::error!(%pod, %reason, "cannot apply a queued quarantine");
                        Some((Outcome::Failed, format!("{reason} (while the quarantine was queued)"), None))
                    }
                    Ok(_) => None,
                }
            };
            let decision_for = |outcome: Outcome, reason: String, cgroup_id: Option<u64>| Decision {
                outcome,
                reason,
                pod: pod.clone(),
                rule_id: queued.rule_id.clone(),
                alert_id: queued.alert_id.clone(),
                cgroup_id,
                enforced_at_ns: None,
                warning: None,
                expected_in_seconds: None,
            };
            let (_, unix_ns) = now_rfc3339();
            let queued_for_seconds = ((unix_ns - queued.queued_unix_ns).max(0) as f64) / 1e9;
            if let Some((outcome, reason, cgroup_id)) = ended {
                self.pending.remove(&pod);
                changed = true;
                self.outbox.push(QueueOutcome { decision: decision_for(outcome, reason, cgroup_id), queued, queued_for_seconds });
                continue;
            }
            if self.limiter.check(&queued.namespace, now).is_some() {
                if self.limiter.node_exhausted(now) {
                    break;
                }
                // This namespace waits; later ones in other namespaces may go.
                continue;
            }
            let Ok((cgroup, cgroup_id)) = self.locate(&pod) else { continue };
            self.limiter.take(&queued.namespace, now);
            self.pending.remove(&pod);
            changed = true;
            let target = Target {
                pod: pod.clone(),
                namespace: queued.namespace.clone(),
                name: queued.name.clone(),
                cgroup,
                cgroup_id,
                rule_id: queued.rule_id.clone(),
                alert_id: queued.alert_id.clone(),
                message: queued.reason.clone(),
            };
            let decision = match self.enforce(target) {
                Ok(enforced_at_ns) => {
                    self.counters.applied_from_queue += 1;
                    Decision {
                        enforced_at_ns: Some(enforced_at_ns),
                        ..decision_for(
                            Outcome::Quarantined,
                            format!("rule {}: {}; applied after {queued_for_seconds:.1} s in the rate-limit queue", queued.rule_id, queued.reason),
                            Some(cgroup_id),
                        )
                    }
                }
                Err(reason) => decision_for(Outcome::Failed, reason, Some(cgroup_id)),
            };
            self.outbox.push(QueueOutcome { decision, queued, queued_for_seconds });
        }
        if changed {
            self.persist_later();
        }
    }

    /// Applies what the rate limits allow now and returns every queue outcome since the last
    /// call (for alerts).
    pub fn apply_due(&mut self) -> Vec<QueueOutcome> {
        self.serve_queue(Instant::now());
        std::mem::take(&mut self.outbox)
    }

    /// How long until `apply_due` may have something to do (None: nothing queued).
    pub fn next_due(&mut self) -> Option<Duration> {
        if !self.outbox.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let namespaces: BTreeSet<String> = self.pending.values().map(|p| p.namespace.clone()).collect();
        namespaces.iter().map(|ns| self.limiter.check(ns, now).map_or(Duration::ZERO, |(_, wait)| wait)).min()
    }

    /// Queued quarantines, oldest first.
    pub fn pending(&self) -> Vec<PendingQuarantine> {
        self.pending_in_order()
    }

    /// Drops a queued quarantine (an operator's decision, audited by the caller).
    pub fn cancel(&mut self, pod: &str, reason: &str, by: &str) -> Result<CancelRecord, QuarantineError> {
        split_pod(pod)?;
        let Some(queued) = self.pending.remove(pod) else {
            if self.records.contains_key(pod) {
                return Err(QuarantineError::Policy(format!("{pod} is already quarantined: release it instead of cancelling")));
            }
            return Err(QuarantineError::NotPending { pod: pod.to_string() });
        };
        self.counters.cancelled += 1;
        let (cancelled_at, now_ns) = now_rfc3339();
        let warning = self.persist().err().map(|err| format!("cancelled, but the state file could not be written: {err}"));
        tracing::warn!(%pod, %reason, %by, "queued quarantine cancelled");
        Ok(CancelRecord {
            pod: queued.pod,
            rule_id: queued.rule_id,
            alert_id: queued.alert_id,
            queued_at: queued.queued_at,
            cancelled_at,
            queued_for_seconds: ((now_ns - queued.queued_unix_ns).max(0) as f64) / 1e9,
            reason: reason.to_string(),
            by: by.to_string(),
            warning,
        })
    }

    /// An operator's quarantine (`palisade quarantine add`): enforced at once, past the rate
    /// limits and dry run (the operator decided), a queued one included; never in a protected
    /// namespace or for a pod of another node. `alert_id` is the audit alert's.
    pub fn add(&mut self, pod: &str, reason: &str, by: &str, alert_id: &str) -> Result<Decision, QuarantineError> {
        let (namespace, name) = split_pod(pod)?;
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let refused = |reason: String| QuarantineError::Refused { pod: pod.to_string(), reason };
        if let Some(existing) = self.records.get(pod) {
            return Err(QuarantineError::AlreadyQuarantined { pod: pod.to_string(), since: existing.since.clone(), alert_id: existing.alert_id.clone() });
        }
        if self.is_peer(pod) {
            return Err(refused("the pod runs on another node (peer-only endpoint): quarantine it with palisade on its node".into()));
        }
        if self.policy.is_protected(&namespace) {
            return Err(refused(format!("namespace {namespace} is protected (protected_namespaces in the response policy)")));
        }
        let (cgroup, cgroup_id) = self.locate(pod).map_err(refused)?;
        let message = format!("quarantined by {by}: {reason}");
        let target = Target {
            pod: pod.to_string(),
            namespace,
            name,
            cgroup,
            cgroup_id,
            rule_id: MANUAL_RULE.to_string(),
            alert_id: alert_id.to_string(),
            message: message.clone(),
        };
        let enforced_at_ns = self.enforce(target).map_err(|reason| QuarantineError::Refused { pod: pod.to_string(), reason })?;
        // The operator's word supersedes a queued automatic quarantine.
        if let Some(queued) = self.pending.remove(pod) {
            tracing::info!(%pod, queued_alert = %queued.alert_id, "a queued quarantine was superseded by an operator's");
        }
        let warning = self.persist_warning(pod);
        tracing::warn!(%pod, %by, %reason, "pod quarantined by an operator");
        Ok(Decision {
            outcome: Outcome::Quarantined,
            reason: message,
            pod: pod.to_string(),
            rule_id: MANUAL_RULE.to_string(),
            alert_id: alert_id.to_string(),
            cgroup_id: Some(cgroup_id),
            enforced_at_ns: Some(enforced_at_ns),
            warning,
            expected_in_seconds: None,
        })
    }

    /// Lifts a quarantine (the map entry goes first; if that fails, nothing changes) and returns
    /// the audit record once the state file without it is durable.
    pub fn release(&mut self, pod: &str, reason: &str, by: &str) -> Result<ReleaseRecord, QuarantineError> {
        let (mut record, generation) = self.release_deferred(pod, reason, by)?;
        if let Err(err) = self.writer.wait(generation) {
            record.warning = Some(format!("released, but the state file could not be written: {err}"));
        }
        Ok(record)
    }

    /// The state writer, to wait for a generation without holding the responder.
    pub fn state_writer(&self) -> std::sync::Arc<StateWriter> {
        self.writer.clone()
    }

    /// [`release`](Self::release) without the wait: the record and the state generation that
    /// must be durable before the release is acknowledged.
    pub fn release_deferred(&mut self, pod: &str, reason: &str, by: &str) -> Result<(ReleaseRecord, u64), QuarantineError> {
        split_pod(pod)?;
        let Some(record) = self.records.get(pod) else {
            if self.pending.contains_key(pod) {
                return Err(QuarantineError::Pending { pod: pod.to_string() });
            }
            return Err(QuarantineError::NotQuarantined { pod: pod.to_string() });
        };
        self.datapath.clear(record.cgroup_id)?;
        let Some(record) = self.records.remove(pod) else {
            return Err(QuarantineError::NotQuarantined { pod: pod.to_string() });
        };
        self.drops.remove(pod);
        self.counters.released += 1;
        let (released_at, now_ns) = now_rfc3339();
        let generation = self.writer.submit(self.snapshot());
        tracing::warn!(%pod, %reason, %by, "quarantine released");
        let record = ReleaseRecord {
            pod: record.pod,
            cgroup_id: record.cgroup_id,
            rule_id: record.rule_id,
            alert_id: record.alert_id,
            since: record.since,
            released_at,
            quarantined_for_seconds: ((now_ns - record.since_unix_ns).max(0) as f64) / 1e9,
            reason: reason.to_string(),
            by: by.to_string(),
            warning: None,
        };
        Ok((record, generation))
    }

    pub fn list(&self) -> Vec<QuarantineRecord> {
        self.records.values().cloned().collect()
    }

    pub fn is_quarantined(&self, pod: &str) -> bool {
        self.records.contains_key(pod)
    }

    /// The quarantines dry run held back (see [`super::observed`]).
    pub fn dry_run_list(&self) -> Vec<DryRunRecord> {
        self.dry_run.list()
    }

    /// An operator dismissed a dry-run record (released or deleted its Quarantine object).
    pub fn dismiss_dry_run(&mut self, pod: &str) -> Option<DryRunRecord> {
        let dismissed = self.dry_run.dismiss(pod);
        if dismissed.is_some() {
            tracing::info!(%pod, "dry-run quarantine record dismissed");
        }
        dismissed
    }

    /// The datapath dropped `count` packets of `pod` because it is quarantined (from its
    /// rate-limited drop records). Ignored unless the pod is quarantined now: a record that
    /// arrives after the release belongs to the quarantine that ended.
    pub fn note_drops(&mut self, pod: &str, egress: bool, count: u64) {
        if self.records.contains_key(pod) {
            let (_, now_ns) = now_rfc3339();
            self.drops.entry(pod.to_string()).or_default().add(egress, count, now_ns);
        }
    }

    /// What [`note_drops`](Self::note_drops) counted, by quarantined pod.
    pub fn drops(&self) -> BTreeMap<String, QuarantineDrops> {
        self.drops.clone()
    }

    /// Hot reload of the response policy (dry run, rule modes, guardrails, forensics). Tokens
    /// already spent stay spent; queued quarantines are judged by the new policy when served.
    pub fn set_policy(&mut self, policy: ResponsePolicy) -> Result<(), QuarantineError> {
        policy.validate().map_err(QuarantineError::Policy)?;
        self.limiter.set_limits(policy.max_quarantines_per_minute, policy.max_quarantines_per_namespace_per_minute, Instant::now());
        self.policy = policy;
        // Records of rules now enforced say nothing any more (their next hit quarantines).
        let policy = &self.policy;
        self.dry_run.retain(|r| matches!(policy.enforcement(&r.rule_id), Enforcement::DryRun(_)));
        self.apply_forensics()?;
        tracing::info!(dry_run = self.policy.dry_run, rules = self.policy.rules.len(), "response policy updated");
        Ok(())
    }

    pub fn policy(&self) -> &ResponsePolicy {
        &self.policy
    }

    /// [`Responder::set_endpoints`] for callers without an endpoints stage (tests, tools): the
    /// inventory's cgroups are resolved through [`EndpointTable::resolve`].
    pub fn set_inventory(&mut self, inventory: &Inventory) -> Result<Vec<Removal>, QuarantineError> {
        let table = EndpointTable::resolve(Arc::new(inventory.clone()), &self.cgroup_root);
        self.set_endpoints(Arc::new(table))
    }

    /// A new endpoint table: quarantines of endpoints that left it end (returned, for the alert
    /// history); a pod whose cgroup changed keeps its quarantine on the new cgroup.
    pub fn set_endpoints(&mut self, endpoints: Arc<EndpointTable>) -> Result<Vec<Removal>, QuarantineError> {
        self.endpoints = endpoints;
        let mut removals = Vec::new();
        let pods: Vec<String> = self.records.keys().cloned().collect();
        let (at, _) = now_rfc3339();
        for pod in pods {
            let Some(record) = self.records.get(&pod).cloned() else { continue };
            match self.located(&pod) {
                None => {
                    self.datapath.clear(record.cgroup_id)?;
                    self.records.remove(&pod);
                    self.counters.removed += 1;
                    tracing::info!(%pod, "endpoint left the inventory; its quarantine ends with it");
                    removals.push(Removal { record, reason: "endpoint is no longer in the inventory".into(), at: at.clone() });
                }
                Some(Located { cgroup, cgroup_id: Some(id) }) if id != record.cgroup_id => {
                    self.datapath.set(id, self.map_value(&pod))?;
                    self.datapath.clear(record.cgroup_id)?;
                    if let Some(r) = self.records.get_mut(&pod) {
                        r.cgroup_id = id;
                        r.cgroup = cgroup;
                    }
                }
                Some(_) => {}
            }
        }
        let records = &self.records;
        self.drops.retain(|pod, _| records.contains_key(pod));
        let dry_run_pods: Vec<String> = self.dry_run.list().into_iter().map(|r| r.pod).collect();
        for pod in dry_run_pods {
            if self.located(&pod).is_none() {
                self.dry_run.dismiss(&pod);
            }
        }
        if let Err(err) = self.persist() {
            tracing::error!(%err, "writing the quarantine state");
        }
        Ok(removals)
    }

    pub fn status(&mut self) -> ResponderStatus {
        ResponderStatus {
            quarantined: self.records.len(),
            dry_run: self.policy.dry_run,
            rule_modes: self.policy.rules.clone(),
            protected_namespaces: self.policy.protected_namespaces.iter().cloned().collect(),
            rate_limit: self.limiter.snapshot(Instant::now()),
            pending: self.pending.len(),
            dry_run_records: self.dry_run.len(),
            oldest_pending_seconds: self.pending.values().map(|p| p.queued_unix_ns).min().map(|oldest| {
                let (_, now_ns) = now_rfc3339();
                ((now_ns - oldest).max(0) as f64) / 1e9
            }),
            forensics_exceptions: self.policy.forensics.len(),
            counters: Counters { state_write_errors: self.writer.errors(), dry_run_evicted: self.dry_run.evicted(), ..self.counters.clone() },
        }
    }

    /// The datapath (benchmarks and tests read the map through it).
    pub fn datapath(&self) -> &D {
        &self.datapath
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::datapath::MemoryDatapath;
    use super::super::policy::RuleMode;
    use super::*;
    use crate::rules::Severity;

    /// A state dir and a fake cgroup root whose directories stand in for pod cgroups (their
    /// inode numbers are the ids, as with cgroup2).
    struct Fixture {
        root: PathBuf,
    }

    impl Fixture {
        fn new(test: &str) -> Fixture {
            let root = std::env::temp_dir().join(format!("palisade-responder-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for pod in ["shop/a", "shop/b", "shop/c", "shop/d", "kube-system/dns"] {
                std::fs::create_dir_all(root.join("cg").join(pod)).expect("mkdir");
            }
            Fixture { root }
        }

        fn config(&self, policy: ResponsePolicy) -> ResponderConfig {
            ResponderConfig { state_dir: self.root.join("state"), cgroup_root: self.root.join("cg"), policy }
        }

        fn id(&self, pod: &str) -> u64 {
            crate::lab::cgroup_id(&self.root.join("cg").join(pod)).expect("inode")
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn inventory(pods: &[&str]) -> Inventory {
        let mut text = String::from("endpoints:\n");
        for pod in pods {
            let (ns, name) = pod.split_once('/').expect("ns/name");
            text.push_str(&format!("  - namespace: {ns}\n    name: {name}\n    cgroup: {pod}\n"));
        }
        Inventory::parse(&text, Path::new("inv.yaml")).expect("inventory")
    }

    const ALL: [&str; 5] = ["shop/a", "shop/b", "shop/c", "shop/d", "kube-system/dns"];

    fn finding(pod: &str, rule: &str, action: Action) -> Finding {
        let (namespace, name) = pod.split_once('/').expect("ns/name");
        Finding {
            hit: RuleHit {
                rule_id: rule.into(),
                title: rule.into(),
                severity: Severity::Critical,
                message: format!("{rule} in {pod}"),
                mitre: vec!["T1059".into()],
                action,
            },
            namespace: namespace.into(),
            name: name.into(),
            alert_id: format!("alert-{pod}-{rule}"),
        }
    }

    fn start(f: &Fixture, policy: ResponsePolicy, dp: MemoryDatapath) -> (Responder<MemoryDatapath>, Adoption) {
        Responder::start(f.config(policy), dp, &inventory(&ALL)).expect("start")
    }

    #[test]
    fn quarantine_is_in_the_map_before_it_is_reported_and_only_once() {
        let f = Fixture::new("once");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        let d = r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::Quarantined, "{d:?}");
        assert_eq!(d.cgroup_id, Some(f.id("shop/a")));
        assert!(r.datapath().entries.contains_key(&f.id("shop/a")));
        let again = r.respond(&finding("shop/a", "crypto_mining", Action::Quarantine));
        assert_eq!(again.outcome, Outcome::AlreadyQuarantined);
        assert!(again.reason.contains("reverse_shell"), "{}", again.reason);
        let alert_only = r.respond(&finding("shop/b", "shell_in_container", Action::Alert));
        assert_eq!(alert_only.outcome, Outcome::Alerted);
        assert_eq!(r.datapath().entries.len(), 1);
        let listed = r.list();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].rule_id.as_str(), listed[0].alert_id.as_str()), ("reverse_shell", "alert-shop/a-reverse_shell"));
    }

    #[test]
    fn a_peer_only_pod_is_never_quarantined_from_this_node() {
        let f = Fixture::new("peer");
        let mut inv = inventory(&ALL);
        inv.endpoints.push(
            Inventory::parse(
                "endpoints:\n  - {namespace: shop, name: remote, ips: [198.18.0.9], peerOnly: true}\n",
                Path::new("peer.yaml"),
            )
            .expect("peer")
            .endpoints
            .remove(0),
        );
        let (mut r, _) = Responder::start(f.config(ResponsePolicy::default()), MemoryDatapath::default(), &inv).expect("start");
        let d = r.respond(&finding("shop/remote", "reverse_shell", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::Suppressed, "{d:?}");
        assert!(d.reason.contains("another node") && d.reason.contains("peer-only"), "{}", d.reason);
        assert_eq!(d.cgroup_id, None);
        assert!(r.datapath().entries.is_empty() && r.list().is_empty());
        assert_eq!(r.status().counters.suppressed, 1);
        // An alert-only rule is still just an alert.
        assert_eq!(r.respond(&finding("shop/remote", "shell_in_container", Action::Alert)).outcome, Outcome::Alerted);
        // Local pods are unaffected.
        assert_eq!(r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine)).outcome, Outcome::Quarantined);
    }

    #[test]
    fn failed_map_update_is_reported_as_failed_not_quarantined() {
        let f = Fixture::new("fail");
        let dp = MemoryDatapath { fail_next_set: Some("ENOSPC".into()), ..MemoryDatapath::default() };
        let (mut r, _) = start(&f, ResponsePolicy::default(), dp);
        let d = r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::Failed);
        assert!(d.reason.contains("ENOSPC"), "{}", d.reason);
        assert!(r.list().is_empty() && r.datapath().entries.is_empty());
        // A pod the inventory does not know cannot be quarantined either.
        assert_eq!(r.respond(&finding("shop/ghost", "reverse_shell", Action::Quarantine)).outcome, Outcome::Failed);
    }

    #[test]
    fn dry_run_global_and_per_rule_and_hot_reload() {
        let f = Fixture::new("dry");
        let mut policy = ResponsePolicy { dry_run: true, ..ResponsePolicy::default() };
        policy.rules.insert("reverse_shell".into(), RuleMode::Quarantine);
        let (mut r, _) = start(&f, policy.clone(), MemoryDatapath::default());
        let d = r.respond(&finding("shop/a", "crypto_mining", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::WouldQuarantine);
        assert!(r.datapath().entries.is_empty());
        assert_eq!(r.respond(&finding("shop/b", "reverse_shell", Action::Quarantine)).outcome, Outcome::Quarantined);
        // Hot reload: enforcement on, one rule alert-only.
        policy.dry_run = false;
        policy.rules.insert("crypto_mining".into(), RuleMode::AlertOnly);
        r.set_policy(policy).expect("reload");
        let d = r.respond(&finding("shop/a", "crypto_mining", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::WouldQuarantine);
        assert!(d.reason.contains("alert only"), "{}", d.reason);
        assert_eq!(r.respond(&finding("shop/c", "fileless_exec", Action::Quarantine)).outcome, Outcome::Quarantined);
    }

    /// Issue 15: what dry run held back is listed (one record per pod, repeats counted) until
    /// it is dismissed, the rule is enforced, or the pod leaves; pods of other nodes never.
    #[test]
    fn dry_run_keeps_what_it_would_have_quarantined_until_dismissed_or_enforced() {
        let f = Fixture::new("dryrec");
        let policy = ResponsePolicy { dry_run: true, ..ResponsePolicy::default() };
        let (mut r, _) = start(&f, policy.clone(), MemoryDatapath::default());
        r.respond(&finding("shop/a", "crypto_mining", Action::Quarantine));
        r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        r.respond(&finding("shop/b", "crypto_mining", Action::Quarantine));
        r.respond(&finding("shop/nowhere", "crypto_mining", Action::Quarantine));
        r.respond(&finding("shop/c", "crypto_mining", Action::Alert));
        let listed = r.dry_run_list();
        assert_eq!(listed.iter().map(|d| d.pod.as_str()).collect::<Vec<_>>(), ["shop/a", "shop/b"]);
        assert_eq!((listed[0].hits, listed[0].rule_id.as_str()), (2, "crypto_mining"), "the first rule stays, hits count");
        assert!(listed[0].why_not.contains("dry run"), "{}", listed[0].why_not);
        assert!(r.datapath().entries.is_empty(), "dry run enforces nothing");
        assert_eq!(r.status().dry_run_records, 2);
        assert!(r.dismiss_dry_run("shop/b").is_some());
        assert!(r.dismiss_dry_run("shop/b").is_none());
        // The pod left: its record goes with it.
        r.set_inventory(&inventory(&["shop/b", "shop/c"])).expect("inventory");
        assert!(r.dry_run_list().is_empty());
        r.set_inventory(&inventory(&ALL)).expect("inventory");
        r.respond(&finding("shop/a", "crypto_mining", Action::Quarantine));
        // Dry run off: the rule is enforced now, the record says nothing any more.
        r.set_policy(ResponsePolicy { dry_run: false, ..policy }).expect("reload");
        assert!(r.dry_run_list().is_empty());
    }

    /// Issue 15: drops reported for a quarantined pod count per direction and end with the
    /// quarantine; reports for pods not quarantined (late, or another reason) are ignored.
    #[test]
    fn drop_counts_belong_to_the_quarantine_in_force() {
        let f = Fixture::new("drops");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        r.note_drops("shop/a", true, 5);
        assert!(r.drops().is_empty(), "not quarantined: nothing to count");
        r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        r.note_drops("shop/a", true, 5);
        r.note_drops("shop/a", false, 2);
        r.note_drops("shop/a", true, 1);
        let drops = r.drops()["shop/a"];
        assert_eq!((drops.egress, drops.ingress), (6, 2));
        assert!(drops.last_unix_ns > 0);
        r.release("shop/a", "fixed", "test").expect("release");
        r.note_drops("shop/a", true, 1);
        assert!(r.drops().is_empty(), "the quarantine ended: its counts with it");
        r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        assert!(r.drops().is_empty(), "a new quarantine starts at zero");
    }

    #[test]
    fn protected_namespace_is_never_quarantined() {
        let f = Fixture::new("protected");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        let d = r.respond(&finding("kube-system/dns", "reverse_shell", Action::Quarantine));
        assert_eq!(d.outcome, Outcome::Suppressed);
        assert!(d.reason.contains("kube-system"), "{}", d.reason);
        assert!(r.datapath().entries.is_empty());
    }

    /// The rate limit delays, never drops: over the node ceiling a quarantine is queued
    /// (`pending`, persisted, listed), applied once the bucket refills, and nothing latches.
    #[test]
    fn over_the_rate_limit_quarantines_queue_and_apply_as_tokens_refill() {
        let f = Fixture::new("queue");
        // A node ceiling of 2 per minute (30 s per token); the refill is driven by a reload to
        // a fast rate instead of waiting.
        let policy = ResponsePolicy { max_quarantines_per_minute: 2, max_quarantines_per_namespace_per_minute: 0, ..ResponsePolicy::default() };
        let (mut r, _) = start(&f, policy, MemoryDatapath::default());
        assert_eq!(r.respond(&finding("shop/a", "x", Action::Quarantine)).outcome, Outcome::Quarantined);
        assert_eq!(r.respond(&finding("shop/b", "x", Action::Quarantine)).outcome, Outcome::Quarantined);
        let queued = r.respond(&finding("shop/c", "x", Action::Quarantine));
        assert_eq!(queued.outcome, Outcome::Pending, "{queued:?}");
        assert!(queued.reason.contains("node ceiling of 2") && queued.reason.contains("cancel"), "{}", queued.reason);
        assert!(queued.expected_in_seconds.is_some_and(|s| s > 20.0 && s <= 30.0), "{queued:?}");
        // A second finding about the queued pod does not queue it twice; d queues behind c.
        assert_eq!(r.respond(&finding("shop/c", "y", Action::Quarantine)).outcome, Outcome::Pending);
        assert_eq!(r.respond(&finding("shop/d", "x", Action::Quarantine)).outcome, Outcome::Pending);
        assert_eq!(r.datapath().entries.len(), 2, "queued ones are not enforced yet");
        assert_eq!(r.pending().iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["shop/c", "shop/d"]);
        let status = r.status();
        assert_eq!((status.pending, status.counters.queued), (2, 2));
        r.flush_state().expect("state written");
        assert_eq!(state::load(&f.root.join("state")).expect("state").pending.len(), 2, "the queue is persisted");
        // Release of a queued pod is refused with the way out named.
        assert!(matches!(r.release("shop/c", "x", "y"), Err(QuarantineError::Pending { .. })));
        // Nothing is due yet.
        assert!(r.apply_due().is_empty());
        assert!(r.next_due().is_some_and(|d| d > Duration::from_secs(20)));
        // Refill (a reload to a faster rate keeps the spent tokens but refills at 6000/min).
        r.set_policy(ResponsePolicy { max_quarantines_per_minute: 6000, max_quarantines_per_namespace_per_minute: 0, ..ResponsePolicy::default() }).expect("reload");
        std::thread::sleep(Duration::from_millis(30));
        let applied = r.apply_due();
        assert_eq!(applied.iter().map(|o| (o.decision.pod.as_str(), o.decision.outcome)).collect::<Vec<_>>(), [("shop/c", Outcome::Quarantined), ("shop/d", Outcome::Quarantined)]);
        assert!(applied[0].decision.reason.contains("rate-limit queue"), "{}", applied[0].decision.reason);
        assert_eq!(applied[0].decision.alert_id, "alert-shop/c-x", "the original alert is named");
        assert_eq!(r.datapath().entries.len(), 4);
        assert!(r.pending().is_empty() && r.next_due().is_none());
        assert_eq!(r.status().counters.applied_from_queue, 2);
        r.flush_state().expect("state written");
        assert!(state::load(&f.root.join("state")).expect("state").pending.is_empty());
    }

    #[test]
    fn a_namespace_bucket_holds_back_only_its_namespace_and_keeps_order() {
        let f = Fixture::new("nsbucket");
        std::fs::create_dir_all(f.root.join("cg/other/x")).expect("mkdir");
        let policy = ResponsePolicy { max_quarantines_per_minute: 0, max_quarantines_per_namespace_per_minute: 1, ..ResponsePolicy::default() };
        let inv = inventory(&["shop/a", "shop/b", "shop/c", "other/x"]);
        let (mut r, _) = Responder::start(f.config(policy), MemoryDatapath::default(), &inv).expect("start");
        assert_eq!(r.respond(&finding("shop/a", "x", Action::Quarantine)).outcome, Outcome::Quarantined);
        let held = r.respond(&finding("shop/b", "x", Action::Quarantine));
        assert_eq!(held.outcome, Outcome::Pending);
        assert!(held.reason.contains("namespace shop"), "{}", held.reason);
        // Another namespace is not held back by shop's storm.
        assert_eq!(r.respond(&finding("other/x", "x", Action::Quarantine)).outcome, Outcome::Quarantined);
        // c queues behind b (FIFO within the namespace), and an operator can cancel b.
        assert_eq!(r.respond(&finding("shop/c", "x", Action::Quarantine)).outcome, Outcome::Pending);
        let cancelled = r.cancel("shop/b", "false positive", "alice").expect("cancel");
        assert_eq!((cancelled.alert_id.as_str(), cancelled.by.as_str()), ("alert-shop/b-x", "alice"));
        assert!(matches!(r.cancel("shop/b", "again", "alice"), Err(QuarantineError::NotPending { .. })));
        assert!(matches!(r.cancel("shop/a", "enforced", "alice"), Err(QuarantineError::Policy(_))));
        assert_eq!(r.pending().iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["shop/c"]);
        assert_eq!(r.status().counters.cancelled, 1);
        assert_eq!(r.datapath().entries.len(), 2);
    }

    #[test]
    fn a_restart_keeps_the_queue_and_what_changed_meanwhile_ends_queued_ones_with_an_outcome() {
        let f = Fixture::new("requeue");
        let policy = ResponsePolicy { max_quarantines_per_minute: 1, max_quarantines_per_namespace_per_minute: 0, ..ResponsePolicy::default() };
        let (mut r, _) = start(&f, policy.clone(), MemoryDatapath::default());
        assert_eq!(r.respond(&finding("shop/a", "x", Action::Quarantine)).outcome, Outcome::Quarantined);
        assert_eq!(r.respond(&finding("shop/b", "x", Action::Quarantine)).outcome, Outcome::Pending);
        assert_eq!(r.respond(&finding("shop/c", "x", Action::Quarantine)).outcome, Outcome::Pending);
        let map = MemoryDatapath { entries: r.datapath().entries.clone(), ..MemoryDatapath::default() };
        drop(r);
        // Restart with c gone from the inventory: b is applied from the adopted queue (fresh
        // buckets), c ends as failed, with an outcome for the alert.
        let inv = inventory(&["shop/a", "shop/b", "shop/d", "kube-system/dns"]);
        let (mut r, adoption) = Responder::start(f.config(policy), map, &inv).expect("restart");
        assert_eq!(adoption.pending.iter().map(|p| p.pod.as_str()).collect::<Vec<_>>(), ["shop/b", "shop/c"]);
        let outcomes = r.apply_due();
        let got: Vec<_> = outcomes.iter().map(|o| (o.decision.pod.as_str(), o.decision.outcome)).collect();
        assert_eq!(got, [("shop/b", Outcome::Quarantined), ("shop/c", Outcome::Failed)]);
        assert!(outcomes[1].decision.reason.contains("while the quarantine was queued"), "{}", outcomes[1].decision.reason);
        assert!(r.pending().is_empty());
        assert_eq!(r.datapath().entries.len(), 2);
    }

    #[test]
    fn an_operator_quarantines_by_hand_past_the_rate_limit_but_not_in_a_protected_namespace() {
        let f = Fixture::new("manual");
        let policy = ResponsePolicy { dry_run: true, max_quarantines_per_minute: 1, ..ResponsePolicy::default() };
        let (mut r, _) = start(&f, policy, MemoryDatapath::default());
        let d = r.add("shop/a", "seen exfiltrating", "alice", "audit-1").expect("add");
        assert_eq!((d.outcome, d.rule_id.as_str(), d.alert_id.as_str()), (Outcome::Quarantined, MANUAL_RULE, "audit-1"));
        assert!(r.datapath().entries.contains_key(&f.id("shop/a")), "enforced despite dry run");
        // Not limited by the bucket (which it does not spend either).
        assert_eq!(r.add("shop/b", "same incident", "alice", "audit-2").expect("add").outcome, Outcome::Quarantined);
        assert!(matches!(r.add("shop/a", "again", "alice", "audit-3"), Err(QuarantineError::AlreadyQuarantined { .. })));
        assert!(matches!(r.add("kube-system/dns", "x", "alice", "audit-4"), Err(QuarantineError::Refused { reason, .. }) if reason.contains("protected")));
        assert!(matches!(r.add("shop/ghost", "x", "alice", "audit-5"), Err(QuarantineError::Refused { .. })));
        assert!(matches!(r.add("nonsense", "x", "alice", "audit-6"), Err(QuarantineError::BadPodName(_))));
        let listed = r.list();
        assert_eq!(listed.iter().map(|q| (q.pod.as_str(), q.rule_id.as_str())).collect::<Vec<_>>(), [("shop/a", "manual"), ("shop/b", "manual")]);
        assert!(listed[0].reason.contains("alice") && listed[0].reason.contains("seen exfiltrating"));
    }

    #[test]
    fn release_lifts_and_audits() {
        let f = Fixture::new("release");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        let audit = r.release("shop/a", "false positive", "alice").expect("release");
        assert_eq!((audit.rule_id.as_str(), audit.by.as_str(), audit.reason.as_str()), ("reverse_shell", "alice", "false positive"));
        assert!(r.datapath().entries.is_empty() && r.list().is_empty());
        assert!(matches!(r.release("shop/a", "x", "y"), Err(QuarantineError::NotQuarantined { .. })));
        assert!(matches!(r.release("nonsense", "x", "y"), Err(QuarantineError::BadPodName(_))));
    }

    #[test]
    fn restart_adopts_and_reconciles_map_file_and_inventory() {
        let f = Fixture::new("adopt");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        for pod in ["shop/a", "shop/b", "shop/c"] {
            assert_eq!(r.respond(&finding(pod, "reverse_shell", Action::Quarantine)).outcome, Outcome::Quarantined);
        }
        // The "kernel" after a crash: a's entry lost, d set without a record, a stale id.
        let mut map = MemoryDatapath { entries: r.datapath().entries.clone(), ..MemoryDatapath::default() };
        map.entries.remove(&f.id("shop/a"));
        map.entries.insert(f.id("shop/d"), QuarantineValue::default());
        map.entries.insert(999_999_999, QuarantineValue::default());
        drop(r);
        // c left the inventory meanwhile.
        let inv = inventory(&["shop/a", "shop/b", "shop/d", "kube-system/dns"]);
        let (r, adoption) = Responder::start(f.config(ResponsePolicy::default()), map, &inv).expect("restart");
        let pods = |v: &[QuarantineRecord]| v.iter().map(|r| r.pod.clone()).collect::<Vec<_>>();
        assert_eq!(pods(&adoption.adopted), ["shop/a", "shop/b"]);
        assert_eq!(adoption.reapplied, ["shop/a"]);
        assert_eq!(pods(&adoption.recovered_from_map), ["shop/d"]);
        assert_eq!(adoption.removed.iter().map(|r| r.record.pod.as_str()).collect::<Vec<_>>(), ["shop/c"]);
        assert_eq!(adoption.stale_map_entries, [999_999_999]);
        let mut want: Vec<u64> = ["shop/a", "shop/b", "shop/d"].iter().map(|p| f.id(p)).collect();
        want.sort();
        assert_eq!(r.datapath().entries.keys().copied().collect::<Vec<_>>(), want);
        assert_eq!(pods(&r.list()), ["shop/a", "shop/b", "shop/d"]);
        assert_eq!(pods(&state::load(&f.root.join("state")).expect("state").quarantined), ["shop/a", "shop/b", "shop/d"]);
    }

    #[test]
    fn endpoint_leaving_the_inventory_takes_its_quarantine_along() {
        let f = Fixture::new("leave");
        let (mut r, _) = start(&f, ResponsePolicy::default(), MemoryDatapath::default());
        r.respond(&finding("shop/a", "reverse_shell", Action::Quarantine));
        r.respond(&finding("shop/b", "reverse_shell", Action::Quarantine));
        let removed = r.set_inventory(&inventory(&["shop/b"])).expect("inventory");
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].record.alert_id, "alert-shop/a-reverse_shell");
        assert_eq!(r.datapath().entries.keys().copied().collect::<Vec<_>>(), [f.id("shop/b")]);
    }

    #[test]
    fn unreadable_state_file_is_set_aside_and_the_map_wins() {
        let f = Fixture::new("corrupt");
        std::fs::create_dir_all(f.root.join("state")).expect("mkdir");
        std::fs::write(f.root.join("state").join(state::STATE_FILE), "{torn").expect("write");
        let mut map = MemoryDatapath::default();
        map.entries.insert(f.id("shop/a"), QuarantineValue::default());
        let (r, adoption) = start(&f, ResponsePolicy::default(), map);
        assert!(adoption.state_file_problem.is_some());
        assert_eq!(r.list().len(), 1);
        assert!(r.datapath().entries.contains_key(&f.id("shop/a")));
    }

    #[test]
    fn forensics_exception_reaches_the_datapath() {
        let f = Fixture::new("forensics");
        let policy = ResponsePolicy {
            forensics: vec![super::super::policy::ForensicsException {
                cidr: "198.18.9.0/24".into(),
                port: Some(22),
                protocol: Some(crate::inventory::Protocol::Tcp),
            }],
            ..ResponsePolicy::default()
        };
        let (r, _) = start(&f, policy, MemoryDatapath::default());
        assert_eq!(r.datapath().forensics.len(), 1);
        assert_eq!((r.datapath().forensics[0].value.port, r.datapath().forensics[0].value.protocol), (22, 6));
    }
}
