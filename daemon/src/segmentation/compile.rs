//! The compiler: inventory + policies -> the exact contents of the datapath maps.
//!
//! * Identities: one numeric id per distinct (namespace, selector labels, named ports) set; one
//!   CIDR identity per distinct ipBlock/except prefix, and per pod address that some ipBlock
//!   covers. Named ports are part of a label identity because the spec resolves a named port on
//!   each destination pod: two pods with the same labels but different named ports must not
//!   share the egress entries keyed by their identity (Cilium split identities the same way,
//!   cilium/cilium#45760). Selectors see only labels, so the split changes nothing else.
//! * Peer-only endpoints (pods on other nodes, `Endpoint::peer_only`) are peers and nothing
//!   else: they get their label identity and IPCACHE entries (endpoint id 0, so no hook ever
//!   treats their address as a local endpoint), are matched by pod/namespace selectors and
//!   ipBlocks and resolve egress named ports, but have no ENDPOINTS config and no POLICY entries
//!   of their own: policies selecting them are enforced on their own node, not here. They keep
//!   a `CompiledEndpoint` (marked `peer_only`) so the operator tools can name them.
//! * IPCACHE (LPM): every pod address as /32 or /128 (label identity, CIDR identity, endpoint id)
//!   and every ipBlock `cidr` and `except` prefix. `except` works with longest-prefix match
//!   because an ipBlock allows exactly the CIDR identities of the trie prefixes inside its cidr
//!   and not inside one of its excepts: an address inside an except always matches the except
//!   prefix or something longer inside it, never the enclosing block. IPv4 addresses live in the
//!   trie in IPv4-mapped form, so an IPv6 block covering `::ffff:0:0/96` (`::/0`, `::/64`) gets
//!   a world entry for that range beside it: the spec's IPv6 CIDRs never match IPv4 peers.
//! * ENDPOINTS: per endpoint isolation flags and the port-block sizes its POLICY entries use.
//! * POLICY: allow entries keyed by (endpoint, peer identity, direction, protocol, port block).
//!   Wildcards: peer 0 = any peer, protocol 0 = any protocol (rules without ports), port_plen 0 =
//!   any port. endPort ranges become aligned power-of-two port blocks (at most 30 per range, the
//!   way an LPM would split them) instead of one entry per port, so a 1-65535 range costs a
//!   handful of entries; the kernel probes only the block sizes present for that endpoint and
//!   direction (a bitmask in its EndpointConfig), so a verdict stays a bounded number of O(1) hash
//!   lookups whatever the number of rules.
//! * Capacity: the compiler counts the entries each map needs against its size ([`Capacity`])
//!   policy by policy, in order. The first policy that does not fit "tips" the set: it and every
//!   later policy still isolate the pods they select (ENDPOINTS flags, cheap and bounded by the
//!   inventory) but add no allow entries (nor, when IPCACHE tipped, ipBlock prefixes), so what
//!   is written always fits
//!   and fails closed; `Compiled::over_capacity` names the tipping policy and the counts. The
//!   daemon rejects such a policy set as a whole and keeps its last good one; only when the
//!   last good set no longer fits (new pods) or at start-up does this degraded set go in force.
//! * Incremental: a [`Compiler`] keeps each policy's part (what it selects, its rules, its
//!   allow entries) with the environment it was compiled in (the inventory, and for a policy
//!   with ipBlock peers the prefixes in force) and reuses it while both are unchanged, so a
//!   policy change compiles that one policy; the merge (rule ids in policy order, the capacity
//!   check, the tipping point) always runs over every part, so the output is exactly a full
//!   compile's (`tests/segmentation_incremental.rs` checks it over random change sequences).
//!   An inventory change recompiles the parts it touches: a part reads the pods its podSelector
//!   selects, the pods its peers match (by selector, or by an address inside an ipBlock), for
//!   an egress rule with a named port and no peers every pod, and namespace labels only through
//!   namespaceSelectors; so a part is kept unless a changed pod (its old or its new version) is
//!   one of those, or a namespace's labels changed and the policy has a namespaceSelector. What
//!   changed comes from the producer's change log when both inventories carry one
//!   ([`Inventory::changes_since`], the Kubernetes source), or from comparing the two (one pass
//!   over the pods); past [`MAX_CHANGED_PODS`] changed pods, or after a compile that ran out of
//!   ids, every part is compiled again.
//! * Named ports: ingress resolves against the selected (destination) pod (its own POLICY
//!   entries); egress against each destination pod, keyed by that pod's identity, which is exact
//!   because every pod of an identity declares the same named ports. The kernel maps and the
//!   per-packet probes are unchanged: only which pods share an identity is.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use palisade_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EndpointConfig,
    IDENTITY_ANY, IDENTITY_CIDR_FIRST, IDENTITY_LABEL_FIRST, IDENTITY_WORLD, IpCacheValue, PROTO_ANY, PolicyKey,
    PolicyValue, SEG_MAX_ENDPOINTS, SEG_MAX_IPCACHE, SEG_MAX_POLICY,
};
use serde::Serialize;

use super::policy::{Cidr, NetworkPolicy, Peer, PolicySet, PortSpec, Rule};
use crate::inventory::{ChangeSet, Endpoint, Inventory, Labels, NamedPort, Protocol};

/// An LPM trie key as stored: prefix length (in the 16-byte form) and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LpmKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

impl LpmKey {
    pub fn from_cidr(c: &Cidr) -> LpmKey {
        let (addr, prefix_len) = c.mapped();
        LpmKey { prefix_len, addr }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IdentityKind {
    Labels {
        namespace: String,
        labels: Labels,
        /// The named ports every pod of this identity declares (`name=port/PROTO`), sorted.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        named_ports: Vec<String>,
    },
    Cidr { cidr: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledEndpoint {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub identity: u32,
    pub ips: Vec<IpAddr>,
    /// The pod's declared ports (named ports resolve against these).
    pub ports: Vec<NamedPort>,
    pub cgroup: Option<String>,
    /// A pod on another node: a peer only (no ENDPOINTS config, no POLICY entries, IPCACHE
    /// endpoint id 0); its own policies are enforced on its node.
    pub peer_only: bool,
    /// Policies (index into `Compiled::policies`) selecting this endpoint, per direction
    /// (always empty for a peer-only endpoint).
    pub ingress_policies: Vec<usize>,
    pub egress_policies: Vec<usize>,
}

impl CompiledEndpoint {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod's typed key (compiled from the validated inventory).
    pub fn pod_key(&self) -> crate::endpoints::PodKey {
        crate::endpoints::PodKey::from_validated(&self.namespace, &self.name)
    }

    pub fn endpoint_id(&self) -> crate::endpoints::EndpointId {
        crate::endpoints::EndpointId(self.id)
    }
}

/// One ingress/egress rule of one policy: what a POLICY entry's rule_id points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub policy: String,
    pub source: String,
    pub direction: &'static str,
    pub index: usize,
    pub summary: String,
    /// The named ports the rule uses (name, protocol): `policy explain` shows how they resolved.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<(String, Protocol)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub key: String,
    pub source: String,
}

/// How many entries each datapath map holds: the compiler never produces more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capacity {
    pub policy: usize,
    pub ipcache: usize,
    pub endpoints: usize,
}

impl Default for Capacity {
    /// The kernel maps' sizes.
    fn default() -> Self {
        Capacity { policy: SEG_MAX_POLICY as usize, ipcache: SEG_MAX_IPCACHE as usize, endpoints: SEG_MAX_ENDPOINTS as usize }
    }
}

/// Entries a compiled set needs per map (all of them, also those left out when it did not fit),
/// and the capacity they were counted against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub policy: usize,
    pub ipcache: usize,
    pub endpoints: usize,
    pub capacity: Capacity,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "POLICY {}/{}, IPCACHE {}/{}, ENDPOINTS {}/{}",
            self.policy, self.capacity.policy, self.ipcache, self.capacity.ipcache, self.endpoints, self.capacity.endpoints
        )
    }
}

/// A set that does not fit: the map, the policy that tipped it, and the counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} does not fit the {map} map: the set needs {needed} entries, the map holds {capacity} (entries: {usage})")]
pub struct OverCapacity {
    pub map: &'static str,
    /// `policy NS/NAME (file: document N)`, or `the inventory`.
    pub what: String,
    pub needed: usize,
    pub capacity: usize,
    pub usage: Usage,
}

/// The compiled datapath contents (exactly what `datapath::sync` writes into the maps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    pub endpoints: BTreeMap<u32, CompiledEndpoint>,
    pub identities: BTreeMap<u32, IdentityKind>,
    pub ipcache: BTreeMap<LpmKey, IpCacheValue>,
    pub endpoint_config: BTreeMap<u32, EndpointConfig>,
    /// A key several rules allow holds the lowest of their rule ids.
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// By rule id (`PolicyValue::rule_id`). Ids are stable per policy and rule index, so a
    /// change to one policy leaves every other policy's POLICY values as they were.
    pub rules: BTreeMap<u32, RuleRef>,
    pub policies: Vec<PolicyRef>,
    /// Entries needed per map against the capacity compiled for.
    pub usage: Usage,
    /// Set when the set did not fit: the policies from the tipping one on isolate but allow
    /// nothing (see the module docs).
    pub over_capacity: Option<OverCapacity>,
    /// Which compile made these contents and what changed since the one before: lets the
    /// datapath write only the difference. Not part of the contents (never compared).
    pub sync: SyncHint,
}

/// Which compile made a [`Compiled`] (a generation unique in the process) and, for contents
/// updated in place from the ones before ([`Compiler::update_in_place`]), the keys that may
/// differ from that earlier generation. The datapath applies the delta only when what it holds
/// is exactly that earlier generation; otherwise it compares everything.
#[derive(Debug, Clone, Default)]
pub struct SyncHint {
    /// 0: not made by a compile (e.g. a copy cut down by hand); never matches a datapath.
    pub generation: u64,
    pub delta: Option<Arc<Delta>>,
}

impl PartialEq for SyncHint {
    /// Contents are compared, never how they came about.
    fn eq(&self, _: &SyncHint) -> bool {
        true
    }
}

impl Eq for SyncHint {}

impl SyncHint {
    fn fresh() -> SyncHint {
        SyncHint { generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed), delta: None }
    }
}

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// What may differ between two generations of compiled contents: every POLICY key and endpoint
/// config that was written or removed (a key listed may also be unchanged).
#[derive(Debug, Default)]
pub struct Delta {
    /// The generation these keys are relative to.
    pub base: u64,
    pub policy: Vec<PolicyKey>,
    pub endpoint_config: Vec<u32>,
}

impl Compiled {
    pub fn endpoint_by_key(&self, key: &str) -> Option<&CompiledEndpoint> {
        self.endpoints.values().find(|e| e.key() == key)
    }

