//! The rule engine's `input` for one event (and what `--record` writes, one per line), built
//! straight as regorus values from the typed event: no serde_json tree in between (issue 10: it
//! cost a protected event ~30 µs, and every event the same again in the conversion). Its schema
//! is documented in rules/README.md; a test keeps the two in step. [`to_input`] gives the same
//! object as serde_json for tools, tests and alerts.

use std::sync::Arc;

use regorus::Value;

use super::decode::EventData;
use super::enrich::{Ancestor, EnrichedEvent, PodRef};
use super::value::{ValueError, object, shared_string, to_value};

// The clocks live in crate::time; re-exported here, where the rule input's times are made.
pub use crate::time::{Clock, monotonic_now_ns};

/// RFC 3339 UTC with microseconds, e.g. `2026-11-29T12:00:00.123456Z` (`crate::time` outside
/// this module).
fn rfc3339(unix_ns: i128) -> String {
    crate::time::format_unix_ns(unix_ns)
}

fn data_value(data: &EventData) -> Result<Value, ValueError> {
    match data {
        EventData::Exec(d) => to_value(d),
        EventData::Fork(d) => to_value(d),
        EventData::Exit(d) => to_value(d),
        EventData::Connect(d) => to_value(d),
        EventData::Open(d) => to_value(d),
        EventData::Ptrace(d) => to_value(d),
        EventData::Cred(d) => to_value(d),
        EventData::Mount(d) => to_value(d),
        EventData::Namespace(d) => to_value(d),
        EventData::Module(d) => to_value(d),
        EventData::Bpf(d) => to_value(d),
        EventData::Memfd(d) => to_value(d),
        EventData::Chmod(d) => to_value(d),
        EventData::Unlink(d) => to_value(d),
        EventData::Rename(d) => to_value(d),
        EventData::Dup(d) => to_value(d),
    }
}

/// Builds each event's input, reusing what repeats from one event to the next (the node's
/// name, the pod while it is the same `Arc`, the ancestry while it is equal): consecutive events
/// mostly come from the same pod and process tree. Keep one per thread that builds inputs.
/// The result is always equal to a fresh build.
#[derive(Debug)]
pub struct InputBuilder {
    node: Value,
    /// The pod's value, for the `Arc` it was made from (held, so the address cannot be reused).
    pod: Option<(Arc<PodRef>, Value)>,
    ancestors: Option<(Vec<Ancestor>, Value)>,
}

impl InputBuilder {
    pub fn new(node: &str) -> InputBuilder {
        InputBuilder { node: Value::String(node.into()), pod: None, ancestors: None }
    }

    /// The rule engine's `input` for one event.
    pub fn build(&mut self, ev: &EnrichedEvent, clock: &Clock) -> Value {
        let h = &ev.event.header;
        let kind = h.kind.as_str();
        let p = &ev.process;
        let number = |n: u64| Value::from(n);
        let text = |s: &Option<String>| s.as_deref().map_or(Value::Null, shared_string);
        // The event's own types hold only strings, numbers, bools and vectors: serialization
        // cannot fail (ValueError is for map keys that are not strings).
        let ancestors = match &self.ancestors {
            Some((previous, value)) if *previous == p.ancestors => value.clone(),
            _ => {
                let value = to_value(&p.ancestors).unwrap_or(Value::Null);
                self.ancestors = Some((p.ancestors.clone(), value.clone()));
                value
            }
        };
        let process = object([
            (shared_string("pid"), number(h.pid.into())),
            (shared_string("tid"), number(h.tid.into())),
            (shared_string("ppid"), number(h.ppid.into())),
            (shared_string("start_ns"), number(h.start_ns)),
            (shared_string("uid"), number(h.uid.into())),
            (shared_string("gid"), number(h.gid.into())),
            (shared_string("euid"), number(h.euid.into())),
            (shared_string("egid"), number(h.egid.into())),
            (shared_string("comm"), shared_string(&h.comm)),
            (shared_string("exe"), text(&p.exe)),
            (shared_string("exe_resolved"), Value::Bool(p.exe_resolved)),
            (shared_string("cmdline"), to_value(&p.cmdline).unwrap_or(Value::Null)),
            (shared_string("cmdline_truncated"), Value::Bool(p.cmdline_truncated)),
            (shared_string("cwd"), text(&p.cwd)),
            (shared_string("stdio"), to_value(&p.stdio).unwrap_or(Value::Null)),
            (shared_string("ancestors"), ancestors),
        ]);
        let pod = match (&ev.pod, &self.pod) {
            (None, _) => Value::Null,
            (Some(pod), Some((previous, value))) if Arc::ptr_eq(pod, previous) => value.clone(),
            (Some(pod), _) => {
                let value = to_value(&**pod).unwrap_or(Value::Null);
                self.pod = Some((pod.clone(), value.clone()));
                value
            }
        };
        object([
            (shared_string("type"), shared_string(kind)),
            (shared_string("time"), Value::String(rfc3339(clock.wall_ns(h.ktime_ns)).into())),
            (shared_string("ktime_ns"), number(h.ktime_ns)),
            (shared_string("source"), shared_string(h.source)),
            (shared_string("node"), self.node.clone()),
            (shared_string("cgroup_id"), number(h.cgroup_id)),
            (shared_string("truncated"), Value::Bool(h.truncated)),
            (shared_string("pod"), pod),
            (shared_string("process"), process),
            (shared_string(kind), data_value(&ev.event.data).unwrap_or(Value::Null)),
        ])
    }
}

