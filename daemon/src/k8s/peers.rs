//! Pods of other nodes as policy peers, kept slim (issue 18): each watch event is converted at
//! once into the few fields a peer needs (namespace, name, labels, service account, IPs, named
//! ports), and the Pod object is dropped. A reflector store would keep every Pod of the cluster
//! whole (~32 KiB of agent memory per pod, for ~7 KB of JSON) and the builder would convert every
//! one of them again on each change.
//!
//! Kept: pods scheduled on another node, not host-network (they have no addresses of their own),
//! not finished (Succeeded/Failed: their IPs may already belong to a new pod). Everything else is
//! not a peer of this node and is not kept; an update that makes a kept pod one of those removes
//! it. A relist (after `410 Gone`) builds a new map beside the current one and swaps it in whole
//! at its end, as kube's reflector does, so a pod deleted during an outage does not linger and a
//! half-done relist is never published.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::runtime::watcher::Event;

use super::convert;
use crate::inventory::EndpointSpec;

/// What the agent keeps of a pod on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    /// A peer-only endpoint (`peer_only`, no cgroup).
    pub endpoint: EndpointSpec,
    /// Parts of the pod left out of the endpoint, and why (reported by the source's health).
    pub notes: Vec<String>,
}

impl PeerRecord {
    /// The record `pod` becomes as a peer of `node`; `None` when it is none (on `node`,
    /// unscheduled, host-network or finished).
    pub fn from_pod(pod: &Pod, node: &str) -> Option<PeerRecord> {
        let view = convert::pod_view(pod)?;
        if view.host_network || view.node_name.as_deref().is_none_or(|n| n == node) {
            return None;
        }
        let mut endpoint = view.endpoint;
        endpoint.cgroup = None;
        endpoint.peer_only = true;
        Some(PeerRecord { endpoint, notes: view.notes })
    }
}

/// The peers of one node, keyed `namespace/name` (so iteration is sorted by key).
#[derive(Debug, Default)]
pub struct PeerStore {
    node: String,
    peers: BTreeMap<String, Arc<PeerRecord>>,
    /// While a (re)list is under way: what it has listed so far.
    listing: Option<BTreeMap<String, Arc<PeerRecord>>>,
}

impl PeerStore {
    pub fn new(node: impl Into<String>) -> PeerStore {
        PeerStore { node: node.into(), ..PeerStore::default() }
    }

    /// Applies one watch event; true when the published peers changed.
    pub fn apply(&mut self, event: &Event<Pod>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(pod) => {
                if let Some(record) = PeerRecord::from_pod(pod, &self.node) {
                    self.listing.get_or_insert_default().insert(key(pod), Arc::new(record));
                }
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = listed != self.peers;
                self.peers = listed;
                changed
            }
            Event::Apply(pod) => match PeerRecord::from_pod(pod, &self.node) {
                Some(record) => {
                    let record = Arc::new(record);
                    match self.peers.insert(key(pod), record.clone()) {
                        Some(previous) => previous != record,
                        None => true,
                    }
                }
                None => self.peers.remove(&key(pod)).is_some(),
            },
            Event::Delete(pod) => self.peers.remove(&key(pod)).is_some(),
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The peers, sorted by `namespace/name`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PeerRecord)> {
        self.peers.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: Option<&str>, app: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": {"app": app},
                          "annotations": {"big": "x".repeat(4096)}},
            "spec": {"nodeName": node, "serviceAccountName": "sa",
                     "containers": [{"name": "c", "image": "i", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .expect("pod json")
    }

    #[test]
    fn keeps_only_what_a_peer_needs_of_pods_on_other_nodes() {
        let mut store = PeerStore::new("here");
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(pod("a", Some("there"), "web", "10.0.0.1")));
        store.apply(&Event::InitApply(pod("local", Some("here"), "web", "10.0.0.2")));
        store.apply(&Event::InitApply(pod("pending", None, "web", "10.0.0.3")));
        assert!(store.is_empty(), "nothing is published before the list is complete");
        assert!(store.apply(&Event::InitDone));
        let peers: Vec<_> = store.iter().collect();
        assert_eq!(peers.len(), 1, "{peers:?}");
        let (key, record) = peers[0];
        assert_eq!(key, "shop/a");
        let ep = &record.endpoint;
        assert!(ep.peer_only && ep.cgroup.is_none());
        assert_eq!((ep.labels.get("app").map(String::as_str), ep.service_account.as_deref()), (Some("web"), Some("sa")));
        assert_eq!(ep.ips, ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(ep.ports.len(), 1);
    }

    #[test]
    fn updates_deletes_and_relists() {
        let mut store = PeerStore::new("here");
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(pod("a", Some("there"), "web", "10.0.0.1")));
        store.apply(&Event::InitApply(pod("b", Some("there"), "web", "10.0.0.2")));
        store.apply(&Event::InitDone);
        assert!(!store.apply(&Event::Apply(pod("a", Some("there"), "web", "10.0.0.1"))), "the same peer is no change");
        assert!(store.apply(&Event::Apply(pod("a", Some("there"), "api", "10.0.0.1"))), "a label change is one");
        assert_eq!(store.iter().next().map(|(_, r)| r.endpoint.labels["app"].clone()).as_deref(), Some("api"));
        // A pod that finishes is no peer any more.
        let mut done = pod("b", Some("there"), "web", "10.0.0.2");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(store.apply(&Event::Apply(done)));
        assert_eq!(store.len(), 1);
        assert!(store.apply(&Event::Delete(pod("a", Some("there"), "api", "10.0.0.1"))));
        assert!(store.is_empty());
        // A relist replaces everything at its end, and only then.
        store.apply(&Event::Apply(pod("gone", Some("there"), "web", "10.0.0.9")));
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(pod("c", Some("there"), "web", "10.0.0.3")));
        assert_eq!(store.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>(), ["shop/gone"]);
        assert!(store.apply(&Event::InitDone));
        assert_eq!(store.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>(), ["shop/c"]);
    }
}
