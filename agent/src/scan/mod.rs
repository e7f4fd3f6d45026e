//! Secret scanning (`amiprep-agent scan`, `rules list`).

pub mod engine;
pub mod rules;

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ScanArgs {}

#[derive(Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// List the rules.
    List,
}

pub fn main(_args: ScanArgs) -> ExitCode {
    ExitCode::from(2)
}

pub fn rules_main(_cmd: RulesCommand) -> ExitCode {
    ExitCode::from(2)
}
