//! Quarantine latency benchmark (prints figures; not a test). Root only.
//!
//! Each cycle is the daemon's real path, end to end, on lab pods:
//! a process in pod `shop/a` redirects its stderr to a socket with dup2 (what the
//! `reverse_shell` rule flags) -> the dup tracepoint emits an event stamped with
//! bpf_ktime_get_ns into the priority ring (the daemon's load: per-pod budgets on) -> the
//! pipeline thread (this one) takes it -> enrichment (procfs) -> rule input (regorus values
//! built from the typed event) -> the default rule pack (regorus) -> the responder ->
//! SEG_QUARANTINE update returns. Then the pod is released for the next cycle.
//!
//! How the pipeline thread takes the event takes turns cycle by cycle (`MODES`), so all ways
//! are compared in one run under the same load: read by a reader task on a two-thread tokio
//! runtime and forwarded through a queue (before: the kernel wakes the task, the task wakes
//! the pipeline thread), or read by the pipeline thread itself (`reader::PipelineSource`, the
//! daemon's code now: the kernel wakes the pipeline thread); each with the default scheduler
//! slice and with the 100 µs slice the daemon's pipeline thread asks for
//! (`sys::request_short_slice`). The bulk ring is drained by the daemon's reader task
//! (`reader::run_bulk`) throughout. The pipeline thread judges the event itself
//! (`LocalEvaluator`, as the daemon does with protected events) and runs the responder. The
//! state file is written by the background writer (the daemon's default) throughout. Not in
//! the figures: the alert the daemon builds for the hit (its `id` is taken before the
//! responder runs, its JSON evidence after). Per cycle the bench also reads the pipeline
//! thread's CPU time, minor faults and involuntary context switches over the compute (event
//! taken -> map update returned): CPU time close to the wall time says the work itself is
//! slow (cold caches), not that the thread waited.
//!
//! `--role profile` keeps comparing the two rule input forms (`InputForm`): `json` (a
//! serde_json tree, converted by the session) and `direct` (regorus values built straight
//! from the typed event).
//!
//! `quarantine_latency --role profile FORM N` (no root, no kernel): N judgements of a
//! synthetic protected dup event in one form, input built and evaluated, nothing else: run
//! under `valgrind --tool=callgrind` with N and with 0, the difference over N is the exact
//! instruction count per judged event.
//!
//! Figures (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns):
//! 1. event -> map update returned, over BENCH_CYCLES quarantines (default 1,000), with a
//!    breakdown (kernel -> user wakeup, enrich + rules, responder);
//! 2. event -> first dropped packet, over the same number of quarantines with a second process
//!    in the pod sending UDP to `shop/b` continuously: the first sendto that fails with EPERM
//!    (the cgroup_skb egress drop) after the event, stamped when that sendto returned. The
//!    sender is paced (one sendto every BENCH_SEND_PERIOD_NS, default 10 µs, ~100k packets/s),
//!    so the figure is exact to within one period.
//!
//! 3. the datapath alone: a process in the pod updates the pinned map for its own cgroup and
//!    sends at once: how long the update takes, and whether the very next packet is dropped.
//!
//! Run: `sudo cargo bench -p palisade --bench quarantine_latency` (BENCH_CYCLES to change;
//! BENCH_STATE_ROOT to put the responder's state file elsewhere than /var/lib, the file system
//! of the default state directory, e.g. on tmpfs).

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use palisade::events::context::EventContext;
use palisade::events::decode::EventData;
use palisade::events::enrich::{EndpointIndex, PodRef, ProcCache, enrich};
use palisade::events::input::{Clock, InputBuilder, monotonic_now_ns, to_input_tree};
use palisade::events::kind::EventKind;
use palisade::events::reader::{self, QueueBudget, QueueDrops, Queued, ReaderStats};
use palisade::inventory::Inventory;
use palisade::lab::{Lab, LabOptions};
use palisade::probes::loader::{self, EventBudgets, LoadOptions};
use palisade::quarantine::datapath::{self, KernelQuarantineMap};
use palisade::segmentation::datapath::Datapath;
use palisade::quarantine::{Outcome, QuarantineService, ResponderConfig, ResponsePolicy, StateWrites, Finding};
use palisade::rules::{Action, LocalEvaluator, PackHandle, RulePack, RuleHit};
use palisade_common::{DatapathConfig, KIND_POLICY_VERDICT, MAP_SEG_CONFIG, MAP_SEG_EVENTS, PolicyVerdictEvent, REASON_QUARANTINE};
use aya::maps::{Array, MapData, RingBuf};

