//! The API server on `<state_dir>/palisade.sock`.
//!
//! Access control is layered: the state directory is 0700 and the socket 0600, both root's, so
//! the kernel refuses other users at connect(); and each accepted connection's peer credentials
//! (SO_PEERCRED) are checked, so a socket made reachable by mistake (chmod, a bind mount) still
//! answers nobody but root.
use std::collections::{HashSet, VecDeque};
use std::ops::ControlFlow;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};

use super::body::{self, ApiBody};
use super::{ApiError, ApiState, QuarantineApiError, OperatorRequest};
use crate::alerts::query::{AlertQuery, log_files, parse_pod, read_alerts};
use crate::alerts::render::harden_json;
use crate::alerts::schema::Alert;
use crate::alerts::time::now_micros;

/// Release requests larger than this are refused (they are a pod name and a sentence).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Request headers, and an operator request's body, must arrive within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle follow stream sends an empty line this often, so a vanished client is noticed.
const FOLLOW_HEARTBEAT: Duration = Duration::from_secs(15);

/// Prepares the directory (0700), clears a stale socket, binds and restricts the socket (0600).
pub fn bind(socket: &Path) -> Result<UnixListener, ApiError> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::alerts::log::create_private_dir(dir).map_err(|e| match e {
            crate::alerts::AlertsError::Io { path, source } => ApiError::Io { path, source },
            other => ApiError::Io { path: dir.to_path_buf(), source: std::io::Error::other(other.to_string()) },
        })?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Err(ApiError::AlreadyServing(socket.to_path_buf()));
            }
            std::fs::remove_file(socket).map_err(|source| ApiError::Io { path: socket.to_path_buf(), source })?;
        }
        Ok(_) => return Err(ApiError::NotASocket(socket.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(socket)
        .map_err(|source| ApiError::Bind { what: socket.display().to_string(), source })?;
    // The 0700 directory keeps everyone else out during the moment before this chmod.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ApiError::Io { path: socket.to_path_buf(), source })?;
    Ok(listener)
}

/// Binds `socket` and serves until the task is dropped.
pub async fn serve(socket: &Path, state: ApiState) -> Result<(), ApiError> {
    let listener = bind(socket)?;
    tracing::info!(socket = %socket.display(), "serving the API");
    serve_on(listener, state).await
}

/// Whether a peer may use the API: root, or the daemon's own user.
fn peer_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

pub async fn serve_on(listener: UnixListener, state: ApiState) -> Result<(), ApiError> {
    let state = Arc::new(state);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move { handle_connection(stream, state).await });
    }
}

#[derive(Debug, Clone)]
struct Peer {
    uid: u32,
    pid: Option<i32>,
}

async fn handle_connection(stream: UnixStream, state: Arc<ApiState>) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer { uid: cred.uid(), pid: cred.pid() },
        Err(err) => {
            tracing::warn!(%err, "API: no peer credentials; closing");
            return;
        }
    };
    if !peer_allowed(peer.uid) {
        tracing::warn!(uid = peer.uid, pid = ?peer.pid, "API: refused a non-root peer");
        refuse(stream).await;
        return;
    }
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let peer = peer.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, &state, &peer).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    // Follow streams live long, so no connection deadline here; but a request's headers (and an
    // operator request's body, see `operator_request`) must arrive in time.
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(io, service);
    if let Err(err) = connection.await {
        tracing::debug!(%err, "API connection ended");
    }
}

/// Answers 403 without reading the request, then closes.
async fn refuse(mut stream: UnixStream) {
    use tokio::io::AsyncWriteExt as _;
    let body = "{\"error\":\"the palisade API is root-only\"}\n";
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn json_response(status: StatusCode, value: &Value) -> Response<ApiBody> {
    let mut text = harden_json(value.to_string());
    text.push('\n');
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: StatusCode, message: impl std::fmt::Display) -> Response<ApiBody> {
    json_response(status, &json!({ "error": message.to_string() }))
}

fn lines_response(body: ApiBody) -> Response<ApiBody> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/x-ndjson"));
    response
}

