//! The pack's prefilters in the kernel (issue 16): inet/inet6 connects to ports no connect rule
//! can match never reach the ring buffer (counted as prefiltered, not lost); connects to the
//! ports the rules name do; with the prefilter off every connect does. The same for opens, with
//! the filter compiled from the default pack's open rules (`RulePack::open_filter`): an open no
//! rule's prefilter admits stays in the kernel, and every open that arrives is one the
//! user-space model of the kernel's decision (`OpenPrefilter::keeps_in_kernel`) lets out.
//!
//! Root only; without root they print SKIP, and with PALISADE_REQUIRE_KERNEL=1 they fail.
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use palisade::events::decode::{Event, EventData};
use palisade::events::kind::EventKind;
use palisade::probes::loader;
use palisade::rules::pack::RulePack;
use palisade::rules::prefilter::OpenPrefilter;
use support::probes::{TestCgroup, collect_until, start};

fn connect_port(e: &Event) -> Option<u16> {
    match &e.data {
        EventData::Connect(c) if matches!(c.family, "inet" | "inet6") => Some(c.port),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_to_ports_no_rule_names_stay_in_the_kernel() {
    if !support::require_kernel("connects_to_ports_no_rule_names_stay_in_the_kernel") {
        return;
    }
    let cgroup = TestCgroup::new("connectpf");
    let mut running = start(vec![EventKind::Exec, EventKind::Connect], BTreeSet::from([cgroup.id])).await;
    let ports = BTreeSet::from([3333u16, 4444]);
    running.host.with(move |ebpf| loader::set_connect_ports(ebpf, Some(&ports))).await.expect("host").expect("connect ports");

    // Refused connects on closed loopback ports of this host: the attempt is the event.
    cgroup.workload(&["connect", "127.0.0.1:9"]);
    cgroup.workload(&["connect6", "[::1]:9"]);
    cgroup.workload(&["connect", "127.0.0.1:3333"]);
    cgroup.workload(&["connect6", "[::1]:4444"]);
    let seen = collect_until(&mut running.events, Duration::from_secs(10), |seen| {
        let ports: Vec<u16> = seen.iter().filter_map(connect_port).collect();
        ports.contains(&3333) && ports.contains(&4444)
    })
    .await;
    let late = collect_until(&mut running.events, Duration::from_millis(500), |_| false).await;
    let ports: Vec<u16> = seen.iter().chain(late.iter()).filter_map(connect_port).collect();
    assert!(ports.contains(&3333) && ports.contains(&4444), "connects to the ports a rule names reach user space: {ports:?}");
    assert!(!ports.contains(&9), "connects to a port no rule names left the kernel: {ports:?}");
    let counters = running.host.status().await.expect("status").counters.expect("counters");
    assert!(counters.prefiltered.get("connect").copied().unwrap_or(0) >= 2, "{counters:?}");
    assert_eq!(counters.lost.get("connect").copied(), Some(0), "{counters:?}");

    // A pack without a connect prefilter filters nothing.
    running.host.with(|ebpf| loader::set_connect_ports(ebpf, None)).await.expect("host").expect("prefilter off");
    cgroup.workload(&["connect", "127.0.0.1:9"]);
    let seen = collect_until(&mut running.events, Duration::from_secs(10), |seen| seen.iter().any(|e| connect_port(e) == Some(9))).await;
    assert!(seen.iter().any(|e| connect_port(e) == Some(9)), "with the prefilter off, a connect to port 9 reaches user space");
}

fn open_of(e: &Event) -> Option<&palisade::events::decode::OpenData> {
    match &e.data {
        EventData::Open(o) => Some(o),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_no_open_rule_can_match_stay_in_the_kernel() {
    if !support::require_kernel("opens_no_open_rule_can_match_stay_in_the_kernel") {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules");
    let pack = RulePack::load(&dir).unwrap_or_else(|e| panic!("default pack: {}", e.lines().join("\n")));
    let derived = pack.open_filter().expect("the default pack's open rules all declare prefilters the kernel can test");
    let model = OpenPrefilter::load(&dir).expect("lists").with_derived(Some(derived.clone()));
    let cgroup = TestCgroup::new("openpf");
    let mut running = start(vec![EventKind::Exec, EventKind::Open], BTreeSet::from([cgroup.id])).await;
    let (sensitive, maps) = (model.sensitive.clone(), derived.kernel_maps());
    running
        .host
        .with(move |ebpf| {
            loader::set_sensitive_prefixes(ebpf, &sensitive)?;
            loader::set_open_filter(ebpf, Some(&maps))
        })
        .await
        .expect("host")
        .expect("open filter");

    let scratch = std::env::temp_dir().join(format!("palisade-openpf-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    let plain = scratch.join("plain");
    std::fs::write(&plain, b"x").expect("plain file");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
    let (plain, written) = (path(&plain), path(&scratch.join("written")));
    let (hidden, token) = (path(&scratch.join(".ssh/id_rsa")), path(&scratch.join("serviceaccount/token")));
    let system_create = "/usr/lib/palisade-openpf-missing/x".to_string();
    // Kept: reads no rule names, a write below no system directory, a failed read of a library.
    cgroup.workload(&["open", "/etc/hostname"]);
    cgroup.workload(&["open", &plain]);
    cgroup.workload(&["write", &written]);
    let _ = cgroup.command(support::probes::PALISADE, &["workload", "open", "/usr/lib/palisade-openpf-missing.so"]).status();
    // Out: a credential file (also sensitive), a hidden component (`/.ssh/`), a suffix
    // (`/serviceaccount/token`), a create below a system directory; the last three fail (ENOENT)
    // and are judged by their argument.
    cgroup.workload(&["open", "/etc/shadow"]);
    for target in [&hidden, &token] {
        let _ = cgroup.command(support::probes::PALISADE, &["workload", "open", target]).status();
    }
    let _ = cgroup.command(support::probes::PALISADE, &["workload", "write", &system_create]).status();
    let wanted = ["/etc/shadow", hidden.as_str(), token.as_str(), system_create.as_str()];
    let seen = collect_until(&mut running.events, Duration::from_secs(10), |seen| {
        wanted.iter().all(|w| seen.iter().filter_map(open_of).any(|o| o.path == *w))
    })
    .await;
    let late = collect_until(&mut running.events, Duration::from_millis(500), |_| false).await;
    let opens: Vec<_> = seen.iter().chain(late.iter()).filter_map(open_of).collect();
    let paths: Vec<&str> = opens.iter().map(|o| o.path.as_str()).collect();
    let _ = std::fs::remove_dir_all(&scratch);
    for w in wanted {
        assert!(paths.contains(&w), "{w}: an open a rule's prefilter admits reaches user space: {paths:?}");
    }
    for kept in ["/etc/hostname", plain.as_str(), written.as_str(), "/usr/lib/palisade-openpf-missing.so"] {
        assert!(!paths.contains(&kept), "{kept}: an open no rule can match left the kernel: {paths:?}");
    }
    assert!(!paths.iter().any(|p| p.starts_with("/usr/lib/x86_64-linux-gnu/") || p.starts_with("/lib/x86_64-linux-gnu/")), "library opens left the kernel: {paths:?}");
    // The model agrees: nothing that arrived is an open it says the kernel keeps.
    for o in &opens {
        let resolved = o.path_resolved.then_some(o.path.as_str());
        assert!(!model.keeps_in_kernel(&o.path_arg, resolved, o.flags, o.result), "the kernel let out {o:?}, the model keeps it");
    }
    let counters = running.host.status().await.expect("status").counters.expect("counters");
    assert!(counters.prefiltered.get("open").copied().unwrap_or(0) >= 4, "{counters:?}");
    assert_eq!(counters.lost.get("open").copied(), Some(0), "{counters:?}");

    // Off (a pack whose open rules the kernel cannot test, no quiet list): nothing is kept.
    running.host.with(|ebpf| loader::set_open_filter(ebpf, None)).await.expect("host").expect("filter off");
    cgroup.workload(&["open", "/etc/hostname"]);
    let seen = collect_until(&mut running.events, Duration::from_secs(10), |seen| seen.iter().filter_map(open_of).any(|o| o.path == "/etc/hostname")).await;
    assert!(seen.iter().filter_map(open_of).any(|o| o.path == "/etc/hostname"), "with the filter off, /etc/hostname reaches user space");
}
