//! `palisade run` as a child process for scenario tests: its own lab, state directory, pin
//! directory and scratch space, so tests run in parallel; everything goes away on drop.
//!
//! ```ignore
//! let daemon = DaemonGuard::start(DaemonOptions::new("my_test", INVENTORY_YAML));
//! let out = daemon.exec_in("shop/web", &["cat", "/etc/shadow"]);
//! let alert = daemon.wait_for_alert(|a| a["rule"]["id"] == "credential_read", Duration::from_secs(10));
//! ```
//!
//! Inventory cgroup paths are rewritten to the lab's own cgroup root
//! (`palisade-lab/lab.<lab>/<namespace>/<pod>`), so two tests (or a test and an operator's lab)
//! never share a pod cgroup and `lab down` removes them all.
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `palisade` binary under test.
pub const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

/// A PATH for commands in pods: system directories only (no per-user shims).
pub const POD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// How to start the daemon.
pub struct DaemonOptions {
    /// Names the test (lab and directory names derive from it).
    pub test: String,
    /// Inventory YAML; cgroup paths are rewritten per lab.
    pub inventory: String,
    /// Rules directory (default: the repository's rules/).
    pub rules: PathBuf,
    /// Policy files copied into the watched policies directory: (file name, contents).
    pub policies: Vec<(String, String)>,
    /// Pass `--record <work>/record.jsonl`.
    pub record: bool,
    /// More arguments for `palisade run`.
    pub args: Vec<String>,
}

impl DaemonOptions {
    pub fn new(test: &str, inventory: &str) -> DaemonOptions {
        DaemonOptions {
            test: test.to_string(),
            inventory: inventory.to_string(),
            rules: repo_root().join("rules"),
            policies: Vec::new(),
            record: false,
            args: Vec::new(),
        }
    }

    pub fn policy(mut self, name: &str, text: &str) -> DaemonOptions {
        self.policies.push((name.to_string(), text.to_string()));
        self
    }

    pub fn arg(mut self, arg: &str) -> DaemonOptions {
        self.args.push(arg.to_string());
        self
    }

    pub fn record(mut self) -> DaemonOptions {
        self.record = true;
        self
    }
}

/// A running daemon with its lab. Dropping it stops the daemon (SIGINT, then SIGKILL), brings
/// the lab down and removes the pin, state and scratch directories (kept when the test failed,
/// so the daemon log can be read).
pub struct DaemonGuard {
    pub test: String,
    pub lab_name: String,
    /// Everything of this daemon that lives on disk: inventory/, policies/, state/, scratch/.
    pub work: PathBuf,
    pub state_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub inventory_path: PathBuf,
    /// Directory for files the test makes (not below /tmp, so executing them is not
    /// "exec from /tmp"); world-traversable.
    pub scratch: PathBuf,
    pub record_path: Option<PathBuf>,
    pub log_path: PathBuf,
    /// Keep `work` (the daemon's log included) when dropped, as after a panic: set by a caller
    /// that reports a failure without panicking (the soak bench).
    pub keep_work: bool,
    /// `palisade run`'s arguments (kept for [`DaemonGuard::restart`]).
    command_line: Vec<std::ffi::OsString>,
    child: Option<Child>,
    lab: Option<palisade::lab::Lab>,
}

