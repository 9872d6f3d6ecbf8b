//! Enrichment: the pod an event came from (by cgroup id) and the process's context (exe,
//! command line, standard streams, ancestry) from the process cache.
//!
//! The cache is built from the kernel's own fork, exec and exit events: an exec carries the new
//! image's path (task->mm->exe_file), argv and the kind of each standard stream as the kernel
//! saw them at that moment; a fork gives the child its parent's context; a dup onto 0-2 updates
//! that stream. So a process that is gone a millisecond after its behaviour, or whose pid was
//! reused since, is still described as it was. Processes are told apart by pid *and* start time
//! (`header.start_ns`): an event whose start time differs from the cached entry's is a new
//! process with that pid and never inherits the old one's context. /proc is read only once, to
//! seed the processes that existed before the daemon started ([`ProcCache::seed_from_proc`]),
//! never on the event path. The cache is bounded in bytes; evictions are counted.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use palisade_common::{ARG_LEN, ARGV_SLOTS};

use super::decode::{Event, EventData, Header, bytes_to_text};
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

/// A process's context as an event shows it (fields are None/empty when it is not known).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessDetails {
    pub exe: Option<String>,
    /// `exe` is the image's whole path as the kernel named it (false: unknown, or the kernel's
    /// walk was cut and `exe` is only its tail).
    pub exe_resolved: bool,
    pub cmdline: Vec<String>,
    /// `cmdline` is cut: more than `ARGV_SLOTS` arguments, or one of `ARG_LEN - 1` bytes or
    /// more (the kernel's bounds, which a command line seeded from /proc is cut to as well).
    pub cmdline_truncated: bool,
    pub cwd: Option<String>,
    pub stdio: Stdio,
    pub ancestors: Vec<Ancestor>,
}

/// At most this much of `/proc/PID/cmdline` is read when seeding: a process's arguments can
/// take megabytes, and only `ARGV_SLOTS` of at most `ARG_LEN - 1` bytes are kept (as from the
/// kernel); 16 arguments of 4 KiB still reach the sixteenth.
pub const CMDLINE_READ_BYTES: u64 = 64 * 1024;

/// How far up the parent chain ancestry goes.
pub const MAX_ANCESTORS: usize = 8;

/// Exited processes stay this many events longer (events of theirs still in flight on the
/// other ring are judged with their context), unless the cache needs the room first.
pub const EXIT_GRACE_EVENTS: u64 = 4096;

/// Bytes a cache entry is charged on top of its strings (the entry, map and queue slots).
const ENTRY_OVERHEAD: usize = std::mem::size_of::<ProcEntry>() + 64;

#[derive(Debug, Clone)]
struct ProcEntry {
    /// ns since boot; 0 while unknown (a forked child before its first own event).
    start_ns: u64,
    /// Seeded from /proc, whose start time counts clock ticks: compared at that resolution.
    seeded: bool,
    ppid: u32,
    comm: String,
    exe: Option<String>,
    exe_resolved: bool,
    cmdline: Vec<String>,
    cmdline_truncated: bool,
    cwd: Option<String>,
    stdio: Stdio,
    /// Eviction order: an `order` slot naming another generation is stale.
    generation: u64,
    bytes: usize,
}

impl ProcEntry {
    fn unknown(start_ns: u64, ppid: u32, comm: &str) -> ProcEntry {
        ProcEntry {
            start_ns,
            seeded: false,
            ppid,
            comm: comm.to_string(),
            exe: None,
            exe_resolved: false,
            cmdline: Vec::new(),
            cmdline_truncated: false,
            cwd: None,
            stdio: Stdio::default(),
            generation: 0,
            bytes: 0,
        }
    }

    fn weigh(&mut self) -> usize {
        self.bytes = ENTRY_OVERHEAD
            + self.comm.len()
            + self.exe.as_ref().map_or(0, String::len)
            + self.cwd.as_ref().map_or(0, String::len)
            + self.cmdline.iter().map(|a| a.len() + std::mem::size_of::<String>()).sum::<usize>();
        self.bytes
    }
}

