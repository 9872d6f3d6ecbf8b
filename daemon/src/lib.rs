//! palisade: eBPF runtime detection turned into network enforcement.
//!
//! One module per stage of the data flow in DESIGN.md; each owns its state.
pub mod alerts;
pub mod api;
pub mod config;
pub mod daemon;
pub mod defaults;
pub mod endpoints;
pub mod enforcement;
pub mod events;
pub mod inventory;
pub mod k8s;
pub mod lab;
pub mod liveness;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod probes;
pub mod quarantine;
pub mod rules;
pub mod segmentation;
pub mod status;
pub mod sys;
pub mod time;
pub mod workload;
pub mod yaml;
