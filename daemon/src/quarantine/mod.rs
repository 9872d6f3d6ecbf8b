//! Quarantine: from a rule's `quarantine` finding to a pod cut off in the kernel (both
//! directions, established connections included), kept across daemon restarts until released.
//!
//! The daemon's use:
//! 1. At start, once the datapath maps are loaded (pinned) and before events flow:
//!    `QuarantineService::start_with(config, datapath, table)` adopts `<state_dir>/quarantine.json`
//!    and the pinned SEG_QUARANTINE map, reconciled with the endpoint table the endpoints stage
//!    published ([`Adoption`]; `start(config, datapath, &inventory)` resolves one first). The
//!    datapath is a [`KernelQuarantineMap`] (`from_ebpf(&ebpf)` or `open_pinned(pin_dir)`).
//! 2. Per rule hit: `service.respond(&Finding { hit, namespace, name, alert_id })` returns a
//!    [`Decision`] whose `outcome` (`alerted`, `quarantined`, `already_quarantined`,
//!    `would_quarantine`, `suppressed`, `failed`) and `reason` go into the alert. The map update
//!    has returned before `respond` does.
//! 3. Rate limits (token buckets per namespace under a node ceiling) queue a quarantine
//!    (`pending`), never drop or latch: the daemon runs [`api::spawn_queue_worker`], which calls
//!    `apply_due()` when `next_due()` says and alerts each [`QueueOutcome`].
//! 4. Operator (through the root-only API socket): `list()`, `pending()`, `add(pod, reason, by,
//!    alert_id)` (a quarantine by hand), `release(pod, reason, by)` (yields the audit
//!    [`ReleaseRecord`]), `cancel(pod, reason, by)` for a queued one ([`CancelRecord`]), `status()`;
//!    what dry run held back (`dry_run_list()`, `dismiss_dry_run(pod)`) and the packets dropped
//!    per quarantined pod (`note_drops` from the drop reader, `drops()`), see [`observed`].
//! 5. Changes: `set_policy(ResponsePolicy)` (hot reload), `set_endpoints(table)` (returns the
//!    quarantines that ended because their endpoint left; a re-created cgroup takes its pod's
//!    quarantine along).
//! 6. Alerts and API: [`api::alerts_for`] (rule alert + outcome), [`api::queue_alert`],
//!    [`api::removal_alert`]; [`api::QuarantineApiHandler`] implements `crate::api::QuarantineApi`
//!    (list with pending; release and cancel write their own audit alerts).
pub mod api;
pub mod cluster;
pub mod datapath;
pub mod observed;
pub mod policy;
pub mod responder;
pub mod state;

use std::sync::{Arc, Mutex, MutexGuard};

pub use datapath::{DatapathError, KernelQuarantineMap, MemoryDatapath, QuarantineDatapath};
pub use observed::{DryRunRecord, QuarantineDrops};
pub use policy::{ForensicsException, ResponsePolicy, RuleMode};
pub use responder::{
    Adoption, CancelRecord, Decision, Outcome, QuarantineError, QueueOutcome, ReleaseRecord, Removal, Responder,
    ResponderConfig, ResponderStatus, StateWrites, Finding,
};
pub use state::{PendingQuarantine, QuarantineRecord};

use crate::endpoints::EndpointTable;
use crate::inventory::Inventory;

/// The responder behind a lock, cheap to clone: the findings thread, the API server and the
/// inventory watcher share it. Every call is short (a map syscall and, on change, one small
/// file write), so a blocking lock is fine from any thread; the `*_async` forms move the call
/// off the async runtime's workers.
#[derive(Clone)]
pub struct QuarantineService {
    inner: Arc<Mutex<Responder<Box<dyn QuarantineDatapath>>>>,
}

impl QuarantineService {
    /// For callers without an endpoints stage (tests, tools); see [`Responder::start`].
    pub fn start(
        config: ResponderConfig,
        datapath: Box<dyn QuarantineDatapath>,
        inventory: &Inventory,
    ) -> Result<(QuarantineService, Adoption), QuarantineError> {
        let (responder, adoption) = Responder::start(config, datapath, inventory)?;
        Ok((QuarantineService { inner: Arc::new(Mutex::new(responder)) }, adoption))
    }

    /// Starts on the endpoint table the endpoints stage published (the daemon's way).
    pub fn start_with(
        config: ResponderConfig,
        datapath: Box<dyn QuarantineDatapath>,
        endpoints: Arc<EndpointTable>,
    ) -> Result<(QuarantineService, Adoption), QuarantineError> {
        let (responder, adoption) = Responder::start_with(config, datapath, endpoints)?;
        Ok((QuarantineService { inner: Arc::new(Mutex::new(responder)) }, adoption))
    }

