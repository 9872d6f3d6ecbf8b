//! The fuzz targets' bodies, one function per target (the cargo-fuzz binaries in
//! fuzz_targets/ call them; daemon/tests/fuzz_corpus.rs replays the seeds and every crash
//! found through them in the ordinary test run, without cargo-fuzz or nightly).
#![allow(dead_code)]

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy as KubeNetworkPolicy;
use palisade::alerts::query::{AlertQuery, read_alerts};
use palisade::api::server::parse_operator_body;
use palisade::defaults::DEFAULT_RULES;
use palisade::events::decode::{DecodeError, decode};
use palisade::inventory::Inventory;
use palisade::inventory::InventoryFile;
use palisade::k8s::convert;
use palisade::quarantine::ResponsePolicy;
use palisade::rules::pack::{PackOptions, PackSources, RulePack, SourceFile};
use palisade::segmentation::policy::PolicySet;
use palisade::segmentation::{compile, lookup, reference};
use palisade::yaml;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::path::Path;
use std::path::PathBuf;
use std::sync::LazyLock;

// Where the header's kind is, for the decode_record target.
const KIND_OFFSET: usize = std::mem::offset_of!(palisade_common::EventHeader, kind);

/// The ring-buffer record decoder on any bytes, every event kind: the first byte picks the kind
/// written into the header, the second whether the record keeps its length (truncated or
/// oversized) or is cut to the kind's exact wire size, so both the length checks and every
/// kind's field decoding are reached. An error or an event, never a panic.
pub fn decode_record(data: &[u8]) {
    if data.len() < 2 {
        let _ = decode(data);
        return;
    }
    let (kind, exact, rest) = (data[0], data[1] & 1 == 1, &data[2..]);
    let mut record = rest.to_vec();
    if record.len() >= KIND_OFFSET + 4 {
        record[KIND_OFFSET..KIND_OFFSET + 4].copy_from_slice(&u32::from(kind).to_ne_bytes());
    }
    match decode(&record) {
        Err(DecodeError::WrongLength { expected, len, .. }) => {
            assert_ne!(expected, len);
            if exact {
                record.resize(expected, 0);
                let event = decode(&record).expect("a record of the kind's exact size decodes");
                assert!(!format!("{event:?}").is_empty());
            }
        }
        Ok(event) => {
            assert!(!format!("{event:?}").is_empty());
        }
        Err(_) => {}
    }
}

/// The inventory loader (size and depth guard, YAML, validation) on any text: an error or an
/// inventory, never a panic; and every accepted inventory keeps its invariants.
pub fn inventory(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(inventory) = Inventory::parse(text, Path::new("fuzz.yaml")) {
        let mut seen = BTreeSet::new();
        for ep in &inventory.endpoints {
            for ip in &ep.ips {
                assert!(seen.insert(ip.to_canonical()), "address {ip} accepted twice");
                assert!(!ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified(), "{ip} accepted");
            }
            assert!(inventory.namespaces.contains_key(&ep.namespace), "namespace of {} missing", ep.key());
            assert!(!(ep.peer_only && ep.cgroup.is_some()));
        }
    }
}

// The policy_oracle target's inventory (the example's pods plus a peer-only pod) and packets.
static INVENTORY: LazyLock<Inventory> = LazyLock::new(|| {
    let text = include_str!("../../policies/webapp-inventory.yaml").to_string()
        + "  - namespace: monitoring\n    name: remote\n    labels: {app: prober}\n    ips: [198.18.9.9, \"2001:db8::9:9\"]\n    ports: [{name: http, port: 8080, protocol: TCP}]\n    peerOnly: true\n";
    Inventory::parse(&text, Path::new("inventory.yaml")).expect("the fuzz inventory is valid")
});
const OUTSIDE: [&str; 4] = ["198.18.7.7", "10.0.0.1", "2001:db8::7:7", "fd00::1"];
const PORTS: [u16; 6] = [22, 53, 80, 443, 5432, 8080];
const PROTOCOLS: [u8; 4] = [1, 6, 17, 132];

