//! networking.k8s.io/v1 NetworkPolicy: parsing (multi-document files, directories) and validation.
//!
//! Validation follows the API server's `ValidateNetworkPolicySpec`: what it accepts is accepted,
//! what it rejects is rejected with the same field path. In particular rules of a direction that
//! an explicit `policyTypes` leaves out are valid and have no effect: they are validated, then
//! dropped with a warning naming the policy and the field (`NetworkPolicy::ignored`).
//!
//! Errors name the file, the document index (1-based) and the field, e.g.
//! `policies/x.yaml: document 2: spec.ingress[0].ports[1].endPort: must be >= port`.
//! [`PolicySet::load_each`] loads every valid document and reports each rejected one (or each
//! file that cannot be read or is not YAML) on its own, so one bad policy never stops the others;
//! the daemon keeps the last good version of what was rejected. [`PolicySet::load`] is the
//! strict form (the first error) for offline tools.
//!
//! Limits, checked before the costly step they guard (each a named constant below, documented in
//! DEVELOPERS.md): file size before reading, YAML nesting depth before parsing
//! ([`crate::yaml`]), per-policy budgets of ipBlock prefixes and datapath entries at
//! validation, and the set's budgets while loading (a policy that tips the set is rejected on its
//! own). In a directory, every entry that is not loaded is reported in [`Loaded::skipped`] with
//! the reason (a `.YAML` file is loaded: extensions match in any case; a byte-order mark is
//! accepted).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::inventory::{Labels, Protocol};

/// The largest policy file read (Kubernetes itself keeps one object under about 1.5 MiB).
pub const MAX_POLICY_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// The most bytes of policy files one load reads (all files of all paths together).
pub const MAX_POLICY_LOAD_BYTES: u64 = 64 * 1024 * 1024;
/// The most ipBlock prefixes (`cidr` plus `except`) one policy may have.
pub const MAX_POLICY_PREFIXES: usize = 16_384;
/// The most datapath entries one policy may need for each pod it selects: over its rules, peers
/// times port blocks (a port range takes one entry per aligned block, up to 32). 50,000 ipBlocks
/// on a port range need 800,000 per pod (compiling them for the 5-pod example took minutes and
/// hundreds of MB); such a policy is refused here, before compiling.
pub const MAX_POLICY_ENTRIES: usize = 65_536;
/// The set's budget of datapath entries (each policy's per-pod entries, summed): the POLICY
/// map's size. A policy that tips the set past it is rejected on its own.
pub const MAX_SET_ENTRIES: usize = palisade_common::SEG_MAX_POLICY as usize;
/// The set's budget of ipBlock prefixes: the IPCACHE map's size.
pub const MAX_SET_PREFIXES: usize = palisade_common::SEG_MAX_IPCACHE as usize;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {message}")]
    Parse { path: PathBuf, document: usize, message: String },
    #[error("{path}: document {document}: {field}: {message}")]
    Invalid { path: PathBuf, document: usize, field: String, message: String },
    #[error("{path}: document {document}: duplicate policy {namespace}/{name} (first in {first})")]
    Duplicate { path: PathBuf, document: usize, namespace: String, name: String, first: String },
    /// Past a limit checked before reading or parsing (file size, load size, nesting depth).
    #[error("{path}: {source}")]
    Limit {
        path: PathBuf,
        #[source]
        source: crate::yaml::YamlInputError,
    },
    #[error("{path}: document {document}: policy {policy} does not fit the set's budget: {message}")]
    SetBudget { path: PathBuf, document: usize, policy: String, message: String },
}

// ---- wire (YAML) types -------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkPolicyDoc {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<SpecDoc>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_norway::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
    // other metadata (labels, annotations, uid, ...) is accepted and ignored
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecDoc {
    pod_selector: Option<SelectorDoc>,
    ingress: Option<Vec<IngressDoc>>,
    egress: Option<Vec<EgressDoc>>,
    policy_types: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressDoc {
    from: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressDoc {
    to: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerDoc {
    pod_selector: Option<SelectorDoc>,
    namespace_selector: Option<SelectorDoc>,
    ip_block: Option<IpBlockDoc>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlockDoc {
    cidr: String,
    except: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortDoc {
    protocol: Option<String>,
    port: Option<IntOrString>,
    end_port: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SelectorDoc {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<RequirementDoc>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequirementDoc {
    key: String,
    operator: String,
    values: Option<Vec<String>>,
}

// ---- validated model ----------------------------------------------------------------------------

/// A label selector (matchLabels AND every matchExpression). Empty selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => !value.is_some_and(|v| r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        write!(f, "{{{}}}", parts.join(", "))
    }
}

/// An IPv4 or IPv6 prefix, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (address/length)"))?;
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = l.parse().ok().filter(|l| *l <= max).ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?;
        Ok(Cidr { addr: mask(addr, len), len })
    }

    /// The 16-byte form (v4-mapped for IPv4) and its prefix length in that form.
    pub fn mapped(&self) -> ([u8; 16], u32) {
        match self.addr {
            IpAddr::V4(v4) => (palisade_common::v4_mapped(v4.octets()), 96 + self.len as u32),
            IpAddr::V6(v6) => (v6.octets(), self.len as u32),
        }
    }

    pub fn contains_cidr(&self, other: &Cidr) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4() && other.len >= self.len && mask(other.addr, self.len) == self.addr
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.contains_cidr(&Cidr::host(ip))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len as u32) };
            IpAddr::V4((bits & m).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if len == 0 { 0 } else { u128::MAX << (128 - len as u32) };
            IpAddr::V6((bits & m).into())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// podSelector and/or namespaceSelector. `namespace_selector: None` means the policy's own
    /// namespace; `pod_selector: None` means every pod of the selected namespaces.
    Pods { pod_selector: Option<Selector>, namespace_selector: Option<Selector> },
    IpBlock(IpBlock),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any,
    Number(u16),
    Range(u16, u16),
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPort {
    pub protocol: Protocol,
    pub port: PortSpec,
}

impl fmt::Display for PolicyPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            PortSpec::Any => write!(f, "{} (any port)", self.protocol),
            PortSpec::Number(p) => write!(f, "{}/{p}", self.protocol),
            PortSpec::Range(a, b) => write!(f, "{}/{a}-{b}", self.protocol),
            PortSpec::Named(n) => write!(f, "{}/{n}", self.protocol),
        }
    }
}

/// One ingress or egress rule: empty `peers` = every peer, empty `ports` = every port/protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Effective policyTypes (defaults applied).
    pub ingress_isolation: bool,
    pub egress_isolation: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
    /// Where it came from: `file: document N`.
    pub source: String,
    /// Fields that are valid but have no effect (rules of a direction `policyTypes` leaves out),
    /// as warnings naming the policy and the field.
    pub ignored: Vec<String>,
}

impl NetworkPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What the policy costs the datapath, counted from its rules alone (see
    /// [`MAX_POLICY_ENTRIES`] and [`MAX_POLICY_PREFIXES`]).
    pub fn budget(&self) -> Budget {
        let mut budget = Budget::default();
        for rule in self.ingress.iter().chain(&self.egress) {
            budget.add(&Budget::of_rule(rule));
        }
        budget
    }
}

/// A shared policy keyed by its namespace and name (duplicate checks without formatting keys).
struct ByKey(Arc<NetworkPolicy>);

