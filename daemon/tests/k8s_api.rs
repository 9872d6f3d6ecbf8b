//! The Kubernetes source, the quarantine sink and the alert Events against the API stand-in
//! (`support::kube_standin`): a small HTTPS server on 127.0.0.1 (its own CA, a bearer token
//! required, as API servers do) that speaks the real
//! list/watch protocol (resourceVersions, chunked watch streams of JSON events, bookmarks,
//! `410 Gone` after compaction) and can fail the way API servers do (500s, connections dropped
//! on accept, watch streams cut).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use palisade::inventory::Inventory;
use palisade::k8s::{
    QuarantineResources, ResourceChange, all_api_uses,
    API_USES, AlertEventOutcome, AlertEventsConfig, ClusterAlertEvents, ClusterQuarantineSink as _, KubeSource,
    OPERATOR_LEASE_USES, OPERATOR_USES, PEER_SLICE_USES, PeerMode, QUARANTINE_LABEL, SourceConfig, SourceHealth,
};
use palisade::k8s::lease::LeaseConfig;
use palisade::k8s::operator::{ElectedOperator, Operator, OperatorConfig};
use palisade::segmentation::PolicySet;
use serde_json::{Value, json};
use support::kube_standin::{Fault, Kind, StandIn, WAIT};
use tokio::sync::watch;

// ---- fixtures ----------------------------------------------------------------------------------

const NODE: &str = "node-a";

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, name: &str, uid: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels,
                     "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "qosClass": "Burstable", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn network_policy(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                              "ports": [{"port": "http"}]}]}
    })
}

struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn new(test: &str) -> CgroupRoot {
        let dir = std::env::temp_dir().join(format!("palisade-k8s-api-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp cgroup root");
        CgroupRoot(dir)
    }

    /// The systemd driver's burstable pod slice for `uid`; returns the relative path.
    fn add_burstable_pod(&self, uid: &str) -> String {
        let rel = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        );
        std::fs::create_dir_all(self.0.join(&rel)).expect("pod cgroup dir");
        rel
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(cgroups: &Path) -> SourceConfig {
    let mut config = SourceConfig::new(NODE, cgroups);
    config.cgroup_retry = Duration::from_millis(100);
    config.initial_sync_timeout = Duration::from_secs(10);
    config.outage_probe_interval = Duration::from_millis(100);
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.debounce = Duration::from_millis(10);
    config
}

async fn wait_until<T: Clone>(rx: &mut watch::Receiver<T>, what: &str, mut pred: impl FnMut(&T) -> bool) -> T {
    let result = tokio::time::timeout(WAIT, async {
        loop {
            {
                let current = rx.borrow_and_update();
                if pred(&current) {
                    return current.clone();
                }
            }
            if rx.changed().await.is_err() {
                panic!("{what}: channel closed");
            }
        }
    })
    .await;
    match result {
        Ok(value) => value,
        Err(_) => panic!("{what}: not within {WAIT:?}"),
    }
}

/// This node's endpoints (not peer-only).
fn endpoint_names(inventory: &Inventory) -> Vec<String> {
    inventory.local_endpoints().map(|e| e.key()).collect()
}

/// Peer-only endpoints (pods on other nodes).
fn peer_names(inventory: &Inventory) -> Vec<String> {
    inventory.endpoints.iter().filter(|e| e.peer_only).map(|e| e.key()).collect()
}

/// Pod requests of `verb` by the node-local watch (field selector) or the cluster-wide one.
fn pod_requests(api: &StandIn, verb: &str, node_local: bool) -> Vec<support::kube_standin::Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.use_.1 == "pods" && r.use_.2 == verb)
        .filter(|r| r.query.contains_key("fieldSelector") == node_local)
        .collect()
}

fn policy_names(set: &PolicySet) -> Vec<String> {
    set.policies.iter().map(|p| p.key()).collect()
}

fn assert_uses_are_declared(api: &StandIn) {
    let declared: BTreeSet<(String, String, String)> =
        API_USES.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let undeclared: Vec<_> = api.uses().difference(&declared).cloned().collect();
    assert!(undeclared.is_empty(), "requests outside API_USES (the RBAC list): {undeclared:?}");
}

async fn seeded(test: &str) -> (StandIn, CgroupRoot) {
    let api = StandIn::start().await;
    let cgroups = CgroupRoot::new(test);
    api.apply(namespace("shop", json!({"team": "web", "kubernetes.io/metadata.name": "shop"})));
    api.apply(namespace("kube-system", json!({})));
    let uid = "11111111-2222-4333-8444-555555555555";
    cgroups.add_burstable_pod(uid);
    api.apply(pod("shop", "web-1", uid, NODE, "10.1.0.10", json!({"app": "web"})));
    api.apply(pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "web"})));
    (api, cgroups)
}

// ---- tests ---------------------------------------------------------------------------------------

