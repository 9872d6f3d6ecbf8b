//! Kernel tests: the cgroup_skb datapath enforcing compiled policies on real packets between
//! pods (network namespace + veth into a bridge inside a lab namespace + a cgroup each).
//! Root only: skipped with a printed reason otherwise, failing when PALISADE_REQUIRE_KERNEL=1.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use palisade::inventory::Inventory;
use palisade::segmentation::conntrack::{self, ConntrackSettings, CtTimeouts, EstablishedFlows};
use palisade::segmentation::datapath::{self, Datapath};
use palisade::segmentation::{PolicySet, Segmentation};
use std::collections::BTreeMap;

use palisade_common::{CGROUP_ENDPOINT, CGROUP_PARENT, CT_DEFAULT_PER_ENDPOINT_MAX, CgroupValue, SEG_MAX_CONNTRACK};

fn kernel_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("PALISADE_REQUIRE_KERNEL").as_deref() == Ok("1") {
        panic!("{test}: needs root (PALISADE_REQUIRE_KERNEL=1)");
    }
    eprintln!("skipping {test}: needs root to load eBPF programs and create network namespaces");
    false
}

const HELPER: &str = r#"
import socket, sys, threading
mode = sys.argv[1]
if mode == "serve":
    for port in sys.argv[2:]:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port))); s.listen(64)
        def loop(s=s):
            while True:
                c, _ = s.accept()
                def echo(c=c):
                    while True:
                        d = c.recv(4096)
                        if not d: break
                        c.sendall(d)
                threading.Thread(target=echo, daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
elif mode == "connect":
    try:
        c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=1.0)
        c.sendall(b"ping"); ok = c.recv(4) == b"ping"
        sys.exit(0 if ok else 1)
    except Exception:
        sys.exit(1)
elif mode == "serve_close":
    # Echo once, then close first (the server's FIN), so the client's side ends CLOSED, not in
    # TIME_WAIT, and may reuse its port at once.
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            d = c.recv(4096)
            if d: c.sendall(d)
            c.close()
    threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
elif mode == "connect_from":
    # One exchange from a fixed source port; the server closes first, then we do.
    try:
        c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("0.0.0.0", int(sys.argv[4]))); c.settimeout(1.0)
        c.connect((sys.argv[2], int(sys.argv[3])))
        c.sendall(b"ping"); ok = c.recv(4) == b"ping"
        ok = ok and c.recv(4) == b""
        c.close()
        sys.exit(0 if ok else 1)
    except Exception:
        sys.exit(1)
elif mode == "serve_push":
    # Sends "data" to every accepted connection on each line read from stdin (a server push: no
    # request from the client precedes it).
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(64)
    conns = []
    def loop():
        while True:
            c, _ = s.accept(); conns.append(c)
    threading.Thread(target=loop, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        for c in list(conns):
            try: c.sendall(b"data")
            except Exception: pass
        print("pushed", flush=True)
elif mode == "read":
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=1.0)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            d = c.recv(64)
            print("ok" if d == b"data" else "fail", flush=True)
        except Exception:
            print("fail", flush=True)
elif mode == "flood":
    # UDP to many distinct (address, port) pairs: one conntrack entry each at this pod's egress.
    # Two packets per flow: the second is a lookup, which an LRU table takes as recent use.
    n = int(sys.argv[2]); per_addr = 60000
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    for i in range(n):
        dst = ("198.19.200.%d" % (1 + i // per_addr), 1 + i % per_addr)
        try:
            s.sendto(b"x", dst); s.sendto(b"x", dst); sent += 1
        except OSError:
            pass
    print(sent, flush=True)
elif mode == "connect_loop":
    # Tries a connection every 50 ms for the given seconds, from the first instant the process
    # runs; prints how many got through.
    import time
    end = time.monotonic() + float(sys.argv[4]); ok = 0; tries = 0
    while time.monotonic() < end:
        tries += 1
        try:
            c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=0.2)
            c.sendall(b"ping"); ok += c.recv(4) == b"ping"; c.close()
        except Exception:
            time.sleep(0.05)
    print(ok, tries, flush=True)
elif mode == "self":
    # Traffic inside the pod: loopback and the pod's own address.
    res = []
    for addr in ["127.0.0.1", sys.argv[2]]:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 0)); s.listen(1)
        try:
            c = socket.create_connection(s.getsockname(), timeout=1.0); a, _ = s.accept()
            c.sendall(b"x"); res.append(a.recv(1) == b"x")
        except Exception:
            res.append(False)
    sys.exit(0 if all(res) else 1)
elif mode == "badver":
    # A hand-built packet with IP version 7 (unparsable) on a raw socket; prints the outcome.
    import errno, struct
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    dst = socket.inet_aton(sys.argv[2])
    pkt = bytes([0x75, 0]) + struct.pack("!H", 28) + bytes(4) + bytes([64, 17, 0, 0]) + socket.inet_aton(sys.argv[3]) + dst + bytes(8)
    try:
        r.sendto(pkt, (sys.argv[2], 0)); print("sent", flush=True)
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
elif mode == "hold":
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=1.0)
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            c.sendall(line.strip().encode()); d = c.recv(64)
            print("ok" if d == line.strip().encode() else "fail", flush=True)
        except Exception:
            print("fail", flush=True)
"#;

struct Pod {
    name: String,
    netns: String,
    ip: String,
    cgroup_abs: PathBuf,
    cgroup_rel: String,
}

/// A minimal lab: one bridge namespace, one namespace + cgroup per pod. Cleans up on drop.
struct Lab {
    prefix: String,
    bridge_ns: String,
    cgroup_root: PathBuf,
    pods: Vec<Pod>,
    children: Vec<Child>,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?} failed");
}

