//! Syscall events. At the entry, the filters are applied and the raw arguments stashed per
//! thread; the exit tracepoint builds the record with the result (user memory is still there).
//! The entries are seen by one raw sys_enter dispatcher (`raw_sys_enter`: no trace record for
//! the processes palisade does not watch), or, where the loader is told so, by the
//! per-syscall enter tracepoints (`enter!`). Module syscalls have no per-syscall tracepoints on
//! kernels without CONFIG_MODULES (this one): their attempts are reported at entry, with the
//! ENOSYS they get (with a raw sys_exit too only where the kernel can load modules, so the
//! result is not known in advance).

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use palisade_common::*;

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::common::{
    PENDING_SYSCALLS, config, count_emitted, current_fd_kind, current_ids, current_tid, fill_header,
    PREFILTERED_COUNTS, connect_is_quiet, count, kind_is_protected, open_is_quiet, open_path_is_sensitive, output_routed, read_user_str, read_user_str_len,
    mark_base_dir, resolve_open, resolved_path_is_sensitive,
    should_report, syscall_arg, syscall_ret,
};
use crate::reserve_or_count;

/// Stashes a syscall's arguments at enter when its kind is on and the task is watched.
#[inline(always)]
fn stash(ctx: &TracePointContext, kind: u32, op: u32) {
    stash_args(
        kind,
        op,
        [
            syscall_arg(ctx, 0),
            syscall_arg(ctx, 1),
            syscall_arg(ctx, 2),
            syscall_arg(ctx, 3),
            syscall_arg(ctx, 4),
            syscall_arg(ctx, 5),
        ],
    );
}

#[inline(always)]
fn stash_args(kind: u32, op: u32, args: [u64; 6]) {
    let Some((cgroup_id, _)) = should_report(kind) else {
        return;
    };
    let pending = PendingSyscall { kind, op, cgroup_id, args };
    let _ = PENDING_SYSCALLS.insert(&current_tid(), &pending, 0);
}

// ---- the raw sys_enter dispatcher -----------------------------------------------------------
// One raw tracepoint at the entry of every syscall stands in for the per-syscall enter
// tracepoints (as in Falco and Tracee): a classic syscall tracepoint builds its trace record
// (buffer, arguments) before its program's first check, so every process on the node paid that
// for each probed syscall; the raw tracepoint skips the record, and a syscall nobody probes
// costs one switch on its number. The exits stay per-syscall tracepoints: they run only for
// probed syscalls, while a raw sys_exit would run for all. (Exec keeps its enter tracepoint:
// its argv capture is a program of its own, and execs are rare.)

/// x86_64 syscall numbers (arch ABI, stable).
const NR_OPEN: u64 = 2;
const NR_DUP2: u64 = 33;
const NR_CONNECT: u64 = 42;
const NR_TRUNCATE: u64 = 76;
const NR_FTRUNCATE: u64 = 77;
const NR_CREAT: u64 = 85;
const NR_RENAME: u64 = 82;
const NR_RMDIR: u64 = 84;
const NR_UNLINK: u64 = 87;
const NR_CHMOD: u64 = 90;
const NR_FCHMOD: u64 = 91;
const NR_PTRACE: u64 = 101;
const NR_SETUID: u64 = 105;
const NR_SETGID: u64 = 106;
const NR_SETREUID: u64 = 113;
const NR_SETREGID: u64 = 114;
const NR_SETRESUID: u64 = 117;
const NR_SETRESGID: u64 = 119;
const NR_CAPSET: u64 = 126;
const NR_MOUNT: u64 = 165;
const NR_UMOUNT2: u64 = 166;
const NR_OPENAT: u64 = 257;
const NR_UNLINKAT: u64 = 263;
const NR_RENAMEAT: u64 = 264;
const NR_FCHMODAT: u64 = 268;
const NR_UNSHARE: u64 = 272;
const NR_DUP3: u64 = 292;
const NR_SETNS: u64 = 308;
const NR_RENAMEAT2: u64 = 316;
const NR_MEMFD_CREATE: u64 = 319;
const NR_BPF: u64 = 321;
const NR_OPENAT2: u64 = 437;
const NR_FCHMODAT2: u64 = 452;

/// The dispatched syscall numbers as a bitmap, 64 a word (all below 512): most syscalls are
/// none of them, and one shift and mask says so before the switch below.
const DISPATCHED_BITS: [u64; 8] = {
    let nrs = [
        NR_OPEN, NR_DUP2, NR_CONNECT, NR_TRUNCATE, NR_FTRUNCATE, NR_CREAT, NR_RENAME, NR_RMDIR, NR_UNLINK, NR_CHMOD,
        NR_FCHMOD, NR_PTRACE, NR_SETUID, NR_SETGID, NR_SETREUID, NR_SETREGID, NR_SETRESUID, NR_SETRESGID, NR_CAPSET,
        NR_MOUNT, NR_UMOUNT2, NR_INIT_MODULE, NR_DELETE_MODULE, NR_OPENAT, NR_UNLINKAT, NR_RENAMEAT, NR_FCHMODAT,
        NR_UNSHARE, NR_DUP3, NR_SETNS, NR_FINIT_MODULE, NR_RENAMEAT2, NR_MEMFD_CREATE, NR_BPF, NR_OPENAT2, NR_FCHMODAT2,
    ];
    let mut bits = [0u64; 8];
    let mut i = 0;
    while i < nrs.len() {
        bits[(nrs[i] / 64) as usize] |= 1 << (nrs[i] % 64);
        i += 1;
    }
    bits
};

/// True when `nr` may be dispatched (the bitmap's word for it, as an immediate: no memory).
#[inline(always)]
fn maybe_dispatched(nr: u64) -> bool {
    let word = match nr >> 6 {
        0 => DISPATCHED_BITS[0],
        1 => DISPATCHED_BITS[1],
        2 => DISPATCHED_BITS[2],
        3 => DISPATCHED_BITS[3],
        4 => DISPATCHED_BITS[4],
        5 => DISPATCHED_BITS[5],
        6 => DISPATCHED_BITS[6],
        7 => DISPATCHED_BITS[7],
        _ => 0,
    };
    (word >> (nr & 63)) & 1 != 0
}

