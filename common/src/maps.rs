//! Keys and values of the probe maps (configuration, filters, counters, in-flight syscalls).

use crate::{ARG_LEN, ARGV_SLOTS, assert_wire_size};

/// Map names, shared so that the loader and the programs cannot disagree.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_PROBE_CONFIG: &str = "PROBE_CONFIG";
pub const MAP_ENABLED_KINDS: &str = "ENABLED_KINDS";
pub const MAP_MONITORED_CGROUPS: &str = "MONITORED_CGROUPS";
pub const MAP_EVENT_COUNTS: &str = "EVENT_COUNTS";
pub const MAP_LOST_COUNTS: &str = "LOST_COUNTS";

pub const EVENTS_RINGBUF_BYTES: u32 = 8 * 1024 * 1024;
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
    pub _reserved: u32,
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
}
assert_wire_size!(ProbeConfig, 48);

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
}
