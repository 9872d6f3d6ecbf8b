//! The webhook exporter against a local HTTP server on 127.0.0.1: retries with backoff on
//! 5xx, no retry on 4xx, and queue overflow counted when the receiver stalls.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade::alerts::export::{ExportFormat, WebhookConfig, WebhookExporter};
use palisade::alerts::schema::{Alert, AlertKind};
use palisade::api::Metrics;
use palisade::rules::model::Severity;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

#[derive(Default)]
struct Seen {
    requests: Vec<(String, String)>,
}

/// Answers each request with the next status in `statuses` (the last one repeats); with
/// `stall`, reads requests and never answers.
async fn test_server(statuses: Vec<u16>, stall: bool) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/falco", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let status = statuses[n.min(statuses.len() - 1)];
            n += 1;
            let seen = shared.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers, then the body by content-length.
                let (head, body) = loop {
                    let got = stream.read(&mut chunk).await.unwrap_or(0);
                    if got == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..got]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                            .unwrap_or(0);
                        if body.len() >= len {
                            break (head.to_string(), body.to_string());
                        }
                    }
                };
                seen.lock().unwrap().requests.push((head, body));
                if stall {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    (url, seen)
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
