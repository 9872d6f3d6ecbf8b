//! Client side of the API, used by the CLI: `palisade status`, `palisade quarantine ...`, and
//! the daemon half of `palisade alerts`.
use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

use super::{AddOutcome, CancelOutcome, QuarantineEntry, ReleaseOutcome, SOCKET_NAME};
use crate::output::{Cell, OutputFormat, Paint, Table, colour_wanted, terminal_safe};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The OS error is part of the message and deliberately not a `source`: anyhow would print
    /// it a second time as "Caused by".
    #[error("cannot reach the daemon at {socket}: {error}{hint}")]
    Connect { socket: PathBuf, error: std::io::Error, hint: &'static str },
    #[error("the daemon answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("talking to the daemon: {0}")]
    Transport(String),
    #[error("the daemon sent something that is not JSON: {0}")]
    BadJson(String),
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
}

impl ClientError {
    /// The daemon is not there (no socket, nobody listening): callers may fall back to files.
    pub fn daemon_absent(&self) -> bool {
        matches!(self, ClientError::Connect { error, .. }
            if matches!(error.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// A connection-per-request client for the daemon's socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Where a client finds the daemon, the same for every command that asks it.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// The daemon's state directory (its API socket and alert log live there).
    #[arg(long, env = "PALISADE_STATE_DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The daemon's API socket, when it is not in STATE_DIR.
    #[arg(long, env = "PALISADE_SOCKET")]
    pub socket: Option<PathBuf>,
}

impl DaemonArgs {
    pub fn client(&self) -> ApiClient {
        match &self.socket {
            Some(socket) => ApiClient::with_socket(socket.clone()),
            None => ApiClient::new(&self.state_dir),
        }
    }
}

impl ApiClient {
    pub fn new(state_dir: &Path) -> ApiClient {
        ApiClient { socket: socket_path(state_dir) }
    }

    pub fn with_socket(socket: PathBuf) -> ApiClient {
        ApiClient { socket }
    }

    async fn request(&self, method: Method, path: &str, body: Option<Bytes>) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|error| {
            let hint = match error.kind() {
                std::io::ErrorKind::PermissionDenied => " (the API is root-only: run as root, e.g. with sudo)",
                std::io::ErrorKind::NotFound => " (is the daemon running? `palisade alerts --file` reads log files without it)",
                std::io::ErrorKind::ConnectionRefused => " (the daemon is not running)",
                _ => "",
            };
            ClientError::Connect { socket: self.socket.clone(), error, hint }
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%err, "API client connection ended");
            }
        });
        let mut builder = Request::builder().method(method).uri(path).header(hyper::header::HOST, "palisade");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| ClientError::Transport(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(ClientError::Status { status, message })
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        let response = self.request(Method::GET, path, None).await?;
        let bytes = response.into_body().collect().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadJson(e.to_string()))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let response = self.request(Method::POST, path, Some(Bytes::from(body.to_string()))).await?;
        let bytes = response.into_body().collect().await.map_err(|e| ClientError::Transport(e.to_string()))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadJson(e.to_string()))
    }

    /// Streams a JSON-lines response, calling `on_line` for each non-empty line until it says
    /// stop or the stream ends.
    pub async fn stream_lines(&self, path: &str, mut on_line: impl FnMut(&[u8]) -> ControlFlow<()>) -> Result<(), ClientError> {
        let mut body = self.request(Method::GET, path, None).await?.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if !line.is_empty() && on_line(line).is_break() {
                    return Ok(());
                }
            }
        }
        let rest = pending.trim_ascii();
        if !rest.is_empty() {
            let _ = on_line(rest);
        }
        Ok(())
    }
}

/// Runs a client future on a small runtime of its own (the CLI is synchronous).
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ClientError::Runtime)?;
    Ok(runtime.block_on(future))
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = args.daemon.client();
    let value = block_on(client.get_json("/v1/status"))??;
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
        OutputFormat::Table => write!(out, "{}", render_status(&value, colour_wanted()))?,
    }
    Ok(())
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => Some("-".into()),
        Value::Bool(b) => Some(if *b { "yes" } else { "no" }.into()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            Some(if items.is_empty() { "-".into() } else { items.iter().filter_map(scalar_text).collect::<Vec<_>>().join(", ") })
        }
        _ => None,
    }
}

