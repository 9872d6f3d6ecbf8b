//! How the command line prints: the one `-o table|json` enum every command shares, and tables
//! (comfy-table, without borders) whose columns line up by display width, so a wide value (a
//! long rule id, a CJK pod name) pushes its whole column instead of the rest of its row.
//!
//! A leaf module: cells are made terminal-safe here (`terminal_safe`), so a hostile path or
//! argv cannot forge rows or drive the terminal, whichever command prints it.
use std::borrow::Cow;
use std::fmt::Write as _;

use comfy_table::{Attribute, CellAlignment, Color, ColumnConstraint, ContentArrangement, Width, presets};

/// `-o/--output` for every command that prints something: a table for people, JSON for
/// programs. A command with more formats (`alerts` also writes Falco's JSON) has its own enum
/// that starts with these two.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// Characters that change how a terminal shows later text, beyond what JSON already escapes.
pub fn is_display_hazard(c: char) -> bool {
    matches!(c,
        '\u{7f}'..='\u{9f}'
        | '\u{061c}' | '\u{200e}' | '\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}'
        | '\u{2028}' | '\u{2029}')
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

/// How a cell is painted when colour is on (stdout a terminal, NO_COLOR unset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Paint {
    #[default]
    Plain,
    Bold,
    Dim,
    Red,
    BoldRed,
    Yellow,
    BoldYellow,
    Cyan,
    Magenta,
    BoldMagenta,
    Green,
}

impl Paint {
    fn colour(self) -> Option<Color> {
        match self {
            Paint::Plain | Paint::Bold | Paint::Dim => None,
            Paint::Red | Paint::BoldRed => Some(Color::DarkRed),
            Paint::Yellow | Paint::BoldYellow => Some(Color::DarkYellow),
            Paint::Cyan => Some(Color::DarkCyan),
            Paint::Magenta | Paint::BoldMagenta => Some(Color::DarkMagenta),
            Paint::Green => Some(Color::DarkGreen),
        }
    }

    fn attribute(self) -> Option<Attribute> {
        match self {
            Paint::Bold | Paint::BoldRed | Paint::BoldYellow | Paint::BoldMagenta => Some(Attribute::Bold),
            Paint::Dim => Some(Attribute::Dim),
            _ => None,
        }
    }

    fn apply(self, mut cell: comfy_table::Cell) -> comfy_table::Cell {
        if let Some(colour) = self.colour() {
            cell = cell.fg(colour);
        }
        if let Some(attribute) = self.attribute() {
            cell = cell.add_attribute(attribute);
        }
        cell
    }
}

/// One table cell: text already made terminal-safe, and how to paint it.
#[derive(Debug, Clone)]
pub struct Cell {
    pub text: String,
    pub paint: Paint,
}

impl Cell {
    pub fn plain(text: impl AsRef<str>) -> Cell {
        Cell { text: terminal_safe(text.as_ref()).into_owned(), paint: Paint::Plain }
    }

    pub fn painted(text: impl AsRef<str>, paint: Paint) -> Cell {
        Cell { text: terminal_safe(text.as_ref()).into_owned(), paint }
    }
}

