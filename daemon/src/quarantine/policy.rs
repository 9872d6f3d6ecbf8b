//! How the responder acts on quarantine findings: dry run (global and per rule), guardrails
//! (protected namespaces, rate limits) and the optional forensics exception. Hot reloadable:
//! the daemon hands a new [`ResponsePolicy`] to `Responder::set_policy`.
//!
//! The rate limits are token buckets, one per namespace under one node ceiling ([`RateLimiter`]).
//! They only ever delay a quarantine (the responder queues it), never drop or latch: an attacker
//! who spends decoy pods on the limit buys time in its own namespace, not a disarmed node.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::inventory::Protocol;

/// The largest response policy file read.
pub const MAX_RESPONSE_POLICY_BYTES: u64 = 1024 * 1024;
/// Namespaces never quarantined unless configured otherwise (the cluster's own plumbing).
pub const DEFAULT_PROTECTED_NAMESPACES: [&str; 1] = ["kube-system"];
/// Quarantines per minute on one node (the node ceiling: a burst of this many, then one every
/// 60/N seconds); more are queued.
pub const DEFAULT_MAX_PER_MINUTE: u32 = 10;
/// Quarantines per minute in one namespace (same shape), so one namespace's storm leaves room
/// under the node ceiling for the others.
pub const DEFAULT_MAX_PER_NAMESPACE_PER_MINUTE: u32 = 5;

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
    /// The node ceiling (token bucket: burst and refill per minute); 0 disables it. Over it,
    /// quarantines are queued, never dropped.
    pub max_quarantines_per_minute: u32,
    /// Per namespace (token bucket: burst and refill per minute); 0 disables it.
    pub max_quarantines_per_namespace_per_minute: u32,
    /// Off (empty) by default.
    pub forensics: Vec<ForensicsException>,
    /// Quarantine a pod that floods its own event budget while protected events are being lost
    /// (a sustained, `critical` `event_loss`), as the finding of the built-in rule
    /// `event_flood` (`FLOOD_RULE`): the rate limits, protected namespaces, dry run and
    /// `rules: {event_flood: alert_only}` apply to it like to any rule. Off by default: a busy
    /// but honest pod can flood too.
    pub quarantine_flooding_pods: bool,
}

impl Default for ResponsePolicy {
    fn default() -> Self {
        ResponsePolicy {
            dry_run: false,
            rules: BTreeMap::new(),
            protected_namespaces: DEFAULT_PROTECTED_NAMESPACES.iter().map(|s| s.to_string()).collect(),
            max_quarantines_per_minute: DEFAULT_MAX_PER_MINUTE,
            max_quarantines_per_namespace_per_minute: DEFAULT_MAX_PER_NAMESPACE_PER_MINUTE,
            forensics: Vec::new(),
            quarantine_flooding_pods: false,
        }
    }
}

impl ResponsePolicy {
    /// Whether a quarantine finding of `rule_id` is enforced or only reported, and why.
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

    /// Reads and validates a response policy file: size ([`MAX_RESPONSE_POLICY_BYTES`]) before
    /// reading, YAML nesting before parsing (see [`crate::yaml`]); errors name the file, and the
    /// line and column or the field.
    pub fn load(path: &std::path::Path) -> Result<ResponsePolicy, String> {
        let text = crate::yaml::read_limited(path, MAX_RESPONSE_POLICY_BYTES).map_err(|e| format!("{}: {e}", path.display()))?;
        ResponsePolicy::parse(&text, path)
    }

    /// [`ResponsePolicy::load`] from a text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &std::path::Path) -> Result<ResponsePolicy, String> {
        let text = crate::yaml::strip_bom(text);
        crate::yaml::check(text, MAX_RESPONSE_POLICY_BYTES).map_err(|e| format!("{}: {e}", path.display()))?;
        let policy: ResponsePolicy = serde_norway::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default();
            format!("{}{at}: {e}", path.display())
        })?;
        policy.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(policy)
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

