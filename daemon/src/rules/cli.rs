//! `palisade rules ...`: the rule author's tools.
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

use super::RulesError;
use super::pack::{PackOptions, PackSources, RuleOverrides, RulePack, parse_modules};
use super::testing::{TestKind, TestOptions, default_fixture_paths, load_fixtures, run_tests};
use crate::output::{Cell, OutputFormat, Table, colour_wanted};

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Compile and lint a rules directory; prints `file:line:col: message` per problem, exit 1.
    Check {
        dir: PathBuf,
        /// Action overrides to apply (YAML: `actions: {rule: alert}`, `disabled: [rule]`).
        #[arg(long)]
        overrides: Option<PathBuf>,
        /// Fixture files or directories every rule is also run on, within its budget (default:
        /// DIR/fixtures and DIR/../testdata/rules).
        #[arg(long = "fixtures")]
        fixtures: Vec<PathBuf>,
        /// Accept a pack with no rules.
        #[arg(long)]
        allow_empty: bool,
    },
    /// Run `test_*` rules of `*_test.rego` files and fixture cases (events in, alerts out).
    Test {
        dir: PathBuf,
        /// Print the rule lines no test reached.
        #[arg(long)]
        coverage: bool,
        /// Fixture files or directories (default: DIR/fixtures and DIR/../testdata/rules).
        #[arg(long = "fixtures")]
        fixtures: Vec<PathBuf>,
        /// Print passing tests too.
        #[arg(short, long)]
        verbose: bool,
        /// Also print what each rule costs on the fixtures (and `--events`): events of its
        /// types, evaluations after its prefilter, time per evaluation and share of the total.
        #[arg(long)]
        bench: bool,
        /// Recorded events (JSONL, from `palisade run --record`) to add to the bench corpus.
        #[arg(long, requires = "bench")]
        events: Option<PathBuf>,
    },
    /// The alerts the rules would raise on recorded events (JSONL, from `palisade run --record`).
    Replay {
        dir: PathBuf,
        #[arg(long)]
        events: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List the rules of a pack with their metadata and subscribed event types.
    List {
        dir: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: OutputFormat,
    },
}

pub fn run(cmd: RulesCommand) -> anyhow::Result<()> {
    match cmd {
        RulesCommand::Check { dir, overrides, fixtures, allow_empty } => check(&dir, overrides, fixtures, allow_empty),
        RulesCommand::Test { dir, coverage, fixtures, verbose, bench, events } => {
            test(&dir, coverage, fixtures.clone(), verbose, bench.then_some((fixtures, events)))
        }
        RulesCommand::Replay { dir, events, output } => replay(&dir, &events, output),
        RulesCommand::List { dir, output } => list(&dir, output),
    }
}

