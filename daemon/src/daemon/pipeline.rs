//! The event pipeline: protected events straight from the priority ring, bulk events from the
//! reader task's queue (`events::reader::PipelineSource`) -> enrichment (the process cache, the
//! endpoint table) -> the rule input (and `--record`) -> the rule workers (bulk events, in
//! batches) or the pipeline's own evaluator (protected events).

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use tokio::sync::mpsc;

use crate::events::context::EventContext;
use crate::events::enrich::{ProcCache, enrich};
use crate::events::input::{Clock, InputBuilder};
use crate::events::reader::{PipelineSource, QueueBudget, Queued};
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

/// The scheduler slice the pipeline thread asks for (`sys::request_short_slice`): the
/// kernel's minimum, 100 µs.
const PIPELINE_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// The process cache's memory bound (about 64,000 processes of typical size).
pub(super) const PROCESS_CACHE_BYTES: usize = 64 << 20;

pub(super) fn pipeline(
    mut source: PipelineSource,
    reader_running: Arc<AtomicBool>,
    state: Arc<DaemonState>,
    mut record: Option<std::io::BufWriter<std::fs::File>>,
    mut evaluator: RuleEvaluator,
) {
    // Woken by the kernel for each protected event, this thread is the one that judges it and
    // updates the quarantine map: ask the scheduler for short slices so that, on a busy node,
    // the wake-up preempts the task running there instead of waiting for its slice to end.
    if let Err(err) = crate::sys::request_short_slice(PIPELINE_SLICE) {
        tracing::info!(%err, "the pipeline thread keeps the default scheduler slice");
    }
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
    let mut trimmer = crate::memory::Trimmer::default();
    // Protected events are judged here, at once, and their hits acted on (the quarantine map
    // update included) before the next event is taken: through the pool they would wait behind
    // the bulk events queued for it and cross two more threads (issue 10: the latency goal).
    let mut protected_judge = crate::rules::LocalEvaluator::new(state.rules.clone()).observed(Some(state.metrics.clone()));
    let mut failure_alerts = crate::rules::failures::FailureLimiter::default();
    loop {
        let (event, protected) = match source.next(&mut trimmer) {
            Ok(Some(next)) => next,
            Ok(None) => {
                tracing::error!("the event reader stopped: no more bulk events; pipeline ends");
                break;
            }
            Err(err) => {
                state.pipeline.source_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(%err, "protected events can no longer be read; pipeline ends");
                break;
            }
        };
        let table = state.endpoints.borrow().clone();
        let enriched = enrich(event, table.index(), &mut cache);
        state.pipeline.enriched.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        since_stats += 1;
        if since_stats >= 1024 || (source.bulk_is_empty()) {
            since_stats = 0;
            if let Ok(mut stats) = state.pipeline.process_cache.lock() {
                *stats = cache.stats();
            }
        }
        let input = inputs.build(&enriched, &clock);
        if let Some(out) = record.as_mut() {
            let written = serde_json::to_writer(&mut *out, &input).map_err(std::io::Error::other).and_then(|()| out.write_all(b"\n"));
            // Flush when idle so a reader of the file sees events promptly.
            let flushed = if source.bulk_is_empty() { out.flush() } else { Ok(()) };
            if let Err(err) = written.and(flushed) {
                state.pipeline.record_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%err, "writing the event record");
            }
        }
        let context = Arc::new(EventContext::of(&enriched, &clock));
        if protected {
            let evaluation = protected_judge.evaluate(input, Some(context));
            if evaluation.has_news() {
                super::findings::act_on(&state, &mut failure_alerts, evaluation, true);
            }
        } else if evaluator.submit_batched(input, Some(context)).is_err() {
            tracing::error!("rule workers stopped; pipeline ends");
            return;
        }
        // Bulk events go to the pool in batches (one hand-over per batch, not per event); what
        // is held goes as soon as nothing more is waiting, so no event waits for later ones.
        if source.bulk_is_empty() && evaluator.flush().is_err() {
            tracing::error!("rule workers stopped; pipeline ends");
            return;
        }
        trimmer.note_event();
    }
    // Blind from here on: /healthz says so.
    reader_running.store(false, std::sync::atomic::Ordering::Relaxed);
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
    let reader_running = Arc::new(AtomicBool::new(true));
    // Everything that can fail comes before the PipelineSource: it owns a tokio runtime, which
    // must not be dropped here, inside the daemon's async context (tokio panics), as an early
    // return would.
    let record = match &args.record {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    // Protected events are read from their ring by the pipeline thread itself; bulk events
    // come through a queue the reader task fills.
    let (events_tx, events_rx) = mpsc::channel::<Queued>(QUEUE_EVENTS);
    let source = PipelineSource::new(priority_ring, events_rx, state.queue_budget.clone(), state.reader.clone())?;
    let reader_task =
        crate::events::reader::run_bulk(ring, state.reader.clone(), state.queue_drops.clone(), state.queue_budget.clone(), events_tx);
    {
        let reader_running = reader_running.clone();
        tokio::spawn(async move {
            let ended = reader_task.await;
            reader_running.store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(?ended, "the event reader stopped: no more kernel events (/healthz answers 503)");
        });
    }
    let state = state.clone();
    let pipeline_running = reader_running.clone();
    std::thread::Builder::new()
        .name("palisade-pipeline".into())
        .spawn(move || pipeline(source, pipeline_running, state, record, evaluator))?;
    Ok(reader_running)
}
