//! The rule author's test runner: Rego unit tests (`test_*` rules in `*_test.rego`, the
//! `opa test` convention), fixture cases (events in, expected alerts out), and coverage.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use regorus::unstable::{Module, Ref};
use regorus::{Engine, Value};
use serde::Deserialize;

use super::RulesError;
use super::diag::Diagnostic;
use super::input::{event_type, to_rego_value};
use super::model::{Action, RuleHit, Severity};
use super::pack::{EngineKind, PackOptions, PackSources, RULES_PACKAGE, RulePack, parse_modules, rule_head};

#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub coverage: bool,
    /// Fixture files or directories; empty means the defaults (`DIR/fixtures`,
    /// `DIR/../testdata/rules`, whichever exist).
    pub fixtures: Vec<PathBuf>,
    pub pack: PackOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TestKind {
    Rego,
    Fixture,
}

#[derive(Debug, Clone)]
pub struct TestResult {
    pub kind: TestKind,
    /// `data.pkg.test_name` or `file: case name`.
    pub name: String,
    /// `None` when it passed; otherwise what went wrong (a diff for fixtures).
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub results: Vec<TestResult>,
    /// Per rule file, the rule lines no test reached (with `coverage`).
    pub uncovered: Vec<(String, Vec<(u32, String)>)>,
    /// Rules that no fixture expects to fire.
    pub rules_without_positive: Vec<String>,
    /// Rules that no fixture of a subscribed event type expects to stay quiet.
    pub rules_without_negative: Vec<String>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.failure.is_none()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// One expected alert: a rule id, optionally with what the hit must say.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Expectation {
    Rule(String),
    Detailed {
        rule: String,
        #[serde(default)]
        action: Option<Action>,
        #[serde(default)]
        severity: Option<Severity>,
        /// A substring the message must contain.
        #[serde(default)]
        message: Option<String>,
    },
}

impl Expectation {
    pub fn rule(&self) -> &str {
        match self {
            Expectation::Rule(rule) | Expectation::Detailed { rule, .. } => rule,
        }
    }
}

/// A fixture case: an event (merged over the file's `base`) and the alerts it must raise;
/// `want: []` says the event must raise nothing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureCase {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub event: serde_json::Value,
    pub want: Vec<Expectation>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    #[serde(default)]
    description: Option<String>,
    /// Fields every case's event starts from.
    #[serde(default)]
    base: Option<serde_json::Value>,
    cases: Vec<FixtureCase>,
}

/// A case ready to run: where it came from and its full event.
#[derive(Debug, Clone)]
pub struct LoadedCase {
    pub file: String,
    pub case: FixtureCase,
}

/// Runs the Rego tests and fixtures of a rules directory.
pub fn run_tests(dir: &Path, options: &TestOptions) -> Result<TestReport, RulesError> {
    let sources = PackSources::read_dir(dir)?;
    let pack = RulePack::from_sources(&sources, &options.pack)?;
    let fixture_paths = if options.fixtures.is_empty() { default_fixture_paths(dir) } else { options.fixtures.clone() };
    let cases = load_fixtures(&fixture_paths)?;

    let mut report = TestReport::default();

    // Rego tests run in the tree interpreter over the rules plus the test files, which is
    // also where coverage is gathered.
    let mut all_files = sources.policies.clone();
    all_files.extend(sources.tests.iter().cloned());
    let (mut engine, modules, _) = parse_modules(&all_files, &sources)?;
    if options.coverage {
        engine.set_enable_coverage(true);
    }
    // Rego unit tests run only in the interpreter, which counts no instructions: bound them in
    // time (ten rule budgets: a test may exercise several rules).
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: options.pack.budget.time.saturating_mul(10),
        check_interval: std::num::NonZeroU32::MIN.saturating_add(63),
    });
    run_rego_tests(&mut engine, &modules, &mut report);

    // The interpreter runs every subscriber (no prefilters), and so does a second RVM pack:
    // a rule whose declared prefilter hides one of its alerts fails the case that shows it.
    let interpreter = pack.with_engine(EngineKind::Interpreter).without_prefilters();
    let unfiltered = pack.without_prefilters();
    let mut positive: BTreeSet<String> = BTreeSet::new();
    let mut negative: BTreeSet<String> = BTreeSet::new();
    for loaded in &cases {
        let name = format!("{}: {}", loaded.file, loaded.case.name);
        let failure = run_case(&pack, &interpreter, &unfiltered, loaded);
        if failure.is_none() {
            let wanted: BTreeSet<&str> = loaded.case.want.iter().map(Expectation::rule).collect();
            positive.extend(wanted.iter().map(|s| s.to_string()));
            if let Ok(ty) = event_type(&loaded.case.event) {
                for rule in pack.rules_for(ty) {
                    if !wanted.contains(rule.id.as_str()) {
                        negative.insert(rule.id.clone());
                    }
                }
            }
        }
        if options.coverage {
            // Reach the rules through the coverage engine as well.
            if let Ok(ty) = event_type(&loaded.case.event) {
                engine.set_input(to_rego_value(&loaded.case.event));
                for rule in pack.rules_for(ty) {
                    let _ = engine.eval_rule(format!("{RULES_PACKAGE}.{}.alerts", rule.id));
                }
            }
        }
        report.results.push(TestResult { kind: TestKind::Fixture, name, failure });
    }
    for rule in pack.rules() {
        if !positive.contains(&rule.id) {
            report.rules_without_positive.push(rule.id.clone());
        }
        if !negative.contains(&rule.id) {
            report.rules_without_negative.push(rule.id.clone());
        }
    }

    if options.coverage {
        report.uncovered = uncovered_lines(&mut engine, &pack)?;
    }
    Ok(report)
}

