//! Isolation per rule (issue 13): a rule that exhausts its budget or errors is counted and
//! reported on its own, and the other rules of the same event type still raise their alerts.
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade::rules::{EngineKind, FailureReason, RulePack};
use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, repo_root, system_program};
use support::require_kernel;

/// Subscribes to exec and, on execs of a program named like the test's payload (not on the
/// built-in events the load runs every rule on, so it loads), loops far past any per-rule
/// instruction budget: a blow-up that depends on the data, as a list grown huge would.
const BURN_RULE: &str = r#"package palisade.rules.burn

meta := {"id": "burn", "title": "Budget burner", "severity": "low", "mitre": ["T1059"],
         "action": "alert", "events": ["exec"]}

alerts contains "never" if {
	contains(input.exec.filename, "payload")
	some i in numbers.range(1, 1000)
	some j in numbers.range(1, 1000)
	i * j == 0
}
"#;

/// A rule that depends on itself (the VM would overflow the native stack running it).
const RECURSIVE_RULE: &str = r#"package palisade.rules.rec

meta := {"id": "rec", "title": "Recursive", "severity": "low", "mitre": ["T1059"], "action": "alert", "events": ["exec"]}

f(x) := f(x)

alerts contains "never" if f(input.exec.filename)
"#;

/// Subscribes to exec and calls a builtin with a value it cannot take on every exec.
const FAILING_RULE: &str = r#"package palisade.rules.failing

meta := {"id": "failing", "title": "Always fails", "severity": "low", "mitre": ["T1059"],
         "action": "alert", "events": ["exec"]}

alerts contains "never" if {
	to_number(input.process.comm) == 1
}
"#;

/// The default pack plus extra rule files, in a fresh directory.
fn pack_dir(name: &str, extra: &[(&str, &str)]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rules-isolation-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    support::files::copy_dir(&repo_root().join("rules"), &dir);
    for (file, text) in extra {
        std::fs::write(dir.join(file), text).expect("write rule");
    }
    dir
}

fn exec_from_tmp_event() -> Value {
    serde_json::json!({
        "type": "exec", "pod": {"namespace": "shop", "name": "web", "labels": {}},
        "process": {"pid": 7, "comm": "payload", "exe": "/tmp/payload", "cwd": "/", "ancestors": [],
                    "uid": 0, "euid": 0},
        "exec": {"filename": "/tmp/payload", "argv": ["/tmp/payload"]}
    })
}

