//! The alert record (schema version 1), as written to `alerts.jsonl`, served by the API and
//! exported. docs/alerts.md documents every field; keep the two in step.
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::time::{UnixMicros, format_micros, now_micros};
use crate::events::context::{EventContext, ProcessContext};
use crate::events::enrich::PodRef;
use crate::rules::model::{Action, RuleHit, Severity};

/// Bumped when a field changes meaning or goes away (adding optional fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// What produced the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A rule matched an event.
    Rule,
    /// The responder quarantined (or, in dry run, would have quarantined) a pod.
    Quarantine,
    /// A quarantine was lifted.
    Release,
    /// A summary of flows the segmentation policy denied.
    PolicyDenied,
    /// A rule pack was rejected on load or reload (the previous pack stays in force).
    RulesRejected,
    /// One rule could not judge an event (over its budget or an error); rate limited.
    RuleError,
    /// A guardrail stopped an action (e.g. refusing to quarantine a protected namespace).
    Guardrail,
    /// Someone tried to undo palisade's enforcement outside the authenticated path (e.g. removed
    /// the quarantine label from a pod); what palisade did about it is in `outcome`.
    Tamper,
    /// Events or alerts were lost (ring buffer overflow, alert queue overflow).
    EventLoss,
    /// The daemon itself: start, stop, degraded operation.
    Daemon,
}

impl AlertKind {
    pub const ALL: [AlertKind; 10] = [
        AlertKind::Rule,
        AlertKind::Quarantine,
        AlertKind::Release,
        AlertKind::PolicyDenied,
        AlertKind::RulesRejected,
        AlertKind::RuleError,
        AlertKind::Guardrail,
        AlertKind::Tamper,
        AlertKind::EventLoss,
        AlertKind::Daemon,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Rule => "rule",
            AlertKind::Quarantine => "quarantine",
            AlertKind::Release => "release",
            AlertKind::PolicyDenied => "policy_denied",
            AlertKind::RulesRejected => "rules_rejected",
            AlertKind::RuleError => "rule_error",
            AlertKind::Guardrail => "guardrail",
            AlertKind::Tamper => "tamper",
            AlertKind::EventLoss => "event_loss",
            AlertKind::Daemon => "daemon",
        }
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AlertKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlertKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
            format!("bad alert kind {s:?}: want one of {}", names.join(", "))
        })
    }
}

/// What was done about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Reported only.
    Alerted,
    /// The pod was quarantined.
    Quarantined,
    /// The pod was already quarantined; nothing new was done.
    AlreadyQuarantined,
    /// The quarantine is queued by a rate limit: NOT enforced yet; a `quarantine` alert follows
    /// when it is applied (or why it was not).
    Pending,
    /// Dry run: the pod would have been quarantined.
    WouldQuarantine,
    /// The action was not taken (guardrail, no pod to act on, ...); `reason` says why.
    Suppressed,
    /// The quarantine was lifted.
    Released,
    /// The action was attempted and failed; `reason` says how.
    Failed,
    /// Nothing to act on (informational kinds: losses, rejected rule packs, daemon notices).
    Recorded,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Alerted => "alerted",
            Outcome::Quarantined => "quarantined",
            Outcome::AlreadyQuarantined => "already_quarantined",
            Outcome::Pending => "pending",
            Outcome::WouldQuarantine => "would_quarantine",
            Outcome::Suppressed => "suppressed",
            Outcome::Released => "released",
            Outcome::Failed => "failed",
            Outcome::Recorded => "recorded",
        }
    }
}

impl FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const ALL: [Outcome; 9] = [
            Outcome::Alerted,
            Outcome::Quarantined,
            Outcome::AlreadyQuarantined,
            Outcome::Pending,
            Outcome::WouldQuarantine,
            Outcome::Suppressed,
            Outcome::Released,
            Outcome::Failed,
            Outcome::Recorded,
        ];
        ALL.into_iter().find(|o| o.as_str() == s).ok_or_else(|| format!("bad outcome {s:?}"))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl PodInfo {
    /// `namespace/name`, the form the CLI takes and shows.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AncestorInfo {
    pub pid: u32,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub exe: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub exe: Option<String>,
    #[serde(default)]
    pub cmdline: Vec<String>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub ancestors: Vec<AncestorInfo>,
}

