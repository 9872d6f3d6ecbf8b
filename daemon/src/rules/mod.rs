//! Rego detection engine (regorus), rule packs and hot reload.
//!
//! The daemon's use, in order:
//! 1. `RulePack::load_with(dir, &options)` once at start (a bad pack at start is fatal);
//! 2. `PackHandle::new(pack)`, then `pack.subscribed_types()` into the kernel's enabled-type map;
//! 3. `RuleEvaluator::start(handle.clone(), config)`; `submit` each event's JSON `input`;
//!    evaluations with hits or rule failures come back on the channel (a failure is one rule
//!    over its budget or raising an error: count it, and raise the `rule_error` alerts that
//!    `failures::FailureLimiter` lets through);
//! 4. `watch(dir, options, handle, notify_fn)`: reloads on change; `RulesRejected` becomes an
//!    alert of kind `rules_rejected`, `Reloaded` carries the new subscribed types.
//!
//! The rule contract (packages, `meta`, `alerts`, lists) is documented in `rules/README.md`.
pub mod analysis;
pub mod cli;
pub mod diag;
pub mod evaluator;
pub mod failures;
pub mod input;
pub mod model;
pub mod pack;
pub mod prefilter;
pub mod rule_filter;
pub mod smoke;
pub mod testing;
pub mod watch;

use std::path::PathBuf;

pub use diag::Diagnostic;
pub use evaluator::{Evaluation, EvaluatorConfig, LocalEvaluator, PackHandle, RuleEvaluator};
pub use input::{InputConverter, to_rego_value};
pub use model::{Action, EventType, FailureReason, Location, RuleFailure, RuleHit, RuleMeta, Severity, Judgement};
pub use pack::{EngineKind, PackOptions, PackSources, RuleBudget, RuleOverrides, RulePack, Session};
pub use watch::{RELOAD_DEADLINE, RulesNotification, RulesWatcher, reload, reload_within, watch};

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The pack breaks the language or the rule contract; one diagnostic per problem.
    #[error("rule pack rejected:\n{}", join_lines(diagnostics))]
    Rejected { diagnostics: Vec<Diagnostic> },
    /// A rule produced an alert that breaks the contract (strict evaluation only).
    #[error("{diagnostic}")]
    AlertContract { diagnostic: Diagnostic },
    #[error("invalid event: {0}")]
    InvalidInput(String),
    #[error("rule evaluation failed: {0}")]
    Eval(String),
    /// One rule could not judge an event (over budget or an error); see `Judgement`.
    #[error("rule {} failed on a {} event ({}): {}", failure.rule_id, failure.event_type, failure.reason, failure.detail)]
    RuleFailed { failure: model::RuleFailure },
    #[error("rule evaluator queue is full")]
    QueueFull,
    #[error("rule evaluator is shut down")]
    Closed,
    #[error("cannot watch the rules directory: {0}")]
    Watch(#[from] notify::Error),
}

impl RulesError {
    /// The problems as `file:line:col: message` lines (one line for errors without a position).
    pub fn lines(&self) -> Vec<String> {
        match self {
            RulesError::Rejected { diagnostics } => diagnostics.iter().map(ToString::to_string).collect(),
            RulesError::AlertContract { diagnostic } => vec![diagnostic.to_string()],
            RulesError::Io { path, source } => vec![format!("{}:1:1: {source}", path.display())],
            other => vec![other.to_string()],
        }
    }
}

fn join_lines(diagnostics: &[Diagnostic]) -> String {
    diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}