/// A token bucket: `capacity` tokens at most, refilled continuously at `capacity` per minute.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    at: Instant,
}

const MINUTE: f64 = 60.0;

impl TokenBucket {
    /// A full bucket of `per_minute` tokens.
    pub fn full(per_minute: u32, now: Instant) -> TokenBucket {
        TokenBucket { capacity: f64::from(per_minute), tokens: f64::from(per_minute), at: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.capacity / MINUTE).min(self.capacity);
        self.at = now.max(self.at);
    }

    /// How long until one token is there (zero: now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 || self.capacity <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) * MINUTE / self.capacity)
    }

    /// Takes one token (call after `wait` said zero).
    pub fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    pub fn tokens(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    /// A new rate keeps the tokens there are (up to the new capacity).
    fn set_rate(&mut self, per_minute: u32, now: Instant) {
        self.refill(now);
        self.capacity = f64::from(per_minute);
        self.tokens = self.tokens.min(self.capacity);
    }
}

/// Which limit holds a quarantine back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    Node { per_minute: u32 },
    Namespace { namespace: String, per_minute: u32 },
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limited::Node { per_minute } => write!(f, "the node ceiling of {per_minute} quarantines per minute"),
            Limited::Namespace { namespace, per_minute } => {
                write!(f, "the limit of {per_minute} quarantines per minute in namespace {namespace}")
            }
        }
    }
}

/// The rate limits: a bucket per namespace (kept only while not full, so memory follows the
/// namespaces recently quarantined in) and the node ceiling.
#[derive(Debug)]
pub struct RateLimiter {
    node_per_minute: u32,
    namespace_per_minute: u32,
    node: TokenBucket,
    namespaces: HashMap<String, TokenBucket>,
}

impl RateLimiter {
    pub fn new(node_per_minute: u32, namespace_per_minute: u32, now: Instant) -> RateLimiter {
        RateLimiter { node_per_minute, namespace_per_minute, node: TokenBucket::full(node_per_minute, now), namespaces: HashMap::new() }
    }

    /// None when a quarantine in `namespace` may go ahead now; otherwise the limit that holds it
    /// back and how long until it would not.
    pub fn check(&mut self, namespace: &str, now: Instant) -> Option<(Limited, Duration)> {
        let namespace_wait = match (self.namespace_per_minute, self.namespaces.get_mut(namespace)) {
            (0, _) | (_, None) => Duration::ZERO,
            (_, Some(bucket)) => bucket.wait(now),
        };
        let node_wait = if self.node_per_minute == 0 { Duration::ZERO } else { self.node.wait(now) };
        if namespace_wait.is_zero() && node_wait.is_zero() {
            return None;
        }
        Some(if namespace_wait >= node_wait {
            (Limited::Namespace { namespace: namespace.to_string(), per_minute: self.namespace_per_minute }, namespace_wait)
        } else {
            (Limited::Node { per_minute: self.node_per_minute }, node_wait)
        })
    }

    /// Whether the node ceiling alone holds everything back now.
    pub fn node_exhausted(&mut self, now: Instant) -> bool {
        self.node_per_minute > 0 && !self.node.wait(now).is_zero()
    }

    /// Spends a token of `namespace` and of the node (after `check` said None).
    pub fn take(&mut self, namespace: &str, now: Instant) {
        if self.node_per_minute > 0 {
            self.node.take(now);
        }
        if self.namespace_per_minute > 0 {
            let per_minute = self.namespace_per_minute;
            self.namespaces.entry(namespace.to_string()).or_insert_with(|| TokenBucket::full(per_minute, now)).take(now);
        }
        self.namespaces.retain(|_, bucket| !bucket.is_full(now));
    }

