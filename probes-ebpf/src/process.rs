//! Process lifecycle: exec (with argv captured at sys_enter_execve/execveat), fork, exit.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel_str_bytes, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
};
use palisade_common::{
    ARGV_SLOTS, ExecEvent, ExitEvent, FLAG_TRUNCATED, ForkEvent, KIND_EXEC, KIND_EXIT, KIND_FORK,
    PATH_LEN,
};

use crate::common::{
    EXEC_SCRATCH, PENDING_EXECS, count_emitted, current_exe, current_exit_code, current_fd_kind,
    current_tgid, current_tid, fill_header, read_user_str, should_report, syscall_arg,
};
use crate::reserve_or_count;

/// How many argv pointers are counted beyond the copied slots (argc is reported up to this).
const ARGV_COUNT_LIMIT: usize = 64;

#[tracepoint]
pub fn sys_enter_execve(ctx: TracePointContext) -> u32 {
    let _ = try_enter_exec(&ctx, syscall_arg(&ctx, 1), 0, -100, 0);
    0
}

#[tracepoint]
pub fn sys_enter_execveat(ctx: TracePointContext) -> u32 {
    let dirfd = syscall_arg(&ctx, 0) as i32;
    let argv = syscall_arg(&ctx, 2);
    let at_flags = syscall_arg(&ctx, 4) as u32;
    let _ = try_enter_exec(&ctx, argv, 1, dirfd, at_flags);
    0
}

fn try_enter_exec(
    _ctx: &TracePointContext,
    argv: u64,
    via_execveat: u32,
    dirfd: i32,
    at_flags: u32,
) -> Result<(), i64> {
    let Some((cgroup_id, _cfg)) = should_report(KIND_EXEC) else {
        return Ok(());
    };
    let scratch = EXEC_SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    let pending = unsafe { &mut *scratch };
    pending.cgroup_id = cgroup_id;
    pending.via_execveat = via_execveat;
    pending.dirfd = dirfd;
    pending.at_flags = at_flags;
    pending.argc = 0;
    let argv = argv as *const u64;
    let mut i = 0usize;
    while i < ARGV_SLOTS {
        pending.argv[i][0] = 0;
        i += 1;
    }
    if !argv.is_null() {
        let mut i = 0usize;
        while i < ARGV_COUNT_LIMIT {
            let arg = unsafe { bpf_probe_read_user(argv.add(i)) }.unwrap_or(0);
            if arg == 0 {
                break;
            }
            if i < ARGV_SLOTS {
                unsafe { read_user_str(&mut pending.argv[i], arg) };
            }
            i += 1;
        }
        pending.argc = i as u32;
    }
    PENDING_EXECS.insert(&current_tid(), pending, 0).map_err(|e| e as i64)?;
    Ok(())
}

#[tracepoint]
pub fn sys_exit_execve(_ctx: TracePointContext) -> u32 {
    // A successful exec consumed the entry in sched_process_exec; a failed one leaves it here.
    let _ = PENDING_EXECS.remove(&current_tid());
    0
}

#[tracepoint]
pub fn sys_exit_execveat(_ctx: TracePointContext) -> u32 {
    let _ = PENDING_EXECS.remove(&current_tid());
    0
}

