//! A direct evaluation of NetworkPolicy, written from the Kubernetes API reference
//! (networking.k8s.io/v1 `NetworkPolicySpec`, `NetworkPolicyIngressRule`/`EgressRule`,
//! `NetworkPolicyPeer`, `NetworkPolicyPort`, `IPBlock`; apimachinery `LabelSelector`) and the
//! API server's defaulting of `policyTypes`, over the API objects themselves
//! (`k8s_openapi` types). It shares nothing with the parser, the validation or the compiler: no
//! [`super::policy`] model, no identities, no map keys, no port blocks. It exists to test them
//! (the differential property tests, the fuzz oracle); the datapath never uses it. It assumes
//! the objects are valid (the API server's validation is the parser's job, tested on its own).
//!
//! What the specification says, as evaluated here, for a packet from `src` to `dst`:
//! - A pod is isolated for a direction when some NetworkPolicy of its namespace selects it
//!   (`podSelector`; empty selects every pod of the namespace) and has that direction in its
//!   `policyTypes`. `policyTypes` not given (or empty) is defaulted by the API server: Ingress
//!   always, Egress when the policy has at least one egress rule (`egress: []` is none). Rules of
//!   a direction not in `policyTypes` have no effect.
//! - A non-isolated pod allows everything in that direction. An isolated one allows what at
//!   least one rule of that direction, over all the policies that isolate it, allows; no rules
//!   (`ingress` missing or `[]`) allow nothing.
//! - A rule allows a peer when `from`/`to` is missing or empty (every peer), or one of its
//!   entries matches. `podSelector` alone: pods of the policy's namespace matching it;
//!   `namespaceSelector` alone: every pod of the namespaces matching it; both: pods matching the
//!   pod selector in the namespaces matching the namespace selector; `ipBlock`: addresses inside
//!   `cidr` and outside every `except` (pod addresses included: palisade matches them, the
//!   specification leaves pod addresses in ipBlocks to the implementation).
//! - A rule allows a port when `ports` is missing or empty (every protocol and port, ICMP
//!   included), or one entry matches: its `protocol` (default TCP) AND its `port`: missing is
//!   every port of the protocol; a number is that port, or with `endPort` the inclusive range
//!   `port..=endPort`; a name is a container port of that name and protocol on the destination
//!   pod (for egress the peer, for ingress the selected pod), never an address outside the
//!   inventory.
//! - Both sides must allow: egress at the source pod, ingress at the destination pod. A pod's
//!   traffic to itself is always allowed. Sides that are not pods of this node (an outside
//!   address, a peer-only pod, enforced on its own node) allow.
//! - Label selectors: every `matchLabels` pair and every `matchExpressions` requirement (In: the
//!   key is present with one of the values; NotIn: absent or none of the values; Exists;
//!   DoesNotExist). An empty selector matches everything. Namespaces carry
//!   `kubernetes.io/metadata.name`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::inventory::{Endpoint, Inventory};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// Whether the policies allow a packet from `src` to `dst` (`protocol` an IANA number; `port`
/// the destination port, ignored by the specification for protocols without ports).
pub fn allowed(inventory: &Inventory, policies: &[NetworkPolicy], src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> bool {
    let pod_at = |ip: IpAddr| inventory.endpoints.iter().find(|e| e.ips.contains(&ip));
    let (src_pod, dst_pod) = (pod_at(src), pod_at(dst));
    if src == dst || matches!((src_pod, dst_pod), (Some(a), Some(b)) if std::ptr::eq(a, b)) {
        return true;
    }
    let packet = Packet { src, dst, src_pod, dst_pod, protocol, port };
    let side = |direction: Direction, pod: Option<&Endpoint>| match pod {
        Some(pod) if !pod.peer_only => side_allows(inventory, policies, direction, pod, &packet),
        _ => true,
    };
    side(Direction::Egress, src_pod) && side(Direction::Ingress, dst_pod)
}

struct Packet<'a> {
    src: IpAddr,
    dst: IpAddr,
    src_pod: Option<&'a Endpoint>,
    dst_pod: Option<&'a Endpoint>,
    protocol: u8,
    port: u16,
}

