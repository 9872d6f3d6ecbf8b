//! Ring-buffer records: one common header plus one payload per event kind.
//!
//! Every record starts with [`EventHeader`]; its `kind` says which payload struct follows.
//! Kinds are compact `u32` ids (they index the per-kind counter and enable maps); the user side
//! converts them with `TryFrom`.

use crate::assert_wire_size;

pub const COMM_LEN: usize = 16;
/// Bound on a path read from user memory (longer paths are cut and flagged).
pub const PATH_LEN: usize = 256;
/// argv is read into fixed slots: the verifier accepts fixed offsets without bounds gymnastics.
pub const ARGV_SLOTS: usize = 16;
pub const ARG_LEN: usize = 64;
pub const UNIX_PATH_LEN: usize = 112;
pub const NAME_LEN: usize = 64;
pub const FSTYPE_LEN: usize = 32;

// Event kinds. Keep compact: they index arrays of length KIND_COUNT.
pub const KIND_EXEC: u32 = 1;
pub const KIND_FORK: u32 = 2;
pub const KIND_EXIT: u32 = 3;
pub const KIND_CONNECT: u32 = 4;
pub const KIND_OPEN: u32 = 5;
pub const KIND_PTRACE: u32 = 6;
pub const KIND_CRED: u32 = 7;
pub const KIND_MOUNT: u32 = 8;
pub const KIND_NAMESPACE: u32 = 9;
pub const KIND_MODULE: u32 = 10;
pub const KIND_BPF: u32 = 11;
pub const KIND_MEMFD: u32 = 12;
pub const KIND_CHMOD: u32 = 13;
pub const KIND_UNLINK: u32 = 14;
pub const KIND_RENAME: u32 = 15;
pub const KIND_DUP: u32 = 16;
pub const KIND_POLICY_VERDICT: u32 = 17;
/// One past the largest kind: the length of per-kind arrays.
pub const KIND_COUNT: u32 = 18;

// Where an event came from (header.source).
pub const SOURCE_TRACEPOINT: u32 = 0;
pub const SOURCE_KPROBE: u32 = 1;

// header.flags bits.
/// A string field was cut at its bound.
pub const FLAG_TRUNCATED: u32 = 1;
/// The kernel offsets for parent/credential reads were unknown; ppid/euid/egid are 0.
pub const FLAG_NO_TASK_OFFSETS: u32 = 2;

/// Common header of every record (DESIGN.md: kernel time, pid, tgid, ppid, uids/gids, cgroup id, comm).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// The monitored cgroup (the endpoint's) the task is in, or its own cgroup in host mode.
    pub cgroup_id: u64,
    pub kind: u32,
    pub source: u32,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    pub flags: u32,
    pub comm: [u8; COMM_LEN],
    /// When the process (thread-group leader) started, ns since boot (task->start_boottime,
    /// what /proc/PID/stat's starttime counts in ticks): with `pid` it names one process, so a
    /// reused pid is never taken for the old one. 0 when the offsets are unknown.
    pub start_ns: u64,
}
assert_wire_size!(EventHeader, 80);

/// The kind of a file descriptor, read from the task's file table in the kernel
/// (ExecEvent.stdio, DupEvent.new_fd_kind).
pub const FD_KIND_UNKNOWN: u32 = 0;
/// No file at that descriptor.
pub const FD_KIND_CLOSED: u32 = 1;
pub const FD_KIND_FILE: u32 = 2;
pub const FD_KIND_PIPE: u32 = 3;
pub const FD_KIND_SOCKET: u32 = 4;
/// A terminal: the tty, console and pseudo-terminal character devices.
pub const FD_KIND_TTY: u32 = 5;
/// /dev/null (character device 1:3).
pub const FD_KIND_NULL: u32 = 6;
/// Anything else (other character or block devices, anonymous inodes: eventfd, epoll...).
pub const FD_KIND_OTHER: u32 = 7;