/// The NetworkPolicy loader and compiler with an oracle. The text is loaded as a policy file
/// (size and depth guard, YAML, validation, budgets) and compiled against a fixed inventory; when
/// it is accepted and fits, the compiled maps (through `segmentation::lookup`, which mirrors the
/// kernel program) must answer every packet between the inventory's pods and a few outside
/// addresses like the direct evaluation of the specification (`segmentation::reference`), which
/// reads the same documents as Kubernetes API objects (k8s-openapi), not palisade's model.
pub fn policy_oracle(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(set) = PolicySet::parse(text, Path::new("fuzz.yaml")) else { return };
    // The same documents as API objects (empty documents are none, as the loader skips them).
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(palisade::yaml::strip_bom(text)) {
        match Option::<KubeNetworkPolicy>::deserialize(document) {
            Ok(Some(object)) => objects.push(object),
            Ok(None) => {}
            // What palisade accepted, k8s-openapi should read too; if not (a YAML spelling one
            // side takes and the other does not), there is nothing to compare.
            Err(_) => return,
        }
    }
    if objects.len() != set.policies.len() {
        return;
    }
    let inventory = &*INVENTORY;
    let compiled = compile(inventory, &set);
    if compiled.over_capacity.is_some() {
        return;
    }
    let pod_of = |ip: IpAddr| inventory.endpoints.iter().position(|e| e.ips.contains(&ip));
    let mut addresses: Vec<IpAddr> = inventory.endpoints.iter().flat_map(|e| e.ips.iter().copied()).collect();
    addresses.extend(OUTSIDE.iter().map(|a| a.parse::<IpAddr>().expect("address")));
    for &src in &addresses {
        for &dst in &addresses {
            if src.is_ipv4() != dst.is_ipv4() || (pod_of(src).is_some() && pod_of(src) == pod_of(dst)) || src == dst {
                continue;
            }
            for protocol in PROTOCOLS {
                for port in PORTS {
                    let port = if protocol == 1 { 0 } else { port };
                    let expected = reference::allowed(inventory, &objects, src, dst, protocol, port);
                    let verdict = lookup(&compiled, src, dst, protocol, port);
                    assert_eq!(verdict.allowed, expected, "{src} -> {dst} proto {protocol} port {port}: datapath {verdict:?}");
                }
            }
        }
    }
}

/// The rule-pack loader on any source: the first byte picks whether the text is a Rego rule
/// file added to the default pack (metadata contract, limits, static checks, smoke run) or one
/// of its list files replaced (`lists/*.yaml`, or `.json`). An error with diagnostics or a pack,
/// never a panic or a hang.
pub fn rule_pack(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut sources = PackSources { root: Some("fuzz".into()), ..PackSources::default() };
    for (path, body) in DEFAULT_RULES {
        let file = SourceFile { path: path.to_string(), text: body.to_string() };
        if path.starts_with("lists/") {
            sources.lists.push(file);
        } else if path.ends_with(".rego") && !path.ends_with("_test.rego") {
            sources.policies.push(file);
        }
    }
    match which % 3 {
        0 => sources.policies.push(SourceFile { path: "fuzz.rego".into(), text: text.into() }),
        n => {
            // Replace one list, keeping its stem (the pack's rules refer to it).
            let index = (which as usize / 3) % sources.lists.len().max(1);
            if let Some(list) = sources.lists.get_mut(index) {
                let stem = list.path.rsplit_once('.').map_or(list.path.clone(), |(s, _)| s.to_string());
                list.path = format!("{stem}.{}", if n == 1 { "yaml" } else { "json" });
                list.text = text.into();
            }
        }
    }
    let _ = RulePack::from_sources(&sources, &PackOptions::default());
}