/// What a syscall reports as (kind, op), or None for a syscall no program watches. The same
/// pairs the per-syscall enter tracepoints below stash (`enter!` / `enter_cred!`).
#[inline(always)]
fn dispatched(nr: u64) -> Option<(u32, u32)> {
    if !maybe_dispatched(nr) {
        return None;
    }
    Some(match nr {
        NR_OPENAT => (KIND_OPEN, OPEN_OP_OPENAT),
        NR_OPENAT2 => (KIND_OPEN, OPEN_OP_OPENAT2),
        NR_OPEN => (KIND_OPEN, OPEN_OP_OPEN),
        NR_CREAT => (KIND_OPEN, OPEN_OP_CREAT),
        NR_TRUNCATE => (KIND_OPEN, OPEN_OP_TRUNCATE),
        NR_FTRUNCATE => (KIND_OPEN, OPEN_OP_FTRUNCATE),
        NR_CONNECT => (KIND_CONNECT, 0),
        NR_PTRACE => (KIND_PTRACE, 0),
        NR_SETUID => (KIND_CRED, CRED_OP_SETUID),
        NR_SETGID => (KIND_CRED, CRED_OP_SETGID),
        NR_SETREUID => (KIND_CRED, CRED_OP_SETREUID),
        NR_SETREGID => (KIND_CRED, CRED_OP_SETREGID),
        NR_SETRESUID => (KIND_CRED, CRED_OP_SETRESUID),
        NR_SETRESGID => (KIND_CRED, CRED_OP_SETRESGID),
        NR_CAPSET => (KIND_CRED, CRED_OP_CAPSET),
        NR_MOUNT => (KIND_MOUNT, MOUNT_OP_MOUNT),
        NR_UMOUNT2 => (KIND_MOUNT, MOUNT_OP_UMOUNT),
        NR_UNSHARE => (KIND_NAMESPACE, NS_OP_UNSHARE),
        NR_SETNS => (KIND_NAMESPACE, NS_OP_SETNS),
        NR_BPF => (KIND_BPF, 0),
        NR_MEMFD_CREATE => (KIND_MEMFD, 0),
        NR_CHMOD => (KIND_CHMOD, CHMOD_OP_CHMOD),
        NR_FCHMOD => (KIND_CHMOD, CHMOD_OP_FCHMOD),
        NR_FCHMODAT | NR_FCHMODAT2 => (KIND_CHMOD, CHMOD_OP_FCHMODAT),
        NR_UNLINKAT => (KIND_UNLINK, UNLINK_OP_UNLINKAT),
        NR_UNLINK => (KIND_UNLINK, UNLINK_OP_UNLINK),
        NR_RMDIR => (KIND_UNLINK, UNLINK_OP_RMDIR),
        NR_RENAMEAT2 => (KIND_RENAME, RENAME_OP_RENAMEAT2),
        NR_RENAMEAT => (KIND_RENAME, RENAME_OP_RENAMEAT),
        NR_RENAME => (KIND_RENAME, RENAME_OP_RENAME),
        NR_DUP2 => (KIND_DUP, DUP_OP_DUP2),
        NR_DUP3 => (KIND_DUP, DUP_OP_DUP3),
        NR_INIT_MODULE => (KIND_MODULE, MODULE_OP_INIT),
        NR_FINIT_MODULE => (KIND_MODULE, MODULE_OP_FINIT),
        NR_DELETE_MODULE => (KIND_MODULE, MODULE_OP_DELETE),
        _ => return None,
    })
}

/// The six arguments of the syscall being entered, from its `struct pt_regs` in one read
/// (r10, r9, r8, ax, cx, dx, si, di lie in that order from PT_REGS_R10); zeros if unreadable.
#[inline(always)]
fn regs_args(regs: *const u8) -> [u64; 6] {
    let r: [u64; 8] = unsafe { bpf_probe_read_kernel(regs.wrapping_add(PT_REGS_R10) as *const [u64; 8]) }.unwrap_or([0; 8]);
    // di, si, dx, r10, r8, r9
    [r[7], r[6], r[5], r[0], r[2], r[1]]
}

/// True when the current syscall came in through the 32-bit entry (int 0x80 or a compat
/// task): its number is from the ia32 table (175 is rt_sigprocmask there, not init_module).
/// The per-syscall tracepoints skip such syscalls (the kernel gives them no number), so the
/// dispatcher does too. Unknown (no BTF offset): false.
#[inline(always)]
fn in_compat_syscall(cfg: &palisade_common::ProbeConfig) -> bool {
    const TS_COMPAT: u32 = 0x0002;
    if cfg.off_task_thread_status == 0 {
        return false;
    }
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() } as *const u8;
    let status: u32 = unsafe { bpf_probe_read_kernel(task.wrapping_add(cfg.off_task_thread_status as usize) as *const u32) }.unwrap_or(0);
    status & TS_COMPAT != 0
}

