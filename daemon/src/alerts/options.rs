//! The daemon's alert, export and metrics options (`#[command(flatten)]` them into `RunArgs`),
//! and starting the writer and exporters from them.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::export::{ExportFormat, Exports, StdoutExporter};
use super::webhook::{self, WebhookConfig, WebhookError, WebhookExporter};
use super::log::{AlertLog, AlertLogConfig, AlertSink};
use super::time::parse_duration;
use crate::metrics::{DEFAULT_METRICS_ADDR, Metrics};

#[derive(Args, Debug, Clone)]
pub struct AlertOptions {
    /// Prometheus metrics address (HTTP, GET /metrics). Loopback by default.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Do not serve metrics over TCP (they stay available on the API socket).
    #[arg(long)]
    pub no_metrics: bool,
    /// Also write every alert to stdout, one JSON object per line: json (the alert record) or
    /// falco (Falco's JSON output shape).
    #[arg(long, value_name = "FORMAT")]
    pub alerts_stdout: Option<ExportFormat>,
    /// POST every alert to this http:// or https:// URL (e.g. falcosidekick), with retries and
    /// backoff.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// PEM bundle of the CAs that sign the https webhook's certificate (default: the system's).
    #[arg(long, value_name = "FILE")]
    pub webhook_ca: Option<PathBuf>,
    /// PEM client certificate chain for an https webhook that asks for one.
    #[arg(long, value_name = "FILE", requires = "webhook_client_key")]
    pub webhook_client_cert: Option<PathBuf>,
    /// PEM private key of --webhook-client-cert.
    #[arg(long, value_name = "FILE", requires = "webhook_client_cert")]
    pub webhook_client_key: Option<PathBuf>,
    /// Extra webhook headers from a file, one `Name: value` per line (`#` comments): mount a
    /// Secret here for tokens. The variable PALISADE_WEBHOOK_HEADERS (same format) is read too.
    #[arg(long, value_name = "FILE")]
    pub webhook_header_file: Option<PathBuf>,
    /// Webhook body format: json or falco.
    #[arg(long, default_value = "json")]
    pub webhook_format: ExportFormat,
    /// Extra webhook header, `Name: value` (repeatable). Visible to every local user in the
    /// process's command line: use --webhook-header-file or PALISADE_WEBHOOK_HEADERS for secrets.
    #[arg(long, value_name = "HEADER")]
    pub webhook_header: Vec<String>,
    /// Kubernetes mode: alerts of at least this severity also become Events on their pod
    /// (info|low|medium|high|critical, or off).
    #[arg(long, value_name = "SEVERITY", default_value = "high", value_parser = parse_min_severity)]
    pub alert_events: MinSeverity,
    /// Alerts the webhook queue holds while the receiver is slow; overflow is counted.
    #[arg(long, default_value_t = 1024)]
    pub webhook_queue: usize,
    /// Rotate alerts.jsonl at this size (MiB).
    #[arg(long, default_value_t = 64)]
    pub alerts_max_file_mb: u64,
    /// Rotated alert files kept (alerts.jsonl.1 ..).
    #[arg(long, default_value_t = 5)]
    pub alerts_max_files: usize,
    /// Window in which repeats of a rule on a pod fold into one counted follow-up (0s: off).
    #[arg(long, default_value = "10s", value_parser = parse_window)]
    pub alerts_aggregate_window: Duration,
}

/// A severity threshold that can be switched off (`off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinSeverity(pub Option<crate::rules::Severity>);

fn parse_min_severity(text: &str) -> Result<MinSeverity, String> {
    if text == "off" {
        return Ok(MinSeverity(None));
    }
    text.parse::<crate::rules::Severity>().map(|s| MinSeverity(Some(s))).map_err(|e| format!("{e}, or off"))
}

fn parse_window(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text).map_err(|e| e.to_string())
}

impl AlertOptions {
    /// Starts the exporters asked for and the alert writer in `state_dir` (on the current tokio
    /// runtime). Serve metrics separately with `api::serve_metrics(opts.metrics_addr, metrics)`
    /// unless `no_metrics`.
    pub fn start(&self, state_dir: &Path, node: &str, metrics: &Metrics) -> Result<(AlertLog, AlertSink, Exports), StartError> {
        let mut exports = Exports::default();
        if let Some(format) = self.alerts_stdout {
            exports.stdout = Some(StdoutExporter::start(format, 4096, Some(metrics.clone())));
        }
        if let Some(url) = &self.webhook {
            let mut config = WebhookConfig::new(url.clone());
            config.format = self.webhook_format;
            config.queue_capacity = self.webhook_queue;
            config.ca_file = self.webhook_ca.clone();
            config.client_cert = self.webhook_client_cert.clone().zip(self.webhook_client_key.clone());
            config.headers = self.webhook_headers(std::env::var(webhook::HEADERS_ENV).ok().as_deref())?;
            exports.webhook = Some(WebhookExporter::start(config, Some(metrics.clone()))?);
        }
        let mut config = AlertLogConfig::new(state_dir, node);
        config.max_file_bytes = self.alerts_max_file_mb.max(1) * 1024 * 1024;
        config.max_files = self.alerts_max_files;
        config.aggregate_window = self.alerts_aggregate_window;
        config.metrics = Some(metrics.clone());
        config.exports = exports.clone();
        let (log, sink) = AlertLog::start(config)?;
        Ok((log, sink, exports))
    }
}

impl AlertOptions {
    /// The webhook's headers: --webhook-header, then the header file, then `env_headers` (the
    /// value of PALISADE_WEBHOOK_HEADERS). A secret-looking header on the command line is
    /// accepted with a warning.
    pub fn webhook_headers(&self, env_headers: Option<&str>) -> Result<Vec<(String, String)>, WebhookError> {
        let mut headers = Vec::new();
        for (i, header) in self.webhook_header.iter().enumerate() {
            let (name, value) = webhook::parse_header("--webhook-header", i + 1, header)?;
            if ["authorization", "proxy-authorization", "x-api-key"].contains(&name.to_ascii_lowercase().as_str()) || name.to_ascii_lowercase().contains("token") {
                tracing::warn!(header = %name, "a webhook credential given with --webhook-header is readable by every local user in /proc/<pid>/cmdline; use --webhook-header-file or {}", webhook::HEADERS_ENV);
            }
            headers.push((name, value));
        }
        if let Some(path) = &self.webhook_header_file {
            headers.extend(webhook::read_header_file(path)?);
        }
        if let Some(text) = env_headers {
            if text.len() as u64 > webhook::MAX_HEADER_SOURCE_BYTES {
                return Err(WebhookError::File { path: webhook::HEADERS_ENV.into(), reason: "too long".into() });
            }
            headers.extend(webhook::parse_header_lines(webhook::HEADERS_ENV, text)?);
        }
        Ok(headers)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error(transparent)]
    Alerts(#[from] super::AlertsError),
}
