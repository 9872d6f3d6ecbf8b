//! Issue 12, canonical paths: every way of naming /etc/shadow that is not "/etc/shadow" --
//! `cd /etc && cat shadow`, many `..`, a deep relative path, openat(dirfd of /etc, "shadow"),
//! /proc/self/root, a symlink, a bind mount of /etc (in a mount namespace of the pod's own) --
//! read for real by a process in a lab pod while `palisade run` watches, must raise
//! `credential_read` for that pod with the file the kernel opened, `/etc/shadow`, as the
//! event's path (the argument as passed stays in `path_arg`).
//!
//! Each variant runs in a pod of its own so "the right pod" is exact.
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, python3};
use support::require_kernel;

const NS: &str = "paths";

/// An inventory of one namespace with the given pods.
fn inventory(pods: &[&str]) -> String {
    let mut text = format!("namespaces:\n  - name: {NS}\n    labels: {{team: paths}}\nendpoints:\n");
    for (i, name) in pods.iter().enumerate() {
        text.push_str(&format!(
            "  - namespace: {NS}\n    name: {name}\n    labels: {{app: {name}}}\n    ips: [198.18.4.{}]\n",
            10 + i
        ));
    }
    text
}

struct Variant {
    pod: &'static str,
    how: &'static str,
    /// The command run in the pod (`{dir}` is a scratch directory of the test).
    args: Vec<String>,
}

fn variants(dir: &str, python: Option<&str>) -> Vec<Variant> {
    let sh = |pod, how, script: &str| Variant { pod, how, args: vec!["sh".into(), "-c".into(), script.replace("{dir}", dir)] };
    let mut list = vec![
        sh("cd-relative", "cd /etc && cat shadow", "cd /etc && cat shadow"),
        sh("dotdot", "cat /etc/../etc/../.../etc/shadow (8 levels)", &format!("cat {}shadow", "/etc/..".repeat(8) + "/etc/")),
        sh("deep-relative", "cd /usr/share/doc && cat ../../../../../../../etc/./shadow", "cd /usr/share/doc && cat ../../../../../../../etc/./shadow"),
        sh("proc-root", "cat /proc/self/root/etc/shadow", "cat /proc/self/root/etc/shadow"),
        sh("symlink", "cat a symlink to /etc/shadow", "cat {dir}/link"),
        sh("bind-mount", "unshare -m: mount --bind /etc DIR; cat DIR/shadow", "unshare -m sh -c 'mount --bind /etc {dir}/bind && cat {dir}/bind/shadow'"),
    ];
    if let Some(python) = python {
        list.push(Variant {
            pod: "dirfd",
            how: "openat(open(\"/etc\"), \"shadow\")",
            args: vec![
                python.into(),
                "-c".into(),
                "import os; d = os.open('/etc', os.O_RDONLY); os.read(os.open('shadow', os.O_RDONLY, dir_fd=d), 64)".into(),
            ],
        });
    }
    list
}

fn is_shadow_read(a: &Value, pod: &str) -> bool {
    a["kind"] == "rule"
        && a["rule"]["id"] == "credential_read"
        && a["pod"]["namespace"] == NS
        && a["pod"]["name"] == pod
        && a["event"]["open"]["path"] == "/etc/shadow"
}

#[test]
fn every_spelling_of_a_sensitive_path_alerts_with_its_canonical_path() {
    if !require_kernel("every_spelling_of_a_sensitive_path_alerts_with_its_canonical_path") {
        return;
    }
    let python = python3().map(|p| p.to_string_lossy().into_owned());
    let pods: Vec<&str> = variants("", python.as_deref()).iter().map(|v| v.pod).collect();
    let starting = Instant::now();
    let daemon = DaemonGuard::start(DaemonOptions::new("scnpaths", &inventory(&pods)).arg("--dry-run"));
    println!("daemon running after {:.1} s", starting.elapsed().as_secs_f64());
    let dir = daemon.scratch.join("paths");
    std::fs::create_dir_all(dir.join("bind")).expect("bind target");
    std::os::unix::fs::symlink("/etc/shadow", dir.join("link")).expect("symlink");
    let dir_text = dir.to_string_lossy().into_owned();
    let list = variants(&dir_text, python.as_deref());
    let mut notes = Vec::new();
    for v in &list {
        let args: Vec<&str> = v.args.iter().map(String::as_str).collect();
        let out = daemon.exec_in(&format!("{NS}/{}", v.pod), &args);
        notes.push(format!("exit {:?}, {} bytes out, stderr {:?}", out.status.code(), out.stdout.len(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut report = String::new();
    let mut missing = 0;
    for (v, note) in list.iter().zip(&notes) {
        let left = deadline.saturating_duration_since(Instant::now());
        let found = daemon.wait_for_alert(|a| is_shadow_read(a, v.pod), left);
        if found.is_none() {
            missing += 1;
        }
        let seen: Vec<String> = daemon
            .rule_alerts()
            .iter()
            .filter(|a| a["pod"]["name"] == v.pod && a["rule"]["id"] == "credential_read")
            .map(|a| format!("path {} path_arg {} resolved {}", a["event"]["open"]["path"], a["event"]["open"]["path_arg"], a["event"]["open"]["path_resolved"]))
            .collect();
        let status = if found.is_some() { "ok" } else { "MISSING" };
        report.push_str(&format!("{status:8} {:14} {:58} [{note}] credential_read alerts: {seen:?}\n", v.pod, v.how));
    }
    println!("{report}");
    assert_eq!(missing, 0, "variants without a credential_read alert naming /etc/shadow:\n{report}");
}
