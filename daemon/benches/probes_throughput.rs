//! Probe pipeline benchmark (prints figures; not a test):
//! - syscall overhead: an open/close loop in a cgroup with no programs, with every program
//!   attached and the cgroup monitored (all kinds on, events drained, decoded and enriched),
//!   and with the programs attached but the cgroup not monitored (the in-kernel filter's cost);
//! - events per second through ring buffer + decode + enrichment + rule input + the default
//!   rule pack (the daemon's pool, one worker, batched hand-over), and kernel-counted losses;
//! - the rule pack's kernel prefilter: the same loop on a shared-library path and on
//!   /etc/hostname, monitored, with no prefilter, with the default pack's declared
//!   `quiet_open_prefixes`, and with the filter compiled from its open rules
//!   (`RulePack::open_filter`), interleaved (per-open cost, and the events that reach user space).
//!
//! Run: `cargo bench -p palisade --bench probes_throughput` (root). BENCH_OPENS sets the loop size.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use palisade::events::enrich::{EndpointIndex, ProcCache, enrich};
use palisade::events::input::{Clock, InputBuilder};
use palisade::rules::{EvaluatorConfig, PackHandle, RuleEvaluator};
use palisade::events::kind::EventKind;
use palisade::events::reader::{self, ReaderStats};
use palisade::probes::host::ProbeHost;
use palisade::probes::loader::{self, LoadOptions};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

fn run_loop(cgroup: &std::path::Path, opens: u64) -> Duration {
    run_loop_on(cgroup, opens, "/etc/hostname")
}

fn run_loop_on(cgroup: &std::path::Path, opens: u64, path: &str) -> Duration {
    let procs = cgroup.join("cgroup.procs");
    let mut cmd = std::process::Command::new(PALISADE);
    cmd.args(["workload", "open-loop", &opens.to_string(), path]);
    // SAFETY: only writes a file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let out = cmd.output().expect("run the open loop");
    assert!(out.status.success(), "open loop failed: {out:?}");
    let ns: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("elapsed ns");
    Duration::from_nanos(ns)
}

