//! Endpoints: which pod is which, by the ids the other stages use.
//!
//! The endpoints stage is the one owner of "which cgroup is which pod": it turns each inventory
//! (from the file watcher or the Kubernetes source) into an [`EndpointTable`] and publishes it on
//! a `watch` channel. Enrichment, enforcement, quarantine and the probe host's monitored set all
//! read that table; nothing else resolves a cgroup. [`ids`] holds the typed ids ([`PodKey`],
//! [`CgroupId`], [`EndpointId`]) that cross module boundaries instead of strings and bare
//! integers.
pub mod ids;
pub mod table;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use ids::{BadPodKey, CgroupId, EndpointId, PodKey};
pub use table::{EndpointEntry, EndpointTable, Placement};

use crate::inventory::Inventory;

/// How often the stage looks again for cgroups that appeared or went without an inventory change
/// (a pod started after its inventory entry, or re-created).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(2);

/// The endpoints stage: resolves the first table before it returns, then keeps it current.
pub struct EndpointsStage;

impl EndpointsStage {
    /// Resolves the current inventory now (so every consumer starts from the same table) and
    /// spawns the task that re-resolves on each inventory change and every
    /// [`RESOLVE_INTERVAL`], publishing only a table that differs from the last.
    pub fn start(mut inventory: watch::Receiver<Arc<Inventory>>, cgroup_root: PathBuf) -> watch::Receiver<Arc<EndpointTable>> {
        let first = EndpointTable::resolve(inventory.borrow_and_update().clone(), &cgroup_root);
        for pod in first.unresolved() {
            tracing::warn!(%pod, "endpoint cgroup not found; will retry");
        }
        tracing::info!(endpoints = first.index().len(), "monitoring endpoints");
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            let mut retry = tokio::time::interval(RESOLVE_INTERVAL);
            loop {
                let source = tokio::select! {
                    changed = inventory.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        inventory.borrow_and_update().clone()
                    }
                    _ = retry.tick() => {
                        let current = tx.borrow().clone();
                        if !current.cgroups_changed(&cgroup_root) {
                            continue;
                        }
                        current.inventory().clone()
                    }
                };
                // Off the runtime's worker threads: a table of a large cluster takes a while,
                // and the watchers feeding the inventory must keep reading meanwhile.
                let root = cgroup_root.clone();
                let table = match tokio::task::spawn_blocking(move || EndpointTable::resolve(source, &root)).await {
                    Ok(table) => table,
                    Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                    Err(_) => return,
                };
                let published = tx.send_if_modified(|current| {
                    if **current == table {
                        return false;
                    }
                    tracing::info!(endpoints = table.index().len(), unresolved = table.unresolved().len(), "endpoints updated");
                    *current = Arc::new(table);
                    true
                });
                if !published && tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A pod's cgroup that appears, or goes, without any inventory change still reaches every
    /// consumer: the stage looks again by itself.
    #[tokio::test]
    async fn cgroups_that_appear_or_go_are_published_without_an_inventory_change() {
        let root = std::env::temp_dir().join(format!("palisade-stage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("root");
        let inventory = Inventory::parse(
            "endpoints:\n - {namespace: shop, name: web, ips: [198.18.0.1], cgroup: pods/web}\n",
            Path::new("inv.yaml"),
        )
        .expect("inventory");
        let (_inventory_tx, inventory_rx) = watch::channel(Arc::new(inventory));
        let mut tables = EndpointsStage::start(inventory_rx, root.clone());
        assert!(tables.borrow().monitored().is_empty());
        assert_eq!(tables.borrow().unresolved().len(), 1);

        std::fs::create_dir_all(root.join("pods/web")).expect("cgroup dir");
        let id = CgroupId(crate::sys::cgroup_id(&root.join("pods/web")).expect("inode"));
        let wait = RESOLVE_INTERVAL * 5;
        tokio::time::timeout(wait, tables.changed()).await.expect("published in time").expect("stage alive");
        let table = tables.borrow_and_update().clone();
        assert_eq!(table.monitored(), std::collections::BTreeSet::from([id]));
        assert!(table.unresolved().is_empty(), "{:?}", table.unresolved());

        std::fs::remove_dir(root.join("pods/web")).expect("rmdir");
        tokio::time::timeout(wait, tables.changed()).await.expect("published in time").expect("stage alive");
        let table = tables.borrow_and_update().clone();
        let _ = std::fs::remove_dir_all(&root);
        assert!(table.monitored().is_empty());
        assert_eq!(table.unresolved().len(), 1, "{:?}", table.unresolved());
    }
}
