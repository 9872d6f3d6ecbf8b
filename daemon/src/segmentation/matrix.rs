//! Reachability matrix and explanations, answered from the compiled map contents through
//! `lookup` (the kernel's logic), never from the YAML.
//!
//! Both answer for this node: a peer-only endpoint (a pod on another node) is a peer whose own
//! egress and ingress hooks run on its node, so a pair involving it shows only what this node
//! enforces (the local side's hook). The matrix lists such endpoints under `peers`; the
//! explanation says "not enforced here" for their side.

use std::net::IpAddr;

use palisade_common::{DIRECTION_EGRESS, PROTO_ANY};
use serde::Serialize;

use super::compile::{Compiled, CompiledEndpoint, IdentityKind};
use super::lookup::{HookDecision, Verdict, lookup};
use crate::inventory::Protocol;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MatrixEntry {
    pub from: String,
    pub to: String,
    pub allowed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Matrix {
    pub port: u16,
    pub protocol: String,
    pub results: Vec<MatrixEntry>,
    /// Peer-only endpoints among `results` (their own hooks run on their node, not here).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

/// Address pairs a pod pair is probed with: every family both have (IPv4 first).
fn pairs(from: &CompiledEndpoint, to: &CompiledEndpoint) -> Vec<(IpAddr, IpAddr)> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let a = from.ips.iter().find(|ip| ip.is_ipv4() == v4);
        let b = to.ips.iter().find(|ip| ip.is_ipv4() == v4);
        if let (Some(a), Some(b)) = (a, b) {
            out.push((*a, *b));
        }
    }
    out
}

/// Per address family verdicts between two endpoints.
pub fn verdicts(compiled: &Compiled, from: &CompiledEndpoint, to: &CompiledEndpoint, protocol: Protocol, port: u16) -> Vec<(IpAddr, IpAddr, Verdict)> {
    pairs(from, to)
        .into_iter()
        .map(|(a, b)| (a, b, lookup(compiled, a, b, protocol.ip_proto(), port)))
        .collect()
}

/// Every ordered pair (self included), in inventory order. A pair is allowed when every address
/// family both pods have is allowed; pods without a common family are reported as not allowed.
/// For a pair with a peer-only endpoint only this node's side is enforced (see the module docs).
pub fn matrix(compiled: &Compiled, protocol: Protocol, port: u16) -> Matrix {
    let mut eps: Vec<&CompiledEndpoint> = compiled.endpoints.values().collect();
    eps.sort_by_key(|e| e.id);
    let mut results = Vec::new();
    for from in &eps {
        for to in &eps {
            let v = verdicts(compiled, from, to, protocol, port);
            let allowed = !v.is_empty() && v.iter().all(|(_, _, v)| v.allowed);
            results.push(MatrixEntry { from: from.key(), to: to.key(), allowed });
        }
    }
    let peers = eps.iter().filter(|e| e.peer_only).map(|e| e.key()).collect();
    Matrix { port, protocol: protocol.as_str().to_string(), results, peers }
}

/// The matrix as a truth table ('.' allowed, 'X' denied), rows = from, columns = to.
pub fn table(m: &Matrix) -> String {
    use crate::output::{Cell, Table};
    let mut names: Vec<&str> = Vec::new();
    for r in &m.results {
        if !names.contains(&r.from.as_str()) {
            names.push(&r.from);
        }
    }
    let mut out = format!("{}/{}  (rows: from, columns: to; . allowed, X denied)\n", m.protocol, m.port);
    let headers: Vec<&str> = std::iter::once("").chain(names.iter().copied()).collect();
    let mut grid = Table::new(&headers).align_right(&(1..headers.len()).collect::<Vec<_>>());
    for from in &names {
        let mut row = vec![Cell::plain(from)];
        for to in &names {
            let allowed = m.results.iter().find(|r| r.from == *from && r.to == *to).is_some_and(|r| r.allowed);
            row.push(Cell::plain(if allowed { "." } else { "X" }));
        }
        grid.push(row);
    }
    out.push_str(&grid.render(false));
    if !m.peers.is_empty() {
        out.push_str(&format!(
            "peer-only (on other nodes; only this node's side is enforced here): {}\n",
            m.peers.join(", ")
        ));
    }
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub allowed: bool,
    /// Policies isolating the source for egress / the destination for ingress.
    pub egress_policies: Vec<String>,
    pub ingress_policies: Vec<String>,
    pub families: Vec<FamilyExplanation>,
    /// How the named ports of those policies' rules resolve on the destination pod (the pod a
    /// named port is looked up on, for egress and ingress alike).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FamilyExplanation {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub allowed: bool,
    pub egress: String,
    pub ingress: String,
}

pub fn explain(compiled: &Compiled, from: &CompiledEndpoint, to: &CompiledEndpoint, protocol: Protocol, port: u16) -> Explanation {
    let names = |idx: &[usize]| idx.iter().map(|i| compiled.policies[*i].key.clone()).collect::<Vec<_>>();
    let families: Vec<FamilyExplanation> = verdicts(compiled, from, to, protocol, port)
        .into_iter()
        .map(|(src, dst, v)| FamilyExplanation {
            src,
            dst,
            allowed: v.allowed,
            egress: describe(compiled, &v.egress, DIRECTION_EGRESS, from),
            ingress: match &v.ingress {
                Some(d) => describe(compiled, d, palisade_common::DIRECTION_INGRESS, to),
                None => "not reached (dropped at the source's egress)".to_string(),
            },
        })
        .collect();
    Explanation {
        from: from.key(),
        to: to.key(),
        port,
        protocol: protocol.as_str().to_string(),
        allowed: !families.is_empty() && families.iter().all(|f| f.allowed),
        egress_policies: names(&from.egress_policies),
        ingress_policies: names(&to.ingress_policies),
        families,
        named_ports: named_port_resolution(compiled, from, to),
    }
}

