//! Event kinds: the wire carries a `u32`; this is its checked user-side form.
use palisade_common as wire;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Exec,
    Fork,
    Exit,
    Connect,
    Open,
    Ptrace,
    Cred,
    Mount,
    Namespace,
    Module,
    Bpf,
    Memfd,
    Chmod,
    Unlink,
    Rename,
    Dup,
    PolicyVerdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown event kind {0}")]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownKind;
    fn try_from(raw: u32) -> Result<Self, Self::Error> {
        Ok(match raw {
            wire::KIND_EXEC => EventKind::Exec,
            wire::KIND_FORK => EventKind::Fork,
            wire::KIND_EXIT => EventKind::Exit,
            wire::KIND_CONNECT => EventKind::Connect,
            wire::KIND_OPEN => EventKind::Open,
            wire::KIND_PTRACE => EventKind::Ptrace,
            wire::KIND_CRED => EventKind::Cred,
            wire::KIND_MOUNT => EventKind::Mount,
            wire::KIND_NAMESPACE => EventKind::Namespace,
            wire::KIND_MODULE => EventKind::Module,
            wire::KIND_BPF => EventKind::Bpf,
            wire::KIND_MEMFD => EventKind::Memfd,
            wire::KIND_CHMOD => EventKind::Chmod,
            wire::KIND_UNLINK => EventKind::Unlink,
            wire::KIND_RENAME => EventKind::Rename,
            wire::KIND_DUP => EventKind::Dup,
            wire::KIND_POLICY_VERDICT => EventKind::PolicyVerdict,
            other => return Err(UnknownKind(other)),
        })
    }
}

impl EventKind {
    /// Every kind the process/syscall probes produce (what rules may subscribe to).
    pub const PROBE_KINDS: [EventKind; 16] = [
        EventKind::Exec, EventKind::Fork, EventKind::Exit, EventKind::Connect, EventKind::Open,
        EventKind::Ptrace, EventKind::Cred, EventKind::Mount, EventKind::Namespace,
        EventKind::Module, EventKind::Bpf, EventKind::Memfd, EventKind::Chmod, EventKind::Unlink,
        EventKind::Rename, EventKind::Dup,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Exec => "exec",
            EventKind::Fork => "fork",
            EventKind::Exit => "exit",
            EventKind::Connect => "connect",
            EventKind::Open => "open",
            EventKind::Ptrace => "ptrace",
            EventKind::Cred => "cred",
            EventKind::Mount => "mount",
            EventKind::Namespace => "namespace",
            EventKind::Module => "module",
            EventKind::Bpf => "bpf",
            EventKind::Memfd => "memfd",
            EventKind::Chmod => "chmod",
            EventKind::Unlink => "unlink",
            EventKind::Rename => "rename",
            EventKind::Dup => "dup",
            EventKind::PolicyVerdict => "policy_verdict",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::PROBE_KINDS.iter().copied().find(|k| k.as_str() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_kind_round_trips_and_names_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        for raw in 1..wire::KIND_COUNT {
            let kind = EventKind::try_from(raw).expect("all ids below KIND_COUNT are known");
            assert!(names.insert(kind.as_str()));
        }
        assert_eq!(EventKind::try_from(0), Err(UnknownKind(0)));
        assert_eq!(EventKind::try_from(wire::KIND_COUNT), Err(UnknownKind(wire::KIND_COUNT)));
        for kind in EventKind::PROBE_KINDS {
            assert_eq!(EventKind::from_name(kind.as_str()), Some(kind));
        }
    }
}
