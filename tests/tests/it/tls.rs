//! Only clients with a certificate from the amiprep CA, over TLS, get in.

use std::{sync::Arc, time::Duration};

use amiprep_proto::v1::{AgentMessage, agent_gateway_client::AgentGatewayClient};
use amiprep_tests::{Controller, ControllerOpts, Pki};
use rustls::pki_types::pem::PemObject;

use crate::client::{agent_tls, hello, runtime, static_identity};

const INSTANCE: &str = "i-0123456789abcdef0";

fn dev_controller(pki: &Pki) -> Controller {
    // Static identities allowed, so only TLS can be what refuses a client.
    Controller::start(
        pki,
        ControllerOpts {
            allow_static: true,
            ..Default::default()
        },
    )
}

#[test]
fn client_with_amiprep_certificate_is_admitted() {
    let pki = Pki::new();
    let c = dev_controller(&pki);
    runtime()
        .block_on(hello(
            c.port,
            agent_tls(&pki, "agent"),
            static_identity(INSTANCE),
        ))
        .expect("control: a proper client is admitted");
}

#[test]
fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let c = dev_controller(&pki);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.file("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(amiprep_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let err = runtime()
        .block_on(hello(c.port, Arc::new(config), static_identity(INSTANCE)))
        .expect_err("no client certificate is refused");
    assert_ne!(err.code(), tonic::Code::Ok);
    assert!(c.agents().is_empty());
}

#[test]
fn client_with_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let c = dev_controller(&pki);
    // A second, unrelated CA issues a client certificate with the same name;
    // the client still trusts the real CA for the server.
    let other = Pki::new();
    std::fs::copy(other.file("agent.pem"), pki.file("foreign.pem")).unwrap();
    std::fs::copy(other.file("agent.key"), pki.file("foreign.key")).unwrap();
    let err = runtime()
        .block_on(hello(
            c.port,
            agent_tls(&pki, "foreign"),
            static_identity(INSTANCE),
        ))
        .expect_err("a foreign client certificate is refused");
    assert_ne!(err.code(), tonic::Code::Ok);
    assert!(c.agents().is_empty());
    assert!(
        amiprep_tests::wait_for(Duration::from_secs(5), || c
            .proc
            .log_text()
            .contains("TLS handshake refused")
            .then_some(()))
        .is_some(),
        "{}",
        c.proc.log_text()
    );
}

#[test]
fn plaintext_client_is_refused() {
    let pki = Pki::new();
    let c = dev_controller(&pki);
    let port = c.port;
    let result: Result<(), String> = runtime().block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = AgentGatewayClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
        drop(tx);
        client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|_| ())
            .map_err(|s| format!("{s}"))
    });
    let err = result.expect_err("plaintext h2c is refused");
    assert!(!err.is_empty());
    assert!(c.agents().is_empty());
}

#[test]
fn controller_certificate_is_checked_by_the_client() {
    // A client that trusts another CA refuses our controller.
    let pki = Pki::new();
    let c = dev_controller(&pki);
    let other = Pki::new();
    let err = runtime()
        .block_on(hello(
            c.port,
            agent_tls(&other, "agent"),
            static_identity(INSTANCE),
        ))
        .expect_err("unknown server CA");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}
