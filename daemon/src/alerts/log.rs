//! The alert log: one writer task owns `<state_dir>/alerts.jsonl`. Producers hold an
//! `AlertSink` and hand alerts over a bounded queue; `try_emit` never blocks, and when the queue
//! is full the alert is counted as dropped and the writer reports the loss as an `event_loss`
//! alert as soon as it has caught up. Written alerts are broadcast to live followers.
//!
//! Durability: every batch is written (the kernel has it once `write` returns); `fsync` runs at
//! most once per `fsync_interval`, and at once after quarantine and release alerts, which are an
//! audit trail. fsync runs on the blocking pool so it never stalls the runtime.
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use super::aggregate::Aggregator;
use super::export::Exports;
use super::render::harden_json;
use super::schema::{Alert, AlertKind};
use super::time::now_micros;
use super::AlertsError;
use crate::metrics::Metrics;
use crate::rules::model::Severity;

pub const LOG_FILE_NAME: &str = "alerts.jsonl";

#[derive(Clone)]
pub struct AlertLogConfig {
    /// Directory of `alerts.jsonl` and its rotations (the daemon's state directory).
    pub dir: PathBuf,
    /// Node name for alerts that do not carry one.
    pub node: String,
    /// Rotate when the current file would grow past this.
    pub max_file_bytes: u64,
    /// Rotated files kept (`alerts.jsonl.1` newest .. `alerts.jsonl.N` oldest).
    pub max_files: usize,
    pub queue_capacity: usize,
    /// Alerts a live follower may fall behind by before it is told it missed some.
    pub follow_capacity: usize,
    /// Burst aggregation window; zero disables aggregation.
    pub aggregate_window: Duration,
    pub fsync_interval: Duration,
    pub metrics: Option<Metrics>,
    pub exports: Exports,
}

impl AlertLogConfig {
    pub fn new(dir: impl Into<PathBuf>, node: impl Into<String>) -> AlertLogConfig {
        AlertLogConfig {
            dir: dir.into(),
            node: node.into(),
            max_file_bytes: 64 * 1024 * 1024,
            max_files: 5,
            queue_capacity: 8192,
            follow_capacity: 4096,
            aggregate_window: Duration::from_secs(10),
            fsync_interval: Duration::from_secs(1),
            metrics: None,
            exports: Exports::default(),
        }
    }
}

/// The writer's health, as `palisade status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertLogStats {
    pub file: String,
    pub file_bytes: u64,
    pub written: u64,
    /// Alerts refused because the queue was full (each loss is also reported as an alert).
    pub dropped: u64,
    /// Repeats folded into aggregated follow-ups (counted in their `count`, not lost).
    pub aggregated: u64,
    pub rotations: u64,
    pub write_errors: u64,
    pub last_error: Option<String>,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub followers: usize,
    pub running: bool,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped_total: AtomicU64,
    dropped_unreported: AtomicU64,
    aggregated: AtomicU64,
    rotations: AtomicU64,
    write_errors: AtomicU64,
    file_bytes: AtomicU64,
    running: AtomicBool,
}

struct Shared {
    counters: Counters,
    last_error: Mutex<Option<String>>,
    follow: broadcast::Sender<Arc<Alert>>,
    dir: PathBuf,
    queue_capacity: usize,
    follow_capacity: usize,
    metrics: Option<Metrics>,
}

/// Handle producers use to raise alerts; cheap to clone.
#[derive(Clone)]
pub struct AlertSink {
    tx: mpsc::Sender<Alert>,
    shared: Arc<Shared>,
}

impl AlertSink {
    /// Queues an alert without waiting. When the queue is full the alert is dropped, counted,
    /// and the loss reported by the writer once it catches up. Returns whether it was queued.
    pub fn try_emit(&self, alert: Alert) -> bool {
        match self.tx.try_send(alert) {
            Ok(()) => true,
            Err(_) => {
                self.shared.counters.dropped_total.fetch_add(1, Ordering::Relaxed);
                self.shared.counters.dropped_unreported.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.shared.metrics {
                    m.record_alerts_dropped(1);
                }
                false
            }
        }
    }

