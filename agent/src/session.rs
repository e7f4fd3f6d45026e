//! The agent's outbound session with the controller.
//!
//! The agent dials out (hosts need no inbound port), proves which instance it
//! runs on in `Hello`, heartbeats, and reconnects with capped exponential
//! backoff and full jitter whenever the session is lost, so a fleet does not
//! reconnect in lockstep after a controller restart.

use std::{sync::Arc, time::Duration};

use amiprep_proto::{
    tls,
    v1::{
        AgentMessage, ControllerMessage, Heartbeat, Hello, Identity, InstanceIdentityDocument,
        StaticIdentity, agent_gateway_client::AgentGatewayClient, agent_message,
        controller_message, identity,
    },
};
use anyhow::{Context, anyhow};
use rand::Rng;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{error, info, warn};

use crate::{
    config::{AgentConfig, IdentitySource},
    imds::Imds,
    osinfo,
};

/// How long the controller has to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);
/// Missed heartbeat acknowledgements before the session counts as dead.
const SILENT_INTERVALS: u32 = 3;
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Why a session ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Everything `run` needs, prepared once at start-up so configuration
/// problems surface before the first dial.
pub struct Agent {
    config: AgentConfig,
    tls: Arc<rustls::ClientConfig>,
    addr: String,
    server_name: rustls::pki_types::ServerName<'static>,
    imds: Option<Imds>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        let tls = tls::client_config(&config.tls_files())?;
        let (host, port) = config.host_port().ok_or_else(|| {
            anyhow!(
                "controller address {:?} is not host:port",
                config.controller
            )
        })?;
        let name = config.server_name.clone().unwrap_or_else(|| host.clone());
        let server_name = tls::server_name(&name)?;
        let imds = match config.identity.source {
            IdentitySource::Imds => Some(Imds::new(&config.identity.imds_endpoint)?),
            IdentitySource::Static => None,
        };
        crate::requests::record_boot_identity(&config.root);
        crate::requests::record_own_key(&config.root, &config.tls.key);
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Agent {
            config,
            tls,
            addr,
            server_name,
            imds,
        })
    }

    /// Holds a session until `shutdown` turns true, reconnecting as needed.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let s = &self.config.session;
        let mut attempt: u32 = 0;
        let mut notified_ready = false;
        loop {
            let started = Instant::now();
            let result = self
                .session(&mut shutdown, &mut || {
                    if !notified_ready {
                        notified_ready = true;
                        notify_systemd(&[sd_notify::NotifyState::Ready]);
                    }
                })
                .await;
            match result {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Lost(why)) => warn!("session lost: {why}"),
                Err(e) => {
                    if let Some(status) = e.downcast_ref::<tonic::Status>()
                        && status.code() == tonic::Code::PermissionDenied
                    {
                        error!("controller refused this agent: {}", status.message());
                    } else {
                        warn!("session failed: {e:#}");
                    }
                }
            }
            if started.elapsed() >= STABLE_SESSION {
                attempt = 0;
            }
            let delay = backoff(attempt, s.reconnect_initial_ms, s.reconnect_max_ms);
            attempt = attempt.saturating_add(1);
            info!("reconnecting in {} ms", delay.as_millis());
            notify_systemd(&[sd_notify::NotifyState::Status("reconnecting to controller")]);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn hello(&self) -> anyhow::Result<Hello> {
        let identity = match &self.imds {
            Some(imds) => {
                let signed = imds
                    .signed_identity()
                    .await
                    .context("reading the instance identity from IMDS")?;
                let doc: serde_json::Value = serde_json::from_slice(&signed.document)
                    .context("the instance identity document is not JSON")?;
                let instance_id = doc["instanceId"]
                    .as_str()
                    .ok_or_else(|| anyhow!("the instance identity document has no instanceId"))?
                    .to_owned();
                Identity {
                    instance_id,
                    proof: Some(identity::Proof::Document(InstanceIdentityDocument {
                        document: signed.document,
                        pkcs7_der: signed.pkcs7_der,
                    })),
                }
            }
            None => {
                let id = &self.config.identity;
                Identity {
                    instance_id: id.instance_id.clone().unwrap_or_default(),
                    proof: Some(identity::Proof::StaticIdentity(StaticIdentity {
                        region: id.region.clone().unwrap_or_default(),
                        account_id: id.account_id.clone().unwrap_or_default(),
                    })),
                }
            }
        };
        Ok(Hello {
            agent_version: amiprep_proto::VERSION.to_owned(),
            identity: Some(identity),
            os: Some(osinfo::os_info(&self.config.root)),
            boot_id: osinfo::boot_id(),
            capabilities: vec!["prepare".into(), "verify".into()],
            hostname: osinfo::hostname(),
        })
    }

    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        on_connected: &mut dyn FnMut(),
    ) -> anyhow::Result<SessionEnd> {
        let hello = self.hello().await?;
        let channel = tls::connect(
            &self.addr,
            self.server_name.clone(),
            self.tls.clone(),
            Duration::from_millis(self.config.session.connect_timeout_ms),
        )
        .await
        .with_context(|| format!("connecting to controller {}", self.addr))?;
        let mut client = AgentGatewayClient::new(channel);
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        tx.send(message(agent_message::Msg::Hello(hello)))
            .await
            .context("queueing hello")?;
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(anyhow::Error::new)?
            .into_inner();
        let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
            Err(_) => return Ok(SessionEnd::Lost("no welcome from controller".into())),
            Ok(Err(status)) => return Err(anyhow::Error::new(status)),
            Ok(Ok(None)) => return Ok(SessionEnd::Lost("controller closed the session".into())),
            Ok(Ok(Some(ControllerMessage {
                msg: Some(controller_message::Msg::Welcome(w)),
            }))) => w,
            Ok(Ok(Some(other))) => {
                return Ok(SessionEnd::Lost(format!("expected welcome, got {other:?}")));
            }
        };
        info!(
            session = %welcome.session_id,
            instance = %welcome.instance_id,
            region = %welcome.region,
            "connected to controller {}", self.addr
        );
        on_connected();
        notify_systemd(&[sd_notify::NotifyState::Status("connected to controller")]);

        let interval = Duration::from_secs(u64::from(welcome.heartbeat_interval_secs.max(1)));
        // A random first delay spreads a fleet's heartbeats after a restart.
        let first = rand::rng().random_range(Duration::ZERO..=interval);
        let mut ticker = tokio::time::interval_at(Instant::now() + first, interval);
        let mut last_seen = Instant::now();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
                _ = ticker.tick() => {
                    if last_seen.elapsed() > interval * SILENT_INTERVALS + first {
                        return Ok(SessionEnd::Lost("controller stopped answering heartbeats".into()));
                    }
                    seq += 1;
                    let hb = Heartbeat { seq, sent_unix_ms: unix_ms() };
                    if tx.send(message(agent_message::Msg::Heartbeat(hb))).await.is_err() {
                        return Ok(SessionEnd::Lost("session stream closed".into()));
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        last_seen = Instant::now();
                        self.handle(m, &tx);
                    }
                    Ok(None) => return Ok(SessionEnd::Lost("controller closed the session".into())),
                    Err(status) => return Ok(SessionEnd::Lost(format!("{}: {}", status.code(), status.message()))),
                },
            }
        }
    }

    fn handle(&self, msg: ControllerMessage, tx: &mpsc::Sender<AgentMessage>) {
        let root = self.config.root.clone();
        let tx = tx.clone();
        match msg.msg {
            Some(controller_message::Msg::HeartbeatAck(_)) | None => {}
            Some(controller_message::Msg::Prepare(p)) => {
                info!(promotion = %p.promotion_id, "prepare requested");
                tokio::spawn(async move {
                    // One prepare at a time; a repeated request (after a
                    // reconnect) runs again, which is safe: every step is
                    // idempotent.
                    let _guard = PREPARE_LOCK.lock().await;
                    let id = p.promotion_id.clone();
                    let progress_tx = tx.clone();
                    let report = tokio::task::spawn_blocking(move || {
                        let mut last = std::time::Instant::now();
                        let id = p.promotion_id.clone();
                        crate::requests::prepare(
                            &root,
                            &p.promotion_id,
                            &p.policy_toml,
                            request_key(&p.fingerprint_key),
                            &mut |step, text| {
                                // Step boundaries always; per-action lines at most 5 per second.
                                let boundary = !text.starts_with('[');
                                if boundary
                                    || last.elapsed() >= std::time::Duration::from_millis(200)
                                {
                                    last = std::time::Instant::now();
                                    let _ = progress_tx.blocking_send(message(
                                        agent_message::Msg::Progress(amiprep_proto::v1::Progress {
                                            promotion_id: id.clone(),
                                            step: step.to_owned(),
                                            message: text,
                                            percent: 0,
                                        }),
                                    ));
                                }
                            },
                        )
                    })
                    .await
                    .unwrap_or_else(|e| amiprep_proto::v1::Report {
                        promotion_id: id,
                        error: format!("prepare panicked: {e}"),
                        ..Default::default()
                    });
                    info!(promotion = %report.promotion_id, ready = report.ready, "prepare finished");
                    let _ = tx.send(message(agent_message::Msg::Report(report))).await;
                });
            }
            Some(controller_message::Msg::Verify(v)) => {
                info!(promotion = %v.promotion_id, "verify requested");
                tokio::spawn(async move {
                    let id = v.promotion_id.clone();
                    let exp = v.expectations.unwrap_or_default();
                    let result = tokio::task::spawn_blocking(move || {
                        crate::verify::verify(
                            &root,
                            &v.promotion_id,
                            &exp,
                            request_key(&v.fingerprint_key),
                        )
                    })
                    .await
                    .unwrap_or_else(|e| amiprep_proto::v1::VerifyResult {
                        promotion_id: id,
                        error: format!("verify panicked: {e}"),
                        ..Default::default()
                    });
                    let _ = tx
                        .send(message(agent_message::Msg::VerifyResult(result)))
                        .await;
                });
            }
            Some(controller_message::Msg::Cancel(c)) => {
                warn!(promotion = %c.promotion_id, "cancel requested; a running prepare finishes its current step set");
            }
            Some(controller_message::Msg::Welcome(_)) => {}
        }
    }
}

