//! The soak (issue 14): `palisade run --lab` with 20 pods under churn for 30 minutes (pods
//! created and deleted, policies changed, quarantines and releases, rules hot-reloaded, an
//! `open-loop` flood, the daemon SIGKILLed and restarted every 4 minutes), printing the event
//! balance, RSS and fds over time, pins and cgroups left behind, packets leaked from quarantined
//! pods and alerts lost across restarts. Exits non-zero when an invariant breaks. Root only.
//!
//! Run: `sudo cargo bench -p palisade --bench soak` (add `--profile dev` for a debug daemon).
//! `SOAK_SECS` (default 1800), `SOAK_PODS` (20), `SOAK_RESTART_SECS` (240), `SOAK_STEP_SECS`
//! (4), `SOAK_WARMUP_SECS` (40), `SOAK_LOAD_PROCS` (1); what each means: tests/support/soak.rs.
#[path = "../tests/support/mod.rs"]
mod support;

fn main() {
    if !support::require_kernel("soak") {
        return;
    }
    let report = support::soak::run("soak", support::soak::SoakConfig::from_env(1800));
    if !report.failures.is_empty() {
        std::process::exit(1);
    }
}
