//! Maps and helpers every probe uses: the in-kernel filters (monitored cgroups, enabled kinds),
//! the two ring buffers with their per-kind and per-pod emitted/lost counters, the per-pod
//! budgets that decide which ring an event takes, and the common header.
//!
//! Two rings so that a flood cannot hide an attack: protected kinds (exec, credentials, ptrace,
//! modules, bpf, mounts, namespaces, memfd, dup onto stdio, opens of sensitive paths) go to
//! EVENTS_PRIORITY, which high-volume kinds never enter; each pod may use its share of it
//! (a token bucket per pod cgroup), past which its protected events go to the bulk ring. In the
//! bulk ring, each pod's high-volume kinds are held to a budget of their own: a pod over it
//! loses its own events, counted per pod and kind in POD_LOSSES, never another pod's.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_task,
            bpf_ktime_get_ns,
        },
    },
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf,
        lpm_trie::Key as LpmKey, ring_buf::RingBufEntry,
    },
};
use palisade_common::{
    EVENTS_RINGBUF_BYTES, EventHeader, FLAG_NO_TASK_OFFSETS, KIND_BPF, KIND_CHMOD, KIND_CONNECT,
    KIND_COUNT, KIND_CRED, KIND_EXEC, KIND_MEMFD, KIND_MODULE, KIND_MOUNT, KIND_NAMESPACE,
    KIND_OPEN, KIND_PTRACE, KIND_RENAME, KIND_UNLINK, LOSS_BUDGET, LOSS_DEMOTED, LOSS_PROTECTED, LOSS_RING_FULL,
    MAX_CGROUP_ANCESTOR_LEVELS, MAX_MONITORED_CGROUPS, MAX_PENDING_SYSCALLS,
    MAX_POD_LOSS_ENTRIES, MAX_SENSITIVE_PREFIXES, PATH_LEN, PRIORITY_RINGBUF_BYTES, PathPrefix,
    PendingExec, PendingSyscall, PodBudget, PodLossKey, ProbeConfig, SENSITIVE_PREFIX_LEN,
    SOURCE_TRACEPOINT,
};

/// The bulk ring: every kind, high-volume ones under each pod's budget.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RINGBUF_BYTES, 0);

/// The priority ring: protected kinds only, each pod within its share.
#[map]
pub static EVENTS_PRIORITY: RingBuf = RingBuf::with_byte_size(PRIORITY_RINGBUF_BYTES, 0);

/// Path prefixes whose opens are protected events (LPM on the path's bytes).
#[map]
pub static SENSITIVE_PREFIXES: LpmTrie<PathPrefix, u32> = LpmTrie::with_max_entries(MAX_SENSITIVE_PREFIXES, 0);

/// The kernel prefilter of the loaded rule pack: read-only opens of absolute, canonical paths
/// below these prefixes can match no rule and never leave the kernel (empty: no prefilter).
#[map]
pub static QUIET_OPEN_PREFIXES: LpmTrie<PathPrefix, u32> = LpmTrie::with_max_entries(MAX_SENSITIVE_PREFIXES, 0);

/// Events the prefilter kept in the kernel, per kind.
#[map]
pub static PREFILTERED_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KIND_COUNT, 0);

/// Per pod cgroup, kind and reason: events that did not reach user space the normal way.
#[map]
pub static POD_LOSSES: LruPerCpuHashMap<PodLossKey, u64> = LruPerCpuHashMap::with_max_entries(MAX_POD_LOSS_ENTRIES, 0);

/// Per pod cgroup: the token buckets of its priority share and of its high-volume budget.
#[map]
pub static POD_BUDGETS: LruHashMap<u64, PodBudget> = LruHashMap::with_max_entries(MAX_MONITORED_CGROUPS, 0);

/// Per-CPU scratch for an open's LPM lookup key.
#[map]
pub static PREFIX_SCRATCH: PerCpuArray<LpmKey<PathPrefix>> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static PROBE_CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);

/// Index: event kind; value 1 = emit. Kinds nobody subscribes to stay 0 and cost one lookup.
#[map]
pub static ENABLED_KINDS: Array<u32> = Array::with_max_entries(KIND_COUNT, 0);

