//! networking.k8s.io/v1 NetworkPolicy: parsing (multi-document files, directories) and validation.
//!
//! Validation errors name the file, the document index (1-based) and the field, e.g.
//! `policies/x.yaml: document 2: spec.ingress[0].ports[1].endPort: must be >= port`.
//! Loading is all or nothing: `PolicySet::load` returns either every policy of every path, or the
//! first error; callers keep their last good set on error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::inventory::{Labels, Protocol};

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
    status: Option<serde_yaml::Value>,
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
}

impl NetworkPolicy {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A validated set of policies (every document of every path given).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySet {
    pub policies: Vec<NetworkPolicy>,
}

impl PolicySet {
    /// Loads files and directories (`*.yaml`, `*.yml`, sorted, not recursive). All or nothing.
    pub fn load<P: AsRef<Path>>(paths: &[P]) -> Result<PolicySet, PolicyError> {
        let mut files = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let meta = std::fs::metadata(path).map_err(|source| PolicyError::Read { path: path.to_path_buf(), source })?;
            if meta.is_dir() {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(|source| PolicyError::Read { path: path.to_path_buf(), source })?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                    .collect();
                entries.sort();
                files.extend(entries.into_iter().map(|p| (p, true)));
            } else {
                files.push((path.to_path_buf(), false));
            }
        }
        let mut set = PolicySet::default();
        for (file, from_dir) in files {
            let text = std::fs::read_to_string(&file).map_err(|source| PolicyError::Read { path: file.clone(), source })?;
            if from_dir && !looks_like_k8s_objects(&text) {
                // e.g. an endpoint inventory kept beside the policies: not ours to judge.
                tracing::debug!(file = %file.display(), "skipping a file without Kubernetes objects");
                continue;
            }
            set.extend(PolicySet::parse(&text, &file)?, &file)?;
        }
        Ok(set)
    }

    /// Parses one (multi-document) YAML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PolicySet, PolicyError> {
        let mut set = PolicySet::default();
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let index = i + 1;
            let doc = Option::<NetworkPolicyDoc>::deserialize(document).map_err(|e| PolicyError::Parse {
                path: path.to_path_buf(),
                document: index,
                message: e.to_string(),
            })?;
            let Some(doc) = doc else { continue };
            let policy = validate(doc, &format!("{}: document {index}", path.display())).map_err(|(field, message)| {
                PolicyError::Invalid { path: path.to_path_buf(), document: index, field, message }
            })?;
            set.extend(PolicySet { policies: vec![policy] }, path)?;
        }
        Ok(set)
    }

    fn extend(&mut self, other: PolicySet, path: &Path) -> Result<(), PolicyError> {
        for p in other.policies {
            if let Some(first) = self.policies.iter().find(|q| q.namespace == p.namespace && q.name == p.name) {
                let document = p
                    .source
                    .rsplit_once("document ")
                    .and_then(|(_, n)| n.parse().ok())
                    .unwrap_or(0);
                return Err(PolicyError::Duplicate {
                    path: path.to_path_buf(),
                    document,
                    namespace: p.namespace,
                    name: p.name,
                    first: first.source.clone(),
                });
            }
            self.policies.push(p);
        }
        Ok(())
    }
}

/// True when some document of the text is a mapping with `kind` or `apiVersion` (or the text
/// does not parse, so that the parser reports the error).
fn looks_like_k8s_objects(text: &str) -> bool {
    for document in serde_yaml::Deserializer::from_str(text) {
        match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Mapping(m)) => {
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
    let (ingress_isolation, egress_isolation) = match &spec.policy_types {
        None => (true, !egress_docs.is_empty()),
        Some(types) => {
            let mut ing = false;
            let mut eg = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => ing = true,
                    "Egress" => eg = true,
                    other => {
                        return Err(inv(&format!("spec.policyTypes[{i}]"), format!("{other:?}: expected Ingress or Egress")));
                    }
                }
            }
            if types.is_empty() {
                (true, !egress_docs.is_empty())
            } else {
                (ing, eg)
            }
        }
    };
    if !ingress_isolation && !ingress_docs.is_empty() {
        return Err(inv("spec.ingress", "ingress rules given but policyTypes does not include Ingress".into()));
    }
    if !egress_isolation && !egress_docs.is_empty() {
        return Err(inv("spec.egress", "egress rules given but policyTypes does not include Egress".into()));
    }
    let mut ingress = Vec::new();
    for (i, r) in ingress_docs.into_iter().enumerate() {
        ingress.push(rule(r.from, r.ports, &format!("spec.ingress[{i}]"), "from")?);
    }
    let mut egress = Vec::new();
    for (i, r) in egress_docs.into_iter().enumerate() {
        egress.push(rule(r.to, r.ports, &format!("spec.egress[{i}]"), "to")?);
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
                let ok = !s.is_empty()
                    && s.len() <= 15
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && s.bytes().any(|b| b.is_ascii_lowercase());
                if !ok {
                    return Err((format!("{f}.port"), format!("{s:?} is not a valid port name")));
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
        crate::inventory::validate_label(&k, &v).map_err(|m| (format!("{at}.matchLabels.{k}"), m))?;
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
