//! `amiprep-agent run`: the long-running daemon.

use std::{path::PathBuf, process::ExitCode};

use tokio::sync::watch;
use tracing::{error, info};

use crate::{config::AgentConfig, session::Agent};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Agent configuration file (TOML).
    #[arg(long, default_value = "/etc/amiprep/agent.toml")]
    pub config: PathBuf,
}

/// Logs go to stderr (journald under systemd); `AMIPREP_LOG` filters them.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMIPREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

pub fn run(args: RunArgs) -> ExitCode {
    init_logging();
    let config = match AgentConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let agent = match Agent::new(config) {
        Ok(a) => a,
        Err(e) => {
            error!("{}: {e:#}", args.config.display());
            return ExitCode::from(2);
        }
    };
    // One thread is plenty for one session and keeps the idle footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("stopping");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            let _ = tx.send(true);
        });
        agent.run(rx).await;
    });
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}
