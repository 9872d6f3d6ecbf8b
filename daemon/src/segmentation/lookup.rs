//! The verdict, in pure Rust, from the compiled map contents: the same keys, the same probes in the
//! same order as `probes-ebpf/src/datapath.rs` (keep the two in step).
//!
//! A packet crosses two hooks: the source pod's cgroup_skb egress, then the destination pod's
//! cgroup_skb ingress. Each hook runs: (1) quarantine of the socket's cgroup, (2) the fail-closed
//! default of a pod below the pods parent with no endpoint yet, (3) conntrack, (4) local endpoint
//! + peer identity from IPCACHE, isolation from ENDPOINTS, POLICY probes. (Unparsable packets,
//! which the kernel drops for isolated pods, have no model here.)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use palisade_common::{
    CtKey, CtValue, DIRECTION_EGRESS, DIRECTION_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS,
    ForensicsValue, IDENTITY_ANY, IDENTITY_WORLD, IpCacheValue, PROTO_ANY, PolicyKey, ct_allow_bit,
    ct_key, ct_pass_bits, v4_mapped,
};
use serde::Serialize;

use super::compile::{Compiled, LpmKey};

/// The 16-byte datapath form of an address (v4-mapped for IPv4).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn is_loopback16(a: &[u8; 16]) -> bool {
    let v4 = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
    (v4 && a[12] == 127) || (a[..15].iter().all(|b| *b == 0) && a[15] == 1)
}

/// Longest-prefix match over an LPM map's contents (what the kernel's trie answers).
pub fn lpm<V: Copy>(map: &BTreeMap<LpmKey, V>, addr: &[u8; 16]) -> Option<V> {
    // Probe from the longest prefix down, only the prefix lengths present (keys order by
    // length first, so the next shorter length in use is the last key below `(len, ::)`): a
    // few ordered-map lookups per address instead of 129 (the differential tests make millions).
    let mut below = LpmKey { prefix_len: 129, addr: [0; 16] };
    while let Some((present, _)) = map.range(..below).next_back() {
        let plen = present.prefix_len;
        let key = LpmKey { prefix_len: plen, addr: mask16(addr, plen) };
        if let Some(v) = map.get(&key) {
            return Some(*v);
        }
        below = LpmKey { prefix_len: plen, addr: [0; 16] };
    }
    None
}

pub fn mask16(addr: &[u8; 16], plen: u32) -> [u8; 16] {
    let bits = u128::from_be_bytes(*addr);
    let m = if plen == 0 { 0 } else { u128::MAX << (128 - plen) };
    (bits & m).to_be_bytes()
}

/// Runtime state the kernel also reads: quarantine flags, forensics exceptions, conntrack.
#[derive(Debug, Clone, Default)]
pub struct DatapathState {
    pub quarantined: BTreeSet<u64>,
    /// Cgroups below a fail-closed parent with no endpoint written yet (SEG_CGROUPS says
    /// CGROUP_PARENT for their deepest entry): only traffic inside the pod passes.
    pub unknown: BTreeSet<u64>,
    pub forensics: BTreeMap<LpmKey, ForensicsValue>,
    pub conntrack: HashMap<CtKey, CtValue>,
}

/// One packet as a hook sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum HookDecision {
    /// The local address is not a known endpoint: nothing to enforce at this hook.
    NotEndpoint,
    QuarantineException,
    QuarantineDenied,
    /// A pod below a fail-closed parent whose endpoint is not written yet.
    UnknownEndpoint,
    /// Traffic inside such a pod (same address, loopback).
    UnknownEndpointLocal,
    Conntrack,
    SelfTraffic,
    NotIsolated,
    Allowed { rule_id: u32, peer_identity: u32, key_protocol: u8, key_port_plen: u8, key_port: u16 },
    Denied { peer_identity: u32 },
}

impl HookDecision {
    pub fn allowed(&self) -> bool {
        !matches!(self, HookDecision::QuarantineDenied | HookDecision::UnknownEndpoint | HookDecision::Denied { .. })
    }
}

/// The verdict for a packet from src to dst: egress at the source, then ingress at the
/// destination (not evaluated when egress already dropped it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: HookDecision,
    pub ingress: Option<HookDecision>,
}