    /// Queues an alert, waiting for room: for callers off the hot path whose alerts are an
    /// audit trail (quarantine, release). Fails only when the writer has stopped.
    pub async fn emit(&self, alert: Alert) -> Result<(), AlertsError> {
        self.tx.send(alert).await.map_err(|_| AlertsError::WriterStopped)
    }

    /// As `emit`, from a thread outside the tokio runtime (e.g. the findings thread). Must not be
    /// called from async code.
    pub fn blocking_emit(&self, alert: Alert) -> Result<(), AlertsError> {
        self.tx.blocking_send(alert).map_err(|_| AlertsError::WriterStopped)
    }

    /// Live alerts as they are written. A follower that falls behind by more than the follow
    /// capacity gets `RecvError::Lagged(n)`: it missed n alerts (they are in the log).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Alert>> {
        self.shared.follow.subscribe()
    }

    pub fn follow_capacity(&self) -> usize {
        self.shared.follow_capacity
    }

    /// The directory holding the log and its rotations.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn stats(&self) -> AlertLogStats {
        let c = &self.shared.counters;
        AlertLogStats {
            file: self.shared.dir.join(LOG_FILE_NAME).display().to_string(),
            file_bytes: c.file_bytes.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped_total.load(Ordering::Relaxed),
            aggregated: c.aggregated.load(Ordering::Relaxed),
            rotations: c.rotations.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            last_error: self.shared.last_error.lock().ok().and_then(|e| e.clone()),
            queue_depth: self.shared.queue_capacity - self.tx.capacity(),
            queue_capacity: self.shared.queue_capacity,
            followers: self.shared.follow.receiver_count(),
            running: c.running.load(Ordering::Relaxed),
        }
    }
}

/// The running writer task. `shutdown` drains the queue, writes pending follow-ups and syncs.
pub struct AlertLog {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl AlertLog {
    /// Opens (creating) the log and starts the writer on the current tokio runtime.
    pub fn start(config: AlertLogConfig) -> Result<(AlertLog, AlertSink), AlertsError> {
        create_private_dir(&config.dir)?;
        let path = config.dir.join(LOG_FILE_NAME);
        let file = open_log(&path)?;
        let size = file.metadata().map_err(|source| AlertsError::io(&path, source))?.len();
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (follow, _) = broadcast::channel(config.follow_capacity.max(1));
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            last_error: Mutex::new(None),
            follow,
            dir: config.dir.clone(),
            queue_capacity: config.queue_capacity.max(1),
            follow_capacity: config.follow_capacity.max(1),
            metrics: config.metrics.clone(),
        });
        shared.counters.file_bytes.store(size, Ordering::Relaxed);
        shared.counters.running.store(true, Ordering::Relaxed);
        let (stop_tx, stop_rx) = oneshot::channel();
        let writer = Writer {
            aggregator: Aggregator::new(config.aggregate_window),
            config,
            path,
            file,
            size,
            shared: shared.clone(),
            pending: Vec::new(),
            pending_alerts: 0,
            pending_follow: Vec::new(),
            dirty: false,
            last_sync: Instant::now(),
            sync_now: false,
        };
        let task = tokio::spawn(writer.run(rx, stop_rx));
        Ok((AlertLog { stop: Some(stop_tx), task }, AlertSink { tx, shared }))
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(err) = (&mut self.task).await {
            tracing::error!(%err, "alert writer task failed");
        }
    }
}

/// Creates the directory (and parents) and makes it root-private: it holds the API socket
/// and alert evidence.
pub fn create_private_dir(dir: &Path) -> Result<(), AlertsError> {
    std::fs::create_dir_all(dir).map_err(|source| AlertsError::io(dir, source))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| AlertsError::io(dir, source))
}

fn open_log(path: &Path) -> Result<File, AlertsError> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(|source| AlertsError::io(path, source))
}

