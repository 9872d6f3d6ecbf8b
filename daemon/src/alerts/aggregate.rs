//! Burst aggregation: repeats are counted, never hidden, and never delay anything new.
//!
//! Only repeats of the *same behaviour* fold: the same rule, pod and outcome, the same
//! primitive and target (the event type and its kind-specific fields: path, address, syscall
//! op, flags, argv... without the per-occurrence noise of fd numbers and child pids) and the
//! same process image. The first alert of a behaviour is written at once and opens a window;
//! further alerts of that behaviour inside the window are absorbed; when the window closes,
//! one follow-up alert is written that stands for all of them: `count` is how many it absorbed,
//! `first_seen`/`event` are the first absorbed occurrence, `last_seen`/`last_event` the last,
//! `time` is the last occurrence's own time (never the flush time), and `follows` names the
//! alert that opened the burst. Summing `count` over alerts therefore gives the true number of
//! occurrences. A different primitive in the same pod (an attacker's second escape attempt
//! right after the first) is a different key and is written at once.
use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _, RandomState};
use std::time::Duration;

use serde_json::Value;

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
    /// The behaviour's fingerprint (see [`behaviour_of`]): two independently keyed SipHash
    /// digests, so an attacker who cannot know the per-process keys cannot make a new
    /// behaviour collide with an open burst (and keys stay small however long the paths).
    behaviour: (u64, u64),
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
    fingerprint_keys: (RandomState, RandomState),
}

/// Fields of an event's kind-specific part that differ between repeats of one behaviour: the
/// fd a call returned or used, the pid of a forked child, a ptrace address. Everything else
/// (path, address and port, op, flags, mode, argv, errno of a failure...) is the behaviour.
const PER_OCCURRENCE: &[&str] = &["fd", "dirfd", "old_fd", "child_pid", "parent_pid", "addr", "result"];

/// The parts of an alert's evidence that make its behaviour: the event type, the process image
/// (exe, else comm), and the kind-specific fields less the per-occurrence ones; a failed call
/// (negative result) is its own behaviour, a success of any value is one. Alerts without an
/// event in the usual shape fingerprint as their whole evidence (nothing new ever folds in).
pub fn behaviour_of(event: Option<&Value>) -> Value {
    let Some(event) = event else { return Value::Null };
    let Some(kind) = event.get("type").and_then(Value::as_str) else { return event.clone() };
    let process = event.get("process");
    let image = process
        .and_then(|p| p.get("exe"))
        .filter(|e| !e.is_null())
        .or_else(|| process.and_then(|p| p.get("comm")))
        .cloned()
        .unwrap_or(Value::Null);
    let mut data = event.get(kind).cloned().unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut data {
        let failed = fields.get("result").and_then(Value::as_i64).filter(|r| *r < 0);
        for key in PER_OCCURRENCE {
            fields.remove(*key);
        }
        if let Some(errno) = failed {
            fields.insert("failed".into(), Value::from(errno));
        }
    }
    serde_json::json!({ "type": kind, "image": image, "data": data })
}

impl Aggregator {
    /// A zero window disables aggregation.
    pub fn new(window: Duration) -> Aggregator {
        Aggregator { window, open: HashMap::new(), absorbed_total: 0, fingerprint_keys: (RandomState::new(), RandomState::new()) }
    }

