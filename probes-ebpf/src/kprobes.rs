//! Kprobes: credential commits and outbound TCP connects seen inside the kernel, which also
//! catch what syscall tracepoints miss (exec of a setuid binary, io_uring connects). They are
//! optional: where kprobes cannot attach the tracepoints above stand in (the loader says so).
//! When the operation came through a syscall the tracepoints already report, the kprobe stays
//! quiet so nothing is reported twice.

use aya_ebpf::{macros::kprobe, programs::ProbeContext};
use palisade_common::{
    CRED_OP_COMMIT_CREDS, ConnectEvent, CredEvent, KIND_CONNECT, KIND_CRED, SOURCE_KPROBE,
};

use crate::common::{PREFILTERED_COUNTS, connect_is_quiet, count, count_emitted, current_ids, fill_header, read_cred, should_report};
use crate::reserve_or_count;
use crate::syscalls::{in_reported_syscall, read_sockaddr};

#[kprobe]
pub fn kprobe_commit_creds(ctx: ProbeContext) -> u32 {
    let _ = try_commit_creds(&ctx);
    0
}

fn try_commit_creds(ctx: &ProbeContext) -> Result<(), i64> {
    if in_reported_syscall(KIND_CRED) {
        return Ok(());
    }
    let Some((cgroup_id, cfg)) = should_report(KIND_CRED) else {
        return Ok(());
    };
    if cfg.task_offsets_valid == 0 {
        return Ok(());
    }
    let new_cred: *const u8 = ctx.arg(0).ok_or(0i64)?;
    let mut entry = reserve_or_count!(CredEvent, KIND_CRED, cfg, cgroup_id, true);
    let ev = entry.as_mut_ptr();
    unsafe {
        fill_header(&mut (*ev).header, KIND_CRED, cgroup_id, cfg);
        (*ev).header.source = SOURCE_KPROBE;
        (*ev).op = CRED_OP_COMMIT_CREDS;
        (*ev).ret = 0;
        (*ev).args = read_cred(new_cred, cfg);
        // commit_creds runs before the new credentials are installed: current are the old ones.
        let [uid, gid, euid, egid] = current_ids(cfg);
        (*ev).old_uid = uid;
        (*ev).old_gid = gid;
        (*ev).old_euid = euid;
        (*ev).old_egid = egid;
        (*ev).cap_effective = 0;
        (*ev).cap_permitted = 0;
        (*ev).cap_inheritable = 0;
    }
    entry.submit();
    count_emitted(KIND_CRED);
    Ok(())
}

#[kprobe]
pub fn kprobe_tcp_v4_connect(ctx: ProbeContext) -> u32 {
    let _ = try_tcp_connect(&ctx);
    0
}

#[kprobe]
pub fn kprobe_tcp_v6_connect(ctx: ProbeContext) -> u32 {
    let _ = try_tcp_connect(&ctx);
    0
}

/// tcp_v{4,6}_connect(struct sock *sk, struct sockaddr *uaddr, int addr_len): uaddr is a kernel copy.
fn try_tcp_connect(ctx: &ProbeContext) -> Result<(), i64> {
    if in_reported_syscall(KIND_CONNECT) {
        return Ok(());
    }
    let Some((cgroup_id, cfg)) = should_report(KIND_CONNECT) else {
        return Ok(());
    };
    let uaddr: *const u8 = ctx.arg(1).ok_or(0i64)?;
    let addr_len: i32 = ctx.arg(2).unwrap_or(0);
    {
        use aya_ebpf::helpers::bpf_probe_read_kernel;
        let family: u16 = unsafe { bpf_probe_read_kernel(uaddr as *const u16) }.unwrap_or(0);
        let port = u16::from_be(unsafe { bpf_probe_read_kernel(uaddr.wrapping_add(2) as *const u16) }.unwrap_or(0));
        if connect_is_quiet(family, port) {
            count(&PREFILTERED_COUNTS, KIND_CONNECT);
            return Ok(());
        }
    }
    let mut entry = reserve_or_count!(ConnectEvent, KIND_CONNECT, cfg, cgroup_id, false);
    let ev = entry.as_mut_ptr();
    unsafe {
        fill_header(&mut (*ev).header, KIND_CONNECT, cgroup_id, cfg);
        (*ev).header.source = SOURCE_KPROBE;
        (*ev).fd = -1;
        (*ev).ret = 0;
        (*ev)._pad = 0;
        read_sockaddr(ev, uaddr, addr_len as u32, true);
    }
    entry.submit();
    count_emitted(KIND_CONNECT);
    Ok(())
}
