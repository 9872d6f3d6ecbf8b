//! The webhook exporter against a local HTTP(S) server on 127.0.0.1: retries with backoff on
//! 5xx, no retry on 4xx, queue overflow counted when the receiver stalls; over HTTPS with a test
//! CA: delivered with the right CA (and a client certificate where the receiver asks for one),
//! refused loudly and counted with a wrong one; one kept connection for a burst, replaced without
//! loss when the receiver closes it under a request.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::alerts::export::ExportFormat;
use palisade::alerts::webhook::{WebhookConfig, WebhookExporter};
use palisade::alerts::schema::{Alert, AlertKind};
use palisade::api::Metrics;
use palisade::rules::model::Severity;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[path = "support/tls.rs"]
mod tls;
use tls::TestCa;

#[derive(Default)]
struct Seen {
    requests: Vec<(String, String)>,
    handshake_errors: Vec<String>,
    /// Connections accepted.
    connections: usize,
}

/// How the test receiver treats a connection.
#[derive(Clone, Copy, Default)]
struct Receiver {
    /// Read requests and never answer.
    stall: bool,
    /// Answer without `connection: close` and read the next request on the same connection.
    keep_alive: bool,
    /// With `keep_alive`: after this many answers on a connection, read the next request and
    /// close without answering (a receiver timing out an idle connection as a request arrives).
    drop_after: Option<usize>,
}

/// Answers each request with the next status in `statuses` (the last one repeats); with
/// `stall`, reads requests and never answers. One request per connection.
async fn test_server(statuses: Vec<u16>, stall: bool) -> (String, Arc<Mutex<Seen>>) {
    serve(statuses, Receiver { stall, ..Receiver::default() }, None).await
}

/// The same over TLS, presenting `acceptor`'s certificate: `https://localhost:PORT/falco`.
async fn tls_server(statuses: Vec<u16>, acceptor: TlsAcceptor) -> (String, Arc<Mutex<Seen>>) {
    serve(statuses, Receiver::default(), Some(acceptor)).await
}

async fn serve(statuses: Vec<u16>, receiver: Receiver, tls: Option<TlsAcceptor>) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = match tls {
        Some(_) => format!("https://localhost:{port}/falco"),
        None => format!("http://127.0.0.1:{port}/falco"),
    };
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    let statuses = Arc::new(statuses);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            shared.lock().unwrap().connections += 1;
            let seen = shared.clone();
            let tls = tls.clone();
            let statuses = statuses.clone();
            tokio::spawn(async move {
                match tls {
                    None => answer(stream, &statuses, receiver, seen).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => answer(stream, &statuses, receiver, seen).await,
                        Err(err) => seen.lock().unwrap().handshake_errors.push(err.to_string()),
                    },
                }
            });
        }
    });
    (url, seen)
}

/// Serves the requests of one connection; the status of each is the next of `statuses` by the
/// receiver's request count.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, statuses: &[u16], receiver: Receiver, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut answered = 0usize;
    loop {
        // Read headers, then the body by content-length.
        let (head, body, used) = loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                    .unwrap_or(0);
                if rest.len() >= len {
                    break (head.to_string(), rest[..len].to_string(), head.len() + 4 + len);
                }
            }
            let got = stream.read(&mut chunk).await.unwrap_or(0);
            if got == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..got]);
        };
        buf.drain(..used);
        let n = {
            let mut seen = seen.lock().unwrap();
            seen.requests.push((head, body));
            seen.requests.len() - 1
        };
        if receiver.stall {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        if receiver.drop_after.is_some_and(|limit| answered >= limit) {
            return;
        }
        let status = statuses[n.min(statuses.len() - 1)];
        if !receiver.keep_alive {
            let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            return;
        }
        let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        answered += 1;
    }
}