/// Runs every `test_*` rule of the `_test.rego` files (each path once) in the interpreter.
fn run_rego_tests(engine: &mut Engine, modules: &[Ref<Module>], report: &mut TestReport) {
    let mut seen = BTreeSet::new();
    for module in modules {
        let file = module.package.span.source.file().clone();
        if !file.ends_with("_test.rego") {
            continue;
        }
        let package = format!("data.{}", module.package.refr.span().text());
        for rule in &module.policy {
            let Some((name, _)) = rule_head(rule) else { continue };
            if !name.starts_with("test_") {
                continue;
            }
            let path = format!("{package}.{name}");
            if !seen.insert(path.clone()) {
                continue;
            }
            let failure = match engine.eval_rule(path.clone()) {
                Ok(Value::Bool(true)) => None,
                Ok(Value::Undefined) => Some("undefined (a condition in the test did not hold)".to_string()),
                Ok(other) => Some(format!("got {}", super::input::to_json(&other))),
                Err(e) => Some(Diagnostic::from_regorus(&e, &file).to_string()),
            };
            report.results.push(TestResult { kind: TestKind::Rego, name: path, failure });
        }
    }
}

/// Lines of the rules (not the tests) that no test or fixture reached.
fn uncovered_lines(engine: &mut Engine, pack: &RulePack) -> Result<Vec<(String, Vec<(u32, String)>)>, RulesError> {
    let mut uncovered_lines = Vec::new();
    // `meta` is evaluated at every load; count it as reached.
    for rule in pack.rules() {
        let _ = engine.eval_rule(format!("{RULES_PACKAGE}.{}.meta", rule.id));
    }
    let coverage = engine
        .get_coverage_report()
        .map_err(|e| RulesError::Eval(format!("coverage: {e:#}")))?;
    for file in coverage.files {
        if file.path.ends_with("_test.rego") || file.not_covered.is_empty() {
            continue;
        }
        let lines: Vec<&str> = file.code.split('\n').collect();
        let uncovered = file
            .not_covered
            .iter()
            .map(|&n| (n, lines.get(n as usize - 1).map_or("", |l| l.trim()).to_string()))
            .collect();
        uncovered_lines.push((file.path, uncovered));
    }
    Ok(uncovered_lines)
}

/// `DIR/fixtures` and `DIR/../testdata/rules`, whichever exist.
pub fn default_fixture_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let own = dir.join("fixtures");
    if own.is_dir() {
        paths.push(own);
    }
    if let Some(parent) = dir.canonicalize().ok().and_then(|d| d.parent().map(Path::to_path_buf)) {
        let shared = parent.join("testdata").join("rules");
        if shared.is_dir() {
            paths.push(shared);
        }
    }
    paths
}

/// Reads fixture cases from files and directories (`*.yaml`, `*.yml`, `*.jsonl`).
pub fn load_fixtures(paths: &[PathBuf]) -> Result<Vec<LoadedCase>, RulesError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| RulesError::Io { path: path.clone(), source })?;
            for entry in entries {
                let entry = entry.map_err(|source| RulesError::Io { path: path.clone(), source })?;
                files.push(entry.path());
            }
        } else {
            files.push(path.clone());
        }
    }
    files.retain(|f| {
        let name = f.to_string_lossy();
        name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".jsonl")
    });
    files.sort();

    let mut cases = Vec::new();
    let mut diagnostics = Vec::new();
    for path in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| RulesError::Io { path: path.clone(), source })?;
        if file.ends_with(".jsonl") {
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() || line.trim_start().starts_with("//") {
                    continue;
                }
                match serde_json::from_str::<FixtureCase>(line) {
                    Ok(case) => cases.push(LoadedCase { file: format!("{file}:{}", index + 1), case }),
                    Err(e) => diagnostics.push(Diagnostic::new(&file, index as u32 + 1, e.column() as u32, e.to_string())),
                }
            }
        } else {
            match serde_norway::from_str::<FixtureFile>(&text) {
                Ok(fixture) => {
                    let _ = fixture.description;
                    for mut case in fixture.cases {
                        if let Some(base) = &fixture.base {
                            let mut event = base.clone();
                            merge(&mut event, &case.event);
                            case.event = event;
                        }
                        cases.push(LoadedCase { file: file.clone(), case });
                    }
                }
                Err(e) => {
                    let (line, col) = e.location().map_or((1, 1), |l| (l.line() as u32, l.column() as u32));
                    diagnostics.push(Diagnostic::new(&file, line, col, e.to_string()));
                }
            }
        }
    }
    if !diagnostics.is_empty() {
        return Err(RulesError::Rejected { diagnostics });
    }
    Ok(cases)
}

