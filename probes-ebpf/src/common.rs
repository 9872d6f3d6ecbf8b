//! Maps and helpers every probe uses: the in-kernel filters (monitored cgroups, enabled kinds),
//! the ring buffer with its per-kind emitted/lost counters, and the common header.

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
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use palisade_common::{
    EVENTS_RINGBUF_BYTES, EventHeader, FLAG_NO_TASK_OFFSETS, KIND_COUNT,
    MAX_CGROUP_ANCESTOR_LEVELS, MAX_MONITORED_CGROUPS, MAX_PENDING_SYSCALLS, PendingExec,
    PendingSyscall, ProbeConfig, SOURCE_TRACEPOINT,
};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RINGBUF_BYTES, 0);

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

/// Reserves a record of `T`, counting the loss when the ring buffer is full.
#[macro_export]
macro_rules! reserve_or_count {
    ($ty:ty, $kind:expr) => {
        match $crate::common::EVENTS.reserve::<$ty>(0) {
            Some(entry) => entry,
            None => {
                $crate::common::count_lost($kind);
                return Ok(());
            }
        }
    };
}

/// Copies a NUL-terminated user string into `dst`; returns true when it was cut at the bound.
/// On failure the kernel leaves `dst` zeroed, which user space reads as an empty string.
#[inline(always)]
pub unsafe fn read_user_str<const N: usize>(dst: &mut [u8; N], src: u64) -> bool {
    if src == 0 {
        dst[0] = 0;
        return false;
    }
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user_str(
            dst.as_mut_ptr().cast(),
            N as u32,
            src as *const core::ffi::c_void,
        )
    };
    ret == N as i64
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
