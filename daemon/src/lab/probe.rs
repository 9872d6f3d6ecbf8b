//! The reachability probe: real connections from every pod to every pod.
//!
//! Enforcement is a cgroup_skb program on each pod's cgroup, so a connection only tests it if
//! the socket belongs to a process in the source pod's cgroup (and the listener to one in the
//! destination's). A thread that only entered the netns would bypass it. So each listener and
//! each client is a forked child that first writes itself into the pod's cgroup.procs and
//! then setns()es into the pod's netns.
//!
//! The children are forked, not exec'ed: the library is used from test binaries where
//! /proc/self/exe is not `palisade`. Between fork and `_exit` a child of a multi-threaded
//! parent may only make async-signal-safe calls, so the child code below uses raw syscalls on
//! memory the parent prepared; it never allocates, locks, logs or panics on purpose.

use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use libc::{c_int, c_void, pid_t, pollfd, sockaddr_storage, socklen_t};
use serde::Serialize;

use super::{Lab, LabError, netns};
use crate::inventory::Protocol;

/// What each client sends and expects echoed back.
const PAYLOAD: &[u8; 16] = b"palisade-probe-1";
/// Result code: the payload came back.
const ALLOWED: i32 = 0;
/// Result code: nothing happened before the deadline.
const TIMED_OUT: i32 = -1;
/// Result code: the peer answered with something else or closed before echoing.
const BAD_ECHO: i32 = -2;
/// Result code: the client child died before reporting.
const NO_REPORT: i32 = -3;
/// Result code: not tried, the source pod has no address of the target's family.
const NO_FAMILY: i32 = -4;
/// Connections one listener serves at once (more are accepted and closed).
const MAX_CONNECTIONS: usize = 128;
/// A listener closes connections idle this long (peers that never send).
const STALE_CONNECTION_MS: u64 = 3_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// How long each connection may take, connect to echo.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        // Long enough that an allowed flow is never mistaken for a denied one on a loaded
        // 2-core machine (each client and listener is a fresh process joining a netns and cgroup).
        ProbeOptions { timeout: Duration::from_millis(1000) }
    }
}

/// One probed flow: from a pod to one address of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub ip: IpAddr,
    pub allowed: bool,
    /// Why the flow was not allowed (timeout, refused, EPERM, ...), or why it was not tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Not tried: the source pod has no address of this family (an IPv4-only pod and a
    /// dual-stack pod have IPv4 in common, nothing else). Neither allowed nor denied.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub untried: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeMatrix {
    pub port: u16,
    pub protocol: Protocol,
    pub results: Vec<ProbeResult>,
}

impl ProbeMatrix {
    /// Whether every address of `to` that `from` can address (a family both have) was
    /// reachable; false when they have no family in common (as `policy matrix` says); `None` if
    /// the pair was not probed.
    pub fn allowed(&self, from: &str, to: &str) -> Option<bool> {
        let mut flows = self.results.iter().filter(|r| r.from == from && r.to == to).peekable();
        flows.peek()?;
        let mut tried = flows.filter(|r| !r.untried).peekable();
        Some(tried.peek().is_some() && tried.all(|r| r.allowed))
    }

    /// Flows that were tried and not allowed.
    pub fn denied(&self) -> impl Iterator<Item = &ProbeResult> {
        self.results.iter().filter(|r| !r.allowed && !r.untried)
    }

    /// Whether every flow tried was allowed.
    pub fn all_allowed(&self) -> bool {
        self.results.iter().all(|r| r.allowed || r.untried)
    }

