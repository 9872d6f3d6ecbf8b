//! Segmentation's wiring: the policy source's first set compiled and synced (with conntrack
//! configured and its sweeper running), policy changes reloaded, and the datapath's drop
//! records turned into metrics and `policy_denied` alerts.

use std::sync::Arc;

use serde_json::json;

use crate::alerts::{Alert, AlertKind};
use crate::rules::model::Severity;
use crate::status::DaemonState;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;

use super::RunArgs;
use super::sources::PolicySource;
use crate::endpoints::EndpointTable;
use crate::probes::host::ProbeHost;

/// Logs each rejected policy document (error) and each ignored field (warning).
pub(super) fn log_policy_report(report: &crate::segmentation::PolicyReport) {
    for error in &report.rejected {
        tracing::error!(%error, "policy rejected; the rest is enforced, its last good version (if any) stays");
    }
    for policy in &report.kept_last_good {
        tracing::warn!(%policy, "policy kept at its last good version");
    }
    for warning in &report.ignored {
        tracing::warn!(%warning, "policy field has no effect");
    }
    for skipped in &report.skipped {
        tracing::warn!(%skipped, "policy directory entry not loaded");
    }
    if let Some(over) = &report.over_capacity {
        tracing::error!(%over, "policy set rejected as a whole; the last good set stays enforced");
    }
}

/// How long a policy reload that rejected a file waits for a further change before alerting
/// (only then: a clean reload alerts nothing and waits for nothing).
pub(super) const POLICY_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Policy changes: files re-read (a bad file changes nothing and says why), or new sets from
/// the API. The watcher (files) lives as long as the returned value.
pub(super) fn watch_policies(state: &Arc<DaemonState>, policies: &super::sources::PolicySource) -> anyhow::Result<Option<notify::RecommendedWatcher>> {
    use super::sources::PolicySource;
    Ok(match policies {
        PolicySource::Dir(dir) => {
            let (watcher, mut changes) = crate::sys::watch_dir_changes(dir).with_context(|| format!("watching {}", dir.display()))?;
            let state = state.clone();
            tokio::spawn(async move {
                // What changed and is not reloaded yet (taken off the channel while settling,
                // or queued during a reload).
                let mut pending = PendingChanges::default();
                loop {
                    if pending.is_empty() {
                        match changes.recv().await {
                            Some(change) => pending.add(change),
                            None => break,
                        }
                    }
                    // Coalesced by what is pending, not by waiting: every change noticed so far is
                    // in this reload; changes during it make exactly one more. (A 200 ms sleep
                    // here put a floor under every policy change's latency.)
                    while let Ok(change) = changes.try_recv() {
                        pending.add(change);
                    }
                    let result = {
                        let mut enforcer = state.enforcer.lock().await;
                        match pending.take() {
                            Some(paths) => enforcer.reload_policies_changed(&paths).await,
                            None => enforcer.reload_policies().await,
                        }
                    };
                    match result {
                        Ok((_, report)) => {
                            log_policy_report(&report);
                            if let Some(alert) = crate::alerts::policy::policy_report_alert(&report) {
                                // A file caught half written (an editor writing in place) is
                                // rejected and its last good version stays; the rest of the
                                // write follows at once. Alert only when nothing follows.
                                let settling = tokio::time::timeout(POLICY_SETTLE, changes.recv()).await;
                                if let Ok(Some(change)) = settling {
                                    tracing::debug!("a rejected policy file changed again at once: reloading before alerting");
                                    pending.add(change);
                                    continue;
                                }
                                state.alerts.try_emit(alert);
                            }
                        }
                        Err(err) => {
                            tracing::error!(%err, "syncing the policies");
                            let alert = Alert::new(AlertKind::Daemon, Severity::High, format!("syncing the policies failed: {err}"))
                                .with_event(json!({"policy_sync_failed": err.to_string()}));
                            state.alerts.try_emit(alert);
                        }
                    }
                }
            });
            Some(watcher)
        }
        PolicySource::Kube(rx) => {
            let mut rx = rx.clone();
            let state = state.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let set = rx.borrow_and_update().clone();
                    if let Err(err) = state.enforcer.lock().await.set_policies(set).await {
                        tracing::error!(%err, "applying NetworkPolicies from the API");
                    }
                }
            });
            None
        }
    })
}

/// Directory changes not reloaded yet: the paths reported, or a rescan (which covers them).
#[derive(Default)]
struct PendingChanges {
    paths: std::collections::BTreeSet<std::path::PathBuf>,
    rescan: bool,
}

impl PendingChanges {
    fn add(&mut self, change: crate::sys::DirChange) {
        match change {
            crate::sys::DirChange::Paths(paths) => self.paths.extend(paths),
            crate::sys::DirChange::Rescan => self.rescan = true,
        }
    }

    fn is_empty(&self) -> bool {
        self.paths.is_empty() && !self.rescan
    }