/// One alert. `id` and `node` are filled in by the writer when left empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub schema: u32,
    /// Unique and sortable: 16 hex digits of microseconds since the epoch, `-`, 6 hex digits of
    /// a sequence. Given when the alert is made (so the responder can name it before it is
    /// written); alerts made later in one daemon sort after earlier ones.
    #[serde(default)]
    pub id: String,
    /// When it happened (RFC 3339 UTC, microseconds): for a rule alert the time of the event
    /// itself (taken in the kernel), for an aggregated follow-up its last occurrence's; for
    /// other kinds when the alert was raised.
    pub time: String,
    #[serde(default)]
    pub node: String,
    pub kind: AlertKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    pub severity: Severity,
    #[serde(default)]
    pub mitre: Vec<String>,
    pub message: String,
    #[serde(default)]
    pub pod: Option<PodInfo>,
    #[serde(default)]
    pub process: Option<ProcessInfo>,
    /// The triggering event as the rule engine saw it (`input`), or kind-specific evidence.
    #[serde(default)]
    pub event: Option<Value>,
    pub action: Action,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How many occurrences this alert stands for (1 unless it aggregates a burst).
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// On an aggregated follow-up: the id of the alert that opened the burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// On an aggregated follow-up: the last occurrence's event (`event` holds the first one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<Value>,
}

fn str_field(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_string)
}

fn u32_field(value: &Value, key: &str) -> Option<u32> {
    value.get(key).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok())
}

impl From<&PodRef> for PodInfo {
    fn from(pod: &PodRef) -> PodInfo {
        PodInfo { namespace: pod.namespace.clone(), name: pod.name.clone(), labels: pod.labels.clone() }
    }
}

impl From<&ProcessContext> for ProcessInfo {
    fn from(process: &ProcessContext) -> ProcessInfo {
        let details = &process.details;
        ProcessInfo {
            pid: process.pid,
            comm: Some(process.comm.clone()),
            exe: details.exe.clone(),
            cmdline: details.cmdline.clone(),
            uid: Some(process.uid),
            ancestors: details
                .ancestors
                .iter()
                .map(|a| AncestorInfo { pid: a.pid, comm: a.comm.clone(), exe: a.exe.clone() })
                .collect(),
        }
    }
}

/// The pod of a recorded event `input` (`input.pod`), if it came from one.
fn pod_from_input(input: &Value) -> Option<PodInfo> {
    let pod = input.get("pod")?;
    let labels = pod
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    Some(PodInfo { namespace: str_field(pod, "namespace")?, name: str_field(pod, "name")?, labels })
}