    /// Endpoints enforced on this node (not peer-only).
    pub fn local_endpoints(&self) -> impl Iterator<Item = &CompiledEndpoint> {
        self.endpoints.values().filter(|e| !e.peer_only)
    }
}

/// Stable id allocation: the same key keeps its id across compiles of one `Compiler`, so a
/// recompile after a small change yields a small diff.
///
/// Bounded (issue 18): at the end of each compile, a key that neither it nor the compile in force
/// ([`Compiler::in_force`]) used is forgotten (a pod, label set or prefix that is gone; a set
/// compiled and then refused over capacity does not cost the set in force its ids). A compiler
/// never told what is in force (offline tools) forgets nothing. Ids are handed out in
/// order from `[first, end)` and wrap around to ids no kept key holds, so label identities
/// never reach the CIDR range however many label sets come and go, and an id is handed out
/// again only after the rest of the range went by since it was freed (long after the maps
/// dropped every entry that used it).
#[derive(Debug, Clone)]
struct Alloc<K: Ord> {
    /// Key -> (id, the compile that last used it).
    ids: BTreeMap<K, (u32, u64)>,
    in_use: HashSet<u32>,
    next: u32,
    first: u32,
    end: u32,
    /// The compile under way (counts `forget_unused` calls).
    compile: u64,
    /// Keys last used before this compile are forgotten (the compile in force).
    kept_from: u64,
}

impl<K: Ord + Clone> Alloc<K> {
    fn new(first: u32, end: u32) -> Self {
        Alloc { ids: BTreeMap::new(), in_use: HashSet::new(), next: first, first, end, compile: 0, kept_from: 0 }
    }

    /// The key's id; None only when every id of the range is held by a kept key (more than
    /// the range's size of distinct keys in two compiles: far beyond what the maps hold).
    fn get(&mut self, k: K) -> Option<u32> {
        let compile = self.compile;
        if let Some((id, used)) = self.ids.get_mut(&k) {
            *used = compile;
            return Some(*id);
        }
        let id = self.fresh()?;
        self.ids.insert(k, (id, compile));
        Some(id)
    }

    fn fresh(&mut self) -> Option<u32> {
        if self.in_use.len() >= (self.end - self.first) as usize {
            return None;
        }
        // At most one lap: an id not in use exists.
        loop {
            let id = self.next;
            self.next = if id + 1 >= self.end { self.first } else { id + 1 };
            if self.in_use.insert(id) {
                return Some(id);
            }
        }
    }

    /// Ends a compile: forgets the keys neither it nor the compile in force used.
    fn forget_unused(&mut self) {
        let keep_from = self.kept_from;
        let in_use = &mut self.in_use;
        self.ids.retain(|_, (id, used)| {
            let keep = *used >= keep_from;
            if !keep {
                in_use.remove(id);
            }
            keep
        });
        self.compile += 1;
    }

