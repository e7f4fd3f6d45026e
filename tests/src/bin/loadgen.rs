//! Opens many idle agent sessions from one process against a controller, to
//! measure the controller's per-session memory and session setup rate.
//!
//! Each session is its own TCP + TLS 1.3 connection with the agent
//! certificate, like a real fleet. Identities are static, so the controller
//! must run with `--allow-static-identities`; the TLS and session work per
//! agent is the same as with signed documents bar one RSA verification.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use amiprep_proto::{
    tls,
    v1::{
        AgentMessage, Heartbeat, Hello, Identity, StaticIdentity,
        agent_gateway_client::AgentGatewayClient, agent_message, controller_message, identity,
    },
};
use clap::Parser;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// Controller agent endpoint.
    #[arg(long)]
    controller: String,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value_t = 1000)]
    sessions: u32,
    /// Sessions being set up at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds to hold all sessions open after setup.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Controller pid, to report its RSS.
    #[arg(long)]
    controller_pid: Option<u32>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = tls::client_config(&tls::TlsFiles {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    })?;
    let host = args
        .controller
        .rsplit_once(':')
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    let name = tls::server_name(&host)?;
    let before = args.controller_pid.and_then(rss_kib);
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let (done_tx, mut done_rx) = mpsc::channel::<anyhow::Result<()>>(1024);
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    for i in 0..args.sessions {
        let permit = sem.clone().acquire_owned().await?;
        let (config, name, addr) = (config.clone(), name.clone(), args.controller.clone());
        let done = done_tx.clone();
        let mut hold = hold_rx.clone();
        tokio::spawn(async move {
            let result = async {
                let channel = tls::connect(&addr, name, config, Duration::from_secs(30)).await?;
                let mut client = AgentGatewayClient::new(channel);
                let (tx, rx) = mpsc::channel(4);
                tx.send(AgentMessage {
                    msg: Some(agent_message::Msg::Hello(Hello {
                        agent_version: "loadgen".into(),
                        identity: Some(Identity {
                            instance_id: format!("i-{:017x}", u64::from(i) + 1),
                            proof: Some(identity::Proof::StaticIdentity(StaticIdentity {
                                region: "us-east-1".into(),
                                account_id: "123456789012".into(),
                            })),
                        }),
                        hostname: format!("load-{i}"),
                        ..Default::default()
                    })),
                })
                .await?;
                let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
                match inbound.message().await? {
                    Some(m) if matches!(m.msg, Some(controller_message::Msg::Welcome(_))) => {}
                    other => anyhow::bail!("expected welcome, got {other:?}"),
                }
                Ok((tx, inbound))
            }
            .await;
            drop(permit);
            match result {
                Ok((tx, mut inbound)) => {
                    let _ = done.send(Ok(())).await;
                    // Stay idle but alive: heartbeat and read acks until released.
                    let mut seq = 0;
                    let mut tick = tokio::time::interval(Duration::from_secs(10));
                    loop {
                        tokio::select! {
                            _ = hold.changed() => break,
                            _ = tick.tick() => {
                                seq += 1;
                                let hb = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat { seq, sent_unix_ms: 0 })) };
                                if tx.send(hb).await.is_err() { break; }
                            }
                            m = inbound.message() => if !matches!(m, Ok(Some(_))) { break },
                        }
                    }
                }
                Err(e) => {
                    let _ = done.send(Err(e)).await;
                }
            }
        });
    }
    drop(done_tx);
    let (mut ok, mut failed) = (0u32, 0u32);
    while ok + failed < args.sessions {
        match done_rx.recv().await {
            Some(Ok(())) => ok += 1,
            Some(Err(e)) => {
                if failed < 5 {
                    eprintln!("session failed: {e:#}");
                }
                failed += 1;
            }
            None => break,
        }
    }
    let setup = start.elapsed();
    tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    let after = args.controller_pid.and_then(rss_kib);
    println!("sessions_ok={ok} sessions_failed={failed}");
    println!(
        "setup_secs={:.2} setup_rate_per_sec={:.0}",
        setup.as_secs_f64(),
        f64::from(ok) / setup.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (before, after) {
        println!(
            "controller_rss_before_kib={b} controller_rss_after_kib={a} per_session_kib={:.1}",
            (a.saturating_sub(b)) as f64 / f64::from(ok.max(1))
        );
    }
    let _ = hold_tx.send(true);
    Ok(())
}
