//! Loads the embedded eBPF object, configures its filter maps and attaches the event programs,
//! with the fallbacks this kernel needs (no kprobes; no per-syscall module tracepoints). The
//! probed syscalls' entries go through one raw sys_enter dispatcher by default
//! ([`SyscallEntry`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{KProbe, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use palisade_common::{
    KIND_COUNT, LOSS_BUDGET, LOSS_DEMOTED, LOSS_PROTECTED, LOSS_RING_FULL, MAP_ENABLED_KINDS, MAP_EVENT_COUNTS,
    MAP_EVENTS, MAP_EVENTS_PRIORITY, MAP_LOST_COUNTS, MAP_MONITORED_CGROUPS, MAP_POD_LOSSES,
    CONNECT_PORTS_ON, MAP_CONNECT_PORTS, MAX_CONNECT_PORTS, MAP_PREFILTERED_COUNTS, MAP_PROBE_CONFIG, MAP_QUIET_OPEN_PREFIXES, MAP_SENSITIVE_PREFIXES, MAX_SENSITIVE_PREFIXES, MAP_OPEN_FILTER, MAP_OPEN_FILTER_PREFIXES, MAP_OPEN_FILTER_SUFFIXES, MAX_OPEN_FILTER_ENTRIES, OPEN_FILTER_ANY_PATH, OPEN_FILTER_HIDDEN, OPEN_FILTER_ON, OPEN_FILTER_SUFFIX_CLASSES, PathPrefix, PodLossKey,
    ProbeConfig, SENSITIVE_PREFIX_LEN,
};
use serde::Serialize;

use super::btf::Btf;
use crate::events::kind::EventKind;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the datapath maps: {0}")]
    Pin(String),
    #[error("sensitive path prefixes: {0}")]
    Prefixes(PrefixError),
    #[error("pin directory {dir}: {reason}")]
    PinDir { dir: PathBuf, reason: String },
    #[error("mounting {what}: {source}")]
    Mount {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How one program ended up: attached, stood in for by another, or not available here.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AttachState {
    Attached,
    /// Not attached; `by` does its job (e.g. a kprobe replaced by its tracepoint equivalents).
    FellBack { reason: String, by: String },
    Unavailable { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub program: String,
    /// `tracepoint`, `kprobe`.
    pub kind: &'static str,
    /// What it hooks, e.g. `syscalls/sys_enter_openat` or `commit_creds`.
    pub target: String,
    #[serde(flatten)]
    pub state: AttachState,
}

/// What to hook: the program name in the object and its attach point.
struct Hook {
    program: &'static str,
    category: &'static str,
    name: &'static str,
}

const fn tp(program: &'static str, category: &'static str, name: &'static str) -> Hook {
    Hook { program, category, name }
}

/// Programs whose tracepoint has the program's own name under `syscalls/` or `sched/`.
const SYSCALL_PROGRAMS: &[&str] = &[
    "sys_enter_execve", "sys_exit_execve", "sys_enter_execveat", "sys_exit_execveat",
    "sys_enter_openat", "sys_exit_openat", "sys_enter_openat2", "sys_exit_openat2",
    "sys_enter_open", "sys_exit_open", "sys_enter_creat", "sys_exit_creat",
    "sys_enter_connect", "sys_exit_connect", "sys_enter_ptrace", "sys_exit_ptrace",
    "sys_enter_setuid", "sys_exit_setuid", "sys_enter_setgid", "sys_exit_setgid",
    "sys_enter_setreuid", "sys_exit_setreuid", "sys_enter_setresuid", "sys_exit_setresuid",
    "sys_enter_setresgid", "sys_exit_setresgid", "sys_enter_capset", "sys_exit_capset",
    "sys_enter_mount", "sys_exit_mount", "sys_enter_umount", "sys_exit_umount",
    "sys_enter_unshare", "sys_exit_unshare", "sys_enter_setns", "sys_exit_setns",
    "sys_enter_bpf", "sys_exit_bpf", "sys_enter_memfd_create", "sys_exit_memfd_create",
    "sys_enter_chmod", "sys_exit_chmod", "sys_enter_fchmod", "sys_exit_fchmod",
    "sys_enter_fchmodat", "sys_exit_fchmodat", "sys_enter_fchmodat2", "sys_exit_fchmodat2",
    "sys_enter_unlinkat", "sys_exit_unlinkat", "sys_enter_unlink", "sys_exit_unlink",
    "sys_enter_rmdir", "sys_exit_rmdir", "sys_enter_renameat2", "sys_exit_renameat2",
    "sys_enter_renameat", "sys_exit_renameat", "sys_enter_rename", "sys_exit_rename",
    "sys_enter_dup2", "sys_exit_dup2", "sys_enter_dup3", "sys_exit_dup3",
    "sys_enter_setregid", "sys_exit_setregid", "sys_enter_truncate", "sys_exit_truncate",
    "sys_enter_ftruncate", "sys_exit_ftruncate",
];

const SCHED_PROGRAMS: &[&str] = &["sched_process_exec", "sched_process_fork", "sched_process_exit"];

/// Module syscalls: per-syscall tracepoints where the kernel has them, raw_syscalls otherwise.
const MODULE_PROGRAMS: &[&str] = &[
    "sys_enter_init_module", "sys_exit_init_module", "sys_enter_finit_module",
    "sys_exit_finit_module", "sys_enter_delete_module", "sys_exit_delete_module",
];
/// Raw tracepoints (program, tracepoint): cheaper than the classic raw_syscalls ones, but they
/// run at every syscall of every process on the node.
const MODULE_FALLBACK: [(&str, &str); 2] = [("raw_sys_enter_module", "sys_enter"), ("raw_sys_exit_module", "sys_exit")];
/// The fallback on a kernel that cannot load modules: the attempt reported at entry with the
/// ENOSYS every module syscall gets there, so no program runs at every syscall's exit.
const MODULE_ATTEMPT_FALLBACK: (&str, &str) = ("raw_sys_enter_module_attempt", "sys_enter");
/// Present when the kernel can load modules (CONFIG_MODULES).
const PROC_MODULES: &str = "/proc/modules";

/// How module syscalls are watched on a kernel without per-syscall tracepoints for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModuleFallback {
    /// A kernel without module support: the attempt at entry (result ENOSYS, what the kernel
    /// returns); a kernel with it: entry and exit (the result as returned).
    #[default]
    Auto,
    /// Entry and exit whatever the kernel (the benchmarks compare the two).
    EnterAndExit,
}

/// How the entry of the probed syscalls is seen (their exits are per-syscall tracepoints
/// either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyscallEntry {
    /// One raw `sys_enter` tracepoint dispatching on the syscall number (`raw_sys_enter`): no
    /// trace record is built for a process palisade does not watch, and a syscall nobody
    /// probes costs one switch. Exec keeps its enter tracepoint (argv capture).
    #[default]
    RawDispatch,
    /// A classic tracepoint per syscall (`syscalls/sys_enter_*`), as before the dispatcher:
    /// each builds its trace record before its program runs (the benchmarks compare the two).
    Tracepoints,
}

