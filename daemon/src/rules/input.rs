//! The event `input` as a regorus value, built by walking the serde_json tree (no JSON text in
//! between: printing and re-parsing every event would cost more than evaluating most rules).
//!
//! The conversion is part of every evaluation, so it avoids allocations where it can: field
//! names and the small vocabulary of enum-like values (event types, fd kinds, ops, families) are
//! shared, reference-counted strings made once per process; and an [`InputConverter`] kept by
//! each evaluating session reuses the converted `pod` and `process.ancestors` while they stay
//! the same from one event to the next (consecutive events mostly come from the same pod and
//! process tree). The result is always equal to a fresh conversion.
use std::collections::BTreeMap;
use std::sync::OnceLock;

use regorus::Value;

use super::model::EventType;

/// Converts one serde_json value into the equivalent regorus value.
pub fn to_rego_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => number(n),
        serde_json::Value::String(s) => string(s),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(to_rego_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(fields) => object(fields.iter().map(|(k, v)| (string(k), to_rego_value(v)))),
    }
}

/// Builds event inputs, reusing the parts that repeat from one event to the next. Keep one per
/// evaluating thread (a rule `Session` has one).
#[derive(Debug, Default)]
pub struct InputConverter {
    pod: Option<(serde_json::Value, Value)>,
    ancestors: Option<(serde_json::Value, Value)>,
}

impl InputConverter {
    /// The same value as `to_rego_value(json)`.
    pub fn convert(&mut self, json: &serde_json::Value) -> Value {
        let serde_json::Value::Object(fields) = json else {
            return to_rego_value(json);
        };
        object(fields.iter().map(|(k, v)| {
            let value = match (k.as_str(), v) {
                ("pod", serde_json::Value::Object(_)) => reuse(&mut self.pod, v),
                ("process", serde_json::Value::Object(process)) => object(process.iter().map(|(k, v)| {
                    let value = match (k.as_str(), v) {
                        ("ancestors", serde_json::Value::Array(_)) => reuse(&mut self.ancestors, v),
                        _ => to_rego_value(v),
                    };
                    (string(k), value)
                })),
                _ => to_rego_value(v),
            };
            (string(k), value)
        }))
    }
}

/// An object from its fields. Collecting into a `BTreeMap` first builds it in one pass from the
/// (already sorted) serde_json fields, where inserting one field at a time would search each time.
fn object(fields: impl Iterator<Item = (Value, Value)>) -> Value {
    Value::from(fields.collect::<BTreeMap<_, _>>())
}

/// The converted value of `json`, from `slot` when it holds the same JSON.
fn reuse(slot: &mut Option<(serde_json::Value, Value)>, json: &serde_json::Value) -> Value {
    if let Some((previous, value)) = slot {
        if previous == json {
            return value.clone();
        }
    }
    let value = to_rego_value(json);
    *slot = Some((json.clone(), value.clone()));
    value
}

/// Field names of the input schema and the enum-like values events carry. A string equal to
/// one of them shares one allocation instead of getting its own.
const WORDS: &[&str] = &[
    "BPF_MAP_CREATE", "BPF_PROG_LOAD", "CLONE_NEWCGROUP", "CLONE_NEWIPC", "CLONE_NEWNET",
    "CLONE_NEWNS", "CLONE_NEWPID", "CLONE_NEWUSER", "CLONE_NEWUTS", "O_APPEND", "O_CLOEXEC",
    "O_CREAT", "O_NONBLOCK", "O_RDONLY", "O_RDWR", "O_TRUNC", "O_WRONLY", "PTRACE_ATTACH",
    "PTRACE_SEIZE", "addr", "address", "ancestors", "argc", "args", "argv", "at_flags", "bpf",
    "cap_effective", "cap_inheritable", "cap_permitted", "capset", "cgroup_id", "child_pid",
    "chmod", "cmd", "cmd_name", "cmdline", "comm", "commit_creds", "connect", "create", "cred",
    "cwd", "delete_module", "dirfd", "dup", "dup2", "dup3", "egid", "euid", "exe", "exec", "exit",
    "exit_code", "family", "fchmod", "fchmodat", "fd", "file", "fileless", "filename",
    "finit_module", "flags", "flags_names", "fork", "fstype", "ftruncate", "gid", "inet", "inet6", "init_module",
    "kprobe", "ktime_ns", "labels", "len", "memfd", "mode", "module", "mount", "name", "namespace",
    "new_fd", "new_fd_kind", "new_path", "node", "null", "old_fd", "old_path", "op", "open",
    "openat", "openat2", "other", "parent_pid", "path", "pid", "pipe", "pod", "port", "ppid",
    "process", "ptrace", "rename", "renameat", "renameat2", "request", "request_name", "result",
    "rmdir", "service_account", "setgid", "setns", "setregid", "setresgid", "setresuid", "setreuid", "setuid",
    "size", "socket", "source", "stderr", "stdin", "stdio", "stdout", "target", "target_pid", "tid",
    "time", "tracepoint", "truncate", "truncated", "tty", "type", "uid", "umount", "unix",
    "unix_path", "unknown", "unlink", "unlinkat", "unshare", "via_execveat", "write",
];