    /// The compile that just ended is in force.
    fn in_force(&mut self) {
        self.kept_from = self.compile.saturating_sub(1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The compiler with its id allocators (keep one per daemon for stable ids).
#[derive(Debug, Clone)]
pub struct Compiler {
    labels: Alloc<(String, Labels, PortNames)>,
    cidrs: Alloc<Cidr>,
    endpoints: Alloc<(String, String)>,
    /// Rule ids by (policy key, rule index).
    rules: Alloc<(String, u32)>,
    capacity: Capacity,
    cache: PartCache,
}

/// The parts of the last compile, by policy key, with what they were compiled against.
#[derive(Debug, Clone, Default)]
struct PartCache {
    parts: HashMap<String, PolicyPart>,
    /// The inventory the parts were compiled against (a part is kept across an inventory change
    /// that does not touch it, see [`InventoryDelta`]).
    inventory: Option<Inventory>,
    blocks: BTreeSet<Cidr>,
    blocks_generation: u64,
    /// Parts the last compile computed (the rest it reused).
    compiled: usize,
    /// The last output's merge, kept so that a policy change updates it in place.
    merge: Option<MergeState>,
}

/// What the merge of every part derived, for updating its output in place (see
/// [`Compiler::update_in_place`]): kept only after a compile that fit whole (no tipping point,
/// no exhausted ids), whose output is `generation`.
#[derive(Debug, Clone)]
struct MergeState {
    generation: u64,
    /// The set compiled, in order (shared with the caller's set: compared by pointer).
    set: Vec<Arc<NetworkPolicy>>,
    /// Per POLICY key: the rule ids that allow it (its value is the lowest).
    holders: HashMap<PolicyKey, Vec<u32>>,
    /// Per local endpoint: how many policies isolate it, [ingress, egress].
    isolating: HashMap<u32, [u32; 2]>,
    /// POLICY keys per (endpoint, direction, port block prefix length 1..=15): the port-plen
    /// bits of the endpoint's config.
    plens: HashMap<(u32, u8, u8), u32>,
    /// What compiling a policy reads besides the inventory (unchanged while it is).
    environment: Environment,
}

/// What the compile derived from the inventory (and the prefixes) for resolving policies.
#[derive(Debug, Clone, Default)]
struct Environment {
    selector_labels: Vec<Labels>,
    identity_pods: BTreeMap<u32, Vec<usize>>,
    cidr_prefixes: Vec<(Cidr, u32, Option<usize>)>,
    ep_ids: Vec<u32>,
    ep_identity: Vec<u32>,
}

impl Environment {
    fn resolution<'a>(&'a self, inventory: &'a Inventory) -> Resolution<'a> {
        Resolution {
            inventory,
            selector_labels: &self.selector_labels,
            identity_pods: &self.identity_pods,
            cidr_prefixes: &self.cidr_prefixes,
            ep_ids: &self.ep_ids,
            ep_identity: &self.ep_identity,
        }
    }
}

/// More changed policies than this in one update: the whole merge runs again instead (cheaper
/// than undoing and redoing each part).
pub const MAX_POLICIES_UPDATED_IN_PLACE: usize = 512;

/// More changed pods than this in one inventory change: every part is compiled again (looking
/// each changed pod up costs more than it saves).
pub const MAX_CHANGED_PODS: usize = 256;

impl Default for Compiler {
    fn default() -> Self {
        Compiler {
            labels: Alloc::new(IDENTITY_LABEL_FIRST, IDENTITY_CIDR_FIRST),
            cidrs: Alloc::new(IDENTITY_CIDR_FIRST, u32::MAX),
            endpoints: Alloc::new(1, u32::MAX),
            rules: Alloc::new(0, u32::MAX),
            capacity: Capacity::default(),
            cache: PartCache::default(),
        }
    }
}

/// Compiles with fresh ids (offline tools).
pub fn compile(inventory: &Inventory, policies: &PolicySet) -> Compiled {
    Compiler::default().compile(inventory, policies)
}

/// A pod's named ports as (name, protocol, port), sorted and deduplicated: part of its identity.
type PortNames = Vec<(String, Protocol, u16)>;

fn port_names(ep: &Endpoint) -> PortNames {
    let mut names: PortNames =
        ep.ports.iter().filter_map(|p| p.name.as_ref().map(|n| (n.clone(), p.protocol, p.port))).collect();
    names.sort_unstable();
    names.dedup();
    names
}

struct Target {
    id: u32,
    /// Destination pods behind this id (for egress named ports).
    endpoints: Vec<usize>,
}

impl Compiler {
    /// A compiler that fits its output into `capacity` (at most the kernel maps' sizes).
    pub fn with_capacity(capacity: Capacity) -> Compiler {
        Compiler { capacity, ..Compiler::default() }
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// How many policy parts the last compile computed; the others it reused unchanged.
    pub fn parts_compiled(&self) -> usize {
        self.cache.compiled
    }

    /// The last compile's output went in force: the ids it used are kept, and from the next
    /// compile on, keys used neither by that compile nor by the one in force are forgotten.
    pub fn in_force(&mut self) {
        self.labels.in_force();
        self.cidrs.in_force();
        self.endpoints.in_force();
        self.rules.in_force();
    }

    /// This compiler with its ids but without the parts kept from earlier compiles: its next
    /// compile computes every policy afresh (what an incremental compile must equal).
    pub fn without_cache(&self) -> Compiler {
        Compiler {
            labels: self.labels.clone(),
            cidrs: self.cidrs.clone(),
            endpoints: self.endpoints.clone(),
            rules: self.rules.clone(),
            capacity: self.capacity,
            cache: PartCache::default(),
        }
    }

    pub fn compile(&mut self, inventory: &Inventory, set: &PolicySet) -> Compiled {
        let cap = self.capacity;
        let mut out = Compiled::default();
        out.usage.capacity = cap;
        let eps = &inventory.endpoints;
        // Endpoints and label identities.
        let mut ep_ids = Vec::with_capacity(eps.len());
        let mut ep_identity = Vec::with_capacity(eps.len());
        let mut selector_labels: Vec<Labels> = Vec::with_capacity(eps.len());
        // An id range used up (see `Alloc`): nothing is allowed (fail closed).
        let mut exhausted = false;
        for ep in eps {
            let labels = ep.selector_labels();
            let names = port_names(ep);
            let named_ports = names.iter().map(|(n, proto, port)| format!("{n}={port}/{proto}")).collect();
            let (Some(id), Some(identity)) =
                (self.endpoints.get((ep.namespace.clone(), ep.name.clone())), self.labels.get((ep.namespace.clone(), labels.clone(), names)))
            else {
                exhausted = true;
                ep_ids.push(0);
                ep_identity.push(0);
                selector_labels.push(labels);
                continue;
            };
            out.identities.insert(identity, IdentityKind::Labels { namespace: ep.namespace.clone(), labels: labels.clone(), named_ports });
            selector_labels.push(labels);
            out.endpoints.insert(
                id,
                CompiledEndpoint {
                    id,
                    namespace: ep.namespace.clone(),
                    name: ep.name.clone(),
                    identity,
                    ips: ep.ips.clone(),
                    ports: ep.ports.clone(),
                    cgroup: if ep.peer_only { None } else { ep.cgroup.clone() },
                    peer_only: ep.peer_only,
                    ingress_policies: Vec::new(),
                    egress_policies: Vec::new(),
                },
            );
            if !ep.peer_only {
                out.endpoint_config.insert(id, EndpointConfig::default());
            }
            ep_ids.push(id);
            ep_identity.push(identity);
        }
        // Every ipBlock prefix (cidr and except), policy by policy, as long as IPCACHE holds
        // them beside the pod addresses; the first policy whose prefixes do not fit tips the set.
        let pod_addresses: BTreeSet<Cidr> = eps.iter().flat_map(|e| e.ips.iter().map(|ip| Cidr::host(*ip))).collect();
        let mut blocks: BTreeSet<Cidr> = BTreeSet::new();
        let mut all_blocks: BTreeSet<Cidr> = BTreeSet::new();
        let mut tipped: Option<(usize, &'static str)> = None;
        let mut barrier = V4Barrier::default();
        if eps.len() > cap.endpoints || pod_addresses.len() > cap.ipcache {
            // The inventory alone does not fit: no policy adds anything.
            tipped = Some((0, if eps.len() > cap.endpoints { "ENDPOINTS" } else { "IPCACHE" }));
        }
        for (pi, p) in set.policies.iter().enumerate() {
            let mut mine: BTreeSet<Cidr> = BTreeSet::new();
            for r in p.ingress.iter().chain(&p.egress) {
                for peer in &r.peers {
                    if let Peer::IpBlock(b) = peer {
                        mine.insert(b.cidr);
                        mine.extend(b.except.iter().copied());
                    }
                }
            }
            all_blocks.extend(mine.iter().copied());
            if tipped.is_some() {
                continue;
            }
            let fresh = mine.iter().filter(|c| !blocks.contains(c) && !pod_addresses.contains(c)).count();
            let used = pod_addresses.len() + blocks.iter().filter(|c| !pod_addresses.contains(c)).count();
            let barrier_after = usize::from(barrier.with(&mine).needed());
            if used + fresh + barrier_after > cap.ipcache {
                tipped = Some((pi, "IPCACHE"));
                continue;
            }
            barrier = barrier.with(&mine);
            blocks.extend(mine);
        }
        out.usage.endpoints = eps.len();
        out.usage.ipcache = pod_addresses.len()
            + all_blocks.iter().filter(|c| !pod_addresses.contains(c)).count()
            + usize::from(V4Barrier::default().with(&all_blocks).needed());
        // IPCACHE: (cidr, value); `cidr_prefixes` lists every prefix with a CIDR identity and the
        // pod behind it (for named ports), for ipBlock resolution.
        let mut cidr_prefixes: Vec<(Cidr, u32, Option<usize>)> = Vec::new();
        let mut pod_hosts: BTreeSet<Cidr> = BTreeSet::new();
        for (i, ep) in eps.iter().enumerate() {
            if ep_identity[i] == 0 {
                // Left out: its ids could not be allocated (`exhausted`).
                continue;
            }
            for ip in &ep.ips {
                let host = Cidr::host(*ip);
                pod_hosts.insert(host);
                let cidr_identity = if blocks.iter().any(|b| b.contains(*ip)) { self.cidrs.get(host) } else { Some(0) };
                let Some(cidr_identity) = cidr_identity else {
                    exhausted = true;
                    continue;
                };
                let covered = cidr_identity != 0;
                if covered {
                    out.identities.insert(cidr_identity, IdentityKind::Cidr { cidr: host.to_string() });
                    cidr_prefixes.push((host, cidr_identity, Some(i)));
                }
                // A peer-only address is never a local endpoint at a hook (endpoint id 0).
                let endpoint_id = if ep.peer_only { 0 } else { ep_ids[i] };
                out.ipcache.insert(
                    LpmKey::from_cidr(&host),
                    IpCacheValue { identity: ep_identity[i], cidr_identity, endpoint_id, _pad: 0 },
                );
            }
        }
        for b in &blocks {
            if pod_hosts.contains(b) {
                continue;
            }
            let Some(id) = self.cidrs.get(*b) else {
                exhausted = true;
                continue;
            };
            out.identities.insert(id, IdentityKind::Cidr { cidr: b.to_string() });
            cidr_prefixes.push((*b, id, None));
            out.ipcache.insert(LpmKey::from_cidr(b), IpCacheValue { identity: id, cidr_identity: id, endpoint_id: 0, _pad: 0 });
        }
        // By address in the trie's form, so an ipBlock finds the prefixes inside it by binary
        // search instead of testing every prefix of the set (16,000 ipBlocks were quadratic).
        cidr_prefixes.sort_by_key(|(c, _, _)| trie_address(c));
        if barrier.needed() {
            out.ipcache.insert(
                LpmKey::from_cidr(&V4_MAPPED),
                IpCacheValue { identity: IDENTITY_WORLD, cidr_identity: 0, endpoint_id: 0, _pad: 0 },
            );
        }
        // Label identities present, with their pods.
        let mut identity_pods: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, id) in ep_identity.iter().enumerate().filter(|(_, id)| **id != 0) {
            identity_pods.entry(*id).or_default().push(i);
        }
        if exhausted {
            // Never seen in practice (more distinct keys in two compiles than an id range
            // holds): every pod stays isolated by its policies and no policy allows anything.
            tipped = Some((0, "ENDPOINTS"));
        }
        self.labels.forget_unused();
        self.cidrs.forget_unused();
        self.endpoints.forget_unused();

        // A policy's entries depend on the pods it reads (see `InventoryDelta::touches`) and,
        // when it has ipBlock peers, on the prefixes in force (an ipBlock resolves to the trie
        // prefixes inside it). A policy that is unchanged since the last compile, in an
        // environment that changed nothing it reads, reuses its part: a policy change
        // recompiles that policy alone, a pod change the policies that select or admit the pod.
        // What follows (the capacity check, the merge) runs over every policy in order as
        // before, so the result is the full compile's.
        let mut cached = std::mem::take(&mut self.cache.parts);
        self.cache.merge = None;
        match self.cache.inventory.as_ref() {
            Some(before) if before == inventory => {}
            Some(before) => {
                match InventoryDelta::new(before, inventory) {
                    Some(delta) => cached.retain(|_, part| !delta.touches(&part.policy)),
                    None => cached.clear(),
                }
                self.cache.inventory = Some(inventory.clone());
            }
            None => self.cache.inventory = Some(inventory.clone()),
        }
        if exhausted {
            // Some pods have no ids (0) in this compile: nothing kept from before applies, and
            // nothing compiled now is kept for later.
            cached.clear();
        }
        if self.cache.blocks != blocks {
            self.cache.blocks = blocks.clone();
            self.cache.blocks_generation += 1;
        }
        self.cache.compiled = 0;
        let mut parts: HashMap<String, PolicyPart> = HashMap::with_capacity(set.policies.len());
        let environment = Environment { selector_labels, identity_pods, cidr_prefixes, ep_ids, ep_identity };
        let resolution = environment.resolution(inventory);
        // POLICY keys of the policies past the tipping point, only counted.
        let mut left_out: HashSet<PolicyKey> = HashSet::new();
        let mut holders: HashMap<PolicyKey, Vec<u32>> = HashMap::new();
        let mut isolating: HashMap<u32, [u32; 2]> = HashMap::new();
        let mut plens: HashMap<(u32, u8, u8), u32> = HashMap::new();
        for (pi, p) in set.policies.iter().enumerate() {
            let key = p.key();
            out.policies.push(PolicyRef { key: key.clone(), source: p.source.clone() });
            let environment = if has_ip_blocks(p) { self.cache.blocks_generation } else { 0 };
            let mut part = match cached.remove(&key) {
                Some(part) if part.environment == environment && (Arc::ptr_eq(&part.policy, p) || part.policy == *p) => part,
                _ => {
                    self.cache.compiled += 1;
                    resolution.part(p, environment)
                }
            };
            // Stable rule ids, one per (policy, rule index): used (kept) by every compile.
            part.rule_ids.clear();
            for r in 0..part.rules.len() {
                match self.rules.get((key.clone(), r as u32)) {
                    Some(id) => part.rule_ids.push(id),
                    None => {
                        // Never seen in practice (4 billion rules in two compiles): the policy
                        // and the ones after it allow nothing, as past a full map.
                        tipped.get_or_insert((pi, "POLICY"));
                        part.rule_ids.push(u32::MAX);
                    }
                }
            }
            for (d, (direction, isolated)) in [(DIRECTION_INGRESS, p.ingress_isolation), (DIRECTION_EGRESS, p.egress_isolation)].into_iter().enumerate() {
                if !isolated {
                    continue;
                }
                for &id in &part.selected {
                    if let Some(cfg) = out.endpoint_config.get_mut(&id) {
                        cfg.flags |= if direction == DIRECTION_INGRESS { EP_ISOLATED_INGRESS } else { EP_ISOLATED_EGRESS };
                        isolating.entry(id).or_default()[d] += 1;
                    }
                    if let Some(ce) = out.endpoints.get_mut(&id) {
                        if direction == DIRECTION_INGRESS { ce.ingress_policies.push(pi) } else { ce.egress_policies.push(pi) }
                    }
                }
            }
            out.rules.extend(part.rule_ids.iter().zip(&part.rules).map(|(id, rule)| (*id, rule.clone())));
            // This policy's allow entries, then whether they fit.
            if tipped.is_none() {
                let fresh: BTreeSet<&PolicyKey> = part.entries.iter().map(|(k, _)| k).filter(|k| !out.policy.contains_key(k)).collect();
                if out.policy.len() + fresh.len() > cap.policy {
                    tipped = Some((pi, "POLICY"));
                }
            }
            if tipped.is_some_and(|(t, _)| pi >= t) {
                left_out.extend(part.entries.iter().map(|(k, _)| *k).filter(|k| !out.policy.contains_key(k)));
                parts.insert(key, part);
                continue;
            }
            for &(k, r) in &part.entries {
                let id = part.rule_ids[r as usize];
                holders.entry(k).or_default().push(id);
                add_policy_entry(&mut out, &mut plens, k, id);
            }
            parts.insert(key, part);
        }
        self.rules.forget_unused();
        self.cache.parts = if exhausted { HashMap::new() } else { parts };
        out.usage.policy = out.policy.len() + left_out.len();
        out.sync = SyncHint::fresh();
        if let Some((t, map)) = tipped {
            let what = match set.policies.get(t) {
                Some(p) if map == "POLICY" || (map == "IPCACHE" && out.usage.endpoints <= cap.endpoints && pod_addresses.len() <= cap.ipcache) => {
                    format!("policy {} ({})", p.key(), p.source)
                }
                _ => "the inventory".to_string(),
            };
            let (needed, capacity) = match map {
                "POLICY" => (out.usage.policy, cap.policy),
                "IPCACHE" => (out.usage.ipcache, cap.ipcache),
                _ => (out.usage.endpoints, cap.endpoints),
            };
            out.over_capacity = Some(OverCapacity { map, what, needed, capacity, usage: out.usage });
        } else if !exhausted {
            self.cache.merge = Some(MergeState {
                generation: out.sync.generation,
                set: set.policies.clone(),
                holders,
                isolating,
                plens,
                environment,
            });
        }
        out
    }

    /// Puts a change of policies alone into `current` in place, when `current` is this
    /// compiler's last output and went in force whole (no tipping point): each changed, added
    /// or removed policy's part is compiled or dropped and its allow entries taken out or put
    /// in (per key the lowest rule id of the rules that still allow it), so the work is
    /// proportional to what changed, not to the set (but for a pass over the set comparing
    /// pointers, and when policies come or go, one renumbering each endpoint's policy list);
    /// `current` then carries the keys that may differ for the datapath ([`SyncHint`]). The
    /// result equals [`Compiler::compile`]'s (`tests/segmentation_incremental.rs` checks it).
    ///
    /// Returns false, having changed nothing of `current`, when it does not apply: the
    /// inventory changed, the policies both sets have are not in the same order, a changed
    /// policy has ipBlock peers (the prefixes in force may change), more than
    /// [`MAX_POLICIES_UPDATED_IN_PLACE`] changed, or the result would not fit the POLICY map
    /// (the full merge then finds the tipping point). The caller compiles then.
    pub fn update_in_place(&mut self, inventory: &Inventory, set: &PolicySet, current: &mut Arc<Compiled>) -> bool {
        let Compiler { rules, cache, capacity, .. } = self;
        let Some(merge) = cache.merge.as_mut() else { return false };
        if merge.generation != current.sync.generation || cache.inventory.as_ref() != Some(inventory) {
            return false;
        }
        let Some(plan) = UpdatePlan::new(&merge.set, &set.policies) else { return false };
        if plan.changed.len() + plan.added.len() + plan.removed.len() > MAX_POLICIES_UPDATED_IN_PLACE {
            return false;
        }
        cache.compiled = 0;
        if plan.changed.is_empty() && plan.added.is_empty() && plan.removed.is_empty() {
            // Same contents (maybe in new allocations: remember those, so the next comparison
            // is by pointer).
            merge.set.clone_from(&set.policies);
            return true;
        }
        if plan.changed.iter().any(|&(i, j)| has_ip_blocks(&merge.set[i]) || has_ip_blocks(&set.policies[j]))
            || plan.added.iter().any(|&j| has_ip_blocks(&set.policies[j]))
            || plan.removed.iter().any(|&i| has_ip_blocks(&merge.set[i]))
        {
            return false;
        }
        // The new parts (with their rule ids) and the old parts they replace.
        let resolution = merge.environment.resolution(inventory);
        let mut incoming: Vec<(usize, PolicyPart)> = Vec::with_capacity(plan.changed.len() + plan.added.len());
        for j in plan.changed.iter().map(|&(_, j)| j).chain(plan.added.iter().copied()) {
            let p = &set.policies[j];
            let mut part = resolution.part(p, 0);
            for r in 0..part.rules.len() {
                let Some(id) = rules.get((p.key(), r as u32)) else { return false };
                part.rule_ids.push(id);
            }
            incoming.push((j, part));
        }
        // (old index, key) of each changed and removed policy.
        let outgoing_keys: Vec<(usize, String)> =
            plan.changed.iter().map(|&(i, _)| i).chain(plan.removed.iter().copied()).map(|i| (i, merge.set[i].key())).collect();
        let Some(outgoing) = outgoing_keys.iter().map(|(_, key)| cache.parts.get(key)).collect::<Option<Vec<&PolicyPart>>>() else { return false };
        // Whether the result fits, before anything is changed: the keys only the old parts
        // allow go, the new parts' keys not in the map come.
        let old_rule_ids: HashSet<u32> = outgoing.iter().flat_map(|part| part.rule_ids.iter().copied()).collect();
        let new_keys: HashSet<PolicyKey> = incoming.iter().flat_map(|(_, part)| part.entries.iter().map(|(k, _)| *k)).collect();
        let fresh = new_keys.iter().filter(|k| !current.policy.contains_key(k)).count();
        let gone: HashSet<PolicyKey> = outgoing
            .iter()
            .flat_map(|part| part.entries.iter().map(|(k, _)| *k))
            .filter(|k| !new_keys.contains(k) && merge.holders.get(k).is_some_and(|h| h.iter().all(|id| old_rule_ids.contains(id))))
            .collect();
        if current.policy.len() + fresh - gone.len() > capacity.policy {
            return false;
        }

        let out = Arc::make_mut(current);
        let mut touched_keys: HashSet<PolicyKey> = HashSet::new();
        let mut touched_endpoints: BTreeSet<u32> = BTreeSet::new();
        // The old parts out.
        for (i, key) in &outgoing_keys {
            let Some(old) = cache.parts.remove(key) else { continue };
            for &(k, r) in &old.entries {
                let id = old.rule_ids[r as usize];
                touched_keys.insert(k);
                let Some(h) = merge.holders.get_mut(&k) else { continue };
                if let Some(at) = h.iter().position(|x| *x == id) {
                    h.swap_remove(at);
                }
                let lowest = h.iter().min().copied();
                match lowest {
                    Some(lowest) => {
                        if let Some(v) = out.policy.get_mut(&k) {
                            v.rule_id = lowest;
                        }
                    }
                    None => {
                        merge.holders.remove(&k);
                        if remove_policy_entry(out, &mut merge.plens, k) {
                            touched_endpoints.insert(k.endpoint_id);
                        }
                    }
                }
            }
            for id in &old.rule_ids {
                out.rules.remove(id);
            }
            set_isolation(out, &mut merge.isolating, &old, false, &mut touched_endpoints);
            // Out of the lists by its old index (a removed one would go with the renumbering).
            set_listed(out, &old, *i, false);
        }
        // Positions move when policies come or go: each endpoint's policy list and the
        // policy references follow the new set's order.
        if !plan.added.is_empty() || !plan.removed.is_empty() {
            for ce in out.endpoints.values_mut() {
                for list in [&mut ce.ingress_policies, &mut ce.egress_policies] {
                    list.retain_mut(|pi| match plan.old_to_new[*pi] {
                        Some(j) => {
                            *pi = j;
                            true
                        }
                        None => false,
                    });
                }
            }
            let mut refs: Vec<Option<PolicyRef>> = (0..set.policies.len()).map(|_| None).collect();
            for (i, r) in std::mem::take(&mut out.policies).into_iter().enumerate() {
                if let Some(j) = plan.old_to_new[i] {
                    refs[j] = Some(r);
                }
            }
            for &j in &plan.added {
                let p = &set.policies[j];
                refs[j] = Some(PolicyRef { key: p.key(), source: p.source.clone() });
            }
            out.policies = refs.into_iter().flatten().collect();
        }
        // The new parts in.
        for (j, part) in incoming {
            let p = &set.policies[j];
            out.rules.extend(part.rule_ids.iter().zip(&part.rules).map(|(id, rule)| (*id, rule.clone())));
            set_isolation(out, &mut merge.isolating, &part, true, &mut touched_endpoints);
            set_listed(out, &part, j, true);
            for &(k, r) in &part.entries {
                let id = part.rule_ids[r as usize];
                touched_keys.insert(k);
                merge.holders.entry(k).or_default().push(id);
                if add_policy_entry(out, &mut merge.plens, k, id) {
                    touched_endpoints.insert(k.endpoint_id);
                }
            }
            if let Some(r) = out.policies.get_mut(j) {
                *r = PolicyRef { key: p.key(), source: p.source.clone() };
            }
            cache.parts.insert(p.key(), part);
            cache.compiled += 1;
        }
        merge.set.clone_from(&set.policies);
        out.usage.policy = out.policy.len();
        let base = merge.generation;
        out.sync = SyncHint::fresh();
        out.sync.delta = Some(Arc::new(Delta {
            base,
            policy: touched_keys.into_iter().collect(),
            endpoint_config: touched_endpoints.into_iter().collect(),
        }));
        merge.generation = out.sync.generation;
        true
    }
}

/// How a new policy set differs from the one compiled: the policies both have (old index ->
/// new index), those whose contents changed, those added and removed.
struct UpdatePlan {
    old_to_new: Vec<Option<usize>>,
    /// (old index, new index)
    changed: Vec<(usize, usize)>,
    /// New indices.
    added: Vec<usize>,
    /// Old indices.
    removed: Vec<usize>,
}

impl UpdatePlan {
    /// None when the policies both sets have are not in the same order.
    fn new(old: &[Arc<NetworkPolicy>], new: &[Arc<NetworkPolicy>]) -> Option<UpdatePlan> {
        fn key(p: &Arc<NetworkPolicy>) -> (&str, &str) {
            (p.namespace.as_str(), p.name.as_str())
        }
        let mut plan = UpdatePlan { old_to_new: vec![None; old.len()], changed: Vec::new(), added: Vec::new(), removed: Vec::new() };
        // Built at the first difference of keys (a policy added or removed) only.
        let mut keys: Option<(HashSet<(&str, &str)>, HashSet<(&str, &str)>)> = None;
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) || key(a) == key(b) => {
                    plan.old_to_new[i] = Some(j);
                    if !Arc::ptr_eq(a, b) && **a != **b {
                        plan.changed.push((i, j));
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), b) => {
                    let (old_keys, new_keys) =
                        keys.get_or_insert_with(|| (old.iter().map(key).collect(), new.iter().map(key).collect()));
                    if !new_keys.contains(&key(a)) {
                        plan.removed.push(i);
                        i += 1;
                    } else if let Some(b) = b
                        && !old_keys.contains(&key(b))
                    {
                        plan.added.push(j);
                        j += 1;
                    } else {
                        // In both sets, at another place: reordered.
                        return None;
                    }
                }
                (None, Some(_)) => {
                    plan.added.push(j);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        Some(plan)
    }
}

/// Adds a POLICY entry allowed by rule `id` (the key keeps the lowest id); counts its port
/// block for the endpoint's config. True when the endpoint's config changed.
fn add_policy_entry(out: &mut Compiled, plens: &mut HashMap<(u32, u8, u8), u32>, key: PolicyKey, id: u32) -> bool {
    match out.policy.entry(key) {
        std::collections::btree_map::Entry::Occupied(mut e) => {
            let v = e.get_mut();
            v.rule_id = v.rule_id.min(id);
            false
        }
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(PolicyValue { rule_id: id, _pad: 0 });
            let plen = key.port_plen;
            if !(1..16).contains(&plen) {
                return false;
            }
            let count = plens.entry((key.endpoint_id, key.direction, plen)).or_default();
            *count += 1;
            if *count > 1 {
                return false;
            }
            match out.endpoint_config.get_mut(&key.endpoint_id) {
                Some(cfg) => {
                    if key.direction == DIRECTION_INGRESS {
                        cfg.ingress_port_plens |= 1 << plen;
                    } else {
                        cfg.egress_port_plens |= 1 << plen;
                    }
                    true
                }
                None => false,
            }
        }
    }
}

/// Removes a POLICY entry no rule allows any more; its port block's bit goes with the last key
/// that used it. True when the endpoint's config changed.
fn remove_policy_entry(out: &mut Compiled, plens: &mut HashMap<(u32, u8, u8), u32>, key: PolicyKey) -> bool {
    if out.policy.remove(&key).is_none() {
        return false;
    }
    let plen = key.port_plen;
    if !(1..16).contains(&plen) {
        return false;
    }
    let hash_map::Entry::Occupied(mut count) = plens.entry((key.endpoint_id, key.direction, plen)) else { return false };
    *count.get_mut() -= 1;
    if *count.get() > 0 {
        return false;
    }
    count.remove();
    match out.endpoint_config.get_mut(&key.endpoint_id) {
        Some(cfg) => {
            if key.direction == DIRECTION_INGRESS {
                cfg.ingress_port_plens &= !(1 << plen);
            } else {
                cfg.egress_port_plens &= !(1 << plen);
            }
            true
        }
        None => false,
    }
}

/// Counts a part's isolation of the endpoints it selects in (`add`) or out, keeping each
/// endpoint's isolation flags in step.
fn set_isolation(out: &mut Compiled, isolating: &mut HashMap<u32, [u32; 2]>, part: &PolicyPart, add: bool, touched: &mut BTreeSet<u32>) {
    for (d, (flag, isolated)) in [(EP_ISOLATED_INGRESS, part.policy.ingress_isolation), (EP_ISOLATED_EGRESS, part.policy.egress_isolation)].into_iter().enumerate() {
        if !isolated {
            continue;
        }
        for &id in &part.selected {
            let Some(cfg) = out.endpoint_config.get_mut(&id) else { continue };
            let count = isolating.entry(id).or_default();
            if add {
                count[d] += 1;
            } else {
                count[d] = count[d].saturating_sub(1);
            }
            if count[d] > 0 {
                cfg.flags |= flag;
            } else {
                cfg.flags &= !flag;
            }
            touched.insert(id);
        }
    }
}

/// Lists (`add`) or unlists policy `pi` (its index in the set) in the policy lists of the
/// endpoints its part selects, per direction it isolates (lists sorted by index).
fn set_listed(out: &mut Compiled, part: &PolicyPart, pi: usize, add: bool) {
    for (d, isolated) in [part.policy.ingress_isolation, part.policy.egress_isolation].into_iter().enumerate() {
        if !isolated {
            continue;
        }
        for &id in &part.selected {
            if !out.endpoint_config.contains_key(&id) {
                continue;
            }
            let Some(ce) = out.endpoints.get_mut(&id) else { continue };
            let list = if d == 0 { &mut ce.ingress_policies } else { &mut ce.egress_policies };
            match (list.binary_search(&pi), add) {
                (Err(at), true) => list.insert(at, pi),
                (Ok(at), false) => {
                    list.remove(at);
                }
                _ => {}
            }
        }
    }
}

/// One policy's compiled part: what it selects, its rules and its allow entries (rule ids
/// relative to its first rule), with the policy and the environment it was compiled in.
#[derive(Debug, Clone)]
struct PolicyPart {
    policy: Arc<NetworkPolicy>,
    /// The prefixes' generation, or 0 for a policy without ipBlock peers.
    environment: u64,
    /// Local endpoints (endpoint ids: stable while the pod is unchanged) its podSelector selects.
    selected: Vec<u32>,
    rules: Vec<RuleRef>,
    /// Each rule's id (set at the merge: stable per policy and rule index).
    rule_ids: Vec<u32>,
    entries: Vec<(PolicyKey, u32)>,
}

/// What compiling one policy reads: the inventory and what the compile derived from it.
struct Resolution<'a> {
    inventory: &'a Inventory,
    /// Each endpoint's labels as selectors see them (service account included).
    selector_labels: &'a [Labels],
    identity_pods: &'a BTreeMap<u32, Vec<usize>>,
    cidr_prefixes: &'a [(Cidr, u32, Option<usize>)],
    ep_ids: &'a [u32],
    ep_identity: &'a [u32],
}

impl Resolution<'_> {
    fn part(&self, p: &Arc<NetworkPolicy>, environment: u64) -> PolicyPart {
        let eps = &self.inventory.endpoints;
        // Only local endpoints are isolated here; a peer-only pod's node isolates it.
        let selected: Vec<usize> = eps
            .iter()
            .enumerate()
            .filter(|(i, e)| !e.peer_only && e.namespace == p.namespace && p.pod_selector.matches(&self.selector_labels[*i]))
            .map(|(i, _)| i)
            .collect();
        let mut rules = Vec::new();
        let mut entries = Vec::new();
        for (direction, isolated, policy_rules) in [
            (DIRECTION_INGRESS, p.ingress_isolation, &p.ingress),
            (DIRECTION_EGRESS, p.egress_isolation, &p.egress),
        ] {
            if !isolated {
                continue;
            }
            for (ri, rule) in policy_rules.iter().enumerate() {
                let rule_index = rules.len() as u32;
                rules.push(RuleRef {
                    policy: p.key(),
                    source: p.source.clone(),
                    direction: if direction == DIRECTION_INGRESS { "ingress" } else { "egress" },
                    index: ri,
                    summary: summarize(rule, direction),
                    named_ports: rule
                        .ports
                        .iter()
                        .filter_map(|pp| match &pp.port {
                            PortSpec::Named(n) => Some((n.clone(), pp.protocol)),
                            _ => None,
                        })
                        .collect(),
                });
                let targets = self.resolve_peers(p, rule);
                for &s in &selected {
                    let local = self.ep_ids[s];
                    for t in &targets {
                        for (peer, proto, plen, port) in ports_for(rule, direction, &eps[s], t, eps, self.ep_identity) {
                            let key = PolicyKey {
                                endpoint_id: local,
                                peer_identity: peer,
                                direction,
                                protocol: proto,
                                port_plen: plen,
                                _pad: 0,
                                port,
                                _pad2: 0,
                            };
                            entries.push((key, rule_index));
                        }
                    }
                }
            }
        }
        let selected = selected.iter().map(|&s| self.ep_ids[s]).collect();
        // Each (key, rule) once: the merge counts every rule that allows a key.
        entries.sort_unstable();
        entries.dedup();
        PolicyPart { policy: p.clone(), environment, selected, rules, rule_ids: Vec::new(), entries }
    }

    fn resolve_peers(&self, p: &NetworkPolicy, rule: &Rule) -> Vec<Target> {
        let (inventory, identity_pods, cidr_prefixes) = (self.inventory, self.identity_pods, self.cidr_prefixes);
        if rule.peers.is_empty() {
            // Any peer; egress named ports resolve against every pod.
            return vec![Target { id: IDENTITY_ANY, endpoints: (0..inventory.endpoints.len()).collect() }];
        }
        let mut by_id: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for peer in &rule.peers {
            match peer {
                Peer::Pods { pod_selector, namespace_selector } => {
                    for (id, pods) in identity_pods {
                        let Some(&first) = pods.first() else { continue };
                        let ep = &inventory.endpoints[first];
                        let ns_ok = match namespace_selector {
                            None => ep.namespace == p.namespace,
                            Some(sel) => inventory.namespace_labels(&ep.namespace).is_some_and(|l| sel.matches(l)),
                        };
                        let pod_ok = pod_selector.as_ref().is_none_or(|sel| sel.matches(&self.selector_labels[first]));
                        if ns_ok && pod_ok {
                            by_id.entry(*id).or_default().extend(pods.iter().copied());
                        }
                    }
                }
                Peer::IpBlock(b) => {
                    // Every prefix inside b.cidr has its trie address in b.cidr's range (a
                    // superset: an IPv6 block's range may hold IPv4-mapped addresses, which
                    // contains_cidr then refuses).
                    let (first, plen) = b.cidr.mapped();
                    let first = u128::from_be_bytes(first);
                    let last = first | u128::MAX.checked_shr(plen).unwrap_or(0);
                    let start = cidr_prefixes.partition_point(|(c, _, _)| trie_address(c) < first);
                    let inside = cidr_prefixes[start..].iter().take_while(|(c, _, _)| trie_address(c) <= last);
                    for (prefix, id, pod) in inside {
                        if b.cidr.contains_cidr(prefix) && !b.except.iter().any(|e| e.contains_cidr(prefix)) {
                            let e = by_id.entry(*id).or_default();
                            e.extend(pod.iter().copied());
                        }
                    }
                }
            }
        }
        by_id
            .into_iter()
            .map(|(id, mut endpoints)| {
                endpoints.sort_unstable();
                endpoints.dedup();
                Target { id, endpoints }
            })
            .collect()
    }
}

/// What changed between the inventory the kept parts were compiled against and the new one:
/// both versions of every changed pod (with the namespace labels each saw), and the namespaces
/// whose labels changed.
struct InventoryDelta<'a> {
    pods: Vec<ChangedPod<'a>>,
    namespaces: bool,
}

