//! The rule pack's wiring: loaded before the probes start (so the kernel's enabled kinds are
//! right from the first event), reloaded by its watcher (kinds and prefilters follow).

use std::collections::BTreeSet;
use std::path::Path;

use crate::events::kind::EventKind;
use crate::probes::host::ProbeHost;
use crate::probes::loader;
use crate::rules::pack::RulePack;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::RunArgs;
use crate::alerts::{Alert, AlertKind};
use crate::rules::evaluator::PackHandle;
use crate::rules::model::Severity;
use crate::rules::pack::PackOptions;
use crate::rules::watch::RulesNotification;
use crate::status::DaemonState;

/// Kernel kinds needed by a rule pack (exec and exit always: they keep the process cache right).
pub(super) fn kinds_for(pack: &RulePack) -> Vec<EventKind> {
    let mut kinds: BTreeSet<EventKind> = pack.subscribed_types();
    // The process cache is built from these (ancestry, context that outlives the process).
    kinds.insert(EventKind::Exec);
    kinds.insert(EventKind::Fork);
    kinds.insert(EventKind::Exit);
    kinds.into_iter().collect()
}

/// Loads what the kernel knows of the pack: the sensitive prefixes (which opens take the
/// priority ring), the open prefilter derived from its open rules (`RulePack::open_filter`;
/// without one, its declared `quiet_open_prefixes`: which opens stay in the kernel) and the
/// connect ports its connect rules can match (`RulePack::connect_ports`: other inet connects
/// stay in the kernel; None filters none).
pub(super) async fn set_sensitive_prefixes(host: &ProbeHost, rules_dir: &Path, pack: &RulePack) -> anyhow::Result<()> {
    let connect_ports = pack.connect_ports();
    let open_filter = pack.open_filter().map(|f| f.kernel_maps());
    let prefilter = crate::rules::prefilter::OpenPrefilter::load(rules_dir)?;
    let (sensitive, quiet) = (prefilter.sensitive.len(), prefilter.quiet.len());
    let derived = open_filter.as_ref().map(|f| format!("{} prefixes, {} suffixes", f.prefixes.len(), f.suffixes.len()));
    let ports = connect_ports.as_ref().map(|p| p.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    host.with(move |ebpf| {
        loader::set_sensitive_prefixes(ebpf, &prefilter.sensitive)?;
        loader::set_quiet_open_prefixes(ebpf, &prefilter.quiet)?;
        loader::set_open_filter(ebpf, open_filter.as_ref())?;
        loader::set_connect_ports(ebpf, connect_ports.as_ref())
    })
    .await??;
    tracing::info!(
        sensitive,
        quiet,
        open_filter = derived.as_deref().unwrap_or("off (the declared quiet prefixes apply)"),
        connect_ports = ports.as_deref().unwrap_or("all (no connect prefilter)"),
        "kernel prefilters loaded (open prefixes for priority routing, the open filter from the rules, connect ports)"
    );
    Ok(())
}

/// The rule pack in force: loaded before the probes start, so the enabled kinds are right from
/// the start.
pub(super) struct RulesStage {
    pub(super) dir: PathBuf,
    pub(super) options: PackOptions,
    pub(super) handle: Arc<PackHandle>,
}

impl RulesStage {
    pub(super) fn load(args: &RunArgs, defaults_dir: &Path) -> anyhow::Result<RulesStage> {
        let dir = match &args.rules {
            Some(dir) => dir.clone(),
            None => crate::defaults::materialize(&defaults_dir.join("rules"), crate::defaults::DEFAULT_RULES)?,
        };
        let options = PackOptions { allow_empty: args.allow_empty_rules, ..PackOptions::default() };
        let pack = RulePack::load_with(&dir, &options).map_err(|e| anyhow::anyhow!("rule pack {}:\n{}", dir.display(), e.lines().join("\n")))?;
        tracing::info!(rules = pack.rules().len(), dir = %dir.display(), "rule pack loaded");
        Ok(RulesStage { dir, options, handle: PackHandle::new(pack) })
    }

    /// Rules hot reload: swap, switch kernel kinds, report rejections as alerts.
    pub(super) fn watch(&self, state: &Arc<DaemonState>) -> anyhow::Result<crate::rules::watch::RulesWatcher> {
        let state = state.clone();
        let rules_dir = self.dir.clone();
        let runtime = tokio::runtime::Handle::current();
        let watcher = crate::rules::watch::watch(&self.dir, self.options.clone(), self.handle.clone(), move |note| {
            match &note {
                RulesNotification::Reloaded { .. } => {
                    state.metrics.record_rule_reload(true);
                    let kinds = kinds_for(&state.rules.current());
                    let host = state.host.clone();
                    let rules_dir = rules_dir.clone();
                    let pack = state.rules.current();
                    runtime.spawn(async move {
                        if let Err(err) = host.set_enabled_kinds(kinds).await {
                            tracing::error!(%err, "switching kernel event kinds after a rules reload");
                        }
                        if let Err(err) = set_sensitive_prefixes(&host, &rules_dir, &pack).await {
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
        })?;
        Ok(watcher)
    }
}
