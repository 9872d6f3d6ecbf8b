//! cgroup v2 directories of lab pods.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::LabError;

/// Finds where cgroup2 is mounted by reading /proc/mounts (hybrid hosts mount it beside the v1
/// hierarchies, e.g. at /sys/fs/cgroup/unified, so the path cannot be assumed).
pub fn cgroup2_mount() -> Result<PathBuf, LabError> {
    let path = Path::new("/proc/mounts");
    let text = std::fs::read_to_string(path)
        .map_err(|source| LabError::Io { what: "read mounts", path: path.to_path_buf(), source })?;
    crate::sys::parse_cgroup2_mount(&text).ok_or(LabError::NoCgroup2)
}

/// Creates `relative` (and its missing parents) under `mount`; returns the relative paths of
/// the directories that did not exist before, parents first.
pub fn create(mount: &Path, relative: &str) -> Result<Vec<String>, LabError> {
    let mut created = Vec::new();
    let mut current = String::new();
    for component in relative.split('/').filter(|c| !c.is_empty()) {
        if !current.is_empty() {
            current.push('/');
        }
        current.push_str(component);
        let dir = mount.join(&current);
        match std::fs::create_dir(&dir) {
            Ok(()) => created.push(current.clone()),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(LabError::Io { what: "create cgroup", path: dir, source }),
        }
    }
    Ok(created)
}

/// Pids currently in the cgroup directory `dir` (not its descendants).
pub fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in `dir` and its descendants, then removes the directories (deepest
/// first). A missing directory is not an error: `down` runs after partial `up`s and crashes.
pub fn kill_and_remove(dir: &Path) -> Result<(), LabError> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (5.14+) kills the whole subtree atomically, so a forking process cannot escape.
    let kill_file = dir.join("cgroup.kill");
    if std::fs::write(&kill_file, "1").is_err() {
        kill_tree_by_pid(dir);
    }
    remove_tree(dir)
}

fn kill_tree_by_pid(dir: &Path) {
    for pid in procs(dir) {
        // SAFETY: kill(2) with a pid read from cgroup.procs; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_tree_by_pid(&entry.path());
            }
        }
    }
}

fn remove_tree(dir: &Path) -> Result<(), LabError> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_tree(&entry.path())?;
            }
        }
    }
    // Killed processes leave the cgroup only once they have exited; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                kill_tree_by_pid(dir);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(LabError::Io { what: "remove cgroup", path: dir.to_path_buf(), source }),
        }
    }
}

/// Removes `dir` if it is an empty cgroup (no children, no processes); anything else is left.
pub fn remove_if_empty(dir: &Path) {
    match std::fs::remove_dir(dir) {
        Ok(()) => tracing::debug!(cgroup = %dir.display(), "removed cgroup"),
        Err(err) => tracing::debug!(cgroup = %dir.display(), error = %err, "left cgroup in place"),
    }
}

/// The cgroup id the kernel reports for `dir` (bpf_get_current_cgroup_id, bpf_skb_cgroup_id):
/// the inode number of the cgroup directory on cgroup2.
pub fn cgroup_id(dir: &Path) -> Result<u64, LabError> {
    crate::sys::cgroup_id(dir)
        .map_err(|source| LabError::Io { what: "stat cgroup", path: dir.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::parse_cgroup2_mount;

    #[test]
    fn finds_cgroup2_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(parse_cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        assert_eq!(parse_cgroup2_mount("none /a\\040b cgroup2 rw 0 0\n"), Some(PathBuf::from("/a b")));
    }
}