struct ChangedPod<'a> {
    endpoint: &'a Endpoint,
    selector_labels: Labels,
    namespace_labels: Option<&'a Labels>,
}

impl<'a> InventoryDelta<'a> {
    /// None when it is not worth finding out (more than [`MAX_CHANGED_PODS`] pods changed).
    fn new(before: &'a Inventory, after: &'a Inventory) -> Option<InventoryDelta<'a>> {
        // The producer's log, when both inventories are its publications; otherwise a compare.
        let changes = match (before.generation(), after.generation()) {
            (0, _) | (_, 0) => None,
            (since, _) => after.changes_since(since),
        }
        .unwrap_or_else(|| ChangeSet::between(before, after));
        if changes.pods.len() > MAX_CHANGED_PODS {
            return None;
        }
        // A few changed pods are looked up by a scan; more, through an index of each side.
        let index = |inventory: &'a Inventory| -> Option<HashMap<String, &'a Endpoint>> {
            (changes.pods.len() > 8).then(|| inventory.endpoints.iter().map(|e| (e.key(), e)).collect())
        };
        let sides = [(before, index(before)), (after, index(after))];
        let mut pods = Vec::with_capacity(2 * changes.pods.len());
        for key in &changes.pods {
            for (inventory, index) in &sides {
                let found = match index {
                    Some(index) => index.get(key).copied(),
                    None => inventory.endpoint(key),
                };
                if let Some(endpoint) = found {
                    pods.push(ChangedPod {
                        endpoint,
                        selector_labels: endpoint.selector_labels(),
                        namespace_labels: inventory.namespace_labels(&endpoint.namespace),
                    });
                }
            }
        }
        Some(InventoryDelta { pods, namespaces: !changes.namespaces.is_empty() })
    }

    /// Whether `p`'s part may differ after this change: a changed pod (old or new version) is
    /// one it selects or one a peer of it matches, or it has an egress rule with a named port
    /// and no peers (resolved against every pod) and some pod changed, or it has a
    /// namespaceSelector and a namespace's labels changed. A superset of what it reads (see
    /// `Resolution::part`).
    fn touches(&self, p: &NetworkPolicy) -> bool {
        let rules = || p.ingress.iter().chain(&p.egress);
        if self.namespaces
            && rules().any(|r| r.peers.iter().any(|peer| matches!(peer, Peer::Pods { namespace_selector: Some(_), .. })))
        {
            return true;
        }
        if self.pods.is_empty() {
            return false;
        }
        let named = |r: &Rule| r.ports.iter().any(|pp| matches!(pp.port, PortSpec::Named(_)));
        if p.egress.iter().any(|r| r.peers.is_empty() && named(r)) {
            return true;
        }
        self.pods.iter().any(|pod| {
            let ep = pod.endpoint;
            if ep.namespace == p.namespace && p.pod_selector.matches(&pod.selector_labels) {
                return true;
            }
            rules().flat_map(|r| &r.peers).any(|peer| match peer {
                Peer::Pods { pod_selector, namespace_selector } => {
                    let ns_ok = match namespace_selector {
                        None => ep.namespace == p.namespace,
                        Some(sel) => pod.namespace_labels.is_some_and(|l| sel.matches(l)),
                    };
                    ns_ok && pod_selector.as_ref().is_none_or(|sel| sel.matches(&pod.selector_labels))
                }
                Peer::IpBlock(b) => ep.ips.iter().any(|ip| b.cidr.contains(*ip)),
            })
        })
    }
}

