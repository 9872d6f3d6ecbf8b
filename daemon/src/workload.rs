//! `palisade workload ACTION`: performs one real behaviour with plain syscalls, so kernel and
//! scenario tests can make a pod do exactly that thing (open, connect, ptrace, setuid, mount,
//! finit_module, memfd exec, ...). Hidden from help; it is a test instrument, not a feature.

use std::ffi::CString;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;

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

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> WorkloadError {
    move |source| WorkloadError::Io { action, source }
}

fn cstr(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

pub const ACTIONS: &[&str] = &[
    "open", "write", "connect", "connect6", "ptrace", "setuid", "mount", "unshare-user",
    "finit-module", "bpf", "memfd-exec", "chmod-setuid", "unlink", "rename", "dup-socket",
    "sleep", "open-loop", "connect-loop", "udp-stream", "udp-sink",
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
            // SAFETY: plain syscall.
            if unsafe { libc::setuid(uid) } != 0 {
                return Err(last_err("setuid"));
            }
        }
        "mount" => {
            // A private mount namespace so nothing leaks to the host, then a real tmpfs mount.
            // SAFETY: plain syscalls with valid C strings.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(last_err("unshare(CLONE_NEWNS)"));
                }
                let root = cstr("/");
                libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null());
                let dir = std::env::temp_dir().join(format!("palisade-mnt-{}", std::process::id()));
                std::fs::create_dir_all(&dir).map_err(io("mkdir"))?;
                let (src, target, fstype) = (cstr("palisade-tmpfs"), cstr(&dir.to_string_lossy()), cstr("tmpfs"));
                let rc = libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null());
                if rc != 0 {
                    return Err(last_err("mount"));
                }
                libc::umount2(target.as_ptr(), 0);
                let _ = std::fs::remove_dir(&dir);
            }
        }
        "unshare-user" => {
            // SAFETY: plain syscall.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
                return Err(last_err("unshare(CLONE_NEWUSER)"));
            }
        }
        "finit-module" => {
            let file = std::fs::File::open("/dev/null").map_err(io("open /dev/null"))?;
            let params = cstr("");
            // SAFETY: raw syscall with a valid fd and C string; it is expected to fail.
            let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
            println!("finit_module returned {rc} ({})", std::io::Error::last_os_error());
        }
        "bpf" => {
            // BPF_PROG_LOAD with an empty attr: fails, but the attempt is what counts.
            let mut attr = [0u8; 128];
            // SAFETY: raw syscall with a valid buffer.
            let rc = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_mut_ptr(), attr.len()) };
            println!("bpf returned {rc}");
        }
        "memfd-exec" => memfd_exec()?,
        "chmod-setuid" => {
            let path = arg(0, "chmod-setuid PATH")?;
            std::fs::write(&path, b"#!/bin/sh\n").map_err(io("create"))?;
            let c = cstr(&path);
            // SAFETY: plain syscall.
            if unsafe { libc::chmod(c.as_ptr(), 0o4755) } != 0 {
                return Err(last_err("chmod"));
            }
        }
        "unlink" => {
            let path = arg(0, "unlink PATH")?;
            std::fs::remove_file(&path).map_err(io("unlink"))?;
        }
        "rename" => {
            let (from, to) = (arg(0, "rename FROM TO")?, arg(1, "rename FROM TO")?);
            let (f, t) = (cstr(&from), cstr(&to));
            // SAFETY: renameat2 via syscall (glibc wrappers vary), valid C strings.
            let rc = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), 0) };
            if rc != 0 {
                return Err(last_err("renameat2"));
            }
        }
        "dup-socket" => {
            // A socket duplicated onto stdout: the reverse-shell primitive, pointed at loopback.
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("socket"))?;
            // SAFETY: dup2 onto fd 1 of this short-lived process.
            if unsafe { libc::dup2(socket.as_raw_fd(), 1) } < 0 {
                return Err(last_err("dup2"));
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        "open-loop" => {
            // The syscall-heavy loop of the overhead benchmark: open+close COUNT times, then
            // print the elapsed nanoseconds.
            let count: u64 = arg(0, "open-loop COUNT [PATH]")?.parse().unwrap_or(100_000);
            let path = cstr(&args.get(1).cloned().unwrap_or_else(|| "/etc/hostname".into()));
            let start = std::time::Instant::now();
            for _ in 0..count {
                // SAFETY: plain syscalls with a valid C string.
                unsafe {
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                }
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
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
                sin_zero: [0; 8],
            };
            let start = std::time::Instant::now();
            for _ in 0..count {
                // SAFETY: plain syscalls with a valid sockaddr_in of the size passed.
                unsafe {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    if fd >= 0 {
                        libc::connect(fd, (&sa as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32);
                        libc::close(fd);
                    }
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
    // SAFETY: fork in a single-threaded short-lived process; the child only sleeps and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(last_err("fork"));
    }
    if child == 0 {
        // SAFETY: async-signal-safe calls only.
        unsafe {
            libc::sleep(5);
            libc::_exit(0);
        }
    }
    // SAFETY: plain syscalls on our own child.
    unsafe {
        let rc = libc::ptrace(libc::PTRACE_ATTACH, child, std::ptr::null_mut::<libc::c_void>(), std::ptr::null_mut::<libc::c_void>());
        let attach_err = std::io::Error::last_os_error();
        let mut status = 0;
        if rc == 0 {
            libc::waitpid(child, &mut status, 0);
            libc::ptrace(libc::PTRACE_DETACH, child, std::ptr::null_mut::<libc::c_void>(), std::ptr::null_mut::<libc::c_void>());
        }
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, &mut status, 0);
        if rc != 0 {
            return Err(WorkloadError::Io { action: "ptrace(PTRACE_ATTACH)", source: attach_err });
        }
    }
    Ok(())
}

/// Copies /bin/true into a memfd and executes it from there (fileless execution).
fn memfd_exec() -> Result<(), WorkloadError> {
    let image = std::fs::read("/bin/true").map_err(io("read /bin/true"))?;
    let name = cstr("palisade-memfd");
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        let fd = libc::memfd_create(name.as_ptr(), 0);
        if fd < 0 {
            return Err(last_err("memfd_create"));
        }
        let mut written = 0usize;
        while written < image.len() {
            let n = libc::write(fd, image[written..].as_ptr().cast(), image.len() - written);
            if n <= 0 {
                return Err(last_err("write memfd"));
            }
            written += n as usize;
        }
        let pid = libc::fork();
        if pid < 0 {
            return Err(last_err("fork"));
        }
        if pid == 0 {
            let argv0 = cstr("palisade-memfd");
            let argv = [argv0.as_ptr(), std::ptr::null()];
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            let empty = cstr("");
            libc::syscall(libc::SYS_execveat, fd, empty.as_ptr(), argv.as_ptr(), envp.as_ptr(), libc::AT_EMPTY_PATH);
            libc::_exit(127);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::close(fd);
    }
    Ok(())
}