    /// The paths to look at again, or None for every entry.
    fn take(&mut self) -> Option<Vec<std::path::PathBuf>> {
        let paths = std::mem::take(&mut self.paths);
        if std::mem::take(&mut self.rescan) { None } else { Some(paths.into_iter().collect()) }
    }
}

/// Denied flows from the datapath (rate-limited in the kernel, with counts): metrics and a
/// `policy_denied` alert per record.
pub(super) async fn spawn_drop_reader(state: &Arc<DaemonState>) -> anyhow::Result<()> {
    let ring = crate::enforcement::take_verdict_ring(&state.host).await?;
    let state = state.clone();
    tokio::spawn(async move {
        let result = crate::enforcement::read_verdicts(ring, move |verdict| {
            let direction = if verdict.direction == palisade_common::DIRECTION_INGRESS { "ingress" } else { "egress" };
            let reason = crate::alerts::policy::drop_reason(verdict.reason);
            state.metrics.add_policy_drops(direction, reason, 1 + u64::from(verdict.suppressed));
            let pod = state.endpoints.borrow().index().get(verdict.header.cgroup_id);
            if verdict.reason == palisade_common::REASON_QUARANTINE
                && let Some(pod) = pod.as_deref()
            {
                let egress = verdict.direction != palisade_common::DIRECTION_INGRESS;
                state.quarantine.note_drops(&pod.key().to_string(), egress, 1 + u64::from(verdict.suppressed));
            }
            state.alerts.try_emit(crate::alerts::policy::policy_denied_alert(&verdict, pod.as_deref()));
        })
        .await;
        if let Err(err) = result {
            tracing::error!(%err, "reading policy verdicts stopped");
        }
    });
    Ok(())
}

/// Segmentation: policies compiled against the inventory, synced into the pinned maps, the
/// cgroup_skb programs attached to every endpoint cgroup, conntrack configured and swept.
/// A rejected policy document does not stop the daemon: the rest is enforced, and the
/// rejection is logged, alerted and shown in the status.
pub(super) struct SegmentationStage {
    pub(super) enforcer: Arc<tokio::sync::Mutex<crate::enforcement::Enforcer>>,
    pub(super) conntrack: Arc<Mutex<crate::segmentation::conntrack::ConntrackStatus>>,
    pub(super) report: crate::segmentation::PolicyReport,
}

impl SegmentationStage {
    pub(super) async fn start(
        args: &RunArgs,
        policies: &PolicySource,
        host: &ProbeHost,
        table: &EndpointTable,
        cgroup_root: &Path,
        metrics: &crate::metrics::Metrics,
    ) -> anyhow::Result<SegmentationStage> {
        let inventory = table.inventory().clone();
        // The files' cache of the first load goes to the segmentation: the first change then
        // reloads what changed, not every file (at 10,000 files a second-long first reload).
        let mut policy_files = crate::segmentation::policy::PolicyFileCache::default();
        let (initial_policies, policy_report) = match policies {
            PolicySource::Dir(dir) => {
                let loaded = crate::segmentation::PolicySet::load_each_cached(&[dir], &mut policy_files);
                let report = crate::segmentation::PolicyReport::new(&loaded, &loaded.set, Vec::new());
                (loaded.set, report)
            }
            PolicySource::Kube(rx) => (rx.borrow().clone(), Default::default()),
        };
        let conntrack_settings = crate::segmentation::conntrack::ConntrackSettings {
            established_flows: args.established_flows,
            per_pod: args.conntrack_per_pod,
            ..Default::default()
        };
        let sweeper = host
            .with(move |ebpf| -> Result<_, crate::segmentation::conntrack::ConntrackError> {
                crate::segmentation::conntrack::configure(ebpf, &conntrack_settings)?;
                Ok(crate::segmentation::conntrack::Sweeper::new(ebpf)?)
            })
            .await?
            .context("configuring connection tracking")?;
        log_policy_report(&policy_report);
        let conntrack = crate::segmentation::conntrack::spawn_sweeper(sweeper, conntrack_settings, std::time::Duration::from_secs(5))
            .context("starting the conntrack sweeper")?;
        let enforcer = crate::enforcement::Enforcer::start(
            host.clone(),
            inventory.clone(),
            initial_policies,
            policy_report.clone(),
            match policies {
                PolicySource::Dir(dir) => vec![dir.clone()],
                PolicySource::Kube(_) => Vec::new(),
            },
            args.pin_dir.join("links"),
            cgroup_root.to_path_buf(),
            {
                let mut capacity = crate::segmentation::Capacity::default();
                capacity.policy = args.max_policy_entries.unwrap_or(capacity.policy).min(capacity.policy);
                capacity
            },
            super::sources::pods_parent(args, cgroup_root, &inventory),
            Some(metrics.clone()),
        )
        .await
        .context("enforcing the policies")?;
        let mut enforcer = enforcer;
        enforcer.set_policy_file_cache(policy_files);
        Ok(SegmentationStage { enforcer: Arc::new(tokio::sync::Mutex::new(enforcer)), conntrack, report: policy_report })
    }
}
