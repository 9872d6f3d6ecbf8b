//! Segmentation and quarantine datapath: cgroup_skb ingress/egress attached per pod cgroup.
//!
//! Per packet, in this order (mirrored in pure Rust by `segmentation::lookup::hook`; keep the two
//! in step): (1) QUARANTINE by the socket's cgroup id and its ancestors, before the packet is even
//! parsed: a quarantined pod's packets pass only inside the pod and to or from the forensics
//! exception; unparsable packets and neighbour discovery (except for a forensics peer's address)
//! are dropped too, and the drop record names the path (PATH_*); (2) the socket's cgroup in
//! SEG_CGROUPS: a pod below a fail-closed parent (where the programs are attached once for all
//! pods) that is no endpoint yet passes only traffic inside itself (PATH_UNKNOWN_ENDPOINT);
//! (3) unparsable packets are dropped for an endpoint isolated in that direction and pass
//! otherwise; ICMPv6 neighbour discovery passes; (4) CONNTRACK (TCP state, idle expiry, policy
//! generation in strict mode); (5) local endpoint and peer identity from IPCACHE, isolation
//! from ENDPOINTS, POLICY probes.
//! Denials become rate-limited PolicyVerdictEvent records in SEG_EVENTS.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, map, socket_filter},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, sk_buff::SkBuff},
};
use palisade_common::{
    CNT_ALLOWED_CT, CNT_ALLOWED_POLICY, CNT_COUNT, CNT_DENIED_POLICY, CNT_DENIED_QUARANTINE,
    CNT_EVENTS_LOST, CNT_EVENTS_SUPPRESSED, CNT_PACKETS, CNT_UNPARSED, CT_STATE_SYN, CtConfig, CtKey, CtPodUsage, CtValue,
    DENY_EVENTS_PER_WINDOW, DENY_WINDOW_NS, DIRECTION_EGRESS, DIRECTION_INGRESS, DatapathConfig,
    DenyRateState, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EndpointConfig, ForensicsValue,
    IDENTITY_ANY, IDENTITY_WORLD, IpAddrKey, IpCacheValue, KIND_POLICY_VERDICT, PATH_IP, PATH_ND,
    PATH_RAW_SOCKET, PATH_UNPARSED, PROTO_ANY,
    PolicyKey, PolicyValue, PolicyVerdictEvent, QuarantineValue, REASON_POLICY, REASON_QUARANTINE,
    SEG_EVENTS_RINGBUF_BYTES, SEG_MAX_CGROUP_LEVELS, SEG_MAX_CONNTRACK, SEG_MAX_ENDPOINTS,
    ESTABLISHED_FLOWS_STRICT, PROTO_TCP, SEG_MAX_FORENSICS, SEG_MAX_IPCACHE, SEG_MAX_POLICY, SEG_MAX_QUARANTINE,
    SOURCE_DATAPATH, CT_DEFAULT_PER_ENDPOINT_MAX, CGROUP_ENDPOINT, CGROUP_PARENT, CNT_DENIED_UNKNOWN, CNT_DENIED_UNPARSED,
    CgroupValue, PATH_UNKNOWN_ENDPOINT, REASON_UNKNOWN_ENDPOINT, REASON_UNPARSED, SEG_MAX_CGROUPS, CT_REFRESH_NS, CT_SWEEP_BATCH, REASON_CONNTRACK_FULL, TCP_ACK, TCP_SYN, ct_allow_bit, ct_key_into, ct_next_state, ct_pass_bits,
    ct_side_bits, ct_timeout_s,
};

const PASS: i32 = 1;
const DROP: i32 = 0;
pub(crate) const SOCK_RAW: u32 = 3;

#[map]
pub(crate) static SEG_QUARANTINE: HashMap<u64, QuarantineValue> = HashMap::with_max_entries(SEG_MAX_QUARANTINE, 0);

#[map]
pub(crate) static SEG_FORENSICS: LpmTrie<IpAddrKey, ForensicsValue> = LpmTrie::with_max_entries(SEG_MAX_FORENSICS, 0);

#[map]
static SEG_IPCACHE: LpmTrie<IpAddrKey, IpCacheValue> = LpmTrie::with_max_entries(SEG_MAX_IPCACHE, 0);

/// Which cgroups are endpoints (and their endpoint id), which are fail-closed parents: a cgroup
/// below a parent that is no endpoint yet gets only traffic inside the pod.
#[map]
static SEG_CGROUPS: HashMap<u64, CgroupValue> = HashMap::with_max_entries(SEG_MAX_CGROUPS, 0);

#[map]
static SEG_ENDPOINTS: HashMap<u32, EndpointConfig> = HashMap::with_max_entries(SEG_MAX_ENDPOINTS, 0);

#[map]
static SEG_POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(SEG_MAX_POLICY, 0);