impl Lab {
    fn new(test: &str, pods: &[(&str, &str)]) -> Lab {
        let prefix = format!("sg{}{}", std::process::id() % 10000, test);
        let mount = datapath::cgroup2_mount().expect("cgroup2 mounted");
        let cgroup_root = mount.join(format!("palisade-test-{prefix}"));
        let bridge_ns = format!("{prefix}-br");
        let mut lab = Lab { prefix: prefix.clone(), bridge_ns: bridge_ns.clone(), cgroup_root: cgroup_root.clone(), pods: Vec::new(), children: Vec::new() };
        sh(&["ip", "netns", "add", &bridge_ns]);
        sh(&["ip", "-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &bridge_ns, "link", "set", "br0", "up"]);
        std::fs::create_dir_all(&cgroup_root).expect("cgroup root");
        for (name, ip) in pods {
            lab.add_pod(name, ip);
        }
        lab
    }

    /// One more pod: network namespace, veth into the bridge, cgroup below the lab's root.
    fn add_pod(&mut self, name: &str, ip: &str) {
        let mount = datapath::cgroup2_mount().expect("cgroup2 mounted");
        let i = self.pods.len();
        let netns = format!("{}-{i}", self.prefix);
        sh(&["ip", "netns", "add", &netns]);
        let host_if = format!("h{i}");
        sh(&["ip", "-n", &self.bridge_ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
        sh(&["ip", "-n", &self.bridge_ns, "link", "set", &host_if, "master", "br0", "up"]);
        sh(&["ip", "-n", &netns, "addr", "add", &format!("{ip}/15"), "dev", "eth0"]);
        sh(&["ip", "-n", &netns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        let cgroup_abs = self.cgroup_root.join(name);
        std::fs::create_dir_all(&cgroup_abs).expect("pod cgroup");
        let cgroup_rel = cgroup_abs.strip_prefix(&mount).expect("below mount").to_string_lossy().into_owned();
        self.pods.push(Pod { name: name.to_string(), netns, ip: ip.to_string(), cgroup_abs, cgroup_rel });
    }

    /// SEG_CGROUPS as the daemon writes it: every pod an endpoint, the lab root the fail-closed
    /// parent.
    fn cgroup_entries(&self, compiled: &palisade::segmentation::Compiled) -> BTreeMap<u64, CgroupValue> {
        let mut entries = BTreeMap::new();
        for p in &self.pods {
            let Some(ep) = compiled.local_endpoints().find(|ep| ep.name == p.name) else { continue };
            entries.insert(datapath::cgroup_id(&p.cgroup_abs).expect("cgroup id"), CgroupValue { kind: CGROUP_ENDPOINT, endpoint_id: ep.id });
        }
        entries.insert(datapath::cgroup_id(&self.cgroup_root).expect("cgroup id"), CgroupValue { kind: CGROUP_PARENT, endpoint_id: 0 });
        entries
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).expect("pod")
    }

    /// A command running inside the pod's network namespace and cgroup.
    fn cmd(&self, pod: &str, args: &[&str]) -> Command {
        let p = self.pod(pod);
        // Join the cgroup first: `ip netns exec` remounts /sys, hiding the cgroup2 mount.
        let helper = std::env::temp_dir().join(format!("palisade-seg-helper-{}.py", std::process::id()));
        if !helper.exists() {
            std::fs::write(&helper, HELPER).expect("helper script");
        }
        let script = format!("echo $$ > {}/cgroup.procs && exec ip netns exec {} /usr/bin/python3 \"$0\" \"$@\"", p.cgroup_abs.display(), p.netns);
        let mut c = Command::new("sh");
        c.args(["-c", &script]).arg(&helper).args(args);
        c
    }

    fn serve(&mut self, pod: &str, ports: &[u16]) {
        let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let mut args = vec!["serve"];
        args.extend(ports.iter().map(String::as_str));
        let mut child = self.cmd(pod, &args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("ready line");
        assert_eq!(line.trim(), "ready", "server in {pod}");
        self.children.push(child);
    }

    fn connects(&self, from: &str, to: &str, port: u16) -> bool {
        let ip = self.pod(to).ip.clone();
        self.cmd(from, &["connect", &ip, &port.to_string()]).status().expect("client").success()
    }

    fn connects_from(&self, from: &str, to: &str, port: u16, source_port: u16) -> bool {
        let ip = self.pod(to).ip.clone();
        self.cmd(from, &["connect_from", &ip, &port.to_string(), &source_port.to_string()]).status().expect("client").success()
    }

    fn serve_close(&mut self, pod: &str, port: u16) {
        let mut child = self.cmd(pod, &["serve_close", &port.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("ready line");
        assert_eq!(line.trim(), "ready", "server in {pod}");
        self.children.push(child);
    }

    /// A server in `pod` that pushes data to its clients on demand.
    fn serve_push(&self, pod: &str, port: u16) -> Held {
        let mut child = self.cmd(pod, &["serve_push", &port.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ready line");
        assert_eq!(line.trim(), "ready", "push server in {pod}");
        Held { child, stdin, stdout }
    }

    /// A client in `from` connected to `to`, reading what the server pushes.
    fn reader(&self, from: &str, to: &str, port: u16) -> Held {
        let ip = self.pod(to).ip.clone();
        let mut child = self.cmd(from, &["read", &ip, &port.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("reader");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("connected line");
        assert_eq!(line.trim(), "connected", "reader {from} -> {to}:{port}");
        Held { child, stdin, stdout }
    }

    /// Sends UDP to `flows` distinct destinations from `pod`; returns how many sends succeeded.
    fn flood(&self, pod: &str, flows: u32) -> u64 {
        // The destinations are routed to the pod's loopback (from its own address): each packet
        // passes the pod's egress hook (one conntrack entry) and is dropped on the way back in
        // (not local, no forwarding): no ARP queue to fill, no load on the lab bridge.
        let p = self.pod(pod);
        sh(&["ip", "-n", &p.netns, "route", "add", "198.19.200.0/24", "dev", "lo", "src", &p.ip]);
        let out = self.cmd(pod, &["flood", &flows.to_string()]).output().expect("flood");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("flood count")
    }

    fn hold(&self, from: &str, to: &str, port: u16) -> Held {
        let ip = self.pod(to).ip.clone();
        let mut child = self.cmd(from, &["hold", &ip, &port.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("hold");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("connected line");
        assert_eq!(line.trim(), "connected", "hold {from} -> {to}:{port}");
        Held { child, stdin, stdout }
    }

    fn inventory(&self, labels: &[(&str, &str)]) -> Inventory {
        let mut y = String::from("namespaces:\n  - name: webapp\nendpoints:\n");
        for p in &self.pods {
            let app = labels.iter().find(|(n, _)| *n == p.name).map(|(_, a)| *a).unwrap_or("none");
            y.push_str(&format!(
                "  - namespace: webapp\n    name: {}\n    labels: {{app: {app}}}\n    ips: [{}]\n    ports: [{{name: http, port: 8080, protocol: TCP}}]\n    cgroup: {}\n",
                p.name, p.ip, p.cgroup_rel
            ));
        }
        Inventory::parse(&y, Path::new("lab-inventory.yaml")).expect("lab inventory")
    }
}

struct Held {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Held {
    /// One line to the helper, one "ok"/"pushed" back.
    fn tell(&mut self) -> String {
        if writeln!(self.stdin, "go").is_err() {
            return String::new();
        }
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        line.trim().to_string()
    }

    /// The server pushes, the reader reads (within a second).
    fn push_arrives(server: &mut Held, reader: &mut Held) -> bool {
        server.tell() == "pushed" && reader.tell() == "ok"
    }

    fn roundtrip(&mut self) -> bool {
        if writeln!(self.stdin, "hello").is_err() {
            return false;
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line).is_ok() && line.trim() == "ok"
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pods {
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).status();
            let _ = std::fs::remove_dir(&p.cgroup_abs);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge_ns]).status();
        let _ = std::fs::remove_dir(&self.cgroup_root);
        let _ = &self.prefix;
    }
}

fn policies(text: &str) -> PolicySet {
    PolicySet::parse(text, Path::new("test-policies.yaml")).expect("valid policies")
}

fn webapp_policy() -> PolicySet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/webapp-netpol.yaml");
    PolicySet::load(&[path]).expect("policies/webapp-netpol.yaml")
}

const BACKEND_DENY_EGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: backend-no-egress, namespace: webapp}\nspec:\n  podSelector: {matchLabels: {app: backend}}\n  policyTypes: [Egress]\n";
const BACKEND_DENY_INGRESS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: backend-allow-frontend-only, namespace: webapp}\nspec:\n  podSelector: {matchLabels: {app: backend}}\n  policyTypes: [Ingress]\n";

#[test]
fn webapp_policy_is_enforced_with_real_packets() {
    if !kernel_or_skip("webapp_policy_is_enforced_with_real_packets") {
        return;
    }
    let mut lab = Lab::new("w", &[("frontend-1", "198.18.1.11"), ("backend-1", "198.18.2.21"), ("db-1", "198.18.3.31")]);
    lab.serve("backend-1", &[8080, 9090]);
    lab.serve("db-1", &[8080]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend"), ("db-1", "db")]);
    // Before any program: everything connects.
    assert!(lab.connects("db-1", "backend-1", 8080), "lab connectivity without palisade");

    let mut bpf = datapath::load(None).expect("load eBPF object");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut seg = Segmentation::new(inv, webapp_policy());
    let stats = dp.sync(&mut bpf, seg.compiled()).expect("sync");
    assert!(stats.policy_added > 0, "{stats:?}");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    assert!(lab.connects("frontend-1", "backend-1", 8080), "frontend -> backend:8080 must pass");
    assert!(!lab.connects("db-1", "backend-1", 8080), "db -> backend:8080 must be dropped");
    assert!(!lab.connects("frontend-1", "backend-1", 9090), "frontend -> backend:9090 must be dropped");
    assert!(lab.connects("backend-1", "db-1", 8080), "db is selected by no policy: backend -> db passes");
    assert!(lab.connects("frontend-1", "db-1", 8080), "frontend -> db passes");

    // Stateful replies: the backend may not send anything on its own, yet its replies pass.
    let mut set = webapp_policy();
    set.policies.extend(policies(BACKEND_DENY_EGRESS).policies);
    dp.sync(&mut bpf, seg.set_policies(set)).expect("sync egress deny");
    assert!(lab.connects("frontend-1", "backend-1", 8080), "replies to an allowed connection pass (conntrack)");
    assert!(!lab.connects("backend-1", "db-1", 8080), "backend egress is denied");

    // The offline matrix agrees with the kernel on these pairs.
    let m = palisade::segmentation::matrix::matrix(seg.compiled(), palisade::inventory::Protocol::Tcp, 8080);
    let allowed = |f: &str, t: &str| m.results.iter().find(|r| r.from == format!("webapp/{f}") && r.to == format!("webapp/{t}")).expect("pair").allowed;
    assert!(allowed("frontend-1", "backend-1") && !allowed("db-1", "backend-1") && !allowed("backend-1", "db-1"));
}

#[test]
fn policy_change_strict_stops_established_flows_the_new_policy_denies() {
    if !kernel_or_skip("policy_change_strict_stops_established_flows_the_new_policy_denies") {
        return;
    }
    let mut lab = Lab::new("c", &[("frontend-1", "198.18.1.12"), ("backend-1", "198.18.2.22"), ("db-1", "198.18.3.32")]);
    lab.serve("backend-1", &[8080]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend"), ("db-1", "db")]);
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut seg = Segmentation::new(inv, webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    let mut held = lab.hold("frontend-1", "backend-1", 8080);
    assert!(held.roundtrip(), "allowed connection works");

    // `--established-flows strict` is the default: nothing configured.
    // An unrelated change (a new policy, identities and keys recompiled): the connection is judged
    // again, still allowed, and lives.
    let mut set = webapp_policy();
    set.policies.extend(policies(BACKEND_DENY_EGRESS).policies);
    let stats = dp.sync(&mut bpf, seg.set_policies(set)).expect("sync change");
    assert!(stats.endpoints_added > 0, "{stats:?}");
    for _ in 0..5 {
        assert!(held.roundtrip(), "open connection survives a policy change");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lab.connects("frontend-1", "backend-1", 8080), "new allowed connections still pass");

    // Remove the allow: backend stays isolated with no rule. The open connection stops at its
    // next packet (the exchange waits one second for the echo), new connections fail.
    let stats = dp.sync(&mut bpf, seg.set_policies(policies(BACKEND_DENY_INGRESS))).expect("sync removal");
    assert!(stats.policy_removed > 0, "{stats:?}");
    assert!(!held.roundtrip(), "strict: the established connection stops within a second of the change");
    assert!(!held.roundtrip(), "strict: and stays stopped");
    assert!(!lab.connects("frontend-1", "backend-1", 8080), "new connections fail once the allow is gone");

    // A bad policy file is rejected and the last good set stays.
    let dir = std::env::temp_dir().join(format!("palisade-seg-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    std::fs::write(dir.join("bad.yaml"), BACKEND_DENY_INGRESS.replace("policyTypes: [Ingress]", "policyTypes: [Sideways]")).expect("write");
    let before = seg.compiled().clone();
    let err = seg.reload_policies(&[dir.clone()]).expect_err("bad policy rejected");
    assert!(err.to_string().contains("document 1: spec.policyTypes[0]"), "{err}");
    assert_eq!(seg.compiled(), &before, "last good set stays");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 17: a change of one policy is put into the contents in force in place and written as
/// a delta (only its keys), with real packets following it; the kernel's map then holds exactly
/// what a full compile says, and a datapath that did not sync the generation before (adopted
/// from the pins) compares everything and gets there too.
#[test]
fn a_policy_changed_in_place_reaches_the_kernel_as_a_delta() {
    if !kernel_or_skip("a_policy_changed_in_place_reaches_the_kernel_as_a_delta") {
        return;
    }
    let mut lab = Lab::new("d", &[("frontend-1", "198.18.1.17"), ("backend-1", "198.18.2.27"), ("db-1", "198.18.3.37")]);
    lab.serve("backend-1", &[8080, 9090]);
    lab.serve("db-1", &[20_007, 20_049, 21_007]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend"), ("db-1", "db")]);
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/palisade-test-delta-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut bpf = datapath::load(Some(&pin_dir)).expect("load eBPF object");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    // The webapp policy and 50 more that each admit the frontend to the db on a port of their own.
    let mut set = webapp_policy();
    for i in 0..50 {
        set.policies.extend(policies(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db-{i}, namespace: webapp}}\nspec:\n  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: frontend}}}}}}], ports: [{{port: {}}}]}}]\n",
            20_000 + i
        ))
        .policies);
    }
    let mut seg = Segmentation::new(inv, set.clone());
    let first = dp.sync(&mut bpf, seg.compiled()).expect("sync");
    assert!(first.policy_added >= 51, "{first:?}");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    assert!(lab.connects("frontend-1", "backend-1", 8080));
    assert!(!lab.connects("frontend-1", "backend-1", 9090));

    // The backend's policy moves from 8080 to 9090; the 50 others are the same objects.
    let backend = set.policies.iter().position(|p| p.name == "backend-allow-frontend-only").expect("webapp policy");
    let moved = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/webapp-netpol.yaml"))
        .expect("webapp policy file")
        .replace("port: 8080", "port: 9090");
    set.policies[backend] = policies(&moved).policies.remove(0);
    let stats = dp.sync(&mut bpf, seg.set_policies(set.clone())).expect("sync the change");
    assert_eq!(seg.parts_compiled(), 1, "one policy compiled");
    assert!(seg.compiled().sync.delta.is_some(), "updated in place");
    assert_eq!((stats.policy_added, stats.policy_removed), (1, 1), "only the changed key written: {stats:?}");
    assert_eq!(seg.compiled(), &seg.full_compile(), "in place equals a full compile");
    assert!(lab.connects("frontend-1", "backend-1", 9090), "the new port passes");
    assert!(!lab.connects("frontend-1", "backend-1", 8080), "the old port is dropped");
    assert!(lab.connects("frontend-1", "db-1", 20_049), "the other policies stay");
    assert!(!lab.connects("backend-1", "db-1", 20_049));

    // What the kernel holds is the compiled contents, entry for entry.
    let read_back = |bpf: &mut aya::Ebpf| -> BTreeMap<palisade_common::PolicyKey, palisade_common::PolicyValue> {
        let map: aya::maps::HashMap<&aya::maps::MapData, palisade_common::PolicyKey, palisade_common::PolicyValue> =
            aya::maps::HashMap::try_from(bpf.map(palisade_common::MAP_SEG_POLICY).expect("SEG_POLICY")).expect("hash map");
        map.iter().map(|kv| kv.expect("entry")).collect()
    };
    assert_eq!(read_back(&mut bpf), seg.compiled().policy);

    // A datapath adopted from the pins has not synced this generation: the next change (a
    // delta against the last one) is written by comparing everything, and still lands.
    let mut adopted = Datapath::adopt(&mut bpf).expect("adopt");
    let db = set.policies.iter().position(|p| p.name == "db-7").expect("db-7");
    set.policies[db] = policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-7, namespace: webapp}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: frontend}}}], ports: [{port: 21007}]}]\n",
    )
    .policies
    .remove(0);
    let stats = adopted.sync(&mut bpf, seg.set_policies(set)).expect("sync after adopting");
    assert!(seg.compiled().sync.delta.is_some(), "updated in place");
    assert_eq!((stats.policy_added, stats.policy_removed), (1, 1), "{stats:?}");
    assert_eq!(read_back(&mut bpf), seg.compiled().policy);
    assert!(lab.connects("frontend-1", "db-1", 21_007));
    assert!(!lab.connects("frontend-1", "db-1", 20_007));
    drop(adopted);
    drop(dp);
    drop(bpf);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

