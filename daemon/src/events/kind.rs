//! Event kinds: the wire carries a `u32`; this is its checked user-side form, and the event
//! types rules subscribe to (`input.type`; the rule engine calls it `EventType`).
use std::fmt;
use std::str::FromStr;

use palisade_common as wire;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
            // KIND_POLICY_VERDICT records come from the datapath's own ring buffer and are
            // decoded there (segmentation::datapath::decode_verdict): not an event kind here.
            other => return Err(UnknownKind(other)),
        })
    }
}

impl EventKind {
    /// Every kind the probes produce (what rules may subscribe to), in the order the rule
    /// engine numbers its per-type entry points (`index`).
    pub const ALL: [EventKind; 16] = [
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
        }
    }

    /// Position in `ALL`, used to index per-type tables.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        Self::ALL.iter().copied().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}")]
pub struct UnknownEventType(pub String);

impl FromStr for EventKind {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s).ok_or_else(|| UnknownEventType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_kind_round_trips_and_names_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        for raw in 1..wire::KIND_COUNT {
            if raw == wire::KIND_POLICY_VERDICT {
                assert_eq!(EventKind::try_from(raw), Err(UnknownKind(raw)), "datapath records are not probe events");
                continue;
            }
            let kind = EventKind::try_from(raw).expect("every probe id below KIND_COUNT is known");
            assert!(names.insert(kind.as_str()));
        }
        assert_eq!(names.len(), EventKind::ALL.len());
        assert_eq!(EventKind::try_from(0), Err(UnknownKind(0)));
        assert_eq!(EventKind::try_from(wire::KIND_COUNT), Err(UnknownKind(wire::KIND_COUNT)));
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(kind));
        }
        assert!("policy_verdict".parse::<EventKind>().is_err());
    }
}
