//! Wall-clock instants for alerts: RFC 3339 UTC with microseconds, parsing of `--since`/`--until`
//! (a duration back from now, like `10m`, or an absolute time), and durations like `10s`.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, the resolution alerts carry.
pub type UnixMicros = i64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("bad time {0:?}: want RFC 3339 (2026-11-29T12:00:00Z, offsets allowed) or a duration like 30s, 10m, 2h, 1d")]
    BadTime(String),
    #[error("bad duration {0:?}: want a number and a unit (ms, s, m, h, d), e.g. 10s or 1h30m")]
    BadDuration(String),
}

pub fn now_micros() -> UnixMicros {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    since.as_micros() as UnixMicros
}

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T12:00:00.123456Z` (same form as event times).
pub fn format_micros(micros: UnixMicros) -> String {
    crate::events::input::rfc3339(i128::from(micros) * 1000)
}

/// Days since 1970-01-01 for a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(s: &str, range: std::ops::Range<usize>) -> Option<u32> {
    let part = s.get(range)?;
    if part.bytes().all(|b| b.is_ascii_digit()) { part.parse().ok() } else { None }
}

/// Parses RFC 3339 (`T` or space between date and time; `Z` or `±HH:MM`; any fraction length).
/// A bare date (`2026-11-29`) means its midnight UTC.
pub fn parse_rfc3339(text: &str) -> Result<UnixMicros, TimeError> {
    let bad = || TimeError::BadTime(text.to_string());
    let s = text.trim();
    let year = i64::from(digits(s, 0..4).ok_or_else(bad)?);
    let month = digits(s, 5..7).ok_or_else(bad)?;
    let day = digits(s, 8..10).ok_or_else(bad)?;
    if s.get(4..5) != Some("-") || s.get(7..8) != Some("-") || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    let days = days_from_civil(year, month, day);
    if s.len() == 10 {
        return Ok(days * 86_400 * 1_000_000);
    }
    if !matches!(s.get(10..11), Some("T" | "t" | " ")) || s.get(13..14) != Some(":") || s.get(16..17) != Some(":") {
        return Err(bad());
    }
    let hour = digits(s, 11..13).ok_or_else(bad)?;
    let minute = digits(s, 14..16).ok_or_else(bad)?;
    let second = digits(s, 17..19).ok_or_else(bad)?;
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad());
    }
    let mut rest = s.get(19..).ok_or_else(bad)?;
    let mut micros_frac: i64 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let len = frac.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return Err(bad());
        }
        let mut scaled = String::from(&frac[..len.min(6)]);
        while scaled.len() < 6 {
            scaled.push('0');
        }
        micros_frac = scaled.parse().map_err(|_| bad())?;
        rest = &frac[len..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(0..1) {
                Some("+") => 1,
                Some("-") => -1,
                _ => return Err(bad()),
            };
            if rest.len() != 6 || rest.get(3..4) != Some(":") {
                return Err(bad());
            }
            let oh = i64::from(digits(rest, 1..3).ok_or_else(bad)?);
            let om = i64::from(digits(rest, 4..6).ok_or_else(bad)?);
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second) - offset_secs;
    Ok(secs * 1_000_000 + micros_frac)
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d`, and sums like `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, TimeError> {
    let bad = || TimeError::BadDuration(text.to_string());
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        if num_len == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" | "sec" => Duration::from_secs(value),
            "m" | "min" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// `--since`/`--until`: a duration back from `now`, or an absolute time.
pub fn parse_instant(text: &str, now: UnixMicros) -> Result<UnixMicros, TimeError> {
    if let Ok(back) = parse_duration(text) {
        return Ok(now - back.as_micros() as i64);
    }
    parse_rfc3339(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_alert_times() {
        for micros in [0, 951_782_400_000_000, 1_795_953_600_123_456, 4_102_444_799_999_999] {
            assert_eq!(parse_rfc3339(&format_micros(micros)), Ok(micros));
        }
    }

    #[test]
    fn parses_offsets_fractions_and_dates() {
        let base = parse_rfc3339("2026-11-29T12:00:00Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-29T14:00:00+02:00"), Ok(base));
        assert_eq!(parse_rfc3339("2026-11-29 11:30:00.5-00:30"), Ok(base + 500_000));
        assert_eq!(parse_rfc3339("2026-11-29T12:00:00.123456789Z"), Ok(base + 123_456));
        assert_eq!(parse_rfc3339("2026-11-29"), Ok(base - 12 * 3600 * 1_000_000));
        for bad in ["", "2026-13-01", "2026-11-29T12:00", "2026-11-29T12:00:00", "yesterday", "2026-11-29T12:00:00+2"] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn durations_and_relative_instants() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(parse_instant("1m", 100_000_000), Ok(40_000_000));
    }
}
