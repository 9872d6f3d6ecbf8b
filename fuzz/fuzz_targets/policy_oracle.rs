//! The NetworkPolicy loader and compiler with an oracle. The text is loaded as a policy file
//! (size and depth guard, YAML, validation, budgets) and compiled against a fixed inventory; when
//! it is accepted and fits, the compiled maps (through `segmentation::lookup`, which mirrors the
//! kernel program) must answer every packet between the inventory's pods and a few outside
//! addresses like the direct evaluation of the specification (`segmentation::reference`).
#![no_main]

use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade::inventory::Inventory;
use palisade::segmentation::policy::PolicySet;
use palisade::segmentation::{compile, lookup, reference};

static INVENTORY: LazyLock<Inventory> = LazyLock::new(|| {
    let text = include_str!("../../policies/webapp-inventory.yaml").to_string()
        + "  - namespace: monitoring\n    name: remote\n    labels: {app: prober}\n    ips: [198.18.9.9, \"2001:db8::9:9\"]\n    ports: [{name: http, port: 8080, protocol: TCP}]\n    peerOnly: true\n";
    Inventory::parse(&text, Path::new("inventory.yaml")).expect("the fuzz inventory is valid")
});
const OUTSIDE: [&str; 4] = ["198.18.7.7", "10.0.0.1", "2001:db8::7:7", "fd00::1"];
const PORTS: [u16; 6] = [22, 53, 80, 443, 5432, 8080];
const PROTOCOLS: [u8; 4] = [1, 6, 17, 132];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(set) = PolicySet::parse(text, Path::new("fuzz.yaml")) else { return };
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
                    let expected = reference::allowed(inventory, &set, src, dst, protocol, port);
                    let verdict = lookup(&compiled, src, dst, protocol, port);
                    assert_eq!(verdict.allowed, expected, "{src} -> {dst} proto {protocol} port {port}: datapath {verdict:?}");
                }
            }
        }
    }
});