/// The dispatcher: a probed syscall of a watched task is stashed for its exit tracepoint, as
/// its enter tracepoint would; with `MODULE_ATTEMPTS` (a kernel without module support) a
/// module syscall is reported here, with the ENOSYS it gets (see raw_sys_enter_module_attempt).
#[inline(always)]
fn dispatch_enter<const MODULE_ATTEMPTS: bool>(ctx: &RawTracePointContext) {
    // TP_PROTO(struct pt_regs *regs, long id)
    let nr: u64 = ctx.arg(1);
    let Some((kind, op)) = dispatched(nr) else { return };
    // The one check every process pays for a probed syscall: is the kind on and the task watched.
    let Some((cgroup_id, cfg)) = should_report(kind) else { return };
    if in_compat_syscall(cfg) {
        return;
    }
    let regs: *const u8 = ctx.arg(0);
    let mut args = open_args(op, regs_args(regs));
    if kind == KIND_CRED {
        // The credentials before the call in args[4..6] (see enter_cred!).
        let [uid, gid, euid, egid] = current_ids(cfg);
        args[3] = 0;
        args[4] = u64::from(uid) | (u64::from(gid) << 32);
        args[5] = u64::from(euid) | (u64::from(egid) << 32);
    }
    let pending = PendingSyscall { kind, op, cgroup_id, args };
    if PENDING_SYSCALLS.insert(&current_tid(), &pending, 0).is_err() {
        return;
    }
    if MODULE_ATTEMPTS && kind == KIND_MODULE {
        let _ = emit_module(ENOSYS_RET);
    }
}

/// The dispatcher where module syscalls have exits to report at (their tracepoints, or the
/// raw sys_exit fallback).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter(ctx: RawTracePointContext) -> i32 {
    dispatch_enter::<false>(&ctx);
    0
}

/// The dispatcher on a kernel that cannot load modules: module attempts reported at entry.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter_attempts(ctx: RawTracePointContext) -> i32 {
    dispatch_enter::<true>(&ctx);
    0
}

/// Takes this thread's stashed syscall if it is of `kind`.
#[inline(always)]
fn take(kind: u32) -> Option<PendingSyscall> {
    let tid = current_tid();
    let pending = unsafe { PENDING_SYSCALLS.get(&tid) }.copied()?;
    let _ = PENDING_SYSCALLS.remove(&tid);
    if pending.kind == kind { Some(pending) } else { None }
}

/// True when this thread is inside a syscall the tracepoints report as `kind` (the kprobes use
/// it to avoid reporting the same operation twice).
#[inline(always)]
pub fn in_reported_syscall(kind: u32) -> bool {
    matches!(unsafe { PENDING_SYSCALLS.get(&current_tid()) }, Some(p) if p.kind == kind)
}

macro_rules! enter {
    ($name:ident, $kind:expr, $op:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            stash(&ctx, $kind, $op);
            0
        }
    };
}

macro_rules! exit {
    ($name:ident, $emit:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let ret = syscall_ret(&ctx);
            let _ = $emit(ret);
            0
        }
    };
}

/// Reserve on the ring the event's route says, fill the header from the stashed syscall, run
/// `$body` on the record, submit. `protected($p)` says whether this event takes the priority
/// path (by default: whether its kind does).
macro_rules! emit {
    ($ty:ty, $kind:expr, $ret:ident, |$ev:ident, $p:ident| $body:block) => {
        emit!($ty, $kind, $ret, protected(_pending) = kind_is_protected($kind), |$ev, $p| $body)
    };
    ($ty:ty, $kind:expr, $ret:ident, protected($pp:ident) = $protected:expr, |$ev:ident, $p:ident| $body:block) => {{
        let Some($p) = take($kind) else { return Ok(()) };
        let Some(cfg) = config() else { return Ok(()) };
        let $pp = &$p;
        let protected: bool = $protected;
        let mut entry = reserve_or_count!($ty, $kind, cfg, $p.cgroup_id, protected);
        let $ev = entry.as_mut_ptr();
        unsafe {
            fill_header(&mut (*$ev).header, $kind, $p.cgroup_id, cfg);
            $body
        }
        let _ = $ret;
        entry.submit();
        count_emitted($kind);
        Ok(())
    }};
}

// ---- open ----------------------------------------------------------------------------------
enter!(sys_enter_openat, KIND_OPEN, OPEN_OP_OPENAT);
enter!(sys_enter_openat2, KIND_OPEN, OPEN_OP_OPENAT2);
exit!(sys_exit_openat, emit_open);
exit!(sys_exit_openat2, emit_open);

/// Opens are built in per-CPU scratch: which ring one takes depends on its path.
#[map]
static OPEN_SCRATCH: PerCpuArray<OpenEvent> = PerCpuArray::with_max_entries(1, 0);

const ENOENT: i64 = 2;

/// Bits of the argument's verdict, kept in the record's padding while the walk runs.
const ARG_PROTECTED: u32 = 1;
/// The argument can be judged by its text: not empty, not cut, no trailing `/`.
const ARG_NAMED: u32 = 2;

