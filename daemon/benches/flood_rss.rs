//! The flood of issue 16 and the daemon's memory (prints figures; not a test). Root only.
//!
//! `palisade run --lab` with two pods; after `BENCH_IDLE_SECS` (default 10) idle, pod `noisy`
//! runs two `workload open-loop` processes, one on `/etc/hostname` (kept in the kernel by the
//! pack's compiled open filter) and one on a missing path with a hidden component (which it lets
//! out, as a flooder who knows the filter would choose), and one `workload connect-loop`
//! to a closed loopback port for `BENCH_FLOOD_SECS` (default 15), then everything stops and the
//! daemon is watched for `BENCH_AFTER_SECS` (default 30). The daemon's RSS is read from
//! /proc every second; printed: the curve (start, idle, peak, the end of the flood, 30 s
//! after), where the RSS sits at idle and after (smaps: the heap and anonymous mappings, the
//! executable's own pages, the rest), and the loss counters the status reports.
//!
//! Run: `sudo cargo bench -p palisade --bench flood_rss` (the release daemon; add
//! `--profile dev` for a debug one). `BENCH_DAEMON_ARGS` adds arguments to `palisade run`.
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, PALISADE, spawn_logged};

const NS: &str = "flood";

fn secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
}

fn daemon_pid(daemon: &DaemonGuard) -> u32 {
    // The daemon writes no pid file: the palisade process whose arguments name this lab.
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.get(1) == Some(&b"run".as_slice()) && args.contains(&daemon.lab_name.as_bytes())
        })
        .expect("the daemon's pid")
}

/// (RSS, anonymous RSS, file-backed RSS) in KiB, from smaps_rollup.
fn rss_kib(pid: u32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss = field("Rss:");
    let anon = field("Anonymous:");
    (rss, anon, rss.saturating_sub(anon))
}

/// RSS by mapping kind: heap, other anonymous (thread arenas, stacks, mmap'ed buffers), the
/// executable's pages, other files (libraries, BPF maps).
fn smaps_breakdown(pid: u32) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default();
    let mut sums: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) && !first.ends_with(':') {
            let path = line.split_whitespace().nth(5).unwrap_or("");
            current = if path.is_empty() {
                "anonymous (arenas, stacks, mmap)".into()
            } else if path == "[heap]" {
                "heap (brk)".into()
            } else if path == exe {
                "the executable".into()
            } else if path.starts_with("anon_inode:") {
                format!("{path} (ring buffers, maps)")
            } else if path.starts_with('[') {
                path.to_string()
            } else {
                "other files".into()
            };
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *sums.entry(current.clone()).or_insert(0) += kib;
        }
    }
    sums.into_iter().filter(|(_, kib)| *kib >= 512).collect()
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 / 1024.0)
}

fn main() {
    if !support::require_kernel("flood_rss") {
        return;
    }
    let (idle, flood_for, after) = (secs("BENCH_IDLE_SECS", 10), secs("BENCH_FLOOD_SECS", 15), secs("BENCH_AFTER_SECS", 30));
    let inventory = format!(
        "namespaces:\n  - name: {NS}\nendpoints:\n\
         \x20 - {{namespace: {NS}, name: noisy, labels: {{app: noisy}}, ips: [198.18.0.10]}}\n\
         \x20 - {{namespace: {NS}, name: quiet, labels: {{app: quiet}}, ips: [198.18.0.20]}}\n"
    );
    let mut options = DaemonOptions::new("floodrss", &inventory);
    if let Ok(extra) = std::env::var("BENCH_DAEMON_ARGS") {
        for arg in extra.split_whitespace() {
            options = options.arg(arg);
        }
    }
    let daemon = DaemonGuard::start(options);
    let pid = daemon_pid(&daemon);
    let start = Instant::now();
    let mut curve: Vec<(f64, &str, u64)> = Vec::new();
    let sample = |curve: &mut Vec<(f64, &'static str, u64)>, phase: &'static str| {
        let (rss, _, _) = rss_kib(pid);
        curve.push((start.elapsed().as_secs_f64(), phase, rss));
    };
    sample(&mut curve, "start");
    while start.elapsed() < idle {
        std::thread::sleep(Duration::from_secs(1));
        sample(&mut curve, "idle");
    }
    let idle_breakdown = smaps_breakdown(pid);
    let idle_split = rss_kib(pid);

    let noisy = format!("{NS}/noisy");
    let mut flood = Vec::new();
    for (i, args) in [
        ["workload", "open-loop", "1000000000", "/etc/hostname"],
        ["workload", "open-loop", "1000000000", "/tmp/.palisade-flood-missing"],
        ["workload", "connect-loop", "1000000000", "127.0.0.1:9"],
    ]
    .into_iter()
    .enumerate()
    {
        let mut command = daemon.command_in(&noisy, PALISADE);
        command.args(args);
        flood.push(spawn_logged(command, &daemon.work.join(format!("flood-{i}.log"))));
    }
    let flood_start = Instant::now();
    while flood_start.elapsed() < flood_for {
        std::thread::sleep(Duration::from_secs(1));
        sample(&mut curve, "flood");
    }
    let flood_breakdown = smaps_breakdown(pid);
    let flood_split = rss_kib(pid);
    drop(flood);
    let after_start = Instant::now();
    while after_start.elapsed() < after {
        std::thread::sleep(Duration::from_secs(1));
        sample(&mut curve, "after");
    }
    let after_breakdown = smaps_breakdown(pid);
    let after_split = rss_kib(pid);

    println!("RSS of palisade run (pid {pid}), one sample per second:");
    for (t, phase, rss) in &curve {
        println!("  {t:6.1} s  {phase:6}  {}", mb(*rss));
    }
    let of = |phase: &str| curve.iter().filter(|(_, p, _)| *p == phase).map(|(_, _, r)| *r).collect::<Vec<_>>();
    let flood_rss = of("flood");
    let after_rss = of("after");
    println!();
    println!("| | RSS |");
    println!("|---|---|");
    println!("| start (running) | {} |", mb(curve[0].2));
    println!("| idle ({} s after start) | {} |", idle.as_secs(), mb(*of("idle").last().unwrap_or(&0)));
    println!("| peak (flood) | {} |", mb(flood_rss.iter().copied().max().unwrap_or(0)));
    println!("| end of the flood | {} |", mb(*flood_rss.last().unwrap_or(&0)));
    println!("| 5 s after | {} |", mb(*after_rss.get(4).unwrap_or(&0)));
    println!("| {} s after | {} |", after.as_secs(), mb(*after_rss.last().unwrap_or(&0)));
    println!();
    for (label, split, breakdown) in
        [("idle", idle_split, idle_breakdown), ("end of the flood", flood_split, flood_breakdown), ("after", after_split, after_breakdown)]
    {
        println!("where the RSS sits ({label}): anonymous {}, file-backed {}", mb(split.1), mb(split.2));
        for (kind, kib) in breakdown {
            println!("  {kind}: {}", mb(kib));
        }
    }

    let out = Command::new(PALISADE).args(["status", "-o", "json", "--state-dir"]).arg(&daemon.state_dir).output().expect("palisade status");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    println!();
    println!("kernel counters: emitted {}", status["probes"]["counters"]["emitted"]);
    println!("kernel counters: lost {}", status["probes"]["counters"]["lost"]);
    println!("kernel counters: prefiltered {}", status["probes"]["counters"]["prefiltered"]);
    println!("losses per pod/kind/reason: {}", status["events"]["loss"]);
    let loss_alerts = daemon.alerts().iter().filter(|a| a["kind"] == "event_loss").count();
    println!("event_loss alerts: {loss_alerts}");
}
