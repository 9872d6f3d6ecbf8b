//! `palisade run`: wires the stages together. `run_async` reads as the list of stages in the
//! order they start; each stage's wiring is in a submodule (`sources`, `probes`, `rules`,
//! `segmentation`, `quarantine`, `findings`, `pipeline`, `monitors`), the shared state and its
//! rendering in `crate::status`.
//!
//! kernel ring buffer -> reader (tokio) -> pipeline thread (enrich, input, --record) ->
//! rule workers -> findings thread (alerts, responder); protected events (the priority ring) are
//! judged and acted on by the pipeline thread itself, without the pool's queue. The eBPF object
//! has one owner task (`ProbeHost`); inventory and rules changes arrive through their watchers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

mod monitors;
pub mod operator;
mod pipeline;
mod probes;
mod quarantine;
mod rules;
mod segmentation;
mod sources;
mod findings;

use probes::ProbesStage;
use quarantine::{start_quarantine, watch_response_policy};
use rules::RulesStage;
use segmentation::SegmentationStage;
use sources::Sources;

use crate::alerts::AlertOptions;
use crate::api::{ApiState, status_provider};
use crate::endpoints::EndpointsStage;
use crate::events::loss::LossMonitor;
use crate::events::reader::{QueueDrops, ReaderStats};
use crate::metrics::Metrics;
use crate::probes::loader::EventBudgets;
use crate::status::{DaemonState, PipelineStats, Startup, now_rfc3339, status_json};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Endpoint inventory (YAML), watched for changes. Default: the embedded lab example.
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// Rules directory, watched for changes. Default: the embedded default rule pack.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Accept a rules directory with no rules (nothing is judged); otherwise it is rejected.
    #[arg(long)]
    pub allow_empty_rules: bool,
    /// NetworkPolicy directory. Default: the embedded example policies.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// State directory: API socket, alert log, quarantine set.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Write every event, as the rule engine receives it, to this JSONL file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Bring up a local lab pod for every inventory endpoint first (standalone demo mode), in
    /// the lab named NAME (`--lab` alone: the default lab).
    #[arg(long, num_args = 0..=1, default_missing_value = crate::lab::DEFAULT_LAB_NAME, value_name = "NAME")]
    pub lab: Option<String>,
    /// The old spelling of the lab's name (`--lab --lab-name NAME`), kept for scripts.
    #[arg(long, hide = true, requires = "lab")]
    pub lab_name: Option<String>,
    /// Host mode: report every process on the host, not only monitored pods.
    #[arg(long)]
    pub host: bool,
    /// Do not attach kprobes even where the kernel allows them.
    #[arg(long)]
    pub no_kprobes: bool,
    /// The cgroup (relative to the cgroup2 mount) the datapath is attached at for every pod
    /// below it, so a new pod is judged from its first packet: until its endpoint is written
    /// it gets only traffic inside itself (the fail-closed default). `auto`: in Kubernetes mode
    /// the kubelet's pods root of this node's pods (kubepods.slice, kubepods, or below a kubelet
    /// --cgroup-root), with --lab the lab's pods parent, none otherwise; `none`: attach per pod
    /// only.
    #[arg(long, default_value = "auto")]
    pub pods_cgroup: String,
    /// bpffs directory for the pinned datapath maps (enforcement survives restarts).
    #[arg(long, default_value = crate::probes::loader::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Rule evaluation worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Quarantine response policy (YAML: dry_run, rules, protected_namespaces,
    /// max_quarantines_per_minute, forensics), watched for changes.
    #[arg(long)]
    pub response_policy: Option<PathBuf>,
    /// Dry run: report `would_quarantine` instead of cutting pods off (rules explicitly set to
    /// quarantine in the response policy excepted).
    #[arg(long)]
    pub dry_run: bool,
    /// Kubernetes mode: pods on this node, namespaces and NetworkPolicies come from the API
    /// server (in-cluster config or KUBECONFIG) instead of --inventory and --policies.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name (Kubernetes mode; the DaemonSet passes it from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes mode: where the pods of other nodes (policy peers) come from: `pods` watches
    /// every Pod of the cluster (small clusters), `slices` the PeerSlice records `palisade
    /// operator` publishes (docs/peer-records.md).
    #[arg(long, value_enum, default_value_t = crate::k8s::PeerMode::Pods)]
    pub peers: crate::k8s::PeerMode,
    /// What a policy change does to open connections: `strict` judges each again at its next
    /// packet (those the new policy does not allow stop), `keep` lets them run until they close
    /// or idle out (connection-setup-only semantics).
    #[arg(long, value_enum, default_value_t = crate::segmentation::conntrack::EstablishedFlows::Strict)]
    pub established_flows: crate::segmentation::conntrack::EstablishedFlows,
    /// Connection-tracking entries one pod may hold (of 262,144 per node); its new flows past
    /// that are refused and counted, other pods' connections are untouched.
    #[arg(long, default_value_t = palisade_common::CT_DEFAULT_PER_ENDPOINT_MAX)]
    pub conntrack_per_pod: u32,
    /// Use at most this many POLICY map entries (at most the map's size): headroom for the
    /// operator, and how tests reach the capacity limit without a million entries.
    #[arg(long, hide = true)]
    pub max_policy_entries: Option<usize>,
    /// Seconds the event reader or the pipeline may sit on waiting work without moving before
    /// the daemon counts as stuck: /healthz answers 503 (so the kubelet restarts it), status
    /// shows the stage, a critical alert is raised.
    #[arg(long, default_value_t = crate::liveness::DEFAULT_STUCK_AFTER.as_secs_f64(), value_parser = stuck_after_seconds)]
    pub stuck_after: f64,
    #[command(flatten)]
    pub alerts: AlertOptions,
    #[command(flatten)]
    pub budgets: EventBudgets,
}

