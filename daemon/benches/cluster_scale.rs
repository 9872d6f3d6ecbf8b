//! What a Kubernetes-mode agent costs as the cluster grows (issue 18; prints figures, not a
//! test). Root only.
//!
//! For each cluster size N (`BENCH_PODS`, default `1000,10000`): the API stand-in
//! (`tests/support/kube_standin.rs`, HTTPS with a token, the real list/watch protocol) serves N
//! realistic pods (~7 KB of JSON each: labels, annotations, managedFields, two containers with
//! env, probes and resources, the projected token volume, a full status), 50 namespaces and 200
//! NetworkPolicies, on 100 nodes, none of them the agent's. `palisade run --kubernetes` (no
//! local pods) starts against it and the bench reads:
//! 1. start-up: the response bytes the stand-in sent until the agent logged "palisade is running"
//!    (its first sync with the API, the first compile and map sync done), the agent's CPU
//!    (utime + stime from /proc/PID/stat) at "Kubernetes source synced" and at "running", and its
//!    RSS 3 s later;
//! 2. churn: `BENCH_CHANGES` (default 1,000) label changes spread over `BENCH_CHURN_SECS`
//!    (default 10), each on a different pod and each to a label set no pod had before, so each
//!    must give that pod a new identity. Change-to-map latency: from the stand-in emitting the
//!    watch event to the pod's address in the agent's pinned SEG_IPCACHE carrying another
//!    identity (the map the datapath reads; polled every 2 ms, so the figures are exact to about
//!    2 ms). Then the agent's CPU over the churn (until every change is in the maps, at most 60 s
//!    after the last), its RSS before and after, and the bytes it received.
//!
//! `BENCH_PEERS` (default `pods,slices`) says where the agent takes its peers from, each size
//! run in both modes one after the other: `pods` (it watches every Pod of the cluster) or
//! `slices` (`--peers slices`: a `palisade operator` process, started first against the same
//! stand-in, watches the pods and publishes PeerSlices, which the agent watches; it never reads
//! the cluster's pods). For the operator the bench reads the same: its CPU and RSS at "PeerSlices
//! in sync" and over the churn, the bytes it received, its slice writes; the change-to-map
//! latency then includes the operator's flush interval (`BENCH_FLUSH_MS`, default 100, as
//! deployed). Bytes are counted per client (the stand-in knows each by its token).
//!
//! `BENCH_ROUNDS` (default 1) repeats the churn on the same agent with fresh label values, the
//! RSS read after each round: growth that stops after the first round is the allocator's high
//! water mark, growth in every round a leak. `BENCH_AGENT=PATH` runs another build of the agent
//! (e.g. a copy of the one before a change, for a side-by-side comparison under the same load).
//!
//! Run: `sudo cargo bench -p palisade --bench cluster_scale` (a release agent; add `--profile
//! dev` for a debug one, much slower). `BENCH_PODS=1000,10000,30000` for the largest size
//! (the stand-in holds the cluster in memory: ~4 GB at 30,000 pods). The machine is shared:
//! note the load printed beside the figures.
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::lpm_trie::Key as LpmTrieKey;
use aya::maps::{LpmTrie, Map, MapData};
use palisade_common::{IpAddrKey, IpCacheValue, MAP_SEG_IPCACHE};
use serde_json::{Value, json};
use support::daemon::PALISADE;
use support::kube_standin::{AGENT_USER, BlockingStandIn, Kind};

const AGENT_NODE: &str = "bench-agent";
const NAMESPACES: usize = 50;
const POLICIES_PER_NAMESPACE: usize = 4;
const NODES: usize = 100;
const APPS_PER_NAMESPACE: usize = 20;
/// The operator's user at the stand-in.
const OPERATOR_USER: &str = "palisade-operator";

/// Where the agent takes its peers from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peers {
    Pods,
    Slices,
}