/// The enter programs the raw dispatcher stands in for (the syscalls `dispatched` in
/// probes-ebpf/src/syscalls.rs lists; execve and execveat keep theirs).
const DISPATCHED_ENTERS: &[&str] = &[
    "sys_enter_openat", "sys_enter_openat2", "sys_enter_open", "sys_enter_creat",
    "sys_enter_connect", "sys_enter_ptrace",
    "sys_enter_setuid", "sys_enter_setgid", "sys_enter_setreuid", "sys_enter_setresuid",
    "sys_enter_setresgid", "sys_enter_capset", "sys_enter_mount", "sys_enter_umount",
    "sys_enter_unshare", "sys_enter_setns", "sys_enter_bpf", "sys_enter_memfd_create",
    "sys_enter_chmod", "sys_enter_fchmod", "sys_enter_fchmodat", "sys_enter_fchmodat2",
    "sys_enter_unlinkat", "sys_enter_unlink", "sys_enter_rmdir", "sys_enter_renameat2",
    "sys_enter_renameat", "sys_enter_rename", "sys_enter_dup2", "sys_enter_dup3",
    "sys_enter_setregid", "sys_enter_truncate", "sys_enter_ftruncate",
];
/// The dispatcher: module syscalls stashed for an exit program, or (a kernel without module
/// support) reported at entry as attempts.
const DISPATCHER: &str = "raw_sys_enter";
const DISPATCHER_MODULE_ATTEMPTS: &str = "raw_sys_enter_attempts";

/// Kprobes and what stands in for each when kprobes cannot attach.
const KPROBES: &[(&str, &str, &str)] = &[
    ("kprobe_commit_creds", "commit_creds", "set*id/capset tracepoints"),
    ("kprobe_tcp_v4_connect", "tcp_v4_connect", "connect tracepoints"),
    ("kprobe_tcp_v6_connect", "tcp_v6_connect", "connect tracepoints"),
];

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Loaded object plus the attach outcome of each program.
pub struct LoadedProbes {
    pub ebpf: Ebpf,
    pub programs: Vec<ProgramStatus>,
    pub config: ProbeConfig,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Report every task, not only monitored cgroups.
    pub monitor_all: bool,
    /// Attach the kprobes where the kernel allows (they are always loaded, so verified).
    pub try_kprobes: bool,
    /// Pin the datapath maps (policy, quarantine, ...) under this bpffs directory, reusing
    /// what a previous run pinned: enforcement survives a daemon restart.
    pub pin_dir: Option<std::path::PathBuf>,
    /// The priority ring and the per-pod budgets; None: every event goes to the one bulk ring
    /// (what a reader of `take_ring_buffer` alone needs).
    pub budgets: Option<EventBudgets>,
    /// See [`ModuleFallback`].
    pub module_fallback: ModuleFallback,
    /// See [`SyscallEntry`].
    pub syscall_entry: SyscallEntry,
    /// Bulk-ring wake-ups: 0, one per event (the kernel's default); otherwise unprotected
    /// events wake the reader only once this many bytes wait (`ProbeConfig::bulk_wakeup_bytes`;
    /// the readers poll the ring every `events::reader::BULK_POLL`).
    pub bulk_wakeup_bytes: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            monitor_all: false,
            try_kprobes: true,
            pin_dir: None,
            budgets: None,
            module_fallback: ModuleFallback::Auto,
            syscall_entry: SyscallEntry::RawDispatch,
            bulk_wakeup_bytes: palisade_common::BULK_WAKEUP_BYTES,
        }
    }
}

/// Per-pod event budgets, applied in the kernel (token buckets per pod cgroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct EventBudgets {
    /// Per pod: protected events (exec, credentials, ptrace, modules, bpf, mounts, namespaces,
    /// memfd, dup onto stdio, opens of sensitive paths) per second that take the priority ring;
    /// past it they go through the bulk ring. 0: no limit.
    #[arg(long, default_value_t = 500)]
    pub pod_priority_rate: u32,
    /// Per pod: burst of protected events above the rate.
    #[arg(long, default_value_t = 500)]
    pub pod_priority_burst: u32,
    /// Per pod: high-volume events (open, connect, chmod, unlink, rename, dup) per second; a pod
    /// past it loses its own events (counted, and raised as an `event_loss` alert). 0: no limit.
    #[arg(long, default_value_t = 5000)]
    pub pod_event_rate: u32,
    /// Per pod: burst of high-volume events above the rate.
    #[arg(long, default_value_t = 10000)]
    pub pod_event_burst: u32,
}

