//! The alert log end to end: rotation and retention, burst aggregation, queue overflow reported
//! as a loss, query filters (library and CLI), and hostile strings in JSON and table output.
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade::alerts::query::{AlertQuery, log_files, read_alerts};
use palisade::alerts::render::{AlertColumns, alert_line, terminal_safe};
use palisade::alerts::schema::{Alert, AlertKind, Outcome, PodInfo};
use palisade::alerts::{AlertLog, AlertLogConfig, LOG_FILE_NAME};
use palisade::rules::model::{Action, RuleHit, Severity};
use serde_json::json;

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("palisade-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path) -> AlertLogConfig {
    let mut c = AlertLogConfig::new(dir, "node-test");
    c.aggregate_window = Duration::ZERO;
    c
}

fn pod(ns: &str, name: &str) -> PodInfo {
    PodInfo { namespace: ns.into(), name: name.into(), labels: Default::default() }
}

fn read_all(dir: &Path) -> Vec<Alert> {
    let mut out = Vec::new();
    let report = read_alerts(&log_files(dir), &AlertQuery::default(), |a| {
        out.push(a);
        ControlFlow::Continue(())
    });
    assert_eq!(report.bad_lines, 0, "{report:?}");
    out
}

#[tokio::test]
async fn rotation_keeps_max_files_and_order() {
    let tmp = TempDir::new("rotation");
    // A rotation left over from a larger retention setting must go too.
    std::fs::write(tmp.0.join(format!("{LOG_FILE_NAME}.7")), "{}\n").unwrap();
    let mut c = config(&tmp.0);
    c.max_file_bytes = 2_000;
    c.max_files = 2;
    let (log, sink) = AlertLog::start(c).unwrap();
    for n in 0..60 {
        sink.emit(Alert::new(AlertKind::Daemon, Severity::Info, format!("n={n:03} {}", "x".repeat(100)))).await.unwrap();
    }
    log.shutdown().await;
    let stats = sink.stats();
    assert!(stats.rotations >= 3, "{stats:?}");
    assert_eq!((stats.written, stats.running), (60, false));

    let mut names: Vec<String> =
        std::fs::read_dir(&tmp.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"], "retention: current + 2 rotations");
    for name in &names {
        let len = std::fs::metadata(tmp.0.join(name)).unwrap().len();
        assert!(len <= 2_000, "{name} is {len} bytes");
    }
    let kept: Vec<u32> = read_all(&tmp.0).iter().map(|a| a.message[2..5].parse().unwrap()).collect();
    assert!(kept.len() < 60 && kept.len() > 10, "{kept:?}");
    // Oldest first, no gaps: retention drops whole old files only.
    let expected: Vec<u32> = (60 - kept.len() as u32..60).collect();
    assert_eq!(kept, expected);
    let ids: Vec<String> = read_all(&tmp.0).into_iter().map(|a| a.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids sort in write order");
}

#[tokio::test]
async fn a_burst_is_one_alert_plus_a_counted_follow_up() {
    let tmp = TempDir::new("burst");
    let mut c = config(&tmp.0);
    c.aggregate_window = Duration::from_millis(300);
    let (log, sink) = AlertLog::start(c).unwrap();
    let hit = RuleHit {
        rule_id: "shell_in_container".into(),
        title: "Shell in container".into(),
        severity: Severity::High,
        message: "shell".into(),
        mitre: vec!["T1059".into()],
        action: Action::Alert,
    };
    for n in 0..20 {
        let input = json!({"type": "exec", "node": "n1", "pod": {"namespace": "shop", "name": "web-1", "labels": {}},
                           "process": {"pid": 100 + n, "exe": "/bin/sh", "cmdline": ["sh"]}});
        assert!(sink.try_emit(Alert::from_rule_hit(&hit, &input)));
    }
    let other = json!({"type": "exec", "pod": {"namespace": "shop", "name": "db-1", "labels": {}}, "process": {"pid": 7}});
    sink.try_emit(Alert::from_rule_hit(&hit, &other));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = sink.stats();
    log.shutdown().await;

    let alerts = read_all(&tmp.0);
    let web: Vec<&Alert> = alerts.iter().filter(|a| a.pod.as_ref().is_some_and(|p| p.name == "web-1")).collect();
    assert_eq!(web.len(), 2, "one alert and one follow-up: {web:#?}");
    let (first, follow) = (web[0], web[1]);
    assert_eq!((first.count, first.follows.as_deref()), (1, None));
    assert_eq!(follow.count, 19);
    assert_eq!(follow.follows.as_deref(), Some(first.id.as_str()));
    assert_eq!(follow.event.as_ref().unwrap()["process"]["pid"], 101, "first repeat's evidence kept");
    assert_eq!(follow.last_event.as_ref().unwrap()["process"]["pid"], 119, "last repeat's evidence kept");
    assert!(follow.first_seen <= follow.last_seen);
    assert_eq!(alerts.iter().filter(|a| a.pod.as_ref().is_some_and(|p| p.name == "db-1")).count(), 1);
    assert_eq!(alerts.iter().map(|a| a.count).sum::<u64>(), 21, "counts add up to every occurrence");
    assert_eq!(stats.aggregated, 19);
}

#[tokio::test]
async fn queue_overflow_is_counted_and_reported_as_a_loss() {
    let tmp = TempDir::new("overflow");
    let mut c = config(&tmp.0);
    c.queue_capacity = 4;
    let (log, sink) = AlertLog::start(c).unwrap();
    // The test runtime is single-threaded: the writer cannot run until we yield, so the queue
    // fills deterministically.
    let accepted = (0..100).filter(|n| sink.try_emit(Alert::new(AlertKind::Daemon, Severity::Info, format!("{n}")))).count();
    assert_eq!(accepted, 4);
    assert_eq!(sink.stats().dropped, 96);
    tokio::time::sleep(Duration::from_millis(50)).await;
    log.shutdown().await;
    let alerts = read_all(&tmp.0);
    assert_eq!(alerts.len(), 5, "{alerts:#?}");
    let loss = alerts.iter().find(|a| a.kind == AlertKind::EventLoss).expect("the loss is reported");
    assert_eq!(loss.event.as_ref().unwrap()["dropped"], 96);
    assert!(loss.message.contains("96 alerts dropped"), "{}", loss.message);
    assert_eq!(loss.severity, Severity::High);
}

fn sample_alerts() -> Vec<Alert> {
    let t0 = 1_795_953_600_000_000; // 2026-11-29T12:00:00Z
    let min = 60_000_000;
    vec![
        Alert::at(t0, AlertKind::Rule, Severity::High, "a").with_rule("shell", "Shell").with_pod(pod("shop", "web-1")),
        Alert::at(t0 + min, AlertKind::Rule, Severity::Low, "b").with_rule("recon", "Recon").with_pod(pod("shop", "db-1")),
        Alert::at(t0 + 2 * min, AlertKind::Quarantine, Severity::Critical, "c")
            .with_rule("revshell", "Reverse shell")
            .with_pod(pod("pay", "api-1"))
            .with_action(Action::Quarantine)
            .with_outcome(Outcome::Quarantined, Some("rule action".into())),
        Alert::at(t0 + 3 * min, AlertKind::EventLoss, Severity::Medium, "d"),
        Alert::at(t0 + 4 * min, AlertKind::Rule, Severity::Critical, "e").with_rule("shell", "Shell").with_pod(pod("pay", "api-1")),
    ]
}

fn messages(files: &[PathBuf], query: &AlertQuery) -> String {
    let mut out = String::new();
    read_alerts(files, query, |a| {
        out.push_str(&a.message);
        ControlFlow::Continue(())
    });
    out
}

#[tokio::test]
async fn query_filters() {
    let tmp = TempDir::new("query");
    let (log, sink) = AlertLog::start(config(&tmp.0)).unwrap();
    for a in sample_alerts() {
        sink.emit(a).await.unwrap();
    }
    log.shutdown().await;
    let files = log_files(&tmp.0);
    let q = |s: &str| AlertQuery::from_query_string(s, 0).unwrap();
    assert_eq!(messages(&files, &q("")), "abcde");
    assert_eq!(messages(&files, &q("since=2026-11-29T12:01:00Z")), "bcde");
    assert_eq!(messages(&files, &q("since=2026-11-29T12:01:00Z&until=2026-11-29T13:02:30%2B01:00")), "bc");
    assert_eq!(messages(&files, &q("pod=pay%2Fapi-1")), "ce");
    assert_eq!(messages(&files, &q("namespace=shop")), "ab");
    assert_eq!(messages(&files, &q("rule=shell")), "ae");
    assert_eq!(messages(&files, &q("severity=high")), "ace");
    assert_eq!(messages(&files, &q("kind=quarantine,event_loss")), "cd");
    assert_eq!(messages(&files, &q("namespace=pay&severity=critical&kind=rule")), "e");

    // The CLI, reading files.
    let bin = env!("CARGO_BIN_EXE_palisade");
    let file = tmp.0.join(LOG_FILE_NAME);
    let out = Command::new(bin)
        .args(["alerts", "-o", "json", "--severity", "high", "--namespace", "pay", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Alert> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|a| a.message.as_str()).collect::<String>(), "ce");

    let out = Command::new(bin).args(["alerts", "summary", "-o", "json", "--file"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["by_rule"]["shell"], 2);
    assert_eq!(summary["by_pod"]["pay/api-1"], 2);
    assert_eq!(summary["by_severity"]["critical"], 2);
    assert_eq!(summary["occurrences"], 5);

    let out = Command::new(bin).args(["alerts", "--since", "nonsense", "--file"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--since"));

    // A date that does not exist is an error that says so, never silently the next month
    // (the hand-written parser read 2026-02-31 as 3 March); from the CLI and in an API query.
    for (flag, date) in [("--since", "2026-02-31"), ("--until", "2026-11-31T00:00:00Z")] {
        let out = Command::new(bin).args(["alerts", flag, date, "--file"]).arg(&file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {date} was accepted: {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains(flag) && stderr.contains(date) && stderr.contains("day"), "{stderr}");
    }
    assert!(AlertQuery::from_query_string("since=2026-02-31", 0).is_err());
    // Relative times keep working.
    let out = Command::new(bin).args(["alerts", "-o", "json", "--since", "1h30m", "--file"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn hostile_strings_cannot_forge_lines_or_drive_the_terminal() {
    let tmp = TempDir::new("hostile");
    let (log, sink) = AlertLog::start(config(&tmp.0)).unwrap();
    // What the event decoder makes of invalid UTF-8 in a path: visible \xNN escapes.
    let bad_path = palisade::events::decode::bytes_to_text(b"/tmp/\xff\xfe\x1b[31mevil");
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        "x\n{\"schema\":1,\"kind\":\"release\",\"forged\":true}\r\n".to_string(),
        "\x1b[2J\x1b]0;pwned\x07".to_string(),
        "\u{9b}31mC1\u{7f}".to_string(),
        "abc\u{202e}gnp.exe".to_string(),
    ];
    let input = json!({
        "type": "exec",
        "pod": {"namespace": "shop", "name": "web\n1", "labels": {"app": "\x1b[5mblink"}},
        "process": {"pid": 9, "exe": bad_path, "cmdline": argv},
    });
    let hit = RuleHit {
        rule_id: "exec_from_tmp".into(),
        title: "Exec from /tmp".into(),
        severity: Severity::Critical,
        message: format!("exec of {bad_path}\n2026-01-01 forged row"),
        mitre: vec![],
        action: Action::Alert,
    };
    let original = Alert::from_rule_hit(&hit, &input);
    sink.emit(original.clone()).await.unwrap();
    sink.emit(Alert::new(AlertKind::Daemon, Severity::Info, "after")).await.unwrap();
    log.shutdown().await;

    // JSON: one line per alert, no raw control or C1/bidi characters, values round-trip.
    let raw = std::fs::read(tmp.0.join(LOG_FILE_NAME)).unwrap();
    let text = String::from_utf8(raw).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(!text.chars().any(|c| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c)), "{text:?}");
    let back: Alert = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(back.process.as_ref().unwrap().cmdline, original.process.as_ref().unwrap().cmdline);
    assert_eq!(back.process.as_ref().unwrap().exe.as_deref(), Some("/tmp/\\xff\\xfe\x1b[31mevil"));
    assert!(back.kind == AlertKind::Rule);

    // Table: the library renderer and the CLI show escapes, never the raw characters.
    let row = alert_line(&back, &AlertColumns::for_terminal(Some(400)), true);
    assert!(!row.contains('\n'));
    assert!(row.contains("web\\n1"), "{row}");
    assert_eq!(terminal_safe(back.process.as_ref().unwrap().exe.as_deref().unwrap()), "/tmp/\\xff\\xfe\\e[31mevil");
    let bin = env!("CARGO_BIN_EXE_palisade");
    for format in ["table", "json", "falco"] {
        let out = Command::new(bin).args(["alerts", "-o", format, "--file"]).arg(tmp.0.join(LOG_FILE_NAME)).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let shown = String::from_utf8(out.stdout).unwrap();
        let expected_lines = if format == "table" { 3 } else { 2 };
        assert_eq!(shown.lines().count(), expected_lines, "{format}: {shown}");
        assert!(
            !shown.chars().any(|c| (c.is_control() && c != '\n') || ('\u{80}'..='\u{9f}').contains(&c) || c == '\u{202e}'),
            "{format}: {shown:?}"
        );
        if format == "table" {
            assert!(shown.contains("\\e[31mevil") || shown.contains("exec of /tmp/\\xff\\xfe\\e[31m"), "{shown}");
            assert!(shown.contains("\\xff\\xfe"), "invalid UTF-8 stays visible: {shown}");
            assert!(shown.contains("\\nforged") || shown.contains("\\n2026"), "{shown}");
        }
    }
}