    /// A from × to table: `ok` (all addresses reachable), `--` (none), the reachable families
    /// (`v4`, `v6`) when only some are, or `n/a` (no address family in common: nothing tried).
    /// Addresses of a family the source pod lacks are left out.
    pub fn to_table(&self) -> String {
        use crate::output::{Cell, Table};
        let mut pods: Vec<&str> = Vec::new();
        for r in &self.results {
            for pod in [r.from.as_str(), r.to.as_str()] {
                if !pods.contains(&pod) {
                    pods.push(pod);
                }
            }
        }
        let mut out = format!("{} port {}: rows connect to columns\n", self.protocol, self.port);
        let headers: Vec<&str> = std::iter::once("from \\ to").chain(pods.iter().copied()).collect();
        let mut grid = Table::new(&headers).align_right(&(1..headers.len()).collect::<Vec<_>>());
        for from in &pods {
            let mut row = vec![Cell::plain(from)];
            for to in &pods {
                let all: Vec<&ProbeResult> = self.results.iter().filter(|r| r.from == *from && r.to == *to).collect();
                let flows: Vec<&ProbeResult> = all.iter().copied().filter(|r| !r.untried).collect();
                let cell = if all.is_empty() {
                    ""
                } else if flows.is_empty() {
                    "n/a"
                } else if flows.iter().all(|r| r.allowed) {
                    "ok"
                } else if flows.iter().all(|r| !r.allowed) {
                    "--"
                } else {
                    let v4 = flows.iter().any(|r| r.allowed && r.ip.is_ipv4());
                    let v6 = flows.iter().any(|r| r.allowed && r.ip.is_ipv6());
                    match (v4, v6) {
                        (true, false) => "v4",
                        (false, true) => "v6",
                        _ => "some",
                    }
                };
                row.push(Cell::plain(cell));
            }
            grid.push(row);
        }
        out.push_str(&grid.render(false));
        out
    }
}

/// A socket address prepared in the parent, so the child only copies bytes.
#[derive(Clone, Copy)]
struct Target {
    address: sockaddr_storage,
    length: socklen_t,
    family: c_int,
}

/// The socket type and protocol number of a probe protocol.
fn socket_kind(protocol: Protocol) -> (c_int, c_int) {
    match protocol {
        Protocol::Tcp => (libc::SOCK_STREAM, 0),
        Protocol::Udp => (libc::SOCK_DGRAM, 0),
        Protocol::Sctp => (libc::SOCK_STREAM, libc::IPPROTO_SCTP),
    }
}

fn target(ip: IpAddr, port: u16) -> Target {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut address: sockaddr_storage = unsafe { std::mem::zeroed() };
    match ip {
        IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(v4).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((&raw mut address).cast::<libc::sockaddr_in>(), sin) };
            Target { address, length: size_of::<libc::sockaddr_in>() as socklen_t, family: libc::AF_INET }
        }
        IpAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port.to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut address).cast::<libc::sockaddr_in6>(), sin6) };
            Target { address, length: size_of::<libc::sockaddr_in6>() as socklen_t, family: libc::AF_INET6 }
        }
    }
}

/// Per-connection state of a client child, allocated by the parent before the fork.
#[derive(Clone, Copy)]
struct Slot {
    fd: c_int,
    phase: Phase,
    received: usize,
    resent: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    AwaitingEcho,
    Done,
}

/// Kills and reaps the children when the probe ends, however it ends.
struct Children(Vec<pid_t>);

impl Drop for Children {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: kill and waitpid on our own children; an exited child is a zombie until
            // the waitpid, so the pid cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

struct PodHandles {
    key: String,
    netns: OwnedFd,
    cgroup_procs: OwnedFd,
    has_v4: bool,
    has_v6: bool,
}

// Long (~140 lines): opens every pod, forks its listener and client processes and collects
// their reports in one place, because the children share the fds prepared here; issue 11's
// move to nix is where it gets split.
pub(super) fn run(lab: &Lab, port: u16, protocol: Protocol, options: &ProbeOptions) -> Result<ProbeMatrix, LabError> {
    let started = Instant::now();
    if port == 0 {
        return Err(LabError::Probe("port must be 1-65535".into()));
    }
    check_protocol_supported(protocol)?;
    let timeout_ms = u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX).max(1);

