//! The webhook exporter: every alert POSTed to an `http://` or `https://` endpoint (falcosidekick,
//! a SIEM collector), with retries, exponential backoff and a bounded queue whose overflow is
//! counted.
//!
//! HTTPS uses rustls with the node's CA certificates or a CA bundle of the operator's
//! (`--webhook-ca`), and optionally a client certificate. A receiver whose certificate does not
//! verify is a configuration error, not a network blip: it is logged at error level, counted
//! (`tls_errors` in status, `palisade_alert_exports_total{exporter="webhook",result="tls_error"}`)
//! and not retried. Secrets in headers come from a file or the environment (a mounted Secret),
//! so they need not sit in the process's command line, which any local user can read.
//!
//! One connection is kept open across alerts (HTTP/1.1 keep-alive) while the receiver allows it
//! and it is used at least every [`KEEP_IDLE`]: a burst of alerts costs one TCP and TLS handshake,
//! not one each. A kept connection that turns out closed (the receiver timed it out without
//! saying so) is replaced at once by a fresh one for the same alert, not counted as a retry;
//! delivery is at least once (a receiver that took the request and then dropped the connection
//! can see it twice; each alert carries its id).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::export::{ExportCounters, ExportFormat, ExportStats, format_line};
use super::schema::Alert;
use crate::metrics::Metrics;

/// A kept connection idle longer than this is closed rather than reused: receivers close idle
/// connections after their own timeout (nginx 75 s, many proxies 60 s), and a request racing that
/// close would fail.
pub const KEEP_IDLE: Duration = Duration::from_secs(30);

/// Header files and the header variable are small; anything larger is a mistake.
pub const MAX_HEADER_SOURCE_BYTES: u64 = 64 * 1024;
/// Environment variable with extra headers, one `Name: value` per line (e.g. from a Secret).
pub const HEADERS_ENV: &str = "PALISADE_WEBHOOK_HEADERS";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("bad webhook URL {0:?}: want http[s]://host[:port][/path] (no user info)")]
    BadUrl(String),
    #[error("{source_name}:{line}: bad webhook header {text:?}: {reason}")]
    BadHeader { source_name: String, line: usize, text: String, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0} needs an https:// webhook URL")]
    TlsOptionWithoutHttps(&'static str),
    #[error("--webhook-client-cert and --webhook-client-key go together")]
    ClientCertHalf,
    #[error("no CA certificates found on this system for the https webhook; give --webhook-ca FILE")]
    NoSystemRoots,
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// What the exporter needs; built from the command line by `AlertOptions`.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// `http[s]://host[:port][/path]`.
    pub url: String,
    pub format: ExportFormat,
    /// Extra request headers, e.g. `Authorization`.
    pub headers: Vec<(String, String)>,
    /// PEM bundle of the CAs to trust for https (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for receivers that ask for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub queue_capacity: usize,
    /// Attempts per alert, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub timeout: Duration,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            format: ExportFormat::Json,
            headers: Vec::new(),
            ca_file: None,
            client_cert: None,
            queue_capacity: 1024,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub scheme: Scheme,
    /// `host:port` to connect to.
    pub authority: String,
    /// The Host header.
    pub host: String,
    /// The host alone (no port, no IPv6 brackets): the TLS server name.
    pub hostname: String,
    pub path: String,
}

pub fn parse_webhook_url(url: &str) -> Result<WebhookUrl, WebhookError> {
    let bad = || WebhookError::BadUrl(url.to_string());
    let (scheme, rest, default_port) = if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest, 443)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest, 80)
    } else {
        return Err(bad());
    };
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host_port.is_empty() || host_port.contains('@') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (hostname, has_port) = match host_port.rfind(']') {
        Some(close) => {
            let inner = host_port.strip_prefix('[').and_then(|h| h.get(..close - 1)).ok_or_else(bad)?;
            (inner, host_port[close..].contains(':'))
        }
        None => (host_port.split(':').next().unwrap_or(host_port), host_port.contains(':')),
    };
    if hostname.is_empty() {
        return Err(bad());
    }
    let authority = if has_port { host_port.to_string() } else { format!("{host_port}:{default_port}") };
    Ok(WebhookUrl { scheme, authority, host: host_port.to_string(), hostname: hostname.to_string(), path: path.to_string() })
}

