//! `palisade policy ...`: check, matrix, explain.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use super::compile::compile;
use super::matrix::{explain, matrix, table};
use super::policy::PolicySet;
use crate::inventory::{Inventory, Protocol};
use crate::output::OutputFormat as Output;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate NetworkPolicy files or directories; errors name the file, document and field.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Also compile against this inventory and report the map entries the set needs
        /// against the maps' sizes (an error when it does not fit, naming the policy that
        /// tipped it).
        #[arg(long)]
        inventory: Option<PathBuf>,
    },
    /// Reachability between every ordered pair of endpoints, from the compiled datapath maps.
    Matrix {
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        policies: Vec<PathBuf>,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: Protocol,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
    /// The verdict for one pair and why: policies selecting each side, the rule that allowed it.
    Explain {
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        policies: Vec<PathBuf>,
        /// NAMESPACE/POD
        #[arg(long)]
        from: String,
        /// NAMESPACE/POD
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: Protocol,
        #[arg(short = 'o', long = "output", value_enum, default_value_t)]
        output: Output,
    },
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { paths, inventory } => {
            let loaded = PolicySet::load_each(&paths);
            let set = &loaded.set;
            for p in &set.policies {
                let types = match (p.ingress_isolation, p.egress_isolation) {
                    (true, true) => "Ingress,Egress",
                    (true, false) => "Ingress",
                    (false, true) => "Egress",
                    (false, false) => "-",
                };
                println!("ok  {}  policyTypes={types}  ({})", p.key(), p.source);
                for warning in &p.ignored {
                    println!("warning: {warning}");
                }
            }
            for r in &loaded.rejected {
                println!("error: {}", r.error);
            }
            for skipped in &loaded.skipped {
                println!("note: {skipped}");
            }
            println!("{} policies valid, {} rejected", set.policies.len(), loaded.rejected.len());
            if let Some(inventory) = inventory {
                let compiled = compile(&Inventory::load(&inventory)?, set);
                println!("map entries: {}", compiled.usage);
                if let Some(over) = &compiled.over_capacity {
                    anyhow::bail!("{over}");
                }
            }
            if !loaded.rejected.is_empty() {
                anyhow::bail!("{} policy document(s) rejected", loaded.rejected.len());
            }
            Ok(())
        }
        PolicyCommand::Matrix { inventory, policies, port, protocol, output } => {
            let inv = Inventory::load(&inventory)?;
            let set = PolicySet::load(&policies)?;
            let m = matrix(&compile(&inv, &set), protocol, port);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&m)?),
                Output::Table => print!("{}", table(&m)),
            }
            Ok(())
        }
        PolicyCommand::Explain { inventory, policies, from, to, port, protocol, output } => {
            let inv = Inventory::load(&inventory)?;
            let set = PolicySet::load(&policies)?;
            let compiled = compile(&inv, &set);
            let a = compiled.endpoint_by_key(&from).with_context(|| format!("{from}: no such endpoint in {}", inventory.display()))?;
            let b = compiled.endpoint_by_key(&to).with_context(|| format!("{to}: no such endpoint in {}", inventory.display()))?;
            let e = explain(&compiled, a, b, protocol, port);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
                Output::Table => {
                    println!("{} -> {} {}/{}: {}", e.from, e.to, e.protocol, e.port, if e.allowed { "ALLOWED" } else { "DENIED" });
                    let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
                    println!("  egress policies selecting {}: {}", e.from, list(&e.egress_policies));
                    println!("  ingress policies selecting {}: {}", e.to, list(&e.ingress_policies));
                    for f in &e.families {
                        println!("  {} -> {}: {}", f.src, f.dst, if f.allowed { "allowed" } else { "denied" });
                        println!("    {}", f.egress);
                        println!("    {}", f.ingress);
                    }
                    for n in &e.named_ports {
                        println!("  named port: {n}");
                    }
                }
            }
            Ok(())
        }
    }
}
