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
    MAX_POD_LOSS_ENTRIES, MAX_SENSITIVE_PREFIXES, CONNECT_PORTS_ON, MAX_CONNECT_PORTS, MAX_OPEN_FILTER_ENTRIES,
    OPEN_FILTER_ANY_PATH, OPEN_FILTER_HIDDEN, OPEN_FILTER_ON, OPEN_FILTER_SLOTS, OPEN_FILTER_SUFFIX_CLASSES, open_classes, PATH_LEN, PRIORITY_RINGBUF_BYTES, PathPrefix,
    PendingExec, PendingSyscall, PodBudget, PodLossKey, ProbeConfig, SENSITIVE_PREFIX_LEN,
    SOURCE_TRACEPOINT, FD_KIND_CLOSED, FD_KIND_FILE, FD_KIND_NULL, FD_KIND_OTHER, FD_KIND_PIPE,
    FD_KIND_SOCKET, FD_KIND_TTY, FD_KIND_UNKNOWN, PATH_BASE_DIR, PATH_CUT, PATH_RESOLVED,
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

/// Per-CPU scratch in which a path is built backwards from its last component (twice PATH_LEN,
/// so a write at any offset below PATH_LEN of at most PATH_LEN bytes stays inside it, which is
/// what the verifier checks).
#[map]
pub static PATH_SCRATCH: PerCpuArray<[u8; 2 * PATH_LEN]> = PerCpuArray::with_max_entries(1, 0);

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
    h.start_ns = unsafe { current_start_ns(cfg) };
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

/// When the current process (its thread-group leader) started, ns since boot; 0 without offsets.
#[inline(always)]
pub unsafe fn current_start_ns(cfg: &ProbeConfig) -> u64 {
    if cfg.path_offsets_valid == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(leader) = (unsafe { read_kernel_ptr(task, cfg.off_task_group_leader) }) else { return 0 };
    unsafe { bpf_probe_read_kernel(leader.add(cfg.off_task_start_boottime as usize) as *const u64) }.unwrap_or(0)
}

/// `x`, through memory the compiler cannot see into: it then keeps a mask applied to the
/// result, which the verifier needs to bound an index the compiler already knows is in range.
#[inline(always)]
fn opaque(x: u64) -> u64 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}

/// Components per mount and mounts one path walk climbs at most (a deeper path is cut,
/// keeping its tail).
const MAX_PATH_COMPONENTS: u32 = 40;
const MAX_PATH_MOUNTS: u32 = 8;
const PATH_MASK: u32 = PATH_LEN as u32 - 1;

/// The current process's root (fs->root): its dentry and its file system's superblock (null
/// pointers when unreadable).
#[inline(always)]
unsafe fn current_root(cfg: &ProbeConfig) -> (*const u8, *const u8) {
    let null = (core::ptr::null(), core::ptr::null());
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(fs) = (unsafe { read_kernel_ptr(task, cfg.off_task_fs) }) else { return null };
    if fs.is_null() {
        return null;
    }
    let root = unsafe { fs.add(cfg.off_fs_root as usize) };
    let dentry = unsafe { read_kernel_ptr(root, cfg.off_path_dentry) }.unwrap_or(core::ptr::null());
    let mnt = unsafe { read_kernel_ptr(root, cfg.off_path_mnt) }.unwrap_or(core::ptr::null());
    if mnt.is_null() {
        return null;
    }
    let sb = unsafe { read_kernel_ptr(mnt, cfg.off_vfsmount_mnt_sb) }.unwrap_or(core::ptr::null());
    (dentry, sb)
}

