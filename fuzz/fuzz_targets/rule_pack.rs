//! The rule-pack loader on any source: the first byte picks whether the text is a Rego rule
//! file added to the default pack (metadata contract, limits, static checks, smoke run) or one
//! of its list files replaced (`lists/*.yaml`, or `.json`). An error with diagnostics or a pack,
//! never a panic or a hang.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::rule_pack(data));