impl PartialEq for ByKey {
    fn eq(&self, other: &ByKey) -> bool {
        self.0.namespace == other.0.namespace && self.0.name == other.0.name
    }
}

impl Eq for ByKey {}

impl std::hash::Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.namespace.hash(state);
        self.0.name.hash(state);
    }
}

/// A policy's cost in datapath entries (per selected pod) and ipBlock prefixes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub entries: usize,
    pub prefixes: usize,
}

impl Budget {
    pub fn of_rule(rule: &Rule) -> Budget {
        let prefixes = rule
            .peers
            .iter()
            .map(|p| match p {
                Peer::IpBlock(b) => 1 + b.except.len(),
                Peer::Pods { .. } => 0,
            })
            .sum();
        let port_entries: usize = rule
            .ports
            .iter()
            .map(|p| match p.port {
                PortSpec::Range(a, b) => super::compile::port_blocks(a, b).len(),
                _ => 1,
            })
            .sum();
        Budget { entries: rule.peers.len().max(1).saturating_mul(port_entries.max(1)), prefixes }
    }

    pub fn add(&mut self, other: &Budget) {
        self.entries = self.entries.saturating_add(other.entries);
        self.prefixes = self.prefixes.saturating_add(other.prefixes);
    }
}

/// A validated set of policies (every document of every path given).
///
/// Each policy is shared (`Arc`): a new set made from an older one (a file reload that read
/// one file, a watch event about one object) shares every unchanged policy with it, so handing
/// a set over costs a pointer per policy and the compiler tells the changed ones apart by
/// pointer before it compares contents (issue 17).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<Arc<NetworkPolicy>>,
}

/// One document (or a whole file) that was not loaded, and why.
#[derive(Debug)]
pub struct Rejected {
    pub file: PathBuf,
    /// `namespace/name` when the document names a policy; None when the whole file was rejected
    /// (unreadable, or not YAML: its documents cannot be told apart).
    pub policy: Option<String>,
    pub error: PolicyError,
}

/// A directory entry that was not loaded, and why (an explicit, reported ignore: nothing in a
/// policy directory is passed over silently).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: skipped: {}", self.file.display(), self.reason)
    }
}

/// What loading gives: every valid policy, every rejected document or file, and every
/// directory entry skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    pub set: PolicySet,
    pub rejected: Vec<Rejected>,
    pub skipped: Vec<Skipped>,
}

impl Loaded {
    /// The set with the last good version of each rejected policy put back from `previous`:
    /// a policy whose document was rejected keeps its previous version (by namespace/name); a
    /// file rejected as a whole keeps every previous policy that came from it. Returns the set
    /// and the keys of the policies kept that way. The valid set moves out of `self` (a reload
    /// of 10,000 policies does not copy them).
    pub fn with_last_good(&mut self, previous: &PolicySet) -> (PolicySet, Vec<String>) {
        let mut set = std::mem::take(&mut self.set);
        let mut kept = Vec::new();
        for r in &self.rejected {
            let prefix = format!("{}: document ", r.file.display());
            for p in &previous.policies {
                let wanted = match &r.policy {
                    Some(key) => &p.key() == key,
                    None => p.source.starts_with(&prefix),
                };
                if wanted && !set.policies.iter().any(|q| q.namespace == p.namespace && q.name == p.name) {
                    kept.push(p.key());
                    set.policies.push(p.clone());
                }
            }
        }
        (set, kept)
    }
}

/// The policies of each file that loaded cleanly, by path, with the file's identity when read
/// (see [`PolicySet::load_each_cached`]), and each directory's entries as last listed (see
/// [`PolicySet::load_dir_changed`]).
#[derive(Debug, Clone, Default)]
pub struct PolicyFileCache {
    files: std::collections::HashMap<PathBuf, CachedFile>,
    /// Per directory loaded: its entries in order, as the last listing found them and the
    /// changes reported since left them.
    listings: std::collections::HashMap<PathBuf, BTreeMap<PathBuf, Listed>>,
}

#[derive(Debug, Clone)]
struct CachedFile {
    stamp: FileStamp,
    size: u64,
    policies: Vec<Arc<NetworkPolicy>>,
}

/// One directory entry as a listing classified it.
#[derive(Debug, Clone)]
enum Listed {
    /// A YAML file, loaded; its stamp when listed.
    Yaml(FileStamp),
    /// Not loaded (the reason is reported at every load).
    Skipped(String),
    /// A mounted ConfigMap's own sub-directory (`..data`, `..<timestamp>`): silent.
    Silent,
}

impl Listed {
    /// Classifies a directory entry with one stat (following a symlink, as a mounted
    /// ConfigMap's files are); the stamp is taken before any read, so a change in between only
    /// makes the next load read the file again.
    fn of(entry: &Path) -> Listed {
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let meta = std::fs::metadata(entry).ok();
        if meta.as_ref().is_some_and(|m| m.is_dir()) {
            return if name.starts_with("..") {
                Listed::Silent
            } else {
                Listed::Skipped("a directory (policy directories are not read recursively)".into())
            };
        }
        let yaml = entry.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        match meta {
            Some(meta) if meta.is_file() && yaml => Listed::Yaml(FileStamp::of(&meta)),
            Some(meta) if meta.is_file() => Listed::Skipped("not a .yaml or .yml file".into()),
            _ => Listed::Skipped("not a regular file".into()),
        }
    }
}

/// What tells a file's versions apart without reading it: device, inode (a rename or a
/// ConfigMap's symlink swap is a new inode), size, and the modification and change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt as _;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether a later write is sure to change the stamp: file times advance in clock ticks,
    /// so a write in the tick of the last one may leave size and times as they were. A file
    /// changed within the last second is read again at the next load, not taken from the cache.
    fn settled(&self) -> bool {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        now - self.mtime_ns.max(self.ctime_ns) > 1_000_000_000
    }
}

/// One file to load: its path, its stamp, whether it came from a directory, and whether it must
/// be read whatever the cache holds (a change was reported for it).
struct FileToLoad {
    path: PathBuf,
    stamp: FileStamp,
    from_dir: bool,
    changed: bool,
}

impl PolicySet {
    /// Loads files and directories (`*.yaml`, `*.yml`, sorted, not recursive); strict: the
    /// first error (offline tools; the daemon uses `load_each`).
    pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<PolicySet, PolicyError> {
        let loaded = PolicySet::load_each(paths);
        match loaded.rejected.into_iter().next() {
            Some(r) => Err(r.error),
            None => Ok(loaded.set),
        }
    }

    /// Loads every valid document of every path; each unreadable file, non-YAML file, invalid
    /// document and duplicate is reported in `rejected` and the rest still loads.
    pub fn load_each<P: AsRef<Path>>(paths: &[P]) -> Loaded {
        PolicySet::load_each_cached(paths, &mut PolicyFileCache::default())
    }

