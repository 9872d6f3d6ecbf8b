//! Wall-clock time for the whole crate, all through jiff: the RFC 3339 form events and alerts
//! carry (UTC, microseconds), parsing of `--since`/`--until` (a duration back from now, like
//! `10m`, or an absolute time) and durations like `10s`. A leaf module: it imports nothing from
//! the crate, so every stage may use it without an arrow running back up the data flow.
use std::time::Duration;

use jiff::civil::Date;
use jiff::fmt::temporal::DateTimePrinter;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Span, SpanRelativeTo, Timestamp};
use nix::time::ClockId;

/// Microseconds since the Unix epoch, the resolution alerts carry.
pub type UnixMicros = i64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error(
        "bad time {text:?}: {reason}; want RFC 3339 (2026-11-29T12:00:00Z, offsets allowed), a date (2026-11-29) or a duration back from now like 30s, 10m, 2h, 1d"
    )]
    BadTime { text: String, reason: String },
    #[error("bad duration {text:?}: {reason}; want a number and a unit (ms, s, m, h, d), e.g. 10s or 1h30m")]
    BadDuration { text: String, reason: String },
}

/// RFC 3339 in UTC with exactly six fraction digits: `2026-11-29T12:00:00.123456Z`.
const PRINTER: DateTimePrinter = DateTimePrinter::new().precision(Some(6));

