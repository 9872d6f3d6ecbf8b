//! Segmentation, end to end with real packets (prints a table; not a test). Root only.
//!
//!     sudo cargo bench -p palisade --bench segmentation_net
//!
//! Eight configurations, each on its own pair of lab pods (client -> server over veth + the lab
//! bridge), all built before the first measurement and measured interleaved in one run (many
//! short rounds, configuration order rotated each round; medians over rounds), so that machine
//! load falls on all of them alike:
//!
//! - `no program`, twice, on two pairs: the second is an A/A control whose distance from the
//!   first is the noise floor of the run;
//! - `palisade N` (N = 10, 1,000, 10,000): one palisade datapath object per configuration (its
//!   own maps), both cgroup_skb programs attached to both pods of the pair. N NetworkPolicies
//!   all select the server pod (so it is isolated for ingress and every policy compiles into its
//!   per-endpoint rules): N-1 allow a distinct ipBlock /24 (10.a.b.0/24) on a distinct port, one
//!   allows `app: client` on the three bench ports;
//! - `iptables N`: the equivalent rules in the server pod's netns, INPUT chain, loaded with
//!   `iptables-restore`: `-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT` first (as
//!   iptables-based enforcers do), then the N-1 non-matching `-s 10.a.b.0/24 -p tcp --dport P
//!   -j ACCEPT`, then the matching `-s CLIENT/32 -p tcp -m multiport --dports ... -j ACCEPT`,
//!   then `-j DROP`. The allow comes last, so a new connection walks the whole chain.
//!
//! Measured per configuration and round, by processes of this binary running inside the pods
//! (nice -20, clients pinned to CPU 0 and servers to CPU 1): TCP request/response (1 byte each
//! way, TCP_NODELAY, one connection; p50 and p99 of BENCH_RR round trips, default 3,000, after
//! 1,000 warm-up ones), TCP bulk throughput (one connection, 256 KiB writes for BENCH_BULK_MS,
//! default 200; timed until the server has acknowledged the last byte at the application level)
//! and new connections per second (connect, 1 byte each way, server closes, client reads EOF and
//! closes; for BENCH_CRR_MS, default 200). BENCH_ROUNDS (default 30) rounds. For palisade the
//! program runs per round trip, per MiB and per connection are counted from SEG_COUNTERS.
//! Before measuring, each configuration is checked: a connection to a port the server listens
//! on but no rule allows must connect (no program) or time out (palisade, iptables: dropped).
//!
//! iptables is installed with `apt-get install -y iptables` when `iptables-restore` is missing
//! (Debian bookworm: iptables 1.8.9, nf_tables backend).
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use palisade::inventory::Inventory;
use palisade::lab::{Lab, LabOptions};
use palisade::segmentation::datapath::{self, Datapath};
use palisade::segmentation::{PolicySet, Segmentation};
use palisade_common::{CNT_PACKETS, MAP_SEG_COUNTERS};

const MARK: &str = "@@ ";
const PORT_RR: u16 = 5201;
const PORT_BULK: u16 = 5202;
const PORT_CRR: u16 = 5203;
/// A port the server listens on and no rule allows: connects when unenforced, dropped otherwise.
/// (A listener is needed: cgroup_skb ingress runs on the receiving socket, so a SYN to a closed
/// port meets no program and is answered with a RST by the stack.)
const PORT_DENIED: u16 = 5299;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        // Nice -20: the machine is shared with other builds; at the highest CFS weight the
        // measuring processes (and the softirq work done in their context) lose far less time
        // to them, which is most of the run-to-run noise. Same for every configuration.
        // SAFETY: plain syscall on this process.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) };
        // Clients on CPU 0, servers on CPU 1: every configuration gets the same placement
        // (otherwise round trips switch between one-CPU and two-CPU paths from run to run).
        pin_to_cpu(if args.get(3).map(String::as_str) == Some("server") { 1 } else { 0 });
        let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| panic!("role {:?}: argument {i} missing", args.get(2)));
        match arg(2).as_str() {
            "server" => server(),
            "rr" => rr(&arg(3), arg(4).parse().expect("count")),
            "bulk" => bulk(&arg(3), arg(4).parse().expect("ms")),
            "crr" => crr(&arg(3), arg(4).parse().expect("ms")),
            "check" => check(&arg(3)),
            other => panic!("unknown role {other:?}"),
        }
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // cargo bench --list
    }
    if !palisade::sys::is_root() {
        println!("SKIP: the end-to-end segmentation benchmark needs root (lab pods, eBPF, iptables)");
        return;
    }
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let settings = Settings {
        rounds: env("BENCH_ROUNDS", 30) as usize,
        rr: env("BENCH_RR", 3_000),
        bulk_ms: env("BENCH_BULK_MS", 200),
        crr_ms: env("BENCH_CRR_MS", 200),
    };
    run(&settings);
}