/// Deep merge: objects merge key by key; anything else replaces, `null` included (it is a real
/// value in events, e.g. `pod: null` for a process outside any pod).
fn merge(base: &mut serde_json::Value, overlay: &serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (key, value) in o {
                match b.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => merge(existing, value),
                    _ => {
                        b.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Runs one case through the register VM (with the rules' prefilters, as the daemon does),
/// the register VM without prefilters and the tree interpreter; returns the failure, if any,
/// as a readable diff.
pub fn run_case(pack: &RulePack, interpreter: &RulePack, unfiltered: &RulePack, loaded: &LoadedCase) -> Option<String> {
    let event = &loaded.case.event;
    let got = match pack.evaluate_strict(event) {
        Ok(hits) => hits,
        Err(e) => return Some(format!("evaluation failed: {}", e.lines().join("; "))),
    };
    match unfiltered.evaluate_strict(event) {
        Ok(all) if sorted(&all) == sorted(&got) => {}
        Ok(all) => {
            let hidden: Vec<&str> = all.iter().filter(|h| !got.contains(h)).map(|h| h.rule_id.as_str()).collect();
            return Some(format!(
                "prefilter unsound: without prefilters the rules raise {:?}, with them {:?}; the meta.prefilter of {hidden:?} rejects this event",
                ids(&all),
                ids(&got)
            ));
        }
        Err(e) => return Some(format!("evaluation without prefilters failed: {}", e.lines().join("; "))),
    }
    match interpreter.evaluate_strict(event) {
        Ok(other) if sorted(&other) == sorted(&got) => {}
        Ok(other) => {
            return Some(format!(
                "engines disagree: rvm raised {:?}, interpreter raised {:?}",
                ids(&got),
                ids(&other)
            ));
        }
        // The daemon runs the register VM; a case the interpreter cannot evaluate is a
        // disagreement between the two, and a failure (e.g. a builtin error the VM treats as
        // "undefined" and the interpreter raises).
        Err(e) => {
            return Some(format!(
                "engines disagree: the register VM (the daemon's engine) raised {:?}, the tree interpreter failed: {}",
                ids(&got),
                e.lines().join("; ")
            ));
        }
    }
    let mut lines = Vec::new();
    for want in &loaded.case.want {
        if pack.rule(want.rule()).is_none() {
            lines.push(format!("  ? {:<28} no such rule in the pack", want.rule()));
        }
    }
    let mut remaining: Vec<&RuleHit> = got.iter().collect();
    let mut missing = Vec::new();
    for want in &loaded.case.want {
        match remaining.iter().position(|hit| matches(want, hit)) {
            Some(i) => {
                remaining.remove(i);
            }
            None => missing.push(want),
        }
    }
    if missing.is_empty() && remaining.is_empty() && lines.is_empty() {
        return None;
    }
    for want in missing {
        let detail = match want {
            Expectation::Rule(_) => String::new(),
            Expectation::Detailed { action, severity, message, .. } => {
                let mut parts = Vec::new();
                if let Some(a) = action {
                    parts.push(format!("action={a}"));
                }
                if let Some(s) = severity {
                    parts.push(format!("severity={s}"));
                }
                if let Some(m) = message {
                    parts.push(format!("message~{m:?}"));
                }
                parts.join(" ")
            }
        };
        let raised = got.iter().find(|h| h.rule_id == want.rule());
        let note = match raised {
            Some(hit) => format!(" (raised as action={} severity={} message={:?})", hit.action, hit.severity, hit.message),
            None => String::new(),
        };
        lines.push(format!("  - {:<28} expected, not raised {detail}{note}", want.rule()));
    }
    for hit in remaining {
        lines.push(format!("  + {:<28} raised, not expected: [{}] {}", hit.rule_id, hit.action, hit.message));
    }
    lines.push(format!("    event: {}", event));
    Some(lines.join("\n"))
}

fn matches(want: &Expectation, hit: &RuleHit) -> bool {
    match want {
        Expectation::Rule(rule) => hit.rule_id == *rule,
        Expectation::Detailed { rule, action, severity, message } => {
            hit.rule_id == *rule
                && action.is_none_or(|a| a == hit.action)
                && severity.is_none_or(|s| s == hit.severity)
                && message.as_ref().is_none_or(|m| hit.message.contains(m.as_str()))
        }
    }
}

fn sorted(hits: &[RuleHit]) -> Vec<RuleHit> {
    let mut hits = hits.to_vec();
    hits.sort();
    hits
}

fn ids(hits: &[RuleHit]) -> Vec<&str> {
    hits.iter().map(|h| h.rule_id.as_str()).collect()
}
