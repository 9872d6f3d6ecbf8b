//! The command line's conventions, end to end through the built binary: tables that stay
//! aligned, the shared `-o` enum, environment variables for clients, `--version`, completions
//! and the man page. No privileges needed.

use std::path::Path;
use std::process::{Command, Output};

const PALISADE: &str = env!("CARGO_BIN_EXE_palisade");

fn palisade(args: &[&str]) -> Output {
    Command::new(PALISADE)
        .args(args)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env_remove("PALISADE_STATE_DIR")
        .env_remove("PALISADE_SOCKET")
        .output()
        .unwrap_or_else(|err| panic!("cannot run palisade {args:?}: {err}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path).to_string_lossy().into_owned()
}

/// Every row of a table starts each column where the header does: the character before the
/// column is a space, and the cell either starts right there or is empty.
fn assert_aligned(table: &str) {
    let mut lines = table.lines();
    let header: Vec<char> = lines.next().expect("a header line").chars().collect();
    let starts: Vec<usize> = (0..header.len()).filter(|&i| header[i] != ' ' && (i == 0 || header[i - 1] == ' ')).collect();
    assert!(starts.len() > 2, "not a table:\n{table}");
    for line in lines {
        let row: Vec<char> = line.chars().collect();
        for (k, &start) in starts.iter().enumerate().skip(1) {
            let end = starts.get(k + 1).copied().unwrap_or(row.len()).min(row.len());
            let cell: String = row.get(start..end).map(|c| c.iter().collect()).unwrap_or_default();
            let boundary = row.get(start - 1) == Some(&' ');
            let starts_here = !cell.starts_with(' ') || cell.trim().is_empty();
            assert!(boundary && starts_here, "column {k} (at {start}) is not aligned in {line:?}:\n{table}");
        }
    }
}

/// `rules list` printed EVENTS with `{:<28}`, and `mount,namespace,module,bpf,open,connect`
/// pushed MITRE and TITLE of that row out of their columns.
#[test]
fn rules_list_keeps_columns_aligned_with_wide_values() {
    let out = palisade(&["rules", "list", &repo("rules")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l.split_whitespace().nth(3).is_some_and(|events| events.len() > 28)), "a wide EVENTS value:\n{text}");
    assert_aligned(&text);

    let out = palisade(&["rules", "list", &repo("rules"), "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rules: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rules list -o json prints JSON");
    assert!(rules.as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|r| r["id"].is_string())), "{rules}");
}

#[test]
fn policy_matrix_table_is_aligned() {
    let out = palisade(&[
        "policy",
        "matrix",
        "--inventory",
        &repo("policies/webapp-inventory.yaml"),
        "--policies",
        &repo("policies"),
        "--port",
        "8080",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // The first line is the title; the truth table follows.
    let table: String = text.lines().skip(1).take_while(|l| !l.starts_with("peer-only")).map(|l| format!("{l}\n")).collect();
    assert!(table.contains('X') && table.contains('.'), "{text}");
    // Right-aligned cells: every '.' or 'X' ends where its column's name ends.
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let ends: Vec<usize> = header.char_indices().filter(|(i, c)| *c != ' ' && header[i + 1..].starts_with(' ') || *i + 1 == header.len()).map(|(i, _)| i).collect();
    for line in lines {
        for &end in &ends {
            let c = line.as_bytes()[end];
            assert!(c == b'.' || c == b'X', "no verdict under a column end at {end} in {line:?}:\n{table}");
        }
    }
}

/// `-o` is one checked enum everywhere: a typo is refused by the parser, naming the choices.
#[test]
fn output_format_is_one_checked_enum() {
    for args in [
        vec!["status", "-o", "yaml"],
        vec!["quarantine", "list", "-o", "yaml"],
        vec!["alerts", "summary", "-o", "yaml"],
        vec!["rules", "list", "rules", "-o", "yaml"],
        vec!["policy", "matrix", "--inventory", "i", "--policies", "p", "--port", "1", "-o", "yaml"],
        vec!["lab", "probe", "--port", "1", "-o", "yaml"],
    ] {
        let out = palisade(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?} accepted -o yaml: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("invalid value 'yaml'") && err.contains("table") && err.contains("json"), "{args:?}: {err}");
    }
    let out = palisade(&["alerts", "-o", "yaml"]);
    assert!(stderr(&out).contains("falco"), "alerts also has falco: {}", stderr(&out));
}
