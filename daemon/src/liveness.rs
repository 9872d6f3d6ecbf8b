//! Liveness of the stages that must keep moving (issue 15): the event reader (kernel ring
//! buffers -> queues) and the pipeline thread (queues -> enrichment -> rules). A stage is
//! **stuck** when work was offered to it after it last moved and it has not moved for
//! `stuck_after`; a stage with nothing to do is idle, never stuck. A stuck stage makes
//! `/healthz` answer 503 (the kubelet restarts the daemon: a blind daemon that looks alive is
//! the worst case), shows in `palisade status`, raises a critical `daemon` alert and sets
//! `palisade_stage_stuck{stage}`; it recovers by itself when the stage moves again.
//!
//! Progress and offered work are counters the stages already keep (records read, events
//! enriched; events the kernel produced, events the reader decoded), sampled by a monitor task,
//! so the hot paths pay nothing for it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a stage may sit on offered work without moving before it counts as stuck. Long
/// enough that a loaded node (or a debugger) does not trip it; far below the minutes a stuck
/// reader would otherwise go unnoticed.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(60);

/// A stuck stage, as status and `/healthz` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckStage {
    pub stage: &'static str,
    /// Seconds since it last moved.
    pub seconds: f64,
    /// Work offered to it since it last moved (the offered counter's increase).
    pub waiting: u64,
    /// What the counters mean, for the reader of the report.
    pub what: &'static str,
}

/// A change worth an alert.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    Stuck(StuckStage),
    Recovered { stage: &'static str, after_seconds: f64 },
}

#[derive(Debug)]
struct Watch {
    progress: u64,
    /// The offered counter when the stage last moved (or when watching began).
    offered_at_move: u64,
    offered: u64,
    moved_at: Instant,
    stuck: bool,
    what: &'static str,
}

/// The stages' last samples; one per daemon, shared by the monitor task and the health report.
#[derive(Debug)]
pub struct Liveness {
    stuck_after: Duration,
    stages: Mutex<BTreeMap<&'static str, Watch>>,
}

impl Liveness {
    pub fn new(stuck_after: Duration) -> Liveness {
        Liveness { stuck_after, stages: Mutex::new(BTreeMap::new()) }
    }

    pub fn stuck_after(&self) -> Duration {
        self.stuck_after
    }

    /// How often the monitor should sample: often enough to see a stall within a quarter of
    /// `stuck_after`, at most every 5 s.
    pub fn sample_every(&self) -> Duration {
        (self.stuck_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// One sample of `stage`: `progress` counts what it has done, `offered` what was handed to
    /// it (both only grow). Returns a transition when the stage became stuck or recovered.
    pub fn observe(&self, stage: &'static str, what: &'static str, progress: u64, offered: u64, now: Instant) -> Option<Transition> {
        let mut stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        let watch = stages.entry(stage).or_insert(Watch { progress, offered_at_move: offered, offered, moved_at: now, stuck: false, what });
        watch.offered = offered;
        if progress != watch.progress {
            let was_stuck = std::mem::replace(&mut watch.stuck, false);
            let after_seconds = now.duration_since(watch.moved_at).as_secs_f64();
            watch.progress = progress;
            watch.offered_at_move = offered;
            watch.moved_at = now;
            return was_stuck.then_some(Transition::Recovered { stage, after_seconds });
        }
        if offered <= watch.offered_at_move {
            // Nothing new to do: idle, and the clock starts again from here.
            watch.moved_at = now;
            return None;
        }
        if !watch.stuck && now.duration_since(watch.moved_at) >= self.stuck_after {
            watch.stuck = true;
            return Some(Transition::Stuck(report(stage, watch, now)));
        }
        None
    }

    /// The stages stuck now.
    pub fn stuck(&self) -> Vec<StuckStage> {
        let now = Instant::now();
        let stages = self.stages.lock().unwrap_or_else(|p| p.into_inner());
        stages.iter().filter(|(_, w)| w.stuck).map(|(stage, w)| report(stage, w, now)).collect()
    }
}

fn report(stage: &'static str, watch: &Watch, now: Instant) -> StuckStage {
    StuckStage {
        stage,
        seconds: now.duration_since(watch.moved_at).as_secs_f64(),
        waiting: watch.offered.saturating_sub(watch.offered_at_move),
        what: watch.what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_not_stuck_waiting_without_progress_is_and_progress_recovers() {
        let live = Liveness::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(live.observe("pipeline", "", 5, 5, at(0)), None);
        // Idle for a long time: nothing offered, nothing done.
        assert_eq!(live.observe("pipeline", "", 5, 5, at(60)), None);
        // Work arrives and is done.
        assert_eq!(live.observe("pipeline", "", 9, 9, at(61)), None);
        // Work arrives and nothing moves: not yet, then stuck (once), reported with what waits.
        assert_eq!(live.observe("pipeline", "", 9, 12, at(62)), None);
        assert_eq!(live.observe("pipeline", "", 9, 12, at(70)), None);
        let Some(Transition::Stuck(stuck)) = live.observe("pipeline", "", 9, 14, at(72)) else { panic!("not stuck") };
        assert_eq!((stuck.stage, stuck.waiting), ("pipeline", 5));
        assert_eq!(live.observe("pipeline", "", 9, 15, at(80)), None, "reported once");
        assert_eq!(live.stuck().len(), 1);
        // It moves again: recovered, and no longer listed.
        assert!(matches!(live.observe("pipeline", "", 10, 15, at(81)), Some(Transition::Recovered { stage: "pipeline", .. })));
        assert!(live.stuck().is_empty());
    }

    #[test]
    fn sampling_follows_the_threshold() {
        assert_eq!(Liveness::new(Duration::from_secs(60)).sample_every(), Duration::from_secs(5));
        assert_eq!(Liveness::new(Duration::from_secs(2)).sample_every(), Duration::from_millis(500));
    }
}
