//! `palisade run`: wires the stages together (probes -> events -> rules -> responder/alerts).
use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Endpoint inventory (YAML). Default: the embedded lab example.
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// Rules directory. Default: the embedded default rule pack.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// NetworkPolicy directory. Default: the embedded example policies.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// State directory: API socket, alert log, quarantine set.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Write every event, as the rule engine receives it, to this JSONL file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::bail!("run {args:?}: not built yet")
}
