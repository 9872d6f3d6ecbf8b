//! Ring-buffer records to typed events. Every record is length-checked against its wire type and
//! read unaligned; unknown kinds and malformed records are errors the reader counts, never panics.

use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};

use palisade_common as wire;
use serde::Serialize;

use super::kind::{EventKind, UnknownKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the event header ({header} bytes)")]
    ShorterThanHeader { len: usize, header: usize },
    #[error(transparent)]
    UnknownKind(#[from] UnknownKind),
    #[error("{kind:?} record is {len} bytes, expected {expected}")]
    WrongLength { kind: EventKind, len: usize, expected: usize },
}

/// Reads a wire struct from exactly `size_of::<T>()` bytes.
fn read_wire<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::WrongLength { kind, len: bytes.len(), expected: size_of::<T>() });
    }
    // SAFETY: the length equals size_of::<T>(); every T used here is a repr(C) palisade-common
    // type made only of integers and byte arrays, so any bit pattern is a valid value;
    // read_unaligned copes with the ring buffer's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A NUL-terminated byte string from the kernel as text: valid UTF-8 is kept, each invalid byte
/// becomes a visible `\xNN` so nothing is silently replaced or lost.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes_to_text(&bytes[..end])
}

pub fn bytes_to_text(mut bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    loop {
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                out.push_str(s);
                return out;
            }
            Err(err) => {
                let (valid, rest) = bytes.split_at(err.valid_up_to());
                // SAFETY-free: from_utf8 said this prefix is valid.
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = err.error_len().unwrap_or(rest.len()).max(1).min(rest.len());
                for b in &rest[..bad] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                bytes = &rest[bad..];
            }
        }
    }
}

