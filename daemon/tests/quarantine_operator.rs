//! Quarantine and release only through the authenticated path, on a running `palisade run`:
//! an operator quarantines a pod by hand through the root-only API socket
//! (`palisade quarantine add NS/POD --reason TEXT`): it is cut off in the kernel at once (real
//! packets), recorded under rule `manual` and audited by a `quarantine` alert naming who and
//! why; `palisade quarantine release` lifts it with a `release` alert.
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::process::Command;
use std::time::Duration;

use palisade::inventory::Protocol;
use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, PALISADE};
use support::require_kernel;

const INVENTORY: &str = "endpoints:
  - {namespace: shop, name: web, ips: [198.18.42.1]}
  - {namespace: shop, name: db, ips: [198.18.42.2]}
  - {namespace: kube-system, name: dns, ips: [198.18.42.3]}
";

fn cli(daemon: &DaemonGuard, args: &[&str]) -> std::process::Output {
    Command::new(PALISADE).args(args).arg("--state-dir").arg(&daemon.state_dir).env("SUDO_USER", "carol").output().expect("palisade")
}

fn reachable(daemon: &DaemonGuard) -> Vec<(String, String, bool)> {
    let matrix = daemon.lab().probe(8080, Protocol::Tcp).expect("probe");
    let mut pairs: Vec<(String, String, bool)> = matrix
        .results
        .iter()
        .filter(|r| r.from != r.to)
        .map(|r| (r.from.clone(), r.to.clone(), matrix.allowed(&r.from, &r.to) == Some(true)))
        .collect();
    pairs.sort();
    pairs.dedup();
    pairs
}

#[test]
fn an_operator_quarantines_by_hand_and_releases_through_the_api_socket() {
    if !require_kernel("an_operator_quarantines_by_hand_and_releases_through_the_api_socket") {
        return;
    }
    let daemon = DaemonGuard::start(DaemonOptions::new("quarantine_operator", INVENTORY));
    assert!(reachable(&daemon).iter().all(|(_, _, ok)| *ok), "everything reachable before");

    let out = cli(&daemon, &["quarantine", "add", "shop/web", "--reason", "seen exfiltrating data"]);
    assert!(out.status.success(), "quarantine add: {}", String::from_utf8_lossy(&out.stderr));
    // The map update has returned before the API answers: cut off now, both directions.
    for (from, to, ok) in reachable(&daemon) {
        let involves_web = from == "shop/web" || to == "shop/web";
        assert_eq!(ok, !involves_web, "{from} -> {to}: allowed={ok}");
    }
    let audit = daemon
        .wait_for_alert(|a| a["kind"] == "quarantine" && a["pod"]["name"] == "web", Duration::from_secs(5))
        .expect("the operator's quarantine is audited");
    assert_eq!(audit["outcome"], "quarantined", "{audit}");
    assert_eq!(audit["rule"]["id"], "manual", "{audit}");
    assert!(audit["message"].as_str().is_some_and(|m| m.contains("carol") && m.contains("seen exfiltrating data")), "{audit}");
    let list = cli(&daemon, &["quarantine", "list", "-o", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).expect("list json");
    let entry = &list.as_array().expect("array")[0];
    assert_eq!((entry["name"].as_str(), entry["rule"].as_str(), entry["alert_id"].as_str()), (Some("web"), Some("manual"), audit["id"].as_str()));

    // Refused, with the reason, and audited as failed: already quarantined; a protected namespace.
    let out = cli(&daemon, &["quarantine", "add", "shop/web", "--reason", "again"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already quarantined"), "{out:?}");
    let out = cli(&daemon, &["quarantine", "add", "kube-system/dns", "--reason", "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("protected"), "{out:?}");
    daemon
        .wait_for_alert(|a| a["kind"] == "quarantine" && a["pod"]["name"] == "dns" && a["outcome"] == "failed", Duration::from_secs(5))
        .expect("a refused operator quarantine is audited too");

    let out = cli(&daemon, &["quarantine", "release", "shop/web", "--reason", "false alarm"]);
    assert!(out.status.success(), "quarantine release: {}", String::from_utf8_lossy(&out.stderr));
    assert!(reachable(&daemon).iter().all(|(_, _, ok)| *ok), "everything reachable after the release");
    let release = daemon
        .wait_for_alert(|a| a["kind"] == "release" && a["pod"]["name"] == "web", Duration::from_secs(5))
        .expect("release alert");
    assert!(release["message"].as_str().is_some_and(|m| m.contains("carol") && m.contains("false alarm")), "{release}");
}