    /// [`PolicySet::load_each`], reading and parsing again only the files that changed since
    /// `cache` saw them (a reload after one file changed reads one file); the checks across
    /// files (duplicates, budgets, the load's byte limit) run over every file as before. Lists
    /// every directory again (a stat per entry) and keeps the listing for
    /// [`PolicySet::load_dir_changed`].
    pub fn load_each_cached<P: AsRef<Path>>(paths: &[P], cache: &mut PolicyFileCache) -> Loaded {
        let mut loaded = Loaded::default();
        let mut files = Vec::new();
        let mut listings = std::collections::HashMap::new();
        for path in paths {
            let path = path.as_ref();
            let reject = |source| Rejected { file: path.to_path_buf(), policy: None, error: PolicyError::Read { path: path.to_path_buf(), source } };
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(source) => {
                    loaded.rejected.push(reject(source));
                    continue;
                }
            };
            if meta.is_dir() {
                let entries = match std::fs::read_dir(path) {
                    Ok(entries) => entries,
                    Err(source) => {
                        loaded.rejected.push(reject(source));
                        continue;
                    }
                };
                let mut listing: BTreeMap<PathBuf, Listed> = BTreeMap::new();
                let mut complete = true;
                for entry in entries {
                    match entry {
                        Ok(entry) => {
                            let entry = entry.path();
                            let listed = Listed::of(&entry);
                            listing.insert(entry, listed);
                        }
                        Err(source) => {
                            complete = false;
                            loaded.rejected.push(reject(source));
                        }
                    }
                }
                files.extend(PolicySet::listed_files(&listing, &mut loaded, &[]));
                // An incomplete listing is not a base for later changes.
                if complete {
                    listings.insert(path.to_path_buf(), listing);
                }
            } else {
                files.push(FileToLoad { path: path.to_path_buf(), stamp: FileStamp::of(&meta), from_dir: false, changed: false });
            }
        }
        let listed: std::collections::HashSet<&PathBuf> = files.iter().map(|f| &f.path).collect();
        cache.files.retain(|path, _| listed.contains(path));
        cache.listings = listings;
        PolicySet::load_files(files, cache, loaded)
    }

    /// A reload of one directory loaded before with [`PolicySet::load_each_cached`] after
    /// changes to the entries `changed` (what the directory watcher reported): only those are
    /// looked at again (a stat each) and read; every other entry is as listed, its policies
    /// from the cache (a file the cache does not hold, rejected or changed within the last
    /// second, is read again, as in a full load). The result equals a full load's. None when
    /// the changes are not all direct entries of `dir` (a sub-directory, a mounted ConfigMap's
    /// `..data` swap) or `dir` has no listing: the caller loads in full then.
    pub fn load_dir_changed(dir: &Path, changed: &[PathBuf], cache: &mut PolicyFileCache) -> Option<Loaded> {
        let listing = cache.listings.get_mut(dir)?;
        // The watcher names paths below the absolute form of the directory; the listing is
        // keyed as the directory was given.
        let absolute = std::path::absolute(dir).ok();
        let mut entries = Vec::with_capacity(changed.len());
        for path in changed {
            let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else { return None };
            if !(parent == dir || Some(parent) == absolute.as_deref()) || name.to_string_lossy().starts_with("..") {
                return None;
            }
            entries.push(dir.join(name));
        }
        let changed = &entries[..];
        for path in changed {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    listing.remove(path);
                    cache.files.remove(path);
                }
                _ => match Listed::of(path) {
                    Listed::Silent => return None,
                    listed => {
                        listing.insert(path.clone(), listed);
                    }
                },
            }
        }
        let mut loaded = Loaded::default();
        let listing = cache.listings.get(dir)?;
        let files = PolicySet::listed_files(listing, &mut loaded, changed);
        Some(PolicySet::load_files(files, cache, loaded))
    }

    /// The YAML files of a listing in order (the others reported as skipped).
    fn listed_files(listing: &BTreeMap<PathBuf, Listed>, loaded: &mut Loaded, changed: &[PathBuf]) -> Vec<FileToLoad> {
        let mut files = Vec::with_capacity(listing.len());
        for (path, listed) in listing {
            match listed {
                Listed::Yaml(stamp) => files.push(FileToLoad { path: path.clone(), stamp: *stamp, from_dir: true, changed: false }),
                Listed::Skipped(reason) => loaded.skipped.push(Skipped { file: path.clone(), reason: reason.clone() }),
                Listed::Silent => {}
            }
        }
        // In the listing's order: found by binary search (a burst names a few of 10,000).
        for path in changed {
            if let Ok(at) = files.binary_search_by(|f| f.path.cmp(path)) {
                files[at].changed = true;
            }
        }
        files
    }

    /// Loads `files` in order, from the cache where it holds the same version: every valid
    /// policy once (a duplicate is rejected), within the set's budgets and the load's byte limit.
    fn load_files(files: Vec<FileToLoad>, cache: &mut PolicyFileCache, mut loaded: Loaded) -> Loaded {
        // By (namespace, name) of the shared policies themselves: no key formatted per policy.
        let mut seen: std::collections::HashMap<ByKey, usize> = std::collections::HashMap::with_capacity(files.len());
        let mut read_bytes = 0u64;
        let mut set_budget = Budget::default();
        for FileToLoad { path: file, stamp, from_dir, changed } in files {
            let cached = cache.files.get(&file).filter(|c| !changed && c.stamp == stamp);
            let policies = match cached {
                Some(c) if read_bytes + c.size <= MAX_POLICY_LOAD_BYTES => {
                    read_bytes += c.size;
                    c.policies.clone()
                }
                _ => {
                    cache.files.remove(&file);
                    let Some((policies, size)) = PolicySet::read_file(&file, from_dir, &mut read_bytes, &mut loaded) else { continue };
                    // Only a file that loaded cleanly is kept (a rejection is told again at every load).
                    if let (Some(size), true) = (size, stamp.settled()) {
                        cache.files.insert(file.clone(), CachedFile { stamp, size, policies: policies.clone() });
                    }
                    policies
                }
            };
            for p in policies {
                if let Some(first) = seen.get(&ByKey(p.clone())).map(|&i| &loaded.set.policies[i]) {
                    let document = p.source.rsplit_once("document ").and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
                    let error = PolicyError::Duplicate {
                        path: file.clone(),
                        document,
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        first: first.source.clone(),
                    };
                    // The first one stays in force; the duplicate is what is rejected.
                    loaded.rejected.push(Rejected { file: file.clone(), policy: Some(p.key()), error });
                    continue;
                }
                if let Err(error) = admit(&mut set_budget, &p, &file) {
                    loaded.rejected.push(Rejected { file: file.clone(), policy: Some(p.key()), error });
                    continue;
                }
                seen.insert(ByKey(p.clone()), loaded.set.policies.len());
                loaded.set.policies.push(p);
            }
        }
        loaded
    }

    /// Reads, checks and parses one policy file, counting its bytes against the load's limit.
    /// What it rejects or skips goes into `loaded`; None when nothing of the file loads. The
    /// size is given when every document of the file was valid (so it may be cached).
    fn read_file(file: &Path, from_dir: bool, read_bytes: &mut u64, loaded: &mut Loaded) -> Option<(Vec<Arc<NetworkPolicy>>, Option<u64>)> {
        let whole_file = |error| Rejected { file: file.to_path_buf(), policy: None, error };
        let remaining = MAX_POLICY_LOAD_BYTES.saturating_sub(*read_bytes);
        let text = match crate::yaml::read_limited(file, MAX_POLICY_FILE_BYTES.min(remaining)) {
            Ok(text) => text,
            Err(crate::yaml::YamlInputError::Read(source)) => {
                loaded.rejected.push(whole_file(PolicyError::Read { path: file.to_path_buf(), source }));
                return None;
            }
            Err(crate::yaml::YamlInputError::TooLarge { size, limit }) if limit < MAX_POLICY_FILE_BYTES => {
                let source = std::io::Error::other(format!(
                    "{size} bytes would take this load past the {MAX_POLICY_LOAD_BYTES} bytes one load of policy files may read"
                ));
                loaded.rejected.push(whole_file(PolicyError::Read { path: file.to_path_buf(), source }));
                return None;
            }
            Err(source) => {
                loaded.rejected.push(whole_file(PolicyError::Limit { path: file.to_path_buf(), source }));
                return None;
            }
        };
        *read_bytes += text.len() as u64;
        let size = text.len() as u64;
        let text = crate::yaml::strip_bom(&text);
        // Before anything parses it (also the look for Kubernetes objects below).
        if let Err(source) = crate::yaml::check(text, MAX_POLICY_FILE_BYTES) {
            loaded.rejected.push(whole_file(PolicyError::Limit { path: file.to_path_buf(), source }));
            return None;
        }
        if from_dir && !looks_like_k8s_objects(text) {
            // e.g. an endpoint inventory kept beside the policies: not ours to judge, but
            // reported (never passed over silently).
            loaded.skipped.push(Skipped {
                file: file.to_path_buf(),
                reason: "no document has kind or apiVersion (not a Kubernetes object, e.g. an inventory)".into(),
            });
            return None;
        }
        let (policies, rejected) = PolicySet::parse_each(text, file);
        let clean = rejected.is_empty();
        loaded.rejected.extend(rejected);
        Some((policies.into_iter().map(Arc::new).collect(), clean.then_some(size)))
    }

    /// Parses one (multi-document) YAML text; `path` only names the source in errors. Strict:
    /// the first error.
    pub fn parse(text: &str, path: &Path) -> Result<PolicySet, PolicyError> {
        let (policies, rejected) = PolicySet::parse_each(text, path);
        if let Some(r) = rejected.into_iter().next() {
            return Err(r.error);
        }
        let mut set = PolicySet::default();
        let mut set_budget = Budget::default();
        for p in policies {
            admit(&mut set_budget, &p, path)?;
            if let Some(first) = set.policies.iter().find(|q| q.namespace == p.namespace && q.name == p.name) {
                let document = p.source.rsplit_once("document ").and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
                return Err(PolicyError::Duplicate {
                    path: path.to_path_buf(),
                    document,
                    namespace: p.namespace,
                    name: p.name,
                    first: first.source.clone(),
                });
            }
            set.policies.push(Arc::new(p));
        }
        Ok(set)
    }

    /// Every valid document of one text, and each invalid one on its own. A text that is not
    /// YAML at all is rejected as a whole (its documents cannot be told apart reliably).
    fn parse_each(text: &str, path: &Path) -> (Vec<NetworkPolicy>, Vec<Rejected>) {
        let mut policies = Vec::new();
        let mut rejected = Vec::new();
        let text = crate::yaml::strip_bom(text);
        if let Err(source) = crate::yaml::check(text, MAX_POLICY_FILE_BYTES) {
            let error = PolicyError::Limit { path: path.to_path_buf(), source };
            return (Vec::new(), vec![Rejected { file: path.to_path_buf(), policy: None, error }]);
        }
        // First pass, untyped: the YAML syntax of the whole text and each document's name.
        let mut names = Vec::new();
        for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            match serde_norway::Value::deserialize(document) {
                Ok(value) => names.push(document_key(&value)),
                Err(e) => {
                    let error = PolicyError::Parse { path: path.to_path_buf(), document: i + 1, message: e.to_string() };
                    return (Vec::new(), vec![Rejected { file: path.to_path_buf(), policy: None, error }]);
                }
            }
        }
        // Second pass, typed: errors keep serde_norway's line and column.
        for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
            let index = i + 1;
            let policy_key = names.get(i).cloned().flatten();
            let reject = |error| Rejected { file: path.to_path_buf(), policy: policy_key.clone(), error };
            let doc = match Option::<NetworkPolicyDoc>::deserialize(document) {
                Ok(Some(doc)) => doc,
                Ok(None) => continue,
                Err(e) => {
                    rejected.push(reject(PolicyError::Parse { path: path.to_path_buf(), document: index, message: e.to_string() }));
                    continue;
                }
            };
            match validate(doc, &format!("{}: document {index}", path.display())) {
                Ok(policy) => policies.push(policy),
                Err((field, message)) => {
                    rejected.push(reject(PolicyError::Invalid { path: path.to_path_buf(), document: index, field, message }))
                }
            }
        }
        (policies, rejected)
    }
}