/// cgroup id (v2) of each monitored endpoint -> endpoint slot (opaque to the kernel side).
#[map]
pub static MONITORED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_MONITORED_CGROUPS, 0);

/// Records submitted, per kind.
#[map]
pub static EVENT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KIND_COUNT, 0);

/// Ring-buffer reserve failures, per kind: every loss is counted.
#[map]
pub static LOST_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KIND_COUNT, 0);

/// Syscalls seen at enter, keyed by thread id, waiting for their exit.
#[map]
pub static PENDING_SYSCALLS: LruHashMap<u32, PendingSyscall> =
    LruHashMap::with_max_entries(MAX_PENDING_SYSCALLS, 0);

/// execve argv captured at enter, keyed by thread id, consumed by sched_process_exec.
#[map]
pub static PENDING_EXECS: LruHashMap<u32, PendingExec> =
    LruHashMap::with_max_entries(MAX_PENDING_SYSCALLS, 0);

/// Per-CPU scratch for building a PendingExec (too big for the 512-byte stack).
#[map]
pub static EXEC_SCRATCH: PerCpuArray<PendingExec> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn config() -> Option<&'static ProbeConfig> {
    PROBE_CONFIG.get(0)
}

#[inline(always)]
pub fn kind_enabled(kind: u32) -> bool {
    matches!(ENABLED_KINDS.get(kind), Some(v) if *v != 0)
}

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
pub fn current_tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// The monitored cgroup the current task belongs to (its own or an ancestor), or its own cgroup
/// in host mode; None when the task is not watched (or is the daemon itself).
#[inline(always)]
pub fn watched_cgroup(cfg: &ProbeConfig) -> Option<u64> {
    if current_tgid() == cfg.daemon_tgid {
        return None;
    }
    let own = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { MONITORED_CGROUPS.get(&own) }.is_some() {
        return Some(own);
    }
    let mut level: i32 = 1;
    while level <= MAX_CGROUP_ANCESTOR_LEVELS as i32 {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            break;
        }
        if unsafe { MONITORED_CGROUPS.get(&ancestor) }.is_some() {
            return Some(ancestor);
        }
        level += 1;
    }
    if cfg.monitor_all != 0 { Some(own) } else { None }
}

/// The filter every probe applies first: is this kind on, and is this task watched?
#[inline(always)]
pub fn should_report(kind: u32) -> Option<(u64, &'static ProbeConfig)> {
    let cfg = config()?;
    if !kind_enabled(kind) {
        return None;
    }
    let cgroup_id = watched_cgroup(cfg)?;
    Some((cgroup_id, cfg))
}

#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, kind: u32) {
    if let Some(slot) = map.get_ptr_mut(kind) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_lost(kind: u32) {
    count(&LOST_COUNTS, kind);
}

#[inline(always)]
pub fn count_emitted(kind: u32) {
    count(&EVENT_COUNTS, kind);
}

#[inline(always)]
unsafe fn read_kernel_u32(base: *const u8, offset: u32) -> Option<u32> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const u32).ok() }
}

#[inline(always)]
unsafe fn read_kernel_ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const *const u8).ok() }
}

/// The current task's (uid, gid, euid, egid); euid/egid are 0 without BTF offsets.
#[inline(always)]
pub fn current_ids(cfg: &ProbeConfig) -> [u32; 4] {
    let uid_gid = bpf_get_current_uid_gid();
    let mut ids = [uid_gid as u32, (uid_gid >> 32) as u32, 0, 0];
    if cfg.task_offsets_valid != 0 {
        let task = unsafe { bpf_get_current_task() } as *const u8;
        if let Some(cred) = unsafe { read_kernel_ptr(task, cfg.off_task_cred) } {
            ids[2] = unsafe { read_kernel_u32(cred, cfg.off_cred_euid) }.unwrap_or(0);
            ids[3] = unsafe { read_kernel_u32(cred, cfg.off_cred_egid) }.unwrap_or(0);
        }
    }
    ids
}