/// Not an LRU: no flow's entry is evicted to make room for another's (see SEG_CT_PODS).
#[map]
static SEG_CONNTRACK: HashMap<CtKey, CtValue> = HashMap::with_max_entries(SEG_MAX_CONNTRACK, 0);

/// Per-pod conntrack accounting (entries held, drops). An LRU only so that ids of pods long gone
/// age out; it holds far more rows than a node has pods.
#[map]
static SEG_CT_PODS: LruHashMap<u32, CtPodUsage> = LruHashMap::with_max_entries(SEG_MAX_ENDPOINTS, 0);

#[map]
pub(crate) static SEG_DENY_RATE: LruHashMap<u32, DenyRateState> = LruHashMap::with_max_entries(SEG_MAX_ENDPOINTS, 0);

/// The record budget of drops that belong to no endpoint (a pod below the pods parent whose
/// endpoint is not written yet), per cgroup: one unknown pod's flood never spends another's.
#[map]
static SEG_DENY_RATE_CGROUP: LruHashMap<u64, DenyRateState> = LruHashMap::with_max_entries(SEG_MAX_ENDPOINTS, 0);

#[map]
pub(crate) static SEG_EVENTS: RingBuf = RingBuf::with_byte_size(SEG_EVENTS_RINGBUF_BYTES, 0);

#[map]
pub(crate) static SEG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CNT_COUNT, 0);

#[map]
pub(crate) static SEG_CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

#[map]
static SEG_CT_CONFIG: Array<CtConfig> = Array::with_max_entries(1, 0);

/// Per-CPU scratch for the conntrack path: keeps the key and the judgement off the 512-byte
/// stack that the whole call chain shares.
#[map]
static SEG_CT_SCRATCH: PerCpuArray<CtScratch> = PerCpuArray::with_max_entries(1, 0);

struct CtScratch {
    key: CtKey,
    judgement: Judgement,
}

pub(crate) struct Pkt {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) protocol: u8,
    /// TCP header flags (0 for other protocols).
    pub(crate) tcp_flags: u8,
    /// ICMPv6 neighbour discovery (passes unless the pod is quarantined).
    pub(crate) nd: bool,
    /// The target address of a neighbour solicitation or advertisement (zero otherwise).
    pub(crate) nd_target: [u8; 16],
}

const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

#[cgroup_skb(ingress)]
pub fn seg_ingress(ctx: SkBuffContext) -> i32 {
    decide(&ctx, DIRECTION_INGRESS)
}

#[cgroup_skb(egress)]
pub fn seg_egress(ctx: SkBuffContext) -> i32 {
    decide(&ctx, DIRECTION_EGRESS)
}

#[inline(always)]
pub(crate) fn count(idx: u32) {
    if let Some(slot) = SEG_COUNTERS.get_ptr_mut(idx) {
        unsafe { *slot += 1 };
    }
}

impl Pkt {
    #[inline(always)]
    pub(crate) const fn zero() -> Pkt {
        Pkt { src: [0; 16], dst: [0; 16], sport: 0, dport: 0, protocol: 0, tcp_flags: 0, nd: false, nd_target: [0; 16] }
    }
}

