//! The ways out of a quarantined pod that the cgroup_skb programs cannot see.
//!
//! - `seg_inet_sock_create` (cgroup/sock_create, attached per pod cgroup like the cgroup_skb
//!   programs, any kernel with cgroup BPF): a quarantined pod opens no raw IP socket (AF_INET,
//!   AF_INET6 SOCK_RAW); socket() fails with EPERM. This hook sees inet sockets only.
//! - `seg_sock_create` (lsm_cgroup/socket_post_create, per pod cgroup too): the same for packet
//!   sockets (AF_PACKET, SOCK_PACKET) and raw IP sockets. Needs the BPF LSM active (and the
//!   kernel letting palisade load LSM programs); where it is not, packet sockets can still be
//!   opened and the TC backstop is what stops their frames.
//! - `seg_backstop_from_pod` / `seg_backstop_to_pod` (TC, tcx ingress/egress on the pod's
//!   host-side interface): frames no cgroup hook saw -- written by a packet socket opened before
//!   the quarantine, or made by the kernel (ARP, neighbour discovery, ICMP errors) -- are dropped
//!   when the interface's pod is quarantined, except the forensics exception (and ARP/ND about a
//!   forensics peer). Pods not quarantined cost one hash lookup per frame (SEG_BACKSTOP), plus
//!   the SEG_QUARANTINE lookup; the pod cannot reach or remove a program on the host side.
//!
//! Drop records use PATH_SOCKET_CREATE and PATH_BACKSTOP (see palisade_common::net).

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid,
    },
    macros::{cgroup_sock, classifier, lsm_cgroup, map},
    maps::{HashMap, lpm_trie::Key},
    programs::{LsmContext, SockContext, TcContext},
};
use palisade_common::{
    BackstopValue, CNT_DENIED_QUARANTINE, IpAddrKey, DIRECTION_EGRESS, DIRECTION_INGRESS,
    PATH_BACKSTOP, PATH_SOCKET_CREATE, PolicyVerdictEvent, QuarantineValue,
    REASON_QUARANTINE, SEG_MAX_BACKSTOP,
};

use crate::datapath::{
    Pkt, SEG_EVENTS, SEG_FORENSICS, SEG_QUARANTINE, admit, count, fill_verdict_header, quarantine_in_hierarchy, nd_exempt, parse, path_bits,
    quarantine_exempt, report,
};

#[map]
static SEG_BACKSTOP: HashMap<u32, BackstopValue> = HashMap::with_max_entries(SEG_MAX_BACKSTOP, 0);

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_PACKET: i32 = 17;
const SOCK_RAW: i32 = 3;
const SOCK_PACKET: i32 = 10;
const SOCK_TYPE_MASK: i32 = 0xf;

/// lsm_cgroup: 1 allows, 0 refuses (socket() returns EPERM).
const LSM_ALLOW: i32 = 1;
const LSM_DENY: i32 = 0;

/// tcx: let the next program (or the stack) decide; drop.
const TCX_NEXT: i32 = -1;
const TCX_DROP: i32 = TC_ACT_SHOT as i32;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

// ---- socket creation -------------------------------------------------------------------------

/// `int socket_post_create(struct socket *sock, int family, int type, int protocol, int kern)`
#[lsm_cgroup(hook = "socket_post_create")]
pub fn seg_sock_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(1);
    let sock_type: i32 = ctx.arg(2);
    let protocol: i32 = ctx.arg(3);
    let kern: i32 = ctx.arg(4);
    if kern != 0 {
        return LSM_ALLOW;
    }
    let kind = sock_type & SOCK_TYPE_MASK;
    let raw_ip = (family == AF_INET || family == AF_INET6) && kind == SOCK_RAW;
    if family != AF_PACKET && kind != SOCK_PACKET && !raw_ip {
        return LSM_ALLOW;
    }
    let own = unsafe { bpf_get_current_cgroup_id() };
    let Some(q) = current_quarantine(own) else {
        return LSM_ALLOW;
    };
    count(CNT_DENIED_QUARANTINE);
    report_socket(own, q.endpoint_id, family as u16, kind as u16, protocol as u8);
    LSM_DENY
}

/// `cgroup/sock_create`: 1 allows, 0 refuses (socket() returns EPERM).
#[cgroup_sock(sock_create)]
pub fn seg_inet_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context is the kernel's bpf_sock of the socket being created.
    let (family, kind, protocol) = unsafe { ((*ctx.sock).family as i32, (*ctx.sock).type_ as i32, (*ctx.sock).protocol) };
    if kind & SOCK_TYPE_MASK != SOCK_RAW {
        return LSM_ALLOW;
    }
    let own = unsafe { bpf_get_current_cgroup_id() };
    let Some(q) = current_quarantine(own) else {
        return LSM_ALLOW;
    };
    count(CNT_DENIED_QUARANTINE);
    report_socket(own, q.endpoint_id, family as u16, (kind & SOCK_TYPE_MASK) as u16, protocol as u8);
    LSM_DENY
}

