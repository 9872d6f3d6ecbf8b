//! Rendering for people and terminals: strings from workloads (paths, argv, pod labels) are
//! made inert before they reach a terminal, tables are aligned, colour is used only on a TTY.
//!
//! JSON escaping alone keeps a value from forging a *line*, but serde_json leaves DEL, the C1
//! controls (U+0080..U+009F, where U+009B is a CSI on some terminals) and bidi overrides raw,
//! so `harden_json` escapes those as well: `tail -f alerts.jsonl` is safe too.
use std::fmt::Write as _;

use super::schema::{Alert, Outcome};
use crate::output::is_display_hazard;
pub use crate::output::{Cell, Paint, Table, colour_wanted, terminal_safe};
use crate::rules::model::Severity;

/// Escapes, inside an already serialized JSON text, the characters serde_json leaves raw that a
/// terminal would act on. They only occur inside strings there, where `\uXXXX` is valid JSON.
pub fn harden_json(json: String) -> String {
    if !json.chars().any(is_display_hazard) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_display_hazard(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// At most `max` characters, ending in `…` when cut.
pub fn shorten(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = text.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// At most `max` characters, keeping both ends (paths and pod names read best that way).
pub fn shorten_middle(text: &str, max: usize) -> String {
    let count = text.chars().count();
    if count <= max || max < 5 {
        return shorten(text, max);
    }
    let head = (max - 1) / 2;
    let tail = max - 1 - head;
    let mut out: String = text.chars().take(head).collect();
    out.push('…');
    out.extend(text.chars().skip(count - tail));
    out
}

/// Terminal width, when stdout is one.
pub fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer we pass.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

fn severity_paint(severity: Severity) -> Paint {
    match severity {
        Severity::Critical => Paint::BoldRed,
        Severity::High => Paint::Red,
        Severity::Medium => Paint::Yellow,
        Severity::Low => Paint::Cyan,
        Severity::Info => Paint::Dim,
    }
}

fn outcome_paint(outcome: Outcome) -> Paint {
    match outcome {
        Outcome::Quarantined | Outcome::AlreadyQuarantined => Paint::BoldMagenta,
        Outcome::WouldQuarantine => Paint::Magenta,
        Outcome::Pending => Paint::BoldYellow,
        Outcome::Failed => Paint::BoldRed,
        Outcome::Released => Paint::Green,
        _ => Paint::Plain,
    }
}

/// Column widths for alert lines, fixed so that followed alerts line up without knowing the
/// rows to come. The message takes what the terminal has left.
pub struct AlertColumns {
    pub message: usize,
}

pub const ALERT_HEADERS: [&str; 8] = ["TIME", "SEVERITY", "KIND", "RULE", "POD", "PROCESS", "OUTCOME", "MESSAGE"];
const FIXED_WIDTHS: [usize; 7] = [23, 8, 14, 24, 26, 20, 19];

impl AlertColumns {
    pub fn for_terminal(width: Option<usize>) -> AlertColumns {
        let fixed: usize = FIXED_WIDTHS.iter().sum::<usize>() + 2 * FIXED_WIDTHS.len();
        let message = width.map_or(80, |w| w.saturating_sub(fixed).max(30));
        AlertColumns { message }
    }
}

/// The process column: exe (or comm) basename and pid.
fn process_cell(alert: &Alert) -> String {
    let Some(p) = &alert.process else { return "-".into() };
    let name = p
        .exe
        .as_deref()
        .map(|exe| exe.rsplit('/').next().unwrap_or(exe))
        .or(p.comm.as_deref())
        .unwrap_or("?");
    format!("{name}[{}]", p.pid)
}

/// `2026-11-29 12:00:00.123` (UTC) from an alert time; the raw text if it is not RFC 3339.
fn short_time(time: &str) -> String {
    crate::time::short_form(time).unwrap_or_else(|| time.to_string())
}

/// The alert table's shape: fixed widths for all but the message, so that followed alerts,
/// printed one at a time, line up under a header printed before them.
fn alert_table() -> Table {
    let mut table = Table::new(&ALERT_HEADERS);
    table.min_widths = FIXED_WIDTHS.iter().map(|w| Some(*w as u16)).collect();
    table
}

/// One alert as an aligned line (no trailing newline).
pub fn alert_line(alert: &Alert, columns: &AlertColumns, colour: bool) -> String {
    let rule = alert.rule_id();
    let pod = alert.pod.as_ref().map_or_else(|| "-".to_string(), |p| p.qualified());
    let mut message = alert.message.clone();
    if alert.count > 1 {
        message = format!("(x{}) {message}", alert.count);
    }
    if let Some(reason) = &alert.reason {
        message = format!("{message} [{reason}]");
    }
    let cells: [(String, Paint); 8] = [
        (short_time(&alert.time), Paint::Plain),
        (alert.severity.as_str().to_string(), severity_paint(alert.severity)),
        (alert.kind.as_str().to_string(), Paint::Plain),
        (if rule.is_empty() { "-".into() } else { rule.to_string() }, Paint::Plain),
        (pod, Paint::Plain),
        (process_cell(alert), Paint::Plain),
        (alert.outcome.as_str().to_string(), outcome_paint(alert.outcome)),
        (message, Paint::Plain),
    ];
    let row = cells
        .iter()
        .enumerate()
        .map(|(i, (text, paint))| {
            let safe = terminal_safe(text);
            let text = match FIXED_WIDTHS.get(i) {
                Some(&w) if i == 4 || i == 5 => shorten_middle(&safe, w),
                Some(&w) => shorten(&safe, w),
                None => shorten(&safe, columns.message),
            };
            // Already terminal-safe: `painted` leaves it as it is.
            Cell::painted(text, *paint)
        })
        .collect();
    let mut table = alert_table();
    table.push(row);
    table.render_rows(colour).trim_end_matches('\n').to_string()
}

/// The header line matching `alert_line`.
pub fn alert_header(colour: bool) -> String {
    alert_table().render(colour).trim_end_matches('\n').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harden_json_keeps_json_valid() {
        let raw = serde_json::to_string(&"x\u{9b}y\u{202e}z\u{1b}").unwrap();
        let hard = harden_json(raw);
        assert!(hard.chars().all(|c| !c.is_control() && !is_display_hazard(c)), "{hard}");
        let back: String = serde_json::from_str(&hard).unwrap();
        assert_eq!(back, "x\u{9b}y\u{202e}z\u{1b}");
    }

    #[test]
    fn shortening() {
        assert_eq!(shorten("abcdef", 4), "abc…");
        assert_eq!(shorten("abc", 4), "abc");
        assert_eq!(shorten_middle("namespace/pod-name-long", 11), "names…-long");
    }

    /// Followed alerts are printed one at a time: each line must still start its columns where
    /// the header does, whatever the values' widths.
    #[test]
    fn alert_lines_line_up_with_the_header() {
        let mut alert: Alert = serde_json::from_value(serde_json::json!({
            "schema": 1, "id": "a1", "time": "2026-11-29T12:00:00.123456Z", "node": "n", "kind": "rule",
            "severity": "critical", "action": "quarantine", "outcome": "quarantined", "message": "m",
            "count": 3, "first_seen": "2026-11-29T12:00:00Z", "last_seen": "2026-11-29T12:00:00Z",
            "rule": {"id": "a_rule_id_much_longer_than_the_rule_column_allows", "title": "t"},
            "pod": {"namespace": "shop", "name": "web-1"}
        }))
        .unwrap();
        let header = alert_header(false);
        let starts: Vec<usize> = ALERT_HEADERS.iter().map(|h| header.find(h).unwrap()).collect();
        for message in ["short", "a\nforged line"] {
            alert.message = message.into();
            let line = alert_line(&alert, &AlertColumns::for_terminal(Some(200)), false);
            assert!(!line.contains('\n'), "{line}");
            for (i, start) in starts.iter().enumerate().skip(1) {
                let before = line.chars().nth(start - 1);
                let at = line.chars().nth(*start);
                assert!(before == Some(' ') && at.is_some_and(|c| c != ' '), "column {} at {start}:\n{header}\n{line}", ALERT_HEADERS[i]);
            }
        }
    }
}
