//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection`
//! does it, for `palisade operator` (issue 18): several replicas run, one holds the Lease and
//! writes; the others stand by and take over when it stops renewing.
//!
//! - **Acquire**: a candidate reads the Lease every `retry_period`. It takes the Lease when there
//!   is none (create), when it is released (no holder), or when the holder has not renewed it
//!   for the Lease's `leaseDurationSeconds`, measured on the candidate's own clock from when it
//!   last saw the record change (so clock skew between nodes does not matter, as in client-go).
//!   Taking it is an update conditional on the `resourceVersion` read: of two candidates, the
//!   API server lets one win (`409 Conflict` for the other).
//! - **Renew**: the leader rewrites `renewTime` every `retry_period`. When it has not renewed
//!   within `renew_deadline` (shorter than the lease duration), or sees another holder, it stops
//!   leading at once, before any standby may take over.
//! - **Release** ([`LeaderElector::release`], on SIGTERM): the leader clears `holderIdentity`
//!   and sets the duration to 1 s, so a standby takes over without waiting for the lease to run
//!   out.
//!
//! The state is published on a `watch` channel ([`LeaderElector::state`]); every acquisition,
//! loss, conflict and error is counted ([`LeaseCounters`]) and logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;
use tokio::time::Instant;

/// The field manager of the Lease writes.
const FIELD_MANAGER: &str = "palisade-operator";

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This candidate's identity, unique among the replicas (the pod name in a Deployment).
    pub identity: String,
    /// How long a standby waits after the last renewal it saw before taking the Lease.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it stops leading (< `lease_duration`).
    pub renew_deadline: Duration,
    /// How often a standby tries to acquire and the leader renews.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: a 15 s lease, renewed every 2 s, given up after 10 s without renewal.
    pub fn new(namespace: &str, name: &str, identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// The bounds client-go checks: a leader must give up before a standby may take over.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.identity.is_empty() {
            return Err(LeaseError::Config("the identity is empty".to_string()));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(LeaseError::Config(format!(
                "renew deadline {:?} must be shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            )));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(LeaseError::Config(format!(
                "retry period {:?} must be above zero and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            )));
        }
        if self.lease_duration.as_secs() < 1 || self.lease_duration.as_secs() > i32::MAX as u64 {
            return Err(LeaseError::Config(format!("lease duration {:?}: whole seconds, at least 1", self.lease_duration)));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("leader election: {0}")]
    Config(String),
    #[error("lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What this candidate knows of the election.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaderState {
    /// This candidate holds the Lease (and may write).
    pub leading: bool,
    /// The holder last seen in the Lease (`None`: none, or released).
    pub holder: Option<String>,
}

/// What the election did, for the operator's metrics and logs.
#[derive(Debug, Default)]
pub struct LeaseCounters {
    /// Times this candidate took the Lease.
    pub acquired: AtomicU64,
    /// Times it stopped leading without releasing (renew deadline passed, or another holder).
    pub lost: AtomicU64,
    /// Acquisitions or renewals another writer won (`409 Conflict`).
    pub conflicts: AtomicU64,
    /// Reads and writes of the Lease that failed otherwise.
    pub errors: AtomicU64,
}

/// The holder fields of a Lease as last read, to tell whether it changed.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    duration: Duration,
    transitions: i32,
    acquire_time: Option<Timestamp>,
}

impl Record {
    fn of(lease: &Lease, default_duration: Duration) -> Record {
        let spec = lease.spec.clone().unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(default_duration, Duration::from_secs);
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0),
            duration,
            transitions: spec.lease_transitions.unwrap_or(0),
            acquire_time: spec.acquire_time.map(|t| t.0),
        }
    }
}

/// What a candidate does with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Another holder's lease is still valid: stand by.
    StandBy,
    /// Write the Lease as this candidate's (a renewal when it holds it already).
    Take { transition: bool },
}

/// The decision, from the record read, when this candidate last saw it change, and now.
fn decide(record: &Record, identity: &str, observed_at: Instant, now: Instant) -> Decision {
    match &record.holder {
        Some(holder) if holder == identity => Decision::Take { transition: false },
        Some(_) if now < observed_at + record.duration => Decision::StandBy,
        _ => Decision::Take { transition: true },
    }
}

