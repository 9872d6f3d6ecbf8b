//! Change-to-maps latency of NetworkPolicy changes (issue 17; prints figures, not a test).
//! Root only.
//!
//! For each policy count N (`BENCH_POLICIES`, default `1000,10000`): 200 pods in 20 namespaces
//! (each with a label of its own, no cgroup: the maps are written whether or not a pod runs
//! here) and N policies, policy i selecting one pod and admitting one other pod's identity on
//! TCP and UDP port 1024 + i (two POLICY entries each). A change rewrites one policy with a TCP
//! port no policy used before, so it must add the POLICY key (selected pod's endpoint id, peer
//! identity, ingress, TCP, that port); the figure is the time until that key is in the map the
//! datapath reads.
//! 1. **file mode**: `palisade run --policies DIR` with one file per policy; a change is a new
//!    version of one file renamed into the directory (atomic, as a ConfigMap update is); the key
//!    is polled in the daemon's pinned SEG_POLICY every 0.5 ms, so the figures are exact to about
//!    a millisecond. Singles (write, wait until it is in the map, next) and bursts (`BENCH_BURST`
//!    files, default 20, written back to back; each one's latency from its own write). CPU per
//!    change: the daemon's utime + stime over the phase, divided by the changes.
//! 2. **in-process (the Kubernetes source's path)**: the daemon's `Enforcer` in this process,
//!    handed each new policy set the way the NetworkPolicy watcher hands it (a whole
//!    `PolicySet`, cloned off the watch channel, to `Enforcer::set_policies`); the latency is
//!    from the change to `set_policies` returning with the maps written (checked in the map).
//!    Bursts: `BENCH_BURST` changes made before the one call a watch channel coalesces them to.
//!    CPU: this process's (the owner task's thread included).
//!
//! 3. **pod changes (in-process, after the kube phases)**: one pod at a time gets a label no pod
//!    had (`rev`), so it moves to a new identity and every policy that selects or admits it must
//!    be compiled again (~N/100 of the N policies); the inventory carries the producer's change
//!    log as the Kubernetes source's does. (a) change-to-maps through `Enforcer::set_inventory`
//!    (compile and sync; the pod's new identity checked in an entry of SEG_POLICY); (b) the
//!    compile alone, alternating in one loop between the incremental compile
//!    (`Segmentation::set_inventory`) and a compile of every policy (`full_compile`: what every
//!    inventory change cost before), `BENCH_POD_CHANGES` (default 200) changes.
//!
//! `BENCH_CHANGES` (default 1,000) changes per mode, singles and bursts each; `BENCH_MODES`
//! (`file,kube,pod`). `BENCH_PALISADE` runs another daemon binary in file mode and `BENCH_BUILD`
//! labels the rows (before/after comparisons run two builds of this bench in turn, see
//! scripts/policy-latency-interleaved.sh). Run: `sudo cargo bench -p palisade --bench policy_latency` (release; add
//! `--profile dev` for a debug build, much slower). The machine is shared: note the load
//! printed beside the figures.
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key as LpmTrieKey;
use aya::maps::{HashMap, LpmTrie, Map, MapData};
use palisade::inventory::{ChangeLog, ChangeSet, Inventory};
use palisade::probes::loader::{self, LoadOptions};
use palisade::segmentation::{PolicySet, Segmentation};
use palisade_common::{
    DIRECTION_INGRESS, IpAddrKey, IpCacheValue, MAP_SEG_IPCACHE, MAP_SEG_POLICY, PolicyKey, PolicyValue,
};
use support::bench::{cpu_seconds, env_sizes, env_usize, load, percentile, stop_daemon, wait_for_log};
use support::daemon::PALISADE;

const NAMESPACES: usize = 20;
const PODS_PER_NAMESPACE: usize = 10;
/// The first TCP port a change uses (the policies' own ports are 1024 + i, below it).
const CHANGED_PORT_FIRST: u32 = 30_000;

