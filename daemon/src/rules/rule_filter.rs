//! Prefilters in user space: cheap field tests a rule declares in `meta.prefilter`, checked on
//! the event's input (JSON or the regorus value the daemon builds) before any VM work. An event whose type has subscribers
//! but none whose prefilter holds never reaches Rego; one that passes the prefilter of some of
//! them runs only those.
//!
//! The declaration, per event type, is a list of conditions; the rule runs when any of them
//! holds, and a condition holds when all of its field tests do:
//!
//! ```rego
//! "prefilter": {
//!     "open": [
//!         {"open.path": {"path_in": lists.credential_files}},
//!         {"open.write": true, "open.path": {"path_suffix": ["/release_agent"]}},
//!     ],
//! },
//! ```
//!
//! Soundness rules (so a prefilter can only ever cost an evaluation, never hide one that the
//! rule's own conditions would not also reject):
//! - a type the rule does not declare a prefilter for always runs the rule, as before;
//! - a field that is missing, or of a kind the test cannot judge (a number where strings are
//!   listed, `null`, an array), makes the test hold: `{"open.write": true}` rejects only a
//!   boolean `false`, as Rego's `input.open.write` does;
//! - the `path_*` tests hold for any path that is not absolute and canonical (relative, `//`,
//!   `/./`, `/../`, a trailing `/`, `.` or `..`), because rules resolve and clean paths
//!   (`lib.abs_path`) before comparing them, and the raw text says nothing about the result;
//! - numbers compare as Rego does (1 equals 1.0).
//!
//! The declaration is the rule author's claim that the rule raises nothing on an event that
//! fails it; `palisade rules test` checks the claim on every fixture, and a unit test on the
//! recorded corpus (the alerts are the same with and without prefilters).
use std::collections::BTreeSet;

use regorus::Value;

use super::input::{EventInput, FieldKey, FieldKind};
use super::model::EventType;

/// The tests a field may be given, by name (`{"open.path": {"path_prefix": [...]}}`); a plain
/// literal (`"open.write": true`) is equality.
pub const TEST_NAMES: [&str; 12] = [
    "in",
    "prefix",
    "suffix",
    "contains",
    "path_in",
    "path_prefix",
    "path_suffix",
    "path_contains",
    "any_bits",
    "basename_in",
    "any_in",
    "joined_contains",
];

/// At most this many subscribers of one event type are prefiltered (a selection is a bit mask);
/// past it, every subscriber of that type runs, as without prefilters.
pub const MAX_FILTERED_SUBSCRIBERS: usize = 64;

/// One rule's prefilter for one event type: any condition holding lets the rule run.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeFilter {
    conditions: Vec<Condition>,
}

/// All of its field tests must hold.
#[derive(Debug, Clone, PartialEq)]
struct Condition {
    tests: Vec<FieldTest>,
}