fn heading(out: &mut String, title: &str, colour: bool) {
    let title = terminal_safe(title).to_uppercase();
    if colour {
        let _ = writeln!(out, "\n\x1b[1m{title}\x1b[0m");
    } else {
        let _ = writeln!(out, "\n{title}");
    }
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// Key/value lines for scalar fields, tables for arrays of objects, nested objects indented.
fn render_generic(out: &mut String, value: &Value, depth: usize, colour: bool) {
    let pad = "  ".repeat(depth);
    match value {
        Value::Object(map) => {
            // Key/value pairs: a headerless two-column table.
            let mut pairs = Table::new(&["", ""]);
            for (key, v) in map {
                if let Some(text) = scalar_text(v) {
                    pairs.push(vec![Cell::plain(key), Cell::plain(text)]);
                }
            }
            out.push_str(&indent(&pairs.render_rows(false), depth * 2));
            for (key, v) in map {
                if scalar_text(v).is_none() {
                    let _ = writeln!(out, "{pad}{}:", terminal_safe(key));
                    render_generic(out, v, depth + 1, colour);
                }
            }
        }
        Value::Array(items) => {
            let mut columns: Vec<String> = Vec::new();
            for item in items {
                if let Value::Object(m) = item {
                    for (k, v) in m {
                        if scalar_text(v).is_some() && !columns.contains(k) {
                            columns.push(k.clone());
                        }
                    }
                }
            }
            if columns.is_empty() {
                for item in items {
                    let _ = writeln!(out, "{pad}- {}", terminal_safe(&scalar_text(item).unwrap_or_else(|| item.to_string())));
                }
                return;
            }
            let headers: Vec<String> = columns.iter().map(|c| c.to_uppercase()).collect();
            let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
            let mut table = Table::new(&header_refs);
            for item in items {
                table.push(columns.iter().map(|c| Cell::plain(item.get(c).and_then(scalar_text).unwrap_or_else(|| "-".into()))).collect());
            }
            out.push_str(&indent(&table.render(colour), depth * 2));
        }
        other => {
            let _ = writeln!(out, "{pad}{}", terminal_safe(&scalar_text(other).unwrap_or_default()));
        }
    }
}

fn render_programs(out: &mut String, programs: &[Value], colour: bool) {
    let mut table = Table::new(&["PROGRAM", "KIND", "TARGET", "STATE", "DETAIL"]);
    for p in programs {
        let text = |k: &str| p.get(k).and_then(scalar_text).unwrap_or_else(|| "-".into());
        let state = text("state");
        let paint = match state.as_str() {
            "attached" => Paint::Green,
            "fell_back" => Paint::Yellow,
            _ => Paint::Red,
        };
        let detail = match (p.get("by").and_then(Value::as_str), p.get("reason").and_then(Value::as_str)) {
            (Some(by), Some(reason)) => format!("by {by}: {reason}"),
            (None, Some(reason)) => reason.to_string(),
            _ => String::new(),
        };
        table.push(vec![Cell::plain(text("program")), Cell::plain(text("kind")), Cell::plain(text("target")), Cell::painted(state, paint), Cell::plain(detail)]);
    }
    out.push_str(&indent(&table.render(colour), 2));
}

fn render_counters(out: &mut String, counters: &Value, colour: bool) {
    let emitted = counters.get("emitted").and_then(Value::as_object);
    let lost = counters.get("lost").and_then(Value::as_object);
    let mut kinds: Vec<&String> = emitted.into_iter().flat_map(|m| m.keys()).chain(lost.into_iter().flat_map(|m| m.keys())).collect();
    kinds.sort();
    kinds.dedup();
    let mut table = Table::new(&["TYPE", "EVENTS", "LOST"]);
    for kind in kinds {
        let get = |m: Option<&serde_json::Map<String, Value>>| m.and_then(|m| m.get(kind)).and_then(scalar_text).unwrap_or_else(|| "0".into());
        let lost_text = get(lost);
        let paint = if lost_text != "0" { Paint::Red } else { Paint::Plain };
        table.push(vec![Cell::plain(kind), Cell::plain(get(emitted)), Cell::painted(lost_text, paint)]);
    }
    out.push_str(&indent(&table.render(colour), 2));
}

/// `probes`: programs and counters get tables, the rest is generic.
fn render_probes(out: &mut String, probes: &Value, colour: bool) {
    let Value::Object(map) = probes else { return render_generic(out, probes, 1, colour) };
    let rest: serde_json::Map<String, Value> =
        map.iter().filter(|(k, _)| !matches!(k.as_str(), "programs" | "counters")).map(|(k, v)| (k.clone(), v.clone())).collect();
    render_generic(out, &Value::Object(rest), 1, colour);
    if let Some(Value::Array(programs)) = map.get("programs") {
        let _ = writeln!(out, "  programs:");
        render_programs(out, programs, colour);
    }
    if let Some(counters) = map.get("counters").filter(|c| c.is_object()) {
        let _ = writeln!(out, "  events:");
        render_counters(out, counters, colour);
    }
}

/// Sections in the order an operator reads them; unknown ones follow, alphabetically.
const KNOWN_SECTIONS: [&str; 10] = ["probes", "rules", "policies", "conntrack", "endpoints", "quarantine", "quarantines", "alerts", "exports", "metrics"];

pub fn render_status(status: &Value, colour: bool) -> String {
    let mut out = String::new();
    let Value::Object(map) = status else {
        render_generic(&mut out, status, 0, colour);
        return out;
    };
    let scalars: serde_json::Map<String, Value> =
        map.iter().filter(|(_, v)| scalar_text(v).is_some()).map(|(k, v)| (k.clone(), v.clone())).collect();
    render_generic(&mut out, &Value::Object(scalars), 0, colour);
    let mut sections: Vec<&String> = map.iter().filter(|(_, v)| scalar_text(v).is_none()).map(|(k, _)| k).collect();
    sections.sort_by_key(|k| (KNOWN_SECTIONS.iter().position(|s| s == k).unwrap_or(usize::MAX), (*k).clone()));
    for key in sections {
        heading(&mut out, key, colour);
        let value = &map[key.as_str()];
        match key.as_str() {
            "probes" => render_probes(&mut out, value, colour),
            _ => render_generic(&mut out, value, 1, colour),
        }
    }
    out.trim_start_matches('\n').to_string()
}

#[derive(Subcommand, Debug)]
pub enum QuarantineCommand {
    /// List quarantined pods.
    List {
        #[command(flatten)]
        daemon: DaemonArgs,
        #[arg(short = 'o', long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Retired: the rate limit queues quarantines instead of suspending them; says so.
    #[command(hide = true)]
    Resume {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Drop a quarantine the rate limit queued (listed as pending; recorded as an alert with
    /// your reason). An enforced quarantine is lifted with `release` instead.
    Cancel {
        /// NAMESPACE/POD
        pod: String,
        /// Why the quarantine must not be applied (kept in the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Quarantine a pod by hand, at once (recorded as a `quarantine` alert with your reason).
    Add {
        /// NAMESPACE/POD
        pod: String,
        /// Why (kept in the audit trail and the quarantine record).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Lift a pod's quarantine (recorded as a `release` alert with your reason).
    Release {
        /// NAMESPACE/POD
        pod: String,
        /// Why it is safe to release (kept in the audit trail).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

pub fn quarantine(command: QuarantineCommand) -> anyhow::Result<()> {
    match command {
        QuarantineCommand::List { daemon, output } => {
            let client = daemon.client();
            let value = block_on(client.get_json("/v1/quarantines"))??;
            let mut out = std::io::stdout().lock();
            match output {
                OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
                OutputFormat::Table => {
                    let entries: Vec<QuarantineEntry> = serde_json::from_value(value)?;
                    write!(out, "{}", render_quarantines(&entries, colour_wanted()))?;
                }
            }
        }
        QuarantineCommand::Resume { daemon: _ } => {
            // Nothing can be suspended any more, so there is nothing to ask the daemon.
            eprintln!("palisade quarantine resume: {}", super::server::RESUME_RETIRED);
        }
        QuarantineCommand::Add { pod, reason, daemon } => {
            crate::alerts::query::parse_pod(&pod)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why the pod is quarantined");
            }
            let by = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_default();
            let client = daemon.client();
            let value = block_on(client.post_json("/v1/quarantines/add", &json!({ "pod": pod, "reason": reason, "by": by })))??;
            let outcome: AddOutcome = serde_json::from_value(value)?;
            println!("{}", terminal_safe(&outcome.message));
            if !outcome.quarantined {
                anyhow::bail!("{pod} was not quarantined");
            }
        }
        QuarantineCommand::Cancel { pod, reason, daemon } => {
            crate::alerts::query::parse_pod(&pod)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why the quarantine must not be applied");
            }
            let by = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_default();
            let client = daemon.client();
            let value = block_on(client.post_json("/v1/quarantines/cancel", &json!({ "pod": pod, "reason": reason, "by": by })))??;
            let outcome: CancelOutcome = serde_json::from_value(value)?;
            println!("{}", terminal_safe(&outcome.message));
            if !outcome.cancelled {
                anyhow::bail!("the queued quarantine of {pod} was not cancelled");
            }
        }
        QuarantineCommand::Release { pod, reason, daemon } => {
            crate::alerts::query::parse_pod(&pod)?;
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must say why the release is safe");
            }
            let by = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_default();
            let client = daemon.client();
            let value = block_on(client.post_json("/v1/quarantines/release", &json!({ "pod": pod, "reason": reason, "by": by })))??;
            let outcome: ReleaseOutcome = serde_json::from_value(value)?;
            println!("{}", terminal_safe(&outcome.message));
            if !outcome.released {
                anyhow::bail!("{pod} was not released");
            }
        }
    }
    Ok(())
}

pub fn render_quarantines(entries: &[QuarantineEntry], colour: bool) -> String {
    if entries.is_empty() {
        return "no pods are quarantined\n".into();
    }
    let mut table = Table::new(&["POD", "SINCE", "RULE", "ALERT", "MODE", "DROPS OUT/IN", "REASON"]);
    for e in entries {
        // Packets the datapath dropped because of an enforced quarantine (see quarantine::observed).
        let drops = e.extra.get("drops").map(|d| (d["egress"].as_u64().unwrap_or(0), d["ingress"].as_u64().unwrap_or(0)));
        table.push(vec![
            Cell::plain(format!("{}/{}", e.namespace, e.name)),
            Cell::plain(&e.since),
            Cell::plain(e.rule.as_deref().unwrap_or("-")),
            Cell::plain(e.alert_id.as_deref().unwrap_or("-")),
            if e.pending {
                Cell::painted("pending", Paint::BoldYellow)
            } else if e.dry_run {
                Cell::painted("dry-run", Paint::Magenta)
            } else {
                Cell::painted("enforced", Paint::BoldMagenta)
            },
            Cell::plain(drops.map(|(out, inbound)| format!("{out}/{inbound}")).unwrap_or_else(|| "-".into())),
            Cell::plain(crate::alerts::render::shorten(&e.reason, 80)),
        ]);
    }
    table.render(colour)
}

#[cfg(test)]
mod tests {

    /// Issue 17: `palisade status` without a daemon printed the OS error twice (in the message
    /// and again as "Caused by").
    #[test]
    fn a_connect_error_names_the_os_error_once() {
        let client = ApiClient::with_socket(std::env::temp_dir().join(format!("palisade-no-daemon-{}/api.sock", std::process::id())));
        let err = block_on(client.get_json("/v1/status")).expect("runtime").expect_err("no daemon");
        assert!(err.daemon_absent(), "{err}");
        let shown = format!("{:?}", anyhow::Error::from(err));
        assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
        assert!(!shown.contains("Caused by"), "{shown}");
        assert!(shown.contains("is the daemon running?"), "{shown}");
    }

    use super::*;

    #[test]
    fn status_renders_known_and_unknown_sections() {
        let status = json!({
            "node": "node-a",
            "version": "0.1.0",
            "probes": {
                "monitor_all": false,
                "programs": [
                    {"program": "exec", "kind": "tracepoint", "target": "sched/sched_process_exec", "state": "attached"},
                    {"program": "cred", "kind": "kprobe", "target": "commit_creds", "state": "fell_back", "reason": "no kprobes", "by": "setuid tracepoints"}
                ],
                "counters": {"emitted": {"exec": 10, "open": 5}, "lost": {"open": 2}}
            },
            "rules": {"version": "abc", "rules": 14, "last_reload": {"ok": true, "time": "2026-01-01T00:00:00Z"}},
            "zeta\u{1b}[31m": {"x": 1}
        });
        let text = render_status(&status, false);
        assert!(text.starts_with("node"), "{text}");
        assert!(text.contains("fell_back  by setuid tracepoints: no kprobes"), "{text}");
        assert!(text.contains("open  5       2"), "{text}");
        assert!(text.find("PROBES") < text.find("RULES"));
        assert!(text.contains("last_reload:"));
        assert!(!text.contains('\u{1b}'), "escapes in keys are made inert: {text}");
    }
}
