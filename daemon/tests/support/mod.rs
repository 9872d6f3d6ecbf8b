//! Helpers shared by kernel tests (`mod support;` in a test file).
//!
//! Kernel tests need root, a cgroup2 mount and iproute2. Without them they print `SKIP: <why>`
//! and pass, except when `PALISADE_REQUIRE_KERNEL=1` (CI), where a missing prerequisite fails.
#![allow(dead_code)]

pub mod bench;
pub mod daemon;
pub mod files;
pub mod kube_standin;
pub mod netpol;
pub mod probes;
pub mod rule_pack;
pub mod soak;
pub mod tls;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use palisade::inventory::Inventory;
use palisade::lab::{Lab, LabGuard, LabOptions};

/// Whether kernel tests can run here. `test` names the caller in the skip message.
pub fn require_kernel(test: &str) -> bool {
    match missing_kernel_prerequisite() {
        None => true,
        Some(reason) => {
            if std::env::var("PALISADE_REQUIRE_KERNEL").as_deref() == Ok("1") {
                panic!("{test}: PALISADE_REQUIRE_KERNEL=1 but {reason}");
            }
            eprintln!("SKIP: {test}: {reason}");
            false
        }
    }
}

fn missing_kernel_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if let Err(err) = palisade::lab::cgroup2_mount() {
        return Some(format!("no cgroup2: {err}"));
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`ip -V` failed: {}", out.status)),
        Err(err) => Some(format!("iproute2 `ip` not runnable: {err}")),
    }
}

/// A lab name unique to this test and process (lab names are at most 32 characters).
pub fn unique_lab_name(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let short: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .filter(|c| *c != '-')
        .take(12)
        .collect();
    format!("t{short}-{:x}-{n}", std::process::id())
}

/// A lab brought up from an inventory text for one test and brought down when dropped.
/// `{lab}` in the text is replaced by the lab name, so cgroup paths do not collide between
/// tests running in parallel.
pub struct TestLab {
    pub name: String,
    pub inventory: Inventory,
    pub guard: LabGuard,
}

impl TestLab {
    pub fn up(test: &str, inventory_yaml: &str) -> TestLab {
        let name = unique_lab_name(test);
        let text = inventory_yaml.replace("{lab}", &name);
        let inventory = Inventory::parse(&text, &PathBuf::from(format!("{test}.yaml")))
            .unwrap_or_else(|err| panic!("{test}: test inventory is invalid: {err}"));
        let lab = Lab::up(&inventory, &LabOptions::named(&name))
            .unwrap_or_else(|err| panic!("{test}: lab up {name}: {err}"));
        TestLab { name, inventory, guard: lab.into_guard() }
    }
}

impl std::ops::Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.guard
    }
}

/// `GET path` on 127.0.0.1:port: (status line, body), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), std::time::Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}
