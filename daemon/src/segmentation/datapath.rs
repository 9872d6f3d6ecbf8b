//! The user side of the eBPF datapath: map sync (as a diff, adds before removes), cgroup_skb
//! attach/detach per pod cgroup, the quarantine flag, and policy_denied record decoding.
//!
//! Why per pod cgroup: the programs run only for pod sockets (host traffic pays nothing), the
//! verdict needs no CNI cooperation, `bpf_skb_cgroup_id` names the pod for quarantine, and both
//! directions see the pod's own socket (egress at the sender, ingress at the receiver). Attached
//! as BPF links (multi-attach semantics) so other tools' programs on the same cgroup keep running.
//!
//! Sync order (never fail-open, never dropping an allowed established flow): POLICY upserts, then
//! IPCACHE upserts, then ENDPOINTS upserts (isolation turns on only once its allows exist), then
//! ENDPOINTS removals, IPCACHE removals, POLICY removals, then a new policy generation: with
//! `--established-flows strict` (the default) each conntrack entry is judged again at its next
//! packet, with `keep` replies of flows allowed before the change keep passing (see `conntrack`).
//!
//! Pinning: `pin_maps` registers every SEG_* map under a bpffs directory on the loader; a
//! restarted daemon reuses the pinned maps (quarantine entries included) and `Datapath::adopt`
//! reads their contents so the first sync is a diff against what the kernel enforces.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key as LpmTrieKey;
use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError};
use aya::programs::links::CgroupAttachMode;
use aya::programs::links::FdLink;
use aya::programs::{CgroupSkb, CgroupSkbAttachType, ProgramError, cgroup_skb::CgroupSkbLinkId};
use aya::{Ebpf, EbpfLoader};
use palisade_common::{
    CgroupValue, DatapathConfig, EndpointConfig, MAP_SEG_CGROUPS, ForensicsValue, IpAddrKey, IpCacheValue, MAP_SEG_CONFIG,
    MAP_SEG_ENDPOINTS, MAP_SEG_FORENSICS, MAP_SEG_IPCACHE, MAP_SEG_POLICY, MAP_SEG_QUARANTINE,
    PROG_SEG_EGRESS, PROG_SEG_INGRESS, PolicyKey, PolicyValue, PolicyVerdictEvent, QuarantineValue,
    SEG_MAPS,
};

use super::compile::{Compiled, Delta, LpmKey};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} is not attached")]
    NotAttached { path: PathBuf },
    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// Registers every datapath map to be pinned (or reused when already pinned) under `dir` (a
/// directory on bpffs, created if missing). Call on the loader that loads `PROBES_OBJECT`.
pub fn pin_maps<'a>(loader: &mut EbpfLoader<'a>, dir: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(dir).map_err(|e| DatapathError::Pin { path: dir.to_path_buf(), message: e.to_string() })?;
    super::conntrack::drop_incompatible_pins(dir);
    for name in SEG_MAPS {
        loader.map_pin_path(name, dir.join(name));
    }
    Ok(())
}

/// Loads the embedded object (all of palisade's programs), datapath maps pinned under `pin_dir`
/// when given. The daemon's probes task normally owns loading; tests and tools use this.
pub fn load(pin_dir: Option<&Path>) -> Result<Ebpf, DatapathError> {
    let mut loader = EbpfLoader::new();
    if let Some(dir) = pin_dir {
        pin_maps(&mut loader, dir)?;
    }
    Ok(loader.load(crate::probes::object::PROBES_OBJECT)?)
}

/// The cgroup id (as `bpf_skb_cgroup_id` reports it) of a cgroup v2 directory: its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, DatapathError> {
    crate::sys::cgroup_id(path).map_err(|source| DatapathError::Cgroup { path: path.to_path_buf(), source })
}

/// The cgroup2 mount point, from /proc/mounts.
pub fn cgroup2_mount() -> Option<PathBuf> {
    crate::sys::cgroup2_mount().ok()
}

/// Counts of one sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub policy_added: usize,
    pub policy_removed: usize,
    pub ipcache_added: usize,
    pub ipcache_removed: usize,
    pub endpoints_added: usize,
    pub endpoints_removed: usize,
}

