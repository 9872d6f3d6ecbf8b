//! The responder's view of the datapath: the SEG_QUARANTINE hash map (cgroup id -> value; presence
//! means every packet to or from that cgroup, or a cgroup below it, is dropped) and the
//! SEG_FORENSICS trie, both defined by the segmentation datapath (`palisade_common::net`).
//!
//! The responder is the only writer of SEG_QUARANTINE and holds its own file descriptor to it (a
//! duplicate of the loaded object's, or one opened from the bpffs pin), so a quarantine is one
//! `bpf(BPF_MAP_UPDATE_ELEM)` syscall on the response path, with no hop through the eBPF owner
//! task. Pinned maps and pinned links are what keep a pod cut off while the daemon is down.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError};
use aya::programs::links::{CgroupAttachMode, FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{TcAttachOptions, TcAttachType};
use aya::programs::{CgroupSock, LsmCgroup, SchedClassifier};
use palisade_common::{
    BackstopValue, ForensicsValue, IpAddrKey, MAP_SEG_BACKSTOP, MAP_SEG_FORENSICS, MAP_SEG_QUARANTINE,
    PROG_SEG_BACKSTOP_FROM_POD, PROG_SEG_BACKSTOP_TO_POD, PROG_SEG_INET_SOCK_CREATE,
    PROG_SEG_SOCK_CREATE,
    QuarantineValue, SOCK_CREATE_LSM_HOOK,
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {name}: duplicating its file descriptor: {source}")]
    Dup {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the forensics exception needs the {MAP_SEG_FORENSICS} map, which this datapath lacks")]
    NoForensicsMap,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("{path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("the pod's host-side interface: {0}")]
    HostInterface(String),
    /// Only from [`MemoryDatapath`] (tests inject failures).
    #[error("injected failure: {0}")]
    Injected(String),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// One forensics exception entry in the trie's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForensicsEntry {
    /// Over the 16-byte address (IPv4 /n is /(96+n), v4-mapped).
    pub prefix_len: u32,
    pub addr: [u8; 16],
    pub value: ForensicsValue,
}

impl ForensicsEntry {
    pub fn new(addr: IpAddr, prefix_len: u8, port: u16, protocol: u8) -> ForensicsEntry {
        let (addr, prefix_len) = match addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + u32::from(prefix_len)),
            IpAddr::V6(v6) => (v6.octets(), u32::from(prefix_len)),
        };
        ForensicsEntry { prefix_len, addr: mask(addr, prefix_len), value: ForensicsValue { port, protocol, ..ForensicsValue::default() } }
    }
}

fn mask(mut addr: [u8; 16], prefix_len: u32) -> [u8; 16] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let bits = (prefix_len as i64 - (i as i64) * 8).clamp(0, 8) as u32;
        *byte &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    addr
}

/// What the responder needs from the datapath. Every call returns only once the kernel map holds
/// the change (or fails), which is what lets the responder report enforcement truthfully.
pub trait QuarantineDatapath: Send {
    fn set(&mut self, cgroup_id: u64, value: QuarantineValue) -> Result<(), DatapathError>;
    /// Not an error when absent.
    fn clear(&mut self, cgroup_id: u64) -> Result<(), DatapathError>;
    fn entries(&self) -> Result<Vec<(u64, QuarantineValue)>, DatapathError>;
    /// Replaces the forensics exception with `entries` (adds before removes).
    fn set_forensics(&mut self, entries: &[ForensicsEntry]) -> Result<(), DatapathError>;
}

/// The kernel maps, through this process's own file descriptors.
pub struct KernelQuarantineMap {
    quarantine: BpfHashMap<MapData, u64, QuarantineValue>,
    forensics: Option<LpmTrie<MapData, IpAddrKey, ForensicsValue>>,
}

