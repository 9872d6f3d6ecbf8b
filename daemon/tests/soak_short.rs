//! The soak's short version for CI (issue 14): the same lab, churn, SIGKILLs and invariants as
//! `cargo bench --bench soak` (tests/support/soak.rs), for about three minutes with a restart
//! every minute. `SOAK_SECS` and the other `SOAK_*` variables change it as they change the bench.
mod support;

use support::{require_kernel, soak};

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