/// Fills `p` (zeroed by the caller) from the IP header at `base` (0 at cgroup_skb hooks, 14 behind
/// an Ethernet header at TC); None when it cannot be parsed. Writes into the caller's frame: the
/// eBPF stack (512 bytes over all calls) has no room for copies.
#[inline(always)]
pub(crate) fn parse(skb: &SkBuff, base: usize, p: &mut Pkt) -> Option<()> {
    let b0: u8 = skb.load(base).ok()?;
    let l4: usize;
    match b0 >> 4 {
        4 => {
            let ihl = ((b0 & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            p.protocol = skb.load(base + 9).ok()?;
            let s: [u8; 4] = skb.load(base + 12).ok()?;
            let d: [u8; 4] = skb.load(base + 16).ok()?;
            p.src[10] = 0xff;
            p.src[11] = 0xff;
            p.dst[10] = 0xff;
            p.dst[11] = 0xff;
            p.src[12] = s[0];
            p.src[13] = s[1];
            p.src[14] = s[2];
            p.src[15] = s[3];
            p.dst[12] = d[0];
            p.dst[13] = d[1];
            p.dst[14] = d[2];
            p.dst[15] = d[3];
            let frag: [u8; 2] = skb.load(base + 6).ok()?;
            if (u16::from_be_bytes(frag) & 0x1fff) != 0 {
                // A non-first fragment carries no ports.
                return Some(());
            }
            l4 = ihl & 0x3c;
        }
        6 => {
            p.protocol = skb.load(base + 6).ok()?;
            p.src = skb.load(base + 8).ok()?;
            p.dst = skb.load(base + 24).ok()?;
            l4 = 40;
            if p.protocol == 58 {
                let t: u8 = skb.load(base + l4).ok()?;
                p.nd = (133..=137).contains(&t);
                if t == ICMPV6_NEIGHBOUR_SOLICITATION || t == ICMPV6_NEIGHBOUR_ADVERTISEMENT {
                    // A truncated message keeps a zero target (matches no forensics peer).
                    if let Ok(target) = skb.load::<[u8; 16]>(base + l4 + 8) {
                        p.nd_target = target;
                    }
                }
                return Some(());
            }
        }
        _ => return None,
    }
    if p.protocol == 6 || p.protocol == 17 || p.protocol == 132 {
        let ports: [u8; 4] = skb.load(base + l4).ok()?;
        p.sport = u16::from_be_bytes([ports[0], ports[1]]);
        p.dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    if p.protocol == PROTO_TCP {
        p.tcp_flags = skb.load(base + l4 + 13).ok()?;
    }
    Some(())
}

#[inline(always)]
pub(crate) fn is_loopback(a: &[u8; 16]) -> bool {
    let mut zero10 = true;
    let mut i = 0;
    while i < 10 {
        if a[i] != 0 {
            zero10 = false;
        }
        i += 1;
    }
    if zero10 && a[10] == 0xff && a[11] == 0xff && a[12] == 127 {
        return true;
    }
    zero10 && a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 1
}

#[inline(always)]
pub(crate) fn same(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn quarantine(ctx: &SkBuffContext, own: u64) -> Option<&'static QuarantineValue> {
    quarantine_in_hierarchy(own, |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) })
}

/// The quarantine entry of cgroup `own` or of one of its ancestors, walked from the root down
/// with `ancestor(level)` (the skb's or the current task's helper: both return 0 past the end).
#[inline(always)]
pub(crate) fn quarantine_in_hierarchy(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<&'static QuarantineValue> {
    if let Some(v) = unsafe { SEG_QUARANTINE.get(&own) } {
        return Some(v);
    }
    let mut level: i32 = 1;
    while level <= SEG_MAX_CGROUP_LEVELS as i32 {
        let anc = ancestor(level);
        if anc == 0 || anc == own {
            break;
        }
        if let Some(v) = unsafe { SEG_QUARANTINE.get(&anc) } {
            return Some(v);
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn decide(ctx: &SkBuffContext, direction: u8) -> i32 {
    count(CNT_PACKETS);
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let mut p = Pkt::zero();
    // 1. quarantine: first, before any parse or early return, so no packet shape slips past it.
    if let Some(q) = quarantine(ctx, cgroup_id) {
        return quarantined(ctx, &mut p, direction as u32, q.endpoint_id, cgroup_id);
    }
    // 2. whose cgroup: an endpoint (its id), or a pod below a fail-closed parent whose
    // endpoint is not written yet (only traffic inside the pod passes).
    let (kind, endpoint_id) = match cgroup_entry(ctx, cgroup_id) {
        Some(v) => (v.kind, v.endpoint_id),
        None => (0, 0),
    };
    if kind == CGROUP_PARENT {
        return unknown_endpoint(ctx, &mut p, direction as u32, cgroup_id);
    }
    // 3. what the policy cannot judge: unparsable packets pass unless the pod is isolated in
    // this direction; neighbour discovery passes.
    if parse(&ctx.skb, 0, &mut p).is_none() {
        count(CNT_UNPARSED);
        if kind == CGROUP_ENDPOINT && isolated(endpoint_id, direction) {
            p = Pkt::zero();
            count(CNT_DENIED_UNPARSED);
            report(&p, path_bits(PATH_UNPARSED) | ((direction as u32) << 8) | REASON_UNPARSED as u32, endpoint_id, 0, cgroup_id);
            return DROP;
        }
        return PASS;
    }
    if p.nd {
        return PASS;
    }
    // 4. conntrack, 5. policy
    policy(&p, direction as u32, cgroup_id)
}

/// The deepest SEG_CGROUPS entry among the socket's cgroup and its ancestors (its own first:
/// one lookup when the pod's processes sit in the pod cgroup itself).
#[inline(always)]
fn cgroup_entry(ctx: &SkBuffContext, own: u64) -> Option<&'static CgroupValue> {
    if let Some(v) = unsafe { SEG_CGROUPS.get(&own) } {
        return Some(v);
    }
    let mut found: Option<&'static CgroupValue> = None;
    let mut level: i32 = 1;
    while level <= SEG_MAX_CGROUP_LEVELS as i32 {
        let anc = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) };
        if anc == 0 || anc == own {
            break;
        }
        if let Some(v) = unsafe { SEG_CGROUPS.get(&anc) } {
            found = Some(v);
        }
        level += 1;
    }
    found
}

/// Whether endpoint `endpoint_id` is isolated in `direction` (a policy selects it).
#[inline(always)]
fn isolated(endpoint_id: u32, direction: u8) -> bool {
    let flag = if direction == DIRECTION_EGRESS { EP_ISOLATED_EGRESS } else { EP_ISOLATED_INGRESS };
    match unsafe { SEG_ENDPOINTS.get(&endpoint_id) } {
        Some(cfg) => cfg.flags & flag != 0,
        None => false,
    }
}

/// A pod below a fail-closed parent with no endpoint yet: traffic inside the pod (same address,
/// loopback) passes, everything else is dropped (PATH_UNKNOWN_ENDPOINT), parsed or not.
#[inline(never)]
fn unknown_endpoint(ctx: &SkBuffContext, p: &mut Pkt, direction: u32, cgroup_id: u64) -> i32 {
    if parse(&ctx.skb, 0, p).is_none() {
        *p = Pkt::zero();
    } else {
        let (local, peer) = if direction == DIRECTION_EGRESS as u32 { (&p.src, &p.dst) } else { (&p.dst, &p.src) };
        if same(local, peer) || is_loopback(peer) {
            return PASS;
        }
    }
    count(CNT_DENIED_UNKNOWN);
    report(p, path_bits(PATH_UNKNOWN_ENDPOINT) | (direction << 8) | REASON_UNKNOWN_ENDPOINT as u32, 0, 0, cgroup_id);
    DROP
}

/// A quarantined pod: only traffic inside the pod and the forensics exception pass. Whatever
/// cannot be parsed is dropped (PATH_UNPARSED); neighbour discovery passes only when its target
/// is a forensics peer (so the exception keeps working over IPv6), else PATH_ND.
#[inline(never)]
fn quarantined(ctx: &SkBuffContext, p: &mut Pkt, direction: u32, endpoint_id: u32, cgroup_id: u64) -> i32 {
    if parse(&ctx.skb, 0, p).is_none() {
        // What was read before the parse gave up is not trustworthy: report zeros.
        *p = Pkt::zero();
        count(CNT_DENIED_QUARANTINE);
        report(p, path_bits(PATH_UNPARSED) | (direction << 8) | REASON_QUARANTINE as u32, endpoint_id, 0, cgroup_id);
        return DROP;
    }
    if p.nd {
        if nd_exempt(p) {
            return PASS;
        }
        count(CNT_DENIED_QUARANTINE);
        report(p, path_bits(PATH_ND) | (direction << 8) | REASON_QUARANTINE as u32, endpoint_id, 0, cgroup_id);
        return DROP;
    }
    quarantined_ip(ctx, p, direction, endpoint_id, cgroup_id)
}

#[inline(always)]
pub(crate) fn path_bits(path: u8) -> u32 {
    (path as u32) << 16
}

/// Whether the packet's socket is a raw socket (hand-built headers): only to name the path in a
/// drop record.
#[inline(always)]
fn from_raw_socket(ctx: &SkBuffContext) -> bool {
    // SAFETY: the verifier checks both pointers (sk may be null; bpf_sk_fullsock returns null for
    // request and time-wait sockets) before the field read.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return false;
        }
        let full = bpf_sk_fullsock(sk);
        !full.is_null() && (*full).type_ == SOCK_RAW
    }
}