/// Writes the canonical path of `struct path *path` (kernel memory) into `out`: the dentry
/// chain up to the mount's root, then across each mount to its mountpoint in the parent mount,
/// until the root of the mount namespace's tree, like d_path() (which tracepoints cannot
/// call). The open walk (`resolve_path_within` with THROUGH_BINDS) differs in one way: inside
/// the file system of the process's root, it climbs
/// dentries up to that root without stopping at mount boundaries, so a bind mount of one of
/// its directories (`mount --bind /etc /mnt/x`) names the file by its own path (`/etc/shadow`,
/// not `/mnt/x/shadow`). Returns PATH_RESOLVED when the walk
/// reached the root, plus PATH_CUT when the path did not fit (its tail is kept); 0 when nothing
/// could be read (then `out` is empty).
#[inline(always)]
pub unsafe fn resolve_path(path: *const u8, out: *mut [u8; PATH_LEN], cfg: &ProbeConfig) -> u32 {
    unsafe { resolve_path_within::<MAX_PATH_MOUNTS, MAX_PATH_COMPONENTS, false>(path, out, cfg) }
}

/// `resolve_path` crossing at most `MOUNTS` mounts and climbing at most `COMPONENTS` dentries
/// per mount (the verifier walks every round, so its cost grows with both). With
/// `THROUGH_BINDS`, the walk in the root's own file system climbs to the root through bind
/// mounts (see `resolve_path`); that costs the verifier several times more per round, so the
/// exe walk (8 mounts of 40) goes without it and the open walk (4 of 24) with it.
#[inline(always)]
pub unsafe fn resolve_path_within<const MOUNTS: u32, const COMPONENTS: u32, const THROUGH_BINDS: bool>(path: *const u8, out: *mut [u8; PATH_LEN], cfg: &ProbeConfig) -> u32 {
    unsafe { (*out)[0] = 0 };
    if cfg.path_offsets_valid == 0 || path.is_null() {
        return 0;
    }
    let Some(scratch) = PATH_SCRATCH.get_ptr_mut(0) else { return 0 };
    let buf = scratch as *mut u8;
    let Some(mut dentry) = (unsafe { read_kernel_ptr(path, cfg.off_path_dentry) }) else { return 0 };
    let Some(mut vfsmnt) = (unsafe { read_kernel_ptr(path, cfg.off_path_mnt) }) else { return 0 };
    if dentry.is_null() || vfsmnt.is_null() {
        return 0;
    }
    let (root_dentry, root_sb) = if THROUGH_BINDS { unsafe { current_root(cfg) } } else { (core::ptr::null(), core::ptr::null()) };
    let mut mnt = unsafe { vfsmnt.sub(cfg.off_mount_mnt as usize) };
    // The path ends at PATH_LEN - 1 (its NUL); components are put in front of it. All the
    // arithmetic is u64 so the verifier sees each bound on the very register the helper gets.
    let mut off: u64 = PATH_MASK as u64;
    unsafe { *buf.add(PATH_MASK as usize) = 0 };
    let mut flags = 0u32;
    // Two nested loops, each with one way to go round: the inner one climbs dentries inside a
    // mount, the outer one crosses to the parent mount. (One loop doing either step per round
    // doubles the verifier's paths per round; this way the inner counter is dead when the
    // inner loop ends, so the verifier prunes the states it ends in.)
    let mut crossing = 0u32;
    'mounts: while crossing < MOUNTS {
        crossing += 1;
        let mnt_root = unsafe { read_kernel_ptr(vfsmnt, cfg.off_vfsmount_mnt_root) }.unwrap_or(core::ptr::null());
        // In the root's own file system the walk ends at the root, through any bind mount.
        // (Only `stop` lives on into the loop: every extra live value multiplies the states
        // the verifier has to walk through.)
        let stop = if THROUGH_BINDS {
            let sb = unsafe { read_kernel_ptr(vfsmnt, cfg.off_vfsmount_mnt_sb) }.unwrap_or(core::ptr::null());
            if !root_sb.is_null() && sb == root_sb && !root_dentry.is_null() { root_dentry } else { mnt_root }
        } else {
            mnt_root
        };
        let mut step = 0u32;
        while step < COMPONENTS {
            step += 1;
            if dentry == stop {
                break;
            }
            let parent = unsafe { read_kernel_ptr(dentry, cfg.off_dentry_d_parent) }.unwrap_or(core::ptr::null());
            if parent.is_null() || parent == dentry {
                // The root of a file system that is not the mount's root (a detached or
                // internal mount such as a memfd's): as far as a name goes.
                flags |= PATH_RESOLVED;
                break 'mounts;
            }
            let qstr = unsafe { dentry.add(cfg.off_dentry_d_name as usize) };
            let len = unsafe { read_kernel_u32(qstr, cfg.off_qstr_len) }.unwrap_or(0) as u64;
            let name = unsafe { read_kernel_ptr(qstr, cfg.off_qstr_name) }.unwrap_or(core::ptr::null());
            if len >= PATH_MASK as u64 || len + 1 > off {
                flags |= PATH_CUT;
                break 'mounts;
            }
            off -= len;
            let at = opaque(off) & PATH_MASK as u64;
            // SAFETY: at < PATH_LEN and len < PATH_LEN, inside the 2 * PATH_LEN scratch.
            unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_kernel(buf.add(at as usize).cast(), len as u32, name.cast())
            };
            off -= 1;
            unsafe { *buf.add((opaque(off) & PATH_MASK as u64) as usize) = b'/' };
            // A no-op (the check above keeps off in 0..PATH_LEN) that gives every round the
            // same range for off, so the verifier sees one state per round, not one per path.
            off &= PATH_MASK as u64;
            dentry = parent;
        }
        if dentry != stop {
            flags |= PATH_CUT;
            break;
        }
        if THROUGH_BINDS && dentry == root_dentry {
            flags |= PATH_RESOLVED;
            break;
        }
        let parent = unsafe { read_kernel_ptr(mnt, cfg.off_mount_mnt_parent) }.unwrap_or(core::ptr::null());
        if parent.is_null() || parent == mnt {
            flags |= PATH_RESOLVED;
            break;
        }
        dentry = unsafe { read_kernel_ptr(mnt, cfg.off_mount_mnt_mountpoint) }.unwrap_or(core::ptr::null());
        mnt = parent;
        vfsmnt = unsafe { mnt.add(cfg.off_mount_mnt as usize) };
        if dentry.is_null() {
            break;
        }
    }
    if flags & PATH_RESOLVED == 0 && flags & PATH_CUT == 0 {
        // Out of mounts.
        flags |= PATH_CUT;
    }
    if off == PATH_MASK as u64 {
        // The root itself.
        off -= 1;
        unsafe { *buf.add((opaque(off) & PATH_MASK as u64) as usize) = b'/' };
    }
    let off = opaque(off) & PATH_MASK as u64;
    let n: u64 = PATH_LEN as u64 - off;
    if n > PATH_LEN as u64 {
        return 0;
    }
    // SAFETY: n <= PATH_LEN bytes into the PATH_LEN-byte `out`; the source is the scratch.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            out.cast(),
            n as u32,
            buf.add(off as usize).cast(),
        )
    };
    flags
}

