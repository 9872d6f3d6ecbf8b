//! Segmentation: NetworkPolicy compiler, identities, datapath map contents, and the eBPF datapath.
//!
//! The daemon keeps one [`Segmentation`]: it validates policy files (all or nothing; the last
//! good set stays on error), recompiles on policy or inventory changes with stable ids, and hands
//! the compiled contents to [`datapath::Datapath::sync`], which applies them as a diff (adds
//! before removes). [`lookup::lookup`] answers from the same contents with the kernel's logic.
use std::path::PathBuf;

pub mod cli;
pub mod compile;
pub mod conntrack;
pub mod datapath;
pub mod lookup;
pub mod matrix;
pub mod policy;

pub use compile::{Compiled, Compiler, compile};
pub use lookup::{Verdict, lookup};
pub use policy::{PolicyError, PolicySet};

use crate::inventory::Inventory;

/// The segmentation state the daemon owns: inventory, last good policy set, compiled contents.
#[derive(Debug, Clone, Default)]
pub struct Segmentation {
    compiler: Compiler,
    inventory: Inventory,
    policies: PolicySet,
    compiled: Compiled,
}

impl Segmentation {
    pub fn new(inventory: Inventory, policies: PolicySet) -> Segmentation {
        let mut s = Segmentation { compiler: Compiler::default(), inventory, policies, compiled: Compiled::default() };
        s.recompile();
        s
    }

    /// Loads and validates policy paths and, only if every document is valid, makes them the
    /// current set. On error nothing changes (the last good set stays) and the error names the
    /// file, document and field.
    pub fn reload_policies(&mut self, paths: &[PathBuf]) -> Result<&Compiled, PolicyError> {
        let set = PolicySet::load(paths)?;
        Ok(self.set_policies(set))
    }

    pub fn set_policies(&mut self, policies: PolicySet) -> &Compiled {
        self.policies = policies;
        self.recompile();
        &self.compiled
    }

    pub fn set_inventory(&mut self, inventory: Inventory) -> &Compiled {
        self.inventory = inventory;
        self.recompile();
        &self.compiled
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    fn recompile(&mut self) {
        self.compiled = self.compiler.compile(&self.inventory, &self.policies);
    }
}