/// What a quarantined pod may still exchange: traffic inside the pod (same address, loopback)
/// and the forensics exception.
#[inline(always)]
pub(crate) fn quarantine_exempt(p: &Pkt, egress: bool) -> bool {
    let (local, peer, local_port, peer_port) =
        if egress { (&p.src, &p.dst, p.sport, p.dport) } else { (&p.dst, &p.src, p.dport, p.sport) };
    if same(local, peer) || is_loopback(peer) {
        return true;
    }
    if let Some(f) = SEG_FORENSICS.get(Key::new(128, IpAddrKey { addr: *peer })) {
        // The exception's port is the service side of the flow: the peer's port when the pod
        // connects out, the pod's own port when the peer connects in. Either end matching lets
        // both a session and its replies through.
        if (f.protocol == 0 || f.protocol == p.protocol) && (f.port == 0 || f.port == peer_port || f.port == local_port) {
            return true;
        }
    }
    false
}

/// Neighbour discovery a quarantined pod may still exchange: about a forensics peer's address.
#[inline(always)]
pub(crate) fn nd_exempt(p: &Pkt) -> bool {
    SEG_FORENSICS.get(Key::new(128, IpAddrKey { addr: p.nd_target })).is_some()
}

#[inline(never)]
fn quarantined_ip(ctx: &SkBuffContext, p: &Pkt, direction: u32, endpoint_id: u32, cgroup_id: u64) -> i32 {
    if quarantine_exempt(p, direction == DIRECTION_EGRESS as u32) {
        return PASS;
    }
    count(CNT_DENIED_QUARANTINE);
    let path = if from_raw_socket(ctx) { PATH_RAW_SOCKET } else { PATH_IP };
    report(p, path_bits(path) | (direction << 8) | REASON_QUARANTINE as u32, endpoint_id, 0, cgroup_id);
    DROP
}