/// The API's request parsing, as the Unix-socket server does it for each request: the alert
/// query string (`/v1/alerts?...`) and the operator request body of the quarantine routes (the
/// first byte picks which). A parsed query prints back to a query string that parses to the same
/// query; a body is a request or a bad-request message; never a panic.
pub fn api_request(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 2 == 0 {
        let Ok(query) = std::str::from_utf8(rest) else { return };
        if let Ok(parsed) = AlertQuery::from_query_string(query, 1_700_000_000_000_000) {
            let again = AlertQuery::from_query_string(&parsed.to_query_string(), 1_700_000_000_000_000)
                .expect("a printed query parses");
            assert_eq!(format!("{parsed:?}"), format!("{again:?}"), "query string round trip");
        }
    } else if let Ok(request) = parse_operator_body(rest, 0, Some(1)) {
        assert!(!request.reason.trim().is_empty());
        assert!(!request.namespace.is_empty() && !request.name.is_empty());
    }
}

// The alert_log target's scratch file (one per process).
static FILE: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("palisade-fuzz-alerts-{}.jsonl", std::process::id()))
});

/// The alert log reader on any file content (corrupt, truncated, not UTF-8, huge lines): every
/// line is an alert or a counted bad line, never a panic.
pub fn alert_log(data: &[u8]) {
    std::fs::write(&*FILE, data).expect("write the log file");
    let mut alerts = 0u64;
    let report = read_alerts(std::slice::from_ref(&*FILE), &AlertQuery::default(), |alert| {
        serde_json::to_string(&alert).expect("an alert serialises");
        alerts += 1;
        ControlFlow::Continue(())
    });
    assert_eq!(report.matched, alerts);
    let lines = data.split(|b| *b == b'\n').filter(|l| !l.trim_ascii().is_empty()).count() as u64;
    assert_eq!(report.matched + report.bad_lines, lines, "every line is an alert or a counted bad line");
}

/// The response-policy loader (guard, YAML, validation) on any text: an error or a policy,
/// never a panic; an accepted policy's forensics CIDRs all parse.
pub fn response_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(policy) = ResponsePolicy::parse(text, Path::new("response.yaml")) {
        for f in &policy.forensics {
            f.parse_cidr().expect("validated");
        }
        for rule in policy.rules.keys() {
            let _ = policy.enforcement(rule);
        }
    }
}

/// The Kubernetes object converters on any JSON: a Pod, Namespace or NetworkPolicy as the API
/// server could send it (the first byte picks which) goes through the same conversion as the
/// watchers use; the endpoints and namespaces then go through `build_inventory`. An error, a
/// rejection or a value, never a panic.
pub fn k8s_convert(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            if let Ok(pod) = serde_json::from_slice::<Pod>(json) {
                if let Some(view) = convert::pod_view(&pod) {
                    let file = InventoryFile { namespaces: Vec::new(), endpoints: vec![view.endpoint.clone()] };
                    let (inventory, rejected) = convert::build_inventory(file);
                    assert!(inventory.endpoints.len() + rejected.len() >= 1);
                }
            }
        }
        1 => {
            if let Ok(ns) = serde_json::from_slice::<Namespace>(json) {
                if let Some(spec) = convert::namespace_spec(&ns) {
                    let _ = convert::build_inventory(InventoryFile { namespaces: vec![spec], endpoints: Vec::new() });
                }
            }
        }
        _ => {
            if let Ok(policy) = serde_json::from_slice::<KubeNetworkPolicy>(json) {
                let _ = convert::network_policy(&policy);
            }
        }
    }
}

/// The YAML guard in front of every outside YAML file: on any text, the depth check never
/// panics, and whatever it lets through parses within the parser's own recursion limit (a text
/// the guard passes never reaches the parser deeper than the guard measured).
pub fn yaml_guard(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if yaml::check_depth(text, 8).is_ok() {
        for document in serde_norway::Deserializer::from_str(text) {
            if let Err(e) = <serde_norway::Value as serde::Deserialize>::deserialize(document) {
                assert!(!e.to_string().contains("recursion limit"), "the guard passed a text nested past the parser's limit: {e}");
                // serde_norway's document iterator yields the same syntax error forever after
                // one (the loaders stop at the first error; so must this loop).
                break;
            }
        }
    }
}
