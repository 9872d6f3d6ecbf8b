//! Datapath maps: endpoints, identities, policy, quarantine and connection tracking, shared by the
//! cgroup_skb programs (`probes-ebpf/src/datapath.rs`) and the daemon (`segmentation::datapath`,
//! whose pure-Rust `lookup` mirrors the kernel's logic key for key).
//!
//! Per packet, in this order (see `segmentation::lookup`):
//! 1. QUARANTINE by the socket's cgroup id (and its ancestors), before the packet is parsed: deny
//!    everything except traffic inside the pod itself (same address, loopback) and the optional
//!    forensics exception trie; unparsable packets and neighbour discovery (unless its target is
//!    a forensics peer) are denied too. (Pods not quarantined: those two pass.)
//! 2. CONNTRACK: a packet of a flow already allowed in its direction at this hook, or a reply to
//!    one allowed in the opposite direction at the mirrored hook, passes. Entries follow TCP
//!    SYN/FIN/RST and expire when idle past the timeout of their state; a SYN never passes on an
//!    entry (a new connection is judged by policy, so a closed 5-tuple reused later is new); in
//!    strict mode an entry judged under an older policy generation is judged again.
//! 3. Policy: local endpoint and peer identity from the IPCACHE LPM trie, isolation flags from
//!    ENDPOINTS, then a bounded number of POLICY hash probes (exact port, aligned port blocks,
//!    any port, any protocol; for the peer's label identity, its CIDR identity and any peer).
//!
//! Addresses are stored as 16 bytes: IPv6 as is, IPv4 as v4-mapped (`::ffff:a.b.c.d`), so one
//! trie serves both families (an IPv4 /n prefix is stored as /(96+n)).
use crate::{EventHeader, assert_wire_size};

pub const MAP_SEG_QUARANTINE: &str = "SEG_QUARANTINE";
pub const MAP_SEG_FORENSICS: &str = "SEG_FORENSICS";
pub const MAP_SEG_IPCACHE: &str = "SEG_IPCACHE";
pub const MAP_SEG_ENDPOINTS: &str = "SEG_ENDPOINTS";
pub const MAP_SEG_POLICY: &str = "SEG_POLICY";
pub const MAP_SEG_CONNTRACK: &str = "SEG_CONNTRACK";
pub const MAP_SEG_DENY_RATE: &str = "SEG_DENY_RATE";
pub const MAP_SEG_EVENTS: &str = "SEG_EVENTS";
pub const MAP_SEG_COUNTERS: &str = "SEG_COUNTERS";
pub const MAP_SEG_CONFIG: &str = "SEG_CONFIG";
pub const MAP_SEG_CT_CONFIG: &str = "SEG_CT_CONFIG";
pub const MAP_SEG_CT_PODS: &str = "SEG_CT_PODS";
pub const MAP_SEG_BACKSTOP: &str = "SEG_BACKSTOP";
pub const MAP_SEG_CGROUPS: &str = "SEG_CGROUPS";
/// The drop-record budget of cgroups that are no endpoint (yet), by cgroup id: each unknown pod
/// has its own, as each endpoint has one in SEG_DENY_RATE.
pub const MAP_SEG_DENY_RATE_CGROUP: &str = "SEG_DENY_RATE_CGROUP";
/// Every datapath map, in the order the user side pins them.
pub const SEG_MAPS: [&str; 15] = [
    MAP_SEG_QUARANTINE,
    MAP_SEG_FORENSICS,
    MAP_SEG_IPCACHE,
    MAP_SEG_ENDPOINTS,
    MAP_SEG_POLICY,
    MAP_SEG_CONNTRACK,
    MAP_SEG_DENY_RATE,
    MAP_SEG_EVENTS,
    MAP_SEG_COUNTERS,
    MAP_SEG_CONFIG,
    MAP_SEG_CT_CONFIG,
    MAP_SEG_CT_PODS,
    MAP_SEG_BACKSTOP,
    MAP_SEG_CGROUPS,
    MAP_SEG_DENY_RATE_CGROUP,
];

