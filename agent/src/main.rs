//! `amiprep-agent`: the on-host half of amiprep.
//!
//! Exit codes (documented in the README and relied on by the systemd unit):
//! 0 success / ready, 1 not ready or runtime failure, 2 usage, configuration
//! or policy error (systemd does not restart on 2).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use amiprep_agent::{cli, prepare, scan};

#[derive(Parser)]
#[command(name = "amiprep-agent", version = amiprep_proto::VERSION, about = "amiprep host agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Hold a session with the controller and act on its requests.
    Run(cli::RunArgs),
    /// Prepare this host (or a mounted root) for imaging.
    Prepare(prepare::PrepareArgs),
    /// Scan for credentials.
    Scan(scan::ScanArgs),
    /// Show the effective policy.
    Policy {
        #[command(subcommand)]
        command: prepare::PolicyCommand,
    },
    /// Secret-scanning rules.
    Rules {
        #[command(subcommand)]
        command: scan::RulesCommand,
    },
}

fn main() -> ExitCode {
    let args = match Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match args.command {
        Command::Run(a) => cli::run(a),
        Command::Prepare(a) => prepare::main(a),
        Command::Scan(a) => scan::main(a),
        Command::Policy { command } => prepare::policy_main(command),
        Command::Rules { command } => scan::rules_main(command),
    }
}
