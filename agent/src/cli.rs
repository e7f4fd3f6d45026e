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

pub fn run(args: RunArgs) -> ExitCode {
    amiprep_proto::logging::init();
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