const MARK: &str = "@@ ";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        match args.get(2).map(String::as_str) {
            Some("trigger") => trigger(),
            Some("sender") => sender(args.get(3).expect("sender: address")),
            Some("profile") => profile(args.get(3).map(String::as_str), args.get(4).and_then(|n| n.parse().ok()).unwrap_or(1000)),
            Some("selftest") => {
                selftest(Path::new(&args[3]), args[4].parse().expect("id"), &args[5], args[6].parse().expect("n"))
            }
            other => panic!("unknown role {other:?}"),
        }
        return;
    }
    if !palisade::sys::is_root() {
        println!("SKIP: the quarantine latency benchmark needs root");
        return;
    }
    let cycles: usize = std::env::var("BENCH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    pin_to_cpu(0);
    run(cycles);
}

// ---- roles (processes inside the pod) ------------------------------------------------------

/// One dup2 of a socket onto stderr per stdin line: the offending event.
fn trigger() {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        // SAFETY: both descriptors are valid; replacing stderr is the point.
        unsafe { libc::dup2(socket.as_raw_fd(), 2) };
        line.clear();
    }
}

/// Sends UDP as fast as it can; reports each pass->drop and drop->pass transition with the
/// CLOCK_MONOTONIC time at which the sendto that showed it returned.
fn sender(addr: &str) {
    pin_to_cpu(1);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
    let mut passing: Option<bool> = None;
    let mut out = std::io::stdout().lock();
    let mut sends: u64 = 0;
    // Paced, not flat out: an unpaced sender fills its socket buffer faster than softirq frees
    // the skbs and then sleeps in sendto for tens of µs at a time, which would be measured as
    // drop latency. Non-blocking for the same reason.
    socket.set_nonblocking(true).expect("nonblocking");
    let period_ns: u64 = std::env::var("BENCH_SEND_PERIOD_NS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mut next = monotonic_now_ns();
    let mut last = (0u64, 0u64, 0u64);
    loop {
        while monotonic_now_ns() < next {
            std::hint::spin_loop();
        }
        next += period_ns;
        let switches_before = involuntary_switches();
        let started = monotonic_now_ns();
        let result = socket.send_to(b"palisade-bench", addr);
        let now = monotonic_now_ns();
        let switched = involuntary_switches() - switches_before;
        sends += 1;
        let passed = match result {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => false,
            Err(_) => continue,
        };
        if passing != Some(passed) {
            passing = Some(passed);
            // With a drop, when the send before it began and returned: a passing send that
            // began after the map update returned would be a leak; a long gap before the first
            // dropped send means the sender was not running, not that packets passed.
            let _ = writeln!(out, "{MARK}{} {now} {sends} {started} {} {} {}", if passed { "pass" } else { "drop" }, last.0, last.1, last.2);
            let _ = out.flush();
        }
        last = (started, now, switched);
    }
}

/// The calling thread's involuntary context switches so far.
fn involuntary_switches() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-parameter for getrusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is writable; RUSAGE_THREAD is the calling thread.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    usage.ru_nivcsw as u64
}