/// `alerts.jsonl.N` for N >= 1.
pub fn rotated_path(dir: &Path, n: usize) -> PathBuf {
    dir.join(format!("{LOG_FILE_NAME}.{n}"))
}

/// The rotations present in `dir`, as (N, path), in no particular order.
pub fn rotated_files(dir: &Path) -> Vec<(usize, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let n: usize = name.to_str()?.strip_prefix(LOG_FILE_NAME)?.strip_prefix('.')?.parse().ok()?;
            (n >= 1).then(|| (n, rotated_path(dir, n)))
        })
        .collect()
}

struct Writer {
    config: AlertLogConfig,
    path: PathBuf,
    file: File,
    size: u64,
    shared: Arc<Shared>,
    aggregator: Aggregator,
    /// Lines of the current batch, written together by `flush_pending`.
    pending: Vec<u8>,
    pending_alerts: u64,
    pending_follow: Vec<Alert>,
    dirty: bool,
    last_sync: Instant,
    sync_now: bool,
}

/// Alerts handled per wake-up before the writer flushes and looks at its timers.
const BATCH: usize = 512;

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Alert>, mut stop: oneshot::Receiver<()>) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                received = rx.recv() => {
                    let Some(alert) = received else { break };
                    self.handle(alert);
                    for _ in 1..BATCH {
                        match rx.try_recv() {
                            Ok(alert) => self.handle(alert),
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let now = Instant::now();
            for follow_up in self.aggregator.expired(now) {
                self.write(follow_up);
            }
            if rx.is_empty() {
                self.report_drops();
            }
            self.flush_pending();
            self.maybe_sync(now);
        }
        // Shutdown: what is queued is written, open bursts get their follow-ups.
        while let Ok(alert) = rx.try_recv() {
            self.handle(alert);
        }
        for follow_up in self.aggregator.flush_all() {
            self.write(follow_up);
        }
        self.report_drops();
        self.flush_pending();
        if let Err(err) = self.file.sync_data() {
            self.record_error(format!("sync {}: {err}", self.path.display()));
        }
        self.shared.counters.running.store(false, Ordering::Relaxed);
    }

    fn next_deadline(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let sync = if self.dirty { self.last_sync + self.config.fsync_interval } else { far };
        self.aggregator.next_deadline().map_or(sync, |d| d.min(sync))
    }

    /// Gives an alert made by hand (or read back) without id or node its missing parts.
    fn complete(&self, alert: &mut Alert) {
        if alert.id.is_empty() {
            alert.id = super::schema::next_alert_id(now_micros());
        }
        if alert.node.is_empty() {
            alert.node = self.config.node.clone();
        }
    }

    fn handle(&mut self, mut alert: Alert) {
        self.complete(&mut alert);
        if let Some(alert) = self.aggregator.admit(alert, Instant::now()) {
            self.write_with_id(alert);
        }
        self.shared.counters.aggregated.store(self.aggregator.absorbed_total(), Ordering::Relaxed);
    }

    fn write(&mut self, mut alert: Alert) {
        self.complete(&mut alert);
        self.write_with_id(alert);
    }

    fn write_with_id(&mut self, alert: Alert) {
        let line = match serde_json::to_string(&alert) {
            Ok(json) => {
                let mut line = harden_json(json);
                line.push('\n');
                line
            }
            Err(err) => {
                self.record_error(format!("serialize alert {}: {err}", alert.id));
                return;
            }
        };
        let pending = self.pending.len() as u64;
        if self.size + pending > 0 && self.size + pending + line.len() as u64 > self.config.max_file_bytes {
            self.flush_pending();
            self.rotate();
        }
        self.pending.extend_from_slice(line.as_bytes());
        self.pending_alerts += 1;
        if matches!(alert.kind, AlertKind::Quarantine | AlertKind::Release) {
            self.sync_now = true;
        }
        if let Some(m) = &self.config.metrics {
            m.record_alert(alert.kind.as_str(), alert.rule_id(), alert.severity.as_str(), alert.count);
        }
        self.config.exports.offer(&alert);
        self.pending_follow.push(alert);
    }

    /// Writes the batch's lines with one write(2).
    fn flush_pending(&mut self) {
        if self.pending.is_empty() && self.pending_follow.is_empty() {
            return;
        }
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.size += self.pending.len() as u64;
                self.dirty = true;
                self.shared.counters.written.fetch_add(self.pending_alerts, Ordering::Relaxed);
                self.shared.counters.file_bytes.store(self.size, Ordering::Relaxed);
            }
            Err(err) => self.record_error(format!("write {} ({} alerts): {err}", self.path.display(), self.pending_alerts)),
        }
        self.pending.clear();
        self.pending_alerts = 0;
        // Broadcast only once written: a follower that subscribes and then reads history sees
        // every alert in one or the other. Followers get them even if the write failed: the
        // live view should not go dark because the disk is full.
        for alert in self.pending_follow.drain(..) {
            let _ = self.shared.follow.send(Arc::new(alert));
        }
    }

    fn record_error(&self, message: String) {
        tracing::error!(error = %message, "alert log");
        self.shared.counters.write_errors.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.config.metrics {
            m.record_alert_write_error();
        }
        if let Ok(mut last) = self.shared.last_error.lock() {
            *last = Some(message);
        }
    }

    /// alerts.jsonl -> .1 -> .2 ...; the oldest beyond `max_files` is deleted.
    fn rotate(&mut self) {
        if let Err(err) = self.file.sync_data() {
            self.record_error(format!("sync before rotation: {err}"));
        }
        let dir = self.config.dir.clone();
        let keep = self.config.max_files;
        // The oldest kept rotation is shifted out, and any beyond the limit (left over from a
        // larger limit before) go too.
        for (n, path) in rotated_files(&dir) {
            if n >= keep.max(1)
                && let Err(err) = std::fs::remove_file(&path)
            {
                self.record_error(format!("remove {}: {err}", path.display()));
            }
        }
        for i in (1..keep).rev() {
            let from = rotated_path(&dir, i);
            if from.exists()
                && let Err(err) = std::fs::rename(&from, rotated_path(&dir, i + 1))
            {
                self.record_error(format!("rotate {}: {err}", from.display()));
            }
        }
        if keep == 0 {
            if let Err(err) = std::fs::remove_file(&self.path) {
                self.record_error(format!("truncate {}: {err}", self.path.display()));
            }
        } else if let Err(err) = std::fs::rename(&self.path, rotated_path(&dir, 1)) {
            self.record_error(format!("rotate {}: {err}", self.path.display()));
        }
        match open_log(&self.path) {
            Ok(file) => {
                self.file = file;
                self.size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                self.shared.counters.rotations.fetch_add(1, Ordering::Relaxed);
                // The renames are durable only once the directory is synced.
                if let Ok(d) = File::open(&dir) {
                    let _ = d.sync_all();
                }
            }
            Err(err) => self.record_error(err.to_string()),
        }
    }

    fn maybe_sync(&mut self, now: Instant) {
        if !self.dirty || !(self.sync_now || now >= self.last_sync + self.config.fsync_interval) {
            return;
        }
        self.dirty = false;
        self.sync_now = false;
        self.last_sync = now;
        match self.file.try_clone() {
            Ok(file) => {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(err) = file.sync_data() {
                        shared.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut last) = shared.last_error.lock() {
                            *last = Some(format!("fsync: {err}"));
                        }
                    }
                });
            }
            Err(err) => self.record_error(format!("fsync: {err}")),
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.shared.counters.dropped_unreported.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return;
        }
        let total = self.shared.counters.dropped_total.load(Ordering::Relaxed);
        let alert = Alert::new(
            AlertKind::EventLoss,
            Severity::High,
            format!(
                "{dropped} alerts dropped: the alert queue ({} entries) was full",
                self.shared.queue_capacity
            ),
        )
        .with_event(serde_json::json!({ "source": "alert_queue", "dropped": dropped, "dropped_total": total }));
        self.write(alert);
    }
}
