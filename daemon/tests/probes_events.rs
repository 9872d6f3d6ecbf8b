//! Kernel tests: the real eBPF programs, loaded and attached, report real behaviour of
//! processes in a monitored cgroup (and nothing from outside it).
//!
//! Root only; without root they print SKIP, and with PALISADE_REQUIRE_KERNEL=1 they fail.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use palisade::events::decode::{Event, EventData};
use palisade::events::kind::EventKind;
use palisade::probes::loader::{self, AttachState, LoadOptions, SyscallEntry};
use support::probes::{PALISADE, TestCgroup, collect_until, start, start_with};

fn require_kernel() -> bool {
    support::require_kernel("probes_events")
}

#[test]
fn kprobe_programs_pass_the_verifier() {
    if !require_kernel() {
        return;
    }
    let mut probes = loader::load(&LoadOptions::default()).expect("load");
    for program in ["kprobe_commit_creds", "kprobe_tcp_v4_connect", "kprobe_tcp_v6_connect"] {
        probes.load_kprobe(program).unwrap_or_else(|e| panic!("{program} rejected: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_program_attaches_or_names_its_fallback() {
    if !require_kernel() {
        return;
    }
    let options = LoadOptions::default();
    let mut probes = loader::load(&options).expect("load");
    probes.attach_all(&options).expect("attach");
    assert!(probes.config.task_offsets_valid == 1, "BTF offsets resolved on this kernel");
    for status in &probes.programs {
        match (&status.state, status.kind) {
            (AttachState::Attached, _) => {}
            (AttachState::FellBack { by, .. }, _) => assert!(!by.is_empty(), "{status:?}"),
            (AttachState::Unavailable { reason }, kind) => panic!("{kind} {} unavailable: {reason}", status.program),
        }
    }
    for must in ["sched_process_exec", "sys_enter_execve", "sys_exit_openat", "sys_exit_connect"] {
        let status = probes.programs.iter().find(|s| s.program == must).expect(must);
        assert_eq!(status.state, AttachState::Attached, "{must}");
    }
    // Syscall entries: the one raw sys_enter dispatcher, not the per-syscall enter tracepoints
    // it stands in for (each would build a trace record for every process on the node).
    let attached = |program: &str| probes.programs.iter().any(|s| s.program == program && s.state == AttachState::Attached);
    for replaced in ["sys_enter_openat", "sys_enter_open", "sys_enter_connect", "sys_enter_setuid", "sys_enter_dup2", "sys_enter_finit_module"] {
        assert!(!attached(replaced), "{replaced} attached beside the dispatcher: {:#?}", probes.programs);
    }
    for old in ["raw_sys_enter_module", "raw_sys_enter_module_attempt"] {
        assert!(!attached(old), "{old} attached beside the dispatcher: {:#?}", probes.programs);
    }
    // Module syscalls: exits at their own tracepoints where the kernel has them; on a kernel
    // that cannot load modules, only the entry carries a program (the attempt is reported there
    // with ENOSYS), never the exit of every syscall on the node.
    let module_tracepoints = attached("sys_exit_finit_module");
    let can_load_modules = std::path::Path::new("/proc/modules").exists();
    match (module_tracepoints, can_load_modules) {
        (true, _) => assert!(attached("raw_sys_enter") && !attached("raw_sys_exit_module") && !attached("raw_sys_enter_attempts")),
        (false, false) => {
            assert!(attached("raw_sys_enter_attempts"), "{:#?}", probes.programs);
            assert!(!attached("raw_sys_exit_module") && !attached("raw_sys_enter"), "{:#?}", probes.programs);
        }
        (false, true) => assert!(attached("raw_sys_enter") && attached("raw_sys_exit_module"), "{:#?}", probes.programs),
    }
}

/// The same behaviours through the per-syscall enter tracepoints (`SyscallEntry::Tracepoints`,
/// what the benchmarks compare the dispatcher with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behaviours_arrive_through_the_per_syscall_tracepoints_too() {
    if !require_kernel() {
        return;
    }
    behaviours_arrive_as_events(SyscallEntry::Tracepoints, "behaviours-tp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behaviours_in_a_monitored_cgroup_arrive_as_events() {
    if !require_kernel() {
        return;
    }
    behaviours_arrive_as_events(SyscallEntry::RawDispatch, "behaviours").await;
}

async fn behaviours_arrive_as_events(syscall_entry: SyscallEntry, name: &str) {
    let cgroup = TestCgroup::new(name);
    let options = LoadOptions { syscall_entry, ..LoadOptions::default() };
    let mut running = start_with(&options, EventKind::ALL.to_vec(), BTreeSet::from([cgroup.id])).await;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let tmp = std::env::temp_dir().join(format!("palisade-probe-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let file = |name: &str| tmp.join(name).to_string_lossy().into_owned();
    std::fs::write(file("victim"), b"x").expect("victim file");

    let unmonitored_marker = file("outside-marker");
    std::fs::write(&unmonitored_marker, b"x").expect("marker");
    // The same behaviour from outside the cgroup must produce nothing.
    let outside = Command::new(PALISADE).args(["workload", "open", &unmonitored_marker]).status().expect("outside run");
    assert!(outside.success());

    let actions: Vec<Vec<String>> = vec![
        vec!["open".into(), "/etc/hostname".into()],
        vec!["open-syscall".into(), "/etc/hostname".into()],
        vec!["creat".into(), file("created")],
        vec!["connect".into(), format!("127.0.0.1:{port}")],
        vec!["connect6".into(), "[::1]:9".into()],
        vec!["ptrace".into()],
        vec!["mount".into()],
        vec!["unshare-user".into()],
        vec!["finit-module".into()],
        vec!["bpf".into()],
        vec!["memfd-exec".into()],
        vec!["chmod-setuid".into(), file("suid")],
        vec!["rename".into(), file("victim"), file("renamed")],
        vec!["unlink".into(), file("renamed")],
        vec!["dup-socket".into()],
        vec!["setuid".into(), "65534".into()],
    ];
    let mut workload_pids = Vec::new();
    for action in &actions {
        let mut args = vec!["workload"];
        args.extend(action.iter().map(String::as_str));
        let mut child = cgroup.command(PALISADE, &args).spawn().expect("spawn workload");
        workload_pids.push(child.id());
        let status = child.wait().expect("wait workload");
        assert!(status.success(), "workload {action:?} failed: {status}");
    }

    type Check = (&'static str, Box<dyn Fn(&Event) -> bool>);
    let tmp_s = tmp.to_string_lossy().into_owned();
    let checks: Vec<Check> = vec![
        ("exec of the workload with argv", Box::new(|e| matches!(&e.data, EventData::Exec(x) if x.filename.ends_with("/palisade") && x.argv.get(1).map(String::as_str) == Some("workload") && x.argv.get(2).map(String::as_str) == Some("open")))),
        ("open /etc/hostname", Box::new(|e| matches!(&e.data, EventData::Open(x) if x.path == "/etc/hostname" && x.result >= 0 && !x.write))),
        ("open(2) of /etc/hostname", Box::new(|e| matches!(&e.data, EventData::Open(x) if x.op == "open" && x.path == "/etc/hostname" && x.dirfd == -100 && x.result >= 0 && !x.write))),
        ("creat(2)", Box::new(|e| matches!(&e.data, EventData::Open(x) if x.op == "creat" && x.path.ends_with("/created") && x.path_resolved && x.write && x.create && x.truncate && x.result >= 0))),
        ("connect 127.0.0.1", Box::new(move |e| matches!(&e.data, EventData::Connect(x) if x.family == "inet" && x.address.as_deref() == Some("127.0.0.1") && x.port == port && (x.result == 0 || x.result == -115)))),
        ("connect ::1", Box::new(|e| matches!(&e.data, EventData::Connect(x) if x.family == "inet6" && x.address.as_deref() == Some("::1") && x.port == 9))),
        ("ptrace attach", Box::new(|e| matches!(&e.data, EventData::Ptrace(x) if x.request_name == "PTRACE_ATTACH" && x.result == 0 && x.target_pid > 0))),
        ("mount tmpfs", Box::new(|e| matches!(&e.data, EventData::Mount(x) if x.op == "mount" && x.fstype == "tmpfs" && x.result == 0))),
        ("umount", Box::new(|e| matches!(&e.data, EventData::Mount(x) if x.op == "umount"))),
        ("unshare newns", Box::new(|e| matches!(&e.data, EventData::Namespace(x) if x.op == "unshare" && x.flags_names.contains(&"CLONE_NEWNS")))),
        ("unshare newuser", Box::new(|e| matches!(&e.data, EventData::Namespace(x) if x.op == "unshare" && x.flags_names.contains(&"CLONE_NEWUSER")))),
        ("finit_module fails", Box::new(|e| matches!(&e.data, EventData::Module(x) if x.op == "finit_module" && x.result < 0 && x.fd >= 0))),
        ("bpf prog load", Box::new(|e| matches!(&e.data, EventData::Bpf(x) if x.cmd_name == "BPF_PROG_LOAD"))),
        ("memfd_create", Box::new(|e| matches!(&e.data, EventData::Memfd(x) if x.name == "palisade-memfd" && x.result >= 0))),
        ("fileless exec", Box::new(|e| matches!(&e.data, EventData::Exec(x) if x.fileless && x.via_execveat))),
        ("chmod setuid", Box::new(|e| matches!(&e.data, EventData::Chmod(x) if x.setuid && x.path.ends_with("/suid") && x.result == 0))),
        ("rename", Box::new(|e| matches!(&e.data, EventData::Rename(x) if x.old_path.ends_with("/victim") && x.new_path.ends_with("/renamed") && x.result == 0))),
        ("unlink", Box::new(|e| matches!(&e.data, EventData::Unlink(x) if x.path.ends_with("/renamed") && x.result == 0))),
        ("dup2 onto stdout", Box::new(|e| matches!(&e.data, EventData::Dup(x) if x.new_fd == 1 && x.result == 1))),
        ("setuid 65534", Box::new(|e| matches!(&e.data, EventData::Cred(x) if x.op == "setuid" && x.args == vec![65534] && x.result == 0))),
        ("fork", Box::new(|e| matches!(&e.data, EventData::Fork(x) if x.child_pid > 0))),
        ("exit", Box::new(|e| matches!(&e.data, EventData::Exit(_)))),
    ];
    let seen = collect_until(&mut running.events, Duration::from_secs(20), |seen| {
        checks.iter().all(|(_, check)| seen.iter().any(|e| check(e)))
    })
    .await;

    let missing: Vec<&str> = checks.iter().filter(|(_, c)| !seen.iter().any(|e| c(e))).map(|(n, _)| *n).collect();
    assert!(missing.is_empty(), "missing events: {missing:?}\nseen {} events, reader stats {:?}", seen.len(), running.stats.snapshot());

    for event in &seen {
        assert_eq!(event.header.cgroup_id, cgroup.id, "event from another cgroup: {event:?}");
        assert_ne!(event.header.pid, std::process::id(), "the test process is not in the cgroup");
        assert!(event.header.ktime_ns > 0);
        assert!(event.header.ppid > 0, "ppid from BTF offsets: {event:?}");
        assert!(!event.header.comm.is_empty());
    }
    let exec = seen.iter().find(|e| matches!(e.data, EventData::Exec(_))).expect("an exec");
    assert!(workload_pids.contains(&exec.header.pid), "exec pid {} is a workload pid", exec.header.pid);
    let setuid = seen.iter().find(|e| matches!(&e.data, EventData::Cred(x) if x.op == "setuid")).expect("setuid");
    assert_eq!(setuid.header.uid, 65534, "uid read after the setuid returned");
    let EventData::Cred(cred) = &setuid.data else { unreachable!() };
    assert_eq!((cred.old_uid, cred.old_euid), (0, 0), "credentials before the call: the workload ran as root");
    assert!(
        !seen.iter().any(|e| matches!(&e.data, EventData::Open(x) if x.path.contains("outside-marker"))),
        "an unmonitored process produced an event"
    );
    assert!(!seen.iter().any(|e| matches!(&e.data, EventData::Open(x) if x.path.contains(&tmp_s) && x.path.contains("outside"))));

    let status = running.host.status().await.expect("status");
    let counters = status.counters.expect("counters");
    assert!(counters.emitted.get("exec").copied().unwrap_or(0) >= actions.len() as u64);
    assert_eq!(counters.lost.values().sum::<u64>(), 0, "no ring buffer losses in a quiet test");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_kinds_are_not_emitted() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new("kinds");
    let mut running = start(vec![EventKind::Exec], BTreeSet::from([cgroup.id])).await;
    let status = cgroup.command(PALISADE, &["workload", "open", "/etc/hostname"]).status().expect("run");
    assert!(status.success());
    let seen = collect_until(&mut running.events, Duration::from_secs(5), |seen| {
        seen.iter().any(|e| matches!(e.data, EventData::Exec(_)))
    })
    .await;
    assert!(seen.iter().any(|e| matches!(e.data, EventData::Exec(_))), "exec is on");
    // Give a late open a moment to show up if the filter were broken.
    let late = collect_until(&mut running.events, Duration::from_millis(500), |_| false).await;
    let all: Vec<&Event> = seen.iter().chain(late.iter()).collect();
    assert!(all.iter().all(|e| e.header.kind == EventKind::Exec), "only exec enabled, got {:?}", all.iter().map(|e| e.header.kind).collect::<Vec<_>>());
    let counters = running.host.status().await.expect("status").counters.expect("counters");
    assert_eq!(counters.emitted.get("open").copied(), Some(0));
}

/// The pack's kernel prefilter: read-only opens below a quiet prefix (here the shared libraries
/// the dynamic loader opens for every process) never reach the ring buffer; it judges the file
/// the kernel opened, not the argument, so another spelling of a quiet file stays in the kernel
/// too, while a path under a quiet prefix that leads out of it (`/usr/lib/../../etc/hostname`)
/// still arrives, named by the file it opened. Counted as prefiltered, not as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pack_prefilter_keeps_library_opens_in_the_kernel() {
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new("prefilter");
    let mut running = start(vec![EventKind::Exec, EventKind::Open], BTreeSet::from([cgroup.id])).await;
    let quiet = vec!["/usr/lib/".to_string(), "/lib/".to_string(), "/etc/ld.so.cache".to_string()];
    running.host.with(move |ebpf| loader::set_quiet_open_prefixes(ebpf, &quiet)).await.expect("host").expect("quiet prefixes");
    cgroup.workload(&["open", "/usr/lib/os-release"]);
    cgroup.workload(&["open", "/usr/lib/../lib/os-release"]);
    cgroup.workload(&["open", "/usr/lib/../../etc/hostname"]);
    cgroup.workload(&["open", "/etc/hostname"]);
    let is_open = |e: &Event, path: &str, arg: &str| matches!(&e.data, EventData::Open(x) if x.path == path && x.path_arg == arg && x.path_resolved);
    let seen = collect_until(&mut running.events, Duration::from_secs(10), |seen| {
        seen.iter().any(|e| is_open(e, "/etc/hostname", "/etc/hostname")) && seen.iter().any(|e| is_open(e, "/etc/hostname", "/usr/lib/../../etc/hostname"))
    })
    .await;
    let late = collect_until(&mut running.events, Duration::from_millis(500), |_| false).await;
    let all: Vec<&Event> = seen.iter().chain(late.iter()).collect();
    let opens: Vec<(String, String)> =
        all.iter().filter_map(|e| if let EventData::Open(x) = &e.data { Some((x.path.clone(), x.path_arg.clone())) } else { None }).collect();
    assert!(all.iter().any(|e| is_open(e, "/etc/hostname", "/etc/hostname")), "an ordinary open reaches user space: {opens:?}");
    assert!(
        all.iter().any(|e| is_open(e, "/etc/hostname", "/usr/lib/../../etc/hostname")),
        "an argument under a quiet prefix that opens a file outside it is not prefiltered: {opens:?}"
    );
    assert!(
        !opens.iter().any(|(p, _)| p.starts_with("/usr/lib/") || p == "/etc/ld.so.cache" || p.starts_with("/lib/")),
        "quiet opens (by any spelling) left the kernel: {opens:?}"
    );
    let counters = running.host.status().await.expect("status").counters.expect("counters");
    assert!(counters.prefiltered.get("open").copied().unwrap_or(0) >= 3, "{counters:?}");
    assert_eq!(counters.lost.get("open").copied(), Some(0), "{counters:?}");
}

/// Bulk-ring wake-ups come in batches: unprotected events below `bulk_wakeup_bytes` wake no
/// reader (the readers poll the ring every `BULK_POLL`); a protected one wakes it at once, also
/// with unwoken records waiting before it (where the kernel's default wake-up would not fire);
/// past the threshold unprotected ones do too. Watched with an edge-triggered epoll on the
/// ring, as tokio's AsyncFd waits on it: each readiness it reports is one kernel wake-up.
#[test]
fn bulk_ring_wakeups_are_batched_for_unprotected_events() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    if !require_kernel() {
        return;
    }
    let cgroup = TestCgroup::new("wakeups");
    // No budgets: every event, protected or not, takes the bulk ring.
    let options = LoadOptions::default();
    assert_eq!(options.bulk_wakeup_bytes, palisade_common::BULK_WAKEUP_BYTES, "batched by default");
    let mut probes = loader::load(&options).expect("load");
    probes.attach_all(&options).expect("attach");
    let mut ring = probes.take_ring_buffer().expect("ring");
    loader::set_enabled_kinds(&mut probes.ebpf, &[EventKind::Open]).expect("kinds");
    loader::monitor_cgroup(&mut probes.ebpf, cgroup.id, 1).expect("monitor");
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    epoll.add(&ring, EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0)).expect("epoll add");
    let woken = |timeout_ms: u16| {
        let mut events = [EpollEvent::empty()];
        epoll.wait(&mut events, timeout_ms).expect("epoll wait") > 0
    };
    let records = |ring: &mut aya::maps::RingBuf<aya::maps::MapData>| {
        let mut n = 0;
        while ring.next().is_some() {
            n += 1;
        }
        n
    };

    cgroup.workload(&["open", "/etc/hostname"]);
    assert!(!woken(0), "opens (unprotected, a few hundred bytes) woke the reader");
    // Not read: the opens wait unconsumed, unwoken, in front of the exec.
    loader::set_enabled_kinds(&mut probes.ebpf, &[EventKind::Open, EventKind::Exec]).expect("kinds");
    cgroup.workload(&["open", "/etc/hostname"]);
    assert!(woken(5000), "an exec (protected) behind unwoken records did not wake the reader");
    let waiting = records(&mut ring);
    assert!(waiting >= 3, "both workloads' opens and the exec were in the ring: {waiting}");

    loader::set_enabled_kinds(&mut probes.ebpf, &[EventKind::Open]).expect("kinds");
    assert!(!woken(0));
    // About 650 bytes an open: 1,000 of them pass the 64 KiB threshold.
    cgroup.workload(&["open-loop", "1000", "/etc/hostname"]);
    assert!(woken(5000), "unprotected events past bulk_wakeup_bytes did not wake the reader");
    assert!(records(&mut ring) >= 1000);
}
