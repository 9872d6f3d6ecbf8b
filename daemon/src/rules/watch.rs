//! Hot reload: the rules directory is watched; a change builds a new pack off to the side and
//! swaps it in whole. A pack that fails is never put in force: the last good one stays, and a
//! `RulesRejected` notification says why.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long a reload may take. The load path bounds its own work (source limits before parsing,
/// a budget per rule in the smoke evaluation), so this is a backstop: past it the load is
/// abandoned, the last good pack stays, and the rejection says why.
pub const RELOAD_DEADLINE: Duration = Duration::from_secs(30);

/// Builds a pack from `dir` and, if it is good, puts it in force.
pub fn reload(dir: &Path, options: &PackOptions, handle: &PackHandle) -> RulesNotification {
    reload_within(dir, options, handle, RELOAD_DEADLINE, &Arc::new(AtomicBool::new(false)))
}

/// `reload` with a deadline. The load runs on a thread of its own; `busy` is set while one
/// runs, and a load still running past an earlier deadline makes the next reload wait its turn
/// (rejected now, retried on the next change) rather than pile up threads.
pub fn reload_within(
    dir: &Path,
    options: &PackOptions,
    handle: &PackHandle,
    deadline: Duration,
    busy: &Arc<AtomicBool>,
) -> RulesNotification {
    let kept_generation = handle.generation();
    let rejected = |errors: Vec<String>| {
        for error in &errors {
            tracing::error!(%error, kept_generation, "rule pack rejected; keeping the last good pack");
        }
        RulesNotification::RulesRejected { errors, kept_generation }
    };
    if busy.swap(true, Ordering::AcqRel) {
        return rejected(vec![format!(
            "{}:1:1: an earlier load of this directory is still running past its deadline; not loading again until it ends",
            dir.display()
        )]);
    }
    let (tx, rx) = bounded(1);
    let (load_dir, load_options, load_busy) = (dir.to_path_buf(), options.clone(), busy.clone());
    let spawned = std::thread::Builder::new().name("palisade-rules-load".to_string()).spawn(move || {
        let result = RulePack::load_with(&load_dir, &load_options);
        load_busy.store(false, Ordering::Release);
        let _ = tx.send(result);
    });
    if let Err(e) = spawned {
        busy.store(false, Ordering::Release);
        return rejected(vec![format!("{}:1:1: cannot start the rules loader: {e}", dir.display())]);
    }
    match rx.recv_timeout(deadline) {
        Ok(Ok(pack)) => {
            let rules = pack.rules().len();
            let subscribed_types = pack.subscribed_types().into_iter().collect();
            let generation = handle.swap(pack);
            tracing::info!(generation, rules, dir = %dir.display(), "rule pack reloaded");
            RulesNotification::Reloaded { generation, rules, subscribed_types }
        }
        Ok(Err(e)) => rejected(e.lines()),
        Err(_) => rejected(vec![format!(
            "{}:1:1: loading the rule pack took longer than {deadline:?}; abandoned",
            dir.display()
        )]),
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

    let busy = Arc::new(AtomicBool::new(false));
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
                notify_fn(reload_within(&dir, &options, &handle, RELOAD_DEADLINE, &busy));
            }
        })
        .map_err(|e| RulesError::Eval(format!("cannot start rules watcher: {e}")))?;
    Ok(RulesWatcher { watcher: Some(watcher), thread: Some(thread) })
}