pub const PROG_SEG_INGRESS: &str = "seg_ingress";
pub const PROG_SEG_EGRESS: &str = "seg_egress";
/// Removes expired conntrack entries named in its input (run by the user side's sweeper with
/// BPF_PROG_TEST_RUN), keeping the per-pod counts exact.
pub const PROG_SEG_CT_SWEEP: &str = "seg_ct_sweep";
/// Keys per sweep program run (40 bytes each, after a 14-byte Ethernet header).
pub const CT_SWEEP_BATCH: u32 = 64;
/// lsm_cgroup/socket_post_create per pod cgroup: a quarantined pod opens no packet socket
/// (AF_PACKET, SOCK_PACKET) and no raw IP socket.
pub const PROG_SEG_SOCK_CREATE: &str = "seg_sock_create";
/// cgroup/sock_create per pod cgroup: a quarantined pod opens no raw IP socket (inet only, works
/// without the BPF LSM).
pub const PROG_SEG_INET_SOCK_CREATE: &str = "seg_inet_sock_create";
/// TC (tcx) on the pod's host-side interface, for what the cgroup hooks cannot see (frames of a
/// packet socket opened before the quarantine, kernel-made ARP/ND): ingress there is what the
/// pod sends, egress what it receives.
pub const PROG_SEG_BACKSTOP_FROM_POD: &str = "seg_backstop_from_pod";
pub const PROG_SEG_BACKSTOP_TO_POD: &str = "seg_backstop_to_pod";
/// The LSM hook the socket program attaches to.
pub const SOCK_CREATE_LSM_HOOK: &str = "socket_post_create";

pub const SEG_MAX_QUARANTINE: u32 = 16384;
pub const SEG_MAX_FORENSICS: u32 = 1024;
pub const SEG_MAX_IPCACHE: u32 = 262_144;
pub const SEG_MAX_ENDPOINTS: u32 = 65_536;
pub const SEG_MAX_POLICY: u32 = 1_048_576;
/// A hash map, not an LRU: an entry is never evicted to make room for another pod's flow; it
/// leaves when it expires (removed by the sweeper).
pub const SEG_MAX_CONNTRACK: u32 = 262_144;
pub const SEG_MAX_BACKSTOP: u32 = 65_536;
/// SEG_CGROUPS: endpoint cgroups, fail-closed parents and exempt cgroups.
pub const SEG_MAX_CGROUPS: u32 = 65_536;
pub const SEG_EVENTS_RINGBUF_BYTES: u32 = 1024 * 1024;
/// How many cgroup levels (from the root) the quarantine check walks (a pod's containers live in
/// child cgroups of the pod cgroup).
pub const SEG_MAX_CGROUP_LEVELS: u32 = 12;

/// `EventHeader.source` of datapath records (no task context: ingress runs in softirq).
pub const SOURCE_DATAPATH: u32 = 2;

/// Identity 0 in a POLICY key: any peer (a rule with no from/to).
pub const IDENTITY_ANY: u32 = 0;
/// An address with no IPCACHE entry.
pub const IDENTITY_WORLD: u32 = 1;
/// First label identity.
pub const IDENTITY_LABEL_FIRST: u32 = 256;
/// CIDR identities (one per distinct ipBlock/except prefix and per pod address an ipBlock covers)
/// live in their own band.
pub const IDENTITY_CIDR_FIRST: u32 = 1 << 24;

pub const DIRECTION_INGRESS: u8 = 1;
pub const DIRECTION_EGRESS: u8 = 2;

/// POLICY key protocol 0: any protocol (a rule with no ports).
pub const PROTO_ANY: u8 = 0;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// EndpointConfig.flags
pub const EP_ISOLATED_INGRESS: u32 = 1;
pub const EP_ISOLATED_EGRESS: u32 = 2;

/// CgroupValue.kind
/// The cgroup of a local endpoint whose maps are written: judged by policy.
pub const CGROUP_ENDPOINT: u32 = 1;
/// A parent the datapath is attached at (the lab's pods parent, kubepods): a cgroup below it
/// that is no known endpoint yet gets the fail-closed default (only traffic inside the pod).
pub const CGROUP_PARENT: u32 = 2;
/// Below a parent but not a pod (the daemon's own cgroup): judged as before, by address.
pub const CGROUP_EXEMPT: u32 = 3;

/// SEG_CGROUPS value, keyed by cgroup id (u64). The datapath takes the deepest entry among the
/// socket's cgroup and its ancestors.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupValue {
    /// CGROUP_*
    pub kind: u32,
    /// The endpoint id (CGROUP_ENDPOINT), else 0.
    pub endpoint_id: u32,
}
assert_wire_size!(CgroupValue, 8);

