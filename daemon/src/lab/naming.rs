//! Names of the kernel objects a lab creates.
//!
//! Several labs coexist on one host, so every name carries the lab name, and a lab's resources
//! can be found again by prefix after a crash. The separator between the fixed prefix, the lab
//! name and the pod is `.`, which a lab name may not contain: `plab.web.` can never be a prefix
//! of lab `web-2`'s names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Prefix of every network namespace a lab creates.
pub const NETNS_PREFIX: &str = "plab";
/// The bridge inside the lab's own network namespace (only that namespace sees it).
pub const BRIDGE_NAME: &str = "br0";
/// The pod's side of its veth pair, inside the pod's network namespace.
pub const POD_INTERFACE: &str = "eth0";
/// Kernel limit for interface names, without the trailing NUL (IFNAMSIZ - 1).
pub const MAX_INTERFACE_NAME: usize = 15;
/// Network namespace names are file names under /run/netns; keep them well below NAME_MAX.
const MAX_NETNS_NAME: usize = 200;
/// Lab names end up in netns names, cgroup paths and the state file name.
pub const MAX_LAB_NAME: usize = 32;
/// The lab name when the operator gives none.
pub const DEFAULT_LAB_NAME: &str = "default";

/// The IPv4 range lab pods may use (RFC 2544 benchmarking range, never routed).
pub const LAB_IPV4_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// IPv6 ranges lab pods may use: documentation (RFC 3849) and unique local (RFC 4193).
pub const LAB_IPV6_NETS: [(Ipv6Addr, u8); 2] = [
    (Ipv6Addr::new(0x2001, 0x0db8, 0, 0, 0, 0, 0, 0), 32),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
];
/// Prefix length of pod IPv6 addresses: one /64 is one L2 segment.
pub const POD_IPV6_PREFIX: u8 = 64;

/// Checks that `name` can name a lab: a DNS label (no dots) of at most [`MAX_LAB_NAME`] bytes.
pub fn validate_lab_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LAB_NAME
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a lab name (lowercase letters, digits and '-', at most {MAX_LAB_NAME})"
        ))
    }
}

/// The network namespace that holds the lab's bridge.
pub fn lab_netns(lab: &str) -> String {
    format!("{NETNS_PREFIX}.{lab}")
}

/// What every pod namespace of `lab` starts with (the crash-recovery fallback matches on it).
pub fn pod_netns_prefix(lab: &str) -> String {
    format!("{NETNS_PREFIX}.{lab}.")
}

/// The network namespace of pod `namespace/name` in `lab`. Readable when it fits; long names
/// are cut and made unique again with a hash of the full pod key.
pub fn pod_netns(lab: &str, namespace: &str, name: &str) -> String {
    let full = format!("{}{namespace}.{name}", pod_netns_prefix(lab));
    if full.len() <= MAX_NETNS_NAME {
        return full;
    }
    let hash = format!("{:08x}", fnv1a32(format!("{namespace}/{name}").as_bytes()));
    let mut cut = MAX_NETNS_NAME - hash.len() - 1;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", &full[..cut])
}

/// The bridge-side veth of a pod, inside the lab namespace. Each lab has its own namespace, so
/// the name only has to be unique within the lab; a hash of the pod key keeps it stable when
/// other pods come and go (so reconciling never renames a working pod).
pub fn host_veth(namespace: &str, name: &str) -> String {
    let name = format!("v{:08x}", fnv1a32(format!("{namespace}/{name}").as_bytes()));
    debug_assert!(name.len() <= MAX_INTERFACE_NAME);
    name
}

/// Where the cgroups of pods whose endpoints name none go, relative to the cgroup2 mount. The
/// dot keeps it apart from the usual `palisade-lab/<namespace>/<pod>` inventory paths (a
/// namespace name has no dots), so removing it can never touch another lab's pods.
pub fn default_cgroup_root(lab: &str) -> String {
    format!("palisade-lab/lab.{lab}")
}