/// Counters of the process cache (status and metrics show them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub max_bytes: usize,
    /// Events of a cached process.
    pub hits: u64,
    /// Events of a process the cache did not know (started before the daemon and not seeded,
    /// or evicted, or its fork event lost): their context is unknown, never guessed.
    pub misses: u64,
    /// Events whose pid was cached for an older process (later start time): a reused pid; the
    /// old context is retired, never inherited.
    pub reused: u64,
    /// Events of an older process that came after a newer one with the same pid (the two rings
    /// reorder): judged with the older process's retired context.
    pub late: u64,
    /// Entries dropped to stay within `max_bytes`.
    pub evictions: u64,
    /// Processes seeded from /proc at start.
    pub seeded: u64,
}

/// Fork records kept for children whose first own event has not come yet (threads leave one
/// each too, which age out): at most this many.
const MAX_PENDING_FORKS: usize = 8192;
/// Contexts of processes whose pid was taken by a newer process, kept for their events still
/// in flight (the two rings reorder events): at most this many.
const MAX_RETIRED: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct ForkRecord {
    parent_pid: u32,
    parent_start_ns: u64,
    /// The child started at or before this (CLOCK_BOOTTIME ns).
    boot_ns: u64,
}

/// Which process an event belongs to, relative to the cached entry of its pid.
enum Identity {
    /// The cached entry (possibly just created).
    Current,
    /// An older process that had this pid (its event came late): its retired context.
    Retired(Option<ProcEntry>),
}

/// The process cache (see the module documentation), keyed by pid.
pub struct ProcCache {
    entries: HashMap<u32, ProcEntry>,
    order: VecDeque<(u32, u64)>,
    exited: VecDeque<(u32, u64, u64)>,
    forks: HashMap<u32, ForkRecord>,
    fork_order: VecDeque<u32>,
    retired: HashMap<(u32, u64), ProcEntry>,
    retired_order: VecDeque<(u32, u64)>,
    next_generation: u64,
    events: u64,
    tick_ns: u64,
    stats: ProcCacheStats,
}

impl ProcCache {
    /// A cache for about `max_entries` processes (charged ~1 KiB each).
    pub fn new(max_entries: usize) -> Self {
        Self::with_byte_budget(max_entries.max(1) * 1024)
    }

