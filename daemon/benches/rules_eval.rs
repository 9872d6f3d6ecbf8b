//! Events per second per core through the full default rule pack, and evaluation latency, for
//! the register VM (what the daemon uses) and the tree interpreter.
//!
//! `cargo bench -p palisade --bench rules_eval` (release build). The event mix is read from
//! `PALISADE_BENCH_EVENTS` (a JSONL recording from `palisade run --record`) when set; otherwise
//! it is built from the fixture events in testdata/rules, weighted like a busy web pod: mostly
//! benign file opens, some execs and connects, a little of everything else, ~2% attacks.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade::rules::testing::load_fixtures;
use palisade::rules::{EngineKind, EvaluatorConfig, InputConverter, PackHandle, PackOptions, RuleEvaluator, RulePack, to_rego_value};

/// A deterministic generator, so every run evaluates the same mix.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn recorded_events(path: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| match v.get("input") {
            Some(input) if input.get("type").is_some() => input.clone(),
            _ => v,
        })
        .collect()
}

fn synthetic_mix(count: usize) -> Vec<serde_json::Value> {
    let cases = load_fixtures(&[repo().join("testdata/rules")]).expect("fixtures load");
    let mut attacks = Vec::new();
    let mut benign: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    for loaded in cases {
        let event = loaded.case.event;
        if loaded.case.want.is_empty() {
            let ty = event["type"].as_str().unwrap_or("").to_string();
            benign.entry(ty).or_default().push(event);
        } else {
            attacks.push(event);
        }
    }
    // Share of each benign type in a busy web pod, per mille; the rest are attacks.
    let weights: [(&str, usize); 12] = [
        ("open", 600),
        ("exec", 120),
        ("connect", 110),
        ("fork", 40),
        ("exit", 40),
        ("unlink", 20),
        ("rename", 15),
        ("cred", 10),
        ("dup", 10),
        ("chmod", 5),
        ("memfd", 5),
        ("namespace", 0),
    ];
    let mut rng = Lcg(0x5eed);
    let mut events = Vec::with_capacity(count);
    for i in 0..count {
        let roll = rng.below(1000);
        let mut acc = 0;
        let mut chosen = None;
        for (ty, weight) in weights {
            acc += weight;
            if roll < acc {
                chosen = benign.get(ty).filter(|v| !v.is_empty());
                break;
            }
        }
        let mut event = match chosen {
            Some(pool) => pool[rng.below(pool.len())].clone(),
            None => attacks[rng.below(attacks.len())].clone(),
        };
        // Vary the strings so no two consecutive events are identical.
        if event["type"] == "open" && event["open"]["path"].as_str().is_some_and(|p| p.starts_with("/usr/share/nginx/html/")) {
            event["open"]["path"] = format!("/usr/share/nginx/html/assets/img-{}.png", i % 997).into();
        }
        event["process"]["pid"] = (1000 + (i % 5000)).into();
        event["ktime_ns"] = (i as u64 * 1000).into();
        events.push(event);
    }
    events
}

struct Figures {
    events_per_sec: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    max: Duration,
    hits: usize,
}