/// The cgroup (relative to the cgroup2 mount) of a pod whose endpoint names none.
pub fn default_pod_cgroup(lab: &str, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", default_cgroup_root(lab))
}

/// Whether `ip` is inside the ranges lab pods may use.
pub fn is_lab_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => in_v4_net(v4, LAB_IPV4_NET.0, LAB_IPV4_NET.1),
        IpAddr::V6(v6) => LAB_IPV6_NETS.iter().any(|&(net, len)| in_v6_net(v6, net, len)),
    }
}

/// The address as `ip addr add` takes it, with the prefix length that puts every pod of the
/// lab on one L2 segment.
pub fn pod_address_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/{}", LAB_IPV4_NET.1),
        IpAddr::V6(v6) => format!("{v6}/{POD_IPV6_PREFIX}"),
    }
}

/// The /64 an IPv6 address is in, as `ip route` takes it.
pub fn ipv6_subnet(ip: Ipv6Addr) -> String {
    let bits = u128::from(ip) & !(u128::MAX >> POD_IPV6_PREFIX);
    format!("{}/{POD_IPV6_PREFIX}", Ipv6Addr::from(bits))
}

fn in_v4_net(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6_net(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
    u128::from(ip) & mask == u128::from(net) & mask
}

/// FNV-1a: tiny, stable across Rust versions (unlike `DefaultHasher`), good enough to tell a
/// few hundred pod names apart.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| (hash ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_dns_labels_without_dots() {
        assert!(validate_lab_name("web-2").is_ok());
        for bad in ["", "Web", "a.b", "-a", "a-", &"x".repeat(MAX_LAB_NAME + 1)] {
            assert!(validate_lab_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pod_names_of_one_lab_never_match_another_labs_prefix() {
        let ns = pod_netns("web", "shop", "a");
        assert!(ns.starts_with(&pod_netns_prefix("web")));
        assert!(!pod_netns("web-2", "shop", "a").starts_with(&pod_netns_prefix("web")));
        assert_ne!(lab_netns("web"), ns);
        assert_eq!(ns, "plab.web.shop.a");
    }

    #[test]
    fn long_pod_names_are_cut_and_stay_unique() {
        let long = "p".repeat(250);
        let a = pod_netns("web", "shop", &format!("{long}a"));
        let b = pod_netns("web", "shop", &format!("{long}b"));
        assert!(a.len() <= MAX_NETNS_NAME && b.len() <= MAX_NETNS_NAME);
        assert_ne!(a, b);
        assert!(a.starts_with(&pod_netns_prefix("web")));
    }

    #[test]
    fn host_veths_fit_ifnamsiz_and_are_stable() {
        let veth = host_veth("webapp", "frontend-1");
        assert!(veth.len() <= MAX_INTERFACE_NAME);
        assert_eq!(veth, host_veth("webapp", "frontend-1"));
        assert_ne!(veth, host_veth("webapp", "frontend-2"));
        // The split point matters: "a/bc" and "ab/c" are different pods.
        assert_ne!(host_veth("a", "bc"), host_veth("ab", "c"));
    }

    #[test]
    fn lab_addresses() {
        assert!(is_lab_address("198.18.1.10".parse().unwrap()));
        assert!(is_lab_address("198.19.255.1".parse().unwrap()));
        assert!(!is_lab_address("198.20.0.1".parse().unwrap()));
        assert!(!is_lab_address("10.0.0.1".parse().unwrap()));
        assert!(is_lab_address("2001:db8::10".parse().unwrap()));
        assert!(is_lab_address("fd00::1".parse().unwrap()));
        assert!(!is_lab_address("2001:4860::1".parse().unwrap()));
        assert_eq!(pod_address_cidr("198.18.1.10".parse().unwrap()), "198.18.1.10/15");
        assert_eq!(pod_address_cidr("2001:db8::10".parse().unwrap()), "2001:db8::10/64");
        assert_eq!(ipv6_subnet("2001:db8:0:1::10".parse().unwrap()), "2001:db8:0:1::/64");
    }
}