impl KernelQuarantineMap {
    /// Opens the maps pinned under `pin_dir` (`<pin_dir>/SEG_QUARANTINE`, `.../SEG_FORENSICS`,
    /// the layout `segmentation::datapath::pin_maps` creates). Works while no daemon runs.
    pub fn open_pinned(pin_dir: &Path) -> Result<KernelQuarantineMap, DatapathError> {
        let quarantine = MapData::from_pin(pin_dir.join(MAP_SEG_QUARANTINE)).map_err(map_err(MAP_SEG_QUARANTINE))?;
        let forensics = MapData::from_pin(pin_dir.join(MAP_SEG_FORENSICS)).ok();
        Self::from_map_data(quarantine, forensics)
    }

    /// Duplicates the descriptors of a loaded object's maps (the object keeps its own).
    pub fn from_ebpf(ebpf: &Ebpf) -> Result<KernelQuarantineMap, DatapathError> {
        let dup = |name: &'static str| -> Result<MapData, DatapathError> {
            let map = ebpf.map(name).ok_or(DatapathError::MissingMap { name })?;
            let data: &MapData = match map {
                Map::HashMap(data) | Map::LpmTrie(data) => data,
                _ => return Err(DatapathError::Map { name, source: MapError::InvalidMapType { map_type: 0 } }),
            };
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|source| DatapathError::Dup { name, source })?;
            MapData::from_fd(fd).map_err(map_err(name))
        };
        let quarantine = dup(MAP_SEG_QUARANTINE)?;
        let forensics = dup(MAP_SEG_FORENSICS).ok();
        Self::from_map_data(quarantine, forensics)
    }

    fn from_map_data(quarantine: MapData, forensics: Option<MapData>) -> Result<KernelQuarantineMap, DatapathError> {
        let quarantine = BpfHashMap::try_from(Map::from_map_data(quarantine).map_err(map_err(MAP_SEG_QUARANTINE))?)
            .map_err(map_err(MAP_SEG_QUARANTINE))?;
        let forensics = match forensics {
            Some(data) => Some(
                LpmTrie::try_from(Map::from_map_data(data).map_err(map_err(MAP_SEG_FORENSICS))?)
                    .map_err(map_err(MAP_SEG_FORENSICS))?,
            ),
            None => None,
        };
        Ok(KernelQuarantineMap { quarantine, forensics })
    }
}

impl QuarantineDatapath for KernelQuarantineMap {
    fn set(&mut self, cgroup_id: u64, value: QuarantineValue) -> Result<(), DatapathError> {
        self.quarantine.insert(cgroup_id, value, 0).map_err(map_err(MAP_SEG_QUARANTINE))
    }

    fn clear(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        match self.quarantine.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map { name: MAP_SEG_QUARANTINE, source }),
        }
    }

    fn entries(&self) -> Result<Vec<(u64, QuarantineValue)>, DatapathError> {
        self.quarantine.iter().map(|kv| kv.map_err(map_err(MAP_SEG_QUARANTINE))).collect()
    }

    fn set_forensics(&mut self, entries: &[ForensicsEntry]) -> Result<(), DatapathError> {
        let Some(trie) = self.forensics.as_mut() else {
            return if entries.is_empty() { Ok(()) } else { Err(DatapathError::NoForensicsMap) };
        };
        let existing: Vec<(u32, [u8; 16])> = trie
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data().addr))
            .collect();
        for e in entries {
            trie.insert(&LpmKey::new(e.prefix_len, IpAddrKey { addr: e.addr }), e.value, 0)
                .map_err(map_err(MAP_SEG_FORENSICS))?;
        }
        for (prefix_len, addr) in existing {
            if !entries.iter().any(|e| e.prefix_len == prefix_len && e.addr == addr) {
                match trie.remove(&LpmKey::new(prefix_len, IpAddrKey { addr })) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(DatapathError::Map { name: MAP_SEG_FORENSICS, source }),
                }
            }
        }
        Ok(())
    }
}

/// An in-memory datapath for tests without privileges, with failure injection.
#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub entries: BTreeMap<u64, QuarantineValue>,
    pub forensics: Vec<ForensicsEntry>,
    /// The next `set` fails with this message.
    pub fail_next_set: Option<String>,
}

impl QuarantineDatapath for MemoryDatapath {
    fn set(&mut self, cgroup_id: u64, value: QuarantineValue) -> Result<(), DatapathError> {
        if let Some(message) = self.fail_next_set.take() {
            return Err(DatapathError::Injected(message));
        }
        self.entries.insert(cgroup_id, value);
        Ok(())
    }

