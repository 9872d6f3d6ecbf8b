//! The soak (issue 14): `palisade run --lab` under churn for a long time, with every invariant
//! that must hold throughout measured, printed and checked. Shared by the bench
//! (`cargo bench --bench soak`, 30 minutes by default) and its short CI version
//! (tests/soak_short.rs, about 3 minutes).
//!
//! The lab: two sinks (`udp-sink`), two load pods (`open-loop` floods), three churn slots and the
//! rest senders (`udp-stream`, 20 datagrams a second to a sink, each stamped with its
//! CLOCK_MONOTONIC send time). One action every few seconds, in turn: a churn pod replaced by a
//! new one (new name, new cgroup, new links), the policy files changed, a sender quarantined or
//! released (`palisade quarantine add|release`), the rules directory changed (hot reload). A
//! credential read (`cat /etc/shadow`) in a sender at every step is the alert to keep. Every
//! `restart_every` the daemon is SIGKILLed (under load) and started again; a churn pod is removed
//! while no daemon runs.
//!
//! Invariants (each a failure when broken):
//! - events: at a quiet point of each daemon's life (load stopped, counters settled) the kernel's
//!   submitted records equal the records the reader took off the rings (`emitted` counts a
//!   record after `bpf_ringbuf_submit`, `lost` a failed reserve: attempts = emitted + lost =
//!   received + counted lost); the kernel's per-kind lost count equals its per-pod ring_full +
//!   pod_budget counts; and what the reader decoded was either enriched or dropped (counted
//!   queue_full) in user space. The counters live in maps of the process, so the seconds between
//!   the last check and a SIGKILL cannot be counted by anyone: printed as not checked.
//! - RSS and open fds: at each life's checkpoint (same pods, load stopped) against the same
//!   life's after warm-up, and fds equal across lives.
//! - pins and cgroups left behind: link pins whose cgroup no longer exists, and lab cgroups no
//!   pod owns, at every checkpoint and at the end: zero.
//! - packets leaked from quarantined pods: datagrams a sink received whose send time lies
//!   between the moment `quarantine add` returned and the moment `release` was asked: zero
//!   (and each sender got datagrams through outside its quarantines, or the zero means nothing).
//! - alerts lost across restarts: every credential read made while a daemon ran (except the
//!   one made on purpose 3 s before each SIGKILL, under load: reported) has its alert in the log
//!   at the end; no torn lines.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::{ChildGuard, DaemonGuard, DaemonOptions, PALISADE, repo_root, run_with_timeout, spawn_logged};

const NS: &str = "soak";
const SINK_PORT: u16 = 7000;
/// Datagrams a second per sender.
const SEND_RATE: u32 = 20;
/// How long a change (inventory, policies, rules) may take to be in force.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// RSS at a life's checkpoint may exceed its warm-up sample by this fraction plus `RSS_SLACK_KIB`.
const RSS_GROWTH: f64 = 0.25;
const RSS_SLACK_KIB: u64 = 16 * 1024;
/// Open fds at a checkpoint may exceed the warm-up sample by this many.
const FD_SLACK: usize = 2;
const CHURN_SLOTS: usize = 3;

/// How long and how hard.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub duration: Duration,
    /// Lab pods (at least 10).
    pub pods: usize,
    /// The daemon is SIGKILLed and restarted this often.
    pub restart_every: Duration,
    /// One churn action per step.
    pub step: Duration,
    /// How long into a life the warm-up sample is taken.
    pub warm_up: Duration,
    /// `open-loop` processes per load pod.
    pub load_procs: usize,
}

impl SoakConfig {
    /// From `SOAK_SECS` (default `default_secs`), `SOAK_PODS` (20), `SOAK_RESTART_SECS` (240,
    /// at most a third of the duration), `SOAK_STEP_SECS` (4), `SOAK_WARMUP_SECS` (40),
    /// `SOAK_LOAD_PROCS` (1).
    pub fn from_env(default_secs: u64) -> SoakConfig {
        let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        let duration = var("SOAK_SECS", default_secs);
        SoakConfig {
            duration: Duration::from_secs(duration),
            pods: (var("SOAK_PODS", 20) as usize).max(10),
            restart_every: Duration::from_secs(var("SOAK_RESTART_SECS", 240).min(duration / 3).max(30)),
            step: Duration::from_secs(var("SOAK_STEP_SECS", 4).max(1)),
            warm_up: Duration::from_secs(var("SOAK_WARMUP_SECS", 40)),
            load_procs: var("SOAK_LOAD_PROCS", 1) as usize,
        }
    }
}

/// What the soak found: the figures it printed and the invariants that broke.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub failures: Vec<String>,
    pub lives: usize,
}

