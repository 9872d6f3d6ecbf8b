//! A Kubernetes API stand-in for tests: a small HTTPS (HTTP/1.1 over TLS, a certificate from a
//! CA of its own) server on 127.0.0.1 that requires a bearer token, as API servers do, and speaks
//! the real list/watch protocol (resourceVersions, paged lists, chunked watch streams of JSON events, bookmarks,
//! `410 Gone` after compaction), takes merge PATCHes and Event POSTs (recorded for assertions),
//! creates, conditional updates (PUT: `409 Conflict` on a stale resourceVersion) and deletes
//! (with preconditions) of PeerSlices and Leases,
//! and can fail the way API servers do (500s, connections dropped on accept, watch streams cut).
//!
//! Used in-process by `k8s_api.rs` (a kube client from [`StandIn::client`]) and, through a
//! kubeconfig ([`StandIn::write_kubeconfig`]), by `k8s_daemon.rs` for `palisade run --kubernetes`.
//! Synchronous tests keep it on its own runtime with [`BlockingStandIn`].

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// How long [`StandIn::wait_for_watch`] waits.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Namespace,
    NetworkPolicy,
    Event,
    /// palisade.io/v1 Quarantine (namespaced, with a status subresource).
    Quarantine,
    /// palisade.io/v1alpha1 PeerSlice (namespaced; written by `palisade operator`).
    PeerSlice,
    /// coordination.k8s.io/v1 Lease (namespaced; the operator's leader election). Updates are
    /// conditional on the resourceVersion in the body, as on the API server.
    Lease,
}

impl Kind {
    pub fn of(object: &Value) -> Kind {
        match object["kind"].as_str() {
            Some("Pod") => Kind::Pod,
            Some("Namespace") => Kind::Namespace,
            Some("NetworkPolicy") => Kind::NetworkPolicy,
            Some("Event") => Kind::Event,
            Some("Quarantine") => Kind::Quarantine,
            Some("PeerSlice") => Kind::PeerSlice,
            Some("Lease") => Kind::Lease,
            other => panic!("stand-in does not serve kind {other:?}"),
        }
    }
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::Event => "events",
            Kind::Quarantine => "quarantines",
            Kind::PeerSlice => "peerslices",
            Kind::Lease => "leases",
        }
    }
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Event => "Event",
            Kind::Quarantine => "Quarantine",
            Kind::PeerSlice => "PeerSlice",
            Kind::Lease => "Lease",
        }
    }
    pub fn group(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::Quarantine | Kind::PeerSlice => "palisade.io",
            Kind::Lease => "coordination.k8s.io",
            _ => "",
        }
    }
    pub fn list_kind(self) -> &'static str {
        match self {
            Kind::Pod => "PodList",
            Kind::Namespace => "NamespaceList",
            Kind::NetworkPolicy => "NetworkPolicyList",
            Kind::Event => "EventList",
            Kind::Quarantine => "QuarantineList",
            Kind::PeerSlice => "PeerSliceList",
            Kind::Lease => "LeaseList",
        }
    }
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::NetworkPolicy => "networking.k8s.io/v1",
            Kind::Quarantine => "palisade.io/v1",
            Kind::PeerSlice => "palisade.io/v1alpha1",
            Kind::Lease => "coordination.k8s.io/v1",
            _ => "v1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every request answers 500 (kube's client does not retry 500s, unlike 503/504/429).
    Status500,
    /// Connections are closed as soon as they are accepted.
    DropConnections,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    /// The request's `Accept-Encoding` (empty when absent).
    pub accept_encoding: String,
    pub body: String,
    /// (group, resource, verb) as RBAC names it; a subresource is `resource/sub`.
    pub use_: (String, String, String),
    /// The authenticated user (from the bearer token).
    pub user: String,
}

/// The user the stand-in's own token ([`StandIn::token`]) authenticates as.
pub const AGENT_USER: &str = "system:serviceaccount:palisade-system:palisade";

/// A user the stand-in knows: its name and the (resource, verb) pairs RBAC denies it
/// (everything else is allowed).
#[derive(Debug, Clone)]
struct User {
    name: String,
    denied: BTreeSet<(String, String)>,
}

