//! The datapath's link pins are owned (issue 14): a pod's links are pinned under the pin
//! directory by its cgroup id, and they go with its endpoint even when its cgroup was removed
//! first (the id can no longer be read from the path then; before, those pins stayed, each
//! holding a link to a dead cgroup, and accumulated with pod churn).
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::path::Path;
use std::time::Duration;

use support::daemon::{DaemonGuard, DaemonOptions};
use support::require_kernel;

const INVENTORY: &str = "endpoints:
  - {namespace: shop, name: web, ips: [198.18.43.1]}
  - {namespace: shop, name: db, ips: [198.18.43.2]}
";

/// The link pins named by cgroup `id` under `links`.
fn pins_of(links: &Path, id: u64) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(links)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with(&format!("{id}-")));
    names.sort();
    names
}

#[test]
fn a_pods_link_pins_go_with_its_endpoint_even_after_its_cgroup_was_removed() {
    if !require_kernel("a_pods_link_pins_go_with_its_endpoint_even_after_its_cgroup_was_removed") {
        return;
    }
    // Attached per pod (no pods parent), so each pod has its own cgroup_skb link pins.
    let daemon = DaemonGuard::start(DaemonOptions::new("datapath_pins", INVENTORY).arg("--pods-cgroup").arg("none"));
    let links = daemon.pin_dir.join("links");
    let cgroup = |pod: &str| daemon.lab().pod_cgroup_dir(pod).expect("pod cgroup");
    let id = |pod: &str| palisade::lab::cgroup_id(&cgroup(pod)).expect("cgroup id");
    let (web, db) = (id("shop/web"), id("shop/db"));
    for (pod, id) in [("shop/web", web), ("shop/db", db)] {
        let pins = pins_of(&links, id);
        assert!(pins.contains(&format!("{id}-ingress")) && pins.contains(&format!("{id}-egress")), "{pod}'s links pinned: {pins:?}");
    }

    // db's cgroup goes first (the runtime removed the pod), then its endpoint leaves the inventory.
    std::fs::remove_dir(cgroup("shop/db")).expect("removing db's cgroup (no process in it)");
    let before = daemon.sync_count();
    daemon.set_inventory("endpoints:\n  - {namespace: shop, name: web, ips: [198.18.43.1]}\n");
    assert!(daemon.wait_synced(before, Duration::from_millis(300), Duration::from_secs(20)), "no sync after the inventory change:\n{}", daemon.log());
    assert_eq!(pins_of(&links, db), Vec::<String>::new(), "db's link pins outlived its endpoint");
    assert!(pins_of(&links, web).contains(&format!("{web}-ingress")), "web's links stay");
}
