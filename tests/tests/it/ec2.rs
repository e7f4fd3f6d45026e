//! With `[ec2]` configured, an agent counts as instance X only if EC2 (moto
//! here, through the real SDK) shows X exists and is running.

use std::time::Duration;

use amiprep_tests::{
    Agent, AgentIdentity, Controller, ControllerOpts, FakeImds, Moto, Pki, identity_key, imds,
};

use crate::client::{agent_tls, document_identity, hello, runtime};

#[test]
fn agent_is_admitted_only_for_a_running_instance() {
    let moto = Moto::start();
    let rt = runtime();
    let instance = rt.block_on(moto.run_instance());
    let pki = Pki::new();
    let controller = Controller::start(
        &pki,
        ControllerOpts {
            ec2_endpoint: Some(moto.endpoint()),
            ..Default::default()
        },
    );

    // A real agent on a real (moto) instance is admitted.
    let fake_imds = FakeImds::start(&pki, &instance, "aws-identity");
    let agent = Agent::start(
        &pki,
        controller.port,
        AgentIdentity::Imds(&fake_imds),
        "ec2",
    );
    assert!(
        controller.wait_agent(&instance, true, Duration::from_secs(30)),
        "agent log:\n{}\ncontroller log:\n{}",
        agent.proc.log_text(),
        controller.proc.log_text()
    );
    drop(agent);

    // A validly signed document for an instance EC2 does not know is refused.
    let ghost = "i-00000000000000bad";
    let doc = imds::document(ghost, "us-east-1", "123456789012");
    let sig = identity_key().sign(&doc).unwrap();
    let err = rt
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(ghost, doc, sig),
        ))
        .expect_err("unknown instance refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("does not exist"), "{err:?}");

    // Once the instance is stopped, its identity no longer gets a session.
    rt.block_on(
        moto.client()
            .stop_instances()
            .instance_ids(&instance)
            .send(),
    )
    .expect("StopInstances");
    let doc = imds::document(&instance, "us-east-1", "123456789012");
    let sig = identity_key().sign(&doc).unwrap();
    let err = rt
        .block_on(hello(
            controller.port,
            agent_tls(&pki, "agent"),
            document_identity(&instance, doc, sig),
        ))
        .expect_err("stopped instance refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not running"), "{err:?}");
}