struct WatchSub {
    kind: Kind,
    node: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    compacted: u64,
    watches: Vec<WatchSub>,
    requests: Vec<Recorded>,
    fault: Option<Fault>,
    next_uid: u64,
    /// Open client connections, so a fault can cut them (kube's client reuses pooled ones).
    connections: Vec<tokio::task::AbortHandle>,
    /// Bearer token -> user.
    users: BTreeMap<String, User>,
}

fn matches_node(object: &Value, node: &Option<String>) -> bool {
    node.as_ref().is_none_or(|n| object["spec"]["nodeName"].as_str() == Some(n.as_str()))
}

fn line(value: &Value) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("json");
    text.push(b'\n');
    Bytes::from(text)
}

impl Cluster {
    fn emit(&mut self, kind: Kind, type_: &'static str, object: Value) {
        self.log.push((self.rv, kind, type_, object.clone()));
        self.watches.retain(|w| {
            if w.kind != kind || !matches_node(&object, &w.node) {
                return !w.tx.is_closed();
            }
            w.tx.send(line(&json!({"type": type_, "object": object}))).is_ok()
        });
    }

    fn store(&mut self, mut object: Value) -> Value {
        let kind = Kind::of(&object);
        let ns = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let key = (kind, ns, name);
        let type_ = if self.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        if object["metadata"]["uid"].is_null() {
            self.next_uid += 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
        }
        self.objects.insert(key, object.clone());
        self.emit(kind, type_, object.clone());
        object
    }

    /// Deletes an object and, as the garbage collector does, every object it owns
    /// (`metadata.ownerReferences[].uid`).
    fn remove(&mut self, key: &(Kind, String, String)) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.emit(key.0, "DELETED", object.clone());
        let uid = object["metadata"]["uid"].clone();
        let owned: Vec<_> = self
            .objects
            .iter()
            .filter(|(_, o)| o["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid)))
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in owned {
            self.remove(&dependent);
        }
        Some(object)
    }
}

/// The `fieldsV1` set of a patch or object body, as managedFields records it: every key as
/// `f:<key>` down to the leaves (a simplification of the API server's, enough to see who set what).
fn fields_v1(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind")).map(|(k, v)| (format!("f:{k}"), fields_v1(v))).collect())
        }
        _ => json!({}),
    }
}

/// Records who changed what, the way the API server does in `metadata.managedFields`.
fn record_manager(object: &mut Value, manager: &str, operation: &str, subresource: Option<&str>, changed: &Value) {
    let mut entry = json!({"manager": manager, "operation": operation, "apiVersion": object["apiVersion"].clone(),
        "fieldsType": "FieldsV1", "fieldsV1": fields_v1(changed)});
    if let Some(sub) = subresource {
        entry["subresource"] = json!(sub);
    }
    let fields = &mut object["metadata"]["managedFields"];
    if !fields.is_array() {
        *fields = json!([]);
    }
    if let Some(list) = fields.as_array_mut() {
        list.retain(|e| !(e["manager"] == manager && e["operation"] == operation && e["subresource"] == entry["subresource"]));
        list.push(entry);
    }
}

#[derive(Clone)]
pub struct StandIn {
    pub addr: SocketAddr,
    cluster: Arc<Mutex<Cluster>>,
    /// The CA that signed the server's certificate (for 127.0.0.1), PEM.
    pub ca_pem: Arc<String>,
    /// The bearer token every request must carry; others get `401 Unauthorized`.
    pub token: Arc<String>,
    /// Response body bytes sent (lists, watch events, everything else), as written to the
    /// connection before TLS: what a client receives, for the cluster-scale benchmark.
    bytes_sent: Arc<AtomicU64>,
    /// The same, by the user the request authenticated as (so a benchmark can tell what the
    /// agent received from what the operator did).
    bytes_by_user: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    /// List responses sent gzip-compressed.
    gzipped_lists: Arc<AtomicU64>,
}

/// Lists at least this large are sent gzip-compressed to a client that accepts it, as
/// kube-apiserver does (its compression threshold is 128 KiB).
pub const GZIP_MIN_BYTES: usize = 128 * 1024;

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A 200 with `text` gzip-compressed (`Content-Encoding: gzip`).
fn gzipped(text: &str) -> Response<Body> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(text.as_bytes()).expect("gzip into memory");
    let compressed = encoder.finish().expect("gzip into memory");
    let mut response = Response::new(Full::new(Bytes::from(compressed)).boxed());
    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
    response.headers_mut().insert("content-encoding", "gzip".parse().expect("header"));
    response
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let Value::Object(map) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

