//! The alert log reader on any file content (corrupt, truncated, not UTF-8, huge lines): every
//! line is an alert or a counted bad line, never a panic.
#![no_main]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade::alerts::query::{AlertQuery, read_alerts};

static FILE: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("palisade-fuzz-alerts-{}.jsonl", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    std::fs::write(&*FILE, data).expect("write the log file");
    let mut alerts = 0u64;
    let report = read_alerts(std::slice::from_ref(&*FILE), &AlertQuery::default(), |alert| {
        serde_json::to_string(&alert).expect("an alert serialises");
        alerts += 1;
        ControlFlow::Continue(())
    });
    assert_eq!(report.matched, alerts);
    let lines = data.split(|b| *b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count() as u64;
    assert_eq!(report.matched + report.bad_lines, lines, "every line is an alert or a counted bad line");
});
