//! rules/README.md documents the input schema: one example per event type, with exactly the
//! fields of that type. This test fails when the documentation and the engine's event types (or
//! the schema the producer agreed to) diverge.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use palisade::rules::{EventType, RulePack};

/// The agreed schema: the fields of each type's own object.
fn schema() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        ("exec", vec!["filename", "argv", "argc", "argv_truncated", "via_execveat", "dirfd", "at_flags", "fileless"]),
        ("fork", vec!["parent_pid", "child_pid"]),
        ("exit", vec!["exit_code"]),
        ("connect", vec!["fd", "family", "address", "port", "unix_path", "result"]),
        ("open", vec!["op", "path", "path_arg", "path_resolved", "dirfd", "flags", "flags_names", "mode", "write", "create", "truncate", "result"]),
        ("ptrace", vec!["request", "request_name", "target_pid", "addr", "result"]),
        ("cred", vec!["op", "args", "cap_effective", "cap_permitted", "cap_inheritable", "result", "old_uid", "old_gid", "old_euid", "old_egid"]),
        ("mount", vec!["op", "source", "target", "fstype", "flags", "result"]),
        ("namespace", vec!["op", "flags", "flags_names", "fd", "result"]),
        ("module", vec!["op", "name", "fd", "flags", "len", "result"]),
        ("bpf", vec!["cmd", "cmd_name", "size", "result"]),
        ("memfd", vec!["name", "flags", "result"]),
        ("chmod", vec!["op", "path", "path_arg", "path_resolved", "fd", "mode", "setuid", "setgid", "result"]),
        ("unlink", vec!["op", "path", "path_arg", "path_resolved", "dirfd", "flags", "result"]),
        ("rename", vec!["old_path", "old_path_arg", "old_path_resolved", "new_path", "new_path_arg", "new_path_resolved", "flags", "result"]),
        ("dup", vec!["op", "old_fd", "new_fd", "flags", "result", "new_fd_kind"]),
    ])
}

const ENVELOPE: [&str; 9] = ["type", "time", "ktime_ns", "source", "node", "cgroup_id", "truncated", "pod", "process"];
const PROCESS: [&str; 15] = [
    "pid", "tid", "ppid", "uid", "gid", "euid", "egid", "comm", "exe", "exe_resolved", "cmdline", "cmdline_truncated", "cwd", "stdio",
    "ancestors",
];

fn readme_examples() -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut examples = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("```json\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("unterminated json block");
        let block = &body[..end];
        let value: serde_json::Value =
            serde_json::from_str(block).unwrap_or_else(|e| panic!("README json block does not parse: {e}\n{block}"));
        examples.push(value);
        rest = &body[end + 3..];
    }
    examples
}

#[test]
fn readme_documents_every_event_type_with_its_fields() {
    let examples = readme_examples();
    let schema = schema();
    let engine_types: BTreeSet<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
    let schema_types: BTreeSet<&str> = schema.keys().copied().collect();
    assert_eq!(engine_types, schema_types, "engine event types and the agreed schema diverge");

    let mut documented = BTreeSet::new();
    for example in &examples {
        let Some(ty) = example.get("type").and_then(|t| t.as_str()) else { continue };
        let fields = schema.get(ty).unwrap_or_else(|| panic!("README documents unknown event type {ty:?}"));
        let object = example
            .get(ty)
            .and_then(|o| o.as_object())
            .unwrap_or_else(|| panic!("README example of {ty} has no {ty:?} object"));
        let got: BTreeSet<&str> = object.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = fields.iter().copied().collect();
        assert_eq!(got, want, "README fields of {ty} differ from the schema");
        for other in schema.keys().filter(|k| **k != ty) {
            assert!(example.get(*other).is_none(), "README example of {ty} also has a {other:?} object");
        }
        documented.insert(ty);
    }
    let missing: Vec<&&str> = schema_types.iter().filter(|t| !documented.contains(*t)).collect();
    assert!(missing.is_empty(), "README has no example for {missing:?}");
}

#[test]
fn readme_envelope_example_is_complete_and_evaluates() {
    let examples = readme_examples();
    let full = examples
        .iter()
        .find(|e| e.get("process").is_some())
        .expect("README has a full event example");
    for field in ENVELOPE {
        assert!(full.get(field).is_some(), "README envelope example lacks {field:?}");
    }
    let process = &full["process"];
    for field in PROCESS.iter().filter(|f| !f.is_empty()) {
        assert!(process.get(*field).is_some(), "README process example lacks {field:?}");
    }
    // Every per-type example, put in the documented envelope, must evaluate cleanly.
    let pack = RulePack::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")).expect("pack loads");
    for example in &examples {
        let Some(ty) = example.get("type").and_then(|t| t.as_str()) else { continue };
        let mut event = full.clone();
        let object = event.as_object_mut().expect("object");
        for t in schema().keys() {
            object.remove(*t);
        }
        object.insert("type".into(), ty.into());
        object.insert(ty.into(), example[ty].clone());
        pack.evaluate_strict(&event).unwrap_or_else(|e| panic!("README {ty} example: {e}"));
    }
}