/// `Name: value` lines (blank lines and `#` comments skipped), each checked as an HTTP header;
/// errors name `source_name` and the line.
pub fn parse_header_lines(source_name: &str, text: &str) -> Result<Vec<(String, String)>, WebhookError> {
    let mut headers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        headers.push(parse_header(source_name, i + 1, trimmed)?);
    }
    Ok(headers)
}

/// One `Name: value` header, checked as HTTP would take it. The value is never echoed back in
/// an error (it is usually a secret).
pub fn parse_header(source_name: &str, line: usize, text: &str) -> Result<(String, String), WebhookError> {
    let bad = |reason: &str| WebhookError::BadHeader {
        source_name: source_name.to_string(),
        line,
        // Only the name (or the first word): the value is usually a secret.
        text: match text.split_once(':') {
            Some((name, _)) => format!("{}: ...", name.trim()),
            None => format!("{} ...", text.split_whitespace().next().unwrap_or("")),
        },
        reason: reason.to_string(),
    };
    let (name, value) = text.split_once(':').ok_or_else(|| bad("want `Name: value`"))?;
    let (name, value) = (name.trim(), value.trim());
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad("not a valid header name"))?;
    HeaderValue::from_str(value).map_err(|_| bad("not a valid header value (control characters?)"))?;
    Ok((name.to_string(), value.to_string()))
}

/// Headers from a file (at most [`MAX_HEADER_SOURCE_BYTES`]).
pub fn read_header_file(path: &Path) -> Result<Vec<(String, String)>, WebhookError> {
    let file_error = |reason: String| WebhookError::File { path: path.to_path_buf(), reason };
    let size = std::fs::metadata(path).map_err(|e| file_error(e.to_string()))?.len();
    if size > MAX_HEADER_SOURCE_BYTES {
        return Err(file_error(format!("{size} bytes, more than the {MAX_HEADER_SOURCE_BYTES} a header file may hold")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    parse_header_lines(&path.display().to_string(), &text)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, WebhookError> {
    std::fs::read(path).map_err(|e| WebhookError::File { path: path.to_path_buf(), reason: e.to_string() })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, WebhookError> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::File { path: path.to_path_buf(), reason: format!("bad PEM certificate: {e}") })?;
    if certs.is_empty() {
        return Err(WebhookError::File { path: path.to_path_buf(), reason: "no PEM certificate in it".into() });
    }
    Ok(certs)
}

/// The rustls client configuration for an https webhook.
pub fn tls_config(config: &WebhookConfig) -> Result<Arc<ClientConfig>, WebhookError> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| WebhookError::File { path: path.clone(), reason: format!("unusable CA certificate: {e}") })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for err in &found.errors {
                tracing::warn!(%err, "reading the system CA certificates");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(WebhookError::NoSystemRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let client = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let key_pem = read_pem(key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| WebhookError::File { path: key.clone(), reason: format!("no usable PEM private key: {e}") })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| WebhookError::Tls(format!("client certificate: {e}")))?
        }
    };
    Ok(Arc::new(client))
}

/// POSTs each alert to an HTTP(S) endpoint, retrying with exponential backoff.
#[derive(Clone)]
pub struct WebhookExporter {
    tx: mpsc::Sender<Bytes>,
    counters: Arc<ExportCounters>,
    format: ExportFormat,
    metrics: Option<Metrics>,
}

