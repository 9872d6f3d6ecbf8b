//! Builtins whose failure the two engines treat differently (issue 13): `to_number("bash")` is
//! an error in the tree interpreter and undefined in the register VM the daemon runs. Every load
//! warns about such calls with their location, and `rules test` fails a fixture on which the
//! engines disagree, so a rule author cannot ship the difference without being told.
use std::path::PathBuf;

use palisade::rules::RulePack;

#[path = "support/rule_pack.rs"]
mod rule_pack;
use rule_pack::run;

const RULE: &str = r#"package palisade.rules.big_pid

meta := {"id": "big_pid", "title": "T", "severity": "high", "mitre": ["T1059"], "action": "alert", "events": ["exec"]}

alerts contains "numeric program name" if {
	to_number(input.exec.argv[0]) > 3
}
"#;

const FIXTURES: &str = r#"
base: {type: exec, pod: null, process: {pid: 7, comm: x, exe: /bin/x, cwd: /, ancestors: []}}
cases:
  - name: a number
    event: {exec: {filename: /bin/x, argv: ["42"]}}
    want: [big_pid]
  - name: a name the builtin cannot convert
    event: {exec: {filename: /bin/bash, argv: [bash]}}
    want: []
"#;

fn pack() -> PathBuf {
    rule_pack::write("rules-builtins", &[("big_pid.rego", RULE), ("fixtures.yaml", FIXTURES)])
}

#[test]
fn error_prone_builtins_are_flagged_at_load_and_a_disagreement_fails_rules_test() {
    let dir = pack();
    let fixtures = dir.join("fixtures.yaml");
    let (dir_s, fixtures_s) = (dir.to_str().expect("utf-8"), fixtures.to_str().expect("utf-8"));

    // The daemon's load path: the pack loads, with a warning at the call.
    let loaded = RulePack::load(&dir).expect("loads");
    let at = format!("{}:6:", dir.join("big_pid.rego").display());
    assert!(
        loaded.warnings().iter().any(|w| w.starts_with(&at) && w.contains("to_number") && w.contains("undefined")),
        "{:?}",
        loaded.warnings()
    );
    let (code, out) = run(&["rules", "check", dir_s, "--fixtures", fixtures_s]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&format!("warning: {at}")) && l.contains("to_number")), "{out}");

    // The VM says nothing on "bash", the interpreter fails: `rules test` reports it.
    let (code, out) = run(&["rules", "test", dir_s, "--fixtures", fixtures_s]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("a name the builtin cannot convert") && out.contains("engines disagree"), "{out}");
}
