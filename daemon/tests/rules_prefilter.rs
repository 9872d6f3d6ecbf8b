//! Rule prefilters (`meta.prefilter`, issue 13): a bad declaration is rejected with its
//! location; a declaration that hides an alert the rule would raise fails `rules test` on the
//! fixture that shows it; a sound one passes, and events that fail it never reach the rule.
use std::path::{Path, PathBuf};

use palisade::rules::RulePack;

#[path = "support/rule_pack.rs"]
mod rule_pack;
use rule_pack::run;

/// A rule raising on writes below /etc, with `prefilter` as its declaration.
fn etc_write_rule(prefilter: &str) -> String {
    format!(
        r#"package palisade.rules.etc_write

meta := {{
	"id": "etc_write", "title": "Write below /etc", "severity": "high", "mitre": ["T1222.002"],
	"action": "alert", "events": ["open"],
	"prefilter": {prefilter},
}}

path := input.open.path if startswith(input.open.path, "/")

path := concat("/", [input.process.cwd, input.open.path]) if not startswith(input.open.path, "/")

alerts contains sprintf("wrote %s", [path]) if {{
	input.open.write
	startswith(path, "/etc/")
}}
"#
    )
}

const FIXTURES: &str = r#"
base:
  type: open
  pod: null
  process: {pid: 7, comm: sh, exe: /bin/sh, cwd: /etc, ancestors: []}
cases:
  - name: absolute write below /etc
    event: {open: {path: /etc/passwd, write: true, flags: 1}}
    want: [etc_write]
  - name: relative write from cwd /etc
    event: {open: {path: passwd, write: true, flags: 1}}
    want: [etc_write]
  - name: read below /etc
    event: {open: {path: /etc/passwd, write: false, flags: 0}}
    want: []
"#;

fn pack(name: &str, rule: &str) -> PathBuf {
    rule_pack::write(&format!("rules-prefilter-{name}"), &[("etc_write.rego", rule), ("fixtures.yaml", FIXTURES)])
}

fn test_pack(dir: &Path) -> (Option<i32>, String) {
    let fixtures = dir.join("fixtures.yaml");
    run(&["rules", "test", dir.to_str().expect("utf-8"), "--fixtures", fixtures.to_str().expect("utf-8")])
}

#[test]
fn a_sound_prefilter_passes_and_keeps_other_events_from_the_rule() {
    let dir = pack("sound", &etc_write_rule(r#"{"open": [{"open.write": true, "open.path": {"path_prefix": ["/etc/"]}}]}"#));
    let (code, out) = test_pack(&dir);
    assert_eq!(code, Some(0), "{out}");
    let pack = RulePack::load(&dir).expect("loads");
    let event = |path: &str, write: bool| serde_json::json!({"type": "open", "process": {"cwd": "/"}, "open": {"path": path, "write": write}});
    assert!(pack.rules_judging(&event("/etc/passwd", false)).is_empty(), "a read fails the prefilter");
    assert!(pack.rules_judging(&event("/var/log/x", true)).is_empty(), "a write elsewhere fails it");
    assert_eq!(pack.rules_judging(&event("/etc/passwd", true)).len(), 1);
    // What the rule resolves first (relative, `..`) always reaches it.
    assert_eq!(pack.rules_judging(&event("passwd", true)).len(), 1);
    assert_eq!(pack.rules_judging(&event("/var/../etc/passwd", true)).len(), 1);
    assert_eq!(pack.without_prefilters().rules_judging(&event("/var/log/x", true)).len(), 1);
}

/// An author who tests the raw path (`prefix`, not `path_prefix`) hides the relative write:
/// `rules test` says so on the fixture that shows it.
#[test]
fn an_unsound_prefilter_fails_rules_test_on_the_event_it_hides() {
    let dir = pack("unsound", &etc_write_rule(r#"{"open": [{"open.write": true, "open.path": {"prefix": ["/etc/"]}}]}"#));
    let (code, out) = test_pack(&dir);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("relative write from cwd /etc"), "{out}");
    assert!(out.contains("prefilter unsound") && out.contains("etc_write"), "{out}");
}

#[test]
fn bad_declarations_are_rejected_with_their_location() {
    for (declaration, says) in [
        (r#"{"open": [{"open.path": {"starts_with": ["/etc/"]}}]}"#, "unknown test \"starts_with\""),
        (r#"{"exec": [{"exec.filename": "/bin/sh"}]}"#, "does not subscribe to exec events"),
        (r#"{"open": []}"#, "would never run on open events"),
        (r#"["open"]"#, "meta.prefilter must be an object"),
    ] {
        let dir = pack("bad", &etc_write_rule(declaration));
        let (code, out) = run(&["rules", "check", dir.to_str().expect("utf-8"), "--fixtures", dir.join("fixtures.yaml").to_str().expect("utf-8")]);
        assert_eq!(code, Some(1), "{declaration}: {out}");
        let at = format!("{}:6:", dir.join("etc_write.rego").display());
        assert!(out.lines().any(|l| l.starts_with(&at) && l.contains(says)), "{declaration}: want {at}... {says}, got {out}");
    }
}