impl StandIn {
    pub async fn start() -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stand-in");
        let addr = listener.local_addr().expect("addr");
        let ca = super::tls::TestCa::new("kube stand-in CA");
        let acceptor = ca.acceptor(None);
        let token = format!("standin-{}-{}", std::process::id(), addr.port());
        let mut cluster = Cluster::default();
        cluster.users.insert(token.clone(), User { name: AGENT_USER.to_string(), denied: BTreeSet::new() });
        let this = StandIn {
            addr,
            cluster: Arc::new(Mutex::new(cluster)),
            ca_pem: Arc::new(ca.pem.clone()),
            token: Arc::new(token),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            bytes_by_user: Arc::default(),
            gzipped_lists: Arc::new(AtomicU64::new(0)),
        };
        let server = this.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                if server.lock().fault == Some(Fault::DropConnections) {
                    drop(stream);
                    continue;
                }
                let handler = server.clone();
                let acceptor = acceptor.clone();
                let connection = tokio::spawn(async move {
                    let server = handler;
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle_counted(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                let mut cluster = server.lock();
                cluster.connections.retain(|c| !c.is_finished());
                cluster.connections.push(connection.abort_handle());
            }
        });
        this
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("stand-in lock")
    }

    /// A kube client that trusts the stand-in's CA and carries its token.
    pub fn client(&self) -> kube::Client {
        self.client_with_token(&self.token)
    }

    /// A kube client for another user (see [`StandIn::add_user`]).
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        let url: hyper::Uri = format!("https://{}", self.addr).parse().expect("url");
        let mut config = kube::Config::new(url);
        config.root_cert = Some(vec![pem_to_der(&self.ca_pem)]);
        config.auth_info.token = Some(token.to_string().into());
        kube::Client::try_from(config).expect("kube client")
    }

    pub fn apply(&self, object: Value) -> Value {
        self.lock().store(object)
    }

    /// Stores objects as if they had always been there: no watch events, no history (a watch
    /// from an older resourceVersion is `410 Gone`). For loading a large cluster quickly.
    pub fn preload(&self, objects: impl IntoIterator<Item = Value>) {
        let mut cluster = self.lock();
        for mut object in objects {
            let kind = Kind::of(&object);
            let ns = object["metadata"]["namespace"].as_str().unwrap_or("").to_string();
            let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
            cluster.rv += 1;
            object["metadata"]["resourceVersion"] = json!(cluster.rv.to_string());
            if object["metadata"]["uid"].is_null() {
                cluster.next_uid += 1;
                object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", cluster.next_uid));
            }
            cluster.objects.insert((kind, ns, name), object);
        }
        cluster.compacted = cluster.rv;
        cluster.log.clear();
    }

    /// Response body bytes sent so far (see the field).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Response body bytes sent so far to requests of `user` (e.g. [`AGENT_USER`]).
    pub fn bytes_sent_to(&self, user: &str) -> u64 {
        self.user_bytes(user).load(Ordering::Relaxed)
    }

    fn user_bytes(&self, user: &str) -> Arc<AtomicU64> {
        self.bytes_by_user.lock().expect("stand-in byte counters").entry(user.to_string()).or_default().clone()
    }

    /// How many list responses went out gzip-compressed.
    pub fn gzipped_lists(&self) -> u64 {
        self.gzipped_lists.load(Ordering::Relaxed)
    }

    /// Stops recording requests (a benchmark's many requests would only fill memory).
    pub fn forget_requests(&self) {
        self.lock().requests.clear();
    }

    /// Deletes an object (and what it owns, as the garbage collector would).
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) {
        if self.lock().remove(&(kind, ns.to_string(), name.to_string())).is_none() {
            panic!("delete: no {kind:?} {ns}/{name}");
        }
    }

    pub fn object(&self, kind: Kind, ns: &str, name: &str) -> Value {
        self.try_object(kind, ns, name).expect("object exists")
    }

    pub fn try_object(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(kind, ns.to_string(), name.to_string())).cloned()
    }

    /// A second user with its own bearer token, denied the (resource, verb) pairs given (as RBAC
    /// would: `403 Forbidden`); returns the token.
    pub fn add_user(&self, name: &str, denied: &[(&str, &str)]) -> String {
        let token = format!("{}-user-{}", self.token, name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
        let denied = denied.iter().map(|(r, v)| (r.to_string(), v.to_string())).collect();
        self.lock().users.insert(token.clone(), User { name: name.to_string(), denied });
        token
    }

    /// A BOOKMARK with the current resourceVersion to every watch that asked for bookmarks.
    pub fn bookmark(&self) -> u64 {
        let mut cluster = self.lock();
        let rv = cluster.rv;
        cluster.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            let object = json!({"kind": w.kind.kind(),
                "apiVersion": w.kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
            w.tx.send(line(&json!({"type": "BOOKMARK", "object": object}))).is_ok()
        });
        rv
    }

    /// Cuts every open watch stream (the client sees the response end).
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Forgets history: watching from any older resourceVersion is `410 Gone`.
    pub fn compact(&self) {
        let mut cluster = self.lock();
        cluster.compacted = cluster.rv;
        cluster.log.clear();
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut cluster = self.lock();
        cluster.fault = fault;
        if fault == Some(Fault::DropConnections) {
            for connection in cluster.connections.drain(..) {
                connection.abort();
            }
            cluster.watches.clear();
        }
    }

    /// Waits until a watch of `kind` is open (a watcher opens it only after its list is consumed).
    pub async fn wait_for_watch(&self, kind: Kind) {
        tokio::time::timeout(WAIT, async {
            while !self.lock().watches.iter().any(|w| w.kind == kind && !w.tx.is_closed()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("watch opened in time");
    }

    /// Waits until `count` watches of `kind` are open at once (e.g. the node-local and the
    /// cluster-wide pod watch).
    pub async fn wait_for_watches(&self, kind: Kind, count: usize) {
        tokio::time::timeout(WAIT, async {
            while self.lock().watches.iter().filter(|w| w.kind == kind && !w.tx.is_closed()).count() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("watches opened in time");
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    pub fn uses(&self) -> BTreeSet<(String, String, String)> {
        self.lock().requests.iter().map(|r| r.use_.clone()).collect()
    }

    pub fn count(&self, resource: &str, verb: &str) -> usize {
        self.lock().requests.iter().filter(|r| r.use_.1 == resource && r.use_.2 == verb).count()
    }

    /// `handle`, counting what the response body sends: a whole body here, a watch stream's
    /// events as they go out (in `handle`).
    async fn handle_counted(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let user = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .and_then(|t| self.lock().users.get(t).map(|u| u.name.clone()));
        let response = self.handle(req).await;
        if let Some(length) = hyper::body::Body::size_hint(response.body()).exact() {
            self.bytes_sent.fetch_add(length, Ordering::Relaxed);
            if let Some(user) = &user {
                self.user_bytes(user).fetch_add(length, Ordering::Relaxed);
            }
        }
        response
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let Some(user) = token.and_then(|t| self.lock().users.get(&t).cloned()) else {
            return full(StatusCode::UNAUTHORIZED, &status(401, "Unauthorized", "Unauthorized"));
        };
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (percent_decode(k), percent_decode(v)),
                None => (percent_decode(kv), String::new()),
            })
            .collect();
        let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        // The API server's default field manager is the client's user agent up to the first '/'.
        let agent = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("unknown").split('/').next().unwrap_or("unknown").to_string();
        let accept_encoding =
            req.headers().get(hyper::header::ACCEPT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let accepts_gzip = accept_encoding.split(',').any(|e| e.split(';').next().is_some_and(|e| e.trim() == "gzip"));
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();

        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if method == "POST" && segments == ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] {
            // `kubectl auth whoami`: who the token authenticates as.
            return full(
                StatusCode::CREATED,
                &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview", "metadata": {},
                        "status": {"userInfo": {"username": user.name}}}),
            );
        }
        if let ["apis", "events.k8s.io", "v1", "namespaces", ns, "events", rest @ ..] = segments.as_slice() {
            return self.events_v1(&method, ns, rest.first().copied(), &body, &user);
        }
        // (kind, namespace, name, subresource)
        let target = match segments.as_slice() {
            ["api", "v1", "pods"] => Some((Kind::Pod, None, None, None)),
            ["api", "v1", "namespaces"] => Some((Kind::Namespace, None, None, None)),
            ["apis", "networking.k8s.io", "v1", "networkpolicies"] => Some((Kind::NetworkPolicy, None, None, None)),
            ["api", "v1", "namespaces", ns, "pods", name] => Some((Kind::Pod, Some(*ns), Some(*name), None)),
            ["api", "v1", "events"] => Some((Kind::Event, None, None, None)),
            ["api", "v1", "namespaces", ns, "events"] => Some((Kind::Event, Some(*ns), None, None)),
            ["api", "v1", "namespaces", ns, "events", name] => Some((Kind::Event, Some(*ns), Some(*name), None)),
            ["apis", "palisade.io", "v1", "quarantines"] => Some((Kind::Quarantine, None, None, None)),
            ["apis", "palisade.io", "v1", "namespaces", ns, "quarantines"] => Some((Kind::Quarantine, Some(*ns), None, None)),
            ["apis", "palisade.io", "v1", "namespaces", ns, "quarantines", name] => Some((Kind::Quarantine, Some(*ns), Some(*name), None)),
            ["apis", "palisade.io", "v1alpha1", "peerslices"] => Some((Kind::PeerSlice, None, None, None)),
            ["apis", "palisade.io", "v1alpha1", "namespaces", ns, "peerslices"] => Some((Kind::PeerSlice, Some(*ns), None, None)),
            ["apis", "palisade.io", "v1alpha1", "namespaces", ns, "peerslices", name] => {
                Some((Kind::PeerSlice, Some(*ns), Some(*name), None))
            }
            ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] => Some((Kind::Lease, Some(*ns), None, None)),
            ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name] => Some((Kind::Lease, Some(*ns), Some(*name), None)),
            ["apis", "palisade.io", "v1", "namespaces", ns, "quarantines", name, "status"] => {
                Some((Kind::Quarantine, Some(*ns), Some(*name), Some("status")))
            }
            _ => None,
        };
        let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
        let verb = match (method.as_str(), &target, watch) {
            ("GET", _, true) => "watch",
            ("GET", Some((_, _, None, _)), false) => "list",
            ("GET", Some((_, _, Some(_), _)), false) => "get",
            ("POST", _, _) => "create",
            ("PATCH", _, _) => "patch",
            ("PUT", _, _) => "update",
            ("DELETE", _, _) => "delete",
            _ => "other",
        };
        let resource = target.map(|t| match t.3 {
            Some(sub) => format!("{}/{sub}", t.0.resource()),
            None => t.0.resource().to_string(),
        });
        let mut cluster = self.lock();
        cluster.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            accept_encoding,
            body: body.clone(),
            use_: (
                target.map(|t| t.0.group()).unwrap_or("?").to_string(),
                resource.clone().unwrap_or_else(|| "?".to_string()),
                verb.to_string(),
            ),
            user: user.name.clone(),
        });
        if cluster.fault == Some(Fault::Status500) {
            return full(StatusCode::INTERNAL_SERVER_ERROR, &status(500, "InternalError", "stand-in: injected failure"));
        }
        let Some((kind, ns, name, subresource)) = target else {
            return full(StatusCode::NOT_FOUND, &status(404, "NotFound", &format!("no route {path}")));
        };
        if let Some(resource) = &resource
            && user.denied.contains(&(resource.clone(), verb.to_string()))
        {
            let message = format!(
                "{resource}.{group} {name:?} is forbidden: User {user:?} cannot {verb} resource {resource:?} in API group {group:?} in the namespace {ns:?}",
                group = kind.group(),
                name = name.unwrap_or(""),
                user = user.name,
                ns = ns.unwrap_or(""),
            );
            return full(StatusCode::FORBIDDEN, &status(403, "Forbidden", &message));
        }
        let node = query.get("fieldSelector").and_then(|f| f.strip_prefix("spec.nodeName=")).map(str::to_string);
        let manager = query.get("fieldManager").cloned().unwrap_or(agent);
        match verb {
            "list" => {
                // Pages as the API server serves them (`limit`, `continue`): the token carries
                // the first page's resourceVersion, which every page reports, so a watcher
                // watches from the snapshot (an object changed between pages is replayed by
                // the watch; applying it twice is harmless). Without `limit`, everything.
                let limit = query.get("limit").and_then(|v| v.parse::<usize>().ok()).filter(|l| *l > 0);
                let (snapshot, offset) = query
                    .get("continue")
                    .and_then(|c| c.split_once(':'))
                    .and_then(|(rv, at)| Some((rv.parse::<u64>().ok()?, at.parse::<usize>().ok()?)))
                    .unwrap_or((cluster.rv, 0));
                let mut items: Vec<Value> = cluster
                    .objects
                    .iter()
                    .filter(|((k, n, _), o)| *k == kind && ns.is_none_or(|ns| ns == n) && matches_node(o, &node))
                    .skip(offset)
                    .take(limit.map_or(usize::MAX, |l| l + 1))
                    .map(|(_, o)| o.clone())
                    .collect();
                let mut metadata = json!({"resourceVersion": snapshot.to_string()});
                if let Some(limit) = limit
                    && items.len() > limit
                {
                    items.truncate(limit);
                    metadata["continue"] = json!(format!("{snapshot}:{}", offset + limit));
                }
                let list = json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": metadata, "items": items});
                drop(cluster);
                let text = list.to_string();
                if accepts_gzip && text.len() >= GZIP_MIN_BYTES {
                    self.gzipped_lists.fetch_add(1, Ordering::Relaxed);
                    gzipped(&text)
                } else {
                    let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
                    response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
                    response
                }
            }
            "watch" => {
                let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                if from < cluster.compacted {
                    let gone = status(410, "Expired", &format!("too old resource version: {from} ({})", cluster.compacted));
                    let _ = tx.send(line(&json!({"type": "ERROR", "object": gone})));
                    drop(tx);
                } else {
                    for (rv, k, type_, object) in &cluster.log {
                        if *rv > from && *k == kind && matches_node(object, &node) {
                            let _ = tx.send(line(&json!({"type": type_, "object": object})));
                        }
                    }
                    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
                    cluster.watches.push(WatchSub { kind, node, bookmarks, tx });
                }
                let sent = self.bytes_sent.clone();
                let sent_to_user = self.user_bytes(&user.name);
                let stream = futures::stream::unfold(rx, move |mut rx| {
                    let (sent, sent_to_user) = (sent.clone(), sent_to_user.clone());
                    async move {
                        let bytes = rx.recv().await?;
                        sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        sent_to_user.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        Some((Ok::<_, Infallible>(Frame::data(bytes)), rx))
                    }
                });
                let mut response = Response::new(StreamBody::new(stream).boxed());
                response.headers_mut().insert("content-type", "application/json".parse().expect("header"));
                response
            }
            "get" => {
                let key = (kind, ns.unwrap_or("").to_string(), name.unwrap_or("").to_string());
                match cluster.objects.get(&key) {
                    Some(object) => full(StatusCode::OK, object),
                    None => not_found(kind, name.unwrap_or("")),
                }
            }
            "patch" => {
                let (Some(ns), Some(name)) = (ns, name) else {
                    return full(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", "patch needs a name"));
                };
                let key = (kind, ns.to_string(), name.to_string());
                let Some(mut object) = cluster.objects.get(&key).cloned() else {
                    return not_found(kind, name);
                };
                let Ok(mut patch) = serde_json::from_str::<Value>(&body) else {
                    return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "patch is not JSON"));
                };
                // With a status subresource, the main resource ignores status and the status
                // subresource ignores everything else (as the API server does for CRDs).
                if kind == Kind::Quarantine {
                    if subresource == Some("status") {
                        patch = json!({"status": patch["status"].clone()});
                    } else if let Some(map) = patch.as_object_mut() {
                        map.remove("status");
                    }
                }
                merge_patch(&mut object, &patch);
                let operation = if content_type.starts_with("application/apply-patch") { "Apply" } else { "Update" };
                record_manager(&mut object, &manager, operation, subresource, &patch);
                let stored = cluster.store(object);
                full(StatusCode::OK, &stored)
            }
            "create" => {
                let Ok(mut object) = serde_json::from_str::<Value>(&body) else {
                    return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body is not JSON"));
                };
                object["kind"] = json!(kind.kind());
                object["apiVersion"] = json!(kind.api_version());
                object["metadata"]["namespace"] = json!(ns.unwrap_or(""));
                if kind != Kind::Event {
                    let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                        return full(StatusCode::UNPROCESSABLE_ENTITY, &status(422, "Invalid", "metadata.name: Required value"));
                    };
                    if cluster.objects.contains_key(&(kind, ns.unwrap_or("").to_string(), name.clone())) {
                        let message = format!("{}.{} {name:?} already exists", kind.resource(), kind.group());
                        return full(StatusCode::CONFLICT, &status(409, "AlreadyExists", &message));
                    }
                    if kind == Kind::Quarantine && let Some(map) = object.as_object_mut() {
                        map.remove("status");
                    }
                    let created = object.clone();
                    record_manager(&mut object, &manager, "Update", None, &created);
                }
                let stored = cluster.store(object);
                full(StatusCode::CREATED, &stored)
            }
            "update" => {
                // A replace: conditional on metadata.resourceVersion when the body sets it (409
                // Conflict when it is not the stored one), as the API server does.
                let (Some(ns), Some(name)) = (ns, name) else {
                    return full(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", "update needs a name"));
                };
                let key = (kind, ns.to_string(), name.to_string());
                let Some(current) = cluster.objects.get(&key).cloned() else {
                    return not_found(kind, name);
                };
                let Ok(mut object) = serde_json::from_str::<Value>(&body) else {
                    return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body is not JSON"));
                };
                if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != current["metadata"]["resourceVersion"].as_str()
                {
                    let message = format!(
                        "Operation cannot be fulfilled on {}.{} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                        kind.resource(),
                        kind.group()
                    );
                    return full(StatusCode::CONFLICT, &status(409, "Conflict", &message));
                }
                object["kind"] = json!(kind.kind());
                object["apiVersion"] = json!(kind.api_version());
                object["metadata"]["namespace"] = json!(ns);
                object["metadata"]["uid"] = current["metadata"]["uid"].clone();
                let replaced = object.clone();
                record_manager(&mut object, &manager, "Update", subresource, &replaced);
                let stored = cluster.store(object);
                full(StatusCode::OK, &stored)
            }
            "delete" => {
                let key = (kind, ns.unwrap_or("").to_string(), name.unwrap_or("").to_string());
                // DeleteOptions.preconditions.resourceVersion: 409 Conflict when it is not the stored one.
                let precondition = serde_json::from_str::<Value>(&body).ok().and_then(|b| b["preconditions"]["resourceVersion"].as_str().map(str::to_string));
                if let (Some(rv), Some(current)) = (precondition, cluster.objects.get(&key))
                    && Some(rv.as_str()) != current["metadata"]["resourceVersion"].as_str()
                {
                    let message = format!("Precondition failed: resourceVersion {rv}");
                    return full(StatusCode::CONFLICT, &status(409, "Conflict", &message));
                }
                match cluster.remove(&key) {
                    Some(object) => full(StatusCode::OK, &object),
                    None => not_found(kind, name.unwrap_or("")),
                }
            }
            _ => full(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", verb)),
        }
    }
}