    /// New limits (hot reload): the tokens spent stay spent.
    pub fn set_limits(&mut self, node_per_minute: u32, namespace_per_minute: u32, now: Instant) {
        if node_per_minute != self.node_per_minute {
            if self.node_per_minute == 0 {
                self.node = TokenBucket::full(node_per_minute, now);
            } else {
                self.node.set_rate(node_per_minute, now);
            }
            self.node_per_minute = node_per_minute;
        }
        if namespace_per_minute != self.namespace_per_minute {
            for bucket in self.namespaces.values_mut() {
                bucket.set_rate(namespace_per_minute, now);
            }
            self.namespace_per_minute = namespace_per_minute;
            self.namespaces.retain(|_, bucket| !bucket.is_full(now));
        }
    }

    /// For status: the node's tokens and the namespaces with spent tokens.
    pub fn snapshot(&mut self, now: Instant) -> RateLimitStatus {
        self.namespaces.retain(|_, bucket| !bucket.is_full(now));
        let mut namespaces: BTreeMap<String, f64> = BTreeMap::new();
        for (ns, bucket) in &mut self.namespaces {
            namespaces.insert(ns.clone(), round2(bucket.tokens(now)));
        }
        RateLimitStatus {
            node_per_minute: self.node_per_minute,
            namespace_per_minute: self.namespace_per_minute,
            node_tokens: (self.node_per_minute > 0).then(|| round2(self.node.tokens(now))),
            namespace_tokens: namespaces,
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The rate limits as `palisade status` shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitStatus {
    /// 0: no node ceiling.
    pub node_per_minute: u32,
    /// 0: no per-namespace limit.
    pub namespace_per_minute: u32,
    /// Tokens left under the node ceiling.
    pub node_tokens: Option<f64>,
    /// Namespaces whose bucket is not full, with their tokens left.
    pub namespace_tokens: BTreeMap<String, f64>,
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
        let policy: ResponsePolicy = serde_norway::from_str(
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
    fn token_buckets_delay_per_namespace_under_a_node_ceiling_and_refill() {
        let t0 = Instant::now();
        let mut limits = RateLimiter::new(4, 2, t0);
        // Namespace a: two at once, the third waits for a's bucket (30 s per token at 2/min).
        assert_eq!(limits.check("a", t0), None);
        limits.take("a", t0);
        assert_eq!(limits.check("a", t0), None);
        limits.take("a", t0);
        let (limited, wait) = limits.check("a", t0).expect("a is limited");
        assert!(matches!(limited, Limited::Namespace { ref namespace, per_minute: 2 } if namespace == "a"), "{limited:?}");
        assert_eq!(wait.as_secs(), 30);
        // Namespace b is not held back by a, until the node ceiling is reached.
        limits.take("b", t0);
        limits.take("c", t0);
        let (limited, wait) = limits.check("d", t0).expect("node ceiling");
        assert_eq!(limited, Limited::Node { per_minute: 4 });
        assert_eq!(wait.as_secs(), 15);
        assert!(limits.node_exhausted(t0));
        // Time refills both; nothing stays latched.
        assert_eq!(limits.check("d", t0 + Duration::from_secs(15)), None);
        assert_eq!(limits.check("a", t0 + Duration::from_secs(31)), None);
        // Full buckets are forgotten.
        assert!(limits.snapshot(t0 + Duration::from_secs(120)).namespace_tokens.is_empty());
    }

    #[test]
    fn zero_disables_a_limit_and_reload_keeps_spent_tokens() {
        let t0 = Instant::now();
        let mut limits = RateLimiter::new(0, 0, t0);
        for _ in 0..100 {
            assert_eq!(limits.check("a", t0), None);
            limits.take("a", t0);
        }
        let mut limits = RateLimiter::new(2, 0, t0);
        limits.take("a", t0);
        limits.take("a", t0);
        assert!(limits.check("a", t0).is_some());
        limits.set_limits(60, 0, t0);
        // Spent tokens stay spent, but the new rate refills one a second.
        assert!(limits.check("a", t0).is_some());
        assert_eq!(limits.check("a", t0 + Duration::from_millis(1001)), None);
    }
}
