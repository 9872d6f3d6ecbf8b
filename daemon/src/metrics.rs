//! Prometheus metrics: one registry handle every stage records into (cheap to clone, safe from
//! any task or thread). It imports neither `alerts` nor `api`: callers pass names and numbers
//! (conntrack usage aside, a plain segmentation value), so any stage may record into it without
//! an arrow running back up the data flow. `api::metrics` serves it over HTTP.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Default metrics address: loopback only, so nothing off the node can scrape it unless asked.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn latency_histogram() -> Histogram {
    // 5 µs .. ~2.6 s
    Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
}

fn sync_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

struct Inner {
    registry: Registry,
    events: Family<Labels, Counter>,
    events_lost: Family<Labels, Counter>,
    events_lost_by_pod: Family<Labels, Counter>,
    evaluation: Histogram,
    alerts: Family<Labels, Counter>,
    alerts_dropped: Counter,
    alert_write_errors: Counter,
    quarantines_active: Gauge,
    quarantines_pending: Gauge,
    quarantines: Counter,
    releases: Counter,
    kube_quarantine_errors: Counter,
    policy_drops: Family<Labels, Counter>,
    map_sync: Family<Labels, Histogram, fn() -> Histogram>,
    rule_reloads: Family<Labels, Counter>,
    rule_errors: Family<Labels, Counter>,
    rule_rejudged: Counter,
    rule_unjudged: Family<Labels, Counter>,
    exports: Family<Labels, Counter>,
    conntrack_entries: Family<Labels, Gauge>,
    conntrack_drops: Family<Labels, Counter>,
    connections_closed: Family<Labels, Counter>,
    datapath_sync_failing: Gauge,
    watchers_connected: Family<Labels, Gauge>,
    stage_stuck: Family<Labels, Gauge>,
    /// Last absolute value seen per kernel counter, to turn totals read from maps into increments.
    kernel_totals: Mutex<HashMap<(&'static str, String), u64>>,
}

/// The daemon's metrics registry; cheap to clone, safe to record into from any task.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    // Long (~110 lines) by design: every metric registered in one place, name and help text
    // side by side, so the list reads as the metrics' reference.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("palisade");
        let events = Family::<Labels, Counter>::default();
        let events_lost = Family::<Labels, Counter>::default();
        let events_lost_by_pod = Family::<Labels, Counter>::default();
        let evaluation = latency_histogram();
        let alerts = Family::<Labels, Counter>::default();
        let alerts_dropped = Counter::default();
        let alert_write_errors = Counter::default();
        let quarantines_active = Gauge::default();
        let quarantines_pending = Gauge::default();
        let quarantines = Counter::default();
        let releases = Counter::default();
        let kube_quarantine_errors = Counter::default();
        let policy_drops = Family::<Labels, Counter>::default();
        let map_sync = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(sync_histogram as fn() -> Histogram);
        let rule_reloads = Family::<Labels, Counter>::default();
        let rule_errors = Family::<Labels, Counter>::default();
        let rule_rejudged = Counter::default();
        let rule_unjudged = Family::<Labels, Counter>::default();
        let exports = Family::<Labels, Counter>::default();
        let conntrack_entries = Family::<Labels, Gauge>::default();
        let conntrack_drops = Family::<Labels, Counter>::default();
        let connections_closed = Family::<Labels, Counter>::default();
        let datapath_sync_failing = Gauge::default();
        let watchers_connected = Family::<Labels, Gauge>::default();
        let stage_stuck = Family::<Labels, Gauge>::default();
        registry.register("events", "Kernel events received, by type", events.clone());
        registry.register("events_lost", "Kernel events lost (ring buffer full), by type", events_lost.clone());
        registry.register(
            "events_lost_by_pod",
            "Events that did not reach the rules, by pod, kind and reason (ring_full, pod_budget, queue_full; demoted: protected events past the pod's priority share, not lost)",
            events_lost_by_pod.clone(),
        );
        registry.register("rule_evaluation_seconds", "Time to evaluate the rule pack on one event", evaluation.clone());
        registry.register("alerts", "Alerts written, by kind, rule and severity", alerts.clone());
        registry.register("alerts_dropped", "Alerts dropped because the alert queue was full", alerts_dropped.clone());
        registry.register("alert_write_errors", "Alerts that could not be written to the alert log", alert_write_errors.clone());
        registry.register("quarantines_active", "Pods quarantined now", quarantines_active.clone());
        registry.register("quarantines_pending", "Quarantines queued by the rate limit, not enforced yet", quarantines_pending.clone());
        registry.register("quarantines", "Quarantines applied", quarantines.clone());
        registry.register("quarantine_releases", "Quarantines released", releases.clone());
        registry.register(
            "kube_quarantine_errors",
            "Kubernetes mode: failures writing Quarantine objects or acting on them",
            kube_quarantine_errors.clone(),
        );
        registry.register("policy_drops", "Packets dropped by segmentation policy or quarantine, by direction and reason", policy_drops.clone());
        registry.register("map_sync_seconds", "Time to sync a set of eBPF maps, by map", map_sync.clone());
        registry.register("rule_reloads", "Rule pack loads and reloads, by result (ok, failed)", rule_reloads.clone());
        registry.register("rule_errors", "Rules that could not judge an event, by rule and reason (budget, timeout, error)", rule_errors.clone());
        registry.register(
            "rule_rejudged",
            "Rule runs repeated because the wall clock ran out before the rule had used its CPU time budget (the evaluating thread waited for a CPU)",
            rule_rejudged.clone(),
        );
        registry.register(
            "rule_unjudged",
            "Protected events a rule could not judge, each alerted at the rule's severity, by rule and reason (budget, timeout, error)",
            rule_unjudged.clone(),
        );
        registry.register("exports", "Alert exports, by exporter and result (sent, failed, dropped)", exports.clone());
        registry.register("conntrack_entries", "Connection-tracking entries held, by pod", conntrack_entries.clone());
        registry.register(
            "conntrack_drops",
            "New flows refused for lack of conntrack room, by pod and reason (quota: the pod's own quota; table_full: the node's table)",
            conntrack_drops.clone(),
        );
        registry.register(
            "http_connections_closed",
            "HTTP connections the daemon closed on the client, by listener and reason (evicted at the connection cap, header_timeout, connection_timeout)",
            connections_closed.clone(),
        );
        registry.register(
            "datapath_sync_failing",
            "1 while the last datapath sync failed (the last good state stays enforced), 0 after a good one",
            datapath_sync_failing.clone(),
        );
        registry.register(
            "watchers_connected",
            "1 while the source's watches are connected (Kubernetes mode), by source",
            watchers_connected.clone(),
        );
        registry.register(
            "stage_stuck",
            "1 while a stage (reader, pipeline) sits on waiting work without moving past --stuck-after (/healthz answers 503), by stage",
            stage_stuck.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        build.get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))])).set(1);
        registry.register("build_info", "palisade build", build);
        Metrics {
            inner: Arc::new(Inner {
                registry,
                events,
                events_lost,
                events_lost_by_pod,
                evaluation,
                alerts,
                alerts_dropped,
                alert_write_errors,
                quarantines_active,
                quarantines_pending,
                quarantines,
                releases,
                kube_quarantine_errors,
                policy_drops,
                map_sync,
                rule_reloads,
                rule_errors,
                rule_rejudged,
                rule_unjudged,
                exports,
                conntrack_entries,
                conntrack_drops,
                connections_closed,
                datapath_sync_failing,
                watchers_connected,
                stage_stuck,
                kernel_totals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// One event of `event_type` reached userspace.
    pub fn record_event(&self, event_type: &str) {
        self.inner.events.get_or_create(&labels(&[("type", event_type)])).inc();
    }

    /// Adds `count` to a pod's loss counter (the caller turns kernel totals into increments).
    pub fn record_pod_events_lost(&self, pod: &str, kind: &str, reason: &str, count: u64) {
        self.inner
            .events_lost_by_pod
            .get_or_create(&labels(&[("pod", pod), ("kind", kind), ("reason", reason)]))
            .inc_by(count);
    }

    pub fn record_events_lost(&self, event_type: &str, count: u64) {
        self.inner.events_lost.get_or_create(&labels(&[("type", event_type)])).inc_by(count);
    }

    /// Feeds the kernel's per-type totals (e.g. `ProbeStatus.counters`): the increase since the
    /// last call is added, so the daemon can poll the maps instead of counting every event.
    pub fn observe_kernel_counters(
        &self,
        emitted: &std::collections::BTreeMap<String, u64>,
        lost: &std::collections::BTreeMap<String, u64>,
    ) {
        for (kind, total) in emitted {
            let delta = self.kernel_delta("emitted", kind, *total);
            self.inner.events.get_or_create(&labels(&[("type", kind)])).inc_by(delta);
        }
        for (kind, total) in lost {
            let delta = self.kernel_delta("lost", kind, *total);
            self.inner.events_lost.get_or_create(&labels(&[("type", kind)])).inc_by(delta);
        }
    }

    /// Same for policy drops read as totals from the kernel (direction: ingress/egress).
    pub fn observe_policy_drop_total(&self, direction: &str, reason: &str, total: u64) {
        let delta = self.kernel_delta("policy_drops", &format!("{direction}/{reason}"), total);
        self.add_policy_drops(direction, reason, delta);
    }

    fn kernel_delta(&self, family: &'static str, key: &str, total: u64) -> u64 {
        let Ok(mut last) = self.inner.kernel_totals.lock() else { return 0 };
        let previous = last.insert((family, key.to_string()), total).unwrap_or(0);
        // A smaller total means the counter restarted (maps recreated): count it from zero.
        if total >= previous { total - previous } else { total }
    }

    /// Per-pod conntrack counts read from the kernel (entries now; drops as totals).
    pub fn observe_conntrack(&self, pods: &[(String, crate::segmentation::conntrack::PodUsage)]) {
        self.inner.conntrack_entries.clear();
        for (pod, usage) in pods {
            self.inner.conntrack_entries.get_or_create(&labels(&[("pod", pod)])).set(usage.entries as i64);
            for (reason, total) in [("quota", usage.quota_drops), ("table_full", usage.table_full_drops)] {
                let delta = self.kernel_delta("conntrack_drops", &format!("{pod}/{reason}"), total);
                if delta > 0 {
                    self.inner.conntrack_drops.get_or_create(&labels(&[("pod", pod), ("reason", reason)])).inc_by(delta);
                }
            }
        }
    }

    pub fn observe_evaluation(&self, elapsed: Duration) {
        self.inner.evaluation.observe(elapsed.as_secs_f64());
    }

    /// Called by the alert writer for every alert it writes (`count`: the occurrences it stands
    /// for, at least 1).
    pub fn record_alert(&self, kind: &str, rule: &str, severity: &str, count: u64) {
        self.inner.alerts.get_or_create(&labels(&[("kind", kind), ("rule", rule), ("severity", severity)])).inc_by(count.max(1));
    }

    pub fn record_alerts_dropped(&self, count: u64) {
        self.inner.alerts_dropped.inc_by(count);
    }

    pub fn record_alert_write_error(&self) {
        self.inner.alert_write_errors.inc();
    }

    pub fn set_quarantines_active(&self, active: i64) {
        self.inner.quarantines_active.set(active);
    }

    pub fn set_quarantines_pending(&self, pending: i64) {
        self.inner.quarantines_pending.set(pending);
    }

    pub fn set_datapath_sync_failing(&self, failing: bool) {
        self.inner.datapath_sync_failing.set(i64::from(failing));
    }

    pub fn set_stage_stuck(&self, stage: &str, stuck: bool) {
        self.inner.stage_stuck.get_or_create(&labels(&[("stage", stage)])).set(i64::from(stuck));
    }

    pub fn set_watchers_connected(&self, source: &str, connected: bool) {
        self.inner.watchers_connected.get_or_create(&labels(&[("source", source)])).set(i64::from(connected));
    }

    pub fn record_quarantine(&self) {
        self.inner.quarantines.inc();
    }

    pub fn record_release(&self) {
        self.inner.releases.inc();
    }

    pub fn record_kube_quarantine_error(&self) {
        self.inner.kube_quarantine_errors.inc();
    }

    pub fn add_policy_drops(&self, direction: &str, reason: &str, count: u64) {
        self.inner.policy_drops.get_or_create(&labels(&[("direction", direction), ("reason", reason)])).inc_by(count);
    }

    pub fn observe_map_sync(&self, map: &str, elapsed: Duration) {
        self.inner.map_sync.get_or_create(&labels(&[("map", map)])).observe(elapsed.as_secs_f64());
    }

    pub fn record_rule_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.inner.rule_reloads.get_or_create(&labels(&[("result", result)])).inc();
    }

    /// One rule could not judge one event (reason: `budget`, `timeout`, `error`).
    pub fn record_rule_error(&self, rule: &str, reason: &str) {
        self.inner.rule_errors.get_or_create(&labels(&[("rule", rule), ("reason", reason)])).inc();
    }

    /// Rule runs repeated for a descheduled thread (`rules::pack::WALL_BACKSTOP`).
    pub fn record_rule_rejudged(&self, runs: u32) {
        self.inner.rule_rejudged.inc_by(u64::from(runs));
    }

    /// A protected event rule `rule` could not judge (reason: `budget`, `timeout`, `error`).
    pub fn record_rule_unjudged(&self, rule: &str, reason: &str) {
        self.inner.rule_unjudged.get_or_create(&labels(&[("rule", rule), ("reason", reason)])).inc();
    }

    /// exporter: `webhook`, `stdout`; result: `sent`, `failed`, `dropped`, `retried`.
    pub fn record_export(&self, exporter: &str, result: &str) {
        self.inner.exports.get_or_create(&labels(&[("exporter", exporter), ("result", result)])).inc();
    }

    /// A connection `listener` (metrics, api) closed on the client for `reason`.
    pub fn record_connection_closed(&self, listener: &str, reason: &str) {
        self.inner.connections_closed.get_or_create(&labels(&[("listener", listener), ("reason", reason)])).inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = encode(&mut out, &self.inner.registry) {
            tracing::warn!(%err, "encoding metrics failed");
        }
        out
    }
}
