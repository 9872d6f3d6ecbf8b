//! Per-packet cost of the cgroup_skb segmentation program with 0 / 10 / 1,000 / 10,000 policies,
//! measured in the kernel with BPF_PROG_TEST_RUN (average ns per run over many repeats).
//!
//!     sudo -E cargo bench -p palisade --bench datapath -- --test --nocapture
//!
//! (a libtest target: the daemon's Cargo.toml declares no custom bench harness)
//!
//! Each policy selects the server pod and allows a distinct ipBlock (/24) on a distinct port, so
//! IPCACHE and POLICY grow with the policy count. Three paths are timed: an established flow
//! (an ACK on a conntrack entry), a new flow that no rule allows (every POLICY probe, then drop),
//! and a new flow that a rule allows (the SYN of a 5-tuple never seen: probes, then a new
//! conntrack entry, charged to the pod); the last with one run per packet (each 5-tuple is new
//! once), FLOWS_PER_ROUND distinct source ports per round, the median of all.
//!
//! `PALISADE_BENCH_BEFORE_OBJECT=path` also loads another build of the eBPF object (e.g. the
//! previous commit's, `target/.../out/palisade-probes`) with the same map contents, and measures
//! both in the same run, interleaved: ROUNDS rounds, each timing every object (order rotated per
//! round); the figures are medians over the rounds.
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use palisade::inventory::Inventory;
use aya::EbpfLoader;
use palisade::segmentation::conntrack::{self, ConntrackSettings};
use palisade::segmentation::datapath::{self, Datapath, DatapathError};
use palisade::segmentation::{PolicySet, Segmentation};
use palisade_common::{
    BackstopValue, MAP_SEG_BACKSTOP, MAP_SEG_CT_CONFIG, PROG_SEG_BACKSTOP_FROM_POD, PROG_SEG_INGRESS, QuarantineValue,
    SEG_MAX_CONNTRACK,
};

const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 7;
const FLOWS_PER_ROUND: u16 = 9_000;

fn packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 14 + 20 + 20];
    p[12] = 0x08; // ethertype IPv4
    let ip = &mut p[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let tcp = &mut p[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = tcp_flags;
    p
}

/// BPF_PROG_TEST_RUN: (return value, average ns per run).
fn test_run(prog_fd: i32, data: &[u8], repeat: u32) -> (u32, u32) {
    let mut out = vec![0u8; data.len() + 256];
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(data.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 10 /* BPF_PROG_TEST_RUN */, attr.as_mut_ptr(), attr.len()) };
    assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    let retval = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
    let duration = u32::from_ne_bytes(attr[36..40].try_into().expect("4 bytes"));
    (retval, duration)
}

fn policies(n: usize) -> PolicySet {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n",
            (i >> 8) & 255,
            i & 255,
            1000 + (i % 50000)
        ));
    }
    if n > 0 {
        text.push_str("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-client, namespace: bench}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}]\n");
    }
    PolicySet::parse(&text, Path::new("bench.yaml")).expect("bench policies")
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

struct Object {
    name: &'static str,
    bpf: aya::Ebpf,
}

impl Object {
    fn fd(&self) -> i32 {
        self.bpf.program(PROG_SEG_INGRESS).expect("program").fd().expect("loaded").as_fd().as_raw_fd()
    }
}

