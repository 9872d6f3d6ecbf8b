//! Endpoint inventory: the pods palisade knows about, with their namespaces, labels, IPs, named
//! ports and cgroups. Standalone mode reads it from a YAML file (DESIGN.md, "Endpoint inventory");
//! the Kubernetes source fills the same model.
//!
//! Two kinds of endpoint:
//! - *local* endpoints (the default) run on this node: they are monitored (their cgroup is in
//!   the probes' filter), segmented (the datapath is attached to their cgroup and enforces the
//!   policies that select them) and can be quarantined. One without a `cgroup` (or whose cgroup
//!   does not exist yet) is reported as unresolved and retried.
//! - *peer-only* endpoints (`peerOnly: true`) run elsewhere, e.g. pods on other nodes of the
//!   cluster. They exist so that NetworkPolicy peers match them by labels wherever they run: they
//!   get an identity and their addresses are known to the datapath, but they are never
//!   monitored, attached, isolated or quarantined from this node (their own node does that), and
//!   they must not name a `cgroup`. Addresses stay unique across both kinds.
//!
//! ```yaml
//! endpoints:
//!   - namespace: shop
//!     name: frontend-7          # runs on another node
//!     labels: {app: frontend}
//!     ips: [198.18.2.17]
//!     peerOnly: true
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub mod watch;

/// The label every namespace carries automatically (as in Kubernetes).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The pseudo-label that exposes an endpoint's service account to selectors.
pub const SERVICE_ACCOUNT_LABEL: &str = "palisade.io/serviceaccount";

pub type Labels = BTreeMap<String, String>;

