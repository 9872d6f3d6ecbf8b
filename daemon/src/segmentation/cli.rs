//! `palisade policy ...`
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Validate policy files.
    Check,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<()> {
    anyhow::bail!("policy {cmd:?}: not built yet")
}
