//! The metrics endpoint, scraped over TCP and read back with a Prometheus text-format parser;
//! and the alert writer's own metrics.
use std::collections::BTreeMap;
use std::time::Duration;

use palisade::alerts::schema::{Alert, AlertKind};
use palisade::alerts::{AlertLog, AlertLogConfig};
use palisade::api::Metrics;
use palisade::rules::model::Severity;
use prometheus_parse::{Sample, Scrape, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn scrape(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

fn value_of(samples: &[Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric}{labels:?} in {samples:#?}"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric} is {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_parses_as_prometheus_text() {
    let metrics = Metrics::new();
    for _ in 0..3 {
        metrics.record_event("exec");
    }
    metrics.observe_kernel_counters(
        &BTreeMap::from([("open".to_string(), 10)]),
        &BTreeMap::from([("open".to_string(), 2)]),
    );
    metrics.observe_kernel_counters(
        &BTreeMap::from([("open".to_string(), 25)]),
        &BTreeMap::from([("open".to_string(), 2)]),
    );
    metrics.observe_evaluation(Duration::from_micros(40));
    metrics.observe_evaluation(Duration::from_millis(3));
    metrics.set_quarantines_active(2);
    metrics.record_quarantine();
    metrics.record_quarantine();
    metrics.record_release();
    metrics.add_policy_drops("egress", "policy", 5);
    metrics.observe_policy_drop_total("ingress", "quarantine", 7);
    metrics.observe_map_sync("policy", Duration::from_millis(2));
    metrics.record_rule_reload(true);
    metrics.record_rule_reload(false);

    // Alerts written by the writer are counted by kind, rule and severity.
    let dir = std::env::temp_dir().join(format!("palisade-metrics-{}", std::process::id()));
    let mut config = AlertLogConfig::new(&dir, "n");
    config.metrics = Some(metrics.clone());
    let (log, sink) = AlertLog::start(config).unwrap();
    sink.emit(Alert::new(AlertKind::Rule, Severity::High, "x").with_rule("shell_in_container", "Shell")).await.unwrap();
    sink.emit(Alert::new(AlertKind::Rule, Severity::High, "y").with_rule("shell_in_container", "Shell").with_pod(
        palisade::alerts::PodInfo { namespace: "a".into(), name: "b".into(), labels: Default::default() },
    ))
    .await
    .unwrap();
    log.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let listener = palisade::api::metrics::bind_metrics("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let health = palisade::api::health_provider(|| async { palisade::api::Health { ok: true, ready: true, report: serde_json::json!({"status": "ok"}) } });
    let server = tokio::spawn(palisade::api::metrics::serve_metrics_on(listener, metrics.clone(), health, Default::default()));
    let (head, body) = scrape(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");

    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses as Prometheus text");
    let s = &parsed.samples;
    assert_eq!(value_of(s, "palisade_events_total", &[("type", "exec")]), 3.0);
    assert_eq!(value_of(s, "palisade_events_total", &[("type", "open")]), 25.0, "kernel totals become increments");
    assert_eq!(value_of(s, "palisade_events_lost_total", &[("type", "open")]), 2.0);
    assert_eq!(value_of(s, "palisade_alerts_total", &[("rule", "shell_in_container"), ("severity", "high"), ("kind", "rule")]), 2.0);
    assert_eq!(value_of(s, "palisade_quarantines_active", &[]), 2.0);
    assert_eq!(value_of(s, "palisade_quarantines_total", &[]), 2.0);
    assert_eq!(value_of(s, "palisade_quarantine_releases_total", &[]), 1.0);
    assert_eq!(value_of(s, "palisade_policy_drops_total", &[("direction", "egress"), ("reason", "policy")]), 5.0);
    assert_eq!(value_of(s, "palisade_policy_drops_total", &[("direction", "ingress"), ("reason", "quarantine")]), 7.0);
    assert_eq!(value_of(s, "palisade_rule_reloads_total", &[("result", "failed")]), 1.0);
    assert_eq!(value_of(s, "palisade_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);

    let histogram = s.iter().find(|x| x.metric == "palisade_rule_evaluation_seconds").expect("evaluation histogram");
    let Value::Histogram(buckets) = &histogram.value else { panic!("{histogram:?}") };
    let le_100us = buckets.iter().find(|b| (b.less_than - 0.00016).abs() < 1e-9).expect("a 160 µs bucket");
    assert_eq!(le_100us.count, 1.0, "one observation at or below 160 µs");
    assert_eq!(buckets.last().unwrap().count, 2.0);
    assert!(s.iter().any(|x| x.metric == "palisade_map_sync_seconds" && x.labels.get("map") == Some("policy")));

    let (head, _) = scrape(addr, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    server.abort();
}
