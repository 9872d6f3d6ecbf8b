//! `palisade workload ACTION`: performs one real behaviour with plain syscalls, so kernel and
//! scenario tests can make a pod do exactly that thing (open, connect, ptrace, setuid, mount,
//! finit_module, memfd exec, ...). Hidden from help; it is a test instrument, not a feature.

use std::ffi::CString;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("unknown workload action {0:?} (known: {1})")]
    Unknown(String, String),
    #[error("{action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: missing argument")]
    MissingArgument(&'static str),
}

fn last_err(action: &'static str) -> WorkloadError {
    WorkloadError::Io { action, source: std::io::Error::last_os_error() }
}

fn errno(action: &'static str) -> impl FnOnce(Errno) -> WorkloadError {
    move |errno| WorkloadError::Io { action, source: errno.into() }
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> WorkloadError {
    move |source| WorkloadError::Io { action, source }
}

fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

pub const ACTIONS: &[&str] = &[
    "open", "write", "connect", "connect6", "ptrace", "setuid", "mount", "unshare-user",
    "finit-module", "bpf", "memfd-exec", "chmod-setuid", "unlink", "rename", "dup-socket",
    "sleep", "open-loop", "connect-loop", "udp-stream", "udp-sink", "open-syscall", "creat",
];

/// Runs one action. Failures of the *syscall under test* are expected for some actions
/// (finit_module without modules, bpf without privileges): those report and return Ok.
// Long by design (~150 lines): one short match arm per action, so the list of behaviours the
// tests perform reads as one table; each arm is a few syscalls.
pub fn perform(action: &str, args: &[String]) -> Result<(), WorkloadError> {
    let arg = |i: usize, name: &'static str| args.get(i).cloned().ok_or(WorkloadError::MissingArgument(name));
    match action {
        "open" => {
            let path = arg(0, "open PATH")?;
            let _ = std::fs::File::open(&path).map_err(io("open"))?;
        }
        "open-syscall" | "creat" => {
            // The old open(2) and creat(2) themselves (what musl's open() and creat() call on
            // x86_64), not glibc's openat: the probes must see them too.
            let path = cstr(&arg(0, "open-syscall|creat PATH")?);
            // SAFETY: raw syscalls with a valid C string; the descriptor is closed below. nix
            // and std only call openat.
            let fd = unsafe {
                if action == "creat" {
                    libc::syscall(libc::SYS_creat, path.as_ptr(), 0o600)
                } else {
                    libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_RDONLY)
                }
            };
            if fd < 0 {
                return Err(last_err("open(2)"));
            }
            // SAFETY: a descriptor this call just opened and nothing else holds.
            unsafe { libc::close(fd as i32) };
        }
        "write" => {
            let path = arg(0, "write PATH")?;
            std::fs::write(&path, b"palisade\n").map_err(io("write"))?;
        }
        "connect" | "connect6" => {
            let addr = arg(0, "connect ADDR:PORT")?;
            // Outcome does not matter (refused is fine): the attempt is the behaviour.
            let target: std::net::SocketAddr = addr.parse().map_err(|e| WorkloadError::Io {
                action: "connect",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            let _ = std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_millis(500));
        }
        "ptrace" => ptrace_child()?,
        "setuid" => {
            let uid: u32 = arg(0, "setuid UID")?.parse().unwrap_or(65534);
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(errno("setuid"))?;
        }
        "mount" => {
            // A private mount namespace so nothing leaks to the host, then a real tmpfs mount.
            use nix::mount::{MntFlags, MsFlags, mount, umount2};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(errno("unshare(CLONE_NEWNS)"))?;
            let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>);
            let dir = std::env::temp_dir().join(format!("palisade-mnt-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(io("mkdir"))?;
            mount(Some("palisade-tmpfs"), &dir, Some("tmpfs"), MsFlags::empty(), None::<&str>).map_err(errno("mount"))?;
            let _ = umount2(&dir, MntFlags::empty());
            let _ = std::fs::remove_dir(&dir);
        }
        "unshare-user" => {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(errno("unshare(CLONE_NEWUSER)"))?;
        }
        "finit-module" => {
            let file = std::fs::File::open("/dev/null").map_err(io("open /dev/null"))?;
            // Expected to fail (/dev/null is no module): the attempt is the behaviour.
            let result = nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty());
            println!("finit_module returned {result:?}");
        }
        "bpf" => {
            // BPF_PROG_LOAD with an empty attr: fails, but the attempt is what counts.
            let mut attr = [0u8; 128];
            // SAFETY: raw syscall (nix has no bpf(2)) with a valid buffer of the length passed.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_mut_ptr(), attr.len()) };
            println!("bpf returned {rc}");
        }
        "memfd-exec" => memfd_exec()?,
        "chmod-setuid" => {
            let path = arg(0, "chmod-setuid PATH")?;
            std::fs::write(&path, b"#!/bin/sh\n").map_err(io("create"))?;
            // chmod(2) with the setuid bit, as std calls it.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755)).map_err(io("chmod"))?;
        }
        "unlink" => {
            let path = arg(0, "unlink PATH")?;
            std::fs::remove_file(&path).map_err(io("unlink"))?;
        }
        "rename" => {
            let (from, to) = (arg(0, "rename FROM TO")?, arg(1, "rename FROM TO")?);
            let (f, t) = (cstr(&from), cstr(&to));
            // SAFETY: renameat2 as a raw syscall with valid C strings: glibc's (and so nix's)
            // wrapper turns flags 0 into renameat(2), and the test wants renameat2 itself.
            let rc = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), 0) };
            if rc != 0 {
                return Err(last_err("renameat2"));
            }
        }
        "dup-socket" => {
            // A socket duplicated onto stdout: the reverse-shell primitive, pointed at loopback.
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("socket"))?;
            nix::unistd::dup2_stdout(&socket).map_err(errno("dup2"))?;
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        "open-loop" => {
            // The syscall-heavy loop of the overhead benchmark: open+close COUNT times, then
            // print the elapsed nanoseconds.
            let count: u64 = arg(0, "open-loop COUNT [PATH]")?.parse().unwrap_or(100_000);
            let path = cstr(&args.get(1).cloned().unwrap_or_else(|| "/etc/hostname".into()));
            let start = std::time::Instant::now();
            for _ in 0..count {
                // Closed on drop.
                let _ = nix::fcntl::open(path.as_c_str(), nix::fcntl::OFlag::O_RDONLY, nix::sys::stat::Mode::empty());
            }
            println!("{}", start.elapsed().as_nanos());
        }
        "connect-loop" => {
            // A connect flood: socket+connect+close COUNT times to ADDR:PORT (refused on a
            // closed loopback port, so each round is one fast syscall trip).
            let count: u64 = arg(0, "connect-loop COUNT ADDR:PORT")?.parse().unwrap_or(100_000);
            let addr: std::net::SocketAddrV4 = arg(1, "connect-loop COUNT ADDR:PORT")?.parse().map_err(|e| WorkloadError::Io {
                action: "connect-loop",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, connect, socket};
            let target = SockaddrIn::from(addr);
            let start = std::time::Instant::now();
            for _ in 0..count {
                // Closed on drop.
                if let Ok(fd) = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None) {
                    let _ = connect(fd.as_raw_fd(), &target);
                }
            }
            println!("{}", start.elapsed().as_nanos());
        }
        "udp-stream" => {
            // The soak's leak detector, sending side: RATE datagrams a second to ADDR:PORT until
            // killed, each `SEQ SEND_NS` (CLOCK_MONOTONIC, taken before the send, so a receiver
            // can tell a datagram sent after a quarantine took effect). Refused sends (a
            // quarantined pod's egress) are the point, not an error.
            let addr = arg(0, "udp-stream ADDR:PORT [RATE]")?;
            let rate: u64 = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(20).clamp(1, 10_000);
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").map_err(io("udp-stream"))?;
            let gap = std::time::Duration::from_nanos(1_000_000_000 / rate);
            for seq in 0u64.. {
                let line = format!("{seq} {}", crate::time::monotonic_now_ns());
                let _ = socket.send_to(line.as_bytes(), addr.as_str());
                std::thread::sleep(gap);
            }
        }
        "udp-sink" => {
            // The receiving side: one line per datagram on PORT, `SOURCE_IP SEQ SEND_NS`.
            let port = arg(0, "udp-sink PORT")?;
            let socket = std::net::UdpSocket::bind(format!("0.0.0.0:{port}")).map_err(io("udp-sink"))?;
            let mut buf = [0u8; 128];
            let mut out = std::io::stdout().lock();
            loop {
                let (n, from) = socket.recv_from(&mut buf).map_err(io("udp-sink"))?;
                let text = String::from_utf8_lossy(&buf[..n]);
                let _ = writeln!(out, "{} {}", from.ip(), text.trim());
            }
        }
        "sleep" => {
            let ms: u64 = arg(0, "sleep MS")?.parse().unwrap_or(1000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        other => return Err(WorkloadError::Unknown(other.to_string(), ACTIONS.join(", "))),
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// Forks a child that sleeps, PTRACE_ATTACHes to it, detaches, and reaps it.
fn ptrace_child() -> Result<(), WorkloadError> {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::waitpid;
    use nix::unistd::ForkResult;
    // SAFETY: fork in a single-threaded short-lived process; the child only sleeps and exits.
    let child = match unsafe { nix::unistd::fork() }.map_err(errno("fork"))? {
        ForkResult::Child => {
            nix::unistd::sleep(5);
            // SAFETY: _exit (nix has none) ends the forked child without running the parent's
            // exit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => child,
    };
    let attached = nix::sys::ptrace::attach(child);
    if attached.is_ok() {
        let _ = waitpid(child, None);
        let _ = nix::sys::ptrace::detach(child, None);
    }
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
    attached.map_err(errno("ptrace(PTRACE_ATTACH)"))
}

/// Copies /bin/true into a memfd and executes it from there (fileless execution).
fn memfd_exec() -> Result<(), WorkloadError> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::unistd::ForkResult;
    let image = std::fs::read("/bin/true").map_err(io("read /bin/true"))?;
    let memfd = std::fs::File::from(memfd_create(c"palisade-memfd", MFdFlags::empty()).map_err(errno("memfd_create"))?);
    (&memfd).write_all(&image).map_err(io("write memfd"))?;
    // SAFETY: fork in a single-threaded short-lived process; the child only execs or exits.
    match unsafe { nix::unistd::fork() }.map_err(errno("fork"))? {
        ForkResult::Child => {
            let _ = nix::unistd::execveat(&memfd, c"", &[c"palisade-memfd"], &[] as &[&std::ffi::CStr], nix::fcntl::AtFlags::AT_EMPTY_PATH);
            // SAFETY: _exit (nix has none) ends the child whose exec failed without running
            // the parent's exit handlers.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => {
            let _ = nix::sys::wait::waitpid(child, None);
        }
    }
    Ok(())
}
