//! Small system helpers: mounts, rlimits, cgroup2 discovery.
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Mounts a pseudo filesystem (tracefs, bpf) at `target`, creating the directory.
pub fn mount_fs(source: &str, target: &str, fstype: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe { libc::mount(source.as_ptr(), target_c.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The filesystem type mounted at `dir` now (the last mount there wins), from
/// /proc/self/mountinfo; None when `dir` is no mount point.
pub fn fs_type_at(dir: &Path) -> std::io::Result<Option<String>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_fs_type_at(&mountinfo, dir))
}

/// mountinfo lines: `id parent major:minor root mountpoint options [optional...] - fstype source
/// superoptions`; mount points escape spaces as `\040`.
fn parse_fs_type_at(mountinfo: &str, dir: &Path) -> Option<String> {
    let want = dir.to_str()?.trim_end_matches('/');
    let want = if want.is_empty() { "/" } else { want };
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?.replace("\\040", " ");
            let dash = fields.iter().position(|f| *f == "-")?;
            (mount_point == want).then(|| fields.get(dash + 1).map(|t| t.to_string())).flatten()
        })
        .last()
}

/// What `palisade mount-bpffs` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BpffsMount {
    AlreadyMounted(PathBuf),
    Mounted(PathBuf),
}

impl std::fmt::Display for BpffsMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BpffsMount::AlreadyMounted(dir) => write!(f, "bpffs already mounted at {}", dir.display()),
            BpffsMount::Mounted(dir) => write!(f, "mounted bpffs at {}", dir.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{dir}: {what}: {source}")]
    Io { dir: PathBuf, what: &'static str, source: std::io::Error },
    #[error("{dir}: {found} is mounted there, not bpffs: pins would not be shared with the host")]
    Other { dir: PathBuf, found: String },
    #[error("{0}: not a UTF-8 path")]
    NotUtf8(PathBuf),
}

/// Mounts bpffs at `dir` unless it is mounted there already (over whatever else is there, such as
/// the hostPath bind of the host's directory); an error when `dir` is still not bpffs afterwards.
pub fn mount_bpffs(dir: &Path) -> Result<BpffsMount, BpffsError> {
    let io = |what: &'static str| move |source| BpffsError::Io { dir: dir.to_path_buf(), what, source };
    match fs_type_at(dir).map_err(io("reading /proc/self/mountinfo"))? {
        Some(fs) if fs == "bpf" => return Ok(BpffsMount::AlreadyMounted(dir.to_path_buf())),
        // A hostPath volume is a bind mount of the host's directory: mounting over it is the point.
        Some(_) | None => {}
    }
    let target = dir.to_str().ok_or_else(|| BpffsError::NotUtf8(dir.to_path_buf()))?;
    mount_fs("bpf", target, "bpf").map_err(io("mount -t bpf"))?;
    match fs_type_at(dir).map_err(io("reading /proc/self/mountinfo"))? {
        Some(fs) if fs == "bpf" => Ok(BpffsMount::Mounted(dir.to_path_buf())),
        found => Err(BpffsError::Other { dir: dir.to_path_buf(), found: found.unwrap_or_else(|| "nothing".into()) }),
    }
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
pub fn raise_memlock_limit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "setrlimit(RLIMIT_MEMLOCK) failed");
    }
}

/// The cgroup2 mount point, from /proc/mounts (hybrid hosts mount it beside the v1
/// hierarchies, e.g. at /sys/fs/cgroup/unified, so the path cannot be assumed).
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    parse_cgroup2_mount(&mounts).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

/// The cgroup id of a cgroup2 directory as the kernel reports it (bpf_get_current_cgroup_id,
/// bpf_skb_cgroup_id): its inode number.
pub fn cgroup_id(dir: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino())
}

/// The first cgroup2 mount point in a /proc/mounts text.
pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This host's name (for alerts and events).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `struct sched_attr` of sched_setattr(2), its first published size (56 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