/// Verdict reasons (PolicyVerdictEvent.reason and the user-side lookup).
pub const REASON_QUARANTINE: u8 = 1;
pub const REASON_POLICY: u8 = 2;
/// Allowed by policy, but the pod's conntrack quota (or the table) is full: dropped.
pub const REASON_CONNTRACK_FULL: u8 = 3;
/// A pod below a fail-closed parent whose endpoint is not written yet (a new pod before its
/// first sync): only traffic inside the pod passes.
pub const REASON_UNKNOWN_ENDPOINT: u8 = 4;
/// A packet the hook could not parse, of a pod isolated in that direction.
pub const REASON_UNPARSED: u8 = 5;

/// Which way out (or in) a drop stopped (PolicyVerdictEvent.path).
/// A parsed IPv4/IPv6 packet at a cgroup_skb hook (every policy drop is on this path).
pub const PATH_IP: u8 = 0;
/// A packet the cgroup_skb hook could not parse (IP version not 4/6, IHL < 5, truncated):
/// addresses and ports in the record are zero.
pub const PATH_UNPARSED: u8 = 1;
/// ICMPv6 neighbour discovery (passes for pods that are not quarantined).
pub const PATH_ND: u8 = 2;
/// A parsed packet written by a raw socket (SOCK_RAW: hand-built headers) at a cgroup_skb hook.
pub const PATH_RAW_SOCKET: u8 = 3;
/// A packet or raw socket refused at creation (lsm_cgroup socket_post_create). The record has no
/// addresses: `local_port` holds the address family, `peer_port` the socket type, `protocol`
/// the protocol's low byte; the header carries the process (pid, comm).
pub const PATH_SOCKET_CREATE: u8 = 4;
/// A frame dropped by the TC backstop on the pod's host-side interface (what no cgroup hook
/// saw: packet sockets, kernel-made ARP/ND). Addresses are filled for IPv4/IPv6 frames.
pub const PATH_BACKSTOP: u8 = 5;
/// A packet of (or to) a pod below a fail-closed parent whose endpoint is not written yet.
pub const PATH_UNKNOWN_ENDPOINT: u8 = 6;

/// Conntrack flags, relative to the normalized key (lo = the smaller (addr, port)).
pub const CT_LO_HI_EGRESS: u32 = 1;
pub const CT_LO_HI_INGRESS: u32 = 2;
pub const CT_HI_LO_EGRESS: u32 = 4;
pub const CT_HI_LO_INGRESS: u32 = 8;

/// CtValue.state
/// A TCP SYN was allowed, nothing else seen yet.
pub const CT_STATE_SYN: u8 = 1;
/// TCP past the SYN (or picked up mid-stream when policy allows it).
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// TCP after a RST or a FIN from each side.
pub const CT_STATE_CLOSING: u8 = 3;
/// Not TCP (UDP, SCTP, ICMP, ...).
pub const CT_STATE_OTHER: u8 = 4;

/// CtValue.tcp_fin: which side sent a FIN.
pub const CT_FIN_LO: u8 = 1;
pub const CT_FIN_HI: u8 = 2;

/// TCP header flags the datapath looks at.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Default idle timeouts per conntrack state (CtConfig fields of 0 mean these).
pub const CT_DEFAULT_TCP_SYN_S: u32 = 60;
pub const CT_DEFAULT_TCP_ESTABLISHED_S: u32 = 6 * 3600;
pub const CT_DEFAULT_TCP_CLOSING_S: u32 = 10;
pub const CT_DEFAULT_OTHER_S: u32 = 60;
/// An entry's last_seen_ns is rewritten at most this often (fewer writes to a shared cache line;
/// expiry is this much late at most).
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// CtConfig.established_flows: strict (default: an established flow is judged again after a
/// policy change) or keep (connection-setup-only semantics).
pub const ESTABLISHED_FLOWS_STRICT: u32 = 0;
pub const ESTABLISHED_FLOWS_KEEP: u32 = 1;

/// Conntrack entries one pod may hold (CtConfig.per_endpoint_max of 0 means this): one pod
/// opening many flows fills its own quota, never the table other pods' connections live in.
pub const CT_DEFAULT_PER_ENDPOINT_MAX: u32 = 16_384;

/// policy_denied records per endpoint per window; the rest are counted and reported in the next.
pub const DENY_EVENTS_PER_WINDOW: u32 = 16;
pub const DENY_WINDOW_NS: u64 = 1_000_000_000;

