//! Enrichment: the pod an event came from (by cgroup id) and process details from procfs
//! (exe, full cmdline, cwd, standard streams, ancestry), through a bounded cache.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::decode::{Event, EventData, bytes_to_text};
use crate::endpoints::{CgroupId, PodKey};

/// The pod as events and alerts show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
}

impl PodRef {
    /// The pod's typed key (the inventory validated both parts as Kubernetes names).
    pub fn key(&self) -> PodKey {
        PodKey::from_validated(&self.namespace, &self.name)
    }
}

/// cgroup id -> pod, rebuilt by the daemon whenever the inventory changes.
#[derive(Debug, Clone, Default)]
pub struct EndpointIndex {
    by_cgroup: HashMap<CgroupId, Arc<PodRef>>,
}

impl EndpointIndex {
    pub fn insert(&mut self, cgroup_id: impl Into<CgroupId>, pod: PodRef) {
        self.by_cgroup.insert(cgroup_id.into(), Arc::new(pod));
    }

    pub fn get(&self, cgroup_id: impl Into<CgroupId>) -> Option<Arc<PodRef>> {
        self.by_cgroup.get(&cgroup_id.into()).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_cgroup.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cgroup.is_empty()
    }

    pub fn cgroup_ids(&self) -> impl Iterator<Item = CgroupId> + '_ {
        self.by_cgroup.keys().copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stdio {
    pub stdin: &'static str,
    pub stdout: &'static str,
    pub stderr: &'static str,
}

impl Default for Stdio {
    fn default() -> Self {
        Stdio { stdin: "unknown", stdout: "unknown", stderr: "unknown" }
    }
}

/// What procfs told us about a process (fields are None when it was already gone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessDetails {
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub cwd: Option<String>,
    pub stdio: Stdio,
    pub ancestors: Vec<Ancestor>,
}

/// How far up the parent chain ancestry goes.
pub const MAX_ANCESTORS: usize = 8;

/// Bounded cache of process details keyed by pid; exec and exit invalidate.
pub struct ProcCache {
    proc_root: PathBuf,
    capacity: usize,
    entries: HashMap<u32, Arc<ProcessDetails>>,
    order: VecDeque<u32>,
    pub hits: u64,
    pub misses: u64,
}

impl ProcCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_root(capacity, PathBuf::from("/proc"))
    }

    pub fn with_root(capacity: usize, proc_root: PathBuf) -> Self {
        ProcCache { proc_root, capacity: capacity.max(1), entries: HashMap::new(), order: VecDeque::new(), hits: 0, misses: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn invalidate(&mut self, pid: u32) {
        self.entries.remove(&pid);
    }

    pub fn details(&mut self, pid: u32) -> Arc<ProcessDetails> {
        if let Some(found) = self.entries.get(&pid) {
            self.hits += 1;
            return found.clone();
        }
        self.misses += 1;
        let details = Arc::new(read_process(&self.proc_root, pid));
        // Evict oldest insertions; stale order entries of invalidated pids are skipped.
        while self.entries.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.entries.remove(&old);
                }
                None => break,
            }
        }
        self.entries.insert(pid, details.clone());
        self.order.push_back(pid);
        if self.order.len() > self.capacity * 2 {
            let entries = &self.entries;
            self.order.retain(|p| entries.contains_key(p));
        }
        details
    }

    /// What an fd of a process refers to right now.
    pub fn fd_kind(&self, pid: u32, fd: i32) -> &'static str {
        fd_kind(&self.proc_root, pid, fd)
    }
}

fn read_link_text(path: &Path) -> Option<String> {
    std::fs::read_link(path).ok().map(|p| bytes_to_text(p.as_os_str().as_encoded_bytes()))
}

