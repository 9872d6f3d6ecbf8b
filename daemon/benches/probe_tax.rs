//! The probe tax on real work (issue 12): how much slower ordinary work gets with palisade's
//! programs in the kernel. Four workloads, each run in a cgroup of its own:
//! - `syscalls`: `palisade workload open-loop` (open+close of /etc/hostname, the worst case);
//! - `find`: a walk of /usr (`find /usr -xdev -name NOTHING`: a directory open per directory);
//! - `git status`: in a scratch repository of 3,000 committed files (lstat, index, a few opens);
//! - `cc`: ten compiles of a C file that includes the usual headers (exec, mmap, header opens).
//!
//! The figure is the CPU time (user + system) of the workload's processes, not the wall time:
//! the programs run in the workload's context and are charged to it, while waits for a CPU on
//! the shared machine are not.
//!
//! Six modes, interleaved round by round so that the shared machine's drift hits them alike:
//! `none` (no program loaded: checked by counting this process's bpf links), `unmonitored`
//! (every program attached, some other cgroup monitored: the in-kernel filter's cost on
//! processes palisade does not watch -- the goal is at most 5%) and `monitored` (the
//! workload's cgroup monitored, every kind on, events drained, decoded, enriched and turned
//! into rule input on one thread -- the goal is at most 15%), each with the syscall entries
//! seen by the per-syscall enter tracepoints (`tracepoints`, as before the dispatcher) and by
//! the one raw sys_enter dispatcher (`dispatcher`, `SyscallEntry::RawDispatch`); monitored
//! also with the bulk ring's wake-ups batched (`batched wake-ups`, the default:
//! `LoadOptions::bulk_wakeup_bytes`) rather than one per event. Each round loads and attaches
//! the programs afresh (three times) and drops them afterwards; the order of the loads
//! rotates and the order of the modes alternates between rounds.
//!
//! Then where the unmonitored cost goes: with the kernel's BPF run-time statistics on, each
//! workload once per entry, unmonitored; each program's own runs and time (what `bpftool prog`
//! shows as run_cnt / run_time_ns), against the workload's CPU time over `none`. The rest of
//! that difference is the kernel's machinery around the programs (trace records, the syscall
//! slow path), which no program's own time shows.
//!
//! Run: `cargo bench -p palisade --bench probe_tax` (root). BENCH_ROUNDS (default 5).
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade::events::enrich::{EndpointIndex, ProcCache, enrich};
use palisade::events::input::{Clock, InputBuilder};
use palisade::events::kind::EventKind;
use palisade::events::reader::{self, ReaderStats};
use palisade::probes::host::ProbeHost;
use palisade::probes::loader::{self, LoadOptions, SyscallEntry};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");
const MODES: [&str; 6] = [
    "none",
    "unmonitored, tracepoints",
    "unmonitored, dispatcher",
    "monitored, tracepoints",
    "monitored, dispatcher",
    "monitored, dispatcher, batched wake-ups",
];

/// One load of the programs: its syscall entry, its bulk-ring wake-ups, and the modes run
/// with it (monitored or not, the mode's name).
struct Load {
    entry: SyscallEntry,
    wakeup_bytes: u32,
    modes: Vec<(bool, &'static str)>,
}


struct Workload {
    name: &'static str,
    program: String,
    args: Vec<String>,
    dir: Option<PathBuf>,
    /// Runs per measurement (their total time is the figure).
    repeat: usize,
}

impl Workload {
    /// Runs the workload `repeat` times with every process in `cgroup`; the CPU time (user +
    /// system) of its processes. The programs run in the workload's own context, so their cost
    /// is system time of the workload; CPU time, unlike wall time, does not count the waits for
    /// a CPU that the shared machine's other work causes.
    fn run(&self, cgroup: &Path) -> Duration {
        let before = children_cpu();
        for _ in 0..self.repeat {
            let procs = cgroup.join("cgroup.procs");
            let mut cmd = Command::new(&self.program);
            cmd.args(&self.args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
            if let Some(dir) = &self.dir {
                cmd.current_dir(dir);
            }
            // SAFETY: only writes a file between fork and exec.
            unsafe {
                cmd.pre_exec(move || std::fs::write(&procs, b"0"));
            }
            let status = cmd.status().unwrap_or_else(|e| panic!("{}: {e}", self.name));
            assert!(status.success(), "{} failed: {status}", self.name);
        }
        children_cpu() - before
    }
}

/// User + system time of this process's waited-for children (and theirs).
fn children_cpu() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let to = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    to(usage.user_time()) + to(usage.system_time())
}

/// A repository of `files` committed files under `dir` (made once per run of the bench).
fn scratch_repository(dir: &Path, files: usize) {
    let _ = std::fs::remove_dir_all(dir);
    for i in 0..files {
        let sub = dir.join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join(format!("f{i}.txt")), format!("file {i}\n")).expect("write");
    }
    for args in [&["init", "-q"][..], &["add", "."], &["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "x"]] {
        let status = Command::new("git").args(args).current_dir(dir).status().expect("git");
        assert!(status.success(), "git {args:?}");
    }
}

/// bpf links this process holds (0 once the programs are dropped).
fn bpf_links() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().contains("bpf_link"))
                .count()
        })
        .unwrap_or(0)
}

