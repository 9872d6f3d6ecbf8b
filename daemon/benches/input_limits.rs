//! Time and peak memory of the hostile inputs of issue 14, as the loaders meet them now (the
//! tests assert the errors; the cost is measured here, never asserted).
//!
//! `cargo bench -p palisade --bench input_limits` (release build). Each case runs a few times;
//! the figure is the median time and the growth of the process's peak RSS (VmHWM, reset before
//! each case through /proc/self/clear_refs).
use std::path::Path;
use std::time::{Duration, Instant};

use palisade::inventory::Inventory;
use palisade::segmentation::compile;
use palisade::segmentation::policy::PolicySet;

fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn reset_peak() {
    // 5: reset the peak RSS to the current RSS (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn measure(name: &str, runs: usize, mut case: impl FnMut() -> String) {
    let mut times = Vec::new();
    let mut growth = 0;
    let mut outcome = String::new();
    for _ in 0..runs {
        reset_peak();
        let before = peak_rss_kb();
        let started = Instant::now();
        outcome = case();
        times.push(started.elapsed());
        growth = growth.max(peak_rss_kb().saturating_sub(before));
    }
    times.sort();
    let median: Duration = times[times.len() / 2];
    let outcome: String = outcome.chars().take(110).collect();
    println!("{name:<52} {:>10.1} ms {:>9} KB peak  {outcome}", median.as_secs_f64() * 1000.0, growth);
}

fn blocks_policy(n: usize, ports: &str) -> String {
    let mut text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: many, namespace: webapp}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports: {ports}\n    from:\n"
    );
    for i in 0..n {
        text.push_str(&format!("    - ipBlock: {{cidr: 10.{}.{}.{}/32}}\n", (i >> 16) & 255, (i >> 8) & 255, i & 255));
    }
    text
}

fn main() {
    let inventory_text = include_str!("../../policies/webapp-inventory.yaml");
    let inventory = Inventory::parse(inventory_text, Path::new("webapp-inventory.yaml")).expect("inventory");
    let outcome = |r: Result<String, String>| match r {
        Ok(s) => format!("ok: {s}"),
        Err(e) => format!("refused: {e}"),
    };
    println!("{:<52} {:>13} {:>14}  outcome", "case", "median", "peak RSS growth");

    let deep = format!("namespaces: {}", "[".repeat(100_000));
    measure("inventory: 100,000 nested [", 5, || {
        outcome(Inventory::parse(&deep, Path::new("inv.yaml")).map(|_| String::new()).map_err(|e| e.to_string()))
    });
    let deep_policy = format!("spec: {}", "[".repeat(100_000));
    measure("policy: 100,000 nested [", 5, || {
        outcome(PolicySet::parse(&deep_policy, Path::new("p.yaml")).map(|_| String::new()).map_err(|e| e.to_string()))
    });
    let compact = format!("endpoints:\n{}x\n", "- ".repeat(100_000));
    measure("inventory: 100,000 compact '- '", 5, || {
        outcome(Inventory::parse(&compact, Path::new("inv.yaml")).map(|_| String::new()).map_err(|e| e.to_string()))
    });
    // The depth the parser accepts, as a reference point: its cost for legitimate nesting.
    let allowed = format!("a: {}{}", "[".repeat(30), "]".repeat(30));
    measure("policy: 30 nested [ (within the limit)", 5, || {
        outcome(PolicySet::parse(&allowed, Path::new("p.yaml")).map(|_| String::new()).map_err(|e| e.to_string()))
    });

    for (n, ports) in [
        (3_600, "[{port: 1, endPort: 65535}]"),
        (50_000, "[{port: 1, endPort: 65535}]"),
        (16_000, "[{port: 80}]"),
    ] {
        let text = blocks_policy(n, ports);
        measure(&format!("policy: {n} ipBlocks on {ports}: load + compile"), 3, || {
            outcome(PolicySet::parse(&text, Path::new("p.yaml")).map_err(|e| e.to_string()).map(|set| {
                let compiled = compile(&inventory, &set);
                match compiled.over_capacity {
                    Some(over) => format!("over capacity: {over}"),
                    None => format!("{} POLICY entries, {} IPCACHE", compiled.policy.len(), compiled.ipcache.len()),
                }
            }))
        });
    }
}
