//! The daemon's root-only Unix socket API (HTTP + JSON) and its client.
pub mod client;
