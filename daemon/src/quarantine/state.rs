//! The quarantine set on disk: `<state_dir>/quarantine.json`, rewritten atomically (temp file,
//! fsync, rename, fsync of the directory) after every change, so a crash leaves either the old or
//! the new set, never a torn one.
//!
//! Writes go through one background thread ([`StateWriter`]): the response path updates the
//! pinned map (the source of truth while the daemon is down) and hands the writer a snapshot,
//! never waiting for an fsync; the latest snapshot wins (one the writer has not started yet is
//! replaced, not queued). Operator actions (release, cancel, add) wait until their snapshot, or
//! a later one, is durable before they are acknowledged. A crash between a map update and its
//! write is recovered from the map at the next start (`recovered_from_map`).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the state directory.
pub const STATE_FILE: &str = "quarantine.json";
/// Bumped when the file's shape changes incompatibly.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a quarantine state file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: version {found} is newer than this daemon understands ({STATE_VERSION})")]
    Version { path: PathBuf, found: u32 },
    /// The background writer's write failed (its own error, as text: it was logged there).
    #[error("{0}")]
    Writer(String),
    #[error("the state writer thread is gone")]
    WriterGone,
}

/// One quarantined pod, as persisted and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    /// `namespace/name`.
    pub pod: String,
    pub namespace: String,
    pub name: String,
    /// The pod's cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// The map key: the cgroup directory's inode (what `bpf_skb_cgroup_id` reports).
    pub cgroup_id: u64,
    /// RFC 3339 UTC.
    pub since: String,
    pub since_unix_ns: i128,
    pub rule_id: String,
    pub alert_id: String,
    /// Why (the rule's message, or how the entry was recovered).
    pub reason: String,
}

/// A quarantine held back by a rate limit: persisted so a restart applies it rather than
/// forgetting it, and listed as `pending`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingQuarantine {
    /// `namespace/name`.
    pub pod: String,
    pub namespace: String,
    pub name: String,
    pub rule_id: String,
    pub severity: crate::rules::Severity,
    pub alert_id: String,
    /// The rule's message.
    pub reason: String,
    /// RFC 3339 UTC.
    pub queued_at: String,
    pub queued_unix_ns: i128,
    /// Queue order.
    pub seq: u64,
    /// The limit that held it back when it was queued.
    pub held_by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    #[serde(default)]
    pub quarantined: Vec<QuarantineRecord>,
    #[serde(default)]
    pub pending: Vec<PendingQuarantine>,
    /// Written by daemons whose rate limit latched (suspended automatic quarantine); read only
    /// to say it is ignored now.
    #[serde(default, skip_serializing)]
    pub suspended: Option<serde_json::Value>,
}

pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// Reads the state file; a missing file is an empty set.
pub fn load(state_dir: &Path) -> Result<StateFile, StateError> {
    let path = state_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(StateFile { version: STATE_VERSION, ..StateFile::default() });
        }
        Err(source) => return Err(StateError::Io { what: "read", path, source }),
    };
    let file: StateFile = serde_json::from_str(&text).map_err(|source| StateError::Parse { path: path.clone(), source })?;
    if file.version > STATE_VERSION {
        return Err(StateError::Version { path, found: file.version });
    }
    Ok(file)
}