/// What policy says about one hook of a flow.
struct Judgement {
    /// The local endpoint (0: the local address is no endpoint, nothing to enforce).
    local_ep: u32,
    peer_identity: u32,
    /// 1 allowed, 0 denied.
    allowed: u32,
}

/// Conntrack, then the policy lookups.
#[inline(never)]
fn policy(p: &Pkt, direction: u32, cgroup_id: u64) -> i32 {
    let dir = direction as u8;
    let egress = dir == DIRECTION_EGRESS;
    let Some(scratch) = SEG_CT_SCRATCH.get_ptr_mut(0) else {
        // Index 0 of a one-entry array always exists; fail closed all the same.
        return DROP;
    };
    // SAFETY: a per-CPU map value: this program run is its only user on this CPU.
    let scratch = unsafe { &mut *scratch };
    let ck = &mut scratch.key;
    let j = &mut scratch.judgement;
    let src_is_lo = ct_key_into(ck, &p.src, p.sport, &p.dst, p.dport, p.protocol);
    let (local, peer, local_port, peer_port) =
        if egress { (&p.src, &p.dst, p.sport, p.dport) } else { (&p.dst, &p.src, p.dport, p.sport) };
    // The pod at this hook is the key's lo side when it sends from the lo side (egress) or
    // receives from the hi side (ingress); its two CT bits are exactly this hook's pass bits.
    let local_is_lo = src_is_lo == egress;
    let pass_bits = ct_pass_bits(src_is_lo, dir);
    let Some(cfg) = SEG_CT_CONFIG.get(0) else {
        // Index 0 of a one-entry array always exists; fail closed all the same.
        return DROP;
    };
    let strict = cfg.established_flows == ESTABLISHED_FLOWS_STRICT;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A SYN without ACK opens a connection: never let through by an entry, always judged.
    let syn = p.protocol == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let proto = (p.protocol as u32) << 16;
    if let Some(e) = SEG_CONNTRACK.get_ptr_mut(&*ck) {
        // SAFETY: a map value pointer the verifier checked; valid for this program run.
        let e = unsafe { &mut *e };
        if !syn && e.flags & pass_bits != 0 && ct_live(e, cfg, now) {
            let generation = if local_is_lo { e.generation_lo } else { e.generation_hi };
            if strict && generation != cfg.policy_generation {
                // Judged under an older policy: judge this pod's bits again under the current one.
                let (egress_bit, ingress_bit) = ct_side_bits(local_is_lo);
                let mut flags = e.flags;
                if flags & egress_bit != 0 {
                    judge(local, peer, DIRECTION_EGRESS as u32, proto | peer_port as u32, j);
                    if j.allowed == 0 {
                        flags &= !egress_bit;
                    }
                }
                if flags & ingress_bit != 0 {
                    judge(local, peer, DIRECTION_INGRESS as u32, proto | local_port as u32, j);
                    if j.allowed == 0 {
                        flags &= !ingress_bit;
                    }
                }
                e.flags = flags;
                if local_is_lo {
                    e.generation_lo = cfg.policy_generation;
                } else {
                    e.generation_hi = cfg.policy_generation;
                }
            }
            if e.flags & pass_bits != 0 {
                let (state, fin) = ct_next_state(e.state, e.tcp_fin, p.protocol, p.tcp_flags, src_is_lo);
                if state != e.state || fin != e.tcp_fin || now.wrapping_sub(e.last_seen_ns) > CT_REFRESH_NS {
                    e.state = state;
                    e.tcp_fin = fin;
                    e.last_seen_ns = now;
                }
                count(CNT_ALLOWED_CT);
                return PASS;
            }
        }
    }
    judge(local, peer, direction, proto | p.dport as u32, j);
    if j.local_ep == 0 {
        return PASS;
    }
    if j.allowed != 0 {
        count(CNT_ALLOWED_POLICY);
        let bit = ct_allow_bit(src_is_lo, dir);
        // Looked up again rather than carried across the judgement (simpler for the verifier;
        // the new-flow path only).
        if let Some(e) = SEG_CONNTRACK.get_ptr_mut(&*ck) {
            // SAFETY: as above.
            let e = unsafe { &mut *e };
            // A live entry, and not a new connection on a used 5-tuple: add this hook's bit.
            if ct_live(e, cfg, now) && (!syn || e.state == CT_STATE_SYN) {
                let generation = if local_is_lo { e.generation_lo } else { e.generation_hi };
                let mut flags = e.flags;
                if generation != cfg.policy_generation {
                    // This pod's other bit was judged under an older policy: drop it.
                    flags &= !pass_bits;
                }
                e.flags = flags | bit;
                if local_is_lo {
                    e.generation_lo = cfg.policy_generation;
                } else {
                    e.generation_hi = cfg.policy_generation;
                }
                let (state, fin) = ct_next_state(e.state, e.tcp_fin, p.protocol, p.tcp_flags, src_is_lo);
                e.state = state;
                e.tcp_fin = fin;
                e.last_seen_ns = now;
                return PASS;
            }
        }
        // No entry, an expired one, or a SYN reusing a 5-tuple: a new connection.
        if ct_create(ck, p, bit | ((src_is_lo as u32) << 31), j.local_ep, now) {
            return PASS;
        }
        // Allowed, but the pod's quota (or the table) is full: without an entry its replies
        // would be judged as new flows, so the connection is refused here, and counted.
        report(p, (direction << 8) | REASON_CONNTRACK_FULL as u32, j.local_ep, j.peer_identity, cgroup_id);
        return DROP;
    }
    count(CNT_DENIED_POLICY);
    report(p, (direction << 8) | REASON_POLICY as u32, j.local_ep, j.peer_identity, cgroup_id);
    DROP
}

