//! Incremental compiles equal full ones (issue 17, issue 18): random sequences of policy
//! changes (added, rewritten, removed) and pod and namespace changes (labels, named ports,
//! addresses, pods coming and going, peers on other nodes) applied one at a time to one
//! long-lived `Segmentation`, which recompiles only what each change touches; after every step
//! its contents (every map, the identities, rules, usage and the over-capacity verdict) must
//! equal a compile of the same state from scratch with the same ids. Half the sequences run
//! against small map capacities, so changes tip the set, are refused and leave the last good
//! set in force.
//!
//! Pod and namespace changes reach the compiler the two ways the daemon hands them over: a bare
//! inventory (a file reload: the compiler finds what differs) and, in half the sequences, an
//! inventory with the producer's change log (the Kubernetes source: `Inventory::changes_since`),
//! where some publications are skipped as a `watch` channel skips them (the consumer sees only
//! the latest, and must take the union of what it missed).
//!
//! Seeded (`PALISADE_INCREMENTAL_SEED` replays one sequence; `PALISADE_INCREMENTAL_SEQUENCES`
//! changes how many run), so a failure prints the seed, the step and the state.

use std::path::Path;
use std::sync::Arc;

use palisade::inventory::{ChangeLog, ChangeSet, Inventory};
use palisade::segmentation::{Capacity, PolicySet, Segmentation};

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const POD_SLOTS: usize = 10;
const POLICY_SLOTS: usize = 8;

/// xorshift64*: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

#[derive(Debug, Clone)]
struct Pod {
    namespace: &'static str,
    app: Option<&'static str>,
    tier: Option<&'static str>,
    /// 0: IPv4, 1: IPv6, 2: both; `shift` moves the addresses (an IP change).
    family: u8,
    shift: u8,
    http: Option<u16>,
    dns: bool,
    peer_only: bool,
}

fn random_pod(rng: &mut Rng) -> Pod {
    Pod {
        namespace: NAMESPACES[rng.below(3)],
        app: rng.chance(80).then(|| rng.pick(&["web", "db", "api"])),
        tier: rng.chance(50).then(|| rng.pick(&["1", "2"])),
        family: rng.below(3) as u8,
        shift: rng.below(2) as u8,
        http: rng.chance(60).then(|| if rng.chance(50) { 80 } else { 8080 }),
        dns: rng.chance(40),
        peer_only: rng.chance(20),
    }
}

#[derive(Debug, Clone)]
struct World {
    namespace_team: [Option<&'static str>; 3],
    pods: Vec<Option<Pod>>,
    policies: Vec<Option<String>>,
}

impl World {
    fn inventory_yaml(&self) -> String {
        let mut text = String::from("namespaces:\n");
        for (ns, team) in NAMESPACES.iter().zip(&self.namespace_team) {
            match team {
                Some(t) => text.push_str(&format!("  - {{name: {ns}, labels: {{team: {t}}}}}\n")),
                None => text.push_str(&format!("  - {{name: {ns}}}\n")),
            }
        }
        text.push_str("endpoints:\n");
        for (slot, pod) in self.pods.iter().enumerate() {
            let Some(pod) = pod else { continue };
            let host = slot + 1 + 100 * pod.shift as usize;
            let ips = match pod.family {
                0 => format!("[198.18.1.{host}]"),
                1 => format!("['2001:db8::{host:x}']"),
                _ => format!("[198.18.1.{host}, '2001:db8::{host:x}']"),
            };
            let labels: Vec<String> =
                [("app", pod.app), ("tier", pod.tier)].iter().filter_map(|(k, v)| v.map(|v| format!("{k}: '{v}'"))).collect();
            let mut ports = Vec::new();
            if let Some(p) = pod.http {
                ports.push(format!("{{name: http, port: {p}}}"));
            }
            if pod.dns {
                ports.push("{name: dns, port: 53, protocol: UDP}".to_string());
            }
            let placement = if pod.peer_only { "peerOnly: true".to_string() } else { format!("cgroup: /incremental/p{slot}") };
            text.push_str(&format!(
                "  - {{namespace: {}, name: p{slot}, labels: {{{}}}, ips: {ips}, ports: [{}], {placement}}}\n",
                pod.namespace,
                labels.join(", "),
                ports.join(", ")
            ));
        }
        text
    }

    fn policies_yaml(&self) -> String {
        self.policies.iter().flatten().cloned().collect::<Vec<_>>().join("---\n")
    }
}

fn selector(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => "{}".into(),
        1 | 2 => format!("{{matchLabels: {{app: {}}}}}", rng.pick(&["web", "db", "api"])),
        3 => "{matchExpressions: [{key: app, operator: In, values: [web, db]}]}".into(),
        4 => format!("{{matchExpressions: [{{key: tier, operator: {}}}]}}", rng.pick(&["Exists", "DoesNotExist"])),
        _ => "{matchExpressions: [{key: app, operator: NotIn, values: [api]}]}".into(),
    }
}