impl Default for EventBudgets {
    fn default() -> Self {
        EventBudgets { pod_priority_rate: 500, pod_priority_burst: 500, pod_event_rate: 5000, pod_event_burst: 10000 }
    }
}

impl EventBudgets {
    /// Writes the buckets into the probe configuration (costs in ns of credit per event).
    fn apply(&self, config: &mut ProbeConfig) {
        let cost = |rate: u32| if rate == 0 { 0 } else { 1_000_000_000 / u64::from(rate) };
        config.priority_routing = 1;
        config.priority_cost_ns = cost(self.pod_priority_rate);
        config.priority_burst_ns = config.priority_cost_ns * u64::from(self.pod_priority_burst.max(1));
        config.bulk_cost_ns = cost(self.pod_event_rate);
        config.bulk_burst_ns = config.bulk_cost_ns * u64::from(self.pod_event_burst.max(1));
    }
}

/// Where the daemon pins its maps and links by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/palisade";

/// Where bpffs is mounted on a host (the default pin directory is below it).
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Makes sure the pin directory `dir` (created later when missing) is on a bpf file system:
/// its nearest existing ancestor is looked at, not "some bpffs somewhere" (with bpffs mounted
/// elsewhere, a pin directory on ext4 passed that check and the first pin failed with a bare
/// EPERM). When `dir` is below /sys/fs/bpf and nothing is mounted there yet, bpffs is mounted
/// there; anything else is refused before a pin is made.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoaderError> {
    let not_bpffs = |reason: String| LoaderError::PinDir { dir: dir.to_path_buf(), reason };
    let (existing, fs) = fs_below(dir).map_err(|e| not_bpffs(e.to_string()))?;
    if fs == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    let mount = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount) {
        crate::sys::mount_bpffs(mount).map_err(|e| not_bpffs(e.to_string()))?;
        let (_, fs) = fs_below(dir).map_err(|e| not_bpffs(e.to_string()))?;
        if fs == nix::sys::statfs::BPF_FS_MAGIC {
            return Ok(());
        }
    }
    Err(not_bpffs(format!("{} is on a file system of type {:#x}, not on a bpf file system", existing.display(), fs.0)))
}

/// The nearest existing directory at or above `dir`, and its file system type.
fn fs_below(dir: &Path) -> nix::Result<(PathBuf, nix::sys::statfs::FsType)> {
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let stat = nix::sys::statfs::statfs(existing)?;
    Ok((existing.to_path_buf(), stat.filesystem_type()))
}

/// Mounts tracefs when the tracepoint ids are not reachable (aya looks there).
pub fn ensure_tracefs() -> Result<(), LoaderError> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    crate::sys::mount_fs("tracefs", TRACEFS, "tracefs").map_err(|source| LoaderError::Mount { what: "tracefs", source })
}

/// Resolves the kernel struct offsets the probes need; None (and a warning) when BTF is missing.
pub fn task_offsets() -> Option<ProbeConfig> {
    let btf = match Btf::from_sys_fs() {
        Ok(btf) => btf,
        Err(err) => {
            tracing::warn!(%err, "no kernel BTF: ppid, euid and egid will be 0");
            return None;
        }
    };
    let off = |s: &str, m: &str| btf.member_offset(s, m);
    let resolved = (|| -> Result<ProbeConfig, super::btf::BtfError> {
        Ok(ProbeConfig {
            task_offsets_valid: 1,
            off_task_real_parent: off("task_struct", "real_parent")?,
            off_task_tgid: off("task_struct", "tgid")?,
            off_task_cred: off("task_struct", "cred")?,
            off_task_exit_code: off("task_struct", "exit_code")?,
            off_cred_uid: off("cred", "uid")?,
            off_cred_gid: off("cred", "gid")?,
            off_cred_euid: off("cred", "euid")?,
            off_cred_egid: off("cred", "egid")?,
            ..ProbeConfig::default()
        })
    })();
    match resolved {
        Ok(mut cfg) => {
            if let Err(err) = path_offsets(&btf, &mut cfg) {
                tracing::warn!(%err, "kernel BTF lacks a field the process-context reads need: process start times, exe paths and fd kinds will be unknown");
            }
            // Optional: without it a 32-bit syscall's number may be read as a 64-bit one.
            match off("task_struct", "thread_info").and_then(|t| Ok(t + off("thread_info", "status")?)) {
                Ok(status) => cfg.off_task_thread_status = status,
                Err(err) => tracing::warn!(%err, "kernel BTF has no thread_info.status: the syscall dispatcher cannot tell 32-bit syscalls"),
            }
            Some(cfg)
        }
        Err(err) => {
            tracing::warn!(%err, "kernel BTF lacks a field the probes read: ppid, euid and egid will be 0");
            None
        }
    }
}