/// The verdict with no runtime state (no quarantine, empty conntrack): what `policy matrix` shows.
pub fn lookup(compiled: &Compiled, src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> Verdict {
    let mut state = DatapathState::default();
    lookup_with(compiled, &mut state, (0, 0), src, dst, protocol, port)
}

/// The verdict with runtime state; `cgroups` are the (source, destination) sockets' cgroup ids.
pub fn lookup_with(
    compiled: &Compiled,
    state: &mut DatapathState,
    cgroups: (u64, u64),
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    port: u16,
) -> Verdict {
    let pkt = Packet { src: addr16(src), dst: addr16(dst), sport: 40000, dport: port, protocol };
    let egress = hook(compiled, state, DIRECTION_EGRESS, cgroups.0, &pkt);
    if !egress.allowed() {
        return Verdict { allowed: false, egress, ingress: None };
    }
    let ingress = hook(compiled, state, DIRECTION_INGRESS, cgroups.1, &pkt);
    Verdict { allowed: ingress.allowed(), egress, ingress: Some(ingress) }
}

/// One cgroup_skb hook, exactly as the kernel program decides.
pub fn hook(compiled: &Compiled, state: &mut DatapathState, direction: u8, cgroup_id: u64, pkt: &Packet) -> HookDecision {
    let egress = direction == DIRECTION_EGRESS;
    let (local, peer, local_port, peer_port) =
        if egress { (pkt.src, pkt.dst, pkt.sport, pkt.dport) } else { (pkt.dst, pkt.src, pkt.dport, pkt.sport) };
    // 1. quarantine (the pure model has no cgroup hierarchy: the id given is the pod's)
    if cgroup_id != 0 && state.quarantined.contains(&cgroup_id) {
        if local == peer || is_loopback16(&peer) {
            return HookDecision::QuarantineException;
        }
        if let Some(f) = lpm(&state.forensics, &peer) {
            let port = if egress { peer_port } else { local_port };
            if (f.protocol == 0 || f.protocol == pkt.protocol) && (f.port == 0 || f.port == port) {
                return HookDecision::QuarantineException;
            }
        }
        return HookDecision::QuarantineDenied;
    }
    // 2. a pod with no endpoint yet below a fail-closed parent
    if cgroup_id != 0 && state.unknown.contains(&cgroup_id) {
        if local == peer || is_loopback16(&peer) {
            return HookDecision::UnknownEndpointLocal;
        }
        return HookDecision::UnknownEndpoint;
    }
    // 3. conntrack (the pure model has no clock and no TCP flags: its entries never expire and
    // it models one policy generation; the kernel's state machine is in `conntrack`)
    let (ck, src_is_lo) = ct_key(&pkt.src, pkt.sport, &pkt.dst, pkt.dport, pkt.protocol);
    if let Some(v) = state.conntrack.get(&ck) {
        if v.flags & ct_pass_bits(src_is_lo, direction) != 0 {
            return HookDecision::Conntrack;
        }
    }
    // 4. policy
    let Some(local_v) = lpm(&compiled.ipcache, &local).filter(|v| v.endpoint_id != 0) else {
        return HookDecision::NotEndpoint;
    };
    let peer_v = lpm(&compiled.ipcache, &peer).unwrap_or(IpCacheValue {
        identity: IDENTITY_WORLD,
        cidr_identity: 0,
        endpoint_id: 0,
        _pad: 0,
    });
    let decision = if peer_v.endpoint_id == local_v.endpoint_id || local == peer {
        HookDecision::SelfTraffic
    } else {
        let cfg = compiled.endpoint_config.get(&local_v.endpoint_id).copied().unwrap_or_default();
        let (flag, plens) =
            if egress { (EP_ISOLATED_EGRESS, cfg.egress_port_plens) } else { (EP_ISOLATED_INGRESS, cfg.ingress_port_plens) };
        if cfg.flags & flag == 0 {
            HookDecision::NotIsolated
        } else {
            match probe(compiled, local_v.endpoint_id, direction, &peer_v, pkt.protocol, pkt.dport, plens) {
                Some((key, rule_id)) => HookDecision::Allowed {
                    rule_id,
                    peer_identity: key.peer_identity,
                    key_protocol: key.protocol,
                    key_port_plen: key.port_plen,
                    key_port: key.port,
                },
                None => HookDecision::Denied { peer_identity: peer_v.identity },
            }
        }
    };
    if decision.allowed() {
        let bit = ct_allow_bit(src_is_lo, direction);
        let entry = state.conntrack.entry(ck).or_default();
        entry.flags |= bit;
    }
    decision
}

/// The POLICY probes, in kernel order: for each peer id (label identity, CIDR identity, any):
/// exact port, each port-block size in use (longest first), any port, any protocol.
pub fn probe(
    compiled: &Compiled,
    endpoint_id: u32,
    direction: u8,
    peer: &IpCacheValue,
    protocol: u8,
    port: u16,
    plens: u32,
) -> Option<(PolicyKey, u32)> {
    let peers = [peer.identity, peer.cidr_identity, IDENTITY_ANY];
    for (i, &pid) in peers.iter().enumerate() {
        if i == 1 && pid == 0 {
            continue;
        }
        let mut key = PolicyKey {
            endpoint_id,
            peer_identity: pid,
            direction,
            protocol,
            port_plen: 16,
            _pad: 0,
            port,
            _pad2: 0,
        };
        if let Some(v) = compiled.policy.get(&key) {
            return Some((key, v.rule_id));
        }
        let mut plen = 15u8;
        while plen >= 1 {
            if plens & (1 << plen) != 0 {
                key.port_plen = plen;
                key.port = port & (u16::MAX << (16 - plen));
                if let Some(v) = compiled.policy.get(&key) {
                    return Some((key, v.rule_id));
                }
            }
            plen -= 1;
        }
        key.port_plen = 0;
        key.port = 0;
        if let Some(v) = compiled.policy.get(&key) {
            return Some((key, v.rule_id));
        }
        key.protocol = PROTO_ANY;
        if let Some(v) = compiled.policy.get(&key) {
            return Some((key, v.rule_id));
        }
    }
    None
}
