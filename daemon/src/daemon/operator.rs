//! `palisade operator` (issue 18): the process. An [`ElectedOperator`] (leader election, then
//! PeerSlices written while this replica leads) and what it shows of itself: Prometheus metrics
//! on `GET /metrics` and a status report on `GET /healthz` (JSON: leader or standby, the holder
//! it sees, slices, pods, writes, conflicts, repairs, errors), served by the same hardened
//! listener as the daemon's metrics (`api::metrics`). `/readyz` is ready on a standby and, on
//! the leader, once its slices are in sync with the pods. SIGTERM stops the writes and releases
//! the Lease.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::metrics::{Exposition, Health, HealthProvider, ListenerLimits, bind_metrics, health_provider, serve_metrics_on};
use crate::k8s::lease::{LeaderState, LeaseConfig, LeaseCounters};
use crate::k8s::operator::{ElectedOperator, OperatorArgs, OperatorConfig, OperatorCounters, default_identity};

/// `palisade operator`: elects a leader with the other replicas, writes slices while it leads,
/// serves its metrics and status; on SIGTERM or Ctrl-C stops writing and releases the Lease.
pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let identity = args.identity.clone().filter(|i| !i.is_empty()).unwrap_or_else(default_identity);
    let lease = LeaseConfig {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration_secs),
        renew_deadline: Duration::from_millis(args.renew_deadline_ms),
        retry_period: Duration::from_millis(args.retry_period_ms),
    };
    lease.validate()?;
    let config = OperatorConfig { flush_interval: Duration::from_millis(args.flush_ms.max(1)), ..OperatorConfig::default() };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
        let listener = bind_metrics(args.metrics_addr).await?;
        let bound = listener.local_addr().context("the metrics listener's address")?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("SIGTERM handler")?;
        let operator = ElectedOperator::start(client, config, lease)?;
        let status = OperatorStatus::new(&identity, operator.counters().clone(), operator.lease_counters().unwrap_or_default(), operator.state(), operator.synced());
        tracing::info!(addr = %bound, %identity, "operator: serving metrics and status; standing by for the lease");
        let server = serve_metrics_on(listener, status.clone(), status.health(), ListenerLimits::default());
        let served = tokio::select! {
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
            result = server => result,
        };
        tracing::info!("operator: stopping (slices stay as they are)");
        match operator.shutdown().await {
            Ok(true) => tracing::info!(%identity, "operator: lease released"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "operator: releasing the lease failed; a standby takes over when it runs out"),
        }
        served.context("the operator's metrics listener")
    })
}

