//! The default rule pack, through the same runner as `palisade rules test rules/`.
use std::path::{Path, PathBuf};

use palisade::rules::testing::{TestOptions, run_tests};
use palisade::rules::{EngineKind, EventType, RulePack};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn default_pack_passes_its_tests_and_fixtures() {
    let report = run_tests(&repo().join("rules"), &TestOptions::default())
        .unwrap_or_else(|e| panic!("rule pack does not load:\n{}", e.lines().join("\n")));
    let failures: Vec<String> = report
        .results
        .iter()
        .filter_map(|r| r.failure.as_ref().map(|f| format!("FAIL {}\n{f}", r.name)))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(report.passed() > 50, "too few tests ran: {}", report.passed());
    assert!(
        report.rules_without_positive.is_empty(),
        "rules without a positive fixture: {:?}",
        report.rules_without_positive
    );
    assert!(
        report.rules_without_negative.is_empty(),
        "rules without a negative fixture: {:?}",
        report.rules_without_negative
    );
}

#[test]
fn default_pack_covers_the_thirteen_behaviours() {
    let pack = RulePack::load(&repo().join("rules")).expect("default pack loads");
    for id in [
        "shell_in_container",
        "credential_read",
        "write_below_system_dir",
        "package_manager",
        "network_recon",
        "exec_from_tmp",
        "fileless_exec",
        "ptrace_attach",
        "setuid_root",
        "setuid_bit",
        "container_escape",
        "reverse_shell",
        "crypto_mining",
        "shell_history_tampering",
    ] {
        let rule = pack.rule(id).unwrap_or_else(|| panic!("rule {id} missing"));
        assert!(!rule.mitre.is_empty(), "{id} has no MITRE ids");
    }
    // Fork and exit carry nothing a default rule needs: the kernel can leave them off.
    let types = pack.subscribed_types();
    assert!(!types.contains(&EventType::Fork));
    assert!(!types.contains(&EventType::Exit));
    assert!(types.contains(&EventType::Exec));
}

/// The register VM and the tree interpreter must agree on every fixture (the runner checks this
/// per case); here the interpreter pack must also load on its own.
#[test]
fn interpreter_pack_loads() {
    let pack = RulePack::load(&repo().join("rules")).expect("default pack loads");
    let interpreter = pack.with_engine(EngineKind::Interpreter);
    let event = serde_json::json!({
        "type": "open", "pod": null,
        "process": {"pid": 5, "comm": "cat", "exe": "/usr/bin/cat", "cwd": "/", "ancestors": []},
        "open": {"op": "openat", "path": "/etc/shadow", "dirfd": -100, "flags": 0, "flags_names": ["O_RDONLY"],
                 "mode": 0, "write": false, "create": false, "truncate": false, "result": 3}
    });
    let a = pack.evaluate(&event).expect("rvm");
    let b = interpreter.evaluate(&event).expect("interpreter");
    assert_eq!(a, b);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].rule_id, "credential_read");
}