async fn route(req: Request<Incoming>, state: &ApiState, peer: &Peer) -> Response<ApiBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => {
            let mut r = Response::new(body::full("ok\n"));
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
            r
        }
        (&Method::GET, "/v1/status") => status(state).await,
        (&Method::GET, "/v1/alerts") => match AlertQuery::from_query_string(&query, now_micros()) {
            Ok(q) => lines_response(query_alerts(state, q)),
            Err(err) => error_response(StatusCode::BAD_REQUEST, err),
        },
        (&Method::GET, "/v1/alerts/follow") => match AlertQuery::from_query_string(&query, now_micros()) {
            Ok(q) => lines_response(follow_alerts(state, q)),
            Err(err) => error_response(StatusCode::BAD_REQUEST, err),
        },
        (&Method::GET, "/v1/quarantines") => match state.quarantine.list().await {
            Ok(list) => json_response(StatusCode::OK, &serde_json::to_value(list).unwrap_or(Value::Null)),
            Err(err) => quarantine_error(err),
        },
        (&Method::POST, "/v1/quarantines/release") => match operator_request(req, peer).await {
            Ok(request) => match state.quarantine.release(request).await {
                Ok(outcome) => json_response(StatusCode::OK, &serde_json::to_value(outcome).unwrap_or(Value::Null)),
                Err(err) => quarantine_error(err),
            },
            Err(response) => response,
        },
        (&Method::POST, "/v1/quarantines/add") => match operator_request(req, peer).await {
            Ok(request) => match state.quarantine.add(request).await {
                Ok(outcome) => json_response(StatusCode::OK, &serde_json::to_value(outcome).unwrap_or(Value::Null)),
                Err(err) => quarantine_error(err),
            },
            Err(response) => response,
        },
        (&Method::POST, "/v1/quarantines/cancel") => match operator_request(req, peer).await {
            Ok(request) => match state.quarantine.cancel(request).await {
                Ok(outcome) => json_response(StatusCode::OK, &serde_json::to_value(outcome).unwrap_or(Value::Null)),
                Err(err) => quarantine_error(err),
            },
            Err(response) => response,
        },
        (&Method::POST, "/v1/quarantines/resume") => error_response(StatusCode::GONE, RESUME_RETIRED),
        (&Method::GET, "/metrics") => match &state.metrics {
            Some(m) => {
                let mut r = Response::new(body::full(m.encode()));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                );
                r
            }
            None => error_response(StatusCode::NOT_FOUND, "this daemon keeps no metrics"),
        },
        (_, "/healthz" | "/v1/status" | "/v1/alerts" | "/v1/alerts/follow" | "/v1/quarantines" | "/v1/quarantines/release" | "/v1/quarantines/add" | "/v1/quarantines/cancel" | "/v1/quarantines/resume" | "/metrics") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, format!("{method} not allowed on {path}"))
        }
        _ => error_response(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

async fn status(state: &ApiState) -> Response<ApiBody> {
    let mut value = (state.status)().await;
    if let Value::Object(map) = &mut value
        && !map.contains_key("alerts")
    {
        map.insert("alerts".into(), serde_json::to_value(state.alerts.stats()).unwrap_or(Value::Null));
    }
    json_response(StatusCode::OK, &value)
}

fn quarantine_error(err: QuarantineApiError) -> Response<ApiBody> {
    let status = match err {
        QuarantineApiError::NotEnabled => StatusCode::NOT_IMPLEMENTED,
        QuarantineApiError::NotQuarantined(_) | QuarantineApiError::NotPending(_) => StatusCode::NOT_FOUND,
        QuarantineApiError::Refused(_) => StatusCode::CONFLICT,
        QuarantineApiError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, err)
}

/// Why `POST /v1/quarantines/resume` (and `palisade quarantine resume`) is gone.
pub const RESUME_RETIRED: &str = "nothing to resume: the rate limit no longer suspends automatic quarantine; quarantines over it are queued and applied as the limit allows (`palisade quarantine list` shows them as pending, `palisade quarantine cancel NS/POD` drops one)";

/// The body of release and cancel requests.
#[derive(Debug, Serialize, Deserialize)]
pub struct OperatorBody {
    pub pod: String,
    pub reason: String,
    #[serde(default)]
    pub by: Option<String>,
}

/// Reads and checks an operator's request body; the error is the response to send.
async fn operator_request(req: Request<Incoming>, peer: &Peer) -> Result<OperatorRequest, Response<ApiBody>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BYTES);
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) => return Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {err}"))),
        Err(_) => return Err(error_response(StatusCode::REQUEST_TIMEOUT, format!("request body not complete within {REQUEST_TIMEOUT:?}"))),
    };
    parse_operator_body(&bytes, peer.uid, peer.pid).map_err(|message| error_response(StatusCode::BAD_REQUEST, message))
}

