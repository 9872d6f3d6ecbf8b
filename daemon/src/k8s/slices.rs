//! `PeerSlice` records (`palisade.io/v1alpha1`, docs/peer-records.md): the pods of the cluster
//! as compact, batched peer records, written by `palisade operator`, read by agents started
//! with `--peers slices` instead of watching every Pod of the cluster (issue 18).
//!
//! A slice holds at most [`MAX_PEERS`] pods of its namespace: each names its pod, its addresses
//! and an identity of the slice (labels, service account, named ports), each label set listed
//! once per slice. The agent applies a slice as a whole: a slice that fails validation (an
//! address that is none, a pod listed twice, an identity that does not exist, a bound crossed)
//! is refused with the field named, and the slice's previous content stays (never wider than the
//! last good state: the refused content is not used, the last good one allowed no more than
//! before). A slice that goes removes its peers, which narrows what policies allow.
//!
//! The API server validates slices against the CRD's schema (`deploy/operator/crd.yaml`); this
//! module validates again (the agent trusts nothing it reads) and reads the body leniently
//! (`identities` and `peers` as JSON values), so one malformed object is one refused slice and
//! never an error of the whole watch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::peers::PeerRecord;
use crate::inventory::{EndpointSpec, Labels, NamedPort, Protocol};

pub const GROUP: &str = "palisade.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "PeerSlice";
pub const PLURAL: &str = "peerslices";

/// Pods per slice, identities per slice (ids are 1..=64), labels per identity, named ports per
/// identity: the CRD's bounds.
pub const MAX_PEERS: usize = 64;
pub const MAX_IDENTITIES: usize = 64;
pub const MAX_LABELS: usize = 64;
pub const MAX_NAMED_PORTS: usize = 64;
/// A pod has at most one address per family.
pub const MAX_IPS: usize = 2;
/// Longest pod or service-account name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// A `palisade.io/v1alpha1` PeerSlice as read from the API (body unchecked: see [`Self::records`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerSlice {
    #[serde(rename = "apiVersion", default = "api_version")]
    pub api_version: String,
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub identities: Value,
    #[serde(default)]
    pub peers: Value,
}

fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

fn kind() -> String {
    KIND.to_string()
}

super::namespaced_resource!(PeerSlice);

/// One identity of a slice: a label set with its service account and named ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SliceIdentity {
    id: u64,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    named_ports: Vec<String>,
}

/// One pod of a slice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlicePeer {
    pod: String,
    identity: u64,
    ips: Vec<String>,
}

/// Why a slice was refused: the slice, the field, what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("peerslice {slice}: {field}: {reason}")]
pub struct SliceError {
    pub slice: String,
    pub field: String,
    pub reason: String,
}

