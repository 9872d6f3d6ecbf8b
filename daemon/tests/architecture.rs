//! The house rule that imports follow the data flow (DEVELOPERS.md, "Module map"): a module of
//! `daemon/src` may name (`crate::x`) only modules at or before its own place in
//! kernel -> events -> rules -> response -> datapath, with the leaf helpers usable by all and
//! the edges (alerts, then api and status, then the daemon's wiring) importing what is before
//! them. The arrows that still run back up are listed in `KNOWN`: a new one fails this test,
//! and so does a listed one that is gone (take it off the list). Reads the sources as text; no
//! build of anything, milliseconds.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Leaf helpers: import nothing above them, usable by every module.
const LEAVES: &[&str] = &["sys", "time", "config", "defaults", "memory", "yaml", "output", "metrics", "logging", "liveness"];

/// The data flow, first to last; modules in one group are peers.
const FLOW: &[&[&str]] = &[
    &["inventory"],
    &["k8s"],
    &["endpoints"],
    &["probes"],
    &["events"],
    &["rules"],
    &["quarantine"],
    &["segmentation", "enforcement"],
    &["lab", "workload"],
    &["alerts"],
    &["api", "status"],
    &["daemon"],
];

/// Arrows that still run back up (from, to), each to remove, not to copy.
const KNOWN: &[(&str, &str, &str)] = &[
    ("endpoints", "events", "endpoints/table.rs uses events::enrich::{EndpointIndex, PodRef}; they belong in endpoints"),
    ("events", "alerts", "events/loss.rs builds the event_loss alert"),
    ("events", "rules", "events/loss.rs: the alert's Severity"),
    ("k8s", "segmentation", "the API source publishes segmentation's PolicySet and converts into its policy types"),
    ("metrics", "segmentation", "observe_conntrack takes conntrack::PodUsage"),
    ("probes", "events", "the probes' event kinds are events::kind::EventKind (one enum for kernel and rules)"),
    ("probes", "segmentation", "probes/loader.rs pins the segmentation maps"),
    ("quarantine", "alerts", "quarantine/api.rs and cluster.rs build audit alerts; responder re-exports alerts::Outcome"),
    ("quarantine", "api", "quarantine/api.rs implements api's operator trait"),
    ("quarantine", "lab", "quarantine/datapath.rs takes cgroup ids through lab"),
];

fn place(module: &str) -> Option<usize> {
    if LEAVES.contains(&module) {
        return Some(0);
    }
    FLOW.iter().position(|group| group.contains(&module)).map(|i| i + 1)
}

/// The source without comments and without its `#[cfg(test)]` tail (tests may import freely).
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().map(|line| line.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

fn crate_paths(code: &str) -> BTreeSet<String> {
    code.match_indices("crate::")
        .filter(|(at, _)| !code[..*at].ends_with(|c: char| c.is_alphanumeric() || c == '_'))
        .map(|(at, m)| code[at + m.len()..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
        .filter(|name| !name.is_empty())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading daemon/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (from, to) -> the files with that arrow.
fn upward_arrows(src: &Path) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut arrows: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("below daemon/src").to_string_lossy().into_owned();
        let module = relative.split('/').next().unwrap_or_default().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let from = place(&module).unwrap_or_else(|| panic!("module {module} ({relative}) has no place in the flow: add it to LEAVES or FLOW"));
        let code = code_of(&std::fs::read_to_string(&file).expect("reading a source file"));
        for target in crate_paths(&code) {
            let Some(to) = place(&target) else { continue };
            if target != module && to != 0 && to > from {
                arrows.entry((module.clone(), target)).or_default().insert(relative.clone());
            }
        }
    }
    arrows
}

#[test]
fn imports_follow_the_data_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let arrows = upward_arrows(&src);
    let known: BTreeSet<(String, String)> = KNOWN.iter().map(|(from, to, _)| (from.to_string(), to.to_string())).collect();
    let new: Vec<String> = arrows
        .iter()
        .filter(|(arrow, _)| !known.contains(*arrow))
        .map(|((from, to), files)| format!("{from} -> {to} in {files:?}"))
        .collect();
    assert!(new.is_empty(), "imports that run back up the data flow (see DEVELOPERS.md): {new:#?}");
    let gone: Vec<&(String, String)> = known.iter().filter(|arrow| !arrows.contains_key(*arrow)).collect();
    assert!(gone.is_empty(), "known arrows that no longer exist; take them off KNOWN: {gone:?}");
}

#[test]
fn the_checker_sees_an_upward_import() {
    // A stand-in tree: a rules module naming the datapath, and one that only names events in
    // a comment and in its tests.
    let dir = std::env::temp_dir().join(format!("palisade-architecture-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("rules")).expect("temp dir");
    std::fs::write(dir.join("rules/bad.rs"), "use crate::segmentation::Lookup;\nfn f() { crate::time::now_micros(); }\n").expect("write");
    std::fs::write(dir.join("events.rs"), "// crate::quarantine is named only here\n#[cfg(test)]\nmod tests { use crate::alerts::Alert; }\n").expect("write");
    let arrows = upward_arrows(&dir);
    std::fs::remove_dir_all(&dir).ok();
    let found: Vec<(String, String)> = arrows.into_keys().collect();
    assert_eq!(found, vec![("rules".to_string(), "segmentation".to_string())]);
}
