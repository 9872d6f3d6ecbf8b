//! Exports: JSON lines on stdout for log shippers, Falco's JSON output shape (so falcosidekick
//! and pipelines built for Falco take palisade alerts as they are), and an HTTP webhook with
//! retries, exponential backoff and a bounded queue whose overflow is counted (alerts/webhook.rs).
//!
//! Every exporter has its own bounded queue: a slow consumer never slows the alert writer, and
//! what it cannot take is counted (stats, metrics), never silently lost.
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::render::harden_json;
use super::schema::Alert;
use crate::metrics::Metrics;
use crate::rules::model::Severity;
pub use super::webhook::WebhookExporter;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("bad export format {0:?}: want json or falco")]
    BadFormat(String),
}

/// The shape of exported alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// The alert record itself (docs/alerts.md).
    #[default]
    Json,
    /// Falco's JSON output: output, priority, rule, time, output_fields, source, tags, hostname.
    Falco,
}

impl FromStr for ExportFormat {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(ExportFormat::Json),
            "falco" => Ok(ExportFormat::Falco),
            other => Err(ExportError::BadFormat(other.to_string())),
        }
    }
}

/// Falco's priority names for our severities.
pub fn falco_priority(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "Critical",
        Severity::High => "Error",
        Severity::Medium => "Warning",
        Severity::Low => "Notice",
        Severity::Info => "Informational",
    }
}

/// An alert in Falco's JSON output shape. `output_fields` uses Falco's field names where one
/// exists (`k8s.ns.name`, `proc.cmdline`, ...) and `palisade.*` for the rest.
pub fn to_falco(alert: &Alert) -> Value {
    let mut fields = BTreeMap::<String, Value>::new();
    fields.insert("evt.time.iso8601".into(), json!(alert.time));
    fields.insert("palisade.alert_id".into(), json!(alert.id));
    fields.insert("palisade.kind".into(), json!(alert.kind.as_str()));
    fields.insert("palisade.action".into(), json!(alert.action.as_str()));
    fields.insert("palisade.outcome".into(), json!(alert.outcome.as_str()));
    fields.insert("palisade.count".into(), json!(alert.count));
    if let Some(reason) = &alert.reason {
        fields.insert("palisade.reason".into(), json!(reason));
    }
    if let Some(event_type) = alert.event.as_ref().and_then(|e| e.get("type")).and_then(Value::as_str) {
        fields.insert("evt.type".into(), json!(event_type));
    }
    if let Some(pod) = &alert.pod {
        fields.insert("k8s.ns.name".into(), json!(pod.namespace));
        fields.insert("k8s.pod.name".into(), json!(pod.name));
        for (k, v) in &pod.labels {
            fields.insert(format!("k8s.pod.label.{k}"), json!(v));
        }
    }
    let mut summary = String::new();
    if let Some(p) = &alert.process {
        fields.insert("proc.pid".into(), json!(p.pid));
        fields.insert("proc.exepath".into(), json!(p.exe));
        fields.insert("proc.name".into(), json!(p.comm));
        fields.insert("proc.cmdline".into(), json!(p.cmdline.join(" ")));
        if let Some(uid) = p.uid {
            fields.insert("user.uid".into(), json!(uid));
        }
        if let Some(parent) = p.ancestors.first() {
            fields.insert("proc.ppid".into(), json!(parent.pid));
            fields.insert("proc.pname".into(), json!(parent.comm));
        }
        summary = format!(" (proc.exepath={} proc.cmdline={})", p.exe.as_deref().unwrap_or("<NA>"), p.cmdline.join(" "));
    }
    if let Some(pod) = &alert.pod {
        summary.push_str(&format!(" k8s.ns.name={} k8s.pod.name={}", pod.namespace, pod.name));
    }
    // Falco's output starts with the event time and priority: "12:00:00.123456789: Error msg".
    let clock = alert.time.get(11..26).unwrap_or(&alert.time);
    let priority = falco_priority(alert.severity);
    let output = format!("{clock}000: {priority} {}{summary}", alert.message);
    let mut tags: Vec<String> = vec!["palisade".into(), alert.kind.as_str().into()];
    tags.extend(alert.mitre.iter().cloned());
    let rule = alert.rule.as_ref().map_or_else(|| format!("palisade {}", alert.kind), |r| r.title.clone());
    json!({
        "uuid": alert.id,
        "output": output,
        "priority": priority,
        "rule": rule,
        "time": falco_time(&alert.time),
        "output_fields": fields,
        "source": "syscall",
        "tags": tags,
        "hostname": alert.node,
    })
}

/// Falco writes nanoseconds: `2026-11-29T12:00:00.123456000Z`; a time that is not RFC 3339 is
/// passed on as it is.
fn falco_time(time: &str) -> String {
    crate::time::nanos_form(time).unwrap_or_else(|| time.to_string())
}

/// One alert as a line in `format` (no trailing newline), hardened for terminals.
pub fn format_line(alert: &Alert, format: ExportFormat) -> String {
    let value = match format {
        ExportFormat::Json => serde_json::to_value(alert),
        ExportFormat::Falco => Ok(to_falco(alert)),
    };
    match value.and_then(|v| serde_json::to_string(&v)) {
        Ok(line) => harden_json(line),
        // Alerts hold only strings, numbers and JSON values: this does not happen.
        Err(err) => json!({ "error": err.to_string(), "id": alert.id }).to_string(),
    }
}