/// Keeps the pipeline and the busy sender off each other's core (this VM has two), so the
/// figures measure palisade rather than the scheduler; with one CPU this is a no-op.
fn pin_to_cpu(cpu: usize) {
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) <= cpu {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within its bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// In the pod itself: quarantine its own cgroup through the pinned map, then send at once.
/// Prints, per iteration, how long the update took, how many sends still passed after it
/// returned (want 0) and when the first EPERM came back.
fn selftest(pins: &Path, cgroup_id: u64, addr: &str, iterations: usize) {
    use palisade::quarantine::QuarantineDatapath as _;
    let mut map = KernelQuarantineMap::open_pinned(pins).expect("pinned map");
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
    let mut out = std::io::stdout().lock();
    for _ in 0..iterations {
        assert!(socket.send_to(b"palisade-bench", addr).is_ok(), "send before the update failed");
        let before = monotonic_now_ns();
        map.set(cgroup_id, Default::default()).expect("set");
        let updated = monotonic_now_ns();
        let mut passed = 0u64;
        let eperm = loop {
            match socket.send_to(b"palisade-bench", addr) {
                Ok(_) => passed += 1,
                Err(_) => break monotonic_now_ns(),
            }
        };
        map.clear(cgroup_id).expect("clear");
        let _ = writeln!(out, "{MARK}self {} {passed} {}", updated - before, eperm - updated);
        let _ = out.flush();
    }
}

struct Role {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Role {
    fn spawn(lab: &Lab, pod: &str, args: &[&str]) -> Role {
        let exe = std::env::current_exe().expect("exe");
        let mut child = lab
            .exec(pod, exe)
            .expect("exec in pod")
            .arg("--role")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn role");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(marked) = line.strip_prefix(MARK) {
                    if tx.send(marked.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        Role { child, stdin, lines }
    }

    /// The time of the next `what` transition and the sender's send count at that moment.
    fn wait_for(&self, what: &str) -> (u64, u64) {
        let fields = self.wait_for_fields(what);
        (fields[0], fields[1])
    }

    /// The numbers of the sender's next `what` line: return time, sends so far, this send's
    /// start, the previous send's start and return.
    fn wait_for_fields(&self, what: &str) -> Vec<u64> {
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| panic!("sender: no {what}: {e}"));
            let Some(rest) = line.strip_prefix(what) else { continue };
            let fields: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse::<u64>().ok()).collect();
            if fields.len() >= 5 {
                return fields;
            }
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- the benchmark -------------------------------------------------------------------------

/// The kernel time of the next packet the datapath dropped for quarantine in cgroup `cgroup_id`.
fn first_quarantine_drop(ring: &mut RingBuf<MapData>, cgroup_id: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no quarantine drop record");
        let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        while let Some(item) = ring.next() {
            if item.len() < size_of::<PolicyVerdictEvent>() {
                continue;
            }
            // SAFETY: length checked; plain repr(C) data, any bit pattern is valid.
            let record: PolicyVerdictEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if record.header.kind == KIND_POLICY_VERDICT && record.reason == REASON_QUARANTINE && record.header.cgroup_id == cgroup_id {
                return record.header.ktime_ns;
            }
        }
    }
}

struct Sample {
    /// event ktime -> map update returned
    total: u64,
    /// event ktime -> the pipeline thread has the decoded event (ring buffer wakeup, the
    /// reader task, the priority queue)
    wakeup: u64,
    /// enrichment (process cache)
    enrich: u64,
    /// the rule input (in the cycle's form) and the event context
    input: u64,
    /// input built -> map update returned: rule evaluation and responder
    judge: u64,
    /// rule evaluation (with the JSON form: its conversion to regorus values included)
    evaluate: u64,
    /// responder incl. map update
    respond: u64,
    /// this thread's CPU time from taking the event to the map update returned (the rest of
    /// `total - wakeup` is time the thread was runnable or blocked, not running)
    cpu: u64,
    /// minor page faults and involuntary context switches of this thread over the same span
    faults: u64,
    preempted: u64,
}

/// This thread's CPU time (ns), minor faults and involuntary context switches so far.
fn thread_usage() -> (u64, u64, u64) {
    // SAFETY: zeroed timespec/rusage are valid out-parameters for these calls.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        (ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64, ru.ru_minflt as u64, ru.ru_nivcsw as u64)
    }
}

/// How the pipeline thread gets the protected event from the priority ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Before: a reader task on the two-thread runtime reads the ring (woken by the kernel)
    /// and forwards each event through a queue to the pipeline thread (woken by the task), as
    /// the daemon's `reader::run_routed` did.
    Forwarded,
    /// Now: the pipeline thread reads the ring itself (`reader::PipelineSource`, the daemon's
    /// code), woken by the kernel.
    Direct,
}

/// The pipeline thread's scheduler slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slice {
    Default,
    /// `sys::request_short_slice(100 µs)`, as the daemon's pipeline thread asks.
    Short,
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    read: Read,
    slice: Slice,
}

impl Mode {
    fn describe(&self) -> String {
        let read = match self.read {
            Read::Forwarded => "priority ring read by a reader task, forwarded through a queue (before)",
            Read::Direct => "priority ring read by the pipeline thread itself (now)",
        };
        let slice = match self.slice {
            Slice::Default => "default scheduler slice",
            Slice::Short => "100 µs slice",
        };
        format!("{read}; {slice}")
    }
}

/// Taking turns cycle by cycle.
const MODES: [Mode; 4] = [
    Mode { read: Read::Forwarded, slice: Slice::Default },
    Mode { read: Read::Direct, slice: Slice::Default },
    Mode { read: Read::Forwarded, slice: Slice::Short },
    Mode { read: Read::Direct, slice: Slice::Short },
];

/// Who holds the priority ring between and during cycles.
enum Priority {
    Idle(RingBuf<MapData>, tokio::sync::mpsc::Receiver<Queued>),
    /// A reader task has it (`forward`); the sender stops it and the task returns the ring.
    Forwarded(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<RingBuf<MapData>>, tokio::sync::mpsc::Receiver<Queued>),
    Direct(reader::PipelineSource),
    Switching,
}