impl RunArgs {
    /// The lab to bring up first, if any: `--lab [NAME]`, or the old `--lab --lab-name NAME`.
    pub fn lab_name(&self) -> Option<&str> {
        self.lab_name.as_deref().or(self.lab.as_deref())
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("palisade")
        .build()
        .context("starting the tokio runtime")?;
    let pin_dir = args.pin_dir.clone();
    let pins_before = pinned_entries(&pin_dir);
    let running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = runtime.block_on(run_async(args, running.clone()));
    // Blocking tasks (the eBPF owner, watchers, follow streams) are not waited for: what
    // enforces is pinned in the kernel, and run_async flushed the alert log and the state file.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    if result.is_err() && !running.load(std::sync::atomic::Ordering::Relaxed) {
        after_failed_start(&pin_dir, &pins_before);
    }
    result
}

/// What the pin directory holds (map pins and `links`), by name; empty when it does not exist.
fn pinned_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A start that failed before it was running: when the pin directory was empty or missing
/// before it, what it pinned there goes (nothing was in force, and a later start must not
/// adopt maps and links that never enforced anything); otherwise the pins stay, because they
/// are what the previous run put in force, and the log says so.
fn after_failed_start(dir: &Path, before: &[String]) {
    let now = pinned_entries(dir);
    if now.is_empty() {
        return;
    }
    if !before.is_empty() {
        tracing::warn!(
            pin_dir = %dir.display(),
            pins = %now.join(", "),
            "start failed; kept the pins: they hold what the previous run put in force (policies, \
             quarantines, the datapath on pods), which stays enforced until a start succeeds; removing \
             them would open isolated pods and release quarantined ones"
        );
        return;
    }
    let links = std::fs::read_dir(dir.join("links")).map(|entries| entries.count()).unwrap_or(0);
    // Unpinning a link detaches it once this process (its last holder) exits.
    match std::fs::remove_dir_all(dir) {
        Ok(()) => tracing::warn!(
            pin_dir = %dir.display(),
            removed = %now.join(", "),
            link_pins = links,
            "start failed; removed what this start pinned (the pin directory was empty before it, so nothing was in force): {}",
            now.join(", ")
        ),
        Err(err) => tracing::error!(
            pin_dir = %dir.display(),
            %err,
            left = %pinned_entries(dir).join(", "),
            "start failed, and removing what this start pinned failed; remove the directory by hand"
        ),
    }
}