pub fn now_micros() -> UnixMicros {
    Timestamp::now().as_microsecond()
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T12:00:00.123456Z` (same form as event times).
pub fn format_micros(micros: UnixMicros) -> String {
    format_timestamp(timestamp_clamped(i128::from(micros) * 1000))
}

/// RFC 3339 UTC with microseconds for nanoseconds since the epoch (kernel times made wall-clock).
pub fn format_unix_ns(unix_ns: i128) -> String {
    format_timestamp(timestamp_clamped(unix_ns))
}

fn format_timestamp(ts: Timestamp) -> String {
    PRINTER.timestamp_to_string(&ts)
}

/// jiff covers the years -9999..=9999; an instant outside them (only a corrupt clock offset or
/// a forged alert could give one) is printed as the nearest end, never as a panic.
fn timestamp_clamped(unix_ns: i128) -> Timestamp {
    Timestamp::from_nanosecond(unix_ns).unwrap_or(if unix_ns < 0 { Timestamp::MIN } else { Timestamp::MAX })
}

/// Converts kernel monotonic timestamps (bpf_ktime_get_ns) to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns, sampled once.
    offset_ns: i128,
}

/// A clock's reading in ns (0 if the kernel refused, which it does only for an unknown clock).
fn clock_ns(clock: ClockId) -> i128 {
    nix::time::clock_gettime(clock).map(|ts| i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())).unwrap_or(0)
}

/// The CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID): what a piece of work
/// cost, whatever else the machine was running meanwhile.
pub fn thread_cpu_time() -> std::time::Duration {
    std::time::Duration::from_nanos(u64::try_from(clock_ns(ClockId::CLOCK_THREAD_CPUTIME_ID)).unwrap_or(0))
}

/// CLOCK_MONOTONIC now, in ns: the clock bpf_ktime_get_ns reads.
pub fn monotonic_now_ns() -> u64 {
    clock_ns(ClockId::CLOCK_MONOTONIC) as u64
}

impl Clock {
    pub fn new() -> Clock {
        Clock { offset_ns: clock_ns(ClockId::CLOCK_REALTIME) - clock_ns(ClockId::CLOCK_MONOTONIC) }
    }

    pub fn wall_ns(&self, ktime_ns: u64) -> i128 {
        ktime_ns as i128 + self.offset_ns
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// `2026-11-29 12:00:00.123` (UTC, milliseconds) for terminals; None if `text` is not RFC 3339.
pub fn short_form(text: &str) -> Option<String> {
    let ts: Timestamp = text.parse().ok()?;
    Some(ts.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
}

/// RFC 3339 with nanoseconds (`2026-11-29T12:00:00.123456000Z`, what Falco writes); None if
/// `text` is not RFC 3339.
pub fn nanos_form(text: &str) -> Option<String> {
    let ts: Timestamp = text.parse().ok()?;
    Some(DateTimePrinter::new().precision(Some(9)).timestamp_to_string(&ts))
}

/// Parses RFC 3339 (`T`, `t` or a space between date and time; `Z` or `±HH:MM`; up to nine
/// fraction digits). A bare date (`2026-11-29`) means its midnight UTC. Dates that do not exist
/// (`2026-02-31`) are errors.
pub fn parse_rfc3339(text: &str) -> Result<UnixMicros, TimeError> {
    let s = text.trim();
    let bad = |reason: String| TimeError::BadTime { text: text.to_string(), reason };
    let ts = if s.len() == 10 {
        let date: Date = s.parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
        date.to_zoned(TimeZone::UTC).map_err(|e| bad(e.to_string()))?.timestamp()
    } else {
        s.parse::<Timestamp>().map_err(|e| bad(e.to_string()))?
    };
    Ok(ts.as_microsecond())
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d`, and sums like `1h30m` (jiff's friendly format, so
/// `1h 30m` and `90 minutes` work too). A day is 24 hours and a week 7 days; years, months and negative
/// durations are errors.
pub fn parse_duration(text: &str) -> Result<Duration, TimeError> {
    let bad = |reason: String| TimeError::BadDuration { text: text.to_string(), reason };
    let span: Span = text.trim().parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(bad("years and months have no fixed length; use days".into()));
    }
    let signed: SignedDuration =
        span.to_duration(SpanRelativeTo::days_are_24_hours()).map_err(|e| bad(e.to_string()))?;
    Duration::try_from(signed).map_err(|_| bad("a duration back from now cannot be negative".into()))
}

/// `--since`/`--until`: a duration back from `now`, or an absolute time. The error names both
/// readings when neither fits.
pub fn parse_instant(text: &str, now: UnixMicros) -> Result<UnixMicros, TimeError> {
    match parse_duration(text) {
        Ok(back) => {
            let back = i64::try_from(back.as_micros()).unwrap_or(i64::MAX);
            let at = now.saturating_sub(back);
            // An instant jiff cannot print (before the year -9999) would be printed as another
            // one: refuse it here, so what parses prints back to itself.
            match Timestamp::from_microsecond(at) {
                Ok(_) => Ok(at),
                Err(_) => Err(TimeError::BadDuration { text: text.to_string(), reason: "reaches back before the year -9999".into() }),
            }
        }
        // Without a date's `-` or a clock's `:` the user meant a duration: say what is wrong
        // with it rather than why it is not a date.
        Err(TimeError::BadDuration { reason, .. }) if !text.contains(['-', ':']) => {
            Err(TimeError::BadTime { text: text.to_string(), reason })
        }
        Err(_) => parse_rfc3339(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_reaching_past_the_printable_range_is_refused() {
        // Found by the api_request fuzz target (whose own lock has another jiff, which read
        // `H:M:S` with huge hours as a duration): an instant before the year -9999 printed as the
        // range's end and re-parsed as another instant.
        let err = parse_instant("5000000d", 1_700_000_000_000_000).unwrap_err();
        assert!(err.to_string().contains("-9999"), "{err}");
        assert!(parse_instant("000000001455163829:070:1007700077", 1_700_000_000_000_000).is_err());
        assert_eq!(parse_instant("2h", 7_200_000_001).unwrap(), 1);
    }

    #[test]
    fn round_trips_alert_times() {
        for micros in [0, 951_782_400_000_000, 1_795_953_600_123_456, 4_102_444_799_999_999, -1] {
            assert_eq!(parse_rfc3339(&format_micros(micros)), Ok(micros));
        }
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_unix_ns(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_unix_ns(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(format_unix_ns(1_795_953_600_123_456_789), "2026-11-29T12:00:00.123456Z");
        assert_eq!(format_unix_ns(-1_000), "1969-12-31T23:59:59.999999Z");
        // Out of jiff's range: the nearest end, not a panic.
        assert!(format_unix_ns(i128::MAX).starts_with("9999-12-"), "{}", format_unix_ns(i128::MAX));
        assert!(format_micros(i64::MIN).starts_with("-009999-01-"), "{}", format_micros(i64::MIN));
        assert_eq!(short_form("2026-11-29T12:00:00.123456Z").as_deref(), Some("2026-11-29 12:00:00.123"));
        assert_eq!(short_form("2026-11-29T14:00:00+02:00").as_deref(), Some("2026-11-29 12:00:00.000"));
        assert_eq!(short_form("not a time"), None);
        assert_eq!(nanos_form("2026-11-29T12:00:00.123456Z").as_deref(), Some("2026-11-29T12:00:00.123456000Z"));
    }

    #[test]
    fn parses_offsets_fractions_and_dates() {
        let base = parse_rfc3339("2026-11-29T12:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-29T14:00:00+02:00"), Ok(base));
        assert_eq!(parse_rfc3339("2026-11-29 11:30:00.5-00:30"), Ok(base + 500_000));
        assert_eq!(parse_rfc3339("2026-11-29T12:00:00.123456789Z"), Ok(base + 123_456));
        assert_eq!(parse_rfc3339("2026-11-29"), Ok(base - 12 * 3600 * 1_000_000));
        assert_eq!(parse_rfc3339("2024-02-29"), Ok(1_709_164_800_000_000));
        for bad in ["", "2026-13-01", "2026-11-29T12:00:00", "yesterday", "2026-11-29T12:00:00+2"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should not parse");
        }
    }

    /// The hand-written parser checked only 1..=31 for the day, so `2026-02-31` became 3 March.
    #[test]
    fn impossible_dates_are_rejected_with_the_reason() {
        for bad in ["2026-02-31", "2026-02-29", "2026-04-31", "2026-02-30T00:00:00Z", "2025-11-31 08:00:00+01:00"] {
            let err = parse_rfc3339(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.contains(bad), "{text}");
            assert!(text.contains("day"), "the reason says the day is wrong: {text}");
            assert!(parse_instant(bad, 0).is_err(), "{bad:?} as --since");
        }
        for bad in ["2026-11-29T24:00:00Z", "2026-11-29T12:61:00Z"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn durations_and_relative_instants() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse_duration("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in ["", "10", "5y", "2mo", "-10s", "10s ago", "soon"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
        assert_eq!(parse_instant("1m", 100_000_000), Ok(40_000_000));
        assert_eq!(parse_instant("2026-11-29", 0), parse_rfc3339("2026-11-29"));
        assert!(parse_instant("10", 0).is_err());
        let err = parse_instant("5y", 0).unwrap_err().to_string();
        assert!(err.contains("years and months"), "{err}");
    }
}
