//! Event loss as an alert, not only a counter.
//!
//! The daemon samples the per-pod loss counters (the kernel's POD_LOSSES and the reader's queue
//! drops) every second and feeds the totals here. Any new loss raises an `event_loss` alert
//! naming the pods, kinds, reasons and counts; further losses are folded into the next alert,
//! at most one per `interval` (rate limited, never latched: what was lost in between is in the
//! next one). Loss of protected events is `high`; protected loss in `SUSTAINED_SAMPLES`
//! consecutive samples is `critical` and is raised at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::alerts::{Alert, AlertKind, PodInfo};
use crate::events::enrich::EndpointIndex;
use crate::probes::loader::{LossKey, LossReason};
use crate::rules::model::Severity;

/// Consecutive samples with protected losses that make the loss `critical`.
pub const SUSTAINED_SAMPLES: u32 = 3;

/// What was lost since the last alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LossReport {
    /// (what, how many) since the previous alert, largest first.
    pub losses: Vec<(LossKey, u64)>,
    pub protected: bool,
    pub sustained: bool,
}

impl LossReport {
    pub fn severity(&self) -> Severity {
        if self.sustained {
            Severity::Critical
        } else if self.protected {
            Severity::High
        } else {
            Severity::Medium
        }
    }

    /// When the loss is sustained, the cgroups that lost events to their own budget (they sent
    /// more than their share: the flooders), with how many; largest first. Empty otherwise: a
    /// pod is never called a flooder for losses that were not its own doing (a full ring).
    pub fn flooding_cgroups(&self) -> Vec<(u64, u64)> {
        if !self.sustained {
            return Vec::new();
        }
        let mut over_budget: BTreeMap<u64, u64> = BTreeMap::new();
        for (key, count) in &self.losses {
            if key.reason == LossReason::PodBudget {
                *over_budget.entry(key.cgroup_id).or_insert(0) += count;
            }
        }
        let mut flooders: Vec<(u64, u64)> = over_budget.into_iter().collect();
        flooders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        flooders
    }

    /// The alert, with pods named through `endpoints` (a cgroup that is no pod is named by id).
    pub fn alert(&self, endpoints: &EndpointIndex) -> Alert {
        let pod_name = |cgroup: u64| match endpoints.get(cgroup) {
            Some(pod) => format!("{}/{}", pod.namespace, pod.name),
            None => format!("cgroup {cgroup}"),
        };
        let mut by_pod: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut entries = Vec::new();
        for (key, count) in &self.losses {
            let pod = pod_name(key.cgroup_id);
            let what = if key.protected { format!("{} protected", key.kind) } else { key.kind.to_string() };
            by_pod.entry(pod.clone()).or_default().push(format!("{count} {what} ({})", key.reason.as_str()));
            entries.push(json!({
                "pod": pod, "cgroup_id": key.cgroup_id, "kind": key.kind, "reason": key.reason,
                "protected": key.protected, "count": count,
            }));
        }
        let total: u64 = self.losses.iter().map(|(_, c)| c).sum();
        let summary: Vec<String> = by_pod.iter().map(|(pod, what)| format!("{pod}: {}", what.join(", "))).collect();
        let lead = if self.sustained {
            "sustained loss of protected events"
        } else if self.protected {
            "protected events lost"
        } else {
            "events lost"
        };
        let message = format!("{lead}, {total} in all: {}", summary.join("; "));
        let mut alert = Alert::new(AlertKind::EventLoss, self.severity(), message).with_event(json!({
            "losses": entries, "protected": self.protected, "sustained": self.sustained, "total": total,
        }));
        alert.count = total.max(1);
        let pods: Vec<u64> = {
            let mut ids: Vec<u64> = self.losses.iter().map(|(k, _)| k.cgroup_id).collect();
            ids.dedup();
            ids
        };
        if let [only] = pods.as_slice() {
            if let Some(pod) = endpoints.get(*only) {
                alert = alert.with_pod(PodInfo { namespace: pod.namespace.clone(), name: pod.name.clone(), labels: pod.labels.clone() });
            }
        }
        alert
    }
}

/// Turns loss totals into rate-limited reports; one owner (the loss task).
#[derive(Debug)]
pub struct LossMonitor {
    interval: Duration,
    seen: BTreeMap<LossKey, u64>,
    pending: BTreeMap<LossKey, u64>,
    last_alert: Option<Instant>,
    last_was_sustained: bool,
    protected_streak: u32,
}

impl LossMonitor {
    pub fn new(interval: Duration) -> LossMonitor {
        LossMonitor {
            interval,
            seen: BTreeMap::new(),
            pending: BTreeMap::new(),
            last_alert: None,
            last_was_sustained: false,
            protected_streak: 0,
        }
    }

    /// Feeds one sample of totals (counters only grow; a key that went away, e.g. an LRU
    /// eviction, starts again from its new value). Returns a report when an alert is due.
    pub fn observe(&mut self, totals: &BTreeMap<LossKey, u64>, now: Instant) -> Option<LossReport> {
        let mut protected_now = false;
        for (key, &total) in totals {
            let before = self.seen.insert(*key, total).unwrap_or(0);
            let delta = if total >= before { total - before } else { total };
            if delta == 0 || !key.reason.is_loss() {
                continue;
            }
            protected_now |= key.protected;
            *self.pending.entry(*key).or_insert(0) += delta;
        }
        self.protected_streak = if protected_now { self.protected_streak + 1 } else { 0 };
        if self.pending.is_empty() {
            return None;
        }
        let sustained = self.protected_streak >= SUSTAINED_SAMPLES;
        let due = match self.last_alert {
            None => true,
            Some(at) => now.duration_since(at) >= self.interval || (sustained && !self.last_was_sustained),
        };
        if !due {
            return None;
        }
        let mut losses: Vec<(LossKey, u64)> = std::mem::take(&mut self.pending).into_iter().collect();
        losses.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let protected = losses.iter().any(|(k, _)| k.protected);
        self.last_alert = Some(now);
        self.last_was_sustained = sustained;
        Some(LossReport { losses, protected, sustained })
    }

