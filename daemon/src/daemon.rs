//! `palisade run`: wires the stages together.
//!
//! kernel ring buffer -> reader (tokio) -> pipeline thread (enrich, input, --record) ->
//! rule workers -> verdict thread (alerts, responder); protected events (the priority ring) are
//! judged and acted on by the pipeline thread itself, without the pool's queue. The eBPF object
//! has one owner task (`ProbeHost`); inventory and rules changes arrive through their watchers.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use tokio::sync::mpsc;

use crate::alerts::{Alert, AlertKind, AlertOptions, Outcome};
use crate::api::{ApiState, status_provider};
use crate::status::{DaemonState, PipelineStats, Startup, now_rfc3339, status_json};
use crate::endpoints::{EndpointTable, EndpointsStage};
use crate::events::context::EventContext;
use crate::events::decode::Event;
use crate::events::enrich::{ProcCache, enrich};
use crate::events::input::{Clock, to_input};
use crate::events::kind::EventKind;
use crate::events::loss::LossMonitor;
use crate::events::reader::{self, QueueBudget, QueueDrops, Queued, ReaderStats};
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::probes::host::ProbeHost;
use crate::probes::loader::{self, EventBudgets, LoadOptions};
use crate::quarantine::{KernelQuarantineMap, QuarantineService, ResponderConfig, ResponsePolicy, Verdict};
use crate::rules::evaluator::{EvaluatorConfig, PackHandle, RuleEvaluator};
use crate::rules::model::Severity;
use crate::rules::pack::{PackOptions, RulePack};
use crate::rules::watch::RulesNotification;

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

/// Kernel kinds needed by a rule pack (exec and exit always: they keep the process cache right).
fn kinds_for(pack: &RulePack) -> Vec<EventKind> {
    let mut kinds: BTreeSet<EventKind> = pack.subscribed_types();
    // The process cache is built from these (ancestry, context that outlives the process).
    kinds.insert(EventKind::Exec);
    kinds.insert(EventKind::Fork);
    kinds.insert(EventKind::Exit);
    kinds.into_iter().collect()
}

fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating state directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    Ok(())
}

