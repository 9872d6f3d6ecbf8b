//! Reads the event ring buffers with tokio (AsyncFd) and decodes each record. Malformed records
//! and unknown kinds are counted, never fatal.
//!
//! Protected events (the priority ring) are read by the pipeline thread itself
//! ([`PipelineSource`]), as soon as the kernel wakes it; bulk events are read by a task
//! ([`run_bulk`]) and handed on only while the pipeline has room *for that pod*
//! (`QueueBudget`: the queues are bounded in bytes, and each pod may hold a bounded share of
//! the bulk queue's), and the ones it has no room for are dropped and counted per pod cgroup
//! and kind (`QueueDrops`). So a flood neither delays a protected event, nor takes another
//! pod's place in the queue, nor grows memory, however large its events are.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::decode::{DecodeError, Event, EventData, decode};
use super::kind::EventKind;

#[derive(Debug, Default)]
pub struct ReaderStats {
    pub records: AtomicU64,
    pub decoded: AtomicU64,
    pub unknown_kind: AtomicU64,
    pub malformed: AtomicU64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReaderStatsSnapshot {
    pub records: u64,
    pub decoded: u64,
    pub unknown_kind: u64,
    pub malformed: u64,
}

impl ReaderStats {
    pub fn snapshot(&self) -> ReaderStatsSnapshot {
        ReaderStatsSnapshot {
            records: self.records.load(Ordering::Relaxed),
            decoded: self.decoded.load(Ordering::Relaxed),
            unknown_kind: self.unknown_kind.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
        }
    }

    /// Decodes one record, counting the outcome.
    pub fn decode_counted(&self, bytes: &[u8]) -> Option<Event> {
        self.records.fetch_add(1, Ordering::Relaxed);
        match decode(bytes) {
            Ok(event) => {
                self.decoded.fetch_add(1, Ordering::Relaxed);
                Some(event)
            }
            Err(DecodeError::UnknownKind(kind)) => {
                self.unknown_kind.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%kind, "ring buffer record of unknown kind");
                None
            }
            Err(err) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "malformed ring buffer record");
                None
            }
        }
    }
}

