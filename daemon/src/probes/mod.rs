//! The eBPF side of palisade in user space: the embedded object, its loader (with fallbacks),
//! and the one task that owns the loaded object.
pub mod btf;
pub mod host;
pub mod loader;
pub mod object;
