//! What the kernel should know about a rule pack before any event reaches Rego.
//!
//! Today: the path prefixes whose opens are *protected* events, which take the priority ring
//! (see probes-ebpf/src/common.rs) so that a flood of other opens cannot push them out. This is
//! routing, not filtering: an open that matches no prefix still reaches the rules through the
//! bulk ring, so a prefix missing here costs priority, never an alert. Opens the kernel cannot
//! judge by their text (relative paths, `//`, `/./`, `/../`) are protected whatever this says.
//!
//! The prefixes are the built-in ones below plus every absolute entry of the pack's path lists
//! (`credential_files`, `account_files`, ...), so tuning a list tunes the routing too.

use std::collections::BTreeSet;
use std::path::Path;

use super::pack::PackSources;

/// Paths whose opens are protected whatever the lists say: credentials and keys, the
/// service-account token, and /proc (where `/proc/<pid>/root/...` reaches any file).
pub const BUILTIN_SENSITIVE_PREFIXES: &[&str] = &[
    "/etc/shadow",
    "/etc/gshadow",
    "/etc/sudoers",
    "/etc/ssh/",
    "/root/.",
    "/var/run/secrets/",
    "/run/secrets/",
    "/proc/",
];

/// Lists (by file stem) whose absolute entries are sensitive path prefixes.
pub const SENSITIVE_PATH_LISTS: &[&str] = &["credential_files", "account_files"];

#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error("reading the rule pack's lists in {dir}: {message}")]
    Lists { dir: String, message: String },
}

/// The sensitive open prefixes for the pack in `rules_dir`, sorted and without duplicates.
pub fn sensitive_open_prefixes(rules_dir: &Path) -> Result<Vec<String>, PrefilterError> {
    let lists_error = |message: String| PrefilterError::Lists { dir: rules_dir.display().to_string(), message };
    let sources = PackSources::read_dir(rules_dir).map_err(|e| lists_error(e.to_string()))?;
    let data = sources.lists_data().map_err(|diags| {
        lists_error(diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    })?;
    let data = serde_json::to_value(&data).map_err(|e| lists_error(e.to_string()))?;
    Ok(prefixes_from_lists(&data["palisade"]["lists"]))
}

/// The built-in prefixes plus the absolute string entries of `SENSITIVE_PATH_LISTS` in `lists`
/// (`{stem: [entries]}`).
pub fn prefixes_from_lists(lists: &serde_json::Value) -> Vec<String> {
    let mut out: BTreeSet<String> = BUILTIN_SENSITIVE_PREFIXES.iter().map(|p| p.to_string()).collect();
    for name in SENSITIVE_PATH_LISTS {
        let Some(entries) = lists.get(name).and_then(serde_json::Value::as_array) else { continue };
        for entry in entries.iter().filter_map(serde_json::Value::as_str) {
            if entry.starts_with('/') {
                out.insert(entry.to_string());
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pack_prefixes_cover_the_credential_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let prefixes = sensitive_open_prefixes(&dir).expect("default pack lists");
        for path in ["/etc/shadow", "/etc/gshadow", "/etc/passwd", "/etc/sudoers", "/etc/security/opasswd"] {
            assert!(prefixes.iter().any(|p| path.starts_with(p.as_str())), "{path} not covered by {prefixes:?}");
        }
        assert!(prefixes.iter().all(|p| p.starts_with('/')), "{prefixes:?}");
        assert!(!prefixes.iter().any(|p| "/usr/lib/x86_64-linux-gnu/libc.so.6".starts_with(p.as_str())));
    }

    #[test]
    fn relative_and_non_string_entries_are_not_prefixes() {
        let lists = serde_json::json!({"credential_files": ["/etc/x", "relative", 3], "other": ["/nope"]});
        let prefixes = prefixes_from_lists(&lists);
        assert!(prefixes.contains(&"/etc/x".to_string()));
        assert!(!prefixes.iter().any(|p| p == "relative" || p == "/nope"));
    }
}
