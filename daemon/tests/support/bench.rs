//! Helpers for the benchmarks that include this support module (figures, not assertions).

use std::time::Duration;

/// A number from the environment (`_` allowed as a separator), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

/// A comma-separated list of numbers from the environment, or `default` (same form).
pub fn env_sizes(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .collect()
}

/// The load averages (1, 5, 15 minutes), printed beside figures taken on a shared machine.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The p-th percentile of sorted durations, in milliseconds with one decimal ("-" when empty).
pub fn percentile(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    format!("{:.1} ms", sorted[i].as_secs_f64() * 1e3)
}

/// A process's CPU time (utime + stime from /proc/PID/stat), seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (in parentheses, may hold spaces): utime and stime are fields
    // 14 and 15, indexes 11 and 12 after the command.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Waits until the log of a daemon a benchmark started holds `needle`; panics with the log's
/// tail when the daemon exits first or `timeout` passes.
pub fn wait_for_log(child: &mut std::process::Child, log: &std::path::Path, needle: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited ({status}) before {needle:?}:\n{}", tail());
        }
        assert!(std::time::Instant::now() < deadline, "no {needle:?} from the daemon within {timeout:?}:\n{}", tail());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops a daemon a benchmark started (SIGINT; SIGKILL after 20 s) and removes its pins.
pub fn stop_daemon(child: &mut std::process::Child, pin_dir: &std::path::Path) {
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(pin_dir);
}