struct Attached {
    host: ProbeHost,
    stop: Arc<AtomicBool>,
    consumer: std::thread::JoinHandle<()>,
    consumed: Arc<AtomicU64>,
    /// Kernel program id -> name, of the programs this load attached.
    programs: BTreeMap<u32, String>,
}

/// Each of `programs`' (runs, run time in ns) so far, from the kernel's statistics (counted
/// only while BPF_ENABLE_STATS is held).
fn program_stats(programs: &BTreeMap<u32, String>) -> BTreeMap<u32, (u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|info| programs.contains_key(&info.id()))
        .map(|info| (info.id(), (info.run_count(), info.run_time().as_nanos() as u64)))
        .collect()
}

fn attach(runtime: &tokio::runtime::Runtime, syscall_entry: SyscallEntry, bulk_wakeup_bytes: u32) -> Attached {
    let options = LoadOptions { syscall_entry, bulk_wakeup_bytes, ..LoadOptions::default() };
    let mut probes = loader::load(&options).expect("load");
    probes.attach_all(&options).expect("attach");
    let attached: BTreeSet<&str> = probes
        .programs
        .iter()
        .filter(|s| s.state == loader::AttachState::Attached)
        .map(|s| s.program.as_str())
        .collect();
    let programs: BTreeMap<u32, String> = probes
        .ebpf
        .programs()
        .filter(|(name, _)| attached.contains(name))
        .filter_map(|(name, program)| Some((program.info().ok()?.id(), name.to_string())))
        .collect();
    let ring = probes.take_ring_buffer().expect("ring");
    let host = ProbeHost::spawn_on(runtime.handle(), probes);
    runtime.block_on(host.set_enabled_kinds(EventKind::ALL.to_vec())).expect("kinds");
    let stats = Arc::new(ReaderStats::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(65536);
    runtime.spawn(reader::run(ring, stats, tx));
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (consumed, stop) = (consumed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cache = ProcCache::new(8192);
            let endpoints = EndpointIndex::default();
            let clock = Clock::new();
            // The rule input as the daemon's pipeline builds it (regorus values, one builder).
            let mut inputs = InputBuilder::new("bench");
            while !stop.load(Ordering::Relaxed) {
                match rx.try_recv() {
                    Ok(event) => {
                        let enriched = enrich(event, &endpoints, &mut cache);
                        std::hint::black_box(inputs.build(&enriched, &clock));
                        consumed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    Attached { host, stop, consumer, consumed, programs }
}

impl Attached {
    /// Stops the consumer and drops the programs; the events it consumed.
    fn detach(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.consumer.join();
        let consumed = self.consumed.load(Ordering::Relaxed);
        drop(self.host);
        // The owner task drops the object (and with it the links) once its channel closes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while bpf_links() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        consumed
    }
}

fn main() {
    if !palisade::sys::is_root() {
        println!("SKIP: the probe tax benchmark needs root");
        return;
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let root = palisade::sys::cgroup2_mount().expect("cgroup2");
    let cgroup = root.join(format!("palisade-bench-tax-{}", std::process::id()));
    let other = root.join(format!("palisade-bench-tax-other-{}", std::process::id()));
    for dir in [&cgroup, &other] {
        std::fs::create_dir_all(dir).expect("mkdir cgroup");
    }
    let cgroup_id = loader::cgroup_id(&cgroup).expect("cgroup id");
    let other_id = loader::cgroup_id(&other).expect("cgroup id");
    let scratch = std::env::temp_dir().join(format!("palisade-bench-tax-{}", std::process::id()));
    let repo = scratch.join("repo");
    scratch_repository(&repo, 3000);
    let source = scratch.join("x.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n#include <pthread.h>\n#include <sys/socket.h>\n\
         int main(int c, char **v) { char b[64]; snprintf(b, sizeof b, \"%d\", c); puts(b); return strlen(v[0]) > 3; }\n",
    )
    .expect("write x.c");
    let object = scratch.join("x.o");
    let workloads = [
        Workload { name: "syscalls", program: PALISADE.into(), args: vec!["workload".into(), "open-loop".into(), "100000".into(), "/etc/hostname".into()], dir: None, repeat: 1 },
        Workload { name: "find", program: "find".into(), args: vec!["/usr".into(), "-xdev".into(), "-name".into(), "palisade-nothing".into()], dir: None, repeat: 1 },
        Workload { name: "git status", program: "git".into(), args: vec!["status".into(), "--porcelain".into()], dir: Some(repo.clone()), repeat: 10 },
        Workload {
            name: "cc",
            program: "cc".into(),
            args: vec!["-O1".into(), "-c".into(), source.display().to_string(), "-o".into(), object.display().to_string()],
            dir: None,
            repeat: 10,
        },
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    // Warm the page cache and the binaries once.
    for w in &workloads {
        w.run(&cgroup);
    }

    let load_at_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    // times[workload][mode] = one Duration per round.
    let mut times: BTreeMap<&str, BTreeMap<&str, Vec<Duration>>> = BTreeMap::new();
    let mut events = 0u64;
    let mut lost = 0u64;
    for round in 0..rounds {
        assert_eq!(bpf_links(), 0, "programs still attached in mode none");
        for w in &workloads {
            times.entry(w.name).or_default().entry("none").or_default().push(w.run(&cgroup));
        }
        // Three loads; their order rotates and the order of their modes alternates by round.
        let mut loads = vec![
            Load { entry: SyscallEntry::Tracepoints, wakeup_bytes: 0, modes: vec![(false, MODES[1]), (true, MODES[3])] },
            Load { entry: SyscallEntry::RawDispatch, wakeup_bytes: 0, modes: vec![(true, MODES[4])] },
            Load {
                entry: SyscallEntry::RawDispatch,
                wakeup_bytes: palisade_common::BULK_WAKEUP_BYTES,
                modes: vec![(false, MODES[2]), (true, MODES[5])],
            },
        ];
        let turn = round % loads.len();
        loads.rotate_left(turn);
        let mut consumed = 0;
        for mut load in loads {
            let attached = attach(&runtime, load.entry, load.wakeup_bytes);
            if round % 2 == 1 {
                load.modes.reverse();
            }
            for (watch, mode) in load.modes {
                let monitored = if watch { cgroup_id } else { other_id };
                runtime.block_on(attached.host.set_monitored(BTreeSet::from([monitored]))).expect("monitor");
                for w in &workloads {
                    times.entry(w.name).or_default().entry(mode).or_default().push(w.run(&cgroup));
                }
            }
            let status = runtime.block_on(attached.host.status()).expect("status");
            if let Some(counters) = status.counters {
                events += counters.emitted.values().sum::<u64>();
                lost += counters.lost.values().sum::<u64>();
            }
            consumed += attached.detach();
        }
        println!("round {}/{rounds}: {consumed} events decoded and enriched", round + 1);
    }
    let load_at_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let program_costs = where_the_cost_goes(&runtime, &workloads, &cgroup, cgroup_id, other_id);
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir(&other);
    let _ = std::fs::remove_dir_all(&scratch);

    let median = |v: &Vec<Duration>| {
        let mut v = v.clone();
        v.sort();
        v[v.len() / 2]
    };
    println!("probe tax: CPU time of the workload ({rounds} rounds, modes interleaved; median per round; load at start {} at end {})", load_at_start.trim(), load_at_end.trim());
    let header: Vec<String> = MODES[1..].iter().map(|m| format!("{m} | slowdown")).collect();
    println!("| workload | none | {} |", header.join(" | "));
    println!("|---|---:|{}", "---:|---:|".repeat(MODES.len() - 1));
    for w in &workloads {
        let by_mode = &times[w.name];
        let medians = MODES.map(|m| median(&by_mode[m]));
        let none = medians[0];
        let cells: Vec<String> = medians[1..]
            .iter()
            .map(|d| format!("{:.0} ms | {:+.1}%", d.as_secs_f64() * 1e3, (d.as_secs_f64() / none.as_secs_f64() - 1.0) * 100.0))
            .collect();
        println!("| {} (x{}) | {:.0} ms | {} |", w.name, w.repeat, none.as_secs_f64() * 1e3, cells.join(" | "));
    }
    println!("kernel: {events} events emitted, {lost} lost (all rounds, both attached modes)");
    // The spread says how far to trust a median: each mode's fastest and slowest round.
    for w in &workloads {
        let spread: Vec<String> = MODES
            .iter()
            .map(|m| {
                let v = &times[w.name][m];
                let (lo, hi) = (v.iter().min().copied().unwrap_or_default(), v.iter().max().copied().unwrap_or_default());
                format!("{m} {:.0}-{:.0} ms", lo.as_secs_f64() * 1e3, hi.as_secs_f64() * 1e3)
            })
            .collect();
        println!("  spread {}: {}", w.name, spread.join(", "));
    }
    println!("where the cost goes (BPF run-time statistics on, one run each; CPU over none = the workload's CPU time minus the median of none):");
    for line in program_costs {
        let none = median(&times[line.workload]["none"]);
        let over = line.cpu.as_secs_f64() - none.as_secs_f64();
        println!(
            "  {} / {}: CPU over none {:+.0} ms, programs' own time {:.1} ms ({} runs); {}",
            line.workload,
            line.mode,
            over * 1e3,
            line.programs_ns as f64 / 1e6,
            line.programs_runs,
            line.top.join(", ")
        );
    }
}

struct ProgramCost {
    workload: &'static str,
    mode: &'static str,
    cpu: Duration,
    programs_ns: u64,
    programs_runs: u64,
    /// The costliest programs: `name: runs x ns/run`.
    top: Vec<String>,
}

/// Each workload once unmonitored and once monitored, before (tracepoints, a wake-up per
/// event) and after (the dispatcher, batched wake-ups), with the kernel's BPF statistics on: what each attached program ran and cost (the statistics add two
/// clock reads per run, so these runs are not part of the table above).
fn where_the_cost_goes(runtime: &tokio::runtime::Runtime, workloads: &[Workload], cgroup: &Path, cgroup_id: u64, other_id: u64) -> Vec<ProgramCost> {
    let Ok(_stats) = aya::sys::enable_stats(aya::sys::Stats::RunTime) else {
        println!("BPF_ENABLE_STATS refused: no per-program costs");
        return Vec::new();
    };
    let mut out = Vec::new();
    let batched = palisade_common::BULK_WAKEUP_BYTES;
    let passes = [
        (SyscallEntry::Tracepoints, 0, MODES[1], other_id),
        (SyscallEntry::RawDispatch, batched, MODES[2], other_id),
        (SyscallEntry::Tracepoints, 0, MODES[3], cgroup_id),
        (SyscallEntry::RawDispatch, batched, MODES[5], cgroup_id),
    ];
    for (entry, wakeup_bytes, mode, monitored) in passes {
        let attached = attach(runtime, entry, wakeup_bytes);
        runtime.block_on(attached.host.set_monitored(BTreeSet::from([monitored]))).expect("monitor");
        for w in workloads {
            let before = program_stats(&attached.programs);
            let cpu = w.run(cgroup);
            let after = program_stats(&attached.programs);
            let mut per_program: Vec<(u64, u64, &str)> = after
                .iter()
                .map(|(id, (runs, ns))| {
                    let (runs0, ns0) = before.get(id).copied().unwrap_or_default();
                    (ns - ns0, runs - runs0, attached.programs[id].as_str())
                })
                .filter(|(_, runs, _)| *runs > 0)
                .collect();
            per_program.sort_by(|a, b| b.cmp(a));
            out.push(ProgramCost {
                workload: w.name,
                mode,
                cpu,
                programs_ns: per_program.iter().map(|p| p.0).sum(),
                programs_runs: per_program.iter().map(|p| p.1).sum(),
                top: per_program.iter().take(4).map(|(ns, runs, name)| format!("{name}: {runs} x {} ns", ns / runs)).collect(),
            });
        }
        attached.detach();
    }
    out
}
