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
