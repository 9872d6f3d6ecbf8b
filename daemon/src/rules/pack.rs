//! A rule pack: every rule module of a directory plus its tunable lists, validated against the
//! rule contract and compiled once into an engine that evaluates one event per call.
//!
//! How an event reaches only the rules that want it: after loading, the pack generates a module
//! `palisade.dispatch` with one rule per event type, e.g.
//! `exec := [data.palisade.rules.a.alerts, data.palisade.rules.b.alerts]`, listing only the rules
//! whose `meta.events` name that type. That module is compiled to the register VM with one entry
//! point per type, so an event costs one VM call that runs exactly its subscribers.
//!
//! Isolation per rule: each rule also has an entry point of its own, and a budget (instructions
//! and wall-clock time). The per-type call runs with the sum of its rules' budgets; only when it
//! fails (one rule over budget or raising an error) are that event's rules run one by one, each
//! within its own budget, so the failing rule is named and the others' alerts still come out.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::{RegoVM, VmError};
use regorus::utils::limits::{ExecutionTimerConfig, LimitError};
use regorus::unstable::{Expr, Module, Rule, RuleHead, Span};
use regorus::{CompiledPolicy, Engine, Value};
use serde::Deserialize;

use super::RulesError;
use super::analysis;
use super::diag::Diagnostic;
use super::input::{EventInput, InputConverter, event_type, to_rego_value};
use super::model::{Action, EventType, FailureReason, Location, RuleFailure, RuleHit, RuleMeta, Severity, Judgement};
use super::rule_filter::{self, MAX_FILTERED_SUBSCRIBERS, OpenKernelFilter, TypeFilter};

/// The package every rule lives under: `palisade.rules.<id>`.
pub const RULES_PACKAGE: &str = "data.palisade.rules";
/// Where the tunable lists appear to rules.
pub const LISTS_PATH: &str = "data.palisade.lists";
/// The generated per-event-type dispatch package (reserved: rule files may not declare it).
const DISPATCH_PACKAGE: &str = "data.palisade.dispatch";
const DISPATCH_FILE: &str = "<generated palisade.dispatch>";
/// Fields a rule's `meta` object may have.
const META_FIELDS: [&str; 8] = ["id", "title", "severity", "mitre", "action", "events", "description", "prefilter"];
/// Fields an alert object may have; only `message` is required.
const ALERT_FIELDS: [&str; 4] = ["message", "severity", "mitre", "action"];

/// Which regorus evaluator runs the rules. Both give the same answers (the pack's tests check
/// that); the register VM is several times faster, the tree interpreter is what coverage uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Rvm,
    Interpreter,
}

/// Operator settings that change what rules do without editing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleOverrides {
    /// Per-rule action, replacing the rule's own (e.g. demote a quarantine rule to alert only).
    #[serde(default)]
    pub actions: BTreeMap<String, Action>,
    /// Rules that are not evaluated at all.
    #[serde(default)]
    pub disabled: BTreeSet<String>,
}

impl RuleOverrides {
    /// Reads overrides from YAML: `{actions: {rule_id: alert|quarantine}, disabled: [rule_id]}`.
    pub fn from_yaml_file(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RulesError::Io { path: path.to_path_buf(), source })?;
        serde_norway::from_str(&text).map_err(|e| {
            let (line, col) = e.location().map_or((1, 1), |l| (l.line() as u32, l.column() as u32));
            RulesError::Rejected {
                diagnostics: vec![Diagnostic::new(path.display().to_string(), line, col, e.to_string())],
            }
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    pub engine: EngineKind,
    pub overrides: RuleOverrides,
    pub budget: RuleBudget,
    /// Accept a pack with no rules (it judges nothing). Off by default: an empty rules directory
    /// is far more often a mistake (a wrong mount, a failed sync) than an intent.
    pub allow_empty: bool,
    /// Evaluate every subscriber of an event's type, ignoring the rules' `meta.prefilter`
    /// (for comparisons: `rules test` checks that prefilters change no judgement).
    pub no_prefilters: bool,
}

/// What one rule may spend on one event. A rule past it is stopped and reported
/// (`rule_error`, reason `budget` or `timeout`); the event's other rules are not affected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleBudget {
    /// Register-VM instructions (deterministic: the same rule and event always cost the same).
    pub instructions: usize,
    /// CPU time of the evaluating thread, a bound for builtins that cost much in one
    /// instruction (the tree interpreter, which counts no instructions, has only this). The
    /// engine's timer reads the wall clock: a run cut off by it is judged by the CPU time it
    /// used, and run again with up to [`WALL_BACKSTOP`] times the time when that was under the
    /// budget (the thread waited for a CPU; see `SessionEngine::run_judged`).
    pub time: Duration,
}

impl Default for RuleBudget {
    fn default() -> Self {
        // The heaviest default rule uses a few thousand instructions on the recorded mix; 25,000
        // is what regorus allowed a whole evaluation before per-rule budgets.
        RuleBudget { instructions: 25_000, time: Duration::from_millis(100) }
    }
}

/// A run cut off by the wall clock while its thread had used less CPU time than the budget (it
/// waited for a CPU: a loaded node) is run again with up to this many times the budget of
/// wall-clock time (issue 14: the soak saw 2 of 161 credential reads unjudged at load 25 when
/// the wall clock was the budget). A rule that really spins is still cut off: by its CPU time
/// at the first run, and at worst by this backstop (2 s for a 100 ms budget). The load-time
/// smoke run uses the same room.
pub const WALL_BACKSTOP: u32 = 20;

impl RuleBudget {
    /// The budget of `rules` rules run in one call.
    fn times(self, rules: usize) -> RuleBudget {
        let n = rules.max(1);
        RuleBudget {
            instructions: self.instructions.saturating_mul(n),
            time: self.time.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)),
        }
    }

    fn timer(self) -> ExecutionTimerConfig {
        // Check the clock every 64 instructions: cheap, and fine-grained enough for a 100 ms limit.
        ExecutionTimerConfig { limit: self.time, check_interval: std::num::NonZeroU32::MIN.saturating_add(63) }
    }
}

/// One text file of a pack, named as diagnostics should show it.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: String,
    pub text: String,
}

/// The files of a rules directory, sorted by path.
#[derive(Debug, Clone, Default)]
pub struct PackSources {
    /// The directory read, for problems of the pack as a whole.
    pub root: Option<String>,
    /// Rule and helper modules (`*.rego` except `*_test.rego`).
    pub policies: Vec<SourceFile>,
    /// Rego tests (`*_test.rego`), used by `palisade rules test` only.
    pub tests: Vec<SourceFile>,
    /// Lists under `lists/` (`*.json`, `*.yaml`, `*.yml`), each becoming
    /// `data.palisade.lists.<file stem>`.
    pub lists: Vec<SourceFile>,
}