impl StandIn {
    /// `events.k8s.io/v1` Events (what kube's event Recorder writes): stored as the core/v1 Events
    /// they also are on a real API server (one storage, two views), so core lists and watches see
    /// them; answered in the events.k8s.io shape.
    fn events_v1(&self, method: &str, ns: &str, name: Option<&str>, body: &str, user: &User) -> Response<Body> {
        let verb = match method {
            "POST" => "create",
            "PATCH" => "patch",
            _ => "other",
        };
        let mut cluster = self.lock();
        cluster.requests.push(Recorded {
            method: method.to_string(),
            path: format!("/apis/events.k8s.io/v1/namespaces/{ns}/events{}", name.map(|n| format!("/{n}")).unwrap_or_default()),
            query: BTreeMap::new(),
            content_type: String::new(),
            accept_encoding: String::new(),
            body: body.to_string(),
            use_: ("events.k8s.io".to_string(), "events".to_string(), verb.to_string()),
            user: user.name.clone(),
        });
        if cluster.fault == Some(Fault::Status500) {
            return full(StatusCode::INTERNAL_SERVER_ERROR, &status(500, "InternalError", "stand-in: injected failure"));
        }
        let Ok(event) = serde_json::from_str::<Value>(body) else {
            return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body is not JSON"));
        };
        let core_of = |e: &Value| {
            let last = e["series"]["lastObservedTime"].as_str().or(e["eventTime"].as_str()).map(|t| match t.split_once('.') {
                Some((seconds, _)) => format!("{seconds}Z"),
                None => t.to_string(),
            });
            json!({"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": e["metadata"]["name"], "namespace": ns},
                "involvedObject": e["regarding"], "reason": e["reason"], "message": e["note"], "type": e["type"],
                "action": e["action"], "eventTime": e["eventTime"], "reportingComponent": e["reportingController"],
                "reportingInstance": e["reportingInstance"], "count": e["series"]["count"].as_i64().unwrap_or(1),
                "lastTimestamp": last})
        };
        match (verb, name) {
            ("create", None) => {
                let stored = cluster.store(core_of(&event));
                let mut answer = event.clone();
                answer["metadata"] = stored["metadata"].clone();
                full(StatusCode::CREATED, &answer)
            }
            ("patch", Some(name)) => {
                let key = (Kind::Event, ns.to_string(), name.to_string());
                let Some(mut object) = cluster.objects.get(&key).cloned() else {
                    return not_found(Kind::Event, name);
                };
                let mut patched = core_of(&event);
                patched["metadata"] = object["metadata"].clone();
                merge_patch(&mut object, &patched);
                let stored = cluster.store(object);
                let mut answer = event.clone();
                answer["metadata"] = stored["metadata"].clone();
                full(StatusCode::OK, &answer)
            }
            _ => full(StatusCode::METHOD_NOT_ALLOWED, &status(405, "MethodNotAllowed", verb)),
        }
    }
}