impl WebhookExporter {
    /// Checks the URL and the TLS material, then starts the sender task on the current tokio
    /// runtime. Every configuration error is reported here, before the daemon runs.
    pub fn start(config: WebhookConfig, metrics: Option<Metrics>) -> Result<WebhookExporter, WebhookError> {
        let url = parse_webhook_url(&config.url)?;
        let tls = match url.scheme {
            Scheme::Https => {
                let server_name = ServerName::try_from(url.hostname.clone()).map_err(|_| WebhookError::BadUrl(config.url.clone()))?;
                Some((TlsConnector::from(tls_config(&config)?), server_name))
            }
            Scheme::Http if config.ca_file.is_some() => return Err(WebhookError::TlsOptionWithoutHttps("--webhook-ca")),
            Scheme::Http if config.client_cert.is_some() => return Err(WebhookError::TlsOptionWithoutHttps("--webhook-client-cert")),
            Scheme::Http => None,
        };
        for (i, (name, value)) in config.headers.iter().enumerate() {
            parse_header("webhook headers", i + 1, &format!("{name}: {value}"))?;
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let counters = Arc::new(ExportCounters::default());
        let exporter = WebhookExporter { tx, counters: counters.clone(), format: config.format, metrics: metrics.clone() };
        let sender = Sender { config, url, tls, counters, metrics, kept: None };
        tokio::spawn(sender.run(rx));
        Ok(exporter)
    }

    pub fn offer(&self, alert: &Alert) {
        let body = Bytes::from(format_line(alert, self.format));
        if self.tx.try_send(body).is_err() {
            self.counters.record_dropped("webhook", self.metrics.as_ref());
        }
    }

    pub fn stats(&self) -> ExportStats {
        self.counters.snapshot()
    }
}

#[derive(Debug)]
enum PostError {
    /// Worth trying again: connection trouble, timeouts, 5xx, 429.
    Transient(String),
    /// Not: other 4xx (the receiver will not change its mind).
    Permanent(String),
    /// The TLS handshake failed (certificate not trusted, wrong name, protocol): configuration.
    Tls(String),
}

struct Sender {
    config: WebhookConfig,
    url: WebhookUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    counters: Arc<ExportCounters>,
    metrics: Option<Metrics>,
    /// The connection the last alert went over, if the receiver kept it open.
    kept: Option<KeptConnection>,
}

/// An open HTTP/1.1 connection to the receiver and the task driving it (stopped when dropped).
struct KeptConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    last_used: tokio::time::Instant,
}

impl Drop for KeptConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What one request on a connection came to: the receiver's status and whether the connection
/// can carry the next one.
struct Answer {
    status: hyper::StatusCode,
    reusable: bool,
}

impl Sender {
    fn record(&self, result: &str) {
        if let Some(m) = &self.metrics {
            m.record_export("webhook", result);
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Bytes>) {
        while let Some(body) = rx.recv().await {
            let mut backoff = self.config.initial_backoff;
            let mut attempt = 1;
            loop {
                match self.post_once(body.clone()).await {
                    Ok(()) => {
                        self.counters.sent.fetch_add(1, Ordering::Relaxed);
                        self.record("sent");
                        break;
                    }
                    Err(PostError::Transient(err)) if attempt < self.config.max_attempts => {
                        tracing::debug!(%err, attempt, url = %self.config.url, "webhook post failed; retrying");
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                        self.record("retried");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.config.max_backoff);
                        attempt += 1;
                    }
                    Err(PostError::Tls(err)) => {
                        tracing::error!(%err, url = %self.config.url, "webhook TLS handshake failed; alert not delivered (check --webhook-ca and the receiver's certificate)");
                        self.counters.tls_errors.fetch_add(1, Ordering::Relaxed);
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        self.record("tls_error");
                        break;
                    }
                    Err(PostError::Transient(err) | PostError::Permanent(err)) => {
                        tracing::warn!(%err, attempts = attempt, url = %self.config.url, "webhook gave up on an alert");
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        self.record("failed");
                        break;
                    }
                }
            }
        }
    }

    /// One delivery attempt: over the kept connection if there is a usable one (a stale one is
    /// replaced by a fresh connection within the same attempt), else over a new connection.
    async fn post_once(&mut self, body: Bytes) -> Result<(), PostError> {
        if let Some(mut kept) = self.kept.take().filter(|k| k.last_used.elapsed() < KEEP_IDLE && !k.sender.is_closed()) {
            match tokio::time::timeout(self.config.timeout, self.request(&mut kept.sender, body.clone())).await {
                Ok(Ok(answer)) => return self.finish(answer, kept),
                // Closed under us or silent: the receiver ended it; the alert goes on a new one.
                Ok(Err(err)) => tracing::debug!(?err, "kept webhook connection unusable; opening a new one"),
                Err(_) => tracing::debug!("no answer on the kept webhook connection; opening a new one"),
            }
        }
        let attempt = async {
            let mut kept = self.connect().await?;
            let answer = self.request(&mut kept.sender, body).await?;
            Ok::<_, PostError>((answer, kept))
        };
        match tokio::time::timeout(self.config.timeout, attempt).await {
            Ok(Ok((answer, kept))) => self.finish(answer, kept),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(PostError::Transient(format!("no answer within {:?}", self.config.timeout))),
        }
    }

