//! The event pipeline: the reader's two queues (protected events first) -> enrichment (the
//! process cache, the endpoint table) -> the rule input (and `--record`) -> the rule workers
//! (bulk events, in batches) or the pipeline's own evaluator (protected events).

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::events::context::EventContext;
use crate::events::decode::Event;
use crate::events::enrich::{ProcCache, enrich};
use crate::events::input::{Clock, InputBuilder};
use crate::events::reader::{QueueBudget, Queued};
use crate::rules::evaluator::RuleEvaluator;
use crate::status::DaemonState;

/// The memory the queues between the reader and the pipeline thread may hold (`reader::
/// event_bytes`): protected events (the reader waits for room), the rest (dropped and counted
/// past it), and the most one pod's bulk events may hold, so a flooding pod never fills the
/// queue alone. An open is ~300 bytes (the 232-byte event and its path): ~14,000 opens in the
/// bulk queue, ~1,700 per pod (before: 16,384 and 2,048 events of any size).
pub(super) const PRIORITY_QUEUE_BYTES: usize = 2 << 20;

pub(super) const BULK_QUEUE_BYTES: usize = 4 << 20;

pub(super) const BULK_QUEUE_BYTES_PER_POD: usize = BULK_QUEUE_BYTES / 8;

/// A second bound on each queue, in events (the byte budgets bind first: an event is larger
/// than 128 bytes).
pub(super) const QUEUE_EVENTS: usize = 32768;

/// The next event and whether it came from the priority queue (a protected kind): a protected
/// one whenever one is waiting (a bulk one gives its pod's place in the queue back). None when
/// both queues are closed.
pub(super) fn next_event(
    runtime: &tokio::runtime::Handle,
    priority: &mut mpsc::Receiver<Queued>,
    bulk: &mut mpsc::Receiver<Queued>,
    budget: &QueueBudget,
    trimmer: &mut crate::memory::Trimmer,
) -> Option<(Event, bool)> {
    let from_bulk = |queued: Queued| {
        budget.release_bulk(queued.event.header.cgroup_id, queued.bytes);
        (queued.event, false)
    };
    let from_priority = |queued: Queued| {
        budget.release_priority(queued.bytes);
        (queued.event, true)
    };
    if let Ok(event) = priority.try_recv() {
        return Some(from_priority(event));
    }
    if let Ok(event) = bulk.try_recv() {
        return Some(from_bulk(event));
    }
    runtime.block_on(async {
        // After a burst, once no event came for a while, the memory that held it goes back
        // to the system (the allocator keeps freed pages otherwise).
        if let Some(wait) = trimmer.idle_wait() {
            tokio::select! {
                biased;
                Some(event) = priority.recv() => return Some(from_priority(event)),
                Some(event) = bulk.recv() => return Some(from_bulk(event)),
                () = tokio::time::sleep(wait) => {
                    trimmer.idle();
                }
                else => return None,
            }
        }
        tokio::select! {
            biased;
            Some(event) = priority.recv() => Some(from_priority(event)),
            Some(event) = bulk.recv() => Some(from_bulk(event)),
            else => None,
        }
    })
}

/// The process cache's memory bound (about 64,000 processes of typical size).
pub(super) const PROCESS_CACHE_BYTES: usize = 64 << 20;