/// Prints the problems of a failed load and exits 1 (the exit code is the contract for CI).
fn fail_with(error: &RulesError) -> ! {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in error.lines() {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
    std::process::exit(1)
}

fn options(overrides: Option<PathBuf>) -> PackOptions {
    let overrides = match overrides {
        Some(path) => RuleOverrides::from_yaml_file(&path).unwrap_or_else(|e| fail_with(&e)),
        None => RuleOverrides::default(),
    };
    PackOptions { overrides, ..PackOptions::default() }
}

fn check(dir: &std::path::Path, overrides: Option<PathBuf>, fixtures: Vec<PathBuf>, allow_empty: bool) -> anyhow::Result<()> {
    let options = PackOptions { allow_empty, ..options(overrides) };
    let sources = PackSources::read_dir(dir).unwrap_or_else(|e| fail_with(&e));
    let pack = RulePack::from_sources(&sources, &options).unwrap_or_else(|e| fail_with(&e));
    // What passes `check` runs in the daemon: every rule, alone and within its budget, on the
    // built-in events (done by the load) and on the pack's fixtures.
    let fixture_paths = if fixtures.is_empty() { default_fixture_paths(dir) } else { fixtures };
    let cases = load_fixtures(&fixture_paths).unwrap_or_else(|e| fail_with(&e));
    let events: Vec<serde_json::Value> = cases.iter().map(|c| c.case.event.clone()).collect();
    let diagnostics = pack.smoke_check(&events, "fixture");
    if !diagnostics.is_empty() {
        fail_with(&RulesError::Rejected { diagnostics });
    }
    // Test files are not part of the pack, but a broken one is still a problem to report.
    let mut all = sources.policies.clone();
    all.extend(sources.tests.iter().cloned());
    if let Err(e) = parse_modules(&all, &sources) {
        fail_with(&e);
    }
    for warning in pack.warnings() {
        println!("warning: {warning}");
    }
    let types: Vec<&str> = pack.subscribed_types().into_iter().map(|t| t.as_str()).collect();
    println!("ok: {} rules, event types: {}", pack.rules().len(), types.join(", "));
    Ok(())
}

/// Fixture paths and an optional recording: the corpus of `rules test --bench`.
type BenchCorpus = (Vec<PathBuf>, Option<PathBuf>);

fn test(dir: &std::path::Path, coverage: bool, fixtures: Vec<PathBuf>, verbose: bool, bench: Option<BenchCorpus>) -> anyhow::Result<()> {
    let options = TestOptions { coverage, fixtures, pack: PackOptions::default() };
    let report = run_tests(dir, &options).unwrap_or_else(|e| fail_with(&e));
    for result in &report.results {
        let kind = match result.kind {
            TestKind::Rego => "rego",
            TestKind::Fixture => "fixture",
        };
        match &result.failure {
            None if verbose => println!("PASS {kind} {}", result.name),
            None => {}
            Some(failure) => println!("FAIL {kind} {}\n{failure}", result.name),
        }
    }
    for id in &report.rules_without_positive {
        println!("warning: rule {id} has no fixture that expects it to fire");
    }
    for id in &report.rules_without_negative {
        println!("warning: rule {id} has no fixture of its event types that expects it to stay quiet");
    }
    if coverage {
        if report.uncovered.is_empty() {
            println!("coverage: every rule line was reached");
        }
        for (file, lines) in &report.uncovered {
            println!("coverage: {file}: {} lines not reached", lines.len());
            for (line, text) in lines {
                println!("  {file}:{line}: {text}");
            }
        }
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    if let Some((fixtures, events)) = bench {
        print_costs(dir, fixtures, events.as_deref())?;
    }
    if report.failed() > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Rounds per event in `rules test --bench`: the best of them is kept, which takes out most of
/// what a busy machine adds.
const BENCH_ROUNDS: usize = 5;

fn print_costs(dir: &std::path::Path, fixtures: Vec<PathBuf>, events: Option<&std::path::Path>) -> anyhow::Result<()> {
    let pack = RulePack::load(dir).unwrap_or_else(|e| fail_with(&e));
    let fixture_paths = if fixtures.is_empty() { default_fixture_paths(dir) } else { fixtures };
    let mut corpus: Vec<serde_json::Value> =
        load_fixtures(&fixture_paths).unwrap_or_else(|e| fail_with(&e)).into_iter().map(|c| c.case.event).collect();
    let from_fixtures = corpus.len();
    if let Some(path) = events {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (index, line) in BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let record: serde_json::Value = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a JSON event", path.display(), index + 1))?;
            let input = record.get("input").filter(|i| i.get("type").is_some()).cloned().unwrap_or(record);
            corpus.push(input);
        }
    }
    let mut costs = pack.rule_costs(&corpus, BENCH_ROUNDS).unwrap_or_else(|e| fail_with(&e));
    let total: std::time::Duration = costs.iter().map(|c| c.time).sum();
    costs.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.rule_id.cmp(&b.rule_id)));
    println!(
        "bench: {} events ({from_fixtures} from fixtures{}), each rule run alone on the events its prefilter lets through, best of {BENCH_ROUNDS}",
        corpus.len(),
        events.map(|p| format!(", {} from {}", corpus.len() - from_fixtures, p.display())).unwrap_or_default()
    );
    println!("{:<28} {:>8} {:>10} {:>9} {:>10} {:>7} {:>9}", "RULE", "EVENTS", "EVALUATED", "FAILED", "µs/EVAL", "SHARE", "TOTAL ms");
    for cost in &costs {
        let per = if cost.evaluations == 0 { 0.0 } else { cost.time.as_secs_f64() * 1e6 / cost.evaluations as f64 };
        let share = if total.is_zero() { 0.0 } else { 100.0 * cost.time.as_secs_f64() / total.as_secs_f64() };
        println!(
            "{:<28} {:>8} {:>10} {:>9} {:>10.1} {:>6.1}% {:>9.2}",
            cost.rule_id,
            cost.events,
            cost.evaluations,
            cost.failures,
            per,
            share,
            cost.time.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

fn replay(dir: &std::path::Path, events: &std::path::Path, output: OutputFormat) -> anyhow::Result<()> {
    let pack = RulePack::load(dir).unwrap_or_else(|e| fail_with(&e));
    let file = std::fs::File::open(events).with_context(|| format!("opening {}", events.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Table rows are kept until the end: columns are as wide as their widest value.
    let mut table = Table::new(&["LINE", "POD", "PROCESS", "RULE", "SEVERITY", "ACTION", "MESSAGE"]);
    let (mut events_read, mut hits_total, mut errors) = (0usize, 0usize, 0usize);
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", events.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{}:{}:{}: {e}", events.display(), index + 1, e.column());
                errors += 1;
                continue;
            }
        };
        // A recording holds either bare events or records that wrap one as `input`.
        let input = record.get("input").filter(|i| i.get("type").is_some()).unwrap_or(&record);
        events_read += 1;
        // The same engine, budget and isolation as the daemon: a failing rule is reported and
        // the event's other rules still raise their alerts.
        let judgement = match pack.evaluate_judgement(input) {
            Ok(judgement) => judgement,
            Err(e) => {
                eprintln!("{}:{}:1: {e}", events.display(), index + 1);
                errors += 1;
                continue;
            }
        };
        for failure in &judgement.failures {
            eprintln!("{}:{}:1: {}", events.display(), index + 1, RulesError::RuleFailed { failure: failure.clone() });
            errors += 1;
        }
        for hit in judgement.hits {
            hits_total += 1;
            match output {
                OutputFormat::Json => {
                    let line = serde_json::json!({
                        "line": index + 1,
                        "time": input.get("time"),
                        "event_type": input.get("type"),
                        "pod": input.get("pod"),
                        "process": input.get("process").map(|p| serde_json::json!({
                            "pid": p.get("pid"), "comm": p.get("comm"), "exe": p.get("exe"),
                        })),
                        "rule_id": hit.rule_id, "title": hit.title, "severity": hit.severity,
                        "message": hit.message, "mitre": hit.mitre, "action": hit.action,
                    });
                    // serde_json escapes control characters, so a hostile path cannot forge a line.
                    writeln!(out, "{line}")?;
                }
                OutputFormat::Table => {
                    let pod = input
                        .get("pod")
                        .and_then(|p| Some(format!("{}/{}", p.get("namespace")?.as_str()?, p.get("name")?.as_str()?)))
                        .unwrap_or_else(|| "-".to_string());
                    let process = input
                        .get("process")
                        .map(|p| {
                            format!(
                                "{}[{}]",
                                p.get("comm").and_then(|c| c.as_str()).unwrap_or("?"),
                                p.get("pid").and_then(serde_json::Value::as_i64).unwrap_or(0)
                            )
                        })
                        .unwrap_or_else(|| "-".to_string());
                    table.push(vec![
                        Cell::plain((index + 1).to_string()),
                        Cell::plain(pod),
                        Cell::plain(process),
                        Cell::plain(&hit.rule_id),
                        Cell::plain(hit.severity.to_string()),
                        Cell::plain(hit.action.to_string()),
                        Cell::plain(&hit.message),
                    ]);
                }
            }
        }
    }
    if output == OutputFormat::Table {
        write!(out, "{}", table.render(colour_wanted()))?;
    }
    eprintln!("{events_read} events, {hits_total} alerts, {errors} errors");
    Ok(())
}

fn list(dir: &std::path::Path, output: OutputFormat) -> anyhow::Result<()> {
    let pack = RulePack::load(dir).unwrap_or_else(|e| fail_with(&e));
    match output {
        OutputFormat::Json => {
            let rules: Vec<serde_json::Value> = pack
                .rules()
                .iter()
                .map(|rule| {
                    serde_json::json!({
                        "id": rule.id, "title": rule.title, "severity": rule.severity.to_string(),
                        "action": rule.action.to_string(),
                        "events": rule.events.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                        "mitre": rule.mitre,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rules)?);
        }
        OutputFormat::Table => {
            let mut table = Table::new(&["RULE", "SEVERITY", "ACTION", "EVENTS", "MITRE", "TITLE"]);
            for rule in pack.rules() {
                let events: Vec<&str> = rule.events.iter().map(|t| t.as_str()).collect();
                table.push(vec![
                    Cell::plain(&rule.id),
                    Cell::plain(rule.severity.to_string()),
                    Cell::plain(rule.action.to_string()),
                    Cell::plain(events.join(",")),
                    Cell::plain(rule.mitre.join(",")),
                    Cell::plain(&rule.title),
                ]);
            }
            print!("{}", table.render(colour_wanted()));
        }
    }
    Ok(())
}