fn main() {
    if !palisade::sys::is_root() {
        println!("SKIP: the policy latency benchmark needs root (it loads the eBPF programs)");
        return;
    }
    let sizes = env_sizes("BENCH_POLICIES", "1000,10000");
    let changes = env_usize("BENCH_CHANGES", 1000);
    let burst = env_usize("BENCH_BURST", 20).max(1);
    let modes = std::env::var("BENCH_MODES").unwrap_or_else(|_| "file,kube,pod".into());
    let pod_changes = env_usize("BENCH_POD_CHANGES", 200);
    assert!(CHANGED_PORT_FIRST as usize + 2 * changes + burst < 65_536, "BENCH_CHANGES too large for the port space");
    println!("policy_latency: daemon {}; {changes} changes per mode, bursts of {burst}", palisade());
    println!("load before: {}", load());
    let mut rows = Vec::new();
    for n in sizes {
        if modes.contains("file") {
            rows.extend(file_mode(n, changes, burst));
        }
        if modes.contains("kube") || modes.contains("pod") {
            let policy_changes = if modes.contains("kube") { changes } else { 0 };
            let pods = if modes.contains("pod") { pod_changes } else { 0 };
            rows.extend(kube_mode(n, policy_changes, burst, pods));
        }
    }
    println!();
    println!("| policies | path | changes | p50 | p99 | max | CPU per change | load |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

// ---- the scenario ------------------------------------------------------------------------------

fn pod_ip(p: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 60 + (p / 250) as u8, (p % 250 + 1) as u8)
}

fn inventory_yaml() -> String {
    inventory_yaml_with(&[])
}

/// The inventory, pod p with the label `rev: r<revs[p]>` when set (a pod change).
fn inventory_yaml_with(revs: &[Option<usize>]) -> String {
    let mut text = String::from("endpoints:\n");
    for p in 0..NAMESPACES * PODS_PER_NAMESPACE {
        let (ns, k) = (p / PODS_PER_NAMESPACE, p % PODS_PER_NAMESPACE);
        let rev = match revs.get(p).copied().flatten() {
            Some(r) => format!(", rev: r{r}"),
            None => String::new(),
        };
        text.push_str(&format!("  - {{namespace: ns{ns}, name: pod{k}, labels: {{app: a{k}{rev}}}, ips: [{}]}}\n", pod_ip(p)));
    }
    text
}

/// A policy (below 200, so in every set) admitting pod p as its peer.
fn policy_admitting(p: usize) -> usize {
    let (ns, k) = (p / PODS_PER_NAMESPACE, p % PODS_PER_NAMESPACE);
    let i = ns + NAMESPACES * ((k + PODS_PER_NAMESPACE - 1) % PODS_PER_NAMESPACE);
    debug_assert_eq!(pods_of(i).1, p);
    i
}

/// (selected pod, peer pod) of policy i: both in namespace i mod 20.
fn pods_of(i: usize) -> (usize, usize) {
    let ns = i % NAMESPACES;
    let k = (i / NAMESPACES) % PODS_PER_NAMESPACE;
    (ns * PODS_PER_NAMESPACE + k, ns * PODS_PER_NAMESPACE + (k + 1) % PODS_PER_NAMESPACE)
}

/// Policy i, admitting its peer on `tcp_port` (TCP) and 1024 + i (UDP).
fn policy_yaml(i: usize, tcp_port: u32) -> String {
    let (sel, peer) = pods_of(i);
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: ns{}}}\nspec:\n  podSelector: {{matchLabels: {{app: a{}}}}}\n  policyTypes: [Ingress]\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}]\n      ports: [{{protocol: TCP, port: {tcp_port}}}, {{protocol: UDP, port: {}}}]\n",
        i % NAMESPACES,
        sel % PODS_PER_NAMESPACE,
        peer % PODS_PER_NAMESPACE,
        1024 + i
    )
}

/// The policy changed by change number c (distinct policies within any run of 20 changes).
fn changed_policy(c: usize, n: usize) -> usize {
    (c * 7919) % n
}

/// What the datapath must hold once change c (of policy i, to `port`) is in.
#[derive(Clone, Copy)]
struct Expected {
    key: PolicyKey,
    written: Instant,
}

fn expected_key(ipcache: &LpmTrie<MapData, IpAddrKey, IpCacheValue>, i: usize, port: u32) -> PolicyKey {
    let (sel, peer) = pods_of(i);
    let selected = cached(ipcache, pod_ip(sel)).expect("selected pod in SEG_IPCACHE");
    let peer = cached(ipcache, pod_ip(peer)).expect("peer pod in SEG_IPCACHE");
    PolicyKey {
        endpoint_id: selected.endpoint_id,
        peer_identity: peer.identity,
        direction: DIRECTION_INGRESS,
        protocol: 6,
        port_plen: 16,
        _pad: 0,
        port: port as u16,
        _pad2: 0,
    }
}

fn cached(map: &LpmTrie<MapData, IpAddrKey, IpCacheValue>, ip: Ipv4Addr) -> Option<IpCacheValue> {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&ip.octets());
    map.get(&LpmTrieKey::new(128, IpAddrKey { addr }), 0).ok()
}

