//! The pack in force, swappable at once, and a small pool of threads that evaluate events
//! against it.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::RulesError;
use super::model::{RuleFailure, RuleHit};
use super::pack::{RulePack, Session};
use crate::events::context::EventContext;
use crate::metrics::Metrics;

/// The rule pack in force. A swap replaces the whole pack at once: an evaluation holds an `Arc`
/// of the pack it started with, so no event ever sees a half-loaded pack.
#[derive(Debug)]
pub struct PackHandle {
    current: RwLock<Arc<RulePack>>,
    generation: AtomicU64,
}

impl PackHandle {
    /// Puts the first pack in force as generation 1.
    pub fn new(mut pack: RulePack) -> Arc<PackHandle> {
        pack.set_generation(1);
        Arc::new(PackHandle { current: RwLock::new(Arc::new(pack)), generation: AtomicU64::new(1) })
    }

    /// The pack in force now.
    pub fn current(&self) -> Arc<RulePack> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A panic while swapping cannot leave a half-written Arc: the value is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The generation in force; it goes up by one per swap.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `pack` in force and returns its generation.
    pub fn swap(&self, mut pack: RulePack) -> u64 {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let generation = self.generation.load(Ordering::Acquire) + 1;
        pack.set_generation(generation);
        *guard = Arc::new(pack);
        self.generation.store(generation, Ordering::Release);
        generation
    }
}

/// The outcome of one event: the hits (or why it could not be evaluated), with the event.
#[derive(Debug)]
pub struct Evaluation {
    /// The event's input as the engine took it (JSON of it only for the alerts of hits:
    /// `rules::input::to_json`).
    pub input: regorus::Value,
    /// The event's typed context, as submitted (`submit_with`): the responder and the alert
    /// builder read the pod and process from it, not back out of `input`.
    pub context: Option<Arc<EventContext>>,
    /// The hits of the rules that ran (or why the event could not be evaluated at all).
    pub hits: Result<Vec<RuleHit>, RulesError>,
    /// Rules that could not judge this event (over budget or an error); the others still ran.
    pub failures: Vec<RuleFailure>,
    /// The generation of the pack that evaluated it.
    pub pack_generation: u64,
    /// Rule runs repeated because the wall clock ran out before the CPU budget (`Judgement`).
    pub rejudged: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct EvaluatorConfig {
    pub workers: usize,
    /// Events waiting for a worker, counted in hand-overs of up to [`BATCH`] events (a single
    /// `submit` takes a whole one): `queue / BATCH` of them; `submit` blocks beyond it.
    pub queue: usize,
    /// Also send evaluations without hits (normally only hits and errors are sent).
    pub send_empty: bool,
}

impl Default for EvaluatorConfig {
    fn default() -> Self {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
        EvaluatorConfig { workers, queue: 4096, send_empty: false }
    }
}

/// One queued event: its input and, from the daemon's pipeline, its typed context.
type Job = (regorus::Value, Option<Arc<EventContext>>);

/// Events handed to the pool at once by `submit_batched`. One hand-over costs about what
/// judging a prefiltered event does (a channel operation, and a futex wake when a worker
/// sleeps, which it does whenever it has emptied the queue): one per event, the producer and
/// the wake-ups were the pool's limit (issue 13: 2 workers did 1.28x one). 64 events are
/// ~20 µs of a busy pipeline's work, the most a bulk event waits for its batch to fill; the
/// pipeline hands over what it holds as soon as it has nothing more to read (`flush`).
pub const BATCH: usize = 64;

/// N threads, each with its own engine session, fed through one bounded queue of batches.
/// Results go to the sink given at start (`RuleEvaluator::start` makes it a channel).
pub struct RuleEvaluator {
    jobs: Option<Sender<Vec<Job>>>,
    /// Events `submit_batched` holds until the batch is full or `flush` is called.
    pending: Vec<Job>,
    workers: Vec<JoinHandle<()>>,
}

impl RuleEvaluator {
    /// Starts the pool; evaluations with hits (and errors) arrive on the returned channel, which
    /// is bounded like the queue so a slow consumer slows producers rather than growing memory.
    pub fn start(
        handle: Arc<PackHandle>,
        config: EvaluatorConfig,
    ) -> Result<(RuleEvaluator, Receiver<Evaluation>), RulesError> {
        Self::start_observed(handle, config, None)
    }

