//! Giving memory back to the system after a burst.
//!
//! The allocator (glibc malloc) keeps freed memory in its per-thread arenas: after a flood,
//! the pages that held the queued events and rule inputs stay in the daemon's RSS although
//! nothing uses them. Once a burst is over (no event for `TRIM_INTERVAL` after at least
//! `TRIM_AFTER_EVENTS` events), the pipeline asks the allocator to return its free pages.
use std::time::Duration;

/// Events handled since the last trim before an idle moment is worth a trim.
pub const TRIM_AFTER_EVENTS: u64 = 10_000;
/// How long without an event ends a burst (a trim walks every arena: never during one).
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Decides when the pipeline returns free memory to the system: the pipeline counts each
/// event ([`Trimmer::note_event`]) and, when no event came for [`Trimmer::idle_wait`], calls
/// [`Trimmer::idle`].
#[derive(Debug, Default)]
pub struct Trimmer {
    since_trim: u64,
    trims: u64,
}

impl Trimmer {
    /// Counts one event handled.
    pub fn note_event(&mut self) {
        self.since_trim += 1;
    }

    /// How long to wait for the next event before the burst counts as over: None while too
    /// few events came since the last trim to be worth one.
    pub fn idle_wait(&self) -> Option<Duration> {
        (self.since_trim >= TRIM_AFTER_EVENTS).then_some(TRIM_INTERVAL)
    }

    /// No event came for [`Trimmer::idle_wait`]: trims. True when it trimmed.
    pub fn idle(&mut self) -> bool {
        if self.since_trim < TRIM_AFTER_EVENTS {
            return false;
        }
        self.since_trim = 0;
        self.trims += 1;
        release_free_memory();
        true
    }

    /// How many times it trimmed.
    pub fn trims(&self) -> u64 {
        self.trims
    }
}

/// Returns the allocator's free pages (all arenas) to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and may be called from any thread at any time; no
    // safe wrapper exists (neither std nor nix expose it).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_burst() {
        let mut trimmer = Trimmer::default();
        for _ in 0..TRIM_AFTER_EVENTS - 1 {
            trimmer.note_event();
        }
        assert_eq!(trimmer.idle_wait(), None, "a trim before the burst was big enough");
        assert!(!trimmer.idle());
        trimmer.note_event();
        assert_eq!(trimmer.idle_wait(), Some(TRIM_INTERVAL));
        assert!(trimmer.idle());
        assert_eq!(trimmer.trims(), 1);
        assert_eq!(trimmer.idle_wait(), None, "trimmed twice for one burst");
        assert!(!trimmer.idle());
    }
}