#[test]
fn a_budget_exhausting_rule_does_not_blind_the_others() {
    let dir = pack_dir("unit", &[("burn.rego", BURN_RULE), ("failing.rego", FAILING_RULE)]);
    let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("pack loads: {}", e.lines().join("\n")));
    for engine in [EngineKind::Rvm, EngineKind::Interpreter] {
        let pack = pack.with_engine(engine);
        let judgement = pack
            .evaluate_judgement(&exec_from_tmp_event())
            .unwrap_or_else(|e| panic!("{engine:?}: the event must still be judged: {e}"));
        let ids: Vec<&str> = judgement.hits.iter().map(|h| h.rule_id.as_str()).collect();
        assert!(ids.contains(&"exec_from_tmp"), "{engine:?}: exec_from_tmp must still alert, got {ids:?}");
        let failed: Vec<(&str, FailureReason)> =
            judgement.failures.iter().map(|f| (f.rule_id.as_str(), f.reason)).collect();
        match engine {
            // The VM counts instructions; a builtin error inside a rule body makes that body
            // undefined (OPA's default), so `failing` simply does not fire there.
            // Budget, or Timeout on a machine so loaded that the instructions take 100 ms.
            EngineKind::Rvm => assert!(
                failed == vec![("burn", FailureReason::Budget)] || failed == vec![("burn", FailureReason::Timeout)],
                "{failed:?}"
            ),
            // The interpreter has only a wall-clock budget, and raises the builtin's error:
            // `failing` fails alone (`rules test` reports the disagreement, see rules_semantics).
            EngineKind::Interpreter => {
                assert!(failed.contains(&("failing", FailureReason::Error)), "{failed:?}")
            }
        }
        assert!(judgement.failures.iter().all(|f| f.event_type.as_str() == "exec"));
        assert!(!failed.iter().any(|(id, _)| *id == "exec_from_tmp"), "{failed:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon, watching a lab pod, with the default pack plus a budget burner
/// on exec: a real program copied to /tmp and run in the pod still raises exec_from_tmp, and the
/// burner, which cannot judge those execs, fails closed (issue 14): an exec is a protected event,
/// so each one it could not judge raises a `rule_error` alert at the burner's own severity with
/// the event attached (`event.unjudged`), not held back by the per-minute limiter.
#[test]
fn daemon_still_alerts_on_real_exec_when_one_rule_exhausts_its_budget() {
    if !require_kernel("daemon_still_alerts_on_real_exec_when_one_rule_exhausts_its_budget") {
        return;
    }
    let dir = pack_dir("daemon", &[("burn.rego", BURN_RULE)]);
    let inventory = "namespaces:\n  - name: iso\nendpoints:\n  - namespace: iso\n    name: web\n    labels: {app: web}\n    ips: [198.18.0.10]\n";
    let mut options = DaemonOptions::new("rulesiso", inventory);
    options.rules = dir.clone();
    let daemon = DaemonGuard::start(options);

    let tmp = PathBuf::from(format!("/tmp/palisade-{}", daemon.lab_name));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let payload = tmp.join("payload");
    std::fs::copy(system_program("true").expect("true"), &payload).expect("copy payload");
    let run_payload = || {
        let out = daemon.exec_in("iso/web", &[&payload.to_string_lossy()]);
        assert!(out.status.success(), "payload ran: {out:?}");
    };
    for _ in 0..3 {
        run_payload();
    }

    let in_pod = |a: &Value| a["pod"]["name"] == "web" && a["pod"]["namespace"] == "iso";
    let hit = daemon.wait_for_alert(|a| a["kind"] == "rule" && a["rule"]["id"] == "exec_from_tmp" && in_pod(a), Duration::from_secs(20));
    assert!(hit.is_some(), "no exec_from_tmp alert; alerts: {:#?}\nlog:\n{}", daemon.alerts(), daemon.log());
    for (rule, reason) in [("burn", "budget")] {
        let error = daemon
            .wait_for_alert(|a| a["kind"] == "rule_error" && a["rule"]["id"] == rule, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no rule_error alert for {rule}; alerts: {:#?}", daemon.alerts()));
        assert_eq!(error["event"]["event_type"], "exec", "{error:#}");
        // Instructions or, on a machine so loaded that 25,000 instructions take 100 ms of CPU, time.
        assert!(error["event"]["reason"] == reason || error["event"]["reason"] == "timeout", "{error:#}");
    }
    // Fail closed: each of the three payload execs is a protected event the burner could not
    // judge, alerted on its own at the burner's severity with the event (not rate limited).
    let burn_alerts = |daemon: &DaemonGuard| {
        daemon.alerts().into_iter().filter(|a| a["kind"] == "rule_error" && a["rule"]["id"] == "burn").collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while burn_alerts(&daemon).len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let unjudged = burn_alerts(&daemon);
    assert_eq!(unjudged.len(), 3, "one unjudged alert per payload exec; alerts: {unjudged:#?}");
    for alert in &unjudged {
        assert_eq!(alert["severity"], "low", "the burner's own severity: {alert:#}");
        assert_eq!(alert["rule"]["title"], "Budget burner", "{alert:#}");
        assert_eq!(alert["mitre"], serde_json::json!(["T1059"]), "the burner's own MITRE ids: {alert:#}");
        assert_eq!(alert["event"]["unjudged"], true, "{alert:#}");
        assert_eq!(alert["event"]["input"]["exec"]["filename"], payload.to_string_lossy().as_ref(), "the event attached: {alert:#}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["status", "-o", "json", "--state-dir"])
        .arg(&daemon.state_dir)
        .output()
        .expect("palisade status");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON: {e}: {out:?}"));
    assert_eq!(status["events"]["unjudged_protected"], 3, "counted in status: {:#}", status["events"]);
    assert!(daemon.alerts().iter().all(|a| a["rule"]["id"] != "burn" || a["kind"] != "rule"), "the burner never alerts");

    // Hot reload of a hostile pack (a recursive rule): rejected with its location, the daemon
    // keeps running with the last good pack, and a real exec from /tmp still alerts.
    let tmp_alerts = |daemon: &DaemonGuard| {
        daemon.alerts().iter().filter(|a| a["kind"] == "rule" && a["rule"]["id"] == "exec_from_tmp" && in_pod(a)).count()
    };
    let before = tmp_alerts(&daemon);
    std::fs::write(dir.join("rec.rego"), RECURSIVE_RULE).expect("write recursive rule");
    let rejected = daemon.wait_for_alert(
        |a| a["kind"] == "rules_rejected" && a["message"].as_str().is_some_and(|m| m.contains("rec.rego:5:1: recursion")),
        Duration::from_secs(30),
    );
    assert!(rejected.is_some(), "no rules_rejected alert naming rec.rego:5:1; alerts: {:#?}", daemon.alerts());
    run_payload();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tmp_alerts(&daemon) <= before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tmp_alerts(&daemon) > before, "exec_from_tmp after the rejected reload; log:\n{}", daemon.log());
    let _ = std::fs::remove_dir_all(&tmp);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rule_errors_are_a_metric_per_rule_and_reason() {
    let metrics = palisade::api::Metrics::new();
    metrics.record_rule_error("burn", "budget");
    metrics.record_rule_error("burn", "budget");
    let text = metrics.encode();
    assert!(text.contains("palisade_rule_errors_total{rule=\"burn\",reason=\"budget\"} 2"), "{text}");
}
