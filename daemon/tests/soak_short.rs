//! The soak's short version for CI (issue 14): the same lab, churn, SIGKILLs and invariants as
//! `cargo bench --bench soak` (tests/support/soak.rs), for about three minutes with a restart
//! every minute. `SOAK_SECS` and the other `SOAK_*` variables change it as they change the bench.
mod support;

use support::{require_kernel, soak};

// Back in CI since the settle fix (the quiet point also waits for the kernel's lost count to
// stand still across 1.2 s; a pod over its budget loses events without emitting any, and
// `events.loss` is sampled once a second): four 3-minute runs passed after it (2026-12-02), three of them at
// load 11-17, where the one failure before it (71,072 losses unattributed) was seen.
#[test]
fn soak_three_minutes_every_invariant_holds() {
    if !require_kernel("soak_three_minutes_every_invariant_holds") {
        return;
    }
    let mut config = soak::SoakConfig::from_env(180);
    if std::env::var("SOAK_RESTART_SECS").is_err() {
        config.restart_every = std::time::Duration::from_secs(60);
    }
    if std::env::var("SOAK_WARMUP_SECS").is_err() {
        config.warm_up = std::time::Duration::from_secs(20);
    }
    let report = soak::run("soakshort", config);
    assert!(report.lives >= 2, "the daemon was never restarted");
    assert!(report.failures.is_empty(), "soak invariants broke:\n{}", report.failures.join("\n"));
}
