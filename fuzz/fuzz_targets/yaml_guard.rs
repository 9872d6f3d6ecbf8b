//! The YAML guard in front of every outside YAML file: on any text, the depth check never
//! panics, and whatever it lets through parses within the parser's own recursion limit (a text
//! the guard passes never reaches the parser deeper than the guard measured).
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::yaml;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if yaml::check_depth(text, 8).is_ok() {
        for document in serde_norway::Deserializer::from_str(text) {
            if let Err(e) = <serde_norway::Value as serde::Deserialize>::deserialize(document) {
                assert!(!e.to_string().contains("recursion limit"), "the guard passed a text nested past the parser's limit: {e}");
            }
        }
    }
});
