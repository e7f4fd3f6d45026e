//! `amiprep`: the controller and the operator CLI.
//!
//! Exit codes: 0 success, 1 runtime failure (e.g. the controller cannot be
//! reached), 2 usage or configuration error (systemd does not restart on 2).

use std::{path::PathBuf, process::ExitCode};

use amiprep_controller::{certs, client, config, server};
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Parser)]
#[command(name = "amiprep", version = amiprep_proto::VERSION, about = "Promote EC2 hosts to clean, verified AMIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Serve {
        /// Controller configuration (TOML).
        #[arg(long, default_value = "/etc/amiprep/controller.toml")]
        config: PathBuf,
        /// Accept agents' static identities (development only; unverified).
        #[arg(long)]
        allow_static_identities: bool,
    },
    /// Certificate authority for amiprep.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// List connected agents.
    Agents {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The controller's admin socket.
        #[arg(long, env = "AMIPREP_ADMIN_SOCKET", default_value_os_t = config::default_admin_socket())]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a controller, agent or operator certificate (NAME.pem, NAME.key).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        kind: certs::Kind,
        #[arg(long)]
        name: String,
        /// Extra subject alternative names (DNS names or IP addresses).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMIPREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Serve {
            config,
            allow_static_identities,
        } => serve(config, allow_static_identities),
        Command::Certs { command } => {
            let result = match command {
                CertsCommand::Init { dir, days } => {
                    certs::init(&dir, days).map(|p| format!("created CA {}", p.display()))
                }
                CertsCommand::Issue {
                    dir,
                    kind,
                    name,
                    sans,
                    days,
                } => certs::issue(&dir, kind, &name, &sans, days)
                    .map(|(c, k)| format!("issued {} (key {})", c.display(), k.display())),
            };
            match result {
                Ok(msg) => {
                    println!("{msg}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("amiprep certs: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Agents { json, socket } => {
            let out = runtime().and_then(|rt| rt.block_on(client::agents(socket, json)));
            match out {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("amiprep agents: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn serve(config_path: PathBuf, allow_static: bool) -> ExitCode {
    init_logging();
    let config = match config::ControllerConfig::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let prepared = match server::prepare(config, allow_static) {
        Ok(p) => p,
        Err(e) => {
            error!("{}: {e:#}", config_path.display());
            return ExitCode::from(2);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                info!("stopping");
                let _ = tx.send(true);
            }
        });
        server::serve(prepared, rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::from(1)
        }
    }
}