impl Priority {
    /// Hands the ring to the reader of `read` (the other one gives it back first).
    fn prepare(
        self,
        read: Read,
        runtime: &tokio::runtime::Runtime,
        budget: &Arc<QueueBudget>,
        stats: &Arc<ReaderStats>,
        out: &tokio::sync::mpsc::Sender<Queued>,
    ) -> Priority {
        let (ring, bulk) = match self {
            Priority::Idle(ring, bulk) => (ring, bulk),
            Priority::Forwarded(stop, task, bulk) => {
                if read == Read::Forwarded {
                    return Priority::Forwarded(stop, task, bulk);
                }
                let _ = stop.send(());
                (runtime.block_on(task).expect("reader task"), bulk)
            }
            Priority::Direct(source) => {
                if read == Read::Direct {
                    return Priority::Direct(source);
                }
                source.into_parts()
            }
            Priority::Switching => unreachable!("never left switching"),
        };
        match read {
            Read::Direct => Priority::Direct(reader::PipelineSource::new(ring, bulk, budget.clone(), stats.clone()).expect("source")),
            Read::Forwarded => {
                let (stop, stopped) = tokio::sync::oneshot::channel();
                Priority::Forwarded(stop, runtime.spawn(forward(ring, stats.clone(), out.clone(), stopped)), bulk)
            }
        }
    }
}

/// The priority half of the daemon's former reader task (`reader::run_routed` before issue
/// 10's direct read): woken by the kernel, decode, send through a queue to the pipeline thread.
async fn forward(
    ring: RingBuf<MapData>,
    stats: Arc<ReaderStats>,
    out: tokio::sync::mpsc::Sender<Queued>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> RingBuf<MapData> {
    // SAFETY: the ring buffer owns its fd and lives inside its AsyncFd while registered.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1).expect("register");
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return fd.into_inner(),
            guard = fd.readable_mut() => {
                let mut guard = guard.expect("readable");
                while let Some(event) = {
                    let ring = guard.get_inner_mut();
                    ring.next().map(|item| stats.decode_counted(&item))
                } {
                    if let Some(event) = event {
                        let bytes = reader::event_bytes(&event);
                        // The bench's pipeline holds the receiver for the whole run.
                        out.send(Queued { event, bytes }).await.expect("pipeline queue");
                    }
                }
                guard.clear_ready();
            }
        }
    }
}

/// How the rule input of the protected event is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputForm {
    /// A serde_json tree, converted to regorus values by the evaluating session (before).
    Json,
    /// Regorus values built straight from the typed event (now).
    Direct,
}

/// Judges one protected event in `form`: the input built from the typed event, then the rule
/// pack's verdict (what the pipeline thread does before the responder).
struct Judge {
    /// The pack the JSON form evaluates with (its own session, as the pipeline's evaluator had).
    pack: Arc<RulePack>,
    local: LocalEvaluator,
    json_session: palisade::rules::Session,
    builder: InputBuilder,
    clock: Clock,
    node: String,
}

impl Judge {
    fn new(pack: Arc<PackHandle>, node: &str) -> Judge {
        let json_pack = pack.current();
        let json_session = json_pack.session().expect("session");
        Judge { local: LocalEvaluator::new(pack), pack: json_pack, json_session, builder: InputBuilder::new(node), clock: Clock::new(), node: node.to_string() }
    }

    /// The hits, and the time (CLOCK_MONOTONIC) the input was built.
    fn judge(&mut self, enriched: &palisade::events::enrich::EnrichedEvent, form: InputForm) -> (Vec<RuleHit>, u64) {
        match form {
            InputForm::Json => {
                let input = to_input_tree(enriched, &self.clock, &self.node);
                let _context = Arc::new(EventContext::of(enriched, &self.clock));
                let built = monotonic_now_ns();
                let verdict = self.pack.evaluate_in(&mut self.json_session, &input).expect("evaluate");
                (verdict.hits, built)
            }
            InputForm::Direct => {
                let input = self.builder.build(enriched, &self.clock);
                let context = Arc::new(EventContext::of(enriched, &self.clock));
                let built = monotonic_now_ns();
                (self.local.evaluate(input, Some(context)).hits.expect("evaluate"), built)
            }
        }
    }
}

