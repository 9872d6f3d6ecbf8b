//! What the kernel should know about a rule pack before any event reaches Rego.
//!
//! 1. The path prefixes whose opens are *protected* events, which take the priority ring
//!    (see probes-ebpf/src/common.rs) so that a flood of other opens cannot push them out. This
//!    is routing, not filtering: an open that matches no prefix still reaches the rules through
//!    the bulk ring, so a prefix missing here costs priority, never an alert. Opens the kernel
//!    cannot judge by their text (relative paths, `//`, `/./`, `/../`) are protected whatever
//!    this says. The prefixes are the built-in ones below plus every absolute entry of the
//!    pack's path lists (`credential_files`, `account_files`), so tuning a list tunes routing.
//! 2. The pack's declared kernel prefilter, the list `quiet_open_prefixes`: read-only opens of
//!    absolute, canonical, non-sensitive paths below one of them never leave the kernel (shared
//!    libraries, locales). A pack without that list filters nothing in the kernel. The
//!    declaration is the pack author's claim that no rule matches such an open;
//!    [`OpenPrefilter`] mirrors the kernel's decision so that the claim is tested: the recorded
//!    corpus and every fixture give the same alerts with and without it (tests below).

use std::collections::BTreeSet;
use std::path::Path;

use super::pack::PackSources;
use super::rule_filter::OpenKernelFilter;

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

/// The list (by file stem) that declares the pack's kernel open prefilter.
pub const QUIET_OPEN_LIST: &str = "quiet_open_prefixes";

/// Bytes of a path the kernel compares with a prefix (`palisade_common::SENSITIVE_PREFIX_LEN`).
const KERNEL_PREFIX_LEN: usize = palisade_common::SENSITIVE_PREFIX_LEN;

/// What the kernel knows of a pack for opens: which are protected, which stay in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenPrefilter {
    pub sensitive: Vec<String>,
    pub quiet: Vec<String>,
    /// The filter derived from the pack's open rules (`RulePack::open_filter`); while set, it
    /// decides and `quiet` does not.
    pub derived: Option<OpenKernelFilter>,
}

const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;
const ENOENT: i64 = 2;

