//! `AgentGateway`: admits agents whose identity verifies and keeps their
//! sessions alive.

use std::{pin::Pin, sync::Arc, time::Duration};

use amiprep_proto::v1::{
    AgentInfo, AgentMessage, ControllerMessage, HeartbeatAck, Hello, Welcome,
    agent_gateway_server::AgentGateway, agent_message, controller_message, identity,
};
use std::time::SystemTime;
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::{
    attest::DocumentVerifier,
    ec2::{Cloud, InstanceFacts},
    registry::{AgentEvent, Registry, SessionHandle, unix_ms},
};

pub struct Gateway {
    pub registry: Arc<Registry>,
    pub verifier: DocumentVerifier,
    pub allow_static: bool,
    pub heartbeat_interval: Duration,
    pub hello_timeout: Duration,
    /// When set, an agent's instance must exist and be running.
    pub cloud: Option<Arc<dyn Cloud>>,
    /// When set, an agent's identity must name this account.
    pub account: Option<String>,
}

/// Who an admitted agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedIdentity {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
    pub kind: &'static str,
}

/// The EC2 cross-check: a verified identity counts only for an instance
/// that exists, runs, and belongs to the account the identity names.
pub fn cross_check(
    who: &VerifiedIdentity,
    facts: Option<&InstanceFacts>,
    account: Option<&str>,
) -> Result<(), Status> {
    if let Some(account) = account
        && who.account_id != account
    {
        return Err(Status::permission_denied(format!(
            "instance {} is in account {:?}, not the configured account {account}",
            who.instance_id, who.account_id
        )));
    }
    let Some(facts) = facts else {
        return Err(Status::permission_denied(format!(
            "instance {} does not exist in {} (DescribeInstances)",
            who.instance_id, who.region
        )));
    };
    if facts.state != "running" {
        return Err(Status::permission_denied(format!(
            "instance {} is {}, not running",
            who.instance_id, facts.state
        )));
    }
    if let Some(owner) = &facts.owner_account
        && !who.account_id.is_empty()
        && owner != &who.account_id
    {
        return Err(Status::permission_denied(format!(
            "instance {} belongs to account {owner}, but its identity names {}",
            who.instance_id, who.account_id
        )));
    }
    Ok(())
}

impl Gateway {
    /// Verifies the claimed identity, then cross-checks it with EC2 when configured.
    pub async fn admit(&self, hello: &Hello) -> Result<VerifiedIdentity, Status> {
        let who = self.verify(hello)?;
        if let Some(cloud) = &self.cloud {
            let facts = cloud
                .describe_instance(&who.region, &who.instance_id)
                .await
                .map_err(|e| {
                    if e.is_retryable() {
                        Status::unavailable(format!("cannot check the instance now: {e}"))
                    } else {
                        Status::permission_denied(e.to_string())
                    }
                })?;
            cross_check(&who, facts.as_ref(), self.account.as_deref())?;
        }
        Ok(who)
    }

    /// Checks the identity claimed in `hello`; PERMISSION_DENIED when it does not hold.
    pub fn verify(&self, hello: &Hello) -> Result<VerifiedIdentity, Status> {
        let id = hello
            .identity
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("hello carries no identity"))?;
        if !valid_instance_id(&id.instance_id) {
            return Err(Status::invalid_argument(format!(
                "{:?} is not an EC2 instance id",
                id.instance_id
            )));
        }
        match &id.proof {
            Some(identity::Proof::Document(doc)) => {
                if self.verifier.is_empty() {
                    return Err(Status::permission_denied(
                        "no AWS certificates are configured (identity.aws_certificates); cannot verify instance identity documents",
                    ));
                }
                let signed = self
                    .verifier
                    .verify(&id.instance_id, &doc.document, &doc.pkcs7_der)
                    .map_err(|e| Status::permission_denied(e.to_string()))?;
                Ok(VerifiedIdentity {
                    instance_id: signed.instance_id,
                    region: signed.region,
                    account_id: signed.account_id,
                    kind: "instance-identity",
                })
            }
            Some(identity::Proof::StaticIdentity(s)) => {
                if !self.allow_static {
                    return Err(Status::permission_denied(
                        "static identities are not allowed; start the controller with --allow-static-identities for development",
                    ));
                }
                warn!(
                    instance = %id.instance_id,
                    "accepting an unverified static identity (development mode)"
                );
                Ok(VerifiedIdentity {
                    instance_id: id.instance_id.clone(),
                    region: s.region.clone(),
                    account_id: s.account_id.clone(),
                    kind: "static",
                })
            }
            None => Err(Status::permission_denied("hello carries no identity proof")),
        }
    }
}

