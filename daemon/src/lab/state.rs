//! The lab state file: what a lab created, written before it is created, so `down` can remove
//! everything after a crash.

use std::fs::File;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::LabError;

/// Where state files live unless the caller says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/palisade-lab";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub lab: String,
    /// The network namespace that holds the bridge.
    pub lab_netns: String,
    /// The cgroup2 mount the pod cgroups were created under.
    pub cgroup2_mount: PathBuf,
    pub pods: Vec<PodRecord>,
    /// cgroup directories (relative to the mount) this lab created, parents included, so
    /// `down` removes exactly those and nothing that existed before.
    #[serde(default)]
    pub created_cgroups: Vec<String>,
}

/// One pod as created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub netns: String,
    /// The bridge-side veth, in the lab namespace.
    pub host_veth: String,
    pub ips: Vec<IpAddr>,
    /// cgroup path relative to the cgroup2 mount.
    pub cgroup: String,
}

impl LabState {
    pub fn new(lab: &str, lab_netns: String, cgroup2_mount: PathBuf) -> LabState {
        LabState { lab: lab.to_string(), lab_netns, cgroup2_mount, pods: Vec::new(), created_cgroups: Vec::new() }
    }

    pub fn pod(&self, key: &str) -> Option<&PodRecord> {
        self.pods.iter().find(|p| p.key == key)
    }

    /// Adds or replaces the record of `pod`.
    pub fn upsert_pod(&mut self, pod: PodRecord) {
        match self.pods.iter_mut().find(|p| p.key == pod.key) {
            Some(existing) => *existing = pod,
            None => self.pods.push(pod),
        }
    }

    pub fn remember_created_cgroup(&mut self, relative: &str) {
        if !self.created_cgroups.iter().any(|c| c == relative) {
            self.created_cgroups.push(relative.to_string());
        }
    }
}

pub fn state_path(state_dir: &Path, lab: &str) -> PathBuf {
    state_dir.join(format!("{lab}.json"))
}

fn lock_path(state_dir: &Path, lab: &str) -> PathBuf {
    state_dir.join(format!("{lab}.lock"))
}

/// Reads the state of `lab`; `None` when it has no state file.
pub fn load(state_dir: &Path, lab: &str) -> Result<Option<LabState>, LabError> {
    let path = state_path(state_dir, lab);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LabError::Io { what: "read lab state", path, source }),
    };
    let state: LabState = serde_json::from_str(&text)
        .map_err(|err| LabError::State { path: path.clone(), message: err.to_string() })?;
    if state.lab != lab {
        return Err(LabError::State { path, message: format!("records lab {:?}, not {lab:?}", state.lab) });
    }
    Ok(Some(state))
}

/// Writes the state atomically (temporary file, fsync, rename): a crash leaves the old or the
/// new state, never half of one.
pub fn save(state_dir: &Path, state: &LabState) -> Result<(), LabError> {
    std::fs::create_dir_all(state_dir)
        .map_err(|source| LabError::Io { what: "create state directory", path: state_dir.to_path_buf(), source })?;
    let path = state_path(state_dir, &state.lab);
    let tmp = state_dir.join(format!(".{}.json.tmp", state.lab));
    let text = serde_json::to_string_pretty(state)
        .map_err(|err| LabError::State { path: path.clone(), message: err.to_string() })?;
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| LabError::Io { what: "write lab state", path, source })
}

pub fn remove(state_dir: &Path, lab: &str) -> Result<(), LabError> {
    for path in [state_path(state_dir, lab), lock_path(state_dir, lab)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(LabError::Io { what: "remove lab state", path, source }),
        }
    }
    Ok(())
}

/// Labs that have a state file.
pub fn list(state_dir: &Path) -> Result<Vec<String>, LabError> {
    let entries = match std::fs::read_dir(state_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(LabError::Io { what: "list lab states", path: state_dir.to_path_buf(), source }),
    };
    let mut labs: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string))
        .filter(|name| !name.starts_with('.'))
        .collect();
    labs.sort();
    Ok(labs)
}

/// An exclusive lock on one lab, held while it is changed (two `up`s of the same lab at once
/// would otherwise both create the same namespaces). Released when dropped.
pub struct LabLock {
    _file: File,
}

pub fn lock(state_dir: &Path, lab: &str) -> Result<LabLock, LabError> {
    std::fs::create_dir_all(state_dir)
        .map_err(|source| LabError::Io { what: "create state directory", path: state_dir.to_path_buf(), source })?;
    let path = lock_path(state_dir, lab);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| LabError::Io { what: "open lab lock", path: path.clone(), source })?;
    // SAFETY: flock on a file descriptor we own; it does not touch memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(LabError::Io { what: "lock lab", path, source: std::io::Error::last_os_error() });
    }
    Ok(LabLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("palisade-lab-state-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn sample() -> LabState {
        let mut state = LabState::new("web", "plab.web".into(), "/sys/fs/cgroup".into());
        state.upsert_pod(PodRecord {
            key: "shop/a".into(),
            namespace: "shop".into(),
            name: "a".into(),
            netns: "plab.web.shop.a".into(),
            host_veth: "v12345678".into(),
            ips: vec!["198.18.1.10".parse().unwrap(), "2001:db8::10".parse().unwrap()],
            cgroup: "palisade-lab/web/shop/a".into(),
        });
        state.remember_created_cgroup("palisade-lab");
        state.remember_created_cgroup("palisade-lab");
        state
    }

    #[test]
    fn round_trips_and_lists() {
        let dir = temp_dir("roundtrip");
        assert_eq!(load(&dir, "web").unwrap(), None);
        let state = sample();
        save(&dir, &state).unwrap();
        assert_eq!(load(&dir, "web").unwrap(), Some(state.clone()));
        assert_eq!(state.created_cgroups, vec!["palisade-lab".to_string()]);
        let _lock = lock(&dir, "web").unwrap();
        assert_eq!(list(&dir).unwrap(), vec!["web".to_string()]);
        remove(&dir, "web").unwrap();
        assert_eq!(load(&dir, "web").unwrap(), None);
        assert!(list(&dir).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn upsert_replaces_by_key() {
        let mut state = sample();
        let mut pod = state.pods[0].clone();
        pod.ips.truncate(1);
        state.upsert_pod(pod);
        assert_eq!(state.pods.len(), 1);
        assert_eq!(state.pods[0].ips.len(), 1);
    }

    #[test]
    fn corrupt_or_foreign_state_is_an_error_naming_the_file() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(state_path(&dir, "web"), "{not json").unwrap();
        let err = load(&dir, "web").unwrap_err().to_string();
        assert!(err.contains("web.json"), "{err}");
        let mut other = sample();
        other.lab = "other".into();
        std::fs::write(state_path(&dir, "web"), serde_json::to_string(&other).unwrap()).unwrap();
        assert!(load(&dir, "web").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
