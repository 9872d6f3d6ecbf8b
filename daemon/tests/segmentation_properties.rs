//! The differential tester (issue 17): random scenarios over the whole networking.k8s.io/v1
//! NetworkPolicy surface, loaded the way palisade loads them (the Kubernetes converter and the
//! policy-file parser), compiled, and looked up the way the kernel program looks them up
//! (`segmentation::lookup`), compared packet by packet with `segmentation::reference`, a direct
//! evaluation of the API objects written from the specification.
//!
//! A scenario: three namespaces with random labels; eight pods in random namespaces with random
//! labels (few values, so that pods share identities), IPv4, IPv6 or both, random named ports
//! (one name on different numbers and protocols on different pods), some on another node
//! (peer-only); up to five policies with random `podSelector`s (matchLabels and every
//! matchExpressions operator, empty), `policyTypes` missing, empty or any listing (so implied
//! types, and rules of an unlisted type, which must have no effect), rule lists missing, empty
//! or with rules (`[{}]` included), peers missing, empty or a mix of podSelector,
//! namespaceSelector, both, and ipBlock with and without except (IPv4 and IPv6), ports missing,
//! empty or a mix of protocols (given or defaulted), numbers, ranges (`endPort`, equal to the
//! port too), named ports and no port. Packets: every pair of addresses of one family among the
//! pods and five outside addresses, ICMP and TCP/UDP/SCTP on random ports (the ones the
//! scenarios name, and one more).
//!
//! A mismatch prints the shrunk scenario (its policies as JSON, ready for
//! testdata/netpol/cases) and the packet. Cases: `PROPTEST_CASES` (default below, chosen so
//! that the debug build finishes well within a minute on the CI box; see DEVELOPERS.md).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::networking::v1::NetworkPolicy as KubeNetworkPolicy;
use palisade::inventory::Inventory;
use palisade::segmentation::policy::PolicySet;
use palisade::segmentation::{compile, lookup, reference};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Cases per run unless PROPTEST_CASES says otherwise.
const DEFAULT_CASES: u32 = 2000;

const NAMESPACES: [&str; 3] = ["shop", "ops", "dev"];
const SLOTS: usize = 8;
/// Addresses outside the inventory that packets also come from or go to.
const OUTSIDE: [&str; 5] = ["198.18.0.200", "10.1.2.3", "10.2.0.1", "2001:db8::200", "2001:db8:ff::1"];
/// Ports the scenarios name (policies and named ports).
const PORTS: [u16; 8] = [53, 80, 81, 443, 5353, 8080, 9090, 9999];
const LABEL_KEYS: [&str; 5] = ["app", "tier", "team", "env", "kubernetes.io/metadata.name"];
const LABEL_VALUES: [&str; 8] = ["web", "db", "a", "b", "prod", "dev", "shop", "ops"];
const PORT_NAMES: [&str; 5] = ["http", "dns", "grpc", "sctp", "nope"];

fn v4(slot: usize) -> String {
    format!("198.18.0.{}", slot + 1)
}

fn v6(slot: usize) -> String {
    format!("2001:db8::{}", slot + 1)
}

// ---- inventory ---------------------------------------------------------------------------------

fn optional_label(key: &'static str, values: Vec<&'static str>) -> impl Strategy<Value = Option<(String, String)>> {
    prop::option::of(prop::sample::select(values).prop_map(move |v| (key.to_string(), v.to_string())))
}

#[derive(Debug, Clone)]
struct Pod {
    namespace: &'static str,
    labels: BTreeMap<String, String>,
    /// 0: IPv4 only, 1: IPv6 only, 2: both.
    family: u8,
    /// (name, port, protocol)
    ports: Vec<(&'static str, u16, &'static str)>,
    peer_only: bool,
}

fn pod_strategy() -> impl Strategy<Value = Pod> {
    let named = (
        prop::option::of(prop::sample::select(vec![(80u16, "TCP"), (8080, "TCP")])),
        prop::option::of(prop::sample::select(vec![(53u16, "UDP"), (53, "TCP"), (5353, "UDP")])),
        prop::option::of(prop::sample::select(vec![(5353u16, "UDP"), (9090, "TCP")])),
        prop::option::of(Just((9999u16, "SCTP"))),
    );
    (
        prop::sample::select(NAMESPACES.to_vec()),
        optional_label("app", vec!["web", "db"]),
        optional_label("tier", vec!["a", "b"]),
        0u8..3,
        named,
        prop::bool::weighted(0.25),
    )
        .prop_map(|(namespace, app, tier, family, (http, dns, grpc, sctp), peer_only)| {
            let mut ports = Vec::new();
            for (name, p) in [("http", http), ("dns", dns), ("grpc", grpc), ("sctp", sctp)] {
                if let Some((port, protocol)) = p {
                    ports.push((name, port, protocol));
                }
            }
            Pod { namespace, labels: app.into_iter().chain(tier).collect(), family, ports, peer_only }
        })
}