struct Settings {
    rounds: usize,
    rr: u64,
    bulk_ms: u64,
    crr_ms: u64,
}

// ---- roles (processes inside the pods) -----------------------------------------------------

fn pin_to_cpu(cpu: usize) {
    if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) <= cpu {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within its bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn server() {
    let listen = |port: u16| TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| panic!("bind {port}: {e}"));
    let (rr_l, bulk_l, crr_l) = (listen(PORT_RR), listen(PORT_BULK), listen(PORT_CRR));
    let denied_l = listen(PORT_DENIED);
    std::thread::spawn(move || for _c in denied_l.incoming() {});
    std::thread::spawn(move || {
        for mut c in rr_l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        for mut c in bulk_l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut b = vec![0u8; 256 * 1024];
                let mut total: u64 = 0;
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = c.write_all(&total.to_le_bytes());
            });
        }
    });
    std::thread::spawn(move || {
        // Inline, one connection at a time: the server closes first, so TIME_WAIT stays here
        // and the client's ephemeral ports never run out.
        for mut c in crr_l.incoming().map_while(Result::ok) {
            let mut b = [0u8; 1];
            if matches!(c.read(&mut b), Ok(1)) {
                let _ = c.write_all(&b);
            }
        }
    });
    println!("{MARK}ready");
    let _ = std::io::stdout().flush();
    // Lives until the bench kills it (or its stdin closes).
    let mut sink = String::new();
    let _ = std::io::stdin().read_line(&mut sink);
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

fn rr(ip: &str, count: u64) {
    let mut c = TcpStream::connect(addr(ip, PORT_RR)).expect("rr connect");
    c.set_nodelay(true).expect("nodelay");
    let mut b = [7u8; 1];
    let mut once = |c: &mut TcpStream| {
        c.write_all(&b).expect("rr write");
        c.read_exact(&mut b).expect("rr read");
    };
    for _ in 0..count.min(1000) {
        once(&mut c);
    }
    let mut samples = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        once(&mut c);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let q = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    println!("{MARK}{} {}", q(0.50), q(0.99));
}

fn bulk(ip: &str, ms: u64) {
    let mut c = TcpStream::connect(addr(ip, PORT_BULK)).expect("bulk connect");
    let buf = vec![0x5au8; 256 * 1024];
    let mut sent: u64 = 0;
    let start = Instant::now();
    let until = Duration::from_millis(ms);
    while start.elapsed() < until {
        c.write_all(&buf).expect("bulk write");
        sent += buf.len() as u64;
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack).expect("bulk ack");
    let elapsed = start.elapsed().as_nanos() as u64;
    assert_eq!(u64::from_le_bytes(ack), sent, "server received everything");
    println!("{MARK}{sent} {elapsed}");
}

fn crr(ip: &str, ms: u64) {
    let target = addr(ip, PORT_CRR);
    let start = Instant::now();
    let until = Duration::from_millis(ms);
    let mut n: u64 = 0;
    let mut rest = Vec::new();
    while start.elapsed() < until {
        let mut c = TcpStream::connect(target).expect("crr connect");
        let mut b = [1u8; 1];
        c.write_all(&b).expect("crr write");
        c.read_exact(&mut b).expect("crr read");
        rest.clear();
        let _ = c.read_to_end(&mut rest); // the server's FIN
        n += 1;
    }
    println!("{MARK}{n} {}", start.elapsed().as_nanos());
}

/// A connection to the port nothing allows: "connected", "timeout" (dropped) or "refused".
fn check(ip: &str) {
    let verdict = match TcpStream::connect_timeout(&addr(ip, PORT_DENIED), Duration::from_millis(400)) {
        Ok(_) => "connected",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => "timeout",
        Err(e) => panic!("check: {e}"),
    };
    println!("{MARK}{verdict}");
}

// ---- the benchmark -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Palisade,
    Iptables,
}

struct Config {
    label: String,
    kind: Kind,
    n: usize,
    client: String,
    server: String,
    server_ip: String,
    setup: String,
}