/// Writes a new entry: `bit_lo` is the allowing hook's CT bit, bit 31 set when the packet came
/// from the lo side. A new key is charged to `owner` (the pod at this hook) within its quota;
/// false when the quota or the table is full (counted per pod).
#[inline(never)]
fn ct_create(ck: &CtKey, p: &Pkt, bit_lo: u32, owner: u32, now: u64) -> bool {
    let (generation, quota) = match SEG_CT_CONFIG.get(0) {
        Some(c) => (c.policy_generation, if c.per_endpoint_max == 0 { CT_DEFAULT_PER_ENDPOINT_MAX } else { c.per_endpoint_max }),
        None => (0, CT_DEFAULT_PER_ENDPOINT_MAX),
    };
    let (state, fin) = ct_next_state(0, 0, p.protocol, p.tcp_flags, bit_lo >> 31 != 0);
    if let Some(e) = SEG_CONNTRACK.get_ptr_mut(ck) {
        // An expired entry or a reused 5-tuple: rewritten in place, still charged to its owner
        // (the other end of the same 5-tuple).
        // SAFETY: a map value pointer the verifier checked; valid for this program run.
        let e = unsafe { &mut *e };
        e.flags = bit_lo & 0xf;
        e.state = state;
        e.tcp_fin = fin;
        e.last_seen_ns = now;
        e.generation_lo = generation;
        e.generation_hi = generation;
        return true;
    }
    let usage = match SEG_CT_PODS.get_ptr_mut(&owner) {
        Some(u) => u,
        None => {
            let _ = SEG_CT_PODS.insert(&owner, &CtPodUsage::default(), BPF_NOEXIST as u64);
            match SEG_CT_PODS.get_ptr_mut(&owner) {
                Some(u) => u,
                // No accounting row: fail closed.
                None => return false,
            }
        }
    };
    // SAFETY: map value pointers the verifier checked; other CPUs and the sweep program update
    // the same row, so only with atomic adds (a plain read for the quota check).
    let entries = unsafe { &raw mut (*usage).entries };
    if unsafe { core::ptr::read_volatile(entries) } >= quota as i64 {
        atomic_add(unsafe { &raw mut (*usage).quota_drops }.cast(), 1);
        return false;
    }
    let v = CtValue {
        flags: bit_lo & 0xf,
        state,
        tcp_fin: fin,
        _pad: 0,
        last_seen_ns: now,
        generation_lo: generation,
        generation_hi: generation,
        owner,
        _pad2: 0,
    };
    match SEG_CONNTRACK.insert(ck, &v, BPF_NOEXIST as u64) {
        Ok(()) => {
            atomic_add(entries, 1);
            true
        }
        // Another CPU created it first: that entry stands (this hook's bit is set again by the
        // flow's next packet).
        Err(e) if e == -17 => true,
        Err(_) => {
            atomic_add(unsafe { &raw mut (*usage).table_full_drops }.cast(), 1);
            false
        }
    }
}

