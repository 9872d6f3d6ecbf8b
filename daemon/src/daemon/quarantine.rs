//! The quarantine responder's wiring: started after the first policy sync (it adopts the state
//! file and the pinned map before events flow), and its response policy reloaded on change.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;

use super::RunArgs;
use crate::alerts::{Alert, AlertKind};
use crate::endpoints::EndpointTable;
use crate::probes::host::ProbeHost;
use crate::quarantine::{KernelQuarantineMap, QuarantineService, ResponderConfig, ResponsePolicy};
use crate::rules::model::Severity;
use crate::status::DaemonState;

/// The quarantine responder, after it adopted what the state file and the pinned map hold
/// (before events flow), with the endpoint ids of the first policy sync.
pub(super) async fn start_quarantine(
    args: &RunArgs,
    host: &ProbeHost,
    cgroup_root: &Path,
    table: &Arc<EndpointTable>,
    enforcer: &tokio::sync::Mutex<crate::enforcement::Enforcer>,
) -> anyhow::Result<QuarantineService> {
    let mut response_policy = match &args.response_policy {
        Some(path) => load_response_policy(path)?,
        None => ResponsePolicy::default(),
    };
    response_policy.dry_run |= args.dry_run;
    let quarantine_map = host.with(|ebpf| KernelQuarantineMap::from_ebpf(ebpf)).await??;
    let (quarantine, adoption) = QuarantineService::start_with(
        ResponderConfig { state_dir: args.state_dir.clone(), cgroup_root: cgroup_root.to_path_buf(), policy: response_policy },
        Box::new(quarantine_map),
        table.clone(),
    )
    .context("starting the quarantine responder")?;
    tracing::info!(?adoption, "quarantine state adopted");
    quarantine.set_endpoint_ids(enforcer.lock().await.compiled().endpoints.values().map(|ep| (ep.pod_key(), ep.endpoint_id())));
    Ok(quarantine)
}

/// Response policy changes (dry run, per-rule modes, guardrails, forensics): reloaded as a
/// whole; a file that does not parse or validate changes nothing and says why.
pub(super) fn watch_response_policy(args: &RunArgs, state: &Arc<DaemonState>) -> anyhow::Result<Option<notify::RecommendedWatcher>> {
    let Some(path) = &args.response_policy else { return Ok(None) };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let (watcher, mut changes) = crate::sys::watch_dir(&dir).with_context(|| format!("watching {}", dir.display()))?;
    let (state, path, force_dry_run) = (state.clone(), path.clone(), args.dry_run);
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        while changes.recv().await.is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            while changes.try_recv().is_ok() {}
            let current = std::fs::read(&path).ok();
            if current == last {
                continue;
            }
            last = current;
            let result = load_response_policy(&path).and_then(|mut policy| {
                policy.dry_run |= force_dry_run;
                state.quarantine.set_policy(policy).map_err(anyhow::Error::from)
            });
            match result {
                Ok(()) => tracing::info!(path = %path.display(), "response policy reloaded"),
                Err(err) => {
                    tracing::error!(%err, "response policy rejected; the previous one stays");
                    let alert = Alert::new(AlertKind::Daemon, Severity::High, format!("response policy rejected, the previous one stays: {err:#}"));
                    state.alerts.try_emit(alert);
                }
            }
        }
    });
    Ok(Some(watcher))
}

pub(super) fn load_response_policy(path: &Path) -> anyhow::Result<ResponsePolicy> {
    ResponsePolicy::load(path).map_err(anyhow::Error::msg)
}

/// The quarantine API: the root-only socket and, in Kubernetes mode, the Quarantine resource
/// use the same handler (one release path, one audit alert); API releases reach the
/// Kubernetes mirror, which posts the Released Event (who, why) and deletes the object.
pub(super) fn start_api_handler(sources: &mut super::sources::Sources, state: &DaemonState) -> Arc<dyn crate::api::QuarantineApi> {
    let mut quarantine_api =
        crate::quarantine::api::QuarantineApiHandler::new(state.quarantine.clone(), state.alerts.clone()).with_metrics(state.metrics.clone());
    let mut cluster_releases = None;
    if sources.kube.is_some() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        quarantine_api = quarantine_api.with_release_notices(tx);
        cluster_releases = Some(rx);
    }
    let quarantine_api: Arc<dyn crate::api::QuarantineApi> = Arc::new(quarantine_api);
    if let (Some(kube), Some(rx)) = (sources.kube.as_mut(), cluster_releases) {
        let cluster = crate::quarantine::cluster::ClusterQuarantine {
            quarantine: state.quarantine.clone(),
            alerts: state.alerts.clone(),
            metrics: state.metrics.clone(),
            endpoints: state.endpoints.clone(),
            watch_health: state.quarantine_watch.clone(),
        };
        cluster.spawn(kube, rx, quarantine_api.clone());
    }
    quarantine_api
}