impl OpenPrefilter {
    /// Both prefix sets of the pack in `rules_dir`.
    pub fn load(rules_dir: &Path) -> Result<OpenPrefilter, PrefilterError> {
        let lists = pack_lists(rules_dir)?;
        let quiet: Vec<String> = lists
            .get(QUIET_OPEN_LIST)
            .and_then(serde_json::Value::as_array)
            .map(|entries| entries.iter().filter_map(serde_json::Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        for prefix in &quiet {
            if !prefix.starts_with('/') || prefix.len() > KERNEL_PREFIX_LEN {
                return Err(PrefilterError::QuietPrefix { prefix: prefix.clone(), max: KERNEL_PREFIX_LEN });
            }
        }
        Ok(OpenPrefilter { sensitive: prefixes_from_lists(&lists), quiet, derived: None })
    }

    /// The same with the filter derived from the pack's open rules (None: the declared list).
    pub fn with_derived(self, derived: Option<OpenKernelFilter>) -> OpenPrefilter {
        OpenPrefilter { derived, ..self }
    }

    /// The kernel's decision for an open with `flags` and `result`: true when it is kept in
    /// the kernel. Mirrors `emit_open` in probes-ebpf/src/syscalls.rs: the file the kernel
    /// resolved (`resolved`, canonical) is judged when there is one (`resolved_path_is_sensitive`,
    /// `open_is_quiet`); otherwise the argument `path_arg`, and then only an open that failed
    /// with ENOENT may stay (`open_path_is_sensitive`, `open_is_quiet`).
    pub fn keeps_in_kernel(&self, path_arg: &str, resolved: Option<&str>, flags: u32, result: i64) -> bool {
        match resolved {
            Some(file) => self.quiet_open(file, flags),
            // The argument is judged when its text is whole: not empty, not cut, no trailing `/`.
            None => {
                let named = !path_arg.is_empty() && path_arg.len() + 1 < palisade_common::PATH_LEN && !path_arg.ends_with('/');
                result == -ENOENT && named && self.quiet_open(path_arg, flags)
            }
        }
    }

    /// `open_is_quiet` of probes-ebpf/src/common.rs, with the sensitivity of `path`.
    fn quiet_open(&self, path: &str, flags: u32) -> bool {
        if self.is_sensitive(path) {
            return false;
        }
        if let Some(derived) = &self.derived {
            return !derived.admits(path, flags);
        }
        if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) != 0 {
            return false;
        }
        let head = &path.as_bytes()[..path.len().min(KERNEL_PREFIX_LEN)];
        self.quiet.iter().any(|p| head.starts_with(p.as_bytes()))
    }

    /// Protected in the kernel: empty is not, relative or non-canonical is, else a sensitive
    /// prefix (compared on the first `KERNEL_PREFIX_LEN` bytes) decides.
    pub fn is_sensitive(&self, path: &str) -> bool {
        let bytes = path.as_bytes();
        if bytes.is_empty() {
            return false;
        }
        if bytes[0] != b'/' {
            return true;
        }
        let head = &bytes[..bytes.len().min(KERNEL_PREFIX_LEN)];
        if self.sensitive.iter().any(|p| {
            let p = &p.as_bytes()[..p.len().min(KERNEL_PREFIX_LEN)];
            head.starts_with(p)
        }) {
            return true;
        }
        // The kernel scans the first PATH_LEN - 4 bytes for //, /./, /../ (and those at the end).
        let at = |i: usize| bytes.get(i).copied().unwrap_or(0);
        (0..bytes.len().min(palisade_common::PATH_LEN - 4)).any(|i| {
            at(i) == b'/'
                && (at(i + 1) == b'/'
                    || (at(i + 1) == b'.' && (matches!(at(i + 2), b'/' | 0) || (at(i + 2) == b'.' && matches!(at(i + 3), b'/' | 0)))))
        })
    }
}

fn pack_lists(rules_dir: &Path) -> Result<serde_json::Value, PrefilterError> {
    let lists_error = |message: String| PrefilterError::Lists { dir: rules_dir.display().to_string(), message };
    let sources = PackSources::read_dir(rules_dir).map_err(|e| lists_error(e.to_string()))?;
    let data = sources.lists_data().map_err(|diags| {
        lists_error(diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    })?;
    let data = serde_json::to_value(&data).map_err(|e| lists_error(e.to_string()))?;
    Ok(data["palisade"]["lists"].clone())
}

#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error("reading the rule pack's lists in {dir}: {message}")]
    Lists { dir: String, message: String },
    #[error("lists/quiet_open_prefixes: {prefix:?} must be an absolute path of at most {max} bytes")]
    QuietPrefix { prefix: String, max: usize },
}

/// The sensitive open prefixes for the pack in `rules_dir`, sorted and without duplicates.
pub fn sensitive_open_prefixes(rules_dir: &Path) -> Result<Vec<String>, PrefilterError> {
    Ok(prefixes_from_lists(&pack_lists(rules_dir)?))
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

    fn default_pack() -> (std::path::PathBuf, OpenPrefilter) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
        let prefilter = OpenPrefilter::load(&dir).expect("default pack prefilter");
        (dir, prefilter)
    }