/// The common header, user-side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    pub ktime_ns: u64,
    pub cgroup_id: u64,
    pub kind: EventKind,
    pub source: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    pub comm: String,
    pub truncated: bool,
    /// When the process started (ns since boot; 0 unknown): with `pid`, the process's identity.
    pub start_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecData {
    pub filename: String,
    pub argv: Vec<String>,
    pub argc: u32,
    /// `argv` is not the whole command line: more arguments than the kernel's `ARGV_SLOTS`, or
    /// one that filled its `ARG_LEN` slot (cut there; one exactly `ARG_LEN - 1` bytes long
    /// cannot be told apart and is flagged too).
    pub argv_truncated: bool,
    pub via_execveat: bool,
    pub dirfd: i32,
    pub at_flags: u32,
    /// The program came from a file descriptor (fexecve / execveat(AT_EMPTY_PATH)) or a memfd.
    pub fileless: bool,
    /// The new image's canonical path, from the kernel (task->mm->exe_file); None when it
    /// could not be read. The input shows it as `process.exe` (through the process cache).
    #[serde(skip)]
    pub exe: Option<String>,
    /// The walk that produced `exe` reached the root (false: cut or unreadable).
    #[serde(skip)]
    pub exe_resolved: bool,
    /// The standard streams after the exec, from the task's file table in the kernel (the
    /// input shows them as `process.stdio`).
    #[serde(skip)]
    pub stdio: super::enrich::Stdio,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForkData {
    pub parent_pid: u32,
    pub child_pid: u32,
    /// CLOCK_BOOTTIME ns at the fork: the child's start_ns is at or before it.
    #[serde(skip)]
    pub boot_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitData {
    pub exit_code: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectData {
    pub fd: i32,
    pub family: &'static str,
    pub address: Option<String>,
    pub port: u16,
    pub unix_path: Option<String>,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenData {
    pub op: &'static str,
    /// The file the kernel opened (canonical: absolute, no `.`/`..`/`//`, symlinks followed,
    /// bind mounts of the root's file system seen through) when `path_resolved`; otherwise
    /// the best the kernel could give: a relative argument joined to the directory the kernel
    /// looked it up in (lexically), or the argument as passed.
    pub path: String,
    /// The argument as the process passed it.
    pub path_arg: String,
    /// `path` is the opened file's path resolved by the kernel (false: the open failed or the
    /// walk could not finish; rules on sensitive files treat the path as a candidate).
    pub path_resolved: bool,
    pub dirfd: i32,
    pub flags: u32,
    pub flags_names: Vec<&'static str>,
    pub mode: u32,
    pub write: bool,
    pub create: bool,
    pub truncate: bool,
    pub result: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PtraceData {
    pub request: i64,
    pub request_name: &'static str,
    pub target_pid: i32,
    pub addr: u64,
    pub result: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredData {
    pub op: &'static str,
    pub args: Vec<u32>,
    pub cap_effective: u64,
    pub cap_permitted: u64,
    pub cap_inheritable: u64,
    pub result: i32,
    /// The credentials before the call (`process.uid` etc. are after it).
    pub old_uid: u32,
    pub old_gid: u32,
    pub old_euid: u32,
    pub old_egid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountData {
    pub op: &'static str,
    pub source: String,
    pub target: String,
    pub fstype: String,
    pub flags: u64,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamespaceData {
    pub op: &'static str,
    pub flags: u64,
    pub flags_names: Vec<&'static str>,
    pub fd: i32,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleData {
    pub op: &'static str,
    pub name: String,
    pub fd: i32,
    pub flags: u32,
    pub len: u64,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BpfData {
    pub cmd: u32,
    pub cmd_name: &'static str,
    pub size: u32,
    pub result: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemfdData {
    pub name: String,
    pub flags: u32,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChmodData {
    pub op: &'static str,
    /// What the call changed (see [`changed_path`]): fchmod's file as the kernel resolved it,
    /// else the argument, absolute and cleaned.
    pub path: String,
    /// The argument as the process passed it (empty for fchmod).
    pub path_arg: String,
    /// `path` is the file the kernel resolved (fchmod only: a chmod of a name may follow a
    /// symlink that the path does not).
    pub path_resolved: bool,
    pub fd: i32,
    pub mode: u32,
    pub setuid: bool,
    pub setgid: bool,
    pub result: i32,
}

#[cfg(test)]
impl OpenData {
    /// A read-only `openat` of `path` (the kernel's resolution) spelled `path_arg`, for tests.
    pub fn read_only(path: &str, path_arg: &str, result: i64) -> Self {
        OpenData {
            op: "openat",
            path: path.into(),
            path_arg: path_arg.into(),
            path_resolved: true,
            dirfd: -100,
            flags: 0,
            flags_names: vec!["O_RDONLY"],
            mode: 0,
            write: false,
            create: false,
            truncate: false,
            result,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnlinkData {
    pub op: &'static str,
    /// What was removed (see [`changed_path`]): the argument, absolute and cleaned, a relative
    /// one joined to the directory the kernel looked it up in.
    pub path: String,
    /// The argument as the process passed it.
    pub path_arg: String,
    /// `path` is the kernel's directory plus a single name (canonical: the name is not followed).
    pub path_resolved: bool,
    pub dirfd: i32,
    pub flags: u32,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenameData {
    /// As UnlinkData.path, for each side.
    pub old_path: String,
    pub old_path_arg: String,
    pub old_path_resolved: bool,
    pub new_path: String,
    pub new_path_arg: String,
    pub new_path_resolved: bool,
    pub flags: u32,
    pub result: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DupData {
    pub op: &'static str,
    pub old_fd: i32,
    pub new_fd: i32,
    pub flags: u32,
    pub result: i64,
    /// What the new fd refers to (filled by enrichment from /proc): socket, pipe, tty, file...
    pub new_fd_kind: &'static str,
}

/// The kind-specific part of an event; serialized under a key named after the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    Exec(ExecData),
    Fork(ForkData),
    Exit(ExitData),
    Connect(ConnectData),
    Open(OpenData),
    Ptrace(PtraceData),
    Cred(CredData),
    Mount(MountData),
    Namespace(NamespaceData),
    Module(ModuleData),
    Bpf(BpfData),
    Memfd(MemfdData),
    Chmod(ChmodData),
    Unlink(UnlinkData),
    Rename(RenameData),
    Dup(DupData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub header: Header,
    pub data: EventData,
}

fn header_from_wire(h: &wire::EventHeader, kind: EventKind) -> Header {
    Header {
        ktime_ns: h.ktime_ns,
        cgroup_id: h.cgroup_id,
        kind,
        source: if h.source == wire::SOURCE_KPROBE { "kprobe" } else { "tracepoint" },
        pid: h.pid,
        tid: h.tid,
        ppid: h.ppid,
        uid: h.uid,
        gid: h.gid,
        euid: h.euid,
        egid: h.egid,
        comm: c_string(&h.comm),
        truncated: h.flags & wire::FLAG_TRUNCATED != 0,
        start_ns: h.start_ns,
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header_len = size_of::<wire::EventHeader>();
    if bytes.len() < header_len {
        return Err(DecodeError::ShorterThanHeader { len: bytes.len(), header: header_len });
    }
    // SAFETY: at least header_len bytes; EventHeader is plain integers and bytes.
    let raw_header: wire::EventHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let kind = EventKind::try_from(raw_header.kind)?;
    let header = header_from_wire(&raw_header, kind);
    let data = match kind {
        EventKind::Exec => {
            let e: wire::ExecEvent = read_wire(bytes, kind)?;
            let copied = &e.argv[..(e.argc as usize).min(wire::ARGV_SLOTS)];
            let argv = copied.iter().map(|a| c_string(a)).collect();
            let argv_truncated = e.argc as usize > wire::ARGV_SLOTS
                || copied.iter().any(|a| a.iter().position(|&b| b == 0).is_none_or(|len| len >= wire::ARG_LEN - 1));
            let filename = c_string(&e.filename);
            let exe = c_string(&e.exe);
            let exe = (!exe.is_empty()).then_some(exe);
            let fileless = filename.starts_with("/dev/fd/")
                || (e.via_execveat != 0 && e.at_flags & AT_EMPTY_PATH != 0)
                || exe.as_deref().is_some_and(|x| x.starts_with("/memfd:"));
            EventData::Exec(ExecData {
                filename,
                argv,
                argc: e.argc,
                argv_truncated,
                via_execveat: e.via_execveat != 0,
                dirfd: e.dirfd,
                at_flags: e.at_flags,
                fileless,
                exe_resolved: exe.is_some() && e.exe_flags & wire::PATH_RESOLVED != 0 && e.exe_flags & wire::PATH_CUT == 0,
                exe,
                stdio: super::enrich::Stdio { stdin: fd_kind_name(e.stdio[0]), stdout: fd_kind_name(e.stdio[1]), stderr: fd_kind_name(e.stdio[2]) },
            })
        }
        EventKind::Fork => {
            let e: wire::ForkEvent = read_wire(bytes, kind)?;
            EventData::Fork(ForkData { parent_pid: e.parent_pid, child_pid: e.child_pid, boot_ns: e.boot_ns })
        }
        EventKind::Exit => {
            let e: wire::ExitEvent = read_wire(bytes, kind)?;
            EventData::Exit(ExitData { exit_code: e.exit_code })
        }
        EventKind::Connect => {
            let e: wire::ConnectEvent = read_wire(bytes, kind)?;
            EventData::Connect(connect_data(&e))
        }
        EventKind::Open => {
            let e: wire::OpenEvent = read_wire(bytes, kind)?;
            let access = e.flags & 0o3;
            let path_arg = c_string(&e.path);
            let (path, path_resolved) = open_path(&path_arg, &c_string(&e.resolved), e.resolved_flags);
            EventData::Open(OpenData {
                op: match e.op {
                    wire::OPEN_OP_OPENAT2 => "openat2",
                    wire::OPEN_OP_TRUNCATE => "truncate",
                    wire::OPEN_OP_FTRUNCATE => "ftruncate",
                    wire::OPEN_OP_OPEN => "open",
                    wire::OPEN_OP_CREAT => "creat",
                    _ => "openat",
                },
                path,
                path_arg,
                path_resolved,
                dirfd: e.dirfd,
                flags: e.flags,
                flags_names: open_flag_names(e.flags),
                mode: e.mode,
                write: access == 1 || access == 2 || e.flags & (O_TRUNC | O_CREAT) != 0,
                create: e.flags & O_CREAT != 0,
                truncate: e.flags & O_TRUNC != 0,
                result: e.ret,
            })
        }
        EventKind::Ptrace => {
            let e: wire::PtraceEvent = read_wire(bytes, kind)?;
            EventData::Ptrace(PtraceData {
                request: e.request,
                request_name: ptrace_request_name(e.request),
                target_pid: e.target_pid,
                addr: e.addr,
                result: e.ret,
            })
        }
        EventKind::Cred => {
            let e: wire::CredEvent = read_wire(bytes, kind)?;
            let (op, nargs) = match e.op {
                wire::CRED_OP_SETUID => ("setuid", 1),
                wire::CRED_OP_SETGID => ("setgid", 1),
                wire::CRED_OP_SETREUID => ("setreuid", 2),
                wire::CRED_OP_SETRESUID => ("setresuid", 3),
                wire::CRED_OP_SETRESGID => ("setresgid", 3),
                wire::CRED_OP_SETREGID => ("setregid", 2),
                wire::CRED_OP_CAPSET => ("capset", 0),
                wire::CRED_OP_COMMIT_CREDS => ("commit_creds", 4),
                _ => ("unknown", 4),
            };
            EventData::Cred(CredData {
                op,
                args: e.args[..nargs].to_vec(),
                cap_effective: e.cap_effective,
                cap_permitted: e.cap_permitted,
                cap_inheritable: e.cap_inheritable,
                result: e.ret,
                old_uid: e.old_uid,
                old_gid: e.old_gid,
                old_euid: e.old_euid,
                old_egid: e.old_egid,
            })
        }
        EventKind::Mount => {
            let e: wire::MountEvent = read_wire(bytes, kind)?;
            EventData::Mount(MountData {
                op: if e.op == wire::MOUNT_OP_UMOUNT { "umount" } else { "mount" },
                source: c_string(&e.source),
                target: c_string(&e.target),
                fstype: c_string(&e.fstype),
                flags: e.flags,
                result: e.ret,
            })
        }
        EventKind::Namespace => {
            let e: wire::NamespaceEvent = read_wire(bytes, kind)?;
            EventData::Namespace(NamespaceData {
                op: if e.op == wire::NS_OP_SETNS { "setns" } else { "unshare" },
                flags: e.flags,
                flags_names: clone_flag_names(e.flags),
                fd: e.fd,
                result: e.ret,
            })
        }
        EventKind::Module => {
            let e: wire::ModuleEvent = read_wire(bytes, kind)?;
            EventData::Module(ModuleData {
                op: match e.op {
                    wire::MODULE_OP_INIT => "init_module",
                    wire::MODULE_OP_FINIT => "finit_module",
                    _ => "delete_module",
                },
                name: c_string(&e.name),
                fd: e.fd,
                flags: e.flags,
                len: e.len,
                result: e.ret,
            })
        }
        EventKind::Bpf => {
            let e: wire::BpfEvent = read_wire(bytes, kind)?;
            EventData::Bpf(BpfData { cmd: e.cmd, cmd_name: bpf_cmd_name(e.cmd), size: e.size, result: e.ret })
        }
        EventKind::Memfd => {
            let e: wire::MemfdEvent = read_wire(bytes, kind)?;
            EventData::Memfd(MemfdData { name: c_string(&e.name), flags: e.flags, result: e.ret })
        }
        EventKind::Chmod => {
            let e: wire::ChmodEvent = read_wire(bytes, kind)?;
            let path_arg = c_string(&e.path);
            let chmod_path = changed_path(&path_arg, &c_string(&e.resolved), e.resolved_flags, false);
            EventData::Chmod(ChmodData {
                op: match e.op {
                    wire::CHMOD_OP_CHMOD => "chmod",
                    wire::CHMOD_OP_FCHMOD => "fchmod",
                    _ => "fchmodat",
                },
                path: chmod_path.0,
                path_arg,
                path_resolved: chmod_path.1,
                fd: e.fd,
                mode: e.mode,
                setuid: e.mode & 0o4000 != 0,
                setgid: e.mode & 0o2000 != 0,
                result: e.ret,
            })
        }
        EventKind::Unlink => {
            let e: wire::UnlinkEvent = read_wire(bytes, kind)?;
            let path_arg = c_string(&e.path);
            let (path, path_resolved) = changed_path(&path_arg, &c_string(&e.resolved), e.resolved_flags, true);
            EventData::Unlink(UnlinkData {
                op: match e.op {
                    wire::UNLINK_OP_UNLINK => "unlink",
                    wire::UNLINK_OP_RMDIR => "rmdir",
                    _ => "unlinkat",
                },
                path,
                path_arg,
                path_resolved,
                dirfd: e.dirfd,
                flags: e.flags,
                result: e.ret,
            })
        }
        EventKind::Rename => {
            let e: wire::RenameEvent = read_wire(bytes, kind)?;
            let old_path_arg = c_string(&e.old_path);
            let new_path_arg = c_string(&e.new_path);
            let (old_path, old_path_resolved) = changed_path(&old_path_arg, &c_string(&e.old_resolved), e.old_resolved_flags, true);
            let (new_path, new_path_resolved) = changed_path(&new_path_arg, &c_string(&e.new_resolved), e.new_resolved_flags, true);
            EventData::Rename(RenameData {
                old_path,
                old_path_arg,
                old_path_resolved,
                new_path,
                new_path_arg,
                new_path_resolved,
                flags: e.flags,
                result: e.ret,
            })
        }
        EventKind::Dup => {
            let e: wire::DupEvent = read_wire(bytes, kind)?;
            EventData::Dup(DupData {
                op: if e.op == wire::DUP_OP_DUP3 { "dup3" } else { "dup2" },
                old_fd: e.old_fd,
                new_fd: e.new_fd,
                flags: e.flags,
                result: e.ret,
                new_fd_kind: fd_kind_name(e.new_fd_kind),
            })
        }
    };
    Ok(Event { header, data })
}

/// The name of a wire FD_KIND_* (what rules compare `stdio.*` and `new_fd_kind` with).
pub fn fd_kind_name(kind: u32) -> &'static str {
    match kind {
        wire::FD_KIND_CLOSED => "closed",
        wire::FD_KIND_FILE => "file",
        wire::FD_KIND_PIPE => "pipe",
        wire::FD_KIND_SOCKET => "socket",
        wire::FD_KIND_TTY => "tty",
        wire::FD_KIND_NULL => "null",
        wire::FD_KIND_OTHER => "other",
        _ => "unknown",
    }
}

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const AT_EMPTY_PATH: u32 = 0x1000;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

fn connect_data(e: &wire::ConnectEvent) -> ConnectData {
    let (family, address, unix_path) = match e.family {
        AF_INET => ("inet", Some(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]).to_string()), None),
        AF_INET6 => ("inet6", Some(Ipv6Addr::from(e.addr).to_string()), None),
        AF_UNIX => {
            // Abstract socket names start with NUL; show them as '@name' like ss(8) does.
            let path = if e.unix_path[0] == 0 && e.unix_path[1] != 0 {
                format!("@{}", c_string(&e.unix_path[1..]))
            } else {
                c_string(&e.unix_path)
            };
            ("unix", None, Some(path))
        }
        _ => ("other", None, None),
    };
    ConnectData { fd: e.fd, family, address, port: e.port, unix_path, result: e.ret }
}

/// An open's `path` and whether it is the kernel's resolution of the opened file, from the
/// argument and what the kernel resolved (`flags`: PATH_*).
pub fn open_path(arg: &str, resolved: &str, flags: u32) -> (String, bool) {
    let walked = flags & wire::PATH_RESOLVED != 0 && flags & wire::PATH_CUT == 0 && resolved.starts_with('/');
    if walked && flags & wire::PATH_BASE_DIR == 0 {
        return (resolved.to_string(), true);
    }
    if walked && !arg.is_empty() && !arg.starts_with('/') {
        return (clean_path(&format!("{resolved}/{arg}")), false);
    }
    (arg.to_string(), false)
}

/// The path a chmod, unlink or rename changed, and whether it is canonical, from the argument
/// and what the kernel resolved (`flags`: PATH_*). A file the kernel resolved (fchmod's
/// descriptor) is taken as it is. An absolute argument is cleaned (`.`, `..`, `//` folded; a
/// symlinked directory in it is not followed: not resolved). A relative one is joined to the
/// directory the kernel looked it up in (the working directory or the dirfd's, at the call)
/// and cleaned; it is canonical when it is a single name and `name_is_the_object` (unlink and
/// rename act on the name itself; chmod follows a symlink). Nothing resolved: the argument.
pub fn changed_path(arg: &str, resolved: &str, flags: u32, name_is_the_object: bool) -> (String, bool) {
    let walked = flags & wire::PATH_RESOLVED != 0 && flags & wire::PATH_CUT == 0 && resolved.starts_with('/');
    if walked && flags & wire::PATH_BASE_DIR == 0 {
        return (resolved.to_string(), true);
    }
    if arg.starts_with('/') {
        return (clean_path(arg), false);
    }
    if walked && !arg.is_empty() {
        let single_name = !arg.contains('/') && arg != "." && arg != "..";
        return (clean_path(&format!("{resolved}/{arg}")), single_name && name_is_the_object);
    }
    (arg.to_string(), false)
}

/// `path` (absolute) with `.`, `..` and repeated `/` folded away, as text (symlinks are not
/// followed: that is the kernel's part). `..` at the root stays at the root.
pub fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

fn open_flag_names(flags: u32) -> Vec<&'static str> {
    let mut names = vec![match flags & 0o3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    }];
    const NAMED: &[(u32, &str)] = &[
        (0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
        (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o200000, "O_DIRECTORY"),
        (0o400000, "O_NOFOLLOW"), (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"),
        (0o20000000, "O_TMPFILE"),
    ];
    names.extend(NAMED.iter().filter(|(bit, _)| flags & bit != 0).map(|&(_, name)| name));
    names
}

fn clone_flag_names(flags: u64) -> Vec<&'static str> {
    const NAMED: &[(u64, &str)] = &[
        (0x0002_0000, "CLONE_NEWNS"), (0x0200_0000, "CLONE_NEWCGROUP"), (0x0400_0000, "CLONE_NEWUTS"),
        (0x0800_0000, "CLONE_NEWIPC"), (0x1000_0000, "CLONE_NEWUSER"), (0x2000_0000, "CLONE_NEWPID"),
        (0x4000_0000, "CLONE_NEWNET"), (0x0000_0080, "CLONE_NEWTIME"), (0x0000_0200, "CLONE_FS"),
        (0x0000_0400, "CLONE_FILES"), (0x0000_0800, "CLONE_SIGHAND"), (0x0000_8000, "CLONE_SYSVSEM"),
    ];
    NAMED.iter().filter(|(bit, _)| flags & bit != 0).map(|&(_, n)| n).collect()
}

fn ptrace_request_name(request: i64) -> &'static str {
    match request {
        0 => "PTRACE_TRACEME",
        1 => "PTRACE_PEEKTEXT",
        2 => "PTRACE_PEEKDATA",
        3 => "PTRACE_PEEKUSER",
        4 => "PTRACE_POKETEXT",
        5 => "PTRACE_POKEDATA",
        6 => "PTRACE_POKEUSER",
        7 => "PTRACE_CONT",
        8 => "PTRACE_KILL",
        9 => "PTRACE_SINGLESTEP",
        12 => "PTRACE_GETREGS",
        13 => "PTRACE_SETREGS",
        16 => "PTRACE_ATTACH",
        17 => "PTRACE_DETACH",
        0x4206 => "PTRACE_SEIZE",
        0x4207 => "PTRACE_INTERRUPT",
        0x4200 => "PTRACE_SETOPTIONS",
        _ => "other",
    }
}

fn bpf_cmd_name(cmd: u32) -> &'static str {
    const NAMES: &[&str] = &[
        "BPF_MAP_CREATE", "BPF_MAP_LOOKUP_ELEM", "BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM",
        "BPF_MAP_GET_NEXT_KEY", "BPF_PROG_LOAD", "BPF_OBJ_PIN", "BPF_OBJ_GET", "BPF_PROG_ATTACH",
        "BPF_PROG_DETACH", "BPF_PROG_TEST_RUN", "BPF_PROG_GET_NEXT_ID", "BPF_MAP_GET_NEXT_ID",
        "BPF_PROG_GET_FD_BY_ID", "BPF_MAP_GET_FD_BY_ID", "BPF_OBJ_GET_INFO_BY_FD", "BPF_PROG_QUERY",
        "BPF_RAW_TRACEPOINT_OPEN", "BPF_BTF_LOAD", "BPF_BTF_GET_FD_BY_ID", "BPF_TASK_FD_QUERY",
        "BPF_MAP_LOOKUP_AND_DELETE_ELEM", "BPF_MAP_FREEZE", "BPF_BTF_GET_NEXT_ID",
        "BPF_MAP_LOOKUP_BATCH", "BPF_MAP_LOOKUP_AND_DELETE_BATCH", "BPF_MAP_UPDATE_BATCH",
        "BPF_MAP_DELETE_BATCH", "BPF_LINK_CREATE", "BPF_LINK_UPDATE", "BPF_LINK_GET_FD_BY_ID",
        "BPF_LINK_GET_NEXT_ID", "BPF_ENABLE_STATS", "BPF_ITER_CREATE", "BPF_LINK_DETACH",
        "BPF_PROG_BIND_MAP", "BPF_TOKEN_CREATE",
    ];
    NAMES.get(cmd as usize).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> wire::EventHeader {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        wire::EventHeader {
            ktime_ns: 42,
            cgroup_id: 7,
            kind,
            source: wire::SOURCE_TRACEPOINT,
            pid: 100,
            tid: 101,
            ppid: 1,
            uid: 1000,
            gid: 1000,
            euid: 0,
            egid: 0,
            flags: 0,
            comm,
            start_ns: 5_000_000_000,
        }
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value for test input.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn open_record(path: &[u8]) -> wire::OpenEvent {
        let mut ev = wire::OpenEvent {
            header: header(wire::KIND_OPEN),
            op: wire::OPEN_OP_OPENAT,
            dirfd: -100,
            flags: 0o1101, // O_WRONLY|O_CREAT|O_TRUNC
            mode: 0o644,
            ret: 3,
            path: [0u8; wire::PATH_LEN],
            resolved: [0u8; wire::PATH_LEN],
            resolved_flags: 0,
            _pad: 0,
        };
        ev.path[..path.len()].copy_from_slice(path);
        ev
    }

    #[test]
    fn an_open_names_the_file_the_kernel_resolved_and_keeps_the_argument() {
        let mut ev = open_record(b"shadow");
        ev.resolved[..11].copy_from_slice(b"/etc/shadow");
        ev.resolved_flags = wire::PATH_RESOLVED;
        let EventData::Open(open) = decode(&bytes_of(&ev)).expect("valid").data else { panic!() };
        assert_eq!((open.path.as_str(), open.path_arg.as_str(), open.path_resolved), ("/etc/shadow", "shadow", true));
        // A failed relative open: the directory it was looked up in, joined lexically.
        let mut ev = open_record(b"../etc/./shadow");
        ev.ret = -13;
        ev.resolved[..4].copy_from_slice(b"/usr");
        ev.resolved_flags = wire::PATH_RESOLVED | wire::PATH_BASE_DIR;
        let EventData::Open(open) = decode(&bytes_of(&ev)).expect("valid").data else { panic!() };
        assert_eq!((open.path.as_str(), open.path_resolved), ("/etc/shadow", false));
        // A cut walk or nothing resolved: the argument, not resolved.
        for flags in [0, wire::PATH_RESOLVED | wire::PATH_CUT, wire::PATH_CUT] {
            let mut ev = open_record(b"/proc/self/root/etc/shadow");
            ev.ret = -13;
            ev.resolved[..5].copy_from_slice(b"/x/yz");
            ev.resolved_flags = flags;
            let EventData::Open(open) = decode(&bytes_of(&ev)).expect("valid").data else { panic!() };
            assert_eq!((open.path.as_str(), open.path_resolved), ("/proc/self/root/etc/shadow", false), "flags {flags}");
        }
        assert_eq!(clean_path("/a//b/./../../../c/"), "/c");
        assert_eq!(clean_path("/"), "/");
    }

    #[test]
    fn changed_paths_join_the_kernels_directory_and_clean_the_argument() {
        let dir = wire::PATH_RESOLVED | wire::PATH_BASE_DIR;
        assert_eq!(changed_path(".bash_history", "/root", dir, true), ("/root/.bash_history".into(), true));
        assert_eq!(changed_path("file", "/srv/real", dir, false), ("/srv/real/file".into(), false), "chmod may follow a symlink");
        assert_eq!(changed_path("../etc/./passwd", "/usr", dir, true), ("/etc/passwd".into(), false));
        assert_eq!(changed_path("/etc/../etc//passwd", "", 0, true), ("/etc/passwd".into(), false));
        assert_eq!(changed_path("", "/etc/shadow", wire::PATH_RESOLVED, false), ("/etc/shadow".into(), true), "fchmod's file");
        assert_eq!(changed_path("x", "/a/b", wire::PATH_RESOLVED | wire::PATH_CUT | wire::PATH_BASE_DIR, true), ("x".into(), false));
        assert_eq!(changed_path("x", "", 0, true), ("x".into(), false));
    }

    /// truncate/ftruncate come as opens that truncate: ftruncate names the descriptor's file
    /// (resolved), truncate its argument (joined to the working directory when relative).
    #[test]
    fn truncations_are_opens_that_truncate() {
        let mut ev = open_record(b"");
        ev.op = wire::OPEN_OP_FTRUNCATE;
        ev.flags = 0o1001; // O_WRONLY|O_TRUNC
        ev.mode = 0;
        ev.dirfd = 4;
        ev.ret = 0;
        ev.resolved[..19].copy_from_slice(b"/root/.bash_history");
        ev.resolved_flags = wire::PATH_RESOLVED;
        let EventData::Open(open) = decode(&bytes_of(&ev)).expect("valid").data else { panic!() };
        assert_eq!((open.op, open.path.as_str(), open.path_arg.as_str(), open.path_resolved), ("ftruncate", "/root/.bash_history", "", true));
        assert!(open.truncate && open.write && !open.create);
        let mut ev = open_record(b".bash_history");
        ev.op = wire::OPEN_OP_TRUNCATE;
        ev.flags = 0o1001;
        ev.ret = 0;
        ev.resolved[..9].copy_from_slice(b"/home/app");
        ev.resolved_flags = wire::PATH_RESOLVED | wire::PATH_BASE_DIR;
        let EventData::Open(open) = decode(&bytes_of(&ev)).expect("valid").data else { panic!() };
        assert_eq!((open.op, open.path.as_str(), open.path_resolved), ("truncate", "/home/app/.bash_history", false));
    }

    #[test]
    fn decodes_an_open_record() {
        let event = decode(&bytes_of(&open_record(b"/etc/passwd"))).expect("valid record");
        assert_eq!(event.header.kind, EventKind::Open);
        assert_eq!(event.header.comm, "bash");
        assert_eq!((event.header.pid, event.header.tid, event.header.euid), (100, 101, 0));
        let EventData::Open(open) = event.data else { panic!("not an open: {event:?}") };
        assert_eq!(open.path, "/etc/passwd");
        assert!(open.write && open.create && open.truncate);
        assert_eq!(open.flags_names, vec!["O_WRONLY", "O_CREAT", "O_TRUNC"]);
    }

    #[test]
    fn decodes_exec_argv_and_connect_addresses() {
        let mut exec = wire::ExecEvent {
            header: header(wire::KIND_EXEC),
            filename: [0; wire::PATH_LEN],
            argv: [[0; wire::ARG_LEN]; wire::ARGV_SLOTS],
            argc: 3,
            via_execveat: 1,
            dirfd: 4,
            at_flags: AT_EMPTY_PATH,
            exe: [0; wire::PATH_LEN],
            exe_flags: wire::PATH_RESOLVED,
            stdio: [wire::FD_KIND_SOCKET, wire::FD_KIND_PIPE, wire::FD_KIND_TTY],
        };
        exec.filename[..9].copy_from_slice(b"/dev/fd/4");
        exec.exe[..9].copy_from_slice(b"/memfd:x\0");
        exec.argv[0][..2].copy_from_slice(b"sh");
        exec.argv[1][..2].copy_from_slice(b"-c");
        exec.argv[2][..4].copy_from_slice(b"id\xff\x00");
        let event = decode(&bytes_of(&exec)).expect("valid");
        let EventData::Exec(data) = event.data else { panic!() };
        assert_eq!(data.argv, vec!["sh", "-c", "id\\xff"]);
        assert!(!data.argv_truncated);
        assert!(data.fileless);
        // An argument that filled its slot (the kernel cut it), or more arguments than slots.
        let mut cut = exec;
        cut.argv[1] = [b'a'; wire::ARG_LEN];
        cut.argv[1][wire::ARG_LEN - 1] = 0;
        let EventData::Exec(data) = decode(&bytes_of(&cut)).expect("valid").data else { panic!() };
        assert!(data.argv_truncated && data.argv[1].len() == wire::ARG_LEN - 1);
        let mut many = exec;
        many.argc = 40;
        let EventData::Exec(data) = decode(&bytes_of(&many)).expect("valid").data else { panic!() };
        assert!(data.argv_truncated && data.argv.len() == wire::ARGV_SLOTS);
        assert_eq!((data.exe.as_deref(), data.exe_resolved), (Some("/memfd:x"), true));
        assert_eq!((data.stdio.stdin, data.stdio.stdout, data.stdio.stderr), ("socket", "pipe", "tty"));
        assert_eq!(event.header.start_ns, 5_000_000_000);

        let mut connect = wire::ConnectEvent {
            header: header(wire::KIND_CONNECT),
            fd: 3,
            ret: -111,
            family: AF_INET6,
            port: 443,
            _pad: 0,
            addr: [0; 16],
            unix_path: [0; wire::UNIX_PATH_LEN],
        };
        connect.addr[15] = 1;
        let EventData::Connect(c) = decode(&bytes_of(&connect)).expect("valid").data else { panic!() };
        assert_eq!((c.family, c.address.as_deref(), c.port, c.result), ("inet6", Some("::1"), 443, -111));
    }

    #[test]
    fn truncated_records_are_errors() {
        let full = bytes_of(&open_record(b"/x"));
        for len in [0, 1, 79] {
            assert!(matches!(decode(&full[..len]), Err(DecodeError::ShorterThanHeader { .. })), "len {len}");
        }
        for len in [80, 100, full.len() - 1] {
            assert!(matches!(decode(&full[..len]), Err(DecodeError::WrongLength { kind: EventKind::Open, .. })), "len {len}");
        }
    }

    #[test]
    fn oversized_records_are_errors() {
        let mut bytes = bytes_of(&open_record(b"/x"));
        bytes.extend_from_slice(&[0xAA; 9]);
        assert!(matches!(decode(&bytes), Err(DecodeError::WrongLength { .. })));
    }

    #[test]
    fn unknown_kinds_are_errors() {
        let mut h = header(999);
        assert_eq!(decode(&bytes_of(&h)), Err(DecodeError::UnknownKind(UnknownKind(999))));
        h.kind = 0;
        assert!(matches!(decode(&bytes_of(&h)), Err(DecodeError::UnknownKind(_))));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random byte soup of many lengths, with valid kinds planted.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2048usize {
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            if len >= 24 {
                let kind = (len as u32 % (wire::KIND_COUNT + 2)).to_le_bytes();
                bytes[16..20].copy_from_slice(&kind);
            }
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn strings_without_nul_and_invalid_utf8_are_kept_visible() {
        assert_eq!(c_string(b"abc"), "abc");
        assert_eq!(c_string(b"a\xc3\x28b\0zzz"), "a\\xc3(b");
        assert_eq!(c_string(b"line\nbreak\0"), "line\nbreak");
        assert_eq!(c_string(b"\0"), "");
    }
}