#[derive(Debug, Clone)]
struct Pod {
    name: String,
    ip: String,
    role: &'static str,
}

impl Pod {
    fn key(&self) -> String {
        format!("{NS}/{}", self.name)
    }
}

/// One credential read: the alert it must raise.
struct Trigger {
    pod: String,
    pid: u32,
    finished: Instant,
    life: usize,
}

/// A quarantine of one sender, in CLOCK_MONOTONIC ns: from when `quarantine add` returned to
/// when `release` was asked (None: still in force).
struct Window {
    pod: String,
    ip: String,
    from_ns: u64,
    to_ns: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    life: usize,
    rss_kib: u64,
    fds: usize,
    /// The process cache (`events.process_cache` in status): entries and bytes, None when the
    /// status call failed.
    cache: Option<(u64, u64)>,
}

struct LifeFigures {
    life: usize,
    emitted: u64,
    lost: u64,
    records: u64,
    decoded: u64,
    malformed: u64,
    unknown: u64,
    /// The per-pod counters by reason (`events.loss`): the kernel's ring_full and pod_budget,
    /// user space's queue_full.
    ring_full: u64,
    pod_budget: u64,
    queue_full: u64,
    enriched: u64,
    /// The three equations: kernel emitted = reader records; kernel lost (per kind) = per-pod
    /// ring_full + pod_budget; decoded = enriched + queue_full.
    balanced: [bool; 3],
    warm: Option<Sample>,
    checkpoint: Option<Sample>,
}

fn monotonic_ns() -> u64 {
    palisade::time::monotonic_now_ns()
}

fn inventory_text(pods: &[Pod]) -> String {
    let mut text = format!("namespaces:\n  - name: {NS}\nendpoints:\n");
    for pod in pods {
        text.push_str(&format!(
            "  - {{namespace: {NS}, name: {}, labels: {{app: {}, role: {}}}, ips: [{}]}}\n",
            pod.name, pod.name, pod.role, pod.ip
        ));
    }
    text
}

/// The two policy versions the soak alternates between. Neither selects the sinks, so the
/// senders' datagrams pass unless a quarantine cuts them.
fn policies(version: usize) -> Vec<(&'static str, String)> {
    let churn = |from: &str, port: u16| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: churn-ingress\n  namespace: {NS}\n\
             spec:\n  podSelector:\n    matchLabels:\n      role: churn\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from:\n        - podSelector:\n            matchLabels:\n              role: {from}\n\
             \x20     ports:\n        - protocol: TCP\n          port: {port}\n"
        )
    };
    if version % 2 == 0 {
        vec![("churn.yaml", churn("sender", 80))]
    } else {
        let senders = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: sender-ingress\n  namespace: {NS}\n\
             spec:\n  podSelector:\n    matchLabels:\n      role: sender\n  policyTypes: [Ingress]\n  ingress:\n\
             \x20   - from:\n        - podSelector:\n            matchLabels:\n              role: sender\n\
             \x20     ports:\n        - protocol: TCP\n          port: 9000\n"
        );
        vec![("churn.yaml", churn("load", 8080)), ("senders.yaml", senders)]
    }
}