/// What the datapath maps hold (as far as this process wrote or adopted them).
#[derive(Debug, Default)]
pub struct Datapath {
    policy: BTreeMap<PolicyKey, PolicyValue>,
    ipcache: BTreeMap<LpmKey, IpCacheValue>,
    endpoints: BTreeMap<u32, EndpointConfig>,
    cgroups: BTreeMap<u64, CgroupValue>,
    attached: StdHashMap<PathBuf, (CgroupSkbLinkId, CgroupSkbLinkId)>,
    /// The generation of compiled contents the maps hold exactly (`SyncHint::generation`),
    /// when the last sync wrote one whole; None after adopting or a failed sync.
    synced: Option<u64>,
}

fn lpm_key(k: &LpmKey) -> LpmTrieKey<IpAddrKey> {
    LpmTrieKey::new(k.prefix_len, IpAddrKey { addr: k.addr })
}

impl Datapath {
    /// The POLICY entries the map holds (as last synced or adopted).
    pub fn policy_entries(&self) -> &BTreeMap<PolicyKey, PolicyValue> {
        &self.policy
    }

    /// Loads the cgroup_skb programs into the kernel (once) and reads what the maps already hold
    /// (pinned maps of a previous run), so the first sync is a diff.
    pub fn adopt(bpf: &mut Ebpf) -> Result<Datapath, DatapathError> {
        for name in [PROG_SEG_INGRESS, PROG_SEG_EGRESS] {
            let prog: &mut CgroupSkb = program(bpf, name)?;
            if prog.fd().is_err() {
                prog.load().map_err(|source| DatapathError::Program { name, source })?;
            }
        }
        let mut dp = Datapath::default();
        {
            let map: HashMap<&MapData, PolicyKey, PolicyValue> = HashMap::try_from(
                bpf.map(MAP_SEG_POLICY).ok_or(DatapathError::MissingMap { name: MAP_SEG_POLICY })?,
            )
            .map_err(map_err(MAP_SEG_POLICY))?;
            for kv in map.iter() {
                let (k, v) = kv.map_err(map_err(MAP_SEG_POLICY))?;
                dp.policy.insert(k, v);
            }
        }
        {
            let map: LpmTrie<&MapData, IpAddrKey, IpCacheValue> = LpmTrie::try_from(
                bpf.map(MAP_SEG_IPCACHE).ok_or(DatapathError::MissingMap { name: MAP_SEG_IPCACHE })?,
            )
            .map_err(map_err(MAP_SEG_IPCACHE))?;
            for kv in map.iter() {
                let (k, v) = kv.map_err(map_err(MAP_SEG_IPCACHE))?;
                dp.ipcache.insert(LpmKey { prefix_len: k.prefix_len(), addr: k.data().addr }, v);
            }
        }
        {
            let map: HashMap<&MapData, u32, EndpointConfig> = HashMap::try_from(
                bpf.map(MAP_SEG_ENDPOINTS).ok_or(DatapathError::MissingMap { name: MAP_SEG_ENDPOINTS })?,
            )
            .map_err(map_err(MAP_SEG_ENDPOINTS))?;
            for kv in map.iter() {
                let (k, v) = kv.map_err(map_err(MAP_SEG_ENDPOINTS))?;
                dp.endpoints.insert(k, v);
            }
        }
        // An object without SEG_CGROUPS (an older build, e.g. the benchmark's "before") has no
        // pods parent to adopt.
        if let Some(map) = bpf.map(MAP_SEG_CGROUPS) {
            let map: HashMap<&MapData, u64, CgroupValue> = HashMap::try_from(map).map_err(map_err(MAP_SEG_CGROUPS))?;
            for kv in map.iter() {
                let (k, v) = kv.map_err(map_err(MAP_SEG_CGROUPS))?;
                dp.cgroups.insert(k, v);
            }
        }
        Ok(dp)
    }

