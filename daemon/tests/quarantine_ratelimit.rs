//! The rate-limit guardrail never disarms the node: eleven pods flagged within seconds through
//! `palisade run` with the default response policy (a node ceiling of 10 per minute, 5 per
//! namespace) all end up quarantined in the kernel; the one over the limit is queued (its rule
//! alert says `pending`, `palisade quarantine list` shows it) and applied as soon as the bucket
//! allows, with a `quarantine` alert that says how long it waited. Before, the 11th quarantine
//! in a minute latched automatic quarantine off until an operator resumed it: ten decoy pods
//! disarmed the node.
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade::inventory::Protocol;
use palisade::quarantine::KernelQuarantineMap;
use palisade::quarantine::QuarantineDatapath as _;
use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, PALISADE};
use support::require_kernel;

/// Six decoys in one namespace (one more than the namespace's 5 per minute), five pods in
/// another (which fill the node ceiling of 10), and an observer nobody flags.
fn inventory() -> String {
    let mut text = String::from("endpoints:\n");
    let mut n = 0;
    let mut pod = |namespace: &str, name: String| {
        n += 1;
        text.push_str(&format!("  - {{namespace: {namespace}, name: {name}, ips: [198.18.41.{n}]}}\n"));
    };
    for i in 1..=6 {
        pod("decoy", format!("d{i}"));
    }
    for i in 1..=5 {
        pod("shop", format!("web{i}"));
    }
    pod("ops", "observer".into());
    text
}

fn flagged() -> Vec<String> {
    (1..=6).map(|i| format!("decoy/d{i}")).chain((1..=5).map(|i| format!("shop/web{i}"))).collect()
}

fn pod_of(alert: &Value) -> String {
    format!("{}/{}", alert["pod"]["namespace"].as_str().unwrap_or(""), alert["pod"]["name"].as_str().unwrap_or(""))
}

fn cli_json(daemon: &DaemonGuard, args: &[&str]) -> Value {
    let out = Command::new(PALISADE).args(args).arg("--state-dir").arg(&daemon.state_dir).args(["-o", "json"]).output().expect("palisade");
    assert!(out.status.success(), "palisade {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("palisade {args:?}: not JSON: {e}"))
}

#[test]
fn eleven_pods_flagged_within_a_minute_all_end_up_quarantined() {
    if !require_kernel("eleven_pods_flagged_within_a_minute_all_end_up_quarantined") {
        return;
    }
    let daemon = DaemonGuard::start(DaemonOptions::new("quarantine_ratelimit", &inventory()));

    // Every flagged pod runs a fileless exec (memfd_create + execveat: `fileless_exec`, action
    // quarantine) at the same time.
    let children: Vec<_> = flagged()
        .iter()
        .map(|pod| {
            let mut command = daemon.command_in(pod, PALISADE);
            command.args(["workload", "memfd-exec"]).stdout(Stdio::null()).stderr(Stdio::null());
            command.spawn().unwrap_or_else(|e| panic!("memfd-exec in {pod}: {e}"))
        })
        .collect();
    for mut child in children {
        let _ = child.wait();
    }

    // Each flagged pod's first fileless_exec alert says what was done at once: quarantined,
    // or pending (queued by the rate limit). None is suppressed or failed.
    let want: BTreeSet<String> = flagged().into_iter().collect();
    let first_outcomes = |alerts: &[Value]| {
        let mut seen = std::collections::BTreeMap::new();
        for a in alerts.iter().filter(|a| a["kind"] == "rule" && a["rule"]["id"] == "fileless_exec") {
            seen.entry(pod_of(a)).or_insert_with(|| a.clone());
        }
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let seen = first_outcomes(&daemon.alerts());
        if seen.keys().cloned().collect::<BTreeSet<_>>() == want {
            break seen;
        }
        assert!(Instant::now() < deadline, "no fileless_exec alert for some pods; got {:?}", seen.keys());
        std::thread::sleep(Duration::from_millis(100));
    };
    let outcome = |a: &Value| a["outcome"].as_str().unwrap_or("").to_string();
    let pending: Vec<String> = first.iter().filter(|(_, a)| outcome(a) == "pending").map(|(p, _)| p.clone()).collect();
    for (pod, alert) in &first {
        assert!(matches!(outcome(alert).as_str(), "quarantined" | "pending"), "{pod}: {alert}");
    }
    // Six decoys against a namespace limit of 5 per minute: at least one waits.
    assert!(!pending.is_empty(), "nothing was held back by the rate limit: {first:?}");
    assert!(pending.iter().all(|p| p.starts_with("decoy/")), "only the decoys' namespace is held back: {pending:?}");
    let reason = first[&pending[0]]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("namespace decoy") && reason.contains("cancel"), "{reason}");

    // While it waits it is listed as pending (unless it was applied in the meantime).
    let listed = cli_json(&daemon, &["quarantine", "list"]);
    let entries = listed.as_array().expect("list is an array");
    let still_pending: Vec<String> = entries
        .iter()
        .filter(|e| e["pending"] == true)
        .map(|e| format!("{}/{}", e["namespace"].as_str().unwrap_or(""), e["name"].as_str().unwrap_or("")))
        .collect();
    assert!(still_pending.iter().all(|p| pending.contains(p)), "listed pending {still_pending:?}, alerted pending {pending:?}");

    // Each queued quarantine is applied when the bucket allows, and its alert says how long it
    // waited (the namespace bucket refills one every 12 s).
    let deadline = Instant::now() + Duration::from_secs(45);
    for pod in &pending {
        let applied = loop {
            let found = daemon
                .alerts()
                .into_iter()
                .find(|a| a["kind"] == "quarantine" && pod_of(a) == *pod && a["outcome"] == "quarantined");
            if let Some(found) = found {
                break found;
            }
            assert!(Instant::now() < deadline, "the queued quarantine of {pod} was not applied within 45 s:\n{}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        };
        let waited = applied["event"]["queued_for_seconds"].as_f64().unwrap_or(0.0);
        assert!(waited > 1.0, "{pod} waited {waited} s: {applied}");
        assert_eq!(applied["event"]["queued_alert_id"], first[pod]["id"], "the applied alert names the rule alert: {applied}");
    }

    // None is left unenforced: all eleven are listed as enforced, in the pinned kernel map,
    // and cut off from the observer and from each other by real packets.
    let (enforced, listed) = daemon.enforced_quarantines();
    assert_eq!(enforced, want, "{listed}");
    let status = cli_json(&daemon, &["status"]);
    assert_eq!(status["quarantine"]["responder"]["pending"], 0, "{}", status["quarantine"]);

    let map = KernelQuarantineMap::open_pinned(&daemon.pin_dir).expect("pinned quarantine map");
    let in_map: BTreeSet<u64> = map.entries().expect("map entries").into_iter().map(|(id, _)| id).collect();
    for pod in &want {
        let id = palisade::lab::cgroup_id(&daemon.lab().pod_cgroup_dir(pod).expect("cgroup dir")).expect("cgroup id");
        assert!(in_map.contains(&id), "{pod} (cgroup {id}) is not in the kernel's quarantine map");
    }
    let matrix = daemon.lab().probe(8080, Protocol::Tcp).expect("probe");
    let mut wrong = Vec::new();
    for r in matrix.results.iter().filter(|r| r.from != r.to) {
        let cut_off = want.contains(&r.from) || want.contains(&r.to);
        if r.allowed == cut_off {
            wrong.push(format!("{} -> {}: allowed={}", r.from, r.to, r.allowed));
        }
    }
    assert!(wrong.is_empty(), "reachability:\n{}", wrong.join("\n"));
}