fn config(url: &str) -> WebhookConfig {
    let mut c = WebhookConfig::new(url);
    c.initial_backoff = Duration::from_millis(20);
    c.max_backoff = Duration::from_millis(100);
    c.timeout = Duration::from_secs(5);
    c
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn alert(n: u32) -> Alert {
    Alert::new(AlertKind::Rule, Severity::High, format!("alert {n}")).with_rule("shell_in_container", "Shell in container")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_until_accepted() {
    let (url, seen) = test_server(vec![503, 500, 200], false).await;
    let mut c = config(&url);
    c.format = ExportFormat::Falco;
    c.headers = vec![("Authorization".into(), "Bearer t".into())];
    let metrics = Metrics::new();
    let hook = WebhookExporter::start(c, Some(metrics.clone())).unwrap();
    let started = std::time::Instant::now();
    hook.offer(&alert(1));
    wait_for("delivery", || hook.stats().sent == 1).await;
    let stats = hook.stats();
    assert_eq!((stats.sent, stats.retried, stats.failed, stats.dropped), (1, 2, 0, 0), "{stats:?}");
    assert!(started.elapsed() >= Duration::from_millis(60), "backoff 20 ms then 40 ms");
    let requests = &seen.lock().unwrap().requests;
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|(_, body)| body == &requests[0].1), "the same alert each time");
    let (head, body) = &requests[0];
    assert!(head.starts_with("POST /falco HTTP/1.1"), "{head}");
    assert!(head.to_ascii_lowercase().contains("authorization: bearer t"), "{head}");
    let falco: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(falco["rule"], "Shell in container");
    assert_eq!(falco["priority"], "Error");
    assert!(metrics.encode().contains("palisade_exports_total{exporter=\"webhook\",result=\"retried\"} 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_not_retried_and_attempts_are_bounded() {
    let (url, seen) = test_server(vec![400], false).await;
    let hook = WebhookExporter::start(config(&url), None).unwrap();
    hook.offer(&alert(1));
    wait_for("failure", || hook.stats().failed == 1).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 1);

    let (url, seen) = test_server(vec![503], false).await;
    let mut c = config(&url);
    c.max_attempts = 3;
    let hook = WebhookExporter::start(c, None).unwrap();
    hook.offer(&alert(2));
    wait_for("giving up", || hook.stats().failed == 1).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 3);
    assert_eq!(hook.stats().retried, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_receiver_overflows_the_bounded_queue_and_it_is_counted() {
    let (url, seen) = test_server(vec![200], true).await;
    let mut c = config(&url);
    c.queue_capacity = 3;
    c.timeout = Duration::from_secs(30);
    let metrics = Metrics::new();
    let hook = WebhookExporter::start(c, Some(metrics.clone())).unwrap();
    hook.offer(&alert(0));
    // The sender takes the first alert and stalls on it; then the queue holds 3.
    wait_for("the first post", || seen.lock().unwrap().requests.len() == 1).await;
    for n in 1..=10 {
        hook.offer(&alert(n));
    }
    let stats = hook.stats();
    assert_eq!(stats.dropped, 7, "{stats:?}");
    assert_eq!(stats.sent, 0);
    assert!(metrics.encode().contains("palisade_exports_total{exporter=\"webhook\",result=\"dropped\"} 7"));
}

/// A burst of alerts costs one connection (and one TLS handshake), not one each: before, every
/// alert opened its own, so a receiver behind a TLS terminator paid a handshake per alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_alerts_goes_over_one_kept_connection() {
    let keep_alive = Receiver { keep_alive: true, ..Receiver::default() };
    let (url, seen) = serve(vec![200], keep_alive, None).await;
    let hook = WebhookExporter::start(config(&url), None).unwrap();
    for n in 0..50 {
        hook.offer(&alert(n));
    }
    wait_for("50 deliveries", || hook.stats().sent == 50).await;
    let stats = hook.stats();
    assert_eq!((stats.sent, stats.retried, stats.failed, stats.dropped, stats.connections), (50, 0, 0, 0, 1), "{stats:?}");
    assert_eq!(seen.lock().unwrap().connections, 1);

    let dir = temp_dir("keep-alive-tls");
    let ca = TestCa::new("palisade test CA");
    let (url, seen) = serve(vec![200], keep_alive, Some(ca.acceptor(None))).await;
    let mut c = config(&url);
    c.ca_file = Some(ca.write_pem(&dir, "ca.pem"));
    let hook = WebhookExporter::start(c, None).unwrap();
    for n in 0..20 {
        hook.offer(&alert(n));
    }
    wait_for("20 deliveries over https", || hook.stats().sent == 20).await;
    assert_eq!(hook.stats().connections, 1, "{:?}", hook.stats());
    let seen = seen.lock().unwrap();
    assert_eq!((seen.connections, seen.requests.len()), (1, 20));
    assert!(seen.handshake_errors.is_empty(), "{:?}", seen.handshake_errors);
}

/// A receiver that closes a kept connection as the next request arrives (its idle timeout)
/// loses no alert, and that is not a retry: the alert goes out at once on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_closed_by_the_receiver_is_replaced_without_losing_an_alert() {
    let receiver = Receiver { keep_alive: true, drop_after: Some(3), ..Receiver::default() };
    let (url, seen) = serve(vec![200], receiver, None).await;
    let mut c = config(&url);
    c.max_attempts = 1;
    let hook = WebhookExporter::start(c, None).unwrap();
    for n in 0..10 {
        hook.offer(&alert(n));
    }
    wait_for("10 deliveries", || hook.stats().sent == 10 || hook.stats().failed > 0).await;
    let stats = hook.stats();
    // Three answered per connection, the fourth request dropped and sent again on the next:
    // a1-a3 | a4-a6 | a7-a9 | a10.
    assert_eq!((stats.sent, stats.retried, stats.failed, stats.connections), (10, 0, 0, 4), "{stats:?}");
    let seen = seen.lock().unwrap();
    assert_eq!((seen.connections, seen.requests.len()), (4, 13));
    let bodies: std::collections::BTreeSet<&String> = seen.requests.iter().map(|(_, body)| body).collect();
    assert_eq!(bodies.len(), 10, "every alert reached the receiver");
}