fn emit_open(ret: i64) -> Result<(), i64> {
    let Some(p) = take(KIND_OPEN) else { return Ok(()) };
    let Some(cfg) = config() else { return Ok(()) };
    let ev = OPEN_SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    unsafe {
        fill_header(&mut (*ev).header, KIND_OPEN, p.cgroup_id, cfg);
        (*ev).op = p.op;
        (*ev).dirfd = p.args[0] as i32;
        (*ev).ret = ret;
        if p.op == OPEN_OP_OPENAT2 {
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let how = p.args[2] as *const u64;
            (*ev).flags = bpf_probe_read_user(how).unwrap_or(0) as u32;
            (*ev).mode = bpf_probe_read_user(how.add(1)).unwrap_or(0) as u32;
        } else {
            (*ev).flags = p.args[2] as u32;
            (*ev).mode = p.args[3] as u32;
        }
        let len = read_user_str_len(&mut (*ev).path, p.args[1]);
        if len == PATH_LEN as i64 {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
        // The argument's verdict first (what routing falls back to when nothing is resolved),
        // parked in the record: the verifier then carries no value of it through the walk, which
        // would otherwise be walked once per branch taken here.
        let protected = open_path_is_sensitive(&(*ev).path, len);
        // Named: not empty, not cut, not ending in `/` (the text then says what rules compare).
        let named = len > 1 && len < PATH_LEN as i64 && (*ev).path[((len - 2) as usize) & (PATH_LEN - 1)] != b'/';
        let verdict = if protected { ARG_PROTECTED } else { 0 } | if named { ARG_NAMED } else { 0 };
        core::ptr::write_volatile(&mut (*ev)._pad, verdict);
        // The file the kernel opened (or, for a failed relative open, the directory it was
        // looked up in), named by a dentry walk now: `..`, symlinks, dirfds, /proc/self/root
        // and bind mounts all end at the real file.
        let relative = len > 1 && (*ev).path[0] != b'/';
        resolve_open(ret, (*ev).dirfd, relative, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
    }
    // Read back from the record, not kept in registers across the walk (see resolve_open).
    let ret = unsafe { core::ptr::read_volatile(&(*ev).ret) };
    if ret < 0 {
        unsafe { mark_base_dir(&mut (*ev).resolved_flags) };
    }
    let resolved_flags = unsafe { core::ptr::read_volatile(&(*ev).resolved_flags) };
    let verdict = unsafe { core::ptr::read_volatile(&(*ev)._pad) };
    unsafe { (*ev)._pad = 0 };
    // Routing and the pack's prefilter judge the resolved file when there is one; otherwise the
    // argument, with everything the kernel cannot judge by its text protected. A failed open
    // other than ENOENT (EACCES on /etc/shadow through a symlink) is never filtered: nothing
    // names the object it was refused.
    let canonical = resolved_flags & PATH_RESOLVED != 0 && resolved_flags & (PATH_CUT | PATH_BASE_DIR) == 0;
    let (protected, judged) = if canonical {
        (resolved_path_is_sensitive(unsafe { &(*ev).resolved }), Some(unsafe { &(*ev).resolved }))
    } else {
        let named = ret == -ENOENT && verdict & ARG_NAMED != 0;
        (verdict & ARG_PROTECTED != 0, if named { Some(unsafe { &(*ev).path }) } else { None })
    };
    // One call site for both paths: the filter's loops are verified once.
    let quiet = match judged {
        Some(path) if !protected => open_is_quiet(path, unsafe { (*ev).flags }),
        _ => false,
    };
    if quiet {
        count(&PREFILTERED_COUNTS, KIND_OPEN);
        return Ok(());
    }
    if output_routed(cfg, p.cgroup_id, KIND_OPEN, protected, unsafe { &*ev }) {
        count_emitted(KIND_OPEN);
    }
    Ok(())
}

// ---- open / creat --------------------------------------------------------------------------
// The old open(2) and creat(2) (musl's open() and creat() on x86_64, so most Alpine-based
// images) stashed in openat's shape, so one exit path builds every open.
#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    stash_args(KIND_OPEN, OPEN_OP_OPEN, open_args(OPEN_OP_OPEN, [syscall_arg(&ctx, 0), syscall_arg(&ctx, 1), syscall_arg(&ctx, 2), 0, 0, 0]));
    0
}

#[tracepoint]
pub fn sys_enter_creat(ctx: TracePointContext) -> u32 {
    stash_args(KIND_OPEN, OPEN_OP_CREAT, open_args(OPEN_OP_CREAT, [syscall_arg(&ctx, 0), syscall_arg(&ctx, 1), 0, 0, 0, 0]));
    0
}

exit!(sys_exit_open, emit_open);
exit!(sys_exit_creat, emit_open);

/// open(path, flags, mode) and creat(path, mode) as openat(AT_FDCWD, path, flags, mode); any
/// other syscall's arguments as they are.
#[inline(always)]
fn open_args(op: u32, args: [u64; 6]) -> [u64; 6] {
    const O_CREAT_WRONLY_TRUNC: u64 = 0o100 | 0o1 | 0o1000;
    let at_fdcwd = AT_FDCWD as i64 as u64;
    match op {
        OPEN_OP_OPEN => [at_fdcwd, args[0], args[1], args[2], 0, 0],
        OPEN_OP_CREAT => [at_fdcwd, args[0], O_CREAT_WRONLY_TRUNC, args[1], 0, 0],
        _ => args,
    }
}

// ---- truncate / ftruncate ------------------------------------------------------------------
// Shortening a file without an open that says so (`truncate -s0`: open without O_TRUNC, then
// ftruncate). Reported as opens with op truncate/ftruncate and flags O_WRONLY|O_TRUNC, so
// every rule on writes and truncation sees them (DESIGN: one record per object access).
enter!(sys_enter_truncate, KIND_OPEN, OPEN_OP_TRUNCATE);
enter!(sys_enter_ftruncate, KIND_OPEN, OPEN_OP_FTRUNCATE);
exit!(sys_exit_truncate, emit_truncate);
exit!(sys_exit_ftruncate, emit_truncate);

const O_WRONLY_TRUNC: u32 = 0o1 | 0o1000;

fn emit_truncate(ret: i64) -> Result<(), i64> {
    let Some(p) = take(KIND_OPEN) else { return Ok(()) };
    let Some(cfg) = config() else { return Ok(()) };
    let ev = OPEN_SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    unsafe {
        fill_header(&mut (*ev).header, KIND_OPEN, p.cgroup_id, cfg);
        (*ev).op = p.op;
        (*ev).ret = ret;
        (*ev).flags = O_WRONLY_TRUNC;
        (*ev).mode = 0;
        (*ev)._pad = 0;
        if p.op == OPEN_OP_FTRUNCATE {
            // The descriptor's file, whatever the call's result: it names what was (or was to
            // be) shortened.
            (*ev).dirfd = p.args[0] as i32;
            (*ev).path[0] = 0;
            resolve_open(p.args[0] as i64, AT_FDCWD, false, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
        } else {
            (*ev).dirfd = AT_FDCWD;
            let len = read_user_str_len(&mut (*ev).path, p.args[0]);
            if len == PATH_LEN as i64 {
                (*ev).header.flags |= FLAG_TRUNCATED;
            }
            // Parked in the record across the walk (see emit_open).
            core::ptr::write_volatile(&mut (*ev)._pad, if len > 0 { len as u32 } else { 0 });
            // No descriptor at exit: a relative argument gets the directory it was looked up
            // in (joined in user space, lexically); an absolute one stays unresolved.
            let relative = len > 1 && (*ev).path[0] != b'/';
            resolve_open(-1, AT_FDCWD, relative, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
            mark_base_dir(&mut (*ev).resolved_flags);
        }
    }
    let resolved_flags = unsafe { core::ptr::read_volatile(&(*ev).resolved_flags) };
    let len = unsafe { core::ptr::read_volatile(&(*ev)._pad) } as i64;
    unsafe { (*ev)._pad = 0 };
    // Routing only (a truncation is a write: the pack's quiet prefixes never apply). The
    // resolved file when there is one, else the argument; an unresolved relative argument is
    // protected, as for a failed open.
    let protected = if resolved_flags & PATH_RESOLVED != 0 && resolved_flags & (PATH_CUT | PATH_BASE_DIR) == 0 {
        resolved_path_is_sensitive(unsafe { &(*ev).resolved })
    } else {
        // An empty path (ftruncate of a descriptor that named nothing) is protected too.
        len <= 1 || open_path_is_sensitive(unsafe { &(*ev).path }, len)
    };
    if output_routed(cfg, p.cgroup_id, KIND_OPEN, protected, unsafe { &*ev }) {
        count_emitted(KIND_OPEN);
    }
    Ok(())
}

// ---- connect -------------------------------------------------------------------------------
enter!(sys_enter_connect, KIND_CONNECT, 0);
exit!(sys_exit_connect, emit_connect);

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

fn emit_connect(ret: i64) -> Result<(), i64> {
    if connect_prefiltered() {
        return Ok(());
    }
    emit!(ConnectEvent, KIND_CONNECT, ret, |ev, p| {
        (*ev).fd = p.args[0] as i32;
        (*ev).ret = ret as i32;
        (*ev)._pad = 0;
        read_sockaddr(ev, p.args[1] as *const u8, p.args[2] as u32, false);
    })
}

/// The pack's connect prefilter, before anything is reserved: when this thread's connect is
/// one no rule can match (`connect_is_quiet`), it is taken, counted as prefiltered and dropped.
#[inline(always)]
fn connect_prefiltered() -> bool {
    let tid = current_tid();
    let Some(p) = (unsafe { PENDING_SYSCALLS.get(&tid) }).copied() else { return false };
    if p.kind != KIND_CONNECT {
        return false;
    }
    let sa = p.args[1] as *const u8;
    let family: u16 = unsafe { bpf_probe_read_user(sa as *const u16) }.unwrap_or(0);
    let port = u16::from_be(unsafe { bpf_probe_read_user(sa.wrapping_add(2) as *const u16) }.unwrap_or(0));
    if !connect_is_quiet(family, port) {
        return false;
    }
    let _ = PENDING_SYSCALLS.remove(&tid);
    count(&PREFILTERED_COUNTS, KIND_CONNECT);
    true
}

/// Fills family/port/addr/unix_path from a sockaddr in user (`kernel == false`) or kernel memory.
#[inline(always)]
pub unsafe fn read_sockaddr(ev: *mut ConnectEvent, sa: *const u8, len: u32, kernel: bool) {
    use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user_buf};
    unsafe {
        (*ev).addr = [0u8; 16];
        (*ev).unix_path[0] = 0;
        (*ev).port = 0;
        let family: u16 = if kernel {
            bpf_probe_read_kernel(sa as *const u16).unwrap_or(0)
        } else {
            bpf_probe_read_user(sa as *const u16).unwrap_or(0)
        };
        (*ev).family = family;
        let port_be: u16 = if kernel {
            bpf_probe_read_kernel(sa.add(2) as *const u16).unwrap_or(0)
        } else {
            bpf_probe_read_user(sa.add(2) as *const u16).unwrap_or(0)
        };
        match family {
            AF_INET => {
                (*ev).port = u16::from_be(port_be);
                let dst = &mut (&mut (*ev).addr)[..4];
                let _ = if kernel {
                    bpf_probe_read_kernel_buf(sa.add(4), dst)
                } else {
                    bpf_probe_read_user_buf(sa.add(4), dst)
                };
            }
            AF_INET6 => {
                (*ev).port = u16::from_be(port_be);
                let dst = &mut (*ev).addr;
                let _ = if kernel {
                    bpf_probe_read_kernel_buf(sa.add(8), dst)
                } else {
                    bpf_probe_read_user_buf(sa.add(8), dst)
                };
            }
            AF_UNIX if !kernel && len > 2 => {
                // sun_path may not be NUL-terminated and abstract names start with NUL: copy bytes.
                let _ = bpf_probe_read_user_buf(sa.add(2), &mut (&mut (*ev).unix_path)[..108]);
                (*ev).unix_path[108] = 0;
            }
            _ => {}
        }
    }
}

// ---- ptrace --------------------------------------------------------------------------------
enter!(sys_enter_ptrace, KIND_PTRACE, 0);
exit!(sys_exit_ptrace, emit_ptrace);

fn emit_ptrace(ret: i64) -> Result<(), i64> {
    emit!(PtraceEvent, KIND_PTRACE, ret, |ev, p| {
        (*ev).request = p.args[0] as i64;
        (*ev).target_pid = p.args[1] as i32;
        (*ev)._pad = 0;
        (*ev).addr = p.args[2];
        (*ev).ret = ret;
    })
}

// ---- credentials ---------------------------------------------------------------------------
/// Like `enter!`, plus the credentials before the call in args[4..6] (these syscalls take at
/// most three arguments): the header at exit only shows them after.
macro_rules! enter_cred {
    ($name:ident, $op:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let Some(cfg) = config() else { return 0 };
            let [uid, gid, euid, egid] = current_ids(cfg);
            stash_args(
                KIND_CRED,
                $op,
                [
                    syscall_arg(&ctx, 0),
                    syscall_arg(&ctx, 1),
                    syscall_arg(&ctx, 2),
                    0,
                    u64::from(uid) | (u64::from(gid) << 32),
                    u64::from(euid) | (u64::from(egid) << 32),
                ],
            );
            0
        }
    };
}

enter_cred!(sys_enter_setuid, CRED_OP_SETUID);
enter_cred!(sys_enter_setgid, CRED_OP_SETGID);
enter_cred!(sys_enter_setreuid, CRED_OP_SETREUID);
enter_cred!(sys_enter_setresuid, CRED_OP_SETRESUID);
enter_cred!(sys_enter_setresgid, CRED_OP_SETRESGID);
enter_cred!(sys_enter_setregid, CRED_OP_SETREGID);
enter_cred!(sys_enter_capset, CRED_OP_CAPSET);
exit!(sys_exit_setuid, emit_cred);
exit!(sys_exit_setgid, emit_cred);
exit!(sys_exit_setreuid, emit_cred);
exit!(sys_exit_setresuid, emit_cred);
exit!(sys_exit_setresgid, emit_cred);
exit!(sys_exit_setregid, emit_cred);
exit!(sys_exit_capset, emit_cred);

fn emit_cred(ret: i64) -> Result<(), i64> {
    emit!(CredEvent, KIND_CRED, ret, |ev, p| {
        (*ev).op = p.op;
        (*ev).ret = ret as i32;
        (*ev).cap_effective = 0;
        (*ev).cap_permitted = 0;
        (*ev).cap_inheritable = 0;
        (*ev).old_uid = p.args[4] as u32;
        (*ev).old_gid = (p.args[4] >> 32) as u32;
        (*ev).old_euid = p.args[5] as u32;
        (*ev).old_egid = (p.args[5] >> 32) as u32;
        if p.op == CRED_OP_CAPSET {
            (*ev).args = [0; 4];
            // struct __user_cap_data_struct { u32 effective, permitted, inheritable; } x2 (v3)
            let data = p.args[1] as *const u32;
            if !data.is_null() {
                let lo = |i: usize| bpf_probe_read_user(data.add(i)).unwrap_or(0) as u64;
                (*ev).cap_effective = lo(0) | (lo(3) << 32);
                (*ev).cap_permitted = lo(1) | (lo(4) << 32);
                (*ev).cap_inheritable = lo(2) | (lo(5) << 32);
            }
        } else {
            (*ev).args = [p.args[0] as u32, p.args[1] as u32, p.args[2] as u32, 0];
        }
    })
}

// ---- mount ---------------------------------------------------------------------------------
enter!(sys_enter_mount, KIND_MOUNT, MOUNT_OP_MOUNT);
enter!(sys_enter_umount, KIND_MOUNT, MOUNT_OP_UMOUNT);
exit!(sys_exit_mount, emit_mount);
exit!(sys_exit_umount, emit_mount);

fn emit_mount(ret: i64) -> Result<(), i64> {
    emit!(MountEvent, KIND_MOUNT, ret, |ev, p| {
        (*ev).op = p.op;
        (*ev).ret = ret as i32;
        let mut cut = false;
        if p.op == MOUNT_OP_MOUNT {
            (*ev).flags = p.args[3];
            cut |= read_user_str(&mut (*ev).source, p.args[0]);
            cut |= read_user_str(&mut (*ev).target, p.args[1]);
            cut |= read_user_str(&mut (*ev).fstype, p.args[2]);
        } else {
            (*ev).flags = p.args[1];
            (*ev).source[0] = 0;
            (*ev).fstype[0] = 0;
            cut |= read_user_str(&mut (*ev).target, p.args[0]);
        }
        if cut {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
    })
}

// ---- namespaces ----------------------------------------------------------------------------
enter!(sys_enter_unshare, KIND_NAMESPACE, NS_OP_UNSHARE);
enter!(sys_enter_setns, KIND_NAMESPACE, NS_OP_SETNS);
exit!(sys_exit_unshare, emit_namespace);
exit!(sys_exit_setns, emit_namespace);

fn emit_namespace(ret: i64) -> Result<(), i64> {
    emit!(NamespaceEvent, KIND_NAMESPACE, ret, |ev, p| {
        (*ev).op = p.op;
        (*ev).ret = ret as i32;
        (*ev)._pad = 0;
        if p.op == NS_OP_SETNS {
            (*ev).fd = p.args[0] as i32;
            (*ev).flags = p.args[1];
        } else {
            (*ev).fd = -1;
            (*ev).flags = p.args[0];
        }
    })
}

// ---- kernel modules (raw_syscalls fallback; see the module doc) ------------------------------
const NR_INIT_MODULE: u64 = 175;
const NR_DELETE_MODULE: u64 = 176;
const NR_FINIT_MODULE: u64 = 313;

/// x86_64 `struct pt_regs` offsets (arch ABI, stable): the syscall arguments and orig_ax.
const PT_REGS_DI: usize = 112;
const PT_REGS_SI: usize = 104;
const PT_REGS_DX: usize = 96;
const PT_REGS_R10: usize = 56;
const PT_REGS_R8: usize = 72;
const PT_REGS_R9: usize = 64;
const PT_REGS_ORIG_AX: usize = 120;

#[inline(always)]
fn regs_field(regs: *const u8, offset: usize) -> u64 {
    unsafe { bpf_probe_read_kernel(regs.add(offset) as *const u64) }.unwrap_or(0)
}

// A raw tracepoint, not the classic raw_syscalls tracepoint: it runs on every syscall of every
// process, and the raw form skips building the trace record, which is most of the cost.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter_module(ctx: RawTracePointContext) -> i32 {
    stash_module_call(&ctx);
    0
}

/// -ENOSYS: what every module syscall returns on a kernel built without module support.
const ENOSYS_RET: i64 = -38;

// The fallback where the kernel cannot load modules at all (CONFIG_MODULES off, the reason it
// has no per-syscall module tracepoints): every module syscall fails with ENOSYS, so the attempt
// is reported at entry with that result, and no program runs at the exit of every syscall of
// every process on the node (the user-space loader picks this one or the pair above).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter_module_attempt(ctx: RawTracePointContext) -> i32 {
    if stash_module_call(&ctx) {
        let _ = emit_module(ENOSYS_RET);
    }
    0
}