impl Peers {
    fn name(self) -> &'static str {
        match self {
            Peers::Pods => "pods",
            Peers::Slices => "slices",
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
}

fn main() {
    if !palisade::sys::is_root() {
        println!("SKIP: the cluster-scale benchmark needs root (it loads the agent's eBPF programs)");
        return;
    }
    let sizes: Vec<usize> = std::env::var("BENCH_PODS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .collect();
    let changes = env_usize("BENCH_CHANGES", 1000);
    let churn = Duration::from_secs(env_usize("BENCH_CHURN_SECS", 10) as u64);
    let rounds = env_usize("BENCH_ROUNDS", 1).max(1);
    let modes: Vec<Peers> = std::env::var("BENCH_PEERS")
        .unwrap_or_else(|_| "pods,slices".into())
        .split(',')
        .filter_map(|m| match m.trim() {
            "pods" => Some(Peers::Pods),
            "slices" => Some(Peers::Slices),
            _ => None,
        })
        .collect();
    println!("cluster_scale: agent {}", agent_binary());
    println!("load before: {}", load());
    let (mut rows, mut operator_rows) = (Vec::new(), Vec::new());
    for pods in sizes {
        for &mode in &modes {
            let (row, operator_row) = run(pods, mode, changes.min(pods), churn, rounds);
            rows.push(row);
            operator_rows.extend(operator_row);
        }
    }
    println!();
    println!("agent:");
    println!(
        "| cluster pods | peers | bytes to running | CPU to source synced | CPU to running | RSS | churn: changes | CPU | CPU per change | RSS before -> after (each round) | p50 | p99 | max | not seen | bytes | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    if !operator_rows.is_empty() {
        println!();
        println!("operator:");
        println!("| cluster pods | bytes to in sync | CPU to in sync | RSS | slices | churn: CPU | CPU per change | RSS before -> after | slice writes | bytes |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for r in operator_rows {
            println!("{r}");
        }
    }
}

// ---- the cluster ---------------------------------------------------------------------------

fn pod_ip(i: usize) -> Ipv4Addr {
    let n = i as u32 + 1;
    Ipv4Addr::new(10, 64 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn namespace_name(ns: usize) -> String {
    format!("team-{ns:02}")
}

fn namespace(ns: usize) -> Value {
    let name = namespace_name(ns);
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, "tier": if ns % 5 == 0 { "monitoring" } else { "apps" }}},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// Four policies per namespace, the usual shapes: default deny, app-to-app on a named port,
/// monitoring from other namespaces, egress to a database with DNS.
fn policies(ns: usize) -> Vec<Value> {
    let namespace = namespace_name(ns);
    let meta = |name: &str| json!({"name": name, "namespace": namespace});
    vec![
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("default-deny"),
               "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("app-1-from-app-0"),
               "spec": {"podSelector": {"matchLabels": {"app": "app-1"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "app-0"}}}], "ports": [{"port": "http"}]}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("metrics-from-monitoring"),
               "spec": {"podSelector": {},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"tier": "monitoring"}},
                                               "podSelector": {"matchLabels": {"app": "app-0"}}}],
                                     "ports": [{"port": "metrics"}]}]}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("app-2-egress"),
               "spec": {"podSelector": {"matchLabels": {"app": "app-2"}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["app-3", "app-4"]}]}}],
                                    "ports": [{"port": 5432, "protocol": "TCP"}]},
                                   {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}]}}),
    ]
}

