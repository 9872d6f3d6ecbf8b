//! The histograms a running `palisade run` registers are observed, not only registered:
//! after events reach the rule workers, `rule_evaluation_seconds` has counted them, and after
//! the datapath synced (at start-up, and again after an inventory change),
//! `map_sync_seconds{map="segmentation"}` has counted each sync. Scraped from the API socket's
//! `/metrics` (the daemon's TCP listener is off in tests).
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use palisade::api::client::ApiClient;
use support::daemon::{DaemonGuard, DaemonOptions};
use support::require_kernel;

const INVENTORY: &str = "endpoints:
  - {namespace: shop, name: web, ips: [198.18.43.1]}
  - {namespace: shop, name: db, ips: [198.18.43.2]}
";

fn scrape(daemon: &DaemonGuard) -> String {
    let client = ApiClient::new(&daemon.state_dir);
    let mut text = String::new();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime
        .block_on(client.stream_lines("/metrics", |line| {
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
            ControlFlow::Continue(())
        }))
        .expect("GET /metrics on the API socket");
    text
}

/// The value of the sample `name` (a full series name with its labels, as exposed).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

/// Scrapes until `done` holds or 20 s passed (a bound, not a timed assertion); the last text.
fn scrape_until(daemon: &DaemonGuard, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(daemon);
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn evaluation_and_map_sync_histograms_are_observed() {
    if !require_kernel("evaluation_and_map_sync_histograms_are_observed") {
        return;
    }
    let daemon = DaemonGuard::start(DaemonOptions::new("metrics_observed", INVENTORY));
    const EVALUATIONS: &str = "palisade_rule_evaluation_seconds_count";
    const SYNCS: &str = "palisade_map_sync_seconds_count{map=\"segmentation\"}";

    // The start-up sync is counted.
    let text = scrape_until(&daemon, |t| sample(t, SYNCS) >= 1.0);
    let syncs_at_start = sample(&text, SYNCS);
    assert!(syncs_at_start >= 1.0, "the start-up sync is not in map_sync_seconds:\n{text}");

    // Events in a pod (execs, which every pack subscribes to) reach the rule workers.
    let before = sample(&text, EVALUATIONS);
    for _ in 0..5 {
        let out = daemon.exec_in("shop/web", &["/bin/true"]);
        assert!(out.status.success(), "exec in the pod: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = scrape_until(&daemon, |t| sample(t, EVALUATIONS) >= before + 5.0);
    assert!(sample(&text, EVALUATIONS) >= before + 5.0, "five execs, yet rule_evaluation_seconds counted {} -> {}:\n{text}", before, sample(&text, EVALUATIONS));

    // An inventory change is one more sync.
    daemon.set_inventory(&format!("{INVENTORY}  - {{namespace: shop, name: cache, ips: [198.18.43.3]}}\n"));
    let text = scrape_until(&daemon, |t| sample(t, SYNCS) > syncs_at_start);
    assert!(sample(&text, SYNCS) > syncs_at_start, "the sync after an inventory change is not counted:\n{text}");
}