/// Fills the common header. `header` points into a reserved ring-buffer record.
#[inline(always)]
pub unsafe fn fill_header(header: *mut EventHeader, kind: u32, cgroup_id: u64, cfg: &ProbeConfig) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let h = unsafe { &mut *header };
    h.ktime_ns = unsafe { bpf_ktime_get_ns() };
    h.cgroup_id = cgroup_id;
    h.kind = kind;
    h.source = SOURCE_TRACEPOINT;
    h.pid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.uid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    h.ppid = 0;
    h.euid = 0;
    h.egid = 0;
    h.flags = 0;
    h.comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    if cfg.task_offsets_valid == 0 {
        h.flags |= FLAG_NO_TASK_OFFSETS;
        return;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    if let Some(parent) = unsafe { read_kernel_ptr(task, cfg.off_task_real_parent) } {
        h.ppid = unsafe { read_kernel_u32(parent, cfg.off_task_tgid) }.unwrap_or(0);
    }
    if let Some(cred) = unsafe { read_kernel_ptr(task, cfg.off_task_cred) } {
        h.euid = unsafe { read_kernel_u32(cred, cfg.off_cred_euid) }.unwrap_or(0);
        h.egid = unsafe { read_kernel_u32(cred, cfg.off_cred_egid) }.unwrap_or(0);
    }
}

/// task->exit_code of the current task (0 when offsets are unknown).
#[inline(always)]
pub unsafe fn current_exit_code(cfg: &ProbeConfig) -> i32 {
    if cfg.task_offsets_valid == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    unsafe { read_kernel_u32(task, cfg.off_task_exit_code) }.unwrap_or(0) as i32
}

/// Reads credential fields from a `struct cred *` (for the commit_creds kprobe).
#[inline(always)]
pub unsafe fn read_cred(cred: *const u8, cfg: &ProbeConfig) -> [u32; 4] {
    unsafe {
        [
            read_kernel_u32(cred, cfg.off_cred_uid).unwrap_or(u32::MAX),
            read_kernel_u32(cred, cfg.off_cred_euid).unwrap_or(u32::MAX),
            read_kernel_u32(cred, cfg.off_cred_gid).unwrap_or(u32::MAX),
            read_kernel_u32(cred, cfg.off_cred_egid).unwrap_or(u32::MAX),
        ]
    }
}

/// Counts one event of `kind` of the pod `cgroup_id` under `reason` (LOSS_*).
#[inline(always)]
pub fn count_pod(cgroup_id: u64, kind: u32, reason: u32) {
    let key = PodLossKey { cgroup_id, kind, reason };
    match POD_LOSSES.get_ptr_mut(&key) {
        Some(slot) => unsafe { *slot += 1 },
        None => {
            let _ = POD_LOSSES.insert(&key, &1u64, 0);
        }
    }
}

#[inline(always)]
fn protected_bit(protected: bool) -> u32 {
    if protected { LOSS_PROTECTED } else { 0 }
}

/// Kinds that go to the priority ring (open only when its path is sensitive, dup only onto
/// stdio: the callers decide those two).
#[inline(always)]
pub fn kind_is_protected(kind: u32) -> bool {
    matches!(
        kind,
        KIND_EXEC | KIND_CRED | KIND_PTRACE | KIND_MODULE | KIND_BPF | KIND_MOUNT | KIND_NAMESPACE | KIND_MEMFD
    )
}

/// Kinds a process can produce as fast as it can make a syscall: held to each pod's budget.
#[inline(always)]
fn kind_is_high_volume(kind: u32) -> bool {
    matches!(kind, KIND_OPEN | KIND_CONNECT | KIND_CHMOD | KIND_UNLINK | KIND_RENAME) || kind == palisade_common::KIND_DUP
}

/// Takes one event's cost from a bucket; false when the credit does not cover it.
#[inline(always)]
fn take_credit(credit: &mut u64, last: &mut u64, now: u64, cost: u64, burst: u64) -> bool {
    if cost == 0 {
        return true;
    }
    let refill = now.saturating_sub(*last);
    *last = now;
    let mut c = credit.saturating_add(refill);
    if c > burst {
        c = burst;
    }
    if c >= cost {
        *credit = c - cost;
        true
    } else {
        *credit = c;
        false
    }
}

