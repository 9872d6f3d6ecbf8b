//! Segmentation: NetworkPolicy compiler, identities, datapath map contents, and the eBPF datapath.
//!
//! The daemon keeps one [`Segmentation`]: it validates policy files document by document (a
//! rejected document or file keeps the last good version of what it held; the rest loads),
//! recompiles on policy or inventory changes with stable ids, and hands
//! the compiled contents to [`datapath::Datapath::sync`], which applies them as a diff (adds
//! before removes). [`lookup::lookup`] answers from the same contents with the kernel's logic.
use std::path::PathBuf;
use std::sync::Arc;

pub mod cli;
pub mod compile;
pub mod conntrack;
pub mod datapath;
pub mod lookup;
pub mod matrix;
pub mod policy;
pub mod reference;

pub use compile::{Capacity, Compiled, Compiler, OverCapacity, SyncHint, Usage, compile};
pub use lookup::{Verdict, lookup};
pub use policy::{PolicyError, PolicySet};

use serde::Serialize;

use crate::inventory::Inventory;

/// What loading the policy files did, beyond the policies in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyReport {
    /// Each rejected document or file, with the error naming file, document and field.
    pub rejected: Vec<String>,
    /// Policies (namespace/name) left at their last good version because their new one was
    /// rejected.
    pub kept_last_good: Vec<String>,
    /// Valid fields with no effect (rules of a direction policyTypes leaves out).
    pub ignored: Vec<String>,
    /// Directory entries not loaded, with the reason (another extension, a file with no
    /// Kubernetes object, a sub-directory): reported, never passed over silently.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// The loaded set did not fit the maps: rejected as a whole (the last good set stays), with
    /// the policy that tipped it and the counts.
    pub over_capacity: Option<String>,
}

impl PolicyReport {
    /// The report of a load (`loaded`) whose result in force is `set`.
    pub fn new(loaded: &policy::Loaded, set: &PolicySet, kept_last_good: Vec<String>) -> PolicyReport {
        PolicyReport {
            rejected: loaded.rejected.iter().map(|r| r.error.to_string()).collect(),
            kept_last_good,
            ignored: set.policies.iter().flat_map(|p| p.ignored.iter().cloned()).collect(),
            skipped: loaded.skipped.iter().map(|s| s.to_string()).collect(),
            over_capacity: None,
        }
    }
}

/// The segmentation state the daemon owns: inventory, last good policy set, compiled contents.
#[derive(Debug, Clone, Default)]
pub struct Segmentation {
    compiler: Compiler,
    /// Shared with the endpoint table it came from (never copied).
    inventory: Arc<Inventory>,
    policies: PolicySet,
    compiled: Arc<Compiled>,
    /// The policy files as last read: a reload reads and parses only the files that changed.
    policy_files: policy::PolicyFileCache,
}

impl Segmentation {
    pub fn new(inventory: impl Into<Arc<Inventory>>, policies: PolicySet) -> Segmentation {
        Segmentation::with_capacity(inventory, policies, Capacity::default())
    }

    /// Compiles into at most `capacity` entries per map. A set that does not fit at start is
    /// in force degraded (its pods isolated, the allows that fit): there is no last good set yet.
    pub fn with_capacity(inventory: impl Into<Arc<Inventory>>, policies: PolicySet, capacity: Capacity) -> Segmentation {
        let inventory = inventory.into();
        let mut s = Segmentation { compiler: Compiler::with_capacity(capacity), inventory, policies, compiled: Arc::default(), policy_files: Default::default() };
        s.recompile();
        s
    }

    /// Loads policy paths document by document and makes the result the current set: every
    /// valid policy, plus the last good version of each rejected one (see
    /// [`policy::Loaded::with_last_good`]). The report says what was rejected, kept and ignored.
    pub fn load_policies(&mut self, paths: &[PathBuf]) -> PolicyReport {
        let loaded = PolicySet::load_each_cached(paths, &mut self.policy_files);
        self.put_loaded(loaded)
    }

    /// The file cache of the load that gave the policies in force (the daemon loads them
    /// before the segmentation exists), so that the first reload reads only what changed.
    pub fn set_policy_file_cache(&mut self, cache: policy::PolicyFileCache) {
        self.policy_files = cache;
    }

