//! Problems in a rule pack, reported as `file:line:col: message` (the shape editors and CI
//! annotators understand).
use std::fmt;

use serde::Serialize;

use super::model::Location;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file, self.line, self.col, self.message)
    }
}

impl Diagnostic {
    pub fn new(file: impl Into<String>, line: u32, col: u32, message: impl Into<String>) -> Self {
        Diagnostic { file: file.into(), line, col, message: message.into() }
    }

    pub fn at(location: &Location, message: impl Into<String>) -> Self {
        Diagnostic::new(location.file.clone(), location.line, location.col, message)
    }

    /// A problem with a whole file (it could not be read, or has no better position).
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic::new(file, 1, 1, message)
    }

    /// Turns a regorus error into a diagnostic. regorus renders positioned errors as
    /// `\n--> file:line:col\n  | source\n  | ^\nerror: message`; other errors carry no position,
    /// and are pinned to the start of `fallback_file`.
    pub fn from_regorus(err: &anyhow::Error, fallback_file: &str) -> Self {
        let text = format!("{err:#}");
        parse_regorus_message(&text).unwrap_or_else(|| Diagnostic::file(fallback_file, with_detail(one_line(&text))))
    }
}

fn parse_regorus_message(text: &str) -> Option<Diagnostic> {
    let arrow = text.find("--> ")?;
    let rest = &text[arrow + 4..];
    let location = rest.lines().next()?.trim();
    // The file name may itself contain ':', so split the position off the right.
    let mut parts = location.rsplitn(3, ':');
    let col: u32 = parts.next()?.parse().ok()?;
    let line: u32 = parts.next()?.parse().ok()?;
    let file = parts.next()?.to_string();
    let message = rest
        .lines()
        .find_map(|l| l.strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| one_line(text));
    let message = with_detail(message);
    // Context that anyhow put before the positioned part is worth keeping.
    let prefix = one_line(text[..arrow].trim().trim_end_matches(':'));
    let message = if prefix.is_empty() || message.contains(&prefix) {
        message
    } else {
        format!("{message} ({prefix})")
    };
    Some(Diagnostic { file, line, col, message })
}

/// Some regorus errors carry no text ("Compilation error: "): say at least what failed.
fn with_detail(message: String) -> String {
    if message.trim_end().ends_with(':') || message.trim().is_empty() {
        format!("{} the rule engine cannot compile the expression here (regorus gave no detail)", message.trim_end())
    } else {
        message
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_positioned_regorus_errors() {
        let text = "\n--> rules/a.rego:3:7\n  |\n3 | x := \n  |       ^\nerror: unexpected eof";
        let d = parse_regorus_message(text).expect("positioned");
        assert_eq!(d.to_string(), "rules/a.rego:3:7: unexpected eof");
    }

    #[test]
    fn empty_messages_still_say_what_failed() {
        let text = "\n--> rules/a.rego:6:5\n  |\n6 | x := f(y)\n  |     ^\nerror: Compilation error: ";
        let d = parse_regorus_message(text).expect("positioned");
        assert!(d.message.starts_with("Compilation error: the rule engine cannot compile"), "{d}");
    }

    #[test]
    fn unpositioned_errors_pin_to_the_file() {
        let err = anyhow::anyhow!("something\nwent wrong");
        let d = Diagnostic::from_regorus(&err, "x.rego");
        assert_eq!(d.to_string(), "x.rego:1:1: something went wrong");
    }
}