    let mut pods = Vec::new();
    let mut targets = Vec::new();
    let mut target_labels = Vec::new();
    for pod in lab.pods() {
        let procs_path = lab.pod_cgroup_dir(&pod.key)?.join("cgroup.procs");
        let cgroup_procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map(OwnedFd::from)
            .map_err(|source| LabError::Io { what: "open", path: procs_path, source })?;
        pods.push(PodHandles {
            key: pod.key.clone(),
            netns: netns::open(&pod.netns)?,
            cgroup_procs,
            has_v4: pod.ips.iter().any(IpAddr::is_ipv4),
            has_v6: pod.ips.iter().any(IpAddr::is_ipv6),
        });
        for ip in &pod.ips {
            targets.push(target(*ip, port));
            target_labels.push((pod.key.clone(), *ip));
        }
    }
    let mut children = Children(Vec::with_capacity(pods.len() * 2));

    // Listeners first, and wait until each is bound, so no client races its listener.
    let mut ready_pipes = Vec::with_capacity(pods.len());
    for pod in &pods {
        let (read_end, write_end) = pipe()?;
        let parent = std::process::id() as pid_t;
        let keep = [pod.netns.as_raw_fd(), pod.cgroup_procs.as_raw_fd(), write_end.as_raw_fd()];
        // SAFETY: the child runs only async-signal-safe code (see module docs) and never
        // returns: listener_main ends in _exit.
        match unsafe { libc::fork() } {
            -1 => return Err(LabError::Sys { call: "fork", source: std::io::Error::last_os_error() }),
            0 => unsafe {
                listener_main(keep, parent, port, protocol, pod.has_v6);
            },
            pid => children.0.push(pid),
        }
        drop(write_end);
        ready_pipes.push(read_end);
    }
    let ready_deadline = Instant::now() + Duration::from_secs(5);
    for (pod, pipe) in pods.iter().zip(&ready_pipes) {
        let mut report = [0u8; 8];
        let got = read_until(pipe.as_raw_fd(), &mut report, ready_deadline);
        if got < report.len() {
            return Err(LabError::Probe(format!("listener in {} did not start", pod.key)));
        }
        let stage = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        if stage != 0 {
            let source = std::io::Error::from_raw_os_error(errno);
            if errno == libc::EPROTONOSUPPORT || errno == libc::ESOCKTNOSUPPORT {
                return Err(LabError::ProtocolUnsupported { protocol, source });
            }
            return Err(LabError::Probe(format!(
                "listener in {}: {} failed: {source}",
                pod.key,
                LISTENER_STAGES.get(stage as usize).copied().unwrap_or("setup")
            )));
        }
    }

    // One client child per source pod; each runs all of its connections concurrently.
    let (sock_type, sock_protocol) = socket_kind(protocol);
    let mut result_pipes = Vec::with_capacity(pods.len());
    for pod in &pods {
        let (read_end, write_end) = pipe()?;
        let mut slots = vec![Slot { fd: -1, phase: Phase::Done, received: 0, resent: false }; targets.len()];
        let mut pollfds = vec![pollfd { fd: -1, events: 0, revents: 0 }; targets.len()];
        let mut results = vec![TIMED_OUT; targets.len()];
        // Only the families this pod has: from an IPv4-only pod an IPv6 address is unreachable
        // whatever the policy says, so trying it would report a denial that is none.
        let untried: Vec<bool> =
            target_labels.iter().map(|(_, ip)| if ip.is_ipv4() { !pod.has_v4 } else { !pod.has_v6 }).collect();
        let parent = std::process::id() as pid_t;
        let keep = [pod.netns.as_raw_fd(), pod.cgroup_procs.as_raw_fd(), write_end.as_raw_fd()];
        // SAFETY: as for the listeners; the buffers are allocated above, the child only writes
        // into them.
        match unsafe { libc::fork() } {
            -1 => return Err(LabError::Sys { call: "fork", source: std::io::Error::last_os_error() }),
            0 => unsafe {
                client_main(
                    keep,
                    parent,
                    ClientWork {
                        sock_type,
                        sock_protocol,
                        udp: protocol == Protocol::Udp,
                        timeout_ms,
                        targets: &targets,
                        untried: &untried,
                        slots: &mut slots,
                        pollfds: &mut pollfds,
                        results: &mut results,
                    },
                );
            },
            pid => children.0.push(pid),
        }
        drop(write_end);
        result_pipes.push(read_end);
    }