/// A 5xx on a kept connection is the receiver's answer, retried with backoff like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_on_a_kept_connection_are_retried() {
    let receiver = Receiver { keep_alive: true, ..Receiver::default() };
    let (url, seen) = serve(vec![200, 503, 200], receiver, None).await;
    let hook = WebhookExporter::start(config(&url), None).unwrap();
    hook.offer(&alert(1));
    hook.offer(&alert(2));
    wait_for("2 deliveries", || hook.stats().sent == 2).await;
    let stats = hook.stats();
    assert_eq!((stats.sent, stats.retried, stats.failed, stats.connections), (2, 1, 0, 1), "{stats:?}");
    assert_eq!(seen.lock().unwrap().requests.len(), 3);
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-webhook-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_delivers_with_the_operators_ca_and_headers_from_a_file() {
    let dir = temp_dir("https-ok");
    let ca = TestCa::new("palisade test CA");
    let (url, seen) = tls_server(vec![200], ca.acceptor(None)).await;
    let header_file = dir.join("headers");
    std::fs::write(&header_file, "# from a Secret\nAuthorization: Bearer s3cret\n").unwrap();
    let options = options_for(&url, &[("--webhook-ca", ca.write_pem(&dir, "ca.pem")), ("--webhook-header-file", header_file)]);
    let mut c = config(&url);
    c.ca_file = options.webhook_ca.clone();
    c.headers = options.webhook_headers(Some("X-Tenant: blue")).unwrap();
    let metrics = Metrics::new();
    let hook = WebhookExporter::start(c, Some(metrics.clone())).unwrap();
    hook.offer(&alert(1));
    wait_for("delivery over TLS", || hook.stats().sent == 1).await;
    let seen = seen.lock().unwrap();
    assert!(seen.handshake_errors.is_empty(), "{:?}", seen.handshake_errors);
    let head = seen.requests[0].0.to_ascii_lowercase();
    assert!(head.starts_with("post /falco http/1.1"), "{head}");
    assert!(head.contains("authorization: bearer s3cret"), "header file not used: {head}");
    assert!(head.contains("x-tenant: blue"), "PALISADE_WEBHOOK_HEADERS not used: {head}");
    assert!(head.contains("host: localhost:"), "{head}");
    assert_eq!(hook.stats().tls_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_wrong_ca_fails_loudly_is_counted_and_not_retried() {
    let dir = temp_dir("https-wrong-ca");
    let ca = TestCa::new("the receiver's CA");
    let other = TestCa::new("some other CA");
    let (url, seen) = tls_server(vec![200], ca.acceptor(None)).await;
    let mut c = config(&url);
    c.ca_file = Some(other.write_pem(&dir, "other.pem"));
    let metrics = Metrics::new();
    let hook = WebhookExporter::start(c, Some(metrics.clone())).unwrap();
    hook.offer(&alert(1));
    wait_for("the TLS failure", || hook.stats().failed == 1).await;
    let stats = hook.stats();
    assert_eq!((stats.sent, stats.tls_errors, stats.retried), (0, 1, 0), "{stats:?}");
    assert!(seen.lock().unwrap().requests.is_empty(), "nothing may be sent to an unverified receiver");
    assert!(metrics.encode().contains("palisade_exports_total{exporter=\"webhook\",result=\"tls_error\"} 1"), "{}", metrics.encode());

    // A certificate for another name, from the right CA, fails the same way.
    let (url, seen) = tls_server(vec![200], TlsAcceptor::from(ca.server_for(&["other.example"], None))).await;
    let mut c = config(&url);
    c.ca_file = Some(ca.write_pem(&dir, "ca.pem"));
    let hook = WebhookExporter::start(c, None).unwrap();
    hook.offer(&alert(2));
    wait_for("the name mismatch", || hook.stats().failed == 1).await;
    assert_eq!(hook.stats().tls_errors, 1, "{:?}", hook.stats());
    assert!(seen.lock().unwrap().requests.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_certificate_is_presented_when_the_receiver_asks() {
    let dir = temp_dir("https-mtls");
    let ca = TestCa::new("server CA");
    let clients = TestCa::new("client CA");
    let leaf = clients.leaf(&["palisade-node-a"]);
    std::fs::write(dir.join("client.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &leaf.key_pem).unwrap();

    let (url, seen) = tls_server(vec![200], ca.acceptor(Some(&clients))).await;
    let mut c = config(&url);
    c.ca_file = Some(ca.write_pem(&dir, "ca.pem"));
    c.client_cert = Some((dir.join("client.pem"), dir.join("client.key")));
    let hook = WebhookExporter::start(c.clone(), None).unwrap();
    hook.offer(&alert(1));
    wait_for("delivery with a client certificate", || hook.stats().sent == 1).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 1);

    // Without one, the receiver refuses: nothing delivered, the failure counted.
    let (url, seen) = tls_server(vec![200], ca.acceptor(Some(&clients))).await;
    let mut c = config(&url);
    c.ca_file = Some(ca.write_pem(&dir, "ca.pem"));
    c.max_attempts = 2;
    let hook = WebhookExporter::start(c, None).unwrap();
    hook.offer(&alert(2));
    wait_for("the refusal", || hook.stats().failed == 1).await;
    assert_eq!(hook.stats().sent, 0);
    let seen = seen.lock().unwrap();
    assert!(seen.requests.is_empty());
    assert!(!seen.handshake_errors.is_empty(), "the receiver saw no handshake failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_configuration_errors_are_refused_at_start_naming_the_file() {
    let dir = temp_dir("https-config");
    let missing = dir.join("no-such-ca.pem");
    let mut c = config("https://localhost:1/x");
    c.ca_file = Some(missing.clone());
    let err = WebhookExporter::start(c, None).err().expect("a missing CA file must be refused").to_string();
    assert!(err.contains("no-such-ca.pem"), "{err}");

    std::fs::write(dir.join("junk.pem"), "not a certificate").unwrap();
    let mut c = config("https://localhost:1/x");
    c.ca_file = Some(dir.join("junk.pem"));
    let err = WebhookExporter::start(c, None).err().expect("junk refused").to_string();
    assert!(err.contains("junk.pem") && err.contains("no PEM certificate"), "{err}");

    // TLS options with plain http would silently send in clear text: refused.
    let ca = TestCa::new("ca");
    let mut c = config("http://127.0.0.1:1/x");
    c.ca_file = Some(ca.write_pem(&dir, "ca.pem"));
    let err = WebhookExporter::start(c, None).err().expect("CA with http refused").to_string();
    assert!(err.contains("https"), "{err}");

    let header_file = dir.join("bad-headers");
    std::fs::write(&header_file, "X-Ok: 1\nAuthorization Bearer s3cret\n").unwrap();
    let options = options_for("https://localhost:1/x", &[("--webhook-header-file", header_file)]);
    let err = options.webhook_headers(None).unwrap_err().to_string();
    assert!(err.contains("bad-headers:2:"), "{err}");
    assert!(!err.contains("s3cret"), "the secret is echoed: {err}");
}

/// `AlertOptions` as `palisade run` parses them.
fn options_for(url: &str, flags: &[(&str, std::path::PathBuf)]) -> palisade::alerts::AlertOptions {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        alerts: palisade::alerts::AlertOptions,
    }
    let mut argv = vec!["palisade".to_string(), "--webhook".into(), url.to_string()];
    for (flag, path) in flags {
        argv.push(flag.to_string());
        argv.push(path.display().to_string());
    }
    Cli::try_parse_from(argv).expect("options parse").alerts
}