/// For each rule (of the source's egress and the destination's ingress policies) that uses
/// named ports: what each name resolved to on the destination pod.
fn named_port_resolution(compiled: &Compiled, from: &CompiledEndpoint, to: &CompiledEndpoint) -> Vec<String> {
    let mut out = Vec::new();
    for (direction, policies) in [("egress", &from.egress_policies), ("ingress", &to.ingress_policies)] {
        for &pi in policies {
            let key = &compiled.policies[pi].key;
            let mut rules: Vec<&super::compile::RuleRef> = compiled.rules.values().filter(|r| &r.policy == key && r.direction == direction).collect();
            rules.sort_by_key(|r| r.index);
            for rule in rules {
                for (name, protocol) in &rule.named_ports {
                    let ports: Vec<String> = to
                        .ports
                        .iter()
                        .filter(|p| p.name.as_deref() == Some(name.as_str()) && p.protocol == *protocol)
                        .map(|p| p.port.to_string())
                        .collect();
                    let resolved = if ports.is_empty() {
                        format!("{} declares no {protocol} port named {name}: matches nothing there", to.key())
                    } else {
                        format!("resolved to {protocol}/{} on {}", ports.join(","), to.key())
                    };
                    out.push(format!("{key} {direction} rule {}: port {name}/{protocol} {resolved}", rule.index));
                }
            }
        }
    }
    out
}

/// At most this many pods are named per identity (then "and N more").
const PODS_NAMED: usize = 5;

fn pod_list(mut pods: Vec<String>) -> String {
    if pods.is_empty() {
        return "no pods".to_string();
    }
    pods.sort();
    let more = pods.len().saturating_sub(PODS_NAMED);
    pods.truncate(PODS_NAMED);
    let list = pods.join(", ");
    if more > 0 { format!("pods {list} and {more} more") } else { format!("pods {list}") }
}

/// An identity as operators know it: what it stands for and the pods behind it.
pub fn identity_name(compiled: &Compiled, id: u32) -> String {
    match compiled.identities.get(&id) {
        Some(IdentityKind::Labels { namespace, labels, named_ports }) => {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let pods = pod_list(compiled.endpoints.values().filter(|e| e.identity == id).map(|e| e.key()).collect());
            let ports = if named_ports.is_empty() { String::new() } else { format!(", named ports {}", named_ports.join(" ")) };
            format!("identity {id} ({pods}: namespace {namespace}, {{{}}}{ports})", l.join(", "))
        }
        Some(IdentityKind::Cidr { cidr }) => {
            let pods = match super::policy::Cidr::parse(cidr) {
                Ok(c) => compiled.endpoints.values().filter(|e| e.ips.iter().any(|ip| c.contains(*ip))).map(|e| e.key()).collect(),
                Err(_) => Vec::new(),
            };
            if pods.is_empty() {
                format!("identity {id} (cidr {cidr})")
            } else {
                format!("identity {id} (cidr {cidr}, {})", pod_list(pods))
            }
        }
        None if id == 0 => "any peer".to_string(),
        None if id == palisade_common::IDENTITY_WORLD => "identity 1 (world)".to_string(),
        None => format!("identity {id}"),
    }
}

fn describe(compiled: &Compiled, d: &HookDecision, direction: u8, ep: &CompiledEndpoint) -> String {
    let dir = if direction == DIRECTION_EGRESS { "egress" } else { "ingress" };
    match d {
        HookDecision::NotEndpoint if ep.peer_only => format!(
            "{dir}: not enforced here ({} is a peer-only endpoint: its node enforces its policies)",
            ep.key()
        ),
        HookDecision::NotEndpoint => format!("{dir}: address is not an endpoint"),
        HookDecision::QuarantineException => format!("{dir}: quarantined, allowed by exception"),
        HookDecision::QuarantineDenied => format!("{dir}: {} is quarantined", ep.key()),
        HookDecision::UnknownEndpoint => format!("{dir}: {} has no endpoint in the datapath yet (fail-closed default)", ep.key()),
        HookDecision::UnknownEndpointLocal => format!("{dir}: allowed (traffic inside a pod with no endpoint yet)"),
        HookDecision::Conntrack => format!("{dir}: allowed by connection tracking"),
        HookDecision::SelfTraffic => format!("{dir}: allowed (a pod always reaches itself)"),
        HookDecision::NotIsolated => format!("{dir}: allowed ({} is selected by no policy with {dir} isolation)", ep.key()),
        HookDecision::Allowed { rule_id, peer_identity, key_protocol, key_port_plen, key_port } => {
            let Some(rule) = compiled.rules.get(rule_id) else {
                return format!("{dir}: allowed by rule {rule_id}, which these contents do not describe");
            };
            let port = match (*key_protocol, *key_port_plen) {
                (PROTO_ANY, _) => "any protocol".to_string(),
                (_, 0) => "any port".to_string(),
                (_, 16) => format!("port {key_port}"),
                (_, plen) => format!("ports {key_port}-{}", *key_port as u32 + (1u32 << (16 - plen)) - 1),
            };
            format!(
                "{dir}: allowed by {} {dir} rule {} ({}) [{}]; matched {} on {port}",
                rule.policy,
                rule.index,
                rule.summary,
                rule.source,
                identity_name(compiled, *peer_identity)
            )
        }
        HookDecision::Denied { peer_identity } => format!(
            "{dir}: denied: {} is isolated for {dir} and no rule of its policies allows {}",
            ep.key(),
            identity_name(compiled, *peer_identity)
        ),
    }
}