/// The offsets of the in-kernel process context: the process start time, the walk from a
/// task to its executable's path (mm -> exe_file -> f_path -> dentry chain with mount
/// crossings) and the walk to the kind of a file descriptor (files -> fdt -> fd[] -> inode).
pub fn path_offsets(btf: &Btf, cfg: &mut ProbeConfig) -> Result<(), super::btf::BtfError> {
    let off = |s: &str, m: &str| btf.member_offset(s, m);
    let resolved = ProbeConfig {
        path_offsets_valid: 1,
        off_task_group_leader: off("task_struct", "group_leader")?,
        off_task_start_boottime: off("task_struct", "start_boottime")?,
        off_task_mm: off("task_struct", "mm")?,
        off_task_files: off("task_struct", "files")?,
        off_mm_exe_file: off("mm_struct", "exe_file")?,
        off_file_f_path: off("file", "f_path")?,
        off_file_f_inode: off("file", "f_inode")?,
        off_path_mnt: off("path", "mnt")?,
        off_path_dentry: off("path", "dentry")?,
        off_dentry_d_parent: off("dentry", "d_parent")?,
        off_dentry_d_name: off("dentry", "d_name")?,
        off_qstr_len: off("qstr", "len")?,
        off_qstr_name: off("qstr", "name")?,
        off_vfsmount_mnt_root: off("vfsmount", "mnt_root")?,
        off_mount_mnt: off("mount", "mnt")?,
        off_mount_mnt_parent: off("mount", "mnt_parent")?,
        off_mount_mnt_mountpoint: off("mount", "mnt_mountpoint")?,
        off_files_fdt: off("files_struct", "fdt")?,
        off_fdtable_max_fds: off("fdtable", "max_fds")?,
        off_fdtable_fd: off("fdtable", "fd")?,
        off_inode_i_mode: off("inode", "i_mode")?,
        off_inode_i_rdev: off("inode", "i_rdev")?,
        off_task_fs: off("task_struct", "fs")?,
        off_fs_root: off("fs_struct", "root")?,
        off_fs_pwd: off("fs_struct", "pwd")?,
        off_vfsmount_mnt_sb: off("vfsmount", "mnt_sb")?,
        ..*cfg
    };
    *cfg = resolved;
    Ok(())
}

/// Loads the embedded object and sets the configuration map; attaches nothing yet.
pub fn load(options: &LoadOptions) -> Result<LoadedProbes, LoaderError> {
    crate::sys::raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    if let Some(dir) = &options.pin_dir {
        ensure_bpffs(dir)?;
        crate::segmentation::datapath::pin_maps(&mut loader, dir).map_err(|e| LoaderError::Pin(e.to_string()))?;
    }
    let mut ebpf = loader.load(super::object::PROBES_OBJECT)?;
    let mut config = task_offsets().unwrap_or_default();
    config.monitor_all = u32::from(options.monitor_all);
    config.daemon_tgid = std::process::id();
    config.bulk_wakeup_bytes = options.bulk_wakeup_bytes;
    if let Some(budgets) = &options.budgets {
        budgets.apply(&mut config);
    }
    {
        let map = ebpf.map_mut(MAP_PROBE_CONFIG).ok_or(LoaderError::MissingMap(MAP_PROBE_CONFIG))?;
        let mut array: Array<&mut MapData, ProbeConfig> =
            Array::try_from(map).map_err(|source| LoaderError::Map { name: MAP_PROBE_CONFIG, source })?;
        array.set(0, config, 0).map_err(|source| LoaderError::Map { name: MAP_PROBE_CONFIG, source })?;
    }
    Ok(LoadedProbes { ebpf, programs: Vec::new(), config })
}

fn tracepoint_exists(category: &str, name: &str) -> bool {
    Path::new(TRACEFS).join("events").join(category).join(name).exists()
}

impl LoadedProbes {
    /// Loads and attaches every event program; a program that cannot attach is recorded, not
    /// fatal, except that a missing core program (exec) is an error the caller sees in status.
    pub fn attach_all(&mut self, options: &LoadOptions) -> Result<(), LoaderError> {
        ensure_tracefs()?;
        let dispatch = options.syscall_entry == SyscallEntry::RawDispatch;
        let mut hooks: Vec<Hook> = Vec::new();
        for &p in SYSCALL_PROGRAMS {
            if dispatch && DISPATCHED_ENTERS.contains(&p) {
                self.programs.push(ProgramStatus {
                    program: p.to_string(),
                    kind: "tracepoint",
                    target: format!("syscalls/{p}"),
                    state: AttachState::FellBack {
                        reason: "the raw sys_enter dispatcher sees this syscall's entry without a trace record".into(),
                        by: format!("raw tracepoint sys_enter ({DISPATCHER})"),
                    },
                });
                continue;
            }
            hooks.push(tp(p, "syscalls", p));
        }
        for &p in SCHED_PROGRAMS {
            hooks.push(tp(p, "sched", p));
        }
        for hook in hooks {
            self.attach_tracepoint(&hook);
        }
        let module_tracepoints = MODULE_PROGRAMS.iter().all(|p| tracepoint_exists("syscalls", p));
        if dispatch {
            self.attach_dispatcher(options, module_tracepoints);
        } else if module_tracepoints {
            for &p in MODULE_PROGRAMS {
                self.attach_tracepoint(&tp(p, "syscalls", p));
            }
        } else {
            let attempts_only =
                options.module_fallback == ModuleFallback::Auto && !std::path::Path::new(PROC_MODULES).exists();
            let (reason, by) = if attempts_only {
                (
                    "the kernel cannot load modules (no /proc/modules: CONFIG_MODULES off), so it has no module syscall tracepoints",
                    "raw tracepoint sys_enter filtered by syscall number, reporting each attempt with the ENOSYS it gets",
                )
            } else {
                ("the kernel has no per-syscall tracepoint for module syscalls", "raw tracepoints sys_enter+sys_exit filtered by syscall number")
            };
            for &p in MODULE_PROGRAMS {
                self.programs.push(ProgramStatus {
                    program: p.to_string(),
                    kind: "tracepoint",
                    target: format!("syscalls/{p}"),
                    state: AttachState::FellBack { reason: reason.into(), by: by.into() },
                });
            }
            if attempts_only {
                let (program, tracepoint) = MODULE_ATTEMPT_FALLBACK;
                self.attach_raw_tracepoint(program, tracepoint);
            } else {
                for (program, tracepoint) in MODULE_FALLBACK {
                    self.attach_raw_tracepoint(program, tracepoint);
                }
            }
        }
        for &(program, function, stand_in) in KPROBES {
            self.attach_kprobe(program, function, stand_in, options.try_kprobes);
        }
        Ok(())
    }