impl PackSources {
    /// Reads a rules directory (recursively; names starting with `.` are skipped, so editor swap
    /// files and `..data` symlink farms of ConfigMaps are not read twice).
    pub fn read_dir(dir: &Path) -> Result<Self, RulesError> {
        let mut sources = PackSources { root: Some(dir.display().to_string()), ..PackSources::default() };
        let (mut files, mut total) = (0usize, 0u64);
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            let entries = std::fs::read_dir(&current)
                .map_err(|source| RulesError::Io { path: current.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| RulesError::Io { path: current.clone(), source })?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                // Follow symlinks (ConfigMap mounts are symlinks to files).
                let meta = std::fs::metadata(&path)
                    .map_err(|source| RulesError::Io { path: path.clone(), source })?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let in_lists = path
                    .strip_prefix(dir)
                    .ok()
                    .and_then(|rel| rel.components().next())
                    .is_some_and(|c| c.as_os_str() == "lists");
                let bucket = if in_lists
                    && (name.ends_with(".json") || name.ends_with(".yaml") || name.ends_with(".yml"))
                {
                    &mut sources.lists
                } else if name.ends_with("_test.rego") {
                    &mut sources.tests
                } else if name.ends_with(".rego") {
                    &mut sources.policies
                } else {
                    continue;
                };
                // Limits before reading: a pack is never read into memory past them.
                let limit = if in_lists { analysis::MAX_LIST_BYTES } else { analysis::MAX_SOURCE_BYTES };
                let shown = path.display().to_string();
                if meta.len() > limit {
                    return Err(rejected(Diagnostic::file(
                        &shown,
                        format!("file is {} bytes, more than the {limit} a pack file may have", meta.len()),
                    )));
                }
                files += 1;
                total += meta.len();
                if files > analysis::MAX_PACK_FILES || total > analysis::MAX_PACK_BYTES {
                    return Err(rejected(Diagnostic::file(
                        &shown,
                        format!(
                            "the pack is larger than {} files or {} bytes",
                            analysis::MAX_PACK_FILES,
                            analysis::MAX_PACK_BYTES
                        ),
                    )));
                }
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| RulesError::Io { path: path.clone(), source })?;
                bucket.push(SourceFile { path: shown, text });
            }
        }
        for bucket in [&mut sources.policies, &mut sources.tests, &mut sources.lists] {
            bucket.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(sources)
    }

    /// The lists as one `data` document: `{"palisade": {"lists": {stem: content}}}`.
    pub fn lists_data(&self) -> Result<Value, Vec<Diagnostic>> {
        let mut lists = serde_json::Map::new();
        let mut diagnostics = Vec::new();
        for file in &self.lists {
            if file.text.len() as u64 > analysis::MAX_LIST_BYTES {
                diagnostics.push(Diagnostic::file(
                    &file.path,
                    format!("list file is {} bytes, more than the {} a list may have", file.text.len(), analysis::MAX_LIST_BYTES),
                ));
                continue;
            }
            let stem = Path::new(&file.path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parsed: Result<serde_json::Value, Diagnostic> = if file.path.ends_with(".json") {
                serde_json::from_str(&file.text).map_err(|e| {
                    Diagnostic::new(&file.path, e.line() as u32, e.column() as u32, e.to_string())
                })
            } else {
                serde_norway::from_str(&file.text).map_err(|e| {
                    let (line, col) =
                        e.location().map_or((1, 1), |l| (l.line() as u32, l.column() as u32));
                    Diagnostic::new(&file.path, line, col, e.to_string())
                })
            };
            match parsed {
                Ok(value) => {
                    if lists.insert(stem.clone(), value).is_some() {
                        diagnostics.push(Diagnostic::file(
                            &file.path,
                            format!("list {stem:?} is defined by more than one file"),
                        ));
                    }
                }
                Err(d) => diagnostics.push(d),
            }
        }
        if !diagnostics.is_empty() {
            return Err(diagnostics);
        }
        let data = serde_json::json!({"palisade": {"lists": lists}});
        Ok(to_rego_value(&data))
    }
}

/// A compiled, validated rule pack. Immutable: a reload builds a new one.
pub struct RulePack {
    /// Unique per built pack, so a session is never used with a pack it was not made for.
    id: u64,
    generation: u64,
    dir: Option<PathBuf>,
    engine_kind: EngineKind,
    rules: Vec<RuleMeta>,
    /// Per event type (indexed by `EventType::index`): the rules its dispatch entry runs, in
    /// the order the entry returns their alert sets.
    dispatch: [Vec<usize>; 16],
    /// Per event type, aligned with `dispatch`: each subscriber's prefilter for that type
    /// (`None`: the rule always runs).
    filters: [Vec<Option<TypeFilter>>; 16],
    /// Whether `filters` are applied (off only for comparisons).
    prefilters: bool,
    /// Per event type, then per rule (indexed like `rules`; `None` for a disabled rule).
    entry_points: Vec<String>,
    /// Per rule (indexed like `rules`): the index of its own `alerts` entry point.
    rule_entries: Vec<Option<usize>>,
    budget: RuleBudget,
    /// The tree interpreter with every module loaded (also the template for its sessions).
    engine: Engine,
    compiled: CompiledPolicy,
    program: Arc<Program>,
    data: Value,
    warnings: Vec<String>,
    /// Idle sessions for `evaluate` callers that do not keep their own.
    idle: Mutex<Vec<Session>>,
}

