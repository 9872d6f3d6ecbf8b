//! Reads the event ring buffers with tokio (AsyncFd) and decodes each record. Malformed records
//! and unknown kinds are counted, never fatal.
//!
//! With the priority ring (`run_routed`), protected events are read first and handed on with
//! back-pressure; bulk events are handed on only while the pipeline has room *for that pod*
//! (`QueueShares`: each pod may hold a bounded share of the bulk queue), and the ones it has
//! no room for are dropped and counted per pod cgroup and kind (`QueueDrops`). So a flood
//! neither delays a protected event, nor takes another pod's place in the queue, nor grows
//! memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::decode::{DecodeError, Event, decode};
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

/// Drains the ring buffer into `out` until `out` is closed. Back-pressure is deliberate: when
/// the pipeline is slow the ring buffer fills and the kernel counts the losses per kind.
pub async fn run(ring: RingBuf<MapData>, stats: Arc<ReaderStats>, out: mpsc::Sender<Event>) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd, so the fd stays open for
    // as long as it is registered.
    let mut fd = unsafe { AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(event) = stats.decode_counted(&item) {
                batch.push(event);
            }
        }
        guard.clear_ready();
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

/// Bulk events each pod has in the queue to the pipeline, and the most one pod may have: a pod
/// over its share loses its own events, never another pod's place.
#[derive(Debug)]
pub struct QueueShares {
    per_pod: u32,
    queued: Mutex<std::collections::HashMap<u64, u32>>,
}

impl QueueShares {
    pub fn new(per_pod: u32) -> QueueShares {
        QueueShares { per_pod: per_pod.max(1), queued: Mutex::new(std::collections::HashMap::new()) }
    }

    /// Takes a place for one event of `cgroup_id`; false when the pod holds its whole share.
    pub fn acquire(&self, cgroup_id: u64) -> bool {
        let Ok(mut queued) = self.queued.lock() else { return false };
        let n = queued.entry(cgroup_id).or_insert(0);
        if *n >= self.per_pod {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives the place back (the pipeline took the event, or it could not be queued).
    pub fn release(&self, cgroup_id: u64) {
        if let Ok(mut queued) = self.queued.lock() {
            if let Some(n) = queued.get_mut(&cgroup_id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    queued.remove(&cgroup_id);
                }
            }
        }
    }
}

/// Bulk records read before the priority ring is looked at again.
const BULK_BATCH: usize = 256;

/// Drains both rings until an output is closed: the priority ring first and completely, with
/// back-pressure; then up to `BULK_BATCH` bulk records, each dropped (and counted) when its pod
/// holds its whole share of `bulk_out` or `bulk_out` is full. Whoever receives from `bulk_out`
/// releases each event's share.
pub async fn run_routed(
    priority: RingBuf<MapData>,
    bulk: RingBuf<MapData>,
    stats: Arc<ReaderStats>,
    drops: Arc<QueueDrops>,
    shares: Arc<QueueShares>,
    priority_out: mpsc::Sender<Event>,
    bulk_out: mpsc::Sender<Event>,
) -> std::io::Result<()> {
    // SAFETY: each ring buffer owns its fd and lives inside its AsyncFd, so the fd stays open
    // for as long as it is registered.
    let mut priority = unsafe { AsyncFd::register(priority) }.map_err(|e| e.into_parts().1)?;
    let mut bulk = unsafe { AsyncFd::register(bulk) }.map_err(|e| e.into_parts().1)?;
    loop {
        tokio::select! {
            biased;
            guard = priority.readable_mut() => {
                let mut guard = guard?;
                // Records are decoded one at a time and sent before the next is read: nothing
                // piles up in memory beyond the channel's bound.
                loop {
                    let Some(event) = ({
                        let ring = guard.get_inner_mut();
                        match ring.next() {
                            Some(item) => Some(stats.decode_counted(&item)),
                            None => None,
                        }
                    }) else { break };
                    if let Some(event) = event {
                        if priority_out.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                guard.clear_ready();
            }
            guard = bulk.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                let mut read = 0;
                let mut drained = false;
                while read < BULK_BATCH {
                    let Some(item) = ring.next() else {
                        drained = true;
                        break;
                    };
                    read += 1;
                    let Some(event) = stats.decode_counted(&item) else { continue };
                    let cgroup_id = event.header.cgroup_id;
                    if !shares.acquire(cgroup_id) {
                        drops.add(cgroup_id, event.header.kind);
                        continue;
                    }
                    match bulk_out.try_send(event) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(event)) => {
                            shares.release(cgroup_id);
                            drops.add(cgroup_id, event.header.kind);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
                if drained {
                    guard.clear_ready();
                } else {
                    // More is waiting: give the priority ring its turn, then come back.
                    guard.retain_ready();
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}
