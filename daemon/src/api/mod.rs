//! The daemon's root-only Unix socket API (HTTP/1.1 + JSON) and its client.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /healthz` | `ok` (the socket's own liveness; the metrics listener's `/healthz` reports the daemon's health) |
//! | `GET /v1/status` | the daemon's status JSON (from its `StatusProvider`), plus `alerts` writer health |
//! | `GET /v1/alerts?since=&until=&pod=&namespace=&rule=&severity=&kind=` | matching alerts, JSON lines, oldest first |
//! | `GET /v1/alerts/follow?...` | the same filters; history when `since` is given, then live alerts, JSON lines (chunked) |
//! | `GET /v1/quarantines` | `[QuarantineEntry]`: enforced ones, then queued ones (`pending: true`) |
//! | `POST /v1/quarantines/add` | body `{"pod": "ns/name", "reason": "...", "by": "..."}`: an operator's quarantine, enforced at once → `AddOutcome` |
//! | `POST /v1/quarantines/release` | body `{"pod": "ns/name", "reason": "...", "by": "..."}` → `ReleaseOutcome` |
//! | `POST /v1/quarantines/cancel` | same body; drops a quarantine queued by the rate limit → `CancelOutcome` |
//! | `POST /v1/quarantines/resume` | `410 Gone`: the rate limit queues instead of suspending, nothing to resume |
//! | `GET /metrics` | Prometheus text exposition, when the daemon has a `Metrics` registry |
//!
//! Streamed lines that are not alerts are notices: `{"notice": "lagged", "missed": N}` when a
//! follower fell behind, `{"notice": "read_report", ...}` when the log had unreadable lines.
pub mod alerts_cli;
pub mod body;
pub mod client;
pub mod metrics;
pub mod server;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use metrics::{DEFAULT_METRICS_ADDR, Health, HealthProvider, ListenerLimits, Metrics, health_provider, serve_metrics};
pub use server::{bind, serve, serve_on};

use crate::alerts::AlertSink;

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "palisade.sock";

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Produces the status JSON on each `GET /v1/status`. Sections the CLI knows by name:
/// `node`, `version`, `started`, `probes` (a `ProbeStatus`), `rules`, `policies`, `endpoints`,
/// `quarantine`, `alerts` (filled in by the API when absent); anything else is shown generically.
pub type StatusProvider = Arc<dyn Fn() -> BoxFuture<'static, Value> + Send + Sync>;

/// Wraps an async closure as a `StatusProvider`.
pub fn status_provider<F, Fut>(make: F) -> StatusProvider
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Value> + Send + 'static,
{
    Arc::new(move || Box::pin(make()))
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot bind {what}: {source}")]
    Bind { what: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("another daemon is already serving {0}")]
    AlreadyServing(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}

/// A quarantined pod, as the list shows it. The quarantine module may add fields (`extra`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    pub namespace: String,
    pub name: String,
    /// When the quarantine began (RFC 3339).
    pub since: String,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub reason: String,
    /// The alert that recorded the quarantine.
    #[serde(default)]
    pub alert_id: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Queued by the rate limit, NOT enforced yet (`since` is when it was queued).
    #[serde(default)]
    pub pending: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// An operator's action on one pod (add, release, cancel), as the API server hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRequest {
    pub namespace: String,
    pub name: String,
    pub reason: String,
    /// Who asked: the client's account (e.g. `$SUDO_USER`) and the peer's uid and pid.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseOutcome {
    pub released: bool,
    pub message: String,
    #[serde(default)]
    pub alert_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddOutcome {
    pub quarantined: bool,
    pub message: String,
    /// The audit alert, which the quarantine record names.
    #[serde(default)]
    pub alert_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub cancelled: bool,
    pub message: String,
    #[serde(default)]
    pub alert_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuarantineApiError {
    #[error("quarantine is not enabled on this daemon")]
    NotEnabled,
    #[error("{0} is not quarantined")]
    NotQuarantined(String),
    #[error("{0} has no queued quarantine")]
    NotPending(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// What the quarantine responder offers the API. The responder emits the `release` alert
/// itself (through its `AlertSink`), since only it knows what was really done.
pub trait QuarantineApi: Send + Sync {
    fn list(&self) -> BoxFuture<'_, Result<Vec<QuarantineEntry>, QuarantineApiError>>;
    fn release(&self, request: OperatorRequest) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>>;
    /// Quarantines a pod by hand (the responder writes the audit alert).
    fn add(&self, request: OperatorRequest) -> BoxFuture<'_, Result<AddOutcome, QuarantineApiError>>;
    /// Drops a quarantine the rate limit queued (the responder writes the audit alert).
    fn cancel(&self, request: OperatorRequest) -> BoxFuture<'_, Result<CancelOutcome, QuarantineApiError>>;
}

/// The stand-in when the daemon runs without a responder.
pub struct QuarantineNotEnabled;

impl QuarantineApi for QuarantineNotEnabled {
    fn list(&self) -> BoxFuture<'_, Result<Vec<QuarantineEntry>, QuarantineApiError>> {
        Box::pin(async { Err(QuarantineApiError::NotEnabled) })
    }

    fn release(&self, _request: OperatorRequest) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>> {
        Box::pin(async { Err(QuarantineApiError::NotEnabled) })
    }

    fn cancel(&self, _request: OperatorRequest) -> BoxFuture<'_, Result<CancelOutcome, QuarantineApiError>> {
        Box::pin(async { Err(QuarantineApiError::NotEnabled) })
    }

    fn add(&self, _request: OperatorRequest) -> BoxFuture<'_, Result<AddOutcome, QuarantineApiError>> {
        Box::pin(async { Err(QuarantineApiError::NotEnabled) })
    }
}

/// Everything the API serves from.
#[derive(Clone)]
pub struct ApiState {
    pub status: StatusProvider,
    pub alerts: AlertSink,
    pub quarantine: Arc<dyn QuarantineApi>,
    pub metrics: Option<Metrics>,
}

impl ApiState {
    /// Alerts only: an empty status, quarantine not enabled, no metrics.
    pub fn new(alerts: AlertSink) -> ApiState {
        ApiState {
            status: status_provider(|| async { Value::Object(Default::default()) }),
            alerts,
            quarantine: Arc::new(QuarantineNotEnabled),
            metrics: None,
        }
    }

    pub fn with_status(mut self, status: StatusProvider) -> ApiState {
        self.status = status;
        self
    }

    pub fn with_quarantine(mut self, quarantine: Arc<dyn QuarantineApi>) -> ApiState {
        self.quarantine = quarantine;
        self
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> ApiState {
        self.metrics = Some(metrics);
        self
    }
}