fn not_found(kind: Kind, name: &str) -> Response<Body> {
    let group = if kind.group().is_empty() { String::new() } else { format!(".{}", kind.group()) };
    full(StatusCode::NOT_FOUND, &status(404, "NotFound", &format!("{}{group} {name:?} not found", kind.resource())))
}

impl StandIn {
    /// The agent's requests (those with the stand-in's own token) outside `declared` (group,
    /// resource, verb): the code used the API in a way its RBAC list does not name.
    pub fn undeclared_uses(&self, declared: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        let declared: BTreeSet<(String, String, String)> =
            declared.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
        let used: BTreeSet<(String, String, String)> =
            self.lock().requests.iter().filter(|r| r.user == AGENT_USER).map(|r| r.use_.clone()).collect();
        used.difference(&declared).cloned().collect()
    }

    /// Writes a kubeconfig whose only cluster is this stand-in: https, its CA (in a file next to
    /// the kubeconfig) and its bearer token.
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_with_token(path, &self.token)
    }

    /// [`StandIn::write_kubeconfig`] for another user's token (see [`StandIn::add_user`]).
    pub fn write_kubeconfig_with_token(&self, path: &Path, token: &str) {
        let ca_path = path.with_extension("ca.pem");
        std::fs::write(&ca_path, self.ca_pem.as_bytes()).unwrap_or_else(|e| panic!("writing {}: {e}", ca_path.display()));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: https://{addr}\n    certificate-authority: {ca}\n\
             users:\n- name: standin\n  user:\n    token: {token}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\n\
             current-context: standin\npreferences: {{}}\n",
            addr = self.addr,
            ca = ca_path.display(),
        );
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Whether a watch of `kind` is open now.
    pub fn has_watch(&self, kind: Kind) -> bool {
        self.lock().watches.iter().any(|w| w.kind == kind && !w.tx.is_closed())
    }
}

/// The stand-in on a runtime of its own, for tests that are not async (they run processes and
/// probes): every method but `start` is synchronous already. Dropping it stops the server.
pub struct BlockingStandIn {
    pub api: StandIn,
    runtime: Option<tokio::runtime::Runtime>,
}

impl BlockingStandIn {
    pub fn start() -> BlockingStandIn {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("kube-standin")
            .build()
            .expect("stand-in runtime");
        let api = runtime.block_on(StandIn::start());
        BlockingStandIn { api, runtime: Some(runtime) }
    }
}

impl std::ops::Deref for BlockingStandIn {
    type Target = StandIn;
    fn deref(&self) -> &StandIn {
        &self.api
    }
}

impl Drop for BlockingStandIn {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The first certificate of a PEM text, DER.
fn pem_to_der(pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next().expect("a certificate").expect("PEM").to_vec()
}
