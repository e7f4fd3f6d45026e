//! `amiprep-agent run`.

use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration file (TOML).
    #[arg(long, default_value = "/etc/amiprep/agent.toml")]
    pub config: PathBuf,
}

pub fn run(_args: RunArgs) -> ExitCode {
    ExitCode::from(2)
}