fn sched_getattr() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a writable sched_attr of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut SchedAttr, size_of::<SchedAttr>() as u32, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Asks the scheduler for `slice` as the calling thread's time slice, keeping its policy and
/// nice value (the fair scheduler's custom slice, Linux 6.12 and later: it takes 100 µs to
/// 100 ms). A thread with a short slice gets an early virtual deadline when it wakes, so its
/// wake-up preempts a task that is running out a longer slice instead of waiting behind it;
/// its share of the CPU does not change. Returns the slice in force; an error when the kernel
/// refuses the call or ignores the slice (older kernels), and nothing changed then.
pub fn request_short_slice(slice: std::time::Duration) -> std::io::Result<std::time::Duration> {
    let mut attr = sched_getattr()?;
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Err(std::io::Error::other(format!("scheduling policy {} has no custom slice", attr.policy)));
    }
    attr.size = size_of::<SchedAttr>() as u32;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid sched_attr of the size it declares; pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match sched_getattr()?.runtime {
        0 => Err(std::io::Error::other("this kernel has no custom slices for fair-class threads")),
        ns => Ok(std::time::Duration::from_nanos(ns)),
    }
}

/// Gives the calling thread the default slice back (the latency bench compares both).
pub fn default_slice() -> std::io::Result<()> {
    let mut attr = sched_getattr()?;
    attr.size = size_of::<SchedAttr>() as u32;
    attr.runtime = 0;
    // SAFETY: as in `request_short_slice`.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod sched_tests {
    /// The slice is taken and read back on this kernel, and given back.
    #[test]
    fn a_thread_can_ask_for_a_short_slice_and_give_it_back() {
        std::thread::spawn(|| match super::request_short_slice(std::time::Duration::from_micros(100)) {
            Ok(slice) => {
                assert_eq!(slice, std::time::Duration::from_micros(100));
                super::default_slice().expect("default slice");
            }
            // Kernels before 6.12 ignore the slice: said, not hidden.
            Err(err) => assert!(err.to_string().contains("custom slices"), "{err}"),
        })
        .join()
        .expect("thread");
    }
}

#[cfg(test)]
mod mount_tests {
    use super::*;

    #[test]
    fn the_last_mount_at_a_directory_names_its_type() {
        let mountinfo = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/bpf rw,nosuid shared:9 - sysfs sysfs rw
31 30 0:27 / /sys/fs/bpf rw,relatime shared:10 - bpf bpf rw,mode=700
40 1 0:30 / /var/lib/my\\040dir rw - tmpfs tmpfs rw
";
        assert_eq!(parse_fs_type_at(mountinfo, Path::new("/sys/fs/bpf")).as_deref(), Some("bpf"));
        assert_eq!(parse_fs_type_at(mountinfo, Path::new("/sys/fs/bpf/")).as_deref(), Some("bpf"));
        assert_eq!(parse_fs_type_at(mountinfo, Path::new("/sys")).as_deref(), Some("sysfs"));
        assert_eq!(parse_fs_type_at(mountinfo, Path::new("/var/lib/my dir")).as_deref(), Some("tmpfs"));
        assert_eq!(parse_fs_type_at(mountinfo, Path::new("/sys/fs")), None);
    }
}

/// A change [`watch_dir_changes`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirChange {
    /// These paths changed (created, written, renamed, removed).
    Paths(Vec<std::path::PathBuf>),
    /// Changes may have been missed (the kernel's event queue overflowed, the watcher failed,
    /// an event named no path): look at everything again.
    Rescan,
}

/// [`watch_dir`], with what changed: the paths of each event, or [`DirChange::Rescan`] when
/// the watcher cannot say.
pub fn watch_dir_changes(dir: &Path) -> Result<(notify::RecommendedWatcher, tokio::sync::mpsc::UnboundedReceiver<DirChange>), notify::Error> {
    use notify::Watcher as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if event.kind.is_access() => {}
        Ok(event) if event.need_rescan() || event.paths.is_empty() => {
            let _ = tx.send(DirChange::Rescan);
        }
        Ok(event) => {
            let _ = tx.send(DirChange::Paths(event.paths));
        }
        Err(err) => {
            tracing::warn!(%err, "directory watcher: looking at every entry again");
            let _ = tx.send(DirChange::Rescan);
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok((watcher, rx))
}

/// Watches a directory (recursively); each change (not a mere access) sends a unit on the
/// returned channel. The watcher stops when dropped.
pub fn watch_dir(dir: &Path) -> Result<(notify::RecommendedWatcher, tokio::sync::mpsc::UnboundedReceiver<()>), notify::Error> {
    use notify::Watcher as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if event.kind.is_access() => {}
        Ok(_) => {
            let _ = tx.send(());
        }
        Err(err) => tracing::warn!(%err, "directory watcher"),
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok((watcher, rx))
}
