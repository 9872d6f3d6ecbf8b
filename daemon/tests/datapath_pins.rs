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

/// The pin directory's entries (maps, `links`), sorted.
fn pinned(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `palisade run` that must fail to start: its output (stderr), after it exited.
fn failed_start(args: &[&std::ffi::OsStr]) -> String {
    let mut command = std::process::Command::new(support::daemon::PALISADE);
    command.arg("run").args(args).arg("--no-metrics").env("RUST_LOG", "info").stdin(std::process::Stdio::null());
    let out = support::daemon::run_with_timeout(command, Duration::from_secs(90));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "palisade run was expected to fail to start:\n{text}");
    text
}

/// A scratch directory for one failed-start test (inventory, policies, state).
fn scratch(test: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("failed-start").join(support::unique_lab_name(test));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("policies")).expect("scratch");
    std::fs::write(dir.join("inventory.yaml"), INVENTORY).expect("inventory");
    dir
}

fn run_args<'a>(dir: &'a Path, pin_dir: &'a Path, rules: &'a Path) -> Vec<std::ffi::OsString> {
    vec![
        "--inventory".into(),
        dir.join("inventory.yaml").into(),
        "--policies".into(),
        dir.join("policies").into(),
        "--rules".into(),
        rules.into(),
        "--state-dir".into(),
        dir.join("state").into(),
        "--pin-dir".into(),
        pin_dir.into(),
    ]
}

/// A first start that fails after it pinned its maps (here: `--record` names a file in a
/// directory that does not exist, which is only opened once everything else runs) removes
/// what it pinned: nothing was in force before it, so nothing is lost, and nothing is left
/// behind to be adopted by a later start as if it had been enforced. The log says so.
#[test]
fn a_failed_first_start_removes_what_it_pinned() {
    if !require_kernel("a_failed_first_start_removes_what_it_pinned") {
        return;
    }
    let dir = scratch("failed_first_start");
    let pin_dir = std::path::PathBuf::from(format!("/sys/fs/bpf/palisade-test-{}", support::unique_lab_name("failedfirst")));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let rules = support::daemon::repo_root().join("rules");
    let mut args = run_args(&dir, &pin_dir, &rules);
    args.extend(["--record".into(), dir.join("no-such-dir/record.jsonl").into()]);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let log = failed_start(&args);
    assert!(log.contains("no-such-dir"), "the error names what failed:\n{log}");
    assert_eq!(pinned(&pin_dir), Vec::<String>::new(), "a failed first start left pins behind:\n{log}");
    assert!(!pin_dir.exists(), "the pin directory it created is gone");
    let removed = log.lines().find(|l| l.contains("removed what this start pinned")).unwrap_or_else(|| panic!("the log says what it removed:\n{log}"));
    // It got as far as pinning the maps (else this tests nothing), and says so.
    assert!(removed.contains("SEG_QUARANTINE"), "the maps it removed are named: {removed}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A restart that fails keeps what the previous run pinned, and says why: those maps and links
/// are what enforces the policies and the quarantines while no daemon runs, and removing them
/// would open every isolated pod and release every quarantined one.
#[test]
fn a_failed_restart_keeps_the_pins_in_force_and_says_why() {
    if !require_kernel("a_failed_restart_keeps_the_pins_in_force_and_says_why") {
        return;
    }
    let mut daemon = DaemonGuard::start(DaemonOptions::new("failed_restart", INVENTORY));
    assert!(daemon.stop(), "the first run stops on SIGINT");
    let before = pinned(&daemon.pin_dir);
    assert!(before.iter().any(|n| n == "SEG_QUARANTINE") && before.iter().any(|n| n == "links"), "the first run pinned: {before:?}");

    let rules = support::daemon::repo_root().join("rules");
    let mut args = run_args(&daemon.work, &daemon.pin_dir, &rules);
    args[1] = daemon.inventory_path.clone().into();
    args[3] = daemon.policies_dir.clone().into();
    args[7] = daemon.state_dir.clone().into();
    args.extend(["--record".into(), daemon.work.join("no-such-dir/record.jsonl").into()]);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let log = failed_start(&args);
    assert!(log.contains("no-such-dir"), "the error names what failed:\n{log}");
    assert_eq!(pinned(&daemon.pin_dir), before, "a failed restart changed what the previous run pinned:\n{log}");
    assert!(log.contains("kept the pins"), "the log says it kept them and why:\n{log}");
}

/// A pin directory that is not on a bpf file system is refused before anything is created in
/// it: a pin there would fail half-way (maps pinned, links not), or, with bpffs mounted
/// elsewhere, the old check passed and the first pin failed with a bare EPERM.
#[test]
fn a_pin_dir_not_on_bpffs_is_refused_before_anything_is_pinned() {
    if !require_kernel("a_pin_dir_not_on_bpffs_is_refused_before_anything_is_pinned") {
        return;
    }
    let dir = scratch("pin_dir_not_bpffs");
    let pin_dir = dir.join("pins");
    let rules = support::daemon::repo_root().join("rules");
    let args = run_args(&dir, &pin_dir, &rules);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let log = failed_start(&args);
    assert!(
        log.contains(&pin_dir.display().to_string()) && log.contains("not on a bpf file system"),
        "the error names the directory and what is wrong with it:\n{log}"
    );
    assert!(!pin_dir.exists(), "nothing was created for it");
    let _ = std::fs::remove_dir_all(&dir);
}