async fn run_async(args: RunArgs, running: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<()> {
    anyhow::ensure!(crate::sys::is_root(), "palisade run needs root (eBPF, cgroups, network namespaces)");
    prepare_state_dir(&args.state_dir)?;
    let defaults_dir = args.state_dir.join("defaults");

    // The metrics listener opens first, so the kubelet's probes see a slow start-up as
    // "starting" (503 on /healthz and /readyz, with the phase) rather than as a dead port.
    let metrics = Metrics::new();
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

    let cgroup_root = crate::sys::cgroup2_mount().context("finding the cgroup2 mount")?;

    // Endpoints and policies: the Kubernetes API, or an inventory file (default: the embedded
    // lab example) and a policy directory (default: the embedded examples).
    startup.enter("sources");
    let mut sources = Sources::start(&args, &defaults_dir, &cgroup_root).await?;

    if let Some(lab_name) = args.lab_name() {
        let inventory = sources.inventory_rx.borrow().clone();
        let lab = crate::lab::Lab::up(&inventory, &crate::lab::LabOptions::named(lab_name))
            .context("bringing up the lab")?;
        tracing::info!(lab = lab.name(), pods = lab.pods().len(), "lab is up");
    }
    // Endpoints: the one place cgroups are resolved; every later stage reads its table.
    let endpoints = EndpointsStage::start(sources.inventory_rx.clone(), cgroup_root.clone());
    let table = endpoints.borrow().clone();
    let inventory = table.inventory().as_ref().clone();

    // Rules: compiled before the probes start so the enabled kinds are right from the start.
    startup.enter("rules");
    let rules_dir = match &args.rules {
        Some(dir) => dir.clone(),
        None => crate::defaults::materialize(&defaults_dir.join("rules"), crate::defaults::DEFAULT_RULES)?,
    };
    let rule_options = PackOptions { allow_empty: args.allow_empty_rules, ..PackOptions::default() };
    let pack = RulePack::load_with(&rules_dir, &rule_options).map_err(|e| anyhow::anyhow!("rule pack {}:\n{}", rules_dir.display(), e.lines().join("\n")))?;
    let kinds = kinds_for(&pack);
    tracing::info!(rules = pack.rules().len(), dir = %rules_dir.display(), "rule pack loaded");
    let rules = PackHandle::new(pack);

    // Probes.
    startup.enter("probes");
    let options = LoadOptions {
        monitor_all: args.host,
        try_kprobes: !args.no_kprobes,
        pin_dir: Some(args.pin_dir.clone()),
        budgets: Some(args.budgets),
    };
    let mut probes = loader::load(&options).context("loading the eBPF programs")?;
    probes.attach_all(&options).context("attaching the eBPF programs")?;
    for status in &probes.programs {
        tracing::debug!(program = %status.program, target = %status.target, state = ?status.state, "program");
    }
    let ring = probes.take_ring_buffer()?;
    let priority_ring = probes.take_priority_ring_buffer()?;
    let host = ProbeHost::spawn(probes);
    host.set_enabled_kinds(kinds).await?;
    set_sensitive_prefixes(&host, &rules_dir, rules.current().connect_ports()).await?;

    host.set_monitored(table.monitored()).await?;

    // Segmentation: policies compiled against the inventory, synced into the pinned maps, the
    // cgroup_skb programs attached to every endpoint cgroup.
    // A rejected policy document does not stop the daemon: the rest is enforced, and the
    // rejection is logged, alerted (below) and shown in the status.
    startup.enter("policies");
    let (initial_policies, policy_report) = match &sources.policies {
        PolicySource::Dir(dir) => {
            let loaded = crate::segmentation::PolicySet::load_each(&[dir]);
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
        match &sources.policies {
            PolicySource::Dir(dir) => vec![dir.clone()],
            PolicySource::Kube(_) => Vec::new(),
        },
        args.pin_dir.join("links"),
        cgroup_root.clone(),
        {
            let mut capacity = crate::segmentation::Capacity::default();
            capacity.policy = args.max_policy_entries.unwrap_or(capacity.policy).min(capacity.policy);
            capacity
        },
        pods_parent(&args, &cgroup_root, &inventory),
    )
    .await
    .context("enforcing the policies")?;
    let enforcer = Arc::new(tokio::sync::Mutex::new(enforcer));

    // Alerts: the log in the state directory (rotation, aggregation, loss accounting), exports.
    startup.enter("alerts and quarantine");
    let node = crate::sys::hostname();
    let (alert_log, alerts, exports) = args.alerts.start(&args.state_dir, &node, &metrics).context("starting the alert log")?;
    if let Some(alert) = crate::alerts::policy::policy_report_alert(&policy_report) {
        alerts.try_emit(alert);
    }

    // Quarantine: adopt what the state file and the pinned map hold before events flow.
    let mut response_policy = match &args.response_policy {
        Some(path) => load_response_policy(path)?,
        None => ResponsePolicy::default(),
    };
    response_policy.dry_run |= args.dry_run;
    let quarantine_map = host.with(|ebpf| KernelQuarantineMap::from_ebpf(ebpf)).await??;
    let (quarantine, adoption) = QuarantineService::start_with(
        ResponderConfig { state_dir: args.state_dir.clone(), cgroup_root: cgroup_root.clone(), policy: response_policy },
        Box::new(quarantine_map),
        table.clone(),
    )
    .context("starting the quarantine responder")?;
    tracing::info!(?adoption, "quarantine state adopted");
    quarantine.set_endpoint_ids(enforcer.lock().await.compiled().endpoints.values().map(|ep| (ep.pod_key(), ep.endpoint_id())));

    let state = Arc::new(DaemonState {
        node,
        endpoints: endpoints.clone(),
        reader: Arc::new(ReaderStats::default()),
        queue_drops: Arc::new(QueueDrops::default()),
        queue_budget: Arc::new(QueueBudget::new(BULK_QUEUE_BYTES, BULK_QUEUE_BYTES_PER_POD, PRIORITY_QUEUE_BYTES)),
        losses: Mutex::new(LossMonitor::new(std::time::Duration::from_secs(10))),
        rules: rules.clone(),
        rules_last_reload: Mutex::new(json!({"result": "loaded", "dir": rules_dir.display().to_string()})),
        host: host.clone(),
        pipeline: PipelineStats::default(),
        enforcer: enforcer.clone(),
        quarantine: quarantine.clone(),
        alerts: alerts.clone(),
        metrics: metrics.clone(),
        conntrack,
        started: now_rfc3339(),
        kube_health: sources.kube.as_ref().map(|k| k.health()),
    });
    // The quarantine API: the root-only socket and, in Kubernetes mode, the Quarantine resource
    // use the same handler (one release path, one audit alert); API releases reach the
    // Kubernetes mirror, which posts the Released Event (who, why) and deletes the object.
    let mut quarantine_api = crate::quarantine::api::QuarantineApiHandler::new(quarantine.clone(), alerts.clone()).with_metrics(metrics.clone());
    let mut cluster_releases = None;
    if sources.kube.is_some() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        quarantine_api = quarantine_api.with_release_notices(tx);
        cluster_releases = Some(rx);
    }
    let quarantine_api: Arc<dyn crate::api::QuarantineApi> = Arc::new(quarantine_api);
    if let (Some(kube), Some(min_severity)) = (sources.kube.as_ref(), args.alerts.alert_events.0) {
        let events = crate::k8s::ClusterAlertEvents::new(kube.client(), kube.node(), crate::k8s::AlertEventsConfig::default());
        let exporter = crate::alerts::kube_events::KubeEventExporter::start(events, min_severity, Some(metrics.clone()));
        let _ = exports.kube_events.set(exporter);
    }
    if let (Some(kube), Some(rx)) = (sources.kube.as_mut(), cluster_releases) {
        let cluster = crate::quarantine::cluster::ClusterQuarantine {
            quarantine: quarantine.clone(),
            alerts: alerts.clone(),
            metrics: metrics.clone(),
            endpoints: endpoints.clone(),
        };
        cluster.spawn(kube, rx, quarantine_api.clone());
    }

    // The root-only API socket and the metrics listener.
    let listener = crate::api::bind(&args.state_dir.join(crate::api::SOCKET_NAME)).context("binding the API socket")?;
    let api_state = {
        let state = state.clone();
        let exports = exports.clone();
        ApiState::new(alerts.clone())
            .with_status(status_provider(move || {
                let state = state.clone();
                let exports = exports.clone();
                async move {
                    let mut status = status_json(&state).await;
                    status["exports"] = serde_json::to_value(exports.stats()).unwrap_or_default();
                    status
                }
            }))
            .with_quarantine(quarantine_api.clone())
            .with_metrics(metrics.clone())
    };
    tokio::spawn(async move {
        if let Err(err) = crate::api::serve_on(listener, api_state).await {
            tracing::error!(%err, "API server stopped");
        }
    });
    // Cleared when the event reader task ends: the daemon is blind then, and /healthz says so.
    let reader_running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    spawn_counter_exporter(state.clone());
    crate::quarantine::api::spawn_queue_worker(quarantine.clone(), alerts.clone(), metrics.clone());
    spawn_loss_monitor(state.clone());

    // Rule workers and the verdict thread: alert, decide (quarantine), record the outcome.
    let (evaluator, verdicts) = RuleEvaluator::start(rules.clone(), EvaluatorConfig { workers: args.workers.max(1), ..EvaluatorConfig::default() })?;
    {
        let state = state.clone();
        std::thread::Builder::new().name("palisade-verdicts".into()).spawn(move || {
            let mut failure_alerts = crate::rules::failures::FailureLimiter::default();
            for evaluation in verdicts {
                act_on(&state, &mut failure_alerts, evaluation);
            }
        })?;
    }

    // Rules hot reload: swap, switch kernel kinds, report rejections as alerts.
    let _rules_watcher = {
        let state = state.clone();
        let rules_dir_for_reload = rules_dir.clone();
        let runtime = tokio::runtime::Handle::current();
        crate::rules::watch::watch(&rules_dir, rule_options.clone(), rules.clone(), move |note| {
            match &note {
                RulesNotification::Reloaded { .. } => {
                    state.metrics.record_rule_reload(true);
                    let kinds = kinds_for(&state.rules.current());
                    let host = state.host.clone();
                    let rules_dir = rules_dir_for_reload.clone();
                    let connect_ports = state.rules.current().connect_ports();
                    runtime.spawn(async move {
                        if let Err(err) = host.set_enabled_kinds(kinds).await {
                            tracing::error!(%err, "switching kernel event kinds after a rules reload");
                        }
                        if let Err(err) = set_sensitive_prefixes(&host, &rules_dir, connect_ports).await {
                            tracing::error!(%err, "updating the sensitive path prefixes after a rules reload; the previous ones stay");
                        }
                    });
                }
                RulesNotification::RulesRejected { errors, kept_generation } => {
                    state.metrics.record_rule_reload(false);
                    let alert = Alert::new(
                        AlertKind::RulesRejected,
                        Severity::High,
                        format!("rule pack rejected, generation {kept_generation} stays in force: {}", errors.join("; ")),
                    )
                    .with_event(json!({"errors": errors, "kept_generation": kept_generation}));
                    state.alerts.try_emit(alert);
                }
            }
            if let Ok(mut last) = state.rules_last_reload.lock() {
                *last = serde_json::to_value(&note).unwrap_or_default();
            }
        })?
    };

    // Policy changes: files re-read (a bad file changes nothing and says why), or new sets from
    // the API.
    let _policies_watcher = match &sources.policies {
        PolicySource::Dir(dir) => {
            let (watcher, mut changes) = watch_dir(dir)?;
            let state = state.clone();
            tokio::spawn(async move {
                // A change already taken off the channel (while settling) that is not reloaded yet.
                let mut changed_again = false;
                loop {
                    if !std::mem::take(&mut changed_again) && changes.recv().await.is_none() {
                        break;
                    }
                    // Coalesced by what is pending, not by waiting: every change noticed so far is
                    // in this reload; changes during it make exactly one more. (A 200 ms sleep
                    // here put a floor under every policy change's latency.)
                    while changes.try_recv().is_ok() {}
                    let result = state.enforcer.lock().await.reload_policies().await;
                    match result {
                        Ok((_, report)) => {
                            log_policy_report(&report);
                            if let Some(alert) = crate::alerts::policy::policy_report_alert(&report) {
                                // A file caught half written (an editor writing in place) is
                                // rejected and its last good version stays; the rest of the
                                // write follows at once. Alert only when nothing follows.
                                let settling = tokio::time::timeout(POLICY_SETTLE, changes.recv()).await;
                                if matches!(settling, Ok(Some(()))) {
                                    tracing::debug!("a rejected policy file changed again at once: reloading before alerting");
                                    changed_again = true;
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
    };

    // Denied flows from the datapath (rate-limited in the kernel, with counts).
    {
        let ring = crate::enforcement::take_verdict_ring(&host).await?;
        let state = state.clone();
        tokio::spawn(async move {
            let result = crate::enforcement::read_verdicts(ring, move |verdict| {
                let direction = if verdict.direction == palisade_common::DIRECTION_INGRESS { "ingress" } else { "egress" };
                let reason = crate::alerts::policy::drop_reason(verdict.reason);
                state.metrics.add_policy_drops(direction, reason, 1 + u64::from(verdict.suppressed));
                let pod = state.endpoints.borrow().index().get(verdict.header.cgroup_id);
                state.alerts.try_emit(crate::alerts::policy::policy_denied_alert(&verdict, pod.as_deref()));
            })
            .await;
            if let Err(err) = result {
                tracing::error!(%err, "reading policy verdicts stopped");
            }
        });
    }

    // Endpoint table changes: segmentation, quarantine and the monitored set follow.
    spawn_endpoint_followers(state.clone(), endpoints);

    // Response policy changes (dry run, per-rule modes, guardrails, forensics): reloaded as a
    // whole; a file that does not parse or validate changes nothing and says why.
    let _response_policy_watcher = match &args.response_policy {
        Some(path) => {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
            let (watcher, mut changes) = watch_dir(&dir)?;
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
            Some(watcher)
        }
        None => None,
    };

    // Pipeline: reader -> enrich -> input -> record -> rules. Protected events have a queue of
    // their own, which the pipeline always serves first.
    let (priority_tx, priority_rx) = mpsc::channel::<Queued>(QUEUE_EVENTS);
    let (events_tx, events_rx) = mpsc::channel::<Queued>(QUEUE_EVENTS);
    let reader_task = reader::run_routed(
        priority_ring,
        ring,
        state.reader.clone(),
        state.queue_drops.clone(),
        state.queue_budget.clone(),
        priority_tx,
        events_tx,
    );
    let reader_running_for_health = reader_running.clone();
    tokio::spawn(async move {
        let ended = reader_task.await;
        reader_running.store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(?ended, "the event reader stopped: no more kernel events (/healthz answers 503)");
    });
    let runtime_handle = tokio::runtime::Handle::current();
    {
        let state = state.clone();
        let record = match &args.record {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            )),
            None => None,
        };
        std::thread::Builder::new()
            .name("palisade-pipeline".into())
            .spawn(move || pipeline(runtime_handle, priority_rx, events_rx, state, record, evaluator))?;
    }

    startup.running(state.clone(), reader_running_for_health);
    running.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(state_dir = %args.state_dir.display(), "palisade is running");
    wait_for_shutdown().await?;
    let stopping = std::time::Instant::now();
    let quarantined = state.quarantine.list().len();
    let (attached, pods_parent) = {
        let enforcer = state.enforcer.lock().await;
        (enforcer.status.attached_cgroups, enforcer.status.pods_parent.as_ref().filter(|p| p.attached).map(|p| p.cgroup.clone()))
    };
    tracing::info!(
        pin_dir = %args.pin_dir.display(),
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
    Ok(())
}

/// Keeps the stages that read the endpoint table in step with it, in this order: segmentation
/// (compiles, syncs the maps, attaches to new cgroups), the responder (endpoint ids, quarantines
/// that follow a re-created cgroup or end with a pod that left), then the probes' monitored set.
/// A monitored-set update that fails is retried until it holds.
fn spawn_endpoint_followers(state: Arc<DaemonState>, mut endpoints: tokio::sync::watch::Receiver<Arc<EndpointTable>>) {
    tokio::spawn(async move {
        let mut retry = tokio::time::interval(crate::endpoints::RESOLVE_INTERVAL);
        let mut monitored_in_sync = true;
        loop {
            tokio::select! {
                changed = endpoints.changed() => {
                    if changed.is_err() { return; }
                    let table = endpoints.borrow_and_update().clone();
                    {
                        let mut enforcer = state.enforcer.lock().await;
                        if let Err(err) = enforcer.set_inventory(table.inventory().as_ref().clone()).await {
                            tracing::error!(%err, "re-segmenting after an endpoint change");
                        }
                        state.quarantine.set_endpoint_ids(enforcer.compiled().endpoints.values().map(|ep| (ep.pod_key(), ep.endpoint_id())));
                    }
                    match state.quarantine.set_endpoints(table.clone()) {
                        Ok(removals) => {
                            for removal in &removals {
                                state.alerts.try_emit(crate::quarantine::api::removal_alert(removal));
                            }
                        }
                        Err(err) => tracing::error!(%err, "reconciling quarantines with the endpoints"),
                    }
                    monitored_in_sync = false;
                }
                _ = retry.tick(), if !monitored_in_sync => {}
            }
            if !monitored_in_sync {
                let monitored = endpoints.borrow().monitored();
                match state.host.set_monitored(monitored).await {
                    Ok(()) => monitored_in_sync = true,
                    Err(err) => tracing::error!(%err, "updating monitored cgroups; retrying"),
                }
            }
        }
    });
}

/// The memory the queues between the reader and the pipeline thread may hold (`reader::
/// event_bytes`): protected events (the reader waits for room), the rest (dropped and counted
/// past it), and the most one pod's bulk events may hold, so a flooding pod never fills the
/// queue alone. An open is ~300 bytes (the 232-byte event and its path): ~14,000 opens in the
/// bulk queue, ~1,700 per pod (before: 16,384 and 2,048 events of any size).
const PRIORITY_QUEUE_BYTES: usize = 2 << 20;
const BULK_QUEUE_BYTES: usize = 4 << 20;
const BULK_QUEUE_BYTES_PER_POD: usize = BULK_QUEUE_BYTES / 8;
/// A second bound on each queue, in events (the byte budgets bind first: an event is larger
/// than 128 bytes).
const QUEUE_EVENTS: usize = 32768;

/// The next event and whether it came from the priority queue (a protected kind): a protected
/// one whenever one is waiting (a bulk one gives its pod's place in the queue back). None when
/// both queues are closed.
fn next_event(
    runtime: &tokio::runtime::Handle,
    priority: &mut mpsc::Receiver<Queued>,
    bulk: &mut mpsc::Receiver<Queued>,
    budget: &QueueBudget,
    trimmer: &mut crate::memory::Trimmer,
) -> Option<(Event, bool)> {
    let from_bulk = |queued: Queued| {
        budget.release_bulk(queued.event.header.cgroup_id, queued.bytes);
        (queued.event, false)
    };
    let from_priority = |queued: Queued| {
        budget.release_priority(queued.bytes);
        (queued.event, true)
    };
    if let Ok(event) = priority.try_recv() {
        return Some(from_priority(event));
    }
    if let Ok(event) = bulk.try_recv() {
        return Some(from_bulk(event));
    }
    runtime.block_on(async {
        // After a burst, once no event came for a while, the memory that held it goes back
        // to the system (the allocator keeps freed pages otherwise).
        if let Some(wait) = trimmer.idle_wait() {
            tokio::select! {
                biased;
                Some(event) = priority.recv() => return Some(from_priority(event)),
                Some(event) = bulk.recv() => return Some(from_bulk(event)),
                () = tokio::time::sleep(wait) => {
                    trimmer.idle();
                }
                else => return None,
            }
        }
        tokio::select! {
            biased;
            Some(event) = priority.recv() => Some(from_priority(event)),
            Some(event) = bulk.recv() => Some(from_bulk(event)),
            else => None,
        }
    })
}

/// The process cache's memory bound (about 64,000 processes of typical size).
const PROCESS_CACHE_BYTES: usize = 64 << 20;

fn pipeline(
    runtime: tokio::runtime::Handle,
    mut priority: mpsc::Receiver<Queued>,
    mut events: mpsc::Receiver<Queued>,
    state: Arc<DaemonState>,
    mut record: Option<std::io::BufWriter<std::fs::File>>,
    evaluator: RuleEvaluator,
) {
    let clock = Clock::new();
    let mut cache = ProcCache::with_byte_budget(PROCESS_CACHE_BYTES);
    // The programs are attached: processes from now on are seen by their fork/exec events;
    // the ones that already exist are seeded from /proc, once (never on the event path).
    let seeded = cache.seed_from_proc(Path::new("/proc"));
    tracing::info!(seeded, "process cache seeded from /proc");
    // Start-up (pack compilation and smoke runs, BTF, the eBPF object) leaves freed memory
    // behind in the allocator: give it back once, so the idle RSS is what running needs.
    crate::memory::release_free_memory();
    let mut since_stats = 0u32;
    let budget = state.queue_budget.clone();
    let mut trimmer = crate::memory::Trimmer::default();
    // Protected events are judged here, at once, and their hits acted on (the quarantine map
    // update included) before the next event is taken: through the pool they would wait behind
    // the bulk events queued for it and cross two more threads (issue 10: the latency goal).
    let mut protected_judge = crate::rules::LocalEvaluator::new(state.rules.clone());
    let mut failure_alerts = crate::rules::failures::FailureLimiter::default();
    while let Some((event, protected)) = next_event(&runtime, &mut priority, &mut events, &budget, &mut trimmer) {
        let table = state.endpoints.borrow().clone();
        let enriched = enrich(event, table.index(), &mut cache);
        state.pipeline.enriched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        since_stats += 1;
        if since_stats >= 1024 || (events.is_empty() && priority.is_empty()) {
            since_stats = 0;
            if let Ok(mut stats) = state.pipeline.process_cache.lock() {
                *stats = cache.stats();
            }
        }
        let input = to_input(&enriched, &clock, &state.node);
        if let Some(out) = record.as_mut() {
            let written = serde_json::to_writer(&mut *out, &input).map_err(std::io::Error::other).and_then(|()| out.write_all(b"\n"));
            // Flush when idle so a reader of the file sees events promptly.
            let flushed = if events.is_empty() && priority.is_empty() { out.flush() } else { Ok(()) };
            if let Err(err) = written.and(flushed) {
                state.pipeline.record_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%err, "writing the event record");
            }
        }
        let context = Arc::new(EventContext::of(&enriched, &clock));
        if protected {
            let evaluation = protected_judge.evaluate(input, Some(context));
            if evaluation.has_news() {
                act_on(&state, &mut failure_alerts, evaluation);
            }
        } else if evaluator.submit_with(input, context).is_err() {
            tracing::error!("rule workers stopped; pipeline ends");
            return;
        }
        trimmer.note_event();
    }
}

/// What the verdict thread (pool evaluations) and the pipeline (protected events, judged at
/// once) do with an evaluation: report the rules that failed, respond to each hit.
fn act_on(state: &DaemonState, failure_alerts: &mut crate::rules::failures::FailureLimiter, evaluation: crate::rules::Evaluation) {
    // The pipeline submits every event with its context.
    let Some(context) = evaluation.context.as_deref() else {
        state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!("an evaluation came back without its event context; not acted on");
        return;
    };
    for failure in &evaluation.failures {
        report_rule_failure(state, failure_alerts, failure, context);
    }
    match evaluation.hits {
        Ok(hits) => {
            state.pipeline.evaluated_with_hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for hit in hits {
                respond(state, hit, context, &evaluation.input);
            }
        }
        Err(err) => {
            state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%err, "rule evaluation failed");
        }
    }
}

/// One rule could not judge one event: counted per rule and reason, logged, and raised as a
/// `rule_error` alert when the limiter lets it through (the event's other rules already ran).
fn report_rule_failure(
    state: &DaemonState,
    limiter: &mut crate::rules::failures::FailureLimiter,
    failure: &crate::rules::RuleFailure,
    context: &EventContext,
) {
    state.pipeline.rule_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state.metrics.record_rule_error(&failure.rule_id, failure.reason.as_str());
    let Some(count) = limiter.admit(failure, std::time::Instant::now()) else { return };
    tracing::warn!(rule = %failure.rule_id, event_type = %failure.event_type, reason = %failure.reason, detail = %failure.detail, count, "rule could not judge an event");
    let title = state.rules.current().rule(&failure.rule_id).map(|r| r.title.clone()).unwrap_or_default();
    let alert = Alert::about_event(
        AlertKind::RuleError,
        Severity::High,
        format!(
            "rule {} could not judge a {} event ({}): {}; the other rules still ran",
            failure.rule_id, failure.event_type, failure.reason, failure.detail
        ),
        &state.node,
        context,
    )
    .with_rule(failure.rule_id.clone(), title)
    .with_event(json!({
        "rule": failure.rule_id,
        "event_type": failure.event_type,
        "reason": failure.reason,
        "detail": failure.detail,
        "failures": count,
    }));
    state.alerts.try_emit(alert);
}

/// Turns one rule hit into its alert, after the responder decided what to do about it (the map
/// update, if any, has returned before the alert is written: alerts and enforcement agree).
fn respond(state: &DaemonState, hit: crate::rules::model::RuleHit, context: &EventContext, input: &serde_json::Value) {
    let alert = Alert::for_rule_hit(&hit, &state.node, context, input);
    let alerts = match context.pod.as_deref() {
        Some(pod) => {
            let verdict = Verdict { hit, namespace: pod.namespace.clone(), name: pod.name.clone(), alert_id: alert.id.clone() };
            let decision = state.quarantine.respond(&verdict);
            if decision.outcome == crate::quarantine::Outcome::Quarantined {
                state.metrics.record_quarantine();
            }
            crate::quarantine::api::alerts_for(alert, &decision)
        }
        // Host-mode events outside any pod: nothing to isolate.
        None => vec![alert.with_outcome(Outcome::Alerted, Some("not in a pod".into()))],
    };
    for alert in alerts {
        if let Err(err) = state.alerts.blocking_emit(alert) {
            tracing::error!(%err, "an alert could not be written (the writer stopped)");
        }
    }
}

fn load_response_policy(path: &Path) -> anyhow::Result<ResponsePolicy> {
    ResponsePolicy::load(path).map_err(anyhow::Error::msg)
}

/// Logs each rejected policy document (error) and each ignored field (warning).
fn log_policy_report(report: &crate::segmentation::PolicyReport) {
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

/// SIGINT or SIGTERM.
async fn wait_for_shutdown() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for ctrl-c")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Feeds kernel per-kind counters and quarantine gauges into the metrics every few seconds.
fn spawn_counter_exporter(state: Arc<DaemonState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Ok(status) = state.host.status().await {
                if let Some(counters) = status.counters {
                    state.metrics.observe_kernel_counters(&counters.emitted, &counters.lost);
                }
            }
            let active = state.quarantine.list_async().await.len();
            state.metrics.set_quarantines_active(active as i64);
            let sync_failing = state.enforcer.lock().await.status.last_error.is_some();
            state.metrics.set_datapath_sync_failing(sync_failing);
            if let Some(kube) = &state.kube_health {
                let connected = kube.borrow().connected;
                state.metrics.set_watchers_connected("kubernetes", connected);
            }
            let pods = state.conntrack.lock().map(|s| s.pods.clone()).unwrap_or_default();
            if !pods.is_empty() {
                let enforcer = state.enforcer.lock().await;
                let named: Vec<(String, crate::segmentation::conntrack::PodUsage)> = pods
                    .iter()
                    .map(|(id, u)| (enforcer.compiled().endpoints.get(id).map(|e| e.key()).unwrap_or_else(|| format!("endpoint-{id}")), *u))
                    .collect();
                drop(enforcer);
                state.metrics.observe_conntrack(&named);
            }
        }
    });
}

/// Loads what the kernel knows of the pack: the sensitive prefixes (which opens take the
/// priority ring), the pack's declared open prefilter (which opens stay in the kernel) and the
/// connect ports its connect rules can match (`RulePack::connect_ports`: other inet connects
/// stay in the kernel; None filters none).
async fn set_sensitive_prefixes(
    host: &ProbeHost,
    rules_dir: &Path,
    connect_ports: Option<std::collections::BTreeSet<u16>>,
) -> anyhow::Result<()> {
    let prefilter = crate::rules::prefilter::OpenPrefilter::load(rules_dir)?;
    let (sensitive, quiet) = (prefilter.sensitive.len(), prefilter.quiet.len());
    let ports = connect_ports.as_ref().map(|p| p.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    host.with(move |ebpf| {
        loader::set_sensitive_prefixes(ebpf, &prefilter.sensitive)?;
        loader::set_quiet_open_prefixes(ebpf, &prefilter.quiet)?;
        loader::set_connect_ports(ebpf, connect_ports.as_ref())
    })
    .await??;
    tracing::info!(sensitive, quiet, connect_ports = ports.as_deref().unwrap_or("all (no connect prefilter)"), "kernel prefilters loaded (open prefixes for priority routing and filtering, connect ports)");
    Ok(())
}

/// Samples the per-pod loss counters (kernel and reader) every second; raises `event_loss`
/// alerts (rate limited by the monitor) and counts user-space drops in the metrics.
fn spawn_loss_monitor(state: Arc<DaemonState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut queue_seen: std::collections::BTreeMap<(u64, EventKind), u64> = Default::default();
        let mut loss_seen: std::collections::BTreeMap<loader::LossKey, u64> = Default::default();
        loop {
            tick.tick().await;
            let mut totals = match state.host.with(|ebpf| loader::read_pod_losses(ebpf)).await {
                Ok(Ok(totals)) => totals,
                Ok(Err(err)) => {
                    tracing::warn!(%err, "reading the per-pod loss counters");
                    continue;
                }
                Err(_) => return,
            };
            let queue = state.queue_drops.totals();
            for (&(cgroup, kind), &total) in &queue {
                let before = queue_seen.insert((cgroup, kind), total).unwrap_or(0);
                if total > before {
                    state.metrics.record_events_lost(kind.as_str(), total - before);
                }
            }
            totals.extend(crate::events::loss::queue_drop_totals(&queue));
            let table = state.endpoints.borrow().clone();
            for (key, &total) in &totals {
                let before = loss_seen.insert(*key, total).unwrap_or(0);
                if total > before {
                    let pod = table.index().get(key.cgroup_id).map(|p| format!("{}/{}", p.namespace, p.name));
                    let pod = pod.unwrap_or_else(|| format!("cgroup:{}", key.cgroup_id));
                    state.metrics.record_pod_events_lost(&pod, key.kind.as_str(), key.reason.as_str(), total - before);
                }
            }
            let report = match state.losses.lock() {
                Ok(mut monitor) => monitor.observe(&totals, std::time::Instant::now()),
                Err(_) => return,
            };
            if let Some(report) = report {
                let alert = report.alert(table.index());
                tracing::warn!(message = %alert.message, "event loss");
                state.alerts.try_emit(alert);
            }
        }
    });
}

/// How long a policy reload that rejected a file waits for a further change before alerting
/// (only then: a clean reload alerts nothing and waits for nothing).
const POLICY_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches a directory (recursively); each change sends a unit on the returned channel.
fn watch_dir(dir: &Path) -> anyhow::Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>)> {
    use notify::Watcher as _;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if event.kind.is_access() => {}
        Ok(_) => {
            let _ = tx.send(());
        }
        Err(err) => tracing::warn!(%err, "directory watcher"),
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive).with_context(|| format!("watching {}", dir.display()))?;
    Ok((watcher, rx))
}

/// Where the datapath is attached for every pod below it (`--pods-cgroup`).
fn pods_parent(args: &RunArgs, cgroup_root: &Path, inventory: &Inventory) -> Option<PathBuf> {
    match args.pods_cgroup.as_str() {
        "none" => None,
        // Kubernetes: the kubelet's pods root of this node's pods (kubepods.slice, kubepods, or
        // below a kubelet --cgroup-root), else the one at the mount.
        "auto" if args.kubernetes => {
            let local = inventory.endpoints.iter().filter(|e| !e.peer_only).filter_map(|e| e.cgroup.as_deref());
            let found = crate::k8s::kubepods_parent(cgroup_root, local);
            if found.is_none() {
                tracing::warn!(
                    "no kubepods cgroup found (no pod of this node located yet, no kubepods.slice or kubepods at the cgroup2 mount): the datapath is attached per pod, so a pod created later passes until the sync after it appears; name the parent with --pods-cgroup"
                );
            }
            found.map(|rel| cgroup_root.join(rel))
        }
        "auto" => args.lab_name().map(|lab| cgroup_root.join(crate::lab::naming::default_cgroup_root(lab))),
        other => Some(cgroup_root.join(other.trim_start_matches('/'))),
    }
}

/// Where policies come from.
enum PolicySource {
    Dir(PathBuf),
    Kube(tokio::sync::watch::Receiver<crate::segmentation::PolicySet>),
}

/// The endpoint and policy sources, kept alive for the daemon's lifetime.
struct Sources {
    inventory_rx: tokio::sync::watch::Receiver<Inventory>,
    policies: PolicySource,
    kube: Option<crate::k8s::KubeSource>,
    _inventory_watch: Option<crate::inventory::watch::InventoryWatch>,
}

impl Sources {
    async fn start(args: &RunArgs, defaults_dir: &Path, cgroup_root: &Path) -> anyhow::Result<Sources> {
        if args.kubernetes {
            let node = args.node_name.clone().unwrap_or_else(crate::sys::hostname);
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let source = crate::k8s::KubeSource::start(client, crate::k8s::SourceConfig::new(node, cgroup_root))
                .await
                .context("first sync with the Kubernetes API")?;
            return Ok(Sources {
                inventory_rx: source.inventory(),
                policies: PolicySource::Kube(source.policies()),
                kube: Some(source),
                _inventory_watch: None,
            });
        }
        let inventory_path = match &args.inventory {
            Some(path) => path.clone(),
            None => {
                std::fs::create_dir_all(defaults_dir)?;
                let path = defaults_dir.join("inventory.yaml");
                std::fs::write(&path, crate::defaults::DEFAULT_INVENTORY)?;
                path
            }
        };
        let watch = crate::inventory::watch::InventoryWatch::start(&inventory_path)
            .with_context(|| format!("inventory {}", inventory_path.display()))?;
        let policies_dir = match &args.policies {
            Some(dir) => dir.clone(),
            None => crate::defaults::materialize(&defaults_dir.join("policies"), crate::defaults::DEFAULT_POLICIES)?,
        };
        Ok(Sources {
            inventory_rx: watch.subscribe(),
            policies: PolicySource::Dir(policies_dir),
            kube: None,
            _inventory_watch: Some(watch),
        })
    }
}