    let results_deadline = Instant::now() + options.timeout + Duration::from_secs(5);
    let mut matrix = ProbeMatrix { port, protocol, results: Vec::with_capacity(pods.len() * targets.len()) };
    for (pod, pipe) in pods.iter().zip(&result_pipes) {
        let mut bytes = vec![0u8; targets.len() * 4];
        let got = read_until(pipe.as_raw_fd(), &mut bytes, results_deadline);
        for (i, (to, ip)) in target_labels.iter().enumerate() {
            let code = if (i + 1) * 4 <= got {
                i32::from_ne_bytes([bytes[i * 4], bytes[i * 4 + 1], bytes[i * 4 + 2], bytes[i * 4 + 3]])
            } else {
                NO_REPORT
            };
            matrix.results.push(ProbeResult {
                from: pod.key.clone(),
                to: to.clone(),
                ip: *ip,
                allowed: code == ALLOWED,
                reason: (code != ALLOWED).then(|| match code {
                    NO_FAMILY => format!("no {} address in {}", if ip.is_ipv4() { "IPv4" } else { "IPv6" }, pod.key),
                    code => reason(code),
                }),
                untried: code == NO_FAMILY,
            });
        }
    }
    drop(children);
    tracing::debug!(
        port,
        %protocol,
        flows = matrix.results.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "probe done"
    );
    Ok(matrix)
}

fn reason(code: i32) -> String {
    match code {
        TIMED_OUT => "timeout".into(),
        BAD_ECHO => "no echo".into(),
        NO_REPORT => "client died".into(),
        libc::ECONNREFUSED => "refused".into(),
        libc::EPERM => "EPERM (dropped by a cgroup program)".into(),
        errno => std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// SCTP needs the kernel module; say so plainly instead of 9×9 failures.
fn check_protocol_supported(protocol: Protocol) -> Result<(), LabError> {
    if protocol != Protocol::Sctp {
        return Ok(());
    }
    let (sock_type, sock_protocol) = socket_kind(protocol);
    // SAFETY: socket(2) with constant arguments; the fd is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, sock_type | libc::SOCK_CLOEXEC, sock_protocol) };
    if fd < 0 {
        return Err(LabError::ProtocolUnsupported { protocol, source: std::io::Error::last_os_error() });
    }
    // SAFETY: fd was just returned by socket(2) and is ours.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LabError> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(LabError::Sys { call: "pipe2", source: std::io::Error::last_os_error() });
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads into `buf` until it is full, the writer closes, or `deadline` passes; returns the
/// number of bytes read.
fn read_until(fd: RawFd, buf: &mut [u8], deadline: Instant) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let mut poll_fd = pollfd { fd, events: libc::POLLIN, revents: 0 };
        let wait_ms = c_int::try_from(remaining.as_millis()).unwrap_or(c_int::MAX).max(1);
        // SAFETY: poll on one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, wait_ms) };
        if ready < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: reading into the unfilled tail of `buf`.
        let n = unsafe { libc::read(fd, buf[filled..].as_mut_ptr().cast(), buf.len() - filled) };
        if n > 0 {
            filled += n as usize;
        } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    filled
}

// ---- child side: async-signal-safe code only below this line ----

const LISTENER_STAGES: [&str; 7] = ["", "joining the pod cgroup", "entering the pod netns", "socket", "bind", "listen", "setsockopt"];

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn monotonic_ms() -> u64 {
    // SAFETY: clock_gettime is async-signal-safe and writes into the local timespec.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64).saturating_mul(1000) + (now.tv_nsec as u64) / 1_000_000
}

/// Writes all of `bytes` to `fd`, retrying short writes.
unsafe fn write_all(fd: c_int, bytes: *const u8, len: usize) {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller passes a valid buffer of `len` bytes.
        let n = unsafe { libc::write(fd, bytes.add(done).cast(), len - done) };
        if n > 0 {
            done += n as usize;
        } else if n < 0 && errno() == libc::EINTR {
            continue;
        } else {
            return;
        }
    }
}

/// The start of every child: die with the parent, close every inherited fd except `keep`
/// (so a long-lived listener does not hold other threads' pipes open), join the pod cgroup,
/// then its netns. Returns the failed stage and errno on error.
unsafe fn enter_pod(keep: [c_int; 3], parent: pid_t) -> Result<(), (i32, c_int)> {
    // SAFETY (whole function): raw syscalls on fds and constants, nothing else.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        let [netns_fd, procs_fd, report_fd] = keep;
        let mut sorted = keep;
        sorted.sort_unstable();
        let mut next: c_int = 3;
        for fd in sorted {
            if fd > next {
                libc::syscall(libc::SYS_close_range, next as u32, (fd - 1) as u32, 0u32);
            }
            next = next.max(fd + 1);
        }
        libc::syscall(libc::SYS_close_range, next as u32, u32::MAX, 0u32);
        let _ = report_fd;
        if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err((1, errno()));
        }
        if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
            return Err((2, errno()));
        }
        Ok(())
    }
}

