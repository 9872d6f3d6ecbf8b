//! The vocabulary of the rule engine: event types, severities, actions, rule metadata and hits.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An event type as it appears in `input.type`. The daemon's kernel-side kinds map onto these by
/// name; `EventType::ALL` is the order the engine uses for its per-type entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Exec,
    Fork,
    Exit,
    Connect,
    Open,
    Ptrace,
    Cred,
    Mount,
    Namespace,
    Module,
    Bpf,
    Memfd,
    Chmod,
    Unlink,
    Rename,
    Dup,
}

impl EventType {
    pub const ALL: [EventType; 16] = [
        EventType::Exec,
        EventType::Fork,
        EventType::Exit,
        EventType::Connect,
        EventType::Open,
        EventType::Ptrace,
        EventType::Cred,
        EventType::Mount,
        EventType::Namespace,
        EventType::Module,
        EventType::Bpf,
        EventType::Memfd,
        EventType::Chmod,
        EventType::Unlink,
        EventType::Rename,
        EventType::Dup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Exec => "exec",
            EventType::Fork => "fork",
            EventType::Exit => "exit",
            EventType::Connect => "connect",
            EventType::Open => "open",
            EventType::Ptrace => "ptrace",
            EventType::Cred => "cred",
            EventType::Mount => "mount",
            EventType::Namespace => "namespace",
            EventType::Module => "module",
            EventType::Bpf => "bpf",
            EventType::Memfd => "memfd",
            EventType::Chmod => "chmod",
            EventType::Unlink => "unlink",
            EventType::Rename => "rename",
            EventType::Dup => "dup",
        }
    }

    /// Position in `ALL`, used to index per-type tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

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
