//! The API over a real Unix socket: follow (library client and the `palisade` CLI), status,
//! quarantine endpoints, and the socket's permissions (a non-root user cannot connect; a peer
//! that somehow reaches it is refused by its credentials).
use std::io::{BufRead as _, BufReader};
use std::ops::ControlFlow;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::alerts::schema::{Alert, AlertKind};
use palisade::alerts::{AlertLog, AlertLogConfig, AlertSink};
use palisade::api::client::ApiClient;
use palisade::api::{
    AddOutcome, ApiState, BoxFuture, CancelOutcome, OperatorRequest, QuarantineApi, QuarantineApiError, QuarantineEntry, ReleaseOutcome,
    SOCKET_NAME,
    status_provider,
};
use palisade::rules::model::Severity;
use serde_json::{Value, json};

struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("palisade-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A daemon stand-in: the alert writer and the API on `<dir>/state/palisade.sock`.
async fn start(dir: &Path, quarantine: Option<Arc<dyn QuarantineApi>>) -> (AlertLog, AlertSink, PathBuf, tokio::task::JoinHandle<()>) {
    let state_dir = dir.join("state");
    let mut config = AlertLogConfig::new(&state_dir, "node-test");
    config.aggregate_window = Duration::ZERO;
    let (log, sink) = AlertLog::start(config).unwrap();
    let mut state = ApiState::new(sink.clone()).with_status(status_provider(|| async {
        json!({"node": "node-test", "rules": {"version": "v1", "rules": 14}})
    }));
    if let Some(q) = quarantine {
        state = state.with_quarantine(q);
    }
    let socket = state_dir.join(SOCKET_NAME);
    let listener = palisade::api::bind(&socket).unwrap();
    let server = tokio::spawn(async move {
        let _ = palisade::api::serve_on(listener, state).await;
    });
    (log, sink, state_dir, server)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_shows_an_alert_raised_while_following() {
    let tmp = TempDir::new("api-follow");
    let (log, sink, state_dir, server) = start(&tmp.0, None).await;
    sink.emit(Alert::new(AlertKind::Daemon, Severity::Info, "before")).await.unwrap();
    wait_for("the first alert to be written", || sink.stats().written == 1).await;

    let client = ApiClient::new(&state_dir);
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let follower = {
        let seen = seen.clone();
        tokio::spawn(async move {
            client
                .stream_lines("/v1/alerts/follow?since=1h&severity=info", |line| {
                    let v: Value = serde_json::from_slice(line).unwrap();
                    seen.lock().unwrap().push(v["message"].as_str().unwrap_or("?").to_string());
                    ControlFlow::Continue(())
                })
                .await
        })
    };
    wait_for("the follower to subscribe", || sink.stats().followers >= 1).await;
    wait_for("history", || seen.lock().unwrap().len() == 1).await;
    sink.emit(Alert::new(AlertKind::Rule, Severity::High, "during")).await.unwrap();
    sink.emit(Alert::new(AlertKind::Rule, Severity::Low, "filtered out?").with_rule("r", "r")).await.unwrap();
    wait_for("the live alert", || seen.lock().unwrap().len() >= 3).await;
    assert_eq!(*seen.lock().unwrap(), ["before", "during", "filtered out?"], "history once, then live, in order");
    follower.abort();
    // A follower that goes away is unsubscribed (the server notices the closed stream).
    wait_for("the first follower to be gone", || sink.stats().followers == 0).await;

    // The CLI follows the same way, over the same socket.
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["alerts", "--follow", "-o", "json", "--rule", "wanted", "--state-dir"])
        .arg(&state_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the CLI to subscribe", || sink.stats().followers == 1).await;
    sink.emit(Alert::new(AlertKind::Rule, Severity::High, "not this one").with_rule("other", "o")).await.unwrap();
    sink.emit(Alert::new(AlertKind::Rule, Severity::High, "raised while following").with_rule("wanted", "w")).await.unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line).await.expect("the CLI printed the alert").unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let alert: Alert = serde_json::from_str(&line).unwrap();
    assert_eq!(alert.message, "raised while following");

    // And the plain query.
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["alerts", "-o", "json", "--kind", "rule", "--state-dir"])
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);

    server.abort();
    log.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_quarantine_endpoints() {
    let tmp = TempDir::new("api-status");
    let (log, _sink, state_dir, server) = start(&tmp.0, None).await;
    let client = ApiClient::new(&state_dir);
    let status = client.get_json("/v1/status").await.unwrap();
    assert_eq!(status["node"], "node-test");
    assert_eq!(status["alerts"]["running"], true, "writer health is added: {status}");

    let out = Command::new(env!("CARGO_BIN_EXE_palisade")).args(["status", "--state-dir"]).arg(&state_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("RULES") && text.contains("ALERTS") && text.contains("node-test"), "{text}");

    let err = client.get_json("/v1/quarantines").await.unwrap_err();
    assert!(err.to_string().contains("not enabled"), "{err}");
    let err = client.get_json("/v1/nope").await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    server.abort();
    log.shutdown().await;

    struct Fake(Mutex<Vec<OperatorRequest>>, Mutex<Vec<OperatorRequest>>, Mutex<Vec<OperatorRequest>>);
    impl QuarantineApi for Fake {
        fn list(&self) -> BoxFuture<'_, Result<Vec<QuarantineEntry>, QuarantineApiError>> {
            Box::pin(async {
                Ok(vec![QuarantineEntry {
                    namespace: "shop".into(),
                    name: "web-1".into(),
                    since: "2026-11-29T12:00:00.000000Z".into(),
                    rule: Some("reverse_shell".into()),
                    reason: "reverse shell".into(),
                    alert_id: Some("a-1".into()),
                    dry_run: false,
                    pending: false,
                    extra: [("cgroup_id".to_string(), json!(42))].into(),
                }, QuarantineEntry {
                    namespace: "shop".into(),
                    name: "web-2".into(),
                    since: "2026-11-29T12:00:01.000000Z".into(),
                    rule: Some("reverse_shell".into()),
                    reason: "reverse shell".into(),
                    alert_id: Some("a-2".into()),
                    dry_run: false,
                    pending: true,
                    extra: Default::default(),
                }])
            })
        }
        fn release(&self, request: OperatorRequest) -> BoxFuture<'_, Result<ReleaseOutcome, QuarantineApiError>> {
            Box::pin(async move {
                if request.name != "web-1" {
                    return Err(QuarantineApiError::NotQuarantined(format!("{}/{}", request.namespace, request.name)));
                }
                self.0.lock().unwrap().push(request);
                Ok(ReleaseOutcome { released: true, message: "released shop/web-1".into(), alert_id: None })
            })
        }
        fn add(&self, request: OperatorRequest) -> BoxFuture<'_, Result<AddOutcome, QuarantineApiError>> {
            Box::pin(async move {
                if request.name == "web-1" {
                    return Err(QuarantineApiError::Refused("shop/web-1 is already quarantined".into()));
                }
                self.2.lock().unwrap().push(request);
                Ok(AddOutcome { quarantined: true, message: "shop/web-3 quarantined".into(), alert_id: Some("a-3".into()) })
            })
        }
        fn cancel(&self, request: OperatorRequest) -> BoxFuture<'_, Result<CancelOutcome, QuarantineApiError>> {
            Box::pin(async move {
                if request.name != "web-2" {
                    return Err(QuarantineApiError::NotPending(format!("{}/{}", request.namespace, request.name)));
                }
                self.1.lock().unwrap().push(request);
                Ok(CancelOutcome { cancelled: true, message: "queued quarantine of shop/web-2 cancelled".into(), alert_id: None })
            })
        }
    }
    let tmp = TempDir::new("api-quarantine");
    let fake = Arc::new(Fake(Mutex::new(Vec::new()), Mutex::new(Vec::new()), Mutex::new(Vec::new())));
    let (log, _sink, state_dir, server) = start(&tmp.0, Some(fake.clone())).await;
    let bin = env!("CARGO_BIN_EXE_palisade");
    let out = Command::new(bin).args(["quarantine", "list", "--state-dir"]).arg(&state_dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("shop/web-1") && text.contains("reverse_shell"), "{text}");
    let pending_line = text.lines().find(|l| l.contains("shop/web-2")).unwrap_or_default();
    assert!(pending_line.contains("pending"), "a queued quarantine is listed as pending: {text}");
    let out = Command::new(bin)
        .args(["quarantine", "release", "shop/web-1", "--reason", "false positive: CI job", "--state-dir"])
        .arg(&state_dir)
        .env("SUDO_USER", "alice")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let requests = fake.0.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].reason, "false positive: CI job");
    assert!(requests[0].by.starts_with("alice (uid "), "{}", requests[0].by);
    let out = Command::new(bin)
        .args(["quarantine", "release", "shop/other", "--reason", "x", "--state-dir"])
        .arg(&state_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not quarantined"));
    let out = Command::new(bin)
        .args(["quarantine", "cancel", "shop/web-2", "--reason", "known deploy job", "--state-dir"])
        .arg(&state_dir)
        .env("SUDO_USER", "bob")
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("cancelled"), "{out:?}");
    let cancels = fake.1.lock().unwrap().clone();
    assert!(cancels.len() == 1 && cancels[0].by.starts_with("bob (uid 0 pid ") && cancels[0].reason == "known deploy job", "{cancels:?}");
    let out = Command::new(bin).args(["quarantine", "cancel", "shop/web-1", "--reason", "x", "--state-dir"]).arg(&state_dir).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no queued quarantine"), "{out:?}");
    let out = Command::new(bin)
        .args(["quarantine", "add", "shop/web-3", "--reason", "seen exfiltrating", "--state-dir"])
        .arg(&state_dir)
        .env("SUDO_USER", "carol")
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("quarantined"), "{out:?}");
    let adds = fake.2.lock().unwrap().clone();
    assert!(adds.len() == 1 && adds[0].by.starts_with("carol (uid 0 pid ") && adds[0].reason == "seen exfiltrating", "{adds:?}");
    let out = Command::new(bin).args(["quarantine", "add", "shop/web-1", "--reason", "x", "--state-dir"]).arg(&state_dir).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already quarantined"), "{out:?}");
    let out = Command::new(bin).args(["quarantine", "add", "shop/web-3", "--reason", " ", "--state-dir"]).arg(&state_dir).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--reason"), "{out:?}");
    // `resume` is retired: it says why and asks the daemon nothing; the route answers 410.
    let out = Command::new(bin).args(["quarantine", "resume", "--state-dir"]).arg(&state_dir).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stderr).contains("queued"), "{out:?}");
    let err = ApiClient::new(&state_dir).post_json("/v1/quarantines/resume", &json!({})).await.unwrap_err();
    assert!(err.to_string().contains("410") && err.to_string().contains("pending"), "{err}");
    server.abort();
    log.shutdown().await;
}

