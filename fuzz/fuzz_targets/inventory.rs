//! The inventory loader (size and depth guard, YAML, validation) on any text: an error or an
//! inventory, never a panic; and every accepted inventory keeps its invariants.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::inventory(data));
