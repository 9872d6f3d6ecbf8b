//! The Kubernetes object converters on any JSON: a Pod, Namespace or NetworkPolicy as the API
//! server could send it (the first byte picks which) goes through the same conversion as the
//! watchers use; the endpoints and namespaces then go through `build_inventory`. An error, a
//! rejection or a value, never a panic.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::k8s_convert(data));
