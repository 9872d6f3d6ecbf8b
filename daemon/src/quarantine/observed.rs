//! What the responder observes about quarantines beyond the records it enforces (issue 15):
//!
//! - **Dry run**: the quarantines a dry run held back. `palisade quarantine list` shows them
//!   as `dry-run`, and in Kubernetes mode each is a Quarantine object in phase `DryRun`, so an
//!   operator trying palisade out sees in one list what it would have cut off. In memory only
//!   (they enforce nothing, a restart may forget them), bounded by [`MAX_DRY_RUN_RECORDS`]:
//!   past it the oldest goes, counted.
//! - **Drops**: packets the datapath dropped because a pod is quarantined, per direction, as
//!   its rate-limited records report them (each record carries the drops it stood for). The
//!   count shows whether a quarantined pod still tries to talk. In memory, since this daemon
//!   started; cleared with the quarantine.

use std::collections::BTreeMap;

use serde::Serialize;

/// Dry-run records kept at most (a node with more would-be quarantines has a worse problem
/// than this list: the oldest go first, counted in `dry_run_evicted`).
pub const MAX_DRY_RUN_RECORDS: usize = 1024;

/// A quarantine that was not enforced because dry run is on (for the node or the rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRunRecord {
    /// `namespace/name`.
    pub pod: String,
    pub namespace: String,
    pub name: String,
    /// The first rule that would have quarantined it, and its alert.
    pub rule_id: String,
    pub alert_id: String,
    /// The rule's message.
    pub reason: String,
    /// Why it was not enforced (dry run for the node, or the rule set to alert only).
    pub why_not: String,
    /// RFC 3339: the first would-be quarantine.
    pub since: String,
    pub since_unix_ns: i128,
    /// How many rule hits would have quarantined it since.
    pub hits: u64,
}

/// The dry-run records by pod, bounded.
#[derive(Debug, Default)]
pub struct DryRunBook {
    records: BTreeMap<String, DryRunRecord>,
    evicted: u64,
}

impl DryRunBook {
    /// Notes a would-be quarantine: a new record, or one more hit on the pod's record.
    pub fn note(&mut self, record: DryRunRecord) {
        if let Some(existing) = self.records.get_mut(&record.pod) {
            existing.hits += 1;
            return;
        }
        if self.records.len() >= MAX_DRY_RUN_RECORDS {
            let oldest = self.records.values().min_by_key(|r| r.since_unix_ns).map(|r| r.pod.clone());
            if let Some(oldest) = oldest {
                self.records.remove(&oldest);
                self.evicted += 1;
            }
        }
        self.records.insert(record.pod.clone(), record);
    }

    /// An operator dismissed the record (released or deleted its object): gone until the next hit.
    pub fn dismiss(&mut self, pod: &str) -> Option<DryRunRecord> {
        self.records.remove(pod)
    }

    /// Keeps the records for which `keep` holds (pods that left; rules now enforced).
    pub fn retain(&mut self, mut keep: impl FnMut(&DryRunRecord) -> bool) {
        self.records.retain(|_, r| keep(r));
    }

    pub fn contains(&self, pod: &str) -> bool {
        self.records.contains_key(pod)
    }

    pub fn list(&self) -> Vec<DryRunRecord> {
        self.records.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records pushed out by the bound.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// Packets dropped because a pod is quarantined, as reported by the datapath.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QuarantineDrops {
    /// Sent by the pod.
    pub egress: u64,
    /// Sent to the pod.
    pub ingress: u64,
    /// Unix ns of the last report (0: none yet).
    #[serde(skip)]
    pub last_unix_ns: i128,
}

impl QuarantineDrops {
    pub fn add(&mut self, egress: bool, count: u64, at_unix_ns: i128) {
        if egress {
            self.egress = self.egress.saturating_add(count);
        } else {
            self.ingress = self.ingress.saturating_add(count);
        }
        self.last_unix_ns = self.last_unix_ns.max(at_unix_ns);
    }

    pub fn total(&self) -> u64 {
        self.egress.saturating_add(self.ingress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pod: &str, since: i128) -> DryRunRecord {
        let (namespace, name) = pod.split_once('/').expect("ns/name");
        DryRunRecord {
            pod: pod.into(),
            namespace: namespace.into(),
            name: name.into(),
            rule_id: "reverse_shell".into(),
            alert_id: format!("a-{since}"),
            reason: "shell".into(),
            why_not: "dry run".into(),
            since: String::new(),
            since_unix_ns: since,
            hits: 1,
        }
    }

    #[test]
    fn repeats_count_on_the_first_record_and_the_bound_evicts_the_oldest() {
        let mut book = DryRunBook::default();
        book.note(record("shop/web", 5));
        book.note(record("shop/web", 9));
        let web = &book.list()[0];
        assert_eq!((web.hits, web.alert_id.as_str()), (2, "a-5"), "the first hit's alert stays; later hits count");
        for i in 0..MAX_DRY_RUN_RECORDS {
            book.note(record(&format!("ns/p{i}"), 10 + i as i128));
        }
        assert_eq!(book.len(), MAX_DRY_RUN_RECORDS);
        assert_eq!(book.evicted(), 1);
        assert!(!book.contains("shop/web"), "the oldest record went first");
        assert!(book.dismiss("ns/p0").is_some());
        assert!(book.dismiss("ns/p0").is_none());
    }

    #[test]
    fn drops_add_per_direction_and_saturate() {
        let mut drops = QuarantineDrops::default();
        drops.add(true, 3, 10);
        drops.add(false, 2, 7);
        drops.add(true, u64::MAX, 12);
        assert_eq!((drops.egress, drops.ingress, drops.last_unix_ns), (u64::MAX, 2, 12));
        assert_eq!(drops.total(), u64::MAX);
    }
}