/// sched/sched_process_exec field offsets (checked against the tracefs format by a kernel test).
const EXEC_FILENAME_LOC: usize = 8;
const EXEC_OLD_PID: usize = 16;

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let Some((cgroup_id, cfg)) = should_report(KIND_EXEC) else {
        return Ok(());
    };
    let mut entry = reserve_or_count!(ExecEvent, KIND_EXEC, cfg, cgroup_id, true);
    let ev = entry.as_mut_ptr();
    unsafe {
        fill_header(&mut (*ev).header, KIND_EXEC, cgroup_id, cfg);
        let loc: u32 = ctx.read_at(EXEC_FILENAME_LOC).unwrap_or(0);
        let filename = (ctx.as_ptr_u8()).add((loc & 0xffff) as usize);
        (*ev).filename[0] = 0;
        if let Ok(s) = bpf_probe_read_kernel_str_bytes(filename, &mut (*ev).filename) {
            if s.len() >= PATH_LEN - 1 {
                (*ev).header.flags |= FLAG_TRUNCATED;
            }
        }
        // The new image and standard streams, read now: a process that exits a moment later
        // (or a pid reused after it) cannot change what this exec reports.
        (*ev).exe_flags = current_exe(&mut (*ev).exe, cfg);
        (*ev).stdio = [current_fd_kind(0, cfg), current_fd_kind(1, cfg), current_fd_kind(2, cfg)];
        let old_tid: u32 = ctx.read_at(EXEC_OLD_PID).unwrap_or(0);
        match PENDING_EXECS.get_ptr(&old_tid) {
            Some(pending) => {
                let _ = aya_ebpf::helpers::bpf_probe_read_kernel_buf(
                    (*pending).argv.as_ptr() as *const u8,
                    core::slice::from_raw_parts_mut(
                        (*ev).argv.as_mut_ptr() as *mut u8,
                        core::mem::size_of_val(&(*ev).argv),
                    ),
                );
                (*ev).argc = (*pending).argc;
                (*ev).via_execveat = (*pending).via_execveat;
                (*ev).dirfd = (*pending).dirfd;
                (*ev).at_flags = (*pending).at_flags;
                if (*pending).argc as usize > ARGV_SLOTS {
                    (*ev).header.flags |= FLAG_TRUNCATED;
                }
                let _ = PENDING_EXECS.remove(&old_tid);
            }
            None => {
                let mut i = 0usize;
                while i < ARGV_SLOTS {
                    (*ev).argv[i][0] = 0;
                    i += 1;
                }
                (*ev).argc = 0;
                (*ev).via_execveat = 0;
                (*ev).dirfd = 0;
                (*ev).at_flags = 0;
            }
        }
    }
    entry.submit();
    count_emitted(KIND_EXEC);
    Ok(())
}

/// sched/sched_process_fork: parent_pid and child_pid (6.x layout, __data_loc comms).
const FORK_PARENT_PID: usize = 12;
const FORK_CHILD_PID: usize = 20;

#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_fork(&ctx);
    0
}

fn try_sched_process_fork(ctx: &TracePointContext) -> Result<(), i64> {
    let Some((cgroup_id, cfg)) = should_report(KIND_FORK) else {
        return Ok(());
    };
    let parent_pid: u32 = unsafe { ctx.read_at(FORK_PARENT_PID) }.unwrap_or(0);
    let child_pid: u32 = unsafe { ctx.read_at(FORK_CHILD_PID) }.unwrap_or(0);
    // New threads pass through here too (child_pid is then a thread id): the clone flags are not
    // in this tracepoint, so user space tells threads from processes.
    let mut entry = reserve_or_count!(ForkEvent, KIND_FORK, cfg, cgroup_id, false);
    let ev = entry.as_mut_ptr();
    unsafe {
        fill_header(&mut (*ev).header, KIND_FORK, cgroup_id, cfg);
        (*ev).parent_pid = parent_pid;
        (*ev).child_pid = child_pid;
        (*ev).boot_ns = aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns();
    }
    entry.submit();
    count_emitted(KIND_FORK);
    Ok(())
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit();
    0
}

fn try_sched_process_exit() -> Result<(), i64> {
    // Only the thread-group leader's exit ends the process.
    if current_tgid() != current_tid() {
        return Ok(());
    }
    let Some((cgroup_id, cfg)) = should_report(KIND_EXIT) else {
        return Ok(());
    };
    let mut entry = reserve_or_count!(ExitEvent, KIND_EXIT, cfg, cgroup_id, false);
    let ev = entry.as_mut_ptr();
    unsafe {
        fill_header(&mut (*ev).header, KIND_EXIT, cgroup_id, cfg);
        (*ev).exit_code = current_exit_code(cfg);
        (*ev)._pad = 0;
    }
    entry.submit();
    count_emitted(KIND_EXIT);
    Ok(())
}

trait CtxBytes {
    fn as_ptr_u8(&self) -> *const u8;
}

impl CtxBytes for TracePointContext {
    fn as_ptr_u8(&self) -> *const u8 {
        aya_ebpf::EbpfContext::as_ptr(self) as *const u8
    }
}
