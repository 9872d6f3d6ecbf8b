//! Hostile rule packs (issue 13): each is rejected by `palisade rules check`, `rules test` and
//! `rules replay` with `file:line:col` and a message saying what is wrong, in bounded time and
//! without crashing; hot-reloading each keeps the last good pack in force.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palisade::rules::{PackHandle, PackOptions, RulePack, RulesNotification, reload_within, watch};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

fn meta(id: &str) -> String {
    format!(
        "meta := {{\"id\": \"{id}\", \"title\": \"T\", \"severity\": \"high\", \"mitre\": [\"T1059\"], \"action\": \"alert\", \"events\": [\"exec\"]}}\n"
    )
}

fn rule(id: &str, imports: &str, body: &str) -> String {
    format!("package palisade.rules.{id}\n\n{imports}{}\n{body}\n", meta(id))
}

const GOOD: &str = r#"package palisade.rules.good

meta := {"id": "good", "title": "Tmp exec", "severity": "high", "mitre": ["T1204"], "action": "alert", "events": ["exec"]}

alerts contains "exec from /tmp" if startswith(input.exec.filename, "/tmp/")
"#;

/// A hostile pack: its files (path relative to the pack, text), what the first problem must
/// say, and on which line of which file.
struct Hostile {
    name: &'static str,
    files: Vec<(String, String)>,
    file: &'static str,
    line: u32,
    says: &'static str,
}

fn hostile_packs() -> Vec<Hostile> {
    let deep = format!("x := {}1{}\n", "[".repeat(40), "]".repeat(40));
    let big_list: Vec<String> = (0..10_000).map(|i| format!("\"/opt/tool-{i}\"")).collect();
    let huge_list = format!("[{}]", (0..60_000).map(|i| format!("\"/opt/padding/entry-{i:08}\"")).collect::<Vec<_>>().join(","));
    vec![
        Hostile {
            name: "recursion",
            files: vec![("r.rego".into(), rule("r", "", "f(x) := f(x)\n\nalerts contains \"x\" if f(input.exec.filename)"))],
            file: "r.rego",
            line: 5,
            says: "recursion: palisade.rules.r.f -> palisade.rules.r.f",
        },
        Hostile {
            name: "mutual recursion",
            files: vec![("r.rego".into(), rule("r", "", "a if b\n\nb if a\n\nalerts contains \"x\" if a"))],
            file: "r.rego",
            line: 5,
            says: "recursion: palisade.rules.r.a -> palisade.rules.r.b -> palisade.rules.r.a",
        },
        Hostile {
            name: "budget exhaustion",
            files: vec![(
                "r.rego".into(),
                rule("r", "", "alerts contains \"x\" if {\n\tsome i in numbers.range(1, 1000)\n\tsome j in numbers.range(1, 1000)\n\ti * j == 0\n}"),
            )],
            file: "r.rego",
            line: 3,
            says: "rule r: runs past its budget of 25000 instructions on the built-in exec event",
        },
        Hostile {
            // regorus builds (and reserves) the whole range in one builtin call, before any
            // budget applies: gigabytes, or an allocation abort for 1e12.
            name: "huge range",
            files: vec![("r.rego".into(), rule("r", "", "alerts contains \"x\" if {\n\tsome i in numbers.range(1, 1000000000000)\n\ti == 0\n}"))],
            file: "r.rego",
            line: 6,
            says: "numbers.range(1, 1000000000000) spans 1000000000000 numbers, more than the 10000",
        },
        Hostile {
            name: "range with computed bounds",
            files: vec![("r.rego".into(), rule("r", "", "alerts contains \"x\" if {\n\tsome i in numbers.range(0, count(input.exec.filename) * 1000000000)\n\ti == 0\n}"))],
            file: "r.rego",
            line: 6,
            says: "numbers.range needs literal bounds (at most 10000 apart)",
        },
        Hostile {
            name: "huge list (entries)",
            files: vec![
                ("lists/tools.json".into(), format!("[{}]", big_list.join(","))),
                (
                    "r.rego".into(),
                    rule("r", "import data.palisade.lists\n\n", "alerts contains \"x\" if {\n\tsome tool in lists.tools\n\tendswith(input.exec.filename, tool)\n}"),
                ),
            ],
            file: "r.rego",
            line: 5,
            says: "rule r: runs past its budget",
        },
        Hostile {
            name: "huge list (bytes)",
            files: vec![("lists/huge.json".into(), huge_list), ("r.rego".into(), rule("r", "", "alerts contains \"x\" if input.exec.filename == \"/x\""))],
            file: "lists/huge.json",
            line: 1,
            says: "more than the 1048576 a pack file may have",
        },
        Hostile {
            name: "deep nesting",
            files: vec![("r.rego".into(), rule("r", "", &format!("{deep}\nalerts contains \"x\" if input.exec.filename == \"/x\"")))],
            file: "r.rego",
            line: 5,
            says: "nesting deeper than 10 levels of brackets",
        },
        Hostile {
            name: "missing import",
            files: vec![("r.rego".into(), rule("r", "import data.palisade.nosuch\n\n", "alerts contains \"x\" if nosuch.x"))],
            file: "r.rego",
            line: 3,
            says: "import data.palisade.nosuch: no rule package or list defines it",
        },
        Hostile {
            name: "unknown function",
            files: vec![("r.rego".into(), rule("r", "", "alerts contains \"x\" if strings.nosuch(input.exec.filename)"))],
            file: "r.rego",
            line: 5,
            says: "unknown function strings.nosuch",
        },
        Hostile {
            name: "function missing from the engine",
            files: vec![("r.rego".into(), rule("r", "", "alerts contains \"x\" if {\n\tx := rego.parse_module(\"a\", input.exec.filename)\n\tx != 1\n}"))],
            file: "r.rego",
            line: 6,
            says: "unknown function rego.parse_module",
        },
        Hostile {
            name: "network from a rule",
            files: vec![("r.rego".into(), rule("r", "", "alerts contains \"x\" if {\n\tr := http.send({\"method\": \"get\", \"url\": input.exec.filename})\n\tr.status_code == 200\n}"))],
            file: "r.rego",
            line: 6,
            says: "function http.send is not allowed in rules",
        },
        Hostile { name: "empty pack", files: vec![], file: "", line: 1, says: "the pack has no rules" },
    ]
}