#[tokio::test]
async fn pods_appear_change_labels_and_disappear() {
    let (api, cgroups) = seeded("pods").await;
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut inventory = source.inventory();

    let first = inventory.borrow_and_update().clone();
    assert_eq!(endpoint_names(&first), ["shop/web-1"], "only this node's pods are local");
    assert_eq!(peer_names(&first), ["shop/elsewhere"], "the other node's pod is a peer");
    let web = first.endpoint("shop/web-1").expect("web-1");
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(web.service_account.as_deref(), Some("web"));
    assert_eq!(web.ips, ["10.1.0.10".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(web.ports[0].name.as_deref(), Some("http"));
    assert_eq!(
        web.cgroup.as_deref(),
        Some("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_2222_4333_8444_555555555555.slice")
    );
    assert_eq!(first.namespace_labels("shop").and_then(|l| l.get("team")).map(String::as_str), Some("web"));
    let pod_lists = pod_requests(&api, "list", true);
    assert_eq!(pod_lists[0].query.get("fieldSelector").map(String::as_str), Some("spec.nodeName=node-a"));
    assert!(!pod_requests(&api, "list", false).is_empty(), "a cluster-wide pod list (peers)");

    // Relabel.
    api.apply(pod("shop", "web-1", "11111111-2222-4333-8444-555555555555", NODE, "10.1.0.10", json!({"app": "web", "tier": "2"})));
    wait_until(&mut inventory, "relabel", |inv| {
        inv.endpoint("shop/web-1").is_some_and(|e| e.labels.get("tier").is_some_and(|t| t == "2"))
    })
    .await;

    // A pod whose cgroup does not exist yet: published without one, reported, retried.
    let uid2 = "22222222-2222-4333-8444-555555555555";
    api.apply(pod("shop", "web-2", uid2, NODE, "10.1.0.11", json!({"app": "web"})));
    wait_until(&mut inventory, "web-2 appears", |inv| inv.endpoint("shop/web-2").is_some()).await;
    assert_eq!(inventory.borrow().endpoint("shop/web-2").and_then(|e| e.cgroup.clone()), None);
    let mut health = source.health();
    let unresolved = wait_until(&mut health, "unresolved reported", |h| !h.unresolved_cgroups.is_empty()).await;
    assert_eq!(unresolved.unresolved_cgroups[0].pod, "shop/web-2");
    assert!(unresolved.unresolved_cgroups[0].reason.contains("no cgroup"), "{:?}", unresolved.unresolved_cgroups);
    let rel = cgroups.add_burstable_pod(uid2);
    wait_until(&mut inventory, "web-2 cgroup found on retry", |inv| {
        inv.endpoint("shop/web-2").and_then(|e| e.cgroup.as_deref()) == Some(rel.as_str())
    })
    .await;
    wait_until(&mut health, "unresolved cleared", |h| h.unresolved_cgroups.is_empty()).await;

    // Disappear.
    api.delete(Kind::Pod, "shop", "web-1");
    wait_until(&mut inventory, "web-1 gone", |inv| endpoint_names(inv) == ["shop/web-2"]).await;
    // A finished pod leaves the inventory too (its IP can be reused).
    let mut done = api.object(Kind::Pod, "shop", "web-2");
    done["status"]["phase"] = json!("Succeeded");
    api.apply(done);
    let inv = wait_until(&mut inventory, "finished pod gone", |inv| inv.local_endpoints().next().is_none()).await;
    assert_eq!(peer_names(&inv), ["shop/elsewhere"]);
    assert_uses_are_declared(&api);
}

#[tokio::test]
async fn pods_on_other_nodes_are_peer_only_endpoints_and_follow_label_changes() {
    let (api, cgroups) = seeded("peers").await;
    // Even where a cgroup for the remote pod's UID exists on this node, it is never looked up.
    cgroups.add_burstable_pod("99999999-2222-4333-8444-555555555555");
    let mut source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut removals = source.take_label_removals().expect("first take");
    let mut inventory = source.inventory();
    let mut health = source.health();

    let first = inventory.borrow_and_update().clone();
    let remote = first.endpoint("shop/elsewhere").expect("the pod on node-b is published");
    assert!(remote.peer_only, "{remote:?}");
    assert_eq!(remote.cgroup, None, "a peer-only endpoint has no cgroup");
    assert_eq!(remote.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(remote.service_account.as_deref(), Some("web"));
    assert_eq!(remote.ips, ["10.2.0.10".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(remote.ports[0].name.as_deref(), Some("http"), "named ports resolve for egress to it");
    assert!(!first.endpoint("shop/web-1").expect("web-1").peer_only);
    let h = health.borrow().clone();
    assert!(h.unresolved_cgroups.is_empty(), "a peer is never unresolved: {:?}", h.unresolved_cgroups);
    assert_eq!((h.endpoints, h.peer_endpoints), (2, 1));
    let cluster = h.watches.get("cluster-pods").expect("the cluster-wide pod watch reports health");
    assert!(cluster.synced && cluster.connected, "{cluster:?}");
    assert_eq!(cluster.objects, 1, "the cluster-wide watch keeps the other node's pod only (this node's is the node-local watch's)");
    assert_eq!(h.watches["pods"].objects, 1, "the node-local store holds this node's pod");

    // Label changes on the other node are followed (a selector may start or stop matching).
    api.apply(pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "frontend"})));
    wait_until(&mut inventory, "peer relabelled", |inv| {
        inv.endpoint("shop/elsewhere").is_some_and(|e| e.peer_only && e.labels.get("app").is_some_and(|a| a == "frontend"))
    })
    .await;

    // More peers come and go; each node's pods are peers wherever they run.
    api.apply(pod("prod", "api-1", "cccccccc-0000-4000-8000-000000000001", "node-c", "10.3.0.5", json!({"app": "api"})));
    let inv = wait_until(&mut inventory, "peer on node-c", |inv| inv.endpoint("prod/api-1").is_some()).await;
    assert_eq!(peer_names(&inv), ["prod/api-1", "shop/elsewhere"]);
    assert_eq!(inv.namespace_labels("prod").and_then(|l| l.get("kubernetes.io/metadata.name")).map(String::as_str), Some("prod"));
    api.delete(Kind::Pod, "prod", "api-1");
    wait_until(&mut inventory, "peer gone", |inv| peer_names(inv) == ["shop/elsewhere"]).await;

    // Host-network pods of other nodes have no addresses of their own: left out.
    let mut host = pod("kube-system", "proxy-b", "dddddddd-0000-4000-8000-000000000001", "node-b", "192.168.0.2", json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    // A peer claiming a local pod's address is left out and reported; the local pod stays.
    api.apply(pod("shop", "clash", "eeeeeeee-0000-4000-8000-000000000001", "node-b", "10.1.0.10", json!({"app": "web"})));
    let h = wait_until(&mut health, "clash reported", |h| h.rejected.iter().any(|r| r.contains("shop/clash"))).await;
    assert!(h.rejected.iter().any(|r| r.contains("shop/clash") && r.contains("shop/web-1")), "{:?}", h.rejected);
    let inv = inventory.borrow().clone();
    assert!(inv.endpoint("shop/web-1").is_some_and(|e| !e.peer_only));
    assert!(inv.endpoint("shop/clash").is_none() && inv.endpoint("kube-system/proxy-b").is_none(), "{:?}", endpoint_names(&inv));

    // The quarantine label on another node's pod is not this node's business: not tracked, and
    // its removal is not reported.
    let mut labelled = api.object(Kind::Pod, "shop", "elsewhere");
    labelled["metadata"]["labels"][QUARANTINE_LABEL] = json!("true");
    api.apply(labelled);
    let mut unlabelled = api.object(Kind::Pod, "shop", "elsewhere");
    unlabelled["metadata"]["labels"].as_object_mut().expect("labels").remove(QUARANTINE_LABEL);
    api.apply(unlabelled);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(source.labelled_quarantined().is_empty(), "{:?}", source.labelled_quarantined());
    assert!(removals.try_recv().is_err(), "a peer's label removal was reported");

    // A pod on this node is local, even though the cluster-wide watch sees it too.
    let uid = "66666666-2222-4333-8444-555555555555";
    let rel = cgroups.add_burstable_pod(uid);
    api.apply(pod("shop", "web-6", uid, NODE, "10.1.0.16", json!({"app": "web"})));
    let inv = wait_until(&mut inventory, "local pod", |inv| inv.endpoint("shop/web-6").is_some()).await;
    let web6 = inv.endpoint("shop/web-6").expect("web-6");
    assert!(!web6.peer_only && web6.cgroup.as_deref() == Some(rel.as_str()), "{web6:?}");
    assert_eq!(inv.endpoints.iter().filter(|e| e.key() == "shop/web-6").count(), 1);

    let cluster_lists = pod_requests(&api, "list", false);
    assert!(!cluster_lists.is_empty() && cluster_lists.iter().all(|r| !r.query.contains_key("labelSelector")));
    assert_uses_are_declared(&api);
}

fn peer_slice(ns: &str, name: &str, app: &str, peers: &[(&str, &str)]) -> Value {
    let peers: Vec<Value> = peers.iter().map(|(pod, ip)| json!({"pod": pod, "identity": 1, "ips": [ip]})).collect();
    json!({
        "apiVersion": "palisade.io/v1alpha1", "kind": "PeerSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"palisade.io/managed-by": "palisade-operator"}},
        "identities": [{"id": 1, "labels": {"app": app}, "serviceAccount": "web", "namedPorts": ["http=8080/TCP"]}],
        "peers": peers
    })
}

/// `--peers slices` (issue 18, docs/peer-records.md): the peers come from the operator's
/// PeerSlice records and the agent never lists or watches the cluster's pods; a slice is
/// applied whole, a refused version keeps the slice's last good content (reported, with the
/// field), a slice that goes takes its peers with it, and a local pod wins over a slice entry.
#[tokio::test]
async fn in_slices_mode_peers_come_from_peer_slices_and_a_refused_slice_keeps_its_last_good_content() {
    let (api, cgroups) = seeded("slices").await;
    // Published by the operator: two pods of node-b, and this node's web-1 (slices hold every
    // pod of their namespace, wherever it runs).
    api.apply(peer_slice("shop", "shop-a", "frontend", &[("elsewhere", "10.2.0.10"), ("front-2", "10.2.0.11")]));
    api.apply(peer_slice("shop", "shop-b", "web", &[("web-1", "10.1.0.10")]));
    let mut config = config(&cgroups.0);
    config.peers = PeerMode::Slices;
    let source = KubeSource::start(api.client(), config).await.expect("source syncs");
    let mut inventory = source.inventory();
    let mut health = source.health();

    let first = inventory.borrow_and_update().clone();
    assert_eq!(peer_names(&first), ["shop/elsewhere", "shop/front-2"]);
    let remote = first.endpoint("shop/elsewhere").expect("from the slice");
    assert!(remote.peer_only && remote.cgroup.is_none(), "{remote:?}");
    assert_eq!(remote.labels.get("app").map(String::as_str), Some("frontend"), "the slice's identity, not the pod's labels");
    assert_eq!(remote.ports[0].name.as_deref(), Some("http"));
    assert!(!first.endpoint("shop/web-1").expect("the local pod").peer_only, "a local pod wins over its slice entry");
    let h = health.borrow().clone();
    assert!(!h.watches.contains_key("cluster-pods"), "{:?}", h.watches.keys());
    let slices = &h.watches["peerslices"];
    assert!(slices.synced && slices.connected && slices.objects == 2, "{slices:?}");
    assert_eq!((h.peers.source, h.peers.slices, h.peers.peers, h.peers.refused_slices), (PeerMode::Slices, 2, 3, 0));
    assert!(h.peers.last_update.is_some());
    assert_eq!((h.endpoints, h.peer_endpoints), (3, 2));

    // A label change is one slice rewritten.
    let generation = first.generation();
    api.apply(peer_slice("shop", "shop-a", "api", &[("elsewhere", "10.2.0.10"), ("front-2", "10.2.0.11")]));
    let inv = wait_until(&mut inventory, "relabelled through the slice", |inv| {
        inv.endpoint("shop/elsewhere").is_some_and(|e| e.labels.get("app").is_some_and(|a| a == "api"))
    })
    .await;
    let changes = inv.changes_since(generation).expect("the source says what changed");
    assert_eq!(changes.pods.iter().map(String::as_str).collect::<Vec<_>>(), ["shop/elsewhere", "shop/front-2"]);

    // A refused version (a peer naming an identity the slice does not list) changes nothing
    // the datapath sees and says why, naming the slice and the field.
    let mut bad = peer_slice("shop", "shop-a", "db", &[("elsewhere", "10.2.0.10")]);
    bad["peers"][0]["identity"] = json!(7);
    api.apply(bad);
    let h = wait_until(&mut health, "refusal reported", |h| h.peers.refused_slices == 1).await;
    assert!(
        h.rejected.iter().any(|r| r.starts_with("peerslice shop/shop-a: peers[0].identity: 7 is not an id") && r.contains("previous content stays")),
        "{:?}",
        h.rejected
    );
    let inv = inventory.borrow().clone();
    assert_eq!(peer_names(&inv), ["shop/elsewhere", "shop/front-2"]);
    assert!(inv.endpoint("shop/elsewhere").is_some_and(|e| e.labels["app"] == "api"), "the last good content stays");

    // A slice claiming a local pod's address: the local pod stays, the peer is left out.
    api.apply(peer_slice("shop", "shop-c", "web", &[("clash", "10.1.0.10")]));
    let h = wait_until(&mut health, "clash reported", |h| h.rejected.iter().any(|r| r.contains("shop/clash"))).await;
    assert!(h.rejected.iter().any(|r| r.contains("shop/clash") && r.contains("shop/web-1")), "{:?}", h.rejected);

    // A slice that goes takes its peers with it (narrower, never wider).
    api.delete(Kind::PeerSlice, "shop", "shop-a");
    wait_until(&mut inventory, "slice gone", |inv| peer_names(inv).is_empty()).await;

    // The agent never asked for the cluster's pods: only this node's (field selector).
    assert!(pod_requests(&api, "list", false).is_empty() && pod_requests(&api, "watch", false).is_empty());
    assert!(!pod_requests(&api, "watch", true).is_empty());
    let declared: BTreeSet<(String, String, String)> =
        API_USES.iter().chain(PEER_SLICE_USES).map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let undeclared: Vec<_> = api.uses().difference(&declared).cloned().collect();
    assert!(undeclared.is_empty(), "requests outside API_USES and PEER_SLICE_USES (the RBAC list): {undeclared:?}");
}

/// Slice writes (create, update, delete) the operator's user made.
fn operator_writes(api: &StandIn) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.user == "palisade-operator" && r.use_.1 == "peerslices" && ["create", "update", "delete"].contains(&r.use_.2.as_str()))
        .count()
}

fn slice_names(api: &StandIn) -> Vec<String> {
    let mut names: Vec<String> = ["shop", "kube-system"]
        .iter()
        .flat_map(|ns| (0..4).map(move |n| (*ns, format!("{ns}-{n}"))))
        .filter(|(ns, name)| api.try_object(Kind::PeerSlice, ns, name).is_some())
        .map(|(ns, name)| format!("{ns}/{name}"))
        .collect();
    names.sort();
    names
}

fn operator_config() -> OperatorConfig {
    OperatorConfig { flush_interval: Duration::from_millis(10), retry_min: Duration::from_millis(20), retry_max: Duration::from_millis(200) }
}

async fn start_operator(api: &StandIn) -> Operator {
    let token = api.add_user("palisade-operator", &[]);
    let operator = Operator::start(api.client_with_token(&token), operator_config());
    wait_until(&mut operator.synced(), "operator in sync", |s| *s).await;
    operator
}

/// The stand-in's copy of `shop/shop-0` once `pred` holds for it.
async fn slice_when(api: &StandIn, name: &str, what: &str, pred: impl Fn(Option<&Value>) -> bool) -> Option<Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            let slice = api.try_object(Kind::PeerSlice, "shop", name);
            if pred(slice.as_ref()) {
                return slice;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
}

/// `palisade operator` (issue 18): publishes the cluster's pods as PeerSlices (one per
/// namespace here), and an agent in slices mode follows a peer's label change through it; a
/// change no slice holds (a status) writes nothing; a slice rewritten underneath is re-read on
/// the 409 Conflict and written again; an emptied slice is deleted; a restarted operator adopts
/// the slices and, with no pod change, writes nothing (the agent's peers stay the same).
#[tokio::test]
async fn the_operator_publishes_peer_slices_and_an_agent_in_slices_mode_follows_them() {
    let (api, cgroups) = seeded("operator").await;
    api.apply(pod("shop", "front-2", "uid-front-2", "node-b", "10.2.0.11", json!({"app": "frontend"})));
    api.apply(pod("kube-system", "dns", "uid-dns", "node-c", "10.3.0.2", json!({"k8s-app": "kube-dns"})));
    let operator = start_operator(&api).await;
    assert_eq!(slice_names(&api), ["kube-system/kube-system-0", "shop/shop-0"]);
    assert_eq!(operator_writes(&api), 2);
    let shop = api.object(Kind::PeerSlice, "shop", "shop-0");
    assert_eq!(shop["metadata"]["labels"]["palisade.io/managed-by"], "palisade-operator");
    assert_eq!(shop["peers"].as_array().map(Vec::len), Some(3), "every pod of the namespace, this node's too: {shop}");

    let mut config = config(&cgroups.0);
    config.peers = PeerMode::Slices;
    let source = KubeSource::start(api.client(), config).await.expect("agent syncs");
    let mut inventory = source.inventory();
    let first = inventory.borrow_and_update().clone();
    assert_eq!(peer_names(&first), ["kube-system/dns", "shop/elsewhere", "shop/front-2"]);
    let elsewhere = first.endpoint("shop/elsewhere").expect("peer");
    assert_eq!((elsewhere.labels["app"].as_str(), elsewhere.service_account.as_deref()), ("web", Some("web")));
    assert_eq!(elsewhere.ports[0].name.as_deref(), Some("http"));
    assert!(!first.endpoint("shop/web-1").expect("local").peer_only);

    // A status change writes nothing; a label change rewrites one slice, and the agent sees it.
    let mut restarted = pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "web"}));
    restarted["status"]["containerStatuses"] = json!([{"name": "app", "restartCount": 3, "ready": true}]);
    api.apply(restarted);
    api.apply(pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "api"})));
    wait_until(&mut inventory, "the label change through the operator", |inv| {
        inv.endpoint("shop/elsewhere").is_some_and(|e| e.labels.get("app").is_some_and(|a| a == "api"))
    })
    .await;
    assert_eq!(operator_writes(&api), 3, "one write for the label change, none for the status");

    // Someone else rewrites the slice (a stale or hostile writer): the operator sees it on its
    // watch of the slices and writes its content back, with no pod change to wait for.
    let mut theirs = api.object(Kind::PeerSlice, "shop", "shop-0");
    assert_eq!(theirs["peers"][0]["pod"], "elsewhere");
    theirs["peers"][0]["ips"] = json!(["10.6.6.6"]);
    let theirs = api.apply(theirs);
    let rv = |v: &Value| v["metadata"]["resourceVersion"].as_str().and_then(|r| r.parse::<u64>().ok()).unwrap_or(0);
    let theirs_rv = rv(&theirs);
    let back = slice_when(&api, "shop-0", "the operator's content back", |s| s.is_some_and(|s| rv(s) > theirs_rv)).await;
    assert_eq!(back.expect("slice")["peers"][0]["ips"], json!(["10.2.0.10"]));
    // Deleted by someone else: created again.
    api.delete(Kind::PeerSlice, "shop", "shop-0");
    let again = slice_when(&api, "shop-0", "the slice created again", |s| s.is_some()).await.expect("slice");
    assert_eq!(again["peers"].as_array().map(Vec::len), Some(3));
    // A slice the operator did not write (agents would take its peers): deleted.
    api.apply(peer_slice("shop", "shop-forged", "web", &[("ghost", "10.6.6.7")]));
    slice_when(&api, "shop-forged", "the forged slice deleted", |s| s.is_none()).await;
    // The pod change after all this is one write, and the agent follows it.
    api.apply(pod("shop", "front-2", "uid-front-2", "node-b", "10.2.0.11", json!({"app": "frontend", "tier": "edge"})));
    wait_until(&mut inventory, "the operator's content after the repairs", |inv| {
        inv.endpoint("shop/front-2").is_some_and(|e| e.labels.contains_key("tier"))
            && inv.endpoint("shop/elsewhere").is_some_and(|e| e.ips == ["10.2.0.10".parse::<std::net::IpAddr>().unwrap()])
            && inv.endpoint("shop/ghost").is_none()
    })
    .await;
    assert_eq!(operator.counters().repairs.load(std::sync::atomic::Ordering::Relaxed), 3, "changed, deleted, forged");
    assert_eq!(operator.counters().errors.load(std::sync::atomic::Ordering::Relaxed), 0);

    // A namespace's last pod goes: its slice is deleted, the agent loses the peer.
    api.delete(Kind::Pod, "kube-system", "dns");
    wait_until(&mut inventory, "dns gone", |inv| !peer_names(inv).contains(&"kube-system/dns".to_string())).await;
    assert_eq!(slice_names(&api), ["shop/shop-0"]);

    // A restart with no pod change writes nothing; the agent's peers stay as they were.
    drop(operator);
    let before = (operator_writes(&api), inventory.borrow().clone());
    let operator = start_operator(&api).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(operator_writes(&api), before.0, "a restarted operator wrote a slice");
    assert_eq!(operator.counters().writes(), 0);
    assert_eq!(inventory.borrow().endpoints, before.1.endpoints);

    // The operator (with no election) asked for exactly OPERATOR_USES but the Lease (its
    // ClusterRole), and the agent never for the cluster's pods.
    let used = uses_by(&api, "palisade-operator");
    let declared: BTreeSet<(String, String, String)> = as_uses(OPERATOR_USES).difference(&as_uses(OPERATOR_LEASE_USES)).cloned().collect();
    assert!(used.is_subset(&declared), "the operator's requests outside OPERATOR_USES: {:?}", used.difference(&declared));
    // A re-read (get) happens only when a write conflicts, which the watch of the slices now
    // mostly forestalls.
    let unused: Vec<_> = declared.difference(&used).cloned().collect();
    assert!(unused.is_empty() || unused == [("palisade.io".to_string(), "peerslices".to_string(), "get".to_string())], "declared, never used: {unused:?}");
    let agent_cluster_pods =
        pod_requests(&api, "watch", false).into_iter().filter(|r| r.user != "palisade-operator").count();
    assert_eq!(agent_cluster_pods, 0);
}