// Flags of a path resolved in the kernel (ExecEvent.exe_flags).
/// The dentry walk reached the root: the path is the object's canonical path.
pub const PATH_RESOLVED: u32 = 1;
/// The walk ran out of room or components; the path is cut (its tail is kept).
pub const PATH_CUT: u32 = 2;
/// OpenEvent.resolved holds the directory a relative argument names its file from (the
/// working directory or `dirfd`), not the file: the open failed, so there was no file to
/// resolve; user space joins the argument to it (lexically: symlinks in it are not followed).
pub const PATH_BASE_DIR: u32 = 4;

/// sched_process_exec, with the argv captured at sys_enter_execve/execveat.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// The kernel's bprm filename (for fexecve/execveat(AT_EMPTY_PATH): `/dev/fd/N`).
    pub filename: [u8; PATH_LEN],
    pub argv: [[u8; ARG_LEN]; ARGV_SLOTS],
    /// Number of arguments seen (may exceed ARGV_SLOTS; the rest were not copied).
    pub argc: u32,
    /// 1 when the process came from execveat.
    pub via_execveat: u32,
    /// execveat's dirfd and flags (AT_EMPTY_PATH marks an exec of an fd, e.g. a memfd).
    pub dirfd: i32,
    pub at_flags: u32,
    /// The new image's path from task->mm->exe_file, by a dentry walk with mount crossings in
    /// the kernel (what /proc/PID/exe would say, at the moment of the exec).
    pub exe: [u8; PATH_LEN],
    /// PATH_RESOLVED / PATH_CUT for `exe`.
    pub exe_flags: u32,
    /// FD_KIND_* of descriptors 0, 1 and 2 after the exec (close-on-exec already applied).
    pub stdio: [u32; 3],
}
assert_wire_size!(ExecEvent, 80 + 256 + 1024 + 16 + 256 + 16);

/// sched_process_fork.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ForkEvent {
    pub header: EventHeader,
    pub parent_pid: u32,
    pub child_pid: u32,
    /// CLOCK_BOOTTIME at the tracepoint: the child started (its start_ns) at or before this,
    /// which tells its later events from those of an older process that had its pid.
    pub boot_ns: u64,
}
assert_wire_size!(ForkEvent, 96);

/// sched_process_exit, thread-group leaders only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// task->exit_code (status << 8 | signal), 0 when offsets are unknown.
    pub exit_code: i32,
    pub _pad: u32,
}
assert_wire_size!(ExitEvent, 88);

/// connect(2) (tracepoint, emitted at exit with the result) or tcp_v{4,6}_connect (kprobe).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnectEvent {
    pub header: EventHeader,
    pub fd: i32,
    pub ret: i32,
    /// AF_INET, AF_INET6 or AF_UNIX.
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: u32,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    /// AF_UNIX socket path (abstract sockets start with a NUL, shown as '@').
    pub unix_path: [u8; UNIX_PATH_LEN],
}
assert_wire_size!(ConnectEvent, 80 + 16 + 16 + 112);

pub const OPEN_OP_OPENAT: u32 = 1;
pub const OPEN_OP_OPENAT2: u32 = 2;
/// truncate(2): `path` is the argument, `dirfd` AT_FDCWD; `flags` O_WRONLY|O_TRUNC (what the
/// call does to the file), `mode` 0. No file is open at exit, so `resolved` is at most the
/// working directory of a relative argument (PATH_BASE_DIR).
pub const OPEN_OP_TRUNCATE: u32 = 3;
/// ftruncate(2): `dirfd` is the descriptor, `path` empty, `resolved` the descriptor's file;
/// `flags` O_WRONLY|O_TRUNC, `mode` 0.
pub const OPEN_OP_FTRUNCATE: u32 = 4;
/// open(2) (what musl's open() calls on x86_64): `dirfd` AT_FDCWD, otherwise as openat.
pub const OPEN_OP_OPEN: u32 = 5;
/// creat(2): `dirfd` AT_FDCWD, `flags` O_CREAT|O_WRONLY|O_TRUNC (what the call does).
pub const OPEN_OP_CREAT: u32 = 6;