/// Classifies the target of /proc/<pid>/fd/<fd>.
pub fn fd_kind(proc_root: &Path, pid: u32, fd: i32) -> &'static str {
    let Some(target) = read_link_text(&proc_root.join(pid.to_string()).join("fd").join(fd.to_string())) else {
        return "unknown";
    };
    if target.starts_with("socket:") {
        "socket"
    } else if target.starts_with("pipe:") {
        "pipe"
    } else if target == "/dev/null" {
        "null"
    } else if target.starts_with("/dev/pts/") || target.starts_with("/dev/tty") || target == "/dev/console" {
        "tty"
    } else if target.starts_with('/') {
        "file"
    } else {
        "other"
    }
}

/// Parses `ppid` and `comm` out of /proc/<pid>/stat (comm may contain spaces and parens).
pub fn parse_stat(stat: &str) -> Option<(String, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

pub fn read_process(proc_root: &Path, pid: u32) -> ProcessDetails {
    let dir = proc_root.join(pid.to_string());
    let cmdline = std::fs::read(dir.join("cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(bytes_to_text).collect()
        })
        .unwrap_or_default();
    let stdio = Stdio {
        stdin: fd_kind(proc_root, pid, 0),
        stdout: fd_kind(proc_root, pid, 1),
        stderr: fd_kind(proc_root, pid, 2),
    };
    let mut ancestors = Vec::new();
    let mut current = std::fs::read_to_string(dir.join("stat")).ok().and_then(|s| parse_stat(&s)).map(|(_, ppid)| ppid);
    while let Some(ppid) = current {
        if ppid == 0 || ancestors.len() >= MAX_ANCESTORS {
            break;
        }
        let pdir = proc_root.join(ppid.to_string());
        let Some((comm, next)) = std::fs::read_to_string(pdir.join("stat")).ok().and_then(|s| parse_stat(&s)) else {
            break;
        };
        ancestors.push(Ancestor { pid: ppid, comm, exe: read_link_text(&pdir.join("exe")) });
        current = Some(next);
    }
    ProcessDetails {
        exe: read_link_text(&dir.join("exe")),
        cmdline,
        cwd: read_link_text(&dir.join("cwd")),
        stdio,
        ancestors,
    }
}

/// An event with its pod and process details.
#[derive(Debug, Clone)]
pub struct EnrichedEvent {
    pub event: Event,
    pub pod: Option<Arc<PodRef>>,
    pub process: Arc<ProcessDetails>,
}

/// Adds pod and process context to a decoded event.
pub fn enrich(mut event: Event, endpoints: &EndpointIndex, cache: &mut ProcCache) -> EnrichedEvent {
    let pid = event.header.pid;
    if matches!(event.data, EventData::Exec(_)) {
        cache.invalidate(pid);
    }
    let process = cache.details(pid);
    match &mut event.data {
        EventData::Exec(exec) => {
            if process.exe.as_deref().is_some_and(|exe| exe.starts_with("/memfd:")) {
                exec.fileless = true;
            }
        }
        EventData::Dup(dup) => {
            dup.new_fd_kind = cache.fd_kind(pid, dup.new_fd);
        }
        EventData::Exit(_) => cache.invalidate(pid),
        _ => {}
    }
    EnrichedEvent { pod: endpoints.get(event.header.cgroup_id), event, process }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        assert_eq!(parse_stat("42 (my (odd) cmd) S 7 42 42 0"), Some(("my (odd) cmd".into(), 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_details_and_cache_bound() {
        let me = std::process::id();
        let mut cache = ProcCache::new(2);
        let details = cache.details(me);
        assert!(details.exe.is_some());
        assert!(!details.cmdline.is_empty());
        assert!(!details.ancestors.is_empty(), "a test process has a parent");
        cache.details(me);
        assert_eq!(cache.hits, 1);
        cache.details(1);
        cache.details(u32::MAX); // a pid that does not exist: empty details, still cached
        assert!(cache.len() <= 2);
        assert_eq!(cache.details(u32::MAX).exe, None);
    }
}