/// A dup2 of a socket onto stderr in pod shop/a, as the trigger role produces it.
fn synthetic_dup() -> palisade::events::enrich::EnrichedEvent {
    use palisade::events::decode::{DupData, Event, Header};
    use palisade::events::enrich::{Ancestor, ProcessDetails, Stdio};
    let header = Header {
        ktime_ns: 1,
        cgroup_id: 7,
        kind: EventKind::Dup,
        source: "tracepoint",
        pid: 4242,
        tid: 4242,
        ppid: 4200,
        uid: 0,
        gid: 0,
        euid: 0,
        egid: 0,
        comm: "quarantine_late".into(),
        truncated: false,
        start_ns: 99,
    };
    let process = ProcessDetails {
        exe: Some("/work/target/release/deps/quarantine_latency".into()),
        exe_resolved: true,
        cmdline: vec!["quarantine_latency".into(), "--role".into(), "trigger".into()],
        cmdline_truncated: false,
        cwd: Some("/work".into()),
        stdio: Stdio { stdin: "pipe", stdout: "pipe", stderr: "socket" },
        ancestors: vec![Ancestor { pid: 4200, comm: "quarantine_late".into(), exe: Some("/work/target/release/deps/quarantine_latency".into()) }],
    };
    palisade::events::enrich::EnrichedEvent {
        event: Event { header, data: EventData::Dup(DupData { op: "dup2", old_fd: 3, new_fd: 2, flags: 0, result: 2, new_fd_kind: "socket" }) },
        pod: Some(Arc::new(PodRef { namespace: "shop".into(), name: "a".into(), labels: Default::default(), service_account: None })),
        process: Arc::new(process),
    }
}

/// `--role profile json|direct N`: N judgements of the synthetic dup, for callgrind.
fn profile(form: Option<&str>, n: usize) {
    let form = match form {
        Some("json") => InputForm::Json,
        Some("direct") => InputForm::Direct,
        other => panic!("profile: want json or direct, not {other:?}"),
    };
    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let pack = PackHandle::new(RulePack::load(&rules_dir).unwrap_or_else(|e| panic!("rules: {}", e.lines().join("\n"))));
    let mut judge = Judge::new(pack, "node-1");
    let event = synthetic_dup();
    let mut hits = 0;
    for _ in 0..n {
        hits += judge.judge(&event, form).0.len();
    }
    println!("profile: {n} judgements ({form:?}), {hits} hits");
}

fn percentiles(mut v: Vec<u64>) -> (u64, u64, u64) {
    v.sort_unstable();
    let p = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (p(0.50), p(0.99), *v.last().unwrap_or(&0))
}

/// The file system type of `path` (from /proc/mounts: the longest mount point above it).
fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point).then(|| (point.len(), kind.to_string()))
        })
        .max()
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "unknown".into())
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn row(name: &str, v: Vec<u64>) {
    let n = v.len();
    let (p50, p99, max) = percentiles(v);
    println!("| {name} | {n} | {} | {} | {} |", us(p50), us(p99), us(max));
}