/// The fingerprint key a request carries, held in memory for that request
/// only. None sent (or one too short): the scan uses a random key and says
/// so in its report.
fn request_key(bytes: &[u8]) -> Option<crate::scan::FingerprintKey> {
    if bytes.is_empty() {
        return None;
    }
    match crate::scan::FingerprintKey::from_bytes(bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            warn!("the controller's {e}; using a random key for this request");
            None
        }
    }
}

/// Serialises prepares: two at once on one host would fight over the same files.
static PREPARE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn message(msg: agent_message::Msg) -> AgentMessage {
    AgentMessage { msg: Some(msg) }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, initial * 2^attempt)]`,
/// never below a tenth of `initial` so a refusing controller is not hammered.
pub fn backoff(attempt: u32, initial_ms: u64, max_ms: u64) -> Duration {
    let ceiling = initial_ms
        .saturating_mul(1u64 << attempt.min(32))
        .min(max_ms);
    let floor = (initial_ms / 10).min(ceiling);
    Duration::from_millis(rand::rng().random_range(floor..=ceiling))
}

fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this is a no-op.
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("cannot notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_cap() {
        for attempt in 0..64 {
            let d = backoff(attempt, 500, 30_000);
            assert!(d <= Duration::from_millis(30_000), "{attempt}: {d:?}");
            assert!(d >= Duration::from_millis(50), "{attempt}: {d:?}");
        }
    }

    #[test]
    fn backoff_grows_then_caps() {
        // Ceiling for attempt 0 is the initial delay.
        for _ in 0..100 {
            assert!(backoff(0, 500, 30_000) <= Duration::from_millis(500));
        }
        // By attempt 10 the ceiling is the cap; over many draws some exceed 500 ms.
        let max = (0..200).map(|_| backoff(10, 500, 30_000)).max().unwrap();
        assert!(max > Duration::from_millis(500));
    }
}