fn median_of(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    if !palisade::sys::is_root() {
        println!("SKIP: the probe benchmark needs root");
        return;
    }
    let opens: u64 = std::env::var("BENCH_OPENS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let root = palisade::sys::cgroup2_mount().expect("cgroup2");
    let cgroup = root.join(format!("palisade-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("mkdir cgroup");
    let cgroup_id = loader::cgroup_id(&cgroup).expect("cgroup id");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");

    let warm = run_loop(&cgroup, opens / 10);
    let _ = warm;
    let none = median_of(3, || run_loop(&cgroup, opens));

    let options = LoadOptions::default();
    let mut probes = loader::load(&options).expect("load");
    probes.attach_all(&options).expect("attach");
    let ring = probes.take_ring_buffer().expect("ring");
    let host = ProbeHost::spawn_on(runtime.handle(), probes);
    runtime.block_on(async {
        host.set_enabled_kinds(EventKind::ALL.to_vec()).await.expect("kinds");
        host.set_monitored(BTreeSet::from([cgroup_id])).await.expect("monitor");
    });

    let stats = Arc::new(ReaderStats::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel(65536);
    runtime.spawn(reader::run(ring, stats.clone(), tx));
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // The daemon's steps after the ring: enrichment, the rule input as regorus values
    // (`InputBuilder`), and the default pack (with its user-space prefilters) in the rule pool,
    // handed over in batches and flushed whenever nothing more is waiting, as the pipeline
    // thread does. One worker: the loop, this thread and the reader take the other vCPU-time.
    let rules_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let pack = palisade::rules::pack::RulePack::load(&rules_dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("; ")));
    let (evaluator, results) =
        RuleEvaluator::start(PackHandle::new(pack), EvaluatorConfig { workers: 1, queue: 4096, send_empty: false }).expect("rule pool");
    let hits = std::thread::spawn(move || results.iter().count());
    let consumer = {
        let consumed = consumed.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut evaluator = evaluator;
            let mut cache = ProcCache::new(8192);
            let endpoints = EndpointIndex::default();
            let clock = Clock::new();
            let mut inputs = InputBuilder::new("bench");
            while !stop.load(Ordering::Relaxed) {
                match rx.try_recv() {
                    Ok(event) => {
                        let enriched = enrich(event, &endpoints, &mut cache);
                        let input = inputs.build(&enriched, &clock);
                        evaluator.submit_batched(input, None).expect("rule pool");
                        consumed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        evaluator.flush().expect("rule pool");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
            evaluator.shutdown();
        })
    };

    let before = consumed.load(Ordering::Relaxed);
    let start = Instant::now();
    let monitored = median_of(3, || run_loop(&cgroup, opens));
    // Let the consumer drain what is in flight before measuring throughput.
    let mut last = consumed.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = consumed.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let elapsed = start.elapsed() - Duration::from_millis(300);
    let events = last - before;

    // Wait until the consumer has drained everything, then count what one measurement adds.
    let settle = || {
        let mut last = consumed.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = consumed.load(Ordering::Relaxed);
            if now == last {
                return now;
            }
            last = now;
        }
    };
    // The kernel prefilter, three ways, interleaved round by round so that load shifts hit all
    // alike: none; the pack's declared `quiet_open_prefixes`; the filter compiled from the pack's
    // open rules. Two paths: a library file (below a quiet prefix) and /etc/hostname (no quiet
    // prefix; the compiled filter keeps it after its whole test: prefix lookup, path scan,
    // suffix lookup).
    const PATHS: [&str; 2] = ["/usr/lib/os-release", "/etc/hostname"];
    const MODES: [&str; 3] = ["no prefilter", "declared quiet prefixes", "compiled from the rules"];
    let prefilter = palisade::rules::prefilter::OpenPrefilter::load(&rules_dir).expect("default pack prefilter");
    let pack = palisade::rules::pack::RulePack::load(&rules_dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("; ")));
    let derived = pack.open_filter().expect("the default pack's open filter").kernel_maps();
    let mut times = vec![vec![Vec::new(); PATHS.len()]; MODES.len()];
    let mut reached = vec![vec![0u64; PATHS.len()]; MODES.len()];
    for _round in 0..3 {
        for (m, _) in MODES.iter().enumerate() {
            let (quiet, open_filter) = match m {
                0 => (Vec::new(), None),
                1 => (prefilter.quiet.clone(), None),
                _ => (Vec::new(), Some(derived.clone())),
            };
            runtime
                .block_on(host.with(move |ebpf| {
                    loader::set_quiet_open_prefixes(ebpf, &quiet)?;
                    loader::set_open_filter(ebpf, open_filter.as_ref())
                }))
                .expect("host")
                .expect("prefilter");
            for (p, path) in PATHS.iter().enumerate() {
                let base = settle();
                times[m][p].push(run_loop_on(&cgroup, opens, path));
                reached[m][p] += settle() - base;
            }
        }
    }
    runtime.block_on(host.with(|ebpf| loader::set_open_filter(ebpf, None))).expect("host").expect("prefilter off");

    runtime.block_on(async { host.set_monitored(BTreeSet::<u64>::new()).await.expect("unmonitor") });
    let filtered = median_of(3, || run_loop(&cgroup, opens));

    let status = runtime.block_on(host.status()).expect("status");
    let counters = status.counters.expect("counters");
    stop.store(true, Ordering::Relaxed);
    let _ = consumer.join();
    let hits = hits.join().unwrap_or(0);
    let _ = std::fs::remove_dir(&cgroup);

    let per_op = |d: Duration| d.as_nanos() as f64 / opens as f64;
    println!("palisade probe benchmark ({opens} open+close per run, median of 3)");
    println!("  no programs                     {:>8.0} ns/op", per_op(none));
    println!("  attached, cgroup not monitored  {:>8.0} ns/op   ratio {:.2}x", per_op(filtered), per_op(filtered) / per_op(none));
    println!("  attached, monitored, all kinds  {:>8.0} ns/op   ratio {:.2}x", per_op(monitored), per_op(monitored) / per_op(none));
    println!(
        "  events through ring buffer + decode + enrich + rule input + default pack (1 rule worker): {events} in {:.2}s = {:.0} events/s ({hits} evaluations with hits or failures in the whole run)",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    );
    println!("  kernel-counted losses (all kinds): {}", counters.lost.values().sum::<u64>());
    println!("  open+close loops, monitored, by kernel prefilter (median of 3 interleaved rounds; events reaching user space in the 3 runs, and per second of loop time):");
    for (m, mode) in MODES.iter().enumerate() {
        for (p, path) in PATHS.iter().enumerate() {
            let mut t = times[m][p].clone();
            t.sort();
            let total: Duration = t.iter().sum();
            println!(
                "    {mode:<26} {path:<20} {:>8.0} ns/op   events to user space: {:>7} ({:.0}/s)",
                per_op(t[t.len() / 2]),
                reached[m][p],
                reached[m][p] as f64 / total.as_secs_f64()
            );
        }
    }
    println!("  prefiltered in the kernel (open): {}", counters.prefiltered.get("open").copied().unwrap_or(0));
    println!("  reader: {:?}", stats.snapshot());
}
