//! The CLI side of the admin API.

use std::{path::PathBuf, time::Duration};

use amiprep_proto::v1::{AgentInfo, AgentsRequest, admin_client::AdminClient};
use anyhow::Context;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Connects to the admin socket.
pub async fn connect(socket: PathBuf) -> anyhow::Result<AdminClient<Channel>> {
    let path = socket.clone();
    let channel = Endpoint::from_static("http://admin.sock")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the controller's admin socket {} (is `amiprep serve` running, and may you open the socket?)",
                socket.display()
            )
        })?;
    Ok(AdminClient::new(channel))
}

pub async fn agents(socket: PathBuf, json: bool) -> anyhow::Result<String> {
    let mut client = connect(socket).await?;
    let agents = client
        .agents(AgentsRequest {})
        .await
        .context("listing agents")?
        .into_inner()
        .agents;
    Ok(if json {
        render_json(&agents)
    } else {
        render_table(&agents)
    })
}

fn time(ms: u64) -> String {
    amiprep_proto::tls::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms))
}

fn render_json(agents: &[AgentInfo]) -> String {
    let list: Vec<serde_json::Value> = agents
        .iter()
        .map(|a| {
            serde_json::json!({
                "instance_id": a.instance_id,
                "region": a.region,
                "account_id": a.account_id,
                "hostname": a.hostname,
                "os": a.os,
                "agent_version": a.agent_version,
                "connected_since": time(a.connected_since_unix_ms),
                "last_heartbeat": time(a.last_heartbeat_unix_ms),
                "identity": a.identity_kind,
                "session_id": a.session_id,
                "peer": a.peer_address,
                "certificate_subject": a.certificate_subject,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into());
    s.push('\n');
    s
}

fn render_table(agents: &[AgentInfo]) -> String {
    if agents.is_empty() {
        return "no agents connected\n".into();
    }
    let rows: Vec<[String; 7]> = agents
        .iter()
        .map(|a| {
            [
                a.instance_id.clone(),
                a.region.clone(),
                a.hostname.clone(),
                a.os.clone(),
                a.agent_version.clone(),
                time(a.connected_since_unix_ms),
                time(a.last_heartbeat_unix_ms),
            ]
        })
        .collect();
    let header = [
        "INSTANCE",
        "REGION",
        "HOSTNAME",
        "OS",
        "VERSION",
        "CONNECTED",
        "LAST HEARTBEAT",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}