#[test]
fn policy_change_keep_carries_established_flows_until_they_idle_out() {
    if !kernel_or_skip("policy_change_keep_carries_established_flows_until_they_idle_out") {
        return;
    }
    let mut lab = Lab::new("k", &[("frontend-1", "198.18.1.14"), ("backend-1", "198.18.2.24")]);
    lab.serve("backend-1", &[8080]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend")]);
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let settings = ConntrackSettings {
        established_flows: EstablishedFlows::Keep,
        timeouts: CtTimeouts { tcp_established_s: 2, ..CtTimeouts::default() },
        ..ConntrackSettings::default()
    };
    conntrack::configure(&mut bpf, &settings).expect("conntrack settings");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut seg = Segmentation::new(inv, webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    let mut held = lab.hold("frontend-1", "backend-1", 8080);
    assert!(held.roundtrip(), "allowed connection works");
    dp.sync(&mut bpf, seg.set_policies(policies(BACKEND_DENY_INGRESS))).expect("sync removal");
    // Over more than the idle timeout, kept busy: the flow carries on.
    for _ in 0..8 {
        assert!(held.roundtrip(), "keep: the established connection carries on after the change");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(!lab.connects("frontend-1", "backend-1", 8080), "keep: new connections fail");
    // Idle past the established timeout: forgotten, its next packet is judged as new (denied).
    std::thread::sleep(Duration::from_millis(3500));
    assert!(!held.roundtrip(), "keep: an established flow idle past its timeout is forgotten");
}

#[test]
fn fin_closed_five_tuple_reused_later_is_judged_as_new() {
    if !kernel_or_skip("fin_closed_five_tuple_reused_later_is_judged_as_new") {
        return;
    }
    let mut lab = Lab::new("f", &[("frontend-1", "198.18.1.15"), ("backend-1", "198.18.2.25")]);
    lab.serve_close("backend-1", 8080);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend")]);
    let mut bpf = datapath::load(None).expect("load eBPF object");
    // keep: a policy change alone does not judge the old entry again; only its TCP state can.
    let settings = ConntrackSettings { established_flows: EstablishedFlows::Keep, ..ConntrackSettings::default() };
    conntrack::configure(&mut bpf, &settings).expect("conntrack settings");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut seg = Segmentation::new(inv, webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    let source_port = 41_000;
    assert!(lab.connects_from("frontend-1", "backend-1", 8080, source_port), "allowed, closed with FIN by both sides");
    assert!(lab.connects_from("frontend-1", "backend-1", 8080, source_port), "the same 5-tuple again, still allowed");
    dp.sync(&mut bpf, seg.set_policies(policies(BACKEND_DENY_INGRESS))).expect("sync removal");
    assert!(!lab.connects_from("frontend-1", "backend-1", 8080, source_port), "a FIN'd 5-tuple reused later is judged as new: denied");
    assert!(!lab.connects_from("frontend-1", "backend-1", 8080, source_port + 1), "and so is any other new connection");
}

#[test]
fn one_pod_opening_more_flows_than_the_table_holds_leaves_other_pods_connections_alone() {
    if !kernel_or_skip("one_pod_opening_more_flows_than_the_table_holds_leaves_other_pods_connections_alone") {
        return;
    }
    // backend-1: the victim, a server whose egress is isolated with no allow, so the data it
    // pushes to its client passes only on the conntrack entry of the client's connection.
    // frontend-1: its client, no program attached (a peer, as a pod on another node).
    // db-1: opens far more flows than the table holds.
    let lab = Lab::new("e", &[("frontend-1", "198.18.1.16"), ("backend-1", "198.18.2.26"), ("db-1", "198.18.3.36")]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend"), ("db-1", "db")]);
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let settings = ConntrackSettings { timeouts: CtTimeouts { other_s: 2, ..CtTimeouts::default() }, ..ConntrackSettings::default() };
    conntrack::configure(&mut bpf, &settings).expect("conntrack settings");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut set = webapp_policy();
    set.policies.extend(policies(BACKEND_DENY_EGRESS).policies);
    let seg = Segmentation::new(inv, set);
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    for pod in ["backend-1", "db-1"] {
        dp.attach(&mut bpf, &lab.pod(pod).cgroup_abs).expect("attach");
    }
    let mut sweeper = conntrack::Sweeper::new(&mut bpf).expect("sweeper");
    let mut server = lab.serve_push("backend-1", 8080);
    let mut reader = lab.reader("frontend-1", "backend-1", 8080);
    assert!(Held::push_arrives(&mut server, &mut reader), "the server's push reaches its client");

    let flows = 2 * SEG_MAX_CONNTRACK;
    let sent = lab.flood("db-1", flows);
    let db = seg.compiled().endpoint_by_key("webapp/db-1").expect("db-1").id;
    let usage = |sweeper: &conntrack::Sweeper, id: u32| sweeper.usage().into_iter().find(|(ep, _)| *ep == id).map(|(_, u)| u).unwrap_or_default();
    let db_usage = usage(&sweeper, db);
    println!("flood: {sent} of {flows} sends; db-1 conntrack {db_usage:?}");
    assert!(Held::push_arrives(&mut server, &mut reader), "the other pod's long-lived connection keeps working");
    {
        // A new connection to it opens (its handshake needs a new entry) and gets data.
        let mut second = lab.reader("frontend-1", "backend-1", 8080);
        assert_eq!(server.tell(), "pushed");
        assert_eq!(reader.tell(), "ok", "the long-lived connection");
        assert_eq!(second.tell(), "ok", "a new connection to the pod works while the other pod is over its quota");
    }
    assert_eq!(db_usage.entries, u64::from(CT_DEFAULT_PER_ENDPOINT_MAX), "the flooding pod holds its quota, no more");
    assert!(db_usage.quota_drops > 0, "its flows past the quota are refused and counted");

    // Idle past the timeout for other protocols (2 s here): the sweeper removes the flood's
    // entries and gives db-1 its quota back.
    std::thread::sleep(Duration::from_millis(3500));
    let stats = sweeper.sweep();
    println!("sweep: {stats:?}");
    assert!(stats.removed >= u64::from(CT_DEFAULT_PER_ENDPOINT_MAX), "{stats:?}");
    assert_eq!(usage(&sweeper, db).entries, 0, "db-1's quota is free again");
    assert!(Held::push_arrives(&mut server, &mut reader), "the established TCP connection is not swept");
}

/// bpf(2) on a zeroed attr of 128 bytes; returns the result (an fd for BPF_MAP_CREATE).
fn bpf_raw(cmd: i64, fill: impl FnOnce(&mut [u8; 128])) -> i64 {
    let mut attr = [0u8; 128];
    fill(&mut attr);
    // SAFETY: attr is a zero-padded bpf_attr for `cmd`; pointers in it outlive the call.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
}

#[test]
fn a_pinned_conntrack_map_of_an_older_layout_is_replaced_at_load() {
    if !kernel_or_skip("a_pinned_conntrack_map_of_an_older_layout_is_replaced_at_load") {
        return;
    }
    // What a daemon before this layout pinned: an LRU hash, 40-byte keys, 8-byte values.
    let dir = PathBuf::from(format!("/sys/fs/bpf/palisade-test-ctpin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pin dir");
    let fd = bpf_raw(0 /* BPF_MAP_CREATE */, |a| {
        a[0..4].copy_from_slice(&9u32.to_ne_bytes()); // BPF_MAP_TYPE_LRU_HASH
        a[4..8].copy_from_slice(&40u32.to_ne_bytes());
        a[8..12].copy_from_slice(&8u32.to_ne_bytes());
        a[12..16].copy_from_slice(&1024u32.to_ne_bytes());
    });
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let path = std::ffi::CString::new(dir.join("SEG_CONNTRACK").to_string_lossy().into_owned()).expect("path");
    let rc = bpf_raw(6 /* BPF_OBJ_PIN */, |a| {
        a[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
        a[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    });
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own fd from BPF_MAP_CREATE, closed once.
    unsafe { libc::close(fd as i32) };

    let mut bpf = datapath::load(Some(&dir)).expect("loads over an old pinned conntrack map");
    Datapath::adopt(&mut bpf).expect("the datapath programs load");
    let pinned = aya::maps::MapData::from_pin(dir.join("SEG_CONNTRACK")).and_then(|m| m.info()).expect("pinned map");
    assert_eq!(pinned.value_size() as usize, std::mem::size_of::<palisade_common::CtValue>(), "replaced by this build's layout");
    drop(bpf);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quarantine_flag_cuts_an_open_connection() {
    if !kernel_or_skip("quarantine_flag_cuts_an_open_connection") {
        return;
    }
    let mut lab = Lab::new("q", &[("frontend-1", "198.18.1.13"), ("backend-1", "198.18.2.23")]);
    lab.serve("backend-1", &[8080]);
    let inv = lab.inventory(&[("frontend-1", "frontend"), ("backend-1", "backend")]);
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let seg = Segmentation::new(inv, webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    let mut held = lab.hold("frontend-1", "backend-1", 8080);
    assert!(held.roundtrip());
    let cg = datapath::cgroup_id(&lab.pod("backend-1").cgroup_abs).expect("cgroup id");
    datapath::set_quarantine(&mut bpf, cg, palisade_common::QuarantineValue { since_ns: 0, endpoint_id: 0, flags: 0 }).expect("quarantine");
    assert!(!lab.connects("frontend-1", "backend-1", 8080), "quarantined pod unreachable");
    assert!(!held.roundtrip(), "open connection stops passing data");
    datapath::clear_quarantine(&mut bpf, cg).expect("release");
    assert!(lab.connects("frontend-1", "backend-1", 8080), "released");
}

/// Drop records (path, cgroup id) the datapath wrote so far.
fn drop_records(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(u8, u8, u64)> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(v) = datapath::decode_verdict(&item) {
            out.push((v.path, v.reason, v.header.cgroup_id));
        }
    }
    out
}

/// The datapath attached once at the lab's root (the pods parent): a pod created while it runs
/// sends from its first instant, before any sync knows it. Nothing it sends reaches another pod
/// (the fail-closed default, recorded as unknown_endpoint), traffic inside it works, and after
/// the sync that writes its endpoint its allowed traffic flows.
#[test]
fn a_new_pod_below_the_pods_parent_gets_nothing_out_before_its_endpoint_is_written() {
    if !kernel_or_skip("a_new_pod_below_the_pods_parent_gets_nothing_out_before_its_endpoint_is_written") {
        return;
    }
    let mut lab = Lab::new("np", &[("frontend-1", "198.18.1.14"), ("backend-1", "198.18.2.24")]);
    lab.serve("backend-1", &[8080]);
    let labels = [("frontend-1", "frontend"), ("frontend-2", "frontend"), ("backend-1", "backend")];
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let ring = bpf.take_map(palisade_common::MAP_SEG_EVENTS).expect("SEG_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(ring).expect("ring buffer");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    Datapath::set_denied_events(&mut bpf, true, 0).expect("records on");
    let mut seg = Segmentation::new(lab.inventory(&labels), webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    dp.sync_cgroups(&mut bpf, &lab.cgroup_entries(seg.compiled())).expect("cgroups");
    dp.attach(&mut bpf, &lab.cgroup_root).expect("attach at the parent");
    assert!(lab.connects("frontend-1", "backend-1", 8080), "a known pod's allowed flow passes through the parent's programs");

    // The new pod exists in no map; its first process starts sending at once.
    lab.add_pod("frontend-2", "198.18.1.15");
    let backend = lab.pod("backend-1").ip.clone();
    let out = lab.cmd("frontend-2", &["connect_loop", &backend, "8080", "1.0"]).output().expect("connect loop");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (ok, tries): (u32, u32) = {
        let mut it = text.split_whitespace().map(|n| n.parse().expect("count"));
        (it.next().expect("ok"), it.next().expect("tries"))
    };
    assert!(tries > 0, "the new pod tried");
    assert_eq!(ok, 0, "nothing from a pod with no endpoint reaches another pod ({tries} tries)");
    let own = lab.pod("frontend-2").ip.clone();
    assert!(lab.cmd("frontend-2", &["self", &own]).status().expect("self").success(), "traffic inside the pod still works");
    let new_id = datapath::cgroup_id(&lab.pod("frontend-2").cgroup_abs).expect("cgroup id");
    let records = drop_records(&mut ring);
    assert!(
        records.iter().any(|(path, _, cg)| *path == palisade_common::PATH_UNKNOWN_ENDPOINT && *cg == new_id),
        "drop records name the unknown_endpoint path: {records:?}"
    );

    // The sync that knows it: its allowed traffic flows.
    seg.set_inventory(lab.inventory(&labels));
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    dp.sync_cgroups(&mut bpf, &lab.cgroup_entries(seg.compiled())).expect("cgroups");
    assert!(lab.connects("frontend-2", "backend-1", 8080), "after its endpoint is written, its allowed flow passes");
}

/// Two pods below the pods parent with no endpoint yet: one floods (its drops spend its record
/// budget), the other sends once. Its drop is still recorded: each unknown pod has its own
/// budget (keyed by cgroup id), as each endpoint has one. Before, every record of no endpoint
/// was budgeted as endpoint id 0, so one unknown pod's flood hid the others' records.
#[test]
fn an_unknown_pods_flood_does_not_spend_another_unknown_pods_record_budget() {
    if !kernel_or_skip("an_unknown_pods_flood_does_not_spend_another_unknown_pods_record_budget") {
        return;
    }
    let mut lab = Lab::new("ub", &[("backend-1", "198.18.2.27")]);
    lab.serve("backend-1", &[8080]);
    let labels = [("backend-1", "backend")];
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let ring = bpf.take_map(palisade_common::MAP_SEG_EVENTS).expect("SEG_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(ring).expect("ring buffer");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    // Two records per window and cgroup/endpoint: the flood spends its budget at once.
    Datapath::set_denied_events(&mut bpf, true, 2).expect("records on");
    let seg = Segmentation::new(lab.inventory(&labels), webapp_policy());
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    dp.sync_cgroups(&mut bpf, &lab.cgroup_entries(seg.compiled())).expect("cgroups");
    dp.attach(&mut bpf, &lab.cgroup_root).expect("attach at the parent");

    lab.add_pod("flooder", "198.18.1.17");
    lab.add_pod("quiet", "198.18.1.18");
    let backend = lab.pod("backend-1").ip.clone();
    let flood = lab.cmd("flooder", &["connect_loop", &backend, "8080", "2.0"]).stdout(Stdio::piped()).spawn().expect("flood");
    std::thread::sleep(Duration::from_millis(400));
    assert!(!lab.connects("quiet", "backend-1", 8080), "a pod with no endpoint gets nothing out");
    let out = flood.wait_with_output().expect("flood");
    let tries: u32 = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("tries");
    assert!(tries > 4, "the flooder tried more often than its budget allows ({tries})");

    let records = drop_records(&mut ring);
    let (flooder, quiet) = (
        datapath::cgroup_id(&lab.pod("flooder").cgroup_abs).expect("cgroup id"),
        datapath::cgroup_id(&lab.pod("quiet").cgroup_abs).expect("cgroup id"),
    );
    let of = |cg: u64| records.iter().filter(|(path, _, c)| *path == palisade_common::PATH_UNKNOWN_ENDPOINT && *c == cg).count();
    assert!(of(flooder) > 0, "the flooder's drops are recorded: {records:?}");
    assert!(of(flooder) < tries as usize, "within its budget, not one record per drop ({tries} tries): {records:?}");
    assert!(of(quiet) > 0, "the quiet pod's drop is recorded despite the flood next to it: {records:?}");
}

/// A pod that is not quarantined but isolated by a policy sends a packet the datapath cannot
/// parse (IP version 7 on a raw socket): dropped (the sender gets EPERM) and recorded as
/// unparsed; a pod that no policy isolates still may.
#[test]
fn unparsable_packets_of_an_isolated_pod_are_dropped() {
    if !kernel_or_skip("unparsable_packets_of_an_isolated_pod_are_dropped") {
        return;
    }
    let lab = Lab::new("uv", &[("frontend-1", "198.18.1.16"), ("backend-1", "198.18.2.26"), ("db-1", "198.18.3.26")]);
    let labels = [("frontend-1", "frontend"), ("backend-1", "backend"), ("db-1", "db")];
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let ring = bpf.take_map(palisade_common::MAP_SEG_EVENTS).expect("SEG_EVENTS");
    let mut ring = aya::maps::RingBuf::try_from(ring).expect("ring buffer");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    Datapath::set_denied_events(&mut bpf, true, 0).expect("records on");
    let egress_only = policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: backend-egress, namespace: webapp}\nspec:\n  podSelector: {matchLabels: {app: backend}}\n  policyTypes: [Egress]\n  egress:\n    - to: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{protocol: TCP, port: 5432}]\n",
    );
    let seg = Segmentation::new(lab.inventory(&labels), egress_only);
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    dp.sync_cgroups(&mut bpf, &lab.cgroup_entries(seg.compiled())).expect("cgroups");
    for p in &lab.pods {
        dp.attach(&mut bpf, &p.cgroup_abs).expect("attach");
    }
    let isolated = seg.compiled().local_endpoints().find(|ep| ep.name == "backend-1").expect("backend");
    assert_ne!(seg.compiled().endpoint_config.get(&isolated.id).map(|c| c.flags).unwrap_or(0), 0, "the policy isolates backend-1's egress");
    let (backend, db, frontend) = (lab.pod("backend-1").ip.clone(), lab.pod("db-1").ip.clone(), lab.pod("frontend-1").ip.clone());
    let out = lab.cmd("backend-1", &["badver", &db, &backend]).output().expect("badver");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "EPERM", "an isolated pod's unparsable packet is dropped at its egress");
    let records = drop_records(&mut ring);
    let cg = datapath::cgroup_id(&lab.pod("backend-1").cgroup_abs).expect("cgroup id");
    assert!(
        records.iter().any(|(path, reason, c)| *path == palisade_common::PATH_UNPARSED && *reason == palisade_common::REASON_UNPARSED && *c == cg),
        "recorded as unparsed: {records:?}"
    );
    let out = lab.cmd("db-1", &["badver", &frontend, &db]).output().expect("badver");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent", "a pod no policy isolates is not judged");
}

/// Found by the differential tester (testdata/netpol/differential/01): an ipBlock `::/0` (like
/// any IPv6 prefix covering `::ffff:0:0/96`) matched IPv4 peers too, because the datapath keeps
/// IPv4 addresses in one LPM trie as `::ffff:a.b.c.d`. With real packets to an address no pod
/// of the inventory has (the world): `::/0` alone lets nothing out over IPv4, `0.0.0.0/0` beside
/// it does.
#[test]
fn an_ipv6_block_covering_everything_does_not_match_ipv4_peers() {
    if !kernel_or_skip("an_ipv6_block_covering_everything_does_not_match_ipv4_peers") {
        return;
    }
    let mut lab = Lab::new("v6", &[("frontend-1", "198.18.1.17"), ("outside-1", "198.18.2.27")]);
    lab.serve("outside-1", &[8080]);
    let mut inv = lab.inventory(&[("frontend-1", "frontend")]);
    inv.endpoints.retain(|e| e.name == "frontend-1");
    assert!(lab.connects("frontend-1", "outside-1", 8080), "lab connectivity without palisade");
    let egress_to = |peers: &str| {
        policies(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: out, namespace: webapp}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress: [{{to: [{peers}]}}]\n"
        ))
    };
    let mut bpf = datapath::load(None).expect("load eBPF object");
    let mut dp = Datapath::adopt(&mut bpf).expect("datapath");
    let mut seg = Segmentation::new(inv, egress_to("{ipBlock: {cidr: \"::/0\"}}"));
    dp.sync(&mut bpf, seg.compiled()).expect("sync");
    let frontend = lab.pods.iter().find(|p| p.name == "frontend-1").expect("frontend").cgroup_abs.clone();
    dp.attach(&mut bpf, &frontend).expect("attach");
    assert!(!lab.connects("frontend-1", "outside-1", 8080), "egress to ::/0 only: an IPv4 address outside the inventory is denied");
    dp.sync(&mut bpf, seg.set_policies(egress_to("{ipBlock: {cidr: \"::/0\"}}, {ipBlock: {cidr: 0.0.0.0/0}}"))).expect("sync");
    assert!(lab.connects("frontend-1", "outside-1", 8080), "with 0.0.0.0/0 beside ::/0 it is allowed");
}
