//! `amiprep serve`: the agent gateway on TCP (TLS 1.3, client certificates
//! required) and the admin API on a root-only Unix socket.

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Duration,
};

use amiprep_proto::v1::{
    FILE_DESCRIPTOR_SET, admin_server::AdminServer, agent_gateway_server::AgentGatewayServer,
};
use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpStream, UnixListener},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Server;
use tracing::{debug, info, warn};

use crate::{
    admin::AdminService, attest::DocumentVerifier, config::ControllerConfig, gateway::Gateway,
    registry::Registry,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything checked before serving; a failure here is a configuration error (exit 2).
pub struct Prepared {
    config: ControllerConfig,
    tls: Arc<rustls::ServerConfig>,
    verifier: DocumentVerifier,
    allow_static: bool,
}

pub fn prepare(config: ControllerConfig, allow_static_flag: bool) -> anyhow::Result<Prepared> {
    let tls = amiprep_proto::tls::server_config(&config.tls_files())?;
    let verifier = crate::attest::load_aws_certificates(&config.identity.aws_certificates)?;
    let allow_static = allow_static_flag || config.identity.allow_static;
    Ok(Prepared {
        config,
        tls,
        verifier,
        allow_static,
    })
}

pub async fn serve(p: Prepared, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let cfg = &p.config;
    if p.allow_static {
        warn!(
            "STATIC IDENTITIES ARE ALLOWED: any agent with a valid certificate can claim any instance. Development only."
        );
    }
    if p.verifier.is_empty() {
        warn!(
            "identity.aws_certificates is empty: agents proving identity with IMDS documents will be refused"
        );
    }
    let registry = Arc::new(Registry::default());
    let cloud: Option<Arc<dyn crate::cloud::Cloud>> = cfg
        .ec2
        .as_ref()
        .map(|e| Arc::new(crate::cloud::Ec2::new(e.clone())) as Arc<dyn crate::cloud::Cloud>);
    let pipeline: Option<Arc<crate::pipeline::Pipeline>> = match (&cloud, &cfg.ec2) {
        (Some(cloud), Some(ec2)) => {
            let owner = controller_id(cfg);
            let store = Arc::new(crate::store::Store::from_config(
                &cfg.store,
                &cfg.pipeline.state_db,
                &owner,
            )?);
            if store.shared() {
                info!(controller = %owner, lease_secs = cfg.store.lease_secs, "promotions shared with other controllers through PostgreSQL");
            }
            let p = crate::pipeline::Pipeline::new(
                store,
                cloud.clone(),
                registry.clone(),
                cfg.pipeline.clone(),
                ec2.region.clone(),
            );
            p.set_lease_secs(cfg.store.lease_secs);
            let resumed = p.resume_all()?;
            if resumed > 0 {
                info!("{resumed} unfinished promotion(s) to resume");
            }
            tokio::spawn(p.clone().coordinate());
            Some(p)
        }
        _ => {
            warn!("no [ec2] configuration: promotions are disabled");
            None
        }
    };
    let pipeline_store = pipeline.as_ref().map(|p| p.store.clone());
    let gateway = Gateway {
        registry: registry.clone(),
        verifier: p.verifier,
        allow_static: p.allow_static,
        heartbeat_interval: Duration::from_secs(cfg.sessions.heartbeat_interval_secs.into()),
        hello_timeout: Duration::from_secs(cfg.sessions.hello_timeout_secs.into()),
        cloud: cloud
            .clone()
            .filter(|_| cfg.ec2.as_ref().is_some_and(|e| e.verify_instances)),
        account: cfg.ec2.as_ref().and_then(|e| e.account_id.clone()),
    };

    let listener = TcpListener::bind(cfg.listen.agents)
        .await
        .with_context(|| format!("listening for agents on {}", cfg.listen.agents))?;
    let admin_listener = bind_admin_socket(&cfg.listen.admin_socket)?;
    info!(
        agents = %listener.local_addr()?,
        admin = %cfg.listen.admin_socket.display(),
        "controller listening"
    );

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentGatewayServer<Gateway>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .build_v1()
    };

    let agents_server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health.clone())
        .add_service(reflection()?)
        .add_service(AgentGatewayServer::new(gateway))
        .serve_with_incoming_shutdown(tls_incoming(listener, TlsAcceptor::from(p.tls)), {
            let mut s = shutdown.clone();
            async move {
                let _ = s.changed().await;
            }
        });
    let admin_server = Server::builder()
        .add_service(health)
        .add_service(reflection()?)
        .add_service(AdminServer::new(AdminService {
            registry: registry.clone(),
            pipeline: pipeline.clone(),
        }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(admin_listener), {
            let mut s = shutdown.clone();
            async move {
                let _ = s.changed().await;
            }
        });

    let metrics = {
        let registry = registry.clone();
        let store = pipeline_store.clone();
        let listen = cfg.metrics.listen;
        async move {
            let Some(addr) = listen else {
                return std::future::pending::<anyhow::Result<()>>().await;
            };
            let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                let m = crate::metrics::global();
                m.agents
                    .set(i64::try_from(registry.len()).unwrap_or(i64::MAX));
                if let Some(store) = &store
                    && let Ok(counts) = store.count_by_state()
                {
                    for s in crate::state::ALL {
                        let n = counts.iter().find(|(st, _)| *st == s).map_or(0, |c| c.1);
                        m.promotions
                            .get_or_create(&crate::metrics::StateLabel {
                                state: s.as_str().to_owned(),
                            })
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
            });
            crate::metrics::serve(addr, refresh).await
        }
    };
    let timeout = Duration::from_secs(cfg.sessions.heartbeat_timeout_secs.into());
    let reaper = {
        let registry = registry.clone();
        async move {
            let mut tick = tokio::time::interval(timeout / 4);
            loop {
                tick.tick().await;
                for id in registry.reap(timeout) {
                    warn!(instance = %id, "dropping agent session: no heartbeat for {timeout:?}");
                }
            }
        }
    };

    let result = tokio::select! {
        r = agents_server => r.context("agent gateway"),
        r = admin_server => r.context("admin API"),
        () = reaper => Ok(()),
        r = metrics => r.context("metrics listener"),
        _ = shutdown.changed() => Ok(()),
    };
    let _ = std::fs::remove_file(&cfg.listen.admin_socket);
    if let Some(p) = &pipeline {
        p.hand_back();
    }
    result
}

/// This controller's name in leases and published sessions: the
/// configured `store.controller_id`, else `local` for the embedded store
/// (one controller), else `HOSTNAME:AGENT_PORT`.
fn controller_id(cfg: &ControllerConfig) -> String {
    if let Some(id) = &cfg.store.controller_id {
        return id.clone();
    }
    if cfg.store.url.is_none() {
        return "local".to_owned();
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "controller".to_owned());
    format!("{host}:{}", cfg.listen.agents.port())
}

/// Binds the admin socket with mode 0600. A stale socket from a previous run
/// is replaced; any other file at that path is an error, never deleted.
fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    // The umask makes the socket 0600 from the moment it exists.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so a
/// slow or hostile client cannot hold up everyone else.
fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => info!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