fn open_ipcache(pin_dir: &Path) -> LpmTrie<MapData, IpAddrKey, IpCacheValue> {
    let path = pin_dir.join(MAP_SEG_IPCACHE);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    LpmTrie::try_from(Map::LpmTrie(data)).expect("SEG_IPCACHE is an LPM trie")
}

fn open_policy(pin_dir: &Path) -> HashMap<MapData, PolicyKey, PolicyValue> {
    let path = pin_dir.join(MAP_SEG_POLICY);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    HashMap::try_from(Map::HashMap(data)).expect("SEG_POLICY is a hash map")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The daemon binary file mode runs: `BENCH_PALISADE`, else this build's.
fn palisade() -> String {
    std::env::var("BENCH_PALISADE").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| PALISADE.to_string())
}

fn row(n: usize, path: &str, mut latencies: Vec<Duration>, cpu: f64, changes: usize, load: &str) -> String {
    latencies.sort();
    let build = std::env::var("BENCH_BUILD").map(|b| format!("{b} | ")).unwrap_or_default();
    let line = format!(
        "| {build}{n} | {path} | {} | {} | {} | {} | {:.2} ms | {load} |",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().map(|d| ms(*d)).unwrap_or_else(|| "-".into()),
        cpu * 1e3 / changes.max(1) as f64,
    );
    println!("{line}");
    line
}

// ---- file mode: palisade run, one file per policy ------------------------------------------------

struct Daemon {
    child: Child,
    log: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_daemon(&mut self.child, &self.pin_dir);
    }
}

/// Polls SEG_POLICY for every pending key; records each one's latency when it appears.
struct Poller {
    pending: Arc<Mutex<Vec<Expected>>>,
    seen: Arc<Mutex<Vec<Duration>>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    fn start(map: HashMap<MapData, PolicyKey, PolicyValue>) -> Poller {
        let pending: Arc<Mutex<Vec<Expected>>> = Arc::default();
        let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (pending, seen, done) = (pending.clone(), seen.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    let now: Vec<Expected> = pending.lock().expect("pending").clone();
                    let arrived: Vec<(PolicyKey, Instant)> =
                        now.iter().filter(|e| map.get(&e.key, 0).is_ok()).map(|e| (e.key, Instant::now())).collect();
                    if !arrived.is_empty() {
                        let mut pending = pending.lock().expect("pending");
                        let mut seen = seen.lock().expect("seen");
                        for (key, at) in arrived {
                            if let Some(k) = pending.iter().position(|e| e.key == key) {
                                let e = pending.swap_remove(k);
                                seen.push(at.duration_since(e.written));
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
            })
        };
        Poller { pending, seen, done, thread: Some(thread) }
    }

    fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.pending.lock().expect("pending").is_empty() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn file_mode(n: usize, changes: usize, burst: usize) -> Vec<String> {
    println!("\n== file mode, {n} policies (one file each), {} pods", NAMESPACES * PODS_PER_NAMESPACE);
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("policy-latency").join(n.to_string());
    let _ = std::fs::remove_dir_all(&work);
    let dir = work.join("policies");
    std::fs::create_dir_all(&dir).expect("policy directory");
    let staging = work.join("staging");
    std::fs::create_dir_all(&staging).expect("staging directory");
    std::fs::write(work.join("inventory.yaml"), inventory_yaml()).expect("inventory");
    for i in 0..n {
        std::fs::write(dir.join(format!("p{i}.yaml")), policy_yaml(i, 1024 + i as u32)).expect("policy file");
    }
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/palisade-bench-policy-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let log = work.join("daemon.log");
    let mut command = Command::new(palisade());
    command
        .args(["run", "--no-metrics"])
        .arg("--inventory")
        .arg(work.join("inventory.yaml"))
        .arg("--policies")
        .arg(&dir)
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("daemon log"));
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let started = Instant::now();
    let child = command.spawn().unwrap_or_else(|e| panic!("starting {} run: {e}", palisade()));
    let mut daemon = Daemon { child, log, pin_dir: pin_dir.clone() };
    wait_for_log(&mut daemon.child, &daemon.log, "palisade is running", Duration::from_secs(900));
    println!("daemon running after {:.1} s", started.elapsed().as_secs_f64());
    let ipcache = open_ipcache(&pin_dir);
    let poller = Poller::start(open_policy(&pin_dir));
    let pid = daemon.child.id();
    let mut rows = Vec::new();
    let mut c = 0usize;
    let write = |c: usize| -> Expected {
        let i = changed_policy(c, n);
        let port = CHANGED_PORT_FIRST + c as u32;
        let key = expected_key(&ipcache, i, port);
        let staged = staging.join(format!("p{i}.yaml"));
        std::fs::write(&staged, policy_yaml(i, port)).expect("staged policy");
        let written = Instant::now();
        std::fs::rename(&staged, dir.join(format!("p{i}.yaml"))).expect("rename into the policy directory");
        Expected { key, written }
    };
    for (label, group) in [("file, single", 1usize), ("file, bursts", burst)] {
        // Let the previous phase's reloads settle.
        std::thread::sleep(Duration::from_millis(500));
        let load_at = load();
        let cpu_before = cpu_seconds(pid);
        let mut done = 0;
        let mut missing = 0;
        while done < changes {
            let k = group.min(changes - done);
            let batch: Vec<Expected> = (0..k).map(|j| write(c + j)).collect();
            c += k;
            done += k;
            poller.pending.lock().expect("pending").extend(batch);
            if !poller.wait_empty(Duration::from_secs(120)) {
                missing += poller.pending.lock().expect("pending").drain(..).count();
            }
        }
        let cpu = cpu_seconds(pid) - cpu_before;
        if missing > 0 {
            println!("{label}: {missing} changes not in the map within 120 s");
        }
        rows.push(row(n, label, poller.take(), cpu, changes, &load_at));
    }
    drop(poller);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&work);
    rows
}

