//! The optional cluster-level alert view: alerts also written as Events on the pod, so
//! `kubectl get events` (and `kubectl palisade alerts -A`) show them. Written with kube's event
//! [`Recorder`] (events.k8s.io/v1): a repeat of the same rule on the same pod within its cache
//! time (6 minutes) becomes a patch of the first Event's `series` (count, last observed) rather
//! than a new Event. An alert storm must not become an API-server storm, so writes are also
//! rate limited per node (a token bucket); alerts over the limit are counted, not queued: the
//! JSONL alert log stays the complete record, the Events are a view.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder, Reporter};

use super::EVENT_COMPONENT;
use super::quarantine::{SinkError, pod_reference, split_pod, truncate};

#[derive(Debug, Clone)]
pub struct AlertEventsConfig {
    /// Writes allowed at once.
    pub burst: u32,
    /// One more write allowed per this interval.
    pub refill_every: Duration,
}

impl Default for AlertEventsConfig {
    fn default() -> Self {
        AlertEventsConfig { burst: 10, refill_every: Duration::from_secs(6) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertEventOutcome {
    /// Written (a new Event, or the series of an earlier one for the same pod and rule).
    Published,
    /// Over the rate limit: not written.
    Suppressed,
}

struct Limiter {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

/// The Recorder every palisade Event is written with: `reportingController`
/// `palisade.io/palisade`, `reportingInstance` the node.
pub fn recorder(client: Client, node: &str) -> Recorder {
    Recorder::new(client, Reporter { controller: format!("palisade.io/{EVENT_COMPONENT}"), instance: Some(node.to_string()) })
}

pub struct ClusterAlertEvents {
    recorder: Recorder,
    config: AlertEventsConfig,
    state: Mutex<Limiter>,
}

impl ClusterAlertEvents {
    pub fn new(client: Client, node: impl Into<String>, config: AlertEventsConfig) -> ClusterAlertEvents {
        let tokens = f64::from(config.burst);
        ClusterAlertEvents {
            recorder: recorder(client, &node.into()),
            config,
            state: Mutex::new(Limiter { tokens, refilled: Instant::now(), suppressed: 0 }),
        }
    }

    /// Alerts not written because of the rate limit, so far.
    pub fn suppressed(&self) -> u64 {
        self.lock().suppressed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_token(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        let refill = now.duration_since(state.refilled).as_secs_f64() / self.config.refill_every.as_secs_f64().max(1e-3);
        state.tokens = (state.tokens + refill).min(f64::from(self.config.burst));
        state.refilled = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            state.suppressed += 1;
            false
        }
    }

    /// Writes (or drops, over the limit) one alert about `pod` (`namespace/name`). The Event's
    /// reason is `PalisadeAlert` and its action the rule, so the Recorder folds repeats per pod
    /// and rule.
    pub async fn alert(&self, pod: &str, rule_id: &str, severity: &str, message: &str, alert_id: &str) -> Result<AlertEventOutcome, SinkError> {
        let (namespace, name) = split_pod(pod)?;
        if !self.take_token() {
            return Ok(AlertEventOutcome::Suppressed);
        }
        let event = RecordedEvent {
            type_: EventType::Warning,
            reason: "PalisadeAlert".to_string(),
            note: Some(truncate(&format!("{severity}: {message} (rule {rule_id}, alert {alert_id})"), 1024)),
            // The API server caps the action at 128 characters.
            action: truncate(rule_id, 128),
            secondary: None,
        };
        self.recorder
            .publish(&event, &pod_reference(namespace, name, None))
            .await
            .map_err(|source| SinkError::Api { pod: pod.to_string(), what: "write the alert Event", source })?;
        Ok(AlertEventOutcome::Published)
    }
}