    fn clear(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        self.entries.remove(&cgroup_id);
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(u64, QuarantineValue)>, DatapathError> {
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn set_forensics(&mut self, entries: &[ForensicsEntry]) -> Result<(), DatapathError> {
        self.forensics = entries.to_vec();
        Ok(())
    }
}

impl<T: QuarantineDatapath + ?Sized> QuarantineDatapath for Box<T> {
    fn set(&mut self, cgroup_id: u64, value: QuarantineValue) -> Result<(), DatapathError> {
        (**self).set(cgroup_id, value)
    }
    fn clear(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        (**self).clear(cgroup_id)
    }
    fn entries(&self) -> Result<Vec<(u64, QuarantineValue)>, DatapathError> {
        (**self).entries()
    }
    fn set_forensics(&mut self, entries: &[ForensicsEntry]) -> Result<(), DatapathError> {
        (**self).set_forensics(entries)
    }
}

/// The pin of one attached program's link, in the layout `segmentation::datapath::attach_pinned`
/// uses (`<dir>/<cgroup id>-ingress`, `-egress`).
pub fn link_pin(dir: &Path, cgroup_id: u64, direction: &str) -> PathBuf {
    dir.join(format!("{cgroup_id}-{direction}"))
}

/// The program `name` of the object as its type `P` (cgroup_skb, cgroup_sock, tcx, ...).
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Pin { path: PathBuf::from(name), message: "program missing from the eBPF object".into() })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Detaches what `segmentation::datapath::Datapath::attach_pinned`, [`attach_socket_hook`] and
/// [`attach_backstop`] attached for `cgroup_id` (missing pins are fine).
pub fn detach_pinned(cgroup_id: u64, link_dir: &Path) -> Result<(), DatapathError> {
    for direction in LINK_SUFFIXES {
        let pin = link_pin(link_dir, cgroup_id, direction);
        if !pin.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(&pin).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        let fd_link = link.unpin().map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        // Dropping an unpinned link's last descriptor detaches the program.
        drop(fd_link);
    }
    Ok(())
}

/// Every link pin suffix one pod's cgroup can have (`<link dir>/<cgroup id>-<suffix>`).
pub const LINK_SUFFIXES: [&str; 6] =
    ["ingress", "egress", "inet-sock-create", "sock-create", "backstop-from-pod", "backstop-to-pod"];

/// Attaches the socket-creation hooks to `cgroup_dir`, pinned under `link_dir` (adopted when
/// already pinned): cgroup/sock_create (`<cgroup id>-inet-sock-create`; a quarantined pod opens no
/// raw IP socket; an error here is an error) and, where the kernel allows it,
/// lsm_cgroup/socket_post_create (`<cgroup id>-sock-create`; no packet socket either). Returns
/// whether packet sockets are covered: Err says why not (the BPF LSM inactive, or the kernel
/// refusing LSM programs); the TC backstop still drops their frames.
pub fn attach_socket_hook(ebpf: &mut Ebpf, cgroup_dir: &Path, link_dir: &Path) -> Result<Result<(), String>, DatapathError> {
    let cgroup_id = crate::lab::cgroup_id(cgroup_dir)
        .map_err(|e| DatapathError::Pin { path: cgroup_dir.to_path_buf(), message: e.to_string() })?;
    let cgroup = std::fs::File::open(cgroup_dir)
        .map_err(|e| DatapathError::Pin { path: cgroup_dir.to_path_buf(), message: e.to_string() })?;
    std::fs::create_dir_all(link_dir).map_err(|e| DatapathError::Pin { path: link_dir.to_path_buf(), message: e.to_string() })?;
    let pin = link_pin(link_dir, cgroup_id, "inet-sock-create");
    if !pin.exists() {
        let name = PROG_SEG_INET_SOCK_CREATE;
        let program: &mut CgroupSock = program(ebpf, name)?;
        if program.fd().is_err() {
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let link_id = program.attach(&cgroup, CgroupAttachMode::Single).map_err(|source| DatapathError::Program { name, source })?;
        let link = program.take_link(link_id).map_err(|source| DatapathError::Program { name, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        fd_link.pin(&pin).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
    }
    Ok(attach_packet_socket_hook(ebpf, &cgroup, &link_pin(link_dir, cgroup_id, "sock-create")))
}

fn attach_packet_socket_hook(ebpf: &mut Ebpf, cgroup: &std::fs::File, pin: &Path) -> Result<(), String> {
    if pin.exists() {
        return Ok(());
    }
    let program: &mut LsmCgroup = ebpf
        .program_mut(PROG_SEG_SOCK_CREATE)
        .ok_or_else(|| "program missing from the eBPF object".to_string())?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    if program.fd().is_err() {
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {e}"))?;
        program
            .load(SOCK_CREATE_LSM_HOOK, &btf)
            .map_err(|e| format!("loading lsm_cgroup/{SOCK_CREATE_LSM_HOOK}: {e}"))?;
    }
    let link_id = program.attach(cgroup).map_err(|e| format!("attaching lsm_cgroup/{SOCK_CREATE_LSM_HOOK}: {e}"))?;
    let link = program.take_link(link_id).map_err(|e| e.to_string())?;
    let fd_link: FdLink = link.into();
    fd_link.pin(pin).map_err(|e| format!("pinning {}: {e}", pin.display()))?;
    Ok(())
}

/// The host side of a pod's veth: where the TC backstop goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    /// The network namespace it lives in (`/run/netns/NAME`), or None: this process's own (the
    /// host's, where CNI plugins put the host-side veths).
    pub netns: Option<PathBuf>,
    pub ifindex: u32,
    pub name: String,
}

/// Runs `f` on a thread that has joined the network namespace at `netns` (None: stays in ours).
/// Child processes it spawns (`ip`) and interface names it resolves are that namespace's.
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T, DatapathError> + Send) -> Result<T, DatapathError> {
    use std::os::fd::AsRawFd as _;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(path) = netns {
                    let file = std::fs::File::open(path)
                        .map_err(|e| DatapathError::HostInterface(format!("opening {}: {e}", path.display())))?;
                    // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        let err = std::io::Error::last_os_error();
                        return Err(DatapathError::HostInterface(format!("joining {}: {err}", path.display())));
                    }
                }
                f()
            })
            .join()
            .map_err(|_| DatapathError::HostInterface("the namespace thread panicked".into()))?
    })
}