/// How often the bulk ring is read without a wake-up from the kernel: its unprotected events
/// wake the reader only once `ProbeConfig::bulk_wakeup_bytes` wait (the probes'
/// `bulk_wakeup`), so this bounds how long one of them can wait.
pub const BULK_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Drains the ring buffer into `out` until `out` is closed. Back-pressure is deliberate: when
/// the pipeline is slow the ring buffer fills and the kernel counts the losses per kind.
pub async fn run(ring: RingBuf<MapData>, stats: Arc<ReaderStats>, out: mpsc::Sender<Event>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays open for
    // as long as it is registered.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    let drain = |ring: &mut RingBuf<MapData>, batch: &mut Vec<Event>| {
        while let Some(item) = ring.next() {
            if let Some(event) = stats.decode_counted(&item) {
                batch.push(event);
            }
        }
    };
    loop {
        let mut batch = Vec::new();
        let tick = tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut batch);
                guard.clear_ready();
                false
            }
            () = tokio::time::sleep(BULK_POLL) => true,
        };
        if tick {
            drain(fd.get_mut(), &mut batch);
        }
        for event in batch {
            if out.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Bulk events dropped because the pipeline queue was full, per (pod cgroup, kind): totals.
#[derive(Debug, Default)]
pub struct QueueDrops {
    totals: Mutex<BTreeMap<(u64, EventKind), u64>>,
}

impl QueueDrops {
    pub fn add(&self, cgroup_id: u64, kind: EventKind) {
        if let Ok(mut totals) = self.totals.lock() {
            *totals.entry((cgroup_id, kind)).or_insert(0) += 1;
        }
    }

    pub fn totals(&self) -> BTreeMap<(u64, EventKind), u64> {
        self.totals.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// What one queued event holds in memory: the struct itself and the heap its strings and lists
/// own (by capacity). Queues between stages are bounded by this, not by a count of events, so
/// events made as large as possible (long paths, full argv) cannot multiply what a queue holds.
pub fn event_bytes(event: &Event) -> usize {
    fn opt(s: &Option<String>) -> usize {
        s.as_ref().map_or(0, |s| s.capacity())
    }
    let data = match &event.data {
        EventData::Exec(d) => {
            d.filename.capacity()
                + d.argv.capacity() * std::mem::size_of::<String>()
                + d.argv.iter().map(String::capacity).sum::<usize>()
                + opt(&d.exe)
        }
        EventData::Fork(_) | EventData::Exit(_) | EventData::Ptrace(_) | EventData::Bpf(_) | EventData::Dup(_) => 0,
        EventData::Connect(d) => opt(&d.address) + opt(&d.unix_path),
        EventData::Open(d) => d.path.capacity() + d.path_arg.capacity() + d.flags_names.capacity() * std::mem::size_of::<&str>(),
        EventData::Cred(d) => d.args.capacity() * std::mem::size_of::<u32>(),
        EventData::Mount(d) => d.source.capacity() + d.target.capacity() + d.fstype.capacity(),
        EventData::Namespace(d) => d.flags_names.capacity() * std::mem::size_of::<&str>(),
        EventData::Module(d) => d.name.capacity(),
        EventData::Memfd(d) => d.name.capacity(),
        EventData::Chmod(d) => d.path.capacity() + d.path_arg.capacity(),
        EventData::Unlink(d) => d.path.capacity() + d.path_arg.capacity(),
        EventData::Rename(d) => d.old_path.capacity() + d.old_path_arg.capacity() + d.new_path.capacity() + d.new_path_arg.capacity(),
    };
    std::mem::size_of::<Event>() + event.header.comm.capacity() + data
}

/// One event in a queue between the reader and the pipeline, with the bytes it was counted as.
#[derive(Debug)]
pub struct Queued {
    pub event: Event,
    pub bytes: usize,
}

/// The memory bounds of the two queues between the reader and the pipeline, in bytes.
///
/// - Priority queue: at most `priority_limit` bytes; the reader waits for room (back-pressure:
///   protected events are never dropped here; the kernel ring holds them meanwhile).
/// - Bulk queue: at most `bulk_limit` bytes in all and `per_pod_limit` per pod; an event that
///   does not fit is dropped and counted for its pod (`QueueDrops`): a flooding pod fills its
///   own share, never another pod's, and memory stays bounded whatever its events hold.
#[derive(Debug)]
pub struct QueueBudget {
    bulk_limit: usize,
    per_pod_limit: usize,
    bulk: Mutex<BulkQueued>,
    priority_limit: usize,
    priority: tokio::sync::Semaphore,
}

#[derive(Debug, Default)]
struct BulkQueued {
    bytes: usize,
    per_pod: HashMap<u64, usize>,
}

/// What the queues hold now and their bounds (status).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct QueueBudgetSnapshot {
    pub bulk_bytes: usize,
    pub bulk_limit_bytes: usize,
    pub per_pod_limit_bytes: usize,
    pub priority_bytes: usize,
    pub priority_limit_bytes: usize,
}

impl QueueBudget {
    pub fn new(bulk_limit: usize, per_pod_limit: usize, priority_limit: usize) -> QueueBudget {
        let priority_limit = priority_limit.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        QueueBudget {
            bulk_limit: bulk_limit.max(1),
            per_pod_limit: per_pod_limit.max(1),
            bulk: Mutex::new(BulkQueued::default()),
            priority_limit,
            priority: tokio::sync::Semaphore::new(priority_limit),
        }
    }

    /// Takes room for `bytes` of `cgroup_id`'s bulk events; false when the pod's share or the
    /// whole queue has no room for them.
    pub fn acquire_bulk(&self, cgroup_id: u64, bytes: usize) -> bool {
        let Ok(mut queued) = self.bulk.lock() else { return false };
        let pod = queued.per_pod.get(&cgroup_id).copied().unwrap_or(0);
        if pod + bytes > self.per_pod_limit || queued.bytes + bytes > self.bulk_limit {
            return false;
        }
        queued.bytes += bytes;
        queued.per_pod.insert(cgroup_id, pod + bytes);
        true
    }

    /// Gives the room back (the pipeline took the event, or it could not be queued).
    pub fn release_bulk(&self, cgroup_id: u64, bytes: usize) {
        if let Ok(mut queued) = self.bulk.lock() {
            queued.bytes = queued.bytes.saturating_sub(bytes);
            if let Some(pod) = queued.per_pod.get_mut(&cgroup_id) {
                *pod = pod.saturating_sub(bytes);
                if *pod == 0 {
                    queued.per_pod.remove(&cgroup_id);
                }
            }
        }
    }

    /// The bytes a priority event is counted as: its size, but never more than the whole
    /// budget (so one event always fits in an empty queue).
    fn priority_permits(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.priority_limit).min(u32::MAX as usize) as u32
    }

    /// Waits until the priority queue has room for `bytes`; the room is held until
    /// [`QueueBudget::release_priority`].
    pub async fn acquire_priority(&self, bytes: usize) {
        if let Ok(permit) = self.priority.acquire_many(self.priority_permits(bytes)).await {
            permit.forget();
        }
    }

    /// Gives the room of a priority event back (the pipeline took it).
    pub fn release_priority(&self, bytes: usize) {
        self.priority.add_permits(self.priority_permits(bytes) as usize);
    }

    pub fn snapshot(&self) -> QueueBudgetSnapshot {
        QueueBudgetSnapshot {
            bulk_bytes: self.bulk.lock().map(|q| q.bytes).unwrap_or(0),
            bulk_limit_bytes: self.bulk_limit,
            per_pod_limit_bytes: self.per_pod_limit,
            priority_bytes: self.priority_limit.saturating_sub(self.priority.available_permits()),
            priority_limit_bytes: self.priority_limit,
        }
    }
}

/// Bulk records read before the reader task yields to the runtime's other tasks.
const BULK_BATCH: usize = 256;

/// Drains the bulk ring until its output is closed: each record dropped (and counted) when its
/// pod's share or the bulk queue's byte budget has no room for it. Whoever receives releases
/// each event's bytes (`QueueBudget::release_bulk`). The priority ring is not read here: the
/// pipeline thread reads it itself ([`PipelineSource`]).
pub async fn run_bulk(
    bulk: RingBuf<MapData>,
    stats: Arc<ReaderStats>,
    drops: Arc<QueueDrops>,
    budget: Arc<QueueBudget>,
    bulk_out: mpsc::Sender<Queued>,
) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside its AsyncFd, so the fd stays open
    // for as long as it is registered.
    let mut bulk = unsafe { AsyncFd::register(bulk) }.map_err(|e| e.into_parts().1)?;
    // Up to BULK_BATCH records forwarded: Some(true) when the ring is drained, None when the
    // queue has closed.
    let forward = |ring: &mut RingBuf<MapData>| -> Option<bool> {
        for _ in 0..BULK_BATCH {
            let Some(item) = ring.next() else { return Some(true) };
            let Some(event) = stats.decode_counted(&item) else { continue };
            let cgroup_id = event.header.cgroup_id;
            let bytes = event_bytes(&event);
            if !budget.acquire_bulk(cgroup_id, bytes) {
                drops.add(cgroup_id, event.header.kind);
                continue;
            }
            match bulk_out.try_send(Queued { event, bytes }) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(queued)) => {
                    budget.release_bulk(cgroup_id, bytes);
                    drops.add(cgroup_id, queued.event.header.kind);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return None,
            }
        }
        Some(false)
    };
    loop {
        let tick = tokio::select! {
            guard = bulk.readable_mut() => {
                let mut guard = guard?;
                match forward(guard.get_inner_mut()) {
                    None => return Ok(()),
                    Some(true) => guard.clear_ready(),
                    Some(false) => {
                        // More is waiting: let the runtime's other tasks run, then come back.
                        guard.retain_ready();
                        drop(guard);
                        tokio::task::yield_now().await;
                    }
                }
                false
            }
            () = tokio::time::sleep(BULK_POLL) => true,
        };
        // Unprotected events that woke nobody (see BULK_POLL).
        while tick {
            match forward(bulk.get_mut()) {
                None => return Ok(()),
                Some(true) => break,
                Some(false) => tokio::task::yield_now().await,
            }
        }
    }
}

