//! Kernel tests of the lab: real network namespaces, veths, a bridge, cgroups and packets.
//! Run as root; they skip with a reason otherwise (fail under PALISADE_REQUIRE_KERNEL=1).

mod support;

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use palisade::inventory::{Inventory, Protocol};
use palisade::lab::{self, Lab, LabError, LabOptions};
use support::{TestLab, require_kernel};

/// Two namespaces, three pods, IPv4 and IPv6.
const SMALL: &str = r#"
namespaces:
  - name: shop
    labels: {team: web}
  - name: ops
endpoints:
  - namespace: shop
    name: frontend
    labels: {app: frontend}
    ips: [198.18.1.10, "2001:db8::1:10"]
    cgroup: /palisade-test/{lab}/shop/frontend
  - namespace: shop
    name: backend
    labels: {app: backend}
    ips: [198.18.1.20, "2001:db8::1:20"]
    ports: [{name: http, port: 8080}]
    cgroup: /palisade-test/{lab}/shop/backend
  - namespace: ops
    name: prober
    ips: [198.18.2.30, "2001:db8::2:30"]
"#;

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn lab_netns_names(lab: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n == &format!("plab.{lab}") || n.starts_with(&format!("plab.{lab}.")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn up_exec_probe_down() {
    if !require_kernel("up_exec_probe_down") {
        return;
    }
    let lab = TestLab::up("up_exec_probe_down", SMALL);
    let name = lab.name.clone();
    assert_eq!(lab.pods().len(), 3);
    assert!(netns_exists(lab.lab_netns()), "lab netns {} missing", lab.lab_netns());
    let mut cgroup_dirs = Vec::new();
    for pod in lab.pods() {
        assert!(netns_exists(&pod.netns), "{}: netns {} missing", pod.key, pod.netns);
        let dir = lab.pod_cgroup_dir(&pod.key).expect("pod cgroup dir");
        assert!(dir.join("cgroup.procs").exists(), "{}: cgroup {} missing", pod.key, dir.display());
        lab::cgroup_id(&dir).unwrap_or_else(|err| panic!("{}: cgroup id: {err}", pod.key));
        cgroup_dirs.push(dir);
    }
    // The inventory's cgroup wins; an endpoint without one gets a lab-scoped default.
    assert_eq!(lab.pod("shop/backend").expect("pod").cgroup, format!("palisade-test/{name}/shop/backend"));
    assert_eq!(lab.pod("ops/prober").expect("pod").cgroup, format!("palisade-lab/lab.{name}/ops/prober"));
    // The library function the daemon uses agrees with the lab.
    let backend = lab.inventory.endpoint("shop/backend").expect("endpoint");
    assert_eq!(lab::endpoint_cgroup_dir(backend).expect("mount"), Some(cgroup_dirs[1].clone()));

    // A process started with exec is in the pod's cgroup and network namespace.
    let mut child = lab
        .exec("shop/backend", "sleep")
        .expect("exec")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep in pod");
    let pid = child.id();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/pid/cgroup");
    assert!(
        cgroup.lines().any(|l| l == format!("0::/palisade-test/{name}/shop/backend")),
        "sleep is not in the pod cgroup: {cgroup}"
    );
    let child_netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("child netns").ino();
    let pod_netns = std::fs::metadata(lab.pod_netns_path("shop/backend").expect("path")).expect("pod netns").ino();
    assert_eq!(child_netns, pod_netns, "sleep is not in the pod netns");

    // Exit codes come back.
    let status = lab.exec("ops/prober", "sh").expect("exec").args(["-c", "exit 3"]).status().expect("run sh");
    assert_eq!(status.code(), Some(3));
    assert!(lab.exec("nope/nope", "true").is_err(), "unknown pod accepted");

    // No enforcement yet: every flow, IPv4 and IPv6, gets through.
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let started = Instant::now();
        let matrix = lab.probe(8080, protocol).unwrap_or_else(|err| panic!("probe {protocol}: {err}"));
        eprintln!("probe {protocol} 3x3 (18 flows): {:?}", started.elapsed());
        assert_eq!(matrix.results.len(), 3 * 6, "{matrix:?}");
        let denied: Vec<_> = matrix.denied().collect();
        assert!(denied.is_empty(), "{protocol}: denied flows without enforcement: {denied:#?}");
        assert_eq!(matrix.allowed("shop/frontend", "ops/prober"), Some(true));
    }

    // Reconcile: the same inventory again keeps everything, a smaller one removes the pod.
    let again = Lab::up(&lab.inventory, &LabOptions::named(&name)).expect("second up");
    assert_eq!(again.pods().len(), 3);
    assert!(child.try_wait().expect("try_wait").is_none(), "reconcile disturbed a healthy pod");
    let mut smaller: Inventory = lab.inventory.clone();
    smaller.endpoints.retain(|e| e.name != "prober");
    let prober_netns = lab.pod("ops/prober").expect("pod").netns.clone();
    let reconciled = Lab::up(&smaller, &LabOptions::named(&name)).expect("up with fewer pods");
    assert_eq!(reconciled.pods().len(), 2);
    assert!(!netns_exists(&prober_netns), "removed pod's netns is still there");
    let matrix = reconciled.probe(8080, Protocol::Tcp).expect("probe after reconcile");
    assert!(matrix.all_allowed() && matrix.results.len() == 2 * 4, "{matrix:?}");

    // Down removes namespaces, cgroups (killing what runs in them) and the state file.
    let report = lab.guard.down().expect("down");
    assert!(!report.netns_removed.is_empty());
    let status = child.wait().expect("wait sleep");
    assert!(!status.success(), "the pod's process survived down");
    assert!(lab_netns_names(&name).is_empty(), "left behind: {:?}", lab_netns_names(&name));
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(!Path::new(&format!("/run/palisade-lab/{name}.json")).exists(), "state file left behind");
    assert!(matches!(Lab::open(&name, Path::new(lab::DEFAULT_STATE_DIR)), Err(LabError::NoSuchLab(_))));
}

#[test]
fn down_by_name_after_a_crash() {
    if !require_kernel("down_by_name_after_a_crash") {
        return;
    }
    let lab = TestLab::up("crash", SMALL);
    let name = lab.name.clone();
    let dirs: Vec<_> = lab.pods().iter().map(|p| lab.pod_cgroup_dir(&p.key).expect("dir")).collect();
    let _orphan = lab.exec("shop/frontend", "sleep").expect("exec").arg("30").spawn().expect("spawn");
    // Simulate a crash: the handle goes away without cleaning up.
    std::mem::forget(lab);
    assert_eq!(lab_netns_names(&name).len(), 4);

    lab::down(&name, Path::new(lab::DEFAULT_STATE_DIR)).expect("down by name");
    assert!(lab_netns_names(&name).is_empty(), "left behind: {:?}", lab_netns_names(&name));
    for dir in &dirs {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    // Down of a lab that is already gone is fine.
    lab::down(&name, Path::new(lab::DEFAULT_STATE_DIR)).expect("second down");
}

#[test]
fn down_finds_namespaces_by_prefix_without_a_state_file() {
    if !require_kernel("down_finds_namespaces_by_prefix") {
        return;
    }
    let lab = TestLab::up("nostate", SMALL);
    let name = lab.name.clone();
    std::mem::forget(lab);
    std::fs::remove_file(format!("/run/palisade-lab/{name}.json")).expect("remove state file");
    lab::down(&name, Path::new(lab::DEFAULT_STATE_DIR)).expect("down by prefix");
    assert!(lab_netns_names(&name).is_empty(), "left behind: {:?}", lab_netns_names(&name));
    // Without the state file the inventory's cgroups are unknown: clean them up by hand.
    let mount = lab::cgroup2_mount().expect("mount");
    let _ = std::fs::remove_dir_all(mount.join(format!("palisade-test/{name}/shop/frontend")));
    for dir in [format!("palisade-test/{name}/shop/frontend"), format!("palisade-test/{name}/shop/backend"), format!("palisade-test/{name}/shop"), format!("palisade-test/{name}")] {
        let _ = std::fs::remove_dir(mount.join(dir));
    }
    assert!(!mount.join(format!("palisade-lab/lab.{name}")).exists(), "default cgroup root left behind");
}

#[test]
fn two_labs_with_the_same_addresses_coexist() {
    if !require_kernel("two_labs_coexist") {
        return;
    }
    let first = TestLab::up("coexist", SMALL);
    let second = TestLab::up("coexist", SMALL);
    for lab in [&first, &second] {
        let matrix = lab.probe(9000, Protocol::Tcp).expect("probe");
        assert!(matrix.all_allowed(), "{}: {matrix:?}", lab.name);
    }
}

/// Issue 17: from an IPv4-only pod, a dual-stack pod's IPv6 address cannot be reached whatever
/// the policy says; the probe does not try it and does not report it as denied (no policy here:
/// everything is allowed). Pods with no family in common are not allowed, as `policy matrix`
/// says, without a flow reported as denied.
#[test]
fn probe_tries_only_the_families_both_pods_have() {
    if !require_kernel("probe_families") {
        return;
    }
    let yaml = r#"
endpoints:
  - {namespace: fam, name: v4only, ips: [198.18.3.10], cgroup: /palisade-test/{lab}/fam/v4only}
  - {namespace: fam, name: dual, ips: [198.18.3.20, "2001:db8::3:20"], cgroup: /palisade-test/{lab}/fam/dual}
  - {namespace: fam, name: v6only, ips: ["2001:db8::3:30"], cgroup: /palisade-test/{lab}/fam/v6only}
"#;
    let lab = TestLab::up("families", yaml);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let matrix = lab.probe(8080, protocol).unwrap_or_else(|err| panic!("probe {protocol}: {err}"));
        assert_eq!(matrix.denied().count(), 0, "{protocol}: nothing is denied\n{}\n{:#?}", matrix.to_table(), matrix.denied().collect::<Vec<_>>());
        assert!(matrix.all_allowed(), "{protocol}\n{}", matrix.to_table());
        assert_eq!(matrix.allowed("fam/v4only", "fam/dual"), Some(true), "{}", matrix.to_table());
        assert_eq!(matrix.allowed("fam/v6only", "fam/dual"), Some(true), "{}", matrix.to_table());
        assert_eq!(matrix.allowed("fam/dual", "fam/v4only"), Some(true), "{}", matrix.to_table());
        assert_eq!(matrix.allowed("fam/v4only", "fam/v6only"), Some(false), "no family in common\n{}", matrix.to_table());
        let v6_from_v4 = matrix
            .results
            .iter()
            .find(|r| r.from == "fam/v4only" && r.to == "fam/dual" && r.ip.is_ipv6())
            .expect("the IPv6 flow is listed");
        assert!(v6_from_v4.untried && !v6_from_v4.allowed, "{v6_from_v4:?}");
        assert_eq!(v6_from_v4.reason.as_deref(), Some("no IPv6 address in fam/v4only"));
        let table = matrix.to_table();
        let row = table.lines().find(|l| l.starts_with("fam/v4only")).expect("row");
        assert!(row.contains("n/a") && !row.contains("--"), "{table}");
    }
}

#[test]
fn sctp_probe_works_or_says_the_kernel_lacks_it() {
    if !require_kernel("sctp_probe") {
        return;
    }
    let lab = TestLab::up("sctp", SMALL);
    match lab.probe(7000, Protocol::Sctp) {
        Ok(matrix) => assert!(matrix.all_allowed(), "{matrix:?}"),
        Err(LabError::ProtocolUnsupported { protocol, .. }) => {
            assert_eq!(protocol, Protocol::Sctp);
            eprintln!("SCTP not supported by this kernel; the probe said so");
        }
        Err(err) => panic!("unexpected SCTP probe error: {err}"),
    }
}

#[test]
fn nine_pod_matrix() {
    if !require_kernel("nine_pod_matrix") {
        return;
    }
    let mut yaml = String::from("endpoints:\n");
    for i in 1..=9 {
        yaml.push_str(&format!(
            "  - namespace: ns{}\n    name: pod-{i}\n    ips: [198.18.5.{i}, \"2001:db8::5:{i}\"]\n    cgroup: /palisade-test/{{lab}}/pod-{i}\n",
            i % 3
        ));
    }
    let started = Instant::now();
    let lab = TestLab::up("nine", &yaml);
    let up_time = started.elapsed();
    let started = Instant::now();
    let matrix = lab.probe(8080, Protocol::Tcp).expect("probe");
    let tcp_time = started.elapsed();
    let started = Instant::now();
    let udp = lab.probe(5353, Protocol::Udp).expect("probe udp");
    let udp_time = started.elapsed();
    eprintln!("9 pods: up {up_time:?}, TCP 9x18 probe {tcp_time:?}, UDP {udp_time:?}");
    assert_eq!(matrix.results.len(), 9 * 18);
    assert!(matrix.all_allowed(), "{:#?}", matrix.denied().collect::<Vec<_>>());
    assert!(udp.all_allowed(), "{:#?}", udp.denied().collect::<Vec<_>>());
}

#[test]
fn addresses_outside_the_lab_ranges_are_refused() {
    if !require_kernel("addresses_outside_the_lab_ranges") {
        return;
    }
    let yaml = "endpoints:\n  - namespace: a\n    name: b\n    ips: [10.1.2.3]\n";
    let inventory = Inventory::parse(yaml, Path::new("t.yaml")).expect("valid inventory");
    let name = support::unique_lab_name("outside");
    let err = Lab::up(&inventory, &LabOptions::named(&name)).expect_err("10.1.2.3 accepted");
    assert!(matches!(err, LabError::AddressOutsideLab { .. }), "{err}");
    lab::down(&name, Path::new(lab::DEFAULT_STATE_DIR)).expect("clean up");
}

#[test]
fn probe_reports_flows_that_do_not_get_through() {
    if !require_kernel("probe_reports_denied_flows") {
        return;
    }
    let lab = TestLab::up("denied", SMALL);
    // Cut the backend off its segment from inside the pod.
    let status = lab
        .exec("shop/backend", "ip")
        .expect("exec")
        .args(["link", "set", "eth0", "down"])
        .status()
        .expect("run ip in pod");
    assert!(status.success());
    let options = lab::ProbeOptions { timeout: std::time::Duration::from_millis(300) };
    let started = Instant::now();
    let matrix = lab.probe_with(8080, Protocol::Tcp, &options).expect("probe");
    eprintln!("probe with denied flows: {:?}", started.elapsed());
    assert_eq!(matrix.allowed("shop/frontend", "shop/backend"), Some(false), "{matrix:?}");
    assert_eq!(matrix.allowed("ops/prober", "shop/backend"), Some(false), "{matrix:?}");
    assert_eq!(matrix.allowed("shop/frontend", "ops/prober"), Some(true), "{matrix:?}");
    let denied = matrix.denied().find(|r| r.from == "shop/frontend" && r.to == "shop/backend").expect("denied flow");
    assert!(denied.reason.is_some(), "{denied:?}");
    let json = serde_json::to_value(&matrix).expect("json");
    assert!(json["results"].as_array().expect("results").iter().any(|r| r["allowed"] == false && r["reason"].is_string()));
}