fn as_uses(uses: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    uses.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect()
}

/// (group, resource, verb) of every request `user` made.
fn uses_by(api: &StandIn, user: &str) -> BTreeSet<(String, String, String)> {
    api.requests().into_iter().filter(|r| r.user == user).map(|r| r.use_).collect()
}

fn slice_writes_by(api: &StandIn, user: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.user == user && r.use_.1 == "peerslices" && ["create", "update", "delete"].contains(&r.use_.2.as_str()))
        .count()
}

const LEASE_NAMESPACE: &str = "palisade-system";
const LEASE_NAME: &str = "palisade-operator";
/// Short, so the test does not wait 15 s; the ratios are client-go's.
const LEASE_DURATION: Duration = Duration::from_secs(3);

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: LEASE_NAMESPACE.to_string(),
        name: LEASE_NAME.to_string(),
        identity: identity.to_string(),
        lease_duration: LEASE_DURATION,
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
    }
}

fn start_elected(api: &StandIn, user: &str) -> ElectedOperator {
    let token = api.add_user(user, &[]);
    ElectedOperator::start(api.client_with_token(&token), operator_config(), lease_config(user)).expect("operator starts")
}

fn lease(api: &StandIn) -> Value {
    api.object(Kind::Lease, LEASE_NAMESPACE, LEASE_NAME)
}

fn lease_time(lease: &Value, field: &str) -> jiff::Timestamp {
    let text = lease["spec"][field].as_str().unwrap_or_else(|| panic!("lease spec.{field}: {lease}"));
    text.parse().unwrap_or_else(|e| panic!("lease spec.{field} {text:?}: {e}"))
}