fn pack_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("rules-hostile-{}-{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("lists")).expect("mkdir");
    dir
}

fn write(dir: &Path, files: &[(String, String)]) {
    for (rel, text) in files {
        std::fs::write(dir.join(rel), text).expect("write");
    }
}

/// The line a diagnostic about `hostile` must start with.
fn expected_prefix(dir: &Path, hostile: &Hostile) -> String {
    if hostile.file.is_empty() {
        format!("{}:{}:", dir.display(), hostile.line)
    } else {
        format!("{}:{}:", dir.join(hostile.file).display(), hostile.line)
    }
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let started = Instant::now();
    let out = Command::new(PALISADE).args(args).output().expect("run palisade");
    assert!(started.elapsed() < Duration::from_secs(60), "palisade {args:?} took {:?}", started.elapsed());
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn every_hostile_pack_is_rejected_with_a_location_by_check_test_and_replay() {
    let events = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rules-hostile-events-{}.jsonl", std::process::id()));
    std::fs::write(
        &events,
        r#"{"type": "exec", "pod": null, "process": {"pid": 7, "comm": "x", "exe": "/tmp/x", "cwd": "/", "ancestors": []}, "exec": {"filename": "/tmp/x", "argv": ["/tmp/x"]}}"#,
    )
    .expect("events");
    let mut problems = Vec::new();
    for hostile in hostile_packs() {
        let dir = pack_dir(hostile.name);
        write(&dir, &hostile.files);
        let prefix = expected_prefix(&dir, &hostile);
        let dir_arg = dir.to_string_lossy().to_string();
        for args in [
            vec!["rules", "check", dir_arg.as_str()],
            vec!["rules", "test", dir_arg.as_str(), "--fixtures", dir_arg.as_str()],
            vec!["rules", "replay", dir_arg.as_str(), "--events", events.to_str().expect("utf-8")],
        ] {
            let (code, output) = run(&args);
            let located = output.lines().any(|l| l.starts_with(&prefix) && l.contains(hostile.says));
            if code != Some(1) || !located {
                problems.push(format!(
                    "{}: `palisade {}` exited {code:?}; want exit 1 and a line `{prefix}..{}`; got:\n{output}",
                    hostile.name,
                    args[..2].join(" "),
                    hostile.says
                ));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_file(&events);
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn an_empty_pack_loads_only_when_asked() {
    let dir = pack_dir("empty-allowed");
    let (code, output) = run(&["rules", "check", dir.to_str().expect("utf-8"), "--allow-empty"]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("ok: 0 rules"), "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for(rx: &mpsc::Receiver<RulesNotification>, what: &str) -> RulesNotification {
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no notification: {what}"))
}

fn good_event() -> serde_json::Value {
    serde_json::json!({
        "type": "exec", "pod": null,
        "process": {"pid": 7, "comm": "x", "exe": "/tmp/x", "cwd": "/", "ancestors": []},
        "exec": {"filename": "/tmp/x", "argv": ["/tmp/x"]}
    })
}

/// Each hostile pack dropped into a watched directory is rejected with its location; the last
/// good pack stays in force and keeps alerting; taking the hostile files away reloads.
#[test]
fn hot_reloading_a_hostile_pack_keeps_the_last_good_one() {
    let dir = pack_dir("reload");
    std::fs::write(dir.join("good.rego"), GOOD).expect("write");
    let options = PackOptions::default();
    let handle = PackHandle::new(RulePack::load_with(&dir, &options).expect("good pack"));
    let (tx, rx) = mpsc::channel();
    let _watcher = watch(&dir, options, handle.clone(), move |n| {
        let _ = tx.send(n);
    })
    .expect("watch");
    let mut problems = Vec::new();
    for hostile in hostile_packs() {
        let kept = handle.generation();
        let files: Vec<(String, String)> = if hostile.files.is_empty() {
            // The empty pack: the good rule goes away.
            std::fs::remove_file(dir.join("good.rego")).expect("remove good");
            Vec::new()
        } else {
            hostile.files.clone()
        };
        write(&dir, &files);
        match wait_for(&rx, hostile.name) {
            RulesNotification::RulesRejected { errors, kept_generation } => {
                let prefix = expected_prefix(&dir, &hostile);
                if kept_generation != kept || !errors.iter().any(|e| e.starts_with(&prefix) && e.contains(hostile.says)) {
                    problems.push(format!("{}: kept {kept_generation} (want {kept}), errors {errors:?}", hostile.name));
                }
            }
            other => problems.push(format!("{}: expected a rejection, got {other:?}", hostile.name)),
        }
        assert_eq!(handle.generation(), kept, "{}: the last good pack must stay", hostile.name);
        let hits = handle.current().evaluate(&good_event()).expect("the last good pack evaluates");
        assert_eq!(hits.len(), 1, "{}: the last good pack must still alert", hostile.name);
        // Restore the good pack.
        for (rel, _) in &files {
            let _ = std::fs::remove_file(dir.join(rel));
        }
        std::fs::write(dir.join("good.rego"), GOOD).expect("restore good");
        loop {
            match wait_for(&rx, "restore") {
                RulesNotification::Reloaded { .. } => break,
                // A burst may be seen half-way (a file removed, another not yet).
                RulesNotification::RulesRejected { .. } => continue,
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_past_its_deadline_is_abandoned_and_the_last_good_pack_stays() {
    let dir = pack_dir("deadline");
    std::fs::write(dir.join("good.rego"), GOOD).expect("write");
    let handle = PackHandle::new(RulePack::load(&dir).expect("good pack"));
    // A pack that takes far longer than a millisecond to load: many rules.
    for i in 0..60 {
        std::fs::write(dir.join(format!("r{i}.rego")), rule(&format!("r{i}"), "", "alerts contains \"x\" if input.exec.filename == \"/x\"")).expect("write");
    }
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    match reload_within(&dir, &PackOptions::default(), &handle, Duration::from_millis(1), &busy) {
        RulesNotification::RulesRejected { errors, kept_generation } => {
            assert_eq!(kept_generation, 1);
            assert!(errors.iter().any(|e| e.contains("took longer than")), "{errors:?}");
        }
        other => panic!("expected the load to be abandoned, got {other:?}"),
    }
    assert_eq!(handle.generation(), 1);
    assert_eq!(handle.current().evaluate(&good_event()).expect("evaluate").len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One semantics: a fixture on which the tree interpreter and the register VM (the daemon's
/// engine) disagree fails `rules test` -- here `to_number("bash")`, an error in the interpreter
/// and an undefined body in the VM.
#[test]
fn engines_that_disagree_fail_the_test_run() {
    let dir = pack_dir("disagree");
    std::fs::write(
        dir.join("n.rego"),
        rule("n", "", "alerts contains \"numeric comm\" if to_number(input.process.comm) > 0"),
    )
    .expect("write rule");
    let fixtures = dir.join("fixtures.yaml");
    std::fs::write(
        &fixtures,
        "cases:\n  - name: bash\n    event: {type: exec, pod: null, process: {pid: 1, comm: bash, exe: /bin/bash, cwd: /, ancestors: []}, exec: {filename: /bin/bash, argv: [bash]}}\n    want: []\n",
    )
    .expect("write fixtures");
    let options = palisade::rules::testing::TestOptions { fixtures: vec![fixtures], ..Default::default() };
    let report = palisade::rules::testing::run_tests(&dir, &options).unwrap_or_else(|e| panic!("{}", e.lines().join("\n")));
    let failures: Vec<&str> = report.results.iter().filter_map(|r| r.failure.as_deref()).collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("engines disagree"), "{failures:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pipeline judges protected events itself (`LocalEvaluator`, not the pool): a pack put in
/// force by a hot reload must reach that path too, from the very next event. An operator who
/// turns a rule off (here: replaces it with one that does not match) must not see the old pack
/// keep judging the events that quarantine.
#[test]
fn the_pipelines_own_evaluator_follows_a_pack_swap_from_the_next_event() {
    let dir = pack_dir("local-swap");
    std::fs::write(dir.join("good.rego"), GOOD).expect("write");
    let handle = PackHandle::new(RulePack::load(&dir).expect("good pack"));
    let mut local = palisade::rules::LocalEvaluator::new(handle.clone());
    let first = local.evaluate(palisade::rules::to_rego_value(&good_event()), None);
    assert_eq!(first.hits.as_ref().map(Vec::len).ok(), Some(1), "the pack in force alerts: {:?}", first.hits);
    assert_eq!(first.pack_generation, 1);

    std::fs::write(dir.join("good.rego"), GOOD.replace("\"/tmp/\"", "\"/nowhere/\"")).expect("rewrite");
    let generation = handle.swap(RulePack::load(&dir).expect("second pack"));
    let second = local.evaluate(palisade::rules::to_rego_value(&good_event()), None);
    assert_eq!(second.pack_generation, generation, "judged by the pack in force, not the one it started with");
    assert_eq!(second.hits.as_ref().map(Vec::len).ok(), Some(0), "the swapped-out rule still judged: {:?}", second.hits);
    let _ = std::fs::remove_dir_all(&dir);
}