impl std::fmt::Debug for RulePack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulePack")
            .field("generation", &self.generation)
            .field("dir", &self.dir)
            .field("engine_kind", &self.engine_kind)
            .field("rules", &self.rules.iter().map(|r| &r.id).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One evaluator's private engine state: a VM (or interpreter) with the pack loaded. Cheap to
/// reuse, not free to make: keep one per worker thread.
pub struct Session {
    pack_id: u64,
    engine: SessionEngine,
    /// Builds each event's input, reusing what repeats between consecutive events.
    converter: InputConverter,
}

enum SessionEngine {
    Vm(Box<RegoVM>),
    Interpreter(Box<Engine>),
}

impl SessionEngine {
    /// Runs entry point `name` (index `index` in the VM) on `input` within `budget`.
    fn run(&mut self, name: &str, index: usize, input: Value, budget: RuleBudget) -> Result<Value, (FailureReason, String)> {
        self.set_input(input);
        self.run_again(name, index, budget)
    }

    /// The input the next runs judge.
    fn set_input(&mut self, input: Value) {
        match self {
            SessionEngine::Vm(vm) => vm.set_input(input),
            SessionEngine::Interpreter(engine) => engine.set_input(input),
        }
    }

    /// Like `run_again`, the time budget judged by the thread's CPU time rather than the wall
    /// clock. The engine's timer stops a run at `budget.time` of wall-clock time. When the
    /// thread had used less than nine tenths of that in CPU time, it was descheduled (a loaded
    /// node, a busy neighbour on its CPU): not the rule's doing, so the run is repeated with the
    /// wall-clock time the budget needs at the CPU share the thread got, twice over (at least
    /// twice the budget, at most [`WALL_BACKSTOP`] times it). The repeat is judged if it
    /// finishes; past its room it fails for time, having cost at most about twice the budget
    /// in CPU. `rejudged` counts the repeats.
    fn run_judged(&mut self, name: &str, index: usize, budget: RuleBudget, rejudged: &mut u32) -> Result<Value, (FailureReason, String)> {
        let wall_started = std::time::Instant::now();
        let cpu_started = crate::time::thread_cpu_time();
        let first = self.run_again(name, index, budget);
        let Err((FailureReason::Timeout, detail)) = first else { return first };
        let cpu = crate::time::thread_cpu_time().saturating_sub(cpu_started);
        let wall = wall_started.elapsed();
        if cpu.saturating_mul(10) >= budget.time.saturating_mul(9) {
            return Err((FailureReason::Timeout, format!("{detail}; it used {cpu:?} of CPU time")));
        }
        *rejudged = rejudged.saturating_add(1);
        let at_share = budget.time.as_secs_f64() * wall.as_secs_f64() / cpu.as_secs_f64().max(1e-9) * 2.0;
        let room = Duration::try_from_secs_f64(at_share)
            .unwrap_or(Duration::MAX)
            .clamp(budget.time.saturating_mul(2), budget.time.saturating_mul(WALL_BACKSTOP));
        let cpu_started = crate::time::thread_cpu_time();
        let again = self.run_again(name, index, RuleBudget { time: room, ..budget });
        match again {
            // It finished within its room: judged, whatever the wall clock said the first time.
            Ok(value) => Ok(value),
            Err((FailureReason::Timeout, detail)) => {
                let cpu_again = crate::time::thread_cpu_time().saturating_sub(cpu_started);
                Err((
                    FailureReason::Timeout,
                    format!(
                        "{detail}: run again with {room:?} of wall-clock time (the first run was cut off having used {cpu:?} of CPU time in {wall:?}), it used {cpu_again:?} of CPU time"
                    ),
                ))
            }
            Err(other) => Err(other),
        }
    }

    /// Runs another entry point on the input already set.
    fn run_again(&mut self, name: &str, index: usize, budget: RuleBudget) -> Result<Value, (FailureReason, String)> {
        match self {
            SessionEngine::Vm(vm) => {
                vm.set_max_instructions(budget.instructions);
                vm.set_execution_timer_config(Some(budget.timer()));
                vm.execute_entry_point_by_index(index).map_err(|e| {
                    let reason = match &e {
                        VmError::InstructionLimitExceeded { .. } | VmError::MemoryLimitExceeded { .. } => FailureReason::Budget,
                        VmError::TimeLimitExceeded { .. } => FailureReason::Timeout,
                        _ => FailureReason::Error,
                    };
                    (reason, e.to_string())
                })
            }
            SessionEngine::Interpreter(engine) => {
                engine.set_execution_timer_config(budget.timer());
                engine.eval_rule(name.to_string()).map_err(|e| {
                    let reason = match e.downcast_ref::<LimitError>() {
                        Some(LimitError::TimeLimitExceeded { .. }) => FailureReason::Timeout,
                        Some(LimitError::MemoryLimitExceeded { .. }) => FailureReason::Budget,
                        _ => FailureReason::Error,
                    };
                    (reason, format!("{e:#}"))
                })
            }
        }
    }
}

static NEXT_PACK_ID: AtomicU64 = AtomicU64::new(1);

/// One rule's cost on a set of events (see `RulePack::rule_costs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleCost {
    pub rule_id: String,
    /// Events of the types the rule subscribes to.
    pub events: usize,
    /// Those its prefilter let through (all of them without one): the ones it judged.
    pub evaluations: usize,
    /// Evaluations that failed (over budget or an error); each counted once, not timed again.
    pub failures: usize,
    /// Time spent judging them.
    pub time: Duration,
}

/// A rule package found while loading: its id and where it is.
struct RulePackage {
    id: String,
    modules: Vec<usize>,
    package_location: Location,
}

impl RulePack {
    /// Loads, validates and compiles the rules directory with default options.
    pub fn load(dir: &Path) -> Result<RulePack, RulesError> {
        Self::load_with(dir, &PackOptions::default())
    }

    pub fn load_with(dir: &Path, options: &PackOptions) -> Result<RulePack, RulesError> {
        let sources = PackSources::read_dir(dir)?;
        let mut pack = Self::from_sources(&sources, options)?;
        pack.dir = Some(dir.to_path_buf());
        Ok(pack)
    }

    pub fn from_sources(sources: &PackSources, options: &PackOptions) -> Result<RulePack, RulesError> {
        let (mut engine, modules, data) = parse_modules(&sources.policies, sources)?;
        let mut diagnostics = Vec::new();

        let packages = find_rule_packages(&modules, &mut diagnostics);
        for package in &packages {
            check_alerts_rules(package, &modules, &mut diagnostics);
        }

        // `meta` is evaluated once here (with no input: it must be constant). This is also
        // where regorus reports semantic errors of the whole pack.
        let mut rules = Vec::new();
        let mut declared_filters: BTreeMap<String, Vec<(EventType, TypeFilter)>> = BTreeMap::new();
        for package in &packages {
            let meta_rule = find_named_rule(package, &modules, "meta");
            let Some((meta_span, meta_expr)) = meta_rule else {
                diagnostics.push(Diagnostic::at(
                    &package.package_location,
                    format!(
                        "rule package palisade.rules.{} has no `meta` object (see rules/README.md)",
                        package.id
                    ),
                ));
                continue;
            };
            let meta_location = location(&meta_span);
            let value = match engine.eval_rule(format!("{RULES_PACKAGE}.{}.meta", package.id)) {
                Ok(v) => v,
                Err(e) => {
                    diagnostics.push(Diagnostic::from_regorus(&e, &meta_location.file));
                    // A semantic error usually concerns the whole pack: stop at the first.
                    return Err(RulesError::Rejected { diagnostics });
                }
            };
            match validate_meta(&package.id, &value, &meta_location, meta_expr.as_ref(), options) {
                Ok(meta) => {
                    if let Some(declared) = prefilter_field(&value) {
                        match rule_filter::parse(declared, &meta.events) {
                            Ok(parsed) => {
                                declared_filters.insert(meta.id.clone(), parsed);
                            }
                            Err(problems) => {
                                let at = field_location(&meta_location, meta_expr.as_deref(), "prefilter");
                                for problem in problems {
                                    diagnostics.push(Diagnostic::at(&at, format!("rule {}: {problem}", meta.id)));
                                }
                            }
                        }
                    }
                    rules.push(meta);
                }
                Err(mut ds) => diagnostics.append(&mut ds),
            }
        }
        if !diagnostics.is_empty() {
            return Err(RulesError::Rejected { diagnostics });
        }
        rules.sort_by(|a, b| a.id.cmp(&b.id));
        if rules.is_empty() && !options.allow_empty {
            let at = sources.root.clone().or_else(|| sources.policies.first().map(|f| f.path.clone())).unwrap_or_default();
            return Err(rejected(Diagnostic::file(
                at,
                "the pack has no rules (no package palisade.rules.<id>), so it would judge nothing; allow an empty pack explicitly if that is meant",
            )));
        }

        let mut warnings: Vec<String> = analysis::check_warnings(&modules).iter().map(ToString::to_string).collect();
        let known: BTreeSet<&str> = rules.iter().map(|r| r.id.as_str()).collect();
        for id in options.overrides.actions.keys().chain(options.overrides.disabled.iter()) {
            if !known.contains(id.as_str()) {
                warnings.push(format!("override names rule {id:?}, which is not in the pack"));
            }
        }

        let mut dispatch: [Vec<usize>; 16] = Default::default();
        for (index, rule) in rules.iter().enumerate() {
            if options.overrides.disabled.contains(&rule.id) {
                continue;
            }
            for ty in &rule.events {
                dispatch[ty.index()].push(index);
            }
        }
        let filters: [Vec<Option<TypeFilter>>; 16] = std::array::from_fn(|t| {
            dispatch[t]
                .iter()
                .map(|&i| {
                    declared_filters
                        .get(&rules[i].id)
                        .and_then(|fs| fs.iter().find(|(ty, _)| ty.index() == t))
                        .map(|(_, f)| f.clone())
                })
                .collect()
        });
        let dispatch_source = dispatch_module(&rules, &dispatch);
        engine
            .add_policy(DISPATCH_FILE.to_string(), dispatch_source)
            .map_err(|e| rejected(Diagnostic::from_regorus(&e, DISPATCH_FILE)))?;

        let mut entry_points: Vec<String> =
            EventType::ALL.iter().map(|t| format!("{DISPATCH_PACKAGE}.{t}")).collect();
        let mut rule_entries = vec![None; rules.len()];
        for (index, rule) in rules.iter().enumerate() {
            if dispatch.iter().any(|subscribers| subscribers.contains(&index)) {
                rule_entries[index] = Some(entry_points.len());
                entry_points.push(format!("{RULES_PACKAGE}.{}.alerts", rule.id));
            }
        }
        let first_file = sources.policies.first().map_or(DISPATCH_FILE, |f| f.path.as_str());
        let compiled = engine
            .compile_with_entrypoint(&regorus::Rc::from(entry_points[0].as_str()))
            .map_err(|e| rejected(Diagnostic::from_regorus(&e, first_file)))?;
        let entry_refs: Vec<&str> = entry_points.iter().map(String::as_str).collect();
        let program = Compiler::compile_from_policy(&compiled, &entry_refs).map_err(|e| {
            rejected(Diagnostic::from_regorus(&anyhow::anyhow!("{e}"), first_file))
        })?;

        let pack = RulePack {
            id: NEXT_PACK_ID.fetch_add(1, Ordering::Relaxed),
            generation: 0,
            dir: None,
            engine_kind: options.engine,
            rules,
            dispatch,
            filters,
            prefilters: !options.no_prefilters,
            entry_points,
            rule_entries,
            budget: options.budget,
            engine,
            compiled,
            program,
            data,
            warnings,
            idle: Mutex::new(Vec::new()),
        };
        // Make one session now so a pack that cannot run (e.g. data conflicting with rule
        // paths) is rejected at load, not at its first event.
        let mut session = pack.session()?;
        // Every rule runs, within its budget, on one event of each type it subscribes to, so
        // a pack that loads also runs.
        let diagnostics = pack.smoke_in(&mut session, super::smoke::events(), "built-in");
        pack.release(session);
        if !diagnostics.is_empty() {
            return Err(RulesError::Rejected { diagnostics });
        }
        for w in &pack.warnings {
            tracing::warn!(warning = %w, "rule pack");
        }
        Ok(pack)
    }