/// The `struct file *` at descriptor `fd` of the current task (None: no file, or unreadable).
#[inline(always)]
pub unsafe fn current_fd_file(fd: i64, cfg: &ProbeConfig) -> Option<*const u8> {
    if cfg.path_offsets_valid == 0 || !(0..1 << 20).contains(&fd) {
        return None;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files = unsafe { read_kernel_ptr(task, cfg.off_task_files) }?;
    if files.is_null() {
        return None;
    }
    let fdt = unsafe { read_kernel_ptr(files, cfg.off_files_fdt) }?;
    if fdt.is_null() {
        return None;
    }
    let max = unsafe { read_kernel_u32(fdt, cfg.off_fdtable_max_fds) }.unwrap_or(0);
    if fd as u32 >= max {
        return None;
    }
    let array = unsafe { read_kernel_ptr(fdt, cfg.off_fdtable_fd) }?;
    let file = unsafe { read_kernel_ptr(array, fd as u32 * 8) }?;
    if file.is_null() { None } else { Some(file) }
}

const AT_FDCWD: i32 = -100;

/// The walk's bounds for opens (smaller than for exe paths: the open program's routing after
/// the walk must fit the verifier's budget too). A deeper path is cut, so not resolved.
const OPEN_PATH_MOUNTS: u32 = 4;
const OPEN_PATH_COMPONENTS: u32 = 24;

/// What an open resolved, into `out`, with its PATH_* flags into `out_flags` (0 when
/// nothing): the opened file's path when it succeeded (`ret` is the new fd), else, for a
/// relative argument, the directory it was resolved against (the working directory or
/// `dirfd`, with PATH_BASE_DIR).
///
/// The flags go to memory, not back in a register: the caller reads them from the record, so
/// the verifier, which does not track map memory, goes on from the walk's many end states as
/// from one (a returned value keeps them apart, and the routing after it then runs out of the
/// verifier's budget).
#[inline(always)]
pub unsafe fn resolve_open(ret: i64, dirfd: i32, relative: bool, out: *mut [u8; PATH_LEN], out_flags: *mut u32, cfg: &ProbeConfig) {
    unsafe { *out_flags = 0 };
    let target: *const u8 = if ret >= 0 {
        match unsafe { current_fd_file(ret, cfg) } {
            Some(file) => unsafe { file.add(cfg.off_file_f_path as usize) },
            None => core::ptr::null(),
        }
    } else if relative && dirfd == AT_FDCWD {
        let task = unsafe { bpf_get_current_task() } as *const u8;
        match unsafe { read_kernel_ptr(task, cfg.off_task_fs) } {
            Some(fs) if !fs.is_null() => unsafe { fs.add(cfg.off_fs_pwd as usize) },
            _ => core::ptr::null(),
        }
    } else if relative {
        match unsafe { current_fd_file(dirfd as i64, cfg) } {
            Some(file) => unsafe { file.add(cfg.off_file_f_path as usize) },
            None => core::ptr::null(),
        }
    } else {
        core::ptr::null()
    };
    if target.is_null() {
        unsafe { (*out)[0] = 0 };
        return;
    }
    let flags = unsafe { resolve_path_within::<OPEN_PATH_MOUNTS, OPEN_PATH_COMPONENTS, true>(target, out, cfg) };
    unsafe { core::ptr::write_volatile(out_flags, flags) };
}

/// Marks `out_flags` (written by `resolve_open` for a failed open) as a base directory.
#[inline(always)]
pub unsafe fn mark_base_dir(out_flags: *mut u32) {
    let flags = unsafe { core::ptr::read_volatile(out_flags) };
    if flags != 0 {
        unsafe { core::ptr::write_volatile(out_flags, flags | PATH_BASE_DIR) };
    }
}

/// The executable path of the current task (task->mm->exe_file), into `out`; PATH_* flags.
#[inline(always)]
pub unsafe fn current_exe(out: *mut [u8; PATH_LEN], cfg: &ProbeConfig) -> u32 {
    unsafe { (*out)[0] = 0 };
    if cfg.path_offsets_valid == 0 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(mm) = (unsafe { read_kernel_ptr(task, cfg.off_task_mm) }) else { return 0 };
    if mm.is_null() {
        return 0;
    }
    let Some(file) = (unsafe { read_kernel_ptr(mm, cfg.off_mm_exe_file) }) else { return 0 };
    if file.is_null() {
        return 0;
    }
    unsafe { resolve_path(file.add(cfg.off_file_f_path as usize), out, cfg) }
}

const S_IFMT: u32 = 0o170000;
const S_IFSOCK: u32 = 0o140000;
const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

/// FD_KIND_* of descriptor `fd` of the current task, from its file table.
#[inline(always)]
pub unsafe fn current_fd_kind(fd: i64, cfg: &ProbeConfig) -> u32 {
    if cfg.path_offsets_valid == 0 || !(0..1024).contains(&fd) {
        return FD_KIND_UNKNOWN;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Some(files) = (unsafe { read_kernel_ptr(task, cfg.off_task_files) }) else { return FD_KIND_UNKNOWN };
    if files.is_null() {
        return FD_KIND_UNKNOWN;
    }
    let Some(fdt) = (unsafe { read_kernel_ptr(files, cfg.off_files_fdt) }) else { return FD_KIND_UNKNOWN };
    if fdt.is_null() {
        return FD_KIND_UNKNOWN;
    }
    let max = unsafe { read_kernel_u32(fdt, cfg.off_fdtable_max_fds) }.unwrap_or(0);
    if fd as u32 >= max {
        return FD_KIND_CLOSED;
    }
    let Some(array) = (unsafe { read_kernel_ptr(fdt, cfg.off_fdtable_fd) }) else { return FD_KIND_UNKNOWN };
    let Some(file) = (unsafe { read_kernel_ptr(array, fd as u32 * 8) }) else { return FD_KIND_UNKNOWN };
    if file.is_null() {
        return FD_KIND_CLOSED;
    }
    let Some(inode) = (unsafe { read_kernel_ptr(file, cfg.off_file_f_inode) }) else { return FD_KIND_UNKNOWN };
    if inode.is_null() {
        return FD_KIND_OTHER;
    }
    let mode = unsafe { bpf_probe_read_kernel(inode.add(cfg.off_inode_i_mode as usize) as *const u16) }.unwrap_or(0) as u32;
    match mode & S_IFMT {
        S_IFSOCK => FD_KIND_SOCKET,
        S_IFIFO => FD_KIND_PIPE,
        S_IFREG | S_IFDIR => FD_KIND_FILE,
        S_IFCHR => {
            let rdev = unsafe { read_kernel_u32(inode, cfg.off_inode_i_rdev) }.unwrap_or(0);
            // The kernel's dev_t: major in the top 12 bits, minor in the low 20.
            let (major, minor) = (rdev >> 20, rdev & 0xfffff);
            if major == 1 && minor == 3 {
                FD_KIND_NULL
            } else if major == 4 || major == 5 || (136..=143).contains(&major) {
                FD_KIND_TTY
            } else {
                FD_KIND_OTHER
            }
        }
        _ => FD_KIND_OTHER,
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

/// bpf_ringbuf_submit/output flags, and bpf_ringbuf_query's "bytes not yet consumed".
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// The wake-up a record of `size` bytes, just reserved on the bulk ring, takes. Per event
/// (`bulk_wakeup_bytes` 0): the kernel's default, a wake-up whenever the reader had caught up,
/// which for a reader that keeps up is nearly every event (an irq_work and a task wake-up,
/// charged to the process that made the syscall). Batched: an event of a protected kind (or a
/// sensitive open) wakes the reader at once (forced: records waiting without a wake-up before
/// it would hold the default one back); any other only when it is the record that takes the
/// unread bytes past `bulk_wakeup_bytes` -- once per batch, not for every record after it (a
/// lagging reader gets no wake-up per record either way) -- the reader also reads the ring
/// every few milliseconds (`events::reader::BULK_POLL`). The priority ring keeps the default:
/// only protected events enter it.
#[inline(always)]
fn bulk_wakeup(cfg: &ProbeConfig, protected: bool, size: u64) -> u64 {
    if cfg.bulk_wakeup_bytes == 0 {
        return 0;
    }
    if protected {
        return BPF_RB_FORCE_WAKEUP;
    }
    // Unread bytes, this record's included (the producer position moves at reserve).
    let unread = EVENTS.query(BPF_RB_AVAIL_DATA);
    let threshold = u64::from(cfg.bulk_wakeup_bytes);
    if unread >= threshold && unread < threshold + size + 8 { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }
}

/// A reserved record and the wake-up its submission takes.
pub struct Routed<T: 'static> {
    entry: RingBufEntry<T>,
    wakeup: u64,
}

impl<T: 'static> Routed<T> {
    #[inline(always)]
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.entry.as_mut_ptr()
    }

    #[inline(always)]
    pub fn submit(self) {
        self.entry.submit(self.wakeup);
    }
}

/// Reserves a record of `T` on the routed ring (the priority ring falling back to the bulk
/// one when full), counting the loss per kind and per pod when nothing has room.
#[inline(always)]
pub fn reserve_routed<T: 'static>(cfg: &ProbeConfig, cgroup_id: u64, kind: u32, protected: bool) -> Option<Routed<T>> {
    let route = route(cfg, cgroup_id, kind, protected)?;
    if route == Route::Priority {
        if let Some(entry) = EVENTS_PRIORITY.reserve::<T>(0) {
            return Some(Routed { entry, wakeup: 0 });
        }
        count_pod(cgroup_id, kind, LOSS_DEMOTED);
    }
    match EVENTS.reserve::<T>(0) {
        Some(entry) => Some(Routed { entry, wakeup: bulk_wakeup(cfg, protected, core::mem::size_of::<T>() as u64) }),
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
    // output() reserves and commits in one: the unread bytes are read before it, so the record
    // that crosses the threshold is the one with [threshold - size, threshold) unread before.
    let unread = if cfg.bulk_wakeup_bytes != 0 && !protected { EVENTS.query(BPF_RB_AVAIL_DATA) } else { 0 };
    let size = core::mem::size_of::<T>() as u64;
    let threshold = u64::from(cfg.bulk_wakeup_bytes);
    let wakeup = match (cfg.bulk_wakeup_bytes, protected) {
        (0, _) => 0,
        (_, true) => BPF_RB_FORCE_WAKEUP,
        _ if unread + size + 8 >= threshold && unread < threshold => BPF_RB_FORCE_WAKEUP,
        _ => BPF_RB_NO_WAKEUP,
    };
    if EVENTS.output::<T>(record, wakeup).is_ok() {
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

/// The pack's connect prefilter (ports its connect rules can match; `CONNECT_PORTS_ON` while on).
#[map]
pub static CONNECT_PORTS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_CONNECT_PORTS + 1, 0);

/// True when the pack's prefilter says no rule can match this connect: an inet/inet6 connect
/// to a port none of its connect rules names. Other families always pass.
#[inline(always)]
pub fn connect_is_quiet(family: u16, port: u16) -> bool {
    const AF_INET: u16 = 2;
    const AF_INET6: u16 = 10;
    if family != AF_INET && family != AF_INET6 {
        return false;
    }
    // SAFETY: map lookups return pointers valid for this program run; only presence is read.
    unsafe { CONNECT_PORTS.get(&CONNECT_PORTS_ON).is_some() && CONNECT_PORTS.get(&(port as u32)).is_none() }
}

/// open(2) flags that make an open a write (what the rules' `write`, `create`, `truncate` say).
const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

/// The open prefilter derived from the pack's open rules (`OPEN_FILTER_*` slots; see
/// `RulePack::open_filter`): while on, an open no rule's prefilter can admit stays in the kernel.
#[map]
pub static OPEN_FILTER: Array<u32> = Array::with_max_entries(OPEN_FILTER_SLOTS, 0);

/// Path prefixes (first SENSITIVE_PREFIX_LEN bytes) -> the flag classes an open below them
/// that some rule admits has (each entry holds its shorter prefixes' classes too: LPM finds one).
#[map]
pub static OPEN_FILTER_PREFIXES: LpmTrie<PathPrefix, u32> = LpmTrie::with_max_entries(MAX_OPEN_FILTER_ENTRIES, 0);

/// The same for path suffixes, stored reversed (last byte first), on a path's last
/// SENSITIVE_PREFIX_LEN bytes.
#[map]
pub static OPEN_FILTER_SUFFIXES: LpmTrie<PathPrefix, u32> = LpmTrie::with_max_entries(MAX_OPEN_FILTER_ENTRIES, 0);

#[inline(always)]
fn open_filter_slot(slot: u32) -> u32 {
    OPEN_FILTER.get(slot).copied().unwrap_or(0)
}

/// True when the pack's prefilter says no rule can match this open of `path`, which the caller
/// has found not sensitive (so absolute and, within the bytes the kernel scans, canonical).
/// With the derived filter on: no rule's open prefilter admits it (`RulePack::open_filter`,
/// mirrored by `OpenPrefilter::keeps_in_kernel`); off: read-only and below a declared quiet
/// prefix.
#[inline(always)]
pub fn open_is_quiet(path: &[u8; PATH_LEN], flags: u32) -> bool {
    if open_filter_slot(OPEN_FILTER_ON) == 0 {
        if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0 {
            return false;
        }
        let Some(key) = prefix_key(path) else { return false };
        return QUIET_OPEN_PREFIXES.get(key).is_some();
    }
    let classes = open_classes(flags);
    if open_filter_slot(OPEN_FILTER_ANY_PATH) & classes != 0 {
        return false;
    }
    let Some(key) = prefix_key(path) else { return false };
    if let Some(admitted) = OPEN_FILTER_PREFIXES.get(&*key) {
        if *admitted & classes != 0 {
            return false;
        }
    }
    let hidden_classes = open_filter_slot(OPEN_FILTER_HIDDEN);
    let suffix_classes = open_filter_slot(OPEN_FILTER_SUFFIX_CLASSES);
    if (hidden_classes | suffix_classes) & classes == 0 {
        return true;
    }
    // The path's length (PATH_LEN - 1 when no end is seen), and whether it has a hidden
    // component (`/.`).
    let mut hidden = 0u8;
    let mut i = 0usize;
    while i < PATH_LEN - 1 {
        let c = path[i];
        if c == 0 {
            break;
        }
        if c == b'/' && path[i + 1] == b'.' {
            hidden = 1;
        }
        i += 1;
    }
    // Parked in the scratch key and read back: the verifier then goes on with one unknown
    // length instead of a constant per iteration the loop can end at (each of which it would
    // otherwise walk the rest of this function with).
    // SAFETY: the key is this program run's per-CPU scratch (see prefix_key).
    unsafe {
        core::ptr::write_volatile(&mut key.data.bytes[0], i as u8);
        core::ptr::write_volatile(&mut key.data.bytes[1], hidden as u8);
    }
    let (len, hidden) = unsafe { (core::ptr::read_volatile(&key.data.bytes[0]), core::ptr::read_volatile(&key.data.bytes[1])) };
    if hidden > 1 {
        return false;
    }
    let (len, hidden) = (len as usize, hidden != 0);
    // Cut (no end seen) or ending in `/`: what it names is not in its text; let it out.
    if len >= PATH_LEN - 1 || len < 1 || path[(len - 1) & (PATH_LEN - 1)] == b'/' {
        return false;
    }
    if hidden && hidden_classes & classes != 0 {
        return false;
    }
    if suffix_classes & classes == 0 {
        return true;
    }
    // The last bytes, reversed, in the scratch key the prefix lookup is done with.
    let tail = if len < SENSITIVE_PREFIX_LEN { len } else { SENSITIVE_PREFIX_LEN };
    key.prefix_len = (tail * 8) as u32;
    let mut j = 0usize;
    while j < SENSITIVE_PREFIX_LEN {
        if j >= tail {
            break;
        }
        key.data.bytes[j] = path[(len - 1 - j) & (PATH_LEN - 1)];
        j += 1;
    }
    match OPEN_FILTER_SUFFIXES.get(&*key) {
        Some(admitted) => *admitted & classes == 0,
        None => true,
    }
}

/// The LPM key for the first SENSITIVE_PREFIX_LEN bytes of `path`, built in the per-CPU
/// scratch slot (too large for the stack); None only if the slot is missing.
#[inline(always)]
fn prefix_key(path: &[u8; PATH_LEN]) -> Option<&'static mut LpmKey<PathPrefix>> {
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

/// True when a canonical path (what the kernel resolved) starts with a sensitive prefix.
#[inline(always)]
pub fn resolved_path_is_sensitive(path: &[u8; PATH_LEN]) -> bool {
    match prefix_key(path) {
        Some(key) => SENSITIVE_PREFIXES.get(key).is_some(),
        // No scratch slot: cannot judge, so protected.
        None => true,
    }
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
