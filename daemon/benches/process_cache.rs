//! The process cache at many live processes (issue 12's "Must show"; prints figures, not a
//! test). Root only.
//!
//! `palisade run --lab` with one pod; after `BENCH_IDLE_SECS` (default 10) idle, a shell in the
//! pod starts `BENCH_PROCESSES` (default 10,000) `sleep` processes that stay alive, each a fork
//! and an exec the probes report. Printed, at idle, with every process alive, and
//! `BENCH_AFTER_SECS` (default 20) after they were all killed: the cache's own accounting from
//! `palisade status` (entries, bytes, hits, misses, evictions), the live processes in the pod's
//! cgroup and the daemon's RSS (smaps_rollup). The figure of interest is the daemon's RSS growth
//! per live process, against what the cache says it holds.
//!
//! Run: `sudo cargo bench -p palisade --bench process_cache` (release daemon; `--profile dev`
//! for a debug one). `BENCH_DAEMON_ARGS` adds arguments to `palisade run`.
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, spawn_logged};

const NS: &str = "procs";
const POD: &str = "procs/many";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// RSS in KiB, from smaps_rollup.
fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("Rss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn live_processes(cgroup: &Path) -> usize {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).map(|t| t.lines().count()).unwrap_or(0)
}

fn cache_stats(daemon: &DaemonGuard) -> Value {
    daemon.status()["events"]["process_cache"].clone()
}

struct Point {
    label: String,
    live: usize,
    rss_kib: u64,
    cache: Value,
}

fn point(label: &str, daemon: &DaemonGuard, pid: u32, cgroup: &Path) -> Point {
    Point { label: label.to_string(), live: live_processes(cgroup), rss_kib: rss_kib(pid), cache: cache_stats(daemon) }
}

fn main() {
    if !support::require_kernel("process_cache") {
        return;
    }
    let processes = env_u64("BENCH_PROCESSES", 10_000);
    let idle = Duration::from_secs(env_u64("BENCH_IDLE_SECS", 10));
    let after = Duration::from_secs(env_u64("BENCH_AFTER_SECS", 20));
    let inventory =
        format!("namespaces:\n  - name: {NS}\nendpoints:\n\x20 - {{namespace: {NS}, name: many, labels: {{app: many}}, ips: [198.18.0.10]}}\n");
    let mut options = DaemonOptions::new("proccache", &inventory);
    if let Ok(extra) = std::env::var("BENCH_DAEMON_ARGS") {
        for arg in extra.split_whitespace() {
            options = options.arg(arg);
        }
    }
    let daemon = DaemonGuard::start(options);
    let pid = daemon.pid().expect("daemon pid");
    let cgroup = daemon.lab().pod_cgroup_dir(POD).expect("pod cgroup");
    std::thread::sleep(idle);
    let mut points = vec![point("idle", &daemon, pid, &cgroup)];

    // One shell starts them all and waits: each `sleep` is a fork and an exec in the pod.
    let script = format!("i=0; while [ $i -lt {processes} ]; do sleep 3600 & i=$((i+1)); done; echo started; wait");
    let mut command = daemon.command_in(POD, "sh");
    command.args(["-c", &script]);
    let started = Instant::now();
    let spawner = spawn_logged(command, &daemon.work.join("spawner.log"));
    let want = processes as usize + 1;
    while live_processes(&cgroup) < want && started.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let spawn_secs = started.elapsed().as_secs_f64();
    // Let the pipeline catch up: the cache's entry count stands still for 3 s.
    let mut last = Value::Null;
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(3) && started.elapsed() < Duration::from_secs(900) {
        std::thread::sleep(Duration::from_millis(500));
        let now = cache_stats(&daemon)["entries"].clone();
        if now != last {
            last = now;
            still_since = Instant::now();
        }
    }
    points.push(point(&format!("{processes} processes alive"), &daemon, pid, &cgroup));

    // Kill them all (the shell too) and watch the cache let go as exits come in.
    std::fs::write(cgroup.join("cgroup.kill"), "1").expect("cgroup.kill");
    drop(spawner);
    std::thread::sleep(after);
    points.push(point(&format!("{} s after all were killed", after.as_secs()), &daemon, pid, &cgroup));

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("process cache, {processes} processes started in {spawn_secs:.1} s; load {}", load.trim());
    println!();
    println!("| | live in the pod | cache entries | cache bytes (its accounting) | daemon RSS | hits / misses / evictions |");
    println!("|---|---|---|---|---|---|");
    for p in &points {
        println!(
            "| {} | {} | {} | {:.1} MB | {:.1} MB | {} / {} / {} |",
            p.label,
            p.live,
            p.cache["entries"],
            p.cache["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            p.rss_kib as f64 / 1024.0,
            p.cache["hits"],
            p.cache["misses"],
            p.cache["evictions"],
        );
    }
    if let [idle, full, ..] = points.as_slice() {
        let grown = full.rss_kib.saturating_sub(idle.rss_kib) as f64 * 1024.0;
        let entries = full.cache["entries"].as_f64().unwrap_or(0.0) - idle.cache["entries"].as_f64().unwrap_or(0.0);
        let accounted = full.cache["bytes"].as_f64().unwrap_or(0.0) - idle.cache["bytes"].as_f64().unwrap_or(0.0);
        if entries > 0.0 {
            println!();
            println!(
                "per cached process: {:.0} bytes of daemon RSS, {:.0} bytes by the cache's accounting",
                grown / entries,
                accounted / entries
            );
        }
    }
}
