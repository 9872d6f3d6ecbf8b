//! The typed context of one event, carried beside its JSON `input` through the rule engine to
//! the responder and the alert builder, so nobody downstream parses the JSON back to learn
//! which pod and process an event came from.

use std::sync::Arc;

use super::enrich::{EnrichedEvent, PodRef, ProcessDetails};
use super::input::Clock;
use crate::endpoints::{CgroupId, PodKey};

/// Who did it: the event's process as the kernel header and procfs enrichment described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessContext {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub details: Arc<ProcessDetails>,
}

/// Where an event came from: its cgroup (from the kernel header), its pod (from the endpoint
/// table, None outside any pod) and its process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventContext {
    /// When it happened: the kernel's time made wall-clock (ns since the epoch), as in the
    /// input's `time`.
    pub wall_ns: i128,
    pub cgroup_id: CgroupId,
    pub pod: Option<Arc<PodRef>>,
    pub process: ProcessContext,
}

impl EventContext {
    pub fn of(event: &EnrichedEvent, clock: &Clock) -> EventContext {
        let header = &event.event.header;
        EventContext {
            wall_ns: clock.wall_ns(header.ktime_ns),
            cgroup_id: CgroupId(header.cgroup_id),
            pod: event.pod.clone(),
            process: ProcessContext {
                pid: header.pid,
                comm: header.comm.clone(),
                uid: header.uid,
                details: event.process.clone(),
            },
        }
    }

    /// The pod's key, if the event came from a pod.
    pub fn pod_key(&self) -> Option<PodKey> {
        self.pod.as_ref().map(|pod| pod.key())
    }
}
