//! The controller admits an agent only for the instance it can prove it is.

use std::time::Duration;

use amiprep_tests::{
    Agent, AgentIdentity, Controller, ControllerOpts, FakeImds, Pki, identity_key, imds,
};

use crate::client::{agent_tls, document_identity, hello, runtime, static_identity};

const INSTANCE: &str = "i-0123456789abcdef0";
const OTHER: &str = "i-0fedcba9876543210";

#[test]
fn signed_document_is_admitted_and_identity_comes_from_it() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    let doc = imds::document(INSTANCE, "eu-west-1", "210987654321");
    let sig = identity_key().sign(&doc).unwrap();
    let welcome = runtime()
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(INSTANCE, doc, sig),
        ))
        .expect("a correctly signed document is admitted");
    assert_eq!(welcome.instance_id, INSTANCE);
    assert_eq!(welcome.region, "eu-west-1");
}

#[test]
fn document_with_bad_signature_is_refused() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    let stranger = imds::SigningKey::generate("not aws").unwrap();
    let doc = imds::document(INSTANCE, "us-east-1", "123456789012");
    let sig = stranger.sign(&doc).unwrap();
    let err = runtime()
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(INSTANCE, doc.clone(), sig),
        ))
        .expect_err("a document signed by an unknown key is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("does not verify"), "{err:?}");

    // A valid signature over a document that was then altered is refused too.
    let sig = identity_key().sign(&doc).unwrap();
    let mut tampered = doc.clone();
    let pos = tampered.iter().position(|&b| b == b'1').unwrap();
    tampered[pos] = b'9';
    let err = runtime()
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(INSTANCE, tampered, sig.clone()),
        ))
        .expect_err("an altered document is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // And a corrupted signature.
    let mut broken = sig;
    let last = broken.len() - 1;
    broken[last] ^= 0xff;
    let err = runtime()
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(INSTANCE, doc, broken),
        ))
        .expect_err("a corrupted signature is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(controller.agents().is_empty());
}

#[test]
fn document_for_another_instance_is_refused() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    let doc = imds::document(OTHER, "us-east-1", "123456789012");
    let sig = identity_key().sign(&doc).unwrap();
    let err = runtime()
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(INSTANCE, doc, sig),
        ))
        .expect_err("claiming another instance is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(OTHER) && err.message().contains(INSTANCE),
        "{err:?}"
    );
    assert!(controller.agents().is_empty());
}

#[test]
fn agent_with_imds_signed_by_unknown_key_never_registers() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    imds::SigningKey::generate("rogue")
        .unwrap()
        .write(pki.path(), "rogue")
        .unwrap();
    let rogue = FakeImds::start(&pki, INSTANCE, "rogue");
    let agent = Agent::start(&pki, controller.port, AgentIdentity::Imds(&rogue), "rogue");
    let refused = amiprep_tests::wait_for(Duration::from_secs(15), || {
        agent
            .proc
            .log_text()
            .contains("controller refused this agent")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", agent.proc.log_text());
    assert!(controller.agents().is_empty());
    assert!(controller.proc.log_text().contains("refused agent session"));
}

#[test]
fn static_identity_needs_the_development_flag() {
    let pki = Pki::new();
    let strict = Controller::start(&pki, ControllerOpts::default());
    let err = runtime()
        .block_on(hello(
            strict.port,
            agent_tls(&pki, "agent"),
            static_identity(INSTANCE),
        ))
        .expect_err("static identity refused by default");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("--allow-static-identities"),
        "{err:?}"
    );
    // The real agent with a static identity is refused as well.
    let agent = Agent::start(
        &pki,
        strict.port,
        AgentIdentity::Static {
            instance_id: INSTANCE,
        },
        "static",
    );
    let refused = amiprep_tests::wait_for(Duration::from_secs(15), || {
        agent
            .proc
            .log_text()
            .contains("static identities are not allowed")
            .then_some(())
    });
    assert!(refused.is_some(), "{}", agent.proc.log_text());
    assert!(strict.agents().is_empty());
    drop(agent);
    drop(strict);

    let pki = Pki::new();
    let dev = Controller::start(
        &pki,
        ControllerOpts {
            allow_static: true,
            ..Default::default()
        },
    );
    assert!(
        dev.proc
            .log_text()
            .contains("STATIC IDENTITIES ARE ALLOWED")
    );
    let _agent = Agent::start(
        &pki,
        dev.port,
        AgentIdentity::Static {
            instance_id: INSTANCE,
        },
        "static",
    );
    assert!(dev.wait_agent(INSTANCE, true, Duration::from_secs(20)));
    assert_eq!(dev.agents()[0]["identity"], "static");
}