fn has_ip_blocks(p: &NetworkPolicy) -> bool {
    p.ingress.iter().chain(&p.egress).any(|r| r.peers.iter().any(|peer| matches!(peer, Peer::IpBlock(_))))
}

/// A prefix's address in the trie's 16-byte form, as a number (IPv4 as `::ffff:a.b.c.d`).
fn trie_address(c: &Cidr) -> u128 {
    u128::from_be_bytes(c.mapped().0)
}

/// The IPv4-mapped range `::ffff:0:0/96`: the datapath's 16-byte form of every IPv4 address.
const V4_MAPPED: Cidr = Cidr { addr: IpAddr::V6(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), len: 96 };

/// Whether IPCACHE needs an entry for [`V4_MAPPED`] with the world identity: when an IPv6
/// block covers that range in the trie (`::/0`, `::/64`, any prefix of `::ffff:0:0/96`), IPv4
/// addresses would otherwise match the IPv6 block's entry, and an ipBlock `::/0` would allow
/// every IPv4 peer. IPv4 prefixes and pod addresses are longer, so they still win; an IPv4
/// `0.0.0.0/0` is the same trie key and already says the right thing.
#[derive(Debug, Clone, Copy, Default)]
struct V4Barrier {
    v6_covers: bool,
    v4_any: bool,
}

