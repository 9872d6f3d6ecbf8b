//! The NetworkPolicy loader and compiler with an oracle. The text is loaded as a policy file
//! (size and depth guard, YAML, validation, budgets) and compiled against a fixed inventory; when
//! it is accepted and fits, the compiled maps (through `segmentation::lookup`, which mirrors the
//! kernel program) must answer every packet between the inventory's pods and a few outside
//! addresses like the direct evaluation of the specification (`segmentation::reference`), which
//! reads the same documents as Kubernetes API objects (k8s-openapi), not palisade's model.
#![no_main]

#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::policy_oracle(data));
