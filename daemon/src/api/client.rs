//! Client side of the API, used by the CLI.
use clap::Args;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The daemon's state directory (its API socket lives there).
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: std::path::PathBuf,
    /// Output format.
    #[arg(short = 'o', long, default_value = "table")]
    pub output: String,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("status {args:?}: not built yet")
}