    /// The raw sys_enter dispatcher, with the module syscalls' exits where they have one: their
    /// exit tracepoints, else the raw sys_exit fallback, else (a kernel that cannot load
    /// modules, `ModuleFallback::Auto`) none -- the dispatcher reports the attempt at entry.
    fn attach_dispatcher(&mut self, options: &LoadOptions, module_tracepoints: bool) {
        let attempts_only = !module_tracepoints
            && options.module_fallback == ModuleFallback::Auto
            && !std::path::Path::new(PROC_MODULES).exists();
        let dispatcher = if attempts_only { DISPATCHER_MODULE_ATTEMPTS } else { DISPATCHER };
        self.attach_raw_tracepoint(dispatcher, "sys_enter");
        for &p in MODULE_PROGRAMS {
            let enter = p.starts_with("sys_enter_");
            if module_tracepoints && !enter {
                self.attach_tracepoint(&tp(p, "syscalls", p));
                continue;
            }
            let (reason, by) = match (enter, module_tracepoints, attempts_only) {
                (true, true, _) => ("the raw sys_enter dispatcher sees this syscall's entry without a trace record", format!("raw tracepoint sys_enter ({dispatcher})")),
                (_, false, true) => (
                    "the kernel cannot load modules (no /proc/modules: CONFIG_MODULES off), so it has no module syscall tracepoints",
                    format!("raw tracepoint sys_enter ({dispatcher}), reporting each attempt with the ENOSYS it gets"),
                ),
                _ => ("the kernel has no per-syscall tracepoint for module syscalls", format!("raw tracepoints sys_enter ({dispatcher}) + sys_exit filtered by syscall number")),
            };
            self.programs.push(ProgramStatus {
                program: p.to_string(),
                kind: "tracepoint",
                target: format!("syscalls/{p}"),
                state: AttachState::FellBack { reason: reason.into(), by },
            });
        }
        if !module_tracepoints && !attempts_only {
            let (program, tracepoint) = MODULE_FALLBACK[1];
            self.attach_raw_tracepoint(program, tracepoint);
        }
    }

    fn attach_tracepoint(&mut self, hook: &Hook) {
        let target = format!("{}/{}", hook.category, hook.name);
        let state = match self.try_attach_tracepoint(hook) {
            Ok(()) => AttachState::Attached,
            Err(reason) => {
                tracing::warn!(program = hook.program, %target, %reason, "tracepoint not attached");
                AttachState::Unavailable { reason }
            }
        };
        self.programs.push(ProgramStatus { program: hook.program.to_string(), kind: "tracepoint", target, state });
    }

    fn try_attach_tracepoint(&mut self, hook: &Hook) -> Result<(), String> {
        if !tracepoint_exists(hook.category, hook.name) {
            return Err("tracepoint not present in this kernel".into());
        }
        let program = self.ebpf.program_mut(hook.program).ok_or("program missing from the object")?;
        let tracepoint: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
        let started = std::time::Instant::now();
        tracepoint.load().map_err(|e| format!("load: {e:#}"))?;
        // The verifier's time is most of the start-up; a program that grows shows here.
        tracing::debug!(program = hook.program, load_ms = started.elapsed().as_millis() as u64, "program verified and loaded");
        tracepoint.attach(hook.category, hook.name).map_err(|e| format!("attach: {e:#}"))?;
        Ok(())
    }

    fn attach_raw_tracepoint(&mut self, program: &str, tracepoint: &str) {
        let result = (|| -> Result<(), String> {
            let prog = self.ebpf.program_mut(program).ok_or("program missing from the object")?;
            let raw: &mut RawTracePoint = prog.try_into().map_err(|e| format!("{e}"))?;
            raw.load().map_err(|e| format!("load: {e:#}"))?;
            raw.attach(tracepoint).map(|_| ()).map_err(|e| format!("attach: {e:#}"))
        })();
        let state = match result {
            Ok(()) => AttachState::Attached,
            Err(reason) => {
                tracing::warn!(program, tracepoint, %reason, "raw tracepoint not attached");
                AttachState::Unavailable { reason }
            }
        };
        self.programs.push(ProgramStatus {
            program: program.to_string(),
            kind: "raw_tracepoint",
            target: tracepoint.to_string(),
            state,
        });
    }

    fn attach_kprobe(&mut self, program: &str, function: &str, stand_in: &str, try_attach: bool) {
        let state = match self.load_kprobe(program) {
            Err(reason) => AttachState::Unavailable { reason },
            Ok(()) if !try_attach => AttachState::FellBack {
                reason: "kprobes disabled by configuration".into(),
                by: stand_in.to_string(),
            },
            Ok(()) => match self.try_attach_kprobe(program, function) {
                Ok(()) => AttachState::Attached,
                Err(reason) => AttachState::FellBack { reason, by: stand_in.to_string() },
            },
        };
        if let AttachState::FellBack { reason, by } = &state {
            tracing::info!(program, function, %reason, fallback = %by, "kprobe not attached; using fallback");
        }
        self.programs.push(ProgramStatus {
            program: program.to_string(),
            kind: "kprobe",
            target: function.to_string(),
            state,
        });
    }

    /// Loads a kprobe program (runs the verifier) without attaching it.
    pub fn load_kprobe(&mut self, program: &str) -> Result<(), String> {
        let prog = self.ebpf.program_mut(program).ok_or("program missing from the object")?;
        let kprobe: &mut KProbe = prog.try_into().map_err(|e| format!("{e}"))?;
        kprobe.load().map_err(|e| format!("load: {e:#}"))
    }

