//! Segmentation: NetworkPolicy compiler, identities, datapath map contents.
pub mod cli;
