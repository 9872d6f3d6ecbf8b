//! Finds a pod's cgroup under the cgroup2 hierarchy from its UID and QoS class.
//!
//! The kubelet creates the pod-level cgroup when it creates the pod sandbox, before any of the
//! pod's containers (the pause container included) runs a process. Segmenting and monitoring that
//! directory therefore covers the pod from its first process, and every container the runtime
//! later creates inside it. The layouts (paths relative to the cgroup2 mount):
//!
//! | driver | QoS | pod cgroup | containers |
//! |---|---|---|---|
//! | systemd | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//! | systemd | Burstable | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | same |
//! | systemd | BestEffort | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` | same |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>` | `<id>` (containerd), `crio-<id>` (CRI-O) |
//! | cgroupfs | Burstable | `kubepods/burstable/pod<uid>` | same |
//! | cgroupfs | BestEffort | `kubepods/besteffort/pod<uid>` | same |
//!
//! `<uid_>` is the UID with `-` replaced by `_` (systemd reserves `-` for slice nesting). When the
//! kubelet runs with a `--cgroup-root` (kind, some managed distributions) the same layout sits
//! below another directory; a bounded search below the mount finds it.

use std::path::{Path, PathBuf};

/// How deep below the cgroup2 mount the fallback search looks for a pod's directory.
const SEARCH_DEPTH: usize = 6;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("pod {uid}: no cgroup below {root} (looked for {candidates})")]
    NotFound { uid: String, root: PathBuf, candidates: String },
    #[error("pod UID {0:?} is not a UID (hex digits and '-')")]
    BadUid(String),
}

/// The pod's QoS class, as `status.qosClass` reports it; it decides the parent cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// `None` for a missing or unknown class; discovery then tries all three.
    pub fn from_status(value: Option<&str>) -> Option<QosClass> {
        match value? {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    const ALL: [QosClass; 3] = [QosClass::Burstable, QosClass::BestEffort, QosClass::Guaranteed];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A pod's cgroup, found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// Relative to the cgroup2 mount, no leading `/` (the inventory's form).
    pub path: String,
    pub driver: CgroupDriver,
    /// Container ids whose cgroups exist below the pod cgroup (runtime prefixes stripped).
    pub containers: Vec<String>,
}

/// Looks pods' cgroups up below one cgroup2 mount.
#[derive(Debug, Clone)]
pub struct CgroupLocator {
    root: PathBuf,
}