    /// Turns policy_denied records on (rate-limited per endpoint: `per_window` records per second,
    /// 0 = the default of 16; the rest are counted and reported with the next record).
    pub fn set_denied_events(bpf: &mut Ebpf, enabled: bool, per_window: u32) -> Result<(), DatapathError> {
        let mut cfg: Array<&mut MapData, DatapathConfig> =
            Array::try_from(bpf.map_mut(MAP_SEG_CONFIG).ok_or(DatapathError::MissingMap { name: MAP_SEG_CONFIG })?)
                .map_err(map_err(MAP_SEG_CONFIG))?;
        cfg.set(0, DatapathConfig { emit_denied: enabled as u32, deny_events_per_window: per_window }, 0)
            .map_err(map_err(MAP_SEG_CONFIG))
    }

    /// The POLICY entries the maps would hold with `compiled` added before anything is removed
    /// (what a sync needs room for): from the delta when `compiled` carries one against what
    /// the maps hold, else by comparing every key.
    pub fn policy_union_len(&self, compiled: &Compiled) -> usize {
        let held = &self.policy;
        if compiled.sync.generation != 0 && self.synced == Some(compiled.sync.generation) {
            return held.len();
        }
        match self.applicable_delta(compiled) {
            Some(delta) => held.len() + delta.policy.iter().filter(|k| compiled.policy.contains_key(k) && !held.contains_key(k)).count(),
            None => held.len() + compiled.policy.keys().filter(|k| !held.contains_key(k)).count(),
        }
    }

