//! Hot reload through a ConfigMap volume: the kubelet updates a mounted ConfigMap by writing a
//! new hidden payload directory and renaming a `..data` symlink over the old one; the visible
//! files are symlinks through `..data`, so nothing at the top level changes. The rules watcher
//! (daemon/src/rules/watch.rs, recursive) must still reload, and load each version once.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use palisade::rules::evaluator::PackHandle;
use palisade::rules::pack::{PackOptions, RulePack};
use palisade::rules::watch::{RulesNotification, watch};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")
}

/// Copies the default pack's modules and lists into a payload directory, leaving out `drop`.
fn write_payload(payload: &Path, drop: Option<&str>) {
    std::fs::create_dir_all(payload.join("lists")).expect("payload dirs");
    for entry in std::fs::read_dir(rules_dir()).expect("rules/").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".rego") && !name.ends_with("_test.rego") && Some(name.as_str()) != drop {
            std::fs::copy(entry.path(), payload.join(&name)).expect("copy module");
        }
    }
    for entry in std::fs::read_dir(rules_dir().join("lists")).expect("rules/lists").flatten() {
        std::fs::copy(entry.path(), payload.join("lists").join(entry.file_name())).expect("copy list");
    }
}

/// Points `..data` at `..<version>` atomically (symlink + rename, as the kubelet does).
fn swap_data(dir: &Path, version: &str) {
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename over ..data");
}

fn link_top_level(dir: &Path, version: &str) {
    for entry in std::fs::read_dir(dir.join(format!("..{version}"))).expect("payload").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let link = dir.join(&name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("top-level symlink");
        }
    }
}

#[test]
fn a_configmap_data_swap_reloads_the_rules() {
    let dir = std::env::temp_dir().join(format!("palisade-k8s-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    write_payload(&dir.join("..v1"), None);
    swap_data(&dir, "v1");
    link_top_level(&dir, "v1");

    let first = RulePack::load(&dir).expect("the ConfigMap layout loads (hidden payload not read twice)");
    let ids = |pack: &RulePack| pack.rules().iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    let first_ids = ids(&first);
    assert!(first_ids.contains(&"crypto_mining".to_string()), "{first_ids:?}");
    let handle = PackHandle::new(first);
    let (tx, rx) = mpsc::channel();
    let _watcher = watch(&dir, PackOptions::default(), handle.clone(), move |n| {
        let _ = tx.send(n);
    })
    .expect("watch the mount");

    // The update: a new payload without one rule; the top-level crypto_mining.rego link now
    // dangles, exactly as after a kubelet update that removed the key.
    write_payload(&dir.join("..v2"), Some("crypto_mining.rego"));
    let old_text = std::fs::read_to_string(dir.join("lists/miners.yaml")).expect("v1 list via ..data");
    std::fs::write(dir.join("..v2/lists/miners.yaml"), format!("{old_text}- palisade-test-miner\n")).expect("edit list");
    swap_data(&dir, "v2");
    std::fs::remove_file(dir.join("crypto_mining.rego")).expect("kubelet removes links of deleted keys");
    std::fs::remove_dir_all(dir.join("..v1")).expect("old payload removed");

    // What a reader sees through the unchanged top-level path is the new content.
    let seen = std::fs::read_to_string(dir.join("lists/miners.yaml")).expect("v2 list via ..data");
    assert!(seen.contains("palisade-test-miner") && seen != old_text);

    let reloaded = loop {
        match rx.recv_timeout(Duration::from_secs(10)).expect("a reload within 10 s") {
            RulesNotification::Reloaded { rules, .. } => break rules,
            RulesNotification::RulesRejected { errors, .. } => {
                // A burst can be caught half-written; the next event settles it.
                eprintln!("intermediate rejection: {errors:?}");
            }
        }
    };
    assert_eq!(reloaded, first_ids.len() - 1);
    let current = ids(&handle.current());
    assert!(!current.contains(&"crypto_mining".to_string()), "{current:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