// ---- in-process: the Enforcer fed whole sets, as the NetworkPolicy watcher feeds it -------------

fn kube_mode(n: usize, changes: usize, burst: usize, pod_changes: usize) -> Vec<String> {
    println!("\n== in-process (Kubernetes path), {n} policies, {} pods", NAMESPACES * PODS_PER_NAMESPACE);
    let mut log = ChangeLog::new();
    let mut inventory = Inventory::parse(&inventory_yaml(), Path::new("bench-inventory.yaml")).expect("inventory");
    inventory.history = Some(Arc::new(log.clone()));
    let first_inventory = inventory.clone();
    let text: Vec<String> = (0..n).map(|i| policy_yaml(i, 1024 + i as u32)).collect();
    let mut set = PolicySet::parse(&text.join("---\n"), Path::new("bench-policies.yaml")).expect("policies");
    let pin_dir = PathBuf::from(loader::BPFFS_MOUNT).join(format!("palisade-bench-policy-kube-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let probes = loader::load(&LoadOptions { pin_dir: Some(pin_dir.clone()), try_kprobes: false, ..LoadOptions::default() })
        .expect("load the eBPF object");
    let host = runtime.block_on(async { palisade::probes::host::ProbeHost::spawn(probes) });
    let started = Instant::now();
    let mut enforcer = runtime
        .block_on(palisade::enforcement::Enforcer::start(
            host,
            Arc::new(inventory),
            set.clone(),
            Default::default(),
            Vec::new(),
            pin_dir.join("links"),
            palisade::sys::cgroup2_mount().expect("cgroup2 mount"),
            Default::default(),
            None,
            None,
        ))
        .expect("enforcer");
    println!("first compile and sync {:.1} s", started.elapsed().as_secs_f64());
    let ipcache = open_ipcache(&pin_dir);
    let policy_map = open_policy(&pin_dir);
    let mut rows = Vec::new();
    let mut c = 0usize;
    let phases: &[(&str, usize)] = if changes > 0 { &[("kube (in-process), single", 1usize), ("kube (in-process), bursts", burst)] } else { &[] };
    for &(label, group) in phases {
        let load_at = load();
        let cpu_before = cpu_seconds(std::process::id());
        let mut latencies = Vec::with_capacity(changes);
        let mut done = 0;
        while done < changes {
            let k = group.min(changes - done);
            let mut made = Vec::with_capacity(k);
            for j in 0..k {
                let i = changed_policy(c + j, n);
                let port = CHANGED_PORT_FIRST + (c + j) as u32;
                let key = expected_key(&ipcache, i, port);
                let at = Instant::now();
                let one = PolicySet::parse(&policy_yaml(i, port), Path::new("bench-policies.yaml")).expect("policy");
                let name = format!("p{i}");
                let index = set.policies.iter().position(|p| p.name == name).expect("policy in the set");
                set.policies[index] = one.policies.into_iter().next().expect("one policy");
                made.push((key, at));
            }
            // What the watch channel's receiver does: a clone of the latest set.
            runtime.block_on(enforcer.set_policies(set.clone())).expect("set_policies");
            let returned = Instant::now();
            for (key, at) in made {
                assert!(policy_map.get(&key, 0).is_ok(), "change not in SEG_POLICY after set_policies returned");
                latencies.push(returned - at);
            }
            c += k;
            done += k;
        }
        let cpu = cpu_seconds(std::process::id()) - cpu_before;
        rows.push(row(n, label, latencies, cpu, changes, &load_at));
    }
    if pod_changes > 0 {
        rows.extend(pod_mode(n, pod_changes, &runtime, &mut enforcer, &ipcache, &policy_map, first_inventory, &set, &mut log));
    }
    drop(enforcer);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&pin_dir);
    rows
}


// ---- pod changes: the inventory's producer publishes one changed pod at a time ---------------

#[allow(clippy::too_many_arguments)]
fn pod_mode(
    n: usize,
    changes: usize,
    runtime: &tokio::runtime::Runtime,
    enforcer: &mut palisade::enforcement::Enforcer,
    ipcache: &LpmTrie<MapData, IpAddrKey, IpCacheValue>,
    policy_map: &HashMap<MapData, PolicyKey, PolicyValue>,
    first: Inventory,
    set: &PolicySet,
    log: &mut ChangeLog,
) -> Vec<String> {
    let pods = NAMESPACES * PODS_PER_NAMESPACE;
    let mut revs: Vec<Option<usize>> = vec![None; pods];
    let mut published = first;
    // The next inventory, pod (c * 37) mod 200 with a label no pod had, as the source publishes it.
    let mut next = |c: usize, revs: &mut Vec<Option<usize>>, published: &mut Inventory| -> (usize, Arc<Inventory>) {
        let p = (c * 37) % pods;
        revs[p] = Some(c);
        let mut inventory = Inventory::parse(&inventory_yaml_with(revs), Path::new("bench-inventory.yaml")).expect("inventory");
        log.record(ChangeSet::between(published, &inventory));
        inventory.history = Some(Arc::new(log.clone()));
        *published = inventory.clone();
        (p, Arc::new(inventory))
    };
    let mut rows = Vec::new();
    // (a) change to maps through the enforcer (compile + sync).
    let load_at = load();
    let cpu_before = cpu_seconds(std::process::id());
    let mut latencies = Vec::with_capacity(changes);
    for c in 0..changes {
        let (p, inventory) = next(c, &mut revs, &mut published);
        let at = Instant::now();
        runtime.block_on(enforcer.set_inventory(inventory)).expect("set_inventory");
        let returned = Instant::now();
        let identity = cached(ipcache, pod_ip(p)).expect("changed pod in SEG_IPCACHE").identity;
        let i = policy_admitting(p);
        let selected = cached(ipcache, pod_ip(pods_of(i).0)).expect("selected pod in SEG_IPCACHE");
        let key = PolicyKey {
            endpoint_id: selected.endpoint_id,
            peer_identity: identity,
            direction: DIRECTION_INGRESS,
            protocol: 17,
            port_plen: 16,
            _pad: 0,
            port: (1024 + i) as u16,
            _pad2: 0,
        };
        assert!(policy_map.get(&key, 0).is_ok(), "pod {p}'s new identity {identity} not in policy {i}'s entry after set_inventory returned");
        latencies.push(returned - at);
    }
    let cpu = cpu_seconds(std::process::id()) - cpu_before;
    rows.push(row(n, "pod change, kube (in-process), compile + sync", latencies, cpu, changes, &load_at));

    // (b) the compile alone, incremental and every policy, alternating.
    let mut seg = Segmentation::new(Arc::new(published.clone()), set.clone());
    let load_at = load();
    let (mut incremental, mut full) = (Vec::with_capacity(changes), Vec::with_capacity(changes));
    let mut parts = 0;
    for c in changes..2 * changes {
        let (_, inventory) = next(c, &mut revs, &mut published);
        let time_full = |seg: &Segmentation| {
            let at = Instant::now();
            std::hint::black_box(seg.full_compile());
            at.elapsed()
        };
        if c % 2 == 0 {
            full.push(time_full(&seg));
        }
        let at = Instant::now();
        seg.set_inventory(inventory);
        incremental.push(at.elapsed());
        parts += seg.parts_compiled();
        if c % 2 == 1 {
            full.push(time_full(&seg));
        }
    }
    println!("incremental pod changes compiled {:.1} policies each on average (of {n})", parts as f64 / changes as f64);
    rows.push(row(n, "pod change, compile only: every policy (before)", full, 0.0, changes, &load_at));
    rows.push(row(n, "pod change, compile only: incremental (after)", incremental, 0.0, changes, &load_at));
    rows
}