/// `ip -j ARGS` in the calling thread's network namespace, parsed.
fn ip_json(args: &[&str]) -> Result<serde_json::Value, DatapathError> {
    let output = std::process::Command::new("ip")
        .arg("-j")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| DatapathError::HostInterface(format!("running ip: {e}")))?;
    if !output.status.success() {
        return Err(DatapathError::HostInterface(format!(
            "ip -j {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| DatapathError::HostInterface(format!("ip -j {}: {e}", args.join(" "))))
}

/// Finds the host side of the pod's veth from the pod's network namespace (`/proc/PID/ns/net`
/// or `/run/netns/NAME`): the pod-side veth names its peer's ifindex and the peer's namespace id;
/// the namespace id is resolved to a named namespace (`ip netns list-id`), or else taken to be
/// this process's own; the peer must point back at the pod's interface.
pub fn host_interface(pod_netns: &Path) -> Result<HostInterface, DatapathError> {
    let (pod_ifindex, peer_ifindex, peer_nsid, names) = in_netns(Some(pod_netns), || {
        let links = ip_json(&["-d", "link", "show"])?;
        let veth = links
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l.pointer("/linkinfo/info_kind").and_then(|k| k.as_str()) == Some("veth"))
            .ok_or_else(|| DatapathError::HostInterface(format!("no veth in {}", pod_netns.display())))?;
        let field = |name: &str| veth.get(name).and_then(serde_json::Value::as_u64);
        let ifindex = field("ifindex").ok_or_else(|| DatapathError::HostInterface("veth without ifindex".into()))?;
        let peer = field("link_index").ok_or_else(|| DatapathError::HostInterface("veth without a peer index".into()))?;
        let nsid = field("link_netnsid");
        let ids = ip_json(&["netns", "list-id"])?;
        let names: Vec<(u64, String)> = ids
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("nsid")?.as_u64()?, e.get("name")?.as_str()?.to_string())))
            .collect();
        Ok((ifindex as u32, peer as u32, nsid, names))
    })?;
    let Some(nsid) = peer_nsid else {
        return Err(DatapathError::HostInterface(format!("the veth in {} has its peer in the same namespace", pod_netns.display())));
    };
    let netns = names.iter().find(|(id, _)| *id == nsid).map(|(_, name)| Path::new("/run/netns").join(name));
    let name = in_netns(netns.as_deref(), || {
        let links = ip_json(&["link", "show"])?;
        links
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| {
                l.get("ifindex").and_then(serde_json::Value::as_u64) == Some(u64::from(peer_ifindex))
                    && l.get("link_index").and_then(serde_json::Value::as_u64) == Some(u64::from(pod_ifindex))
            })
            .and_then(|l| l.get("ifname")?.as_str().map(str::to_string))
            .ok_or_else(|| {
                DatapathError::HostInterface(format!(
                    "no interface {peer_ifindex} pointing back at the pod's {pod_ifindex} in {}",
                    netns.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "this namespace".into())
                ))
            })
    })?;
    Ok(HostInterface { netns, ifindex: peer_ifindex, name })
}

