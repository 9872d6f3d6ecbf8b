//! The responder's view of the datapath: the SEG_QUARANTINE hash map (cgroup id -> value; presence
//! means every packet to or from that cgroup, or a cgroup below it, is dropped) and the
//! SEG_FORENSICS trie, both defined by the segmentation datapath (`palisade_common::net`).
//!
//! The responder is the only writer of SEG_QUARANTINE and holds its own file descriptor to it (a
//! duplicate of the loaded object's, or one opened from the bpffs pin), so a quarantine is one
//! `bpf(BPF_MAP_UPDATE_ELEM)` syscall on the verdict path, with no hop through the eBPF owner
//! task. Pinned maps and pinned links are what keep a pod cut off while the daemon is down.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::{CgroupSkb, CgroupSkbAttachType};
use palisade_common::{
    ForensicsValue, IpAddrKey, MAP_SEG_FORENSICS, MAP_SEG_QUARANTINE, PROG_SEG_EGRESS, PROG_SEG_INGRESS, QuarantineValue,
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

/// Where palisade pins its datapath maps by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/palisade";
/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there (pins need it).
pub fn ensure_bpffs() -> std::io::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        matches!((f.next(), f.next(), f.next()), (Some(_), Some(BPFFS), Some("bpf")))
    });
    if mounted { Ok(()) } else { crate::sys::mount_fs("bpf", BPFFS, "bpf") }
}

/// The pin of one attached program's link, in the layout `segmentation::datapath::attach_pinned`
/// uses (`<dir>/<cgroup id>-ingress`, `-egress`).
pub fn link_pin(dir: &Path, cgroup_id: u64, direction: &str) -> PathBuf {
    dir.join(format!("{cgroup_id}-{direction}"))
}

/// Loads the embedded object with every datapath map pinned under `pin_dir` (created; maps
/// already pinned there, with their quarantine entries, are reused rather than recreated) and
/// loads the two cgroup_skb programs. For tests, tools and a daemon whose segmentation loader does
/// not pin; the daemon proper loads through `segmentation::datapath`.
pub fn load_pinned(pin_dir: &Path) -> Result<Ebpf, DatapathError> {
    crate::sys::raise_memlock_limit();
    std::fs::create_dir_all(pin_dir).map_err(|e| DatapathError::Pin { path: pin_dir.to_path_buf(), message: e.to_string() })?;
    let mut loader = aya::EbpfLoader::new();
    for name in palisade_common::SEG_MAPS {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader.load(crate::probes::object::PROBES_OBJECT)?;
    for name in [PROG_SEG_INGRESS, PROG_SEG_EGRESS] {
        let program = cgroup_skb(&mut ebpf, name)?;
        program.load().map_err(|source| DatapathError::Program { name, source })?;
    }
    Ok(ebpf)
}

fn cgroup_skb<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Pin { path: PathBuf::from(name), message: "program missing from the eBPF object".into() })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Attaches both programs to `cgroup_dir` and pins the links under `link_dir`, so they stay
/// attached when this process exits or is killed. Links already pinned for that cgroup (a
/// previous run's) are adopted as they are. Returns true when everything was adopted.
pub fn attach_pinned(ebpf: &mut Ebpf, cgroup_dir: &Path, link_dir: &Path) -> Result<bool, DatapathError> {
    let cgroup_id = crate::lab::cgroup_id(cgroup_dir)
        .map_err(|e| DatapathError::Pin { path: cgroup_dir.to_path_buf(), message: e.to_string() })?;
    let cgroup = std::fs::File::open(cgroup_dir)
        .map_err(|e| DatapathError::Pin { path: cgroup_dir.to_path_buf(), message: e.to_string() })?;
    std::fs::create_dir_all(link_dir).map_err(|e| DatapathError::Pin { path: link_dir.to_path_buf(), message: e.to_string() })?;
    let mut adopted = true;
    for (name, attach_type, direction) in
        [(PROG_SEG_INGRESS, CgroupSkbAttachType::Ingress, "ingress"), (PROG_SEG_EGRESS, CgroupSkbAttachType::Egress, "egress")]
    {
        let pin = link_pin(link_dir, cgroup_id, direction);
        if pin.exists() {
            continue;
        }
        adopted = false;
        let program = cgroup_skb(ebpf, name)?;
        // Through bpf_link_create (kernel >= 5.7) the flags must be 0: cgroup links always
        // coexist with other programs on the cgroup, as BPF_F_ALLOW_MULTI attachments do.
        let link_id = program
            .attach(&cgroup, attach_type, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Program { name, source })?;
        let link = program.take_link(link_id).map_err(|source| DatapathError::Program { name, source })?;
        let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        fd_link.pin(&pin).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
    }
    Ok(adopted)
}

/// Detaches what [`attach_pinned`] attached for `cgroup_id` (missing pins are fine).
pub fn detach_pinned(cgroup_id: u64, link_dir: &Path) -> Result<(), DatapathError> {
    for direction in ["ingress", "egress"] {
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
