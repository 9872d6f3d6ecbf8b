//! The user side of the datapath's connection tracking: its settings (`--established-flows`,
//! idle timeouts per state) and the policy generation that strict mode judges entries against.
//!
//! The kernel side (`probes-ebpf/src/datapath.rs`, `policy`) keeps one SEG_CONNTRACK entry per
//! normalized 5-tuple: which (orientation, hook) allowed it, its TCP state (SYN, established,
//! closing after a RST or a FIN from each side), when it was last seen, and the policy generation
//! each side's bits were judged under. A TCP SYN never passes on an entry (a closed 5-tuple
//! reused later is judged as a new connection); an entry idle past its state's timeout is
//! forgotten; in strict mode an entry of an older generation is judged again on its next packet,
//! so after a policy change the flows the new policy does not allow stop at their next packet.

use std::path::Path;

use aya::Ebpf;
use aya::maps::{Array, MapData};
use palisade_common::{
    CT_DEFAULT_OTHER_S, CT_DEFAULT_TCP_CLOSING_S, CT_DEFAULT_TCP_ESTABLISHED_S, CT_DEFAULT_TCP_SYN_S, CtConfig, CtKey,
    CtValue, ESTABLISHED_FLOWS_KEEP, ESTABLISHED_FLOWS_STRICT, MAP_SEG_CONNTRACK, MAP_SEG_CT_CONFIG,
};
use serde::Serialize;

use super::datapath::DatapathError;

/// What a policy change does to flows that are already open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EstablishedFlows {
    /// Judged again under the new policy at their next packet; those it does not allow stop.
    #[default]
    Strict,
    /// Connection-setup-only: a flow allowed when it opened stays allowed until it closes or
    /// idles out.
    Keep,
}

impl EstablishedFlows {
    fn wire(self) -> u32 {
        match self {
            EstablishedFlows::Strict => ESTABLISHED_FLOWS_STRICT,
            EstablishedFlows::Keep => ESTABLISHED_FLOWS_KEEP,
        }
    }
}

/// Idle timeouts per conntrack state, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CtTimeouts {
    /// TCP after an allowed SYN, before anything was acknowledged.
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    /// TCP after a RST or a FIN from each side.
    pub tcp_closing_s: u32,
    /// UDP, SCTP, ICMP and everything else.
    pub other_s: u32,
}

impl Default for CtTimeouts {
    fn default() -> CtTimeouts {
        CtTimeouts {
            tcp_syn_s: CT_DEFAULT_TCP_SYN_S,
            tcp_established_s: CT_DEFAULT_TCP_ESTABLISHED_S,
            tcp_closing_s: CT_DEFAULT_TCP_CLOSING_S,
            other_s: CT_DEFAULT_OTHER_S,
        }
    }
}

