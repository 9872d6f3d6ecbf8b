//! Rego detection engine (regorus), rule packs and hot reload.
pub mod cli;
