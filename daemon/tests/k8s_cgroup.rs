//! Pod cgroup discovery against recorded cgroup2 layouts (testdata/cgroups/*.txt): systemd and
//! cgroupfs drivers, containerd and CRI-O container naming, and a kind node's nested root.

use std::path::{Path, PathBuf};

use palisade::k8s::cgroup::{CgroupDriver, CgroupError, CgroupLocator, QosClass};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/cgroups")
}

struct Expect {
    uid: String,
    qos: Option<QosClass>,
    path: String,
    containers: Vec<String>,
}

/// Expands a listing into a fresh directory and returns it with the listing's expectations.
fn expand(listing: &Path) -> (PathBuf, Vec<Expect>) {
    let text = std::fs::read_to_string(listing).unwrap_or_else(|e| panic!("{}: {e}", listing.display()));
    let stem = listing.file_stem().and_then(|s| s.to_str()).unwrap_or("layout");
    let root = std::env::temp_dir().join(format!("palisade-k8s-cgroup-{stem}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("temp root");
    // Controller files exist in every real cgroup directory; discovery must skip them.
    std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("file");
    let mut expects = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(expect) = line.strip_prefix("# expect:") {
            let fields: Vec<&str> = expect.split_whitespace().collect();
            assert_eq!(fields.len(), 4, "{}: bad expect line {line:?}", listing.display());
            expects.push(Expect {
                uid: fields[0].to_string(),
                qos: if fields[1] == "-" { None } else { QosClass::from_status(Some(fields[1])) },
                path: fields[2].to_string(),
                containers: if fields[3] == "-" { Vec::new() } else { fields[3].split(',').map(str::to_string).collect() },
            });
        } else if !line.starts_with('#') {
            let dir = root.join(line);
            std::fs::create_dir_all(&dir).expect("layout dir");
            std::fs::write(dir.join("cgroup.procs"), "").expect("file");
        }
    }
    assert!(!expects.is_empty(), "{}: no expect lines", listing.display());
    (root, expects)
}

#[test]
fn every_recorded_layout_resolves_every_pod() {
    let mut listings: Vec<PathBuf> = std::fs::read_dir(testdata())
        .expect("testdata/cgroups")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    listings.sort();
    assert!(listings.len() >= 5, "layouts: {listings:?}");
    for listing in listings {
        let (root, expects) = expand(&listing);
        let locator = CgroupLocator::new(&root);
        for expect in expects {
            let found = locator
                .pod_cgroup(&expect.uid, expect.qos)
                .unwrap_or_else(|e| panic!("{}: {}: {e}", listing.display(), expect.uid));
            assert_eq!(found.path, expect.path, "{}: {}", listing.display(), expect.uid);
            let mut want = expect.containers.clone();
            want.sort();
            assert_eq!(found.containers, want, "{}: {} containers", listing.display(), expect.uid);
            let driver = if expect.path.contains(".slice") { CgroupDriver::Systemd } else { CgroupDriver::Cgroupfs };
            assert_eq!(found.driver, driver, "{}", listing.display());
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

#[test]
fn a_pod_not_there_yet_is_not_found_and_says_where_it_looked() {
    let (root, _) = expand(&testdata().join("systemd-containerd.txt"));
    let locator = CgroupLocator::new(&root);
    let err = locator
        .pod_cgroup("12345678-1234-4234-8234-123456789abc", Some(QosClass::Burstable))
        .expect_err("no such pod");
    assert!(matches!(err, CgroupError::NotFound { .. }));
    let text = err.to_string();
    assert!(text.contains("kubepods-burstable-pod12345678_1234_4234_8234_123456789abc.slice"), "{text}");
    assert!(text.contains("kubepods/burstable/pod12345678-1234-4234-8234-123456789abc"), "{text}");
    // A QoS class that does not match the layout (a status written before a resize) still
    // finds the pod: the fallback search looks for the pod's own directory name.
    let uid = "6b1e07f4-5d2c-4c3a-9a8b-7c6d5e4f3a21";
    let found = locator.pod_cgroup(uid, Some(QosClass::BestEffort)).expect("found by search");
    assert!(found.path.starts_with("kubepods.slice/kubepods-burstable.slice/"), "{}", found.path);
    let _ = std::fs::remove_dir_all(&root);
}
