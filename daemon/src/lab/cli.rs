//! `palisade lab ...`: local pods for trying policies and rules on one host.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Subcommand;

use super::{DEFAULT_LAB_NAME, DEFAULT_STATE_DIR, Lab, LabOptions, ProbeOptions};
use crate::inventory::{Inventory, Protocol};
use crate::output::{Cell, OutputFormat, Table};

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create (or reconcile) a pod per inventory endpoint: netns, veth on the lab bridge, cgroup.
    Up {
        /// Endpoint inventory (YAML).
        #[arg(long)]
        inventory: PathBuf,
        /// Lab name (several labs can coexist). `--name` is the old spelling.
        #[arg(long = "lab", alias = "name", default_value = DEFAULT_LAB_NAME)]
        name: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR, hide = true)]
        state_dir: PathBuf,
    },
    /// Run a command inside a pod (its netns and cgroup); exits with the command's status.
    Exec {
        /// The pod, as NAMESPACE/NAME.
        pod: String,
        #[arg(long, default_value = DEFAULT_LAB_NAME)]
        lab: String,
        #[arg(long, default_value = DEFAULT_STATE_DIR, hide = true)]
        state_dir: PathBuf,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Connect from every pod to every pod on a port and print what got through.
    Probe {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "TCP")]
        protocol: Protocol,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
        #[arg(long, default_value = DEFAULT_LAB_NAME)]
        lab: String,
        /// Per-connection timeout.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long, default_value = DEFAULT_STATE_DIR, hide = true)]
        state_dir: PathBuf,
    },
    /// Remove everything a lab created (also after a crash).
    Down {
        /// Lab name. `--name` is the old spelling.
        #[arg(long = "lab", alias = "name", default_value = DEFAULT_LAB_NAME, conflicts_with = "all")]
        name: String,
        /// Every lab on this host.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value = DEFAULT_STATE_DIR, hide = true)]
        state_dir: PathBuf,
    },
    /// List labs and their pods.
    List {
        #[arg(long, default_value = DEFAULT_STATE_DIR, hide = true)]
        state_dir: PathBuf,
    },
}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up { inventory, name, state_dir } => {
            let started = Instant::now();
            let inv = Inventory::load(&inventory)?;
            let lab = Lab::up(&inv, &LabOptions { name, state_dir })?;
            println!(
                "lab {}: {} pods up in {} ms (bridge in netns {})",
                lab.name(),
                lab.pods().len(),
                started.elapsed().as_millis(),
                lab.lab_netns()
            );
            let mut table = Table::new(&["POD", "NETNS", "CGROUP", "ADDRESSES"]);
            for pod in lab.pods() {
                let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
                table.push(vec![Cell::plain(&pod.key), Cell::plain(&pod.netns), Cell::plain(&pod.cgroup), Cell::plain(ips.join(" "))]);
            }
            print!("{}", indent(&table.render(false)));
            Ok(())
        }
        LabCommand::Exec { pod, lab, state_dir, command } => {
            let lab = Lab::open(&lab, &state_dir)?;
            let (program, args) = command.split_first().context("no command given")?;
            let status = lab
                .exec(&pod, program)?
                .args(args)
                .status()
                .with_context(|| format!("cannot run {program:?} in {pod}"))?;
            use std::os::unix::process::ExitStatusExt as _;
            let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            std::process::exit(code);
        }
        LabCommand::Probe { port, protocol, output, lab, timeout_ms, state_dir } => {
            let lab = Lab::open(&lab, &state_dir)?;
            let options = ProbeOptions { timeout: Duration::from_millis(timeout_ms) };
            let matrix = lab.probe_with(port, protocol, &options)?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string(&matrix)?),
                OutputFormat::Table => print!("{}", matrix.to_table()),
            }
            Ok(())
        }
        LabCommand::Down { name, all, state_dir } => {
            if all {
                let labs = super::down_all(&state_dir)?;
                println!("removed {} lab(s): {}", labs.len(), labs.join(" "));
            } else {
                let report = super::down(&name, &state_dir)?;
                println!(
                    "lab {name}: removed {} network namespaces and {} cgroups",
                    report.netns_removed.len(),
                    report.cgroups_removed.len()
                );
            }
            Ok(())
        }
        LabCommand::List { state_dir } => {
            for name in super::list(&state_dir)? {
                let lab = Lab::open(&name, &state_dir)?;
                println!("{name}: {} pods", lab.pods().len());
                let mut table = Table::new(&["POD", "NETNS"]);
                for pod in lab.pods() {
                    table.push(vec![Cell::plain(&pod.key), Cell::plain(&pod.netns)]);
                }
                print!("{}", indent(&table.render(false)));
            }
            Ok(())
        }
    }
}

/// A pod table under its lab's line.
fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}