#[derive(Default)]
struct Results {
    rr_p50: Vec<u64>,
    rr_p99: Vec<u64>,
    gbps: Vec<f64>,
    cps: Vec<f64>,
    /// Program runs (both programs, both pods) during each measurement: per round trip, per
    /// MiB sent, per connection (palisade only).
    runs_rr: Vec<f64>,
    runs_mib: Vec<f64>,
    runs_conn: Vec<f64>,
}

/// Program runs so far (SEG_COUNTERS[CNT_PACKETS], summed over CPUs).
fn program_runs(bpf: Option<&Ebpf>) -> u64 {
    let Some(bpf) = bpf else { return 0 };
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(bpf.map(MAP_SEG_COUNTERS).expect("SEG_COUNTERS")).expect("per-cpu array");
    map.get(&CNT_PACKETS, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

fn role(lab: &Lab, pod: &str, args: &[&str]) -> Command {
    let exe = std::env::current_exe().expect("exe");
    let mut c = lab.exec(pod, exe).expect("exec in pod");
    c.arg("--role").args(args);
    c
}

/// Runs a role to completion and returns its marked output line's fields.
fn measure(lab: &Lab, pod: &str, args: &[&str]) -> Vec<String> {
    let out = role(lab, pod, args).stderr(Stdio::inherit()).output().expect("run role");
    assert!(out.status.success(), "role {args:?} in {pod} failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix(MARK)).unwrap_or_else(|| panic!("role {args:?}: no result in {text:?}"));
    line.split_whitespace().map(str::to_string).collect()
}

fn policies(n: usize) -> PolicySet {
    let mut text = String::new();
    for i in 0..n.saturating_sub(1) {
        text.push_str(&format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: filler-{i}, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.{}.{}.0/24}}}}]\n    ports: [{{port: {}}}]\n",
            (i >> 8) & 255,
            i & 255,
            10_000 + i
        ));
    }
    text.push_str(&format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-client, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: {PORT_RR}}}, {{port: {PORT_BULK}}}, {{port: {PORT_CRR}}}]\n"
    ));
    PolicySet::parse(&text, Path::new("segmentation-net-bench.yaml")).expect("bench policies")
}

fn iptables_rules(n: usize, client_ip: &str) -> String {
    let mut r = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    r.push_str("-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for i in 0..n.saturating_sub(1) {
        r.push_str(&format!("-A INPUT -s 10.{}.{}.0/24 -p tcp -m tcp --dport {} -j ACCEPT\n", (i >> 8) & 255, i & 255, 10_000 + i));
    }
    r.push_str(&format!("-A INPUT -s {client_ip}/32 -p tcp -m multiport --dports {PORT_RR},{PORT_BULK},{PORT_CRR} -j ACCEPT\n"));
    r.push_str("-A INPUT -j DROP\nCOMMIT\n");
    r
}