/// A pod as a Deployment's ReplicaSet makes it, running, as the API server returns it.
fn pod(i: usize) -> Value {
    let ns = i % NAMESPACES;
    let app = (i / NAMESPACES) % APPS_PER_NAMESPACE;
    let namespace = namespace_name(ns);
    let app_name = format!("app-{app}");
    let hash = format!("{:010x}", (ns * 7919 + app * 104_729) as u64 * 2_654_435_761 % 0xff_ffff_ffff);
    let name = format!("{app_name}-{hash}-{:05x}", i);
    let ip = pod_ip(i).to_string();
    let node = format!("node-{:03}", i % NODES);
    let host_ip = format!("192.168.{}.{}", (i % NODES) / 200, (i % NODES) % 200 + 10);
    let ts = "2026-11-30T08:15:42Z";
    let image = format!("registry.example.com/{namespace}/{app_name}:v1.{}.{}", app % 7, ns % 11);
    let env: Vec<Value> = (0..8)
        .map(|k| json!({"name": format!("APP_SETTING_{k}"), "value": format!("value-{k}-for-{app_name}-in-{namespace}")}))
        .chain([
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
            json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}),
        ])
        .collect();
    let probe = |path: &str| {
        json!({"httpGet": {"path": path, "port": "http", "scheme": "HTTP"}, "initialDelaySeconds": 5, "periodSeconds": 10,
               "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3})
    };
    let mount = json!([{"name": "config", "mountPath": "/etc/app", "readOnly": true},
                       {"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
    let container_status = |cname: &str, cimage: &str| {
        json!({"name": cname, "state": {"running": {"startedAt": ts}}, "lastState": {}, "ready": true, "restartCount": 0,
               "image": cimage, "imageID": format!("{cimage}@sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15),
               "containerID": format!("containerd://{:064x}", (i as u128 + 1) * 0x2545_f491_4f6c_dd1d), "started": true})
    };
    let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": ts});
    let managed = |manager: &str, op: &str, sub: Option<&str>| {
        let mut entry = json!({"manager": manager, "operation": op, "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1",
            "fieldsV1": if sub.is_some() {
                json!({"f:status": {"f:conditions": {"k:{\"type\":\"ContainersReady\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                                     "k:{\"type\":\"Initialized\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}},
                                                     "k:{\"type\":\"Ready\"}": {".": {}, "f:lastProbeTime": {}, "f:lastTransitionTime": {}, "f:status": {}, "f:type": {}}},
                                      "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {".": {}, "k:{\"ip\":\"IP\"}": {".": {}, "f:ip": {}}}, "f:startTime": {}}})
            } else {
                json!({"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}, "f:app.kubernetes.io/name": {}},
                                      "f:ownerReferences": {".": {}, "k:{\"uid\":\"UID\"}": {}}},
                       "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {}, "f:imagePullPolicy": {}, "f:livenessProbe": {}, "f:name": {}, "f:ports": {}, "f:readinessProbe": {}, "f:resources": {}, "f:volumeMounts": {}}},
                                  "f:dnsPolicy": {}, "f:enableServiceLinks": {}, "f:restartPolicy": {}, "f:schedulerName": {}, "f:securityContext": {}, "f:serviceAccount": {}, "f:serviceAccountName": {}, "f:terminationGracePeriodSeconds": {}, "f:volumes": {}}})
            }});
        if let Some(sub) = sub {
            entry["subresource"] = json!(sub);
        }
        entry
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "generateName": format!("{app_name}-{hash}-"), "namespace": namespace,
            "uid": format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", i, ns, app, i % 4096, i * 31),
            "creationTimestamp": ts,
            "labels": {"app": app_name, "pod-template-hash": hash, "app.kubernetes.io/name": app_name,
                       "app.kubernetes.io/instance": format!("{app_name}-{namespace}"), "app.kubernetes.io/version": format!("1.{}.{}", app % 7, ns % 11),
                       "team": namespace},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9090",
                            "kubectl.kubernetes.io/restartedAt": ts, "checksum/config": format!("{:064x}", (ns * 1000 + app) as u128 * 0x1234_5678_9abc_def1)},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app_name}-{hash}"),
                                 "uid": format!("{:08x}-0000-4000-8000-{:012x}", ns * 100 + app, app), "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [managed("kube-controller-manager", "Update", None), managed("kubelet", "Update", Some("status"))],
        },
        "spec": {
            "volumes": [
                {"name": "config", "configMap": {"name": format!("{app_name}-config"), "defaultMode": 420}},
                {"name": "kube-api-access-x7k2p", "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}}],
            "containers": [
                {"name": "app", "image": image, "args": ["--config=/etc/app/config.yaml", "--listen=:8080", "--metrics=:9090"],
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                 "env": env, "resources": {"limits": {"cpu": "1", "memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                 "volumeMounts": mount, "livenessProbe": probe("/healthz"), "readinessProbe": probe("/readyz"),
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
                 "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}},
                {"name": "proxy", "image": "registry.example.com/mesh/proxy:1.22.3", "args": ["proxy", "sidecar", "--concurrency=2"],
                 "ports": [{"name": "proxy-admin", "containerPort": 15000, "protocol": "TCP"}],
                 "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "10m", "memory": "40Mi"}},
                 "volumeMounts": [{"name": "kube-api-access-x7k2p", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
            "serviceAccountName": app_name, "serviceAccount": app_name, "nodeName": node,
            "securityContext": {"runAsUser": 10001, "fsGroup": 10001}, "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0, "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {
            "phase": "Running",
            "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"), condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
            "hostIP": host_ip, "hostIPs": [{"ip": host_ip}], "podIP": ip, "podIPs": [{"ip": ip}], "startTime": ts,
            "containerStatuses": [container_status("app", &image), container_status("proxy", "registry.example.com/mesh/proxy:1.22.3")],
            "qosClass": "Burstable",
        }
    })
}

// ---- the agent -----------------------------------------------------------------------------

/// The agent binary: `BENCH_AGENT`, else the one this bench was built with.
fn agent_binary() -> String {
    std::env::var("BENCH_AGENT").unwrap_or_else(|_| PALISADE.to_string())
}

struct Agent {
    child: Child,
    log: PathBuf,
    pin_dir: PathBuf,
}

impl Agent {
    fn start(api: &BlockingStandIn, pods: usize, peers: Peers) -> Agent {
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-scale").join(format!("{pods}-{}", peers.name()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work directory");
        let kubeconfig = work.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/palisade-bench-cluster-{}-{pods}", std::process::id()));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let log = work.join("agent.log");
        let mut command = Command::new(agent_binary());
        command
            .args(["run", "--kubernetes", "--node-name", AGENT_NODE, "--no-metrics", "--peers", peers.name()])
            .arg("--state-dir")
            .arg(work.join("state"))
            .arg("--pin-dir")
            .arg(&pin_dir)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("NODE_NAME")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {} run: {e}", agent_binary()));
        Agent { child, log, pin_dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(&self.log).unwrap_or_default().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}) before {needle:?}:\n{}", self.log_tail());
            }
            assert!(Instant::now() < deadline, "no {needle:?} from the agent within {timeout:?}:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn cpu(&self) -> f64 {
        support::bench::cpu_seconds(self.pid())
    }

    fn rss_mib(&self) -> f64 {
        rss_mib_of(self.pid())
    }

    fn ipcache(&self) -> LpmTrie<MapData, IpAddrKey, IpCacheValue> {
        let path = self.pin_dir.join(MAP_SEG_IPCACHE);
        let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        LpmTrie::try_from(Map::LpmTrie(data)).expect("SEG_IPCACHE is an LPM trie")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// VmRSS of a process, MiB.
fn rss_mib_of(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// `palisade operator` against the stand-in (its own user and token), one replica: it takes the
/// Lease at once.
struct OperatorProcess {
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(api: &BlockingStandIn, pods: usize) -> OperatorProcess {
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-scale").join(format!("{pods}-operator"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("work directory");
        let kubeconfig = work.join("kubeconfig");
        let token = api.add_user(OPERATOR_USER, &[]);
        api.write_kubeconfig_with_token(&kubeconfig, &token);
        let log = work.join("operator.log");
        let flush_ms = env_usize("BENCH_FLUSH_MS", 100).to_string();
        let mut command = Command::new(agent_binary());
        command
            .args(["operator", "--identity", "bench-operator", "--metrics-addr", "127.0.0.1:0", "--flush-ms", &flush_ms])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("operator log"));
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap_or_else(|e| panic!("starting {} operator: {e}", agent_binary()));
        OperatorProcess { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the operator exited ({status}) before {needle:?}:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {needle:?} from the operator within {timeout:?}:\n{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The identity SEG_IPCACHE gives an IPv4 address (IPv4-mapped, as the compiler writes it).
fn identity_of(map: &LpmTrie<MapData, IpAddrKey, IpCacheValue>, ip: Ipv4Addr) -> Option<u32> {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&ip.octets());
    map.get(&LpmTrieKey::new(128, IpAddrKey { addr }), 0).ok().map(|v| v.identity)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn percentile(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    format!("{:.1} ms", sorted[i].as_secs_f64() * 1e3)
}

/// One pending change: the pod's address, the identity before, when the event went out.
struct Pending {
    ip: Ipv4Addr,
    before: u32,
    sent: Instant,
}

fn run(pods: usize, peers: Peers, changes: usize, churn: Duration, rounds: usize) -> (String, Option<String>) {
    println!(
        "\n== {pods} pods ({NAMESPACES} namespaces, {} policies, {NODES} nodes, none the agent's), peers from {}",
        NAMESPACES * POLICIES_PER_NAMESPACE,
        peers.name()
    );
    let api = BlockingStandIn::start();
    let generated = Instant::now();
    let mut objects: Vec<Value> = (0..NAMESPACES).map(namespace).collect();
    objects.extend((0..NAMESPACES).flat_map(policies));
    let pod_bytes: usize = (0..pods.min(100)).map(|i| pod(i).to_string().len()).sum::<usize>() / pods.clamp(1, 100);
    objects.extend((0..pods).map(pod));
    api.preload(objects);
    println!("stand-in: {pods} pods of ~{pod_bytes} bytes of JSON each, loaded in {:.1} s", generated.elapsed().as_secs_f64());

    let mut operator = (peers == Peers::Slices).then(|| {
        let load_start = load();
        let mut operator = OperatorProcess::start(&api, pods);
        operator.wait_log("PeerSlices in sync", Duration::from_secs(600));
        let cpu = support::bench::cpu_seconds(operator.pid());
        let bytes = api.bytes_sent_to(OPERATOR_USER);
        std::thread::sleep(Duration::from_secs(3));
        let rss = rss_mib_of(operator.pid());
        let slices = api.count("peerslices", "create");
        println!(
            "operator: {} received to in sync, CPU {cpu:.2} s, RSS {rss:.0} MiB, {slices} slices created (load {load_start})",
            mb(bytes)
        );
        (operator, OperatorStart { cpu, bytes, rss, slices })
    });
    let load_start = load();
    let mut agent = Agent::start(&api, pods, peers);
    agent.wait_log("Kubernetes source synced", Duration::from_secs(600));
    let cpu_synced = agent.cpu();
    let bytes_synced = api.bytes_sent_to(AGENT_USER);
    agent.wait_log("palisade is running", Duration::from_secs(600));
    let cpu_running = agent.cpu();
    let bytes_running = api.bytes_sent_to(AGENT_USER);
    std::thread::sleep(Duration::from_secs(3));
    let rss_running = agent.rss_mib();
    api.forget_requests();
    println!(
        "start-up: {} received to source synced, {} to running; CPU {:.2} s to source synced, {:.2} s to running; RSS {:.0} MiB (load {load_start})",
        mb(bytes_synced),
        mb(bytes_running),
        cpu_synced,
        cpu_running,
        rss_running
    );

    let map = agent.ipcache();
    let first = pod_ip(0);
    assert!(identity_of(&map, first).is_some(), "{first} is not in the agent's SEG_IPCACHE: peers are not in the maps");
    let operator_pid = operator.as_ref().map(|(o, _)| o.pid());
    let figures: Vec<Churn> = (0..rounds).map(|round| churn_round(&agent, operator_pid, &api, pods, changes, churn, round)).collect();
    drop(agent);
    let c = &figures[0];
    let operator_row = operator.take().map(|(process, start)| {
        drop(process);
        let rss_rounds = figures.iter().map(|f| format!("{:.0}", f.operator.rss_after)).collect::<Vec<_>>().join(" -> ");
        format!(
            "| {pods} | {} | {:.2} s | {:.0} MiB | {} | {:.2} s | {:.2} ms | {:.0} -> {rss_rounds} MiB | {} | {} |",
            mb(start.bytes),
            start.cpu,
            start.rss,
            start.slices,
            c.operator.cpu,
            c.operator.cpu * 1e3 / changes.max(1) as f64,
            c.operator.rss_before,
            c.operator.writes,
            mb(c.operator.bytes),
        )
    });
    let rss_rounds = figures.iter().map(|f| format!("{:.0}", f.rss_after)).collect::<Vec<_>>().join(" -> ");
    let row = format!(
        "| {pods} | {} | {} | {cpu_synced:.2} s | {cpu_running:.2} s | {rss_running:.0} MiB | {changes} | {:.2} s | {:.2} ms | {:.0} -> {rss_rounds} MiB | {} | {} | {} | {} | {} | {} |",
        peers.name(),
        mb(bytes_running),
        c.cpu,
        c.cpu * 1e3 / changes.max(1) as f64,
        c.rss_before,
        percentile(&c.latencies, 0.5),
        percentile(&c.latencies, 0.99),
        c.latencies.last().map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3)).unwrap_or_else(|| "-".into()),
        c.missing,
        mb(c.bytes),
        c.load,
    );
    (row, operator_row)
}

/// The operator's start-up.
struct OperatorStart {
    cpu: f64,
    bytes: u64,
    rss: f64,
    slices: usize,
}

/// What one round of churn cost the operator (zeros when there is none).
#[derive(Default)]
struct OperatorChurn {
    cpu: f64,
    rss_before: f64,
    rss_after: f64,
    writes: usize,
    bytes: u64,
}

/// What one round of churn cost.
struct Churn {
    cpu: f64,
    rss_before: f64,
    rss_after: f64,
    latencies: Vec<Duration>,
    missing: usize,
    /// Received by the agent.
    bytes: u64,
    load: String,
    operator: OperatorChurn,
}

/// `changes` label changes over `churn`, each on a different pod and to a label set no pod had
/// before (`round` makes the values differ from the previous rounds').
fn churn_round(agent: &Agent, operator: Option<u32>, api: &BlockingStandIn, pods: usize, changes: usize, churn: Duration, round: usize) -> Churn {
    // Distinct pods (7919 is prime, so i * 7919 mod N visits N distinct pods).
    let map = agent.ipcache();
    let pending: Arc<Mutex<Vec<Pending>>> = Arc::new(Mutex::new(Vec::new()));
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (pending, seen, done) = (pending.clone(), seen.clone(), done.clone());
        let map = agent.ipcache();
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now_pending: Vec<(usize, Ipv4Addr, u32)> =
                    pending.lock().expect("pending").iter().enumerate().map(|(k, p)| (k, p.ip, p.before)).collect();
                let mut arrived = Vec::new();
                for (k, ip, before) in now_pending {
                    if identity_of(&map, ip).is_some_and(|id| id != before) {
                        arrived.push((k, Instant::now()));
                    }
                }
                if !arrived.is_empty() {
                    let mut pending = pending.lock().expect("pending");
                    let mut seen = seen.lock().expect("seen");
                    for (k, at) in arrived.iter().rev() {
                        let p = pending.swap_remove(*k);
                        seen.push(at.duration_since(p.sent));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let rss_before = agent.rss_mib();
    let bytes_before = api.bytes_sent_to(AGENT_USER);
    let cpu_before = agent.cpu();
    let operator_before = operator.map(|pid| (support::bench::cpu_seconds(pid), rss_mib_of(pid), api.bytes_sent_to(OPERATOR_USER), slice_writes(api)));
    let load_churn = load();
    let started = Instant::now();
    let period = churn / changes.max(1) as u32;
    for c in 0..changes {
        let due = started + period * c as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let i = (c * 7919) % pods;
        let ip = pod_ip(i);
        let before = identity_of(&map, ip).unwrap_or(0);
        let spec = pod(i);
        let (ns, name) = (spec["metadata"]["namespace"].as_str().unwrap_or(""), spec["metadata"]["name"].as_str().unwrap_or(""));
        let mut object = api.object(Kind::Pod, ns, name);
        object["metadata"]["labels"]["rollout"] = json!(format!("r{round}-{c}"));
        // Registered before the event goes out, so an early arrival is not missed.
        let mut queue = pending.lock().expect("pending");
        api.apply(object);
        queue.push(Pending { ip, before, sent: Instant::now() });
    }
    let churn_took = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.lock().expect("pending").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu_churn = agent.cpu() - cpu_before;
    let operator_cpu = operator.zip(operator_before).map(|(pid, (cpu, ..))| support::bench::cpu_seconds(pid) - cpu);
    done.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    let missing = pending.lock().expect("pending").len();
    let bytes_churn = api.bytes_sent_to(AGENT_USER) - bytes_before;
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = agent.rss_mib();
    let operator_churn = match (operator, operator_before, operator_cpu) {
        (Some(pid), Some((_, rss, bytes, writes)), Some(cpu)) => OperatorChurn {
            cpu,
            rss_before: rss,
            rss_after: rss_mib_of(pid),
            writes: slice_writes(api) - writes,
            bytes: api.bytes_sent_to(OPERATOR_USER) - bytes,
        },
        _ => OperatorChurn::default(),
    };
    if operator.is_some() {
        println!(
            "churn round {round}, operator: CPU {:.2} s ({:.2} ms per change); RSS {:.0} -> {:.0} MiB; {} slice writes; {} received",
            operator_churn.cpu,
            operator_churn.cpu * 1e3 / changes.max(1) as f64,
            operator_churn.rss_before,
            operator_churn.rss_after,
            operator_churn.writes,
            mb(operator_churn.bytes)
        );
    }
    let mut latencies = seen.lock().expect("seen").clone();
    latencies.sort();
    println!(
        "churn round {round}: {changes} label changes in {:.1} s; agent CPU {:.2} s ({:.2} ms per change); RSS {:.0} -> {:.0} MiB; change-to-map p50 {} p99 {} max {} ({} seen, {missing} not within 60 s); {} received (load {load_churn})",
        churn_took.as_secs_f64(),
        cpu_churn,
        cpu_churn * 1e3 / changes.max(1) as f64,
        rss_before,
        rss_after,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3)).unwrap_or_else(|| "-".into()),
        latencies.len(),
        mb(bytes_churn),
    );
    Churn { cpu: cpu_churn, rss_before, rss_after, latencies, missing, bytes: bytes_churn, load: load_churn, operator: operator_churn }
}

/// PeerSlice writes the stand-in has answered (requests are recorded from the last
/// `forget_requests`).
fn slice_writes(api: &BlockingStandIn) -> usize {
    ["create", "update", "delete"].iter().map(|verb| api.count("peerslices", verb)).sum()
}
