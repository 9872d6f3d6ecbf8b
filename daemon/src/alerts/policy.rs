//! Alerts about the datapath and the policy set: a drop record (`policy_denied`) and a policy
//! load that rejected something. Built here, beside the event alerts' builder (`schema.rs`), so
//! the daemon only wires them.

use serde_json::json;

use super::{Alert, AlertKind};
use crate::events::enrich::PodRef;
use crate::rules::model::Severity;

/// One alert for a policy load that rejected something (None when nothing was rejected).
pub fn policy_report_alert(report: &crate::segmentation::PolicyReport) -> Option<Alert> {
    if let Some(over) = &report.over_capacity {
        return Some(
            Alert::new(AlertKind::Daemon, Severity::High, format!("policy set rejected, the last good set stays enforced: {over}"))
                .with_event(json!({"policies_over_capacity": over, "policies_rejected": report.rejected})),
        );
    }
    if report.rejected.is_empty() {
        return None;
    }
    Some(
        Alert::new(
            AlertKind::Daemon,
            Severity::High,
            format!(
                "{} policy document(s) rejected; the rest is enforced, the last good version of each rejected policy stays: {}",
                report.rejected.len(),
                report.rejected.join("; ")
            ),
        )
        .with_event(json!({"policies_rejected": report.rejected, "kept_last_good": report.kept_last_good})),
    )
}

/// A `policy_denied` alert for one record (which carries the count the kernel held back);
/// `pod` is the endpoint table's pod for the record's cgroup, if any.
pub fn policy_denied_alert(v: &palisade_common::PolicyVerdictEvent, pod: Option<&PodRef>) -> Alert {
    let addr = |a: &[u8; 16]| {
        let ip = std::net::Ipv6Addr::from(*a);
        ip.to_ipv4_mapped().map(|v4| v4.to_string()).unwrap_or_else(|| ip.to_string())
    };
    // addr:port, with IPv6 in brackets so the port is not mistaken for part of the address.
    let socket = |a: &[u8; 16], port: u16| {
        let text = addr(a);
        if text.contains(':') { format!("[{text}]:{port}") } else { format!("{text}:{port}") }
    };
    let direction = if v.direction == palisade_common::DIRECTION_INGRESS { "ingress" } else { "egress" };
    let reason = drop_reason(v.reason);
    let protocol = match v.protocol {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        1 => "ICMP",
        58 => "ICMPv6",
        _ => "other",
    };
    let held_back = if v.suppressed > 0 { format!(", {} more held back by the rate limit", v.suppressed) } else { String::new() };
    let path = crate::segmentation::datapath::path_name(v.path);
    let message = format!(
        "{direction} {protocol} {} {} {} denied ({reason}, path {path}){held_back}",
        socket(&v.local_addr, v.local_port),
        if direction == "ingress" { "<-" } else { "->" },
        socket(&v.peer_addr, v.peer_port),
    );
    let mut alert = Alert::new(AlertKind::PolicyDenied, Severity::Low, message).with_event(json!({
        "direction": direction, "protocol": protocol, "local": addr(&v.local_addr), "local_port": v.local_port,
        "peer": addr(&v.peer_addr), "peer_port": v.peer_port, "peer_identity": v.peer_identity, "reason": reason,
        "path": path, "cgroup_id": v.header.cgroup_id,
    }));
    alert.count = 1 + u64::from(v.suppressed);
    if let Some(pod) = pod {
        alert = alert.with_pod(super::PodInfo::from(pod));
    }
    alert
}

/// A drop record's reason, as alerts and metrics name it.
pub fn drop_reason(reason: u8) -> &'static str {
    match reason {
        palisade_common::REASON_QUARANTINE => "quarantine",
        palisade_common::REASON_CONNTRACK_FULL => "conntrack_full",
        palisade_common::REASON_UNKNOWN_ENDPOINT => "unknown_endpoint",
        palisade_common::REASON_UNPARSED => "unparsed",
        _ => "policy",
    }
}
