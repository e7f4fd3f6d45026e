//! Host preparation (`amiprep-agent prepare`, `policy show`). Not built yet.

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the effective policy.
    Show,
}

pub fn main(_args: PrepareArgs) -> ExitCode {
    eprintln!("amiprep-agent: prepare is not available in this build");
    ExitCode::from(2)
}

pub fn policy_main(_cmd: PolicyCommand) -> ExitCode {
    eprintln!("amiprep-agent: policy is not available in this build");
    ExitCode::from(2)
}