/// How long `palisade run` may take to say it is running.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl DaemonGuard {
    /// Starts the daemon and waits until it is running (lab up, programs attached, datapath
    /// synced). Panics with the daemon's log when it does not get there.
    pub fn start(options: DaemonOptions) -> DaemonGuard {
        let lab_name = super::unique_lab_name(&options.test);
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scenarios").join(&lab_name);
        let _ = std::fs::remove_dir_all(&work);
        let state_dir = work.join("state");
        let policies_dir = work.join("policies");
        let inventory_dir = work.join("inventory");
        let scratch = work.join("scratch");
        for dir in [&state_dir, &policies_dir, &inventory_dir, &scratch, &work.join("staging")] {
            std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        make_traversable(&scratch);
        let inventory_path = inventory_dir.join("inventory.yaml");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/palisade-test-{lab_name}"));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let log_path = work.join("daemon.log");
        let record_path = options.record.then(|| work.join("record.jsonl"));

        let mut guard = DaemonGuard {
            test: options.test.clone(),
            lab_name,
            work,
            state_dir,
            pin_dir,
            policies_dir,
            inventory_path,
            scratch,
            record_path,
            log_path,
            keep_work: false,
            command_line: Vec::new(),
            child: None,
            lab: None,
        };
        std::fs::write(&guard.inventory_path, guard.rewrite_inventory(&options.inventory)).expect("write inventory");
        for (name, text) in &options.policies {
            std::fs::write(guard.policies_dir.join(name), text).expect("write policy");
        }

        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut arg = |a: &dyn AsRef<std::ffi::OsStr>| args.push(a.as_ref().to_os_string());
        arg(&"run");
        arg(&"--inventory");
        arg(&guard.inventory_path);
        arg(&"--rules");
        arg(&options.rules);
        arg(&"--policies");
        arg(&guard.policies_dir);
        arg(&"--state-dir");
        arg(&guard.state_dir);
        arg(&"--pin-dir");
        arg(&guard.pin_dir);
        arg(&"--lab");
        arg(&"--lab-name");
        arg(&guard.lab_name);
        // Parallel daemons must not fight over the metrics port: off unless the test gives one.
        if !options.args.iter().any(|a| a == "--metrics-addr") {
            arg(&"--no-metrics");
        }
        // Every occurrence its own alert line (unless the test sets a window): scenario checks
        // look for one particular event, which a burst follow-up would only count.
        if !options.args.iter().any(|a| a == "--alerts-aggregate-window") {
            arg(&"--alerts-aggregate-window");
            arg(&"0");
        }
        for extra in &options.args {
            arg(extra);
        }
        if let Some(record) = &guard.record_path {
            arg(&"--record");
            arg(record);
        }
        guard.command_line = args;
        guard.spawn_and_wait_running(0);
        let lab = palisade::lab::Lab::open(&guard.lab_name, Path::new(palisade::lab::DEFAULT_STATE_DIR))
            .unwrap_or_else(|e| panic!("{}: opening lab {}: {e}", guard.test, guard.lab_name));
        guard.lab = Some(lab);
        guard
    }

    /// Starts `palisade run` with the guard's command line (its log appended to), then waits
    /// until the log says "palisade is running" more than `running_before` times.
    fn spawn_and_wait_running(&mut self, running_before: usize) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log_path).expect("daemon log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(self.work.join("daemon.out")).expect("daemon stdout");
        let mut command = Command::new(PALISADE);
        command
            .args(&self.command_line)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            // Its own process group: a Ctrl-C in the terminal running the tests reaches the
            // test, which then stops the daemon itself.
            .process_group(0);
        let child = command.spawn().unwrap_or_else(|e| panic!("{}: starting {PALISADE} run: {e}", self.test));
        self.child = Some(child);

        // Start-up is mostly the eBPF verifier, which a loaded 2-vCPU machine slows 3-5 times:
        // 90 s was seen to fall short at load 13 (the soak's first start, a build alongside).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.log().matches("palisade is running").count() > running_before {
                break;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("{}: palisade run exited ({status}) before it was running:\n{}", self.test, self.log());
            }
            if Instant::now() > deadline {
                panic!("{}: palisade run not running after {START_TIMEOUT:?}:\n{}", self.test, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the daemon (no clean-up of its own runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again (after [`kill`] or [`stop`]) with the same directories, lab and
    /// arguments, and waits until it is running.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{}: restart while the daemon runs", self.test);
        let running_before = self.log().matches("palisade is running").count();
        self.spawn_and_wait_running(running_before);
        self.refresh_lab();
    }

    /// Re-reads the lab's state file (after pods were added or removed).
    pub fn refresh_lab(&mut self) {
        let lab = palisade::lab::Lab::open(&self.lab_name, Path::new(palisade::lab::DEFAULT_STATE_DIR))
            .unwrap_or_else(|e| panic!("{}: opening lab {}: {e}", self.test, self.lab_name));
        self.lab = Some(lab);
    }

    /// The inventory text with each endpoint's cgroup made unique to this lab.
    pub fn rewrite_inventory(&self, text: &str) -> String {
        let mut doc: serde_norway::Value = serde_norway::from_str(text).expect("inventory YAML");
        if let Some(endpoints) = doc.get_mut("endpoints").and_then(|e| e.as_sequence_mut()) {
            for ep in endpoints {
                let ns = ep.get("namespace").and_then(|v| v.as_str()).unwrap_or("default").to_string();
                let name = ep.get("name").and_then(|v| v.as_str()).unwrap_or("pod").to_string();
                if let Some(map) = ep.as_mapping_mut() {
                    let cgroup = palisade::lab::naming::default_pod_cgroup(&self.lab_name, &ns, &name);
                    map.insert("cgroup".into(), cgroup.into());
                }
            }
        }
        serde_norway::to_string(&doc).expect("inventory YAML")
    }

    /// The lab (pods, probe).
    pub fn lab(&self) -> &palisade::lab::Lab {
        self.lab.as_ref().expect("lab")
    }

    /// A command running `program` inside pod `NS/NAME` (its netns and cgroup), with a clean
    /// environment: PATH of system directories and HOME in the scratch directory.
    pub fn command_in(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = self.lab().exec(pod, program).unwrap_or_else(|e| panic!("{}: exec in {pod}: {e}", self.test));
        let home = self.scratch.join("home");
        let _ = std::fs::create_dir_all(&home);
        command
            .env_clear()
            .env("PATH", POD_PATH)
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .current_dir(&self.scratch)
            .stdin(Stdio::null());
        command
    }

    /// Runs `args` in `pod` and returns its output (killed after 30 s).
    pub fn exec_in(&self, pod: &str, args: &[&str]) -> Output {
        let mut command = self.command_in(pod, args[0]);
        command.args(&args[1..]);
        run_with_timeout(command, Duration::from_secs(30))
    }

    /// `palisade status -o json` of this daemon (panics when it fails or does not answer in 20 s).
    pub fn status(&self) -> Value {
        let mut command = Command::new(PALISADE);
        command.args(["status", "-o", "json", "--state-dir"]).arg(&self.state_dir);
        let out = run_with_timeout(command, Duration::from_secs(20));
        assert!(out.status.success(), "{}: palisade status: {}", self.test, String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: status JSON: {e}", self.test))
    }

    /// The pods `palisade quarantine list` shows as enforced (not pending), as `ns/name`, with
    /// the whole list for messages.
    pub fn enforced_quarantines(&self) -> (std::collections::BTreeSet<String>, Value) {
        let mut command = Command::new(PALISADE);
        command.args(["quarantine", "list", "-o", "json", "--state-dir"]).arg(&self.state_dir);
        let out = run_with_timeout(command, Duration::from_secs(20));
        assert!(out.status.success(), "{}: palisade quarantine list: {}", self.test, String::from_utf8_lossy(&out.stderr));
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: quarantine list JSON: {e}", self.test));
        let enforced = listed
            .as_array()
            .unwrap_or_else(|| panic!("{}: quarantine list is not an array: {listed}", self.test))
            .iter()
            .filter(|e| e["pending"] == false)
            .map(|e| format!("{}/{}", e["namespace"].as_str().unwrap_or(""), e["name"].as_str().unwrap_or("")))
            .collect();
        (enforced, listed)
    }

    /// Every alert written so far (a torn last line is skipped).
    pub fn alerts(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.state_dir.join("alerts.jsonl")).unwrap_or_default();
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }

    /// Rule alerts (kind `rule`).
    pub fn rule_alerts(&self) -> Vec<Value> {
        self.alerts().into_iter().filter(|a| a["kind"] == "rule").collect()
    }

    /// Waits until an alert satisfies `predicate`; None after `timeout`.
    pub fn wait_for_alert(&self, predicate: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.alerts().into_iter().find(|a| predicate(a)) {
                return Some(found);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// How many times the daemon has logged "datapath synced".
    pub fn sync_count(&self) -> usize {
        self.log().matches("datapath synced").count()
    }

    /// Waits for a datapath sync after `before` (a [`sync_count`] taken before the change), then
    /// until no further sync has happened for `quiet`, so the last of a burst of changes is in.
    pub fn wait_synced(&self, before: usize, quiet: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.sync_count() <= before {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut last = self.sync_count();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.sync_count();
            if now != last {
                last = now;
                since = Instant::now();
            }
            if Instant::now() > deadline {
                break;
            }
        }
        true
    }

    /// Replaces the policies directory's contents with `files` (name, text) atomically per file
    /// (written beside, renamed in); files not named are removed.
    pub fn set_policies(&self, files: &[(&str, &str)]) {
        let keep: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        for entry in std::fs::read_dir(&self.policies_dir).expect("policies dir").flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !keep.contains(&name.as_str()) {
                std::fs::remove_file(entry.path()).expect("remove policy");
            }
        }
        for (name, text) in files {
            self.replace_file(&self.policies_dir.join(name), text);
        }
    }

    /// Replaces the inventory (cgroups rewritten) atomically.
    pub fn set_inventory(&self, text: &str) {
        let text = self.rewrite_inventory(text);
        self.replace_file(&self.inventory_path, &text);
    }

    fn replace_file(&self, path: &Path, text: &str) {
        let staged = self.work.join("staging").join(path.file_name().expect("file name"));
        let mut file = std::fs::File::create(&staged).expect("stage file");
        file.write_all(text.as_bytes()).expect("write staged file");
        file.sync_all().ok();
        std::fs::rename(&staged, path).unwrap_or_else(|e| panic!("rename into {}: {e}", path.display()));
    }

    /// The daemon's process id (None once stopped or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the daemon now (SIGINT, SIGKILL after 10 s); returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        self.stop_with(libc::SIGINT).is_some()
    }

    /// Sends `signal` to the daemon and waits up to 10 s for it to exit (then SIGKILL): its exit
    /// status and how long it took, or None when it had to be killed (or was not running).
    pub fn stop_with(&mut self, signal: i32) -> Option<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let sent = Instant::now();
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = sent + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, sent.elapsed())),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let clean_exit = self.stop();
        if !clean_exit {
            eprintln!("{}: palisade run did not stop on SIGINT within 10 s; killed", self.test);
        }
        if let Err(err) = palisade::lab::down(&self.lab_name, Path::new(palisade::lab::DEFAULT_STATE_DIR)) {
            eprintln!("{}: lab down {}: {err}", self.test, self.lab_name);
        }
        if let Err(err) = std::fs::remove_dir_all(&self.pin_dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                eprintln!("{}: removing {}: {err}", self.test, self.pin_dir.display());
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "{}: daemon work directory kept at {}; last log lines:\n{}",
                self.test,
                self.work.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        } else if self.keep_work {
            eprintln!("{}: daemon work directory kept at {}", self.test, self.work.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// Runs `command` and collects its output; kills its process group after `timeout` (so a
/// child hanging on a cut-off connection cannot hang the test).
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let child = command.spawn().unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => result.unwrap_or_else(|e| panic!("waiting for {command:?}: {e}")),
        Err(_) => {
            // SAFETY: the group we created for this child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let mut out = rx.recv().expect("output after kill").expect("output after kill");
            out.stderr.extend_from_slice(format!("\n[killed after {timeout:?}]").as_bytes());
            out
        }
    }
}