fn status(daemon: &DaemonGuard) -> Value {
    let mut command = Command::new(PALISADE);
    command.args(["status", "-o", "json", "--state-dir"]).arg(&daemon.state_dir);
    let out = run_with_timeout(command, Duration::from_secs(20));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn sum(map: &Value) -> u64 {
    map.as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

fn cli(daemon: &DaemonGuard, args: &[&str]) -> Result<(), String> {
    let mut command = Command::new(PALISADE);
    command.args(args).arg("--state-dir").arg(&daemon.state_dir);
    let out = run_with_timeout(command, Duration::from_secs(30));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("palisade {}: {}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// The RSS and fds of a quiet daemon (load stopped): first waits out the pipeline's idle trim
/// (`palisade::memory`: after a burst, freed pages go back to the system once no event came for
/// `TRIM_INTERVAL`), so what is compared is memory in use, not the allocator's high-water mark.
fn quiet_sample(daemon: &DaemonGuard, start: Instant, life: usize) -> Option<Sample> {
    std::thread::sleep(palisade::memory::TRIM_INTERVAL * 2 + Duration::from_millis(500));
    sample(daemon, start, life)
}

fn sample(daemon: &DaemonGuard, start: Instant, life: usize) -> Option<Sample> {
    let pid = daemon.pid()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = text.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let s = status(daemon);
    let cache = &s["events"]["process_cache"];
    let cache = cache["entries"].as_u64().zip(cache["bytes"].as_u64());
    Some(Sample { at: start.elapsed(), life, rss_kib, fds, cache })
}

/// Every cgroup id on the host (a directory's inode number is its cgroup id).
fn live_cgroup_ids() -> BTreeSet<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = BTreeSet::new();
    let Ok(root) = palisade::lab::cgroup2_mount() else { return ids };
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        ids.insert(meta.ino());
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    ids
}

/// Link pins (`<cgroup id>-<hook>`) anywhere under the pin directory whose cgroup is gone.
fn stale_link_pins(pin_dir: &Path) -> Vec<String> {
    let live = live_cgroup_ids();
    let mut stale = Vec::new();
    let mut stack = vec![pin_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((id, _)) = name.split_once('-') else { continue };
            if let Ok(id) = id.parse::<u64>() {
                if !live.contains(&id) {
                    stale.push(entry.path().display().to_string());
                }
            }
        }
    }
    stale
}

/// Cgroups below the lab's namespace cgroup that no pod of `pods` owns.
fn stray_cgroups(lab: &str, pods: &[Pod]) -> Vec<String> {
    let Ok(mount) = palisade::lab::cgroup2_mount() else { return vec!["no cgroup2 mount".into()] };
    let ns_dir = mount.join(palisade::lab::naming::default_cgroup_root(lab)).join(NS);
    let owned: BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let Ok(entries) = std::fs::read_dir(&ns_dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !owned.contains(e.file_name().to_string_lossy().as_ref()))
        .map(|e| e.path().display().to_string())
        .collect()
}

struct Soak {
    config: SoakConfig,
    daemon: DaemonGuard,
    start: Instant,
    life: usize,
    pods: Vec<Pod>,
    next_churn: usize,
    policy_version: usize,
    reloads: usize,
    rules_dir: PathBuf,
    triggers: Vec<Trigger>,
    windows: Vec<Window>,
    samples: Vec<Sample>,
    lives: Vec<LifeFigures>,
    failures: Vec<String>,
    load: Vec<ChildGuard>,
    streams: Vec<ChildGuard>,
    sinks: Vec<ChildGuard>,
    counts: BTreeMap<&'static str, usize>,
    step_no: usize,
    /// Triggers before this index were waited for at a checkpoint.
    alerts_awaited: usize,
}

impl Soak {
    fn fail(&mut self, what: String) {
        eprintln!("soak: FAILED: {what}");
        self.failures.push(what);
    }

    fn senders(&self) -> Vec<Pod> {
        self.pods.iter().filter(|p| p.role == "sender").cloned().collect()
    }

    fn churn_pod(n: usize) -> Pod {
        Pod { name: format!("churn-{n}"), ip: format!("198.18.1.{}", n % 250 + 1), role: "churn" }
    }

    /// Brings the lab to `self.pods` (pods made or removed) and tells the daemon when one runs.
    fn apply_pods(&mut self, daemon_running: bool) {
        let text = self.daemon.rewrite_inventory(&inventory_text(&self.pods));
        let inventory = palisade::inventory::Inventory::parse(&text, Path::new("soak.yaml")).expect("soak inventory");
        let options = palisade::lab::LabOptions::named(&self.daemon.lab_name);
        if let Err(err) = palisade::lab::Lab::up(&inventory, &options) {
            self.fail(format!("lab up after churn: {err}"));
            return;
        }
        self.daemon.refresh_lab();
        let before = self.daemon.sync_count();
        self.daemon.set_inventory(&inventory_text(&self.pods));
        if daemon_running && !self.daemon.wait_synced(before, Duration::from_millis(500), CHANGE_TIMEOUT) {
            self.fail(format!("life {}: no datapath sync within {CHANGE_TIMEOUT:?} of an inventory change", self.life));
        }
    }

    /// Replaces the oldest churn pod with a new one, or fills an empty slot.
    fn churn(&mut self) {
        let churned: Vec<usize> = self.pods.iter().enumerate().filter(|(_, p)| p.role == "churn").map(|(i, _)| i).collect();
        if churned.len() >= CHURN_SLOTS {
            self.pods.remove(churned[0]);
        }
        self.pods.push(Soak::churn_pod(self.next_churn));
        self.next_churn += 1;
        self.apply_pods(true);
        *self.counts.entry("pods created").or_default() += 1;
        if churned.len() >= CHURN_SLOTS {
            *self.counts.entry("pods deleted").or_default() += 1;
        }
    }

    fn fill_churn_slots(&mut self) {
        let mut changed = false;
        while self.pods.iter().filter(|p| p.role == "churn").count() < CHURN_SLOTS {
            self.pods.push(Soak::churn_pod(self.next_churn));
            self.next_churn += 1;
            *self.counts.entry("pods created").or_default() += 1;
            changed = true;
        }
        if changed {
            self.apply_pods(true);
        }
    }

    fn change_policies(&mut self) {
        self.policy_version += 1;
        let files = policies(self.policy_version);
        let refs: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let before = self.daemon.sync_count();
        self.daemon.set_policies(&refs);
        if !self.daemon.wait_synced(before, Duration::from_millis(500), CHANGE_TIMEOUT) {
            self.fail(format!("life {}: no datapath sync within {CHANGE_TIMEOUT:?} of a policy change", self.life));
        }
        *self.counts.entry("policy changes").or_default() += 1;
    }

    fn rules_generation(&self) -> u64 {
        status(&self.daemon)["rules"]["generation"].as_u64().unwrap_or(0)
    }

    /// Changes a list file of the watched rules directory; the pack in force must follow.
    fn reload_rules(&mut self) {
        let before = self.rules_generation();
        self.reloads += 1;
        let list = self.rules_dir.join("lists/recon_tools.yaml");
        let text = std::fs::read_to_string(&list).expect("recon_tools list");
        let kept: String = text.lines().filter(|l| !l.starts_with("# soak reload")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&list, format!("{kept}# soak reload {}\n", self.reloads)).expect("rewrite list");
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        while self.rules_generation() <= before {
            if Instant::now() > deadline {
                let last = &status(&self.daemon)["rules"]["last_reload"];
                self.fail(format!("life {}: the rule pack did not reload within {CHANGE_TIMEOUT:?} (generation {before}; last reload: {last})", self.life));
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        *self.counts.entry("rule reloads").or_default() += 1;
    }

    /// Releases the longest-held quarantine when two are in force, else quarantines a sender.
    fn quarantine_or_release(&mut self) {
        let open: Vec<usize> = self.windows.iter().enumerate().filter(|(_, w)| w.to_ns.is_none()).map(|(i, _)| i).collect();
        if open.len() >= 2 {
            let i = open[0];
            let pod = format!("{NS}/{}", self.windows[i].pod);
            self.windows[i].to_ns = Some(monotonic_ns());
            match cli(&self.daemon, &["quarantine", "release", &pod, "--reason", "soak"]) {
                Ok(()) => *self.counts.entry("releases").or_default() += 1,
                Err(err) => self.fail(format!("life {}: {err}", self.life)),
            }
            return;
        }
        let held: BTreeSet<String> = open.iter().map(|i| self.windows[*i].pod.clone()).collect();
        let senders = self.senders();
        let candidates: Vec<&Pod> = senders.iter().filter(|p| !held.contains(&p.name)).collect();
        let Some(pod) = candidates.get(self.step_no % candidates.len().max(1)) else { return };
        match cli(&self.daemon, &["quarantine", "add", &pod.key(), "--reason", "soak"]) {
            Ok(()) => {
                self.windows.push(Window { pod: pod.name.clone(), ip: pod.ip.clone(), from_ns: monotonic_ns(), to_ns: None });
                *self.counts.entry("quarantines").or_default() += 1;
            }
            Err(err) => self.fail(format!("life {}: {err}", self.life)),
        }
    }

    /// `cat /etc/shadow` in a sender: the alert that must not be lost.
    fn trigger(&mut self) {
        let senders = self.senders();
        let pod = &senders[self.step_no % senders.len()];
        let mut command = self.daemon.command_in(&pod.key(), "cat");
        command.arg("/etc/shadow").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        let Ok(mut child) = command.spawn() else {
            self.fail(format!("cannot run cat in {}", pod.key()));
            return;
        };
        let pid = child.id();
        let _ = child.wait();
        self.triggers.push(Trigger { pod: pod.name.clone(), pid, finished: Instant::now(), life: self.life });
    }

    fn start_load(&mut self) {
        for load in self.pods.iter().filter(|p| p.role == "load") {
            for i in 0..self.config.load_procs {
                let mut command = self.daemon.command_in(&load.key(), PALISADE);
                // A path the default pack's compiled open filter lets out (a hidden component;
                // missing): /etc/hostname would stay in the kernel and load nothing.
                command.args(["workload", "open-loop", "1000000000000", "/tmp/.palisade-soak-load"]);
                let log = self.daemon.work.join(format!("load-{}-{i}.log", load.name));
                self.load.push(spawn_logged(command, &log));
            }
        }
    }

    fn stop_load(&mut self) {
        self.load.clear();
    }

    /// Waits until the kernel's counters stop moving and reads them with the reader's.
    fn settle_counters(&mut self) -> LifeFigures {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut previous: Option<(u64, u64, u64, u64)> = None;
        loop {
            let s = status(&self.daemon);
            let counters = &s["probes"]["counters"];
            let reader = &s["events"]["reader"];
            let emitted = sum(&counters["emitted"]);
            let records = reader["records"].as_u64().unwrap_or(0);
            let enriched = s["events"]["enriched"].as_u64().unwrap_or(0);
            // Lost too: a pod over its budget loses events without emitting any, so emitted can
            // stand still while losses still climb; and `events.loss` is the loss monitor's
            // sample (every second), so two reads 1.2 s apart that agree mean it caught up.
            let lost_now = sum(&counters["lost"]);
            let settled = previous == Some((emitted, records, enriched, lost_now));
            if (settled && emitted == records) || Instant::now() > deadline {
                let by_reason = |reason: &str| -> u64 {
                    s["events"]["loss"]
                        .as_array()
                        .map(|rows| rows.iter().filter(|r| r["reason"] == reason).filter_map(|r| r["count"].as_u64()).sum())
                        .unwrap_or(0)
                };
                let lost = sum(&counters["lost"]);
                let decoded = reader["decoded"].as_u64().unwrap_or(0);
                let (ring_full, pod_budget, queue_full) = (by_reason("ring_full"), by_reason("pod_budget"), by_reason("queue_full"));
                return LifeFigures {
                    life: self.life,
                    emitted,
                    lost,
                    records,
                    decoded,
                    malformed: reader["malformed"].as_u64().unwrap_or(0),
                    unknown: reader["unknown_kind"].as_u64().unwrap_or(0),
                    ring_full,
                    pod_budget,
                    queue_full,
                    enriched,
                    balanced: [emitted == records, lost == ring_full + pod_budget, decoded == enriched + queue_full],
                    warm: None,
                    checkpoint: None,
                };
            }
            previous = Some((emitted, records, enriched, lost_now));
            std::thread::sleep(Duration::from_millis(1200));
        }
    }

    /// Waits until each credential read of this life has its alert (at most 30 s).
    fn wait_alerts(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let alerted = alerted_pids(&self.daemon);
            if self.triggers.iter().filter(|t| t.life == self.life).all(|t| alerted.contains_key(&(t.pod.clone(), t.pid))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The quiet point of a life: load stopped, every churn slot filled; the event equation,
    /// RSS and fds, pins and cgroups.
    fn checkpoint(&mut self, warm: Option<Sample>) -> LifeFigures {
        self.fill_churn_slots();
        self.stop_load();
        let mut figures = self.settle_counters();
        figures.warm = warm;
        figures.checkpoint = quiet_sample(&self.daemon, self.start, self.life);
        let f = &figures;
        let broken: Vec<String> = [
            format!("kernel emitted {} records, the reader received {}", f.emitted, f.records),
            format!("kernel lost {} (per kind), the per-pod counters say ring_full {} + pod_budget {}", f.lost, f.ring_full, f.pod_budget),
            format!("decoded {}, enriched {} + dropped at the queue {}", f.decoded, f.enriched, f.queue_full),
        ]
        .into_iter()
        .zip(f.balanced)
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| format!("life {}: {what}", f.life))
        .collect();
        for what in broken {
            self.fail(what);
        }
        if let (Some(w), Some(c)) = (figures.warm, figures.checkpoint) {
            let allowed = (w.rss_kib as f64 * (1.0 + RSS_GROWTH)) as u64 + RSS_SLACK_KIB;
            if c.rss_kib > allowed {
                self.fail(format!("life {}: RSS grew from {} KiB after warm-up to {} KiB (allowed {allowed})", self.life, w.rss_kib, c.rss_kib));
            }
            if c.fds > w.fds + FD_SLACK {
                self.fail(format!("life {}: open fds grew from {} after warm-up to {}", self.life, w.fds, c.fds));
            }
        }
        let stale = stale_link_pins(&self.daemon.pin_dir);
        if !stale.is_empty() {
            self.fail(format!("life {}: {} link pins of cgroups that are gone: {stale:?}", self.life, stale.len()));
        }
        let stray = stray_cgroups(&self.daemon.lab_name, &self.pods);
        if !stray.is_empty() {
            self.fail(format!("life {}: {} cgroups no pod owns: {stray:?}", self.life, stray.len()));
        }
        self.wait_alerts();
        // Every credential read so far has been waited for: from here on they are in flight.
        self.alerts_awaited = self.triggers.len();
        figures
    }

    fn step(&mut self) {
        self.step_no += 1;
        self.trigger();
        match self.step_no % 4 {
            0 => self.churn(),
            1 => self.change_policies(),
            2 => self.quarantine_or_release(),
            _ => self.reload_rules(),
        }
        if let Some(s) = sample(&self.daemon, self.start, self.life) {
            self.samples.push(s);
        }
    }
}

/// (pod name, pid) of every credential_read alert, with how many alerts each has.
fn alerted_pids(daemon: &DaemonGuard) -> BTreeMap<(String, u32), usize> {
    let mut out = BTreeMap::new();
    for alert in daemon.rule_alerts() {
        if alert["rule"]["id"] != "credential_read" {
            continue;
        }
        let (Some(pod), Some(pid)) = (alert["pod"]["name"].as_str(), alert["process"]["pid"].as_u64()) else { continue };
        *out.entry((pod.to_string(), pid as u32)).or_insert(0) += 1;
    }
    out
}

/// Alert log lines that are not JSON (a write torn by a SIGKILL).
fn torn_alert_lines(daemon: &DaemonGuard) -> usize {
    let text = std::fs::read_to_string(daemon.state_dir.join("alerts.jsonl")).unwrap_or_default();
    text.lines().filter(|l| serde_json::from_str::<Value>(l).is_err()).count()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Runs the soak and prints its figures; the report lists every invariant that broke.
pub fn run(name: &str, config: SoakConfig) -> SoakReport {
    println!("soak: {config:?}");
    let mut pods = vec![
        Pod { name: "sink-a".into(), ip: "198.18.0.2".into(), role: "sink" },
        Pod { name: "sink-b".into(), ip: "198.18.0.3".into(), role: "sink" },
        Pod { name: "load-a".into(), ip: "198.18.0.4".into(), role: "load" },
        Pod { name: "load-b".into(), ip: "198.18.0.5".into(), role: "load" },
    ];
    for i in 0..config.pods - 4 - CHURN_SLOTS {
        pods.push(Pod { name: format!("sender-{i:02}"), ip: format!("198.18.0.{}", 10 + i), role: "sender" });
    }
    let first_policies = policies(0);
    let mut options = DaemonOptions::new(name, &inventory_text(&pods));
    for (file, text) in &first_policies {
        options = options.policy(file, text);
    }
    // The rules directory is the daemon's to watch and the soak's to change.
    let rules_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("soak-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&rules_dir);
    super::files::copy_dir(&repo_root().join("rules"), &rules_dir);
    options.rules = rules_dir.clone();
    let daemon = DaemonGuard::start(options);
    let start = Instant::now();
    let mut soak = Soak {
        config: config.clone(),
        daemon,
        start,
        life: 1,
        pods,
        next_churn: 0,
        policy_version: 0,
        reloads: 0,
        rules_dir: rules_dir.clone(),
        triggers: Vec::new(),
        windows: Vec::new(),
        samples: Vec::new(),
        lives: Vec::new(),
        failures: Vec::new(),
        load: Vec::new(),
        streams: Vec::new(),
        sinks: Vec::new(),
        counts: BTreeMap::new(),
        step_no: 0,
        alerts_awaited: 0,
    };
    soak.fill_churn_slots();

    // Sinks, then one stream per sender to a sink.
    let sinks: Vec<Pod> = soak.pods.iter().filter(|p| p.role == "sink").cloned().collect();
    for sink in &sinks {
        let mut command = soak.daemon.command_in(&sink.key(), PALISADE);
        command.args(["workload", "udp-sink", &SINK_PORT.to_string()]);
        let log = soak.daemon.work.join(format!("{}.log", sink.name));
        soak.sinks.push(spawn_logged(command, &log));
    }
    std::thread::sleep(Duration::from_millis(300));
    for (i, sender) in soak.senders().iter().enumerate() {
        let sink = &sinks[i % sinks.len()];
        let mut command = soak.daemon.command_in(&sender.key(), PALISADE);
        command.args(["workload", "udp-stream", &format!("{}:{SINK_PORT}", sink.ip), &SEND_RATE.to_string()]);
        let log = soak.daemon.work.join(format!("{}.log", sender.name));
        soak.streams.push(spawn_logged(command, &log));
    }
    soak.start_load();

    let mut life_started = Instant::now();
    let mut warm: Option<Sample> = None;
    while start.elapsed() < config.duration {
        soak.step();
        if warm.is_none() && life_started.elapsed() >= config.warm_up {
            // The warm-up sample, taken as the checkpoint is: load stopped, slots filled.
            soak.fill_churn_slots();
            soak.stop_load();
            warm = quiet_sample(&soak.daemon, soak.start, soak.life);
            soak.start_load();
        }
        let remaining = config.duration.saturating_sub(start.elapsed());
        if life_started.elapsed() >= config.restart_every && remaining > config.restart_every / 2 {
            let figures = soak.checkpoint(warm.take());
            soak.lives.push(figures);
            // Killed under load, with a credential read in flight.
            soak.start_load();
            std::thread::sleep(Duration::from_secs(3));
            soak.trigger();
            soak.daemon.kill();
            *soak.counts.entry("SIGKILLs").or_default() += 1;
            for t in &mut soak.triggers[soak.alerts_awaited..] {
                // In flight at the kill (after the checkpoint): reported, not required.
                t.life = 0;
            }
            // A churn pod deleted while no daemon runs: its links must go at the next start.
            if let Some(i) = soak.pods.iter().position(|p| p.role == "churn") {
                soak.pods.remove(i);
                soak.apply_pods(false);
                *soak.counts.entry("pods deleted").or_default() += 1;
                *soak.counts.entry("pods deleted while no daemon ran").or_default() += 1;
            }
            soak.stop_load();
            soak.daemon.restart();
            soak.life += 1;
            life_started = Instant::now();
            soak.start_load();
        } else {
            std::thread::sleep(config.step.saturating_sub(Duration::from_millis(100)));
        }
    }
    let figures = soak.checkpoint(warm.take());
    soak.lives.push(figures);
    let stopped_ns = monotonic_ns();
    soak.streams.clear();
    std::thread::sleep(Duration::from_millis(500));
    soak.sinks.clear();
    for w in soak.windows.iter_mut().filter(|w| w.to_ns.is_none()) {
        w.to_ns = Some(stopped_ns);
    }
    report(soak, &sinks)
}

fn report(mut soak: Soak, sinks: &[Pod]) -> SoakReport {
    let elapsed = soak.start.elapsed();
    println!();
    println!("soak: {:.1} min, {} lives of the daemon, {} pods ({} senders, {} churn slots)", elapsed.as_secs_f64() / 60.0, soak.lives.len(), soak.pods.len(), soak.senders().len(), CHURN_SLOTS);
    println!("churn: {:?}", soak.counts);

    println!();
    println!("events at each life's quiet point (kernel: emitted = submitted records, lost = failed reserves):");
    println!("| life | kernel emitted | reader received | kernel lost | per pod: ring_full + pod_budget | decoded (malformed, unknown) | enriched + queue_full | equations |");
    println!("|---|---|---|---|---|---|---|---|");
    for f in &soak.lives {
        let ok: Vec<&str> = f.balanced.iter().map(|b| if *b { "=" } else { "NOT =" }).collect();
        println!(
            "| {} | {} | {} | {} | {} + {} | {} ({}, {}) | {} + {} | {} |",
            f.life, f.emitted, f.records, f.lost, f.ring_full, f.pod_budget, f.decoded, f.malformed, f.unknown, f.enriched, f.queue_full, ok.join(" ")
        );
    }
    println!("(the seconds between a life's quiet point and its SIGKILL are not countable: the counters die with the process)");

    println!();
    println!("RSS and open fds (after warm-up -> at the checkpoint, load stopped, same pods):");
    println!("| life | warm-up | checkpoint | fds warm-up | fds checkpoint | processes cached warm-up | checkpoint |");
    println!("|---|---|---|---|---|---|---|");
    for f in &soak.lives {
        let show = |s: Option<Sample>| {
            s.map(|s| {
                let cache = s.cache.map(|(n, b)| format!("{n} ({})", mib(b / 1024))).unwrap_or_else(|| "-".into());
                (format!("{} at {:.0} s", mib(s.rss_kib), s.at.as_secs_f64()), s.fds.to_string(), cache)
            })
            .unwrap_or(("-".into(), "-".into(), "-".into()))
        };
        let (w, wf, wc) = show(f.warm);
        let (c, cf, cc) = show(f.checkpoint);
        println!("| {} | {w} | {c} | {wf} | {cf} | {wc} | {cc} |", f.life);
    }
    let checkpoint_fds: Vec<usize> = soak.lives.iter().filter_map(|f| f.checkpoint.map(|s| s.fds)).collect();
    if let (Some(first), Some(max)) = (checkpoint_fds.first(), checkpoint_fds.iter().max()) {
        if *max > first + FD_SLACK {
            soak.fail(format!("open fds at the checkpoints grew across lives: {checkpoint_fds:?}"));
        }
    }
    // The state a daemon starts from (alert log, quarantine records) grows with the soak; what
    // a fresh daemon holds must not.
    let checkpoint_rss: Vec<u64> = soak.lives.iter().filter_map(|f| f.checkpoint.map(|s| s.rss_kib)).collect();
    if let (Some(first), Some(max)) = (checkpoint_rss.first(), checkpoint_rss.iter().max()) {
        let allowed = (*first as f64 * (1.0 + RSS_GROWTH)) as u64 + RSS_SLACK_KIB;
        if *max > allowed {
            soak.fail(format!("RSS at the checkpoints grew across lives: {checkpoint_rss:?} KiB (allowed {allowed})"));
        }
    }
    println!("RSS, fds and the process cache over time (one sample a minute):");
    let mut last_minute = u64::MAX;
    for s in &soak.samples {
        let minute = s.at.as_secs() / 60;
        if minute != last_minute {
            last_minute = minute;
            let cache = s.cache.map(|(n, b)| format!("{n} processes cached ({})", mib(b / 1024))).unwrap_or_default();
            println!("  {:5.1} min  life {}  {}  {} fds  {cache}", s.at.as_secs_f64() / 60.0, s.life, mib(s.rss_kib), s.fds);
        }
    }

    // Leaks: datagrams sent from a quarantined sender that a sink received.
    let by_ip: BTreeMap<String, String> = soak.senders().iter().map(|p| (p.ip.clone(), p.name.clone())).collect();
    let mut received: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut lines = 0u64;
    for sink in sinks {
        let text = std::fs::read_to_string(soak.daemon.work.join(format!("{}.log", sink.name))).unwrap_or_default();
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(ip), Some(_seq), Some(sent)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Some(name), Ok(sent)) = (by_ip.get(ip), sent.parse::<u64>()) else { continue };
            received.entry(name.clone()).or_default().push(sent);
            lines += 1;
        }
    }
    let mut leaked = 0usize;
    let mut quarantined_secs = 0.0;
    let mut leaks = Vec::new();
    for w in &soak.windows {
        let to = w.to_ns.unwrap_or(u64::MAX);
        quarantined_secs += (to.saturating_sub(w.from_ns)) as f64 / 1e9;
        let n = received.get(&w.pod).map(|v| v.iter().filter(|t| **t >= w.from_ns && **t < to).count()).unwrap_or(0);
        if n > 0 {
            leaks.push(format!("{n} datagrams from {} ({}) sent while it was quarantined reached a sink", w.pod, w.ip));
        }
        leaked += n;
    }
    for leak in leaks {
        soak.fail(leak);
    }
    println!();
    println!(
        "packets: {lines} datagrams received from {} senders; {} quarantines ({quarantined_secs:.0} pod-seconds quarantined); leaked from quarantined pods: {leaked}",
        received.len(),
        soak.windows.len()
    );
    for sender in soak.senders() {
        let outside = received.get(&sender.name).map(|v| {
            v.iter().filter(|t| !soak.windows.iter().any(|w| w.pod == sender.name && **t >= w.from_ns && **t < w.to_ns.unwrap_or(u64::MAX))).count()
        });
        if outside.unwrap_or(0) == 0 {
            soak.fail(format!("no datagram from {} reached a sink outside its quarantines: the leak count means nothing", sender.name));
        }
    }

    // Alerts.
    let alerted = alerted_pids(&soak.daemon);
    let due: Vec<&Trigger> = soak.triggers.iter().filter(|t| t.life != 0).collect();
    let in_flight: Vec<&Trigger> = soak.triggers.iter().filter(|t| t.life == 0).collect();
    let missing: Vec<String> = due.iter().filter(|t| !alerted.contains_key(&(t.pod.clone(), t.pid))).map(|t| format!("{}:{} (life {})", t.pod, t.pid, t.life)).collect();
    let duplicated = due.iter().filter(|t| alerted.get(&(t.pod.clone(), t.pid)).is_some_and(|n| *n > 1)).count();
    let in_flight_alerted = in_flight.iter().filter(|t| alerted.contains_key(&(t.pod.clone(), t.pid))).count();
    let torn = torn_alert_lines(&soak.daemon);
    println!(
        "alerts: {} credential reads due, {} alerted, lost {}; duplicated {duplicated}; read under load 3 s before a SIGKILL: {} of which {} alerted; torn alert log lines: {torn}",
        due.len(),
        due.len() - missing.len(),
        missing.len(),
        in_flight.len(),
        in_flight_alerted
    );
    if !missing.is_empty() {
        soak.fail(format!("{} alerts lost: {missing:?}", missing.len()));
    }
    if torn > 0 {
        soak.fail(format!("{torn} torn lines in the alert log"));
    }

    // Left behind, checked while the last daemon still runs (its pins are meant to outlive it).
    let stale = stale_link_pins(&soak.daemon.pin_dir);
    let stray = stray_cgroups(&soak.daemon.lab_name, &soak.pods);
    println!("left behind at the end: {} link pins of cgroups that are gone, {} cgroups no pod owns", stale.len(), stray.len());

    println!();
    if soak.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&soak.rules_dir);
        println!("soak: every invariant held");
    } else {
        // The daemon's log and the workloads' stay for a look.
        soak.daemon.keep_work = true;
        println!("soak: {} invariants broke (rules directory kept at {}):", soak.failures.len(), soak.rules_dir.display());
        for f in &soak.failures {
            println!("  - {f}");
        }
    }
    SoakReport { failures: std::mem::take(&mut soak.failures), lives: soak.lives.len() }
}