    pub fn rules(&self) -> &[RuleMeta] {
        &self.rules
    }

    pub fn rule(&self, id: &str) -> Option<&RuleMeta> {
        self.rules.iter().find(|r| r.id == id)
    }

    /// The event types at least one enabled rule subscribes to; the daemon switches the others
    /// off in the kernel's enabled-type map.
    pub fn subscribed_types(&self) -> BTreeSet<EventType> {
        EventType::ALL.into_iter().filter(|t| !self.dispatch[t.index()].is_empty()).collect()
    }

    /// The inet/inet6 destination ports the pack's connect rules can match, from their
    /// prefilters (`TypeFilter::inet_ports`): the kernel may keep every other inet connect.
    /// None (filter nothing) when some connect rule declares no connect prefilter or one that
    /// may admit any port, when no rule subscribes to connects, or when the prefilters are off
    /// or not applied (too many subscribers).
    pub fn connect_ports(&self) -> Option<BTreeSet<u16>> {
        let t = EventType::Connect.index();
        if !self.prefilters || self.dispatch[t].is_empty() || self.dispatch[t].len() > MAX_FILTERED_SUBSCRIBERS {
            return None;
        }
        let mut ports = BTreeSet::new();
        for filter in &self.filters[t] {
            ports.extend(filter.as_ref()?.inet_ports()?);
        }
        Some(ports)
    }

    /// The kernel's open prefilter compiled from the pack's open rules' prefilters
    /// (`OpenKernelFilter::add`: path prefixes, suffixes, exact names, hidden components, and the
    /// write/create/truncate flags): the kernel may keep every open none of them admits. None
    /// (filter nothing by rules; the declared `quiet_open_prefixes` list applies) when some open
    /// rule declares no open prefilter, when one admits every open, when no rule subscribes to
    /// opens, or when the prefilters are off or not applied (too many subscribers).
    pub fn open_filter(&self) -> Option<OpenKernelFilter> {
        let t = EventType::Open.index();
        if !self.prefilters || self.dispatch[t].is_empty() || self.dispatch[t].len() > MAX_FILTERED_SUBSCRIBERS {
            return None;
        }
        let mut filter = OpenKernelFilter::default();
        for declared in &self.filters[t] {
            filter.add(declared.as_ref()?);
        }
        (!filter.admits_everything()).then_some(filter)
    }

    /// The rules an event of this type is evaluated against.
    pub fn rules_for(&self, ty: EventType) -> impl Iterator<Item = &RuleMeta> {
        self.dispatch[ty.index()].iter().map(|&i| &self.rules[i])
    }