/// SEG_COUNTERS indexes (per-CPU u64).
pub const CNT_PACKETS: u32 = 0;
pub const CNT_ALLOWED_CT: u32 = 1;
pub const CNT_ALLOWED_POLICY: u32 = 2;
pub const CNT_DENIED_POLICY: u32 = 3;
pub const CNT_DENIED_QUARANTINE: u32 = 4;
pub const CNT_EVENTS_SUPPRESSED: u32 = 5;
pub const CNT_EVENTS_LOST: u32 = 6;
pub const CNT_UNPARSED: u32 = 7;
/// Packets of pods below a fail-closed parent with no endpoint yet, dropped.
pub const CNT_DENIED_UNKNOWN: u32 = 8;
/// Unparsable packets of isolated pods, dropped (of CNT_UNPARSED).
pub const CNT_DENIED_UNPARSED: u32 = 9;
pub const CNT_COUNT: u32 = 10;

/// LPM trie data (the aya key adds the prefix length): a 16-byte address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpAddrKey {
    pub addr: [u8; 16],
}
assert_wire_size!(IpAddrKey, 16);

/// SEG_IPCACHE value: who an address (prefix) is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpCacheValue {
    /// Label identity (pods) or the CIDR identity (non-pod prefixes).
    pub identity: u32,
    /// The prefix's own CIDR identity when an ipBlock covers it, else 0 (not probed).
    pub cidr_identity: u32,
    /// Local endpoint id (pods on this node), else 0.
    pub endpoint_id: u32,
    pub _pad: u32,
}
assert_wire_size!(IpCacheValue, 16);

/// SEG_ENDPOINTS value, keyed by endpoint id (u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointConfig {
    /// EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS
    pub flags: u32,
    /// Bit n set: POLICY holds port blocks of prefix length n (1..=15) for this endpoint's
    /// ingress (port ranges from endPort), so the kernel probes that block size.
    pub ingress_port_plens: u32,
    pub egress_port_plens: u32,
    pub _pad: u32,
}
assert_wire_size!(EndpointConfig, 16);

/// SEG_POLICY key. `port` is host byte order and already masked to `port_plen` bits;
/// port_plen 16 = exact port, 0 = any port, 1..=15 = an aligned block from an endPort range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    pub peer_identity: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_plen: u8,
    pub _pad: u8,
    pub port: u16,
    pub _pad2: u16,
}
assert_wire_size!(PolicyKey, 16);

/// SEG_POLICY value: which compiled rule allowed (for explain and verdict events).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub rule_id: u32,
    pub _pad: u32,
}
assert_wire_size!(PolicyValue, 8);

/// SEG_QUARANTINE value, keyed by cgroup id (u64). Presence means quarantined.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QuarantineValue {
    /// CLOCK_MONOTONIC ns when set (user side's clock), informational.
    pub since_ns: u64,
    /// Endpoint id of the pod (informational; 0 when unknown).
    pub endpoint_id: u32,
    pub flags: u32,
}
assert_wire_size!(QuarantineValue, 16);

/// SEG_FORENSICS value (LPM by peer address): what stays reachable while quarantined.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ForensicsValue {
    /// 0 = any port; otherwise flows with this port at either end (the service side: a peer's
    /// port the pod connects to, or the pod's own port a peer connects to, and their replies).
    pub port: u16,
    /// 0 = any protocol.
    pub protocol: u8,
    pub _pad: u8,
    pub _pad2: u32,
}
assert_wire_size!(ForensicsValue, 8);

/// SEG_CONNTRACK key: the flow normalized so both directions share one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
assert_wire_size!(CtKey, 40);

/// SEG_CONNTRACK value. Two pods' hooks share an entry when both ends are local: the lo side's
/// pod owns the bits CT_LO_HI_EGRESS and CT_HI_LO_INGRESS, the hi side's pod the other two, and
/// each side's bits carry the policy generation they were judged under.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    /// CT_* bits: which (orientation, hook) already allowed the flow.
    pub flags: u32,
    /// CT_STATE_*
    pub state: u8,
    /// CT_FIN_LO | CT_FIN_HI
    pub tcp_fin: u8,
    pub _pad: u16,
    /// Kernel CLOCK_MONOTONIC (coarse) of the last packet, refreshed at most every CT_REFRESH_NS.
    pub last_seen_ns: u64,
    /// CtConfig.policy_generation the lo side's bits were judged under.
    pub generation_lo: u32,
    pub generation_hi: u32,
    /// Endpoint id of the pod whose hook created the entry (per-pod accounting).
    pub owner: u32,
    pub _pad2: u32,
}
assert_wire_size!(CtValue, 32);