#[derive(Debug, Clone, PartialEq)]
struct FieldTest {
    /// The input field, as object keys (or array indices) from the top of `input`.
    field: Vec<FieldKey>,
    test: Test,
    /// A `path_*` test: a path that is not absolute and canonical passes.
    path: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    /// Equal to one of these.
    In(Literals),
    Prefix(Vec<String>),
    Suffix(Vec<String>),
    Contains(Vec<String>),
    /// An integer with at least one of these bits set.
    AnyBits(u64),
    /// A string whose last `/` component, leading `-` trimmed, is one of these, ignoring case
    /// (what `lib.exec_names` yields, also for a login shell's `-bash`, and rules that compare
    /// `lower(name)`). Lowercased at parse time.
    Basename(BTreeSet<String>),
    /// An array with at least one element equal to one of these.
    AnyIn(Literals),
    /// An array of strings whose elements, joined by spaces and lowercased, contain one of
    /// these (what `contains(lower(concat(" ", argv)), fragment)` tests). Lowercased.
    JoinedContains(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Literals {
    strings: BTreeSet<String>,
    numbers: Vec<f64>,
    bools: Vec<bool>,
}

impl TypeFilter {
    /// Whether the rule must run on `input` (an event of the type this filter is for).
    pub fn admits<I: EventInput>(&self, input: &I) -> bool {
        self.conditions.iter().any(|c| c.tests.iter().all(|t| t.holds(input)))
    }
}

impl TypeFilter {
    /// For a `connect` filter: the inet/inet6 destination ports it can admit, when that is a
    /// finite set (every condition either names ports with `connect.port: {"in": [...]}` or a
    /// literal, or admits no inet/inet6 family); None when some condition may admit any port.
    /// This is what the kernel's connect prefilter may drop: an inet connect to another port
    /// fails every condition.
    pub fn inet_ports(&self) -> Option<BTreeSet<u16>> {
        let mut ports = BTreeSet::new();
        for condition in &self.conditions {
            let field_is = |t: &&FieldTest, name: &str| t.field.len() == 2 && t.field[0].name == "connect" && t.field[1].name == name;
            let family_excludes_inet = condition.tests.iter().filter(|t| field_is(t, "family")).any(|t| match &t.test {
                // A string family that is not listed fails `In` (Literals::contains).
                Test::In(l) => !l.strings.is_empty() && !l.strings.contains("inet") && !l.strings.contains("inet6"),
                _ => false,
            });
            if family_excludes_inet {
                continue;
            }
            let named = condition.tests.iter().filter(|t| field_is(t, "port")).find_map(|t| match &t.test {
                // A number fails `In` when numbers are listed and none is equal.
                Test::In(l) if !l.numbers.is_empty() => Some(
                    l.numbers
                        .iter()
                        .filter(|x| x.fract() == 0.0 && (0.0..=65535.0).contains(*x))
                        .map(|&x| x as u16)
                        .collect::<Vec<u16>>(),
                ),
                _ => None,
            });
            ports.extend(named?);
        }
        Some(ports)
    }
}

/// What the kernel may test of an open (see probes-ebpf/src/common.rs `open_is_quiet`): the
/// open's flag classes (`OPEN_CLASS_*`), its path's first and last bytes, and whether the path
/// has a hidden component (`/.`). Each entry maps to the classes of opens it admits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenKernelFilter {
    /// Classes admitted whatever the path.
    pub any_path: u32,
    /// Classes admitted when the path contains `/.`.
    pub hidden: u32,
    /// Path prefix (at most `SENSITIVE_PREFIX_LEN` bytes; longer ones are cut) -> classes.
    pub prefixes: std::collections::BTreeMap<String, u32>,
    /// Path suffix (at most `SENSITIVE_PREFIX_LEN` bytes; longer ones keep their end) -> classes.
    pub suffixes: std::collections::BTreeMap<String, u32>,
}

impl OpenKernelFilter {
    /// Adds what an `open` prefilter admits, widened to what the kernel can test: each
    /// condition keeps one test of `open.path` (a prefix, a suffix, an exact name taken as a
    /// prefix, or fragments starting with `/.` taken as "has a hidden component") and one of
    /// `open.write`/`create`/`truncate: true`; every other test is dropped, which only admits
    /// more. A condition with no such path test admits every path of its classes.
    pub fn add(&mut self, filter: &TypeFilter) {
        use palisade_common::{OPEN_CLASS_ANY, OPEN_CLASS_CREATE, OPEN_CLASS_TRUNCATE, OPEN_CLASS_WRITE};
        const MAX: usize = palisade_common::SENSITIVE_PREFIX_LEN;
        for condition in &filter.conditions {
            let field_is = |t: &FieldTest, name: &str| t.field.len() == 2 && t.field[0].name == "open" && t.field[1].name == name;
            let class = condition
                .tests
                .iter()
                .find_map(|t| {
                    let Test::In(l) = &t.test else { return None };
                    // Only `true` admitted: a boolean `false` fails it (other kinds never occur).
                    let only_true = l.strings.is_empty() && l.numbers.is_empty() && l.bools.iter().all(|b| *b) && !l.bools.is_empty();
                    [("write", OPEN_CLASS_WRITE), ("create", OPEN_CLASS_CREATE), ("truncate", OPEN_CLASS_TRUNCATE)]
                        .into_iter()
                        .find(|(name, _)| only_true && field_is(t, name))
                        .map(|(_, class)| class)
                })
                .unwrap_or(OPEN_CLASS_ANY);
            let path_test = condition.tests.iter().filter(|t| field_is(t, "path")).find_map(|t| match &t.test {
                Test::In(l) if !l.strings.is_empty() && l.numbers.is_empty() && l.bools.is_empty() => {
                    Some(PathTest::Prefixes(l.strings.iter().cloned().collect()))
                }
                Test::Prefix(ps) => Some(PathTest::Prefixes(ps.clone())),
                Test::Suffix(ps) => Some(PathTest::Suffixes(ps.clone())),
                Test::Contains(fs) if fs.iter().all(|f| f.starts_with("/.")) => Some(PathTest::Hidden),
                _ => None,
            });
            match path_test {
                None => self.any_path |= class,
                Some(PathTest::Hidden) => self.hidden |= class,
                Some(PathTest::Prefixes(ps)) => {
                    for p in ps {
                        if p.is_empty() {
                            self.any_path |= class;
                        } else {
                            *self.prefixes.entry(cut_prefix(&p, MAX).to_string()).or_default() |= class;
                        }
                    }
                }
                Some(PathTest::Suffixes(ps)) => {
                    for p in ps {
                        if p.is_empty() {
                            self.any_path |= class;
                        } else {
                            *self.suffixes.entry(cut_suffix(&p, MAX).to_string()).or_default() |= class;
                        }
                    }
                }
            }
        }
    }

