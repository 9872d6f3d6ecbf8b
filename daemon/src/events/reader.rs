//! Reads the event ring buffer with tokio (AsyncFd) and decodes each record. Malformed records
//! and unknown kinds are counted, never fatal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::decode::{DecodeError, Event, decode};

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
