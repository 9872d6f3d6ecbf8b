//! Burst aggregation: repeats are counted, never hidden.
//!
//! The first rule alert for a (rule, pod, outcome) is written at once and opens a window. Further
//! alerts with the same key inside the window are absorbed; when the window closes, one
//! follow-up alert is written that stands for all of them: `count` is how many it absorbed,
//! `first_seen`/`event` are the first absorbed occurrence, `last_seen`/`last_event` the last,
//! and `follows` names the alert that opened the burst. Summing `count` over alerts therefore
//! gives the true number of occurrences.
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::schema::{Alert, AlertKind, Outcome};

/// Open bursts beyond this are not aggregated (alerts pass through): memory stays bounded and
/// nothing is hidden.
pub const MAX_OPEN_BURSTS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BurstKey {
    rule: String,
    pod: Option<(String, String)>,
    outcome: Outcome,
}

#[derive(Debug)]
struct Burst {
    closes_at: Instant,
    opened_by: String,
    absorbed: u64,
    first: Option<Alert>,
    last: Option<Alert>,
}

#[derive(Debug)]
pub struct Aggregator {
    window: Duration,
    open: HashMap<BurstKey, Burst>,
    absorbed_total: u64,
}

fn key_of(alert: &Alert) -> Option<BurstKey> {
    if alert.kind != AlertKind::Rule || alert.count != 1 {
        return None;
    }
    Some(BurstKey {
        rule: alert.rule_id().to_string(),
        pod: alert.pod.as_ref().map(|p| (p.namespace.clone(), p.name.clone())),
        outcome: alert.outcome,
    })
}

impl Aggregator {
    /// A zero window disables aggregation.
    pub fn new(window: Duration) -> Aggregator {
        Aggregator { window, open: HashMap::new(), absorbed_total: 0 }
    }

    /// Occurrences absorbed into follow-ups so far.
    pub fn absorbed_total(&self) -> u64 {
        self.absorbed_total
    }

    /// Takes an alert (with its id already assigned); returns it when it is to be written now,
    /// or None when a window absorbed it (it will be counted in that window's follow-up).
    pub fn admit(&mut self, alert: Alert, now: Instant) -> Option<Alert> {
        if self.window.is_zero() {
            return Some(alert);
        }
        let Some(key) = key_of(&alert) else { return Some(alert) };
        if let Some(burst) = self.open.get_mut(&key)
            && now < burst.closes_at
        {
            burst.absorbed += 1;
            self.absorbed_total += 1;
            if burst.first.is_none() {
                burst.first = Some(alert);
            } else {
                burst.last = Some(alert);
            }
            return None;
        }
        if self.open.len() >= MAX_OPEN_BURSTS && !self.open.contains_key(&key) {
            return Some(alert);
        }
        // A window that closed but was not yet collected is collected by `expired`; opening a
        // new one here would lose its follow-up, so only open when the slot is free.
        if self.open.contains_key(&key) {
            return Some(alert);
        }
        self.open.insert(
            key,
            Burst { closes_at: now + self.window, opened_by: alert.id.clone(), absorbed: 0, first: None, last: None },
        );
        Some(alert)
    }

    /// When the next window closes.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|b| b.closes_at).min()
    }

    /// Follow-ups for the windows closed by `now` (windows that absorbed nothing just close).
    pub fn expired(&mut self, now: Instant) -> Vec<Alert> {
        let closed: Vec<BurstKey> = self.open.iter().filter(|(_, b)| b.closes_at <= now).map(|(k, _)| k.clone()).collect();
        closed.into_iter().filter_map(|k| self.open.remove(&k)).filter_map(follow_up).collect()
    }

    /// Follow-ups for every open window (shutdown).
    pub fn flush_all(&mut self) -> Vec<Alert> {
        self.open.drain().filter_map(|(_, b)| follow_up(b)).collect()
    }
}

fn follow_up(burst: Burst) -> Option<Alert> {
    let first = burst.first?;
    let mut alert = first.clone();
    let now = super::time::now_micros();
    alert.id = super::schema::next_alert_id(now);
    alert.time = super::time::format_micros(now);
    alert.count = burst.absorbed;
    alert.follows = Some(burst.opened_by);
    alert.first_seen = first.time.clone();
    alert.event = first.event;
    match burst.last {
        Some(last) => {
            alert.last_seen = last.time;
            alert.last_event = last.event;
        }
        None => alert.last_seen = first.time,
    }
    Some(alert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::schema::PodInfo;
    use crate::rules::model::Severity;

    fn hit(rule: &str, pod: &str, n: u32) -> Alert {
        let mut a = Alert::at(1_000_000 + i64::from(n), AlertKind::Rule, Severity::High, format!("hit {n}"))
            .with_rule(rule, rule)
            .with_pod(PodInfo { namespace: "shop".into(), name: pod.into(), labels: Default::default() })
            .with_event(serde_json::json!({ "n": n }));
        a.id = format!("id-{n}");
        a
    }

    #[test]
    fn burst_becomes_one_alert_and_a_counted_follow_up() {
        let mut agg = Aggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(agg.admit(hit("r", "web", 0), t0).is_some());
        for n in 1..=5 {
            assert!(agg.admit(hit("r", "web", n), t0 + Duration::from_secs(1)).is_none());
        }
        // Another pod and another rule are their own bursts.
        assert!(agg.admit(hit("r", "db", 9), t0).is_some());
        assert!(agg.admit(hit("q", "web", 9), t0).is_some());
        assert!(agg.expired(t0 + Duration::from_secs(5)).is_empty());
        let follow = agg.expired(t0 + Duration::from_secs(10));
        assert_eq!(follow.len(), 1, "only the burst with repeats has a follow-up");
        let f = &follow[0];
        assert_eq!((f.count, f.follows.as_deref()), (5, Some("id-0")));
        assert_eq!(f.event, Some(serde_json::json!({"n": 1})));
        assert_eq!(f.last_event, Some(serde_json::json!({"n": 5})));
        assert!(f.first_seen < f.last_seen);
        assert_eq!(agg.absorbed_total(), 5);
        // After the window, the next hit opens a new burst and is written at once.
        assert!(agg.admit(hit("r", "web", 6), t0 + Duration::from_secs(11)).is_some());
    }

    #[test]
    fn single_repeat_keeps_its_evidence_and_zero_window_passes_all() {
        let mut agg = Aggregator::new(Duration::from_secs(1));
        let t0 = Instant::now();
        agg.admit(hit("r", "web", 0), t0);
        agg.admit(hit("r", "web", 1), t0);
        let f = agg.flush_all();
        assert_eq!(f[0].count, 1);
        assert_eq!(f[0].first_seen, f[0].last_seen);
        let mut off = Aggregator::new(Duration::ZERO);
        assert!(off.admit(hit("r", "web", 0), t0).is_some());
        assert!(off.admit(hit("r", "web", 1), t0).is_some());
    }
}
