//! Events: ring-buffer records decoded safely into typed events, enriched with the pod and the
//! process, and turned into the JSON `input` the rule engine receives.
pub mod context;
pub mod decode;
pub mod enrich;
pub mod input;
pub mod kind;
pub mod loss;
pub mod reader;