/// Adds a policy to the set's running budget, or says why it does not fit (the set stays as it
/// was).
fn admit(set: &mut Budget, policy: &NetworkPolicy, path: &Path) -> Result<(), PolicyError> {
    let mut after = *set;
    after.add(&policy.budget());
    let message = if after.entries > MAX_SET_ENTRIES {
        format!("the set would need {} datapath entries per selected pod, more than the {MAX_SET_ENTRIES} the POLICY map holds", after.entries)
    } else if after.prefixes > MAX_SET_PREFIXES {
        format!("the set would have {} ipBlock prefixes, more than the {MAX_SET_PREFIXES} the IPCACHE map holds", after.prefixes)
    } else {
        *set = after;
        return Ok(());
    };
    let document = policy.source.rsplit_once("document ").and_then(|(_, n)| n.parse().ok()).unwrap_or(0);
    Err(PolicyError::SetBudget { path: path.to_path_buf(), document, policy: policy.key(), message })
}

/// `namespace/name` of a document that names itself (namespace defaulting to `default`).
fn document_key(value: &serde_norway::Value) -> Option<String> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let namespace = meta.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    Some(format!("{namespace}/{name}"))
}

/// True when some document of the text is a mapping with `kind` or `apiVersion` (or the text
/// does not parse, so that the parser reports the error).
fn looks_like_k8s_objects(text: &str) -> bool {
    for document in serde_norway::Deserializer::from_str(text) {
        match serde_norway::Value::deserialize(document) {
            Ok(serde_norway::Value::Mapping(m)) => {
                if m.contains_key("kind") || m.contains_key("apiVersion") {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    false
}

type Invalid = (String, String);

fn validate(doc: NetworkPolicyDoc, source: &str) -> Result<NetworkPolicy, Invalid> {
    let inv = |f: &str, m: String| (f.to_string(), m);
    match doc.api_version.as_deref() {
        Some("networking.k8s.io/v1") => {}
        Some(other) => return Err(inv("apiVersion", format!("{other:?}: expected networking.k8s.io/v1"))),
        None => return Err(inv("apiVersion", "missing (expected networking.k8s.io/v1)".into())),
    }
    match doc.kind.as_deref() {
        Some("NetworkPolicy") => {}
        Some(other) => return Err(inv("kind", format!("{other:?}: expected NetworkPolicy"))),
        None => return Err(inv("kind", "missing (expected NetworkPolicy)".into())),
    }
    let name = doc.metadata.name.ok_or_else(|| inv("metadata.name", "missing".into()))?;
    check_dns(&name, 253).map_err(|m| inv("metadata.name", m))?;
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".to_string());
    check_dns(&namespace, 63).map_err(|m| inv("metadata.namespace", m))?;
    let spec = doc.spec.ok_or_else(|| inv("spec", "missing".into()))?;
    let pod_selector = selector(spec.pod_selector.unwrap_or_default(), "spec.podSelector")?;
    let ingress_docs = spec.ingress.unwrap_or_default();
    let egress_docs = spec.egress.unwrap_or_default();
    // Rules are validated whatever policyTypes says (as the API server does), in its order.
    let mut ingress = Vec::new();
    for (i, r) in ingress_docs.into_iter().enumerate() {
        ingress.push(rule(r.from, r.ports, &format!("spec.ingress[{i}]"), "from")?);
    }
    let mut egress = Vec::new();
    for (i, r) in egress_docs.into_iter().enumerate() {
        egress.push(rule(r.to, r.ports, &format!("spec.egress[{i}]"), "to")?);
    }
    // The policy's budgets, naming the rule that tips it (before anything compiles it).
    let mut budget = Budget::default();
    let rules = ingress.iter().enumerate().map(|(i, r)| (format!("spec.ingress[{i}]"), r));
    for (at, r) in rules.chain(egress.iter().enumerate().map(|(i, r)| (format!("spec.egress[{i}]"), r))) {
        budget.add(&Budget::of_rule(r));
        if budget.entries > MAX_POLICY_ENTRIES {
            return Err(inv(&at, format!(
                "the policy needs {} datapath entries per selected pod up to here (peers times port blocks), more than the {MAX_POLICY_ENTRIES} a policy may have: split it",
                budget.entries
            )));
        }
        if budget.prefixes > MAX_POLICY_PREFIXES {
            return Err(inv(&at, format!("the policy has {} ipBlock prefixes (cidr and except) up to here, more than the {MAX_POLICY_PREFIXES} a policy may have", budget.prefixes)));
        }
    }
    let (ingress_isolation, egress_isolation) = match spec.policy_types.as_deref() {
        // Missing or empty: Ingress always, Egress when there are egress rules (the API
        // server's defaulting).
        None | Some([]) => (true, !egress.is_empty()),
        Some(types) => {
            if types.len() > 2 {
                return Err(inv("spec.policyTypes", format!("{types:?}: may not specify more than two policyTypes")));
            }
            let mut ing = false;
            let mut eg = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ing = true,
                    "Egress" => eg = true,
                    other => {
                        return Err(inv(&format!("spec.policyTypes[{i}]"), format!("{other:?}: supported values: \"Ingress\", \"Egress\"")));
                    }
                }
            }
            (ing, eg)
        }
    };
    let key = format!("{namespace}/{name}");
    let mut ignored = Vec::new();
    if !ingress_isolation && !ingress.is_empty() {
        ignored.push(format!(
            "{key} ({source}): spec.ingress: {} rule(s) have no effect: policyTypes does not include Ingress",
            ingress.len()
        ));
        ingress.clear();
    }
    if !egress_isolation && !egress.is_empty() {
        ignored.push(format!(
            "{key} ({source}): spec.egress: {} rule(s) have no effect: policyTypes does not include Egress",
            egress.len()
        ));
        egress.clear();
    }
    Ok(NetworkPolicy {
        namespace,
        name,
        pod_selector,
        ingress_isolation,
        egress_isolation,
        ingress,
        egress,
        source: source.to_string(),
        ignored,
    })
}

fn rule(peers: Option<Vec<PeerDoc>>, ports: Option<Vec<PortDoc>>, at: &str, peers_field: &str) -> Result<Rule, Invalid> {
    let mut out = Rule { peers: Vec::new(), ports: Vec::new() };
    for (i, p) in peers.unwrap_or_default().into_iter().enumerate() {
        let f = format!("{at}.{peers_field}[{i}]");
        let peer = match (p.ip_block, p.pod_selector, p.namespace_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err((f, "ipBlock cannot be combined with podSelector or namespaceSelector".into()));
            }
            (Some(b), None, None) => Peer::IpBlock(ip_block(b, &format!("{f}.ipBlock"))?),
            (None, None, None) => {
                return Err((f, "must specify podSelector, namespaceSelector or ipBlock".into()));
            }
            (None, pod, ns) => Peer::Pods {
                pod_selector: pod.map(|s| selector(s, &format!("{f}.podSelector"))).transpose()?,
                namespace_selector: ns.map(|s| selector(s, &format!("{f}.namespaceSelector"))).transpose()?,
            },
        };
        out.peers.push(peer);
    }
    for (i, p) in ports.unwrap_or_default().into_iter().enumerate() {
        let f = format!("{at}.ports[{i}]");
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => return Err((format!("{f}.protocol"), format!("{other:?}: expected TCP, UDP or SCTP"))),
        };
        let port = match (p.port, p.end_port) {
            (None, None) => PortSpec::Any,
            (None, Some(_)) => return Err((format!("{f}.endPort"), "requires port".into())),
            (Some(IntOrString::Int(n)), end) => {
                let port = u16::try_from(n).ok().filter(|p| *p >= 1).ok_or_else(|| (format!("{f}.port"), format!("{n}: must be 1-65535")))?;
                match end {
                    None => PortSpec::Number(port),
                    Some(e) => {
                        let end = u16::try_from(e).ok().filter(|p| *p >= 1).ok_or_else(|| (format!("{f}.endPort"), format!("{e}: must be 1-65535")))?;
                        if end < port {
                            return Err((format!("{f}.endPort"), "must be >= port".into()));
                        }
                        if end == port { PortSpec::Number(port) } else { PortSpec::Range(port, end) }
                    }
                }
            }
            (Some(IntOrString::Str(s)), end) => {
                if end.is_some() {
                    return Err((format!("{f}.endPort"), "not allowed with a named port".into()));
                }
                if let Ok(n) = s.parse::<u16>() {
                    // "80" as a string: Kubernetes rejects it; so do we, with the reason.
                    return Err((format!("{f}.port"), format!("{n:?} is a number written as a string; write port: {n}")));
                }
                if let Err(why) = check_port_name(&s) {
                    return Err((format!("{f}.port"), format!("{s:?}: {why}")));
                }
                PortSpec::Named(s)
            }
        };
        out.ports.push(PolicyPort { protocol, port });
    }
    Ok(out)
}