    /// Set by `PackHandle` when the pack is put in force; 0 for a pack not in a handle.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine_kind
    }

    /// Problems that did not stop the pack from loading (e.g. overrides naming unknown rules).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The same pack evaluated by another engine (for comparisons and benchmarks).
    pub fn with_engine(&self, engine_kind: EngineKind) -> RulePack {
        self.variant(engine_kind, self.prefilters)
    }

    /// The same pack with every subscriber of an event's type evaluated, whatever the rules'
    /// prefilters say (for comparisons and benchmarks).
    pub fn without_prefilters(&self) -> RulePack {
        self.variant(self.engine_kind, false)
    }

    /// Whether rules' prefilters are applied.
    pub fn prefilters_applied(&self) -> bool {
        self.prefilters
    }

    /// Whether `rule_id` declares a prefilter for `ty`.
    pub fn has_prefilter(&self, rule_id: &str, ty: EventType) -> bool {
        self.dispatch[ty.index()]
            .iter()
            .zip(&self.filters[ty.index()])
            .any(|(&i, f)| f.is_some() && self.rules[i].id == rule_id)
    }

    fn variant(&self, engine_kind: EngineKind, prefilters: bool) -> RulePack {
        RulePack {
            id: NEXT_PACK_ID.fetch_add(1, Ordering::Relaxed),
            generation: self.generation,
            dir: self.dir.clone(),
            engine_kind,
            rules: self.rules.clone(),
            dispatch: self.dispatch.clone(),
            filters: self.filters.clone(),
            prefilters,
            entry_points: self.entry_points.clone(),
            rule_entries: self.rule_entries.clone(),
            budget: self.budget,
            engine: self.engine.clone(),
            compiled: self.compiled.clone(),
            program: self.program.clone(),
            data: self.data.clone(),
            warnings: self.warnings.clone(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A private engine for one evaluating thread.
    pub fn session(&self) -> Result<Session, RulesError> {
        let engine = match self.engine_kind {
            EngineKind::Rvm => {
                let mut vm = RegoVM::new_with_policy(self.compiled.clone());
                vm.load_program(self.program.clone());
                vm.set_data(self.data.clone()).map_err(|e| {
                    rejected(Diagnostic::file(LISTS_PATH, format!("lists conflict with rules: {e}")))
                })?;
                SessionEngine::Vm(Box::new(vm))
            }
            EngineKind::Interpreter => SessionEngine::Interpreter(Box::new(self.engine.clone())),
        };
        Ok(Session { pack_id: self.id, engine, converter: InputConverter::default() })
    }

    /// Evaluates one event (the JSON `input` the daemon produces) against the rules subscribed
    /// to its type. Safe to call from many threads; each call borrows an idle session. A rule
    /// that could not judge the event makes this an error (`evaluate_judgement` keeps the other
    /// rules' hits and names the failing rules).
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Vec<RuleHit>, RulesError> {
        self.evaluate_judgement(input).and_then(Judgement::into_hits)
    }

    /// The judgement of every rule subscribed to the event's type: hits, and the rules that
    /// failed (over budget or an error), each on its own.
    pub fn evaluate_judgement(&self, input: &serde_json::Value) -> Result<Judgement, RulesError> {
        let ty = event_type(input).map_err(RulesError::InvalidInput)?;
        let selected = self.select(ty, input);
        if selected == 0 {
            return Ok(Judgement::default());
        }
        let mut session = self.acquire()?;
        let value = session.converter.convert(input);
        let result = self.evaluate_typed(&mut session, ty, value, selected, false);
        self.release(session);
        result
    }

    /// Like `evaluate_judgement`, with a session the caller keeps (a worker thread's own), on the
    /// JSON of a fixture or the regorus value the daemon builds.
    pub fn evaluate_in<I: EventInput>(&self, session: &mut Session, input: &I) -> Result<Judgement, RulesError> {
        let ty = input.event_type().map_err(RulesError::InvalidInput)?;
        let selected = self.select(ty, input);
        if selected == 0 {
            return Ok(Judgement::default());
        }
        let value = input.to_rego(&mut session.converter);
        self.evaluate_typed(session, ty, value, selected, false)
    }

    /// The rules that judge `input`: its type's subscribers whose prefilter admits it (all of
    /// them without prefilters). Empty: the event never reaches Rego.
    pub fn rules_judging<I: EventInput>(&self, input: &I) -> Vec<&RuleMeta> {
        let Ok(ty) = input.event_type() else { return Vec::new() };
        let selected = self.select(ty, input);
        self.dispatch[ty.index()]
            .iter()
            .enumerate()
            .filter(|&(position, _)| is_selected(selected, position))
            .map(|(_, &i)| &self.rules[i])
            .collect()
    }

    /// The subscribers of `ty` that must judge `input`, as a bit mask over `dispatch[ty]`
    /// (0: none, the event never reaches Rego). Cheap: field tests on the input, no allocation.
    fn select<I: EventInput>(&self, ty: EventType, input: &I) -> u64 {
        let subscribers = self.dispatch[ty.index()].len();
        if subscribers == 0 {
            return 0;
        }
        let all = all_of(subscribers);
        if !self.prefilters || subscribers > MAX_FILTERED_SUBSCRIBERS {
            return all;
        }
        let mut selected = 0u64;
        for (position, filter) in self.filters[ty.index()].iter().enumerate() {
            if filter.as_ref().is_none_or(|f| f.admits(input)) {
                selected |= 1 << position;
            }
        }
        selected
    }

    /// Like `evaluate`, but an alert that breaks the contract (no message, bad severity, ...) is
    /// an error instead of a best-effort hit. For tests.
    pub fn evaluate_strict(&self, input: &serde_json::Value) -> Result<Vec<RuleHit>, RulesError> {
        let ty = event_type(input).map_err(RulesError::InvalidInput)?;
        let selected = self.select(ty, input);
        if selected == 0 {
            return Ok(Vec::new());
        }
        let mut session = self.acquire()?;
        let value = session.converter.convert(input);
        let result = self.evaluate_typed(&mut session, ty, value, selected, true);
        self.release(session);
        result.and_then(Judgement::into_hits)
    }

    fn acquire(&self) -> Result<Session, RulesError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(session) => Ok(session),
            None => self.session(),
        }
    }

    fn release(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
    }

    /// Runs every subscribed rule alone, within its budget, on each of `events` (e.g. a pack's
    /// fixtures); one diagnostic per rule that cannot judge one of them.
    pub fn smoke_check(&self, events: &[serde_json::Value], what: &str) -> Vec<Diagnostic> {
        match self.acquire() {
            Ok(mut session) => {
                let diagnostics = self.smoke_in(&mut session, events, what);
                self.release(session);
                diagnostics
            }
            Err(e) => e.lines().into_iter().map(|l| Diagnostic::file(DISPATCH_FILE, l)).collect(),
        }
    }

    fn smoke_in(&self, session: &mut Session, events: &[serde_json::Value], what: &str) -> Vec<Diagnostic> {
        let mut diagnostics = Vec::new();
        let mut failed: BTreeSet<usize> = BTreeSet::new();
        for event in events {
            let Ok(ty) = event_type(event) else { continue };
            let input = session.converter.convert(event);
            let mut first = true;
            for &index in &self.dispatch[ty.index()] {
                let Some(entry) = self.rule_entries[index] else { continue };
                if failed.contains(&index) {
                    continue;
                }
                let name = &self.entry_points[entry];
                let mut result = if first {
                    first = false;
                    session.engine.run(name, entry, input.clone(), self.budget)
                } else {
                    session.engine.run_again(name, entry, self.budget)
                };
                if matches!(result, Err((FailureReason::Timeout, _))) {
                    // The time budget is wall-clock: on a loaded machine a rule that costs a few
                    // ms waits its turn past it (the soak saw a good pack rejected at load 25).
                    // Judge the pack by what the rule costs: run it again with room, and keep
                    // it when the CPU time it used fits the budget.
                    let roomy = RuleBudget { time: self.budget.time.saturating_mul(WALL_BACKSTOP), ..self.budget };
                    let cpu_before = crate::time::thread_cpu_time();
                    let again = session.engine.run_again(name, entry, roomy);
                    let cpu = crate::time::thread_cpu_time().saturating_sub(cpu_before);
                    result = match again {
                        Ok(_) if cpu <= self.budget.time => Ok(Value::Null),
                        Ok(_) => Err((FailureReason::Timeout, format!("it used {cpu:?} of CPU time"))),
                        Err(failure) => Err(failure),
                    };
                }
                if let Err((reason, detail)) = result {
                    let rule = &self.rules[index];
                    let what_failed = match reason {
                        FailureReason::Budget => format!("runs past its budget of {} instructions", self.budget.instructions),
                        FailureReason::Timeout => format!("runs past its budget of {:?}", self.budget.time),
                        FailureReason::Error => "fails".to_string(),
                    };
                    diagnostics.push(Diagnostic::at(
                        &rule.location,
                        format!("rule {}: {what_failed} on the {what} {ty} event ({detail})", rule.id),
                    ));
                    failed.insert(index);
                }
            }
        }
        diagnostics
    }

    /// What each rule costs on `events` (`palisade rules test --bench`): per rule, the events of
    /// its types, how many of them its prefilter let through, and the time it took to judge
    /// those, run alone (so the per-evaluation overhead a dispatch call shares between rules is
    /// counted in each), best of `rounds` runs per event. Indexed like `rules()`.
    pub fn rule_costs(&self, events: &[serde_json::Value], rounds: usize) -> Result<Vec<RuleCost>, RulesError> {
        let mut session = self.session()?;
        let mut costs: Vec<RuleCost> = self.rules.iter().map(|r| RuleCost { rule_id: r.id.clone(), ..RuleCost::default() }).collect();
        for event in events {
            let Ok(ty) = event_type(event) else { continue };
            let selected = self.select(ty, event);
            let mut input = None;
            for (position, &index) in self.dispatch[ty.index()].iter().enumerate() {
                let cost = &mut costs[index];
                cost.events += 1;
                let Some(entry) = self.rule_entries[index].filter(|_| is_selected(selected, position)) else { continue };
                let input = input.get_or_insert_with(|| session.converter.convert(event));
                cost.evaluations += 1;
                let mut best = Duration::MAX;
                for _ in 0..rounds.max(1) {
                    let started = std::time::Instant::now();
                    let result = session.engine.run(&self.entry_points[entry], entry, input.clone(), self.budget);
                    best = best.min(started.elapsed());
                    if result.is_err() {
                        cost.failures += 1;
                        break;
                    }
                }
                cost.time += best;
            }
        }
        Ok(costs)
    }

    /// The budget each rule has per event.
    pub fn budget(&self) -> RuleBudget {
        self.budget
    }

    fn evaluate_typed(
        &self,
        session: &mut Session,
        ty: EventType,
        input: Value,
        selected: u64,
        strict: bool,
    ) -> Result<Judgement, RulesError> {
        if session.pack_id != self.id {
            return Err(RulesError::Eval("session belongs to another rule pack".to_string()));
        }
        let subscribers = &self.dispatch[ty.index()];
        let own_entries = subscribers.iter().enumerate().all(|(position, &index)| {
            !is_selected(selected, position) || self.rule_entries[index].is_some()
        });
        if selected != all_of(subscribers.len()) && own_entries {
            // Prefilters passed some of the type's rules: only those run, each through its
            // own entry point within its own budget (the input is set once). The dispatch entry
            // would run every subscriber and drop the others' alerts: an exec that passes two
            // of seven prefilters paid for all seven rules (issue 13: execs were the p99).
            return self.run_each(session, ty, Some(input), selected, strict, 0);
        }
        // Every subscriber judges the event (no prefilters, or every one passed): one call of the
        // type's dispatch entry, with the sum of their budgets (one call costs less than one
        // call per rule).
        let mut rejudged = 0;
        session.engine.set_input(input);
        let all = session.engine.run_judged(&self.entry_points[ty.index()], ty.index(), self.budget.times(subscribers.len()), &mut rejudged);
        if let Ok(raw) = all {
            return Ok(Judgement { hits: self.hits(ty, &raw, selected, strict)?, failures: Vec::new(), rejudged });
        }
        // Something failed: run each selected rule alone within its own budget, so only the
        // failing rule loses its judgement and it is the one named.
        self.run_each(session, ty, None, selected, strict, rejudged)
    }

    /// Runs each selected subscriber of `ty` through its own entry point within its own budget,
    /// in dispatch order: on `input` when given (set once, for the first), else on the input the
    /// session already holds. A rule that fails is named in the judgement; the others still judge.
    fn run_each(
        &self,
        session: &mut Session,
        ty: EventType,
        input: Option<Value>,
        selected: u64,
        strict: bool,
        rejudged: u32,
    ) -> Result<Judgement, RulesError> {
        let mut judgement = Judgement { rejudged, ..Judgement::default() };
        if let Some(input) = input {
            session.engine.set_input(input);
        }
        for (position, &index) in self.dispatch[ty.index()].iter().enumerate() {
            if !is_selected(selected, position) {
                continue;
            }
            let rule = &self.rules[index];
            let Some(entry) = self.rule_entries[index] else { continue };
            match session.engine.run_judged(&self.entry_points[entry], entry, self.budget, &mut judgement.rejudged) {
                Ok(raw) => judgement.hits.extend(self.rule_hits(rule, &raw, strict)?),
                Err((reason, detail)) => judgement.failures.push(RuleFailure { rule_id: rule.id.clone(), event_type: ty, reason, detail }),
            }
        }
        Ok(judgement)
    }

    /// Turns the dispatch entry's result (an array of alert sets, one per subscribed rule) into
    /// hits.
    pub(crate) fn hits(&self, ty: EventType, raw: &Value, selected: u64, strict: bool) -> Result<Vec<RuleHit>, RulesError> {
        let order = &self.dispatch[ty.index()];
        let sets = match raw {
            Value::Array(sets) => sets,
            Value::Undefined => return Ok(Vec::new()),
            other => {
                return Err(RulesError::Eval(format!(
                    "{ty} dispatch returned {} instead of an array",
                    super::input::to_json(other)
                )));
            }
        };
        let mut hits = Vec::new();
        for (position, alerts) in sets.iter().enumerate() {
            let Some(rule) = order.get(position).map(|&i| &self.rules[i]) else {
                break;
            };
            if !is_selected(selected, position) {
                continue;
            }
            hits.extend(self.rule_hits(rule, alerts, strict)?);
        }
        Ok(hits)
    }

    /// One rule's `alerts` set as hits.
    fn rule_hits(&self, rule: &RuleMeta, alerts: &Value, strict: bool) -> Result<Vec<RuleHit>, RulesError> {
        let alerts = match alerts {
            Value::Set(alerts) => alerts,
            Value::Undefined => return Ok(Vec::new()),
            other => {
                let problem = format!("`alerts` is {} instead of a set", super::input::to_json(other));
                return Err(contract_error(rule, problem));
            }
        };
        let mut hits = Vec::new();
        for alert in alerts.iter() {
            match alert_to_hit(rule, alert) {
                Ok(hit) => hits.push(hit),
                Err((problem, fallback)) => {
                    if strict {
                        return Err(contract_error(rule, problem));
                    }
                    // Detection must not be lost over a malformed alert: raise it anyway
                    // with the rule's own metadata, and say what was wrong.
                    tracing::warn!(rule = %rule.id, %problem, "alert breaks the rule contract");
                    hits.push(fallback);
                }
            }
        }
        Ok(hits)
    }
}

