//! The `palisade lab` command line, end to end (root only; skips otherwise).

mod support;

use std::process::Command;

use support::{require_kernel, unique_lab_name};

fn palisade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|err| panic!("cannot run palisade {args:?}: {err}"))
}

#[test]
fn up_exec_probe_down_from_the_command_line() {
    if !require_kernel("lab_cli") {
        return;
    }
    let name = unique_lab_name("cli");
    let inventory = std::env::temp_dir().join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/webapp-inventory.yaml"))
        .expect("read the seed inventory")
        .replace("/palisade-lab/", &format!("/palisade-test/{name}/"));
    std::fs::write(&inventory, text).expect("write inventory");
    let inventory = inventory.to_str().expect("utf-8 temp path");

    let up = palisade(&["lab", "up", "--inventory", inventory, "--name", &name]);
    assert!(up.status.success(), "up: {}", String::from_utf8_lossy(&up.stderr));

    let exec = palisade(&["lab", "exec", "webapp/backend-1", "--lab", &name, "--", "sh", "-c", "cat /proc/self/cgroup; exit 5"]);
    assert_eq!(exec.status.code(), Some(5), "exec: {}", String::from_utf8_lossy(&exec.stderr));
    let stdout = String::from_utf8_lossy(&exec.stdout);
    assert!(stdout.contains(&format!("0::/palisade-test/{name}/webapp/backend-1")), "{stdout}");

    let probe = palisade(&["lab", "probe", "--lab", &name, "--port", "8080", "-o", "json"]);
    assert!(probe.status.success(), "probe: {}", String::from_utf8_lossy(&probe.stderr));
    let matrix: serde_json::Value = serde_json::from_slice(&probe.stdout).expect("probe prints JSON");
    assert_eq!(matrix["port"], 8080);
    assert_eq!(matrix["protocol"], "TCP");
    let results = matrix["results"].as_array().expect("results");
    assert_eq!(results.len(), 5 * 10);
    assert!(results.iter().all(|r| r["allowed"] == true), "{matrix}");
    assert!(results.iter().any(|r| r["from"] == "monitoring/prober" && r["to"] == "webapp/db-1"));

    let down = palisade(&["lab", "down", "--name", &name]);
    assert!(down.status.success(), "down: {}", String::from_utf8_lossy(&down.stderr));
    let exec = palisade(&["lab", "exec", "webapp/backend-1", "--lab", &name, "--", "true"]);
    assert!(!exec.status.success(), "exec into a lab that is down succeeded");
    let _ = std::fs::remove_file(inventory);
}
