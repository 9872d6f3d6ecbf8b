//! Keys and values of the probe maps (configuration, filters, counters, in-flight syscalls).

use crate::{ARG_LEN, ARGV_SLOTS, assert_wire_size};

/// Map names, shared so that the loader and the programs cannot disagree.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_PROBE_CONFIG: &str = "PROBE_CONFIG";
pub const MAP_ENABLED_KINDS: &str = "ENABLED_KINDS";
pub const MAP_MONITORED_CGROUPS: &str = "MONITORED_CGROUPS";
pub const MAP_EVENT_COUNTS: &str = "EVENT_COUNTS";
pub const MAP_LOST_COUNTS: &str = "LOST_COUNTS";
pub const MAP_EVENTS_PRIORITY: &str = "EVENTS_PRIORITY";
pub const MAP_SENSITIVE_PREFIXES: &str = "SENSITIVE_PREFIXES";
pub const MAP_POD_LOSSES: &str = "POD_LOSSES";
pub const MAP_QUIET_OPEN_PREFIXES: &str = "QUIET_OPEN_PREFIXES";
pub const MAP_PREFILTERED_COUNTS: &str = "PREFILTERED_COUNTS";
pub const MAP_CONNECT_PORTS: &str = "CONNECT_PORTS";
/// The pack's connect prefilter: the inet/inet6 destination ports its connect rules can match
/// (keys 0..=65535), and `CONNECT_PORTS_ON`, present only while the prefilter is on.
pub const MAX_CONNECT_PORTS: u32 = 4096;
pub const CONNECT_PORTS_ON: u32 = 0x1_0000;
/// The open prefilter derived from the pack's open rules (`RulePack::open_filter`): a settings
/// array (`OPEN_FILTER_*` indices) and two LPM tries of flag-class masks (`OPEN_CLASS_*`), one on
/// path prefixes and one on reversed path suffixes. While `OPEN_FILTER_ON` is 0 the declared
/// `QUIET_OPEN_PREFIXES` list applies instead.
pub const MAP_OPEN_FILTER: &str = "OPEN_FILTER";
pub const MAP_OPEN_FILTER_PREFIXES: &str = "OPEN_FILTER_PREFIXES";
pub const MAP_OPEN_FILTER_SUFFIXES: &str = "OPEN_FILTER_SUFFIXES";
pub const MAX_OPEN_FILTER_ENTRIES: u32 = 1024;
/// OPEN_FILTER indices: 1 while the derived filter is on; the classes any path admits; the
/// classes a path with a hidden component (`/.`) admits; the classes some suffix admits.
pub const OPEN_FILTER_ON: u32 = 0;
pub const OPEN_FILTER_ANY_PATH: u32 = 1;
pub const OPEN_FILTER_HIDDEN: u32 = 2;
pub const OPEN_FILTER_SUFFIX_CLASSES: u32 = 3;
pub const OPEN_FILTER_SLOTS: u32 = 4;
/// Flag classes of an open (a mask): every open, writes (`open.write`: O_WRONLY, O_RDWR,
/// O_CREAT or O_TRUNC), creating (`open.create`), truncating (`open.truncate`).
pub const OPEN_CLASS_ANY: u32 = 1;
pub const OPEN_CLASS_WRITE: u32 = 2;
pub const OPEN_CLASS_CREATE: u32 = 4;
pub const OPEN_CLASS_TRUNCATE: u32 = 8;

/// The flag classes of an open with `flags` (`OPEN_CLASS_*`), as user space decodes them.
#[inline(always)]
pub const fn open_classes(flags: u32) -> u32 {
    const O_CREAT: u32 = 0o100;
    const O_TRUNC: u32 = 0o1000;
    let mut classes = OPEN_CLASS_ANY;
    if flags & 0o3 != 0 || flags & (O_CREAT | O_TRUNC) != 0 {
        classes |= OPEN_CLASS_WRITE;
    }
    if flags & O_CREAT != 0 {
        classes |= OPEN_CLASS_CREATE;
    }
    if flags & O_TRUNC != 0 {
        classes |= OPEN_CLASS_TRUNCATE;
    }
    classes
}