/// Connects to `socket` as uid/gid 65534 in a forked child, sends a request, and returns
/// Err(errno) if connect failed or Ok(first bytes of the answer).
fn connect_as_nobody(socket: &Path) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStrExt as _;
    // Everything the child needs is prepared before fork: after it, only async-signal-safe calls.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path = socket.as_os_str().as_bytes();
    assert!(path.len() < addr.sun_path.len());
    for (dst, src) in addr.sun_path.iter_mut().zip(path) {
        *dst = *src as libc::c_char;
    }
    let request = b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            let out = fds[1];
            let report = |tag: u8, code: i32| {
                let msg = [tag, (code & 0xff) as u8];
                libc::write(out, msg.as_ptr().cast(), 2);
            };
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                report(b'S', *libc::__errno_location());
                libc::_exit(1);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                report(b'E', *libc::__errno_location());
                libc::_exit(0);
            }
            report(b'C', 0);
            libc::write(fd, request.as_ptr().cast(), request.len());
            let mut buf = [0u8; 64];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n > 0 {
                libc::write(out, buf.as_ptr().cast(), n as usize);
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end; reading from the read end we own.
    unsafe { libc::close(fds[1]) };
    let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut answer).unwrap();
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match answer.first() {
        Some(b'E') => Err(i32::from(answer[1])),
        Some(b'C') => Ok(answer[2..].to_vec()),
        Some(b'S') => panic!("child could not drop privileges: errno {}", answer[1]),
        _ => panic!("child said nothing (status {status})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_root_only() {
    if !is_root() {
        eprintln!("SKIP: socket_is_root_only: needs root to switch to uid 65534");
        return;
    }
    let tmp = TempDir::new("api-perms");
    // The temp dir itself must be traversable for the unprivileged child to reach the state dir.
    std::fs::set_permissions(&tmp.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (log, _sink, state_dir, server) = start(&tmp.0, None).await;
    let socket = state_dir.join(SOCKET_NAME);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state_dir), 0o700);
    assert_eq!(mode(&socket), 0o600);

    let socket_for_child = socket.clone();
    let result = tokio::task::spawn_blocking(move || connect_as_nobody(&socket_for_child)).await.unwrap();
    assert_eq!(result, Err(libc::EACCES), "uid 65534 must not be able to connect");

    // Root can.
    let status = ApiClient::new(&state_dir).get_json("/v1/status").await.unwrap();
    assert_eq!(status["node"], "node-test");

    // Defence in depth: even with the file modes opened up by mistake, the peer check refuses.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket_for_child = socket.clone();
    let answer = tokio::task::spawn_blocking(move || connect_as_nobody(&socket_for_child)).await.unwrap().expect("connect now works");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 403"), "the daemon refuses a non-root peer: {answer:?}");

    server.abort();
    log.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_does_not_steal_the_socket() {
    let tmp = TempDir::new("api-stale");
    let (log, _sink, state_dir, server) = start(&tmp.0, None).await;
    let socket = state_dir.join(SOCKET_NAME);
    assert!(matches!(palisade::api::bind(&socket), Err(palisade::api::ApiError::AlreadyServing(_))));
    server.abort();
    let _ = server.await;
    log.shutdown().await;
    // Nobody listens now: the stale socket is replaced.
    let again = palisade::api::bind(&socket);
    assert!(again.is_ok(), "{:?}", again.err());
}

/// A slow client cannot hold the API socket: a request whose headers trickle in a byte a second
/// and a crowd of idle connections leave other clients answered at once, and the server closes
/// the trickling connection at its header deadline (10 s) rather than waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_cannot_hold_the_api_socket() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let tmp = TempDir::new("api-slow");
    let (log, _sink, state_dir, server) = start(&tmp.0, None).await;
    let socket = state_dir.join(SOCKET_NAME);
    // Idle connections that never send a byte, and one that trickles its headers.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::UnixStream::connect(&socket).await.expect("idle connect"));
    }
    let mut slow = tokio::net::UnixStream::connect(&socket).await.expect("slow connect");
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n").await.expect("first bytes");
    let started = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            // One byte a second, never finishing the headers; stops when the server hangs up.
            if slow.write_all(b"x").await.is_err() {
                return started.elapsed();
            }
            match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                // A 408 answer: the server gave up on it; the close follows.
                Ok(Ok(_)) => {}
                Err(_) => {}
            }
            if started.elapsed() > Duration::from_secs(30) {
                return started.elapsed();
            }
        }
    });
    let client = ApiClient::new(&state_dir);
    for _ in 0..5 {
        let status = tokio::time::timeout(Duration::from_secs(2), client.get_json("/v1/status"))
            .await
            .expect("answered while the slow client trickles")
            .expect("status");
        assert_eq!(status["node"], "node-test");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = trickle.await.expect("trickle task");
    assert!(held < Duration::from_secs(20), "the server closed the trickling connection at its header deadline, not later ({held:?})");
    assert!(held >= Duration::from_secs(5), "it was not closed for another reason right away ({held:?})");
    drop(idle);
    server.abort();
    log.shutdown().await;
}
