//! The metrics/health listener holds up against hostile clients on its TCP address: slow-loris
//! connections (headers dribbled a byte at a time) are closed after the header timeout, a flood
//! of idle connections is held to the connection cap (the oldest closed to make room), and
//! `/healthz` keeps answering throughout, with the report of its health provider (readers,
//! watchers, last sync) rather than a constant "ok". Every close is counted in the metrics.
//! Loopback only; no root needed.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use palisade::api::metrics::{bind_metrics, serve_metrics_on};
use palisade::api::{Health, ListenerLimits, Metrics, health_provider};
use serde_json::{Value, json};

/// One `GET path` on a fresh connection; (status line, body). A hang is a failure, reported
/// after 10 s (a bound, not a timed assertion).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nhost: palisade\r\nconnection: close\r\n\r\n").expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap_or_else(|e| panic!("GET {path}: no complete answer: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// Whether the server closed `stream` (EOF or reset) within `within`.
fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

fn counter(body: &str, reason: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with("palisade_http_connections_closed_total{") && l.contains(&format!("reason=\"{reason}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn healthz_keeps_answering_through_slow_loris_and_a_connection_flood() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let metrics = Metrics::new();
    let limits = ListenerLimits { max_connections: 16, header_timeout: Duration::from_secs(1), connection_timeout: Duration::from_secs(20) };
    let health = health_provider(|| async {
        Health { ok: true, ready: true, report: json!({"status": "ok", "readers": {"running": true}, "watchers": {"source": "test"}, "last_sync": {"at": "t0"}}) }
    });
    let addr = runtime.block_on(async {
        let listener = bind_metrics("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(serve_metrics_on(listener, metrics.clone(), health, limits));
        addr
    });

    // /healthz is the provider's report, as JSON.
    let (status, body) = get(addr, "/healthz");
    assert!(status.contains(" 200 "), "{status}");
    let report: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("/healthz is not JSON ({e}): {body}"));
    assert_eq!((report["status"].as_str(), report["readers"]["running"].as_bool()), (Some("ok"), Some(true)), "{report}");
    assert!(report.get("watchers").is_some() && report.get("last_sync").is_some(), "{report}");

    // Slow-loris: eight clients dribble one header byte every 200 ms and never finish.
    let mut loris: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    let started = Instant::now();
    let request = b"GET /metrics HTTP/1.1\r\nhost: palisade\r\nx-slow: ";
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for stream in &mut loris {
            let _ = stream.write_all(&request[sent % request.len()..sent % request.len() + 1]);
        }
        sent += 1;
        // The health check is answered meanwhile.
        assert!(get(addr, "/healthz").0.contains(" 200 "), "/healthz during slow-loris");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Each was cut off by the header timeout (1 s), not left holding a connection.
    for (i, stream) in loris.iter_mut().enumerate() {
        assert!(closed_by_server(stream, Duration::from_secs(5)), "slow-loris connection {i} still open after the header timeout");
    }

    // Flood: 200 idle connections, far over the cap of 16.
    let mut flood: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).expect("connect")).collect();
    // The health check still gets through (it evicts the oldest idle connection).
    for _ in 0..5 {
        let (status, body) = get(addr, "/healthz");
        assert!(status.contains(" 200 ") && body.contains("readers"), "/healthz during the flood: {status}");
    }
    // The server holds at most the cap: all but the newest few of the flood were closed.
    let closed = flood.iter_mut().map(|s| closed_by_server(s, Duration::from_millis(300))).filter(|c| *c).count();
    assert!(closed >= 200 - limits.max_connections, "only {closed} of 200 flood connections closed; the cap is {}", limits.max_connections);

    // Both kinds of close are counted where an operator sees them.
    let (_, body) = get(addr, "/metrics");
    assert!(counter(&body, "header_timeout") >= 8.0, "header timeouts not counted:\n{body}");
    // An idle flood connection is closed by whichever comes first: eviction at the cap, or the
    // header timeout (no request ever started on it).
    let evicted = counter(&body, "evicted");
    assert!(evicted > 0.0, "evictions not counted:\n{body}");
    assert!(
        evicted + counter(&body, "header_timeout") >= (8 + 200 - limits.max_connections) as f64,
        "not every close counted:\n{body}"
    );
    drop(runtime);
}
