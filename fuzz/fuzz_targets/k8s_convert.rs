//! The Kubernetes object converters on any JSON: a Pod, Namespace or NetworkPolicy as the API
//! server could send it (the first byte picks which) goes through the same conversion as the
//! watchers use; the endpoints and namespaces then go through `build_inventory`. An error, a
//! rejection or a value, never a panic.
#![no_main]

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use libfuzzer_sys::fuzz_target;
use palisade::inventory::InventoryFile;
use palisade::k8s::convert;

fuzz_target!(|data: &[u8]| {
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
            if let Ok(policy) = serde_json::from_slice::<NetworkPolicy>(json) {
                let _ = convert::network_policy(&policy);
            }
        }
    }
});
