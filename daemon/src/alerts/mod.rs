//! The alert stream: the versioned alert record, the durable JSONL log (one writer task,
//! bounded queue, rotation, retention, burst aggregation, live broadcast), queries over the log,
//! rendering for terminals and exports (stdout, Falco JSON, an http(s) webhook); the `palisade
//! alerts` CLI, a client of the API socket, is `api::alerts_cli`.
//! docs/alerts.md documents the schema and the operator's view.
pub mod aggregate;
pub mod export;
pub mod kube_events;
pub mod log;
pub mod options;
pub mod policy;
pub mod query;
pub mod render;
pub mod schema;
pub mod time;
pub mod webhook;

use std::path::{Path, PathBuf};

pub use export::{ExportFormat, Exports, StdoutExporter};
pub use webhook::{WebhookConfig, WebhookExporter};
pub use log::{AlertLog, AlertLogConfig, AlertLogStats, AlertSink, LOG_FILE_NAME};
pub use options::AlertOptions;
pub use query::AlertQuery;
pub use schema::{Alert, AlertKind, Outcome, PodInfo, ProcessInfo, RuleRef, SCHEMA_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the alert writer has stopped")]
    WriterStopped,
}

impl AlertsError {
    pub fn io(path: &Path, source: std::io::Error) -> AlertsError {
        AlertsError::Io { path: path.to_path_buf(), source }
    }
}