fn ensure_iptables() -> String {
    let have = || Command::new("iptables-restore").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !have() {
        eprintln!("iptables-restore missing: apt-get install -y iptables");
        let _ = Command::new("apt-get").args(["install", "-y", "iptables"]).env("DEBIAN_FRONTEND", "noninteractive").status();
    }
    let out = Command::new("iptables").arg("--version").output().expect("iptables (apt-get install -y iptables)");
    assert!(out.status.success(), "iptables --version failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn median_u(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn run(s: &Settings) {
    let started = Instant::now();
    let iptables_version = ensure_iptables();
    let lab_name = format!("segnet{}", std::process::id());
    let specs: Vec<(String, Kind, usize)> = vec![
        ("no program".into(), Kind::None, 0),
        ("no program, 2nd pair (A/A)".into(), Kind::None, 0),
        ("palisade, 10 policies".into(), Kind::Palisade, 10),
        ("palisade, 1,000 policies".into(), Kind::Palisade, 1_000),
        ("palisade, 10,000 policies".into(), Kind::Palisade, 10_000),
        ("iptables, 10 rules".into(), Kind::Iptables, 10),
        ("iptables, 1,000 rules".into(), Kind::Iptables, 1_000),
        ("iptables, 10,000 rules".into(), Kind::Iptables, 10_000),
    ];
    let mut inventory_text = String::from("namespaces:\n  - name: bench\nendpoints:\n");
    let mut configs = Vec::new();
    for (k, (label, kind, n)) in specs.into_iter().enumerate() {
        let (client_ip, server_ip) = (format!("198.18.60.{}", 10 * k + 1), format!("198.18.60.{}", 10 * k + 2));
        for (name, ip, app) in [(format!("c{k}"), &client_ip, "client"), (format!("s{k}"), &server_ip, "server")] {
            inventory_text.push_str(&format!("  - {{namespace: bench, name: {name}, labels: {{app: {app}}}, ips: [{ip}]}}\n"));
        }
        configs.push(Config { label, kind, n, client: format!("bench/c{k}"), server: format!("bench/s{k}"), server_ip, setup: String::new() });
    }
    let inventory = Inventory::parse(&inventory_text, Path::new("segmentation-net-bench.yaml")).expect("inventory");
    let lab = Lab::up(&inventory, &LabOptions::named(&lab_name)).expect("lab up").into_guard();

    // Palisade: one object (own maps) per configuration, synced, attached to both pods.
    let mut objects: Vec<Option<Ebpf>> = Vec::new();
    for (k, c) in configs.iter_mut().enumerate() {
        let client_ip = format!("198.18.60.{}", 10 * k + 1);
        match c.kind {
            Kind::None => {
                c.setup = "nothing attached".into();
                objects.push(None);
            }
            Kind::Palisade => {
                let t = Instant::now();
                let pair = Inventory::parse(
                    &format!(
                        "namespaces:\n  - name: bench\nendpoints:\n  - {{namespace: bench, name: c{k}, labels: {{app: client}}, ips: [{client_ip}]}}\n  - {{namespace: bench, name: s{k}, labels: {{app: server}}, ips: [{}]}}\n",
                        c.server_ip
                    ),
                    Path::new("pair.yaml"),
                )
                .expect("pair inventory");
                let seg = Segmentation::new(pair, policies(c.n));
                let mut bpf = datapath::load(None).expect("load eBPF object");
                let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
                dp.sync(&mut bpf, seg.compiled()).expect("sync");
                for pod in [&c.client, &c.server] {
                    dp.attach(&mut bpf, &lab.pod_cgroup_dir(pod).expect("cgroup dir")).expect("attach");
                }
                c.setup = format!(
                    "{} POLICY keys, {} IPCACHE entries; compiled, synced and attached in {:.1} s",
                    thousands(seg.compiled().policy.len() as u64),
                    thousands(seg.compiled().ipcache.len() as u64),
                    t.elapsed().as_secs_f64()
                );
                // The links belong to the programs in `bpf`: they stay attached while it lives.
                drop(dp);
                objects.push(Some(bpf));
            }
            Kind::Iptables => {
                let t = Instant::now();
                let netns = lab.pod(&c.server).expect("pod").netns.clone();
                let mut child = Command::new("ip")
                    .args(["netns", "exec", &netns, "iptables-restore"])
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("iptables-restore");
                child.stdin.take().expect("stdin").write_all(iptables_rules(c.n, &client_ip).as_bytes()).expect("rules");
                assert!(child.wait().expect("wait").success(), "iptables-restore failed");
                let listed = Command::new("ip").args(["netns", "exec", &netns, "iptables", "-S", "INPUT"]).output().expect("iptables -S");
                let rules = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.starts_with("-A INPUT")).count();
                objects.push(None);
                c.setup = format!("{} rules in INPUT (conntrack accept + {} + allow + drop); loaded in {:.1} s", thousands(rules as u64), thousands(c.n.saturating_sub(1) as u64), t.elapsed().as_secs_f64());
            }
        }
    }

    // Servers, then the enforcement check.
    let mut servers: Vec<Child> = Vec::new();
    for c in &configs {
        let mut child = role(&lab, &c.server, &["server"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("ready");
        assert_eq!(line.trim(), format!("{MARK}ready").trim(), "server in {}", c.server);
        servers.push(child);
    }
    for c in &configs {
        let verdict = measure(&lab, &c.client, &["check", &c.server_ip]).join(" ");
        let want = if c.kind == Kind::None { "connected" } else { "timeout" };
        assert_eq!(verdict, want, "{}: a connection to port {PORT_DENIED} must be {want}", c.label);
    }
    println!("iptables: {iptables_version}; setup:");
    for c in &configs {
        println!("  {:<28} {}", c.label, c.setup);
    }
    let setup_s = started.elapsed().as_secs_f64();

    // Interleaved rounds: every metric for every configuration each round, order rotated.
    let mut results: Vec<Results> = configs.iter().map(|_| Results::default()).collect();
    let (rr_n, bulk_ms, crr_ms) = (s.rr.to_string(), s.bulk_ms.to_string(), s.crr_ms.to_string());
    for round in 0..s.rounds {
        for step in 0..configs.len() {
            let i = (round + step) % configs.len();
            let c = &configs[i];
            let runs = program_runs(objects[i].as_ref());
            let f = measure(&lab, &c.client, &["rr", &c.server_ip, &rr_n]);
            let runs = program_runs(objects[i].as_ref()) - runs;
            results[i].runs_rr.push(runs as f64 / (s.rr + s.rr.min(1000)) as f64);
            results[i].rr_p50.push(f[0].parse().expect("p50"));
            results[i].rr_p99.push(f[1].parse().expect("p99"));
        }
        for step in 0..configs.len() {
            let i = (round + step) % configs.len();
            let c = &configs[i];
            let runs = program_runs(objects[i].as_ref());
            let f = measure(&lab, &c.client, &["bulk", &c.server_ip, &bulk_ms]);
            let runs = program_runs(objects[i].as_ref()) - runs;
            let (bytes, ns): (f64, f64) = (f[0].parse().expect("bytes"), f[1].parse().expect("ns"));
            results[i].runs_mib.push(runs as f64 / (bytes / 1048576.0));
            results[i].gbps.push(bytes * 8.0 / ns);
        }
        for step in 0..configs.len() {
            let i = (round + step) % configs.len();
            let c = &configs[i];
            let runs = program_runs(objects[i].as_ref());
            let f = measure(&lab, &c.client, &["crr", &c.server_ip, &crr_ms]);
            let runs = program_runs(objects[i].as_ref()) - runs;
            let (n, ns): (f64, f64) = (f[0].parse().expect("n"), f[1].parse().expect("ns"));
            results[i].runs_conn.push(runs as f64 / n);
            results[i].cps.push(n * 1e9 / ns);
        }
        eprintln!("round {}/{} done ({:.0} s)", round + 1, s.rounds, started.elapsed().as_secs_f64());
    }
    for mut child in servers {
        let _ = child.kill();
        let _ = child.wait();
    }

    let base_gbps = median_f(results[0].gbps.clone());
    let base_cps = median_f(results[0].cps.clone());
    let base_p50 = median_u(results[0].rr_p50.clone()) as f64;
    println!();
    println!(
        "{} rounds, medians over rounds; RR = {} round trips of 1 byte per round, bulk {} ms, connections {} ms (setup {:.0} s, total {:.0} s)",
        s.rounds,
        thousands(s.rr),
        s.bulk_ms,
        s.crr_ms,
        setup_s,
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| configuration | RR p50 µs | RR p99 µs | RR p50 vs none | throughput Gbit/s | vs none | new connections/s | vs none |");
    println!("|---|---|---|---|---|---|---|---|");
    for (c, r) in configs.iter().zip(&results) {
        let p50 = median_u(r.rr_p50.clone());
        let p99 = median_u(r.rr_p99.clone());
        let gbps = median_f(r.gbps.clone());
        let cps = median_f(r.cps.clone());
        println!(
            "| {} | {:.1} | {:.1} | {:+.1}% | {:.2} | {:+.1}% | {} | {:+.1}% |",
            c.label,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            (p50 as f64 / base_p50 - 1.0) * 100.0,
            gbps,
            (gbps / base_gbps - 1.0) * 100.0,
            thousands(cps.round() as u64),
            (cps / base_cps - 1.0) * 100.0
        );
    }
    println!();
    println!("per round (RR p50 µs / Gbit/s / connections/s):");
    for (c, r) in configs.iter().zip(&results) {
        let rounds: Vec<String> = (0..r.gbps.len())
            .map(|j| format!("{:.1}/{:.2}/{:.0}", r.rr_p50[j] as f64 / 1000.0, r.gbps[j], r.cps[j]))
            .collect();
        println!("  {:<28} {}", c.label, rounds.join("  "));
    }
    println!();
    println!("palisade program runs (medians): per round trip / per MiB of bulk / per new connection");
    for (c, r) in configs.iter().zip(&results) {
        if c.kind == Kind::Palisade {
            println!("  {:<28} {:.2} / {:.1} / {:.1}", c.label, median_f(r.runs_rr.clone()), median_f(r.runs_mib.clone()), median_f(r.runs_conn.clone()));
        }
    }
    drop(objects);
    drop(lab);
}