/// The rule engine's `input` for one event as JSON (what `--record` writes; tools and tests).
pub fn to_input(ev: &EnrichedEvent, clock: &Clock, node: &str) -> serde_json::Value {
    serde_json::to_value(InputBuilder::new(node).build(ev, clock)).unwrap_or(serde_json::Value::Null)
}

/// The same input built the way it was before the direct builder: a serde_json tree from the
/// typed event. Kept as the reference the builder is checked against on real kernel events of
/// every kind (tests/events_schema.rs) and as the benchmarks' "before"; the daemon never calls it.
pub fn to_input_tree(ev: &EnrichedEvent, clock: &Clock, node: &str) -> serde_json::Value {
    use serde_json::{Map, json};
    let h = &ev.event.header;
    let kind = h.kind.as_str();
    let p = &ev.process;
    let process = json!({
        "pid": h.pid, "tid": h.tid, "ppid": h.ppid, "start_ns": h.start_ns,
        "uid": h.uid, "gid": h.gid, "euid": h.euid, "egid": h.egid,
        "comm": h.comm,
        "exe": p.exe, "exe_resolved": p.exe_resolved, "cmdline": p.cmdline, "cmdline_truncated": p.cmdline_truncated, "cwd": p.cwd,
        "stdio": p.stdio, "ancestors": p.ancestors,
    });
    let data = match &ev.event.data {
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
    let mut obj = Map::with_capacity(12);
    obj.insert("type".into(), kind.into());
    obj.insert("time".into(), rfc3339(clock.wall_ns(h.ktime_ns)).into());
    obj.insert("ktime_ns".into(), h.ktime_ns.into());
    obj.insert("source".into(), h.source.into());
    obj.insert("node".into(), node.into());
    obj.insert("cgroup_id".into(), h.cgroup_id.into());
    obj.insert("truncated".into(), h.truncated.into());
    obj.insert("pod".into(), serde_json::to_value(ev.pod.as_deref()).unwrap_or_default());
    obj.insert("process".into(), process);
    obj.insert(kind.into(), data.unwrap_or_default());
    serde_json::Value::Object(obj)
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

    use crate::events::decode::{DupData, Event, ExecData, Header, OpenData};
    use crate::events::enrich::{ProcessDetails, Stdio};
    use crate::events::kind::EventKind;

    fn event(kind: EventKind, pid: u32, data: EventData, pod: Option<&Arc<PodRef>>, ancestors: &[(u32, &str)]) -> EnrichedEvent {
        let header = Header {
            ktime_ns: 1_000 + u64::from(pid),
            cgroup_id: 77,
            kind,
            source: "tracepoint",
            pid,
            tid: pid,
            ppid: 1,
            uid: 0,
            gid: 0,
            euid: 0,
            egid: 0,
            comm: "sh".into(),
            truncated: false,
            start_ns: 5,
        };
        let process = ProcessDetails {
            exe: Some("/usr/bin/dash".into()),
            exe_resolved: true,
            cmdline: vec!["sh".into(), "-c".into(), "x".into()],
            cmdline_truncated: false,
            cwd: None,
            stdio: Stdio { stdin: "socket", stdout: "pipe", stderr: "unknown" },
            ancestors: ancestors.iter().map(|&(pid, comm)| Ancestor { pid, comm: comm.into(), exe: None }).collect(),
        };
        EnrichedEvent { event: Event { header, data }, pod: pod.cloned(), process: Arc::new(process) }
    }

    /// A builder kept across events (reusing the pod and the ancestry) gives exactly what the
    /// serde_json tree gave, also when the pod or the ancestry changes from one event to the next.
    #[test]
    fn the_builder_equals_the_json_tree_and_reuses_nothing_that_changed() {
        let pod = |name: &str| {
            Arc::new(PodRef {
                namespace: "shop".into(),
                name: name.into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                service_account: Some("default".into()),
            })
        };
        let (a, b) = (pod("a"), pod("b"));
        let dup = || EventData::Dup(DupData { op: "dup2", old_fd: 3, new_fd: 2, flags: 0, result: 2, new_fd_kind: "socket" });
        let open = || EventData::Open(OpenData::read_only("/etc/shadow", "../etc/shadow", -13));
        let exec = || {
            EventData::Exec(ExecData {
                filename: "/bin/sh".into(),
                argv: vec!["sh".into()],
                argc: 1,
                argv_truncated: false,
                via_execveat: false,
                dirfd: -100,
                at_flags: 0,
                fileless: false,
                exe: None,
                exe_resolved: false,
                stdio: Stdio::default(),
            })
        };
        let events = [
            event(EventKind::Dup, 10, dup(), Some(&a), &[(1, "init")]),
            event(EventKind::Open, 10, open(), Some(&a), &[(1, "init")]),
            event(EventKind::Open, 11, open(), Some(&a), &[(10, "sh"), (1, "init")]),
            event(EventKind::Exec, 11, exec(), Some(&b), &[(10, "sh"), (1, "init")]),
            event(EventKind::Exec, 12, exec(), None, &[]),
            event(EventKind::Dup, 12, dup(), Some(&b), &[]),
        ];
        let clock = Clock::new();
        let mut builder = InputBuilder::new("node-1");
        for ev in events.iter().chain(events.iter()) {
            let tree = to_input_tree(ev, &clock, "node-1");
            let built = builder.build(ev, &clock);
            assert_eq!(built, Value::from_json_str(&tree.to_string()).expect("parses"), "{tree}");
            assert_eq!(serde_json::to_value(&built).expect("json"), tree);
            assert_eq!(to_input(ev, &clock, "node-1"), tree);
        }
    }
}