/// Attaches the TC backstop (tcx, first in line) to both directions of the pod's host-side
/// interface, pinned as `<cgroup id>-backstop-from-pod` / `-to-pod`, and registers the interface
/// in SEG_BACKSTOP so its frames are judged by the pod's quarantine flag. Adopted when already
/// pinned (the SEG_BACKSTOP entry is rewritten either way).
pub fn attach_backstop(ebpf: &mut Ebpf, host: &HostInterface, cgroup_id: u64, link_dir: &Path) -> Result<(), DatapathError> {
    {
        let map = ebpf.map_mut(MAP_SEG_BACKSTOP).ok_or(DatapathError::MissingMap { name: MAP_SEG_BACKSTOP })?;
        let mut map: BpfHashMap<&mut MapData, u32, BackstopValue> =
            BpfHashMap::try_from(map).map_err(map_err(MAP_SEG_BACKSTOP))?;
        map.insert(host.ifindex, BackstopValue { cgroup_id }, 0).map_err(map_err(MAP_SEG_BACKSTOP))?;
    }
    std::fs::create_dir_all(link_dir).map_err(|e| DatapathError::Pin { path: link_dir.to_path_buf(), message: e.to_string() })?;
    for (name, attach_type, suffix) in [
        (PROG_SEG_BACKSTOP_FROM_POD, TcAttachType::Ingress, "backstop-from-pod"),
        (PROG_SEG_BACKSTOP_TO_POD, TcAttachType::Egress, "backstop-to-pod"),
    ] {
        let pin = link_pin(link_dir, cgroup_id, suffix);
        if pin.exists() {
            continue;
        }
        let program: &mut SchedClassifier = program(ebpf, name)?;
        if program.fd().is_err() {
            program.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let interface = host.name.clone();
        let link_id = in_netns(host.netns.as_deref(), || {
            program
                .attach_with_options(&interface, attach_type, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|source| DatapathError::Program { name, source })
        })?;
        let link = program.take_link(link_id).map_err(|source| DatapathError::Program { name, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        fd_link.pin(&pin).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
    }
    Ok(())
}

/// What the escape-path hooks cover for one pod (`palisade status`): None is covered, Some says
/// why not.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EscapeHooks {
    /// cgroup/sock_create: raw IP sockets refused at creation.
    pub raw_ip_sockets: Option<String>,
    /// lsm_cgroup/socket_post_create: packet sockets refused at creation.
    pub packet_sockets: Option<String>,
    /// The TC backstop on the pod's host-side interface (frames no cgroup hook sees).
    pub backstop: Option<String>,
    /// That interface, when found.
    pub host_interface: Option<String>,
}

impl EscapeHooks {
    /// Whether the backstop still has to be attached (retried at the next sync).
    pub fn backstop_pending(&self) -> bool {
        self.backstop.is_some()
    }

    /// Records the outcome of [`attach_backstop_hook`].
    pub fn set_backstop(&mut self, outcome: Result<String, String>) {
        match outcome {
            Ok(name) => {
                self.host_interface = Some(name);
                self.backstop = None;
            }
            Err(why) => {
                self.host_interface = None;
                self.backstop = Some(why);
            }
        }
    }
}

/// The pod's network namespace, from a process in its cgroup (or a child cgroup):
/// `/proc/PID/ns/net`. Err says why there is none to use: no process yet, or the pod shares
/// this process's namespace (host network: no veth to guard).
pub fn pod_netns(cgroup_dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut dirs = vec![(cgroup_dir.to_path_buf(), 0)];
    let mut pid = None;
    while let Some((dir, depth)) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            if let Some(first) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
                pid = Some(first);
                break;
            }
        }
        if depth < 4 {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                dirs.extend(entries.flatten().filter(|e| e.path().is_dir()).map(|e| (e.path(), depth + 1)));
            }
        }
    }
    let pid = pid.ok_or_else(|| "no process in the pod's cgroup yet to find its network namespace from".to_string())?;
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let theirs = std::fs::metadata(&netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let ours = std::fs::metadata("/proc/self/ns/net").map_err(|e| format!("/proc/self/ns/net: {e}"))?;
    if theirs.ino() == ours.ino() && theirs.dev() == ours.dev() {
        return Err("the pod shares the node's network namespace (host network): no veth to guard".into());
    }
    Ok(netns)
}