fn namespace_labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    (optional_label("team", vec!["a", "b"]), optional_label("env", vec!["prod", "dev"]))
        .prop_map(|(team, env)| team.into_iter().chain(env).collect())
}

#[derive(Debug, Clone)]
struct World {
    namespaces: Vec<BTreeMap<String, String>>,
    pods: Vec<Pod>,
}

impl World {
    fn inventory_yaml(&self) -> String {
        let mut text = String::from("namespaces:\n");
        for (ns, labels) in NAMESPACES.iter().zip(&self.namespaces) {
            text.push_str(&format!("  - name: {ns}\n    labels: {}\n", serde_json::to_string(labels).expect("json")));
        }
        text.push_str("endpoints:\n");
        for (slot, pod) in self.pods.iter().enumerate() {
            let ips = match pod.family {
                0 => vec![v4(slot)],
                1 => vec![v6(slot)],
                _ => vec![v4(slot), v6(slot)],
            };
            let ports: Vec<Value> =
                pod.ports.iter().map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol})).collect();
            text.push_str(&format!(
                "  - namespace: {}\n    name: p{slot}\n    labels: {}\n    ips: {}\n    ports: {}\n",
                pod.namespace,
                serde_json::to_string(&pod.labels).expect("json"),
                serde_json::to_string(&ips).expect("json"),
                Value::Array(ports)
            ));
            if pod.peer_only {
                text.push_str("    peerOnly: true\n");
            } else {
                text.push_str(&format!("    cgroup: /props/p{slot}\n"));
            }
        }
        text
    }
}

fn world_strategy() -> impl Strategy<Value = World> {
    (prop::collection::vec(namespace_labels_strategy(), NAMESPACES.len()), prop::collection::vec(pod_strategy(), SLOTS))
        .prop_map(|(namespaces, pods)| World { namespaces, pods })
}

// ---- policies, as the API objects (JSON) -------------------------------------------------------

/// A label selector: matchLabels (missing, empty or with entries) and matchExpressions with
/// every operator.
fn selector_strategy() -> impl Strategy<Value = Value> {
    let requirement = (
        prop::sample::select(LABEL_KEYS.to_vec()),
        prop::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        prop::sample::subsequence(LABEL_VALUES.to_vec(), 1..=3),
    )
        .prop_map(|(key, operator, values)| match operator {
            "In" | "NotIn" => json!({"key": key, "operator": operator, "values": values}),
            _ => json!({"key": key, "operator": operator}),
        });
    (
        prop::option::of(prop::collection::btree_map(
            prop::sample::select(LABEL_KEYS.to_vec()),
            prop::sample::select(LABEL_VALUES.to_vec()),
            0..=2,
        )),
        prop::option::of(prop::collection::vec(requirement, 0..=2)),
    )
        .prop_map(|(labels, expressions)| {
            let mut s = serde_json::Map::new();
            if let Some(labels) = labels {
                s.insert("matchLabels".into(), json!(labels));
            }
            if let Some(expressions) = expressions {
                s.insert("matchExpressions".into(), Value::Array(expressions));
            }
            Value::Object(s)
        })
}

fn ip_block_strategy() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!({"cidr": "198.18.0.0/24", "except": ["198.18.0.2/32"]}),
        json!({"cidr": "198.18.0.0/29", "except": ["198.18.0.4/30"]}),
        json!({"cidr": "198.18.0.0/16"}),
        json!({"cidr": "198.18.0.5/32"}),
        json!({"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}),
        json!({"cidr": "0.0.0.0/0", "except": ["198.18.0.0/28"]}),
        json!({"cidr": "0.0.0.0/0"}),
        json!({"cidr": "2001:db8::/64", "except": ["2001:db8::3/128"]}),
        json!({"cidr": "2001:db8::/125", "except": ["2001:db8::4/126", "2001:db8::1/128"]}),
        json!({"cidr": "::/0"}),
        json!({"cidr": "2001:db8::6/127", "except": []}),
    ])
}

fn peer_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector_strategy().prop_map(|s| json!({"podSelector": s})),
        selector_strategy().prop_map(|s| json!({"namespaceSelector": s})),
        (selector_strategy(), selector_strategy()).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        ip_block_strategy().prop_map(|b| json!({"ipBlock": b})),
    ]
}

