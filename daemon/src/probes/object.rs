//! The eBPF object built by build.rs, embedded in the binary.
pub static PROBES_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/palisade-probes"));