/// The mask selecting all of `n` subscribers (all bits when there are more than 64: then no
/// prefilter applies).
fn all_of(n: usize) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

fn is_selected(selected: u64, position: usize) -> bool {
    position >= 64 || selected & (1 << position) != 0
}

/// A rule's `meta.prefilter`, if it declares one.
fn prefilter_field(meta: &Value) -> Option<&Value> {
    match meta {
        Value::Object(fields) => fields.get(&Value::from("prefilter")),
        _ => None,
    }
}

fn rejected(diagnostic: Diagnostic) -> RulesError {
    RulesError::Rejected { diagnostics: vec![diagnostic] }
}

fn contract_error(rule: &RuleMeta, problem: String) -> RulesError {
    RulesError::AlertContract {
        diagnostic: Diagnostic::at(&rule.location, format!("rule {}: {problem}", rule.id)),
    }
}

fn alert_to_hit(rule: &RuleMeta, alert: &Value) -> Result<RuleHit, (String, RuleHit)> {
    let mut hit = RuleHit {
        rule_id: rule.id.clone(),
        title: rule.title.clone(),
        severity: rule.severity,
        message: rule.title.clone(),
        mitre: rule.mitre.clone(),
        action: rule.action,
    };
    let problem = match alert {
        Value::String(message) => {
            hit.message = message.to_string();
            return Ok(hit);
        }
        Value::Object(fields) => {
            let mut problems = Vec::new();
            for (key, value) in fields.iter() {
                let key = match key {
                    Value::String(k) => k.as_ref(),
                    _ => {
                        problems.push("alert field names must be strings".to_string());
                        continue;
                    }
                };
                match (key, value) {
                    ("message", Value::String(m)) => hit.message = m.to_string(),
                    ("severity", Value::String(s)) => match s.parse::<Severity>() {
                        Ok(s) => hit.severity = s,
                        Err(e) => problems.push(e),
                    },
                    ("action", Value::String(a)) => match a.parse::<Action>() {
                        // An operator override is stronger than what the alert asks for.
                        Ok(a) if rule.action == rule.declared_action => hit.action = a,
                        Ok(_) => {}
                        Err(e) => problems.push(e),
                    },
                    ("mitre", Value::Array(ids)) => {
                        for id in ids.iter() {
                            match id {
                                Value::String(id) if is_mitre_id(id) => {
                                    if !hit.mitre.iter().any(|m| m == id.as_ref()) {
                                        hit.mitre.push(id.to_string());
                                    }
                                }
                                other => problems.push(format!(
                                    "bad MITRE id {}",
                                    super::input::to_json(other)
                                )),
                            }
                        }
                    }
                    (k, v) if ALERT_FIELDS.contains(&k) => problems.push(format!(
                        "alert field {k:?} has the wrong type ({})",
                        super::input::to_json(v)
                    )),
                    (k, _) => problems.push(format!("unknown alert field {k:?}")),
                }
            }
            if !fields.contains_key(&Value::from("message")) {
                problems.push("alert has no \"message\"".to_string());
            }
            if problems.is_empty() {
                return Ok(hit);
            }
            problems.join("; ")
        }
        other => format!(
            "an alert must be a message string or an object, not {}",
            super::input::to_json(other)
        ),
    };
    hit.message = format!("{} (malformed alert: {problem})", hit.message);
    Err((problem, hit))
}