/// The quarantine entry of the current task's cgroup or one of its ancestors.
#[inline(always)]
fn current_quarantine(own: u64) -> Option<&'static QuarantineValue> {
    quarantine_in_hierarchy(own, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

#[inline(never)]
fn report_socket(cgroup_id: u64, endpoint_id: u32, family: u16, kind: u16, protocol: u8) {
    let Some((now, suppressed)) = admit(endpoint_id, cgroup_id) else {
        return;
    };
    let Some(mut entry) = SEG_EVENTS.reserve::<PolicyVerdictEvent>(0) else {
        count(palisade_common::CNT_EVENTS_LOST);
        return;
    };
    let e = unsafe { &mut *entry.as_mut_ptr() };
    let pid_tgid = unsafe { bpf_get_current_pid_tgid() };
    let direction_reason = path_bits(PATH_SOCKET_CREATE) | ((DIRECTION_EGRESS as u32) << 8) | REASON_QUARANTINE as u32;
    fill_verdict_header(e, now, cgroup_id, pid_tgid, direction_reason, endpoint_id, 0, suppressed);
    // SAFETY: the helper writes at most 16 bytes into the 16-byte array.
    unsafe { bpf_get_current_comm(e.header.comm.as_mut_ptr().cast(), 16) };
    // A socket has no addresses yet: the record carries the socket's family and type instead.
    e.local_addr = [0; 16];
    e.peer_addr = [0; 16];
    e.local_port = family;
    e.peer_port = kind;
    e.protocol = protocol;
    entry.submit(0);
}

// ---- TC backstop on the host-side interface --------------------------------------------------

/// Ingress of the host-side interface: frames the pod sends.
#[classifier]
pub fn seg_backstop_from_pod(ctx: TcContext) -> i32 {
    backstop(&ctx, DIRECTION_EGRESS as u32)
}

/// Egress of the host-side interface: frames sent to the pod.
#[classifier]
pub fn seg_backstop_to_pod(ctx: TcContext) -> i32 {
    backstop(&ctx, DIRECTION_INGRESS as u32)
}

#[inline(always)]
fn backstop(ctx: &TcContext, direction: u32) -> i32 {
    // SAFETY: the context pointer is the kernel's __sk_buff for this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(b) = (unsafe { SEG_BACKSTOP.get(&ifindex) }) else {
        return TCX_NEXT;
    };
    let cgroup_id = b.cgroup_id;
    let Some(q) = (unsafe { SEG_QUARANTINE.get(&cgroup_id) }) else {
        return TCX_NEXT;
    };
    backstop_quarantined(ctx, direction, q.endpoint_id, cgroup_id)
}

/// A quarantined pod's frame: IP passes only within the quarantine exceptions, ARP and neighbour
/// discovery only about a forensics peer; everything else (other ethertypes, VLAN tags,
/// unparsable headers) is dropped.
#[inline(never)]
fn backstop_quarantined(ctx: &TcContext, direction: u32, endpoint_id: u32, cgroup_id: u64) -> i32 {
    let egress = direction == DIRECTION_EGRESS as u32;
    let mut p = Pkt::zero();
    let ethertype = match ctx.load::<[u8; 2]>(12) {
        Ok(t) => u16::from_be_bytes(t),
        Err(_) => 0,
    };
    if ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 {
        if parse(&ctx.skb, ETH_HLEN, &mut p).is_none() {
            // Unparsable: the record carries zero addresses.
            p = Pkt::zero();
        } else if p.nd {
            if nd_exempt(&p) {
                return TCX_NEXT;
            }
        } else if quarantine_exempt(&p, egress) {
            return TCX_NEXT;
        }
    } else if ethertype == ETH_P_ARP {
        // The peer's protocol address: the target when the pod asks, the sender when a peer does.
        let offset = if egress { ETH_HLEN + 24 } else { ETH_HLEN + 14 };
        if let Ok(peer) = ctx.load::<[u8; 4]>(offset) {
            p.dst = palisade_common::v4_mapped(peer);
            if SEG_FORENSICS.get(Key::new(128, IpAddrKey { addr: p.dst })).is_some() {
                return TCX_NEXT;
            }
        }
        p = Pkt::zero();
    }
    count(CNT_DENIED_QUARANTINE);
    report(&p, path_bits(PATH_BACKSTOP) | (direction << 8) | REASON_QUARANTINE as u32, endpoint_id, 0, cgroup_id);
    TCX_DROP
}
