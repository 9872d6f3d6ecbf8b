//! `palisade alerts [--follow] [filters] [-o table|json|falco] [--file PATH...]` and
//! `palisade alerts summary`: against the running daemon's API, or log files. A client of the
//! API socket, so it lives here at the edge (`alerts` itself imports no `api`).
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::alerts::export::{ExportFormat, format_line};
use crate::alerts::query::{AlertQuery, ReadReport, log_files, parse_kinds, parse_pod, read_alerts};
use crate::alerts::render::{AlertColumns, Cell, Table, alert_header, alert_line, colour_wanted, terminal_safe, terminal_width};
use crate::alerts::schema::Alert;
use crate::alerts::time::{now_micros, parse_instant};
use super::client::block_on;
use crate::output::OutputFormat;

#[derive(Args, Debug, Clone, Default)]
pub struct AlertFilterArgs {
    /// Only alerts at or after this: a duration back from now (10m, 2h, 1d) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only alerts at or before this (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only this pod: NAMESPACE/POD.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only pods in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only this rule id.
    #[arg(long)]
    pub rule: Option<String>,
    /// Only this severity and above: info, low, medium, high, critical.
    #[arg(long)]
    pub severity: Option<String>,
    /// Only these kinds (repeat or comma-separate): rule, quarantine, release, policy_denied,
    /// rules_rejected, rule_error, guardrail, tamper, event_loss, daemon.
    #[arg(long)]
    pub kind: Vec<String>,
}

impl AlertFilterArgs {
    pub fn to_query(&self) -> anyhow::Result<AlertQuery> {
        let now = now_micros();
        let mut q = AlertQuery::default();
        if let Some(s) = &self.since {
            q.since = Some(parse_instant(s, now).context("--since")?);
        }
        if let Some(s) = &self.until {
            q.until = Some(parse_instant(s, now).context("--until")?);
        }
        q.namespace = self.namespace.clone();
        if let Some(p) = &self.pod {
            q.pod = Some(parse_pod(p)?);
        }
        q.rule = self.rule.clone();
        if let Some(s) = &self.severity {
            q.min_severity = Some(s.parse().map_err(anyhow::Error::msg)?);
        }
        for k in &self.kind {
            q.kinds.extend(parse_kinds(k)?);
        }
        Ok(q)
    }
}

#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// Read these log files (in the order given) instead of asking the daemon.
    #[arg(long, num_args = 1..)]
    pub file: Vec<PathBuf>,
    #[command(flatten)]
    pub daemon: super::client::DaemonArgs,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub command: Option<AlertsCommand>,
    /// Keep printing alerts as they are raised.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub filters: AlertFilterArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    /// json is one alert per line (for jq); falco is Falco's JSON output.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: AlertOutput,
}

/// `-o` for `palisade alerts`: the shared table and json ([`OutputFormat`]) plus Falco's JSON.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AlertOutput {
    #[default]
    Table,
    Json,
    Falco,
}