    /// [`Segmentation::load_policies`] after the directory watcher reported changes to the
    /// entries `changed` of the one policy directory in `paths`: only those entries are looked
    /// at again (see [`PolicySet::load_dir_changed`]: no stat of every file), with the same
    /// result; when that does not apply, every path is loaded.
    pub fn load_policies_changed(&mut self, paths: &[PathBuf], changed: &[PathBuf]) -> PolicyReport {
        let loaded = match paths {
            [dir] => PolicySet::load_dir_changed(dir, changed, &mut self.policy_files),
            _ => None,
        };
        let loaded = loaded.unwrap_or_else(|| PolicySet::load_each_cached(paths, &mut self.policy_files));
        self.put_loaded(loaded)
    }

    fn put_loaded(&mut self, mut loaded: policy::Loaded) -> PolicyReport {
        let (set, kept_last_good) = loaded.with_last_good(&self.policies);
        let mut report = PolicyReport::new(&loaded, &set, kept_last_good);
        if let Err(over) = self.try_set_policies(set) {
            report.over_capacity = Some(over.to_string());
        }
        report
    }

    /// [`Segmentation::load_policies`], with the first rejection as the error (the valid rest
    /// and the last good versions are in force either way).
    pub fn reload_policies(&mut self, paths: &[PathBuf]) -> Result<&Compiled, PolicyError> {
        let mut loaded = PolicySet::load_each_cached(paths, &mut self.policy_files);
        let (set, _) = loaded.with_last_good(&self.policies);
        self.set_policies(set);
        match loaded.rejected.into_iter().next() {
            Some(r) => Err(r.error),
            None => Ok(&self.compiled),
        }
    }

    /// Puts `policies` in force if they fit the maps; otherwise the set is rejected as a whole
    /// and the last good set stays (recompiled against the current inventory).
    pub fn try_set_policies(&mut self, policies: PolicySet) -> Result<&Compiled, OverCapacity> {
        // A change of a few policies (the common case: one file written, one watch event) is
        // put into the contents in force in place, in time proportional to the change; it
        // applies only when the result fits, so it never needs undoing.
        if self.compiler.update_in_place(&self.inventory, &policies, &mut self.compiled) {
            self.compiler.in_force();
            self.policies = policies;
            return Ok(&self.compiled);
        }
        let compiled = self.compiler.compile(&self.inventory, &policies);
        if let Some(over) = compiled.over_capacity.clone() {
            return Err(over);
        }
        self.compiler.in_force();
        self.policies = policies;
        self.compiled = Arc::new(compiled);
        Ok(&self.compiled)
    }

    /// [`Segmentation::try_set_policies`], the contents in force either way (callers that
    /// report a rejection use `try_set_policies`).
    pub fn set_policies(&mut self, policies: PolicySet) -> &Compiled {
        let _ = self.try_set_policies(policies);
        &self.compiled
    }

    pub fn set_inventory(&mut self, inventory: impl Into<Arc<Inventory>>) -> &Compiled {
        self.inventory = inventory.into();
        self.recompile();
        &self.compiled
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The contents in force, shared (the datapath sync takes them to the eBPF owner task
    /// without copying every entry).
    pub fn compiled_shared(&self) -> Arc<Compiled> {
        self.compiled.clone()
    }

    /// A compile of the current inventory and policies from scratch (same ids, no part kept
    /// from earlier compiles): what the incremental contents must equal. For tests and checks.
    pub fn full_compile(&self) -> Compiled {
        self.compiler.without_cache().compile(&self.inventory, &self.policies)
    }

    pub fn capacity(&self) -> Capacity {
        self.compiler.capacity()
    }

    /// How many policies the last compile compiled (the rest it reused: see
    /// [`Compiler::parts_compiled`]).
    pub fn parts_compiled(&self) -> usize {
        self.compiler.parts_compiled()
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    fn recompile(&mut self) {
        self.compiled = Arc::new(self.compiler.compile(&self.inventory, &self.policies));
        self.compiler.in_force();
    }
}
