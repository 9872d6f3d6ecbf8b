//! The daemon's alert, export and metrics options (`#[command(flatten)]` them into `RunArgs`),
//! and starting the writer and exporters from them.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use clap::Args;

use super::export::{ExportError, ExportFormat, Exports, StdoutExporter, WebhookConfig, WebhookExporter};
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
    /// POST every alert to this http:// URL (e.g. falcosidekick), with retries and backoff.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
    /// Webhook body format: json or falco.
    #[arg(long, default_value = "json")]
    pub webhook_format: ExportFormat,
    /// Extra webhook header, `Name: value` (repeatable).
    #[arg(long, value_name = "HEADER")]
    pub webhook_header: Vec<String>,
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
            for header in &self.webhook_header {
                let (name, value) = header.split_once(':').ok_or_else(|| StartError::BadHeader(header.clone()))?;
                config.headers.push((name.trim().to_string(), value.trim().to_string()));
            }
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

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("bad --webhook-header {0:?}: want `Name: value`")]
    BadHeader(String),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Alerts(#[from] super::AlertsError),
}