    fn try_attach_kprobe(&mut self, program: &str, function: &str) -> Result<(), String> {
        let prog = self.ebpf.program_mut(program).ok_or("program missing from the object")?;
        let kprobe: &mut KProbe = prog.try_into().map_err(|e| format!("{e}"))?;
        kprobe.attach(function, 0).map(|_| ()).map_err(|e| format!("attach: {e:#}"))
    }

    /// Takes the (bulk) event ring buffer out of the object for the reader task.
    pub fn take_ring_buffer(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self.ebpf.take_map(MAP_EVENTS).ok_or(LoaderError::MissingMap(MAP_EVENTS))?;
        RingBuf::try_from(map).map_err(|source| LoaderError::Map { name: MAP_EVENTS, source })
    }

    /// Takes the priority ring buffer (protected kinds; used when `budgets` routing is on).
    pub fn take_priority_ring_buffer(&mut self) -> Result<RingBuf<MapData>, LoaderError> {
        let map = self.ebpf.take_map(MAP_EVENTS_PRIORITY).ok_or(LoaderError::MissingMap(MAP_EVENTS_PRIORITY))?;
        RingBuf::try_from(map).map_err(|source| LoaderError::Map { name: MAP_EVENTS_PRIORITY, source })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrefixError {
    #[error("path prefix {0:?} is not an absolute path")]
    NotAbsolute(String),
    #[error("quiet open prefix {0:?} is longer than the {SENSITIVE_PREFIX_LEN} bytes the kernel compares")]
    TooLong(String),
    #[error("{count} path prefixes; the kernel map holds {max}")]
    TooMany { count: usize, max: u32 },
    #[error("{count} connect ports in the pack's prefilter; the kernel map holds {max}")]
    TooManyPorts { count: usize, max: u32 },
    #[error("{count} path prefixes or suffixes in the pack's open prefilter; the kernel map holds {max}")]
    TooManyOpenFilterEntries { count: usize, max: u32 },
}

/// Replaces the set of path prefixes whose opens are protected events. Prefixes longer than
/// the kernel compares are cut (the match only gets wider). Adds before it removes, so a prefix
/// in both sets is never missing.
pub fn set_sensitive_prefixes(ebpf: &mut Ebpf, prefixes: &[String]) -> Result<(), LoaderError> {
    set_prefixes(ebpf, MAP_SENSITIVE_PREFIXES, prefixes, true)
}

/// Replaces the pack's kernel prefilter: read-only opens below these prefixes stay in the
/// kernel. A prefix the kernel cannot compare whole is an error (cutting it would filter more
/// than the pack said); an empty set turns the prefilter off.
pub fn set_quiet_open_prefixes(ebpf: &mut Ebpf, prefixes: &[String]) -> Result<(), LoaderError> {
    set_prefixes(ebpf, MAP_QUIET_OPEN_PREFIXES, prefixes, false)
}

/// Replaces the pack's kernel connect prefilter: with `Some(ports)`, inet/inet6 connects to
/// any other port stay in the kernel (counted as prefiltered); `None` turns it off. The ports
/// go in before the switch and the switch goes off before they leave, so a port the pack
/// names is never filtered, also while the set changes.
pub fn set_connect_ports(ebpf: &mut Ebpf, ports: Option<&std::collections::BTreeSet<u16>>) -> Result<(), LoaderError> {
    let map = ebpf.map_mut(MAP_CONNECT_PORTS).ok_or(LoaderError::MissingMap(MAP_CONNECT_PORTS))?;
    let mut map: BpfHashMap<&mut MapData, u32, u8> =
        BpfHashMap::try_from(map).map_err(|source| LoaderError::Map { name: MAP_CONNECT_PORTS, source })?;
    let map_error = |source| LoaderError::Map { name: MAP_CONNECT_PORTS, source };
    let present: std::collections::BTreeSet<u32> = map.keys().filter_map(Result::ok).collect();
    let Some(ports) = ports else {
        if present.contains(&CONNECT_PORTS_ON) {
            map.remove(&CONNECT_PORTS_ON).map_err(map_error)?;
        }
        for key in present.into_iter().filter(|k| *k != CONNECT_PORTS_ON) {
            map.remove(&key).map_err(map_error)?;
        }
        return Ok(());
    };
    if ports.len() > MAX_CONNECT_PORTS as usize {
        return Err(LoaderError::Prefixes(PrefixError::TooManyPorts { count: ports.len(), max: MAX_CONNECT_PORTS }));
    }
    let wanted: std::collections::BTreeSet<u32> = ports.iter().map(|&p| u32::from(p)).collect();
    for port in &wanted {
        map.insert(port, 1, 0).map_err(map_error)?;
    }
    map.insert(CONNECT_PORTS_ON, 1, 0).map_err(map_error)?;
    for key in present.into_iter().filter(|k| *k != CONNECT_PORTS_ON && !wanted.contains(k)) {
        map.remove(&key).map_err(map_error)?;
    }
    Ok(())
}

/// The open prefilter as its kernel maps hold it (`OpenKernelFilter::kernel_entries` in the
/// rules makes it): `OPEN_CLASS_*` masks for any path and for paths with a hidden component,
/// and LPM entries (bytes, at most `SENSITIVE_PREFIX_LEN`; suffixes reversed) with the classes
/// they admit, each already holding the classes of its shorter entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenFilterMaps {
    pub any_path: u32,
    pub hidden: u32,
    pub prefixes: Vec<(Vec<u8>, u32)>,
    pub suffixes: Vec<(Vec<u8>, u32)>,
}

/// Replaces the open prefilter derived from the pack's open rules; `None` turns it off (the
/// declared quiet prefixes apply again). It goes off while its entries change and on once they
/// are all in, so no open a new rule admits is kept in the meantime by a half-written filter.
pub fn set_open_filter(ebpf: &mut Ebpf, filter: Option<&OpenFilterMaps>) -> Result<(), LoaderError> {
    let slot = |ebpf: &mut Ebpf, index: u32, value: u32| -> Result<(), LoaderError> {
        let map = ebpf.map_mut(MAP_OPEN_FILTER).ok_or(LoaderError::MissingMap(MAP_OPEN_FILTER))?;
        let mut array: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|source| LoaderError::Map { name: MAP_OPEN_FILTER, source })?;
        array.set(index, value, 0).map_err(|source| LoaderError::Map { name: MAP_OPEN_FILTER, source })
    };
    slot(ebpf, OPEN_FILTER_ON, 0)?;
    let empty = OpenFilterMaps::default();
    let maps = filter.unwrap_or(&empty);
    for (name, entries) in [(MAP_OPEN_FILTER_PREFIXES, &maps.prefixes), (MAP_OPEN_FILTER_SUFFIXES, &maps.suffixes)] {
        if entries.len() > MAX_OPEN_FILTER_ENTRIES as usize {
            return Err(LoaderError::Prefixes(PrefixError::TooManyOpenFilterEntries { count: entries.len(), max: MAX_OPEN_FILTER_ENTRIES }));
        }
        let mut wanted = std::collections::BTreeMap::new();
        for (bytes, classes) in entries {
            let len = bytes.len().min(SENSITIVE_PREFIX_LEN);
            let mut data = [0u8; SENSITIVE_PREFIX_LEN];
            data[..len].copy_from_slice(&bytes[..len]);
            *wanted.entry(((len * 8) as u32, data)).or_insert(0) |= *classes;
        }
        let map = ebpf.map_mut(name).ok_or(LoaderError::MissingMap(name))?;
        let mut trie: LpmTrie<&mut MapData, PathPrefix, u32> =
            LpmTrie::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
        let present: Vec<(u32, [u8; SENSITIVE_PREFIX_LEN])> =
            trie.keys().filter_map(Result::ok).map(|k| (k.prefix_len(), k.data().bytes)).collect();
        for ((bits, bytes), classes) in &wanted {
            trie.insert(&LpmKey::new(*bits, PathPrefix { bytes: *bytes }), classes, 0).map_err(|source| LoaderError::Map { name, source })?;
        }
        for (bits, bytes) in present.into_iter().filter(|k| !wanted.contains_key(k)) {
            match trie.remove(&LpmKey::new(bits, PathPrefix { bytes })) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(LoaderError::Map { name, source }),
            }
        }
    }
    let suffix_classes = maps.suffixes.iter().fold(0, |acc, (_, c)| acc | c);
    slot(ebpf, OPEN_FILTER_ANY_PATH, maps.any_path)?;
    slot(ebpf, OPEN_FILTER_HIDDEN, maps.hidden)?;
    slot(ebpf, OPEN_FILTER_SUFFIX_CLASSES, suffix_classes)?;
    if filter.is_some() {
        slot(ebpf, OPEN_FILTER_ON, 1)?;
    }
    Ok(())
}

