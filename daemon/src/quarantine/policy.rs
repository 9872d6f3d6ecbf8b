//! How the responder acts on quarantine verdicts: dry run (global and per rule), guardrails
//! (protected namespaces, a per-node rate limit) and the optional forensics exception. Hot
//! reloadable: the daemon hands a new [`ResponsePolicy`] to `Responder::set_policy`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inventory::Protocol;

/// Namespaces never quarantined unless configured otherwise (the cluster's own plumbing).
pub const DEFAULT_PROTECTED_NAMESPACES: [&str; 1] = ["kube-system"];
/// Quarantines per minute on one node before automatic quarantine suspends itself.
pub const DEFAULT_MAX_PER_MINUTE: u32 = 10;

/// What one rule is allowed to do, overriding the global dry-run switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMode {
    /// Never quarantine for this rule; report `would_quarantine`.
    AlertOnly,
    /// Quarantine for this rule even when the node is in dry run.
    Quarantine,
}

/// A peer that stays reachable from and to quarantined pods (incident response tooling).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForensicsException {
    /// `addr/len` or a bare address.
    pub cidr: String,
    /// The peer's port on egress, the pod's own port on ingress; absent = any.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

impl ForensicsException {
    /// The address and prefix length, with a message naming what is wrong.
    pub fn parse_cidr(&self) -> Result<(IpAddr, u8), String> {
        let (addr, len) = match self.cidr.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (self.cidr.as_str(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{:?}: not an IP address", self.cidr))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("{:?}: bad prefix length", self.cidr))?,
        };
        Ok((addr, len))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsePolicy {
    /// Report `would_quarantine` instead of quarantining (rules set to `quarantine` excepted).
    pub dry_run: bool,
    /// Per rule id.
    pub rules: BTreeMap<String, RuleMode>,
    pub protected_namespaces: BTreeSet<String>,
    /// 0 disables the limit.
    pub max_quarantines_per_minute: u32,
    /// Off (empty) by default.
    pub forensics: Vec<ForensicsException>,
}

impl Default for ResponsePolicy {
    fn default() -> Self {
        ResponsePolicy {
            dry_run: false,
            rules: BTreeMap::new(),
            protected_namespaces: DEFAULT_PROTECTED_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            max_quarantines_per_minute: DEFAULT_MAX_PER_MINUTE,
            forensics: Vec::new(),
        }
    }
}

impl ResponsePolicy {
    /// Whether a quarantine verdict of `rule_id` is enforced or only reported, and why.
    pub fn enforcement(&self, rule_id: &str) -> Enforcement {
        match (self.rules.get(rule_id), self.dry_run) {
            (Some(RuleMode::AlertOnly), _) => Enforcement::DryRun(format!("rule {rule_id} is set to alert only")),
            (Some(RuleMode::Quarantine), _) => Enforcement::Enforce,
            (None, true) => Enforcement::DryRun("dry run is on for this node".into()),
            (None, false) => Enforcement::Enforce,
        }
    }

    pub fn is_protected(&self, namespace: &str) -> bool {
        self.protected_namespaces.contains(namespace)
    }

    /// Checks what cannot be checked by serde (CIDRs).
    pub fn validate(&self) -> Result<(), String> {
        for (i, f) in self.forensics.iter().enumerate() {
            f.parse_cidr().map_err(|m| format!("forensics[{i}].cidr: {m}"))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    Enforce,
    DryRun(String),
}

/// Quarantines applied in the last minute; a sliding window.
#[derive(Debug, Default)]
pub struct RateWindow {
    applied: VecDeque<Instant>,
}

const WINDOW: Duration = Duration::from_secs(60);

impl RateWindow {
    /// How many quarantines the last minute holds (as of `now`).
    pub fn count(&mut self, now: Instant) -> usize {
        while self.applied.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            self.applied.pop_front();
        }
        self.applied.len()
    }

    pub fn record(&mut self, now: Instant) {
        self.applied.push_back(now);
    }

    pub fn clear(&mut self) {
        self.applied.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_rule_mode_overrides_global_dry_run() {
        let mut policy = ResponsePolicy { dry_run: true, ..ResponsePolicy::default() };
        policy.rules.insert("reverse_shell".into(), RuleMode::Quarantine);
        policy.rules.insert("crypto_mining".into(), RuleMode::AlertOnly);
        assert_eq!(policy.enforcement("reverse_shell"), Enforcement::Enforce);
        assert!(matches!(policy.enforcement("other"), Enforcement::DryRun(_)));
        policy.dry_run = false;
        assert!(matches!(policy.enforcement("crypto_mining"), Enforcement::DryRun(r) if r.contains("alert only")));
        assert_eq!(policy.enforcement("other"), Enforcement::Enforce);
    }

    #[test]
    fn defaults_protect_kube_system_and_parse_from_yaml() {
        let policy: ResponsePolicy = serde_yaml::from_str(
            "dry_run: true\nrules: {reverse_shell: quarantine}\nforensics: [{cidr: 198.18.9.0/24, port: 22, protocol: TCP}]\n",
        )
        .expect("valid");
        assert!(policy.is_protected("kube-system"));
        assert_eq!(policy.max_quarantines_per_minute, DEFAULT_MAX_PER_MINUTE);
        policy.validate().expect("valid cidr");
        let bad = ResponsePolicy { forensics: vec![ForensicsException { cidr: "10.0.0.0/33".into(), port: None, protocol: None }], ..ResponsePolicy::default() };
        assert!(bad.validate().unwrap_err().contains("forensics[0].cidr"));
    }

    #[test]
    fn rate_window_forgets_after_a_minute() {
        let mut window = RateWindow::default();
        let t0 = Instant::now();
        window.record(t0);
        window.record(t0 + Duration::from_secs(30));
        assert_eq!(window.count(t0 + Duration::from_secs(59)), 2);
        assert_eq!(window.count(t0 + Duration::from_secs(61)), 1);
        assert_eq!(window.count(t0 + Duration::from_secs(91)), 0);
    }
}