/// The process of a recorded event `input` (`input.process`).
fn process_from_input(input: &Value) -> Option<ProcessInfo> {
    let p = input.get("process")?;
    let cmdline = p
        .get("cmdline")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let ancestors = p
        .get("ancestors")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|anc| {
                    Some(AncestorInfo {
                        pid: u32_field(anc, "pid")?,
                        comm: str_field(anc, "comm").unwrap_or_default(),
                        exe: str_field(anc, "exe"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ProcessInfo {
        pid: u32_field(p, "pid")?,
        comm: str_field(p, "comm"),
        exe: str_field(p, "exe"),
        cmdline,
        uid: u32_field(p, "uid"),
        ancestors,
    })
}

/// A new alert id for an alert raised at `micros`: strictly increasing within this process even
/// when the clock steps back or many alerts share a microsecond.
pub fn next_alert_id(micros: UnixMicros) -> String {
    static LAST: Mutex<(UnixMicros, u32)> = Mutex::new((0, 0));
    let mut last = LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if micros > last.0 {
        *last = (micros, 0);
    } else {
        last.1 = last.1.wrapping_add(1);
    }
    format!("{:016x}-{:06x}", last.0, last.1)
}

impl Alert {
    /// A bare alert of `kind`, raised now; the builder methods below fill in the rest.
    pub fn new(kind: AlertKind, severity: Severity, message: impl Into<String>) -> Alert {
        Alert::at(now_micros(), kind, severity, message)
    }

    /// As `new`, at a given instant (tests, replays).
    pub fn at(micros: UnixMicros, kind: AlertKind, severity: Severity, message: impl Into<String>) -> Alert {
        let time = format_micros(micros);
        Alert {
            schema: SCHEMA_VERSION,
            id: next_alert_id(micros),
            time: time.clone(),
            node: String::new(),
            kind,
            rule: None,
            severity,
            mitre: Vec::new(),
            message: message.into(),
            pod: None,
            process: None,
            event: None,
            action: Action::Alert,
            outcome: if kind == AlertKind::Rule { Outcome::Alerted } else { Outcome::Recorded },
            reason: None,
            count: 1,
            first_seen: time.clone(),
            last_seen: time,
            follows: None,
            last_event: None,
        }
    }

    /// An alert about one event, the one way the daemon builds them (rule hits, rule errors):
    /// pod and process from the event's typed context, `node` from the daemon; `event` is left
    /// to the caller (the input as evidence, or kind-specific details).
    pub fn about_event(kind: AlertKind, severity: Severity, message: impl Into<String>, node: &str, context: &EventContext) -> Alert {
        let mut alert = Alert::new(kind, severity, message);
        alert.node = node.to_string();
        alert.pod = context.pod.as_deref().map(PodInfo::from);
        alert.process = Some(ProcessInfo::from(&context.process));
        alert
    }

    /// A rule hit on an event: rule, severity, MITRE ids, message and action from the hit; pod
    /// and process from the event's typed context; the input kept whole as evidence. The time
    /// is the event's own, so an alert written late still says when it happened; the id is
    /// taken now, so ids keep sorting in the order alerts are made. The outcome starts as
    /// `alerted`; the responder sets it (`with_outcome`) when it acts.
    pub fn for_rule_hit(hit: &RuleHit, node: &str, context: &EventContext, input: &Value) -> Alert {
        let time = crate::time::format_unix_ns(context.wall_ns);
        Alert::about_event(AlertKind::Rule, hit.severity, hit.message.clone(), node, context).with_hit(hit, Some(time), input)
    }

    /// [`Alert::for_rule_hit`] for callers that hold only a recorded JSON `input` (tools and
    /// tests replaying events; the daemon has the typed context): time (`input.time`), node,
    /// pod and process are read from the input.
    pub fn from_rule_hit(hit: &RuleHit, input: &Value) -> Alert {
        let event_time = input.get("time").and_then(Value::as_str).and_then(|t| super::time::parse_rfc3339(t).ok());
        let mut alert = Alert::new(AlertKind::Rule, hit.severity, hit.message.clone()).with_hit(hit, event_time.map(format_micros), input);
        alert.node = str_field(input, "node").unwrap_or_default();
        alert.pod = pod_from_input(input);
        alert.process = process_from_input(input);
        alert
    }

    /// The rule hit's part of its alert: rule, MITRE ids, action, the event's time (when known)
    /// and the input as evidence.
    fn with_hit(mut self, hit: &RuleHit, time: Option<String>, input: &Value) -> Alert {
        if let Some(time) = time {
            self.first_seen = time.clone();
            self.last_seen = time.clone();
            self.time = time;
        }
        self.rule = Some(RuleRef { id: hit.rule_id.clone(), title: hit.title.clone() });
        self.mitre = hit.mitre.clone();
        self.action = hit.action;
        self.event = Some(input.clone());
        self
    }

    pub fn with_outcome(mut self, outcome: Outcome, reason: Option<String>) -> Alert {
        self.outcome = outcome;
        self.reason = reason;
        self
    }

    pub fn with_action(mut self, action: Action) -> Alert {
        self.action = action;
        self
    }

    pub fn with_pod(mut self, pod: PodInfo) -> Alert {
        self.pod = Some(pod);
        self
    }

    pub fn with_rule(mut self, id: impl Into<String>, title: impl Into<String>) -> Alert {
        self.rule = Some(RuleRef { id: id.into(), title: title.into() });
        self
    }

    pub fn with_event(mut self, event: Value) -> Alert {
        self.event = Some(event);
        self
    }

    pub fn with_node(mut self, node: impl Into<String>) -> Alert {
        self.node = node.into();
        self
    }

    pub fn with_mitre(mut self, mitre: Vec<String>) -> Alert {
        self.mitre = mitre;
        self
    }

    /// The rule id, or "" for alerts without a rule.
    pub fn rule_id(&self) -> &str {
        self.rule.as_ref().map_or("", |r| r.id.as_str())
    }

    /// Microseconds since the epoch of `time`, if it parses.
    pub fn time_micros(&self) -> Option<UnixMicros> {
        super::time::parse_rfc3339(&self.time).ok()
    }
}

/// `severity >= level` filter and display helpers that `rules::model::Severity` lacks.
pub fn severity_rank(severity: Severity) -> u8 {
    severity as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn shell_hit() -> RuleHit {
        RuleHit {
            rule_id: "shell_in_container".into(),
            title: "Shell in container".into(),
            severity: Severity::High,
            message: "shell started".into(),
            mitre: vec!["T1059".into()],
            action: Action::Quarantine,
        }
    }

    /// The daemon builds rule alerts from the event's typed context: the alert must be the one
    /// the recorded input describes, with strings a process controls (comm, argv, exe with
    /// quotes, newlines and a fake JSON tail) carried as they are, never re-parsed into fields.
    #[test]
    fn typed_context_gives_the_alert_the_input_describes() {
        use std::sync::Arc;

        use crate::events::decode::{Event, EventData, ExitData, Header};
        use crate::events::enrich::{Ancestor, EnrichedEvent, ProcessDetails};
        use crate::events::input::{Clock, to_input};

        let hostile = "sh\"\n{\"pod\":{\"namespace\":\"kube-system\"}}";
        let event = Event {
            header: Header {
                ktime_ns: 1_000_000_123_456,
                cgroup_id: 77,
                kind: crate::events::kind::EventKind::Exit,
                source: "tracepoint",
                pid: 42,
                tid: 43,
                ppid: 1,
                uid: 1000,
                gid: 1000,
                euid: 0,
                egid: 0,
                comm: hostile.into(),
                truncated: false,
                start_ns: 0,
            },
            data: EventData::Exit(ExitData { exit_code: 0 }),
        };
        let pod = PodRef { namespace: "shop".into(), name: "web-1".into(), labels: [("app".into(), "web".into())].into(), service_account: None };
        let details = ProcessDetails {
            exe: Some(format!("/tmp/{hostile}")),
            cmdline: vec![hostile.into(), "-c".into(), "id".into()],
            ancestors: vec![Ancestor { pid: 1, comm: "init".into(), exe: Some("/sbin/init".into()) }],
            ..ProcessDetails::default()
        };
        let enriched = EnrichedEvent { event, pod: Some(Arc::new(pod)), process: Arc::new(details) };
        let clock = Clock::new();
        let input = to_input(&enriched, &clock, "node-a");
        let context = EventContext::of(&enriched, &clock);
        let hit = shell_hit();
        let typed = Alert::for_rule_hit(&hit, "node-a", &context, &input);
        let mut recorded = Alert::from_rule_hit(&hit, &input);
        recorded.id = typed.id.clone();
        assert_eq!(typed, recorded);
        assert_eq!(typed.pod.as_ref().map(PodInfo::qualified).as_deref(), Some("shop/web-1"));
        assert_eq!(typed.process.as_ref().and_then(|p| p.comm.as_deref()), Some(hostile));

        // Outside any pod: no pod, the process still named.
        let outside = EventContext { pod: None, ..context };
        let alert = Alert::about_event(AlertKind::RuleError, Severity::High, "x", "node-a", &outside);
        assert_eq!((alert.pod, alert.process.map(|p| p.pid)), (None, Some(42)));
    }

    #[test]
    fn from_rule_hit_takes_pod_process_and_evidence() {
        let input = json!({
            "type": "exec", "node": "node-a", "time": "2026-11-29T12:00:00.123456Z",
            "pod": {"namespace": "shop", "name": "web-1", "labels": {"app": "web"}},
            "process": {"pid": 42, "comm": "sh", "exe": "/bin/sh", "cmdline": ["sh", "-c", "id"], "uid": 0,
                        "ancestors": [{"pid": 1, "comm": "init", "exe": "/sbin/init"}]},
        });
        let hit = shell_hit();
        let alert = Alert::from_rule_hit(&hit, &input);
        assert_eq!(alert.node, "node-a");
        assert_eq!(alert.pod.as_ref().map(PodInfo::qualified).as_deref(), Some("shop/web-1"));
        let process = alert.process.as_ref().unwrap();
        assert_eq!((process.pid, process.exe.as_deref()), (42, Some("/bin/sh")));
        assert_eq!(process.ancestors[0].comm, "init");
        assert_eq!(alert.action, Action::Quarantine);
        assert_eq!(alert.outcome, Outcome::Alerted);
        assert_eq!((alert.time.as_str(), alert.first_seen.as_str()), ("2026-11-29T12:00:00.123456Z", "2026-11-29T12:00:00.123456Z"));
        let line = serde_json::to_string(&alert).unwrap();
        let back: Alert = serde_json::from_str(&line).unwrap();
        assert_eq!(back, alert);
        assert!(line.contains("\"schema\":1"));
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for kind in AlertKind::ALL {
            assert_eq!(kind.as_str().parse::<AlertKind>(), Ok(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
        assert!("nope".parse::<AlertKind>().is_err());
    }
}