/// The bulk ring buffer. 4 MiB: ~14,000 opens of backlog, about what the pipeline's bulk queue
/// holds behind it (`daemon::pipeline::BULK_QUEUE_BYTES`); under the per-pod budgets no flood
/// measured here filled it (BENCHMARKS.md, "Under a flood"). Each MiB of ring is 2 MiB of the
/// daemon's RSS (the data area is mapped twice for wrap-around): 8 MiB cost 8 MB more at idle.
pub const EVENTS_RINGBUF_BYTES: u32 = 4 * 1024 * 1024;
/// Bytes waiting in the bulk ring past which an unprotected event wakes the reader (the
/// default of `ProbeConfig::bulk_wakeup_bytes`): about a hundred opens per wake-up.
pub const BULK_WAKEUP_BYTES: u32 = 64 * 1024;
/// The ring buffer of protected (rare, high-value) events: high-volume kinds never go there,
/// and each pod may use only its own share of it (see `ProbeConfig::priority_cost_ns`).
pub const PRIORITY_RINGBUF_BYTES: u32 = 2 * 1024 * 1024;
/// Bytes of an open's path compared against the sensitive prefixes (longer prefixes are cut
/// to this, which only makes the match wider).
pub const SENSITIVE_PREFIX_LEN: usize = 64;
pub const MAX_SENSITIVE_PREFIXES: u32 = 1024;
/// (pod cgroup, kind, reason) loss counters; LRU so a churn of cgroups cannot fill it.
pub const MAX_POD_LOSS_ENTRIES: u32 = 8192;
pub const MAX_MONITORED_CGROUPS: u32 = 16384;
pub const MAX_PENDING_SYSCALLS: u32 = 16384;
/// How many cgroup levels above the task's own are checked against MONITORED_CGROUPS
/// (a pod's containers live in child cgroups of the pod cgroup).
pub const MAX_CGROUP_ANCESTOR_LEVELS: u32 = 12;

/// Single-entry config array (index 0), written by the daemon before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// 1: report every task (host mode); 0: only tasks in MONITORED_CGROUPS.
    pub monitor_all: u32,
    /// The daemon's own tgid: never reported, so its procfs reads don't feed back.
    pub daemon_tgid: u32,
    /// 1 when the offsets below were resolved from the kernel's BTF.
    pub task_offsets_valid: u32,
    /// 1: route protected kinds to EVENTS_PRIORITY and apply the per-pod budgets; 0: every
    /// event goes to EVENTS (the behaviour before the priority path existed).
    pub priority_routing: u32,
    /// Byte offsets inside `struct task_struct` and `struct cred` (no CO-RE in aya-ebpf; user
    /// space resolves them from /sys/kernel/btf/vmlinux).
    pub off_task_real_parent: u32,
    pub off_task_tgid: u32,
    pub off_task_cred: u32,
    pub off_task_exit_code: u32,
    pub off_cred_uid: u32,
    pub off_cred_gid: u32,
    pub off_cred_euid: u32,
    pub off_cred_egid: u32,
    /// Per-pod token buckets, as nanoseconds of credit: an event costs `*_cost_ns`, credit grows
    /// by the elapsed time up to `*_burst_ns`. A cost of 0 turns that budget off.
    /// Share of the priority ring per pod; protected events past it go to the bulk ring.
    pub priority_cost_ns: u64,
    pub priority_burst_ns: u64,
    /// Budget of high-volume kinds per pod; past it the pod's own events are dropped (counted).
    pub bulk_cost_ns: u64,
    pub bulk_burst_ns: u64,
    /// 1 when the offsets below (process start time, exe path and file-table walks) were
    /// resolved from the kernel's BTF; 0: start_ns is 0, exe and fd kinds are unknown.
    pub path_offsets_valid: u32,
    pub off_task_group_leader: u32,
    pub off_task_start_boottime: u32,
    pub off_task_mm: u32,
    pub off_task_files: u32,
    pub off_mm_exe_file: u32,
    pub off_file_f_path: u32,
    pub off_file_f_inode: u32,
    pub off_path_mnt: u32,
    pub off_path_dentry: u32,
    pub off_dentry_d_parent: u32,
    pub off_dentry_d_name: u32,
    pub off_qstr_len: u32,
    pub off_qstr_name: u32,
    pub off_vfsmount_mnt_root: u32,
    /// container_of(vfsmount, struct mount, mnt): the mount a vfsmount is embedded in.
    pub off_mount_mnt: u32,
    pub off_mount_mnt_parent: u32,
    pub off_mount_mnt_mountpoint: u32,
    pub off_files_fdt: u32,
    pub off_fdtable_max_fds: u32,
    pub off_fdtable_fd: u32,
    pub off_inode_i_mode: u32,
    pub off_inode_i_rdev: u32,
    /// task->fs (struct fs_struct *), fs_struct.root and .pwd (struct path): the process's root
    /// and working directory, for canonical paths of opens (relative arguments, bind mounts).
    pub off_task_fs: u32,
    pub off_fs_root: u32,
    pub off_fs_pwd: u32,
    /// vfsmount.mnt_sb: two mounts of one file system (a bind mount and the root) share it.
    pub off_vfsmount_mnt_sb: u32,
    /// task_struct.thread_info.status (x86: TS_COMPAT marks a syscall made through the 32-bit
    /// entry, whose number the raw sys_enter dispatcher must not read as a 64-bit one); 0 when
    /// BTF does not say.
    pub off_task_thread_status: u32,
    /// Bulk-ring wake-ups: 0 wakes the reader per event (the kernel's default); otherwise
    /// events of unprotected kinds wake it only once this many bytes wait (see the probes'
    /// `bulk_wakeup`), the reader polling the ring meanwhile.
    pub bulk_wakeup_bytes: u32,
    pub _pad_wakeup: u32,
}
assert_wire_size!(ProbeConfig, 80 + 30 * 4);