fn port_strategy() -> impl Strategy<Value = Value> {
    let port = prop_oneof![
        Just(None),
        prop::sample::select(PORTS.to_vec()).prop_map(|p| Some(json!({"port": p}))),
        (prop::sample::select(PORTS.to_vec()), prop_oneof![Just(0u16), 1u16..40, 100u16..5000])
            .prop_map(|(p, len)| Some(json!({"port": p, "endPort": p.saturating_add(len)}))),
        (1u16..9000, 1u16..2000).prop_map(|(p, len)| Some(json!({"port": p, "endPort": p.saturating_add(len)}))),
        prop::sample::select(PORT_NAMES.to_vec()).prop_map(|n| Some(json!({"port": n}))),
    ];
    (prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP"])), port).prop_map(|(protocol, port)| {
        let mut p = match port {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(protocol) = protocol {
            p.insert("protocol".into(), json!(protocol));
        }
        Value::Object(p)
    })
}

/// A rule: peers and ports each missing, empty or listed (`{}` is a rule with neither).
fn rule_strategy(peers_field: &'static str) -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::collection::vec(peer_strategy(), 0..=3)),
        prop::option::of(prop::collection::vec(port_strategy(), 0..=3)),
    )
        .prop_map(move |(peers, ports)| {
            let mut r = serde_json::Map::new();
            if let Some(peers) = peers {
                r.insert(peers_field.into(), Value::Array(peers));
            }
            if let Some(ports) = ports {
                r.insert("ports".into(), Value::Array(ports));
            }
            Value::Object(r)
        })
}

fn policy_strategy() -> impl Strategy<Value = (&'static str, Value)> {
    (
        prop::sample::select(NAMESPACES.to_vec()),
        selector_strategy(),
        prop::sample::select(vec![
            None,
            Some(vec![]),
            Some(vec!["Ingress"]),
            Some(vec!["Egress"]),
            Some(vec!["Ingress", "Egress"]),
            Some(vec!["Egress", "Ingress"]),
        ]),
        prop::option::of(prop::collection::vec(rule_strategy("from"), 0..=3)),
        prop::option::of(prop::collection::vec(rule_strategy("to"), 0..=3)),
    )
        .prop_map(|(namespace, pod_selector, types, ingress, egress)| {
            let mut spec = serde_json::Map::new();
            spec.insert("podSelector".into(), pod_selector);
            if let Some(types) = types {
                spec.insert("policyTypes".into(), json!(types));
            }
            if let Some(ingress) = ingress {
                spec.insert("ingress".into(), Value::Array(ingress));
            }
            if let Some(egress) = egress {
                spec.insert("egress".into(), Value::Array(egress));
            }
            (namespace, Value::Object(spec))
        })
}

/// Up to five policies, named p0, p1, ... (unique in their namespace).
fn policies_strategy() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(policy_strategy(), 0..=5).prop_map(|policies| {
        policies
            .into_iter()
            .enumerate()
            .map(|(i, (namespace, spec))| {
                json!({
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": format!("p{i}"), "namespace": namespace},
                    "spec": spec,
                })
            })
            .collect()
    })
}

/// The ports packets use in one case: the named ones in a random order, some of them, and
/// one random port.
fn packet_ports_strategy() -> impl Strategy<Value = Vec<u16>> {
    (prop::sample::subsequence(PORTS.to_vec(), 3..=4), 1u16..=65535).prop_map(|(mut ports, extra)| {
        ports.push(extra);
        ports
    })
}

fn addresses(inventory: &Inventory) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = inventory.endpoints.iter().flat_map(|e| e.ips.iter().copied()).collect();
    out.extend(OUTSIDE.iter().map(|a| a.parse::<IpAddr>().expect("address")));
    out
}