/// `--stuck-after`: seconds, at least 0.5 (below that a busy scheduler looks like a stall).
fn stuck_after_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if !(0.5..=86_400.0).contains(&seconds) {
        return Err(format!("{seconds}: must be between 0.5 and 86400 seconds"));
    }
    Ok(seconds)
}

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    Ok(())
}

/// `palisade run`: the stages in the order they start. Each starts itself (`start`) and hands
/// on what later stages read; the order matters where a later stage needs an earlier one's
/// first state (the rules' kinds before the probes attach, the first policy sync before the
/// quarantine responder adopts the pinned map, everything before events flow).
async fn run_async(args: RunArgs, running: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    anyhow::ensure!(crate::sys::is_root(), "palisade run needs root (eBPF, cgroups, network namespaces)");
    prepare_state_dir(&args.state_dir)?;
    let defaults_dir = args.state_dir.join("defaults");
    let metrics = Metrics::new();
    let startup = start_metrics_listener(&args, &metrics);
    let cgroup_root = crate::sys::cgroup2_mount().context("finding the cgroup2 mount")?;

    startup.enter("sources");
    let mut sources = Sources::start(&args, &defaults_dir, &cgroup_root).await?;
    sources.bring_up_lab(&args)?;
    // Endpoints: the one place cgroups are resolved; every later stage reads its table.
    let endpoints = EndpointsStage::start(sources.inventory_rx.clone(), cgroup_root.clone());
    let table = endpoints.borrow().clone();

    startup.enter("rules");
    let rules = RulesStage::load(&args, &defaults_dir)?;
    startup.enter("probes");
    let mut probes = ProbesStage::start(&args, &rules, &table).await?;
    startup.enter("policies");
    let segmentation = SegmentationStage::start(&args, &sources.policies, &probes.host, &table, &cgroup_root, &metrics).await?;

    startup.enter("alerts and quarantine");
    let node = crate::sys::hostname();
    let (alert_log, alerts, exports) = args.alerts.start(&args.state_dir, &node, &metrics).context("starting the alert log")?;
    if let Some(alert) = crate::alerts::policy::policy_report_alert(&segmentation.report) {
        alerts.try_emit(alert);
    }
    let quarantine = start_quarantine(&args, &probes.host, &cgroup_root, &table, &segmentation.enforcer).await?;

    let state = Arc::new(DaemonState {
        node,
        endpoints: endpoints.clone(),
        reader: Arc::new(ReaderStats::default()),
        queue_drops: Arc::new(QueueDrops::default()),
        queue_budget: Arc::new(pipeline::queue_budget()),
        losses: Mutex::new(LossMonitor::new(std::time::Duration::from_secs(10))),
        rules: rules.handle.clone(),
        rules_last_reload: Mutex::new(json!({"result": "loaded", "dir": rules.dir.display().to_string()})),
        host: probes.host.clone(),
        pipeline: PipelineStats::default(),
        enforcer: segmentation.enforcer.clone(),
        quarantine: quarantine.clone(),
        alerts: alerts.clone(),
        metrics: metrics.clone(),
        conntrack: segmentation.conntrack.clone(),
        started: now_rfc3339(),
        kube_health: sources.kube.as_ref().map(|k| k.health()),
        liveness: crate::liveness::Liveness::new(std::time::Duration::from_secs_f64(args.stuck_after)),
        quarantine_watch: Arc::default(),
    });
    // Kubernetes mode: alerts about a pod also become Events on it (`--alert-events`).
    if let (Some(kube), Some(min_severity)) = (sources.kube.as_ref(), args.alerts.alert_events.0) {
        let events = crate::k8s::ClusterAlertEvents::new(kube.client(), kube.node(), crate::k8s::AlertEventsConfig::default());
        let exporter = crate::alerts::kube_events::KubeEventExporter::start(events, min_severity, Some(metrics.clone()));
        let _ = exports.kube_events.set(exporter);
    }
    let quarantine_api = quarantine::start_api_handler(&mut sources, &state);
    start_api(&args, &state, exports, quarantine_api)?;
    monitors::spawn_counter_exporter(state.clone());
    crate::quarantine::api::spawn_queue_worker(quarantine.clone(), alerts.clone(), metrics.clone());
    monitors::spawn_loss_monitor(state.clone());
    monitors::spawn_liveness_watch(state.clone());

    let evaluator = findings::start(&state, args.workers)?;
    let _rules_watcher = rules.watch(&state)?;
    let _policies_watcher = segmentation::watch_policies(&state, &sources.policies)?;
    segmentation::spawn_drop_reader(&state).await?;
    // Endpoint table changes: segmentation, quarantine and the monitored set follow.
    monitors::spawn_endpoint_followers(state.clone(), endpoints);
    let _response_policy_watcher = watch_response_policy(&args, &state)?;
    let reader_running = pipeline::start(&args, &state, probes.take_rings()?, evaluator)?;

    startup.running(state.clone(), reader_running);
    running.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(state_dir = %args.state_dir.display(), "palisade is running");
    wait_for_shutdown().await?;
    stop(&state, &args.pin_dir, alert_log).await;
    Ok(())
}