/// Stashes the arguments of a module syscall (true), or does nothing for any other (false).
#[inline(always)]
fn stash_module_call(ctx: &RawTracePointContext) -> bool {
    // TP_PROTO(struct pt_regs *regs, long id)
    let nr: u64 = ctx.arg(1);
    let op = match nr {
        NR_INIT_MODULE => MODULE_OP_INIT,
        NR_FINIT_MODULE => MODULE_OP_FINIT,
        NR_DELETE_MODULE => MODULE_OP_DELETE,
        _ => return false,
    };
    let regs: *const u8 = ctx.arg(0);
    let args = [PT_REGS_DI, PT_REGS_SI, PT_REGS_DX, PT_REGS_R10, PT_REGS_R8, PT_REGS_R9].map(|off| regs_field(regs, off));
    stash_args(KIND_MODULE, op, args);
    true
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_module(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret); the syscall number is in orig_ax.
    let regs: *const u8 = ctx.arg(0);
    let nr = regs_field(regs, PT_REGS_ORIG_AX);
    if nr != NR_INIT_MODULE && nr != NR_FINIT_MODULE && nr != NR_DELETE_MODULE {
        return 0;
    }
    let ret: i64 = ctx.arg(1);
    let _ = emit_module(ret);
    0
}

enter!(sys_enter_init_module, KIND_MODULE, MODULE_OP_INIT);
enter!(sys_enter_finit_module, KIND_MODULE, MODULE_OP_FINIT);
enter!(sys_enter_delete_module, KIND_MODULE, MODULE_OP_DELETE);
exit!(sys_exit_init_module, emit_module);
exit!(sys_exit_finit_module, emit_module);
exit!(sys_exit_delete_module, emit_module);