fn set_prefixes(ebpf: &mut Ebpf, map_name: &'static str, prefixes: &[String], may_cut: bool) -> Result<(), LoaderError> {
    if prefixes.len() > MAX_SENSITIVE_PREFIXES as usize {
        return Err(LoaderError::Prefixes(PrefixError::TooMany { count: prefixes.len(), max: MAX_SENSITIVE_PREFIXES }));
    }
    let mut wanted = std::collections::BTreeSet::new();
    for prefix in prefixes {
        if !prefix.starts_with('/') {
            return Err(LoaderError::Prefixes(PrefixError::NotAbsolute(prefix.clone())));
        }
        let bytes = prefix.as_bytes();
        if !may_cut && bytes.len() > SENSITIVE_PREFIX_LEN {
            return Err(LoaderError::Prefixes(PrefixError::TooLong(prefix.clone())));
        }
        let len = bytes.len().min(SENSITIVE_PREFIX_LEN);
        let mut data = PathPrefix { bytes: [0; SENSITIVE_PREFIX_LEN] };
        data.bytes[..len].copy_from_slice(&bytes[..len]);
        wanted.insert(((len * 8) as u32, data.bytes));
    }
    let map = ebpf.map_mut(map_name).ok_or(LoaderError::MissingMap(map_name))?;
    let mut trie: LpmTrie<&mut MapData, PathPrefix, u32> =
        LpmTrie::try_from(map).map_err(|source| LoaderError::Map { name: map_name, source })?;
    let present: Vec<(u32, [u8; SENSITIVE_PREFIX_LEN])> = trie
        .keys()
        .filter_map(Result::ok)
        .map(|k| (k.prefix_len(), k.data().bytes))
        .collect();
    for (bits, bytes) in &wanted {
        trie.insert(&LpmKey::new(*bits, PathPrefix { bytes: *bytes }), 1, 0)
            .map_err(|source| LoaderError::Map { name: map_name, source })?;
    }
    for (bits, bytes) in present.into_iter().filter(|k| !wanted.contains(k)) {
        match trie.remove(&LpmKey::new(bits, PathPrefix { bytes })) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(LoaderError::Map { name: map_name, source }),
        }
    }
    Ok(())
}