/// The largest inventory file read (checked before reading and parsing). 65,536 endpoints, as
/// many as the datapath holds, take about 20 MB of YAML.
pub const MAX_INVENTORY_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Past a limit checked before parsing (size, nesting depth).
    #[error("{path}: {source}")]
    Limit {
        path: PathBuf,
        #[source]
        source: crate::yaml::YamlInputError,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        /// Where in the document, e.g. `endpoints[2].ips[0]`.
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub ports: Vec<NamedPort>,
    /// cgroup path relative to the cgroup2 mount.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The pod runs elsewhere (another node): a policy peer only, never monitored, enforced at
    /// or quarantined from here; it has no cgroup (see the module documentation).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peer_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// IANA protocol number, as the datapath sees it.
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace as selectors see it: its labels include `kubernetes.io/metadata.name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// One endpoint (pod) with everything the other stages need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    /// The pod's own labels (without the service-account pseudo-label).
    pub labels: Labels,
    pub service_account: Option<String>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    /// Always `None` for a peer-only endpoint.
    pub cgroup: Option<String>,
    /// Runs elsewhere: matched by selectors as a peer, never monitored, isolated, attached or
    /// quarantined on this node.
    pub peer_only: bool,
}

impl Endpoint {
    /// `namespace/name`, the way operators name pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Labels as pod selectors see them: the pod's labels plus the service-account pseudo-label.
    pub fn selector_labels(&self) -> Labels {
        let mut labels = self.labels.clone();
        if let Some(sa) = &self.service_account {
            labels.insert(SERVICE_ACCOUNT_LABEL.to_string(), sa.clone());
        }
        labels
    }
}

/// A validated inventory. Namespaces referenced by endpoints but not listed exist implicitly.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inventory {
    pub namespaces: BTreeMap<String, Namespace>,
    pub endpoints: Vec<Endpoint>,
    /// Which publication this is and what changed in the ones before, when the producer
    /// records it (the Kubernetes source does; a file reload does not). Not part of equality.
    #[serde(skip)]
    pub history: Option<Arc<ChangeLog>>,
}

impl PartialEq for Inventory {
    /// Same namespaces and endpoints; the history says how it came about, not what it is.
    fn eq(&self, other: &Inventory) -> bool {
        self.namespaces == other.namespaces && self.endpoints == other.endpoints
    }
}

impl Eq for Inventory {}

/// What changed from one inventory to the next: the consumer's delta (issue 18). Every pod in
/// `pods` was added, changed (labels, service account, addresses, named ports, cgroup,
/// placement) or removed: look it up in the new inventory (absent = removed). Everything else
/// is as it was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// `namespace/name`.
    pub pods: BTreeSet<String>,
    /// Namespaces whose labels changed, appeared or went.
    pub namespaces: BTreeSet<String>,
}

impl ChangeSet {
    /// What differs between `before` and `after`, by pod and by namespace: one pass over each.
    pub fn between(before: &Inventory, after: &Inventory) -> ChangeSet {
        let mut changes = ChangeSet::default();
        let old: std::collections::HashMap<(&str, &str), &Endpoint> =
            before.endpoints.iter().map(|e| ((e.namespace.as_str(), e.name.as_str()), e)).collect();
        let mut seen = std::collections::HashSet::with_capacity(after.endpoints.len());
        for ep in &after.endpoints {
            let key = (ep.namespace.as_str(), ep.name.as_str());
            seen.insert(key);
            if old.get(&key).is_none_or(|previous| *previous != ep) {
                changes.pods.insert(ep.key());
            }
        }
        for (key, ep) in &old {
            if !seen.contains(key) {
                changes.pods.insert(ep.key());
            }
        }
        for (name, ns) in &after.namespaces {
            if before.namespaces.get(name) != Some(ns) {
                changes.namespaces.insert(name.clone());
            }
        }
        for name in before.namespaces.keys() {
            if !after.namespaces.contains_key(name) {
                changes.namespaces.insert(name.clone());
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.namespaces.is_empty()
    }

    fn extend(&mut self, other: &ChangeSet) {
        self.pods.extend(other.pods.iter().cloned());
        self.namespaces.extend(other.namespaces.iter().cloned());
    }

    fn len(&self) -> usize {
        self.pods.len() + self.namespaces.len()
    }
}

/// The producer's record of its publications: a generation number per published inventory
/// and the changes of the last ones, bounded ([`ChangeLog::MAX_ENTRIES`] publications,
/// [`ChangeLog::MAX_KEYS`] pods and namespaces), so a consumer that missed some publications (a
/// `watch` channel keeps only the latest) still gets their union, or learns that it must look
/// at everything.
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    generation: u64,
    /// The oldest generation the log can answer from: `changes_since(g)` for `g >= base`.
    base: u64,
    entries: std::collections::VecDeque<(u64, Arc<ChangeSet>)>,
    keys: usize,
}

impl ChangeLog {
    pub const MAX_ENTRIES: usize = 256;
    pub const MAX_KEYS: usize = 65_536;

    /// A log whose first publication is generation 1.
    pub fn new() -> ChangeLog {
        ChangeLog { generation: 1, base: 1, ..ChangeLog::default() }
    }

    /// Records the next publication's changes and returns its generation.
    pub fn record(&mut self, changes: ChangeSet) -> u64 {
        self.generation += 1;
        self.keys += changes.len();
        self.entries.push_back((self.generation, Arc::new(changes)));
        while self.entries.len() > Self::MAX_ENTRIES || (self.keys > Self::MAX_KEYS && self.entries.len() > 1) {
            if let Some((generation, dropped)) = self.entries.pop_front() {
                self.keys -= dropped.len();
                self.base = generation;
            }
        }
        self.generation
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Everything that changed after generation `since` up to this one; `None` when the log
    /// does not reach back that far (or `since` is from the future): look at everything.
    pub fn changes_since(&self, since: u64) -> Option<ChangeSet> {
        if since < self.base || since > self.generation {
            return None;
        }
        let mut union = ChangeSet::default();
        for (_, changes) in self.entries.iter().filter(|(generation, _)| *generation > since) {
            union.extend(changes);
        }
        Some(union)
    }
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = Inventory::read(path)?;
        Inventory::parse(&text, path)
    }

    /// The text of an inventory file, refused past [`MAX_INVENTORY_BYTES`] without reading it.
    pub fn read(path: &Path) -> Result<String, InventoryError> {
        crate::yaml::read_limited(path, MAX_INVENTORY_BYTES).map_err(|err| match err {
            crate::yaml::YamlInputError::Read(source) => InventoryError::Read { path: path.to_path_buf(), source },
            source => InventoryError::Limit { path: path.to_path_buf(), source },
        })
    }

    /// Parse and validate; `path` only names the source in errors. Size and nesting depth are
    /// checked before the parser runs (see [`crate::yaml`]); a byte-order mark is accepted.
    pub fn parse(text: &str, path: &Path) -> Result<Inventory, InventoryError> {
        let text = crate::yaml::strip_bom(text);
        crate::yaml::check(text, MAX_INVENTORY_BYTES)
            .map_err(|source| InventoryError::Limit { path: path.to_path_buf(), source })?;
        let file: InventoryFile = serde_norway::from_str(text).map_err(|err| {
            let (line, column) = err
                .location()
                .map(|loc| (loc.line(), loc.column()))
                .unwrap_or((0, 0));
            InventoryError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: err.to_string(),
            }
        })?;
        Inventory::from_file(file, path)
    }

    /// Validates `file`; the first invalid entry is the error (naming its field).
    pub fn from_file(file: InventoryFile, path: &Path) -> Result<Inventory, InventoryError> {
        let mut validator = Validator::new(path, file.endpoints.len());
        for (i, ns) in file.namespaces.into_iter().enumerate() {
            validator.namespace(i, ns)?;
        }
        for (i, ep) in file.endpoints.into_iter().enumerate() {
            validator.endpoint(i, ep)?;
        }
        Ok(validator.finish())
    }

    /// Validates `file` entry by entry: an invalid namespace or endpoint is left out and
    /// returned with its error, and the rest is kept, as if the rejected entries had never been
    /// listed (a rejected endpoint reserves neither its name nor an address). One pass: each
    /// entry is checked once against the entries kept before it, so many entries rejected for
    /// one shared address cost no more than as many valid ones.
    pub fn from_file_skipping(file: InventoryFile, path: &Path) -> (Inventory, Vec<SkippedEntry>) {
        let mut validator = Validator::new(path, file.endpoints.len());
        let mut skipped = Vec::new();
        for (i, ns) in file.namespaces.into_iter().enumerate() {
            let name = ns.name.clone();
            if let Err(error) = validator.namespace(i, ns) {
                skipped.push(SkippedEntry { entry: format!("namespace {name}"), error });
            }
        }
        for (i, ep) in file.endpoints.into_iter().enumerate() {
            let pod = format!("pod {}/{}", ep.namespace, ep.name);
            if let Err(error) = validator.endpoint(i, ep) {
                skipped.push(SkippedEntry { entry: pod, error });
            }
        }
        (validator.finish(), skipped)
    }

    /// The producer's generation of this inventory (0 when it keeps no [`ChangeLog`]).
    pub fn generation(&self) -> u64 {
        self.history.as_ref().map_or(0, |log| log.generation())
    }

    /// What changed since the inventory of generation `since` (pods and namespaces to look at
    /// again); `None` when unknown: the producer keeps no log (files), or it does not reach
    /// back that far. A consumer that gets `None` looks at everything.
    pub fn changes_since(&self, since: u64) -> Option<ChangeSet> {
        self.history.as_ref()?.changes_since(since)
    }

    /// Endpoints that run on this node (not peer-only).
    pub fn local_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| !e.peer_only)
    }

    pub fn endpoint(&self, key: &str) -> Option<&Endpoint> {
        let (ns, name) = key.split_once('/')?;
        self.endpoints.iter().find(|e| e.namespace == ns && e.name == name)
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace).map(|ns| &ns.labels)
    }
}

/// An entry [`Inventory::from_file_skipping`] left out.
#[derive(Debug)]
pub struct SkippedEntry {
    /// `namespace NAME` or `pod NAMESPACE/NAME`.
    pub entry: String,
    /// Always [`InventoryError::Invalid`], naming the entry's field.
    pub error: InventoryError,
}

impl SkippedEntry {
    /// The field within the entry (`ips[0]`) and the message, without the entry's index.
    pub fn reason(&self) -> String {
        match &self.error {
            InventoryError::Invalid { field, message, .. } => {
                let tail = field.split_once("].").map(|(_, tail)| tail).unwrap_or(field);
                format!("{tail}: {message}")
            }
            other => other.to_string(),
        }
    }
}

/// Checks entries one at a time against the entries kept before them. An entry is checked
/// whole before anything of it is recorded, so a rejected one leaves no trace.
struct Validator<'a> {
    path: &'a Path,
    namespaces: BTreeMap<String, Namespace>,
    endpoints: Vec<Endpoint>,
    names: std::collections::HashSet<(String, String)>,
    /// Canonical address -> the pod (`namespace/name`) that has it.
    ips: std::collections::HashMap<IpAddr, String>,
    /// cgroup path (without the leading '/') -> the pod that has it.
    cgroups: std::collections::HashMap<String, String>,
}

impl<'a> Validator<'a> {
    fn new(path: &'a Path, endpoints: usize) -> Validator<'a> {
        Validator {
            path,
            namespaces: BTreeMap::new(),
            endpoints: Vec::with_capacity(endpoints),
            names: Default::default(),
            ips: Default::default(),
            cgroups: Default::default(),
        }
    }

    fn invalid(&self, field: String, message: String) -> InventoryError {
        InventoryError::Invalid { path: self.path.to_path_buf(), field, message }
    }

    fn namespace(&mut self, i: usize, ns: NamespaceSpec) -> Result<(), InventoryError> {
        validate_dns_label(&ns.name).map_err(|m| self.invalid(format!("namespaces[{i}].name"), m))?;
        for (k, v) in &ns.labels {
            validate_label(k, v).map_err(|m| self.invalid(format!("namespaces[{i}].labels.{k}"), m))?;
        }
        if self.namespaces.contains_key(&ns.name) {
            return Err(self.invalid(format!("namespaces[{i}].name"), format!("duplicate namespace {:?}", ns.name)));
        }
        let mut labels = ns.labels;
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), ns.name.clone());
        self.namespaces.insert(ns.name.clone(), Namespace { name: ns.name, labels });
        Ok(())
    }

    fn endpoint(&mut self, i: usize, ep: EndpointSpec) -> Result<(), InventoryError> {
        let at = |field: &str| format!("endpoints[{i}].{field}");
        let pod = || format!("{}/{}", ep.namespace, ep.name);
        validate_dns_label(&ep.namespace).map_err(|m| self.invalid(at("namespace"), m))?;
        validate_dns_subdomain(&ep.name).map_err(|m| self.invalid(at("name"), m))?;
        let name = (ep.namespace.clone(), ep.name.clone());
        if self.names.contains(&name) {
            return Err(self.invalid(at("name"), format!("duplicate endpoint {}/{}", ep.namespace, ep.name)));
        }
        for (k, v) in &ep.labels {
            validate_label(k, v).map_err(|m| self.invalid(at(&format!("labels.{k}")), m))?;
        }
        if let Some(sa) = &ep.service_account {
            validate_dns_subdomain(sa).map_err(|m| self.invalid(at("serviceAccount"), m))?;
        }
        let mut own_ips: Vec<IpAddr> = Vec::with_capacity(ep.ips.len());
        for (j, ip) in ep.ips.iter().enumerate() {
            check_endpoint_address(ip).map_err(|m| self.invalid(at(&format!("ips[{j}]")), m))?;
            // Canonical form: no two spellings of one address on two pods (or twice on one).
            let canonical = ip.to_canonical();
            let other = match self.ips.get(&canonical) {
                Some(other) => Some(other.clone()),
                None => own_ips.contains(&canonical).then(pod),
            };
            if let Some(other) = other {
                return Err(self.invalid(at(&format!("ips[{j}]")), format!("{ip} is already used by {other}")));
            }
            own_ips.push(canonical);
        }
        let mut port_names = std::collections::BTreeSet::new();
        for (j, port) in ep.ports.iter().enumerate() {
            if port.port == 0 {
                return Err(self.invalid(at(&format!("ports[{j}].port")), "port must be 1-65535".into()));
            }
            if let Some(name) = &port.name {
                validate_port_name(name).map_err(|m| self.invalid(at(&format!("ports[{j}].name")), m))?;
                if !port_names.insert(name.clone()) {
                    return Err(self.invalid(at(&format!("ports[{j}].name")), format!("duplicate port name {name:?}")));
                }
            }
        }
        if ep.peer_only && ep.cgroup.is_some() {
            return Err(self.invalid(at("cgroup"), "a peer-only endpoint runs elsewhere and has no cgroup on this node".into()));
        }
        let cgroup = match &ep.cgroup {
            Some(cgroup) => {
                let rel = cgroup.trim_start_matches('/');
                if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                    return Err(self.invalid(at("cgroup"), format!("{cgroup:?} is not a cgroup path below the cgroup2 mount")));
                }
                if let Some(other) = self.cgroups.get(rel) {
                    return Err(self.invalid(at("cgroup"), format!("{cgroup:?} is already used by {other}")));
                }
                Some(rel.to_string())
            }
            None => None,
        };
        // Valid: recorded.
        for ip in own_ips {
            self.ips.insert(ip, pod());
        }
        if let Some(rel) = &cgroup {
            self.cgroups.insert(rel.clone(), pod());
        }
        self.names.insert(name);
        self.namespaces.entry(ep.namespace.clone()).or_insert_with(|| Namespace {
            name: ep.namespace.clone(),
            labels: Labels::from([(NAMESPACE_NAME_LABEL.to_string(), ep.namespace.clone())]),
        });
        self.endpoints.push(Endpoint {
            namespace: ep.namespace,
            name: ep.name,
            labels: ep.labels,
            service_account: ep.service_account,
            ips: ep.ips,
            ports: ep.ports,
            cgroup,
            peer_only: ep.peer_only,
        });
        Ok(())
    }

    fn finish(self) -> Inventory {
        Inventory { namespaces: self.namespaces, endpoints: self.endpoints, history: None }
    }
}

/// A pod address names one pod, and only that pod: no address that means something else on
/// every host (unspecified, loopback, broadcast, multicast), and no IPv4-mapped IPv6 address,
/// which the datapath and `policy explain` would otherwise judge as a second identity for the
/// IPv4 address it maps (or another pod's).
fn check_endpoint_address(ip: &IpAddr) -> Result<(), String> {
    if let IpAddr::V6(v6) = ip {
        if let Some(v4) = v6.to_ipv4_mapped() {
            return Err(format!("{ip} is an IPv4-mapped IPv6 address (it aliases {v4}): write {v4} instead"));
        }
    }
    let what = if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(format!("{ip} is {what}: it cannot be a pod address"))
}

fn validate_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok { Ok(()) } else { Err(format!("{s:?} is not a DNS label (lowercase letters, digits and '-', at most 63)")) }
}

fn validate_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must have 1 to 253 characters"));
    }
    for part in s.split('.') {
        validate_dns_label(part).map_err(|_| format!("{s:?} is not a DNS subdomain"))?;
    }
    Ok(())
}

fn validate_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase());
    if ok { Ok(()) } else { Err(format!("{s:?} is not a port name (IANA_SVC_NAME: at most 15 lowercase letters, digits, '-')")) }
}

/// Kubernetes label key/value syntax.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        validate_dns_subdomain(prefix).map_err(|m| format!("label key prefix: {m}"))?;
    }
    let name_ok = |s: &str, allow_empty: bool| {
        (allow_empty && s.is_empty())
            || (!s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && s.as_bytes()[0].is_ascii_alphanumeric()
                && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
    };
    if !name_ok(name, false) {
        return Err(format!("{key:?} is not a valid label key"));
    }
    if !name_ok(value, true) {
        return Err(format!("{value:?} is not a valid label value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "namespaces:\n  - name: shop\n    labels: {team: web}\nendpoints:\n  - namespace: shop\n    name: frontend-1\n    labels: {app: frontend}\n    serviceAccount: web\n    ips: [198.18.1.10]\n    ports: [{name: http, port: 8080, protocol: TCP}]\n    cgroup: /palisade-lab/shop/frontend-1\n";

    #[test]
    fn parses_the_design_example() {
        let inv = Inventory::parse(GOOD, Path::new("inv.yaml")).expect("valid inventory");
        let ns = &inv.namespaces["shop"];
        assert_eq!(ns.labels.get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("shop"));
        assert_eq!(ns.labels.get("team").map(String::as_str), Some("web"));
        let ep = inv.endpoint("shop/frontend-1").expect("endpoint");
        assert_eq!(ep.cgroup.as_deref(), Some("palisade-lab/shop/frontend-1"));
        assert_eq!(ep.selector_labels().get(SERVICE_ACCOUNT_LABEL).map(String::as_str), Some("web"));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let text = GOOD.replace("    ips: [198.18.1.10]", "    ips: [198.18.1.10");
        let err = Inventory::parse(&text, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("inv.yaml:"), "{err}");
        // The unclosed flow sequence swallows the next line; the error points at line 9.
        assert!(matches!(err.split(':').nth(1).and_then(|l| l.parse::<usize>().ok()), Some(l) if l >= 9), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_line() {
        let text = GOOD.replace("    serviceAccount: web", "    serviceAcount: web");
        let err = Inventory::parse(&text, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("serviceAcount"), "{err}");
        // GOOD has no leading blank line: serviceAccount is on line 8.
        assert!(err.starts_with("inv.yaml:8:"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("198.18.1.10]", "0.0.0.0]", "endpoints[0].ips[0]"),
            ("port: 8080", "port: 0", "endpoints[0].ports[0].port"),
            ("name: frontend-1", "name: Frontend_1", "endpoints[0].name"),
            ("{app: frontend}", "{app: -bad}", "endpoints[0].labels.app"),
            ("/palisade-lab/shop/frontend-1", "/palisade-lab/../etc", "endpoints[0].cgroup"),
            ("{name: http,", "{name: HTTP_PORT_TOO_LONG,", "endpoints[0].ports[0].name"),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replace(from, to);
            let err = Inventory::parse(&text, Path::new("inv.yaml")).unwrap_err().to_string();
            assert!(err.contains(field), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn peer_only_endpoints() {
        let text = format!(
            "{GOOD}  - namespace: shop\n    name: frontend-7\n    labels: {{app: frontend}}\n    ips: [198.18.2.17]\n    peerOnly: true\n"
        );
        let inv = Inventory::parse(&text, Path::new("inv.yaml")).expect("valid inventory");
        assert!(!inv.endpoint("shop/frontend-1").expect("local").peer_only, "peerOnly defaults to false");
        let remote = inv.endpoint("shop/frontend-7").expect("peer");
        assert!(remote.peer_only && remote.cgroup.is_none());
        assert_eq!(remote.selector_labels().get("app").map(String::as_str), Some("frontend"));
        assert_eq!(inv.local_endpoints().map(|e| e.key()).collect::<Vec<_>>(), ["shop/frontend-1"]);

        // A peer-only endpoint has no cgroup on this node.
        let with_cgroup = text.replace("    peerOnly: true\n", "    peerOnly: true\n    cgroup: /palisade-lab/shop/frontend-7\n");
        let err = Inventory::parse(&with_cgroup, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].cgroup") && err.contains("peer-only"), "{err}");

        // Addresses stay unique across local and peer-only endpoints.
        let clash = text.replace("[198.18.2.17]", "[198.18.1.10]");
        let err = Inventory::parse(&clash, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[0]") && err.contains("shop/frontend-1"), "{err}");

        // Round trip: serialised specs say `peerOnly` only where it is set.
        let spec = EndpointSpec {
            namespace: "shop".into(),
            name: "frontend-7".into(),
            labels: Labels::new(),
            service_account: None,
            ips: vec![],
            ports: vec![],
            cgroup: None,
            peer_only: true,
        };
        let yaml = serde_norway::to_string(&spec).expect("yaml");
        assert!(yaml.contains("peerOnly: true"), "{yaml}");
        let local = serde_norway::to_string(&EndpointSpec { peer_only: false, ..spec }).expect("yaml");
        assert!(!local.contains("peerOnly"), "{local}");
    }

    #[test]
    fn aliasing_and_host_local_addresses_are_refused() {
        let second = |ips: &str| format!("{GOOD}  - namespace: shop\n    name: frontend-2\n    ips: {ips}\n");
        // An IPv4-mapped IPv6 address equal to another pod's IPv4: one pod's traffic would be
        // judged as the other's.
        let err = Inventory::parse(&second("[\"::ffff:198.18.1.10\"]"), Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[0]") && err.contains("IPv4-mapped") && err.contains("198.18.1.10"), "{err}");
        // ... and mapped on its own (no other pod), still a second spelling of an IPv4 address.
        let err = Inventory::parse(&second("[\"::ffff:198.18.9.9\"]"), Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[0]") && err.contains("IPv4-mapped"), "{err}");
        for (ip, what) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("\"::1\"", "loopback"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("\"ff02::1\"", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("\"::\"", "unspecified"),
        ] {
            let err = Inventory::parse(&second(&format!("[{ip}]")), Path::new("inv.yaml")).unwrap_err().to_string();
            assert!(err.contains("endpoints[1].ips[0]") && err.contains(what), "{ip}: {err}");
        }
        // Duplicates within one pod, and across pods, in either family.
        let err = Inventory::parse(&second("[198.18.1.20, 198.18.1.20]"), Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[1]") && err.contains("shop/frontend-2"), "{err}");
        let v6 = GOOD.replace("[198.18.1.10]", "[198.18.1.10, \"2001:db8::1\"]");
        let text = format!("{v6}  - namespace: shop\n    name: frontend-2\n    ips: [\"2001:db8:0::0:1\"]\n");
        let err = Inventory::parse(&text, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[0]") && err.contains("shop/frontend-1"), "{err}");
        // Ordinary pod addresses, IPv4 and IPv6, stay valid.
        Inventory::parse(&second("[198.18.1.20, \"2001:db8::20\"]"), Path::new("inv.yaml")).expect("valid");
    }

    #[test]
    fn oversized_deep_and_bom_prefixed_files() {
        // Nesting is refused before the parser runs, naming the line.
        let deep = format!("namespaces: {}", "[".repeat(100_000));
        let err = Inventory::parse(&deep, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("inv.yaml: line 1 column") && err.contains("nesting deeper than"), "{err}");
        let compact = format!("endpoints:\n{}x\n", "- ".repeat(100_000));
        let err = Inventory::parse(&compact, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.starts_with("inv.yaml: line 2 column") && err.contains("nesting"), "{err}");
        // Too large: refused before reading, naming the file and the limit.
        let dir = std::env::temp_dir().join(format!("palisade-inventory-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let big = dir.join("inventory.yaml");
        let file = std::fs::File::create(&big).expect("create");
        file.set_len(MAX_INVENTORY_BYTES + 1).expect("sparse file");
        let err = Inventory::load(&big).unwrap_err().to_string();
        assert!(err.contains("inventory.yaml") && err.contains(&MAX_INVENTORY_BYTES.to_string()), "{err}");
        // A byte-order mark is not part of the document.
        std::fs::write(&big, format!("\u{feff}{GOOD}")).expect("write");
        let inv = Inventory::load(&big).expect("a BOM-prefixed inventory is valid");
        assert!(inv.endpoint("shop/frontend-1").is_some());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn change_sets_and_the_bounded_log() {
        let base = Inventory::parse(GOOD, Path::new("inv.yaml")).expect("valid");
        let relabelled = Inventory::parse(&GOOD.replace("{app: frontend}", "{app: api}"), Path::new("inv.yaml")).expect("valid");
        let changes = ChangeSet::between(&base, &relabelled);
        assert_eq!(changes.pods, BTreeSet::from(["shop/frontend-1".to_string()]));
        assert!(changes.namespaces.is_empty());
        let empty = Inventory::default();
        let gone = ChangeSet::between(&base, &empty);
        assert_eq!((gone.pods.len(), gone.namespaces.len()), (1, 1), "a pod and a namespace that went: {gone:?}");
        assert!(ChangeSet::between(&base, &base).is_empty());
        assert_eq!(base, Inventory { history: Some(Arc::new(ChangeLog::new())), ..base.clone() }, "history is not content");

        let mut log = ChangeLog::new();
        assert_eq!(log.changes_since(1), Some(ChangeSet::default()));
        let one = |pod: &str| ChangeSet { pods: BTreeSet::from([pod.to_string()]), namespaces: BTreeSet::new() };
        assert_eq!(log.record(one("x/a")), 2);
        assert_eq!(log.record(one("x/b")), 3);
        assert_eq!(log.changes_since(1).map(|c| c.pods.len()), Some(2), "the union of what was missed");
        assert_eq!(log.changes_since(2).map(|c| c.pods.into_iter().collect::<Vec<_>>()), Some(vec!["x/b".to_string()]));
        assert_eq!(log.changes_since(0), None, "before the first publication");
        for i in 0..ChangeLog::MAX_ENTRIES {
            log.record(one(&format!("x/p{i}")));
        }
        assert_eq!(log.changes_since(1), None, "past the log's reach: look at everything");
        let latest = log.generation();
        assert_eq!(log.changes_since(latest - 1).map(|c| c.pods.len()), Some(1));
        // Bounded by keys too: one huge change set leaves only itself.
        let huge = ChangeSet { pods: (0..ChangeLog::MAX_KEYS + 1).map(|i| format!("x/q{i}")).collect(), namespaces: BTreeSet::new() };
        let g = log.record(huge);
        assert_eq!(log.changes_since(g - 1).map(|c| c.pods.len()), Some(ChangeLog::MAX_KEYS + 1));
        assert_eq!(log.changes_since(g - 2), None);
    }

    #[test]
    fn duplicate_ip_is_rejected() {
        let text = format!(
            "{GOOD}  - namespace: shop\n    name: frontend-2\n    ips: [198.18.1.10]\n"
        );
        let err = Inventory::parse(&text, Path::new("inv.yaml")).unwrap_err().to_string();
        assert!(err.contains("endpoints[1].ips[0]") && err.contains("shop/frontend-1"), "{err}");
    }
}