/// openat/openat2, emitted at exit with the result; truncate/ftruncate, which shorten a file
/// like O_TRUNC does, in the same record (`op` tells them apart).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenEvent {
    pub header: EventHeader,
    pub op: u32,
    pub dirfd: i32,
    pub flags: u32,
    pub mode: u32,
    /// fd or -errno.
    pub ret: i64,
    /// The argument as the process passed it.
    pub path: [u8; PATH_LEN],
    /// What the kernel resolved, by the dentry walk at syscall exit: the opened file's
    /// canonical path (from the new fd's struct file), or for a failed open of a relative
    /// argument the directory it was resolved against (PATH_BASE_DIR); empty when neither.
    pub resolved: [u8; PATH_LEN],
    /// PATH_RESOLVED / PATH_CUT / PATH_BASE_DIR for `resolved`.
    pub resolved_flags: u32,
    pub _pad: u32,
}
assert_wire_size!(OpenEvent, 80 + 24 + 256 + 256 + 8);

/// ptrace(2), emitted at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PtraceEvent {
    pub header: EventHeader,
    pub request: i64,
    pub target_pid: i32,
    pub _pad: u32,
    pub addr: u64,
    pub ret: i64,
}
assert_wire_size!(PtraceEvent, 80 + 32);

pub const CRED_OP_SETUID: u32 = 1;
pub const CRED_OP_SETGID: u32 = 2;
pub const CRED_OP_SETREUID: u32 = 3;
pub const CRED_OP_SETRESUID: u32 = 4;
pub const CRED_OP_SETRESGID: u32 = 5;
pub const CRED_OP_CAPSET: u32 = 6;
/// kprobe on commit_creds: args are the new (uid, euid, gid) and the new egid in `arg3`.
pub const CRED_OP_COMMIT_CREDS: u32 = 7;
pub const CRED_OP_SETREGID: u32 = 8;

/// Credential changes: set*id, capset (tracepoints, at exit) and commit_creds (kprobe).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CredEvent {
    pub header: EventHeader,
    pub op: u32,
    pub ret: i32,
    /// set[g|u]id(a0), setre[g|u]id(a0, a1), setres[g|u]id(a0, a1, a2); `u32::MAX` is
    /// "unchanged" (-1).
    pub args: [u32; 4],
    /// capset: the requested effective, permitted, inheritable sets (first 64 bits).
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    /// The credentials before the call (the header has them after it): what tells a non-root
    /// process becoming root from root dropping privileges.
    pub old_uid: u32,
    pub old_gid: u32,
    pub old_euid: u32,
    pub old_egid: u32,
}
assert_wire_size!(CredEvent, 80 + 8 + 16 + 24 + 16);

pub const MOUNT_OP_MOUNT: u32 = 1;
pub const MOUNT_OP_UMOUNT: u32 = 2;

/// mount/umount2, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MountEvent {
    pub header: EventHeader,
    pub op: u32,
    pub ret: i32,
    pub flags: u64,
    pub source: [u8; PATH_LEN],
    pub target: [u8; PATH_LEN],
    pub fstype: [u8; FSTYPE_LEN],
}
assert_wire_size!(MountEvent, 80 + 16 + 256 + 256 + 32);

pub const NS_OP_UNSHARE: u32 = 1;
pub const NS_OP_SETNS: u32 = 2;

/// unshare/setns, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NamespaceEvent {
    pub header: EventHeader,
    pub op: u32,
    pub ret: i32,
    /// unshare: CLONE_* flags; setns: nstype.
    pub flags: u64,
    /// setns: the namespace fd.
    pub fd: i32,
    pub _pad: u32,
}
assert_wire_size!(NamespaceEvent, 80 + 24);

pub const MODULE_OP_INIT: u32 = 1;
pub const MODULE_OP_FINIT: u32 = 2;
pub const MODULE_OP_DELETE: u32 = 3;

/// init_module/finit_module/delete_module, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleEvent {
    pub header: EventHeader,
    pub op: u32,
    pub ret: i32,
    /// finit_module: the file descriptor.
    pub fd: i32,
    pub flags: u32,
    /// init_module: image length.
    pub len: u64,
    /// delete_module: the name; init/finit: the parameter string.
    pub name: [u8; NAME_LEN],
}
assert_wire_size!(ModuleEvent, 80 + 24 + 64);