/// Counters an exporter keeps.
#[derive(Debug, Default)]
pub struct ExportCounters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub retried: AtomicU64,
    /// Deliveries that failed in the TLS handshake (also counted in `failed`).
    pub tls_errors: AtomicU64,
    /// Connections opened (a webhook keeps one open across alerts while the receiver allows).
    pub connections: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStats {
    pub sent: u64,
    pub failed: u64,
    /// Refused because the exporter's queue was full.
    pub dropped: u64,
    pub retried: u64,
    /// Failed in the TLS handshake: the receiver's certificate did not verify (also in `failed`).
    #[serde(default)]
    pub tls_errors: u64,
    /// Connections opened to the receiver (webhook): far fewer than `sent` when kept alive.
    #[serde(default)]
    pub connections: u64,
}

impl ExportCounters {
    /// One alert refused by `exporter`'s full queue: counted here and in the metrics.
    pub fn record_dropped(&self, exporter: &str, metrics: Option<&Metrics>) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = metrics {
            m.record_export(exporter, "dropped");
        }
    }

    pub fn snapshot(&self) -> ExportStats {
        ExportStats {
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            tls_errors: self.tls_errors.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}

/// The exporters the writer feeds; cheap to clone.
#[derive(Clone, Default)]
pub struct Exports {
    pub stdout: Option<StdoutExporter>,
    pub webhook: Option<WebhookExporter>,
    /// Kubernetes mode: set once the API client exists (after the alert log has started).
    pub kube_events: Arc<std::sync::OnceLock<super::kube_events::KubeEventExporter>>,
}

impl Exports {
    pub fn offer(&self, alert: &Alert) {
        if let Some(stdout) = &self.stdout {
            stdout.offer(alert);
        }
        if let Some(webhook) = &self.webhook {
            webhook.offer(alert);
        }
        if let Some(kube_events) = self.kube_events.get() {
            kube_events.offer(alert);
        }
    }

    pub fn stats(&self) -> Value {
        json!({
            "stdout": self.stdout.as_ref().map(|s| s.stats()),
            "webhook": self.webhook.as_ref().map(|w| w.stats()),
            "kube_events": self.kube_events.get().map(|k| k.stats()),
        })
    }
}

/// JSON lines on stdout, written by a thread of its own (a stalled pipe blocks only it).
#[derive(Clone)]
pub struct StdoutExporter {
    tx: std::sync::mpsc::SyncSender<String>,
    counters: Arc<ExportCounters>,
    format: ExportFormat,
    metrics: Option<Metrics>,
}

impl StdoutExporter {
    pub fn start(format: ExportFormat, capacity: usize, metrics: Option<Metrics>) -> StdoutExporter {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(capacity.max(1));
        let counters = Arc::new(ExportCounters::default());
        let thread_counters = counters.clone();
        let spawned = std::thread::Builder::new().name("alerts-stdout".into()).spawn(move || {
            use std::io::Write as _;
            let stdout = std::io::stdout();
            for line in rx {
                let mut out = stdout.lock();
                let ok = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
                let counter = if ok.is_ok() { &thread_counters.sent } else { &thread_counters.failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the stdout exporter thread");
        }
        StdoutExporter { tx, counters, format, metrics }
    }

    pub fn offer(&self, alert: &Alert) {
        if self.tx.try_send(format_line(alert, self.format)).is_err() {
            self.counters.record_dropped("stdout", self.metrics.as_ref());
        }
    }

    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::schema::{AlertKind, PodInfo, ProcessInfo};

    #[test]
    fn falco_shape() {
        let mut alert = Alert::at(1_795_953_600_123_456, AlertKind::Rule, Severity::High, "shell in pod")
            .with_rule("shell_in_container", "Shell in container")
            .with_pod(PodInfo { namespace: "shop".into(), name: "web-1".into(), labels: [("app".into(), "web".into())].into() })
            .with_mitre(vec!["T1059".into()])
            .with_node("node-a");
        alert.process = Some(ProcessInfo {
            pid: 7,
            comm: Some("sh".into()),
            exe: Some("/bin/sh".into()),
            cmdline: vec!["sh".into(), "-i".into()],
            uid: Some(0),
            ancestors: vec![],
        });
        let f = to_falco(&alert);
        assert_eq!(f["priority"], "Error");
        assert_eq!(f["rule"], "Shell in container");
        assert_eq!(f["time"], "2026-11-29T12:00:00.123456000Z");
        assert_eq!(f["hostname"], "node-a");
        assert_eq!(f["source"], "syscall");
        assert_eq!(f["output_fields"]["k8s.ns.name"], "shop");
        assert_eq!(f["output_fields"]["k8s.pod.label.app"], "web");
        assert_eq!(f["output_fields"]["proc.cmdline"], "sh -i");
        assert!(f["output"].as_str().unwrap().starts_with("12:00:00.123456000: Error shell in pod"));
        assert_eq!(f["tags"], json!(["palisade", "rule", "T1059"]));
    }
}