struct Candidate {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The record last read and when it was first seen so (this process's clock).
    observed: Option<(Record, Instant)>,
    counters: Arc<LeaseCounters>,
}

/// The outcome of one attempt.
enum Attempt {
    Leading,
    /// Someone else holds it (or won the race).
    Standby(Option<String>),
}

impl Candidate {
    fn error(&self, source: kube::Error) -> LeaseError {
        LeaseError::Api { namespace: self.config.namespace.clone(), name: self.config.name.clone(), source }
    }

    fn lease(&self, previous: Option<&Record>, transition: bool, resource_version: Option<String>) -> Lease {
        let now = Timestamp::now();
        let (acquire_time, transitions) = match previous {
            Some(p) if !transition => (p.acquire_time.unwrap_or(now), p.transitions),
            Some(p) => (now, p.transitions.saturating_add(1)),
            None => (now, 0),
        };
        Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                resource_version,
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)),
                acquire_time: Some(MicroTime(acquire_time)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    fn observe(&mut self, lease: &Lease) -> Record {
        let record = Record::of(lease, self.config.lease_duration);
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.observed = Some((record.clone(), Instant::now()));
        }
        record
    }

    /// One read and, when the decision says so, one conditional write.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_string()) };
        let Some(current) = self.api.get_opt(&self.config.name).await.map_err(|e| self.error(e))? else {
            let created = self.api.create(&params, &self.lease(None, true, None)).await;
            return match created {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Attempt::Leading)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    Ok(Attempt::Standby(None))
                }
                Err(error) => Err(self.error(error)),
            };
        };
        let record = self.observe(&current);
        let observed_at = self.observed.as_ref().map_or_else(Instant::now, |(_, at)| *at);
        match decide(&record, &self.config.identity, observed_at, Instant::now()) {
            Decision::StandBy => Ok(Attempt::Standby(record.holder)),
            Decision::Take { transition } => {
                let lease = self.lease(Some(&record), transition, current.metadata.resource_version.clone());
                let written = self.api.replace(&self.config.name, &params, &lease).await;
                match written {
                    Ok(written) => {
                        self.observe(&written);
                        Ok(Attempt::Leading)
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                        Ok(Attempt::Standby(record.holder))
                    }
                    Err(error) => Err(self.error(error)),
                }
            }
        }
    }

    /// Gives the Lease up if this candidate holds it: no holder, a 1 s duration.
    async fn release(&mut self) -> Result<bool, LeaseError> {
        let Some(current) = self.api.get_opt(&self.config.name).await.map_err(|e| self.error(e))? else {
            return Ok(false);
        };
        let record = Record::of(&current, self.config.lease_duration);
        if record.holder.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(false);
        }
        let mut lease = self.lease(Some(&record), false, current.metadata.resource_version.clone());
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
        }
        let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_string()) };
        self.api.replace(&self.config.name, &params, &lease).await.map_err(|e| self.error(e))?;
        Ok(true)
    }
}