    /// Every total seen so far, for status.
    pub fn totals(&self) -> &BTreeMap<LossKey, u64> {
        &self.seen
    }
}

/// The user-space queue drops as loss totals (never protected: only bulk events are dropped).
pub fn queue_drop_totals(drops: &BTreeMap<(u64, crate::events::kind::EventKind), u64>) -> BTreeMap<LossKey, u64> {
    drops
        .iter()
        .map(|(&(cgroup_id, kind), &n)| (LossKey { cgroup_id, kind, reason: LossReason::QueueFull, protected: false }, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::kind::EventKind;

    fn key(cgroup_id: u64, kind: EventKind, reason: LossReason, protected: bool) -> LossKey {
        LossKey { cgroup_id, kind, reason, protected }
    }

    #[test]
    fn first_loss_alerts_at_once_then_at_most_once_per_interval_with_everything_in_between() {
        let mut m = LossMonitor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let open = key(7, EventKind::Open, LossReason::PodBudget, false);
        assert_eq!(m.observe(&BTreeMap::new(), t0), None, "no loss, no alert");
        let r = m.observe(&BTreeMap::from([(open, 100)]), t0).expect("first loss alerts");
        assert_eq!(r.losses, vec![(open, 100)]);
        assert_eq!(r.severity(), Severity::Medium);
        assert_eq!(m.observe(&BTreeMap::from([(open, 150)]), t0 + Duration::from_secs(1)), None, "rate limited");
        assert_eq!(m.observe(&BTreeMap::from([(open, 175)]), t0 + Duration::from_secs(2)), None);
        let r = m.observe(&BTreeMap::from([(open, 175)]), t0 + Duration::from_secs(10)).expect("due again");
        assert_eq!(r.losses, vec![(open, 75)], "the losses held back are in the next alert");
        assert_eq!(m.observe(&BTreeMap::from([(open, 175)]), t0 + Duration::from_secs(30)), None, "nothing new");
    }

    #[test]
    fn demotions_are_not_losses_and_protected_losses_escalate() {
        let mut m = LossMonitor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let demoted = key(7, EventKind::Exec, LossReason::Demoted, true);
        assert_eq!(m.observe(&BTreeMap::from([(demoted, 5)]), t0), None);
        let exec = key(7, EventKind::Exec, LossReason::RingFull, true);
        let r = m.observe(&BTreeMap::from([(exec, 1)]), t0).expect("alert");
        assert_eq!(r.severity(), Severity::High);
        assert_eq!(m.observe(&BTreeMap::from([(exec, 2)]), t0 + Duration::from_secs(1)), None);
        let r = m.observe(&BTreeMap::from([(exec, 3)]), t0 + Duration::from_secs(2)).expect("sustained: at once");
        assert_eq!(r.severity(), Severity::Critical);
        assert_eq!(r.losses, vec![(exec, 2)]);
    }

    #[test]
    fn only_a_sustained_loss_names_flooders_and_only_by_their_own_budget() {
        let mut m = LossMonitor::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut totals = BTreeMap::new();
        for n in 1..=SUSTAINED_SAMPLES as u64 {
            totals.insert(key(7, EventKind::Open, LossReason::PodBudget, false), 1000 * n);
            totals.insert(key(8, EventKind::Exec, LossReason::RingFull, true), n);
            totals.insert(key(9, EventKind::Open, LossReason::PodBudget, false), 10 * n);
            let report = m.observe(&totals, t0 + Duration::from_secs(n));
            if n == 1 {
                assert!(report.as_ref().is_some_and(|r| r.flooding_cgroups().is_empty()), "not sustained yet: no flooder");
            }
            if n == SUSTAINED_SAMPLES as u64 {
                let report = report.expect("sustained loss is raised at once");
                // Cgroup 8 lost protected events to a full ring: a victim, not a flooder.
                assert_eq!(report.flooding_cgroups(), vec![(7, 2000), (9, 20)]);
            }
        }
    }

    #[test]
    fn the_alert_names_each_pod_kind_and_count() {
        use crate::events::enrich::PodRef;
        let mut endpoints = EndpointIndex::default();
        endpoints.insert(7, PodRef { namespace: "lab".into(), name: "noisy".into(), labels: Default::default(), service_account: None });
        let report = LossReport {
            losses: vec![(key(7, EventKind::Open, LossReason::PodBudget, false), 1000), (key(9, EventKind::Connect, LossReason::QueueFull, false), 3)],
            protected: false,
            sustained: false,
        };
        let alert = report.alert(&endpoints);
        let text = serde_json::to_string(&alert).expect("json");
        assert!(alert.message.contains("lab/noisy: 1000 open (pod_budget)"), "{}", alert.message);
        assert!(alert.message.contains("cgroup 9: 3 connect (queue_full)"), "{}", alert.message);
        assert!(text.contains("\"event_loss\""), "{text}");
        assert_eq!(alert.count, 1003);
    }
}
