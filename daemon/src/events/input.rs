//! The JSON object the rule engine receives as `input` (and `--record` writes, one per line).
//! Its schema is documented in rules/README.md; a test keeps the two in step.

use serde_json::{Map, Value, json};

use super::decode::EventData;
use super::enrich::EnrichedEvent;

// The clocks live in crate::time; re-exported here, where the rule input's times are made.
pub use crate::time::{Clock, monotonic_now_ns};

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T12:00:00.123456Z` (`crate::time` outside
/// this module).
fn rfc3339(unix_ns: i128) -> String {
    crate::time::format_unix_ns(unix_ns)
}

fn data_value(data: &EventData) -> Value {
    let value = match data {
        EventData::Exec(d) => serde_json::to_value(d),
        EventData::Fork(d) => serde_json::to_value(d),
        EventData::Exit(d) => serde_json::to_value(d),
        EventData::Connect(d) => serde_json::to_value(d),
        EventData::Open(d) => serde_json::to_value(d),
        EventData::Ptrace(d) => serde_json::to_value(d),
        EventData::Cred(d) => serde_json::to_value(d),
        EventData::Mount(d) => serde_json::to_value(d),
        EventData::Namespace(d) => serde_json::to_value(d),
        EventData::Module(d) => serde_json::to_value(d),
        EventData::Bpf(d) => serde_json::to_value(d),
        EventData::Memfd(d) => serde_json::to_value(d),
        EventData::Chmod(d) => serde_json::to_value(d),
        EventData::Unlink(d) => serde_json::to_value(d),
        EventData::Rename(d) => serde_json::to_value(d),
        EventData::Dup(d) => serde_json::to_value(d),
    };
    // These types hold only strings, numbers, bools and vectors: serialization cannot fail.
    value.unwrap_or(Value::Null)
}

/// Builds the rule engine's `input` for one event.
pub fn to_input(ev: &EnrichedEvent, clock: &Clock, node: &str) -> Value {
    let h = &ev.event.header;
    let kind = h.kind.as_str();
    let p = &ev.process;
    let process = json!({
        "pid": h.pid, "tid": h.tid, "ppid": h.ppid, "start_ns": h.start_ns,
        "uid": h.uid, "gid": h.gid, "euid": h.euid, "egid": h.egid,
        "comm": h.comm,
        "exe": p.exe, "exe_resolved": p.exe_resolved, "cmdline": p.cmdline, "cwd": p.cwd,
        "stdio": p.stdio, "ancestors": p.ancestors,
    });
    let mut obj = Map::with_capacity(12);
    obj.insert("type".into(), Value::from(kind));
    obj.insert("time".into(), Value::from(rfc3339(clock.wall_ns(h.ktime_ns))));
    obj.insert("ktime_ns".into(), Value::from(h.ktime_ns));
    obj.insert("source".into(), Value::from(h.source));
    obj.insert("node".into(), Value::from(node));
    obj.insert("cgroup_id".into(), Value::from(h.cgroup_id));
    obj.insert("truncated".into(), Value::from(h.truncated));
    obj.insert("pod".into(), serde_json::to_value(ev.pod.as_deref()).unwrap_or(Value::Null));
    obj.insert("process".into(), process);
    obj.insert(kind.into(), data_value(&ev.event.data));
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(rfc3339(1_795_953_600_123_456_789), "2026-11-29T12:00:00.123456Z");
    }
}
