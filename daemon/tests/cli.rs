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

/// Bad values of `run`'s options are refused before anything starts, naming the option and
/// what it takes (issue 15's `--alert-events`, `--stuck-after`).
#[test]
fn run_refuses_bad_option_values_naming_what_they_take() {
    for (args, expect) in [
        (["run", "--alert-events", "loud"], "off"),
        (["run", "--stuck-after", "0"], "between 0.5 and 86400"),
        (["run", "--stuck-after", "soon"], "soon"),
    ] {
        let out = palisade(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?} accepted: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(args[1]) && err.contains(expect), "{args:?}: {err}");
    }
}

/// `--version` names the git revision and the SHA-256 of the embedded eBPF object.
#[test]
fn version_names_the_revision_and_the_ebpf_object() {
    let out = palisade(&["--version"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("palisade {}", env!("CARGO_PKG_VERSION"))), "{text}");
    let revision = text.split("git ").nth(1).and_then(|r| r.split(',').next()).unwrap_or_default();
    assert!(revision == "unknown" || (revision.len() >= 7 && revision.chars().all(|c| c.is_ascii_hexdigit())), "{text}");
    let hash = text.split("sha256 ").nth(1).map(|h| h.trim().trim_end_matches(')')).unwrap_or_default();
    assert!(hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    // The hash is of what the binary embeds (and so loads), not a constant.
    let object = palisade::probes::object::PROBES_OBJECT;
    assert!(object.len() > 1000);
    let digest = ring::digest::digest(&ring::digest::SHA256, object);
    let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hash, expected);
}

#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef palisade"), ("fish", "complete -c palisade")] {
        let out = palisade(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}:\n{text}");
        for word in ["quarantine", "policy", "state-dir"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    assert_eq!(palisade(&["completions", "tcsh"]).status.code(), Some(2));
    let out = palisade(&["man"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(".TH palisade") && text.contains("quarantine") && text.contains("completions"), "{text}");
}

/// Clients find the daemon through PALISADE_STATE_DIR or PALISADE_SOCKET, as through the flags.
#[test]
fn clients_take_the_state_dir_and_socket_from_the_environment() {
    let dir = std::env::temp_dir().join(format!("palisade-cli-env-{}", std::process::id()));
    let run = |envs: &[(&str, &Path)], args: &[&str]| {
        let mut command = Command::new(PALISADE);
        command.args(args).env("RUST_BACKTRACE", "0").env_remove("PALISADE_STATE_DIR").env_remove("PALISADE_SOCKET");
        for (k, v) in envs {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let socket = dir.join("custom.sock");
    for args in [&["status"][..], &["quarantine", "list"], &["alerts", "summary"]] {
        let out = run(&[("PALISADE_STATE_DIR", &dir)], args);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&dir.join(palisade::api::SOCKET_NAME).display().to_string()), "{args:?}: {}", stderr(&out));
        let out = run(&[("PALISADE_STATE_DIR", &dir), ("PALISADE_SOCKET", &socket)], args);
        assert!(stderr(&out).contains(&socket.display().to_string()), "{args:?}: {}", stderr(&out));
    }
    // A flag wins over the environment.
    let out = run(&[("PALISADE_STATE_DIR", Path::new("/nonexistent-env"))], &["status", "--state-dir", dir.to_str().unwrap()]);
    assert!(stderr(&out).contains(&dir.display().to_string()) && !stderr(&out).contains("nonexistent-env"), "{}", stderr(&out));
}

/// `--lab NAME` everywhere; the old spellings (`lab up/down --name`, `run --lab-name`) still parse.
#[test]
fn lab_is_named_with_lab_everywhere_and_old_spellings_still_parse() {
    let missing = "/nonexistent/palisade-inventory.yaml";
    for flag in ["--lab", "--name"] {
        let out = palisade(&["lab", "up", "--inventory", missing, flag, "cli-test"]);
        assert_ne!(out.status.code(), Some(2), "lab up {flag} is a usage error: {}", stderr(&out));
        assert!(stderr(&out).contains(missing), "lab up {flag}: {}", stderr(&out));
    }
    let help = stdout(&palisade(&["lab", "up", "--help"]));
    assert!(help.contains("--lab <") && !help.contains("--name <") && !help.contains("aliases"), "old spelling is hidden:\n{help}");
    for args in [&["run", "--lab", "x", "--help"][..], &["run", "--lab", "--lab-name", "x", "--help"], &["lab", "down", "--name", "x", "--help"]] {
        let out = palisade(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let help = stdout(&palisade(&["run", "--help"]));
    assert!(help.contains("--lab [<NAME>]") && !help.contains("--lab-name"), "{help}");
}
