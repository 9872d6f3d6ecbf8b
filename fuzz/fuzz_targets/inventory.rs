//! The inventory loader (size and depth guard, YAML, validation) on any text: an error or an
//! inventory, never a panic; and every accepted inventory keeps its invariants.
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use palisade::inventory::Inventory;

fuzz_target!(|data: &[u8]| {
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
});
