//! Agents registering, heartbeating, being dropped and reconnecting.

use std::time::Duration;

use amiprep_tests::{Agent, AgentIdentity, Controller, ControllerOpts, FakeImds, Pki, wait_for};

const INSTANCE: &str = "i-0123456789abcdef0";

#[test]
fn agent_with_valid_certificate_and_identity_is_listed() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    let imds = FakeImds::start(&pki, INSTANCE, "aws-identity");
    let agent = Agent::start(&pki, controller.port, AgentIdentity::Imds(&imds), "a");
    assert!(
        controller.wait_agent(INSTANCE, true, Duration::from_secs(20)),
        "agent never registered\nagent log:\n{}\ncontroller log:\n{}",
        agent.proc.log_text(),
        controller.proc.log_text()
    );
    let agents = controller.agents();
    assert_eq!(agents.len(), 1, "{agents:?}");
    let a = &agents[0];
    assert_eq!(a["instance_id"], INSTANCE);
    assert_eq!(a["region"], "us-east-1");
    assert_eq!(a["account_id"], "123456789012");
    assert_eq!(a["identity"], "instance-identity");
    assert_eq!(a["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        a["certificate_subject"]
            .as_str()
            .is_some_and(|s| s.contains("OU=amiprep-agent") && s.contains("CN=agent")),
        "{a}"
    );
    assert!(
        !a["hostname"].as_str().unwrap_or_default().is_empty(),
        "{a}"
    );
    for key in ["connected_since", "last_heartbeat"] {
        let t = a[key].as_str().unwrap_or_default();
        assert!(t.len() >= 20 && t.contains('T'), "{key} = {t:?}");
    }

    // The plain listing shows the same agent.
    let out = amiprep_tests::run(
        std::process::Command::new(amiprep_tests::bin("amiprep"))
            .args(["agents", "--socket"])
            .arg(&controller.socket),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("INSTANCE"), "{text}");
    assert!(text.contains(INSTANCE), "{text}");

    // Heartbeats keep the session's last_heartbeat moving.
    let first = a["last_heartbeat"].as_str().unwrap_or_default().to_owned();
    let moved = wait_for(Duration::from_secs(10), || {
        let now = controller.agents();
        let t = now.first()?["last_heartbeat"].as_str()?.to_owned();
        (t != first).then_some(())
    });
    assert!(moved.is_some(), "last_heartbeat never advanced");
}

#[test]
fn agent_stops_cleanly_on_sigterm_and_is_removed() {
    let pki = Pki::new();
    let controller = Controller::start(&pki, ControllerOpts::default());
    let imds = FakeImds::start(&pki, INSTANCE, "aws-identity");
    let mut agent = Agent::start(&pki, controller.port, AgentIdentity::Imds(&imds), "a");
    assert!(controller.wait_agent(INSTANCE, true, Duration::from_secs(20)));
    agent.proc.signal("TERM");
    let status = agent
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        controller.wait_agent(INSTANCE, false, Duration::from_secs(10)),
        "closed session still listed"
    );
}

#[test]
fn silent_agent_is_dropped_after_heartbeat_timeout() {
    let pki = Pki::new();
    let controller = Controller::start(
        &pki,
        ControllerOpts {
            heartbeat_interval_secs: 1,
            heartbeat_timeout_secs: 3,
            ..Default::default()
        },
    );
    let imds = FakeImds::start(&pki, INSTANCE, "aws-identity");
    let agent = Agent::start(&pki, controller.port, AgentIdentity::Imds(&imds), "a");
    assert!(controller.wait_agent(INSTANCE, true, Duration::from_secs(20)));
    // Freeze the agent: its TCP connection stays open but heartbeats stop.
    agent.proc.signal("STOP");
    let dropped = controller.wait_agent(INSTANCE, false, Duration::from_secs(15));
    agent.proc.signal("CONT");
    assert!(
        dropped,
        "frozen agent still listed\n{}",
        controller.proc.log_text()
    );
    assert!(
        controller.proc.log_text().contains("no heartbeat"),
        "{}",
        controller.proc.log_text()
    );
    // Thawed, it notices and comes back.
    assert!(controller.wait_agent(INSTANCE, true, Duration::from_secs(20)));
}

#[test]
fn agent_reconnects_after_controller_restart_within_backoff_cap() {
    let pki = Pki::new();
    let mut controller = Controller::start(&pki, ControllerOpts::default());
    let imds = FakeImds::start(&pki, INSTANCE, "aws-identity");
    let agent = Agent::start(&pki, controller.port, AgentIdentity::Imds(&imds), "a");
    assert!(controller.wait_agent(INSTANCE, true, Duration::from_secs(20)));
    for round in 0..2 {
        controller.restart(&pki);
        // Backoff cap is 2 s in the test agent config; allow for the agent
        // noticing the loss (at most 3 heartbeat intervals) plus the cap.
        let start = std::time::Instant::now();
        assert!(
            controller.wait_agent(INSTANCE, true, Duration::from_secs(12)),
            "round {round}: agent did not reconnect\nagent log:\n{}",
            agent.proc.log_text()
        );
        eprintln!("round {round}: reconnected after {:?}", start.elapsed());
    }
    assert!(agent.proc.log_text().contains("reconnecting in"));
}
