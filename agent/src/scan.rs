//! Secret scanning (`amiprep-agent scan`, `rules list`). Not built yet.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ScanArgs {}

#[derive(Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// List the rules.
    List,
}

pub fn main(_args: ScanArgs) -> ExitCode {
    eprintln!("amiprep-agent: scan is not available in this build");
    ExitCode::from(2)
}

pub fn rules_main(_cmd: RulesCommand) -> ExitCode {
    eprintln!("amiprep-agent: rules is not available in this build");
    ExitCode::from(2)
}