#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// Counts by rule, pod, severity and outcome.
    Summary {
        #[command(flatten)]
        filters: AlertFilterArgs,
        #[command(flatten)]
        source: SourceArgs,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

enum Output {
    Table { columns: AlertColumns, colour: bool, header_done: bool },
    Lines(ExportFormat),
}

/// Prints alerts; a closed stdout (`| head`) ends the listing quietly.
struct Printer {
    output: Output,
    out: std::io::StdoutLock<'static>,
    closed: bool,
}

impl Printer {
    fn new(format: AlertOutput) -> Printer {
        let output = match format {
            AlertOutput::Table => Output::Table { columns: AlertColumns::for_terminal(terminal_width()), colour: colour_wanted(), header_done: false },
            AlertOutput::Json => Output::Lines(ExportFormat::Json),
            AlertOutput::Falco => Output::Lines(ExportFormat::Falco),
        };
        Printer { output, out: std::io::stdout().lock(), closed: false }
    }

    fn print(&mut self, alert: &Alert) -> ControlFlow<()> {
        let text = match &mut self.output {
            Output::Table { columns, colour, header_done } => {
                let mut text = String::new();
                if !*header_done {
                    *header_done = true;
                    text.push_str(&alert_header(*colour));
                    text.push('\n');
                }
                text.push_str(&alert_line(alert, columns, *colour));
                text
            }
            Output::Lines(format) => format_line(alert, *format),
        };
        if writeln!(self.out, "{text}").and_then(|()| self.out.flush()).is_err() {
            self.closed = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Streamed lines: alerts are printed, notices go to stderr.
    fn line(&mut self, line: &[u8]) -> ControlFlow<()> {
        match serde_json::from_slice::<Value>(line) {
            Ok(v) if v.get("notice").is_some() => {
                notice(&v);
                ControlFlow::Continue(())
            }
            Ok(v) => match serde_json::from_value::<Alert>(v) {
                Ok(alert) => self.print(&alert),
                Err(err) => {
                    eprintln!("palisade: skipped a line that is not an alert: {err}");
                    ControlFlow::Continue(())
                }
            },
            Err(err) => {
                eprintln!("palisade: skipped a line that is not JSON: {err}");
                ControlFlow::Continue(())
            }
        }
    }
}

fn notice(v: &Value) {
    let text = match v.get("notice").and_then(Value::as_str) {
        Some("lagged") => format!("missed {} alerts while falling behind (they are in the log)", v["missed"]),
        Some("read_report") => format!(
            "{} unreadable log lines (first: {}); unreadable files: {}",
            v["bad_lines"],
            v["first_bad"].as_str().unwrap_or("-"),
            v["unreadable"]
        ),
        _ => v.to_string(),
    };
    eprintln!("palisade: {}", terminal_safe(&text));
}

fn report_problems(report: &ReadReport) {
    if report.bad_lines > 0 || !report.unreadable.is_empty() {
        notice(&json!({
            "notice": "read_report",
            "bad_lines": report.bad_lines,
            "first_bad": report.first_bad,
            "unreadable": report.unreadable,
        }));
    }
}

pub fn run(args: AlertsArgs) -> anyhow::Result<()> {
    if let Some(AlertsCommand::Summary { filters, source, output }) = args.command {
        return summary(&filters.to_query()?, &source, output);
    }
    let query = args.filters.to_query()?;
    let mut printer = Printer::new(args.output);
    let files = match files_to_read(&args.source)? {
        Some(files) => files,
        None => {
            let client = args.source.daemon.client();
            let path = if args.follow { "/v1/alerts/follow" } else { "/v1/alerts" };
            let url = format!("{path}?{}", query.to_query_string());
            match block_on(client.stream_lines(&url, |line| printer.line(line)))? {
                Ok(()) => return Ok(()),
                Err(err) if err.daemon_absent() && !log_files(&args.source.daemon.state_dir).is_empty() => {
                    eprintln!("palisade: {err}; reading the log files in {} instead", args.source.daemon.state_dir.display());
                    log_files(&args.source.daemon.state_dir)
                }
                Err(err) => return Err(err.into()),
            }
        }
    };
    if args.follow {
        return follow_files(&files, &query, &mut printer);
    }
    let report = read_alerts(&files, &query, |alert| printer.print(&alert));
    report_problems(&report);
    Ok(())
}

/// `--file` paths, checked; None when the daemon is to be asked.
fn files_to_read(source: &SourceArgs) -> anyhow::Result<Option<Vec<PathBuf>>> {
    if source.file.is_empty() {
        return Ok(None);
    }
    for f in &source.file {
        if !f.is_file() {
            anyhow::bail!("{}: not a file", f.display());
        }
    }
    Ok(Some(source.file.clone()))
}

/// Prints history from all files, then follows the last one as it grows, reopening it when it
/// is rotated (a new inode) or truncated.
fn follow_files(files: &[PathBuf], query: &AlertQuery, printer: &mut Printer) -> anyhow::Result<()> {
    let Some((last, earlier)) = files.split_last() else { anyhow::bail!("no alert log to follow") };
    let report = read_alerts(earlier, query, |alert| printer.print(&alert));
    report_problems(&report);
    let mut current = open_follow(last)?;
    let mut partial = Vec::new();
    let mut reopen_at_eof = false;
    loop {
        let mut line = Vec::new();
        match current.1.read_until(b'\n', &mut line) {
            Ok(0) if reopen_at_eof => {
                // The rotated file is read to its end: go on with the new one.
                current = open_follow(last)?;
                partial.clear();
                reopen_at_eof = false;
                continue;
            }
            Ok(0) => {
                std::thread::sleep(Duration::from_millis(250));
                let meta = std::fs::metadata(last);
                let rotated = meta.as_ref().map(|m| m.ino() != current.0).unwrap_or(false);
                let position = current.1.stream_position().unwrap_or(0);
                let truncated = !rotated && meta.as_ref().map(|m| m.len() < position).unwrap_or(false);
                if truncated {
                    current = open_follow(last)?;
                    partial.clear();
                }
                // Lines written just before a rotation are still in the old file: finish it.
                reopen_at_eof = rotated;
                continue;
            }
            Ok(_) => {}
            Err(err) => return Err(err).with_context(|| last.display().to_string()),
        }
        if line.last() != Some(&b'\n') {
            // A line still being written: keep it until its newline arrives.
            partial.extend_from_slice(&line);
            continue;
        }
        partial.extend_from_slice(&line);
        let complete = std::mem::take(&mut partial);
        if let Ok(alert) = serde_json::from_slice::<Alert>(complete.trim_ascii())
            && query.matches(&alert)
            && printer.print(&alert).is_break()
        {
            return Ok(());
        }
    }
}

fn open_follow(path: &Path) -> anyhow::Result<(u64, BufReader<File>)> {
    let file = File::open(path).with_context(|| path.display().to_string())?;
    let ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    Ok((ino, reader))
}

/// Counts per rule, pod, severity and outcome; `count` is summed, so aggregated bursts weigh
/// what they stand for.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub alerts: u64,
    pub occurrences: u64,
    pub by_rule: BTreeMap<String, u64>,
    pub by_pod: BTreeMap<String, u64>,
    pub by_severity: BTreeMap<String, u64>,
    pub by_kind: BTreeMap<String, u64>,
    pub by_outcome: BTreeMap<String, u64>,
}

impl Summary {
    pub fn add(&mut self, alert: &Alert) {
        let n = alert.count.max(1);
        self.alerts += 1;
        self.occurrences += n;
        let rule = if alert.rule_id().is_empty() { format!("({})", alert.kind) } else { alert.rule_id().to_string() };
        *self.by_rule.entry(rule).or_default() += n;
        let pod = alert.pod.as_ref().map_or_else(|| "(host)".to_string(), |p| p.qualified());
        *self.by_pod.entry(pod).or_default() += n;
        *self.by_severity.entry(alert.severity.as_str().to_string()).or_default() += n;
        *self.by_kind.entry(alert.kind.as_str().to_string()).or_default() += n;
        *self.by_outcome.entry(alert.outcome.as_str().to_string()).or_default() += n;
    }

    pub fn render(&self, colour: bool) -> String {
        let mut out = format!("{} alerts standing for {} occurrences\n", self.alerts, self.occurrences);
        let sections: [(&str, &BTreeMap<String, u64>); 5] = [
            ("RULE", &self.by_rule),
            ("POD", &self.by_pod),
            ("SEVERITY", &self.by_severity),
            ("KIND", &self.by_kind),
            ("OUTCOME", &self.by_outcome),
        ];
        for (title, counts) in sections {
            let mut rows: Vec<(&String, &u64)> = counts.iter().collect();
            rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let mut table = Table::new(&[title, "COUNT"]);
            for (k, n) in rows {
                table.push(vec![Cell::plain(k), Cell::plain(n.to_string())]);
            }
            out.push('\n');
            out.push_str(&table.render(colour));
        }
        out
    }
}

fn summary(query: &AlertQuery, source: &SourceArgs, output: OutputFormat) -> anyhow::Result<()> {
    let mut summary = Summary::default();
    match files_to_read(source)? {
        Some(files) => report_problems(&read_alerts(&files, query, |a| {
            summary.add(&a);
            ControlFlow::Continue(())
        })),
        None => {
            let client = source.daemon.client();
            let url = format!("/v1/alerts?{}", query.to_query_string());
            let streamed = block_on(client.stream_lines(&url, |line| {
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) if v.get("notice").is_some() => notice(&v),
                    Ok(v) => {
                        if let Ok(alert) = serde_json::from_value::<Alert>(v) {
                            summary.add(&alert);
                        }
                    }
                    Err(_) => {}
                }
                ControlFlow::Continue(())
            }))?;
            match streamed {
                Ok(()) => {}
                Err(err) if err.daemon_absent() && !log_files(&source.daemon.state_dir).is_empty() => {
                    eprintln!("palisade: {err}; reading the log files in {} instead", source.daemon.state_dir.display());
                    report_problems(&read_alerts(&log_files(&source.daemon.state_dir), query, |a| {
                        summary.add(&a);
                        ControlFlow::Continue(())
                    }));
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let text = if output == OutputFormat::Json { serde_json::to_string_pretty(&summary)? + "\n" } else { summary.render(colour_wanted()) };
    if let Err(err) = out.write_all(text.as_bytes())
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(err.into());
    }
    Ok(())
}
