//! Kubernetes API objects to palisade's own model: Pods to inventory endpoints, Namespaces to
//! inventory namespaces, NetworkPolicies (through serde) to the segmentation policy set. The
//! segmentation parser is the one validator of policies; nothing here re-implements it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Namespace as KubeNamespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy as KubeNetworkPolicy;

use crate::inventory::{EndpointSpec, Inventory, InventoryFile, NamedPort, NamespaceSpec, Protocol};
use crate::segmentation::policy::{NetworkPolicy, PolicySet};

use super::QUARANTINE_LABEL;

/// How the published inventory names its source in validation messages.
pub const INVENTORY_SOURCE: &str = "kubernetes";

/// A pod as the source sees it before its cgroup is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `namespace/name`.
    pub key: String,
    pub uid: String,
    /// `spec.nodeName` (None while unscheduled).
    pub node_name: Option<String>,
    pub qos_class: Option<String>,
    /// Container ids from `status.containerStatuses` (runtime prefix stripped).
    pub container_ids: Vec<String>,
    pub endpoint: EndpointSpec,
    /// Whether the pod carries `palisade.io/quarantined=true`.
    pub quarantine_label: bool,
    /// `spec.hostNetwork`: the pod has no addresses of its own.
    pub host_network: bool,
    /// Why a part of the pod was left out of the endpoint (e.g. a host-network pod's IPs).
    pub notes: Vec<String>,
}

/// `None` for pods that are finished (Succeeded/Failed): their IPs may already belong to a new
/// pod, and nothing runs in them to monitor.
pub fn pod_view(pod: &Pod) -> Option<PodView> {
    let namespace = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let status = pod.status.as_ref();
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref();
    let mut notes = Vec::new();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let quarantine_label = labels.get(QUARANTINE_LABEL).is_some_and(|v| v == "true");
    // The quarantine label is palisade's own bookkeeping: selectors must not see it change, or
    // a quarantine would re-segment the pod a second time through the policy compiler.
    let labels: BTreeMap<String, String> = labels.into_iter().filter(|(k, _)| k != QUARANTINE_LABEL).collect();

    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut ips: Vec<IpAddr> = Vec::new();
    if host_network {
        // Host-network pods share the node's addresses (and several of them the same ones);
        // NetworkPolicy does not apply to them, so they are monitored but not addressable.
        notes.push("hostNetwork: the node's addresses are not the pod's own; not segmented".to_string());
    } else if let Some(status) = status {
        let listed: Vec<&str> = match &status.pod_ips {
            Some(pod_ips) if !pod_ips.is_empty() => pod_ips.iter().map(|p| p.ip.as_str()).collect(),
            _ => status.pod_ip.as_deref().into_iter().collect(),
        };
        for ip in listed {
            match ip.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => notes.push(format!("status.podIPs: {ip:?} is not an IP address")),
            }
        }
    }

    let mut ports = Vec::new();
    if let Some(spec) = spec {
        // Sidecars (init containers that keep running) serve ports like ordinary containers.
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| c.restart_policy.as_deref() == Some("Always"));
        for container in spec.containers.iter().chain(sidecars) {
            container_ports(container, &mut ports, &mut notes);
        }
    }

    let container_ids = status
        .map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .filter_map(|c| c.container_id.as_deref().and_then(super::cgroup::container_id_from_status))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();

    Some(PodView {
        key: format!("{namespace}/{name}"),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
        qos_class: status.and_then(|s| s.qos_class.clone()),
        container_ids,
        endpoint: EndpointSpec {
            namespace,
            name,
            labels,
            service_account: spec.and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()),
            ips,
            ports,
            cgroup: None,
            peer_only: false,
        },
        quarantine_label,
        host_network,
        notes,
    })
}

fn container_ports(container: &Container, ports: &mut Vec<NamedPort>, notes: &mut Vec<String>) {
    for port in container.ports.iter().flatten() {
        let Some(number) = u16::try_from(port.container_port).ok().filter(|p| *p > 0) else {
            notes.push(format!("container {}: port {} out of range", container.name, port.container_port));
            continue;
        };
        let protocol = match port.protocol.as_deref().map(str::parse::<Protocol>) {
            None => Protocol::Tcp,
            Some(Ok(protocol)) => protocol,
            Some(Err(message)) => {
                notes.push(format!("container {}: port {number}: {message}", container.name));
                continue;
            }
        };
        let named = NamedPort { name: port.name.clone(), port: number, protocol };
        if named.name.is_some() && ports.iter().any(|p: &NamedPort| p.name == named.name) {
            notes.push(format!("container {}: port name {:?} used twice; first kept", container.name, named.name));
            continue;
        }
        if !ports.contains(&named) {
            ports.push(named);
        }
    }
}

