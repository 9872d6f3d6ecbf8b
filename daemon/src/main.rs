//! The `palisade` command line: the daemon (`run`) and the operator's tools.
use std::sync::LazyLock;

use clap::{CommandFactory as _, Parser, Subcommand};

/// `palisade --version`: the crate version, the git revision built and the SHA-256 of the
/// embedded eBPF object, so an operator can tell which programs a binary loads.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let digest = ring::digest::digest(&ring::digest::SHA256, palisade::probes::object::PROBES_OBJECT);
    let hash: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{} (git {}, eBPF object sha256 {hash})",
        env!("CARGO_PKG_VERSION"),
        env!("PALISADE_GIT_REVISION")
    )
});

#[derive(Parser)]
#[command(name = "palisade", version = VERSION.as_str(), about = "eBPF runtime detection turned into network enforcement")]
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
    Alerts(palisade::api::alerts_cli::AlertsArgs),
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
    /// Print a shell completion script (e.g. `palisade completions bash > /etc/bash_completion.d/palisade`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `palisade man | man -l -`.
    Man,
    /// The cluster-wide view from the Kubernetes API (alerts, quarantines); also installed as
    /// the kubectl plugin `kubectl-palisade` (`kubectl palisade ...`).
    Kubectl(palisade::k8s::plugin::PluginCli),
    /// Publish every Pod of the cluster as PeerSlice records for agents run with `--peers
    /// slices` (replicas elect a leader on a Lease; deploy/operator/).
    Operator(palisade::k8s::operator::OperatorArgs),
    /// Mount bpffs at DIR unless it is there (the DaemonSet's init container, which shares the
    /// mount with the host so pins outlive the pod).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        dir: std::path::PathBuf,
    },
    /// Perform one real behaviour (test instrument for kernel and scenario tests).
    #[command(hide = true)]
    Workload {
        action: String,
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    // Linked or installed as `kubectl-palisade`, the binary is a kubectl plugin.
    let invoked_as = std::env::args_os().next().map(std::path::PathBuf::from);
    if invoked_as.as_deref().and_then(|p| p.file_name()).is_some_and(|n| n == "kubectl-palisade") {
        use clap::Parser as _;
        palisade::logging::init();
        return palisade::k8s::plugin::run(palisade::k8s::plugin::PluginCli::parse());
    }
    let cli = Cli::parse();
    palisade::logging::init();
    match cli.command {
        Command::Run(args) => palisade::daemon::run(args),
        Command::Status(args) => palisade::api::client::status(args),
        Command::Alerts(args) => palisade::api::alerts_cli::run(args),
        Command::Quarantine(cmd) => palisade::api::client::quarantine(cmd),
        Command::Lab(cmd) => palisade::lab::cli::run(cmd),
        Command::Policy(cmd) => palisade::segmentation::cli::run(cmd),
        Command::Rules(cmd) => palisade::rules::cli::run(cmd),
        Command::Operator(args) => palisade::daemon::operator::run(args),
        Command::Kubectl(cli) => palisade::k8s::plugin::run(cli),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "palisade", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?),
        Command::MountBpffs { dir } => {
            let outcome = palisade::sys::mount_bpffs(&dir)?;
            println!("{outcome}");
            Ok(())
        }
        Command::Workload { action, args } => Ok(palisade::workload::perform(&action, &args)?),
    }
}