fn measure(pack: &RulePack, events: &[serde_json::Value], rounds: usize) -> Figures {
    let mut session = pack.session().expect("session");
    // Warm up caches, allocator and branch predictors.
    for event in events.iter().take(2000) {
        let _ = pack.evaluate_in(&mut session, event);
    }
    let mut latencies = Vec::with_capacity(events.len() * rounds);
    let mut hits = 0;
    let start = Instant::now();
    for _ in 0..rounds {
        for event in events {
            let t = Instant::now();
            let result = pack.evaluate_in(&mut session, event);
            latencies.push(t.elapsed());
            hits += result.map(|v| v.hits.len()).unwrap_or(0);
        }
    }
    let total = start.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Figures {
        events_per_sec: latencies.len() as f64 / total.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: latencies[latencies.len() - 1],
        hits: hits / rounds,
    }
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<34} {:>10.0} events/s/core   p50 {:>6.2} µs   p99 {:>6.2} µs   p99.9 {:>7.2} µs   max {:>8.1} µs   hits/pass {}",
        f.events_per_sec,
        f.p50.as_secs_f64() * 1e6,
        f.p99.as_secs_f64() * 1e6,
        f.p999.as_secs_f64() * 1e6,
        f.max.as_secs_f64() * 1e6,
        f.hits
    );
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse. PALISADE_BENCH_RULES measures another
    // rules directory (e.g. a variant of the default pack) against the same events.
    let rules_dir = std::env::var("PALISADE_BENCH_RULES").map_or_else(|_| repo().join("rules"), Into::into);
    let pack = RulePack::load(&rules_dir).expect("default pack loads");
    let (events, source) = match std::env::var("PALISADE_BENCH_EVENTS") {
        Ok(path) => (recorded_events(&path), path),
        Err(_) => (synthetic_mix(20_000), "synthetic web-pod mix from testdata/rules".to_string()),
    };
    let mut by_type: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &events {
        *by_type.entry(e["type"].as_str().unwrap_or("?")).or_default() += 1;
    }
    // Profiling mode (e.g. under `valgrind --tool=callgrind`, whose instruction counts are
    // repeatable on a loaded machine): one RVM pass over the first N events, nothing else.
    if let Some(n) = std::env::var("PALISADE_BENCH_PROFILE").ok().and_then(|v| v.parse::<usize>().ok()) {
        let slice = &events[..n.min(events.len())];
        let mut session = pack.session().expect("session");
        let mut hits = 0;
        for event in slice {
            hits += pack.evaluate_in(&mut session, event).map(|v| v.hits.len()).unwrap_or(0);
        }
        println!("profile pass: {} events, {hits} hits", slice.len());
        return;
    }
    println!("rules: {} in the default pack; events: {} ({source})", pack.rules().len(), events.len());
    println!("mix: {by_type:?}");

    // The input conversion alone (serde_json tree -> regorus value), part of every evaluation:
    // from scratch, and as a session does it (reusing what repeats between events).
    let start = Instant::now();
    let mut sink = 0usize;
    for e in &events {
        sink += matches!(to_rego_value(e), regorus::Value::Object(_)) as usize;
    }
    let per = start.elapsed().as_secs_f64() / events.len() as f64;
    println!("{:<34} {:>10.2} µs/event ({sink} objects)", "input conversion, from scratch", per * 1e6);
    let mut converter = InputConverter::default();
    let start = Instant::now();
    for e in &events {
        sink += matches!(converter.convert(e), regorus::Value::Object(_)) as usize;
    }
    let per = start.elapsed().as_secs_f64() / events.len() as f64;
    println!("{:<34} {:>10.2} µs/event ({sink} objects in all)", "input conversion, in a session", per * 1e6);

    // Before/after, interleaved in one run: the pack evaluating every subscriber of an event's
    // type ("all rules", as before prefilters) and with the rules' prefilters (what the daemon
    // does), twice each, so load changes on a shared machine hit both alike.
    let unfiltered = pack.without_prefilters();
    let reaching = events.iter().filter(|e| !pack.rules_judging(*e).is_empty()).count();
    let evaluations: usize = events.iter().map(|e| pack.rules_judging(e).len()).sum();
    let evaluations_all: usize = events.iter().map(|e| unfiltered.rules_judging(e).len()).sum();
    println!(
        "prefilters: {reaching} of {} events reach Rego ({:.1}%); rule evaluations {evaluations} instead of {evaluations_all}",
        events.len(),
        100.0 * reaching as f64 / events.len() as f64
    );
    let mut rvm = None;
    for round in 0..2 {
        let before = measure(&unfiltered, &events, 3);
        print(&format!("RVM, all rules (before) #{}", round + 1), &before);
        let after = measure(&pack, &events, 3);
        print(&format!("RVM, prefilters (after) #{}", round + 1), &after);
        rvm = Some(after);
    }
    let rvm = rvm.expect("measured");

    let interpreter = unfiltered.with_engine(EngineKind::Interpreter);
    let slice = &events[..events.len().min(5000)];
    let tree = measure(&interpreter, slice, 1);
    print("tree interpreter, all rules", &tree);
    println!("RVM (prefilters) over the tree interpreter: {:.1}x", rvm.events_per_sec / tree.events_per_sec);

    // Per type: where the time goes.
    for ty in ["open", "exec", "connect"] {
        let subset: Vec<serde_json::Value> = events.iter().filter(|e| e["type"] == ty).cloned().collect();
        if subset.is_empty() {
            continue;
        }
        let before = measure(&unfiltered, &subset, 3);
        print(&format!("  {ty} only, all rules (before)"), &before);
        let after = measure(&pack, &subset, 3);
        print(&format!("  {ty} only, prefilters (after)"), &after);
    }

    // The worker pool end to end through its bounded channels, as the daemon configures it
    // (only evaluations with hits come back), with 1 and 2 workers, each handing events over
    // one at a time (before) and in batches (`submit_batched`, what the pipeline does now),
    // interleaved. The inputs are built before the clock starts: the daemon builds each
    // event's input anyway, this measures the pool.
    for no_prefilters in [true, false] {
        let what = if no_prefilters { "all rules" } else { "prefilters" };
        for batched in [false, true] {
            let how = if batched { "batches (after)" } else { "one by one (before)" };
            let one = pool(&rules_dir, &events, 1, POOL_ROUNDS, no_prefilters, batched);
            let two = pool(&rules_dir, &events, 2, POOL_ROUNDS, no_prefilters, batched);
            println!(
                "worker pool, {what:<10} {how:<20} {one:>10.0} events/s with 1 worker, {two:>10.0} with 2 ({:.2}x)",
                two / one
            );
        }
    }
}

/// Passes over the mix per pool measurement: ~12,000 events per pass with prefilters take
/// ~0.1 s, too short to say anything about two threads.
const POOL_ROUNDS: usize = 10;

/// Events per second through a pool of `workers`, `rounds` passes over `events` (after an
/// untimed warm-up pass).
fn pool(rules_dir: &Path, events: &[serde_json::Value], workers: usize, rounds: usize, no_prefilters: bool, batched: bool) -> f64 {
    let options = PackOptions { no_prefilters, ..PackOptions::default() };
    let handle = PackHandle::new(RulePack::load_with(rules_dir, &options).expect("pack"));
    let (mut evaluator, results) =
        RuleEvaluator::start(Arc::clone(&handle), EvaluatorConfig { workers, queue: 4096, send_empty: false }).expect("pool");
    // As the daemon's pipeline hands them over: regorus values, built before the clock starts.
    let inputs: Vec<regorus::Value> = (0..rounds).flat_map(|_| events.iter().map(to_rego_value)).collect();
    let total = inputs.len();
    let drain = std::thread::spawn(move || results.iter().count());
    // Warm-up, untimed: each worker builds its engine session on its first event (tens of ms),
    // which the daemon pays once at start and a short timed run would count once per worker.
    for input in events.iter().map(to_rego_value) {
        evaluator.submit_batched(input, None).expect("submit");
    }
    evaluator.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    for input in inputs {
        if batched {
            evaluator.submit_batched(input, None).expect("submit");
        } else {
            evaluator.submit(input).expect("submit");
        }
    }
    evaluator.shutdown();
    let elapsed = start.elapsed();
    let _ = drain.join();
    total as f64 / elapsed.as_secs_f64()
}
