//! A hand-driven agent session, for asserting exactly what the controller
//! answers to a given `Hello`.

use std::{sync::Arc, time::Duration};

use amiprep_proto::{
    tls,
    v1::{
        AgentMessage, Hello, Identity, InstanceIdentityDocument, StaticIdentity, Welcome,
        agent_gateway_client::AgentGatewayClient, agent_message, controller_message, identity,
    },
};
use amiprep_tests::Pki;
use tokio_stream::wrappers::ReceiverStream;

pub fn agent_tls(pki: &Pki, cert: &str) -> Arc<rustls::ClientConfig> {
    tls::client_config(&tls::TlsFiles {
        ca: pki.file("ca.pem"),
        cert: pki.file(&format!("{cert}.pem")),
        key: pki.file(&format!("{cert}.key")),
    })
    .expect("client TLS config")
}

pub fn document_identity(claimed: &str, document: Vec<u8>, pkcs7_der: Vec<u8>) -> Identity {
    Identity {
        instance_id: claimed.to_owned(),
        proof: Some(identity::Proof::Document(InstanceIdentityDocument {
            document,
            pkcs7_der,
        })),
    }
}

pub fn static_identity(instance: &str) -> Identity {
    Identity {
        instance_id: instance.to_owned(),
        proof: Some(identity::Proof::StaticIdentity(StaticIdentity {
            region: "us-east-1".into(),
            account_id: "123456789012".into(),
        })),
    }
}

/// Opens a session with `config`, sends `Hello{identity}`, and returns the
/// welcome or the status the first RPC failed with.
pub async fn hello(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    identity: Identity,
) -> Result<Welcome, tonic::Status> {
    let channel = tls::connect(
        &format!("127.0.0.1:{port}"),
        tls::server_name("127.0.0.1").expect("name"),
        config,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let mut client = AgentGatewayClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent_version: "test".into(),
            identity: Some(identity),
            ..Default::default()
        })),
    })
    .await
    .expect("queue hello");
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    let first = inbound.message().await?;
    // Keep the request stream open until the answer is read.
    drop(tx);
    match first {
        Some(m) => match m.msg {
            Some(controller_message::Msg::Welcome(w)) => Ok(w),
            other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
        },
        None => Err(tonic::Status::internal("stream ended without welcome")),
    }
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