fn namespace_of(policy: &NetworkPolicy) -> &str {
    policy.metadata.namespace.as_deref().unwrap_or("default")
}

/// The policy's types after the API server's defaulting.
fn affects(policy: &NetworkPolicy, direction: Direction) -> bool {
    let Some(spec) = &policy.spec else { return false };
    match spec.policy_types.as_deref() {
        None | Some([]) => match direction {
            Direction::Ingress => true,
            Direction::Egress => spec.egress.as_ref().is_some_and(|rules| !rules.is_empty()),
        },
        Some(types) => types.iter().any(|t| {
            t == match direction {
                Direction::Ingress => "Ingress",
                Direction::Egress => "Egress",
            }
        }),
    }
}

fn side_allows(inventory: &Inventory, policies: &[NetworkPolicy], direction: Direction, pod: &Endpoint, packet: &Packet) -> bool {
    let isolating: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| namespace_of(p) == pod.namespace)
        .filter(|p| selects(p.spec.as_ref().and_then(|s| s.pod_selector.as_ref()), &pod.labels))
        .filter(|p| affects(p, direction))
        .collect();
    if isolating.is_empty() {
        return true;
    }
    isolating.iter().any(|policy| {
        let Some(spec) = &policy.spec else { return false };
        match direction {
            Direction::Ingress => spec.ingress.iter().flatten().any(|rule| {
                peers_allow(inventory, policy, rule.from.as_deref(), packet.src, packet.src_pod)
                    && ports_allow(rule.ports.as_deref(), packet)
            }),
            Direction::Egress => spec.egress.iter().flatten().any(|rule| {
                peers_allow(inventory, policy, rule.to.as_deref(), packet.dst, packet.dst_pod)
                    && ports_allow(rule.ports.as_deref(), packet)
            }),
        }
    })
}

fn peers_allow(
    inventory: &Inventory,
    policy: &NetworkPolicy,
    peers: Option<&[NetworkPolicyPeer]>,
    peer_ip: IpAddr,
    peer_pod: Option<&Endpoint>,
) -> bool {
    let peers = peers.unwrap_or_default();
    peers.is_empty()
        || peers.iter().any(|peer| {
            if let Some(block) = &peer.ip_block {
                return in_cidr(&block.cidr, peer_ip) && !block.except.iter().flatten().any(|e| in_cidr(e, peer_ip));
            }
            let Some(pp) = peer_pod else { return false };
            let namespace_ok = match &peer.namespace_selector {
                None => pp.namespace == namespace_of(policy),
                Some(selector) => inventory.namespace_labels(&pp.namespace).is_some_and(|labels| selects(Some(selector), labels)),
            };
            namespace_ok && (peer.pod_selector.is_none() || selects(peer.pod_selector.as_ref(), &pp.labels))
        })
}

fn ports_allow(ports: Option<&[NetworkPolicyPort]>, packet: &Packet) -> bool {
    let ports = ports.unwrap_or_default();
    ports.is_empty() || ports.iter().any(|p| port_allows(p, packet))
}

fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

fn port_allows(p: &NetworkPolicyPort, packet: &Packet) -> bool {
    let protocol = p.protocol.as_deref().unwrap_or("TCP");
    if protocol_number(protocol) != Some(packet.protocol) {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => {
            let (first, last) = (i64::from(*n), i64::from(p.end_port.unwrap_or(*n)));
            (first..=last).contains(&i64::from(packet.port))
        }
        Some(IntOrString::String(name)) => packet.dst_pod.is_some_and(|pod| {
            pod.ports.iter().any(|np| {
                np.name.as_deref() == Some(name.as_str()) && np.protocol.as_str() == protocol && np.port == packet.port
            })
        }),
    }
}

/// apimachinery's LabelSelector semantics (`None` here is "no selector given", which callers
/// resolve themselves; an empty selector matches every label set).
fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(selector) = selector else { return true };
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// `address` is inside the CIDR `cidr` (same family, the first `len` bits equal).
fn in_cidr(cidr: &str, address: IpAddr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else { return false };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
    match (net, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if len <= 128 => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}
