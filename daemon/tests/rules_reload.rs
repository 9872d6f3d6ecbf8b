//! Hot reload and the evaluator pool: a broken rule file dropped into the watched directory is
//! rejected with `file:line:col`, and the last good pack keeps producing alerts.
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use palisade::rules::{
    EvaluatorConfig, PackHandle, PackOptions, RuleEvaluator, RulePack, RulesNotification, watch,
};

const GOOD_RULE: &str = r#"package palisade.rules.shadow
meta := {"id": "shadow", "title": "Shadow read", "severity": "high", "mitre": ["T1003.008"],
         "action": "alert", "events": ["open"]}
alerts contains {"message": sprintf("read %s", [input.open.path])} if input.open.path == "/etc/shadow"
"#;

fn shadow_open() -> serde_json::Value {
    serde_json::json!({
        "type": "open", "pod": null,
        "process": {"pid": 5, "comm": "cat", "exe": "/usr/bin/cat", "cwd": "/", "ancestors": []},
        "open": {"op": "openat", "path": "/etc/shadow", "dirfd": -100, "flags": 0, "flags_names": [],
                 "mode": 0, "write": false, "create": false, "truncate": false, "result": 3}
    })
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-rules-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn wait_for(rx: &mpsc::Receiver<RulesNotification>, what: &str) -> RulesNotification {
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("no notification: {what}"))
}

#[test]
fn broken_file_is_rejected_and_the_last_good_pack_stays() {
    let dir = temp_dir("reload");
    std::fs::write(dir.join("shadow.rego"), GOOD_RULE).expect("write rule");
    let options = PackOptions::default();
    let handle = PackHandle::new(RulePack::load_with(&dir, &options).expect("good pack"));
    let (tx, rx) = mpsc::channel();
    let _watcher = watch(&dir, options, handle.clone(), move |n| {
        let _ = tx.send(n);
    })
    .expect("watch");

    // A file that does not compile.
    let broken = dir.join("broken.rego");
    std::fs::write(&broken, "package palisade.rules.broken\n\nmeta := {\n").expect("write broken");
    match wait_for(&rx, "broken file") {
        RulesNotification::RulesRejected { errors, kept_generation } => {
            assert_eq!(kept_generation, 1);
            assert!(
                errors.iter().any(|e| e.starts_with(&format!("{}:", broken.display())) && e.split(':').nth(1).is_some_and(|l| l.parse::<u32>().is_ok())),
                "want file:line:col errors, got {errors:?}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // Detection continues with the last good pack.
    assert_eq!(handle.generation(), 1);
    let hits = handle.current().evaluate(&shadow_open()).expect("evaluate");
    assert_eq!(hits.len(), 1, "last good pack must still alert");

    // A rule that compiles but breaks the alert contract is rejected too.
    std::fs::write(
        &broken,
        r#"package palisade.rules.broken
meta := {"id": "broken", "title": "B", "severity": "severe", "mitre": ["T1059"], "action": "alert", "events": ["exec"]}
alerts contains {"msg": "x"} if input.exec
"#,
    )
    .expect("write contract breaker");
    match wait_for(&rx, "contract breaker") {
        RulesNotification::RulesRejected { errors, .. } => {
            let text = errors.join("\n");
            assert!(text.contains("bad severity \"severe\""), "{text}");
            assert!(text.contains("unknown alert field \"msg\""), "{text}");
            assert!(text.contains("broken.rego:2:"), "{text}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(handle.current().evaluate(&shadow_open()).expect("evaluate").len(), 1);

    // Fixing the file puts a new pack in force.
    std::fs::write(
        &broken,
        r#"package palisade.rules.broken
meta := {"id": "broken", "title": "B", "severity": "low", "mitre": ["T1059"], "action": "quarantine", "events": ["open"]}
alerts contains "opened something" if input.open.path != ""
"#,
    )
    .expect("write fixed");
    match wait_for(&rx, "fixed file") {
        RulesNotification::Reloaded { generation, rules, .. } => {
            assert_eq!(rules, 2);
            assert!(generation >= 2);
        }
        other => panic!("expected a reload, got {other:?}"),
    }
    let hits = handle.current().evaluate(&shadow_open()).expect("evaluate");
    assert_eq!(hits.len(), 2, "{hits:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn evaluator_pool_evaluates_and_follows_swaps() {
    let dir = temp_dir("pool");
    std::fs::write(dir.join("shadow.rego"), GOOD_RULE).expect("write rule");
    let handle = PackHandle::new(RulePack::load(&dir).expect("pack"));
    let (evaluator, results) =
        RuleEvaluator::start(handle.clone(), EvaluatorConfig { workers: 2, queue: 64, send_empty: false })
            .expect("start");
    for _ in 0..10 {
        evaluator.submit(palisade::rules::to_rego_value(&shadow_open())).expect("submit");
    }
    let mut benign = shadow_open();
    benign["open"]["path"] = "/etc/hosts".into();
    evaluator.submit(palisade::rules::to_rego_value(&benign)).expect("submit");
    for _ in 0..10 {
        let evaluation = results.recv_timeout(Duration::from_secs(10)).expect("result");
        let hits = evaluation.hits.expect("hits");
        assert_eq!(hits.len(), 1);
        assert_eq!(evaluation.pack_generation, 1);
    }

    // Swap in a pack whose rule has another id: workers pick it up.
    std::fs::write(dir.join("shadow.rego"), GOOD_RULE.replace("shadow", "shadow2").replace("/etc/shadow2", "/etc/shadow"))
        .expect("rewrite");
    let generation = handle.swap(RulePack::load(Path::new(&dir)).expect("second pack"));
    evaluator.submit(palisade::rules::to_rego_value(&shadow_open())).expect("submit");
    let evaluation = results.recv_timeout(Duration::from_secs(10)).expect("result");
    assert_eq!(evaluation.pack_generation, generation);
    assert_eq!(evaluation.hits.expect("hits")[0].rule_id, "shadow2");
    assert!(results.try_recv().is_err(), "benign event must not produce a result");
    evaluator.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
