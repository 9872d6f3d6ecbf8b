//! `palisade rules ...`
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Compile and lint a rules directory.
    Check,
}

pub fn run(cmd: RulesCommand) -> anyhow::Result<()> {
    anyhow::bail!("rules {cmd:?}: not built yet")
}