/// Why a pod's events did not reach user space the normal way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// A ring buffer had no room.
    RingFull,
    /// The pod was over its budget of high-volume events.
    PodBudget,
    /// Not a loss: protected events past the pod's priority share that went through the bulk
    /// ring instead.
    Demoted,
    /// User space: the queue to the pipeline was full.
    QueueFull,
}

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::RingFull => "ring_full",
            LossReason::PodBudget => "pod_budget",
            LossReason::Demoted => "demoted",
            LossReason::QueueFull => "queue_full",
        }
    }

    /// Whether events counted under this reason are gone.
    pub fn is_loss(self) -> bool {
        self != LossReason::Demoted
    }
}

/// One counter of events that did not reach user space the normal way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LossKey {
    pub cgroup_id: u64,
    pub kind: EventKind,
    pub reason: LossReason,
    /// The events were protected ones (a protected kind, a sensitive open, a dup onto stdio).
    pub protected: bool,
}

/// Per (pod cgroup, kind, reason) totals from the kernel, summed over CPUs. Kinds the user side
/// does not know are skipped.
pub fn read_pod_losses(ebpf: &Ebpf) -> Result<BTreeMap<LossKey, u64>, LoaderError> {
    let map = ebpf.map(MAP_POD_LOSSES).ok_or(LoaderError::MissingMap(MAP_POD_LOSSES))?;
    let hash: PerCpuHashMap<&MapData, PodLossKey, u64> =
        PerCpuHashMap::try_from(map).map_err(|source| LoaderError::Map { name: MAP_POD_LOSSES, source })?;
    let mut out = BTreeMap::new();
    for entry in hash.iter() {
        let (key, values) = entry.map_err(|source| LoaderError::Map { name: MAP_POD_LOSSES, source })?;
        let Ok(kind) = EventKind::try_from(key.kind) else { continue };
        let reason = match key.reason & !LOSS_PROTECTED {
            LOSS_RING_FULL => LossReason::RingFull,
            LOSS_BUDGET => LossReason::PodBudget,
            LOSS_DEMOTED => LossReason::Demoted,
            _ => continue,
        };
        let protected = key.reason & LOSS_PROTECTED != 0 || reason == LossReason::Demoted;
        let key = LossKey { cgroup_id: key.cgroup_id, kind, reason, protected };
        *out.entry(key).or_insert(0) += values.iter().sum::<u64>();
    }
    Ok(out)
}

/// Sets which event kinds the kernel emits.
pub fn set_enabled_kinds(ebpf: &mut Ebpf, kinds: &[EventKind]) -> Result<(), LoaderError> {
    let map = ebpf.map_mut(MAP_ENABLED_KINDS).ok_or(LoaderError::MissingMap(MAP_ENABLED_KINDS))?;
    let mut array: Array<&mut MapData, u32> =
        Array::try_from(map).map_err(|source| LoaderError::Map { name: MAP_ENABLED_KINDS, source })?;
    for raw in 1..KIND_COUNT {
        let on = EventKind::try_from(raw).map(|k| kinds.contains(&k)).unwrap_or(false);
        array.set(raw, u32::from(on), 0).map_err(|source| LoaderError::Map { name: MAP_ENABLED_KINDS, source })?;
    }
    Ok(())
}

/// Adds a cgroup (by id) to the monitored set.
pub fn monitor_cgroup(ebpf: &mut Ebpf, cgroup_id: u64, slot: u32) -> Result<(), LoaderError> {
    let map = ebpf.map_mut(MAP_MONITORED_CGROUPS).ok_or(LoaderError::MissingMap(MAP_MONITORED_CGROUPS))?;
    let mut hash: BpfHashMap<&mut MapData, u64, u32> =
        BpfHashMap::try_from(map).map_err(|source| LoaderError::Map { name: MAP_MONITORED_CGROUPS, source })?;
    hash.insert(cgroup_id, slot, 0).map_err(|source| LoaderError::Map { name: MAP_MONITORED_CGROUPS, source })
}

pub fn unmonitor_cgroup(ebpf: &mut Ebpf, cgroup_id: u64) -> Result<(), LoaderError> {
    let map = ebpf.map_mut(MAP_MONITORED_CGROUPS).ok_or(LoaderError::MissingMap(MAP_MONITORED_CGROUPS))?;
    let mut hash: BpfHashMap<&mut MapData, u64, u32> =
        BpfHashMap::try_from(map).map_err(|source| LoaderError::Map { name: MAP_MONITORED_CGROUPS, source })?;
    match hash.remove(&cgroup_id) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(LoaderError::Map { name: MAP_MONITORED_CGROUPS, source }),
    }
}

/// Emitted and lost counts per kind, summed over CPUs.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KindCounters {
    pub emitted: BTreeMap<String, u64>,
    pub lost: BTreeMap<String, u64>,
    /// Kept in the kernel by the rule pack's prefilter (no rule could match them).
    pub prefiltered: BTreeMap<String, u64>,
}

pub fn read_counters(ebpf: &Ebpf) -> Result<KindCounters, LoaderError> {
    Ok(KindCounters {
        emitted: sum_per_kind(ebpf, MAP_EVENT_COUNTS)?,
        lost: sum_per_kind(ebpf, MAP_LOST_COUNTS)?,
        prefiltered: sum_per_kind(ebpf, MAP_PREFILTERED_COUNTS)?,
    })
}

fn sum_per_kind(ebpf: &Ebpf, name: &'static str) -> Result<BTreeMap<String, u64>, LoaderError> {
    let map = ebpf.map(name).ok_or(LoaderError::MissingMap(name))?;
    let array: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|source| LoaderError::Map { name, source })?;
    let mut out = BTreeMap::new();
    for raw in 1..KIND_COUNT {
        let Ok(kind) = EventKind::try_from(raw) else { continue };
        let values = array.get(&raw, 0).map_err(|source| LoaderError::Map { name, source })?;
        out.insert(kind.as_str().to_string(), values.iter().sum());
    }
    Ok(out)
}

pub use crate::sys::cgroup_id;