/// The stand-in serves Leases with the API server's optimistic concurrency: a create of an
/// existing one is `409 AlreadyExists`, an update carrying a resourceVersion that is no longer
/// the stored one is `409 Conflict` and changes nothing.
#[tokio::test]
async fn the_standin_serves_leases_with_optimistic_concurrency() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use kube::api::{Api, PostParams};
    let api = StandIn::start().await;
    let leases: Api<Lease> = Api::namespaced(api.client(), LEASE_NAMESPACE);
    let mut lease = Lease::default();
    lease.metadata.name = Some(LEASE_NAME.to_string());
    lease.spec = Some(LeaseSpec { holder_identity: Some("a".to_string()), lease_duration_seconds: Some(3), ..LeaseSpec::default() });
    let created = leases.create(&PostParams::default(), &lease).await.expect("created");
    let again = leases.create(&PostParams::default(), &lease).await.expect_err("a second create");
    assert!(matches!(&again, kube::Error::Api(s) if s.code == 409), "{again:?}");
    let mut mine = created.clone();
    mine.spec.as_mut().expect("spec").holder_identity = Some("b".to_string());
    let written = leases.replace(LEASE_NAME, &PostParams::default(), &mine).await.expect("update from the current version");
    assert_ne!(written.metadata.resource_version, created.metadata.resource_version);
    let mut stale = created.clone();
    stale.spec.as_mut().expect("spec").holder_identity = Some("c".to_string());
    let conflict = leases.replace(LEASE_NAME, &PostParams::default(), &stale).await.expect_err("an update from a stale version");
    assert!(matches!(&conflict, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"), "{conflict:?}");
    let held = leases.get(LEASE_NAME).await.expect("get");
    assert_eq!(held.spec.and_then(|s| s.holder_identity).as_deref(), Some("b"), "the stale update changed nothing");
}

/// Leader election (issue 18): two operators started together elect one (the other's create or
/// update of the Lease loses with a 409); only the leader reads pods and writes slices, the
/// standby touches nothing but the Lease. The leader dies without releasing: the standby waits
/// the lease out from the last renewal it saw, takes over, adopts the slices and writes nothing,
/// so the agent's peers stay exactly as they were; then it publishes pod changes. Stopped
/// (SIGTERM), a leader releases the Lease, so a new standby need not wait the lease out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_elect_one_writer_and_a_standby_takes_over_when_it_dies_changing_nothing_the_agent_enforces() {
    let (api, cgroups) = seeded("elected").await;
    api.apply(pod("shop", "front-2", "uid-front-2", "node-b", "10.2.0.11", json!({"app": "frontend"})));
    let mut operators = vec![Some(start_elected(&api, "operator-a")), Some(start_elected(&api, "operator-b"))];
    let names = ["operator-a", "operator-b"];
    let leader = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(i) = operators.iter().position(|o| o.as_ref().is_some_and(|o| o.state().borrow().leading)) {
                return i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a leader within WAIT");
    let standby = 1 - leader;
    let (leader_name, standby_name) = (names[leader], names[standby]);
    let mut standby_state = operators[standby].as_ref().expect("standby").state();
    wait_until(&mut standby_state, "the standby sees the leader", |s| s.holder.as_deref() == Some(leader_name)).await;
    assert!(!standby_state.borrow().leading, "two leaders");
    wait_until(&mut operators[leader].as_ref().expect("leader").synced(), "the leader's slices in sync", |s| *s).await;
    assert_eq!(lease(&api)["spec"]["holderIdentity"], leader_name);

    let mut config = config(&cgroups.0);
    config.peers = PeerMode::Slices;
    let source = KubeSource::start(api.client(), config).await.expect("agent syncs");
    let mut inventory = source.inventory();
    assert_eq!(peer_names(&inventory.borrow_and_update()), ["shop/elsewhere", "shop/front-2"]);

    // A label change: the leader writes it; the standby wrote nothing and read nothing but the
    // Lease.
    api.apply(pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "api"})));
    wait_until(&mut inventory, "the label change through the leader", |inv| {
        inv.endpoint("shop/elsewhere").is_some_and(|e| e.labels.get("app").is_some_and(|a| a == "api"))
    })
    .await;
    assert_eq!(slice_writes_by(&api, standby_name), 0);
    let standby_uses = uses_by(&api, standby_name);
    assert!(!standby_uses.is_empty() && standby_uses.is_subset(&as_uses(OPERATOR_LEASE_USES)), "the standby's requests: {standby_uses:?}");

    // The leader dies (no release). The standby takes over once the lease has run out.
    let before = inventory.borrow().clone();
    drop(operators[leader].take());
    let died = std::time::Instant::now();
    let last_held = lease(&api);
    assert_eq!(last_held["spec"]["holderIdentity"], leader_name);
    wait_until(&mut standby_state, "the standby takes over", |s| s.leading).await;
    let took = died.elapsed();
    let taken = lease(&api);
    assert_eq!(taken["spec"]["holderIdentity"], standby_name);
    assert_eq!(taken["spec"]["leaseTransitions"].as_i64(), last_held["spec"]["leaseTransitions"].as_i64().map(|t| t + 1));
    let waited = lease_time(&taken, "acquireTime").duration_since(lease_time(&last_held, "renewTime"));
    assert!(
        waited >= jiff::SignedDuration::try_from(LEASE_DURATION).expect("duration"),
        "the standby took the lease {waited:?} after the leader's last renewal, before the lease ({LEASE_DURATION:?}) ran out"
    );
    eprintln!("takeover: {took:?} after the leader died, {waited:?} after its last renewal (lease {LEASE_DURATION:?})");
    let new_leader = operators[standby].as_ref().expect("new leader");
    wait_until(&mut new_leader.synced(), "the new leader in sync", |s| *s).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(slice_writes_by(&api, standby_name), 0, "the takeover wrote a slice");
    assert_eq!(inventory.borrow().endpoints, before.endpoints, "the takeover changed the agent's endpoints");

    // The new leader publishes pod changes.
    api.apply(pod("shop", "front-2", "uid-front-2", "node-b", "10.2.0.11", json!({"app": "frontend", "tier": "edge"})));
    wait_until(&mut inventory, "a pod change through the new leader", |inv| {
        inv.endpoint("shop/front-2").is_some_and(|e| e.labels.contains_key("tier"))
    })
    .await;
    assert_eq!(slice_writes_by(&api, standby_name), 1);

    // Stopped (SIGTERM), the leader releases the Lease: no holder (or already the next one,
    // which could not have taken a lease renewed less than a retry period ago otherwise).
    let next = start_elected(&api, "operator-c");
    let mut next_state = next.state();
    wait_until(&mut next_state, "the new standby sees the leader", |s| s.holder.as_deref() == Some(standby_name)).await;
    let leaving = operators[standby].take().expect("leader");
    assert!(leaving.shutdown().await.expect("lease released"), "the leader held no lease to release");
    let released = lease(&api);
    let holder = released["spec"]["holderIdentity"].as_str().unwrap_or("");
    assert!(holder.is_empty() || holder == "operator-c", "after the release: {released}");
    wait_until(&mut next_state, "the next standby takes over", |s| s.leading).await;
    wait_until(&mut next.synced(), "in sync", |s| *s).await;
    assert_eq!(slice_writes_by(&api, "operator-c"), 0, "a takeover after a release wrote a slice");

    // Every replica stayed within OPERATOR_USES, and the election used all of its Lease verbs.
    let all: BTreeSet<_> = names.iter().chain(&["operator-c"]).flat_map(|u| uses_by(&api, u)).collect();
    assert!(all.is_subset(&as_uses(OPERATOR_USES)), "outside OPERATOR_USES: {:?}", all.difference(&as_uses(OPERATOR_USES)));
    assert!(as_uses(OPERATOR_LEASE_USES).is_subset(&all), "lease verbs used: {all:?}");
}

