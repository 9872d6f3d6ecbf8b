//! The alert stream's time vocabulary: RFC 3339 UTC with microseconds and the `--since`/`--until`
//! and duration parsers. They live in the crate-level [`crate::time`] (all of it jiff), so that
//! events, the daemon and the API format times the same way without importing `alerts`.
pub use crate::time::{TimeError, UnixMicros, format_micros, now_micros, parse_duration, parse_instant, parse_rfc3339};