/// Which ring an event takes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Priority,
    Bulk,
}

/// Decides the ring for one event of `kind` from pod `cgroup_id`, applying the pod's budgets;
/// None when the pod is over its high-volume budget (the drop is counted here).
#[inline(always)]
pub fn route(cfg: &ProbeConfig, cgroup_id: u64, kind: u32, protected: bool) -> Option<Route> {
    if cfg.priority_routing == 0 {
        return Some(Route::Bulk);
    }
    let budgeted = kind_is_high_volume(kind);
    if !protected && !budgeted {
        return Some(Route::Bulk);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let budget = match POD_BUDGETS.get_ptr_mut(&cgroup_id) {
        Some(b) => b,
        None => {
            let fresh = PodBudget {
                priority_credit_ns: cfg.priority_burst_ns,
                priority_last_ns: now,
                bulk_credit_ns: cfg.bulk_burst_ns,
                bulk_last_ns: now,
            };
            let _ = POD_BUDGETS.insert(&cgroup_id, &fresh, 0);
            POD_BUDGETS.get_ptr_mut(&cgroup_id)?
        }
    };
    // Updates race between CPUs (no lock): a lost update only makes a bucket slightly off.
    let b = unsafe { &mut *budget };
    if protected {
        if take_credit(&mut b.priority_credit_ns, &mut b.priority_last_ns, now, cfg.priority_cost_ns, cfg.priority_burst_ns) {
            return Some(Route::Priority);
        }
        count_pod(cgroup_id, kind, LOSS_DEMOTED);
    }
    // High-volume kinds, and protected events past the pod's priority share, spend the pod's
    // bulk budget: a pod flooding anything loses its own events, not another pod's.
    if take_credit(&mut b.bulk_credit_ns, &mut b.bulk_last_ns, now, cfg.bulk_cost_ns, cfg.bulk_burst_ns) {
        return Some(Route::Bulk);
    }
    count_pod(cgroup_id, kind, LOSS_BUDGET | protected_bit(protected));
    count_lost(kind);
    None
}

/// Reserves a record of `T` on the routed ring (the priority ring falling back to the bulk
/// one when full), counting the loss per kind and per pod when nothing has room.
#[inline(always)]
pub fn reserve_routed<T: 'static>(cfg: &ProbeConfig, cgroup_id: u64, kind: u32, protected: bool) -> Option<RingBufEntry<T>> {
    let route = route(cfg, cgroup_id, kind, protected)?;
    if route == Route::Priority {
        if let Some(entry) = EVENTS_PRIORITY.reserve::<T>(0) {
            return Some(entry);
        }
        count_pod(cgroup_id, kind, LOSS_DEMOTED);
    }
    match EVENTS.reserve::<T>(0) {
        Some(entry) => Some(entry),
        None => {
            count_lost(kind);
            count_pod(cgroup_id, kind, LOSS_RING_FULL | protected_bit(protected));
            None
        }
    }
}

/// Copies a finished record into the routed ring (for records built in scratch space because
/// the route depends on their contents).
#[inline(always)]
pub fn output_routed<T>(cfg: &ProbeConfig, cgroup_id: u64, kind: u32, protected: bool, record: &T) -> bool {
    let Some(route) = route(cfg, cgroup_id, kind, protected) else { return false };
    if route == Route::Priority {
        if EVENTS_PRIORITY.output::<T>(record, 0).is_ok() {
            return true;
        }
        count_pod(cgroup_id, kind, LOSS_DEMOTED);
    }
    if EVENTS.output::<T>(record, 0).is_ok() {
        return true;
    }
    count_lost(kind);
    count_pod(cgroup_id, kind, LOSS_RING_FULL | protected_bit(protected));
    false
}