    fn lock(&self) -> MutexGuard<'_, Responder<Box<dyn QuarantineDatapath>>> {
        // A panic while holding the lock cannot leave the map and the records disagreeing in a
        // dangerous way (map first, records second), so carry on with the inner value.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn respond(&self, finding: &Finding) -> Decision {
        self.lock().respond(finding)
    }

    /// Lifts a quarantine; returns once the state file without it is durable (waiting for the
    /// disk outside the lock, so findings are not held up meanwhile).
    pub fn release(&self, pod: &str, reason: &str, by: &str) -> Result<ReleaseRecord, QuarantineError> {
        let (mut record, generation, writer) = {
            let mut responder = self.lock();
            let (record, generation) = responder.release_deferred(pod, reason, by)?;
            (record, generation, responder.state_writer())
        };
        if let Err(err) = writer.wait(generation) {
            tracing::error!(%pod, %err, "released, but the state file could not be written");
            record.warning = Some(format!("released, but the state file could not be written: {err}"));
        }
        Ok(record)
    }

    /// How the state file is written after a rule's quarantine (benchmarks compare the two).
    pub fn set_state_writes(&self, mode: StateWrites) {
        self.lock().set_state_writes(mode)
    }

    /// Waits until every state change so far is on disk.
    pub fn flush_state(&self) -> Result<(), state::StateError> {
        self.lock().flush_state()
    }

    pub fn list(&self) -> Vec<QuarantineRecord> {
        self.lock().list()
    }

    pub fn add(&self, pod: &str, reason: &str, by: &str, alert_id: &str) -> Result<Decision, QuarantineError> {
        self.lock().add(pod, reason, by, alert_id)
    }

    pub fn cancel(&self, pod: &str, reason: &str, by: &str) -> Result<CancelRecord, QuarantineError> {
        self.lock().cancel(pod, reason, by)
    }

    pub fn pending(&self) -> Vec<PendingQuarantine> {
        self.lock().pending()
    }

    pub fn apply_due(&self) -> Vec<QueueOutcome> {
        self.lock().apply_due()
    }

    pub fn next_due(&self) -> Option<std::time::Duration> {
        self.lock().next_due()
    }

    pub fn status(&self) -> ResponderStatus {
        self.lock().status()
    }

    pub fn dry_run_list(&self) -> Vec<DryRunRecord> {
        self.lock().dry_run_list()
    }

    pub fn dismiss_dry_run(&self, pod: &str) -> Option<DryRunRecord> {
        self.lock().dismiss_dry_run(pod)
    }

    /// See [`Responder::note_drops`]: called by the datapath's drop reader.
    pub fn note_drops(&self, pod: &str, egress: bool, count: u64) {
        self.lock().note_drops(pod, egress, count)
    }

    pub fn drops(&self) -> std::collections::BTreeMap<String, QuarantineDrops> {
        self.lock().drops()
    }

    pub fn set_policy(&self, policy: ResponsePolicy) -> Result<(), QuarantineError> {
        self.lock().set_policy(policy)
    }

    /// Whether pods that flood their event budget are quarantined (the response policy's
    /// `quarantine_flooding_pods`).
    pub fn quarantines_flooding_pods(&self) -> bool {
        self.lock().policy().quarantine_flooding_pods
    }

    pub fn set_inventory(&self, inventory: &Inventory) -> Result<Vec<Removal>, QuarantineError> {
        self.lock().set_inventory(inventory)
    }

    pub fn set_endpoints(&self, endpoints: Arc<EndpointTable>) -> Result<Vec<Removal>, QuarantineError> {
        self.lock().set_endpoints(endpoints)
    }

    pub fn set_endpoint_ids(&self, ids: impl IntoIterator<Item = (crate::endpoints::PodKey, crate::endpoints::EndpointId)>) {
        self.lock().set_endpoint_ids(ids)
    }

    pub async fn release_async(&self, pod: String, reason: String, by: String) -> Result<ReleaseRecord, QuarantineError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.release(&pod, &reason, &by)).await {
            Ok(result) => result,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    pub async fn list_async(&self) -> Vec<QuarantineRecord> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.list()).await {
            Ok(list) => list,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    pub async fn add_async(&self, pod: String, reason: String, by: String, alert_id: String) -> Result<Decision, QuarantineError> {
        self.blocking(move |this| this.add(&pod, &reason, &by, &alert_id)).await
    }

    pub async fn cancel_async(&self, pod: String, reason: String, by: String) -> Result<CancelRecord, QuarantineError> {
        self.blocking(move |this| this.cancel(&pod, &reason, &by)).await
    }

    pub async fn pending_async(&self) -> Vec<PendingQuarantine> {
        self.blocking(|this| this.pending()).await
    }

    pub async fn dry_run_list_async(&self) -> Vec<DryRunRecord> {
        self.blocking(|this| this.dry_run_list()).await
    }

    pub async fn drops_async(&self) -> std::collections::BTreeMap<String, QuarantineDrops> {
        self.blocking(|this| this.drops()).await
    }

    pub async fn apply_due_async(&self) -> Vec<QueueOutcome> {
        self.blocking(|this| this.apply_due()).await
    }

    async fn blocking<T: Send + 'static>(&self, call: impl FnOnce(&QuarantineService) -> T + Send + 'static) -> T {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || call(&this)).await {
            Ok(value) => value,
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
}
