//! Conntrack accounting where an operator sees it: `palisade run` in the lab, one pod opening
//! more flows than its conntrack quota with real packets; `palisade status` names the pod, its
//! entries and refused flows, and the refusals raise `policy_denied` alerts with the reason
//! `conntrack_full`. (The datapath's behaviour itself: segmentation_datapath.rs.)
mod support;

use std::time::{Duration, Instant};

use palisade_common::CT_DEFAULT_PER_ENDPOINT_MAX;
use support::daemon::{DaemonGuard, DaemonOptions, python3, repo_root};
use support::require_kernel;

const FLOOD: &str = r#"
import socket, sys
n = int(sys.argv[1]); sent = 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    try:
        s.sendto(b"x", ("198.19.200.%d" % (1 + i // 50000), 1 + i % 50000)); sent += 1
    except OSError:
        pass
print(sent)
"#;

#[test]
fn conntrack_use_and_refusals_per_pod_show_in_status_and_alerts() {
    if !require_kernel("conntrack_use_and_refusals_per_pod_show_in_status_and_alerts") {
        return;
    }
    let Some(python) = python3() else {
        panic!("python3 is needed in the lab pods");
    };
    let read = |p: &str| std::fs::read_to_string(repo_root().join(p)).expect(p);
    let daemon = DaemonGuard::start(
        DaemonOptions::new("ctdaemon", &read("policies/webapp-inventory.yaml"))
            .policy("webapp-netpol.yaml", &read("policies/webapp-netpol.yaml")),
    );
    // db-1's flows go to its loopback from its own address: each passes its egress hook.
    let route = daemon.exec_in("webapp/db-1", &["ip", "route", "add", "198.19.200.0/24", "dev", "lo", "src", "198.18.3.31"]);
    assert!(route.status.success(), "route: {}", String::from_utf8_lossy(&route.stderr));
    let flows = CT_DEFAULT_PER_ENDPOINT_MAX + 2_000;
    let script = daemon.scratch.join("flood.py");
    std::fs::write(&script, FLOOD).expect("flood script");
    let python = python.to_string_lossy().into_owned();
    let script = script.to_string_lossy().into_owned();
    let out = daemon.exec_in("webapp/db-1", &[python.as_str(), script.as_str(), &flows.to_string()]);
    assert!(out.status.success(), "flood: {}", String::from_utf8_lossy(&out.stderr));
    let sent: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("flood count");
    assert_eq!(sent, CT_DEFAULT_PER_ENDPOINT_MAX, "flows past the quota are refused (EPERM at the sender)");

    // The sweeper publishes the counts every 5 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let db = loop {
        let s = daemon.status();
        let pods = s["conntrack"]["pods"].as_array().cloned().unwrap_or_default();
        if let Some(db) = pods.into_iter().find(|p| p["pod"] == "webapp/db-1") {
            break db;
        }
        assert!(Instant::now() < deadline, "no conntrack counts for webapp/db-1 in status: {}", s["conntrack"]);
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("status conntrack webapp/db-1: {db}");
    assert_eq!(db["entries"], u64::from(CT_DEFAULT_PER_ENDPOINT_MAX), "{db}");
    assert_eq!(db["quota_drops"], 2_000u64, "{db}");
    let s = daemon.status();
    assert_eq!(s["conntrack"]["established_flows"], "strict", "the default mode: {}", s["conntrack"]);
    assert_eq!(s["conntrack"]["per_pod_quota"], u64::from(CT_DEFAULT_PER_ENDPOINT_MAX));

    let alert = daemon.wait_for_alert(
        |a| a["kind"] == "policy_denied" && a["event"]["reason"] == "conntrack_full" && a["pod"]["name"] == "db-1",
        Duration::from_secs(10),
    );
    assert!(alert.is_some(), "a policy_denied alert with reason conntrack_full for db-1");
}