fn median(v: &mut [u32]) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn per_packet_cost_by_policy_count() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping datapath bench: needs root (BPF_PROG_TEST_RUN)");
        return;
    }
    let inv = Inventory::parse(
        "endpoints:\n  - {namespace: bench, name: server, labels: {app: server}, ips: [198.18.0.2]}\n  - {namespace: bench, name: client, labels: {app: client}, ips: [198.18.0.1]}\n  - {namespace: bench, name: other, labels: {app: other}, ips: [198.18.0.3]}\n",
        Path::new("bench-inventory.yaml"),
    )
    .expect("inventory");
    let before = std::env::var_os("PALISADE_BENCH_BEFORE_OBJECT").map(|path| {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", Path::new(&path).display()));
        println!("before: {}", Path::new(&path).display());
        bytes
    });
    println!(
        "{:>9} {:>10} {:>10} {:>8} {:>16} {:>18} {:>18}",
        "policies", "POLICY", "IPCACHE", "object", "established ns", "new-denied ns", "new-allowed ns"
    );
    for n in [0usize, 10, 1_000, 10_000] {
        let seg = Segmentation::new(inv.clone(), policies(n));
        let mut objects = vec![Object { name: "after", bpf: datapath::load(None).expect("load") }];
        if let Some(bytes) = &before {
            objects.push(Object { name: "before", bpf: EbpfLoader::new().load(bytes).expect("load the before object") });
        }
        for obj in &mut objects {
            if obj.name == "after" {
                // Room for every flow the bench creates (the default quota is per pod).
                let settings = ConntrackSettings { per_pod: SEG_MAX_CONNTRACK, ..ConntrackSettings::default() };
                conntrack::configure(&mut obj.bpf, &settings).expect("conntrack settings");
            }
            let mut dp = Datapath::adopt(&mut obj.bpf).expect("adopt");
            match dp.sync(&mut obj.bpf, seg.compiled()) {
                Ok(_) => {}
                // An object from before SEG_CT_CONFIG existed: its maps are complete by then.
                Err(DatapathError::MissingMap { name: MAP_SEG_CT_CONFIG }) if obj.name == "before" => {}
                Err(err) => panic!("sync {}: {err}", obj.name),
            }
        }
        // Established: a SYN then an ACK make the entry; the timed ACKs hit it.
        let syn = packet([198, 18, 0, 1], [198, 18, 0, 2], 40000, 8080, TCP_SYN);
        let established = packet([198, 18, 0, 1], [198, 18, 0, 2], 40000, 8080, TCP_ACK);
        // New flow from a pod no rule allows: all probes, then drop (no conntrack entry made).
        let denied = packet([198, 18, 0, 3], [198, 18, 0, 2], 40001, 8080, TCP_SYN);
        for obj in &objects {
            let fd = obj.fd();
            let (r0, _) = test_run(fd, &syn, 1);
            let (r1, _) = test_run(fd, &established, 1);
            let (dret, _) = test_run(fd, &denied, 1);
            if n > 0 {
                assert_eq!((r0, r1), (1, 1), "{}: client -> server:8080 allowed", obj.name);
                assert_eq!(dret, 0, "{}: other -> server:8080 denied", obj.name);
            }
        }
        let mut est: Vec<Vec<u32>> = vec![Vec::new(); objects.len()];
        let mut new: Vec<Vec<u32>> = vec![Vec::new(); objects.len()];
        let mut created: Vec<Vec<u32>> = vec![Vec::new(); objects.len()];
        for round in 0..ROUNDS {
            for k in 0..objects.len() {
                let i = (round + k) % objects.len();
                let fd = objects[i].fd();
                let (ret, ns) = test_run(fd, &established, REPEAT);
                assert!(n == 0 || ret == 1, "{}: established passes", objects[i].name);
                est[i].push(ns);
                new[i].push(test_run(fd, &denied, REPEAT).1);
                for f in 0..FLOWS_PER_ROUND {
                    let sport = 1024 + round as u16 * FLOWS_PER_ROUND + f;
                    let (ret, ns) = test_run(fd, &packet([198, 18, 0, 1], [198, 18, 0, 2], sport, 8080, TCP_SYN), 1);
                    assert!(n == 0 || ret == 1, "{}: a new allowed flow passes", objects[i].name);
                    created[i].push(ns);
                }
            }
        }
        for (i, obj) in objects.iter().enumerate() {
            println!(
                "{n:>9} {:>10} {:>10} {:>8} {:>16} {:>18} {:>18}",
                seg.compiled().policy.len(),
                seg.compiled().ipcache.len(),
                obj.name,
                median(&mut est[i]),
                median(&mut new[i]),
                median(&mut created[i])
            );
        }
    }
}

/// The TC backstop on a pod's host-side interface (issue 10): per-frame cost for a pod that is
/// not quarantined (the common case: SEG_BACKSTOP and SEG_QUARANTINE lookups, then "next") and
/// for a quarantined one (frame parsed, exceptions checked, dropped; drop records off).
/// BPF_PROG_TEST_RUN runs a TC program on the loopback device (ifindex 1), so the bench registers
/// ifindex 1 as the pod's interface.
#[test]
fn backstop_cost_per_frame() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping backstop bench: needs root (BPF_PROG_TEST_RUN)");
        return;
    }
    let mut bpf = datapath::load(None).expect("load");
    let cgroup_id = 4242;
    {
        let mut map: aya::maps::HashMap<&mut aya::maps::MapData, u32, BackstopValue> =
            aya::maps::HashMap::try_from(bpf.map_mut(MAP_SEG_BACKSTOP).expect("SEG_BACKSTOP")).expect("map");
        map.insert(1, BackstopValue { cgroup_id }, 0).expect("insert");
    }
    let prog: &mut aya::programs::SchedClassifier =
        bpf.program_mut(PROG_SEG_BACKSTOP_FROM_POD).expect("program").try_into().expect("classifier");
    prog.load().expect("load classifier");
    let fd = prog.fd().expect("loaded").as_fd().as_raw_fd();
    let frame = packet([198, 18, 0, 1], [198, 18, 0, 2], 40000, 8080, 0x10);
    let (ret, free_ns) = test_run(fd, &frame, REPEAT);
    assert_eq!(ret as i32, -1, "a pod that is not quarantined: next");
    palisade::segmentation::datapath::set_quarantine(&mut bpf, cgroup_id, QuarantineValue::default()).expect("quarantine");
    let prog = bpf.program(PROG_SEG_BACKSTOP_FROM_POD).expect("program");
    let fd = prog.fd().expect("loaded").as_fd().as_raw_fd();
    let (ret, quarantined_ns) = test_run(fd, &frame, REPEAT);
    assert_eq!(ret, 2, "a quarantined pod's frame: drop");
    println!("{:>28} {:>10}", "tc backstop", "ns/frame");
    println!("{:>28} {free_ns:>10}", "pod not quarantined");
    println!("{:>28} {quarantined_ns:>10}", "pod quarantined (dropped)");
}