impl PeerSlice {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace.as_deref().unwrap_or(""), self.metadata.name.as_deref().unwrap_or(""))
    }

    /// The slice's pods as peer records keyed `namespace/name`, or why the slice is refused
    /// (the first problem found, its field named).
    pub fn records(&self) -> Result<Vec<(String, PeerRecord)>, SliceError> {
        let slice = self.key();
        let fail = |field: String, reason: String| SliceError { slice: slice.clone(), field, reason };
        let namespace = match self.metadata.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => return Err(fail("metadata.namespace".into(), "missing".into())),
        };
        let identities = bounded_array(&self.identities, MAX_IDENTITIES).map_err(|r| fail("identities".into(), r))?;
        let mut by_id: BTreeMap<u64, SliceIdentity> = BTreeMap::new();
        for (i, item) in identities.iter().enumerate() {
            let identity: SliceIdentity =
                serde_json::from_value(item.clone()).map_err(|e| fail(format!("identities[{i}]"), e.to_string()))?;
            let field = |name: &str| format!("identities[{i}].{name}");
            if !(1..=MAX_IDENTITIES as u64).contains(&identity.id) {
                return Err(fail(field("id"), format!("{} is not in 1..={MAX_IDENTITIES}", identity.id)));
            }
            if identity.labels.len() > MAX_LABELS {
                return Err(fail(field("labels"), format!("{} labels, at most {MAX_LABELS}", identity.labels.len())));
            }
            if identity.service_account.as_ref().is_some_and(|sa| sa.is_empty() || sa.len() > MAX_NAME) {
                return Err(fail(field("serviceAccount"), format!("empty or longer than {MAX_NAME}")));
            }
            if identity.named_ports.len() > MAX_NAMED_PORTS {
                return Err(fail(field("namedPorts"), format!("{} ports, at most {MAX_NAMED_PORTS}", identity.named_ports.len())));
            }
            for (j, port) in identity.named_ports.iter().enumerate() {
                named_port(port).map_err(|r| fail(format!("identities[{i}].namedPorts[{j}]"), r))?;
            }
            let id = identity.id;
            if by_id.insert(id, identity).is_some() {
                return Err(fail(field("id"), format!("{id} listed twice")));
            }
        }
        let peers = bounded_array(&self.peers, MAX_PEERS).map_err(|r| fail("peers".into(), r))?;
        let mut pods = BTreeSet::new();
        let mut records = Vec::with_capacity(peers.len());
        for (i, item) in peers.iter().enumerate() {
            let peer: SlicePeer = serde_json::from_value(item.clone()).map_err(|e| fail(format!("peers[{i}]"), e.to_string()))?;
            let field = |name: &str| format!("peers[{i}].{name}");
            if peer.pod.is_empty() || peer.pod.len() > MAX_NAME || peer.pod.contains('/') {
                return Err(fail(field("pod"), format!("{:?} is not a pod name", truncated(&peer.pod))));
            }
            if !pods.insert(peer.pod.clone()) {
                return Err(fail(field("pod"), format!("{} listed twice", peer.pod)));
            }
            let Some(identity) = by_id.get(&peer.identity) else {
                return Err(fail(field("identity"), format!("{} is not an id in identities", peer.identity)));
            };
            if peer.ips.is_empty() || peer.ips.len() > MAX_IPS {
                return Err(fail(field("ips"), format!("{} addresses, 1 to {MAX_IPS}", peer.ips.len())));
            }
            let mut ips: Vec<IpAddr> = Vec::with_capacity(peer.ips.len());
            for (j, ip) in peer.ips.iter().enumerate() {
                let parsed: IpAddr =
                    ip.parse().map_err(|_| fail(format!("peers[{i}].ips[{j}]"), format!("{:?} is not an IP address", truncated(ip))))?;
                if ips.contains(&parsed) {
                    return Err(fail(format!("peers[{i}].ips[{j}]"), format!("{parsed} listed twice")));
                }
                ips.push(parsed);
            }
            let ports = identity.named_ports.iter().filter_map(|p| named_port(p).ok()).collect();
            let endpoint = EndpointSpec {
                namespace: namespace.to_string(),
                name: peer.pod.clone(),
                labels: identity.labels.clone(),
                service_account: identity.service_account.clone(),
                ips,
                ports,
                cgroup: None,
                peer_only: true,
            };
            records.push((format!("{namespace}/{}", peer.pod), PeerRecord { endpoint, notes: Vec::new() }));
        }
        Ok(records)
    }
}

fn bounded_array(value: &Value, max: usize) -> Result<&[Value], String> {
    match value {
        Value::Null => Ok(&[]),
        Value::Array(items) if items.len() <= max => Ok(items),
        Value::Array(items) => Err(format!("{} items, at most {max}", items.len())),
        _ => Err("not a list".to_string()),
    }
}