/// The kernel refreshes an entry's last-seen time at most once a second, so shorter timeouts
/// would forget busy flows.
pub const MIN_TIMEOUT_S: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackSettings {
    pub established_flows: EstablishedFlows,
    pub timeouts: CtTimeouts,
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack timeout {field} = {value} s is below the minimum of {MIN_TIMEOUT_S} s")]
    TimeoutTooShort { field: &'static str, value: u32 },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

impl ConntrackSettings {
    pub fn validate(&self) -> Result<(), ConntrackError> {
        let t = &self.timeouts;
        for (field, value) in [
            ("tcp_syn_s", t.tcp_syn_s),
            ("tcp_established_s", t.tcp_established_s),
            ("tcp_closing_s", t.tcp_closing_s),
            ("other_s", t.other_s),
        ] {
            if value < MIN_TIMEOUT_S {
                return Err(ConntrackError::TimeoutTooShort { field, value });
            }
        }
        Ok(())
    }
}

fn config_map(bpf: &mut Ebpf) -> Result<Array<&mut MapData, CtConfig>, DatapathError> {
    Array::try_from(bpf.map_mut(MAP_SEG_CT_CONFIG).ok_or(DatapathError::MissingMap { name: MAP_SEG_CT_CONFIG })?)
        .map_err(|source| DatapathError::Map { name: MAP_SEG_CT_CONFIG, source })
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map { name: MAP_SEG_CT_CONFIG, source }
}

/// What SEG_CT_CONFIG holds (zeros before anything was written: strict, default timeouts).
pub fn read_config(bpf: &mut Ebpf) -> Result<CtConfig, DatapathError> {
    config_map(bpf)?.get(&0, 0).map_err(map_err)
}

/// Writes the settings, keeping the policy generation.
pub fn configure(bpf: &mut Ebpf, settings: &ConntrackSettings) -> Result<(), ConntrackError> {
    settings.validate()?;
    let mut map = config_map(bpf)?;
    let mut cfg = map.get(&0, 0).map_err(map_err)?;
    cfg.established_flows = settings.established_flows.wire();
    cfg.tcp_syn_s = settings.timeouts.tcp_syn_s;
    cfg.tcp_established_s = settings.timeouts.tcp_established_s;
    cfg.tcp_closing_s = settings.timeouts.tcp_closing_s;
    cfg.other_s = settings.timeouts.other_s;
    map.set(0, cfg, 0).map_err(map_err)?;
    Ok(())
}

/// Starts a new policy generation: in strict mode every entry is judged again at its next packet.
/// Called after each sync that changed the policy maps (once their new contents are complete).
pub fn bump_policy_generation(bpf: &mut Ebpf) -> Result<u32, DatapathError> {
    let mut map = config_map(bpf)?;
    let mut cfg = map.get(&0, 0).map_err(map_err)?;
    cfg.policy_generation = cfg.policy_generation.wrapping_add(1);
    map.set(0, cfg, 0).map_err(map_err)?;
    Ok(cfg.policy_generation)
}

/// Removes a pinned conntrack map whose key or value layout is not this build's (a daemon
/// upgraded across a layout change would otherwise fail to load its programs). Conntrack is soft
/// state: the new map starts empty and open flows are judged by the policy again. Returns the
/// names of the maps removed.
pub fn drop_incompatible_pins(dir: &Path) -> Vec<&'static str> {
    let mut dropped = Vec::new();
    let expected = [(MAP_SEG_CONNTRACK, std::mem::size_of::<CtKey>() as u32, std::mem::size_of::<CtValue>() as u32)];
    for (name, key_size, value_size) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = match MapData::from_pin(&path).and_then(|map| map.info()) {
            Ok(info) => info,
            Err(err) => {
                // Left in place: loading reports it with the path.
                tracing::warn!(path = %path.display(), %err, "reading a pinned conntrack map");
                continue;
            }
        };
        if info.key_size() != key_size || info.value_size() != value_size {
            tracing::warn!(
                path = %path.display(),
                key_size = info.key_size(),
                value_size = info.value_size(),
                "pinned conntrack map has an older layout: replaced by an empty one"
            );
            match std::fs::remove_file(&path) {
                Ok(()) => dropped.push(name),
                Err(err) => tracing::error!(path = %path.display(), %err, "removing an incompatible pinned map"),
            }
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use palisade_common::{
        CT_FIN_HI, CT_FIN_LO, CT_STATE_CLOSING, CT_STATE_ESTABLISHED, CT_STATE_OTHER, CT_STATE_SYN, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ct_next_state, ct_timeout_s,
    };

    use super::*;

    #[test]
    fn tcp_states_follow_syn_fin_rst() {
        let tcp = |state, fin, flags, from_lo| ct_next_state(state, fin, PROTO_TCP, flags, from_lo);
        assert_eq!(tcp(0, 0, TCP_SYN, true), (CT_STATE_SYN, 0));
        assert_eq!(tcp(CT_STATE_SYN, 0, TCP_SYN | TCP_ACK, false), (CT_STATE_ESTABLISHED, 0));
        assert_eq!(tcp(0, 0, TCP_ACK, true), (CT_STATE_ESTABLISHED, 0), "picked up mid-stream");
        // One FIN: half-closed, still established; the other side's FIN closes.
        assert_eq!(tcp(CT_STATE_ESTABLISHED, 0, TCP_FIN | TCP_ACK, true), (CT_STATE_ESTABLISHED, CT_FIN_LO));
        assert_eq!(tcp(CT_STATE_ESTABLISHED, CT_FIN_LO, TCP_FIN | TCP_ACK, true), (CT_STATE_ESTABLISHED, CT_FIN_LO));
        assert_eq!(tcp(CT_STATE_ESTABLISHED, CT_FIN_LO, TCP_FIN | TCP_ACK, false), (CT_STATE_CLOSING, CT_FIN_LO | CT_FIN_HI));
        // The last ACK keeps it closing.
        assert_eq!(tcp(CT_STATE_CLOSING, CT_FIN_LO | CT_FIN_HI, TCP_ACK, true).0, CT_STATE_CLOSING);
        assert_eq!(tcp(CT_STATE_ESTABLISHED, 0, TCP_RST, false).0, CT_STATE_CLOSING);
        assert_eq!(tcp(CT_STATE_SYN, 0, TCP_RST | TCP_ACK, false).0, CT_STATE_CLOSING);
        assert_eq!(ct_next_state(0, 0, PROTO_UDP, 0, true), (CT_STATE_OTHER, 0));
    }

    #[test]
    fn timeouts_default_per_state_and_reject_too_short() {
        let cfg = CtConfig::default();
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_SYN), CT_DEFAULT_TCP_SYN_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_ESTABLISHED), CT_DEFAULT_TCP_ESTABLISHED_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_CLOSING), CT_DEFAULT_TCP_CLOSING_S);
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_OTHER), CT_DEFAULT_OTHER_S);
        let cfg = CtConfig { tcp_established_s: 5, ..CtConfig::default() };
        assert_eq!(ct_timeout_s(&cfg, CT_STATE_ESTABLISHED), 5);
        let short = ConntrackSettings { timeouts: CtTimeouts { tcp_closing_s: 1, ..CtTimeouts::default() }, ..Default::default() };
        let err = short.validate().expect_err("1 s is too short");
        assert!(err.to_string().contains("tcp_closing_s = 1"), "{err}");
        assert!(ConntrackSettings::default().validate().is_ok());
    }
}