    #[test]
    fn the_kernel_decision_keeps_libraries_and_locales_in_and_everything_a_rule_reads_out() {
        let (_, f) = default_pack();
        assert!(!f.quiet.is_empty(), "the default pack declares a kernel prefilter");
        let resolved = |path: &'static str, flags: u32| f.keeps_in_kernel("x", Some(path), flags, 3);
        for path in ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libm.so.6", "/etc/ld.so.cache", "/usr/lib/locale/locale-archive"] {
            assert!(resolved(path, 0o2000000), "{path} should stay in the kernel");
        }
        // The kernel judges the file it opened, not the argument: a library opened through
        // `..` or a relative path stays in; /etc/shadow opened through a library path does not.
        assert!(f.keeps_in_kernel("../lib/x86_64-linux-gnu/libc.so.6", Some("/usr/lib/x86_64-linux-gnu/libc.so.6"), 0, 3));
        assert!(!f.keeps_in_kernel("/usr/lib/../../etc/shadow", Some("/etc/shadow"), 0, 3));
        assert!(!f.keeps_in_kernel("/usr/lib/x86_64-linux-gnu/link-to-shadow", Some("/etc/shadow"), 0, 3));
        // Nothing resolved: only a failed lookup (ENOENT) of a quiet argument stays in; any other
        // failure (EACCES through a symlink) names nothing the kernel could judge.
        assert!(f.keeps_in_kernel("/usr/lib/x86_64-linux-gnu/libnope.so", None, 0, -ENOENT));
        assert!(!f.keeps_in_kernel("/usr/lib/x86_64-linux-gnu/libc.so.6", None, 0, -13));
        assert!(!f.keeps_in_kernel("/usr/lib/../../etc/shadow", None, 0, -ENOENT));
        for (path, flags) in [
            ("/usr/lib/x86_64-linux-gnu/libc.so.6", O_WRONLY),
            ("/usr/lib/evil", O_CREAT | O_RDWR),
            ("/usr/lib/../../etc/shadow", 0),
            ("/usr/lib//x", 0),
            ("lib/libc.so.6", 0),
            ("/etc/shadow", 0),
            ("/etc/hostname", 0),
        ] {
            assert!(!f.keeps_in_kernel(path, None, flags, -ENOENT), "{path} ({flags:o}) must reach the rules");
            if path.starts_with('/') && !path.contains("/.") && !path.contains("//") {
                assert!(!f.keeps_in_kernel(path, Some(path), flags, 3), "{path} ({flags:o}) opened must reach the rules");
            }
        }
        let no_declaration = OpenPrefilter { sensitive: f.sensitive.clone(), quiet: Vec::new(), derived: None };
        assert!(!no_declaration.keeps_in_kernel("x", Some("/usr/lib/x86_64-linux-gnu/libc.so.6"), 0, 3), "a pack without prefilters filters nothing");
    }

    /// The recorded corpus and every rule fixture's event, named by where they come from.
    fn corpus_and_fixture_events() -> Vec<(String, serde_json::Value)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut events: Vec<(String, serde_json::Value)> = Vec::new();
        let corpus = std::fs::read_to_string(root.join("testdata/scenarios/recorded-mix.jsonl")).expect("recorded corpus");
        for (i, line) in corpus.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            events.push((format!("recorded-mix.jsonl:{}", i + 1), serde_json::from_str(line).expect("corpus line")));
        }
        let fixtures = crate::rules::testing::load_fixtures(&[root.join("testdata/rules")]).expect("fixtures");
        for case in fixtures {
            events.push((format!("{}: {}", case.file, case.case.name), case.case.event.clone()));
        }
        events
    }

    /// Soundness of the declared prefilter: the recorded corpus and every fixture raise the same
    /// alerts whether or not the opens the kernel keeps are evaluated.
    #[test]
    fn the_prefilter_changes_no_alert_of_the_corpus_or_the_fixtures() {
        use crate::rules::pack::RulePack;
        let (dir, f) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let (violations, kept, _) = open_filter_violations(&f, &pack.without_prefilters());
        assert!(violations.is_empty(), "the kernel would keep opens that raise alerts:\n{}", violations.join("\n"));
        assert!(kept > 100, "the prefilter keeps only {kept} opens of the corpus in the kernel: the test says little");
    }

    /// The opens of the recorded corpus and every fixture that `f` would keep in the kernel but
    /// that raise an alert when every rule runs (no prefilter of any kind), named; and how many
    /// opens it keeps, and how many alerting opens it lets out.
    fn open_filter_violations(f: &OpenPrefilter, all_rules: &crate::rules::pack::RulePack) -> (Vec<String>, usize, usize) {
        let (mut violations, mut kept, mut alerting_out) = (Vec::new(), 0, 0);
        for (name, event) in corpus_and_fixture_events().iter().filter(|(_, e)| e["type"] == "open") {
            let open = &event["open"];
            let path = open["path"].as_str().unwrap_or("");
            let flags = open["flags"].as_u64().unwrap_or(0) as u32;
            let result = open["result"].as_i64().unwrap_or(0);
            // An event recorded before opens were resolved (no path_resolved) names the file by
            // its argument: taken as the file when the open succeeded, as the kernel now would.
            let resolved = match open["path_resolved"].as_bool() {
                Some(true) => Some(path),
                Some(false) => None,
                None => (result >= 0).then_some(path),
            };
            let arg = open["path_arg"].as_str().unwrap_or(path);
            let hits = all_rules.evaluate(event).unwrap_or_else(|e| panic!("{name}: {e}"));
            if f.keeps_in_kernel(arg, resolved, flags, result) {
                kept += 1;
                if !hits.is_empty() {
                    violations.push(format!("{name}: {path} ({flags:o}) raises {:?}", hits.iter().map(|h| h.rule_id.as_str()).collect::<Vec<_>>()));
                }
            } else if !hits.is_empty() {
                alerting_out += 1;
            }
        }
        (violations, kept, alerting_out)
    }

    /// Soundness of the open filter derived from the rules: no open of the recorded corpus or of
    /// a fixture that the kernel would keep raises an alert with every rule run on it.
    #[test]
    fn the_derived_open_filter_changes_no_alert_of_the_corpus_or_the_fixtures() {
        use crate::rules::pack::RulePack;
        let (dir, f) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let derived = pack.open_filter().expect("the default pack's open rules all declare kernel-testable prefilters");
        let f = f.with_derived(Some(derived));
        let (violations, kept, alerting_out) = open_filter_violations(&f, &pack.without_prefilters());
        assert!(violations.is_empty(), "the kernel would keep opens that raise alerts:\n{}", violations.join("\n"));
        assert!(kept > 100, "the filter keeps only {kept} opens of the corpus in the kernel: the test says little");
        assert!(alerting_out > 10, "only {alerting_out} alerting opens in the corpus and fixtures: the test says little");
    }

    /// The soundness test above has teeth: each part of the derived filter, taken away, makes it
    /// keep an alerting open of the corpus or the fixtures in the kernel.
    #[test]
    fn a_wrong_open_filter_fails_the_soundness_check() {
        use crate::rules::pack::RulePack;
        let (dir, f) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let all_rules = pack.without_prefilters();
        let derived = pack.open_filter().expect("derived");
        let broken: Vec<(&str, OpenKernelFilter)> = vec![
            ("no prefixes", OpenKernelFilter { prefixes: Default::default(), ..derived.clone() }),
            ("no suffixes", OpenKernelFilter { suffixes: Default::default(), ..derived.clone() }),
            ("no hidden components", OpenKernelFilter { hidden: 0, ..derived.clone() }),
            ("flags ignored: only read-only opens admitted", OpenKernelFilter {
                prefixes: derived.prefixes.iter().map(|(p, c)| (p.clone(), c & palisade_common::OPEN_CLASS_ANY)).collect(),
                suffixes: derived.suffixes.iter().map(|(p, c)| (p.clone(), c & palisade_common::OPEN_CLASS_ANY)).collect(),
                ..derived.clone()
            }),
        ];
        for (what, filter) in broken {
            let (violations, _, _) = open_filter_violations(&f.clone().with_derived(Some(filter)), &all_rules);
            assert!(!violations.is_empty(), "{what}: the soundness check should fail");
        }
    }

    #[test]
    fn the_default_pack_open_filter_is_what_its_open_rules_name() {
        use crate::rules::pack::RulePack;
        use palisade_common::{OPEN_CLASS_ANY, OPEN_CLASS_CREATE, OPEN_CLASS_TRUNCATE, OPEN_CLASS_WRITE};
        let (dir, _) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let f = pack.open_filter().expect("derived");
        assert_eq!(f.any_path, 0, "{f:?}");
        assert_eq!(f.hidden, OPEN_CLASS_ANY, "credential_read: /.ssh/");
        assert_eq!(f.prefixes.get("/etc/shadow"), Some(&OPEN_CLASS_ANY));
        assert_eq!(f.prefixes.get("/etc").map(|c| c & (OPEN_CLASS_WRITE | OPEN_CLASS_CREATE | OPEN_CLASS_TRUNCATE)), Some(OPEN_CLASS_WRITE | OPEN_CLASS_CREATE | OPEN_CLASS_TRUNCATE));
        assert_eq!(f.suffixes.get("/serviceaccount/token"), Some(&OPEN_CLASS_ANY));
        let model = |path: &str, flags: u32| f.admits(path, flags);
        assert!(!model("/usr/lib/x86_64-linux-gnu/libc.so.6", 0o2000000), "a library read is kept");
        assert!(!model("/etc/hostname", 0), "a read of /etc/hostname is kept");
        assert!(!model("/tmp/out", 0o1101), "a write below /tmp is kept");
        assert!(model("/etc/hostname", 0o1), "a write below /etc is let out");
        assert!(model("/home/a/.ssh/id_rsa", 0) && model("/home/a/.bash_history", 0), "hidden components are let out");
        assert!(model("/x/run/secrets/kubernetes.io/serviceaccount/token", 0));
        // The LPM entries carry their shorter entries' classes: /etc/shadow also admits writes.
        let maps = f.kernel_maps();
        let shadow = maps.prefixes.iter().find(|(p, _)| p == b"/etc/shadow").expect("/etc/shadow entry").1;
        assert_eq!(shadow & OPEN_CLASS_WRITE, OPEN_CLASS_WRITE, "{maps:?}");
        assert!(maps.suffixes.iter().any(|(s, _)| s.starts_with(b"nekot/")), "suffixes are reversed");
        // Prefilters off, or a rule without one: the kernel keeps nothing by rules.
        assert!(pack.without_prefilters().open_filter().is_none());
    }

    /// The kernel's connect decision (`connect_is_quiet` in probes-ebpf/src/common.rs).
    fn kernel_keeps_connect(ports: &BTreeSet<u16>, event: &serde_json::Value) -> bool {
        let family = event["connect"]["family"].as_str().unwrap_or("");
        let port = event["connect"]["port"].as_u64().unwrap_or(0);
        matches!(family, "inet" | "inet6") && !ports.contains(&(port as u16))
    }

    #[test]
    fn the_default_pack_lets_only_the_ports_its_connect_rules_name_out_of_the_kernel() {
        use crate::rules::pack::RulePack;
        let (dir, _) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let ports = pack.connect_ports().expect("the default pack's connect rules all declare prefilters");
        let lists = pack_lists(&dir).expect("lists");
        let mining: BTreeSet<u16> =
            lists["mining_pool_ports"].as_array().expect("mining_pool_ports").iter().map(|p| p.as_u64().expect("port") as u16).collect();
        assert_eq!(ports, mining, "crypto_mining names the mining ports; container_escape only unix sockets");
        assert!(pack.without_prefilters().connect_ports().is_none(), "prefilters off: nothing filtered in the kernel");
    }

    /// Soundness of the connect prefilter: no connect of the recorded corpus or of a fixture
    /// that the kernel would keep raises an alert.
    #[test]
    fn the_connect_prefilter_changes_no_alert_of_the_corpus_or_the_fixtures() {
        use crate::rules::pack::RulePack;
        let (dir, _) = default_pack();
        let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        let ports = pack.connect_ports().expect("connect ports");
        let events = corpus_and_fixture_events();
        let all_rules = pack.without_prefilters();
        let (mut kept, mut alerting_passed) = (0, 0);
        for (name, event) in events.iter().filter(|(_, e)| e["type"] == "connect") {
            let hits = all_rules.evaluate(event).unwrap_or_else(|e| panic!("{name}: {e}"));
            if kernel_keeps_connect(&ports, event) {
                kept += 1;
                assert!(hits.is_empty(), "{name}: the kernel would keep this connect, but without prefilters it raises {hits:?}");
            } else if !hits.is_empty() {
                alerting_passed += 1;
            }
        }
        assert!(kept > 100, "the prefilter keeps only {kept} connects of the corpus in the kernel: the test says little");
        assert!(alerting_passed > 0, "no alerting connect in the corpus or fixtures: the test says little");
    }

    #[test]
    fn relative_and_non_string_entries_are_not_prefixes() {
        let lists = serde_json::json!({"credential_files": ["/etc/x", "relative", 3], "other": ["/nope"]});
        let prefixes = prefixes_from_lists(&lists);
        assert!(prefixes.contains(&"/etc/x".to_string()));
        assert!(!prefixes.iter().any(|p| p == "relative" || p == "/nope"));
    }
}