/// A borderless table, two spaces between columns, the last column never padded; columns are
/// as wide as their widest cell (display width), or at least `min_widths` where set.
#[derive(Debug, Default)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    /// Columns aligned to the right (numbers, matrix cells).
    pub right_aligned: Vec<usize>,
    /// Fixed minimum content widths, for lines printed one at a time that must line up with a header
    /// printed before the rows are known (followed alerts).
    pub min_widths: Vec<Option<u16>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), ..Table::default() }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        self.rows.push(row);
    }

    pub fn align_right(mut self, columns: &[usize]) -> Table {
        self.right_aligned = columns.to_vec();
        self
    }

    /// The table with a header line (bold when colour is on).
    pub fn render(&self, colour: bool) -> String {
        self.build(colour, true)
    }

    /// The rows only, each a line (for tables whose header was printed before).
    pub fn render_rows(&self, colour: bool) -> String {
        self.build(colour, false)
    }

    fn build(&self, colour: bool, header: bool) -> String {
        let columns = self.headers.len();
        let mut table = comfy_table::Table::new();
        table.load_style(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
        if colour {
            table.enforce_styling();
        } else {
            table.force_no_tty();
        }
        if header {
            let paint = if colour { Paint::Bold } else { Paint::Plain };
            table.set_header(self.headers.iter().map(|h| paint.apply(comfy_table::Cell::new(terminal_safe(h)))));
        }
        for row in &self.rows {
            let cells = (0..columns).map(|i| match row.get(i) {
                Some(cell) => cell.paint.apply(comfy_table::Cell::new(&cell.text)),
                None => comfy_table::Cell::new(""),
            });
            table.add_row(cells.collect::<Vec<_>>());
        }
        if !header && self.rows.is_empty() {
            return String::new();
        }
        for (i, column) in table.column_iter_mut().enumerate() {
            column.set_padding((0, if i + 1 == columns { 0 } else { 2 }));
            if self.right_aligned.contains(&i) {
                column.set_cell_alignment(CellAlignment::Right);
            }
            if let Some(Some(width)) = self.min_widths.get(i) {
                // comfy-table's widths include the padding.
                let padding = column.padding_width();
                column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(width.saturating_add(padding))));
            }
        }
        let mut out = String::new();
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Whether to colour: stdout is a terminal and NO_COLOR is not set.
pub fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use unicode_width_check::display_width;

    /// Display width without a dependency: East Asian wide characters count two, others one.
    mod unicode_width_check {
        pub fn display_width(text: &str) -> usize {
            text.chars().map(|c| if ('\u{1100}'..='\u{ffdc}').contains(&c) && !c.is_ascii() { 2 } else { 1 }).sum()
        }
    }

    /// Where each header column starts, in display columns.
    fn column_starts(header: &str) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut previous = ' ';
        let mut at = 0;
        for c in header.chars() {
            if c != ' ' && previous == ' ' {
                starts.push(at);
            }
            previous = c;
            at += display_width(&c.to_string());
        }
        starts
    }

    /// The display column at which each cell of `line` starts, cut at `starts`.
    fn cell_at(line: &str, start: usize) -> (char, char) {
        let mut at = 0;
        let mut before = ' ';
        for c in line.chars() {
            if at == start {
                return (before, c);
            }
            if at > start {
                break;
            }
            before = c;
            at += display_width(&c.to_string());
        }
        (before, '\0')
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["A", "BB"]);
        t.push(vec![Cell::plain("long value"), Cell::plain("x")]);
        t.push(vec![Cell::plain("s"), Cell::plain("y\nz")]);
        assert_eq!(t.render(false), "A           BB\nlong value  x\ns           y\\nz\n");
    }

    /// The hand-written printers padded with `{:<24}` (a value longer than that shifted the
    /// rest of its row) or counted chars (a CJK name is two columns per char on a terminal).
    #[test]
    fn a_wide_value_keeps_the_columns_aligned() {
        let mut t = Table::new(&["RULE", "SEVERITY", "POD", "MESSAGE"]);
        t.push(vec![Cell::plain("shell"), Cell::plain("high"), Cell::plain("shop/web"), Cell::plain("a")]);
        t.push(vec![
            Cell::plain("a_rule_id_much_longer_than_twenty_four_columns"),
            Cell::painted("critical", Paint::BoldRed),
            Cell::plain("商店/网页-服务器"),
            Cell::plain("b"),
        ]);
        t.push(vec![Cell::plain("x"), Cell::plain("low"), Cell::plain("\u{1b}[2Jshop/evil\n"), Cell::plain("c")]);
        let text = t.render(false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let starts = column_starts(lines[0]);
        assert_eq!(starts.len(), 4, "{text}");
        for line in &lines[1..] {
            for &start in &starts[1..] {
                let (before, at) = cell_at(line, start);
                assert!(before == ' ' && at != ' ' && at != '\0', "column at {start} misaligned in {line:?}:\n{text}");
            }
        }
        assert!(text.contains("\\e[2Jshop/evil\\n"), "hostile text is escaped: {text}");
    }

    #[test]
    fn colour_only_when_asked_and_right_alignment() {
        let mut t = Table::new(&["POD", "LOST"]).align_right(&[1]);
        t.push(vec![Cell::plain("a"), Cell::painted("7", Paint::Red)]);
        t.push(vec![Cell::plain("b"), Cell::plain("1234")]);
        assert_eq!(t.render(false), "POD  LOST\na       7\nb    1234\n");
        assert!(t.render(true).contains('\u{1b}'));
        assert!(!t.render_rows(false).contains("POD"));
    }

    #[test]
    fn terminal_safe_escapes_controls_and_bidi() {
        assert_eq!(terminal_safe("plain /bin/sh"), "plain /bin/sh");
        assert_eq!(terminal_safe("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(terminal_safe("\x1b[31mred\x1b]0;title\x07"), "\\e[31mred\\e]0;title\\x07");
        assert_eq!(terminal_safe("\u{9b}31m \u{7f}"), "\\x9b31m \\x7f");
        assert_eq!(terminal_safe("abc\u{202e}txt.exe"), "abc\\u{202e}txt.exe");
        assert_eq!(terminal_safe("/tmp/\\xff\\xfe"), "/tmp/\\xff\\xfe");
    }
}
