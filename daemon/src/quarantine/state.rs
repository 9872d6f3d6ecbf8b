//! The quarantine set on disk: `<state_dir>/quarantine.json`, rewritten atomically (temp file,
//! fsync, rename, fsync of the directory) after every change, so a crash leaves either the old or
//! the new set, never a torn one.

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
