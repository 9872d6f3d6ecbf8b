//! Hot reload: the rules directory is watched; a change builds a new pack off to the side and
//! swaps it in whole. A pack that fails is never put in force: the last good one stays, and a
//! `RulesRejected` notification says why.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, bounded};
use notify::{RecursiveMode, Watcher};
use serde::Serialize;

use super::RulesError;
use super::evaluator::PackHandle;
use super::model::EventType;
use super::pack::{PackOptions, RulePack};

/// Editors save in bursts (write temp, rename, chmod): wait this long for quiet before loading.
const SETTLE: Duration = Duration::from_millis(200);

/// What a reload did; the daemon turns `RulesRejected` into an alert of kind `rules_rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RulesNotification {
    Reloaded {
        generation: u64,
        rules: usize,
        /// Event types the new pack needs (switch the others off in the kernel).
        subscribed_types: Vec<EventType>,
    },
    RulesRejected {
        /// `file:line:col: message`, one per problem.
        errors: Vec<String>,
        /// The generation still in force.
        kept_generation: u64,
    },
}

/// Builds a pack from `dir` and, if it is good, puts it in force.
pub fn reload(dir: &Path, options: &PackOptions, handle: &PackHandle) -> RulesNotification {
    match RulePack::load_with(dir, options) {
        Ok(pack) => {
            let rules = pack.rules().len();
            let subscribed_types = pack.subscribed_types().into_iter().collect();
            let generation = handle.swap(pack);
            tracing::info!(generation, rules, dir = %dir.display(), "rule pack reloaded");
            RulesNotification::Reloaded { generation, rules, subscribed_types }
        }
        Err(e) => {
            let errors = e.lines();
            let kept_generation = handle.generation();
            for error in &errors {
                tracing::error!(%error, kept_generation, "rule pack rejected; keeping the last good pack");
            }
            RulesNotification::RulesRejected { errors, kept_generation }
        }
    }
}

/// Watches a rules directory until dropped.
pub struct RulesWatcher {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<JoinHandle<()>>,
}

impl RulesWatcher {
    fn stop(&mut self) {
        // Dropping the notify watcher closes the channel, which ends the reload thread.
        self.watcher = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("rules watcher thread panicked");
            }
        }
    }
}

impl Drop for RulesWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Watches `dir` (recursively); every settled burst of changes reloads the pack into `handle`
/// and reports the outcome to `notify_fn`.
pub fn watch(
    dir: &Path,
    options: PackOptions,
    handle: Arc<PackHandle>,
    notify_fn: impl Fn(RulesNotification) + Send + 'static,
) -> Result<RulesWatcher, RulesError> {
    let dir: PathBuf = dir.to_path_buf();
    let (changes_tx, changes_rx) = bounded::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event) if event.kind.is_access() => {}
            // A full channel already means "reload pending".
            Ok(_) => {
                let _ = changes_tx.try_send(());
            }
            Err(e) => tracing::warn!(error = %e, "rules watcher"),
        }
    })
    .map_err(RulesError::Watch)?;
    watcher.watch(&dir, RecursiveMode::Recursive).map_err(RulesError::Watch)?;

    let thread = std::thread::Builder::new()
        .name("palisade-rules-watch".to_string())
        .spawn(move || {
            while changes_rx.recv().is_ok() {
                // Let the burst settle.
                loop {
                    match changes_rx.recv_timeout(SETTLE) {
                        Ok(()) => continue,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                notify_fn(reload(&dir, &options, &handle));
            }
        })
        .map_err(|e| RulesError::Eval(format!("cannot start rules watcher: {e}")))?;
    Ok(RulesWatcher { watcher: Some(watcher), thread: Some(thread) })
}