/// Spawns `command` in its own process group with output to `log`; [`ChildGuard`] kills the
/// group when dropped.
pub fn spawn_logged(mut command: Command, log: &Path) -> ChildGuard {
    let out = std::fs::File::create(log).expect("child log");
    let err = out.try_clone().expect("child log");
    command.stdout(out).stderr(err).process_group(0);
    let child = command.spawn().unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    ChildGuard { child, log: log.to_path_buf() }
}

/// A background process (a server in a pod); its process group is killed on drop.
pub struct ChildGuard {
    pub child: Child,
    pub log: PathBuf,
}

impl ChildGuard {
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for the process to exit by itself; kills the group otherwise.
    pub fn finish(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.output()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: the process group we created for this child.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// A directory and its parents up to the target directory made traversable (0755), so
/// processes that dropped to an unprivileged uid reach files in it.
fn make_traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut current = Some(dir);
    while let Some(d) = current {
        if !d.starts_with(env!("CARGO_TARGET_TMPDIR")) {
            break;
        }
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        current = d.parent();
    }
}

/// The Python 3 interpreter (a real binary, not a version-manager shim), if there is one.
pub fn python3() -> Option<PathBuf> {
    for candidate in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(candidate).is_file() {
            return Some(PathBuf::from(candidate));
        }
    }
    let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// A program found in the system directories of [`POD_PATH`].
pub fn system_program(name: &str) -> Option<PathBuf> {
    POD_PATH.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
