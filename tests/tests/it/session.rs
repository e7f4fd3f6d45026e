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

#[test]
fn agent_notifies_systemd_ready_once_connected() {
    use std::os::unix::net::UnixDatagram;
    let pki = Pki::new();
    let socket_path = pki.file("notify.sock");
    let notify = UnixDatagram::bind(&socket_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let imds = FakeImds::start(&pki, INSTANCE, "aws-identity");
    // No controller yet: the agent must not claim readiness.
    let port = amiprep_tests::free_port();
    let config = pki.file("agent-notify.toml");
    std::fs::write(
        &config,
        format!(
            "controller = \"127.0.0.1:{port}\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[identity]\nimds_endpoint = \"{}\"\n[session]\nreconnect_initial_ms = 100\nreconnect_max_ms = 500\n",
            pki.file("ca.pem"),
            pki.file("agent.pem"),
            pki.file("agent.key"),
            imds.endpoint()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(amiprep_tests::bin("amiprep-agent"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path);
    let mut agent = amiprep_tests::Proc::spawn("agent", cmd, pki.file("agent-notify.log"));
    notify
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 512];
    // Collect what the agent says for 3 s while it cannot reach a controller.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut early = Vec::new();
    while std::time::Instant::now() < until {
        if let Ok(n) = notify.recv(&mut buf) {
            early.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        early.iter().any(|m| m.contains("reconnecting")),
        "the agent reports its reconnects: {early:?}"
    );
    assert!(
        early.iter().all(|m| !m.contains("READY=1")),
        "READY before any session: {early:?}"
    );
    // Controller up: READY=1 arrives.
    let _controller = Controller::start_on(&pki, ControllerOpts::default(), port);
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ready = wait_for(Duration::from_secs(20), || {
        let n = notify.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("READY=1")
            .then_some(())
    });
    assert!(ready.is_some(), "no READY=1\n{}", agent.log_text());
    // SIGTERM: STOPPING=1 and a clean exit.
    agent.signal("TERM");
    let stopping = wait_for(Duration::from_secs(10), || {
        let n = notify.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("STOPPING=1")
            .then_some(())
    });
    assert!(stopping.is_some());
    assert!(
        agent
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}