impl CgroupLocator {
    /// `root` is the cgroup2 mount (e.g. `/sys/fs/cgroup`).
    pub fn new(root: impl Into<PathBuf>) -> CgroupLocator {
        CgroupLocator { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pod-level cgroup of the pod with `uid`. With an unknown QoS class every class is tried.
    pub fn pod_cgroup(&self, uid: &str, qos: Option<QosClass>) -> Result<PodCgroup, CgroupError> {
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(CgroupError::BadUid(uid.to_string()));
        }
        let classes: Vec<QosClass> = match qos {
            Some(class) => vec![class],
            None => QosClass::ALL.to_vec(),
        };
        let mut tried = Vec::new();
        for class in &classes {
            for (relative, driver) in candidates(uid, *class) {
                if self.root.join(&relative).is_dir() {
                    return Ok(self.found(relative, driver));
                }
                tried.push(relative);
            }
        }
        // A kubelet `--cgroup-root` (kind: `kubelet.slice/kubelet-kubepods.slice/...`) moves and
        // renames the tree: look for the pod's own directory name below it.
        if let Some((relative, driver)) = self.search(uid) {
            return Ok(self.found(relative, driver));
        }
        Err(CgroupError::NotFound { uid: uid.to_string(), root: self.root.clone(), candidates: tried.join(", ") })
    }

    fn found(&self, path: String, driver: CgroupDriver) -> PodCgroup {
        let containers = container_ids(&self.root.join(&path), driver);
        PodCgroup { path, driver, containers }
    }

    /// Breadth first, at most [`SEARCH_DEPTH`] levels down, through slices and kubelet
    /// directories only: a directory named `pod<uid>` (cgroupfs) or ending in `-pod<uid_>.slice`
    /// (systemd).
    fn search(&self, uid: &str) -> Option<(String, CgroupDriver)> {
        let cgroupfs_name = format!("pod{uid}");
        let systemd_suffix = format!("-pod{}.slice", uid.replace('-', "_"));
        let mut level = vec![String::new()];
        for _ in 0..SEARCH_DEPTH {
            let mut next = Vec::new();
            for dir in level {
                let Ok(entries) = std::fs::read_dir(self.root.join(&dir)) else { continue };
                let mut names: Vec<String> = entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                for name in names {
                    let child = if dir.is_empty() { name.clone() } else { format!("{dir}/{name}") };
                    if name.ends_with(&systemd_suffix) {
                        return Some((child, CgroupDriver::Systemd));
                    }
                    if name == cgroupfs_name {
                        return Some((child, CgroupDriver::Cgroupfs));
                    }
                    // Container scopes and system services cannot hold pods: not descended into.
                    if name.ends_with(".slice") || name.contains("kube") || name == "besteffort" || name == "burstable" {
                        next.push(child);
                    }
                }
            }
            level = next;
        }
        None
    }
}

/// Whether a cgroup directory name is the kubelet's pods root: `kubepods.slice` (systemd),
/// `kubepods` (cgroupfs), or `<root>-kubepods.slice` below a kubelet `--cgroup-root` with the
/// systemd driver (kind: `kubelet.slice/kubelet-kubepods.slice`).
fn is_kubepods_root(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

/// The kubelet's pods root (relative to the cgroup2 mount) below which this node's pods live, for
/// attaching the datapath once for every pod (Kubernetes mode's default `--pods-cgroup`):
/// the pods root of the pod cgroups the locator found (`pod_cgroups`, relative paths), so a
/// kubelet `--cgroup-root` is followed; the systemd one when pods sit below both kinds (a node
/// uses one driver), then the one holding the most pods. With no pod found yet, `kubepods.slice`
/// or else `kubepods` when it exists at the mount. None: nothing found (the datapath is then
/// attached per pod).
pub fn kubepods_parent<'a>(mount: &Path, pod_cgroups: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut roots: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for cgroup in pod_cgroups {
        let parts: Vec<&str> = cgroup.trim_matches('/').split('/').collect();
        // The pod's own directory is never the root: only its ancestors are looked at.
        if let Some(at) = parts.iter().take(parts.len().saturating_sub(1)).position(|p| is_kubepods_root(p)) {
            *roots.entry(parts[..=at].join("/")).or_default() += 1;
        }
    }
    let best = roots.into_iter().max_by(|(a, na), (b, nb)| {
        (a.ends_with(".slice"), na, std::cmp::Reverse(a)).cmp(&(b.ends_with(".slice"), nb, std::cmp::Reverse(b)))
    });
    if let Some((root, _)) = best {
        return Some(root);
    }
    ["kubepods.slice", "kubepods"].into_iter().find(|name| mount.join(name).is_dir()).map(str::to_string)
}

/// The pod cgroup paths for one QoS class, systemd first (the default driver since 1.22).
fn candidates(uid: &str, class: QosClass) -> [(String, CgroupDriver); 2] {
    let escaped = uid.replace('-', "_");
    let systemd = match class {
        QosClass::Guaranteed => format!("kubepods.slice/kubepods-pod{escaped}.slice"),
        QosClass::Burstable => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice")
        }
        QosClass::BestEffort => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice")
        }
    };
    let cgroupfs = match class {
        QosClass::Guaranteed => format!("kubepods/pod{uid}"),
        QosClass::Burstable => format!("kubepods/burstable/pod{uid}"),
        QosClass::BestEffort => format!("kubepods/besteffort/pod{uid}"),
    };
    [(systemd, CgroupDriver::Systemd), (cgroupfs, CgroupDriver::Cgroupfs)]
}

/// Container ids below a pod cgroup, from the runtimes' directory names.
fn container_ids(pod_dir: &Path, driver: CgroupDriver) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(pod_dir) else { return Vec::new() };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| container_id_from_dir(&e.file_name().to_string_lossy(), driver))
        .collect();
    ids.sort();
    ids
}