fn peer(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 | 1 => format!("{{podSelector: {}}}", selector(rng)),
        2 => format!("{{namespaceSelector: {{matchLabels: {{team: {}}}}}}}", rng.pick(&["x", "y"])),
        3 => format!("{{namespaceSelector: {{}}, podSelector: {}}}", selector(rng)),
        4 => format!(
            "{{ipBlock: {}}}",
            rng.pick(&[
                "{cidr: 198.18.1.0/28, except: [198.18.1.4/30]}",
                "{cidr: 198.18.1.0/24}",
                "{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}",
                "{cidr: '::/0'}",
                "{cidr: '2001:db8::/120', except: ['2001:db8::8/126']}",
            ])
        ),
        _ => format!("{{ipBlock: {{cidr: 198.18.1.{}/32}}}}", 1 + rng.below(POD_SLOTS + 2)),
    }
}

fn port(rng: &mut Rng) -> &'static str {
    rng.pick(&["{port: 80}", "{port: http}", "{port: dns, protocol: UDP}", "{port: 1000, endPort: 1100}", "{protocol: UDP}", "{port: 53, protocol: UDP}"])
}

fn rules(rng: &mut Rng, peers_field: &str) -> String {
    let n = rng.below(3);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut fields = Vec::new();
        if rng.chance(80) {
            let peers: Vec<String> = (0..1 + rng.below(2)).map(|_| peer(rng)).collect();
            fields.push(format!("{peers_field}: [{}]", peers.join(", ")));
        }
        if rng.chance(70) {
            let ports: Vec<&str> = (0..1 + rng.below(2)).map(|_| port(rng)).collect();
            fields.push(format!("ports: [{}]", ports.join(", ")));
        }
        out.push(format!("{{{}}}", fields.join(", ")));
    }
    format!("[{}]", out.join(", "))
}

fn random_policy(rng: &mut Rng, slot: usize) -> String {
    let ns = NAMESPACES[rng.below(3)];
    let types = rng.pick(&["", "  policyTypes: [Ingress]\n", "  policyTypes: [Egress]\n", "  policyTypes: [Ingress, Egress]\n"]);
    let mut text = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: pol{slot}, namespace: {ns}}}\nspec:\n  podSelector: {}\n{types}",
        selector(rng)
    );
    if rng.chance(70) {
        text.push_str(&format!("  ingress: {}\n", rules(rng, "from")));
    }
    if rng.chance(60) {
        text.push_str(&format!("  egress: {}\n", rules(rng, "to")));
    }
    text
}

/// One random change to the world; returns what it was, for the failure message.
fn mutate(rng: &mut Rng, world: &mut World) -> String {
    match rng.below(10) {
        0..=3 => {
            let slot = rng.below(POLICY_SLOTS);
            world.policies[slot] = Some(random_policy(rng, slot));
            format!("policy pol{slot} written")
        }
        4 => {
            let slot = rng.below(POLICY_SLOTS);
            world.policies[slot] = None;
            format!("policy pol{slot} removed")
        }
        5 => {
            let slot = rng.below(POD_SLOTS);
            if let Some(pod) = &mut world.pods[slot] {
                pod.app = rng.chance(80).then(|| rng.pick(&["web", "db", "api"]));
                pod.tier = rng.chance(50).then(|| rng.pick(&["1", "2"]));
            }
            format!("pod p{slot} labels")
        }
        6 => {
            let slot = rng.below(POD_SLOTS);
            if let Some(pod) = &mut world.pods[slot] {
                pod.http = rng.chance(60).then(|| if rng.chance(50) { 80 } else { 8080 });
                pod.dns = rng.chance(40);
            }
            format!("pod p{slot} named ports")
        }
        7 => {
            let slot = rng.below(POD_SLOTS);
            if let Some(pod) = &mut world.pods[slot] {
                pod.shift ^= 1;
                if rng.chance(30) {
                    pod.family = rng.below(3) as u8;
                }
            }
            format!("pod p{slot} addresses")
        }
        8 => {
            let slot = rng.below(POD_SLOTS);
            world.pods[slot] = if world.pods[slot].is_some() && rng.chance(50) { None } else { Some(random_pod(rng)) };
            format!("pod p{slot} replaced or removed")
        }
        _ => {
            let ns = rng.below(3);
            world.namespace_team[ns] = rng.chance(70).then(|| rng.pick(&["x", "y"]));
            format!("namespace {} labels", NAMESPACES[ns])
        }
    }
}

