//! `palisade lab ...`
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create a pod per inventory endpoint.
    Up,
}

pub fn run(cmd: LabCommand) -> anyhow::Result<()> {
    anyhow::bail!("lab {cmd:?}: not built yet")
}
