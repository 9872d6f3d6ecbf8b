//! Rule failures as an operator sees them: every failure is counted (by the caller, per rule and
//! reason), and at most one `rule_error` alert per rule and event type is raised per window, the
//! next one carrying how many failures the window held.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::model::{EventType, RuleFailure};

/// One alert per rule and event type per minute: a rule failing on every exec must not flood the
/// alert stream, and a rule that starts failing is still reported within a minute.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// Decides which failures become alerts.
#[derive(Debug)]
pub struct FailureLimiter {
    window: Duration,
    /// Per (rule, event type): when the last alert went out, and failures since then.
    last: HashMap<(String, EventType), (Instant, u64)>,
}

impl Default for FailureLimiter {
    fn default() -> Self {
        FailureLimiter::new(DEFAULT_WINDOW)
    }
}

impl FailureLimiter {
    pub fn new(window: Duration) -> FailureLimiter {
        FailureLimiter { window, last: HashMap::new() }
    }

    /// `Some(n)` when `failure` should be raised as an alert now, `n` being the failures of this
    /// rule and event type it stands for (itself plus those held back since the last alert);
    /// `None` when it is held back (it is then counted in the next alert).
    pub fn admit(&mut self, failure: &RuleFailure, now: Instant) -> Option<u64> {
        let key = (failure.rule_id.clone(), failure.event_type);
        match self.last.get_mut(&key) {
            Some((sent, held)) if now.saturating_duration_since(*sent) < self.window => {
                *held += 1;
                None
            }
            Some((sent, held)) => {
                let count = *held + 1;
                *sent = now;
                *held = 0;
                Some(count)
            }
            None => {
                // Bounded by (rules x event types) of the packs seen; forget rules no longer
                // failing when it grows past that.
                if self.last.len() > 4096 {
                    let window = self.window;
                    self.last.retain(|_, (sent, _)| now.saturating_duration_since(*sent) < window);
                }
                self.last.insert(key, (now, 0));
                Some(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::model::FailureReason;

    fn failure(rule: &str, ty: EventType) -> RuleFailure {
        RuleFailure { rule_id: rule.into(), event_type: ty, reason: FailureReason::Budget, detail: String::new() }
    }

    #[test]
    fn one_alert_per_rule_and_type_per_window_counting_what_was_held() {
        let mut limiter = FailureLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limiter.admit(&failure("a", EventType::Exec), t0), Some(1));
        assert_eq!(limiter.admit(&failure("a", EventType::Exec), t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.admit(&failure("a", EventType::Exec), t0 + Duration::from_secs(2)), None);
        // Another rule, or the same rule on another type, is its own stream.
        assert_eq!(limiter.admit(&failure("b", EventType::Exec), t0), Some(1));
        assert_eq!(limiter.admit(&failure("a", EventType::Open), t0), Some(1));
        // After the window: one alert standing for itself and the two held back.
        assert_eq!(limiter.admit(&failure("a", EventType::Exec), t0 + Duration::from_secs(61)), Some(3));
        assert_eq!(limiter.admit(&failure("a", EventType::Exec), t0 + Duration::from_secs(62)), None);
    }
}
