//! Liveness that reflects a stuck stage, not only a stopped one (issue 15): the pipeline thread
//! of a running `palisade run` is frozen for real (ptrace-interrupted: the thread stops, the
//! rest of the process runs on) while events wait for it. `/healthz` must turn 503 naming the
//! stage, status must list it, a critical alert must say so; once the thread runs again all of
//! it clears by itself.
//!
//! Root only; without root it prints SKIP, and with PALISADE_REQUIRE_KERNEL=1 it fails.

mod support;

use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use palisade::api::client::{ApiClient, block_on};
use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions};
use support::{http_get, require_kernel};

const INVENTORY: &str = "endpoints:
  - {namespace: shop, name: web, ips: [198.18.44.1]}
";

/// Polls until `check` gives a value or 60 s passed (a bound for a loaded machine, not a timed
/// assertion); panics with `what` and the daemon log.
fn wait_for<T>(daemon: &DaemonGuard, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within 60 s; daemon log:\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The thread of `pid` whose name starts with `prefix` (thread names are cut at 15 bytes).
fn thread_named(pid: u32, prefix: &str) -> Option<Pid> {
    std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        let tid: i32 = task.file_name().to_str()?.parse().ok()?;
        comm.trim().starts_with(prefix).then(|| Pid::from_raw(tid))
    })
}

fn status(daemon: &DaemonGuard) -> Value {
    let client = ApiClient::new(&daemon.state_dir);
    block_on(client.get_json("/v1/status")).expect("runtime").expect("GET /v1/status")
}

fn stuck_stages(report: &Value) -> Vec<String> {
    report.as_array().into_iter().flatten().filter_map(|s| s["stage"].as_str().map(str::to_string)).collect()
}

#[test]
fn a_frozen_pipeline_makes_healthz_fail_and_recovers_when_it_moves() {
    if !require_kernel("a_frozen_pipeline_makes_healthz_fail_and_recovers_when_it_moves") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let daemon = DaemonGuard::start(
        DaemonOptions::new("liveness", INVENTORY).arg("--metrics-addr").arg(&format!("127.0.0.1:{port}")).arg("--stuck-after").arg("2"),
    );
    let (line, body) = wait_for(&daemon, "/healthz 200", || http_get(port, "/healthz").filter(|(l, _)| l.contains(" 200 ")));
    assert!(body.contains("\"status\""), "{line} {body}");

    // Freeze the pipeline thread (only it: the reader, the API and the monitors run on).
    let pid = daemon.pid().expect("daemon pid");
    let pipeline = thread_named(pid, "palisade-pipeli").expect("the pipeline thread");
    ptrace::seize(pipeline, ptrace::Options::empty()).expect("PTRACE_SEIZE the pipeline thread");
    ptrace::interrupt(pipeline).expect("PTRACE_INTERRUPT");
    waitpid(pipeline, Some(WaitPidFlag::__WALL)).expect("the pipeline thread stops");
    let frozen_at = Instant::now();

    // Events the reader decodes and queues, that nobody takes: execs in the pod.
    for _ in 0..5 {
        let out = daemon.exec_in("shop/web", &["/bin/true"]);
        assert!(out.status.success(), "exec in the pod: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (line, body) = wait_for(&daemon, "/healthz 503 for the stuck pipeline", || {
        http_get(port, "/healthz").filter(|(l, _)| l.contains(" 503 "))
    });
    let report: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{line}: {e}: {body}"));
    assert_eq!(report["status"], "unhealthy", "{report:#}");
    assert_eq!(stuck_stages(&report["readers"]["stuck"]), ["pipeline"], "{report:#}");
    assert!(report["readers"]["stuck"][0]["waiting"].as_u64().is_some_and(|n| n > 0), "{report:#}");
    println!("/healthz 503 {:.1} s after the freeze", frozen_at.elapsed().as_secs_f64());
    let events = &status(&daemon)["events"];
    assert_eq!(stuck_stages(&events["stuck"]), ["pipeline"], "{events:#}");
    let alert = wait_for(&daemon, "the stuck alert", || {
        daemon.alerts().into_iter().find(|a| a["kind"] == "daemon" && a["event"]["stuck"]["stage"] == "pipeline")
    });
    assert_eq!(alert["severity"], "critical", "{alert:#}");

    // The thread runs again: everything clears by itself.
    ptrace::detach(pipeline, None).expect("PTRACE_DETACH");
    wait_for(&daemon, "/healthz 200 again", || http_get(port, "/healthz").filter(|(l, _)| l.contains(" 200 ")));
    assert!(stuck_stages(&status(&daemon)["events"]["stuck"]).is_empty());
    wait_for(&daemon, "the recovery alert", || {
        daemon.alerts().into_iter().find(|a| a["kind"] == "daemon" && a["event"]["recovered"] == "pipeline")
    });
    let metrics = http_get(port, "/metrics").expect("GET /metrics").1;
    assert!(metrics.contains("palisade_stage_stuck{stage=\"pipeline\"} 0"), "{metrics}");
}
