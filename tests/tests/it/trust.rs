//! What an admitted agent cannot do: speak for a promotion that is not its
//! own. A second instance's agent, admitted with its own valid identity,
//! floods forged verdicts for a running promotion; the honest ones stand.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use amiprep_proto::{
    tls,
    v1::{
        AgentMessage, Hello, Progress, Report, VerifyResult,
        agent_gateway_client::AgentGatewayClient, agent_message, controller_message,
    },
};
use amiprep_tests::{identity_key, imds, sim::HAND_DRIVEN_TAG};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    client::{agent_tls, document_identity, runtime},
    promote::World,
};

/// A second admitted agent that, from its welcome on, sends forged
/// `Progress`, `Report{ready}` and `VerifyResult{ok}` for `promotion`
/// until stopped. Returns how many forged messages went out.
struct Forger {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Forger {
    fn start(w: &World, instance: &str, promotion: &str) -> Forger {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let config = agent_tls(&w.pki, "agent");
        let port = w.controller.port;
        let (instance, promotion) = (instance.to_owned(), promotion.to_owned());
        let (st, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            runtime().block_on(forge(port, config, &instance, &promotion, &st, &n))
        });
        Forger {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stops flooding; returns the number sent, or why the session failed.
    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        let t = self.thread.take().expect("joined once");
        t.join().map_err(|_| "forger panicked".to_owned())??;
        Ok(self.sent.load(Ordering::SeqCst))
    }
}

async fn forge(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    instance: &str,
    promotion: &str,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<(), String> {
    let channel = tls::connect(
        &format!("127.0.0.1:{port}"),
        tls::server_name("127.0.0.1").map_err(|e| e.to_string())?,
        config,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let mut client = AgentGatewayClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let doc = imds::document(instance, "us-east-1", "123456789012");
    let sig = identity_key().sign(&doc).map_err(|e| e.to_string())?;
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent_version: "forger".into(),
            identity: Some(document_identity(instance, doc, sig)),
            ..Default::default()
        })),
    })
    .await
    .map_err(|_| "queue hello".to_owned())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("session refused: {e}"))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(m)) if matches!(m.msg, Some(controller_message::Msg::Welcome(_))) => {}
        other => return Err(format!("no welcome: {other:?}")),
    }
    // Drain what the controller sends so its side never blocks.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    let verify_id = format!("{promotion}/verify");
    while !stop.load(Ordering::SeqCst) {
        let forged = [
            agent_message::Msg::Progress(Progress {
                promotion_id: promotion.to_owned(),
                step: "scan".into(),
                message: "all clean".into(),
                percent: 100,
            }),
            agent_message::Msg::Report(Report {
                promotion_id: promotion.to_owned(),
                ready: true,
                report_json: "{\"forged\":true}".into(),
                ..Default::default()
            }),
            agent_message::Msg::VerifyResult(VerifyResult {
                promotion_id: verify_id.clone(),
                ok: true,
                ..Default::default()
            }),
        ];
        for msg in forged {
            tx.send(AgentMessage { msg: Some(msg) })
                .await
                .map_err(|_| "the controller closed the forger's session".to_owned())?;
            sent.fetch_add(1, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drain.abort();
    Ok(())
}

/// Launches the forger's instance in moto (so EC2 cross-checks admit it),
/// marked so the simulator runs no agent for it.
fn forger_instance(w: &World) -> String {
    runtime().block_on(amiprep_tests::run_instance_tagged(
        &w.moto.client(),
        &[(HAND_DRIVEN_TAG, "forger")],
    ))
}

/// Counter value of `amiprep_agent_messages_refused` for a kind and reason.
fn refused(metrics: &str, kind: &str, reason: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("amiprep_agent_messages_refused_total{")
                && l.contains(&format!("kind=\"{kind}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn world_with_metrics() -> (World, u16) {
    let port = amiprep_tests::free_port();
    let w = World::new(&format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    (w, port)
}

#[test]
fn forged_reports_from_another_agent_do_not_make_a_dirty_host_ready() {
    let (w, metrics_port) = world_with_metrics();
    // The honest verdict: the source holds a credential, so it is not ready.
    let aws = w.source_root().join("root/.aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = AKIA{}\naws_secret_access_key = {}{}\n",
            "Q4RZT7KWJX2PLM3N", "wJalrXUtnFEMI/K7MDENG/", "bPxRfiCYzQ8mQ3cRtPlM"
        ),
    )
    .unwrap();
    let forger_id = forger_instance(&w);
    let (out, id) = crate::promote::promote(&w, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forger = Forger::start(&w, &forger_id, &id);
    let s = w.wait_state(
        &id,
        &["failed", "promoted", "cancelled"],
        Duration::from_secs(120),
    );
    let sent = forger
        .finish()
        .expect("the forger was admitted and stayed connected");
    assert!(sent > 0);
    assert_eq!(s["state"], "failed", "{s}");
    let reason = s["failure_reason"].as_str().unwrap();
    assert!(reason.contains("credential finding"), "{reason}");
    assert!(w.images_of(&id, "us-east-1").is_empty());
    let metrics = crate::promote::scrape(metrics_port);
    assert!(
        refused(&metrics, "report", "wrong-instance") > 0,
        "forged reports not counted:\n{metrics}"
    );
    let log = w.controller.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("refused agent message") && l.contains(&forger_id)),
        "the refusal is not logged with the sending instance:\n{log}"
    );
}

#[test]
fn forged_verdicts_from_another_agent_do_not_pass_a_dirty_canary() {
    let (w, metrics_port) = world_with_metrics();
    // The honest verdict: the canary's first boot writes a key its scan finds.
    w.sim
        .plant_in_canaries("root/.ssh/id_ed25519", &amiprep_tests::fake_private_key());
    let forger_id = forger_instance(&w);
    let (out, id) = crate::promote::promote(&w, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forger = Forger::start(&w, &forger_id, &id);
    let s = w.wait_state(
        &id,
        &["failed", "promoted", "cancelled"],
        Duration::from_secs(180),
    );
    let sent = forger
        .finish()
        .expect("the forger was admitted and stayed connected");
    assert!(sent > 0);
    assert_eq!(s["state"], "failed", "{s}");
    let reason = s["failure_reason"].as_str().unwrap();
    assert!(reason.contains("canary verification failed"), "{reason}");
    assert!(reason.contains("root/.ssh/id_ed25519"), "{reason}");
    assert!(w.images_of(&id, "us-east-1").is_empty());
    let metrics = crate::promote::scrape(metrics_port);
    assert!(
        refused(&metrics, "verify-result", "wrong-instance") > 0,
        "forged verdicts not counted:\n{metrics}"
    );
}
