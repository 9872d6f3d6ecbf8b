//! Probe harness for kernel tests: a throwaway cgroup, the real programs loaded and attached,
//! the ring buffer read by the real reader.
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade::events::decode::Event;
use palisade::events::kind::EventKind;
use palisade::events::reader::{self, ReaderStats};
use palisade::probes::host::ProbeHost;
use palisade::probes::loader::{self, LoadOptions};
use tokio::sync::mpsc;

pub const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

/// A cgroup2 directory for one test, removed (with its processes killed) on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl TestCgroup {
    pub fn new(name: &str) -> TestCgroup {
        let root = palisade::sys::cgroup2_mount().expect("cgroup2 mount");
        let path = root.join(format!("palisade-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let id = loader::cgroup_id(&path).expect("cgroup id");
        TestCgroup { path, id }
    }

    /// A command that joins this cgroup before exec.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let procs = self.path.join("cgroup.procs");
        // SAFETY: the closure only writes a file and runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        cmd
    }

    /// Runs `palisade workload ARGS...` in this cgroup and asserts it succeeded; returns its pid.
    pub fn workload(&self, args: &[&str]) -> u32 {
        let mut full = vec!["workload"];
        full.extend_from_slice(args);
        let mut child = self.command(PALISADE, &full).spawn().expect("spawn workload");
        let pid = child.id();
        let status = child.wait().expect("wait workload");
        assert!(status.success(), "workload {args:?} failed: {status}");
        pid
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), b"1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub struct Running {
    pub host: ProbeHost,
    pub events: mpsc::Receiver<Event>,
    pub stats: Arc<ReaderStats>,
}

/// Loads and attaches every program, monitors `cgroups`, enables `kinds`, starts the reader.
pub async fn start(kinds: Vec<EventKind>, cgroups: BTreeSet<u64>) -> Running {
    start_with(&LoadOptions::default(), kinds, cgroups).await
}

/// `start` with the given load options.
pub async fn start_with(options: &LoadOptions, kinds: Vec<EventKind>, cgroups: BTreeSet<u64>) -> Running {
    let mut probes = loader::load(options).expect("load the embedded eBPF object");
    probes.attach_all(options).expect("attach");
    let ring = probes.take_ring_buffer().expect("ring buffer");
    let host = ProbeHost::spawn(probes);
    host.set_monitored(cgroups).await.expect("monitor cgroups");
    host.set_enabled_kinds(kinds).await.expect("enable kinds");
    let (tx, events) = mpsc::channel(65536);
    let stats = Arc::new(ReaderStats::default());
    tokio::spawn(reader::run(ring, stats.clone(), tx));
    Running { host, events, stats }
}

/// Collects events until `done` says so or the deadline passes.
pub async fn collect_until(rx: &mut mpsc::Receiver<Event>, deadline: Duration, mut done: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(ev)) => {
                seen.push(ev);
                if done(&seen) {
                    break;
                }
            }
            Ok(None) => break,
            Err(_) => {
                if done(&seen) {
                    break;
                }
            }
        }
    }
    seen
}