fn run(cycles: usize) {
    let lab_name = format!("qbench{}", std::process::id());
    let inventory_text = format!(
        "endpoints:\n  - namespace: shop\n    name: a\n    ips: [198.18.9.1]\n    cgroup: /palisade-bench/{lab_name}/shop/a\n  - namespace: shop\n    name: b\n    ips: [198.18.9.2]\n    cgroup: /palisade-bench/{lab_name}/shop/b\n"
    );
    let inventory = Inventory::parse(&inventory_text, Path::new("bench.yaml")).expect("inventory");
    let lab = Lab::up(&inventory, &LabOptions::named(&lab_name)).expect("lab up").into_guard();
    let a_dir = lab.pod_cgroup_dir("shop/a").expect("cgroup");
    let a_id = palisade::lab::cgroup_id(&a_dir).expect("cgroup id");

    // Datapath, pinned, attached to both pods.
    let pins = PathBuf::from(loader::BPFFS_MOUNT).join(format!("palisade-bench-{lab_name}"));
    let mut dp = loader::load(&LoadOptions { pin_dir: Some(pins.clone()), ..LoadOptions::default() }).expect("load datapath").ebpf;
    let mut segmentation = Datapath::adopt(&mut dp).expect("adopt");
    for pod in ["shop/a", "shop/b"] {
        segmentation.attach_pinned(&mut dp, &lab.pod_cgroup_dir(pod).expect("dir"), &pins.join("links")).expect("attach");
    }
    let state_root = std::env::var_os("BENCH_STATE_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib"));
    let state_dir = state_root.join(format!("palisade-bench-{lab_name}"));
    let config = ResponderConfig {
        state_dir: state_dir.clone(),
        cgroup_root: palisade::lab::cgroup2_mount().expect("cgroup2"),
        policy: ResponsePolicy { max_quarantines_per_minute: 0, max_quarantines_per_namespace_per_minute: 0, ..ResponsePolicy::default() },
    };
    let map = KernelQuarantineMap::from_ebpf(&dp).expect("map");
    // The datapath's own drop records carry the kernel time of each dropped packet; no rate
    // limit here so the first drop of every cycle is reported.
    {
        let mut config: Array<&mut MapData, DatapathConfig> =
            Array::try_from(dp.map_mut(MAP_SEG_CONFIG).expect("SEG_CONFIG")).expect("array");
        config.set(0, DatapathConfig { emit_denied: 1, deny_events_per_window: u32::MAX }, 0).expect("config");
    }
    let mut drops: RingBuf<MapData> = RingBuf::try_from(dp.take_map(MAP_SEG_EVENTS).expect("SEG_EVENTS")).expect("ring");
    let (service, _) = QuarantineService::start(config, Box::new(map), &inventory).expect("responder");

    // Probes: the daemon's load (priority ring and per-pod budgets on, as `palisade run` loads
    // them), monitoring pod a, dup events on. The pod's priority budget is raised: on a quiet
    // machine the cycles come faster than the default 500 protected events/s, and past it the
    // kernel sends them through the bulk ring (as it should), which is not the path measured.
    let budgets = EventBudgets { pod_priority_rate: 1_000_000, pod_priority_burst: 1_000_000, ..EventBudgets::default() };
    let options = LoadOptions { budgets: Some(budgets), ..LoadOptions::default() };
    let mut probes = loader::load(&options).expect("load probes");
    probes.attach_all(&options).expect("attach probes");
    let bulk_ring = probes.take_ring_buffer().expect("ring");
    let priority_ring = probes.take_priority_ring_buffer().expect("priority ring");
    loader::set_enabled_kinds(&mut probes.ebpf, &[EventKind::Dup]).expect("kinds");
    loader::monitor_cgroup(&mut probes.ebpf, a_id, 0).expect("monitor");

    // The daemon's reader task drains the bulk ring on a two-thread runtime; the priority ring
    // is read in the cycle's way (`Read`), the ring moving between the two between cycles.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let budget = Arc::new(QueueBudget::new(64 << 20, 4 << 20, 4 << 20));
    let stats = Arc::new(ReaderStats::default());
    let (priority_tx, mut priority_rx) = tokio::sync::mpsc::channel::<Queued>(32768);
    let (bulk_tx, bulk_rx) = tokio::sync::mpsc::channel::<Queued>(32768);
    runtime.spawn(reader::run_bulk(bulk_ring, stats.clone(), Arc::new(QueueDrops::default()), budget.clone(), bulk_tx));
    let mut priority = Priority::Idle(priority_ring, bulk_rx);
    let mut trimmer = palisade::memory::Trimmer::default();

    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let pack = RulePack::load(&rules_dir).unwrap_or_else(|e| panic!("rules {}: {}", rules_dir.display(), e.lines().join("\n")));
    let rules = PackHandle::new(pack);
    let mut endpoints = EndpointIndex::default();
    endpoints.insert(a_id, PodRef { namespace: "shop".into(), name: "a".into(), labels: Default::default(), service_account: None });
    let mut cache = ProcCache::new(1024);
    let node = palisade::sys::hostname();

    // The pipeline thread (this one) judges the protected event itself, building the input in
    // the cycle's form, and runs the responder.
    let service = Arc::new(service);
    let mut judge = Judge::new(rules.clone(), &node);

    let mut trigger = Role::spawn(&lab, "shop/a", &["trigger"]);

    // One cycle: trigger, follow the event through the pipeline, return the sample.
    let form = InputForm::Direct;
    let mut cycle = |n: usize, mode: Mode, trigger: &mut Role| -> (Sample, u64) {
        priority = std::mem::replace(&mut priority, Priority::Switching).prepare(mode.read, &runtime, &budget, &stats, &priority_tx);
        match mode.slice {
            Slice::Default => palisade::sys::default_slice().expect("default slice"),
            Slice::Short => {
                palisade::sys::request_short_slice(Duration::from_micros(100)).expect("short slice");
            }
        }
        writeln!(trigger.stdin, "go").expect("trigger");
        trigger.stdin.flush().expect("flush");
        loop {
            // As the daemon's pipeline thread waits for the next event.
            let event = match &mut priority {
                Priority::Forwarded(..) => {
                    let queued = runtime
                        .block_on(async { tokio::time::timeout(Duration::from_secs(5), priority_rx.recv()).await })
                        .unwrap_or_else(|_| panic!("cycle {n}: no dup event from the pod"))
                        .expect("reader running");
                    queued.event
                }
                Priority::Direct(source) => match source.next(&mut trimmer).expect("priority ring") {
                    Some((event, true)) => event,
                    other => panic!("cycle {n}: not a protected event: {other:?}"),
                },
                Priority::Idle(..) | Priority::Switching => unreachable!("prepared above"),
            };
            let received = monotonic_now_ns();
            let usage_before = thread_usage();
            if event.header.cgroup_id != a_id || !matches!(event.data, EventData::Dup(_)) {
                continue;
            }
            let ktime = event.header.ktime_ns;
            let enriched = enrich(event, &endpoints, &mut cache);
            let enriched_at = monotonic_now_ns();
            let (hits, input_at) = judge.judge(&enriched, form);
            let Some(hit) = hits.into_iter().find(|h| h.action == Action::Quarantine) else {
                panic!("cycle {n}: no quarantine verdict ({form:?})");
            };
            let evaluated = monotonic_now_ns();
            let decision = service.respond(&Finding { hit, namespace: "shop".into(), name: "a".into(), alert_id: format!("bench-{n}") });
            assert_eq!(decision.outcome, Outcome::Quarantined, "cycle {n}: {decision:?}");
            let enforced = decision.enforced_at_ns.expect("enforced_at");
            let usage_after = thread_usage();
            let sample = Sample {
                cpu: usage_after.0 - usage_before.0,
                faults: usage_after.1 - usage_before.1,
                preempted: usage_after.2 - usage_before.2,
                total: enforced - ktime,
                wakeup: received.saturating_sub(ktime),
                enrich: enriched_at - received,
                input: input_at - enriched_at,
                judge: enforced - input_at,
                evaluate: evaluated - input_at,
                respond: enforced - evaluated,
            };
            return (sample, ktime);
        }
    };

    // Warm-up (procfs cache, rule engine, page faults), then phase 1.
    for n in 0..20 {
        cycle(n, MODES[n % MODES.len()], &mut trigger);
        service.release("shop/a", "bench", "bench").expect("release");
    }
    // The state file is written by the background writer (the daemon's default) throughout;
    // the modes take turns cycle by cycle, so all see the same load.
    service.set_state_writes(StateWrites::Background);
    let mode_of = |n: usize| MODES[n % MODES.len()];
    let m_of = |n: usize| n % MODES.len();
    let mut phase1: [Vec<Sample>; 4] = Default::default();
    let started = Instant::now();
    for n in 0..cycles {
        phase1[m_of(n)].push(cycle(n, mode_of(n), &mut trigger).0);
        service.release("shop/a", "bench", "bench").expect("release");
    }
    let phase1_elapsed = started.elapsed();

    // Phase 2: a second process in the pod sends continuously.
    let sender = Role::spawn(&lab, "shop/a", &["sender", "198.18.9.2:9"]);
    let (first_pass, first_count) = sender.wait_for("pass");
    let mut last_seen = (first_pass, first_count);
    let mut phase2: [Vec<Sample>; 4] = Default::default();
    let mut to_drop: [Vec<u64>; 4] = Default::default();
    let mut update_to_drop: [Vec<u64>; 4] = Default::default();
    let mut sender_gap: [Vec<u64>; 4] = Default::default();
    let mut leaked_sends = [0u64; 4];
    let mut last_pass_took: [Vec<u64>; 4] = Default::default();
    let mut last_pass_switched = [0u64; 4];
    let mut to_drop_record: [Vec<u64>; 4] = Default::default();
    for n in 0..cycles {
        let m = m_of(n);
        while drops.next().is_some() {}
        let (sample, ktime) = cycle(n, mode_of(n), &mut trigger);
        to_drop_record[m].push(first_quarantine_drop(&mut drops, a_id).saturating_sub(ktime));
        let fields = sender.wait_for_fields("drop");
        let (dropped, last_pass_started, last_pass_returned) = (fields[0], fields[3], fields[4]);
        let update_returned = ktime + sample.total;
        to_drop[m].push(dropped.saturating_sub(ktime));
        // How long after the map update the sender saw the drop (its loop period bounds it).
        update_to_drop[m].push(dropped.saturating_sub(update_returned));
        // A send that began after the update returned and still passed would be a leak.
        if last_pass_started > update_returned {
            leaked_sends[m] += 1;
        }
        // From the last send that passed to the first that was dropped: the sender's own gap
        // (one loop period when it kept running).
        sender_gap[m].push(fields[2].saturating_sub(last_pass_returned));
        last_pass_took[m].push(last_pass_returned.saturating_sub(last_pass_started));
        last_pass_switched[m] += fields.get(5).copied().unwrap_or(0);
        phase2[m].push(sample);
        service.release("shop/a", "bench", "bench").expect("release");
        last_seen = sender.wait_for("pass");
    }
    let sender_period_ns = (last_seen.0 - first_pass) / (last_seen.1 - first_count).max(1);
    drop(sender);
    drop(trigger);

    // Phase 3: the datapath alone, inside the pod: update, then the very next packet.
    let selftest = Role::spawn(
        &lab,
        "shop/a",
        &["selftest", pins.to_str().expect("utf-8 pin path"), &a_id.to_string(), "198.18.9.2:9", &cycles.to_string()],
    );
    let (mut update_ns, mut next_packet_ns, mut passed_after) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..cycles {
        let line = selftest.lines.recv_timeout(Duration::from_secs(10)).expect("selftest line");
        let fields: Vec<u64> = line.strip_prefix("self ").unwrap_or("").split_whitespace().filter_map(|f| f.parse().ok()).collect();
        if let [update, passed, eperm] = fields[..] {
            update_ns.push(update);
            passed_after += passed;
            next_packet_ns.push(eperm);
        }
    }
    drop(selftest);

    println!("quarantine latency: {cycles} quarantine/release cycles per phase, phase 1 took {phase1_elapsed:?}");
    println!("sender loop: one sendto every {} on average in phase 2", us(sender_period_ns) + " µs");
    println!();
    println!("state directory: {} ({})", state_dir.display(), fs_type(&state_root));
    for (m, mode) in MODES.iter().enumerate() {
        println!();
        println!("{}, {} cycles per phase", mode.describe(), phase1[m].len());
        println!();
        println!("| from the offending event's kernel timestamp to ... | n | p50 µs | p99 µs | max µs |");
        println!("|---|---|---|---|---|");
        row("map update returned (idle pod)", phase1[m].iter().map(|s| s.total).collect());
        row("  of which: event on the pipeline thread (ring wake-up and, forwarded, reader task and queue)", phase1[m].iter().map(|s| s.wakeup).collect());
        row("  of which: enrichment (process cache)", phase1[m].iter().map(|s| s.enrich).collect());
        row("  of which: rule input and context", phase1[m].iter().map(|s| s.input).collect());
        row("  of which: judging (rule evaluation, responder)", phase1[m].iter().map(|s| s.judge).collect());
        row("    rule evaluation (regorus)", phase1[m].iter().map(|s| s.evaluate).collect());
        row("    responder incl. map update", phase1[m].iter().map(|s| s.respond).collect());
        row("  pipeline thread's CPU time, event taken -> map update returned", phase1[m].iter().map(|s| s.cpu).collect());
        println!(
            "|  minor faults / involuntary switches on the pipeline thread per cycle (mean) | {} | {:.2} / {:.3} | | |",
            phase1[m].len(),
            phase1[m].iter().map(|s| s.faults).sum::<u64>() as f64 / phase1[m].len().max(1) as f64,
            phase1[m].iter().map(|s| s.preempted).sum::<u64>() as f64 / phase1[m].len().max(1) as f64
        );
        row("map update returned (pod sending continuously)", phase2[m].iter().map(|s| s.total).collect());
        row("first dropped packet (datapath drop record, kernel time)", std::mem::take(&mut to_drop_record[m]));
        row("first dropped packet (sender's EPERM)", std::mem::take(&mut to_drop[m]));
        row("  of which: map update returned -> sender's first EPERM", std::mem::take(&mut update_to_drop[m]));
        row("  sender's last passing send returned -> its first dropped send began", std::mem::take(&mut sender_gap[m]));
        println!("|  passing sends that began after the map update returned | {} | | |", leaked_sends[m]);
        row("  the last passing send took", std::mem::take(&mut last_pass_took[m]));
        println!("|  involuntary switches of the sender during its last passing send (all cycles) | {} | | |", last_pass_switched[m]);
    }
    println!();
    println!("| datapath alone, from inside the pod | n | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|");
    row("map update syscall (SEG_QUARANTINE insert)", update_ns);
    row("update returned -> EPERM on the very next sendto", next_packet_ns);
    println!("packets that passed after the update had returned: {passed_after} (of {cycles} quarantines)");

    for pod in ["shop/a", "shop/b"] {
        if let Ok(id) = palisade::lab::cgroup_id(&lab.pod_cgroup_dir(pod).expect("dir")) {
            let _ = datapath::detach_pinned(id, &pins.join("links"));
        }
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir_all(&state_dir);
    drop(lab);
}