fn ip_block(b: IpBlockDoc, at: &str) -> Result<IpBlock, Invalid> {
    let cidr = Cidr::parse(&b.cidr).map_err(|m| (format!("{at}.cidr"), m))?;
    let mut except = Vec::new();
    for (i, e) in b.except.unwrap_or_default().iter().enumerate() {
        let f = format!("{at}.except[{i}]");
        let c = Cidr::parse(e).map_err(|m| (f.clone(), m))?;
        if !cidr.contains_cidr(&c) || c.len <= cidr.len {
            return Err((f, format!("{c} must be strictly inside {cidr}")));
        }
        except.push(c);
    }
    Ok(IpBlock { cidr, except })
}

fn selector(s: SelectorDoc, at: &str) -> Result<Selector, Invalid> {
    let mut out = Selector::default();
    for (k, v) in s.match_labels.unwrap_or_default() {
        crate::inventory::validate_label(&k, &v).map_err(|m| (format!("{at}.matchLabels"), format!("{k:?}: {m}")))?;
        out.match_labels.insert(k, v);
    }
    for (i, r) in s.match_expressions.unwrap_or_default().into_iter().enumerate() {
        let f = format!("{at}.matchExpressions[{i}]");
        crate::inventory::validate_label(&r.key, "").map_err(|m| (format!("{f}.key"), m))?;
        let operator = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => return Err((format!("{f}.operator"), format!("{other:?}: expected In, NotIn, Exists or DoesNotExist"))),
        };
        let values = r.values.unwrap_or_default();
        for (j, v) in values.iter().enumerate() {
            crate::inventory::validate_label(&r.key, v).map_err(|m| (format!("{f}.values[{j}]"), m))?;
        }
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err((format!("{f}.values"), "must be non-empty for In and NotIn".into()));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err((format!("{f}.values"), "must be empty for Exists and DoesNotExist".into()));
            }
            _ => {}
        }
        out.match_expressions.push(Requirement { key: r.key, operator, values });
    }
    Ok(out)
}

