//! The optional cluster-level alert view: alerts also written as core/v1 Events on the pod, so
//! `kubectl get events` shows them. An alert storm must not become an API-server storm, so
//! writes are rate limited per node (a token bucket), and a repeat of the same rule on the same
//! pod within the aggregation window bumps the existing Event's `count` (a patch) instead of
//! creating a new one. Alerts over the limit are counted, not queued: the JSONL alert log stays
//! the complete record; the Events are a view.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

use super::quarantine::{FIELD_MANAGER, SinkError, split_pod, truncate};

#[derive(Debug, Clone)]
pub struct AlertEventsConfig {
    /// Writes allowed at once.
    pub burst: u32,
    /// One more write allowed per this interval.
    pub refill_every: Duration,
    /// A repeat within this time updates the earlier Event.
    pub aggregate_window: Duration,
}

impl Default for AlertEventsConfig {
    fn default() -> Self {
        AlertEventsConfig { burst: 10, refill_every: Duration::from_secs(6), aggregate_window: Duration::from_secs(600) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertEventOutcome {
    Created,
    /// The earlier Event for this pod and rule now says `count`.
    Aggregated { count: i32 },
    /// Over the rate limit: not written (the count catches up on the next write).
    Suppressed,
}

struct Recent {
    event_name: String,
    count: i32,
    at: Instant,
}

struct Limiter {
    tokens: f64,
    refilled: Instant,
    recent: HashMap<(String, String), Recent>,
    suppressed: u64,
}

pub struct ClusterAlertEvents {
    client: Client,
    node: String,
    config: AlertEventsConfig,
    state: Mutex<Limiter>,
}

enum Plan {
    Create,
    Patch { event_name: String, count: i32 },
    Suppress,
}

impl ClusterAlertEvents {
    pub fn new(client: Client, node: impl Into<String>, config: AlertEventsConfig) -> ClusterAlertEvents {
        let tokens = f64::from(config.burst);
        ClusterAlertEvents {
            client,
            node: node.into(),
            config,
            state: Mutex::new(Limiter { tokens, refilled: Instant::now(), recent: HashMap::new(), suppressed: 0 }),
        }
    }

    /// Alerts not written because of the rate limit, so far.
    pub fn suppressed(&self) -> u64 {
        self.lock().suppressed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes (or aggregates, or drops) one alert about `pod` (`namespace/name`).
    pub async fn alert(
        &self,
        pod: &str,
        rule_id: &str,
        severity: &str,
        message: &str,
        alert_id: &str,
    ) -> Result<AlertEventOutcome, SinkError> {
        let (namespace, name) = split_pod(pod)?;
        let key = (pod.to_string(), rule_id.to_string());
        // Decide under the lock, write without it: a slow API server must not serialise callers.
        let plan = {
            let mut state = self.lock();
            let now = Instant::now();
            let refill = now.duration_since(state.refilled).as_secs_f64() / self.config.refill_every.as_secs_f64().max(1e-3);
            state.tokens = (state.tokens + refill).min(f64::from(self.config.burst));
            state.refilled = now;
            let window = self.config.aggregate_window;
            state.recent.retain(|_, r| now.duration_since(r.at) < window);
            let has_token = state.tokens >= 1.0;
            if has_token {
                state.tokens -= 1.0;
            } else {
                state.suppressed += 1;
            }
            match state.recent.get_mut(&key) {
                Some(recent) => {
                    recent.count += 1;
                    if has_token {
                        Plan::Patch { event_name: recent.event_name.clone(), count: recent.count }
                    } else {
                        Plan::Suppress
                    }
                }
                None if has_token => Plan::Create,
                None => Plan::Suppress,
            }
        };
        let text = format!("{severity}: {message} (rule {rule_id}, alert {alert_id})");
        match plan {
            Plan::Suppress => Ok(AlertEventOutcome::Suppressed),
            Plan::Create => {
                let event = super::quarantine::pod_event(&self.node, namespace, name, None, "Warning", "PalisadeAlert", "Alert", &text, 1);
                let created = Api::<Event>::namespaced(self.client.clone(), namespace)
                    .create(&kube::api::PostParams::default(), &event)
                    .await
                    .map_err(|source| SinkError::Api { pod: pod.to_string(), what: "post the alert Event", source })?;
                let event_name = created.metadata.name.unwrap_or_default();
                self.lock().recent.insert(key, Recent { event_name, count: 1, at: Instant::now() });
                Ok(AlertEventOutcome::Created)
            }
            Plan::Patch { event_name, count } => {
                let patch = serde_json::json!({
                    "count": count,
                    "lastTimestamp": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
                    "message": truncate(&text, 1024),
                });
                Api::<Event>::namespaced(self.client.clone(), namespace)
                    .patch(&event_name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| SinkError::Api { pod: pod.to_string(), what: "update the alert Event", source })?;
                Ok(AlertEventOutcome::Aggregated { count })
            }
        }
    }
}