/// Attaches the socket-creation hooks and the TC backstop for one pod cgroup (pins under
/// `link_dir`), each independently: one failing does not stop the others.
pub fn attach_escape_hooks(ebpf: &mut Ebpf, cgroup_dir: &Path, link_dir: &Path) -> EscapeHooks {
    let mut hooks = attach_socket_hooks(ebpf, cgroup_dir, link_dir);
    hooks.set_backstop(attach_backstop_hook(ebpf, cgroup_dir, link_dir));
    hooks
}

/// The socket-creation hooks alone (raw IP and packet sockets; no backstop), with what failed.
pub fn attach_socket_hooks(ebpf: &mut Ebpf, cgroup_dir: &Path, link_dir: &Path) -> EscapeHooks {
    let mut hooks = EscapeHooks::default();
    match attach_socket_hook(ebpf, cgroup_dir, link_dir) {
        Ok(packet) => hooks.packet_sockets = packet.err(),
        Err(err) => {
            hooks.raw_ip_sockets = Some(err.to_string());
            hooks.packet_sockets = Some(err.to_string());
        }
    }
    hooks
}

/// The TC backstop alone for one pod cgroup (its socket hooks come from a parent it sits
/// below): Ok names the host-side interface, Err says why it is not attached.
pub fn attach_backstop_hook(ebpf: &mut Ebpf, cgroup_dir: &Path, link_dir: &Path) -> Result<String, String> {
    pod_netns(cgroup_dir).and_then(|netns| host_interface(&netns).map_err(|e| e.to_string())).and_then(|host| {
        let cgroup_id = crate::lab::cgroup_id(cgroup_dir).map_err(|e| e.to_string())?;
        attach_backstop(ebpf, &host, cgroup_id, link_dir).map_err(|e| e.to_string())?;
        Ok(host.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forensics_entries_are_v4_mapped_and_masked() {
        let e = ForensicsEntry::new("198.18.9.77".parse().expect("ip"), 24, 22, 6);
        assert_eq!(e.prefix_len, 120);
        assert_eq!(&e.addr[10..], &[0xff, 0xff, 198, 18, 9, 0]);
        let e = ForensicsEntry::new("2001:db8::1".parse().expect("ip"), 32, 0, 0);
        assert_eq!(e.prefix_len, 32);
        assert_eq!(&e.addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert!(e.addr[4..].iter().all(|b| *b == 0));
    }
}
