//! `palisade rules test --bench` (issue 13): a rule author sees what each rule costs. A rule
//! that loops is listed first with most of the time; a prefilter shows as fewer evaluations
//! than events.
use std::path::{Path, PathBuf};

#[path = "support/rule_pack.rs"]
mod rule_pack;
use rule_pack::run;

const CHEAP: &str = r#"package palisade.rules.cheap

meta := {"id": "cheap", "title": "T", "severity": "high", "mitre": ["T1059"], "action": "alert", "events": ["exec"],
	"prefilter": {"exec": [{"exec.filename": {"prefix": ["/tmp/"]}}]}}

alerts contains "exec from /tmp" if startswith(input.exec.filename, "/tmp/")
"#;

const COSTLY: &str = r#"package palisade.rules.costly

meta := {"id": "costly", "title": "T", "severity": "high", "mitre": ["T1059"], "action": "alert", "events": ["exec"]}

alerts contains "long argv" if {
	n := count([i | some i in numbers.range(1, 500); i % 7 == count(input.exec.argv)])
	n > 400
}
"#;

const FIXTURES: &str = r#"
base: {type: exec, pod: null, process: {pid: 7, comm: x, exe: /bin/x, cwd: /, ancestors: []}}
cases:
  - name: from tmp
    event: {exec: {filename: /tmp/x, argv: [x]}}
    want: [cheap]
  - name: elsewhere
    event: {exec: {filename: /usr/bin/x, argv: [x]}}
    want: []
  - name: elsewhere again
    event: {exec: {filename: /usr/bin/y, argv: [y]}}
    want: []
"#;

fn pack() -> PathBuf {
    rule_pack::write("rules-bench", &[("cheap.rego", CHEAP), ("costly.rego", COSTLY), ("fixtures.yaml", FIXTURES)])
}

/// The bench table's rows: rule -> (events, evaluated, share %).
fn rows(out: &str) -> Vec<(String, usize, usize, f64)> {
    out.lines()
        .skip_while(|l| !l.starts_with("RULE "))
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.to_string(), f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?, f.get(5)?.trim_end_matches('%').parse().ok()?))
        })
        .collect()
}

#[test]
fn the_bench_names_the_costly_rule_and_counts_what_prefilters_skip() {
    let dir = pack();
    let fixtures = dir.join("fixtures.yaml");
    let (code, text) = run(&["rules", "test", dir.to_str().expect("utf-8"), "--fixtures", fixtures.to_str().expect("utf-8"), "--bench"]);
    assert_eq!(code, Some(0), "{text}");
    let rows = rows(&text);
    assert_eq!(rows.len(), 2, "{text}");
    let (first, events, evaluated, share) = &rows[0];
    assert_eq!((first.as_str(), *events, *evaluated), ("costly", 3, 3), "{text}");
    assert!(*share > 50.0, "{text}");
    let cheap = rows.iter().find(|r| r.0 == "cheap").expect("cheap row");
    assert_eq!((cheap.1, cheap.2), (3, 1), "the prefilter lets one of three execs through: {text}");
    let total: f64 = rows.iter().map(|r| r.3).sum();
    assert!((total - 100.0).abs() < 0.5, "{text}");
}

#[test]
fn the_default_pack_on_the_recorded_corpus_lists_every_rule() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let rules = repo.join("rules");
    let events = repo.join("testdata/scenarios/recorded-mix.jsonl");
    let (code, text) = run(&["rules", "test", rules.to_str().expect("utf-8"), "--bench", "--events", events.to_str().expect("utf-8")]);
    assert_eq!(code, Some(0), "{text}");
    let rows = rows(&text);
    let pack = palisade::rules::RulePack::load(&rules).expect("default pack");
    assert_eq!(rows.len(), pack.rules().len(), "{text}");
    // Prefilters at work: the open rules judge far fewer events than they see.
    let credential = rows.iter().find(|r| r.0 == "credential_read").expect("credential_read row");
    assert!(credential.1 > 2000 && credential.2 * 10 < credential.1, "{text}");
}