/// Where the pipeline thread takes its events from: protected events straight from the
/// priority ring, on the pipeline thread itself, then bulk events from the queue the reader
/// task ([`run_bulk`]) fills.
///
/// The pipeline thread waits in its own single-thread runtime, so the kernel's wake-up for a
/// protected event reaches the thread that judges it: one thread wake-up from the ring to the
/// verdict, where a reader task forwarding through a queue took two (the runtime's worker, then
/// the pipeline thread), each a scheduling delay on a busy node (issue 10's latency goal). The
/// kernel ring is the priority queue: a protected event waits in it, never dropped by user
/// space, and the kernel counts what it cannot hold (per kind, `events.loss`).
pub struct PipelineSource {
    runtime: tokio::runtime::Runtime,
    priority: AsyncFd<RingBuf<MapData>>,
    bulk: mpsc::Receiver<Queued>,
    budget: Arc<QueueBudget>,
    stats: Arc<ReaderStats>,
}

/// Why the pipeline's source ended.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot start the pipeline's event runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot wait on the priority ring: {0}")]
    Register(#[source] std::io::Error),
    #[error("the priority ring cannot be read: {0}")]
    Read(#[source] std::io::Error),
}

impl PipelineSource {
    /// Takes the priority ring and the bulk queue; call [`PipelineSource::next`] on the thread
    /// that handles the events.
    pub fn new(
        priority: RingBuf<MapData>,
        bulk: mpsc::Receiver<Queued>,
        budget: Arc<QueueBudget>,
        stats: Arc<ReaderStats>,
    ) -> Result<PipelineSource, SourceError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(SourceError::Runtime)?;
        let registered = {
            let _entered = runtime.enter();
            // SAFETY: the ring buffer owns its fd and lives inside its AsyncFd, so the fd stays
            // open for as long as it is registered.
            unsafe { AsyncFd::register(priority) }
        };
        match registered {
            Ok(priority) => Ok(PipelineSource { runtime, priority, bulk, budget, stats }),
            Err(err) => {
                // Dropping a runtime inside the daemon's async context panics: let it go in the
                // background.
                runtime.shutdown_background();
                Err(SourceError::Register(err.into_parts().1))
            }
        }
    }

    /// The ring and the queue back (the latency bench switches between ways of reading).
    pub fn into_parts(self) -> (RingBuf<MapData>, mpsc::Receiver<Queued>) {
        let PipelineSource { runtime, priority, bulk, .. } = self;
        let ring = {
            let _entered = runtime.enter();
            priority.into_inner()
        };
        (ring, bulk)
    }

    /// Nothing is waiting in the bulk queue (the priority ring cannot be peeked; a protected
    /// event waiting there is taken by the next call anyway).
    pub fn bulk_is_empty(&self) -> bool {
        self.bulk.is_empty()
    }

    /// The next protected event already in the ring, without waiting.
    fn take_priority(ring: &mut RingBuf<MapData>, stats: &ReaderStats) -> Option<Event> {
        loop {
            let item = ring.next()?;
            if let Some(event) = stats.decode_counted(&item) {
                return Some(event);
            }
        }
    }

    /// The next event and whether it is protected: a protected one whenever one is in the ring
    /// (a bulk one gives its pod's room in the queue back). Waits when there is none; after a
    /// burst, once nothing came for a while, gives the memory that held it back (`trimmer`).
    /// None when the bulk queue has closed (the reader task ended), or an error when the
    /// priority ring cannot be read.
    pub fn next(&mut self, trimmer: &mut crate::memory::Trimmer) -> Result<Option<(Event, bool)>, SourceError> {
        let PipelineSource { runtime, priority, bulk, budget, stats } = self;
        if let Some(event) = Self::take_priority(priority.get_mut(), stats) {
            return Ok(Some((event, true)));
        }
        let from_bulk = |queued: Queued| {
            budget.release_bulk(queued.event.header.cgroup_id, queued.bytes);
            (queued.event, false)
        };
        if let Ok(queued) = bulk.try_recv() {
            return Ok(Some(from_bulk(queued)));
        }
        runtime.block_on(async {
            loop {
                let idle_wait = trimmer.idle_wait();
                tokio::select! {
                    biased;
                    guard = priority.readable_mut() => {
                        let mut guard = guard.map_err(SourceError::Read)?;
                        match Self::take_priority(guard.get_inner_mut(), stats) {
                            Some(event) => return Ok(Some((event, true))),
                            // Read to the end: wait for the kernel's next wake-up.
                            None => guard.clear_ready(),
                        }
                    }
                    queued = bulk.recv() => return Ok(queued.map(from_bulk)),
                    () = tokio::time::sleep(idle_wait.unwrap_or_default()), if idle_wait.is_some() => {
                        trimmer.idle();
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::decode::{ExecData, Header, OpenData};

    fn event(cgroup_id: u64, data: EventData) -> Event {
        let kind = match &data {
            EventData::Exec(_) => EventKind::Exec,
            _ => EventKind::Open,
        };
        Event {
            header: Header {
                ktime_ns: 1,
                cgroup_id,
                kind,
                source: "tracepoint",
                pid: 1,
                tid: 1,
                ppid: 0,
                uid: 0,
                gid: 0,
                euid: 0,
                egid: 0,
                comm: "x".repeat(15),
                truncated: false,
                start_ns: 0,
            },
            data,
        }
    }

    fn open(cgroup_id: u64, path: &str) -> Event {
        event(cgroup_id, EventData::Open(OpenData::read_only(path, path, 3)))
    }

    /// The largest exec the kernel sends: a full path and every argv slot full.
    fn big_exec(cgroup_id: u64) -> Event {
        let argv = (0..palisade_common::event::ARGV_SLOTS).map(|_| "a".repeat(palisade_common::event::ARG_LEN)).collect();
        event(
            cgroup_id,
            EventData::Exec(ExecData {
                filename: "/".repeat(palisade_common::event::PATH_LEN),
                argv,
                argc: 16,
                argv_truncated: true,
                via_execveat: false,
                dirfd: -100,
                at_flags: 0,
                fileless: false,
                exe: Some("/".repeat(palisade_common::event::PATH_LEN)),
                exe_resolved: true,
                stdio: Default::default(),
            }),
        )
    }

    #[test]
    fn an_event_counts_its_heap() {
        let small = event_bytes(&open(1, "/a"));
        let long = event_bytes(&open(1, &"/x".repeat(128)));
        assert!(small >= std::mem::size_of::<Event>());
        assert!(long >= small + 250, "a 256-byte path counted as {} more bytes", long - small);
        assert!(event_bytes(&big_exec(1)) > 16 * 64 + 2 * 256, "{}", event_bytes(&big_exec(1)));
    }

    /// An attacker who makes every event as large as the kernel allows fills the pod's share
    /// with fewer events; the bytes queued never pass the bounds, another pod still gets in,
    /// and room given back can be taken again.
    #[test]
    fn queues_are_bounded_in_bytes_per_pod_and_in_all() {
        let (noisy, quiet, third) = (10, 20, 30);
        let budget = QueueBudget::new(64 << 10, 16 << 10, 8 << 10);
        let big = event_bytes(&big_exec(noisy));
        let mut taken = 0;
        while budget.acquire_bulk(noisy, big) {
            taken += 1;
            assert!(taken < 1000, "the pod's share never filled");
        }
        assert_eq!(taken, (16 << 10) / big, "large events fill the pod's share in bytes, not in events");
        assert!(budget.snapshot().bulk_bytes <= 16 << 10);
        // Small events of the same pod do not fit either once its share is spent...
        let small = event_bytes(&open(noisy, "/a"));
        while budget.acquire_bulk(noisy, small) {}
        assert!(budget.snapshot().bulk_bytes <= 16 << 10);
        // ...but another pod's do.
        assert!(budget.acquire_bulk(quiet, small), "a flooding pod took a quiet pod's place");
        // All pods together stay under the total.
        let mut pod = 100;
        while budget.acquire_bulk(pod, 8 << 10) || budget.acquire_bulk(pod + 1, small) {
            pod += 2;
            assert!(pod < 10_000);
        }
        assert!(budget.snapshot().bulk_bytes <= 64 << 10, "{:?}", budget.snapshot());
        // A fresh pod's small event did not fit: the whole queue is full, for everyone.
        assert!(!budget.acquire_bulk(third, small), "{:?}", budget.snapshot());
        // Room given back is room again.
        budget.release_bulk(noisy, big);
        assert!(budget.acquire_bulk(noisy, small), "{:?}", budget.snapshot());
    }

    #[tokio::test]
    async fn the_priority_queue_waits_for_room_in_bytes() {
        let budget = Arc::new(QueueBudget::new(1 << 20, 1 << 20, 4096));
        budget.acquire_priority(3000).await;
        assert_eq!(budget.snapshot().priority_bytes, 3000);
        // 3000 + 3000 > 4096: the reader waits (back-pressure, nothing dropped) ...
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire_priority(3000).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a priority event was queued past the byte budget");
        // ... until the pipeline takes the first one.
        budget.release_priority(3000);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("room given back").expect("task");
        // One event larger than the whole budget still gets through an empty queue.
        budget.release_priority(3000);
        tokio::time::timeout(std::time::Duration::from_secs(5), budget.acquire_priority(1 << 20)).await.expect("an oversized event");
        assert_eq!(budget.snapshot().priority_bytes, 4096);
    }
}