/// Why a pod's event did not reach user space the normal way (POD_LOSSES key).
pub const LOSS_RING_FULL: u32 = 1;
/// Over the pod's budget of high-volume events.
pub const LOSS_BUDGET: u32 = 2;
/// Not a loss: a protected event past the pod's priority share (or with the priority ring
/// full) that went through the bulk ring instead.
pub const LOSS_DEMOTED: u32 = 3;
/// Or'ed into a reason when the event was of a protected kind (or a sensitive open).
pub const LOSS_PROTECTED: u32 = 0x100;

/// POD_LOSSES key: which pod lost which kind of event, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodLossKey {
    pub cgroup_id: u64,
    pub kind: u32,
    pub reason: u32,
}
assert_wire_size!(PodLossKey, 16);

/// POD_BUDGETS value: the credit of each bucket and when it was last refilled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodBudget {
    pub priority_credit_ns: u64,
    pub priority_last_ns: u64,
    pub bulk_credit_ns: u64,
    pub bulk_last_ns: u64,
}
assert_wire_size!(PodBudget, 32);

/// SENSITIVE_PREFIXES key data (after the LPM trie's bit length): path bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathPrefix {
    pub bytes: [u8; SENSITIVE_PREFIX_LEN],
}
assert_wire_size!(PathPrefix, 64);

/// A syscall seen at enter, waiting for its exit (keyed by thread id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PendingSyscall {
    /// The event kind this syscall reports as.
    pub kind: u32,
    /// The kind-specific op (e.g. OPEN_OP_OPENAT2).
    pub op: u32,
    /// The monitored cgroup found at enter.
    pub cgroup_id: u64,
    pub args: [u64; 6],
}
assert_wire_size!(PendingSyscall, 64);

/// execve/execveat arguments captured at enter (user memory is gone after the exec).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingExec {
    pub cgroup_id: u64,
    pub argv: [[u8; ARG_LEN]; ARGV_SLOTS],
    pub argc: u32,
    pub via_execveat: u32,
    pub dirfd: i32,
    pub at_flags: u32,
}
assert_wire_size!(PendingExec, 8 + 1024 + 16);

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are repr(C), Copy, made only of integers and byte arrays, with
    // explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::PendingSyscall {}
    unsafe impl aya::Pod for super::PendingExec {}
    unsafe impl aya::Pod for super::PodLossKey {}
    unsafe impl aya::Pod for super::PodBudget {}
    unsafe impl aya::Pod for super::PathPrefix {}
}