fn truncated(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// `name=port/PROTOCOL` (the CRD's pattern).
pub(super) fn named_port(text: &str) -> Result<NamedPort, String> {
    let bad = || format!("{:?} is not name=port/TCP|UDP|SCTP", truncated(text));
    let (name, rest) = text.split_once('=').ok_or_else(bad)?;
    let (port, protocol) = rest.split_once('/').ok_or_else(bad)?;
    let name_ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let protocol = match protocol {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => return Err(bad()),
    };
    if !name_ok {
        return Err(bad());
    }
    Ok(NamedPort { name: Some(name.to_string()), port, protocol })
}

/// One slice as the agent holds it: its last good content and, when its current version was
/// refused, why.
#[derive(Debug, Clone, Default, PartialEq)]
struct Held {
    records: Arc<Vec<(String, Arc<PeerRecord>)>>,
    refused: Option<String>,
}

/// Every PeerSlice of the cluster, validated (the agent's peers in `--peers slices` mode).
#[derive(Debug, Default)]
pub struct SliceStore {
    slices: BTreeMap<String, Held>,
    /// While a (re)list is under way: what it has listed so far.
    listing: Option<BTreeMap<String, Held>>,
    /// Peers held (over all slices), kept current.
    peers: usize,
    /// RFC 3339: the last slice event that changed what is held.
    last_update: Option<String>,
}

impl SliceStore {
    pub fn new() -> SliceStore {
        SliceStore::default()
    }

    /// `slice` validated into what `previous` becomes: its records, or the previous records
    /// with the reason the new version is refused.
    fn held(slice: &PeerSlice, previous: Option<&Held>) -> Held {
        match slice.records() {
            Ok(records) => Held {
                records: Arc::new(records.into_iter().map(|(key, record)| (key, Arc::new(record))).collect()),
                refused: None,
            },
            Err(error) => {
                tracing::warn!(%error, "PeerSlice refused; its previous content stays");
                Held { records: previous.map(|p| p.records.clone()).unwrap_or_default(), refused: Some(error.to_string()) }
            }
        }
    }

    /// Applies one watch event; true when the peers or the refusals changed.
    pub fn apply(&mut self, event: &Event<PeerSlice>) -> bool {
        let changed = match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(slice) => {
                let key = slice.key();
                let held = Self::held(slice, self.slices.get(&key));
                self.listing.get_or_insert_default().insert(key, held);
                false
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = listed != self.slices;
                self.slices = listed;
                changed
            }
            Event::Apply(slice) => {
                let key = slice.key();
                let held = Self::held(slice, self.slices.get(&key));
                match self.slices.insert(key, held.clone()) {
                    Some(previous) => previous != held,
                    None => true,
                }
            }
            Event::Delete(slice) => self.slices.remove(&slice.key()).is_some(),
        };
        if changed {
            self.peers = self.slices.values().map(|h| h.records.len()).sum();
            self.last_update = Some(crate::time::format_unix_ns(super::source::now_ns()));
        }
        changed
    }

    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    /// Peers held over all slices (a pod listed in two slices counts twice).
    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn last_update(&self) -> Option<&str> {
        self.last_update.as_deref()
    }

    /// Slices whose current version is refused, and why (their previous content stays).
    pub fn refused(&self) -> impl Iterator<Item = &str> {
        self.slices.values().filter_map(|h| h.refused.as_deref())
    }

    /// Every peer held, by `namespace/name`, each once: a pod in two slices (an operator
    /// moving it, or two operators) is taken from the first slice by name, and reported.
    pub fn records(&self) -> (BTreeMap<&str, &PeerRecord>, Vec<String>) {
        let mut records: BTreeMap<&str, &PeerRecord> = BTreeMap::new();
        let mut notes = Vec::new();
        for (slice, held) in &self.slices {
            for (key, record) in held.records.iter() {
                match records.entry(key.as_str()) {
                    std::collections::btree_map::Entry::Vacant(entry) => {
                        entry.insert(record.as_ref());
                    }
                    std::collections::btree_map::Entry::Occupied(_) => {
                        notes.push(format!("peer pod {key}: also in peerslice {slice}; the first slice's entry kept"))
                    }
                }
            }
        }
        (records, notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, body: Value) -> PeerSlice {
        let mut object = json!({"apiVersion": "palisade.io/v1alpha1", "kind": "PeerSlice",
                                "metadata": {"namespace": "shop", "name": name}});
        if let (Some(object), Some(body)) = (object.as_object_mut(), body.as_object()) {
            object.extend(body.clone());
        }
        serde_json::from_value(object).expect("slice json")
    }

    fn good(name: &str, app: &str) -> PeerSlice {
        slice(
            name,
            json!({"identities": [{"id": 1, "labels": {"app": app}, "serviceAccount": "sa", "namedPorts": ["http=8080/TCP"]}],
                   "peers": [{"pod": "a", "identity": 1, "ips": ["10.0.0.1", "fd00::1"]},
                             {"pod": "b", "identity": 1, "ips": ["10.0.0.2"]}]}),
        )
    }

    #[test]
    fn a_slice_becomes_peer_records_with_its_identities() {
        let records = good("s1", "web").records().expect("valid");
        assert_eq!(records.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["shop/a", "shop/b"]);
        let ep = &records[0].1.endpoint;
        assert!(ep.peer_only && ep.cgroup.is_none());
        assert_eq!((ep.namespace.as_str(), ep.name.as_str(), ep.labels["app"].as_str()), ("shop", "a", "web"));
        assert_eq!(ep.service_account.as_deref(), Some("sa"));
        assert_eq!(ep.ips.len(), 2);
        assert_eq!(ep.ports, [NamedPort { name: Some("http".into()), port: 8080, protocol: Protocol::Tcp }]);
    }

    #[test]
    fn hostile_slices_are_refused_naming_the_field() {
        let many_peers: Vec<Value> =
            (0..65).map(|i| json!({"pod": format!("p{i}"), "identity": 1, "ips": [format!("10.1.0.{i}")]})).collect();
        let cases = [
            (json!({"identities": [{"id": 1}], "peers": [{"pod": "a", "identity": 2, "ips": ["10.0.0.1"]}]}), "peers[0].identity"),
            (json!({"identities": [{"id": 1}], "peers": [{"pod": "a", "identity": 1, "ips": ["10.0.0.300"]}]}), "peers[0].ips[0]"),
            (json!({"identities": [{"id": 1}], "peers": [{"pod": "a", "identity": 1, "ips": []}]}), "peers[0].ips"),
            (
                json!({"identities": [{"id": 1}], "peers": [{"pod": "a", "identity": 1, "ips": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}]}),
                "peers[0].ips",
            ),
            (
                json!({"identities": [{"id": 1}], "peers": [{"pod": "a", "identity": 1, "ips": ["10.0.0.1"]},
                                                            {"pod": "a", "identity": 1, "ips": ["10.0.0.2"]}]}),
                "peers[1].pod",
            ),
            (json!({"identities": [{"id": 1}, {"id": 1}], "peers": []}), "identities[1].id"),
            (json!({"identities": [{"id": 0}], "peers": []}), "identities[0].id"),
            (json!({"identities": [{"id": 1, "namedPorts": ["http=0/TCP"]}], "peers": []}), "identities[0].namedPorts[0]"),
            (json!({"identities": [{"id": "1"}], "peers": []}), "identities[0]"),
            (json!({"identities": [{"id": 1, "extra": true}], "peers": []}), "identities[0]"),
            (json!({"identities": [{"id": 1}], "peers": {"pod": "a"}}), "peers"),
            (json!({"identities": [{"id": 1}], "peers": many_peers}), "peers"),
            (json!({"identities": [{"id": 1}], "peers": [{"pod": "x/y", "identity": 1, "ips": ["10.0.0.1"]}]}), "peers[0].pod"),
        ];
        for (body, field) in cases {
            let error = slice("bad", body.clone()).records().expect_err(&format!("{body} must be refused"));
            assert_eq!(error.field, field, "{body}: {error}");
            assert!(error.to_string().starts_with(&format!("peerslice shop/bad: {field}: ")), "{error}");
        }
    }

    #[test]
    fn a_refused_version_keeps_the_slice_s_last_good_content() {
        let mut store = SliceStore::new();
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(good("s1", "web")));
        assert!(store.apply(&Event::InitDone));
        assert_eq!(store.peers(), 2);
        let bad = slice("s1", json!({"identities": [], "peers": [{"pod": "a", "identity": 1, "ips": ["10.0.0.1"]}]}));
        assert!(store.apply(&Event::Apply(bad)), "a refusal is a change (it is reported)");
        let (records, _) = store.records();
        assert_eq!(records.len(), 2, "the last good content stays");
        assert_eq!(records["shop/a"].endpoint.labels["app"], "web");
        assert_eq!(store.refused().collect::<Vec<_>>(), ["peerslice shop/s1: peers[0].identity: 1 is not an id in identities"]);
        // A refused new slice holds nothing.
        store.apply(&Event::Apply(slice("s2", json!({"identities": [{"id": 1}], "peers": "x"}))));
        assert_eq!(store.records().0.len(), 2);
        // A good version clears the refusal; a deletion removes the peers.
        assert!(store.apply(&Event::Apply(good("s1", "api"))));
        assert_eq!(store.refused().count(), 1, "s2 is still refused");
        assert_eq!(store.records().0["shop/a"].endpoint.labels["app"], "api");
        assert!(!store.apply(&Event::Apply(good("s1", "api"))), "the same content is no change");
        assert!(store.apply(&Event::Delete(good("s1", "api"))));
        assert!(store.records().0.is_empty());
    }

    #[test]
    fn a_pod_in_two_slices_is_taken_once_from_the_first() {
        let mut store = SliceStore::new();
        store.apply(&Event::Apply(good("s2", "second")));
        store.apply(&Event::Apply(good("s1", "first")));
        let (records, notes) = store.records();
        assert_eq!(records.len(), 2);
        assert_eq!(records["shop/a"].endpoint.labels["app"], "first");
        assert_eq!(notes.len(), 2, "{notes:?}");
        // A relist swaps everything in at its end.
        store.apply(&Event::Init);
        store.apply(&Event::InitApply(good("s3", "third")));
        assert_eq!(store.slices(), 2);
        assert!(store.apply(&Event::InitDone));
        assert_eq!(store.slices(), 1);
        assert_eq!(store.records().0["shop/a"].endpoint.labels["app"], "third");
    }
}
