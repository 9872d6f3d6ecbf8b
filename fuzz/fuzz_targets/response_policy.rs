//! The response-policy loader (guard, YAML, validation) on any text: an error or a policy,
//! never a panic; an accepted policy's forensics CIDRs all parse.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::response_policy(data));