    /// [`RuleEvaluator::start`], each event's evaluation time observed in `metrics`
    /// (`rule_evaluation_seconds`) when given.
    pub fn start_observed(
        handle: Arc<PackHandle>,
        config: EvaluatorConfig,
        metrics: Option<Metrics>,
    ) -> Result<(RuleEvaluator, Receiver<Evaluation>), RulesError> {
        let (results_tx, results_rx) = bounded(config.queue.max(1));
        let sink = move |evaluation| {
            // The receiver went away: the daemon is shutting down; nothing to do.
            let _ = results_tx.send(evaluation);
        };
        let evaluator = Self::spawn_workers(handle, config, sink, metrics)?;
        Ok((evaluator, results_rx))
    }

    /// Starts the pool with a callback for results (e.g. a tokio `blocking_send`).
    pub fn start_with_sink(
        handle: Arc<PackHandle>,
        config: EvaluatorConfig,
        sink: impl Fn(Evaluation) + Send + Sync + 'static,
    ) -> Result<RuleEvaluator, RulesError> {
        Self::spawn_workers(handle, config, sink, None)
    }

    fn spawn_workers(
        handle: Arc<PackHandle>,
        config: EvaluatorConfig,
        sink: impl Fn(Evaluation) + Send + Sync + 'static,
        metrics: Option<Metrics>,
    ) -> Result<RuleEvaluator, RulesError> {
        let (jobs_tx, jobs_rx) = bounded::<Vec<Job>>((config.queue / BATCH).max(1));
        let sink = Arc::new(sink);
        let mut workers = Vec::new();
        for index in 0..config.workers.max(1) {
            let jobs = jobs_rx.clone();
            let handle = handle.clone();
            let sink = sink.clone();
            let send_empty = config.send_empty;
            let metrics = metrics.clone();
            let worker = std::thread::Builder::new()
                .name(format!("palisade-rules-{index}"))
                .spawn(move || worker_loop(&handle, &jobs, send_empty, &*sink, metrics.as_ref()))
                .map_err(|e| RulesError::Eval(format!("cannot start rule worker: {e}")))?;
            workers.push(worker);
        }
        Ok(RuleEvaluator { jobs: Some(jobs_tx), pending: Vec::with_capacity(BATCH), workers })
    }

    /// Queues an event's input (`rules::to_rego_value` of a JSON one) at once, waiting while
    /// the queue is full.
    pub fn submit(&self, input: regorus::Value) -> Result<(), RulesError> {
        let jobs = self.jobs.as_ref().ok_or(RulesError::Closed)?;
        jobs.send(vec![(input, None)]).map_err(|_| RulesError::Closed)
    }

    /// Queues an event's input as the daemon builds it, with its typed context (handed back in
    /// its [`Evaluation`]), at once, waiting while the queue is full.
    pub fn submit_with(&self, input: regorus::Value, context: Arc<EventContext>) -> Result<(), RulesError> {
        let jobs = self.jobs.as_ref().ok_or(RulesError::Closed)?;
        jobs.send(vec![(input, Some(context))]).map_err(|_| RulesError::Closed)
    }

    /// [`RuleEvaluator::submit_with`] in batches of [`BATCH`]: the event is handed over with the
    /// batch it completes, or at the next [`RuleEvaluator::flush`]. The daemon's pipeline calls
    /// `flush` whenever it has no event waiting, so an event waits at most for the ones read
    /// right after it.
    pub fn submit_batched(&mut self, input: regorus::Value, context: Option<Arc<EventContext>>) -> Result<(), RulesError> {
        self.pending.push((input, context));
        if self.pending.len() >= BATCH { self.flush() } else { Ok(()) }
    }

    /// Hands over the events `submit_batched` holds, waiting while the queue is full.
    pub fn flush(&mut self) -> Result<(), RulesError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let jobs = self.jobs.as_ref().ok_or(RulesError::Closed)?;
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
        jobs.send(batch).map_err(|_| RulesError::Closed)
    }

    /// Stops taking events, lets the workers finish what is queued, and waits for them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.flush().is_err() {
            tracing::error!("rule workers stopped with events still held for them");
        }
        self.jobs = None;
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("a rule worker panicked");
            }
        }
    }
}

impl Drop for RuleEvaluator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Evaluates on the caller's own thread, with a session of its own that follows the pack in
/// force (rebuilt only when a new pack is swapped in). The pool's workers each hold one; the
/// daemon's pipeline holds one for protected events, which it judges at once rather than behind
/// the bulk events queued for the pool (no queue, no thread hand-over on the way to the
/// responder).
pub struct LocalEvaluator {
    handle: Arc<PackHandle>,
    pack: Arc<RulePack>,
    session: Option<Session>,
    /// Where each evaluation's time goes (`rule_evaluation_seconds`), when given.
    metrics: Option<Metrics>,
}