/// `i-` followed by 8 or 17 lowercase hex digits.
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("i-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

fn to_agent(msg: controller_message::Msg) -> Result<ControllerMessage, Status> {
    Ok(ControllerMessage { msg: Some(msg) })
}

#[tonic::async_trait]
impl AgentGateway for Gateway {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let subject = request
            .peer_certs()
            .and_then(|c| amiprep_proto::tls::peer_subject(&c))
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.hello_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello in time"))??;
        let Some(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let who = match self.admit(&hello).await {
            Ok(w) => w,
            Err(status) => {
                warn!(%peer, %subject, "refused agent session: {}", status.message());
                return Err(status);
            }
        };
        let now = unix_ms(SystemTime::now());
        let session_id = uuid::Uuid::new_v4().to_string();
        let os = hello.os.clone().unwrap_or_default();
        let info = AgentInfo {
            session_id: session_id.clone(),
            instance_id: who.instance_id.clone(),
            region: who.region.clone(),
            account_id: who.account_id.clone(),
            hostname: hello.hostname.clone(),
            os: if os.pretty_name.is_empty() {
                format!("{} {}", os.id, os.version_id).trim().to_owned()
            } else {
                os.pretty_name
            },
            agent_version: hello.agent_version.clone(),
            connected_since_unix_ms: now,
            last_heartbeat_unix_ms: now,
            identity_kind: who.kind.to_owned(),
            peer_address: peer.clone(),
            certificate_subject: subject,
            controller: String::new(),
        };
        let (tx, rx) = mpsc::channel(16);
        tx.send(to_agent(controller_message::Msg::Welcome(Welcome {
            session_id: session_id.clone(),
            heartbeat_interval_secs: u32::try_from(self.heartbeat_interval.as_secs())
                .unwrap_or(u32::MAX),
            instance_id: who.instance_id.clone(),
            region: who.region.clone(),
        })))
        .await
        .map_err(|_| Status::cancelled("session closed"))?;
        let handle = self.registry.register_with(info, Some(tx.clone()));
        info!(instance = %who.instance_id, session = %session_id, %peer, identity = who.kind, "agent connected");
        tokio::spawn(run_session(self.registry.clone(), handle, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn run_session(
    registry: Arc<Registry>,
    handle: SessionHandle,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) {
    let reason = loop {
        tokio::select! {
            _ = handle.drop_signal.notified() => {
                let _ = tx.send(Err(Status::unavailable("session dropped by the controller (heartbeats stopped or replaced by a newer session)"))).await;
                break "dropped";
            }
            msg = inbound.message() => match msg {
                Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) })) => {
                    registry.heartbeat(&handle);
                    if tx.send(to_agent(controller_message::Msg::HeartbeatAck(HeartbeatAck { seq: hb.seq }))).await.is_err() {
                        break "stream closed";
                    }
                }
                Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Progress(p)) })) => {
                    registry.heartbeat(&handle);
                    hand_over(&registry, &handle, &p.promotion_id.clone(), AgentEvent::Progress(p));
                }
                Ok(Some(AgentMessage { msg: Some(agent_message::Msg::Report(r)) })) => {
                    registry.heartbeat(&handle);
                    hand_over(&registry, &handle, &r.promotion_id.clone(), AgentEvent::Report(r));
                }
                Ok(Some(AgentMessage { msg: Some(agent_message::Msg::VerifyResult(v)) })) => {
                    registry.heartbeat(&handle);
                    hand_over(&registry, &handle, &v.promotion_id.clone(), AgentEvent::Verify(v));
                }
                Ok(Some(_)) => registry.heartbeat(&handle),
                Ok(None) => break "agent closed the session",
                Err(_) => break "connection lost",
            },
        }
    };
    registry.remove(&handle);
    info!(instance = %handle.instance_id, session = %handle.session_id, "agent disconnected: {reason}");
}

/// Gives the registry an event from `from`'s session; what it refuses is
/// logged with the sending instance and counted.
fn hand_over(registry: &Registry, from: &SessionHandle, promotion_id: &str, event: AgentEvent) {
    let kind = event.kind();
    if let Err(refused) = registry.deliver(from, promotion_id, event) {
        let reason = refused.reason();
        crate::metrics::global()
            .agent_messages_refused
            .get_or_create(&crate::metrics::RefusedLabel {
                kind: kind.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        // A late answer from the right agent is ordinary; anything else is
        // an agent speaking for a promotion that is not its own.
        if matches!(refused, crate::registry::Refused::NobodyWaiting(_)) {
            info!(instance = %from.instance_id, session = %from.session_id, kind, "ignored agent message: {refused}");
        } else {
            warn!(instance = %from.instance_id, session = %from.session_id, kind, reason, "refused agent message: {refused}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> VerifiedIdentity {
        VerifiedIdentity {
            instance_id: "i-0123456789abcdef0".into(),
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
            kind: "instance-identity",
        }
    }

    fn facts(state: &str, owner: Option<&str>) -> InstanceFacts {
        InstanceFacts {
            instance_id: "i-0123456789abcdef0".into(),
            state: state.into(),
            owner_account: owner.map(str::to_owned),
        }
    }

    #[test]
    fn cross_check_requires_existing_running_instance_of_the_account() {
        assert!(cross_check(&who(), Some(&facts("running", Some("123456789012"))), None).is_ok());
        assert!(cross_check(&who(), Some(&facts("running", None)), Some("123456789012")).is_ok());
        let e =
            cross_check(&who(), Some(&facts("running", None)), Some("999999999999")).unwrap_err();
        assert!(e.message().contains("not the configured account"), "{e:?}");
        let e = cross_check(&who(), None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("does not exist"));
        let e = cross_check(&who(), Some(&facts("stopped", None)), None).unwrap_err();
        assert!(e.message().contains("stopped, not running"), "{e:?}");
        let e =
            cross_check(&who(), Some(&facts("running", Some("999999999999"))), None).unwrap_err();
        assert!(
            e.message().contains("belongs to account 999999999999"),
            "{e:?}"
        );
    }

    #[test]
    fn instance_ids() {
        assert!(valid_instance_id("i-0123456789abcdef0"));
        assert!(valid_instance_id("i-1234abcd"));
        assert!(!valid_instance_id("i-0123456789ABCDEF0"));
        assert!(!valid_instance_id("i-123"));
        assert!(!valid_instance_id("0123456789abcdef0"));
    }
}
