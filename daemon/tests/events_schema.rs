//! The rule input the daemon really produces, from real kernel events, has exactly the fields
//! rules/README.md documents for each event type (and the documented envelope and process).
//! Kernel test: root only (SKIP otherwise; a failure with PALISADE_REQUIRE_KERNEL=1).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use palisade::events::enrich::{EndpointIndex, PodRef, ProcCache, enrich};
use palisade::events::input::{Clock, InputBuilder, to_input, to_input_tree};
use palisade::events::kind::EventKind;
use serde_json::Value;
use support::probes::{TestCgroup, collect_until, start};

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// The ```json blocks of rules/README.md that are events (they have a "type"): the full
/// example (with the envelope and "process") and one per event type.
fn documented_examples() -> (Value, BTreeMap<String, Value>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut full = Value::Null;
    let mut out = BTreeMap::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("unterminated json block");
        if let Ok(value) = serde_json::from_str::<Value>(&body[..end]) {
            if value.get("process").is_some() {
                full = value.clone();
            }
            if let Some(kind) = value.get("type").and_then(Value::as_str) {
                out.insert(kind.to_string(), value.clone());
            }
        }
        rest = &body[end + 3..];
    }
    assert!(full.is_object(), "rules/README.md has no full input example");
    (full, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_inputs_match_the_documented_schema() {
    if !support::require_kernel("events_schema") {
        return;
    }
    let (full_example, documented) = documented_examples();
    let cgroup = TestCgroup::new("schema");
    let mut running = start(EventKind::ALL.to_vec(), BTreeSet::from([cgroup.id])).await;
    let tmp = std::env::temp_dir().join(format!("palisade-schema-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let f = |n: &str| tmp.join(n).to_string_lossy().into_owned();
    std::fs::write(f("a"), b"x").expect("file");
    for args in [
        vec!["open".to_string(), "/etc/hostname".into()],
        vec!["connect".into(), "127.0.0.1:9".into()],
        vec!["ptrace".into()],
        vec!["mount".into()],
        vec!["finit-module".into()],
        vec!["bpf".into()],
        vec!["memfd-exec".into()],
        vec!["chmod-setuid".into(), f("s")],
        vec!["rename".into(), f("a"), f("b")],
        vec!["unlink".into(), f("b")],
        vec!["dup-socket".into()],
        vec!["setuid".into(), "65534".into()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cgroup.workload(&args);
    }
    let wanted: BTreeSet<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    let events = collect_until(&mut running.events, Duration::from_secs(20), |seen| {
        let got: BTreeSet<&str> = seen.iter().map(|e| e.header.kind.as_str()).collect();
        wanted.is_subset(&got)
    })
    .await;

    let mut index = EndpointIndex::default();
    index.insert(cgroup.id, PodRef { namespace: "test".into(), name: "schema".into(), labels: Default::default(), service_account: None });
    let mut cache = ProcCache::new(1024);
    let clock = Clock::new();
    let mut checked = BTreeSet::new();
    // The daemon's builder, kept across events as the pipeline keeps it, against the JSON tree
    // the input was built as before (the reference): equal on every real event.
    let mut builder = InputBuilder::new("node");
    for event in events {
        let kind = event.header.kind.as_str();
        let enriched = enrich(event, &index, &mut cache);
        let tree = to_input_tree(&enriched, &clock, "node");
        let built = builder.build(&enriched, &clock);
        assert_eq!(built, regorus::Value::from_json_str(&tree.to_string()).expect("parses"), "{kind}: the builder differs from {tree}");
        let input = to_input(&enriched, &clock, "node");
        assert_eq!(input, tree, "{kind}: the JSON of the built input differs");
        let example = documented.get(kind).unwrap_or_else(|| panic!("rules/README.md has no example for {kind}"));
        let full_kind = full_example["type"].as_str().unwrap_or_default();
        let mut envelope = keys(&input);
        envelope.remove(kind);
        let mut documented_envelope = keys(&full_example);
        documented_envelope.remove(full_kind);
        assert_eq!(envelope, documented_envelope, "{kind}: envelope fields differ from the README");
        assert_eq!(keys(&input[kind]), keys(&example[kind]), "{kind}: fields differ from the README");
        assert_eq!(keys(&input["process"]), keys(&full_example["process"]), "{kind}: process fields differ");
        assert_eq!(keys(&input["pod"]), keys(&full_example["pod"]), "{kind}: pod fields differ");
        checked.insert(kind.to_string());
    }
    let missing: Vec<&&str> = wanted.iter().filter(|k| !checked.contains(**k)).collect();
    // namespace events come from the mount workload's unshare; every kind must be seen.
    assert!(missing.is_empty(), "no real event of kinds {missing:?} was produced");
    let _ = std::fs::remove_dir_all(&tmp);
}