/// The scenario as a testdata/netpol-style report: the inventory and the policies.
fn describe(world: &World, policies: &[Value]) -> String {
    let mut out = format!("inventory:\n{}policies:\n", world.inventory_yaml());
    for p in policies {
        out.push_str(&format!("---\n{p}\n"));
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(DEFAULT_CASES),
        max_shrink_iters: 4096,
        // Mismatches become testdata/netpol cases, not proptest-regressions files.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_maps_answer_like_the_specification(
        world in world_strategy(),
        policies in policies_strategy(),
        ports in packet_ports_strategy(),
    ) {
        let inventory = Inventory::parse(&world.inventory_yaml(), Path::new("props.yaml")).expect("generated inventory is valid");
        let objects: Vec<KubeNetworkPolicy> =
            policies.iter().map(|p| serde_json::from_value(p.clone()).expect("a NetworkPolicy object")).collect();
        // Kubernetes mode: each object through the converter the watcher uses. Every generated
        // policy is valid for the API server, so palisade must accept every one.
        let mut from_k8s = PolicySet::default();
        for object in &objects {
            match palisade::k8s::convert::network_policy(object) {
                Ok(p) => from_k8s.policies.push(std::sync::Arc::new(p)),
                Err(e) => prop_assert!(false, "a valid policy was rejected: {e}\n{}", describe(&world, &policies)),
            }
        }
        // File mode: the same objects as one multi-document policy file.
        let text: String = policies.iter().map(|p| format!("---\n{p}\n")).collect();
        let from_file = PolicySet::parse(&text, Path::new("props.yaml"));
        prop_assert!(from_file.is_ok(), "a valid policy file was rejected: {:?}\n{}", from_file.err(), describe(&world, &policies));
        let mut from_file = from_file.expect("checked");
        for (a, b) in from_file.policies.iter_mut().zip(&from_k8s.policies) {
            // The source names the file or the object, in the warnings too.
            prop_assert_eq!(a.ignored.len(), b.ignored.len());
            let a = std::sync::Arc::make_mut(a);
            a.source = b.source.clone();
            a.ignored = b.ignored.clone();
        }
        prop_assert_eq!(&from_file, &from_k8s, "file and Kubernetes modes disagree");

        let compiled = compile(&inventory, &from_k8s);
        prop_assert!(compiled.over_capacity.is_none());
        prop_assert_eq!(&compiled, &compile(&inventory, &from_k8s), "compiling is not deterministic");
        let all = addresses(&inventory);
        for &src in &all {
            for &dst in &all {
                if src.is_ipv4() != dst.is_ipv4() || src == dst {
                    continue;
                }
                let icmp = std::iter::once((1u8, 0u16));
                let ported = [6u8, 17, 132].into_iter().flat_map(|proto| ports.iter().map(move |&port| (proto, port)));
                for (protocol, port) in icmp.chain(ported) {
                    let expected = reference::allowed(&inventory, &objects, src, dst, protocol, port);
                    let verdict = lookup(&compiled, src, dst, protocol, port);
                    prop_assert_eq!(
                        verdict.allowed, expected,
                        "{} -> {} proto {} port {}: datapath {:?}, specification {}\n{}",
                        src, dst, protocol, port, verdict, expected, describe(&world, &policies)
                    );
                }
            }
        }
    }
}

// ---- what the tester found ---------------------------------------------------------------------

/// One mismatch the tester found, kept as a scenario under testdata/netpol/differential: an
/// inventory, a policy file and packets with the verdict the specification gives (written by
/// hand, not by either side).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Found {
    name: String,
    inventory: String,
    policies: String,
    packets: Vec<FoundPacket>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FoundPacket {
    from: IpAddr,
    to: IpAddr,
    protocol: String,
    port: u16,
    allowed: bool,
}

#[test]
fn mismatches_found_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/netpol/differential");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("testdata/netpol/differential").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let mut failures = Vec::new();
    for file in &files {
        let found: Found = serde_norway::from_str(&std::fs::read_to_string(file).expect("read")).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let inventory = Inventory::parse(&found.inventory, file).unwrap_or_else(|e| panic!("{e}"));
        let set = PolicySet::parse(&found.policies, file).unwrap_or_else(|e| panic!("{e}"));
        let objects: Vec<KubeNetworkPolicy> = serde_norway::Deserializer::from_str(&found.policies)
            .map(|d| serde::Deserialize::deserialize(d).expect("a NetworkPolicy object"))
            .collect();
        let compiled = compile(&inventory, &set);
        for p in &found.packets {
            let protocol = match p.protocol.as_str() {
                "ICMP" => 1,
                other => other.parse::<palisade::inventory::Protocol>().expect("protocol").ip_proto(),
            };
            let verdict = lookup(&compiled, p.from, p.to, protocol, p.port);
            let spec = reference::allowed(&inventory, &objects, p.from, p.to, protocol, p.port);
            if verdict.allowed != p.allowed || spec != p.allowed {
                failures.push(format!(
                    "{} ({}): {} -> {} {}/{}: expected {}, datapath {:?}, reference {spec}",
                    file.display(),
                    found.name,
                    p.from,
                    p.to,
                    p.protocol,
                    p.port,
                    p.allowed,
                    verdict
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