    fn applicable_delta<'a>(&self, compiled: &'a Compiled) -> Option<&'a Delta> {
        compiled.sync.delta.as_deref().filter(|delta| self.synced.is_some_and(|g| g == delta.base))
    }

    /// Applies `compiled`: when it carries a delta against the generation the maps hold, only
    /// the keys the delta names are compared and written (a policy change costs what it
    /// changed, not the set); otherwise as a diff of every entry. Adds and changes first,
    /// removals last, either way.
    pub fn sync(&mut self, bpf: &mut Ebpf, compiled: &Compiled) -> Result<SyncStats, DatapathError> {
        let generation = compiled.sync.generation;
        if generation != 0 && self.synced == Some(generation) {
            return Ok(SyncStats::default());
        }
        let result = match self.applicable_delta(compiled) {
            Some(delta) => self.sync_delta(bpf, compiled, delta),
            None => self.sync_all(bpf, compiled),
        };
        self.synced = match &result {
            Ok(_) if generation != 0 => Some(generation),
            _ => None,
        };
        let stats = result?;
        // A new policy generation: in strict mode, established flows are judged again.
        if stats != SyncStats::default() {
            super::conntrack::bump_policy_generation(bpf)?;
        }
        tracing::debug!(?stats, "datapath synced");
        Ok(stats)
    }

    /// The keys `delta` names, in the same order as [`Datapath::sync_all`]: POLICY upserts,
    /// ENDPOINTS upserts, ENDPOINTS removals, POLICY removals (a delta never changes IPCACHE).
    fn sync_delta(&mut self, bpf: &mut Ebpf, compiled: &Compiled, delta: &Delta) -> Result<SyncStats, DatapathError> {
        let mut stats = SyncStats::default();
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyValue> = HashMap::try_from(
            bpf.map_mut(MAP_SEG_POLICY).ok_or(DatapathError::MissingMap { name: MAP_SEG_POLICY })?,
        )
        .map_err(map_err(MAP_SEG_POLICY))?;
        for k in &delta.policy {
            if let Some(v) = compiled.policy.get(k)
                && self.policy.get(k) != Some(v)
            {
                policy.insert(k, v, 0).map_err(map_err(MAP_SEG_POLICY))?;
                self.policy.insert(*k, *v);
                stats.policy_added += 1;
            }
        }
        drop(policy);
        {
            let mut map: HashMap<&mut MapData, u32, EndpointConfig> = HashMap::try_from(
                bpf.map_mut(MAP_SEG_ENDPOINTS).ok_or(DatapathError::MissingMap { name: MAP_SEG_ENDPOINTS })?,
            )
            .map_err(map_err(MAP_SEG_ENDPOINTS))?;
            for k in &delta.endpoint_config {
                if let Some(v) = compiled.endpoint_config.get(k)
                    && self.endpoints.get(k) != Some(v)
                {
                    map.insert(k, v, 0).map_err(map_err(MAP_SEG_ENDPOINTS))?;
                    self.endpoints.insert(*k, *v);
                    stats.endpoints_added += 1;
                }
            }
            for k in &delta.endpoint_config {
                if !compiled.endpoint_config.contains_key(k) && self.endpoints.contains_key(k) {
                    remove_ok(map.remove(k)).map_err(map_err(MAP_SEG_ENDPOINTS))?;
                    self.endpoints.remove(k);
                    stats.endpoints_removed += 1;
                }
            }
        }
        let mut policy: HashMap<&mut MapData, PolicyKey, PolicyValue> = HashMap::try_from(
            bpf.map_mut(MAP_SEG_POLICY).ok_or(DatapathError::MissingMap { name: MAP_SEG_POLICY })?,
        )
        .map_err(map_err(MAP_SEG_POLICY))?;
        for k in &delta.policy {
            if !compiled.policy.contains_key(k) && self.policy.contains_key(k) {
                remove_ok(policy.remove(k)).map_err(map_err(MAP_SEG_POLICY))?;
                self.policy.remove(k);
                stats.policy_removed += 1;
            }
        }
        Ok(stats)
    }

    /// Every entry compared: adds and changes first, removals last.
    fn sync_all(&mut self, bpf: &mut Ebpf, compiled: &Compiled) -> Result<SyncStats, DatapathError> {
        let mut stats = SyncStats::default();
        // 1. POLICY upserts
        {
            let mut map: HashMap<&mut MapData, PolicyKey, PolicyValue> = HashMap::try_from(
                bpf.map_mut(MAP_SEG_POLICY).ok_or(DatapathError::MissingMap { name: MAP_SEG_POLICY })?,
            )
            .map_err(map_err(MAP_SEG_POLICY))?;
            for (k, v) in &compiled.policy {
                if self.policy.get(k) != Some(v) {
                    map.insert(k, v, 0).map_err(map_err(MAP_SEG_POLICY))?;
                    self.policy.insert(*k, *v);
                    stats.policy_added += 1;
                }
            }
        }
        // 2. IPCACHE upserts
        {
            let mut map: LpmTrie<&mut MapData, IpAddrKey, IpCacheValue> = LpmTrie::try_from(
                bpf.map_mut(MAP_SEG_IPCACHE).ok_or(DatapathError::MissingMap { name: MAP_SEG_IPCACHE })?,
            )
            .map_err(map_err(MAP_SEG_IPCACHE))?;
            for (k, v) in &compiled.ipcache {
                if self.ipcache.get(k) != Some(v) {
                    map.insert(&lpm_key(k), v, 0).map_err(map_err(MAP_SEG_IPCACHE))?;
                    self.ipcache.insert(*k, *v);
                    stats.ipcache_added += 1;
                }
            }
        }
        // 3. ENDPOINTS upserts, 4. removals
        {
            let mut map: HashMap<&mut MapData, u32, EndpointConfig> = HashMap::try_from(
                bpf.map_mut(MAP_SEG_ENDPOINTS).ok_or(DatapathError::MissingMap { name: MAP_SEG_ENDPOINTS })?,
            )
            .map_err(map_err(MAP_SEG_ENDPOINTS))?;
            for (k, v) in &compiled.endpoint_config {
                if self.endpoints.get(k) != Some(v) {
                    map.insert(k, v, 0).map_err(map_err(MAP_SEG_ENDPOINTS))?;
                    self.endpoints.insert(*k, *v);
                    stats.endpoints_added += 1;
                }
            }
            let gone: Vec<u32> = self.endpoints.keys().filter(|k| !compiled.endpoint_config.contains_key(k)).copied().collect();
            for k in gone {
                remove_ok(map.remove(&k)).map_err(map_err(MAP_SEG_ENDPOINTS))?;
                self.endpoints.remove(&k);
                stats.endpoints_removed += 1;
            }
        }
        // 5. IPCACHE removals
        {
            let mut map: LpmTrie<&mut MapData, IpAddrKey, IpCacheValue> = LpmTrie::try_from(
                bpf.map_mut(MAP_SEG_IPCACHE).ok_or(DatapathError::MissingMap { name: MAP_SEG_IPCACHE })?,
            )
            .map_err(map_err(MAP_SEG_IPCACHE))?;
            let gone: Vec<LpmKey> = self.ipcache.keys().filter(|k| !compiled.ipcache.contains_key(k)).copied().collect();
            for k in gone {
                remove_ok(map.remove(&lpm_key(&k))).map_err(map_err(MAP_SEG_IPCACHE))?;
                self.ipcache.remove(&k);
                stats.ipcache_removed += 1;
            }
        }
        // 6. POLICY removals
        {
            let mut map: HashMap<&mut MapData, PolicyKey, PolicyValue> = HashMap::try_from(
                bpf.map_mut(MAP_SEG_POLICY).ok_or(DatapathError::MissingMap { name: MAP_SEG_POLICY })?,
            )
            .map_err(map_err(MAP_SEG_POLICY))?;
            let gone: Vec<PolicyKey> = self.policy.keys().filter(|k| !compiled.policy.contains_key(k)).copied().collect();
            for k in gone {
                remove_ok(map.remove(&k)).map_err(map_err(MAP_SEG_POLICY))?;
                self.policy.remove(&k);
                stats.policy_removed += 1;
            }
        }
        Ok(stats)
    }

    /// Writes SEG_CGROUPS as a diff against `wanted` (cgroup id -> endpoint, fail-closed parent
    /// or exempt): adds and changes first, then removals. Call after `sync`, so a cgroup becomes
    /// a known endpoint only once its endpoint's maps are in.
    pub fn sync_cgroups(&mut self, bpf: &mut Ebpf, wanted: &BTreeMap<u64, CgroupValue>) -> Result<(usize, usize), DatapathError> {
        let mut map: HashMap<&mut MapData, u64, CgroupValue> = HashMap::try_from(
            bpf.map_mut(MAP_SEG_CGROUPS).ok_or(DatapathError::MissingMap { name: MAP_SEG_CGROUPS })?,
        )
        .map_err(map_err(MAP_SEG_CGROUPS))?;
        let (mut added, mut removed) = (0, 0);
        // Endpoints before parents: a parent written first would hold a known pod unknown.
        let mut order: Vec<(&u64, &CgroupValue)> = wanted.iter().collect();
        order.sort_by_key(|(_, v)| v.kind == palisade_common::CGROUP_PARENT);
        for (k, v) in order {
            if self.cgroups.get(k) != Some(v) {
                map.insert(k, v, 0).map_err(map_err(MAP_SEG_CGROUPS))?;
                self.cgroups.insert(*k, *v);
                added += 1;
            }
        }
        let gone: Vec<u64> = self.cgroups.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for k in gone {
            remove_ok(map.remove(&k)).map_err(map_err(MAP_SEG_CGROUPS))?;
            self.cgroups.remove(&k);
            removed += 1;
        }
        Ok((added, removed))
    }

    /// The SEG_CGROUPS entries (as last synced or adopted).
    pub fn cgroup_entries(&self) -> &BTreeMap<u64, CgroupValue> {
        &self.cgroups
    }

    /// Attaches both cgroup_skb programs to a pod cgroup (absolute path, or relative to the
    /// cgroup2 mount). Idempotent per path.
    pub fn attach(&mut self, bpf: &mut Ebpf, cgroup: &Path) -> Result<(), DatapathError> {
        let path = resolve_cgroup(cgroup);
        if self.attached.contains_key(&path) {
            return Ok(());
        }
        let file = File::open(&path).map_err(|source| DatapathError::Cgroup { path: path.clone(), source })?;
        let ingress = attach_one(bpf, PROG_SEG_INGRESS, &file, CgroupSkbAttachType::Ingress)?;
        let egress = match attach_one(bpf, PROG_SEG_EGRESS, &file, CgroupSkbAttachType::Egress) {
            Ok(l) => l,
            Err(e) => {
                let _ = program::<CgroupSkb>(bpf, PROG_SEG_INGRESS).and_then(|p| {
                    p.detach(ingress).map_err(|source| DatapathError::Program { name: PROG_SEG_INGRESS, source })
                });
                return Err(e);
            }
        };
        self.attached.insert(path, (ingress, egress));
        Ok(())
    }

    /// Attaches and pins both links under `pin_dir` (`<cgroup id>-ingress`, `<cgroup id>-egress`),
    /// so enforcement survives the daemon; remove the pins to detach.
    pub fn attach_pinned(&mut self, bpf: &mut Ebpf, cgroup: &Path, pin_dir: &Path) -> Result<(), DatapathError> {
        let path = resolve_cgroup(cgroup);
        let id = cgroup_id(&path)?;
        let file = File::open(&path).map_err(|source| DatapathError::Cgroup { path: path.clone(), source })?;
        std::fs::create_dir_all(pin_dir).map_err(|e| DatapathError::Pin { path: pin_dir.to_path_buf(), message: e.to_string() })?;
        for (name, kind, suffix) in [
            (PROG_SEG_INGRESS, CgroupSkbAttachType::Ingress, "ingress"),
            (PROG_SEG_EGRESS, CgroupSkbAttachType::Egress, "egress"),
        ] {
            let pin = pin_dir.join(format!("{id}-{suffix}"));
            if pin.exists() {
                continue; // adopted from a previous run
            }
            let link_id = attach_one(bpf, name, &file, kind)?;
            let prog = program::<CgroupSkb>(bpf, name)?;
            let link = prog.take_link(link_id).map_err(|source| DatapathError::Program { name, source })?;
            let fd_link = FdLink::try_from(link).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
            fd_link.pin(&pin).map_err(|e| DatapathError::Pin { path: pin.clone(), message: e.to_string() })?;
        }
        Ok(())
    }

    pub fn detach(&mut self, bpf: &mut Ebpf, cgroup: &Path) -> Result<(), DatapathError> {
        let path = resolve_cgroup(cgroup);
        let (ingress, egress) = self.attached.remove(&path).ok_or_else(|| DatapathError::NotAttached { path: path.clone() })?;
        program::<CgroupSkb>(bpf, PROG_SEG_INGRESS)?
            .detach(ingress)
            .map_err(|source| DatapathError::Program { name: PROG_SEG_INGRESS, source })?;
        program::<CgroupSkb>(bpf, PROG_SEG_EGRESS)?
            .detach(egress)
            .map_err(|source| DatapathError::Program { name: PROG_SEG_EGRESS, source })?;
        Ok(())
    }

    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        self.attached.keys().map(PathBuf::as_path)
    }
}

fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

fn resolve_cgroup(cgroup: &Path) -> PathBuf {
    if cgroup.is_absolute() && cgroup.exists() {
        return cgroup.to_path_buf();
    }
    let rel = cgroup.strip_prefix("/").unwrap_or(cgroup);
    match cgroup2_mount() {
        Some(m) => m.join(rel),
        None => cgroup.to_path_buf(),
    }
}

/// The program `name` of the object as its type `P` (cgroup_skb, the conntrack sweeper, ...).
pub(super) fn program<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    bpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn attach_one(bpf: &mut Ebpf, name: &'static str, cgroup: &File, kind: CgroupSkbAttachType) -> Result<CgroupSkbLinkId, DatapathError> {
    let prog = program::<CgroupSkb>(bpf, name)?;
    if prog.fd().is_err() {
        prog.load().map_err(|source| DatapathError::Program { name, source })?;
    }
    // bpf_link_create takes no flags (links on cgroups always coexist, as BPF_F_ALLOW_MULTI).
    prog.attach(cgroup, kind, CgroupAttachMode::Single).map_err(|source| DatapathError::Program { name, source })
}

// ---- quarantine (issue 5 builds on these) -------------------------------------------------------

/// Sets the quarantine flag of a pod's cgroup: from the next packet on, everything to or from
/// the pod is dropped (conntrack included) except traffic inside the pod and the forensics
/// exception. Takes effect when this returns.
pub fn set_quarantine(bpf: &mut Ebpf, cgroup_id: u64, value: QuarantineValue) -> Result<(), DatapathError> {
    quarantine_map(bpf)?.insert(cgroup_id, value, 0).map_err(map_err(MAP_SEG_QUARANTINE))
}