pub(super) fn pipeline(
    runtime: tokio::runtime::Handle,
    mut priority: mpsc::Receiver<Queued>,
    mut events: mpsc::Receiver<Queued>,
    state: Arc<DaemonState>,
    mut record: Option<std::io::BufWriter<std::fs::File>>,
    mut evaluator: RuleEvaluator,
) {
    let clock = Clock::new();
    let mut inputs = InputBuilder::new(&state.node);
    let mut cache = ProcCache::with_byte_budget(PROCESS_CACHE_BYTES);
    // The programs are attached: processes from now on are seen by their fork/exec events;
    // the ones that already exist are seeded from /proc, once (never on the event path).
    let seeded = cache.seed_from_proc(Path::new("/proc"));
    tracing::info!(seeded, "process cache seeded from /proc");
    // Start-up (pack compilation and smoke runs, BTF, the eBPF object) leaves freed memory
    // behind in the allocator: give it back once, so the idle RSS is what running needs.
    crate::memory::release_free_memory();
    let mut since_stats = 0u32;
    let budget = state.queue_budget.clone();
    let mut trimmer = crate::memory::Trimmer::default();
    // Protected events are judged here, at once, and their hits acted on (the quarantine map
    // update included) before the next event is taken: through the pool they would wait behind
    // the bulk events queued for it and cross two more threads (issue 10: the latency goal).
    let mut protected_judge = crate::rules::LocalEvaluator::new(state.rules.clone()).observed(Some(state.metrics.clone()));
    let mut failure_alerts = crate::rules::failures::FailureLimiter::default();
    while let Some((event, protected)) = next_event(&runtime, &mut priority, &mut events, &budget, &mut trimmer) {
        let table = state.endpoints.borrow().clone();
        let enriched = enrich(event, table.index(), &mut cache);
        state.pipeline.enriched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        since_stats += 1;
        if since_stats >= 1024 || (events.is_empty() && priority.is_empty()) {
            since_stats = 0;
            if let Ok(mut stats) = state.pipeline.process_cache.lock() {
                *stats = cache.stats();
            }
        }
        let input = inputs.build(&enriched, &clock);
        if let Some(out) = record.as_mut() {
            let written = serde_json::to_writer(&mut *out, &input).map_err(std::io::Error::other).and_then(|()| out.write_all(b"\n"));
            // Flush when idle so a reader of the file sees events promptly.
            let flushed = if events.is_empty() && priority.is_empty() { out.flush() } else { Ok(()) };
            if let Err(err) = written.and(flushed) {
                state.pipeline.record_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%err, "writing the event record");
            }
        }
        let context = Arc::new(EventContext::of(&enriched, &clock));
        if protected {
            let evaluation = protected_judge.evaluate(input, Some(context));
            if evaluation.has_news() {
                super::verdicts::act_on(&state, &mut failure_alerts, evaluation);
            }
        } else if evaluator.submit_batched(input, Some(context)).is_err() {
            tracing::error!("rule workers stopped; pipeline ends");
            return;
        }
        // Bulk events go to the pool in batches (one hand-over per batch, not per event); what
        // is held goes as soon as nothing more is waiting, so no event waits for later ones.
        if events.is_empty() && priority.is_empty() && evaluator.flush().is_err() {
            tracing::error!("rule workers stopped; pipeline ends");
            return;
        }
        trimmer.note_event();
    }
}

/// The queues' byte budgets (`DaemonState.queue_budget`, which status shows).
pub(super) fn queue_budget() -> QueueBudget {
    QueueBudget::new(BULK_QUEUE_BYTES, BULK_QUEUE_BYTES_PER_POD, PRIORITY_QUEUE_BYTES)
}

/// Starts the reader task on the (priority, bulk) ring buffers and the pipeline thread. The
/// returned flag is cleared when the reader ends: the daemon is blind then, and /healthz says so.
pub(super) fn start(
    args: &super::RunArgs,
    state: &Arc<DaemonState>,
    (priority_ring, ring): (aya::maps::RingBuf<aya::maps::MapData>, aya::maps::RingBuf<aya::maps::MapData>),
    evaluator: RuleEvaluator,
) -> anyhow::Result<Arc<std::sync::atomic::AtomicBool>> {
    use anyhow::Context as _;
    let reader_running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Protected events have a queue of their own, which the pipeline always serves first.
    let (priority_tx, priority_rx) = mpsc::channel::<Queued>(QUEUE_EVENTS);
    let (events_tx, events_rx) = mpsc::channel::<Queued>(QUEUE_EVENTS);
    let reader_task = crate::events::reader::run_routed(
        priority_ring,
        ring,
        state.reader.clone(),
        state.queue_drops.clone(),
        state.queue_budget.clone(),
        priority_tx,
        events_tx,
    );
    {
        let reader_running = reader_running.clone();
        tokio::spawn(async move {
            let ended = reader_task.await;
            reader_running.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(?ended, "the event reader stopped: no more kernel events (/healthz answers 503)");
        });
    }
    let runtime_handle = tokio::runtime::Handle::current();
    let state = state.clone();
    let record = match &args.record {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    std::thread::Builder::new()
        .name("palisade-pipeline".into())
        .spawn(move || pipeline(runtime_handle, priority_rx, events_rx, state, record, evaluator))?;
    Ok(reader_running)
}