/// `palisade operator` as a process (kubeconfig to the stand-in): it takes the Lease, reports
/// itself as leader on `/metrics` and `/healthz`, publishes the slices, and on SIGTERM exits
/// cleanly having released the Lease (the slices stay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_process_reports_leading_and_releases_its_lease_on_sigterm() {
    use std::io::Read as _;
    let (api, _cgroups) = seeded("operator-process").await;
    let dir = tempfile_dir("operator-process");
    let token = api.add_user("operator-proc", &[]);
    let kubeconfig = dir.join("operator.kubeconfig");
    api.write_kubeconfig_with_token(&kubeconfig, &token);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
    let log = dir.join("operator.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["operator", "--identity", "proc-1", "--lease-duration-secs", "3", "--renew-deadline-ms", "2000"])
        .args(["--retry-period-ms", "200", "--flush-ms", "10", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("POD_NAME")
        .env_remove("POD_NAMESPACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start palisade operator");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let get = |path: &str| -> Option<String> {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    };
    // Start-up can be slow under load: wait for the slices, then read the status.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(text) = get("/healthz").filter(|t| t.contains("\"synced\":true")) {
            break text;
        }
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("palisade operator exited early ({exit}): {}", log_text());
        }
        assert!(std::time::Instant::now() < deadline, "palisade operator not in sync within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.contains("\"role\":\"leader\"") && status.contains("\"identity\":\"proc-1\""), "{status}");
    let metrics = get("/metrics").expect("metrics");
    assert!(metrics.contains("palisade_operator_leader 1\n"), "{metrics}\n{}", log_text());
    assert!(metrics.contains("palisade_operator_slice_writes_total{op=\"create\"} 1\n"), "{metrics}");
    assert!(metrics.contains("palisade_operator_pods 2\n"), "{metrics}");
    assert_eq!(lease(&api)["spec"]["holderIdentity"], "proc-1");
    assert!(api.try_object(Kind::PeerSlice, "shop", "shop-0").is_some());

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "palisade operator still running 30 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit {exit}: {}", log_text());
    assert!(log_text().contains("lease released"), "{}", log_text());
    let released = lease(&api);
    assert!(released["spec"]["holderIdentity"].as_str().unwrap_or("").is_empty(), "{released}");
    assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
    assert!(api.try_object(Kind::PeerSlice, "shop", "shop-0").is_some(), "the slices stay");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each published inventory says what changed since earlier ones (issue 18: the delta the
/// segmentation stage takes instead of looking at every peer again): exactly the pods and
/// namespaces that differ, also a pod that changed only because another one went (an address
/// freed), and nothing at all for a change no endpoint is made of.
#[tokio::test]
async fn each_publication_says_what_changed_since_the_ones_before() {
    let (api, cgroups) = seeded("changes").await;
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut inventory = source.inventory();
    let first = inventory.borrow_and_update().clone();
    let g1 = first.generation();
    assert!(g1 > 0, "the Kubernetes source numbers its publications");
    assert_eq!(first.changes_since(g1).map(|c| c.is_empty()), Some(true));
    assert_eq!(first.changes_since(g1 + 1), None, "a generation from the future is unknown");

    // A peer's label change: that pod, nothing else.
    api.apply(pod("shop", "elsewhere", "99999999-2222-4333-8444-555555555555", "node-b", "10.2.0.10", json!({"app": "frontend"})));
    let inv = wait_until(&mut inventory, "peer relabelled", |inv| {
        inv.endpoint("shop/elsewhere").is_some_and(|e| e.labels.get("app").is_some_and(|a| a == "frontend"))
    })
    .await;
    let changes = inv.changes_since(g1).expect("the log reaches back");
    assert_eq!(changes.pods, BTreeSet::from(["shop/elsewhere".to_string()]));
    assert!(changes.namespaces.is_empty(), "{changes:?}");
    let g2 = inv.generation();

    // An annotation (nothing a peer is made of) publishes nothing.
    let mut annotated = api.object(Kind::Pod, "shop", "elsewhere");
    annotated["metadata"]["annotations"] = json!({"note": "status churn"});
    api.apply(annotated);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inventory.borrow().generation(), g2, "an annotation changed the inventory");

    // A peer claiming the local pod's address is left out: no change. When the local pod goes,
    // the address is free and the peer is published: both pods are in the changes.
    api.apply(pod("shop", "clash", "eeeeeeee-0000-4000-8000-000000000001", "node-b", "10.1.0.10", json!({"app": "web"})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(inventory.borrow().endpoint("shop/clash").is_none());
    let g3 = inventory.borrow().generation();
    api.delete(Kind::Pod, "shop", "web-1");
    let inv = wait_until(&mut inventory, "the peer takes the freed address", |inv| inv.endpoint("shop/clash").is_some()).await;
    let changes = inv.changes_since(g3).expect("the log reaches back");
    assert_eq!(changes.pods, BTreeSet::from(["shop/clash".to_string(), "shop/web-1".to_string()]));

    // Namespace labels: the namespace, no pod.
    let g4 = inv.generation();
    api.apply(namespace("shop", json!({"team": "payments", "kubernetes.io/metadata.name": "shop"})));
    let inv = wait_until(&mut inventory, "namespace relabelled", |inv| {
        inv.namespace_labels("shop").and_then(|l| l.get("team")).is_some_and(|t| t == "payments")
    })
    .await;
    let changes = inv.changes_since(g4).expect("the log reaches back");
    assert_eq!((changes.pods.len(), changes.namespaces.iter().cloned().collect::<Vec<_>>()), (0, vec!["shop".to_string()]));
    // A consumer that missed publications gets their union.
    let since_start = inv.changes_since(g1).expect("the log reaches back");
    assert!(["shop/elsewhere", "shop/clash", "shop/web-1"].iter().all(|p| since_start.pods.contains(*p)), "{since_start:?}");
    assert!(since_start.namespaces.contains("shop"));
}

/// Large lists come compressed (issue 18: a 10,000-pod list is ~70 MB of JSON per agent): the
/// source asks for gzip and reads a gzip-compressed list, as API servers send lists past 128 KiB.
#[tokio::test]
async fn large_lists_are_asked_for_and_read_compressed() {
    let (api, cgroups) = seeded("gzip").await;
    let peers = 300;
    api.preload((0..peers).map(|i| {
        let mut p = pod("shop", &format!("peer-{i}"), &format!("{i:08}-0000-4000-8000-000000000000"), "node-b",
                        &format!("10.3.{}.{}", i / 250, i % 250 + 1), json!({"app": "web"}));
        p["metadata"]["annotations"] = json!({"note": "x".repeat(1000)});
        p
    }));
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let inventory = source.inventory().borrow().clone();
    assert_eq!(peer_names(&inventory).len(), peers + 1, "every peer of the compressed list is published");
    let lists = pod_requests(&api, "list", false);
    assert!(!lists.is_empty() && lists.iter().all(|r| r.accept_encoding.contains("gzip")),
            "the cluster-wide pod list asks for gzip: {:?}", lists.iter().map(|r| &r.accept_encoding).collect::<Vec<_>>());
    assert!(api.gzipped_lists() >= 1, "the stand-in sent the pod list compressed");
    assert!(api.bytes_sent() < (peers * 1000) as u64 / 4, "{} bytes sent for {peers} pods with 1 KB of annotations each", api.bytes_sent());
}

#[tokio::test]
async fn network_policy_changes_show_in_the_policy_set() {
    let (api, cgroups) = seeded("netpol").await;
    api.apply(network_policy("shop", "allow-frontend", "web"));
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut policies = source.policies();
    assert_eq!(policy_names(&policies.borrow_and_update()), ["shop/allow-frontend"]);
    let first = policies.borrow().policies[0].clone();
    assert!(first.pod_selector.match_labels.get("app").is_some_and(|v| v == "web"));

    // Changed selector: re-published.
    api.apply(network_policy("shop", "allow-frontend", "db"));
    wait_until(&mut policies, "selector change", |set| {
        set.policies.first().is_some_and(|p| p.pod_selector.match_labels.get("app").is_some_and(|v| v == "db"))
    })
    .await;

    // A new policy, then an edit the segmentation parser rejects: the previous version stays.
    api.apply(network_policy("shop", "second", "web"));
    wait_until(&mut policies, "second policy", |set| set.policies.len() == 2).await;
    let mut bad = network_policy("shop", "second", "web");
    bad["spec"]["policyTypes"] = json!(["Sideways"]);
    api.apply(bad);
    let mut health = source.health();
    let h = wait_until(&mut health, "rejection reported", |h| h.rejected.iter().any(|r| r.contains("shop/second"))).await;
    assert!(h.rejected.iter().any(|r| r.contains("previous version stays")), "{:?}", h.rejected);
    assert_eq!(policy_names(&policies.borrow()), ["shop/allow-frontend", "shop/second"]);

    api.delete(Kind::NetworkPolicy, "shop", "allow-frontend");
    wait_until(&mut policies, "deleted", |set| policy_names(set) == ["shop/second"]).await;
    assert_uses_are_declared(&api);
}

#[tokio::test]
async fn a_dropped_watch_resumes_from_the_last_bookmark_without_relisting() {
    let (api, cgroups) = seeded("bookmark").await;
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut inventory = source.inventory();
    let lists_before = api.count("pods", "list");
    // The node-local and the cluster-wide pod watch.
    api.wait_for_watches(Kind::Pod, 2).await;

    // Changes on another node move the resourceVersion on without reaching the node-local
    // watch (the cluster-wide one sees them: peers)...
    for i in 0..5 {
        api.apply(pod("shop", &format!("other-{i}"), &format!("aaaaaaaa-0000-4000-8000-00000000000{i}"), "node-b", &format!("10.2.0.{}", 20 + i), json!({})));
    }
    // ...until a bookmark tells it where the stream stands.
    let bookmark = api.bookmark();
    // No wait needed: the bookmark is on the stream before the stream's end, and the watcher
    // reads them in order.
    // History before the bookmark is gone: resuming from anything older would be 410 Gone.
    api.compact();
    api.drop_watches();

    api.apply(pod("shop", "web-3", "33333333-2222-4333-8444-555555555555", NODE, "10.1.0.12", json!({"app": "web"})));
    api.apply(pod("shop", "other-5", "aaaaaaaa-0000-4000-8000-000000000005", "node-b", "10.2.0.25", json!({})));
    let inv = wait_until(&mut inventory, "changes after reconnect", |inv| {
        inv.endpoint("shop/web-3").is_some() && inv.endpoint("shop/other-5").is_some()
    })
    .await;
    assert_eq!(peer_names(&inv).len(), 7, "elsewhere and other-0..5 as peers: {:?}", peer_names(&inv));

    for node_local in [true, false] {
        let pod_watches = pod_requests(&api, "watch", node_local);
        let resumed = pod_watches.get(1).expect("a resumed pod watch");
        assert_eq!(resumed.query.get("resourceVersion"), Some(&bookmark.to_string()), "resumed from the bookmark");
        assert_eq!(resumed.query.get("allowWatchBookmarks").map(String::as_str), Some("true"));
    }
    assert_eq!(api.count("pods", "list"), lists_before, "no relist was needed");
    assert_eq!(source.health().borrow().watches["pods"].relists, 0);
    assert_eq!(source.health().borrow().watches["cluster-pods"].relists, 0);
    assert_uses_are_declared(&api);
}

#[tokio::test]
async fn gone_410_relists_and_catches_up() {
    let (api, cgroups) = seeded("gone").await;
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut inventory = source.inventory();
    let lists_before = api.count("pods", "list");

    // Disconnected (connections dropped on accept) while the cluster changes and compacts.
    api.set_fault(Some(Fault::DropConnections));
    api.drop_watches();
    let mut health = source.health();
    wait_until(&mut health, "pods watch failing", |h| h.watches.get("pods").is_some_and(|w| !w.connected)).await;
    api.delete(Kind::Pod, "shop", "web-1");
    api.apply(pod("shop", "web-4", "44444444-2222-4333-8444-555555555555", NODE, "10.1.0.13", json!({"app": "web"})));
    api.compact();
    api.set_fault(None);

    // The resumed watch gets 410 Gone; the watcher lists again and the store is swapped whole.
    let inv = wait_until(&mut inventory, "relisted", |inv| endpoint_names(inv) == ["shop/web-4"]).await;
    assert!(inv.endpoint("shop/web-1").is_none(), "a pod deleted during the gap is gone");
    assert!(api.count("pods", "list") > lists_before, "relisted");
    let h = wait_until(&mut health, "relist counted, connected", |h| h.watches["pods"].relists >= 1 && h.connected).await;
    assert!(h.outage_since.is_none());
    assert_uses_are_declared(&api);
}

#[tokio::test]
async fn an_outage_keeps_the_last_state_and_health_says_so() {
    let (api, cgroups) = seeded("outage").await;
    api.apply(network_policy("shop", "allow-frontend", "web"));
    let source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut inventory = source.inventory();
    let mut policies = source.policies();
    let mut health = source.health();
    let before_inventory = inventory.borrow_and_update().clone();
    let before_policies = policies.borrow_and_update().clone();
    assert!(health.borrow().connected);

    api.set_fault(Some(Fault::Status500));
    api.drop_watches();
    let h: SourceHealth = wait_until(&mut health, "outage reported", |h| !h.connected && h.outage_since.is_some()).await;
    assert!(h.last_error.as_deref().is_some_and(|e| e.contains("500") || e.contains("injected")), "{:?}", h.last_error);
    // Several retry rounds later, nothing was cleared or republished.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!inventory.has_changed().expect("open"), "inventory republished during the outage");
    assert!(!policies.has_changed().expect("open"), "policies republished during the outage");
    assert_eq!(*inventory.borrow(), before_inventory);
    assert_eq!(*policies.borrow(), before_policies);
    assert!(!health.borrow().connected);

    api.set_fault(None);
    let h = wait_until(&mut health, "recovered", |h| h.connected).await;
    assert!(h.outage_since.is_none(), "{h:?}");
    api.apply(pod("shop", "web-1", "11111111-2222-4333-8444-555555555555", NODE, "10.1.0.10", json!({"app": "web", "after": "outage"})));
    wait_until(&mut inventory, "changes flow again", |inv| {
        inv.endpoint("shop/web-1").is_some_and(|e| e.labels.contains_key("after"))
    })
    .await;
    assert_uses_are_declared(&api);
}

#[tokio::test]
async fn initial_sync_failure_is_an_error_naming_the_cause() {
    let api = StandIn::start().await;
    api.set_fault(Some(Fault::Status500));
    let cgroups = CgroupRoot::new("nosync");
    let mut cfg = config(&cgroups.0);
    cfg.initial_sync_timeout = Duration::from_millis(500);
    let err = KubeSource::start(api.client(), cfg).await.err().expect("cannot sync");
    let text = err.to_string();
    assert!(text.contains("pods") && text.contains("namespaces") && text.contains("networkpolicies"), "{text}");
    assert!(text.contains("500") || text.contains("injected"), "{text}");
}

#[tokio::test]
async fn an_untrusted_server_or_a_missing_token_fails_the_sync_naming_the_cause() {
    let api = StandIn::start().await;
    let cgroups = CgroupRoot::new("tls");
    // A client that trusts another CA: the handshake fails, nothing is listed.
    let other = support::tls::TestCa::new("not the API server's CA");
    let mut config_other_ca = kube::Config::new(format!("https://{}", api.addr).parse().unwrap());
    config_other_ca.root_cert = Some(vec![pem_der(&other.pem)]);
    config_other_ca.auth_info.token = Some(api.token.to_string().into());
    let mut cfg = config(&cgroups.0);
    cfg.initial_sync_timeout = Duration::from_millis(500);
    let client = kube::Client::try_from(config_other_ca).unwrap();
    let err = KubeSource::start(client, cfg.clone()).await.err().expect("an untrusted server must not sync");
    assert!(api.requests().is_empty(), "a request reached the server over an unverified connection");
    let text = err.to_string();
    assert!(text.contains("pods"), "{text}");

    // The right CA but no token: 401, an error, nothing synced.
    let mut config_no_token = kube::Config::new(format!("https://{}", api.addr).parse().unwrap());
    config_no_token.root_cert = Some(vec![pem_der(&api.ca_pem)]);
    let client = kube::Client::try_from(config_no_token).unwrap();
    let err = KubeSource::start(client, cfg).await.err().expect("no token, no sync");
    assert!(err.to_string().contains("401") || err.to_string().contains("Unauthorized"), "{err}");
}

fn pem_der(pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes()).next().unwrap().unwrap().to_vec()
}

#[tokio::test]
async fn quarantine_is_labelled_and_reported_and_a_label_removal_is_reported_not_a_release() {
    let (api, cgroups) = seeded("quarantine").await;
    let mut source = KubeSource::start(api.client(), config(&cgroups.0)).await.expect("source syncs");
    let mut removals = source.take_label_removals().expect("first take");
    let sink = source.quarantine_sink();
    let mut inventory = source.inventory();
    let before = inventory.borrow_and_update().clone();

    sink.quarantined("shop/web-1", "credential_read", "alert-123").await.expect("sink");
    let requests = api.requests();
    let patch = requests.iter().find(|r| r.method == "PATCH").expect("a PATCH");
    assert_eq!(patch.path, "/api/v1/namespaces/shop/pods/web-1");
    assert_eq!(patch.content_type, "application/merge-patch+json");
    let body: Value = serde_json::from_str(&patch.body).expect("patch json");
    assert_eq!(body["metadata"]["labels"][QUARANTINE_LABEL], "true");
    assert_eq!(body["metadata"]["annotations"]["palisade.io/quarantine-rule"], "credential_read");
    assert_eq!(body["metadata"]["annotations"]["palisade.io/quarantine-alert"], "alert-123");
    let post = requests.iter().find(|r| r.method == "POST").expect("a POST");
    assert_eq!(post.path, "/api/v1/namespaces/shop/events");
    let event: Value = serde_json::from_str(&post.body).expect("event json");
    assert_eq!(event["involvedObject"]["kind"], "Pod");
    assert_eq!(event["involvedObject"]["name"], "web-1");
    assert_eq!(event["involvedObject"]["namespace"], "shop");
    assert_eq!(event["involvedObject"]["uid"], "11111111-2222-4333-8444-555555555555");
    assert_eq!(event["reason"], "Quarantined");
    assert_eq!(event["type"], "Warning");
    let message = event["message"].as_str().unwrap_or("");
    assert!(message.contains("credential_read") && message.contains("alert-123"), "{message}");
    assert_eq!(event["source"]["component"], "palisade");
    assert_eq!(event["source"]["host"], NODE);
    assert_eq!(api.object(Kind::Pod, "shop", "web-1")["metadata"]["labels"][QUARANTINE_LABEL], "true");

    // The watcher sees the label; selectors do not (no re-segmentation from the label itself).
    tokio::time::timeout(WAIT, async {
        while !source.labelled_quarantined().contains("shop/web-1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("label seen by the watcher");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*inventory.borrow(), before, "the quarantine label changed the published inventory");

    // `kubectl label pod web-1 palisade.io/quarantined-` by someone else: reported (the daemon
    // answers with the label put back and a tamper alert), never a release.
    let mut unlabelled = api.object(Kind::Pod, "shop", "web-1");
    unlabelled["metadata"]["labels"].as_object_mut().expect("labels").remove(QUARANTINE_LABEL);
    api.apply(unlabelled);
    let removal = tokio::time::timeout(WAIT, removals.recv()).await.expect("label removal in time").expect("open");
    assert_eq!(removal.pod, "shop/web-1");
    assert!(removal.change.contains("removed"), "{}", removal.change);
    // Set to another value: the same.
    sink.quarantined("shop/web-1", "credential_read", "alert-123").await.expect("label put back");
    tokio::time::timeout(WAIT, async {
        while !source.labelled_quarantined().contains("shop/web-1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("label seen again");
    let mut falsified = api.object(Kind::Pod, "shop", "web-1");
    falsified["metadata"]["labels"][QUARANTINE_LABEL] = json!("false");
    api.apply(falsified);
    let removal = tokio::time::timeout(WAIT, removals.recv()).await.expect("label change in time").expect("open");
    assert!(removal.change.contains("\"false\""), "{}", removal.change);

    // Quarantined again and released by palisade itself: the label removal is not reported.
    sink.quarantined("shop/web-1", "reverse_shell", "alert-456").await.expect("sink");
    tokio::time::timeout(WAIT, async {
        while !source.labelled_quarantined().contains("shop/web-1") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("label seen again");
    sink.released("shop/web-1", "cleared by on-call").await.expect("released");
    let requests = api.requests();
    let unpatch = requests.iter().rev().find(|r| r.method == "PATCH").expect("unlabel PATCH");
    let body: Value = serde_json::from_str(&unpatch.body).expect("json");
    assert!(body["metadata"]["labels"][QUARANTINE_LABEL].is_null() && body["metadata"]["labels"].as_object().is_some_and(|l| l.contains_key(QUARANTINE_LABEL)));
    let released_event: Value = serde_json::from_str(&requests.iter().rev().find(|r| r.method == "POST").expect("POST").body).expect("json");
    assert_eq!(released_event["reason"], "Released");
    assert!(released_event["message"].as_str().is_some_and(|m| m.contains("cleared by on-call")));
    assert!(api.object(Kind::Pod, "shop", "web-1")["metadata"]["labels"].get(QUARANTINE_LABEL).is_none());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(removals.try_recv().is_err(), "palisade's own unlabel came back as someone else's removal");

    // Alerts as Events (kube's Recorder): written, then the repeat folded into the first Event's
    // series, then over the limit; another rule on the same pod is an Event of its own.
    let alerts = ClusterAlertEvents::new(api.client(), NODE, AlertEventsConfig { burst: 3, refill_every: Duration::from_secs(3600) });
    let outcomes = [
        alerts.alert("shop/web-1", "shell_in_container", "warning", "shell started", "a-1").await.expect("alert 1"),
        alerts.alert("shop/web-1", "shell_in_container", "warning", "shell started", "a-2").await.expect("alert 2"),
        alerts.alert("shop/web-1", "crypto_miner", "critical", "xmrig", "a-3").await.expect("alert 3"),
        alerts.alert("shop/web-1", "shell_in_container", "warning", "shell started", "a-4").await.expect("alert 4"),
    ];
    use AlertEventOutcome::{Published, Suppressed};
    assert_eq!(outcomes, [Published, Published, Published, Suppressed]);
    assert_eq!(alerts.suppressed(), 1);
    let event_patch = api.requests().into_iter().find(|r| r.use_ == ("events.k8s.io".into(), "events".into(), "patch".into())).expect("series patch");
    let body: Value = serde_json::from_str(&event_patch.body).expect("json");
    assert_eq!(body["series"]["count"], 2, "{body:#}");
    let events: Vec<Value> = api.requests().into_iter().filter(|r| r.use_.0 == "events.k8s.io" && r.use_.2 == "create").map(|r| serde_json::from_str(&r.body).expect("json")).collect();
    assert_eq!(events.len(), 2, "one Event per rule: {events:#?}");
    assert!(events.iter().all(|e| e["reportingController"] == "palisade.io/palisade" && e["reportingInstance"] == NODE && e["regarding"]["name"] == "web-1"));
    assert_eq!(events.iter().map(|e| e["action"].as_str().unwrap_or("")).collect::<Vec<_>>(), ["shell_in_container", "crypto_miner"]);

    // Across this test every verb of API_USES was used, and nothing else.
    let declared: BTreeSet<(String, String, String)> =
        API_USES.iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    assert_eq!(api.uses(), declared);
}

// ---- The Quarantine resource -------------------------------------------------------------

async fn next_change(changes: &mut tokio::sync::mpsc::UnboundedReceiver<ResourceChange>, what: &str) -> ResourceChange {
    tokio::time::timeout(WAIT, changes.recv()).await.unwrap_or_else(|_| panic!("no change reported: {what}")).expect("watch task alive")
}

async fn no_change(changes: &mut tokio::sync::mpsc::UnboundedReceiver<ResourceChange>, what: &str) {
    if let Ok(Some(change)) = tokio::time::timeout(Duration::from_millis(700), changes.recv()).await {
        panic!("{what}: unexpected {change:?}");
    }
}

#[tokio::test]
async fn quarantine_objects_are_owned_by_the_pod_and_released_only_by_an_authorised_spec_release() {
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use palisade::k8s::quarantine_resource::{DesiredQuarantine, DropCounts, PHASE_DRY_RUN, PHASE_ENFORCED};
    let api = StandIn::start().await;
    api.apply(pod("shop", "web", "uid-web", "node-1", "10.0.0.5", json!({"app": "web"})));
    api.apply(pod("shop", "db", "uid-db", "node-1", "10.0.0.6", json!({"app": "db"})));
    let (resources, mut changes) = QuarantineResources::start(api.client(), "node-1");
    api.wait_for_watch(Kind::Quarantine).await;

    // The agent's quarantine: an object owned by the pod, with status; its own creation is not
    // reported back as a quarantine asked for by hand.
    let desired = DesiredQuarantine {
        pod: "shop/web".into(),
        reason: "reverse shell".into(),
        rule: "reverse_shell".into(),
        alert_id: "a-1".into(),
        phase: PHASE_ENFORCED,
        since: "2026-12-01T00:00:00Z".into(),
        message: String::new(),
        drops: None,
    };
    resources.ensure(&desired, Some("uid-web".into())).await.expect("ensure");
    let object = api.object(Kind::Quarantine, "shop", "web");
    assert_eq!(object["spec"]["pod"], "web", "{object:#}");
    assert_eq!(object["spec"]["rule"], "reverse_shell");
    assert_eq!(object["spec"]["alertId"], "a-1");
    assert_eq!(object["spec"]["node"], "node-1");
    assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], "uid-web");
    assert_eq!(object["metadata"]["ownerReferences"][0]["kind"], "Pod");
    assert_eq!(object["status"]["phase"], "Enforced");
    assert_eq!(object["status"]["node"], "node-1");
    no_change(&mut changes, "the agent's own object").await;
    // Ensuring again writes nothing.
    let writes = api.count("quarantines", "create") + api.count("quarantines/status", "patch");
    resources.ensure(&desired, None).await.expect("ensure again");
    assert_eq!(api.count("quarantines", "create") + api.count("quarantines/status", "patch"), writes);
    // The first drops are written at once; changed counts right after are not (at most every
    // DROPS_REFRESH), unless something else in the status changes.
    let dropping = |egress: u64| DesiredQuarantine {
        drops: Some(DropCounts { egress, ingress: 0, last_drop: "2026-12-01T00:00:05Z".into() }),
        ..desired.clone()
    };
    resources.ensure(&dropping(3), None).await.expect("first drops");
    assert_eq!(api.object(Kind::Quarantine, "shop", "web")["status"]["drops"]["egress"], 3);
    let writes = api.count("quarantines/status", "patch");
    resources.ensure(&dropping(9), None).await.expect("more drops");
    assert_eq!(api.count("quarantines/status", "patch"), writes, "drop counts are refreshed at most every DROPS_REFRESH");
    assert_eq!(api.object(Kind::Quarantine, "shop", "web")["status"]["drops"]["egress"], 3);
    resources.ensure(&DesiredQuarantine { since: "2026-12-01T00:00:09Z".into(), ..dropping(9) }, None).await.expect("changed");
    assert_eq!(api.object(Kind::Quarantine, "shop", "web")["status"]["drops"]["egress"], 9);

    // A user without RBAC on quarantines cannot release (403), and nothing is reported.
    let intruder = api.add_user("intruder", &[("quarantines", "patch"), ("quarantines", "update"), ("quarantines", "delete")]);
    let as_intruder: Api<palisade::k8s::Quarantine> = Api::namespaced(api.client_with_token(&intruder), "shop");
    let release = json!({"spec": {"release": {"requestedBy": "intruder", "reason": "let me out"}}});
    let denied = as_intruder.patch("web", &PatchParams::default(), &Patch::Merge(&release)).await;
    assert!(matches!(&denied, Err(kube::Error::Api(s)) if s.code == 403), "{denied:?}");
    assert!(as_intruder.delete("web", &Default::default()).await.is_err(), "delete without RBAC");
    no_change(&mut changes, "a forbidden release").await;

    // An authorised user sets spec.release: reported with requestedBy and the field manager that
    // wrote it (from managedFields).
    let oncall = api.add_user("oncall@example.com", &[]);
    let as_oncall: Api<palisade::k8s::Quarantine> = Api::namespaced(api.client_with_token(&oncall), "shop");
    let release = json!({"spec": {"release": {"requestedBy": "oncall@example.com", "reason": "incident closed"}}});
    let params = PatchParams { field_manager: Some("kubectl-patch".into()), ..Default::default() };
    as_oncall.patch("web", &params, &Patch::Merge(&release)).await.expect("authorised release");
    let change = next_change(&mut changes, "release").await;
    assert_eq!(
        change,
        ResourceChange::ReleaseRequested {
            pod: "shop/web".into(),
            reason: "incident closed".into(),
            requested_by: "oncall@example.com".into(),
            managers: vec!["kubectl-patch".into()],
        }
    );
    // The agent deletes the object after the release: not reported back as a deletion.
    resources.delete("shop/web").await.expect("delete");
    assert!(api.try_object(Kind::Quarantine, "shop", "web").is_none());
    no_change(&mut changes, "the agent's own deletion").await;

    // An operator creates one by hand: a quarantine request naming who created it.
    let by_hand = palisade::k8s::Quarantine {
        api_version: "palisade.io/v1".into(),
        kind: "Quarantine".into(),
        metadata: kube::api::ObjectMeta { name: Some("db".into()), namespace: Some("shop".into()), ..Default::default() },
        spec: palisade::k8s::quarantine_resource::QuarantineSpec { pod: "db".into(), reason: "suspicious".into(), ..Default::default() },
        status: None,
    };
    let create = PostParams { field_manager: Some("kubectl-create".into()), ..Default::default() };
    as_oncall.create(&create, &by_hand).await.expect("create by hand");
    let change = next_change(&mut changes, "quarantine by hand").await;
    assert_eq!(
        change,
        ResourceChange::QuarantineRequested { pod: "shop/db".into(), reason: "suspicious".into(), managers: vec!["kubectl-create".into()] }
    );
    // An object whose spec.pod is not its name is ignored (the CRD rejects it on real clusters).
    let mut mismatched = by_hand.clone();
    mismatched.metadata.name = Some("web".into());
    as_oncall.create(&create, &mismatched).await.expect("create mismatched");
    no_change(&mut changes, "spec.pod differs from the name").await;

    // Deleted by someone else: reported. Deleting the pod deletes the object it owns
    // (the stand-in's garbage collector), reported the same way.
    as_oncall.delete("db", &Default::default()).await.expect("delete by hand");
    assert_eq!(next_change(&mut changes, "deletion").await, ResourceChange::Deleted { pod: "shop/db".into() });
    // What dry run held back is an object too, in phase DryRun, saying why.
    let held_back = DesiredQuarantine {
        pod: "shop/db".into(),
        phase: PHASE_DRY_RUN,
        message: "not enforced: dry run is on for this node".into(),
        ..desired.clone()
    };
    resources.ensure(&held_back, Some("uid-db".into())).await.expect("ensure db");
    let object = api.object(Kind::Quarantine, "shop", "db");
    assert_eq!((object["status"]["phase"].as_str(), object["status"]["message"].as_str()), (Some("DryRun"), Some("not enforced: dry run is on for this node")), "{object:#}");
    no_change(&mut changes, "the agent's own dry-run object").await;
    api.delete(Kind::Pod, "shop", "db");
    assert!(api.try_object(Kind::Quarantine, "shop", "db").is_none(), "owned object outlived its pod");
    assert_eq!(next_change(&mut changes, "garbage collected").await, ResourceChange::Deleted { pod: "shop/db".into() });

    // Everything the agent sent is in its RBAC list.
    let agent_uses: BTreeSet<(String, String, String)> =
        api.requests().into_iter().filter(|r| r.user == support::kube_standin::AGENT_USER).map(|r| r.use_).collect();
    let declared: BTreeSet<(String, String, String)> =
        all_api_uses().iter().map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let undeclared: Vec<_> = agent_uses.difference(&declared).collect();
    assert!(undeclared.is_empty(), "requests outside the RBAC list: {undeclared:?}");
}

/// The Quarantine watch reports its health (status and /healthz show it): connected once
/// listed, disconnected with the error counted during an outage, connected again after it.
#[tokio::test]
async fn the_quarantine_watch_reports_its_health_through_an_outage() {
    let api = StandIn::start().await;
    api.apply(quarantine_object("shop", "web", "node-2", "reverse_shell"));
    let (resources, _changes) = QuarantineResources::start(api.client(), "node-1");
    let health = resources.health();
    let until = |what: &'static str, pred: fn(&palisade::k8s::quarantine_resource::ResourceWatchState) -> bool| {
        let health = health.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let state = health.snapshot();
                if pred(&state) {
                    return state;
                }
                assert!(tokio::time::Instant::now() < deadline, "{what}: {state:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let listed = until("listed", |h| h.connected && h.synced).await;
    assert_eq!((listed.objects, listed.errors), (1, 0), "{listed:?}");
    api.set_fault(Some(Fault::Status500));
    api.drop_watches();
    let failing = until("outage seen", |h| !h.connected && h.errors > 0).await;
    assert!(failing.last_error.as_deref().is_some_and(|e| e.contains("500") || e.contains("injected")), "{failing:?}");
    assert!(failing.last_error_at.is_some());
    api.set_fault(None);
    let back = until("connected again", |h| h.connected).await;
    assert!(back.errors >= failing.errors && back.objects == 1, "{back:?}");
}

// ---- kubectl palisade (the plugin) --------------------------------------------------------

fn palisade_event(ns: &str, pod: &str, node: &str, reason: &str, message: &str, at: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{pod}.{node}.{reason}"), "namespace": ns},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": ns},
        "type": "Warning", "reason": reason, "message": message, "count": 1,
        "source": {"component": "palisade", "host": node},
        "reportingComponent": "palisade.io/palisade", "reportingInstance": node,
        "firstTimestamp": at, "lastTimestamp": at})
}

fn quarantine_object(ns: &str, pod: &str, node: &str, rule: &str) -> Value {
    json!({"apiVersion": "palisade.io/v1", "kind": "Quarantine",
        "metadata": {"name": pod, "namespace": ns},
        "spec": {"pod": pod, "reason": format!("{rule} fired"), "rule": rule, "node": node},
        "status": {"phase": "Enforced", "since": "2026-12-01T10:00:00Z", "node": node}})
}

/// Runs the binary as `kubectl-palisade` (a link of that name) with KUBECONFIG set.
fn plugin(dir: &Path, kubeconfig: &Path) -> std::process::Command {
    let link = dir.join("kubectl-palisade");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_palisade"), &link).expect("link kubectl-palisade");
    }
    let mut command = std::process::Command::new(link);
    command.env("KUBECONFIG", kubeconfig).env("NO_COLOR", "1").env_remove("KUBERNETES_SERVICE_HOST");
    command
}

fn run_plugin(dir: &Path, kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    plugin(dir, kubeconfig).args(args).output().expect("run kubectl-palisade")
}

fn stdout_ok(out: &std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_palisade_shows_every_nodes_alerts_and_quarantines_and_releases_as_the_authenticated_user() {
    let api = StandIn::start().await;
    let dir = tempfile_dir("kubectl-palisade");
    api.apply(palisade_event("shop", "web", "node-a", "Quarantined", "rule reverse_shell", "2026-12-01T10:00:00Z"));
    api.apply(palisade_event("bank", "ledger", "node-b", "Alert", "shell_in_container: bash started", "2026-12-01T10:01:00Z"));
    // Someone else's Event: not an alert.
    api.apply(json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "web.kubelet", "namespace": "shop"},
        "involvedObject": {"kind": "Pod", "name": "web", "namespace": "shop"}, "type": "Normal", "reason": "Pulled",
        "message": "image pulled", "source": {"component": "kubelet", "host": "node-a"}}));
    api.apply(quarantine_object("shop", "web", "node-a", "reverse_shell"));
    api.apply(quarantine_object("bank", "ledger", "node-b", "crypto_miner"));
    let oncall = api.add_user("oncall@example.com", &[]);
    let intruder = api.add_user("intruder", &[("quarantines", "patch")]);
    let oncall_config = dir.join("oncall.kubeconfig");
    let intruder_config = dir.join("intruder.kubeconfig");
    api.write_kubeconfig_with_token(&oncall_config, &oncall);
    api.write_kubeconfig_with_token(&intruder_config, &intruder);

    // Alerts of both nodes, one table and as JSON lines; the kubelet's Event is not one.
    let (d, k) = (dir.clone(), oncall_config.clone());
    let json_out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["alerts", "-A", "-o", "json"])).await.expect("join");
    let alerts: Vec<Value> = stdout_ok(&json_out, "alerts -o json").lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let nodes: BTreeSet<&str> = alerts.iter().filter_map(|a| a["node"].as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["node-a", "node-b"]), "{alerts:#?}");
    assert!(alerts.iter().all(|a| a["reason"] != "Pulled"), "a non-palisade Event listed: {alerts:#?}");
    assert_eq!(alerts.iter().find(|a| a["pod"] == "ledger").expect("ledger")["namespace"], "bank");
    let (d, k) = (dir.clone(), oncall_config.clone());
    let table = stdout_ok(&tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["alerts", "-A"])).await.expect("join"), "alerts");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("LAST SEEN") && lines[0].contains("NODE"), "{table}");
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines.iter().any(|l| l.contains("node-a") && l.contains("web")) && lines.iter().any(|l| l.contains("node-b") && l.contains("ledger")), "{table}");

    // Quarantines of both nodes.
    let (d, k) = (dir.clone(), oncall_config.clone());
    let out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "list", "-A", "-o", "json"])).await.expect("join");
    let list: Vec<Value> = serde_json::from_str(&stdout_ok(&out, "quarantine list -o json")).expect("json");
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(list.iter().any(|q| q["node"] == "node-a" && q["pod"] == "web" && q["phase"] == "Enforced" && q["rule"] == "reverse_shell"));
    assert!(list.iter().any(|q| q["node"] == "node-b" && q["pod"] == "ledger"));
    let (d, k) = (dir.clone(), oncall_config.clone());
    let table = stdout_ok(&tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "list", "-A"])).await.expect("join"), "list");
    assert!(table.contains("node-a") && table.contains("node-b") && table.contains("RELEASE BY"), "{table}");

    // A release names the user the API server authenticates, written by the plugin's field manager.
    let (d, k) = (dir.clone(), oncall_config.clone());
    let out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "release", "shop/web", "--reason", "image rebuilt"])).await.expect("join");
    assert!(stdout_ok(&out, "release").contains("oncall@example.com"));
    let object = api.object(Kind::Quarantine, "shop", "web");
    assert_eq!(object["spec"]["release"], json!({"requestedBy": "oncall@example.com", "reason": "image rebuilt"}), "{object:#}");
    let managers: Vec<&str> = object["metadata"]["managedFields"].as_array().expect("managedFields").iter().filter_map(|m| m["manager"].as_str()).collect();
    assert!(managers.contains(&"kubectl-palisade"), "{managers:?}");
    // Without RBAC: refused, loudly; the object is untouched.
    let (d, k) = (dir.clone(), intruder_config.clone());
    let out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "release", "bank/ledger", "--reason", "x"])).await.expect("join");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(api.object(Kind::Quarantine, "bank", "ledger")["spec"]["release"].is_null());
    // A pod that is not quarantined: says so.
    let (d, k) = (dir.clone(), oncall_config.clone());
    let out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "release", "shop/nobody", "--reason", "x"])).await.expect("join");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not quarantined"), "{}", String::from_utf8_lossy(&out.stderr));
    // Quarantine by hand: an object without status, for the pod's node to enforce.
    let (d, k) = (dir.clone(), oncall_config.clone());
    let out = tokio::task::spawn_blocking(move || run_plugin(&d, &k, &["quarantine", "add", "shop/db", "--reason", "scanner finding"])).await.expect("join");
    stdout_ok(&out, "add");
    let object = api.object(Kind::Quarantine, "shop", "db");
    assert_eq!(object["spec"]["reason"], "scanner finding");
    assert!(object["status"].is_null());

    // --follow: the list, then what arrives.
    let mut follow = plugin(&dir, &oncall_config).args(["alerts", "-A", "--follow", "-o", "json"]).stdout(std::process::Stdio::piped()).spawn().expect("follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    for _ in 0..2 {
        tokio::time::timeout(WAIT, rx.recv()).await.expect("listed alerts").expect("line");
    }
    api.wait_for_watch(Kind::Event).await;
    api.apply(palisade_event("shop", "cart", "node-c", "Alert", "crypto_miner: xmrig", "2026-12-01T10:05:00Z"));
    let line = tokio::time::timeout(WAIT, rx.recv()).await.expect("followed alert").expect("line");
    let followed: Value = serde_json::from_str(&line).expect("json");
    assert_eq!((followed["pod"].as_str(), followed["node"].as_str()), (Some("cart"), Some("node-c")), "{followed:#}");
    let _ = follow.kill();
    let _ = follow.wait();
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
