//! Where endpoints and policies come from: the Kubernetes API, or an inventory file and a
//! policy directory (the embedded examples by default).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::RunArgs;
use crate::inventory::Inventory;

/// Where the datapath is attached for every pod below it (`--pods-cgroup`).
pub(super) fn pods_parent(args: &RunArgs, cgroup_root: &Path, inventory: &Inventory) -> Option<PathBuf> {
    match args.pods_cgroup.as_str() {
        "none" => None,
        // Kubernetes: the kubelet's pods root of this node's pods (kubepods.slice, kubepods, or
        // below a kubelet --cgroup-root), else the one at the mount.
        "auto" if args.kubernetes => {
            let local = inventory.endpoints.iter().filter(|e| !e.peer_only).filter_map(|e| e.cgroup.as_deref());
            let found = crate::k8s::kubepods_parent(cgroup_root, local);
            if found.is_none() {
                tracing::warn!(
                    "no kubepods cgroup found (no pod of this node located yet, no kubepods.slice or kubepods at the cgroup2 mount): the datapath is attached per pod, so a pod created later passes until the sync after it appears; name the parent with --pods-cgroup"
                );
            }
            found.map(|rel| cgroup_root.join(rel))
        }
        "auto" => args.lab_name().map(|lab| cgroup_root.join(crate::lab::naming::default_cgroup_root(lab))),
        other => Some(cgroup_root.join(other.trim_start_matches('/'))),
    }
}

/// Where policies come from.
pub(super) enum PolicySource {
    Dir(PathBuf),
    Kube(tokio::sync::watch::Receiver<crate::segmentation::PolicySet>),
}

/// The endpoint and policy sources, kept alive for the daemon's lifetime.
pub(super) struct Sources {
    pub(super) inventory_rx: tokio::sync::watch::Receiver<std::sync::Arc<Inventory>>,
    pub(super) policies: PolicySource,
    pub(super) kube: Option<crate::k8s::KubeSource>,
    _inventory_watch: Option<crate::inventory::watch::InventoryWatch>,
}

impl Sources {
    pub(super) async fn start(args: &RunArgs, defaults_dir: &Path, cgroup_root: &Path) -> anyhow::Result<Sources> {
        if args.kubernetes {
            let node = args.node_name.clone().unwrap_or_else(crate::sys::hostname);
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let mut config = crate::k8s::SourceConfig::new(node, cgroup_root);
            config.peers = args.peers;
            let source = crate::k8s::KubeSource::start(client, config)
                .await
                .context("first sync with the Kubernetes API")?;
            return Ok(Sources {
                inventory_rx: source.inventory(),
                policies: PolicySource::Kube(source.policies()),
                kube: Some(source),
                _inventory_watch: None,
            });
        }
        let inventory_path = match &args.inventory {
            Some(path) => path.clone(),
            None => {
                std::fs::create_dir_all(defaults_dir)?;
                let path = defaults_dir.join("inventory.yaml");
                std::fs::write(&path, crate::defaults::DEFAULT_INVENTORY)?;
                path
            }
        };
        let watch = crate::inventory::watch::InventoryWatch::start(&inventory_path)
            .with_context(|| format!("inventory {}", inventory_path.display()))?;
        let policies_dir = match &args.policies {
            Some(dir) => dir.clone(),
            None => crate::defaults::materialize(&defaults_dir.join("policies"), crate::defaults::DEFAULT_POLICIES)?,
        };
        Ok(Sources {
            inventory_rx: watch.subscribe(),
            policies: PolicySource::Dir(policies_dir),
            kube: None,
            _inventory_watch: Some(watch),
        })
    }
}

impl Sources {
    /// `--lab`: a local lab pod for every inventory endpoint, brought up before anything
    /// resolves their cgroups (standalone demo mode).
    pub(super) fn bring_up_lab(&self, args: &RunArgs) -> anyhow::Result<()> {
        if let Some(lab_name) = args.lab_name() {
            let inventory = self.inventory_rx.borrow().clone();
            let lab = crate::lab::Lab::up(&inventory, &crate::lab::LabOptions::named(lab_name)).context("bringing up the lab")?;
            tracing::info!(lab = lab.name(), pods = lab.pods().len(), "lab is up");
        }
        Ok(())
    }
}
