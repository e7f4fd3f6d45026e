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
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Promote an instance to a verified AMI; prints the promotion id.
    Promote(PromoteArgs),
    /// Show one promotion.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// List promotions.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Follow a promotion until it ends (exit 0 promoted, 1 otherwise).
    Watch {
        id: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Cancel a promotion; what it created is removed.
    Cancel {
        id: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(clap::Args)]
struct SocketArg {
    /// The controller's admin socket.
    #[arg(long, env = "AMIPREP_ADMIN_SOCKET", default_value_os_t = config::default_admin_socket())]
    socket: PathBuf,
}

#[derive(clap::Args)]
struct PromoteArgs {
    /// The source instance.
    instance_id: String,
    /// AMI name template: {date}, {time}, {instance}, {promotion}.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "")]
    description: String,
    /// Extra tag on the image and snapshots (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Preparation policy (TOML) sent to the agent; the agent's defaults otherwise.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Copy to another region, optionally encrypted with a KMS key there (repeatable).
    #[arg(long = "copy-to", value_name = "REGION[:KMS_KEY]")]
    copy_to: Vec<String>,
    /// Grant launch permission to an account (repeatable).
    #[arg(long = "share-with", value_name = "ACCOUNT")]
    share_with: Vec<String>,
    /// Deprecate the image this many days after promotion.
    #[arg(long = "deprecate-after", value_name = "DAYS", default_value_t = 0)]
    deprecate_after: u32,
    /// What to do with the source instance after promotion.
    #[arg(long, value_parser = ["stop", "start", "terminate"], default_value = "stop")]
    after: String,
    /// Skip the canary boot.
    #[arg(long)]
    no_canary: bool,
    /// Keep what was created when the promotion fails (and list it).
    #[arg(long)]
    keep_on_failure: bool,
    /// Follow progress; exit 0 when promoted, 1 when it failed.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    socket: SocketArg,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
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
            print_result("agents", block(client::agents(socket.socket, json)))
        }
        Command::Status { id, json, socket } => print_result(
            "status",
            block(client::promotions::status(socket.socket, id, json)),
        ),
        Command::List { json, socket } => {
            print_result("list", block(client::promotions::list(socket.socket, json)))
        }
        Command::Cancel { id, socket } => print_result(
            "cancel",
            block(client::promotions::cancel(socket.socket, id)),
        ),
        Command::Watch { id, socket } => {
            outcome("watch", block(client::promotions::watch(socket.socket, id)))
        }
        Command::Promote(args) => promote(args),
    }
}

fn block<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    runtime()?.block_on(f)
}

fn exit_for(what: &str, e: &anyhow::Error) -> ExitCode {
    eprintln!("amiprep {what}: {e:#}");
    if e.downcast_ref::<client::promotions::Usage>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

fn print_result(what: &str, r: anyhow::Result<String>) -> ExitCode {
    match r {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => exit_for(what, &e),
    }
}

fn outcome(what: &str, r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => exit_for(what, &e),
    }
}

fn promote(args: PromoteArgs) -> ExitCode {
    let policy_toml = match &args.policy {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("amiprep promote: {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => String::new(),
    };
    let copy_to = args
        .copy_to
        .iter()
        .map(|c| {
            let (region, kms) = c.split_once(':').unwrap_or((c.as_str(), ""));
            amiprep_proto::v1::RegionCopy {
                region: region.to_owned(),
                kms_key_id: kms.to_owned(),
            }
        })
        .collect();
    let req = amiprep_proto::v1::PromoteRequest {
        instance_id: args.instance_id,
        name_template: args.name,
        description: args.description,
        tags: args.tags.into_iter().collect(),
        policy_toml,
        copy_to,
        share_with: args.share_with,
        deprecate_after_days: args.deprecate_after,
        after: args.after,
        no_canary: args.no_canary,
        keep_on_failure: args.keep_on_failure,
    };
    outcome(
        "promote",
        block(client::promotions::promote(
            args.socket.socket,
            req,
            args.wait,
        )),
    )
}

fn serve(config_path: PathBuf, allow_static: bool) -> ExitCode {
    amiprep_proto::logging::init();
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
