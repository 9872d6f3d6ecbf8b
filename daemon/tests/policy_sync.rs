//! Policy changes reach the datapath without a wait and without a storm (issue 17): the policy
//! directory's watcher coalesces by what is pending (every change noticed so far goes into one
//! reload, changes during it make exactly one more), not by sleeping. A burst of policy files
//! written one after the other ends with all of them in force, after no more syncs than there
//! were files (each file is several watch events: create, write, close). Latency is measured by
//! a benchmark, not asserted here.
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, PALISADE};
use support::require_kernel;

const INVENTORY: &str = "endpoints:
  - {namespace: shop, name: web, labels: {app: web}, ips: [198.18.44.1]}
  - {namespace: shop, name: db, labels: {app: db}, ips: [198.18.44.2]}
";

fn policy(i: usize) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: burst-{i}, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n      ports: [{{protocol: TCP, port: {}}}]\n",
        10_000 + i
    )
}

fn status(daemon: &DaemonGuard) -> Value {
    let out = Command::new(PALISADE).args(["status", "-o", "json", "--state-dir"]).arg(&daemon.state_dir).output().expect("palisade status");
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

#[test]
fn a_burst_of_policy_files_is_enforced_in_full_without_a_sync_storm() {
    if !require_kernel("a_burst_of_policy_files_is_enforced_in_full_without_a_sync_storm") {
        return;
    }
    const FILES: usize = 40;
    let daemon = DaemonGuard::start(DaemonOptions::new("policy_sync", INVENTORY));
    let before = daemon.sync_count();
    for i in 0..FILES {
        // Written in place (create, write, close: several events each), as an editor may.
        std::fs::write(daemon.policies_dir.join(format!("burst-{i}.yaml")), policy(i)).expect("write policy");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let policies = &status(&daemon)["policies"];
        if policies["policies"] == FILES {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all {FILES} policies in force: {policies:#}\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(daemon.wait_synced(before, Duration::from_millis(500), Duration::from_secs(10)), "no sync settled");
    let syncs = daemon.sync_count() - before;
    println!("{FILES} policy files, {syncs} syncs");
    assert!(syncs >= 1 && syncs <= FILES, "{syncs} syncs for {FILES} files: a sync storm");
    let policies = &status(&daemon)["policies"];
    assert_eq!(policies["policies"], FILES, "{policies:#}");
    assert_eq!(policies["policy_report"]["rejected"], serde_json::json!([]), "{policies:#}");
}

/// Issue 17: SIGTERM stops `palisade run` promptly (the bound here is generous: it is about
/// exiting at all; the time is printed) and the log says what stays in force in the kernel.
#[test]
fn sigterm_stops_the_daemon_and_the_log_says_what_stays_in_force() {
    if !require_kernel("sigterm_stops_the_daemon_and_the_log_says_what_stays_in_force") {
        return;
    }
    let mut daemon = DaemonGuard::start(DaemonOptions::new("policy_sigterm", INVENTORY).policy("burst-0.yaml", &policy(0)));
    let stopped = daemon.stop_with(libc::SIGTERM);
    let log = daemon.log();
    let (status, took) = stopped.unwrap_or_else(|| panic!("palisade run did not exit within 10 s of SIGTERM\n{log}"));
    println!("exited {status} {took:?} after SIGTERM; the daemon's last lines:");
    for line in log.lines().rev().take(4).collect::<Vec<_>>().into_iter().rev() {
        println!("  {line}");
    }
    assert!(status.success(), "exit status {status}\n{log}");
    let stopping = log.lines().find(|l| l.contains("stopping; in force in the kernel")).unwrap_or_else(|| panic!("no stopping line\n{log}"));
    for what in ["pin_dir=", "quarantined=0", "attached_endpoints=", "the policies"] {
        assert!(stopping.contains(what), "{what} missing from {stopping}");
    }
    assert!(stopping.contains(&daemon.pin_dir.display().to_string()), "{stopping}");
    assert!(log.lines().any(|l| l.contains("stopped") && l.contains("took_ms")), "{log}");
    // What it said stays: the pinned policy map is still there.
    assert!(daemon.pin_dir.join(palisade_common::MAP_SEG_POLICY).exists(), "the pinned maps are gone");
}