/// The operator's counters, its election and its sync state, read at each scrape.
#[derive(Clone)]
pub struct OperatorStatus {
    pub identity: String,
    pub counters: Arc<OperatorCounters>,
    pub lease: Arc<LeaseCounters>,
    pub state: watch::Receiver<LeaderState>,
    pub synced: watch::Receiver<bool>,
    /// Metrics connections closed by the listener, by (listener, reason).
    closed: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl OperatorStatus {
    pub fn new(
        identity: &str,
        counters: Arc<OperatorCounters>,
        lease: Arc<LeaseCounters>,
        state: watch::Receiver<LeaderState>,
        synced: watch::Receiver<bool>,
    ) -> OperatorStatus {
        OperatorStatus { identity: identity.to_string(), counters, lease, state, synced, closed: Arc::default() }
    }

    /// The status report (`/healthz`'s body).
    pub fn report(&self) -> Value {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let state = self.state.borrow().clone();
        json!({
            "status": "ok",
            "identity": self.identity,
            "role": if state.leading { "leader" } else { "standby" },
            "holder": state.holder,
            "synced": *self.synced.borrow(),
            "slices": get(&c.slices),
            "pods": get(&c.pods),
            "pods_left_out": get(&c.left_out),
            "writes": {"created": get(&c.created), "replaced": get(&c.replaced), "deleted": get(&c.deleted)},
            "conflicts": get(&c.conflicts),
            "repairs": get(&c.repairs),
            "errors": get(&c.errors),
            "watch_errors": get(&c.watch_errors),
            "lease": {
                "acquired": get(&self.lease.acquired),
                "lost": get(&self.lease.lost),
                "conflicts": get(&self.lease.conflicts),
                "errors": get(&self.lease.errors),
            },
        })
    }

    /// `/healthz` and `/readyz` for the metrics listener.
    pub fn health(&self) -> HealthProvider {
        let status = self.clone();
        health_provider(move || {
            let status = status.clone();
            async move {
                let leading = status.state.borrow().leading;
                let ready = !leading || *status.synced.borrow();
                Health { ok: true, ready, report: status.report() }
            }
        })
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP palisade_operator_{name} {help}");
    let _ = writeln!(out, "# TYPE palisade_operator_{name} {kind}");
    let suffix = if kind == "counter" { "_total" } else { "" };
    for (labels, value) in samples {
        let _ = writeln!(out, "palisade_operator_{name}{suffix}{labels} {value}");
    }
}

impl Exposition for OperatorStatus {
    /// OpenMetrics text.
    fn encode(&self) -> String {
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let state = self.state.borrow().clone();
        let mut out = String::new();
        metric(&mut out, "leader", "gauge", "1 while this replica holds the lease and writes PeerSlices, 0 on standby", &[("", u64::from(state.leading))]);
        metric(&mut out, "synced", "gauge", "1 while the leader's PeerSlices are in sync with the pods", &[("", u64::from(*self.synced.borrow()))]);
        metric(&mut out, "slices", "gauge", "PeerSlices the leader holds", &[("", get(&c.slices))]);
        metric(&mut out, "pods", "gauge", "Pods in a PeerSlice", &[("", get(&c.pods))]);
        metric(&mut out, "pods_left_out", "gauge", "Pods no PeerSlice can hold (no address, over the CRD's bounds), each logged", &[("", get(&c.left_out))]);
        metric(
            &mut out,
            "slice_writes",
            "counter",
            "PeerSlice writes made, by operation",
            &[("{op=\"create\"}", get(&c.created)), ("{op=\"replace\"}", get(&c.replaced)), ("{op=\"delete\"}", get(&c.deleted))],
        );
        metric(&mut out, "slice_conflicts", "counter", "Conditional PeerSlice writes that found another version (re-read, written again)", &[("", get(&c.conflicts))]);
        metric(&mut out, "slice_repairs", "counter", "PeerSlices found changed, created or deleted by someone else, and put back", &[("", get(&c.repairs))]);
        metric(&mut out, "slice_errors", "counter", "PeerSlice reads and writes that failed (retried)", &[("", get(&c.errors))]);
        metric(&mut out, "watch_errors", "counter", "Pod and PeerSlice watch errors (retried with backoff)", &[("", get(&c.watch_errors))]);
        metric(&mut out, "lease_acquired", "counter", "Times this replica took the lease", &[("", get(&self.lease.acquired))]);
        metric(&mut out, "lease_lost", "counter", "Times this replica stopped leading without releasing", &[("", get(&self.lease.lost))]);
        metric(&mut out, "lease_conflicts", "counter", "Lease writes another replica won", &[("", get(&self.lease.conflicts))]);
        metric(&mut out, "lease_errors", "counter", "Lease reads and writes that failed (retried)", &[("", get(&self.lease.errors))]);
        let closed = self.closed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = writeln!(out, "# HELP palisade_http_connections_closed Connections closed by the server, by listener and reason");
        let _ = writeln!(out, "# TYPE palisade_http_connections_closed counter");
        for ((listener, reason), n) in closed {
            let _ = writeln!(out, "palisade_http_connections_closed_total{{listener=\"{listener}\",reason=\"{reason}\"}} {n}");
        }
        out.push_str("# EOF\n");
        out
    }

    fn record_connection_closed(&self, listener: &str, reason: &str) {
        *self.closed.lock().unwrap_or_else(|p| p.into_inner()).entry((listener.to_string(), reason.to_string())).or_default() += 1;
    }
}
