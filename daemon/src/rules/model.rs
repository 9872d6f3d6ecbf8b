//! The vocabulary of the rule engine: event types, severities, actions, rule metadata and hits.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An event type as it appears in `input.type`: the probes' event kinds, one definition for
/// both (`EventType::ALL` is the order of the engine's per-type entry points).
pub use crate::events::kind::{EventKind as EventType, UnknownEventType};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const NAMES: [&'static str; 5] = ["info", "low", "medium", "high", "critical"];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "info" => Severity::Info,
            "low" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            other => {
                return Err(format!(
                    "bad severity {other:?}: want one of info, low, medium, high, critical"
                ));
            }
        })
    }
}

/// What the daemon should do about a hit. Dry run is the responder's business: the engine only
/// carries the action the rule (or its override) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Alert,
    Quarantine,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Alert => "alert",
            Action::Quarantine => "quarantine",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "alert" => Ok(Action::Alert),
            "quarantine" => Ok(Action::Quarantine),
            other => Err(format!("bad action {other:?}: want alert or quarantine")),
        }
    }
}

/// Where something is in a rule file, for `file:line:col: message` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub file: String,
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// A rule's `meta` object, validated, with any action override already applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleMeta {
    pub id: String,
    pub title: String,
    pub severity: Severity,
    pub mitre: Vec<String>,
    /// The action in force (after overrides).
    pub action: Action,
    /// The action the rule itself declares.
    pub declared_action: Action,
    pub events: Vec<EventType>,
    pub description: Option<String>,
    /// Where the rule's `meta` is defined.
    pub location: Location,
}

/// One alert raised by one rule for one event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleHit {
    pub rule_id: String,
    pub title: String,
    pub severity: Severity,
    pub message: String,
    pub mitre: Vec<String>,
    pub action: Action,
}

/// Why one rule could not judge one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureReason {
    /// It ran past its instruction budget.
    Budget,
    /// It ran past its time budget: the CPU time it used, or the wall-clock backstop when its
    /// thread could not get a CPU for that long (an expensive builtin, a starved machine).
    Timeout,
    /// It raised an error (a builtin given a value it cannot take, a conflict, ...).
    Error,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Budget => "budget",
            FailureReason::Timeout => "timeout",
            FailureReason::Error => "error",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One rule that could not judge one event; the other rules of the event were still run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleFailure {
    pub rule_id: String,
    pub event_type: EventType,
    pub reason: FailureReason,
    /// What the engine said.
    pub detail: String,
}

/// What the pack said about one event: the alerts of the rules that ran, and the rules that
/// could not run (each on its own: one rule's failure never takes another's alerts away).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Judgement {
    pub hits: Vec<RuleHit>,
    pub failures: Vec<RuleFailure>,
    /// Runs repeated because the wall clock ran out before the rule had used its CPU budget
    /// (the thread waited for a CPU); each then judged or named in `failures`.
    pub rejudged: u32,
}

impl Judgement {
    /// The hits, or the first rule failure as an error (for callers that want all or nothing).
    pub fn into_hits(self) -> Result<Vec<RuleHit>, super::RulesError> {
        match self.failures.into_iter().next() {
            None => Ok(self.hits),
            Some(failure) => Err(super::RulesError::RuleFailed { failure }),
        }
    }
}