fn inventory(world: &World) -> Inventory {
    Inventory::parse(&world.inventory_yaml(), Path::new("incremental-inventory.yaml"))
        .unwrap_or_else(|e| panic!("generated inventory invalid: {e}\n{}", world.inventory_yaml()))
}

fn policies(world: &World) -> PolicySet {
    PolicySet::parse(&world.policies_yaml(), Path::new("incremental-policies.yaml"))
        .unwrap_or_else(|e| panic!("generated policy invalid: {e}\n{}", world.policies_yaml()))
}

/// The inventory producer: a bare inventory per change (files), or one carrying the change log
/// of every publication (the Kubernetes source, which publishes only when something differs).
struct Producer {
    log: Option<ChangeLog>,
    published: Inventory,
}

impl Producer {
    fn new(with_log: bool, first: Inventory) -> Producer {
        let mut producer = Producer { log: with_log.then(ChangeLog::new), published: first };
        if let Some(log) = &producer.log {
            producer.published.history = Some(Arc::new(log.clone()));
        }
        producer
    }

    fn publish(&mut self, mut next: Inventory) -> Inventory {
        if let Some(log) = &mut self.log {
            if next != self.published {
                log.record(ChangeSet::between(&self.published, &next));
            }
            next.history = Some(Arc::new(log.clone()));
        }
        self.published = next.clone();
        next
    }
}

/// Runs one seeded sequence of `steps` changes; panics at the first step whose incremental
/// contents differ from a full compile. Returns (policy parts compiled, parts a full compile
/// would have compiled) over the pod and namespace changes.
fn run_sequence(seed: u64, steps: usize) -> (usize, usize) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut world = World {
        namespace_team: [Some("x"), None, Some("y")],
        pods: (0..POD_SLOTS).map(|_| rng.chance(80).then(|| random_pod(&mut rng))).collect(),
        policies: (0..POLICY_SLOTS).map(|slot| rng.chance(50).then(|| random_policy(&mut rng, slot))).collect(),
    };
    // Small maps in every other sequence: changes tip the set and are refused.
    let capacity = if seed % 2 == 0 { Capacity::default() } else { Capacity { policy: 24 + rng.below(40), ipcache: 10 + rng.below(12), ..Capacity::default() } };
    let mut producer = Producer::new((seed / 2) % 2 == 1, inventory(&world));
    let mut seg = Segmentation::with_capacity(producer.published.clone(), policies(&world), capacity);
    assert_eq!(seg.compiled(), &seg.full_compile(), "seed {seed}: the first compile");
    let (mut compiled_parts, mut full_parts) = (0, 0);
    for step in 0..steps {
        let what = mutate(&mut rng, &mut world);
        if what.starts_with("policy") {
            let _ = seg.try_set_policies(policies(&world));
        } else {
            let next = producer.publish(inventory(&world));
            if producer.log.is_some() && rng.chance(25) {
                // Published, but the consumer sees a later one first (a watch channel keeps
                // only the latest): the next hand-over must cover this change too.
                continue;
            }
            seg.set_inventory(next);
            compiled_parts += seg.parts_compiled();
            full_parts += seg.policies().policies.len();
        }
        let full = seg.full_compile();
        if seg.compiled() != &full {
            panic!(
                "seed {seed}, step {step} ({what}): the incremental contents differ from a full compile\ninventory:\n{}\npolicies in force:\n{:#?}\nincremental: {:#?}\nfull: {:#?}",
                world.inventory_yaml(),
                seg.policies().policies.iter().map(|p| p.key()).collect::<Vec<_>>(),
                seg.compiled(),
                full
            );
        }
    }
    (compiled_parts, full_parts)
}

#[test]
fn incremental_compiles_equal_full_compiles_over_random_change_sequences() {
    if let Some(seed) = std::env::var("PALISADE_INCREMENTAL_SEED").ok().and_then(|s| s.parse().ok()) {
        run_sequence(seed, 40);
        return;
    }
    let sequences: u64 = std::env::var("PALISADE_INCREMENTAL_SEQUENCES").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let started = std::time::Instant::now();
    let (mut compiled_parts, mut full_parts) = (0, 0);
    for seed in 1..=sequences {
        let (compiled, full) = run_sequence(seed, 40);
        compiled_parts += compiled;
        full_parts += full;
    }
    println!(
        "{sequences} sequences of 40 changes in {:.1} s; pod and namespace changes compiled {compiled_parts} policy parts of {full_parts}",
        started.elapsed().as_secs_f64()
    );
    // A pod change recompiles the policies it touches, not the set (the small world here makes
    // most policies touch most pods; the bound only says the incremental path is taken).
    assert!(compiled_parts < full_parts, "{compiled_parts} of {full_parts} parts compiled on pod changes");
}