/// The conntrack sweeper's kernel half: its input (after a 14-byte Ethernet header, which
/// BPF_PROG_TEST_RUN strips) is up to CT_SWEEP_BATCH keys; each that is still expired is removed
/// and uncharged from its owner. Returns how many were removed. Expiry is checked here, with the
/// datapath's clock, so an entry that came back to life since the user side read it stays.
#[socket_filter]
pub fn seg_ct_sweep(ctx: SkBuffContext) -> i64 {
    let Some(cfg) = SEG_CT_CONFIG.get(0) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let keys = ctx.len() / core::mem::size_of::<CtKey>() as u32;
    let mut removed: i64 = 0;
    let mut i: u32 = 0;
    while i < CT_SWEEP_BATCH && i < keys {
        let Ok(key) = ctx.load::<CtKey>(i as usize * core::mem::size_of::<CtKey>()) else {
            break;
        };
        let owner = match unsafe { SEG_CONNTRACK.get(&key) } {
            Some(e) if !ct_live(e, cfg, now) => e.owner,
            _ => {
                i += 1;
                continue;
            }
        };
        if SEG_CONNTRACK.remove(&key).is_ok() {
            removed += 1;
            if let Some(u) = SEG_CT_PODS.get_ptr_mut(&owner) {
                atomic_add(unsafe { &raw mut (*u).entries }, -1);
            }
        }
        i += 1;
    }
    removed
}

/// An atomic add on a shared map value (u64 counters are passed cast to i64: same bits).
#[inline(always)]
fn atomic_add(p: *mut i64, v: i64) {
    // SAFETY: `p` points into a map value the verifier checked (callers pass field pointers of a
    // looked-up value); the result is unused, so this is one BPF atomic add instruction.
    unsafe { core::intrinsics::atomic_xadd::<i64, i64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, v) };
}

/// Not idle past its state's timeout (an expired entry is forgotten: overwritten when policy
/// allows the flow again).
#[inline(always)]
fn ct_live(e: &CtValue, cfg: &CtConfig, now: u64) -> bool {
    now.wrapping_sub(e.last_seen_ns) <= ct_timeout_s(cfg, e.state) as u64 * 1_000_000_000
}

/// Policy for one hook of a flow: may `peer` reach `local` (ingress) or `local` reach `peer`
/// (egress) on `proto_port` (protocol << 16 | the service port: the destination port of the
/// flow's first packet)?
#[inline(never)]
fn judge(local: &[u8; 16], peer: &[u8; 16], direction: u32, proto_port: u32, out: &mut Judgement) {
    out.local_ep = 0;
    out.peer_identity = IDENTITY_WORLD;
    out.allowed = 1;
    let Some(local_v) = SEG_IPCACHE.get(Key::new(128, IpAddrKey { addr: *local })) else {
        return;
    };
    let local_ep = local_v.endpoint_id;
    if local_ep == 0 {
        return;
    }
    out.local_ep = local_ep;
    let (peer_identity, peer_cidr, peer_ep) = match SEG_IPCACHE.get(Key::new(128, IpAddrKey { addr: *peer })) {
        Some(v) => (v.identity, v.cidr_identity, v.endpoint_id),
        None => (IDENTITY_WORLD, 0, 0),
    };
    out.peer_identity = peer_identity;
    if peer_ep == local_ep || same(local, peer) {
        return;
    }
    let Some(cfg) = (unsafe { SEG_ENDPOINTS.get(&local_ep) }) else {
        return;
    };
    let (flag, plens) = if direction == DIRECTION_EGRESS as u32 {
        (EP_ISOLATED_EGRESS, cfg.egress_port_plens)
    } else {
        (EP_ISOLATED_INGRESS, cfg.ingress_port_plens)
    };
    if cfg.flags & flag == 0 {
        return;
    }
    let allowed = probe(local_ep, direction, peer_identity, proto_port, plens)
        || (peer_cidr != 0 && probe(local_ep, direction, peer_cidr, proto_port, plens))
        || probe(local_ep, direction, IDENTITY_ANY, proto_port, plens);
    out.allowed = allowed as u32;
}

/// POLICY probes for one peer id: exact port, each port-block size in use (longest first), any
/// port, any protocol.
#[inline(never)]
fn probe(endpoint_id: u32, direction: u32, peer: u32, proto_port: u32, plens: u32) -> bool {
    let protocol = (proto_port >> 16) as u8;
    let port = proto_port as u16;
    let mut key = PolicyKey {
        endpoint_id,
        peer_identity: peer,
        direction: direction as u8,
        protocol,
        port_plen: 16,
        _pad: 0,
        port,
        _pad2: 0,
    };
    if unsafe { SEG_POLICY.get(&key) }.is_some() {
        return true;
    }
    if plens != 0 {
        let mut plen: u32 = 15;
        while plen >= 1 {
            if plens & (1 << plen) != 0 {
                key.port_plen = plen as u8;
                key.port = port & (0xffffu32 << (16 - plen)) as u16;
                if unsafe { SEG_POLICY.get(&key) }.is_some() {
                    return true;
                }
            }
            plen -= 1;
        }
    }
    key.port_plen = 0;
    key.port = 0;
    if unsafe { SEG_POLICY.get(&key) }.is_some() {
        return true;
    }
    key.protocol = PROTO_ANY;
    unsafe { SEG_POLICY.get(&key) }.is_some()
}