    fn key_of(&self, alert: &Alert) -> Option<BurstKey> {
        if alert.kind != AlertKind::Rule || alert.count != 1 {
            return None;
        }
        let text = behaviour_of(alert.event.as_ref()).to_string();
        let digest = |keys: &RandomState| {
            let mut h = keys.build_hasher();
            h.write(text.as_bytes());
            h.finish()
        };
        Some(BurstKey {
            rule: alert.rule_id().to_string(),
            pod: alert.pod.as_ref().map(|p| (p.namespace.clone(), p.name.clone())),
            outcome: alert.outcome,
            behaviour: (digest(&self.fingerprint_keys.0), digest(&self.fingerprint_keys.1)),
        })
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
        let Some(key) = self.key_of(&alert) else { return Some(alert) };
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
    alert.id = super::schema::next_alert_id(super::time::now_micros());
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
    // The follow-up happened when its last occurrence did, not when the window closed.
    alert.time = alert.last_seen.clone();
    Some(alert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::schema::PodInfo;
    use crate::rules::model::Severity;
    use serde_json::json;

    /// A rule alert for `event`, raised at 1 s + `n` µs, with id `id-n`.
    fn alert_for(rule: &str, pod: &str, n: u32, event: Value) -> Alert {
        let mut a = Alert::at(1_000_000 + i64::from(n), AlertKind::Rule, Severity::High, format!("hit {n}"))
            .with_rule(rule, rule)
            .with_pod(PodInfo { namespace: "shop".into(), name: pod.into(), labels: Default::default() })
            .with_event(event);
        a.id = format!("id-{n}");
        a
    }

    /// The n-th repeat of one behaviour: `cat` (a new pid each time) opening /etc/shadow, each
    /// open returning another fd.
    fn open_event(n: u32, path: &str) -> Value {
        json!({
            "type": "open", "n": n,
            "process": {"pid": 100 + n, "exe": "/usr/bin/cat", "comm": "cat"},
            "open": {"op": "openat", "path": path, "dirfd": -100, "flags": 0, "result": 3 + i64::from(n % 5)},
        })
    }

    fn hit(rule: &str, pod: &str, n: u32) -> Alert {
        alert_for(rule, pod, n, open_event(n, "/etc/shadow"))
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
        assert_eq!(f.event.as_ref().map(|e| e["n"].clone()), Some(json!(1)));
        assert_eq!(f.last_event.as_ref().map(|e| e["n"].clone()), Some(json!(5)));
        assert!(f.first_seen < f.last_seen);
        // Stamped with its last occurrence's time, not with the time the window closed.
        assert_eq!(f.time, f.last_seen);
        assert_eq!(f.time, crate::alerts::time::format_micros(1_000_005));
        assert_eq!(agg.absorbed_total(), 5);
        // After the window, the next hit opens a new burst and is written at once.
        assert!(agg.admit(hit("r", "web", 6), t0 + Duration::from_secs(11)).is_some());
    }

    #[test]
    fn a_different_behaviour_in_the_same_pod_and_rule_is_written_at_once() {
        let mut agg = Aggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let unshare = |n: u32| {
            json!({"type": "namespace", "n": n, "process": {"pid": 7, "exe": "/usr/bin/unshare"},
                   "namespace": {"op": "unshare", "flags_names": ["CLONE_NEWUSER"], "fd": -1, "result": 0}})
        };
        let bpf = json!({"type": "bpf", "process": {"pid": 7, "exe": "/usr/bin/unshare"},
                         "bpf": {"cmd": 5, "cmd_name": "BPF_PROG_LOAD", "size": 128, "result": -1}});
        assert!(agg.admit(alert_for("container_escape", "web", 0, unshare(0)), t0).is_some());
        // 100 ms later, another primitive of the same rule in the same pod: new, so written now.
        let t1 = t0 + Duration::from_millis(100);
        assert!(agg.admit(alert_for("container_escape", "web", 1, bpf.clone()), t1).is_some(), "a new primitive was held back");
        // The same primitive on another target, by another image, or failing instead of
        // succeeding: each new.
        assert!(agg.admit(hit("credential_read", "web", 2), t1).is_some());
        let other_path = alert_for("credential_read", "web", 3, open_event(3, "/etc/gshadow"));
        assert!(agg.admit(other_path, t1).is_some(), "another target is another behaviour");
        let mut other_image = open_event(4, "/etc/shadow");
        other_image["process"]["exe"] = json!("/usr/bin/python3");
        assert!(agg.admit(alert_for("credential_read", "web", 4, other_image), t1).is_some(), "another image");
        let mut failed = open_event(5, "/etc/shadow");
        failed["open"]["result"] = json!(-13);
        assert!(agg.admit(alert_for("credential_read", "web", 5, failed), t1).is_some(), "a failure is not a success");
        // True repeats (another pid, another fd) still fold.
        assert!(agg.admit(alert_for("container_escape", "web", 6, unshare(6)), t1).is_none());
        assert!(agg.admit(hit("credential_read", "web", 7), t1).is_none());
        let mut bpf_again = bpf;
        bpf_again["process"]["pid"] = json!(8);
        assert!(agg.admit(alert_for("container_escape", "web", 8, bpf_again), t1).is_none());
        assert_eq!(agg.flush_all().len(), 3);
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

    #[test]
    fn evidence_without_an_event_shape_never_folds_into_another() {
        let mut agg = Aggregator::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(agg.admit(alert_for("r", "web", 0, json!({"x": 1})), t0).is_some());
        assert!(agg.admit(alert_for("r", "web", 1, json!({"x": 2})), t0).is_some());
        assert!(agg.admit(alert_for("r", "web", 2, json!({"x": 2})), t0).is_none());
    }
}