    /// Keeps the connection if the receiver allows, and judges its answer.
    fn finish(&mut self, answer: Answer, mut connection: KeptConnection) -> Result<(), PostError> {
        if answer.reusable {
            connection.last_used = tokio::time::Instant::now();
            self.kept = Some(connection);
        }
        let status = answer.status;
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            Err(PostError::Transient(format!("HTTP {status}")))
        } else {
            Err(PostError::Permanent(format!("HTTP {status}")))
        }
    }

    /// A new connection (TCP, then TLS for https), HTTP/1.1 handshake done.
    async fn connect(&self) -> Result<KeptConnection, PostError> {
        let stream = tokio::net::TcpStream::connect(&self.url.authority)
            .await
            .map_err(|e| PostError::Transient(format!("connect {}: {e}", self.url.authority)))?;
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        match &self.tls {
            None => handshake(stream).await,
            Some((connector, server_name)) => {
                let stream = connector.connect(server_name.clone(), stream).await.map_err(|e| classify_tls(&e))?;
                handshake(stream).await
            }
        }
    }

    /// Sends the alert and reads the whole answer (so the connection is ready for the next).
    async fn request(&self, sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, body: Bytes) -> Result<Answer, PostError> {
        sender.ready().await.map_err(|e| PostError::Transient(format!("connection: {e}")))?;
        let mut request = hyper::Request::post(self.url.path.as_str())
            .header(hyper::header::HOST, self.url.host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, concat!("palisade/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &self.config.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        let request = request.body(Full::new(body)).map_err(|e| PostError::Permanent(format!("request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| PostError::Transient(format!("send: {e}")))?;
        let status = response.status();
        let closing = response
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        // Its content does not matter; an unfinished body leaves the connection unusable.
        let drained = response.into_body().collect().await.is_ok();
        Ok(Answer { status, reusable: drained && !closing })
    }
}

async fn handshake<S>(stream: S) -> Result<KeptConnection, PostError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| PostError::Transient(format!("handshake: {e}")))?;
    let driver = tokio::spawn(async move {
        // Its end (the receiver closed, or an error) shows as `is_closed` on the sender.
        let _ = conn.await;
    });
    Ok(KeptConnection { sender, driver, last_used: tokio::time::Instant::now() })
}

/// A handshake that rustls refused (certificate, name, protocol) is a configuration error; an
/// I/O error during it (reset, EOF) is the network's and worth a retry.
fn classify_tls(err: &std::io::Error) -> PostError {
    let refused_by_rustls = err.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
    if refused_by_rustls { PostError::Tls(err.to_string()) } else { PostError::Transient(format!("TLS handshake: {err}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_webhook_url("http://127.0.0.1:2801/hook").unwrap();
        assert_eq!((u.authority.as_str(), u.host.as_str(), u.path.as_str()), ("127.0.0.1:2801", "127.0.0.1:2801", "/hook"));
        assert_eq!(u.hostname, "127.0.0.1");
        assert_eq!(parse_webhook_url("http://sidekick").unwrap().authority, "sidekick:80");
        assert_eq!(parse_webhook_url("http://[::1]").unwrap().authority, "[::1]:80");
        let s = parse_webhook_url("https://[::1]:8443/x").unwrap();
        assert_eq!((s.scheme, s.authority.as_str(), s.hostname.as_str()), (Scheme::Https, "[::1]:8443", "::1"));
        let s = parse_webhook_url("https://siem.example").unwrap();
        assert_eq!((s.authority.as_str(), s.hostname.as_str(), s.path.as_str()), ("siem.example:443", "siem.example", "/"));
        for bad in ["ftp://x", "http://u:p@x/", "https://", "http://[]/", "https://x/a b"] {
            assert!(parse_webhook_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_lines_name_the_line_and_hide_the_value() {
        let ok = parse_header_lines("h", "# token\n\nAuthorization: Bearer s3cret\nX-Tenant:  a \n").unwrap();
        assert_eq!(ok, vec![("Authorization".into(), "Bearer s3cret".into()), ("X-Tenant".into(), "a".into())]);
        let err = parse_header_lines("/run/secrets/h", "X-A: 1\nAuthorization Bearer s3cret\n").unwrap_err().to_string();
        assert!(err.starts_with("/run/secrets/h:2:"), "{err}");
        assert!(!err.contains("s3cret"), "the secret leaked into the error: {err}");
        let err = parse_header_lines("env", "Bad Name: x").unwrap_err().to_string();
        assert!(err.contains("header name"), "{err}");
        let err = parse_header_lines("env", "X-A: a\u{7}b").unwrap_err().to_string();
        assert!(err.contains("header value"), "{err}");
    }
}
