//! Events: ring-buffer records decoded safely into typed events, enriched with the pod and the
//! process, and turned into the `input` the rule engine receives (regorus values, built directly).
pub mod context;
pub mod decode;
pub mod enrich;
pub mod input;
pub mod kind;
pub mod loss;
pub mod reader;
pub mod value;