/// Writes the state file atomically.
pub fn save(state_dir: &Path, file: &StateFile) -> Result<(), StateError> {
    let path = state_path(state_dir);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { what, path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io("create", state_dir))?;
    let temp = state_dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
    let mut bytes = serde_json::to_vec_pretty(file).map_err(|source| StateError::Parse { path: path.clone(), source })?;
    bytes.push(b'\n');
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io("create", &temp))?;
        out.write_all(&bytes).map_err(io("write", &temp))?;
        out.sync_all().map_err(io("fsync", &temp))?;
    }
    std::fs::rename(&temp, &path).map_err(io("rename into place", &path))?;
    // The rename is durable only once the directory entry is.
    if let Ok(dir) = std::fs::File::open(state_dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// The one writer of the state file, on its own thread. Dropping it writes what is still due,
/// then joins the thread.
pub struct StateWriter {
    shared: std::sync::Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    state: std::sync::Mutex<WriterState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct WriterState {
    /// The snapshot to write next and its generation (None: nothing due).
    due: Option<(u64, StateFile)>,
    submitted: u64,
    /// The generation of the last finished write (failed or not).
    written: u64,
    /// The error of the last write when it failed, with its generation.
    failed: Option<(u64, String)>,
    errors: u64,
    stop: bool,
}

impl StateWriter {
    pub fn spawn(state_dir: &Path) -> std::io::Result<StateWriter> {
        let shared = std::sync::Arc::new(Shared { state: Default::default(), changed: std::sync::Condvar::new() });
        let thread = {
            let (shared, dir) = (shared.clone(), state_dir.to_path_buf());
            std::thread::Builder::new().name("palisade-qstate".into()).spawn(move || write_loop(&shared, &dir))?
        };
        Ok(StateWriter { shared, thread: Some(thread) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        // The state is counters and a snapshot: usable after a panic elsewhere.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the writer `file` (replacing a snapshot it has not started on); returns its
    /// generation for [`wait`](Self::wait). Never blocks on the disk.
    pub fn submit(&self, file: StateFile) -> u64 {
        let mut st = self.lock();
        st.submitted += 1;
        let generation = st.submitted;
        st.due = Some((generation, file));
        self.shared.changed.notify_all();
        generation
    }

    /// Waits until generation `generation`, or a later one, is written; its error if that
    /// write failed.
    pub fn wait(&self, generation: u64) -> Result<(), StateError> {
        let mut st = self.lock();
        while st.written < generation {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(StateError::WriterGone);
            }
            st = self.shared.changed.wait_timeout(st, std::time::Duration::from_millis(200)).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        match &st.failed {
            Some((failed, message)) if *failed >= generation => Err(StateError::Writer(message.clone())),
            _ => Ok(()),
        }
    }

    /// Writes `file` and waits until it is durable.
    pub fn write(&self, file: StateFile) -> Result<(), StateError> {
        let generation = self.submit(file);
        self.wait(generation)
    }

    /// Failed writes so far (each also logged).
    pub fn errors(&self) -> u64 {
        self.lock().errors
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(shared: &Shared, dir: &Path) {
    loop {
        let (generation, file) = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(due) = st.due.take() {
                    break due;
                }
                if st.stop {
                    return;
                }
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = save(dir, &file);
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.written = generation;
        match result {
            Ok(()) => st.failed = None,
            Err(err) => {
                st.errors += 1;
                tracing::error!(%err, generation, "writing the quarantine state file (the pinned map stays in force; the next change writes it again)");
                st.failed = Some((generation, err.to_string()));
            }
        }
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pod: &str) -> QuarantineRecord {
        let (namespace, name) = pod.split_once('/').unwrap_or(("ns", pod));
        QuarantineRecord {
            pod: pod.into(),
            namespace: namespace.into(),
            name: name.into(),
            cgroup: format!("lab/{pod}"),
            cgroup_id: 42,
            since: "2026-11-29T12:00:00.000000Z".into(),
            since_unix_ns: 1,
            rule_id: "reverse_shell".into(),
            alert_id: "a-1".into(),
            reason: "test".into(),
        }
    }

    #[test]
    fn missing_file_is_an_empty_set_and_saves_round_trip() {
        let dir = std::env::temp_dir().join(format!("palisade-qstate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let empty = load(&dir).expect("missing file is fine");
        assert!(empty.quarantined.is_empty());
        let file = StateFile { version: STATE_VERSION, quarantined: vec![record("shop/a")], ..StateFile::default() };
        save(&dir, &file).expect("save");
        assert_eq!(load(&dir).expect("load"), file);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&dir).expect("dir").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_writer_keeps_the_latest_snapshot_and_reports_failures_to_waiters() {
        let dir = std::env::temp_dir().join(format!("palisade-qstate-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let writer = StateWriter::spawn(&dir).expect("writer");
        for i in 0..50 {
            let pod = format!("shop/p{i}");
            writer.submit(StateFile { version: STATE_VERSION, quarantined: vec![record(&pod)], ..StateFile::default() });
        }
        let last = StateFile { version: STATE_VERSION, quarantined: vec![record("shop/last")], ..StateFile::default() };
        writer.write(last.clone()).expect("durable");
        assert_eq!(load(&dir).expect("load"), last, "the latest snapshot is what is on disk");
        // A state directory that cannot be written: the waiter gets the error, it is counted.
        let file_in_the_way = dir.join("blocked");
        std::fs::write(&file_in_the_way, "x").expect("file");
        let bad = StateWriter::spawn(&file_in_the_way.join("sub")).expect("writer");
        assert!(matches!(bad.write(last.clone()), Err(StateError::Writer(_))));
        assert_eq!(bad.errors(), 1);
        drop(bad);
        drop(writer);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_and_future_versions_are_errors() {
        let dir = std::env::temp_dir().join(format!("palisade-qstate-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(state_path(&dir), "{not json").expect("write");
        assert!(matches!(load(&dir), Err(StateError::Parse { .. })));
        std::fs::write(state_path(&dir), r#"{"version": 99, "quarantined": []}"#).expect("write");
        assert!(matches!(load(&dir), Err(StateError::Version { found: 99, .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