unsafe fn report_ready(fd: c_int, stage: i32, err: c_int) {
    let mut report = [0u8; 8];
    report[..4].copy_from_slice(&stage.to_ne_bytes());
    report[4..].copy_from_slice(&err.to_ne_bytes());
    // SAFETY: an 8-byte local buffer.
    unsafe { write_all(fd, report.as_ptr(), report.len()) };
}

/// An echo server on `port` for both families, inside the pod; runs until killed.
// Long (~130 lines) on purpose: runs in a forked child of a multi-threaded process, where only
// async-signal-safe calls are allowed: no allocation, no helpers that might allocate, all state
// on this stack.
unsafe fn listener_main(keep: [c_int; 3], parent: pid_t, port: u16, protocol: Protocol, want_v6: bool) -> ! {
    // SAFETY (whole function): raw syscalls on stack memory; see the module docs.
    unsafe {
        let ready_fd = keep[2];
        let fail = |stage: i32| -> ! {
            report_ready(ready_fd, stage, errno());
            libc::_exit(1)
        };
        if let Err((stage, err)) = enter_pod(keep, parent) {
            report_ready(ready_fd, stage, err);
            libc::_exit(1);
        }
        let (sock_type, sock_protocol) = socket_kind(protocol);
        let stream = sock_type == libc::SOCK_STREAM;
        let mut fds = [pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 2 + MAX_CONNECTIONS];
        let mut accepted_at = [0u64; 2 + MAX_CONNECTIONS];
        let families: [(c_int, bool); 2] = [(libc::AF_INET, true), (libc::AF_INET6, want_v6)];
        let mut listeners = 0;
        for (family, wanted) in families {
            if !wanted {
                continue;
            }
            let fd = libc::socket(family, sock_type | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, sock_protocol);
            if fd < 0 {
                fail(3);
            }
            let one: c_int = 1;
            let one_ptr = (&raw const one).cast::<c_void>();
            let one_len = size_of::<c_int>() as socklen_t;
            if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, one_ptr, one_len) != 0 {
                fail(6);
            }
            let any = if family == libc::AF_INET {
                target(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port)
            } else {
                // Separate v4 and v6 sockets: a dual-stack socket would answer v4 as mapped v6.
                if libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, one_ptr, one_len) != 0 {
                    fail(6);
                }
                target(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), port)
            };
            if libc::bind(fd, (&raw const any.address).cast(), any.length) != 0 {
                fail(4);
            }
            if stream && libc::listen(fd, 256) != 0 {
                fail(5);
            }
            fds[listeners].fd = fd;
            listeners += 1;
        }
        report_ready(ready_fd, 0, 0);
        libc::close(ready_fd);

        let mut buf = [0u8; 512];
        loop {
            if libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) < 0 && errno() != libc::EINTR {
                libc::_exit(2);
            }
            let now = monotonic_ms();
            for i in 0..listeners {
                if fds[i].revents == 0 {
                    continue;
                }
                let listen_fd = fds[i].fd;
                if stream {
                    loop {
                        let conn = libc::accept4(
                            listen_fd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        );
                        if conn < 0 {
                            break;
                        }
                        match (2..fds.len()).find(|&slot| fds[slot].fd < 0) {
                            Some(slot) => {
                                fds[slot].fd = conn;
                                accepted_at[slot] = now;
                            }
                            None => {
                                libc::close(conn);
                            }
                        }
                    }
                } else {
                    loop {
                        let mut from: sockaddr_storage = std::mem::zeroed();
                        let mut from_len = size_of::<sockaddr_storage>() as socklen_t;
                        let n = libc::recvfrom(
                            listen_fd,
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&raw mut from).cast(),
                            &mut from_len,
                        );
                        if n < 0 {
                            break;
                        }
                        libc::sendto(listen_fd, buf.as_ptr().cast(), n as usize, 0, (&raw const from).cast(), from_len);
                    }
                }
            }
            for slot in 2..fds.len() {
                let fd = fds[slot].fd;
                if fd < 0 {
                    continue;
                }
                if fds[slot].revents != 0 {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n > 0 {
                        write_all(fd, buf.as_ptr(), n as usize);
                        continue;
                    }
                    if n < 0 && errno() == libc::EAGAIN {
                        continue;
                    }
                    libc::close(fd);
                    fds[slot].fd = -1;
                } else if now.saturating_sub(accepted_at[slot]) > STALE_CONNECTION_MS {
                    libc::close(fd);
                    fds[slot].fd = -1;
                }
            }
        }
    }
}