fn emit_module(ret: i64) -> Result<(), i64> {
    emit!(ModuleEvent, KIND_MODULE, ret, |ev, p| {
        (*ev).op = p.op;
        (*ev).ret = ret as i32;
        (*ev).fd = -1;
        (*ev).flags = 0;
        (*ev).len = 0;
        let name_ptr = match p.op {
            MODULE_OP_INIT => {
                (*ev).len = p.args[1];
                p.args[2]
            }
            MODULE_OP_FINIT => {
                (*ev).fd = p.args[0] as i32;
                (*ev).flags = p.args[2] as u32;
                p.args[1]
            }
            _ => {
                (*ev).flags = p.args[1] as u32;
                p.args[0]
            }
        };
        if read_user_str(&mut (*ev).name, name_ptr) {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
    })
}

// ---- bpf -----------------------------------------------------------------------------------
enter!(sys_enter_bpf, KIND_BPF, 0);
exit!(sys_exit_bpf, emit_bpf);

fn emit_bpf(ret: i64) -> Result<(), i64> {
    emit!(BpfEvent, KIND_BPF, ret, |ev, p| {
        (*ev).cmd = p.args[0] as u32;
        (*ev).size = p.args[2] as u32;
        (*ev).ret = ret;
    })
}

// ---- memfd ---------------------------------------------------------------------------------
enter!(sys_enter_memfd_create, KIND_MEMFD, 0);
exit!(sys_exit_memfd_create, emit_memfd);

fn emit_memfd(ret: i64) -> Result<(), i64> {
    emit!(MemfdEvent, KIND_MEMFD, ret, |ev, p| {
        (*ev).flags = p.args[1] as u32;
        (*ev).ret = ret as i32;
        if read_user_str(&mut (*ev).name, p.args[0]) {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
    })
}

// ---- chmod ---------------------------------------------------------------------------------
enter!(sys_enter_chmod, KIND_CHMOD, CHMOD_OP_CHMOD);
enter!(sys_enter_fchmod, KIND_CHMOD, CHMOD_OP_FCHMOD);
enter!(sys_enter_fchmodat, KIND_CHMOD, CHMOD_OP_FCHMODAT);
enter!(sys_enter_fchmodat2, KIND_CHMOD, CHMOD_OP_FCHMODAT);
exit!(sys_exit_chmod, emit_chmod);
exit!(sys_exit_fchmod, emit_chmod);
exit!(sys_exit_fchmodat, emit_chmod);
exit!(sys_exit_fchmodat2, emit_chmod);

fn emit_chmod(ret: i64) -> Result<(), i64> {
    emit!(ChmodEvent, KIND_CHMOD, ret, |ev, p| {
        (*ev).op = p.op;
        (*ev).ret = ret as i32;
        let path = match p.op {
            CHMOD_OP_CHMOD => {
                (*ev).fd = -100;
                (*ev).mode = p.args[1] as u32;
                p.args[0]
            }
            CHMOD_OP_FCHMOD => {
                (*ev).fd = p.args[0] as i32;
                (*ev).mode = p.args[1] as u32;
                0
            }
            _ => {
                (*ev).fd = p.args[0] as i32;
                (*ev).mode = p.args[2] as u32;
                p.args[1]
            }
        };
        let len = read_user_str_len(&mut (*ev).path, path);
        if len == PATH_LEN as i64 {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
        // What the path names, from the kernel: fchmod's file, or the directory a relative
        // path was looked up in (see ChmodEvent.resolved).
        (*ev)._pad = 0;
        (*ev).resolved_flags = 0;
        (*ev).resolved[0] = 0;
        if let Some(cfg) = config() {
            if p.op == CHMOD_OP_FCHMOD {
                resolve_open((*ev).fd as i64, AT_FDCWD, false, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
            } else {
                let relative = len > 1 && (*ev).path[0] != b'/';
                resolve_open(-1, (*ev).fd, relative, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
                mark_base_dir(&mut (*ev).resolved_flags);
            }
        }
    })
}

// ---- unlink / rename -----------------------------------------------------------------------
enter!(sys_enter_unlinkat, KIND_UNLINK, UNLINK_OP_UNLINKAT);
enter!(sys_enter_unlink, KIND_UNLINK, UNLINK_OP_UNLINK);
enter!(sys_enter_rmdir, KIND_UNLINK, UNLINK_OP_RMDIR);
exit!(sys_exit_unlinkat, emit_unlink);
exit!(sys_exit_unlink, emit_unlink);
exit!(sys_exit_rmdir, emit_unlink);

const AT_FDCWD: i32 = -100;
const AT_REMOVEDIR: u32 = 0x200;

fn emit_unlink(ret: i64) -> Result<(), i64> {
    emit!(UnlinkEvent, KIND_UNLINK, ret, |ev, p| {
        (*ev).ret = ret as i32;
        (*ev).op = p.op;
        let path = if p.op == UNLINK_OP_UNLINKAT {
            (*ev).dirfd = p.args[0] as i32;
            (*ev).flags = p.args[2] as u32;
            p.args[1]
        } else {
            (*ev).dirfd = AT_FDCWD;
            (*ev).flags = if p.op == UNLINK_OP_RMDIR { AT_REMOVEDIR } else { 0 };
            p.args[0]
        };
        let len = read_user_str_len(&mut (*ev).path, path);
        if len == PATH_LEN as i64 {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
        // The directory a relative path was looked up in (the file itself is gone at exit).
        (*ev)._pad = 0;
        (*ev).resolved_flags = 0;
        (*ev).resolved[0] = 0;
        if let Some(cfg) = config() {
            let relative = len > 1 && (*ev).path[0] != b'/';
            resolve_open(-1, (*ev).dirfd, relative, &mut (*ev).resolved, &mut (*ev).resolved_flags, cfg);
            mark_base_dir(&mut (*ev).resolved_flags);
        }
    })
}

enter!(sys_enter_renameat2, KIND_RENAME, RENAME_OP_RENAMEAT2);
enter!(sys_enter_renameat, KIND_RENAME, RENAME_OP_RENAMEAT);
enter!(sys_enter_rename, KIND_RENAME, RENAME_OP_RENAME);
exit!(sys_exit_renameat2, emit_rename);
exit!(sys_exit_renameat, emit_rename);
exit!(sys_exit_rename, emit_rename);

fn emit_rename(ret: i64) -> Result<(), i64> {
    emit!(RenameEvent, KIND_RENAME, ret, |ev, p| {
        (*ev).ret = ret as i32;
        let (old, new) = if p.op == RENAME_OP_RENAME {
            (*ev).old_dirfd = AT_FDCWD;
            (*ev).new_dirfd = AT_FDCWD;
            (*ev).flags = 0;
            (p.args[0], p.args[1])
        } else {
            (*ev).old_dirfd = p.args[0] as i32;
            (*ev).new_dirfd = p.args[2] as i32;
            (*ev).flags = if p.op == RENAME_OP_RENAMEAT2 { p.args[4] as u32 } else { 0 };
            (p.args[1], p.args[3])
        };
        let old_len = read_user_str_len(&mut (*ev).old_path, old);
        let new_len = read_user_str_len(&mut (*ev).new_path, new);
        if old_len == PATH_LEN as i64 || new_len == PATH_LEN as i64 {
            (*ev).header.flags |= FLAG_TRUNCATED;
        }
        // The directories relative paths were looked up in (see RenameEvent).
        (*ev).old_resolved_flags = 0;
        (*ev).new_resolved_flags = 0;
        (*ev).old_resolved[0] = 0;
        (*ev).new_resolved[0] = 0;
        if let Some(cfg) = config() {
            let relative = old_len > 1 && (*ev).old_path[0] != b'/';
            resolve_open(-1, (*ev).old_dirfd, relative, &mut (*ev).old_resolved, &mut (*ev).old_resolved_flags, cfg);
            mark_base_dir(&mut (*ev).old_resolved_flags);
            let relative = new_len > 1 && (*ev).new_path[0] != b'/';
            resolve_open(-1, (*ev).new_dirfd, relative, &mut (*ev).new_resolved, &mut (*ev).new_resolved_flags, cfg);
            mark_base_dir(&mut (*ev).new_resolved_flags);
        }
    })
}

// ---- dup -----------------------------------------------------------------------------------
enter!(sys_enter_dup2, KIND_DUP, DUP_OP_DUP2);
enter!(sys_enter_dup3, KIND_DUP, DUP_OP_DUP3);
exit!(sys_exit_dup2, emit_dup);
exit!(sys_exit_dup3, emit_dup);

/// A descriptor duplicated onto stdin, stdout or stderr (the reverse-shell primitive) is
/// protected; other dups are ordinary high-volume events.
fn emit_dup(ret: i64) -> Result<(), i64> {
    emit!(DupEvent, KIND_DUP, ret, protected(pending) = (pending.args[1] as i64) >= 0 && (pending.args[1] as i64) <= 2, |ev, p| {
        (*ev).op = p.op;
        (*ev).old_fd = p.args[0] as i32;
        (*ev).new_fd = p.args[1] as i32;
        (*ev).flags = if p.op == DUP_OP_DUP3 { p.args[2] as u32 } else { 0 };
        (*ev).ret = ret;
        // What the new descriptor is, read from the file table now (not from /proc later).
        (*ev).new_fd_kind = match config() {
            Some(cfg) if ret >= 0 => current_fd_kind(p.args[1] as i64, cfg),
            _ => palisade_common::FD_KIND_UNKNOWN,
        };
        (*ev)._pad = 0;
    })
}
