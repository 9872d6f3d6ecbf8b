//! The response-policy loader (guard, YAML, validation) on any text: an error or a policy,
//! never a panic; an accepted policy's forensics CIDRs all parse.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use palisade::quarantine::ResponsePolicy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(policy) = ResponsePolicy::parse(text, Path::new("response.yaml")) {
        for f in &policy.forensics {
            f.parse_cidr().expect("validated");
        }
        for rule in policy.rules.keys() {
            let _ = policy.enforcement(rule);
        }
    }
});