/// The shared words, in an open-addressing table keyed by an FNV-1a hash: a lookup is one short
/// hash and usually one comparison, cheaper than the allocation it saves.
struct Words {
    slots: Vec<Option<(&'static str, Value)>>,
}

const WORD_SLOTS: usize = 512;

fn hash(s: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize & (WORD_SLOTS - 1)
}

fn words() -> &'static Words {
    static SHARED: OnceLock<Words> = OnceLock::new();
    SHARED.get_or_init(|| {
        let mut slots: Vec<Option<(&'static str, Value)>> = vec![None; WORD_SLOTS];
        for word in WORDS {
            let mut i = hash(word);
            loop {
                match &slots[i] {
                    None => {
                        slots[i] = Some((word, Value::String((*word).into())));
                        break;
                    }
                    Some((w, _)) if w == word => break,
                    Some(_) => i = (i + 1) & (WORD_SLOTS - 1),
                }
            }
        }
        Words { slots }
    })
}

/// A regorus string, shared when it is one of the common words.
fn string(s: &str) -> Value {
    if s.len() <= 16 {
        let slots = &words().slots;
        let mut i = hash(s);
        while let Some((word, value)) = &slots[i] {
            if *word == s {
                return value.clone();
            }
            i = (i + 1) & (WORD_SLOTS - 1);
        }
    }
    Value::String(s.into())
}

fn number(n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        Value::from(i)
    } else if let Some(u) = n.as_u64() {
        Value::from(u)
    } else {
        // Not integral: f64 is all serde_json keeps without arbitrary_precision.
        Value::from(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// Converts back, for printing what a rule produced.
pub fn to_json(value: &Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The event's `type`, which decides the rules it is evaluated against.
pub fn event_type(input: &serde_json::Value) -> Result<EventType, String> {
    let raw = input
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| "event has no string field \"type\"".to_string())?;
    raw.parse::<EventType>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_like_the_json_parser() {
        let json = serde_json::json!({
            "type": "open", "ktime_ns": 18446744073709551615u64, "neg": -100, "f": 1.5,
            "pod": null, "truncated": false,
            "process": {"cmdline": ["bash", "-i"], "ancestors": [{"pid": 1}]}
        });
        let direct = to_rego_value(&json);
        let parsed = Value::from_json_str(&json.to_string()).expect("parses");
        assert_eq!(direct, parsed);
        assert_eq!(to_json(&direct), json);
    }

    #[test]
    fn the_converter_reuses_nothing_that_changed() {
        let mut converter = InputConverter::default();
        let events = [
            serde_json::json!({"type": "open", "pod": {"namespace": "a", "labels": {"app": "x"}},
                "process": {"pid": 1, "stdio": {"stdin": "tty"}, "ancestors": [{"pid": 1, "comm": "sh"}]},
                "open": {"path": "/etc/shadow", "flags_names": ["O_RDONLY"]}}),
            serde_json::json!({"type": "open", "pod": {"namespace": "a", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "sh"}]}, "open": {"path": "/x"}}),
            serde_json::json!({"type": "exec", "pod": {"namespace": "b", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "bash"}]}, "exec": {"argv": ["a"]}}),
            serde_json::json!({"type": "exec", "pod": null, "process": {"pid": 2, "ancestors": []}}),
            serde_json::json!({"type": "exec", "pod": {"namespace": "b", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "bash"}]}}),
            serde_json::json!(["not", "an", "object"]),
        ];
        for event in events.iter().chain(events.iter()) {
            let converted = converter.convert(event);
            assert_eq!(converted, Value::from_json_str(&event.to_string()).expect("parses"));
            assert_eq!(to_json(&converted), *event);
        }
    }

    #[test]
    fn shared_words_are_found() {
        assert!(WORDS.iter().all(|w| w.len() <= 16));
        for word in WORDS {
            let Value::String(shared) = string(word) else { panic!("not a string") };
            assert_eq!(&*shared, *word);
            // The same allocation every time.
            let Value::String(again) = string(word) else { panic!("not a string") };
            assert!(regorus::Rc::ptr_eq(&shared, &again), "{word} is not shared");
        }
        assert_eq!(string("socket"), Value::from("socket"));
        assert_eq!(string("/etc/shadow"), Value::from("/etc/shadow"));
    }
}
