//! The `palisade` command line: the daemon (`run`) and the operator's tools.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "palisade", version, about = "eBPF runtime detection turned into network enforcement")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (standalone mode: inventory file, rules and policies directories).
    Run(palisade::daemon::RunArgs),
    /// Show what the running daemon is doing: programs, endpoints, counters.
    Status(palisade::api::client::StatusArgs),
    /// Alert history, live follow (--follow) and summaries, from the daemon or log files.
    Alerts(palisade::alerts::cli::AlertsArgs),
    /// Quarantined pods: list and release (through the daemon's API).
    #[command(subcommand)]
    Quarantine(palisade::api::client::QuarantineCommand),
    /// Local lab pods: network namespaces, veths, a bridge and cgroups on this host.
    #[command(subcommand)]
    Lab(palisade::lab::cli::LabCommand),
    /// NetworkPolicy tools: check, matrix, explain.
    #[command(subcommand)]
    Policy(palisade::segmentation::cli::PolicyCommand),
    /// Rego rule tools: check, test, replay.
    #[command(subcommand)]
    Rules(palisade::rules::cli::RulesCommand),
    /// Perform one real behaviour (test instrument for kernel and scenario tests).
    #[command(hide = true)]
    Workload {
        action: String,
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    palisade::logging::init();
    match cli.command {
        Command::Run(args) => palisade::daemon::run(args),
        Command::Status(args) => palisade::api::client::status(args),
        Command::Alerts(args) => palisade::alerts::cli::run(args),
        Command::Quarantine(cmd) => palisade::api::client::quarantine(cmd),
        Command::Lab(cmd) => palisade::lab::cli::run(cmd),
        Command::Policy(cmd) => palisade::segmentation::cli::run(cmd),
        Command::Rules(cmd) => palisade::rules::cli::run(cmd),
        Command::Workload { action, args } => Ok(palisade::workload::perform(&action, &args)?),
    }
}