    /// Whether every open may leave the kernel (the filter keeps nothing).
    pub fn admits_everything(&self) -> bool {
        self.any_path & palisade_common::OPEN_CLASS_ANY != 0
    }

    /// The entries as the kernel's LPM tries hold them: each with the classes of the shorter
    /// entries it extends (an LPM lookup finds only the longest match). Suffixes reversed.
    pub fn kernel_maps(&self) -> crate::probes::loader::OpenFilterMaps {
        let close = |entries: Vec<(Vec<u8>, u32)>| -> Vec<(Vec<u8>, u32)> {
            entries
                .iter()
                .map(|(key, _)| {
                    let classes = entries.iter().filter(|(other, _)| key.starts_with(other)).fold(0, |acc, (_, c)| acc | c);
                    (key.clone(), classes)
                })
                .collect()
        };
        let prefixes = close(self.prefixes.iter().map(|(p, c)| (p.as_bytes().to_vec(), *c)).collect());
        let suffixes = close(self.suffixes.iter().map(|(p, c)| (p.bytes().rev().collect(), *c)).collect());
        crate::probes::loader::OpenFilterMaps { any_path: self.any_path, hidden: self.hidden, prefixes, suffixes }
    }

    /// Whether an open of `path` (absolute and canonical, as the kernel judges it) with `flags`
    /// is admitted: the user-space model of the kernel's decision.
    pub fn admits(&self, path: &str, flags: u32) -> bool {
        const MAX: usize = palisade_common::SENSITIVE_PREFIX_LEN;
        // In the kernel's order (its early answers included).
        let classes = palisade_common::open_classes(flags);
        let bytes = path.as_bytes();
        if self.any_path & classes != 0 {
            return true;
        }
        let head = &bytes[..bytes.len().min(MAX)];
        if self.prefixes.iter().any(|(p, c)| c & classes != 0 && head.starts_with(p.as_bytes())) {
            return true;
        }
        let suffix_classes = self.suffixes.values().fold(0, |acc, c| acc | c);
        if (self.hidden | suffix_classes) & classes == 0 {
            return false;
        }
        if bytes.is_empty() || bytes.len() >= palisade_common::PATH_LEN - 1 || path.ends_with('/') {
            return true;
        }
        let tail = &bytes[bytes.len() - bytes.len().min(MAX)..];
        (self.hidden & classes != 0 && path.contains("/."))
            || self.suffixes.iter().any(|(s, c)| c & classes != 0 && tail.ends_with(s.as_bytes()))
    }
}

enum PathTest {
    Prefixes(Vec<String>),
    Suffixes(Vec<String>),
    Hidden,
}

/// The first `max` bytes of `s`, cut back to a character boundary (a shorter prefix admits more).
fn cut_prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The last `max` bytes of `s`, cut forward to a character boundary.
fn cut_suffix(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

impl FieldTest {
    fn holds<I: EventInput>(&self, input: &I) -> bool {
        let mut value = input;
        for key in &self.field {
            match value.field(key) {
                Some(v) => value = v,
                // Missing: the test cannot judge; the rule runs.
                None => return true,
            }
        }
        let kind = value.kind();
        if self.path {
            if let FieldKind::Str(s) = kind {
                if !is_canonical_absolute(s) {
                    return true;
                }
            }
        }
        match (&self.test, kind) {
            (Test::In(literals), kind) => literals.contains(kind),
            (Test::Prefix(ps), FieldKind::Str(s)) => ps.iter().any(|p| s.starts_with(p.as_str())),
            (Test::Suffix(ps), FieldKind::Str(s)) => ps.iter().any(|p| s.ends_with(p.as_str())),
            (Test::Contains(ps), FieldKind::Str(s)) => ps.iter().any(|p| s.contains(p.as_str())),
            (Test::AnyBits(mask), FieldKind::Number { bits, .. }) => match bits {
                Some(bits) => bits & mask != 0,
                None => true,
            },
            (Test::Basename(names), FieldKind::Str(s)) => {
                let last = s.rsplit('/').next().unwrap_or("");
                names.contains(lowercase(last.trim_start_matches('-')).as_ref()) || names.contains(lowercase(last).as_ref())
            }
            (Test::AnyIn(literals), FieldKind::Array) => value.items().any(|v| literals.contains(v.kind())),
            (Test::JoinedContains(fragments), FieldKind::Array) => {
                let mut joined = String::new();
                for (i, item) in value.items().enumerate() {
                    // A non-string element: Rego's concat fails, the test cannot judge.
                    let FieldKind::Str(s) = item.kind() else { return true };
                    if i > 0 {
                        joined.push(' ');
                    }
                    joined.push_str(s);
                }
                let joined = lowercase(&joined);
                fragments.iter().any(|f| joined.contains(f.as_str()))
            }
            // A value of a type the test cannot judge: the rule runs.
            _ => true,
        }
    }
}

/// `s.to_lowercase()`, without allocating when it is already lowercase ASCII (nearly every
/// program name and argument: the exec prefilters test several per event).
fn lowercase(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.is_ascii() {
        std::borrow::Cow::Owned(s.to_lowercase())
    } else if s.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(s.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

impl Literals {
    /// Whether a value of `kind` equals one of the literals. A value of a kind no literal has (a
    /// number where strings are listed, `null` where `true` is) cannot be judged: Rego's own test
    /// may still hold for it (`input.open.write` holds for any value but `false`), so it passes.
    fn contains(&self, kind: FieldKind<'_>) -> bool {
        match kind {
            FieldKind::Str(s) => self.strings.is_empty() || self.strings.contains(s),
            FieldKind::Number { float, .. } => match float {
                Some(x) if !self.numbers.is_empty() => self.numbers.iter().any(|&y| x == y),
                _ => true,
            },
            FieldKind::Bool(b) => self.bools.is_empty() || self.bools.contains(&b),
            FieldKind::Null | FieldKind::Array | FieldKind::Other => true,
        }
    }
}

/// True when `lib.abs_path` returns the path unchanged: absolute, no empty, `.` or `..`
/// component, no trailing `/` (except `/` itself).
pub fn is_canonical_absolute(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    if path == "/" {
        return true;
    }
    !path.ends_with('/') && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Parses a rule's `meta.prefilter` (already evaluated); one message per problem, each naming
/// where in the declaration it is.
pub fn parse(value: &Value, events: &[EventType]) -> Result<Vec<(EventType, TypeFilter)>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let Value::Object(types) = value else {
        return Err(vec!["meta.prefilter must be an object {event type: [condition, ...]}".to_string()]);
    };
    for (key, conditions) in types.iter() {
        let Some(name) = key.as_string().ok().map(|s| s.to_string()) else {
            problems.push("meta.prefilter keys must be event types".to_string());
            continue;
        };
        let Ok(ty) = name.parse::<EventType>() else {
            problems.push(format!("meta.prefilter: {name:?} is not an event type"));
            continue;
        };
        if !events.contains(&ty) {
            problems.push(format!("meta.prefilter.{name}: the rule does not subscribe to {name} events (meta.events)"));
            continue;
        }
        let items: Vec<&Value> = match conditions {
            Value::Array(items) => items.iter().collect(),
            Value::Set(items) => items.iter().collect(),
            _ => {
                problems.push(format!("meta.prefilter.{name} must be a list of conditions"));
                continue;
            }
        };
        if items.is_empty() {
            problems.push(format!(
                "meta.prefilter.{name} is empty, so the rule would never run on {name} events; remove {name} from meta.events instead"
            ));
            continue;
        }
        let mut parsed = Vec::new();
        for (i, condition) in items.into_iter().enumerate() {
            match parse_condition(condition) {
                Ok(c) => parsed.push(c),
                Err(p) => problems.push(format!("meta.prefilter.{name}[{i}]: {p}")),
            }
        }
        out.push((ty, TypeFilter { conditions: parsed }));
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

fn parse_condition(value: &Value) -> Result<Condition, String> {
    let Value::Object(fields) = value else {
        return Err("a condition is an object {\"field.path\": test, ...}".to_string());
    };
    if fields.is_empty() {
        return Err("a condition needs at least one field test".to_string());
    }
    let mut tests = Vec::new();
    for (key, spec) in fields.iter() {
        let Some(field) = key.as_string().ok().map(|s| s.to_string()) else {
            return Err("field names must be strings like \"open.path\"".to_string());
        };
        let segments: Vec<FieldKey> = field.split('.').map(FieldKey::new).collect();
        if segments.iter().any(|s| s.name.is_empty()) {
            return Err(format!("bad field {field:?} (want dotted names like \"open.path\")"));
        }
        let (test, path) = parse_test(spec).map_err(|p| format!("{field}: {p}"))?;
        tests.push(FieldTest { field: segments, test, path });
    }
    Ok(Condition { tests })
}

fn parse_test(spec: &Value) -> Result<(Test, bool), String> {
    let Value::Object(test) = spec else {
        return literal(spec).map(|l| (Test::In(l), false));
    };
    let mut entries = test.iter();
    let (Some((name, argument)), None) = (entries.next(), entries.next()) else {
        return Err(format!("a test is a literal or an object with one of {}", TEST_NAMES.join(", ")));
    };
    let name = name.as_string().map(|s| s.to_string()).unwrap_or_default();
    let path = name.starts_with("path_");
    let test = match name.as_str() {
        "in" | "path_in" => Test::In(all_literals(argument)?),
        "prefix" | "path_prefix" => Test::Prefix(strings(argument)?),
        "suffix" | "path_suffix" => Test::Suffix(strings(argument)?),
        "contains" | "path_contains" => Test::Contains(strings(argument)?),
        "any_bits" => match argument {
            Value::Number(n) => match n.as_u64() {
                Some(mask) if mask > 0 => Test::AnyBits(mask),
                _ => return Err("any_bits wants a positive integer mask".to_string()),
            },
            _ => return Err("any_bits wants a positive integer mask".to_string()),
        },
        "basename_in" => Test::Basename(names(argument)?.into_iter().map(|n| n.to_lowercase()).collect()),
        "any_in" => Test::AnyIn(all_literals(argument)?),
        "joined_contains" => Test::JoinedContains(strings(argument)?.into_iter().map(|f| f.to_lowercase()).collect()),
        other => return Err(format!("unknown test {other:?} (want one of {})", TEST_NAMES.join(", "))),
    };
    Ok((test, path))
}

fn members(value: &Value) -> Result<Vec<&Value>, String> {
    match value {
        Value::Array(items) => Ok(items.iter().collect()),
        Value::Set(items) => Ok(items.iter().collect()),
        _ => Err("wants a list".to_string()),
    }
}

/// Names from a list, a set, or an object's keys (`lists.package_managers` maps names to
/// their subcommands).
fn names(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Object(fields) => fields
            .iter()
            .map(|(k, _)| k.as_string().map(|s| s.to_string()).map_err(|_| "wants names (strings)".to_string()))
            .collect(),
        other => strings(other),
    }
}

fn strings(value: &Value) -> Result<Vec<String>, String> {
    members(value)?
        .into_iter()
        .map(|v| v.as_string().map(|s| s.to_string()).map_err(|_| "wants a list of strings".to_string()))
        .collect()
}

/// The literals of a list of members (`in`, `any_in`), merged into one set.
fn all_literals(argument: &Value) -> Result<Literals, String> {
    let mut all = Literals::default();
    for item in members(argument)? {
        let l = literal(item)?;
        all.strings.extend(l.strings);
        all.numbers.extend(l.numbers);
        all.bools.extend(l.bools);
    }
    Ok(all)
}

fn literal(value: &Value) -> Result<Literals, String> {
    let mut l = Literals::default();
    match value {
        Value::String(s) => {
            l.strings.insert(s.to_string());
        }
        Value::Number(n) => l.numbers.push(n.as_f64().ok_or("a number that is not a float")?),
        Value::Bool(b) => l.bools.push(*b),
        // Nothing to compare with: `null` passes every equality test anyway.
        Value::Null => {}
        _ => return Err("a literal test is a string, number, boolean or null".to_string()),
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(declaration: serde_json::Value, events: &[EventType]) -> Result<Vec<(EventType, TypeFilter)>, Vec<String>> {
        parse(&super::super::input::to_rego_value(&declaration), events)
    }

    /// Every test below judges both forms of an event: the JSON and the regorus value.
    trait BothForms {
        fn admits_both(&self, input: &serde_json::Value) -> bool;
    }

    impl BothForms for TypeFilter {
        fn admits_both(&self, input: &serde_json::Value) -> bool {
            let json = self.admits(input);
            assert_eq!(self.admits(&super::super::input::to_rego_value(input)), json, "the two forms of {input} disagree");
            json
        }
    }

    #[test]
    fn the_kernel_open_filter_widens_what_it_cannot_test() {
        use palisade_common::{OPEN_CLASS_ANY, OPEN_CLASS_TRUNCATE, OPEN_CLASS_WRITE};
        let parsed = filter(
            json!({"open": [
                {"open.write": true, "open.path": {"path_prefix": ["/etc/"]}, "process.comm": "x"},
                {"open.path": {"basename_in": ["shadow"]}, "open.truncate": true},
                {"open.path": {"path_contains": ["/.ssh/"]}},
                {"open.path": {"path_suffix": ["/token"]}, "open.write": false},
                {"open.path": {"path_in": [format!("/{}", "a".repeat(80))]}},
            ]}),
            &[EventType::Open],
        )
        .expect("parses");
        let mut k = OpenKernelFilter::default();
        k.add(&parsed[0].1);
        assert_eq!(k.prefixes.get("/etc/"), Some(&OPEN_CLASS_WRITE), "other fields dropped, the write flag kept");
        assert_eq!(k.any_path, OPEN_CLASS_TRUNCATE, "basename_in cannot be tested: every truncating open");
        assert_eq!(k.hidden, OPEN_CLASS_ANY);
        assert_eq!(k.suffixes.get("/token"), Some(&OPEN_CLASS_ANY), "`write: false` is not a class: dropped");
        assert!(k.prefixes.keys().any(|p| p.len() == palisade_common::SENSITIVE_PREFIX_LEN), "long names cut to what the kernel compares");
        assert!(!k.admits_everything());
        // A fragment the kernel cannot look for: every open.
        let parsed = filter(json!({"open": [{"open.path": {"contains": ["secret"]}}]}), &[EventType::Open]).expect("parses");
        let mut k = OpenKernelFilter::default();
        k.add(&parsed[0].1);
        assert!(k.admits_everything());
    }

    #[test]
    fn connect_filters_name_their_inet_ports_or_none() {
        let ports = |decl: serde_json::Value| {
            let parsed = filter(json!({"connect": decl}), &[EventType::Connect]).expect("parses");
            parsed[0].1.inet_ports()
        };
        // Ports named (as a list or a literal), unix-only conditions contribute none.
        assert_eq!(
            ports(json!([
                {"connect.family": {"in": ["inet", "inet6"]}, "connect.port": {"in": [3333, 4444]}},
                {"connect.port": 22},
                {"connect.family": "unix", "connect.unix_path": {"in": ["/run/docker.sock"]}},
            ])),
            Some(BTreeSet::from([22, 3333, 4444]))
        );
        // A condition that may hold for an inet connect to any port: nothing can be dropped.
        assert_eq!(ports(json!([{"connect.port": {"in": [3333]}}, {"connect.family": "inet"}])), None);
        assert_eq!(ports(json!([{"connect.address": {"prefix": ["10."]}}])), None);
        assert_eq!(ports(json!([{"connect.port": {"any_bits": 1}}])), None);
        assert_eq!(ports(json!([{"connect.port": {"in": ["3333"]}}])), None, "a string port passes every number");
        // Numbers that no port equals add nothing.
        assert_eq!(ports(json!([{"connect.port": {"in": [80.5, 70000, -1, 443]}}])), Some(BTreeSet::from([443])));
    }

    #[test]
    fn exec_names_arguments_and_command_lines() {
        let decl = json!({"exec": [
            {"exec.filename": {"basename_in": ["bash", "XMRig"]}},
            {"exec.argv": {"any_in": ["-sS"]}},
            {"exec.argv": {"joined_contains": ["stratum+tcp://", "--donate-level 1"]}},
        ]});
        let parsed = filter(decl, &[EventType::Exec]).expect("parses");
        let f = &parsed[0].1;
        let ev = |filename: serde_json::Value, argv: serde_json::Value| json!({"type": "exec", "exec": {"filename": filename, "argv": argv}});
        assert!(f.admits_both(&ev(json!("/bin/bash"), json!(["bash"]))));
        assert!(f.admits_both(&ev(json!("/opt/XMRIG"), json!([]))), "names compare ignoring case");
        assert!(f.admits_both(&ev(json!("-bash"), json!([]))), "a login shell's leading '-'");
        assert!(f.admits_both(&ev(json!("/usr/bin/nmap"), json!(["nmap", "-sS", "10.0.0.1"]))));
        assert!(f.admits_both(&ev(json!("/tmp/x"), json!(["x", "-o", "STRATUM+TCP://pool:3333"]))));
        assert!(f.admits_both(&ev(json!("/tmp/x"), json!(["x", "--donate-level", "1"]))), "a fragment across two arguments");
        assert!(!f.admits_both(&ev(json!("/usr/bin/ls"), json!(["ls", "-l"]))));
        assert!(!f.admits_both(&ev(json!("/bin/bash/"), json!(["ls"]))), "the last component of '/bin/bash/' is empty, as in lib.basename");
        // What the tests cannot judge passes.
        assert!(f.admits_both(&ev(json!(null), json!(["ls", 3]))));
        assert!(f.admits_both(&ev(json!("/usr/bin/ls"), json!("not a list"))));
        // An object's keys are names (lists.package_managers maps names to subcommands).
        let decl = json!({"exec": [{"exec.argv.0": {"basename_in": {"apt": ["install"], "pip": ["install"]}}}]});
        let parsed = filter(decl, &[EventType::Exec]).expect("parses");
        assert!(parsed[0].1.admits_both(&json!({"type": "exec", "exec": {"argv": ["/usr/bin/pip", "install"]}})));
        assert!(!parsed[0].1.admits_both(&json!({"type": "exec", "exec": {"argv": ["/usr/bin/cat"]}})));
    }

    #[test]
    fn canonical_paths() {
        for p in ["/", "/etc/shadow", "/root/.ssh/id_rsa", "/a/.b/c"] {
            assert!(is_canonical_absolute(p), "{p}");
        }
        for p in ["", "etc/shadow", "/etc//shadow", "/etc/./shadow", "/x/../etc/shadow", "/etc/", "/etc/.", "/etc/..", "//etc"] {
            assert!(!is_canonical_absolute(p), "{p}");
        }
    }

    #[test]
    fn conditions_are_any_of_all_of() {
        let decl = json!({"open": [
            {"open.path": {"path_in": ["/etc/shadow"]}},
            {"open.write": true, "open.path": {"path_suffix": ["/release_agent"]}},
        ]});
        let parsed = filter(decl, &[EventType::Open]).expect("parses");
        let f = &parsed[0].1;
        let ev = |path: &str, write: bool| json!({"type": "open", "open": {"path": path, "write": write}});
        assert!(f.admits_both(&ev("/etc/shadow", false)));
        assert!(!f.admits_both(&ev("/etc/passwd", false)));
        assert!(f.admits_both(&ev("/sys/fs/cgroup/x/release_agent", true)));
        assert!(!f.admits_both(&ev("/sys/fs/cgroup/x/release_agent", false)));
        // What the rule cleans or resolves first always passes.
        assert!(f.admits_both(&ev("/etc/../etc/shadow", false)));
        assert!(f.admits_both(&ev("shadow", false)));
        assert!(f.admits_both(&ev("/etc//shadow", false)));
        // A missing field or a value the test cannot judge lets the rule run.
        assert!(f.admits_both(&json!({"type": "open", "open": {}})));
        assert!(f.admits_both(&json!({"type": "open", "open": {"path": 3}})));
        // `true` rejects only `false`: Rego's `input.open.write` holds for 1 or null too.
        for write in [json!(1), json!(null), json!("yes")] {
            assert!(f.admits_both(&json!({"type": "open", "open": {"path": "/x/release_agent", "write": write}})), "{write}");
        }
    }

    #[test]
    fn numbers_bits_and_indices() {
        let decl = json!({"ptrace": [{"ptrace.request": {"in": [16, 4]}}], "chmod": [{"chmod.mode": {"any_bits": 3072}}],
            "exec": [{"exec.argv.0": {"prefix": ["-"]}}]});
        let parsed = filter(decl, &[EventType::Ptrace, EventType::Chmod, EventType::Exec]).expect("parses");
        let get = |t: EventType| &parsed.iter().find(|(ty, _)| *ty == t).expect("type").1;
        assert!(get(EventType::Ptrace).admits_both(&json!({"ptrace": {"request": 16.0}})));
        assert!(!get(EventType::Ptrace).admits_both(&json!({"ptrace": {"request": 0}})));
        assert!(get(EventType::Chmod).admits_both(&json!({"chmod": {"mode": 2541}})));
        assert!(!get(EventType::Chmod).admits_both(&json!({"chmod": {"mode": 493}})));
        assert!(get(EventType::Exec).admits_both(&json!({"exec": {"argv": ["-bash"]}})));
        assert!(!get(EventType::Exec).admits_both(&json!({"exec": {"argv": ["bash"]}})));
        assert!(get(EventType::Exec).admits_both(&json!({"exec": {"argv": []}})));
    }

    #[test]
    fn bad_declarations_are_named() {
        let cases = [
            (json!(["open"]), "must be an object"),
            (json!({"opne": []}), "not an event type"),
            (json!({"exec": [{"exec.filename": "/x"}]}), "does not subscribe to exec"),
            (json!({"open": []}), "would never run"),
            (json!({"open": [{}]}), "at least one field test"),
            (json!({"open": [{"open..path": "/x"}]}), "bad field"),
            (json!({"open": [{"open.path": {"starts": ["/x"]}}]}), "unknown test \"starts\""),
            (json!({"open": [{"open.path": {"prefix": "/x"}}]}), "wants a list"),
            (json!({"open": [{"open.path": {"prefix": [1]}}]}), "list of strings"),
            (json!({"open": [{"open.flags": {"any_bits": 0}}]}), "positive integer"),
            (json!({"open": [{"open.path": ["/x"]}]}), "literal test"),
        ];
        for (decl, want) in cases {
            let problems = filter(decl.clone(), &[EventType::Open]).expect_err(&decl.to_string());
            assert!(problems.iter().any(|p| p.contains(want)), "{decl}: {problems:?} lacks {want:?}");
        }
    }
}

/// Soundness of the default pack's prefilters, on real and on disguised events.
#[cfg(test)]
mod soundness {
    use std::path::Path;

    use crate::rules::model::RuleHit;
    use crate::rules::pack::RulePack;

    fn sorted(mut hits: Vec<RuleHit>) -> Vec<RuleHit> {
        hits.sort();
        hits
    }

    /// The fields that carry a path a rule cleans before comparing it.
    const PATH_FIELDS: [(&str, &str); 6] = [
        ("open", "path"),
        ("exec", "filename"),
        ("unlink", "path"),
        ("rename", "old_path"),
        ("rename", "new_path"),
        ("chmod", "path"),
    ];

    /// What an attacker who knows the prefilters would write instead of the plain path: the
    /// same file, spelled so that a naive string test misses it.
    fn disguises(event: &serde_json::Value) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for (section, field) in PATH_FIELDS {
            let Some(path) = event[section][field].as_str().filter(|p| p.starts_with('/') && p.len() > 1) else { continue };
            let (dir, base) = path.rsplit_once('/').unwrap_or(("", path));
            let spellings = [
                path.replacen('/', "//", 1),
                format!("/.{path}"),
                format!("/tmp/..{path}"),
                format!("{path}/"),
                format!("{dir}/./{base}"),
            ];
            for spelling in spellings {
                let mut disguised = event.clone();
                disguised[section][field] = spelling.into();
                out.push(disguised);
            }
            // Relative to the working directory.
            let mut relative = event.clone();
            relative[section][field] = base.into();
            relative["process"]["cwd"] = if dir.is_empty() { "/".into() } else { dir.into() };
            out.push(relative);
        }
        out
    }

    #[test]
    fn prefilters_change_no_judgement_of_the_corpus_the_fixtures_or_their_disguised_paths() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let pack = RulePack::load(&root.join("rules")).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
        assert!(pack.prefilters_applied());
        let unfiltered = pack.without_prefilters();
        let mut events: Vec<(String, serde_json::Value)> = Vec::new();
        let corpus = std::fs::read_to_string(root.join("testdata/scenarios/recorded-mix.jsonl")).expect("recorded corpus");
        for (i, line) in corpus.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            events.push((format!("recorded-mix.jsonl:{}", i + 1), serde_json::from_str(line).expect("corpus line")));
        }
        let fixtures = crate::rules::testing::load_fixtures(&[root.join("testdata/rules")]).expect("fixtures");
        let mut attacks = 0;
        for case in fixtures {
            let name = format!("{}: {}", case.file, case.case.name);
            for (j, disguised) in disguises(&case.case.event).into_iter().enumerate() {
                events.push((format!("{name} (disguise {j})"), disguised));
            }
            attacks += usize::from(!case.case.want.is_empty());
            events.push((name, case.case.event));
        }
        let (mut skipped, mut alerts) = (0, 0);
        let mut session = pack.session().expect("session");
        let ids = |rules: Vec<&crate::rules::model::RuleMeta>| rules.into_iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        // A rule's wall-clock budget (100 ms) can run out when the test thread is descheduled
        // on a loaded machine; that says nothing about the input, so such a run is repeated.
        let settled = |mut run: Box<dyn FnMut() -> crate::rules::model::Judgement + '_>| {
            let mut judgement = run();
            for _ in 0..5 {
                if !judgement.failures.iter().any(|f| f.reason == crate::rules::model::FailureReason::Timeout) {
                    break;
                }
                judgement = run();
            }
            judgement
        };
        for (name, event) in &events {
            let filtered = settled(Box::new(|| pack.evaluate_judgement(event).unwrap_or_else(|e| panic!("{name}: {e}"))));
            let all = settled(Box::new(|| unfiltered.evaluate_judgement(event).unwrap_or_else(|e| panic!("{name}: {e}"))));
            assert_eq!(filtered.failures, all.failures, "{name}");
            // The daemon's form of the input (a regorus value, no JSON) selects the same rules
            // and gets the same judgement.
            let value = crate::rules::input::to_rego_value(event);
            assert_eq!(ids(pack.rules_judging(&value)), ids(pack.rules_judging(event)), "{name}: prefilters read the value differently");
            let direct = settled(Box::new(|| pack.evaluate_in(&mut session, &value).unwrap_or_else(|e| panic!("{name}: {e}"))));
            assert_eq!(direct.failures, filtered.failures, "{name}: the value form fails differently");
            assert_eq!(sorted(direct.hits), sorted(filtered.hits.clone()), "{name}: the value form changes the judgement");
            let (filtered, all) = (sorted(filtered.hits), sorted(all.hits));
            assert_eq!(filtered, all, "{name}: prefilters change the judgement of {event}");
            alerts += all.len();
            skipped += usize::from(pack.rules_judging(event).is_empty() && !unfiltered.rules_judging(event).is_empty());
        }
        // The test says something only if prefilters skip much and the events raise much.
        assert!(attacks > 20 && alerts > 100, "{attacks} attack fixtures, {alerts} alerts");
        assert!(skipped * 2 > events.len(), "prefilters keep only {skipped} of {} events from Rego", events.len());
    }
}