/// bpf(2), at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BpfEvent {
    pub header: EventHeader,
    pub cmd: u32,
    pub size: u32,
    pub ret: i64,
}
assert_wire_size!(BpfEvent, 80 + 16);

/// memfd_create, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemfdEvent {
    pub header: EventHeader,
    pub flags: u32,
    pub ret: i32,
    pub name: [u8; NAME_LEN],
}
assert_wire_size!(MemfdEvent, 80 + 8 + 64);

pub const CHMOD_OP_CHMOD: u32 = 1;
pub const CHMOD_OP_FCHMOD: u32 = 2;
pub const CHMOD_OP_FCHMODAT: u32 = 3;

/// chmod/fchmod/fchmodat, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ChmodEvent {
    pub header: EventHeader,
    pub op: u32,
    pub ret: i32,
    /// fchmod: the fd; fchmodat: the dirfd.
    pub fd: i32,
    pub mode: u32,
    pub path: [u8; PATH_LEN],
    /// fchmod: the descriptor's file (PATH_RESOLVED); chmod/fchmodat of a relative path: the
    /// directory it was looked up in, the working directory (task->fs->pwd) or `fd`'s file,
    /// read at exit (PATH_BASE_DIR); empty for an absolute path.
    pub resolved: [u8; PATH_LEN],
    /// PATH_* flags of `resolved`.
    pub resolved_flags: u32,
    pub _pad: u32,
}
assert_wire_size!(ChmodEvent, 80 + 16 + 512 + 8);

pub const UNLINK_OP_UNLINKAT: u32 = 0;
pub const UNLINK_OP_UNLINK: u32 = 1;
pub const UNLINK_OP_RMDIR: u32 = 2;

/// unlinkat/unlink/rmdir, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnlinkEvent {
    pub header: EventHeader,
    pub dirfd: i32,
    pub flags: u32,
    pub ret: i32,
    pub op: u32,
    pub path: [u8; PATH_LEN],
    /// For a relative path, the directory it was looked up in (PATH_BASE_DIR): the working
    /// directory (task->fs->pwd) or `dirfd`'s file, read at exit; empty for an absolute path.
    pub resolved: [u8; PATH_LEN],
    /// PATH_* flags of `resolved`.
    pub resolved_flags: u32,
    pub _pad: u32,
}
assert_wire_size!(UnlinkEvent, 80 + 16 + 512 + 8);

pub const RENAME_OP_RENAMEAT2: u32 = 0;
pub const RENAME_OP_RENAME: u32 = 1;
pub const RENAME_OP_RENAMEAT: u32 = 2;

/// rename/renameat/renameat2, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RenameEvent {
    pub header: EventHeader,
    pub old_dirfd: i32,
    pub new_dirfd: i32,
    pub flags: u32,
    pub ret: i32,
    pub old_path: [u8; PATH_LEN],
    pub new_path: [u8; PATH_LEN],
    /// For relative paths, the directories they were looked up in (as UnlinkEvent.resolved,
    /// from `old_dirfd` / `new_dirfd` or the working directory).
    pub old_resolved: [u8; PATH_LEN],
    pub new_resolved: [u8; PATH_LEN],
    pub old_resolved_flags: u32,
    pub new_resolved_flags: u32,
}
assert_wire_size!(RenameEvent, 80 + 16 + 1024 + 8);

pub const DUP_OP_DUP2: u32 = 2;
pub const DUP_OP_DUP3: u32 = 3;

/// dup2/dup3, at exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DupEvent {
    pub header: EventHeader,
    pub op: u32,
    pub old_fd: i32,
    pub new_fd: i32,
    pub flags: u32,
    pub ret: i64,
    /// FD_KIND_* of `new_fd` after the call, read from the task's file table in the kernel.
    pub new_fd_kind: u32,
    pub _pad: u32,
}
assert_wire_size!(DupEvent, 80 + 32);