/// SEG_CT_CONFIG (array, index 0): conntrack settings and the policy generation. Written by the
/// user side only; fields of 0 mean the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtConfig {
    /// Bumped after every sync that changed the policy maps.
    pub policy_generation: u32,
    /// ESTABLISHED_FLOWS_*
    pub established_flows: u32,
    pub tcp_syn_s: u32,
    pub tcp_established_s: u32,
    pub tcp_closing_s: u32,
    pub other_s: u32,
    /// Entries one endpoint may create (0 = CT_DEFAULT_PER_ENDPOINT_MAX).
    pub per_endpoint_max: u32,
    pub _pad: u32,
}
assert_wire_size!(CtConfig, 32);

/// SEG_CT_PODS value, keyed by endpoint id (u32): one pod's conntrack accounting, updated by
/// the kernel only (atomic adds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtPodUsage {
    /// Entries charged to the pod now (created by its hooks, not yet removed by the sweeper).
    pub entries: i64,
    /// New flows dropped because the pod's quota was used up.
    pub quota_drops: u64,
    /// New flows dropped because the whole table was full.
    pub table_full_drops: u64,
    pub _pad: u64,
}
assert_wire_size!(CtPodUsage, 32);

/// The idle timeout of an entry in `state` (seconds, from the config or the default).
#[inline(always)]
pub const fn ct_timeout_s(cfg: &CtConfig, state: u8) -> u32 {
    let (set, default) = match state {
        CT_STATE_SYN => (cfg.tcp_syn_s, CT_DEFAULT_TCP_SYN_S),
        CT_STATE_ESTABLISHED => (cfg.tcp_established_s, CT_DEFAULT_TCP_ESTABLISHED_S),
        CT_STATE_CLOSING => (cfg.tcp_closing_s, CT_DEFAULT_TCP_CLOSING_S),
        _ => (cfg.other_s, CT_DEFAULT_OTHER_S),
    };
    if set == 0 { default } else { set }
}

/// The state after a packet with `tcp_flags` from the `from_lo` side passed: (state, tcp_fin).
/// Non-TCP entries stay CT_STATE_OTHER.
#[inline(always)]
pub const fn ct_next_state(state: u8, tcp_fin: u8, protocol: u8, tcp_flags: u8, from_lo: bool) -> (u8, u8) {
    if protocol != PROTO_TCP {
        return (CT_STATE_OTHER, 0);
    }
    if tcp_flags & TCP_RST != 0 {
        return (CT_STATE_CLOSING, tcp_fin);
    }
    let mut fin = tcp_fin;
    if tcp_flags & TCP_FIN != 0 {
        fin |= if from_lo { CT_FIN_LO } else { CT_FIN_HI };
    }
    if fin == CT_FIN_LO | CT_FIN_HI || state == CT_STATE_CLOSING {
        return (CT_STATE_CLOSING, fin);
    }
    if tcp_flags & TCP_ACK != 0 {
        return (CT_STATE_ESTABLISHED, fin);
    }
    if state == 0 {
        // A SYN (or a first packet without ACK): not established until something is acknowledged.
        return (CT_STATE_SYN, fin);
    }
    (state, fin)
}

/// The two CT bits that belong to the pod at this hook (`local_is_lo`: the pod is the key's lo
/// side): its egress bit (orientation pod -> peer) and its ingress bit (peer -> pod).
#[inline(always)]
pub const fn ct_side_bits(local_is_lo: bool) -> (u32, u32) {
    if local_is_lo { (CT_LO_HI_EGRESS, CT_HI_LO_INGRESS) } else { (CT_HI_LO_EGRESS, CT_LO_HI_INGRESS) }
}

/// SEG_BACKSTOP value, keyed by the ifindex of a pod's host-side interface (in the namespace the
/// TC programs are attached in): whose interface it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackstopValue {
    /// The pod's cgroup id, looked up in SEG_QUARANTINE.
    pub cgroup_id: u64,
}
assert_wire_size!(BackstopValue, 8);

/// SEG_DENY_RATE value, keyed by endpoint id (u32): the per-endpoint event budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DenyRateState {
    pub window_start_ns: u64,
    pub emitted: u32,
    /// Denials not reported since the last emitted record.
    pub suppressed: u32,
}
assert_wire_size!(DenyRateState, 16);