/// The metrics listener opens first, so the kubelet's probes see a slow start-up as
/// "starting" (503 on /healthz and /readyz, with the phase) rather than as a dead port.
fn start_metrics_listener(args: &RunArgs, metrics: &Metrics) -> Arc<Startup> {
    let startup = Arc::new(Startup::default());
    if !args.alerts.no_metrics {
        let (addr, metrics, startup) = (args.alerts.metrics_addr, metrics.clone(), startup.clone());
        let health = crate::api::health_provider(move || {
            let startup = startup.clone();
            async move { startup.health().await }
        });
        tokio::spawn(async move {
            if let Err(err) = crate::api::serve_metrics(addr, metrics, health).await {
                tracing::error!(%err, %addr, "metrics listener stopped");
            }
        });
    }
    startup
}

/// The root-only API socket: status, alerts, quarantine operations.
fn start_api(
    args: &RunArgs,
    state: &Arc<DaemonState>,
    exports: crate::alerts::Exports,
    quarantine_api: Arc<dyn crate::api::QuarantineApi>,
) -> anyhow::Result<()> {
    let listener = crate::api::bind(&args.state_dir.join(crate::api::SOCKET_NAME)).context("binding the API socket")?;
    let api_state = {
        let status_state = state.clone();
        ApiState::new(state.alerts.clone())
            .with_status(status_provider(move || {
                let state = status_state.clone();
                let exports = exports.clone();
                async move {
                    let mut status = status_json(&state).await;
                    status["exports"] = serde_json::to_value(exports.stats()).unwrap_or_default();
                    status
                }
            }))
            .with_quarantine(quarantine_api)
            .with_metrics(state.metrics.clone())
    };
    tokio::spawn(async move {
        if let Err(err) = crate::api::serve_on(listener, api_state).await {
            tracing::error!(%err, "API server stopped");
        }
    });
    Ok(())
}

/// What stays in force says so in the log; the state file and the alert log are flushed.
async fn stop(state: &DaemonState, pin_dir: &Path, alert_log: crate::alerts::AlertLog) {
    let stopping = std::time::Instant::now();
    let quarantined = state.quarantine.list().len();
    let (attached, pods_parent) = {
        let enforcer = state.enforcer.lock().await;
        (enforcer.status.attached_cgroups, enforcer.status.pods_parent.as_ref().filter(|p| p.attached).map(|p| p.cgroup.clone()))
    };
    tracing::info!(
        pin_dir = %pin_dir.display(),
        quarantined,
        attached_endpoints = attached,
        pods_parent = pods_parent.as_deref().unwrap_or("none"),
        "stopping; in force in the kernel until the next start (pinned maps and links): the policies, \
         {quarantined} quarantine(s), the datapath on {attached} endpoint(s){}",
        match &pods_parent {
            Some(p) => format!(", and the fail-closed default for new pods below {p}"),
            None => String::new(),
        }
    );
    if let Err(err) = state.quarantine.flush_state() {
        tracing::error!(%err, "writing the quarantine state file at shutdown (the pinned map keeps the quarantines)");
    }
    alert_log.shutdown().await;
    tracing::info!(took_ms = stopping.elapsed().as_millis() as u64, "stopped");
}

/// SIGINT or SIGTERM.
async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    Ok(())
}


