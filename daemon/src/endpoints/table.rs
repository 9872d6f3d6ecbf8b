//! The endpoint table: every pod of the inventory with its cgroup resolved (or why not), as
//! one immutable snapshot. The endpoints stage ([`super::EndpointsStage`]) is the only place
//! that resolves a cgroup path to its id; everybody else reads the table it publishes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::ids::{CgroupId, PodKey};
use crate::events::enrich::{EndpointIndex, PodRef};
use crate::inventory::{Inventory, Labels};

/// Where a pod runs, as far as this node is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On this node, with its cgroup (relative to the cgroup2 mount) and, once the directory
    /// exists, its id.
    Local { cgroup: String, cgroup_id: Option<CgroupId> },
    /// On this node, but the inventory names no cgroup for it (yet).
    LocalWithoutCgroup,
    /// On another node: a peer for segmentation only; never monitored, attached or quarantined
    /// here.
    Peer,
}

/// One pod in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointEntry {
    pub pod: PodKey,
    pub labels: Labels,
    pub service_account: Option<String>,
    pub placement: Placement,
}

impl EndpointEntry {
    pub fn is_peer(&self) -> bool {
        self.placement == Placement::Peer
    }

    /// The cgroup path (relative to the cgroup2 mount) of a local pod that has one.
    pub fn cgroup(&self) -> Option<&str> {
        match &self.placement {
            Placement::Local { cgroup, .. } => Some(cgroup),
            _ => None,
        }
    }

    /// The cgroup id of a local pod whose cgroup exists.
    pub fn cgroup_id(&self) -> Option<CgroupId> {
        match &self.placement {
            Placement::Local { cgroup_id, .. } => *cgroup_id,
            _ => None,
        }
    }
}

/// The inventory with every local pod's cgroup resolved; rebuilt as a whole on each change.
#[derive(Debug, Clone, Default)]
pub struct EndpointTable {
    inventory: Arc<Inventory>,
    entries: BTreeMap<PodKey, EndpointEntry>,
    /// Local pods with a cgroup id, for enrichment (cgroup id -> pod).
    index: EndpointIndex,
    /// Local pods whose cgroup is not known or does not exist (yet), with why: retried by the
    /// stage, reported in the status.
    unresolved: Vec<String>,
}

impl PartialEq for EndpointTable {
    /// Equal when a consumer has nothing to do: same inventory, same cgroups resolved.
    fn eq(&self, other: &EndpointTable) -> bool {
        self.entries == other.entries && self.unresolved == other.unresolved && self.inventory == other.inventory
    }
}

impl EndpointTable {
    /// Resolves each local endpoint's cgroup (relative to `cgroup_root`) to its id. Endpoints
    /// whose cgroup does not exist (yet) are kept, listed as unresolved with the reason, so they
    /// can be retried and reported, not ignored. Peer-only endpoints (pods on other nodes) have
    /// no cgroup here: they are neither monitored nor unresolved.
    pub fn resolve(inventory: Arc<Inventory>, cgroup_root: &Path) -> EndpointTable {
        let mut entries = BTreeMap::new();
        let mut index = EndpointIndex::default();
        let mut unresolved = Vec::new();
        for ep in &inventory.endpoints {
            let pod = PodKey::from(ep);
            let placement = if ep.peer_only {
                Placement::Peer
            } else if let Some(rel) = &ep.cgroup {
                let path = cgroup_root.join(rel);
                let cgroup_id = match crate::sys::cgroup_id(&path) {
                    Ok(id) => Some(CgroupId(id)),
                    Err(err) => {
                        unresolved.push(format!("{pod} ({}: {err})", path.display()));
                        None
                    }
                };
                if let Some(id) = cgroup_id {
                    let pod_ref = PodRef {
                        namespace: ep.namespace.clone(),
                        name: ep.name.clone(),
                        labels: ep.labels.clone(),
                        service_account: ep.service_account.clone(),
                    };
                    index.insert(id, pod_ref);
                }
                Placement::Local { cgroup: rel.clone(), cgroup_id }
            } else {
                unresolved.push(format!("{pod} (no cgroup in the inventory)"));
                Placement::LocalWithoutCgroup
            };
            let entry = EndpointEntry { pod: pod.clone(), labels: ep.labels.clone(), service_account: ep.service_account.clone(), placement };
            entries.insert(pod, entry);
        }
        EndpointTable { inventory, entries, index, unresolved }
    }