/// A policy_denied record, rate limited per endpoint (the rest are counted and reported with the
/// next record). `direction_reason` packs path << 16 | direction << 8 | reason (PATH_IP is 0).
#[inline(never)]
pub(crate) fn report(p: &Pkt, direction_reason: u32, endpoint_id: u32, peer_identity: u32, cgroup_id: u64) {
    let direction = (direction_reason >> 8) as u8;
    let Some((now, suppressed)) = admit(endpoint_id, cgroup_id) else {
        return;
    };
    let Some(mut entry) = SEG_EVENTS.reserve::<PolicyVerdictEvent>(0) else {
        count(CNT_EVENTS_LOST);
        return;
    };
    let egress = direction == DIRECTION_EGRESS;
    let e = unsafe { &mut *entry.as_mut_ptr() };
    fill_verdict_header(e, now, cgroup_id, 0, direction_reason, endpoint_id, peer_identity, suppressed);
    e.local_addr = if egress { p.src } else { p.dst };
    e.peer_addr = if egress { p.dst } else { p.src };
    e.local_port = if egress { p.sport } else { p.dport };
    e.peer_port = if egress { p.dport } else { p.sport };
    e.protocol = p.protocol;
    entry.submit(0);
}

/// Fills a verdict record's header and its verdict fields (everything but the packet's addresses,
/// ports and protocol), for the cgroup_skb programs (`report`) and the socket-creation hooks and
/// the TC backstop (`escape.rs`) alike. `pid_tgid` is 0 where no task is known (packets);
/// `direction_reason` packs path << 16 | direction << 8 | reason, as `report` takes it. The comm
/// is zeroed (the socket hooks then read the task's).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fill_verdict_header(
    e: &mut PolicyVerdictEvent,
    now: u64,
    cgroup_id: u64,
    pid_tgid: u64,
    direction_reason: u32,
    endpoint_id: u32,
    peer_identity: u32,
    suppressed: u32,
) {
    e.header.ktime_ns = now;
    e.header.cgroup_id = cgroup_id;
    e.header.kind = KIND_POLICY_VERDICT;
    e.header.source = SOURCE_DATAPATH;
    e.header.pid = (pid_tgid >> 32) as u32;
    e.header.tid = pid_tgid as u32;
    e.header.ppid = 0;
    e.header.uid = 0;
    e.header.gid = 0;
    e.header.euid = 0;
    e.header.egid = 0;
    e.header.flags = 0;
    e.header.comm = [0; 16];
    e.header.start_ns = 0;
    e.direction = (direction_reason >> 8) as u8;
    e.reason = direction_reason as u8;
    e.path = (direction_reason >> 16) as u8;
    e.endpoint_id = endpoint_id;
    e.peer_identity = peer_identity;
    e.suppressed = suppressed;
    e._pad2 = 0;
}

/// The record budget, per endpoint (per cgroup for drops of no endpoint, `endpoint_id` 0):
/// Some((now, denials held back since the last record)) when a record may be written, None when
/// records are off or the window's budget is spent (counted).
#[inline(always)]
pub(crate) fn admit(endpoint_id: u32, cgroup_id: u64) -> Option<(u64, u32)> {
    let (limit, enabled) = match SEG_CONFIG.get(0) {
        Some(c) => (if c.deny_events_per_window == 0 { DENY_EVENTS_PER_WINDOW } else { c.deny_events_per_window }, c.emit_denied != 0),
        None => (DENY_EVENTS_PER_WINDOW, false),
    };
    if !enabled {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let state = if endpoint_id != 0 {
        SEG_DENY_RATE.get_ptr_mut(&endpoint_id)
    } else {
        SEG_DENY_RATE_CGROUP.get_ptr_mut(&cgroup_id)
    };
    let suppressed;
    match state {
        Some(st) => {
            let st = unsafe { &mut *st };
            if now.wrapping_sub(st.window_start_ns) > DENY_WINDOW_NS {
                st.window_start_ns = now;
                st.emitted = 0;
            }
            if st.emitted >= limit {
                st.suppressed += 1;
                count(CNT_EVENTS_SUPPRESSED);
                return None;
            }
            st.emitted += 1;
            suppressed = st.suppressed;
            st.suppressed = 0;
        }
        None => {
            let st = DenyRateState { window_start_ns: now, emitted: 1, suppressed: 0 };
            let _ = if endpoint_id != 0 {
                SEG_DENY_RATE.insert(&endpoint_id, &st, 0)
            } else {
                SEG_DENY_RATE_CGROUP.insert(&cgroup_id, &st, 0)
            };
            suppressed = 0;
        }
    }
    Some((now, suppressed))
}
