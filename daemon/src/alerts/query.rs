//! Alert queries: filters, their URL query-string form (the API takes the same filters), and
//! reading the log with its rotations, oldest first.
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::log::{LOG_FILE_NAME, rotated_files};
use super::schema::{Alert, AlertKind};
use super::time::{UnixMicros, format_micros, parse_instant};
use crate::rules::model::Severity;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Time(#[from] super::time::TimeError),
    #[error("bad pod {0:?}: want NAMESPACE/NAME")]
    BadPod(String),
    #[error("{0}")]
    BadValue(String),
    #[error("unknown filter {0:?}")]
    UnknownFilter(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AlertQuery {
    pub since: Option<UnixMicros>,
    pub until: Option<UnixMicros>,
    pub namespace: Option<String>,
    /// (namespace, name)
    pub pod: Option<(String, String)>,
    pub rule: Option<String>,
    /// Severity at or above this.
    pub min_severity: Option<Severity>,
    /// Any of these kinds (empty: all).
    pub kinds: Vec<AlertKind>,
}

pub fn parse_pod(text: &str) -> Result<(String, String), QueryError> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns.to_string(), name.to_string())),
        _ => Err(QueryError::BadPod(text.to_string())),
    }
}

pub fn parse_kinds(text: &str) -> Result<Vec<AlertKind>, QueryError> {
    text.split(',').filter(|s| !s.is_empty()).map(|k| k.trim().parse().map_err(QueryError::BadValue)).collect()
}

impl AlertQuery {
    pub fn matches(&self, alert: &Alert) -> bool {
        // An alert whose time does not parse is shown rather than hidden.
        if (self.since.is_some() || self.until.is_some())
            && let Some(t) = alert.time_micros()
            && (self.since.is_some_and(|since| t < since) || self.until.is_some_and(|until| t > until))
        {
            return false;
        }
        if let Some(ns) = &self.namespace
            && alert.pod.as_ref().is_none_or(|p| &p.namespace != ns)
        {
            return false;
        }
        if let Some((ns, name)) = &self.pod
            && alert.pod.as_ref().is_none_or(|p| &p.namespace != ns || &p.name != name)
        {
            return false;
        }
        if let Some(rule) = &self.rule
            && alert.rule_id() != rule
        {
            return false;
        }
        if self.min_severity.is_some_and(|min| alert.severity < min) {
            return false;
        }
        self.kinds.is_empty() || self.kinds.contains(&alert.kind)
    }

    /// `since=...&pod=ns%2Fname...`, times as RFC 3339.
    pub fn to_query_string(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if let Some(t) = self.since {
            pairs.push(("since", format_micros(t)));
        }
        if let Some(t) = self.until {
            pairs.push(("until", format_micros(t)));
        }
        if let Some(ns) = &self.namespace {
            pairs.push(("namespace", ns.clone()));
        }
        if let Some((ns, name)) = &self.pod {
            pairs.push(("pod", format!("{ns}/{name}")));
        }
        if let Some(rule) = &self.rule {
            pairs.push(("rule", rule.clone()));
        }
        if let Some(sev) = self.min_severity {
            pairs.push(("severity", sev.as_str().to_string()));
        }
        if !self.kinds.is_empty() {
            let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
            pairs.push(("kind", kinds.join(",")));
        }
        pairs.iter().map(|(k, v)| format!("{k}={}", percent_encode(v))).collect::<Vec<_>>().join("&")
    }

    /// The inverse of `to_query_string`; `since`/`until` may also be durations back from `now`.
    pub fn from_query_string(query: &str, now: UnixMicros) -> Result<AlertQuery, QueryError> {
        let mut q = AlertQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw).ok_or_else(|| QueryError::BadValue(format!("bad percent-encoding in {key}")))?;
            match key {
                "since" => q.since = Some(parse_instant(&value, now)?),
                "until" => q.until = Some(parse_instant(&value, now)?),
                "namespace" => q.namespace = Some(value),
                "pod" => q.pod = Some(parse_pod(&value)?),
                "rule" => q.rule = Some(value),
                "severity" => q.min_severity = Some(value.parse().map_err(QueryError::BadValue)?),
                "kind" => q.kinds.extend(parse_kinds(&value)?),
                other => return Err(QueryError::UnknownFilter(other.to_string())),
            }
        }
        Ok(q)
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` (and `+` as space); None on malformed escapes or invalid UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The log files in `dir`, oldest first: `alerts.jsonl.N` .. `alerts.jsonl.1`, `alerts.jsonl`.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut rotated = rotated_files(dir);
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(LOG_FILE_NAME);
    if current.exists() {
        files.push(current);
    }
    files
}

/// What reading found besides matching alerts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReadReport {
    pub files: usize,
    pub matched: u64,
    /// Lines that were not alerts (corrupt, truncated by a crash, not UTF-8), with where.
    pub bad_lines: u64,
    pub first_bad: Option<String>,
    /// Files that could not be opened (rotated away while reading, permissions).
    pub unreadable: Vec<String>,
}

/// Reads `files` in order and calls `each` with every alert the query matches, until it says
/// stop. All files are opened first: a rotation during the read then renames files we already
/// hold, and the read is a consistent snapshot (alerts written after it are not in it).
pub fn read_alerts(files: &[PathBuf], query: &AlertQuery, mut each: impl FnMut(Alert) -> ControlFlow<()>) -> ReadReport {
    let mut report = ReadReport { files: files.len(), ..ReadReport::default() };
    let mut opened = Vec::with_capacity(files.len());
    for path in files {
        match File::open(path) {
            Ok(f) => opened.push((path, f)),
            Err(err) => report.unreadable.push(format!("{}: {err}", path.display())),
        }
    }
    for (path, file) in opened {
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    report.unreadable.push(format!("{}: {err}", path.display()));
                    break;
                }
            }
            number += 1;
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let alert: Alert = match serde_json::from_slice(text) {
                Ok(a) => a,
                Err(err) => {
                    report.bad_lines += 1;
                    if report.first_bad.is_none() {
                        report.first_bad = Some(format!("{}:{number}: {err}", path.display()));
                    }
                    continue;
                }
            };
            if query.matches(&alert) {
                report.matched += 1;
                if each(alert).is_break() {
                    return report;
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_string_round_trip() {
        let q = AlertQuery {
            since: Some(1_795_953_600_000_000),
            until: None,
            namespace: Some("shop".into()),
            pod: Some(("shop".into(), "web 1&x".into())),
            rule: Some("shell_in_container".into()),
            min_severity: Some(Severity::High),
            kinds: vec![AlertKind::Rule, AlertKind::Quarantine],
        };
        let s = q.to_query_string();
        assert!(s.contains("pod=shop%2Fweb%201%26x"), "{s}");
        assert_eq!(AlertQuery::from_query_string(&s, 0), Ok(q));
        assert!(AlertQuery::from_query_string("bogus=1", 0).is_err());
        assert_eq!(AlertQuery::from_query_string("since=10s", 20_000_000).unwrap().since, Some(10_000_000));
    }

    #[test]
    fn pods() {
        assert_eq!(parse_pod("a/b"), Ok(("a".into(), "b".into())));
        for bad in ["a", "/b", "a/", "a/b/c"] {
            assert!(parse_pod(bad).is_err());
        }
    }
}