/// Clears it (no error when it was not set).
pub fn clear_quarantine(bpf: &mut Ebpf, cgroup_id: u64) -> Result<(), DatapathError> {
    remove_ok(quarantine_map(bpf)?.remove(&cgroup_id)).map_err(map_err(MAP_SEG_QUARANTINE))
}

/// Every quarantined cgroup id (e.g. adopted from pinned maps after a restart).
pub fn quarantined(bpf: &mut Ebpf) -> Result<Vec<(u64, QuarantineValue)>, DatapathError> {
    let map = quarantine_map(bpf)?;
    map.iter().map(|kv| kv.map_err(map_err(MAP_SEG_QUARANTINE))).collect()
}

fn quarantine_map(bpf: &mut Ebpf) -> Result<HashMap<&mut MapData, u64, QuarantineValue>, DatapathError> {
    HashMap::try_from(bpf.map_mut(MAP_SEG_QUARANTINE).ok_or(DatapathError::MissingMap { name: MAP_SEG_QUARANTINE })?)
        .map_err(map_err(MAP_SEG_QUARANTINE))
}

/// Forensics exception: `cidr` (16-byte form, see `lookup::addr16`) stays reachable from and to
/// quarantined pods on `port` (0 = any) and `protocol` (0 = any).
pub fn set_forensics(bpf: &mut Ebpf, key: LpmKey, value: ForensicsValue) -> Result<(), DatapathError> {
    let mut map: LpmTrie<&mut MapData, IpAddrKey, ForensicsValue> =
        LpmTrie::try_from(bpf.map_mut(MAP_SEG_FORENSICS).ok_or(DatapathError::MissingMap { name: MAP_SEG_FORENSICS })?)
            .map_err(map_err(MAP_SEG_FORENSICS))?;
    map.insert(&lpm_key(&key), value, 0).map_err(map_err(MAP_SEG_FORENSICS))
}

