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

/// One change to a file in a pod, the rule it must raise and the canonical path the alert's
/// event must name.
struct Change {
    pod: &'static str,
    how: &'static str,
    args: Vec<String>,
    rule: &'static str,
    /// The event field holding the path (`unlink.path`, ...), and the canonical path.
    field: (&'static str, &'static str),
    want: String,
}

/// Issue 12, canonical paths beyond opens: `cd ~ && rm .bash_history` (the working directory
/// is the kernel's, not the one the daemon last knew of), unlink through a directory fd, `mv`
/// of a file below /etc spelled through `/etc/../etc`, `chmod u+s` of a file reached through
/// a symlinked directory, and an exec of a program in /tmp through `/tmp/../tmp/./x` and by a
/// relative path after `cd`: each alerts with the path of the object the kernel changed or ran.
#[test]
fn changes_and_execs_alert_with_their_canonical_paths() {
    if !require_kernel("changes_and_execs_alert_with_their_canonical_paths") {
        return;
    }
    let python = python3().map(|p| p.to_string_lossy().into_owned());
    const PODS: [&str; 6] = ["rm-cd", "unlink-dirfd", "mv-dotdot", "chmod-symdir", "exec-dotdot", "exec-relative"];
    let inv = inventory(&PODS).replace("198.18.4.", "198.18.5.");
    let daemon = DaemonGuard::start(DaemonOptions::new("scnpathchg", &inv).arg("--dry-run"));
    // Canonical names of the scratch directories (the scratch may itself be below a symlink).
    let scratch = std::fs::canonicalize(&daemon.scratch).expect("scratch");
    let homes: Vec<std::path::PathBuf> = ["rm-cd", "unlink-dirfd"].iter().map(|pod| scratch.join(format!("home-{pod}"))).collect();
    for home in &homes {
        std::fs::create_dir_all(home).expect("home");
        std::fs::write(home.join(".bash_history"), "ls\n").expect("history");
    }
    let real = scratch.join("real");
    std::fs::create_dir_all(&real).expect("real dir");
    std::fs::write(real.join("file"), "#!/bin/sh\n").expect("file");
    std::os::unix::fs::symlink(&real, scratch.join("linkdir")).expect("symlinked dir");
    let etc_from = format!("/etc/palisade-{}-mv-a", daemon.lab_name);
    let etc_to = format!("/etc/palisade-{}-mv-b", daemon.lab_name);
    std::fs::write(&etc_from, "x\n").expect("file below /etc");
    let tmp = std::path::PathBuf::from(format!("/tmp/palisade-{}", daemon.lab_name));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let tmp = std::fs::canonicalize(&tmp).expect("tmp");
    std::fs::copy(support::daemon::system_program("true").expect("true"), tmp.join("x")).expect("payload");
    let tmp_name = tmp.file_name().expect("name").to_string_lossy().into_owned();

    let sh = |script: String| vec!["sh".to_string(), "-c".to_string(), script];
    let mut changes = vec![
        Change {
            pod: "rm-cd",
            how: "cd ~ && rm .bash_history",
            args: sh(format!("cd {} && rm .bash_history", homes[0].display())),
            rule: "shell_history_tampering",
            field: ("unlink", "path"),
            want: homes[0].join(".bash_history").display().to_string(),
        },
        Change {
            pod: "mv-dotdot",
            how: "mv /etc/../etc/F /etc/../etc/G",
            args: vec!["mv".into(), etc_from.replace("/etc/", "/etc/../etc/"), etc_to.replace("/etc/", "/etc/../etc/")],
            rule: "write_below_system_dir",
            field: ("rename", "old_path"),
            want: etc_from.clone(),
        },
        Change {
            pod: "chmod-symdir",
            how: "cd DIR/linkdir && chmod u+s file (linkdir -> DIR/real)",
            args: sh(format!("cd {}/linkdir && chmod u+s file", scratch.display())),
            rule: "setuid_bit",
            field: ("chmod", "path"),
            want: real.join("file").display().to_string(),
        },
        Change {
            pod: "exec-dotdot",
            how: "exec /tmp/../tmp/./DIR/x",
            args: vec![format!("/tmp/../tmp/./{tmp_name}/x")],
            rule: "exec_from_tmp",
            field: ("process", "exe"),
            want: tmp.join("x").display().to_string(),
        },
        Change {
            pod: "exec-relative",
            how: "cd /tmp/DIR && ./x",
            args: sh(format!("cd {} && ./x", tmp.display())),
            rule: "exec_from_tmp",
            field: ("process", "exe"),
            want: tmp.join("x").display().to_string(),
        },
    ];
    if let Some(python) = &python {
        changes.push(Change {
            pod: "unlink-dirfd",
            how: "unlinkat(open(~), \".bash_history\")",
            args: vec![python.clone(), "-c".into(), format!("import os; d = os.open({:?}, os.O_RDONLY); os.unlink('.bash_history', dir_fd=d)", homes[1].display().to_string())],
            rule: "shell_history_tampering",
            field: ("unlink", "path"),
            want: homes[1].join(".bash_history").display().to_string(),
        });
    }
    let mut notes = Vec::new();
    for c in &changes {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let out = daemon.exec_in(&format!("{NS}/{}", c.pod), &args);
        notes.push(format!("exit {:?}, stderr {:?}", out.status.code(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let _ = std::fs::remove_file(&etc_from);
    let _ = std::fs::remove_file(&etc_to);
    let _ = std::fs::remove_dir_all(&tmp);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut report = String::new();
    let mut missing = 0;
    for (c, note) in changes.iter().zip(&notes) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (object, field) = c.field;
        let is_it = |a: &Value| {
            a["kind"] == "rule" && a["rule"]["id"] == c.rule && a["pod"]["namespace"] == NS && a["pod"]["name"] == c.pod && a["event"][object][field] == c.want.as_str()
        };
        let found = daemon.wait_for_alert(is_it, left);
        if found.is_none() {
            missing += 1;
        }
        let seen: Vec<String> = daemon
            .rule_alerts()
            .iter()
            .filter(|a| a["pod"]["name"] == c.pod)
            .map(|a| format!("{} {}={} {}", a["rule"]["id"], field, a["event"][object][field], a["event"][object]))
            .collect();
        let status = if found.is_some() { "ok" } else { "MISSING" };
        report.push_str(&format!("{status:8} {:14} {:50} want {} [{note}] alerts: {seen:?}\n", c.pod, c.how, c.want));
    }
    println!("{report}");
    assert_eq!(missing, 0, "changes without an alert naming the canonical path:\n{report}");
}