impl V4Barrier {
    fn with<'a>(self, prefixes: impl IntoIterator<Item = &'a Cidr>) -> V4Barrier {
        let mut out = self;
        for c in prefixes {
            out.v6_covers |= c.addr.is_ipv6() && c.contains_cidr(&V4_MAPPED);
            out.v4_any |= c.addr.is_ipv4() && c.len == 0;
        }
        out
    }

    fn needed(self) -> bool {
        self.v6_covers && !self.v4_any
    }
}

/// (peer identity, protocol, port_plen, port) entries a rule yields for one local endpoint and
/// one peer target.
fn ports_for(
    rule: &Rule,
    direction: u8,
    local: &Endpoint,
    target: &Target,
    eps: &[Endpoint],
    ep_identity: &[u32],
) -> Vec<(u32, u8, u8, u16)> {
    if rule.ports.is_empty() {
        return vec![(target.id, PROTO_ANY, 0, 0)];
    }
    let mut out = Vec::new();
    for pp in &rule.ports {
        let proto = pp.protocol.ip_proto();
        match &pp.port {
            PortSpec::Named(name) => {
                let resolve = |ep: &Endpoint| {
                    ep.ports
                        .iter()
                        .filter(|np| np.name.as_deref() == Some(name.as_str()) && np.protocol == pp.protocol)
                        .map(|np| np.port)
                        .collect::<Vec<_>>()
                };
                if direction == DIRECTION_INGRESS {
                    out.extend(resolve(local).into_iter().map(|p| (target.id, proto, 16, p)));
                } else {
                    for &i in &target.endpoints {
                        let peer = if target.id == IDENTITY_ANY { ep_identity[i] } else { target.id };
                        out.extend(resolve(&eps[i]).into_iter().map(|p| (peer, proto, 16, p)));
                    }
                }
            }
            PortSpec::Any => out.push((target.id, proto, 0, 0)),
            PortSpec::Number(p) => out.push((target.id, proto, 16, *p)),
            PortSpec::Range(a, b) => {
                out.extend(port_blocks(*a, *b).into_iter().map(|(port, plen)| (target.id, proto, plen, port)))
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Splits [a, b] into aligned power-of-two blocks: (first port, prefix length of 16 bits).
pub fn port_blocks(a: u16, b: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let mut start = a as u32;
    let end = b as u32;
    while start <= end {
        let mut size_log = if start == 0 { 16 } else { start.trailing_zeros().min(16) };
        while size_log > 0 && start + (1 << size_log) - 1 > end {
            size_log -= 1;
        }
        out.push((start as u16, (16 - size_log) as u8));
        start += 1 << size_log;
    }
    out
}

fn summarize(rule: &Rule, direction: u8) -> String {
    let peers = if rule.peers.is_empty() {
        "any peer".to_string()
    } else {
        rule.peers
            .iter()
            .map(|p| match p {
                Peer::Pods { pod_selector, namespace_selector } => {
                    let pods = pod_selector.as_ref().map(|s| format!("pods {s}")).unwrap_or_else(|| "all pods".into());
                    match namespace_selector {
                        None => format!("{pods} in the policy's namespace"),
                        Some(ns) => format!("{pods} in namespaces {ns}"),
                    }
                }
                Peer::IpBlock(b) => {
                    if b.except.is_empty() {
                        format!("ipBlock {}", b.cidr)
                    } else {
                        format!(
                            "ipBlock {} except {}",
                            b.cidr,
                            b.except.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",")
                        )
                    }
                }
            })
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let ports = if rule.ports.is_empty() {
        "any port".to_string()
    } else {
        rule.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
    };
    let dir = if direction == DIRECTION_INGRESS { "from" } else { "to" };
    format!("{dir} {peers} on {ports}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_cover_exactly() {
        for (a, b) in [(1u16, 65535u16), (80, 81), (8080, 8090), (0, 65535), (1000, 1000), (32768, 60999)] {
            let blocks = port_blocks(a, b);
            assert!(blocks.len() <= 32, "{a}-{b}: {}", blocks.len());
            let mut covered = 0u32;
            let mut next = a as u32;
            for (start, plen) in blocks {
                assert_eq!(start as u32, next);
                let size = 1u32 << (16 - plen);
                assert_eq!(start as u32 % size, 0, "aligned");
                next += size;
                covered += size;
            }
            assert_eq!(covered, b as u32 - a as u32 + 1);
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
    }

    /// Issue 17, defect 1: pods with the same labels but different named ports do not share
    /// an identity, so an egress rule to a named port reaches only the pods that declare it.
    #[test]
    fn named_ports_split_identities_and_resolve_per_destination_pod() {
        use std::path::Path;

        use crate::segmentation::lookup::lookup;
        use crate::segmentation::matrix::explain;

        let inventory = Inventory::parse(
            &[
                "endpoints:",
                "  - {namespace: np, name: client, labels: {app: client}, ips: [198.18.7.1], cgroup: c}",
                "  - {namespace: np, name: srv-a, labels: {app: srv}, ips: [198.18.7.2], cgroup: a, ports: [{name: grpc, port: 5353, protocol: UDP}]}",
                "  - {namespace: np, name: srv-b, labels: {app: srv}, ips: [198.18.7.3], cgroup: b}",
                "  - {namespace: np, name: srv-c, labels: {app: srv}, ips: [198.18.7.4], cgroup: d, ports: [{name: grpc, port: 6000, protocol: UDP}]}",
            ]
            .join("\n"),
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let policies = PolicySet::parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: e, namespace: np}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: srv}}}], ports: [{port: grpc, protocol: UDP}]}]\n",
            Path::new("p.yaml"),
        )
        .expect("policies");
        let compiled = compile(&inventory, &policies);
        let ep = |k: &str| compiled.endpoint_by_key(k).expect(k).clone();
        let (a, b, c) = (ep("np/srv-a"), ep("np/srv-b"), ep("np/srv-c"));
        assert!(a.identity != b.identity && a.identity != c.identity && b.identity != c.identity, "{a:?} {b:?} {c:?}");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let udp = Protocol::Udp.ip_proto();
        assert!(lookup(&compiled, ip("198.18.7.1"), ip("198.18.7.2"), udp, 5353).allowed);
        assert!(!lookup(&compiled, ip("198.18.7.1"), ip("198.18.7.3"), udp, 5353).allowed, "srv-b has no port named grpc");
        assert!(!lookup(&compiled, ip("198.18.7.1"), ip("198.18.7.4"), udp, 5353).allowed, "srv-c's grpc is 6000");
        assert!(lookup(&compiled, ip("198.18.7.1"), ip("198.18.7.4"), udp, 6000).allowed);
        assert!(!lookup(&compiled, ip("198.18.7.1"), ip("198.18.7.2"), udp, 6000).allowed);

        // `policy explain` names the pods behind the identity and the resolution it used.
        let client = ep("np/client");
        let allowed = explain(&compiled, &client, &a, Protocol::Udp, 5353);
        assert!(allowed.families[0].egress.contains("pods np/srv-a:"), "{allowed:?}");
        assert!(allowed.families[0].egress.contains("grpc=5353/UDP"), "{allowed:?}");
        assert_eq!(allowed.named_ports, ["np/e egress rule 0: port grpc/UDP resolved to UDP/5353 on np/srv-a"]);
        let denied = explain(&compiled, &client, &b, Protocol::Udp, 5353);
        assert!(!denied.allowed && denied.families[0].egress.contains("pods np/srv-b:"), "{denied:?}");
        assert_eq!(denied.named_ports, ["np/e egress rule 0: port grpc/UDP np/srv-b declares no UDP port named grpc: matches nothing there"]);
    }

    /// Issue 10: a set that does not fit the maps names the policy that tipped it; what is
    /// compiled fits, the tipping and later policies still isolate but allow nothing.
    #[test]
    fn over_capacity_names_the_tipping_policy_and_fails_closed() {
        use std::path::Path;

        let inventory = Inventory::parse(
            &[
                "endpoints:",
                "  - {namespace: cap, name: client, labels: {app: client}, ips: [198.18.8.1], cgroup: c}",
                "  - {namespace: cap, name: srv, labels: {app: srv}, ips: [198.18.8.2], cgroup: s}",
                "  - {namespace: cap, name: other, labels: {app: other}, ips: [198.18.8.3], cgroup: o}",
            ]
            .join("\n"),
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let doc = |name: &str, spec: &str| format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: cap}}\nspec:\n{spec}");
        let small = doc("srv-in", "  podSelector: {matchLabels: {app: srv}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n");
        let big = doc("big", "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 1, endPort: 65534}]}]\n");
        let blocks = doc("blocks", "  podSelector: {matchLabels: {app: other}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.0.0/16]}}]}]\n");
        let set = PolicySet::parse(&format!("{small}---\n{big}---\n{blocks}"), Path::new("p.yaml")).expect("policies");
        let full = compile(&inventory, &set);
        assert!(full.over_capacity.is_none());
        assert!(full.policy.len() > 20, "{}", full.policy.len());

        let capacity = Capacity { policy: 20, ..Capacity::default() };
        let c = Compiler::with_capacity(capacity).compile(&inventory, &set);
        let over = c.over_capacity.clone().expect("over capacity");
        assert_eq!(over.map, "POLICY");
        assert!(over.what.contains("cap/big") && over.what.contains("p.yaml: document 2"), "{over}");
        assert_eq!(over.needed, full.policy.len(), "the count is of the whole set");
        assert_eq!(c.usage.policy, full.policy.len());
        assert!(c.policy.len() <= 20);
        assert!(over.to_string().contains("POLICY"), "{over}");
        // Before the tip: srv-in's allow is in. From it on: isolation, no allows, no prefixes.
        let ep = |k: &str| c.endpoint_by_key(k).expect(k).clone();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(crate::segmentation::lookup::lookup(&c, ip("198.18.8.1"), ip("198.18.8.2"), 6, 80).allowed);
        assert!(!crate::segmentation::lookup::lookup(&c, ip("198.18.8.3"), ip("198.18.8.2"), 6, 80).allowed);
        assert!(!crate::segmentation::lookup::lookup(&c, ip("198.18.8.1"), ip("198.18.8.3"), 6, 80).allowed, "big still isolates other");
        assert!(c.endpoint_config[&ep("cap/other").id].flags & EP_ISOLATED_EGRESS != 0, "blocks still isolates other's egress");

        // IPCACHE: 3 pod addresses + 3 prefixes of `blocks` need 6 entries.
        let capacity = Capacity { ipcache: 5, ..Capacity::default() };
        let c = Compiler::with_capacity(capacity).compile(&inventory, &set);
        let over = c.over_capacity.clone().expect("over capacity");
        assert_eq!((over.map, over.needed, over.capacity), ("IPCACHE", 6, 5), "{over}");
        assert!(over.what.contains("cap/blocks"), "{over}");
        assert!(c.ipcache.len() <= 5);
        assert!(!c.identities.values().any(|i| matches!(i, IdentityKind::Cidr { .. })), "no prefixes of policies past the tip");
    }

    #[test]
    fn a_peer_only_endpoint_matches_selectors_as_a_peer_but_is_not_isolated() {
        use std::path::Path;

        use crate::segmentation::lookup::{HookDecision, lookup};

        let inventory = Inventory::parse(
            &[
                "endpoints:",
                "  - {namespace: shop, name: web, labels: {app: web}, ips: [198.18.0.1], cgroup: pods/web, ports: [{name: http, port: 8080}]}",
                "  - {namespace: shop, name: remote, labels: {app: frontend}, ips: [198.18.0.2], peerOnly: true}",
                "  - {namespace: shop, name: remote-db, labels: {app: db}, ips: [198.18.0.3], peerOnly: true, ports: [{name: sql, port: 5432}]}",
            ]
            .join("\n"),
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let policies = PolicySet::parse(
            &[
                "apiVersion: networking.k8s.io/v1",
                "kind: NetworkPolicy",
                "metadata: {name: web-ingress, namespace: shop}",
                "spec:",
                "  podSelector: {matchLabels: {app: web}}",
                "  policyTypes: [Ingress, Egress]",
                "  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{port: http}]}]",
                "  egress: [{to: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: sql}]}]",
                "---",
                "apiVersion: networking.k8s.io/v1",
                "kind: NetworkPolicy",
                "metadata: {name: deny-all, namespace: shop}",
                "spec:",
                "  podSelector: {}",
                "  policyTypes: [Ingress, Egress]",
            ]
            .join("\n"),
            Path::new("policies.yaml"),
        )
        .expect("policies");
        let compiled = compile(&inventory, &policies);
        let web = compiled.endpoint_by_key("shop/web").expect("web").clone();
        let remote = compiled.endpoint_by_key("shop/remote").expect("remote").clone();
        let db = compiled.endpoint_by_key("shop/remote-db").expect("remote-db").clone();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        // The peer: an identity of its labels, found by IP, but never a local endpoint.
        assert!(remote.peer_only && remote.cgroup.is_none());
        assert!(matches!(
            compiled.identities.get(&remote.identity),
            Some(IdentityKind::Labels { labels, .. }) if labels.get("app").is_some_and(|a| a == "frontend")
        ));
        let cached = crate::segmentation::lookup::lpm(&compiled.ipcache, &crate::segmentation::lookup::addr16(ip("198.18.0.2"))).expect("in the ipcache");
        assert_eq!((cached.identity, cached.endpoint_id), (remote.identity, 0));
        // Not isolated, even by a policy that selects every pod: no config, no entries of its own.
        for peer in [&remote, &db] {
            assert!(peer.ingress_policies.is_empty() && peer.egress_policies.is_empty());
            assert!(!compiled.endpoint_config.contains_key(&peer.id));
            assert!(!compiled.policy.keys().any(|k| k.endpoint_id == peer.id));
        }
        assert_eq!(web.ingress_policies.len(), 2);
        assert_eq!(compiled.local_endpoints().map(|e| e.key()).collect::<Vec<_>>(), ["shop/web"]);

        // Matched as a peer by the podSelector: allowed into web on http, by web's ingress rule.
        let v = lookup(&compiled, ip("198.18.0.2"), ip("198.18.0.1"), 6, 8080);
        assert!(v.allowed, "{v:?}");
        assert_eq!(v.egress, HookDecision::NotEndpoint, "the peer's egress is its own node's");
        assert!(matches!(v.ingress, Some(HookDecision::Allowed { peer_identity, .. }) if peer_identity == remote.identity), "{v:?}");
        // A peer without the label stays denied; so does the right peer on another port.
        assert!(!lookup(&compiled, ip("198.18.0.3"), ip("198.18.0.1"), 6, 8080).allowed);
        assert!(!lookup(&compiled, ip("198.18.0.2"), ip("198.18.0.1"), 6, 9090).allowed);
        // Egress named ports resolve against the peer-only destination's own ports.
        assert!(lookup(&compiled, ip("198.18.0.1"), ip("198.18.0.3"), 6, 5432).allowed);
        assert!(!lookup(&compiled, ip("198.18.0.1"), ip("198.18.0.2"), 6, 5432).allowed);

        // The operator tools name the peers and do not claim to enforce at them.
        let m = crate::segmentation::matrix::matrix(&compiled, crate::inventory::Protocol::Tcp, 8080);
        assert_eq!(m.peers, ["shop/remote", "shop/remote-db"]);
        assert!(crate::segmentation::matrix::table(&m).contains("peer-only"));
        let e = crate::segmentation::matrix::explain(&compiled, &remote, &web, crate::inventory::Protocol::Tcp, 8080);
        assert!(e.allowed && e.egress_policies.is_empty(), "{e:?}");
        assert!(e.families[0].egress.contains("not enforced here"), "{e:?}");
        assert!(e.families[0].ingress.contains("shop/web-ingress"), "{e:?}");
    }

    #[test]
    fn id_tables_stay_bounded_under_churn_and_label_ids_never_reach_the_cidr_range() {
        use std::path::Path;

        use crate::segmentation::lookup::lookup;

        // Hostile churn (issue 18): every round brings pods, label sets and ipBlock prefixes
        // never seen before (a rollout's pod-template-hash, a CronJob's controller-uid). The
        // label range is cut to 64 ids so that the churn wraps it many times over.
        let mut compiler = Compiler::default();
        let label_end = IDENTITY_LABEL_FIRST + 64;
        compiler.labels = Alloc::new(IDENTITY_LABEL_FIRST, label_end);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut previous: BTreeSet<u32> = BTreeSet::new();
        for round in 0..1_000u32 {
            let inventory = Inventory::parse(
                &[
                    "endpoints:".to_string(),
                    format!("  - {{namespace: shop, name: web-{round}, labels: {{app: web, rev: r{round}}}, ips: [198.18.0.1], cgroup: pods/web}}"),
                    format!("  - {{namespace: shop, name: fe-{round}, labels: {{app: frontend, rev: r{round}}}, ips: [198.18.0.2], cgroup: pods/fe}}"),
                    format!("  - {{namespace: shop, name: other-{round}, labels: {{app: other, rev: r{round}}}, ips: [198.18.0.3], cgroup: pods/other}}"),
                ]
                .join("\n"),
                Path::new("inv.yaml"),
            )
            .expect("inventory");
            let policies = PolicySet::parse(
                &[
                    "apiVersion: networking.k8s.io/v1".to_string(),
                    "kind: NetworkPolicy".into(),
                    "metadata: {name: web, namespace: shop}".into(),
                    "spec:".into(),
                    "  podSelector: {matchLabels: {app: web}}".into(),
                    "  ingress:".into(),
                    "  - from: [{podSelector: {matchLabels: {app: frontend}}}]".into(),
                    "    ports: [{port: 80}]".into(),
                    format!("  - from: [{{ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.{}.0/24]}}}}]", round % 250, round % 250, round / 250),
                ]
                .join("\n"),
                Path::new("policies.yaml"),
            )
            .expect("policies");
            let c = compiler.compile(&inventory, &policies);
            compiler.in_force();
            assert!(c.over_capacity.is_none(), "round {round}: {:?}", c.over_capacity);
            // The tables hold what the last two compiles used, not everything ever seen.
            assert!(compiler.endpoints.len() <= 6, "round {round}: {} endpoint keys", compiler.endpoints.len());
            assert!(compiler.labels.len() <= 6, "round {round}: {} label keys", compiler.labels.len());
            assert!(compiler.cidrs.len() <= 10, "round {round}: {} prefix keys", compiler.cidrs.len());
            let labels: BTreeSet<u32> = c.endpoints.values().map(|e| e.identity).collect();
            assert_eq!(labels.len(), 3, "round {round}: three label sets, three identities");
            assert!(labels.iter().all(|id| (IDENTITY_LABEL_FIRST..label_end).contains(id)), "round {round}: {labels:?}");
            // An id is not handed to a new label set while the compile before (maybe the set
            // still in force) holds it.
            assert!(labels.is_disjoint(&previous), "round {round}: {labels:?} reuses {previous:?}");
            assert!(
                c.identities.iter().all(|(id, kind)| matches!(kind, IdentityKind::Cidr { .. }) == (*id >= IDENTITY_CIDR_FIRST)),
                "round {round}: {:?}",
                c.identities
            );
            // And the result still says what the policy says.
            assert!(lookup(&c, ip("198.18.0.2"), ip("198.18.0.1"), 6, 80).allowed, "round {round}");
            assert!(!lookup(&c, ip("198.18.0.3"), ip("198.18.0.1"), 6, 80).allowed, "round {round}");
            previous = labels;
        }
        // The real ranges: label ids end where CIDR ids begin.
        let fresh = Compiler::default();
        assert_eq!(fresh.labels.end, IDENTITY_CIDR_FIRST);
        assert_eq!(fresh.cidrs.first, IDENTITY_CIDR_FIRST);
    }

    /// Issue 17: a pod change recompiles the policies that select or admit the pod, not the set;
    /// the result is still a full compile's.
    #[test]
    fn a_pod_change_recompiles_only_the_policies_that_read_the_pod() {
        use std::path::Path;

        let inventory = |web_labels: &str, db_port: u16| {
            Inventory::parse(
                &[
                    "namespaces: [{name: shop, labels: {team: x}}, {name: ops}]".to_string(),
                    "endpoints:".into(),
                    format!("  - {{namespace: shop, name: web, labels: {{{web_labels}}}, ips: [198.18.9.1], cgroup: w}}"),
                    format!("  - {{namespace: shop, name: db, labels: {{app: db}}, ips: [198.18.9.2], cgroup: d, ports: [{{name: sql, port: {db_port}}}]}}"),
                    "  - {namespace: ops, name: tool, labels: {app: tool}, ips: [198.18.9.3], cgroup: t}".into(),
                ]
                .join("\n"),
                Path::new("inv.yaml"),
            )
            .expect("inventory")
        };
        let doc = |name: &str, ns: &str, spec: &str| {
            format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
        };
        let set = PolicySet::parse(
            &[
                doc("web-in", "shop", "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: tool}}, namespaceSelector: {}}]}]\n"),
                doc("db-in", "shop", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n"),
                doc("tool-out", "ops", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 198.18.9.2/32}}], ports: [{port: sql}]}]\n"),
                doc("ops-in", "ops", "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]\n"),
            ]
            .join("---\n"),
            Path::new("p.yaml"),
        )
        .expect("policies");
        let mut compiler = Compiler::default();
        let check = |compiler: &mut Compiler, inv: &Inventory, expected: usize, what: &str| {
            let c = compiler.compile(inv, &set);
            compiler.in_force();
            assert_eq!(compiler.parts_compiled(), expected, "{what}");
            assert_eq!(c, compiler.without_cache().compile(inv, &set), "{what}: equals a full compile");
            c
        };
        check(&mut compiler, &inventory("app: web", 5432), 4, "the first compile");
        check(&mut compiler, &inventory("app: web", 5432), 0, "nothing changed");
        // web's extra label: web-in selects it, db-in admits it; the ops policies never see it.
        check(&mut compiler, &inventory("app: web, rev: '2'", 5432), 2, "web relabelled");
        // db's named port: db-in selects db, tool-out's ipBlock covers its address.
        let c = check(&mut compiler, &inventory("app: web, rev: '2'", 6432), 2, "db's named port");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // tool's egress (db's own ingress policy admits web only) follows db's named port.
        let egress = |port| crate::segmentation::lookup::lookup(&c, ip("198.18.9.3"), ip("198.18.9.2"), 6, port).egress;
        assert!(matches!(egress(6432), crate::segmentation::lookup::HookDecision::Allowed { .. }), "{:?}", egress(6432));
        assert!(!matches!(egress(5432), crate::segmentation::lookup::HookDecision::Allowed { .. }), "{:?}", egress(5432));
        // web leaves the app: web-in no longer selects it, db-in no longer admits it.
        let c = check(&mut compiler, &inventory("app: other", 6432), 2, "web's app label gone");
        assert!(!crate::segmentation::lookup::lookup(&c, ip("198.18.9.1"), ip("198.18.9.2"), 6, 80).allowed);
    }

    /// Issue 17: a change of policies alone (changed, added, removed) updates the contents in
    /// force in place (the parts that changed compiled, the keys that may differ named for the
    /// datapath), equal to a full compile; a reordered set, a changed ipBlock policy or a
    /// change past the map's capacity takes the full merge.
    #[test]
    fn a_policy_change_updates_the_contents_in_place() {
        use std::path::Path;

        let inventory = Inventory::parse(
            "endpoints:\n  - {namespace: s, name: web, labels: {app: web}, ips: [198.18.9.1], cgroup: w}\n  - {namespace: s, name: db, labels: {app: db}, ips: [198.18.9.2], cgroup: d}\n",
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let doc = |name: &str, spec: &str| {
            PolicySet::parse(&format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: s}}\nspec:\n{spec}"), Path::new("p.yaml"))
                .expect("policy")
                .policies
                .remove(0)
        };
        let web = |port: u16| doc("web-in", &format!("  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: [{{podSelector: {{}}}}], ports: [{{port: {port}}}]}}]\n"));
        // Two policies allowing the same key: its value is the lower rule id, whichever goes.
        let db = |port: u16| doc("db-in", &format!("  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{{port: {port}}}, {{port: 1, endPort: 1000}}]}}]\n"));
        let db_too = doc("db-too", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n");
        let mut set = PolicySet { policies: vec![web(80), db(5432), db_too] };
        let mut compiler = Compiler::default();
        let mut current = Arc::new(compiler.compile(&inventory, &set));
        compiler.in_force();
        let check = |compiler: &mut Compiler, current: &mut Arc<Compiled>, set: &PolicySet, in_place: bool, what: &str| {
            let before = current.sync.generation;
            let updated = compiler.update_in_place(&inventory, set, current);
            assert_eq!(updated, in_place, "{what}");
            if !updated {
                *current = Arc::new(compiler.compile(&inventory, set));
            }
            compiler.in_force();
            assert_eq!(**current, compiler.without_cache().compile(&inventory, set), "{what}: equals a full compile");
            assert_ne!(current.sync.generation, before, "{what}: a new generation");
        };
        // web's port: one part compiled, its keys named.
        set.policies[0] = web(8080);
        check(&mut compiler, &mut current, &set, true, "web's port");
        assert_eq!(compiler.parts_compiled(), 1);
        let delta = current.sync.delta.clone().expect("a delta");
        assert_eq!(delta.policy.len(), 4, "the old keys and the new ones (two peers each): {delta:?}");
        // db's port range goes: the shared 5432 key stays (db-too still allows it), the port
        // blocks and their plen bits go.
        let db_id = current.endpoint_by_key("s/db").expect("db").id;
        assert_ne!(current.endpoint_config[&db_id].ingress_port_plens, 0);
        set.policies[1] = doc("db-in", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]\n");
        check(&mut compiler, &mut current, &set, true, "db's range gone");
        assert_eq!(current.endpoint_config[&db_id].ingress_port_plens, 0);
        assert!(current.sync.delta.as_ref().expect("delta").endpoint_config.contains(&db_id));
        // db's isolation goes with its policies' ingress: policyTypes Egress only.
        set.policies[1] = doc("db-in", "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n");
        set.policies[2] = doc("db-too", "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n");
        check(&mut compiler, &mut current, &set, true, "db's ingress isolation gone");
        assert_eq!(current.endpoint_config[&db_id].flags, EP_ISOLATED_EGRESS);
        // The same contents in new objects: nothing changes, same generation.
        let same = PolicySet { policies: set.policies.iter().map(|p| Arc::new(NetworkPolicy::clone(p))).collect() };
        let generation = current.sync.generation;
        assert!(compiler.update_in_place(&inventory, &same, &mut current));
        assert_eq!(current.sync.generation, generation);
        // Added, removed: in place too, the policy lists renumbered.
        set.policies.insert(1, doc("new", "  podSelector: {}\n  ingress: [{}]\n"));
        check(&mut compiler, &mut current, &set, true, "a policy added");
        assert_eq!(current.endpoint_by_key("s/web").expect("web").ingress_policies, [0, 1]);
        set.policies.remove(0);
        check(&mut compiler, &mut current, &set, true, "a policy removed");
        assert_eq!(current.endpoint_by_key("s/web").expect("web").ingress_policies, [0]);
        // Reordered: the full merge.
        set.policies.swap(0, 1);
        check(&mut compiler, &mut current, &set, false, "reordered");
        // An ipBlock policy changed: the prefixes may change, the full merge.
        set.policies[0] = doc("db-in", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]\n");
        check(&mut compiler, &mut current, &set, false, "an ipBlock");
        // Past the POLICY map's capacity: the full merge finds the tipping point.
        let mut small = Compiler::with_capacity(Capacity { policy: 3, ..Capacity::default() });
        let mut set = PolicySet { policies: vec![web(80)] };
        let mut current = Arc::new(small.compile(&inventory, &set));
        small.in_force();
        set.policies[0] = doc("web-in", "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: 80}, {port: 81}, {port: 82}]}]\n");
        assert!(!small.update_in_place(&inventory, &set, &mut current), "2 peers x 3 ports do not fit 3 entries");
        assert!(small.compile(&inventory, &set).over_capacity.is_some());
    }

    #[test]
    fn an_exhausted_id_range_allows_nothing() {
        use std::path::Path;

        let mut compiler = Compiler::default();
        compiler.labels = Alloc::new(IDENTITY_LABEL_FIRST, IDENTITY_LABEL_FIRST + 2);
        let inventory = Inventory::parse(
            "endpoints:\n  - {namespace: a, name: p1, labels: {x: '1'}, ips: [198.18.0.1], cgroup: pods/p1}\n  - {namespace: a, name: p2, labels: {x: '2'}, ips: [198.18.0.2], cgroup: pods/p2}\n  - {namespace: a, name: p3, labels: {x: '3'}, ips: [198.18.0.3], cgroup: pods/p3}",
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let policies = PolicySet::parse(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: open, namespace: a}\nspec:\n  podSelector: {}\n  ingress: [{}]",
            Path::new("p.yaml"),
        )
        .expect("policies");
        let c = compiler.compile(&inventory, &policies);
        assert!(c.over_capacity.is_some(), "three label sets, two ids: refused");
        assert!(c.policy.is_empty(), "nothing allowed: {:?}", c.policy);
    }
}