/// SEG_CONFIG (array, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// 1: emit policy_denied records.
    pub emit_denied: u32,
    /// Records per endpoint per window (0 = DENY_EVENTS_PER_WINDOW).
    pub deny_events_per_window: u32,
}
assert_wire_size!(DatapathConfig, 8);

/// A denied packet (SEG_EVENTS ring buffer), header.kind = KIND_POLICY_VERDICT,
/// header.source = SOURCE_DATAPATH. Addresses are 16-byte (v4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PolicyVerdictEvent {
    pub header: EventHeader,
    pub local_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    pub local_port: u16,
    pub peer_port: u16,
    pub protocol: u8,
    /// DIRECTION_INGRESS or DIRECTION_EGRESS (seen from the local endpoint).
    pub direction: u8,
    /// REASON_*
    pub reason: u8,
    /// PATH_*: which way out (or in) was stopped.
    pub path: u8,
    pub endpoint_id: u32,
    pub peer_identity: u32,
    /// Denials of this endpoint not reported since the previous record (rate limit).
    pub suppressed: u32,
    pub _pad2: u32,
}
assert_wire_size!(PolicyVerdictEvent, 80 + 56);

/// The v4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

/// Normalizes a flow for SEG_CONNTRACK; returns the key and whether (src, sport) is the lo side.
#[inline(always)]
pub fn ct_key(src: &[u8; 16], sport: u16, dst: &[u8; 16], dport: u16, protocol: u8) -> (CtKey, bool) {
    let mut key = CtKey::default();
    let src_is_lo = ct_key_into(&mut key, src, sport, dst, dport, protocol);
    (key, src_is_lo)
}

/// `ct_key` writing into `key` (the datapath keeps it off its stack); returns whether (src,
/// sport) is the lo side.
#[inline(always)]
pub fn ct_key_into(key: &mut CtKey, src: &[u8; 16], sport: u16, dst: &[u8; 16], dport: u16, protocol: u8) -> bool {
    let mut src_is_lo = true;
    let mut i = 0;
    let mut decided = false;
    while i < 16 {
        if src[i] != dst[i] {
            src_is_lo = src[i] < dst[i];
            decided = true;
            break;
        }
        i += 1;
    }
    if !decided {
        src_is_lo = sport <= dport;
    }
    if src_is_lo {
        key.addr_lo = *src;
        key.addr_hi = *dst;
        key.port_lo = sport;
        key.port_hi = dport;
    } else {
        key.addr_lo = *dst;
        key.addr_hi = *src;
        key.port_lo = dport;
        key.port_hi = sport;
    }
    key.protocol = protocol;
    key._pad = [0; 3];
    src_is_lo
}

/// The CT bit a hook sets when it allows a packet in the given orientation.
#[inline(always)]
pub const fn ct_allow_bit(src_is_lo: bool, direction: u8) -> u32 {
    match (src_is_lo, direction == DIRECTION_EGRESS) {
        (true, true) => CT_LO_HI_EGRESS,
        (true, false) => CT_LO_HI_INGRESS,
        (false, true) => CT_HI_LO_EGRESS,
        (false, false) => CT_HI_LO_INGRESS,
    }
}

/// The CT bits that let a packet through at a hook: the same orientation already allowed at the
/// same hook, or the opposite orientation allowed at the mirrored hook (a reply: our ingress
/// accepted the peer's connection, so our egress passes its replies, and vice versa).
#[inline(always)]
pub const fn ct_pass_bits(src_is_lo: bool, direction: u8) -> u32 {
    let egress = direction == DIRECTION_EGRESS;
    match (src_is_lo, egress) {
        (true, true) => CT_LO_HI_EGRESS | CT_HI_LO_INGRESS,
        (true, false) => CT_LO_HI_INGRESS | CT_HI_LO_EGRESS,
        (false, true) => CT_HI_LO_EGRESS | CT_LO_HI_INGRESS,
        (false, false) => CT_HI_LO_INGRESS | CT_LO_HI_EGRESS,
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: repr(C), Copy, integers and byte arrays only, explicit padding.
    unsafe impl aya::Pod for super::IpAddrKey {}
    unsafe impl aya::Pod for super::IpCacheValue {}
    unsafe impl aya::Pod for super::EndpointConfig {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::QuarantineValue {}
    unsafe impl aya::Pod for super::ForensicsValue {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::DenyRateState {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::CtConfig {}
    unsafe impl aya::Pod for super::CtPodUsage {}
    unsafe impl aya::Pod for super::BackstopValue {}
    unsafe impl aya::Pod for super::CgroupValue {}
}
