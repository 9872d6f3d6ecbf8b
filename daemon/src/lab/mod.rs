//! The lab: local pods (network namespace + veth into a lab bridge + cgroup) for one host.
pub mod cli;