pub fn clear_forensics(bpf: &mut Ebpf, key: LpmKey) -> Result<(), DatapathError> {
    let mut map: LpmTrie<&mut MapData, IpAddrKey, ForensicsValue> =
        LpmTrie::try_from(bpf.map_mut(MAP_SEG_FORENSICS).ok_or(DatapathError::MissingMap { name: MAP_SEG_FORENSICS })?)
            .map_err(map_err(MAP_SEG_FORENSICS))?;
    remove_ok(map.remove(&lpm_key(&key))).map_err(map_err(MAP_SEG_FORENSICS))
}

// ---- policy_denied records ---------------------------------------------------------------------

/// The name of a drop record's path (`PolicyVerdictEvent.path`, PATH_*), as alerts and tests
/// show it.
pub fn path_name(path: u8) -> &'static str {
    match path {
        palisade_common::PATH_IP => "ip",
        palisade_common::PATH_UNPARSED => "unparsed",
        palisade_common::PATH_ND => "neighbour_discovery",
        palisade_common::PATH_RAW_SOCKET => "raw_socket",
        palisade_common::PATH_SOCKET_CREATE => "socket_create",
        palisade_common::PATH_BACKSTOP => "backstop",
        palisade_common::PATH_UNKNOWN_ENDPOINT => "unknown_endpoint",
        _ => "unknown",
    }
}

/// Decodes one SEG_EVENTS record (length checked, read unaligned).
pub fn decode_verdict(bytes: &[u8]) -> Option<PolicyVerdictEvent> {
    if bytes.len() < std::mem::size_of::<PolicyVerdictEvent>() {
        return None;
    }
    // SAFETY: length checked; PolicyVerdictEvent is repr(C) plain data, any bit pattern is valid.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PolicyVerdictEvent>()) })
}