struct ClientWork<'a> {
    sock_type: c_int,
    sock_protocol: c_int,
    udp: bool,
    timeout_ms: u64,
    targets: &'a [Target],
    /// Targets of a family the pod has no address of: reported as NO_FAMILY, not tried.
    untried: &'a [bool],
    slots: &'a mut [Slot],
    pollfds: &'a mut [pollfd],
    results: &'a mut [i32],
}

/// Connects to every target at once, sends the payload, waits for the echo; writes one i32
/// result per target to the report fd and exits.
// Long (~130 lines) for the same reason as `listener_main`: a forked child of a threaded
// process, async-signal-safe calls only, all state on this stack.
unsafe fn client_main(keep: [c_int; 3], parent: pid_t, work: ClientWork<'_>) -> ! {
    // SAFETY (whole function): raw syscalls on memory the parent allocated; see module docs.
    unsafe {
        let report_fd = keep[2];
        let ClientWork { sock_type, sock_protocol, udp, timeout_ms, targets, untried, slots, pollfds, results } = work;
        if let Err((_stage, err)) = enter_pod(keep, parent) {
            for result in results.iter_mut() {
                *result = err;
            }
            write_all(report_fd, results.as_ptr().cast(), results.len() * 4);
            libc::_exit(1);
        }
        let start = monotonic_ms();
        let finish = |slot: &mut Slot, result: &mut i32, code: i32| {
            *result = code;
            if slot.fd >= 0 {
                libc::close(slot.fd);
            }
            slot.fd = -1;
            slot.phase = Phase::Done;
        };
        let send_payload = |fd: c_int| libc::send(fd, PAYLOAD.as_ptr().cast(), PAYLOAD.len(), libc::MSG_NOSIGNAL);
        for i in 0..targets.len() {
            if untried[i] {
                results[i] = NO_FAMILY;
                continue;
            }
            let target = &targets[i];
            let fd = libc::socket(target.family, sock_type | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, sock_protocol);
            if fd < 0 {
                results[i] = errno();
                continue;
            }
            slots[i] = Slot { fd, phase: Phase::Connecting, received: 0, resent: false };
            let connected = libc::connect(fd, (&raw const target.address).cast(), target.length) == 0;
            if !connected && errno() != libc::EINPROGRESS {
                finish(&mut slots[i], &mut results[i], errno());
                continue;
            }
            if udp {
                if send_payload(fd) != PAYLOAD.len() as isize {
                    finish(&mut slots[i], &mut results[i], errno());
                    continue;
                }
                slots[i].phase = Phase::AwaitingEcho;
            }
        }
        let mut buf = [0u8; 32];
        loop {
            let elapsed = monotonic_ms().saturating_sub(start);
            if elapsed >= timeout_ms {
                break;
            }
            let mut pending = 0;
            for i in 0..slots.len() {
                let slot = &mut slots[i];
                pollfds[i].revents = 0;
                match slot.phase {
                    Phase::Done => pollfds[i].fd = -1,
                    Phase::Connecting => {
                        pollfds[i].fd = slot.fd;
                        pollfds[i].events = libc::POLLOUT;
                        pending += 1;
                    }
                    Phase::AwaitingEcho => {
                        // UDP has no retransmission: send once more halfway through.
                        if udp && !slot.resent && elapsed * 2 >= timeout_ms {
                            slot.resent = true;
                            send_payload(slot.fd);
                        }
                        pollfds[i].fd = slot.fd;
                        pollfds[i].events = libc::POLLIN;
                        pending += 1;
                    }
                }
            }
            if pending == 0 {
                break;
            }
            let wait = (timeout_ms - elapsed).min(50) as c_int;
            if libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait) <= 0 {
                continue;
            }
            for i in 0..slots.len() {
                if pollfds[i].revents == 0 || slots[i].phase == Phase::Done {
                    continue;
                }
                let fd = slots[i].fd;
                match slots[i].phase {
                    Phase::Connecting => {
                        let mut err: c_int = 0;
                        let mut len = size_of::<c_int>() as socklen_t;
                        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&raw mut err).cast(), &mut len);
                        if err != 0 {
                            finish(&mut slots[i], &mut results[i], err);
                        } else if send_payload(fd) != PAYLOAD.len() as isize {
                            finish(&mut slots[i], &mut results[i], errno());
                        } else {
                            slots[i].phase = Phase::AwaitingEcho;
                        }
                    }
                    Phase::AwaitingEcho => {
                        let received = slots[i].received;
                        let n = libc::recv(fd, buf[received..].as_mut_ptr().cast(), PAYLOAD.len() - received, 0);
                        if n > 0 {
                            let total = received + n as usize;
                            slots[i].received = total;
                            if buf[..total] != PAYLOAD[..total] {
                                finish(&mut slots[i], &mut results[i], BAD_ECHO);
                            } else if total == PAYLOAD.len() {
                                finish(&mut slots[i], &mut results[i], ALLOWED);
                            }
                        } else if n == 0 {
                            finish(&mut slots[i], &mut results[i], BAD_ECHO);
                        } else if errno() != libc::EAGAIN && errno() != libc::EINTR {
                            finish(&mut slots[i], &mut results[i], errno());
                        }
                    }
                    Phase::Done => {}
                }
            }
        }
        for i in 0..slots.len() {
            if slots[i].phase != Phase::Done {
                finish(&mut slots[i], &mut results[i], TIMED_OUT);
            }
        }
        write_all(report_fd, results.as_ptr().cast(), results.len() * 4);
        libc::_exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(from: &str, to: &str, ip: &str, allowed: bool) -> ProbeResult {
        ProbeResult { from: from.into(), to: to.into(), ip: ip.parse().unwrap(), allowed, reason: None, untried: false }
    }

    #[test]
    fn pair_verdicts_and_table() {
        let matrix = ProbeMatrix {
            port: 8080,
            protocol: Protocol::Tcp,
            results: vec![
                flow("a/x", "a/x", "198.18.0.1", true),
                flow("a/x", "b/y", "198.18.0.2", true),
                flow("a/x", "b/y", "2001:db8::2", false),
                flow("b/y", "a/x", "198.18.0.1", false),
                flow("b/y", "b/y", "198.18.0.2", true),
                flow("b/y", "b/y", "2001:db8::2", true),
            ],
        };
        assert_eq!(matrix.allowed("a/x", "a/x"), Some(true));
        assert_eq!(matrix.allowed("a/x", "b/y"), Some(false));
        assert_eq!(matrix.allowed("a/x", "c/z"), None);
        assert_eq!(matrix.denied().count(), 2);
        let table = matrix.to_table();
        assert!(table.lines().nth(2).unwrap().ends_with("v4"), "{table}");
        assert!(table.lines().nth(3).unwrap().contains("--"), "{table}");
        let json = serde_json::to_value(&matrix).unwrap();
        assert_eq!(json["protocol"], "TCP");
        assert_eq!(json["results"][0]["from"], "a/x");
        assert!(json["results"][0].get("reason").is_none());
        assert!(json["results"][0].get("untried").is_none());
    }

    /// Issue 17: from an IPv4-only pod, a dual-stack pod's IPv6 address is not tried, and not
    /// reported as denied; pods with no family in common are neither allowed nor denied flows.
    #[test]
    fn addresses_of_a_family_the_source_lacks_are_untried_not_denied() {
        let untried = |from: &str, to: &str, ip: &str| ProbeResult { untried: true, reason: Some("no IPv6 address".into()), ..flow(from, to, ip, false) };
        let matrix = ProbeMatrix {
            port: 8080,
            protocol: Protocol::Tcp,
            results: vec![
                flow("a/v4", "b/dual", "198.18.0.2", true),
                untried("a/v4", "b/dual", "2001:db8::2"),
                untried("a/v4", "c/v6", "2001:db8::3"),
                flow("b/dual", "a/v4", "198.18.0.1", true),
            ],
        };
        assert_eq!(matrix.allowed("a/v4", "b/dual"), Some(true), "the family both have is allowed");
        assert_eq!(matrix.allowed("a/v4", "c/v6"), Some(false), "no family in common: not allowed, as policy matrix says");
        assert_eq!(matrix.denied().count(), 0, "nothing tried was denied");
        assert!(matrix.all_allowed());
        let table = matrix.to_table();
        let row = table.lines().find(|l| l.starts_with("a/v4")).expect("row");
        assert!(row.contains("ok") && row.contains("n/a") && !row.contains("--"), "{table}");
        let json = serde_json::to_value(&matrix).unwrap();
        assert_eq!(json["results"][1]["untried"], true);
    }

    #[test]
    fn targets_encode_family_port_and_address() {
        let v4 = target("198.18.1.2".parse().unwrap(), 8080);
        assert_eq!(v4.family, libc::AF_INET);
        // SAFETY: target() wrote a sockaddr_in into the storage.
        let sin = unsafe { *(&raw const v4.address).cast::<libc::sockaddr_in>() };
        assert_eq!(u16::from_be(sin.sin_port), 8080);
        assert_eq!(u32::from_be(sin.sin_addr.s_addr), u32::from(std::net::Ipv4Addr::new(198, 18, 1, 2)));
        let v6 = target("2001:db8::2".parse().unwrap(), 53);
        assert_eq!(v6.family, libc::AF_INET6);
        assert_eq!(v6.length as usize, size_of::<libc::sockaddr_in6>());
    }
}