impl LocalEvaluator {
    pub fn new(handle: Arc<PackHandle>) -> LocalEvaluator {
        let pack = handle.current();
        LocalEvaluator { handle, pack, session: None, metrics: None }
    }

    /// Each evaluation's time observed in `metrics` (`rule_evaluation_seconds`), when given.
    pub fn observed(mut self, metrics: Option<Metrics>) -> LocalEvaluator {
        self.metrics = metrics;
        self
    }

    /// The evaluation of one event by the pack in force, as a pool worker would send it.
    pub fn evaluate(&mut self, input: regorus::Value, context: Option<Arc<EventContext>>) -> Evaluation {
        // One atomic load per event; the session is rebuilt only when a new pack is in force.
        if self.pack.generation() != self.handle.generation() {
            self.pack = self.handle.current();
            self.session = None;
        }
        let generation = self.pack.generation();
        if self.session.is_none() {
            match self.pack.session() {
                Ok(s) => self.session = Some(s),
                Err(e) => return Evaluation { input, context, hits: Err(e), failures: Vec::new(), pack_generation: generation, rejudged: 0 },
            }
        }
        let started = self.metrics.as_ref().map(|_| std::time::Instant::now());
        let (hits, failures, rejudged) = match self.session.as_mut().map(|session| self.pack.evaluate_in(session, &input)) {
            Some(Ok(judgement)) => (Ok(judgement.hits), judgement.failures, judgement.rejudged),
            Some(Err(e)) => (Err(e), Vec::new(), 0),
            None => (Err(RulesError::Eval("no engine session".to_string())), Vec::new(), 0),
        };
        if let (Some(metrics), Some(started)) = (&self.metrics, started) {
            metrics.observe_evaluation(started.elapsed());
        }
        Evaluation { input, context, hits, failures, pack_generation: generation, rejudged }
    }
}

impl Evaluation {
    /// Whether anyone needs to see it: hits, failures, an error or a repeated run (counted).
    pub fn has_news(&self) -> bool {
        !self.failures.is_empty() || self.rejudged > 0 || !matches!(&self.hits, Ok(h) if h.is_empty())
    }
}

fn worker_loop(
    handle: &Arc<PackHandle>,
    jobs: &Receiver<Vec<Job>>,
    send_empty: bool,
    sink: &(dyn Fn(Evaluation) + Send + Sync),
    metrics: Option<&Metrics>,
) {
    let mut local = LocalEvaluator::new(handle.clone()).observed(metrics.cloned());
    while let Ok(batch) = jobs.recv() {
        for (input, context) in batch {
            let evaluation = local.evaluate(input, context);
            if send_empty || evaluation.has_news() {
                sink(evaluation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(workers: usize) -> (RuleEvaluator, Receiver<Evaluation>) {
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let handle = PackHandle::new(RulePack::load(&rules).expect("default pack"));
        RuleEvaluator::start(handle, EvaluatorConfig { workers, queue: 4 * BATCH, send_empty: true }).expect("pool")
    }

    fn open(n: usize) -> regorus::Value {
        super::super::input::to_rego_value(&serde_json::json!({"type": "open", "pod": null,
            "process": {"pid": n, "comm": "cat", "ancestors": []},
            "open": {"path": format!("/srv/file-{n}"), "write": false}}))
    }

    /// Batched events wait for their batch or a flush, never longer; each is evaluated once.
    #[test]
    fn batched_events_are_handed_over_by_a_full_batch_or_a_flush() {
        let (mut evaluator, results) = pool(2);
        evaluator.submit_batched(open(0), None).expect("submit");
        assert!(results.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "handed over before its batch was full or flushed");
        evaluator.flush().expect("flush");
        assert!(results.recv_timeout(std::time::Duration::from_secs(20)).is_ok(), "the flushed event was not evaluated");
        for n in 1..=BATCH {
            evaluator.submit_batched(open(n), None).expect("submit");
        }
        // A full batch went without a flush.
        for _ in 0..BATCH {
            results.recv_timeout(std::time::Duration::from_secs(20)).expect("a full batch is handed over at once");
        }
        // What is held when the pool shuts down is still judged.
        for n in 0..10 {
            evaluator.submit_batched(open(1000 + n), None).expect("submit");
        }
        evaluator.shutdown();
        assert_eq!(results.iter().count(), 10, "the ten held at shutdown");
    }
}