/// Reserves a record of `T` for an event of `kind` from pod `$cgroup` on the ring its route
/// says; returns from the caller when the event is dropped (counted).
#[macro_export]
macro_rules! reserve_or_count {
    ($ty:ty, $kind:expr, $cfg:expr, $cgroup:expr, $protected:expr) => {
        match $crate::common::reserve_routed::<$ty>($cfg, $cgroup, $kind, $protected) {
            Some(entry) => entry,
            None => return Ok(()),
        }
    };
}

/// open(2) flags that make an open a write (what the rules' `write`, `create`, `truncate` say).
const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

/// True when the pack's prefilter says no rule can match this open: read-only, not sensitive
/// (which also means absolute and canonical), below a quiet prefix.
#[inline(always)]
pub fn open_is_quiet(path: &[u8; PATH_LEN], flags: u32, sensitive: bool) -> bool {
    if sensitive || flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0 {
        return false;
    }
    let Some(key) = prefix_key(path) else { return false };
    QUIET_OPEN_PREFIXES.get(key).is_some()
}

/// The LPM key for the first SENSITIVE_PREFIX_LEN bytes of `path`, built in the per-CPU
/// scratch slot (too large for the stack); None only if the slot is missing.
#[inline(always)]
fn prefix_key(path: &[u8; PATH_LEN]) -> Option<&'static LpmKey<PathPrefix>> {
    let key = PREFIX_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the per-CPU slot is this program's alone while it runs (no preemption inside one
    // program run), and the pointer is valid for the map's lifetime.
    let key = unsafe { &mut *key };
    key.prefix_len = (SENSITIVE_PREFIX_LEN * 8) as u32;
    let mut i = 0usize;
    while i < SENSITIVE_PREFIX_LEN {
        key.data.bytes[i] = path[i];
        i += 1;
    }
    Some(key)
}

/// True when an open of `path` (as the process passed it, `len` bytes with the NUL) must take
/// the priority path: a sensitive prefix matches, or the kernel cannot tell what it names
/// (relative, or with `//`, `/./`, `/../` components the rules fold away).
#[inline(always)]
pub fn open_path_is_sensitive(path: &[u8; PATH_LEN], len: i64) -> bool {
    if len <= 1 {
        return false;
    }
    if path[0] != b'/' {
        return true;
    }
    if let Some(key) = prefix_key(path) {
        if SENSITIVE_PREFIXES.get(key).is_some() {
            return true;
        }
    }
    let end = if len as usize > PATH_LEN { PATH_LEN } else { len as usize };
    let mut i = 0usize;
    while i < PATH_LEN - 4 {
        if i + 1 >= end {
            break;
        }
        if path[i] == b'/' {
            let a = path[i + 1];
            if a == b'/' {
                return true;
            }
            if a == b'.' {
                let b = path[i + 2];
                if b == b'/' || b == 0 {
                    return true;
                }
                if b == b'.' {
                    let c = path[i + 3];
                    if c == b'/' || c == 0 {
                        return true;
                    }
                }
            }
        }
        i += 1;
    }
    false
}

/// Copies a NUL-terminated user string into `dst`; returns true when it was cut at the bound.
/// On failure the kernel leaves `dst` zeroed, which user space reads as an empty string.
#[inline(always)]
pub unsafe fn read_user_str<const N: usize>(dst: &mut [u8; N], src: u64) -> bool {
    unsafe { read_user_str_len(dst, src) == N as i64 }
}

/// Like `read_user_str`, returning the bytes copied with the NUL (<= 0 on failure).
#[inline(always)]
pub unsafe fn read_user_str_len<const N: usize>(dst: &mut [u8; N], src: u64) -> i64 {
    if src == 0 {
        dst[0] = 0;
        return 0;
    }
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user_str(
            dst.as_mut_ptr().cast(),
            N as u32,
            src as *const core::ffi::c_void,
        )
    }
}

/// Reads syscall argument `n` of a sys_enter_* tracepoint (args start at byte 16, 8 bytes each).
#[inline(always)]
pub fn syscall_arg(ctx: &aya_ebpf::programs::TracePointContext, n: usize) -> u64 {
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

/// The return value of a sys_exit_* tracepoint.
#[inline(always)]
pub fn syscall_ret(ctx: &aya_ebpf::programs::TracePointContext) -> i64 {
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0)
}
