//! The YAML guard in front of every outside YAML file: on any text, the depth check never
//! panics, and whatever it lets through parses within the parser's own recursion limit (a text
//! the guard passes never reaches the parser deeper than the guard measured).
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::yaml_guard(data));