/// An operator request's body (`{"pod": "ns/name", "reason": "...", "by": "..."}`) from a peer
/// whose uid and pid the kernel reported: the request, or why it is a bad request. Pure (no
/// I/O), so that it can be fuzzed.
pub fn parse_operator_body(bytes: &[u8], uid: u32, pid: Option<i32>) -> Result<OperatorRequest, String> {
    let request: OperatorBody = serde_json::from_slice(bytes)
        .map_err(|err| format!("want {{\"pod\": \"ns/name\", \"reason\": \"...\"}}: {err}"))?;
    let (namespace, name) = parse_pod(&request.pod).map_err(|err| err.to_string())?;
    if request.reason.trim().is_empty() {
        return Err("the request needs a reason".into());
    }
    // The peer's uid and pid come from the kernel; the account name is the client's word.
    let pid = pid.map_or_else(|| "?".to_string(), |p| p.to_string());
    let by = match request.by.as_deref().filter(|b| !b.is_empty()) {
        Some(who) => format!("{who} (uid {uid} pid {pid})"),
        None => format!("uid {uid} pid {pid}"),
    };
    Ok(OperatorRequest { namespace, name, reason: request.reason, by })
}

fn alert_line(alert: &Alert) -> Option<Bytes> {
    let mut line = harden_json(serde_json::to_string(alert).ok()?);
    line.push('\n');
    Some(Bytes::from(line))
}

fn notice_line(value: Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

/// Reads the log on the blocking pool, feeding matching alerts to `tx`. Returns the ids of the
/// last `remember` alerts sent, for a follower to skip when they come again live.
async fn send_history(dir: PathBuf, query: AlertQuery, tx: mpsc::Sender<Bytes>, remember: usize) -> HashSet<String> {
    let task = tokio::task::spawn_blocking(move || {
        let mut recent: VecDeque<String> = VecDeque::new();
        let report = read_alerts(&log_files(&dir), &query, |alert| {
            let Some(line) = alert_line(&alert) else { return ControlFlow::Continue(()) };
            if remember > 0 {
                if recent.len() == remember {
                    recent.pop_front();
                }
                recent.push_back(alert.id);
            }
            if tx.blocking_send(line).is_err() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        });
        if report.bad_lines > 0 || !report.unreadable.is_empty() {
            let _ = tx.blocking_send(notice_line(json!({
                "notice": "read_report",
                "bad_lines": report.bad_lines,
                "first_bad": report.first_bad,
                "unreadable": report.unreadable,
            })));
        }
        recent.into_iter().collect()
    });
    task.await.unwrap_or_default()
}

fn query_alerts(state: &ApiState, query: AlertQuery) -> ApiBody {
    let (tx, body) = body::channel(256);
    let dir = state.alerts.dir().to_path_buf();
    tokio::spawn(async move {
        send_history(dir, query, tx, 0).await;
    });
    body
}

fn follow_alerts(state: &ApiState, query: AlertQuery) -> ApiBody {
    let (tx, body) = body::channel(256);
    // Subscribe before reading history so nothing written meanwhile falls between the two.
    // An alert both in history and live was written after subscribing, so it is among the last
    // `follow capacity` history lines (or the follower lagged and is told so): remembering
    // that many ids is enough to show each alert once.
    let mut live = state.alerts.subscribe();
    let remember = state.alerts.follow_capacity();
    let dir = state.alerts.dir().to_path_buf();
    tokio::spawn(async move {
        let seen = if query.since.is_some() { send_history(dir, query.clone(), tx.clone(), remember).await } else { HashSet::new() };
        let mut heartbeat = tokio::time::interval(FOLLOW_HEARTBEAT);
        heartbeat.reset();
        loop {
            let chunk = tokio::select! {
                _ = tx.closed() => break,
                _ = heartbeat.tick() => Bytes::from_static(b"\n"),
                received = live.recv() => match received {
                    Ok(alert) => {
                        if seen.contains(&alert.id) || !query.matches(&alert) {
                            continue;
                        }
                        match alert_line(&alert) {
                            Some(line) => line,
                            None => continue,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => notice_line(json!({
                        "notice": "lagged",
                        "missed": missed,
                        "message": format!("this follower fell behind and missed {missed} alerts; they are in the log"),
                    })),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            if tx.send(chunk).await.is_err() {
                break;
            }
            heartbeat.reset();
        }
    });
    body
}
