//! The pack's connect prefilter in the kernel (issue 16): inet/inet6 connects to ports no
//! connect rule can match never reach the ring buffer (counted as prefiltered, not lost);
//! connects to the ports the rules name do; with the prefilter off every connect does.
//!
//! Root only; without root they print SKIP, and with PALISADE_REQUIRE_KERNEL=1 they fail.
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use palisade::events::decode::{Event, EventData};
use palisade::events::kind::EventKind;
use palisade::probes::loader;
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
