//! The fuzz targets (fuzz/, cargo-fuzz) without cargo-fuzz: every seed (fuzz/seeds/TARGET) and
//! every input that once crashed a target (fuzz/regressions/TARGET, each fixed since) goes
//! through the target's checks (fuzz/src/checks.rs, the same code the fuzz binaries run) in the
//! ordinary test run. A crash the fuzzer finds becomes a file under fuzz/regressions/TARGET/
//! beside its fix (see fuzz/README.md).

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.expect("directory entry").path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no seeds for the fuzz target {target}");
    for file in &files {
        let data = std::fs::read(file).expect("read input");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "fuzz target {target} fails on {}", file.display());
    }
}

#[test]
fn decode_record() {
    replay("decode_record", checks::decode_record);
}

#[test]
fn inventory() {
    replay("inventory", checks::inventory);
}

#[test]
fn policy_oracle() {
    replay("policy_oracle", checks::policy_oracle);
}

#[test]
fn rule_pack() {
    replay("rule_pack", checks::rule_pack);
}

#[test]
fn api_request() {
    replay("api_request", checks::api_request);
}

#[test]
fn alert_log() {
    replay("alert_log", checks::alert_log);
}

#[test]
fn response_policy() {
    replay("response_policy", checks::response_policy);
}

#[test]
fn k8s_convert() {
    replay("k8s_convert", checks::k8s_convert);
}

#[test]
fn yaml_guard() {
    replay("yaml_guard", checks::yaml_guard);
}