/// The API server's IsValidPortName (an IANA_SVC_NAME).
fn check_port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be no more than 15 characters");
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if s.contains("--") {
        return Err("must not contain consecutive hyphens");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not begin or end with a hyphen");
    }
    Ok(())
}

fn check_dns(s: &str, max: usize) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        });
    if ok { Ok(()) } else { Err(format!("{s:?} is not a valid DNS name")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n    - port: 81\n      endPort: 90\n";

    #[test]
    fn error_names_file_document_and_field() {
        let text = format!("{GOOD}---\n{}", GOOD.replace("endPort: 90", "endPort: 70").replace("name: a", "name: b"));
        let err = PolicySet::parse(&text, Path::new("policies/x.yaml")).unwrap_err().to_string();
        assert_eq!(err, "policies/x.yaml: document 2: spec.ingress[0].ports[1].endPort: must be >= port");
    }

    #[test]
    fn defaults_and_semantics() {
        let set = PolicySet::parse(GOOD, Path::new("p.yaml")).expect("valid");
        let p = &set.policies[0];
        assert!(p.ingress_isolation && !p.egress_isolation);
        assert_eq!(p.ingress[0].ports[1].port, PortSpec::Range(81, 90));
        assert_eq!(p.ingress[0].ports[0].protocol, Protocol::Tcp);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_rejected() {
        for (from, to, want) in [
            ("  podSelector: {}", "  podSelectr: {}", "unknown field"),
            ("    - port: 80", "    - port: 80\n      protocol: ICMP", "spec.ingress[0].ports[0].protocol"),
            ("  podSelector: {}", "  podSelector: {matchExpressions: [{key: a, operator: In}]}", "spec.podSelector.matchExpressions[0].values"),
            ("  ingress:\n", "  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]\n", "spec.ingress[0].from[0].ipBlock.except[0]"),
            ("kind: NetworkPolicy", "kind: Pod", "kind"),
        ] {
            let text = GOOD.replace(from, to);
            let err = PolicySet::parse(&text, Path::new("p.yaml")).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
    }

    /// Issue 17, defect 2: the API server accepts rules of a direction policyTypes leaves out
    /// (they have no effect); so do we, with a warning naming the policy and field.
    #[test]
    fn rules_of_an_unlisted_policy_type_are_valid_and_ignored() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-in, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {}}]}]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}, {ports: [{port: 53, protocol: UDP}]}]\n";
        let set = PolicySet::parse(text, Path::new("p.yaml")).expect("valid, as the API server says");
        let p = &set.policies[0];
        assert!(p.ingress_isolation && !p.egress_isolation);
        assert_eq!(p.ingress.len(), 1);
        assert!(p.egress.is_empty(), "rules of an unlisted type have no effect");
        assert_eq!(p.ignored.len(), 1, "{:?}", p.ignored);
        assert!(p.ignored[0].contains("x/only-in") && p.ignored[0].contains("spec.egress") && p.ignored[0].contains("2 rule"), "{:?}", p.ignored);
        // Egress-only with ingress rules, the other way round.
        let text = text.replace("[Ingress]", "[Egress]");
        let p = &PolicySet::parse(&text, Path::new("p.yaml")).expect("valid").policies[0];
        assert!(!p.ingress_isolation && p.egress_isolation && p.ingress.is_empty() && p.egress.len() == 2);
        assert!(p.ignored[0].contains("spec.ingress"), "{:?}", p.ignored);
        // Rules of an unlisted type are still validated (the API server validates them).
        let bad = text.replace("port: 53", "port: 70000");
        let err = PolicySet::parse(&bad, Path::new("p.yaml")).unwrap_err().to_string();
        assert!(err.contains("spec.egress[1].ports[0].port"), "{err}");
        let bad = text.replace("cidr: 10.0.0.0/8", "cidr: 10.0.0.0/33").replace("[Egress]", "[Ingress]");
        let err = PolicySet::parse(&bad, Path::new("p.yaml")).unwrap_err().to_string();
        assert!(err.contains("spec.egress[0].to[0].ipBlock.cidr"), "{err}");
    }

    /// What the API server's ValidateNetworkPolicySpec rejects, with its field paths.
    #[test]
    fn api_server_rejections_keep_its_field_paths() {
        for (from, to, want) in [
            ("  podSelector: {}", "  podSelector: {}\n  policyTypes: [Ingress, Egress, Ingress]", "spec.policyTypes:"),
            ("  podSelector: {}", "  podSelector: {}\n  policyTypes: [ingress]", "spec.policyTypes[0]"),
            ("    - port: 80", "    - port: a--b", "spec.ingress[0].ports[0].port"),
            ("    - port: 80", "    - port: -ab", "spec.ingress[0].ports[0].port"),
            ("    - port: 80", "    - port: abcdefghijklmnop", "spec.ingress[0].ports[0].port"),
            ("    - port: 80", "    - port: http\n      endPort: 90", "spec.ingress[0].ports[0].endPort"),
            ("    - port: 80", "    - endPort: 90", "spec.ingress[0].ports[0].endPort"),
            ("  podSelector: {}", "  podSelector: {matchLabels: {a: \"b c\"}}", "spec.podSelector.matchLabels"),
            ("  podSelector: {}", "  podSelector: {matchExpressions: [{key: a, operator: In, values: [\"b c\"]}]}", "spec.podSelector.matchExpressions[0].values[0]"),
            ("  ingress:\n", "  ingress:\n  - from: [{}]\n", "spec.ingress[0].from[0]"),
            ("  ingress:\n", "  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n", "spec.ingress[0].from[0]"),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "{to}");
            let err = PolicySet::parse(&text, Path::new("p.yaml")).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
        // Accepted by the API server: duplicate policyTypes, an empty list (defaults), port
        // names with single hyphens and digits.
        for (from, to) in [
            ("  podSelector: {}", "  podSelector: {}\n  policyTypes: [Ingress, Ingress]"),
            ("  podSelector: {}", "  podSelector: {}\n  policyTypes: []"),
            ("    - port: 80", "    - port: h2-c-1"),
        ] {
            let text = GOOD.replace(from, to);
            PolicySet::parse(&text, Path::new("p.yaml")).unwrap_or_else(|e| panic!("{to}: {e}"));
        }
    }

    /// One invalid document does not stop the others; a rejected policy keeps its last good
    /// version, a file that is not YAML keeps every policy it held.
    #[test]
    fn one_invalid_document_never_stops_the_others() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-each-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let doc = |name: &str, port: &str| GOOD.replace("name: a", &format!("name: {name}")).replace("port: 80", &format!("port: {port}"));
        std::fs::write(dir.join("1.yaml"), format!("{}---\n{}", doc("a", "80"), doc("b", "80"))).expect("write");
        std::fs::write(dir.join("2.yaml"), doc("c", "80")).expect("write");
        let first = PolicySet::load_each(&[&dir]);
        assert!(first.rejected.is_empty(), "{:?}", first.rejected);
        assert_eq!(first.set.policies.len(), 3);

        // b becomes invalid and 2.yaml stops being YAML; a new valid d appears.
        std::fs::write(dir.join("1.yaml"), format!("{}---\n{}", doc("a", "81"), doc("b", "0"))).expect("write");
        std::fs::write(dir.join("2.yaml"), "spec: [unclosed").expect("write");
        std::fs::write(dir.join("3.yaml"), doc("d", "80")).expect("write");
        let mut second = PolicySet::load_each(&[&dir]);
        let keys: Vec<String> = second.set.policies.iter().map(|p| p.key()).collect();
        assert_eq!(keys, ["x/a", "x/d"], "the valid rest loads");
        assert_eq!(second.rejected.len(), 2, "{:?}", second.rejected);
        assert_eq!(second.rejected[0].policy.as_deref(), Some("x/b"));
        assert!(second.rejected[0].error.to_string().contains("1.yaml: document 2: spec.ingress[0].ports[0].port"), "{}", second.rejected[0].error);
        assert_eq!(second.rejected[1].policy, None);
        assert!(PolicySet::load(&[&dir]).is_err(), "the strict form still fails");

        let (set, kept) = second.with_last_good(&first.set);
        let mut keys: Vec<String> = set.policies.iter().map(|p| p.key()).collect();
        keys.sort();
        assert_eq!(keys, ["x/a", "x/b", "x/c", "x/d"]);
        assert_eq!(kept, ["x/b", "x/c"]);
        let a = set.policies.iter().find(|p| p.key() == "x/a").expect("a");
        assert_eq!(a.ingress[0].ports[0].port, PortSpec::Number(81), "a valid change applies");
        let b = set.policies.iter().find(|p| p.key() == "x/b").expect("b");
        assert_eq!(b, first.set.policies.iter().find(|p| p.key() == "x/b").expect("old b"), "b stays at its last good version");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A policy with `n` ipBlock peers in one ingress rule, on `ports`.
    fn blocks_policy(name: &str, n: usize, ports: &str) -> String {
        let mut text = format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports: {ports}\n    from:\n");
        for i in 0..n {
            text.push_str(&format!("    - ipBlock: {{cidr: 10.{}.{}.{}/32}}\n", (i >> 16) & 255, (i >> 8) & 255, i & 255));
        }
        text
    }

    #[test]
    fn hostile_sizes_are_refused_before_parsing_or_compiling() {
        // 100,000 nested `[`: refused by the depth check (the parser took seconds to say so).
        let deep = format!("{GOOD}---\nspec: {}", "[".repeat(100_000));
        let err = PolicySet::parse(&deep, Path::new("deep.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("deep.yaml: line 12 column") && err.contains("nesting deeper than"), "{err}");
        // 50,000 ipBlocks on a port range: 800,000 entries per selected pod; refused at
        // validation, naming the rule and the budget.
        let err = PolicySet::parse(&blocks_policy("many", 50_000, "[{port: 1, endPort: 65535}]"), Path::new("p.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("p.yaml: document 1: spec.ingress[0]:"), "{err}");
        assert!(err.contains("800000 datapath entries") && err.contains(&MAX_POLICY_ENTRIES.to_string()), "{err}");
        // The same blocks on one port: within the entry budget, past the prefix budget.
        let err = PolicySet::parse(&blocks_policy("many", MAX_POLICY_PREFIXES + 1, "[{port: 80}]"), Path::new("p.yaml")).unwrap_err().to_string();
        assert!(err.contains("spec.ingress[0]") && err.contains(&MAX_POLICY_PREFIXES.to_string()), "{err}");
        // 3,600 ipBlocks on a range fit one policy (57,600 per pod) ...
        let one = blocks_policy("a", 3_600, "[{port: 1, endPort: 65535}]");
        let set = PolicySet::parse(&one, Path::new("p.yaml")).expect("within the policy budget");
        assert_eq!(set.policies[0].budget(), Budget { entries: 3_600 * 16, prefixes: 3_600 });
        // A set of policies each within its budget, but together past the POLICY map: the one
        // that tips it is rejected, on its own, naming the budget; the others load. (256 peers
        // on 256 ports: 65,536 entries per pod each, so the 17th tips 1,048,576.)
        let ports = format!("[{}]", (1..=256).map(|p| format!("{{port: {p}}}")).collect::<Vec<_>>().join(", "));
        let full = blocks_policy("a", 256, &ports);
        let dir = std::env::temp_dir().join(format!("palisade-policy-budget-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let fit = MAX_SET_ENTRIES / MAX_POLICY_ENTRIES;
        for i in 0..=fit {
            std::fs::write(dir.join(format!("p{i:02}.yaml")), full.replace("name: a,", &format!("name: p{i},"))).expect("write");
        }
        let loaded = PolicySet::load_each(&[&dir]);
        assert_eq!(loaded.set.policies.len(), fit);
        assert_eq!(loaded.rejected.len(), 1, "{:?}", loaded.rejected);
        let err = loaded.rejected[0].error.to_string();
        assert!(err.contains(&format!("policy x/p{fit}")) && err.contains(&MAX_SET_ENTRIES.to_string()), "{err}");
        assert_eq!(loaded.rejected[0].policy.as_deref(), Some(format!("x/p{fit}").as_str()));
        // A file past the size limit is refused before it is read.
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("dir");
        let big = dir.join("big.yaml");
        std::fs::File::create(&big).expect("create").set_len(MAX_POLICY_FILE_BYTES + 1).expect("sparse");
        let loaded = PolicySet::load_each(&[&dir]);
        let err = loaded.rejected[0].error.to_string();
        assert!(err.contains("big.yaml") && err.contains(&MAX_POLICY_FILE_BYTES.to_string()), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Issue 17: a reload reads only what changed, and never misses a change: a file rewritten
    /// in place with the same size at once (same inode, a time that may not have moved) is read
    /// again; removed files go; duplicates across cached files are still caught.
    #[test]
    fn a_cached_load_reads_what_changed_and_misses_nothing() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-cache-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("dir");
        let doc = |name: &str, port: u16| {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n")
        };
        let port_of = |loaded: &Loaded, name: &str| -> Option<String> {
            loaded.set.policies.iter().find(|p| p.name == name).map(|p| p.ingress[0].ports[0].to_string())
        };
        std::fs::write(dir.join("a.yaml"), doc("a", 1001)).expect("write");
        std::fs::write(dir.join("b.yaml"), doc("b", 2001)).expect("write");
        let mut cache = PolicyFileCache::default();
        // Just written: read, not cached yet (a write in the same clock tick could follow).
        let loaded = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(loaded.set.policies.len(), 2);
        assert!(cache.files.is_empty(), "files changed within the last second are not cached");
        std::fs::write(dir.join("b.yaml"), doc("b", 2002)).expect("rewrite in place, same size");
        let loaded = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(port_of(&loaded, "b").as_deref(), Some("TCP/2002"), "{:?}", loaded.set);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let loaded = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(cache.files.len(), 2, "settled files are cached");
        assert_eq!(port_of(&loaded, "a").as_deref(), Some("TCP/1001"));
        // A cached file rewritten in place (same size, same inode) and one replaced by a rename.
        std::fs::write(dir.join("a.yaml"), doc("a", 1002)).expect("rewrite in place");
        std::fs::write(dir.join("c.tmp"), doc("b", 2003)).expect("staged");
        std::fs::rename(dir.join("c.tmp"), dir.join("b.yaml")).expect("rename");
        let loaded = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(port_of(&loaded, "a").as_deref(), Some("TCP/1002"));
        assert_eq!(port_of(&loaded, "b").as_deref(), Some("TCP/2003"));
        // A second file naming a cached policy is a duplicate; a removed file's policy goes.
        std::fs::write(dir.join("d.yaml"), doc("a", 4001)).expect("write");
        std::fs::remove_file(dir.join("b.yaml")).expect("remove");
        let loaded = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(loaded.set.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(port_of(&loaded, "a").as_deref(), Some("TCP/1002"), "the first file's stays in force");
        assert!(loaded.rejected.iter().any(|r| r.error.to_string().contains("d.yaml")), "{:?}", loaded.rejected);
        assert!(!cache.files.contains_key(&dir.join("b.yaml")));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Issue 17: a reload told which entries changed looks only at those (and at the files the
    /// cache does not hold) and gives what a full load gives.
    #[test]
    fn a_reload_of_the_changed_entries_equals_a_full_load() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-changed-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).expect("dir");
        let doc = |name: &str, port: u16| {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress: [{{ports: [{{port: {port}}}]}}]\n")
        };
        for (name, port) in [("a", 1001), ("b", 2001), ("c", 3001)] {
            std::fs::write(dir.join(format!("{name}.yaml")), doc(name, port)).expect("write");
        }
        std::fs::write(dir.join("notes.txt"), "not a policy").expect("write");
        std::fs::write(dir.join("bad.yaml"), doc("bad", 1).replace("podSelector", "podSelectr")).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mut cache = PolicyFileCache::default();
        let summary = |loaded: &Loaded| {
            let policies: Vec<String> = loaded.set.policies.iter().map(|p| format!("{} {}", p.name, p.ingress[0].ports[0])).collect();
            let rejected: Vec<String> = loaded.rejected.iter().map(|r| r.error.to_string()).collect();
            let skipped: Vec<String> = loaded.skipped.iter().map(|s| s.to_string()).collect();
            (policies, rejected, skipped)
        };
        let first = PolicySet::load_each_cached(&[&dir], &mut cache);
        assert_eq!(first.set.policies.len(), 3);
        assert_eq!(cache.files.len(), 3, "the rejected file is not cached");
        // b rewritten, a new file d, c removed: the changed entries only.
        std::fs::write(dir.join("b.yaml"), doc("b", 2002)).expect("rewrite");
        std::fs::write(dir.join("d.yaml"), doc("d", 4001)).expect("new file");
        std::fs::remove_file(dir.join("c.yaml")).expect("remove");
        let changed = [dir.join("b.yaml"), dir.join("d.yaml"), dir.join("c.yaml")];
        let targeted = PolicySet::load_dir_changed(&dir, &changed, &mut cache).expect("applies to direct entries");
        let full = PolicySet::load_each(&[&dir]);
        assert_eq!(summary(&targeted), summary(&full));
        assert_eq!(summary(&targeted).0, ["a TCP/1001", "b TCP/2002", "d TCP/4001"]);
        assert!(summary(&targeted).1.iter().any(|r| r.contains("bad.yaml")), "a rejected file is told again: {:?}", summary(&targeted).1);
        assert!(summary(&targeted).2.iter().any(|s| s.contains("notes.txt")), "{:?}", summary(&targeted).2);
        // An unchanged, cached policy is the same object (compared by pointer downstream).
        let a = |loaded: &Loaded| loaded.set.policies.iter().find(|p| p.name == "a").cloned().expect("a");
        assert!(Arc::ptr_eq(&a(&first), &a(&targeted)));
        // Not a direct entry (a sub-directory's file, a ConfigMap's ..data swap): not applicable.
        assert!(PolicySet::load_dir_changed(&dir, &[dir.join("sub").join("x.yaml")], &mut cache).is_none());
        assert!(PolicySet::load_dir_changed(&dir, &[dir.join("..data")], &mut cache).is_none());
        assert!(PolicySet::load_dir_changed(&dir.join("other"), &[], &mut cache).is_none(), "no listing of that directory");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn nothing_in_a_directory_is_skipped_silently() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-skip-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(dir.join("nested")).expect("dir");
        std::fs::create_dir_all(dir.join("..data")).expect("configmap dir");
        // Upper-case extensions load.
        std::fs::write(dir.join("upper.YAML"), GOOD.replace("name: a", "name: upper")).expect("write");
        std::fs::write(dir.join("short.YML"), GOOD.replace("name: a", "name: short")).expect("write");
        // A BOM-prefixed file is a policy (before: "kind: missing").
        std::fs::write(dir.join("bom.yaml"), format!("\u{feff}{}", GOOD.replace("name: a", "name: bom"))).expect("write");
        // Reported, not loaded: another extension, an inventory, a sub-directory.
        std::fs::write(dir.join("notes.txt"), GOOD).expect("write");
        std::fs::write(dir.join("inventory.yaml"), "endpoints: []\n").expect("write");
        // A document without kind/apiVersion beside a policy: an error, naming the document.
        std::fs::write(dir.join("mixed.yaml"), format!("{GOOD}---\nmetadata: {{name: b}}\nspec: {{}}\n")).expect("write");
        let loaded = PolicySet::load_each(&[&dir]);
        let mut keys: Vec<String> = loaded.set.policies.iter().map(|p| p.key()).collect();
        keys.sort();
        assert_eq!(keys, ["x/a", "x/bom", "x/short", "x/upper"]);
        let skipped: Vec<String> = loaded.skipped.iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped.iter().any(|s| s.contains("inventory.yaml: skipped: no document has kind or apiVersion")), "{skipped:?}");
        assert!(skipped.iter().any(|s| s.contains("notes.txt: skipped: not a .yaml or .yml file")), "{skipped:?}");
        assert!(skipped.iter().any(|s| s.contains("nested: skipped: a directory")), "{skipped:?}");
        assert_eq!(loaded.rejected.len(), 1, "{:?}", loaded.rejected);
        let err = loaded.rejected[0].error.to_string();
        assert!(err.contains("mixed.yaml: document 2: apiVersion: missing"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn selector_operators() {
        let labels: Labels = [("pod".to_string(), "a".to_string())].into();
        let sel = |op, vals: &[&str]| Selector {
            match_labels: Default::default(),
            match_expressions: vec![Requirement { key: "pod".into(), operator: op, values: vals.iter().map(|s| s.to_string()).collect() }],
        };
        assert!(sel(Operator::In, &["a", "b"]).matches(&labels));
        assert!(!sel(Operator::NotIn, &["a"]).matches(&labels));
        assert!(sel(Operator::NotIn, &["b"]).matches(&Labels::new()));
        assert!(sel(Operator::Exists, &[]).matches(&labels));
        assert!(sel(Operator::DoesNotExist, &[]).matches(&Labels::new()));
    }

    #[test]
    fn cidr_containment() {
        let b = Cidr::parse("198.18.0.0/15").unwrap();
        assert!(b.contains("198.19.3.4".parse().unwrap()));
        assert!(!b.contains("198.20.0.1".parse().unwrap()));
        assert_eq!(Cidr::parse("198.18.7.9/16").unwrap().to_string(), "198.18.0.0/16");
        assert!(!b.contains("fd00::1".parse().unwrap()));
    }
}