pub fn namespace_spec(namespace: &KubeNamespace) -> Option<NamespaceSpec> {
    Some(NamespaceSpec {
        name: namespace.metadata.name.clone()?,
        labels: namespace.metadata.labels.clone().unwrap_or_default(),
    })
}

/// Builds the inventory from everything the API reported. The inventory validator is all or
/// nothing, but one odd pod (say, an IP still held by a pod that is terminating) must not hold
/// back every other pod's update: an endpoint or namespace the validator rejects is left out and
/// reported (`pod NS/NAME: FIELD: why`), and the rest is published. One pass over the entries
/// ([`Inventory::from_file_skipping`]): it validated the whole inventory again after each
/// rejection, quadratic in the pods sharing an address.
pub fn build_inventory(file: InventoryFile) -> (Inventory, Vec<String>) {
    let (inventory, skipped) = Inventory::from_file_skipping(file, Path::new(INVENTORY_SOURCE));
    let rejected = skipped.iter().map(|s| format!("{}: {}", s.entry, s.reason())).collect();
    (inventory, rejected)
}

/// One NetworkPolicy from the API through the segmentation parser: serialised back to its
/// manifest form (k8s-openapi writes `apiVersion` and `kind`) and parsed like a policy file, so
/// both sources get identical validation and semantics.
pub fn network_policy(policy: &KubeNetworkPolicy) -> Result<NetworkPolicy, String> {
    let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
    let name = policy.metadata.name.as_deref().unwrap_or("");
    let source = format!("kubernetes:networkpolicy/{namespace}/{name}");
    // Only what the parser reads: managedFields and annotations can be large and say nothing.
    let mut slim = policy.clone();
    slim.metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        name: policy.metadata.name.clone(),
        namespace: policy.metadata.namespace.clone(),
        ..Default::default()
    };
    let text = serde_norway::to_string(&slim).map_err(|e| format!("{source}: cannot serialise: {e}"))?;
    let mut set = PolicySet::parse(&text, Path::new(&source)).map_err(|e| e.to_string())?;
    match set.policies.pop() {
        Some(parsed) if set.policies.is_empty() => {
            let mut parsed = std::sync::Arc::unwrap_or_clone(parsed);
            for warning in &parsed.ignored {
                tracing::warn!(%warning, "NetworkPolicy field has no effect");
            }
            parsed.source = source;
            Ok(parsed)
        }
        _ => Err(format!("{source}: expected exactly one policy")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod in namespace `x` with these addresses and nothing else.
    fn endpoint_in_x(name: &str, ips: &[&str], peer_only: bool) -> EndpointSpec {
        EndpointSpec {
            namespace: "x".into(),
            name: name.into(),
            labels: Default::default(),
            service_account: None,
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports: vec![],
            cgroup: None,
            peer_only,
        }
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod json")
    }

    #[test]
    fn pod_fields_become_an_endpoint() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "1234-abcd",
                          "labels": {"app": "web", "palisade.io/quarantined": "true"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n1",
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                                             {"containerPort": 53, "protocol": "UDP"}]}],
                     "initContainers": [{"name": "side", "restartPolicy": "Always",
                                          "ports": [{"name": "metrics", "containerPort": 9090}]},
                                         {"name": "init", "ports": [{"name": "ignored", "containerPort": 1}]}]},
            "status": {"phase": "Running", "qosClass": "Burstable",
                       "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
                       "containerStatuses": [{"name": "c", "containerID": "containerd://abcdef012345", "image": "i",
                                              "imageID": "", "ready": true, "restartCount": 0}]}
        }));
        let view = pod_view(&p).expect("running pod");
        assert_eq!(view.key, "shop/web-1");
        assert_eq!(view.node_name.as_deref(), Some("n1"));
        assert!(view.quarantine_label);
        assert_eq!(view.endpoint.labels.len(), 1, "the quarantine label is not a selector label");
        assert_eq!(view.endpoint.service_account.as_deref(), Some("web"));
        assert_eq!(view.endpoint.ips.len(), 2);
        let names: Vec<_> = view.endpoint.ports.iter().map(|p| (p.name.clone(), p.port, p.protocol)).collect();
        assert_eq!(
            names,
            [
                (Some("http".into()), 8080, Protocol::Tcp),
                (None, 53, Protocol::Udp),
                (Some("metrics".into()), 9090, Protocol::Tcp)
            ]
        );
        assert_eq!(view.container_ids, ["abcdef012345"]);
        assert_eq!(view.qos_class.as_deref(), Some("Burstable"));
    }

    #[test]
    fn finished_and_host_network_pods() {
        let done = pod(serde_json::json!({"metadata": {"name": "a", "namespace": "x"}, "status": {"phase": "Succeeded", "podIP": "10.0.0.1"}}));
        assert!(pod_view(&done).is_none());
        let host = pod(serde_json::json!({"metadata": {"name": "a", "namespace": "x"},
            "spec": {"hostNetwork": true, "containers": []}, "status": {"phase": "Running", "podIP": "192.168.1.2"}}));
        let view = pod_view(&host).expect("running");
        assert!(view.endpoint.ips.is_empty() && !view.notes.is_empty());
    }

    #[test]
    fn a_rejected_endpoint_does_not_hold_back_the_others() {
        let ep = |name: &str, ip: &str| endpoint_in_x(name, &[ip], false);
        let file = InventoryFile { namespaces: vec![], endpoints: vec![ep("a", "10.0.0.1"), ep("b", "10.0.0.1"), ep("c", "10.0.0.3")] };
        let (inventory, rejected) = build_inventory(file);
        assert_eq!(inventory.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].starts_with("pod x/b: ips[0]:"), "{rejected:?}");
    }

    /// Pods that share one address (e.g. an IP reused while its old pod terminates, or pods
    /// written to collide on purpose): one is kept, every other is left out and named, in one
    /// pass over the endpoints. Each rejection re-validated everything before (quadratic: with
    /// 10,000 pods on one address, 10,000 validations of the whole inventory per build).
    #[test]
    fn many_pods_sharing_one_address_are_rejected_in_one_pass() {
        let ep = |name: String, ips: &[&str]| endpoint_in_x(&name, ips, true);
        const SHARING: usize = 10_000;
        let mut endpoints: Vec<EndpointSpec> = (0..SHARING).map(|i| ep(format!("p-{i:05}"), &["10.9.0.1"])).collect();
        endpoints.push(ep("other".into(), &["10.9.0.2"]));
        let (inventory, rejected) = build_inventory(InventoryFile { namespaces: vec![], endpoints });
        assert_eq!(inventory.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["p-00000", "other"]);
        assert_eq!(rejected.len(), SHARING - 1);
        assert!(rejected.iter().all(|r| r.contains(": ips[0]: 10.9.0.1 is already used by x/p-00000")), "{:?}", &rejected[..3]);
        assert_eq!(rejected[0], "pod x/p-00001: ips[0]: 10.9.0.1 is already used by x/p-00000");
        assert_eq!(rejected.last().map(String::as_str), Some("pod x/p-09999: ips[0]: 10.9.0.1 is already used by x/p-00000"));
    }

    /// A rejected pod leaves nothing behind: its name and its addresses before the bad one stay
    /// free for the pods after it, as if it had never been listed.
    #[test]
    fn a_rejected_endpoint_reserves_nothing() {
        let ep = |name: &str, ips: &[&str]| endpoint_in_x(name, ips, true);
        let bad_namespace = NamespaceSpec { name: "Not_A_Label".into(), labels: Default::default() };
        let file = InventoryFile {
            namespaces: vec![bad_namespace, NamespaceSpec { name: "x".into(), labels: Default::default() }],
            endpoints: vec![ep("a", &["10.0.0.1", "127.0.0.1"]), ep("b", &["10.0.0.1"]), ep("a", &["10.0.0.2"])],
        };
        let (inventory, rejected) = build_inventory(file);
        let kept: Vec<_> = inventory.endpoints.iter().map(|e| (e.name.as_str(), e.ips[0].to_string())).collect();
        assert_eq!(kept, [("b", "10.0.0.1".to_string()), ("a", "10.0.0.2".to_string())]);
        assert_eq!(inventory.namespaces.keys().collect::<Vec<_>>(), ["x"]);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[0].starts_with("namespace Not_A_Label: name: "), "{rejected:?}");
        assert!(rejected[1].starts_with("pod x/a: ips[1]: 127.0.0.1 is a loopback address"), "{rejected:?}");
    }

    #[test]
    fn network_policy_goes_through_the_segmentation_parser() {
        let np: KubeNetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "allow-web", "namespace": "shop", "resourceVersion": "7", "uid": "u",
                          "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": "sql"}]}]}
        }))
        .expect("policy json");
        let parsed = network_policy(&np).expect("valid");
        assert_eq!(parsed.key(), "shop/allow-web");
        assert!(parsed.ingress_isolation && !parsed.egress_isolation);
        assert_eq!(parsed.source, "kubernetes:networkpolicy/shop/allow-web");

        let mut bad = np.clone();
        bad.spec.as_mut().unwrap().policy_types = Some(vec!["Sideways".into()]);
        let err = network_policy(&bad).unwrap_err();
        assert!(err.contains("spec.policyTypes[0]"), "{err}");
    }
}