pub(crate) fn is_mitre_id(id: &str) -> bool {
    let b = id.as_bytes();
    let technique = b.len() >= 5 && b[0] == b'T' && b[1..5].iter().all(u8::is_ascii_digit);
    match b.len() {
        5 => technique,
        9 => technique && b[5] == b'.' && b[6..9].iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

pub(crate) fn location(span: &Span) -> Location {
    Location { file: span.source.file().clone(), line: span.line, col: span.col }
}

type Modules = Vec<regorus::unstable::Ref<Module>>;

/// Parses every policy file into an engine (collecting every parse error, not only the first)
/// and loads the lists.
pub(crate) fn parse_modules(
    files: &[SourceFile],
    sources: &PackSources,
) -> Result<(Engine, Modules, Value), RulesError> {
    let mut engine = Engine::new();
    let mut diagnostics = Vec::new();
    for file in files {
        // Checked before the parser sees the text: its time grows exponentially with nesting.
        if file.text.len() as u64 > analysis::MAX_SOURCE_BYTES {
            diagnostics.push(Diagnostic::file(
                &file.path,
                format!("file is {} bytes, more than the {} a rule file may have", file.text.len(), analysis::MAX_SOURCE_BYTES),
            ));
            continue;
        }
        if let Some(d) = analysis::check_source_text(&file.path, &file.text) {
            diagnostics.push(d);
            continue;
        }
        if let Err(e) = engine.add_policy(file.path.clone(), file.text.clone()) {
            diagnostics.push(Diagnostic::from_regorus(&e, &file.path));
        }
    }
    let data = match sources.lists_data() {
        Ok(data) => data,
        Err(mut ds) => {
            diagnostics.append(&mut ds);
            Value::new_object()
        }
    };
    if !diagnostics.is_empty() {
        return Err(RulesError::Rejected { diagnostics });
    }
    engine
        .add_data(data.clone())
        .map_err(|e| rejected(Diagnostic::file(LISTS_PATH, format!("{e:#}"))))?;
    let modules = engine.get_modules().clone();
    let list_names: BTreeSet<String> = sources
        .lists
        .iter()
        .filter_map(|f| Path::new(&f.path).file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let diagnostics = analysis::check_modules(&modules, &list_names);
    if !diagnostics.is_empty() {
        return Err(RulesError::Rejected { diagnostics });
    }
    Ok((engine, modules, data))
}

fn package_name(module: &Module) -> String {
    let text = module.package.refr.span().text();
    format!("data.{text}")
}

fn find_rule_packages(modules: &Modules, diagnostics: &mut Vec<Diagnostic>) -> Vec<RulePackage> {
    let mut packages: BTreeMap<String, RulePackage> = BTreeMap::new();
    for (index, module) in modules.iter().enumerate() {
        let name = package_name(module);
        let here = location(&module.package.span);
        if name == DISPATCH_PACKAGE || name.starts_with(&format!("{DISPATCH_PACKAGE}.")) {
            diagnostics.push(Diagnostic::at(&here, "package palisade.dispatch is reserved for the engine"));
            continue;
        }
        let Some(rest) = name.strip_prefix(RULES_PACKAGE) else {
            continue; // a helper library, e.g. palisade.lib
        };
        let Some(id) = rest.strip_prefix('.') else {
            if rest.is_empty() {
                diagnostics.push(Diagnostic::at(&here, "rules are packages palisade.rules.<id>, not palisade.rules itself"));
            }
            continue;
        };
        if !is_rule_id(id) {
            diagnostics.push(Diagnostic::at(
                &here,
                format!("rule package must be palisade.rules.<id> with an id of [a-z][a-z0-9_]*, not {id:?}"),
            ));
            continue;
        }
        packages
            .entry(id.to_string())
            .or_insert_with(|| RulePackage { id: id.to_string(), modules: Vec::new(), package_location: here })
            .modules
            .push(index);
    }
    packages.into_values().collect()
}

fn is_rule_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The name a rule defines (`meta` for `meta := {...}`, `alerts` for `alerts contains x`).
pub(crate) fn rule_head(rule: &Rule) -> Option<(&str, &RuleHead)> {
    match rule {
        Rule::Spec { head, .. } => {
            let refr = match head {
                RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } | RuleHead::Func { refr, .. } => refr,
            };
            match refr.as_ref() {
                Expr::Var { span, .. } => Some((span.text(), head)),
                other => Some((other.span().text(), head)),
            }
        }
        Rule::Default { .. } => None,
    }
}

/// The rule `name` in a package: its span and, if written as `name := <literal>`, the literal.
fn find_named_rule(
    package: &RulePackage,
    modules: &Modules,
    name: &str,
) -> Option<(Span, Option<regorus::unstable::Ref<Expr>>)> {
    for &index in &package.modules {
        for rule in &modules[index].policy {
            if let Some((rule_name, head)) = rule_head(rule) {
                if rule_name == name {
                    let literal = match head {
                        RuleHead::Compr { assign: Some(assign), .. } => Some(assign.value.clone()),
                        _ => None,
                    };
                    return Some((rule.span().clone(), literal));
                }
            }
        }
    }
    None
}

/// Static checks of `alerts`: it must be a set rule, and literal alert objects must have the
/// contract's fields with valid literal values.
fn check_alerts_rules(package: &RulePackage, modules: &Modules, diagnostics: &mut Vec<Diagnostic>) {
    let mut found = false;
    for &index in &package.modules {
        for rule in &modules[index].policy {
            let Some((name, head)) = rule_head(rule) else { continue };
            if name != "alerts" && !name.starts_with("alerts[") && !name.starts_with("alerts.") {
                continue;
            }
            found = true;
            match head {
                RuleHead::Set { key: Some(key), refr, .. } if name == "alerts" => {
                    let _ = refr;
                    check_alert_expr(key, diagnostics);
                }
                _ => diagnostics.push(Diagnostic::at(
                    &location(rule.span()),
                    "`alerts` must be a set rule: alerts contains {\"message\": ...} if { ... }",
                )),
            }
        }
    }
    if !found {
        diagnostics.push(Diagnostic::at(
            &package.package_location,
            format!(
                "rule package palisade.rules.{} has no `alerts` rule (alerts contains {{\"message\": ...}} if {{ ... }})",
                package.id
            ),
        ));
    }
}

fn check_alert_expr(expr: &Expr, diagnostics: &mut Vec<Diagnostic>) {
    let here = location(expr.span());
    match expr {
        Expr::Object { fields, .. } => {
            let mut has_message = false;
            for (_, key, value) in fields {
                let key_name = match key.as_ref() {
                    Expr::String { value, .. } | Expr::RawString { value, .. } => {
                        value.as_string().map(|s| s.to_string()).ok()
                    }
                    _ => None,
                };
                let Some(key_name) = key_name else {
                    diagnostics.push(Diagnostic::at(&location(key.span()), "alert field names must be string literals"));
                    continue;
                };
                if !ALERT_FIELDS.contains(&key_name.as_str()) {
                    diagnostics.push(Diagnostic::at(
                        &location(key.span()),
                        format!("unknown alert field {key_name:?} (allowed: {})", ALERT_FIELDS.join(", ")),
                    ));
                    continue;
                }
                has_message |= key_name == "message";
                let literal = match value.as_ref() {
                    Expr::String { value, .. } | Expr::RawString { value, .. } => {
                        value.as_string().map(|s| s.to_string()).ok()
                    }
                    _ => None,
                };
                let problem = match (key_name.as_str(), literal) {
                    ("severity", Some(s)) => s.parse::<Severity>().err(),
                    ("action", Some(a)) => a.parse::<Action>().err(),
                    _ => None,
                };
                if let Some(problem) = problem {
                    diagnostics.push(Diagnostic::at(&location(value.span()), problem));
                }
            }
            if !has_message {
                diagnostics.push(Diagnostic::at(&here, "alert object has no \"message\" field"));
            }
        }
        Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Array { .. }
        | Expr::Set { .. }
        | Expr::ArrayCompr { .. }
        | Expr::SetCompr { .. }
        | Expr::ObjectCompr { .. } => diagnostics.push(Diagnostic::at(
            &here,
            "an alert must be a message string or an object {\"message\": ..., \"severity\"?: ..., \"mitre\"?: [...], \"action\"?: ...}",
        )),
        // Strings, sprintf/concat calls and variables: checked when they produce a value.
        _ => {}
    }
}

/// Where a field of a literal `meta` object is, or the meta rule itself.
fn field_location(meta_location: &Location, meta_expr: Option<&Expr>, field: &str) -> Location {
    if let Some(Expr::Object { fields, .. }) = meta_expr {
        for (_, key, value) in fields {
            if let Expr::String { value: k, .. } = key.as_ref() {
                if k.as_string().is_ok_and(|k| k.as_ref() == field) {
                    return location(value.span());
                }
            }
        }
    }
    meta_location.clone()
}

fn validate_meta(
    id: &str,
    value: &Value,
    meta_location: &Location,
    meta_expr: Option<&regorus::unstable::Ref<Expr>>,
    options: &PackOptions,
) -> Result<RuleMeta, Vec<Diagnostic>> {
    let meta_expr = meta_expr.map(|e| e.as_ref());
    let at = |field: &str, message: String| {
        Diagnostic::at(&field_location(meta_location, meta_expr, field), format!("rule {id}: {message}"))
    };
    let mut problems = Vec::new();
    let Value::Object(fields) = value else {
        return Err(vec![Diagnostic::at(
            meta_location,
            format!("rule {id}: `meta` must be a constant object (it is evaluated without input)"),
        )]);
    };
    for key in fields.keys() {
        let name = key.as_string().map(|s| s.to_string()).unwrap_or_default();
        if !META_FIELDS.contains(&name.as_str()) {
            problems.push(at(&name, format!("unknown meta field {name:?} (allowed: {})", META_FIELDS.join(", "))));
        }
    }
    let get = |name: &str| fields.get(&Value::from(name));
    let string = |name: &str, problems: &mut Vec<Diagnostic>| -> Option<String> {
        match get(name) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.to_string()),
            Some(_) => {
                problems.push(at(name, format!("meta.{name} must be a non-empty string")));
                None
            }
            None => {
                problems.push(at(name, format!("meta has no {name:?}")));
                None
            }
        }
    };

    let meta_id = string("id", &mut problems);
    if let Some(meta_id) = &meta_id {
        if meta_id != id {
            problems.push(at("id", format!("meta.id {meta_id:?} differs from the package name palisade.rules.{id}")));
        }
    }
    let title = string("title", &mut problems);
    let severity = string("severity", &mut problems).and_then(|s| match s.parse::<Severity>() {
        Ok(s) => Some(s),
        Err(e) => {
            problems.push(at("severity", e));
            None
        }
    });
    let declared_action = string("action", &mut problems).and_then(|a| match a.parse::<Action>() {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push(at("action", e));
            None
        }
    });
    let mitre = match get("mitre") {
        Some(Value::Array(ids)) if !ids.is_empty() => {
            let mut out = Vec::new();
            for v in ids.iter() {
                match v {
                    Value::String(s) if is_mitre_id(s) => out.push(s.to_string()),
                    other => problems.push(at(
                        "mitre",
                        format!("bad MITRE ATT&CK id {} (want T1234 or T1234.001)", super::input::to_json(other)),
                    )),
                }
            }
            out
        }
        _ => {
            problems.push(at("mitre", "meta.mitre must be a non-empty array of ATT&CK ids".to_string()));
            Vec::new()
        }
    };
    let events = match get("events") {
        Some(Value::Array(types)) if !types.is_empty() => {
            let mut out = Vec::new();
            for v in types.iter() {
                match v.as_string().ok().and_then(|s| s.parse::<EventType>().ok()) {
                    Some(t) if !out.contains(&t) => out.push(t),
                    Some(_) => {}
                    None => problems.push(at(
                        "events",
                        format!(
                            "bad event type {} (want one of {})",
                            super::input::to_json(v),
                            EventType::ALL.map(EventType::as_str).join(", ")
                        ),
                    )),
                }
            }
            out
        }
        _ => {
            problems.push(at("events", "meta.events must be a non-empty array of event types".to_string()));
            Vec::new()
        }
    };
    let description = match get("description") {
        None => None,
        Some(Value::String(s)) => Some(s.to_string()),
        Some(_) => {
            problems.push(at("description", "meta.description must be a string".to_string()));
            None
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let (Some(title), Some(severity), Some(declared_action)) = (title, severity, declared_action) else {
        return Err(vec![Diagnostic::at(meta_location, format!("rule {id}: incomplete meta"))]);
    };
    let action = options.overrides.actions.get(id).copied().unwrap_or(declared_action);
    Ok(RuleMeta {
        id: id.to_string(),
        title,
        severity,
        mitre,
        action,
        declared_action,
        events,
        description,
        location: meta_location.clone(),
    })
}

fn dispatch_module(rules: &[RuleMeta], dispatch: &[Vec<usize>; 16]) -> String {
    let mut text = String::from("package palisade.dispatch\n\n");
    for ty in EventType::ALL {
        let refs: Vec<String> = dispatch[ty.index()]
            .iter()
            .map(|&i| format!("{RULES_PACKAGE}.{}.alerts", rules[i].id))
            .collect();
        text.push_str(&format!("{ty} := [{}]\n", refs.join(", ")));
    }
    text
}