    pub fn with_byte_budget(max_bytes: usize) -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as u64 } else { 100 };
        ProcCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            exited: VecDeque::new(),
            forks: HashMap::new(),
            fork_order: VecDeque::new(),
            retired: HashMap::new(),
            retired_order: VecDeque::new(),
            next_generation: 1,
            events: 0,
            tick_ns: 1_000_000_000 / hz,
            stats: ProcCacheStats { max_bytes: max_bytes.max(ENTRY_OVERHEAD), ..ProcCacheStats::default() },
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn stats(&self) -> ProcCacheStats {
        ProcCacheStats { entries: self.entries.len(), ..self.stats }
    }

    /// Seeds the processes that exist now (before any event is handled), from `proc_root`
    /// (normally /proc). Returns how many were added; the byte bound applies.
    pub fn seed_from_proc(&mut self, proc_root: &Path) -> usize {
        let Ok(dir) = std::fs::read_dir(proc_root) else { return 0 };
        let mut added = 0;
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if self.entries.contains_key(&pid) {
                continue;
            }
            let Some(stat) = std::fs::read_to_string(entry.path().join("stat")).ok().and_then(|s| parse_stat_full(&s)) else {
                continue;
            };
            let details = read_process_own(proc_root, pid);
            let e = ProcEntry {
                start_ns: stat.start_ticks.saturating_mul(self.tick_ns),
                seeded: true,
                ppid: stat.ppid,
                comm: stat.comm,
                exe: details.exe,
                exe_resolved: details.exe_resolved,
                cmdline: details.cmdline,
                cmdline_truncated: details.cmdline_truncated,
                cwd: details.cwd,
                stdio: details.stdio,
                generation: 0,
                bytes: 0,
            };
            self.insert(pid, e);
            added += 1;
        }
        self.stats.seeded += added as u64;
        added
    }

    fn insert(&mut self, pid: u32, mut entry: ProcEntry) {
        if let Some(old) = self.entries.remove(&pid) {
            self.stats.bytes -= old.bytes;
        }
        entry.generation = self.next_generation;
        self.next_generation += 1;
        let bytes = entry.weigh();
        while self.stats.bytes + bytes > self.stats.max_bytes {
            let Some((victim, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&victim).is_some_and(|e| e.generation == generation) {
                if let Some(gone) = self.entries.remove(&victim) {
                    self.stats.bytes -= gone.bytes;
                    self.stats.evictions += 1;
                }
            }
        }
        self.stats.bytes += bytes;
        self.order.push_back((pid, entry.generation));
        self.entries.insert(pid, entry);
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(p, g)| entries.get(p).is_some_and(|e| e.generation == *g));
        }
    }

    fn reweigh(&mut self, pid: u32) {
        if let Some(e) = self.entries.get_mut(&pid) {
            let before = e.bytes;
            let after = e.weigh();
            self.stats.bytes = self.stats.bytes + after - before;
        }
    }

    /// Moves the entry of `pid` aside for late events of its process (a newer one has the pid).
    fn retire(&mut self, pid: u32) {
        let Some(old) = self.entries.remove(&pid) else { return };
        self.stats.bytes -= old.bytes;
        if old.start_ns == 0 {
            return;
        }
        let key = (pid, old.start_ns);
        self.retired.insert(key, old);
        self.retired_order.push_back(key);
        while self.retired_order.len() > MAX_RETIRED {
            if let Some(k) = self.retired_order.pop_front() {
                self.retired.remove(&k);
            }
        }
    }

    /// How an entry started at `cached` relates to a process started at `event`: equal (0 on
    /// either side is unknown, taken as equal; seeded entries compare at tick resolution).
    fn compare_start(&self, cached: u64, seeded: bool, event: u64) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        if cached == 0 || event == 0 {
            return Ordering::Equal;
        }
        if seeded && cached.abs_diff(event) < self.tick_ns {
            return Ordering::Equal;
        }
        event.cmp(&cached)
    }

    /// A new entry for `pid` started at `start_ns`: its parent's context when a fork record
    /// says it is that parent's child, else unknown (counted as a miss).
    fn fresh(&mut self, pid: u32, h: &Header) -> ProcEntry {
        if let Some(fork) = self.forks.get(&pid).copied() {
            if h.start_ns == 0 || h.start_ns <= fork.boot_ns {
                self.forks.remove(&pid);
                let parent = match self.entries.get(&fork.parent_pid) {
                    Some(p) if self.compare_start(p.start_ns, p.seeded, fork.parent_start_ns).is_eq() => Some(p.clone()),
                    _ => self.retired.get(&(fork.parent_pid, fork.parent_start_ns)).cloned(),
                };
                if let Some(parent) = parent {
                    self.stats.hits += 1;
                    return ProcEntry { start_ns: h.start_ns, seeded: false, ppid: fork.parent_pid, comm: h.comm.clone(), ..parent };
                }
            }
        }
        self.stats.misses += 1;
        ProcEntry::unknown(h.start_ns, h.ppid, &h.comm)
    }

    /// Finds (or makes) the entry of the process that produced `h`.
    fn identify(&mut self, h: &Header) -> Identity {
        use std::cmp::Ordering;
        let pid = h.pid;
        let relation = self.entries.get(&pid).map(|e| self.compare_start(e.start_ns, e.seeded, h.start_ns));
        match relation {
            Some(Ordering::Equal) => {
                self.stats.hits += 1;
                if let Some(e) = self.entries.get_mut(&pid) {
                    if (e.start_ns == 0 || e.seeded) && h.start_ns != 0 {
                        e.start_ns = h.start_ns;
                        e.seeded = false;
                    }
                    if h.ppid != 0 {
                        e.ppid = h.ppid;
                    }
                    if e.comm != h.comm {
                        e.comm.clone_from(&h.comm);
                    }
                }
                self.reweigh(pid);
                Identity::Current
            }
            Some(Ordering::Less) => {
                // An older process with this pid: its event was overtaken by the newer one's.
                self.stats.late += 1;
                Identity::Retired(self.retired.get(&(pid, h.start_ns)).cloned())
            }
            Some(Ordering::Greater) => {
                self.stats.reused += 1;
                self.retire(pid);
                let entry = self.fresh(pid, h);
                self.insert(pid, entry);
                Identity::Current
            }
            None => {
                let entry = self.fresh(pid, h);
                self.insert(pid, entry);
                Identity::Current
            }
        }
    }

    /// Updates the cache with `event` and returns the context of its process.
    fn observe(&mut self, event: &Event) -> Arc<ProcessDetails> {
        self.events += 1;
        self.expire_exited();
        let h = &event.header;
        if let Identity::Retired(old) = self.identify(h) {
            return Arc::new(match old {
                Some(e) => self.details_from(h.pid, &e),
                None => ProcessDetails::default(),
            });
        }
        match &event.data {
            EventData::Exec(exec) => {
                if let Some(e) = self.entries.get_mut(&h.pid) {
                    e.exe.clone_from(&exec.exe);
                    e.exe_resolved = exec.exe_resolved;
                    e.cmdline.clone_from(&exec.argv);
                    e.cmdline_truncated = exec.argv_truncated;
                    e.stdio = exec.stdio.clone();
                }
                self.reweigh(h.pid);
            }
            EventData::Fork(fork) if fork.child_pid != 0 && fork.child_pid != h.pid => self.record_fork(h, fork),
            EventData::Dup(dup) if dup.result >= 0 && (0..=2).contains(&dup.new_fd) => {
                if let Some(e) = self.entries.get_mut(&h.pid) {
                    match dup.new_fd {
                        0 => e.stdio.stdin = dup.new_fd_kind,
                        1 => e.stdio.stdout = dup.new_fd_kind,
                        _ => e.stdio.stderr = dup.new_fd_kind,
                    }
                }
            }
            _ => {}
        }
        let details = match self.entries.get(&h.pid) {
            Some(e) => self.details_from(h.pid, e),
            None => ProcessDetails::default(),
        };
        if matches!(event.data, EventData::Exit(_)) {
            if let Some(e) = self.entries.get(&h.pid) {
                self.exited.push_back((h.pid, e.generation, self.events));
            }
        }
        Arc::new(details)
    }

    /// A fork by the process of `h`: the child (or a new thread: the tracepoint does not say)
    /// gets the parent's context at its first own event. When the child's events overtook the
    /// fork (another ring), its entry is already there and gets the context now.
    fn record_fork(&mut self, h: &Header, fork: &super::decode::ForkData) {
        let child = fork.child_pid;
        if let Some(existing) = self.entries.get(&child) {
            let is_child = existing.start_ns != 0 && existing.start_ns <= fork.boot_ns && existing.start_ns >= h.start_ns;
            if is_child {
                let unknown = existing.exe.is_none() && existing.cmdline.is_empty();
                if let (true, Some(parent)) = (unknown, self.entries.get(&h.pid).cloned()) {
                    if let Some(e) = self.entries.get_mut(&child) {
                        e.exe = parent.exe;
                        e.exe_resolved = parent.exe_resolved;
                        e.cmdline = parent.cmdline;
                        e.cmdline_truncated = parent.cmdline_truncated;
                        e.cwd = parent.cwd;
                        e.stdio = parent.stdio;
                    }
                }
                if let Some(e) = self.entries.get_mut(&child) {
                    e.ppid = h.pid;
                }
                self.reweigh(child);
                return;
            }
        }
        let record = ForkRecord { parent_pid: h.pid, parent_start_ns: h.start_ns, boot_ns: fork.boot_ns };
        if self.forks.insert(child, record).is_none() {
            self.fork_order.push_back(child);
        }
        while self.fork_order.len() > MAX_PENDING_FORKS {
            if let Some(old) = self.fork_order.pop_front() {
                self.forks.remove(&old);
            }
        }
    }

    fn expire_exited(&mut self) {
        while let Some(&(pid, generation, at)) = self.exited.front() {
            if self.events.saturating_sub(at) < EXIT_GRACE_EVENTS {
                break;
            }
            self.exited.pop_front();
            if self.entries.get(&pid).is_some_and(|e| e.generation == generation) {
                if let Some(gone) = self.entries.remove(&pid) {
                    self.stats.bytes -= gone.bytes;
                }
            }
        }
    }

    fn details_from(&self, pid: u32, e: &ProcEntry) -> ProcessDetails {
        let mut ancestors = Vec::new();
        let mut next = e.ppid;
        let mut seen = pid;
        while next != 0 && next != seen && ancestors.len() < MAX_ANCESTORS {
            let Some(parent) = self.entries.get(&next) else { break };
            ancestors.push(Ancestor { pid: next, comm: parent.comm.clone(), exe: parent.exe.clone() });
            seen = next;
            next = parent.ppid;
        }
        ProcessDetails {
            exe: e.exe.clone(),
            exe_resolved: e.exe_resolved,
            cmdline: e.cmdline.clone(),
            cmdline_truncated: e.cmdline_truncated,
            cwd: e.cwd.clone(),
            stdio: e.stdio.clone(),
            ancestors,
        }
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

struct StatLine {
    comm: String,
    ppid: u32,
    /// Field 22: clock ticks since boot at the process's start.
    start_ticks: u64,
}

fn parse_stat_full(stat: &str) -> Option<StatLine> {
    let (comm, ppid) = parse_stat(stat)?;
    let close = stat.rfind(')')?;
    // After the comm: field 3 (state) is the first; field 22 (starttime) the twentieth.
    let start_ticks = stat.get(close + 1..)?.split_whitespace().nth(19)?.parse().ok()?;
    Some(StatLine { comm, ppid, start_ticks })
}

/// A process's command line from `/proc/PID/cmdline`, read and kept within the kernel's
/// bounds (at most `CMDLINE_READ_BYTES` read; `ARGV_SLOTS` arguments of at most `ARG_LEN - 1`
/// bytes kept), and whether it was cut. Unreadable: empty, not cut.
fn read_cmdline(path: &Path) -> (Vec<String>, bool) {
    use std::io::Read as _;
    let mut raw = Vec::new();
    let Ok(file) = std::fs::File::open(path) else { return (Vec::new(), false) };
    // One byte more than kept: its presence says there was more.
    if file.take(CMDLINE_READ_BYTES + 1).read_to_end(&mut raw).is_err() {
        return (Vec::new(), false);
    }
    let mut truncated = raw.len() as u64 > CMDLINE_READ_BYTES;
    raw.truncate(CMDLINE_READ_BYTES as usize);
    let mut args = Vec::new();
    for arg in raw.split(|&b| b == 0).filter(|a| !a.is_empty()) {
        if args.len() == ARGV_SLOTS {
            truncated = true;
            break;
        }
        truncated |= arg.len() > ARG_LEN - 1;
        args.push(bytes_to_text(&arg[..arg.len().min(ARG_LEN - 1)]));
    }
    (args, truncated)
}

/// A process's own details from procfs (no ancestors: the cache links those), for seeding.
fn read_process_own(proc_root: &Path, pid: u32) -> ProcessDetails {
    let dir = proc_root.join(pid.to_string());
    let (cmdline, cmdline_truncated) = read_cmdline(&dir.join("cmdline"));
    let exe = read_link_text(&dir.join("exe"));
    ProcessDetails {
        // /proc/PID/exe is the kernel's own path of the image.
        exe_resolved: exe.is_some(),
        exe,
        cmdline,
        cmdline_truncated,
        cwd: read_link_text(&dir.join("cwd")),
        stdio: Stdio {
            stdin: fd_kind(proc_root, pid, 0),
            stdout: fd_kind(proc_root, pid, 1),
            stderr: fd_kind(proc_root, pid, 2),
        },
        ancestors: Vec::new(),
    }
}

/// An event with its pod and process details.
#[derive(Debug, Clone)]
pub struct EnrichedEvent {
    pub event: Event,
    pub pod: Option<Arc<PodRef>>,
    pub process: Arc<ProcessDetails>,
}

/// Adds pod and process context to a decoded event (from the cache; /proc is not read).
pub fn enrich(event: Event, endpoints: &EndpointIndex, cache: &mut ProcCache) -> EnrichedEvent {
    let process = cache.observe(&event);
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

    use crate::events::decode::{ExecData, ExitData, ForkData};
    use crate::events::kind::EventKind;

    fn header(kind: EventKind, pid: u32, ppid: u32, start_ns: u64, comm: &str) -> Header {
        Header {
            ktime_ns: 1,
            cgroup_id: 9,
            kind,
            source: "tracepoint",
            pid,
            tid: pid,
            ppid,
            uid: 0,
            gid: 0,
            euid: 0,
            egid: 0,
            comm: comm.into(),
            truncated: false,
            start_ns,
        }
    }

    /// `parent` (started at `start_ns`) forks `child` at boot time `boot_ns`.
    fn fork(parent: u32, grandparent: u32, start_ns: u64, child: u32, boot_ns: u64) -> Event {
        Event {
            header: header(EventKind::Fork, parent, grandparent, start_ns, "sh"),
            data: EventData::Fork(ForkData { parent_pid: parent, child_pid: child, boot_ns }),
        }
    }

    fn exec(pid: u32, ppid: u32, start_ns: u64, exe: &str, argv: &[&str], stdin: &'static str) -> Event {
        Event {
            header: header(EventKind::Exec, pid, ppid, start_ns, exe.rsplit('/').next().unwrap_or(exe)),
            data: EventData::Exec(ExecData {
                filename: exe.into(),
                argv: argv.iter().map(|a| a.to_string()).collect(),
                argc: argv.len() as u32,
                argv_truncated: false,
                via_execveat: false,
                dirfd: -100,
                at_flags: 0,
                fileless: false,
                exe: Some(exe.into()),
                exe_resolved: true,
                stdio: Stdio { stdin, stdout: "pipe", stderr: "pipe" },
            }),
        }
    }

    fn exit(pid: u32, ppid: u32, start_ns: u64) -> Event {
        Event { header: header(EventKind::Exit, pid, ppid, start_ns, "x"), data: EventData::Exit(ExitData { exit_code: 0 }) }
    }

    #[test]
    fn context_comes_from_fork_and_exec_events_and_outlives_the_process() {
        let mut cache = ProcCache::new(64);
        // A shell (pid 100, parent 1) forks 200, which execs cat, which exits at once.
        cache.observe(&exec(100, 1, 1_000, "/usr/bin/bash", &["bash"], "tty"));
        cache.observe(&fork(100, 1, 1_000, 200, 2_001));
        let cat = cache.observe(&exec(200, 100, 2_000, "/usr/bin/cat", &["cat", "/etc/shadow"], "socket"));
        assert_eq!((cat.exe.as_deref(), cat.exe_resolved), (Some("/usr/bin/cat"), true));
        assert_eq!(cat.cmdline, vec!["cat", "/etc/shadow"]);
        assert_eq!(cat.stdio.stdin, "socket");
        assert_eq!(cat.ancestors.first().map(|a| (a.pid, a.exe.as_deref())), Some((100, Some("/usr/bin/bash"))));
        let at_exit = cache.observe(&exit(200, 100, 2_000));
        assert_eq!(at_exit.exe.as_deref(), Some("/usr/bin/cat"));
        // An event of that process still in flight on the other ring keeps its context.
        let late = cache.observe(&Event { header: header(EventKind::Exit, 200, 100, 2_000, "cat"), data: EventData::Exit(ExitData { exit_code: 0 }) });
        assert_eq!(late.exe.as_deref(), Some("/usr/bin/cat"));
        // A forked child that does something before exec shows its parent's image.
        cache.observe(&fork(100, 1, 1_000, 201, 3_000));
        let child = cache.observe(&exit(201, 100, 3_000));
        assert_eq!((child.exe.as_deref(), child.ancestors[0].pid), (Some("/usr/bin/bash"), 100));
        assert_eq!(cache.stats().reused, 0);
    }

    #[test]
    fn a_reused_pid_never_inherits_the_old_context() {
        let mut cache = ProcCache::new(64);
        cache.observe(&exec(300, 1, 5_000, "/usr/bin/setpriv", &["setpriv", "--reuid=0"], "tty"));
        // Its exit was lost; a new process gets pid 300 (another start time).
        let other = cache.observe(&Event {
            header: header(EventKind::Exit, 300, 1, 9_000, "sleep"),
            data: EventData::Exit(ExitData { exit_code: 0 }),
        });
        assert_eq!((other.exe.as_deref(), other.cmdline.len(), other.stdio.stdin), (None, 0, "unknown"));
        assert!(!other.exe_resolved, "an unknown image is not a resolved one");
        assert_eq!(cache.stats().reused, 1);
        // A process the cache never saw is unknown, not looked up in /proc.
        let me = std::process::id();
        let unknown = cache.observe(&exit(me, 1, 7));
        assert_eq!(unknown.exe, None);
        // (The first exec of pid 300 and the new process on pid 300 were misses too: nobody
        // saw either start.)
        assert_eq!(cache.stats().misses, 3);
    }

    #[test]
    fn events_reordered_between_the_rings_keep_their_own_process() {
        let mut cache = ProcCache::new(64);
        cache.observe(&exec(100, 1, 1_000, "/usr/bin/python3", &["python3", "x.py"], "tty"));
        // Child 200 (started 2_000) runs cat; its exec (priority ring) overtakes the fork (bulk).
        cache.observe(&fork(100, 1, 1_000, 200, 1_500)); // an older fork of pid 200 (a thread, say)
        let cat = cache.observe(&exec(200, 100, 2_000, "/usr/bin/cat", &["cat", "/etc/shadow"], "null"));
        assert_eq!(cat.exe.as_deref(), Some("/usr/bin/cat"));
        cache.observe(&fork(100, 1, 1_000, 200, 2_001));
        let after_fork = cache.observe(&exit(200, 100, 2_000));
        assert_eq!(after_fork.exe.as_deref(), Some("/usr/bin/cat"), "the late fork does not clobber the exec");
        // pid 200 is reused by a child that execs sleep (start 3_000) before cat's exit arrives...
        cache.observe(&fork(100, 1, 1_000, 200, 3_001));
        let sleep = cache.observe(&exec(200, 100, 3_000, "/usr/bin/sleep", &["sleep", "5"], "null"));
        assert_eq!(sleep.exe.as_deref(), Some("/usr/bin/sleep"));
        // ... and a late event of cat still names cat, while sleep keeps its own context.
        let late = cache.observe(&exit(200, 100, 2_000));
        assert_eq!((late.exe.as_deref(), late.cmdline.len()), (Some("/usr/bin/cat"), 2));
        let sleep_again = cache.observe(&exit(200, 100, 3_000));
        assert_eq!(sleep_again.exe.as_deref(), Some("/usr/bin/sleep"));
        let stats = cache.stats();
        assert_eq!((stats.reused, stats.late), (1, 1), "{stats:?}");
    }

    #[test]
    fn seeded_processes_are_matched_at_tick_resolution() {
        let mut cache = ProcCache::new(100_000);
        assert!(cache.seed_from_proc(Path::new("/proc")) > 0);
        let me = std::process::id();
        let stat = parse_stat_full(&std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap()).unwrap();
        let start_ns = stat.start_ticks * cache.tick_ns + cache.tick_ns / 2;
        let mine = cache.observe(&exit(me, stat.ppid, start_ns));
        assert!(mine.exe.is_some() && !mine.cmdline.is_empty(), "{mine:?}");
        assert!(!mine.ancestors.is_empty(), "a test process has a parent");
        assert_eq!(cache.stats().hits, 1);
    }

    /// A procfs with one process, `pid`, started at tick 12345, whose cmdline is `cmdline`.
    fn fake_proc(name: &str, pid: u32, cmdline: &[u8]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("palisade-fake-proc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let stat = format!("{pid} (big) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 12345 0 0");
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::write(dir.join("cmdline"), cmdline).unwrap();
        root
    }

    /// Seeds one process of a fake procfs and returns what an event of it shows.
    fn seeded_details(name: &str, cmdline: &[u8]) -> Arc<ProcessDetails> {
        let root = fake_proc(name, 4242, cmdline);
        let mut cache = ProcCache::new(1_000);
        assert_eq!(cache.seed_from_proc(&root), 1);
        let _ = std::fs::remove_dir_all(&root);
        let start_ns = 12345 * cache.tick_ns + cache.tick_ns / 2;
        cache.observe(&exit(4242, 1, start_ns))
    }

    #[test]
    fn seeded_command_lines_are_cut_to_the_kernels_bounds_and_flagged() {
        // 100,000 arguments of 80 bytes (8 MiB; a stack rlimit raised for it allows that much):
        // before, all of it was read and kept in the cache entry.
        let huge: Vec<u8> = (0..100_000).flat_map(|_| [[b'x'; 80].as_slice(), b"\0"].concat()).collect();
        let details = seeded_details("huge", &huge);
        assert_eq!(details.cmdline.len(), ARGV_SLOTS, "{:?}", details.cmdline.len());
        assert!(details.cmdline.iter().all(|a| a.len() == ARG_LEN - 1));
        assert!(details.cmdline_truncated);
        // Many short arguments: cut at ARGV_SLOTS.
        let many: Vec<u8> = (0..40).flat_map(|i| format!("a{i}\0").into_bytes()).collect();
        let details = seeded_details("many", &many);
        assert_eq!((details.cmdline.len(), details.cmdline_truncated), (ARGV_SLOTS, true));
        assert_eq!(details.cmdline[15], "a15");
        // One long argument alone.
        let details = seeded_details("long", &[b"sh\0".as_slice(), &[b'y'; 5000]].concat());
        assert_eq!((details.cmdline.len(), details.cmdline[1].len(), details.cmdline_truncated), (2, ARG_LEN - 1, true));
        // A whole command line is kept as it is and not flagged.
        let details = seeded_details("whole", b"nginx\0-g\0daemon off;\0");
        assert_eq!((details.cmdline.clone(), details.cmdline_truncated), (vec!["nginx".to_string(), "-g".into(), "daemon off;".into()], false));
    }

    #[test]
    fn an_execs_cut_argv_is_flagged_and_inherited_by_forks() {
        let mut cache = ProcCache::new(64);
        let mut cut = exec(100, 1, 1_000, "/usr/bin/python3", &["python3", "-c", "pass"], "null");
        if let EventData::Exec(e) = &mut cut.data {
            e.argv_truncated = true;
        }
        assert!(cache.observe(&cut).cmdline_truncated);
        cache.observe(&fork(100, 1, 1_000, 101, 2_000));
        assert!(cache.observe(&exit(101, 100, 2_000)).cmdline_truncated, "the child shows its parent's cut argv");
        let whole = cache.observe(&exec(102, 1, 3_000, "/usr/bin/cat", &["cat", "/etc/hostname"], "null"));
        assert!(!whole.cmdline_truncated);
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget_and_counts_evictions() {
        let mut cache = ProcCache::with_byte_budget(16 * 1024);
        for pid in 1..=500u32 {
            cache.observe(&exec(pid, 1, u64::from(pid), "/usr/bin/python3", &["python3", "-c", "pass"], "null"));
        }
        let stats = cache.stats();
        assert!(stats.bytes <= stats.max_bytes, "{stats:?}");
        assert!(stats.evictions > 0 && stats.entries < 500, "{stats:?}");
        assert_eq!(stats.entries as u64 + stats.evictions, 500);
    }
}
