//! The loaded eBPF object and the one task that owns it.
pub mod object;