    /// Whether resolving the same inventory again would give another table: a local pod's
    /// cgroup appeared, went or was re-created under another id. Reads one cgroup per local pod
    /// and allocates nothing, so the stage's periodic look costs nothing per peer (a full
    /// [`EndpointTable::resolve`] copies every pod of the cluster).
    pub fn cgroups_changed(&self, cgroup_root: &Path) -> bool {
        self.entries.values().any(|entry| match &entry.placement {
            Placement::Local { cgroup, cgroup_id } => {
                crate::sys::cgroup_id(&cgroup_root.join(cgroup)).ok().map(CgroupId) != *cgroup_id
            }
            Placement::LocalWithoutCgroup | Placement::Peer => false,
        })
    }

    /// The inventory this table was resolved from (segmentation compiles from it).
    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    pub fn get(&self, pod: &PodKey) -> Option<&EndpointEntry> {
        self.entries.get(pod)
    }

    pub fn entries(&self) -> impl Iterator<Item = &EndpointEntry> {
        self.entries.values()
    }

    /// cgroup id -> pod, for enrichment.
    pub fn index(&self) -> &EndpointIndex {
        &self.index
    }

    /// The cgroups the probes watch: every local pod whose cgroup exists.
    pub fn monitored(&self) -> BTreeSet<CgroupId> {
        self.index.cgroup_ids().collect()
    }

    /// Local pods by cgroup id (those whose cgroup exists).
    pub fn by_cgroup(&self) -> HashMap<CgroupId, &EndpointEntry> {
        self.entries.values().filter_map(|e| e.cgroup_id().map(|id| (id, e))).collect()
    }

    pub fn unresolved(&self) -> &[String] {
        &self.unresolved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_only_endpoints_are_neither_monitored_nor_unresolved() {
        let root = std::env::temp_dir().join(format!("palisade-table-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("pods/web")).expect("cgroup dir");
        let inventory = Inventory::parse(
            "endpoints:\n\
             - {namespace: shop, name: web, ips: [198.18.0.1], cgroup: pods/web}\n\
             - {namespace: shop, name: pending, ips: [198.18.0.2]}\n\
             - {namespace: shop, name: gone, ips: [198.18.0.4], cgroup: pods/gone}\n\
             - {namespace: shop, name: remote, labels: {app: frontend}, ips: [198.18.0.3], peerOnly: true}\n",
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let table = EndpointTable::resolve(Arc::new(inventory), &root);
        let web_id = crate::sys::cgroup_id(&root.join("pods/web")).expect("inode");
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(table.monitored(), BTreeSet::from([CgroupId(web_id)]), "only the local endpoint with a cgroup is monitored");
        assert_eq!(table.index().get(web_id).map(|p| p.key().to_string()), Some("shop/web".into()));
        assert_eq!(table.unresolved().len(), 2, "{:?}", table.unresolved());
        assert!(table.unresolved()[0].starts_with("shop/pending ") || table.unresolved()[1].starts_with("shop/pending "));
        let remote = table.get(&"shop/remote".parse().expect("key")).expect("peer listed");
        assert!(remote.is_peer() && remote.cgroup_id().is_none());
        let gone = table.get(&"shop/gone".parse().expect("key")).expect("listed");
        assert_eq!(gone.placement, Placement::Local { cgroup: "pods/gone".into(), cgroup_id: None });
    }
}