/// `cri-containerd-<id>.scope` -> `<id>` (systemd), `crio-<id>` / `<id>` (cgroupfs). CRI-O's
/// `crio-conmon-<id>` monitor cgroups are not containers.
pub fn container_id_from_dir(name: &str, driver: CgroupDriver) -> Option<String> {
    let id = match driver {
        CgroupDriver::Systemd => {
            let stem = name.strip_suffix(".scope")?;
            ["cri-containerd-", "crio-", "docker-"].iter().find_map(|prefix| stem.strip_prefix(prefix))?
        }
        CgroupDriver::Cgroupfs => name.strip_prefix("crio-").unwrap_or(name),
    };
    let is_id = id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| id.to_string())
}

/// `containerd://<id>` / `cri-o://<id>` / `docker://<id>` from a pod's containerStatuses -> `<id>`.
pub fn container_id_from_status(value: &str) -> Option<&str> {
    let (_, id) = value.split_once("://")?;
    (!id.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_dir_names() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let systemd = CgroupDriver::Systemd;
        assert_eq!(container_id_from_dir(&format!("cri-containerd-{id}.scope"), systemd).as_deref(), Some(id));
        assert_eq!(container_id_from_dir(&format!("crio-{id}.scope"), systemd).as_deref(), Some(id));
        assert_eq!(container_id_from_dir(&format!("crio-conmon-{id}.scope"), systemd), None);
        assert_eq!(container_id_from_dir(id, CgroupDriver::Cgroupfs).as_deref(), Some(id));
        assert_eq!(container_id_from_dir(&format!("crio-{id}"), CgroupDriver::Cgroupfs).as_deref(), Some(id));
        assert_eq!(container_id_from_dir("cpu.max", CgroupDriver::Cgroupfs), None);
        assert_eq!(container_id_from_status(&format!("containerd://{id}")), Some(id));
        assert_eq!(container_id_from_status("containerd://"), None);
    }

    #[test]
    fn the_pods_root_follows_the_pods_found() {
        let none = Path::new("/nonexistent");
        let systemd = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice";
        let cgroupfs = "kubepods/besteffort/pod2";
        let kind = "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod3.slice";
        assert_eq!(kubepods_parent(none, [systemd]).as_deref(), Some("kubepods.slice"));
        assert_eq!(kubepods_parent(none, [cgroupfs, "kubepods/pod4"]).as_deref(), Some("kubepods"));
        // Both kinds (a test lab; a node has one driver): systemd's.
        assert_eq!(kubepods_parent(none, [cgroupfs, "kubepods/pod4", systemd]).as_deref(), Some("kubepods.slice"));
        assert_eq!(kubepods_parent(none, [kind]).as_deref(), Some("kubelet.slice/kubelet-kubepods.slice"));
        assert_eq!(
            kubepods_parent(none, [&*format!("/test.slice/{systemd}")]).as_deref(),
            Some("test.slice/kubepods.slice"),
            "below another root"
        );
        // A pod whose own directory has the name is not below a root; no pods, nothing at the mount.
        assert_eq!(kubepods_parent(none, ["kubepods"]), None);
        assert_eq!(kubepods_parent(none, []), None);
        let mount = std::env::temp_dir().join(format!("palisade-kubepods-{}", std::process::id()));
        std::fs::create_dir_all(mount.join("kubepods")).expect("dir");
        assert_eq!(kubepods_parent(&mount, []).as_deref(), Some("kubepods"), "no pod yet: the mount's");
        std::fs::create_dir_all(mount.join("kubepods.slice")).expect("dir");
        assert_eq!(kubepods_parent(&mount, []).as_deref(), Some("kubepods.slice"));
        let _ = std::fs::remove_dir_all(&mount);
    }

    #[test]
    fn a_uid_cannot_escape_the_hierarchy() {
        let locator = CgroupLocator::new("/nonexistent");
        assert!(matches!(locator.pod_cgroup("../../etc", None), Err(CgroupError::BadUid(_))));
    }
}