/// A running candidate. Dropping it stops it without releasing the Lease (as a crash would:
/// a standby takes over when the lease runs out); [`Self::release`] gives it up.
pub struct LeaderElector {
    state: watch::Receiver<LeaderState>,
    counters: Arc<LeaseCounters>,
    task: Option<tokio::task::JoinHandle<Candidate>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for LeaderElector {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl LeaderElector {
    pub fn start(client: Client, config: LeaseConfig) -> Result<LeaderElector, LeaseError> {
        config.validate()?;
        let counters = Arc::new(LeaseCounters::default());
        let (state_tx, state) = watch::channel(LeaderState::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let candidate = Candidate { api: Api::namespaced(client, &config.namespace), config, observed: None, counters: counters.clone() };
        let task = tokio::spawn(elect(candidate, state_tx, stopped));
        Ok(LeaderElector { state, counters, task: Some(task), stop: Some(stop) })
    }

    pub fn state(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    pub fn counters(&self) -> &Arc<LeaseCounters> {
        &self.counters
    }

    /// Stops the candidate and, if it leads, releases the Lease (SIGTERM). Returns whether it
    /// released one. The caller stops writing before calling this.
    pub async fn release(mut self) -> Result<bool, LeaseError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else { return Ok(false) };
        let Ok(mut candidate) = task.await else { return Ok(false) };
        candidate.release().await
    }
}

fn publish(state: &watch::Sender<LeaderState>, leading: bool, holder: Option<String>) {
    state.send_if_modified(|s| {
        let next = LeaderState { leading, holder: holder.clone() };
        let changed = *s != next;
        *s = next;
        changed
    });
}

async fn elect(mut candidate: Candidate, state: watch::Sender<LeaderState>, mut stopped: tokio::sync::oneshot::Receiver<()>) -> Candidate {
    let identity = candidate.config.identity.clone();
    let lease = format!("{}/{}", candidate.config.namespace, candidate.config.name);
    let retry = candidate.config.retry_period;
    let renew_deadline = candidate.config.renew_deadline;
    let mut leading_since_renewal: Option<Instant> = None;
    loop {
        // A leader gives each attempt only what is left of its renew deadline, so a hung
        // request cannot keep it leading past it.
        let budget = match leading_since_renewal {
            Some(renewed) => (renewed + renew_deadline).saturating_duration_since(Instant::now()),
            None => candidate.config.lease_duration,
        };
        // A renewal counts from when it was sent, not answered: the standbys count from when
        // they saw it, which is later.
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = &mut stopped => None,
            attempt = tokio::time::timeout(budget, candidate.try_acquire_or_renew()) => Some(attempt),
        };
        let Some(attempt) = attempt else { return candidate };
        let now = Instant::now();
        match attempt {
            Ok(Ok(Attempt::Leading)) => {
                if leading_since_renewal.is_none() {
                    candidate.counters.acquired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%lease, %identity, "leader election: leading");
                }
                leading_since_renewal = Some(started);
                publish(&state, true, Some(identity.clone()));
            }
            Ok(Ok(Attempt::Standby(holder))) => {
                if leading_since_renewal.take().is_some() {
                    candidate.counters.lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%lease, %identity, holder = ?holder, "leader election: another holder; stopped leading");
                }
                publish(&state, false, holder);
            }
            Ok(Err(error)) => {
                candidate.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "leader election: reading or writing the lease failed (retried)");
            }
            Err(_) => {
                candidate.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%lease, "leader election: the lease request did not answer in time (retried)");
            }
        }
        if let Some(renewed) = leading_since_renewal
            && now >= renewed + renew_deadline
        {
            leading_since_renewal = None;
            candidate.counters.lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%lease, %identity, deadline = ?renew_deadline, "leader election: not renewed within the deadline; stopped leading");
            publish(&state, false, None);
        }
        let stop = tokio::select! {
            _ = &mut stopped => true,
            _ = tokio::time::sleep(retry) => false,
        };
        if stop {
            return candidate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, duration: u64) -> Record {
        Record {
            holder: holder.map(str::to_string),
            renew_time: None,
            duration: Duration::from_secs(duration),
            transitions: 3,
            acquire_time: None,
        }
    }

    #[test]
    fn a_standby_waits_out_the_lease_from_when_it_saw_it_change() {
        let seen = Instant::now();
        let other = record(Some("b"), 15);
        assert_eq!(decide(&other, "a", seen, seen + Duration::from_secs(14)), Decision::StandBy);
        assert_eq!(decide(&other, "a", seen, seen + Duration::from_secs(15)), Decision::Take { transition: true });
        // Its own lease is a renewal; a released one (no holder) is taken at once.
        assert_eq!(decide(&record(Some("a"), 15), "a", seen, seen), Decision::Take { transition: false });
        assert_eq!(decide(&record(None, 1), "a", seen, seen), Decision::Take { transition: true });
    }

    #[test]
    fn a_leader_must_give_up_before_a_standby_may_take_over() {
        let mut config = LeaseConfig::new("ns", "lease", "a");
        assert!(config.validate().is_ok());
        config.renew_deadline = config.lease_duration;
        assert!(config.validate().unwrap_err().to_string().contains("renew deadline"));
        config = LeaseConfig::new("ns", "lease", "a");
        config.retry_period = config.renew_deadline;
        assert!(config.validate().unwrap_err().to_string().contains("retry period"));
        assert!(LeaseConfig::new("ns", "lease", "").validate().is_err());
    }

    #[test]
    fn the_record_takes_the_lease_duration_it_says_and_no_holder_for_an_empty_one() {
        let lease = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec { holder_identity: Some(String::new()), lease_duration_seconds: Some(1), ..LeaseSpec::default() }),
        };
        let r = Record::of(&lease, Duration::from_secs(15));
        assert_eq!((r.holder, r.duration), (None, Duration::from_secs(1)));
        let r = Record::of(&Lease::default(), Duration::from_secs(15));
        assert_eq!(r.duration, Duration::from_secs(15), "no duration in the lease: the candidate's own");
    }
}
