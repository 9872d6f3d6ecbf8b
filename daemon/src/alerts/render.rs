//! Rendering for people and terminals: strings from workloads (paths, argv, pod labels) are
//! made inert before they reach a terminal, tables are aligned, colour is used only on a TTY.
//!
//! JSON escaping alone keeps a value from forging a *line*, but serde_json leaves DEL, the C1
//! controls (U+0080..U+009F, where U+009B is a CSI on some terminals) and bidi overrides raw,
//! so `harden_json` escapes those as well: `tail -f alerts.jsonl` is safe too.
use std::borrow::Cow;
use std::fmt::Write as _;

use super::schema::{Alert, Outcome};
use crate::rules::model::Severity;

/// Characters that change how a terminal shows later text, beyond what JSON already escapes.
fn is_display_hazard(c: char) -> bool {
    matches!(c,
        '\u{7f}'..='\u{9f}'
        | '\u{061c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}'
        | '\u{2028}' | '\u{2029}')
}

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

/// Makes a string inert for a terminal: control characters, ANSI escapes (their ESC), C1
/// controls and bidi overrides become visible escapes (`\n`, `\e`, `\x07`, `\u{202e}`).
/// Text that events already rendered from invalid UTF-8 (`\xff`) stays as it is, visible.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || is_display_hazard(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{1b}' => out.push_str("\\e"),
            c if (c as u32) < 0x100 && (c.is_control() || is_display_hazard(c)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || is_display_hazard(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
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

/// Whether to colour: stdout is a terminal and NO_COLOR is not set.
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

/// Terminal width, when stdout is one.
pub fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer we pass.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

const RESET: &str = "\x1b[0m";

fn severity_colour(severity: Severity) -> &'static str {
    match severity {
        Severity::Critical => "\x1b[1;31m",
        Severity::High => "\x1b[31m",
        Severity::Medium => "\x1b[33m",
        Severity::Low => "\x1b[36m",
        Severity::Info => "\x1b[2m",
    }
}

fn outcome_colour(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Quarantined | Outcome::AlreadyQuarantined => "\x1b[1;35m",
        Outcome::WouldQuarantine => "\x1b[35m",
        Outcome::Pending => "\x1b[1;33m",
        Outcome::Failed => "\x1b[1;31m",
        Outcome::Released => "\x1b[32m",
        _ => "",
    }
}

/// One table cell: text already made terminal-safe, and an optional colour.
#[derive(Debug, Clone)]
pub struct Cell {
    pub text: String,
    pub colour: &'static str,
}

impl Cell {
    pub fn plain(text: impl AsRef<str>) -> Cell {
        Cell { text: terminal_safe(text.as_ref()).into_owned(), colour: "" }
    }

    pub fn coloured(text: impl AsRef<str>, colour: &'static str) -> Cell {
        Cell { text: terminal_safe(text.as_ref()).into_owned(), colour }
    }
}

/// An aligned text table; the last column is never padded.
#[derive(Debug, Default)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    pub fn render(&self, colour: bool) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.text.chars().count());
            }
        }
        let mut out = String::new();
        let header_cells: Vec<Cell> = self.headers.iter().map(|h| Cell { text: h.clone(), colour: "\x1b[1m" }).collect();
        for row in std::iter::once(&header_cells).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                let last = i + 1 == columns.min(row.len());
                let pad = if last { 0 } else { widths[i] - cell.text.chars().count() };
                if colour && !cell.colour.is_empty() {
                    let _ = write!(line, "{}{}{RESET}", cell.colour, cell.text);
                } else {
                    line.push_str(&cell.text);
                }
                if !last {
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
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
    let cells: [(String, &'static str); 8] = [
        (short_time(&alert.time), ""),
        (alert.severity.as_str().to_string(), severity_colour(alert.severity)),
        (alert.kind.as_str().to_string(), ""),
        (if rule.is_empty() { "-".into() } else { rule.to_string() }, ""),
        (pod, ""),
        (process_cell(alert), ""),
        (alert.outcome.as_str().to_string(), outcome_colour(alert.outcome)),
        (message, ""),
    ];
    let mut line = String::new();
    for (i, (text, paint)) in cells.iter().enumerate() {
        let safe = terminal_safe(text);
        let (text, width) = if i < FIXED_WIDTHS.len() {
            let w = FIXED_WIDTHS[i];
            (if i == 4 || i == 5 { shorten_middle(&safe, w) } else { shorten(&safe, w) }, Some(w))
        } else {
            (shorten(&safe, columns.message), None)
        };
        let pad = width.map_or(0, |w| w.saturating_sub(text.chars().count()));
        if colour && !paint.is_empty() {
            let _ = write!(line, "{paint}{text}{RESET}");
        } else {
            line.push_str(&text);
        }
        if width.is_some() {
            line.push_str(&" ".repeat(pad + 2));
        }
    }
    line.trim_end().to_string()
}

/// The header line matching `alert_line`.
pub fn alert_header(colour: bool) -> String {
    let mut line = String::new();
    for (i, h) in ALERT_HEADERS.iter().enumerate() {
        line.push_str(h);
        if let Some(w) = FIXED_WIDTHS.get(i) {
            line.push_str(&" ".repeat(w.saturating_sub(h.len()) + 2));
        }
    }
    let line = line.trim_end().to_string();
    if colour { format!("\x1b[1m{line}{RESET}") } else { line }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_controls_and_bidi() {
        assert_eq!(terminal_safe("plain /bin/sh"), "plain /bin/sh");
        assert_eq!(terminal_safe("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(terminal_safe("\x1b[31mred\x1b]0;title\x07"), "\\e[31mred\\e]0;title\\x07");
        assert_eq!(terminal_safe("\u{9b}31m \u{7f}"), "\\x9b31m \\x7f");
        assert_eq!(terminal_safe("abc\u{202e}txt.exe"), "abc\\u{202e}txt.exe");
        assert_eq!(terminal_safe("/tmp/\\xff\\xfe"), "/tmp/\\xff\\xfe");
    }

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

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["A", "BB"]);
        t.push(vec![Cell::plain("long value"), Cell::plain("x")]);
        t.push(vec![Cell::plain("s"), Cell::plain("y\nz")]);
        assert_eq!(t.render(false), "A           BB\nlong value  x\ns           y\\nz\n");
    }
}
