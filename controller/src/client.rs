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
                "controller": a.controller,
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

/// `amiprep promote`, `status`, `list`, `watch`, `cancel`.
pub mod promotions {
    use std::{io::IsTerminal, io::Write, path::PathBuf, time::Duration};

    use amiprep_proto::v1::{
        CancelPromotionRequest, GetPromotionRequest, ListPromotionsRequest, PromoteRequest,
        Promotion, WatchPromotionRequest,
    };
    use anyhow::Context;

    use super::{connect, time};

    /// Errors the CLI maps to exit code 2 (the request itself is wrong).
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    pub struct Usage(pub String);

    fn status_error(action: &str, s: tonic::Status) -> anyhow::Error {
        match s.code() {
            tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::FailedPrecondition => {
                anyhow::Error::new(Usage(format!("{action}: {}", s.message())))
            }
            _ => anyhow::anyhow!("{action}: {}: {}", s.code(), s.message()),
        }
    }

    pub async fn promote(socket: PathBuf, req: PromoteRequest, wait: bool) -> anyhow::Result<bool> {
        let mut client = connect(socket.clone()).await?;
        let p = client
            .promote(req)
            .await
            .map_err(|s| status_error("promote", s))?
            .into_inner();
        println!("{}", p.id);
        if !wait {
            return Ok(true);
        }
        watch(socket, p.id).await
    }

    /// Follows a promotion to its end; `true` when it was promoted.
    pub async fn watch(socket: PathBuf, id: String) -> anyhow::Result<bool> {
        let mut client = connect(socket).await?;
        let mut stream = client
            .watch_promotion(WatchPromotionRequest { id: id.clone() })
            .await
            .map_err(|s| status_error("watch", s))?
            .into_inner();
        let tty = std::io::stderr().is_terminal();
        let mut out = std::io::stderr();
        let mut last_state = String::new();
        while let Some(ev) = stream.message().await.context("watching")? {
            let line = format!("{}  {:<16} {}", time(ev.at_unix_ms), ev.state, ev.message);
            if tty && ev.state == last_state {
                // Same state: rewrite the line in place.
                let _ = write!(out, "\r\x1b[2K{line}");
            } else {
                if tty && !last_state.is_empty() {
                    let _ = writeln!(out);
                }
                let _ = if tty {
                    write!(out, "{line}")
                } else {
                    writeln!(out, "{line}")
                };
            }
            let _ = out.flush();
            last_state = ev.state;
        }
        if tty {
            let _ = writeln!(out);
        }
        let p = client
            .get_promotion(GetPromotionRequest { id })
            .await
            .map_err(|s| status_error("status", s))?
            .into_inner();
        if p.state == "promoted" {
            println!("promoted {} ({})", p.image_id, p.image_name);
            if !p.manifest_path.is_empty() {
                println!("manifest {}", p.manifest_path);
            }
            Ok(true)
        } else {
            eprintln!("promotion {} {}: {}", p.id, p.state, p.failure_reason);
            if !p.last_message.is_empty() && p.last_message != p.failure_reason {
                eprintln!("{}", p.last_message);
            }
            Ok(false)
        }
    }

    fn json(p: &Promotion) -> serde_json::Value {
        serde_json::json!({
            "id": p.id,
            "instance_id": p.instance_id,
            "state": p.state,
            "image_name": p.image_name,
            "image_id": p.image_id,
            "failure_reason": p.failure_reason,
            "last_message": p.last_message,
            "created": time(p.created_unix_ms),
            "updated": time(p.updated_unix_ms),
            "resources": p.resources,
            "manifest_path": p.manifest_path,
            "report_sha256": p.report_sha256,
            "report": serde_json::from_str::<serde_json::Value>(&p.report_json).unwrap_or(serde_json::Value::Null),
        })
    }

    pub async fn status(socket: PathBuf, id: String, as_json: bool) -> anyhow::Result<String> {
        let p = connect(socket)
            .await?
            .get_promotion(GetPromotionRequest { id })
            .await
            .map_err(|s| status_error("status", s))?
            .into_inner();
        if as_json {
            return Ok(format!("{}\n", serde_json::to_string_pretty(&json(&p))?));
        }
        let mut s = format!(
            "promotion  {}\ninstance   {}\nstate      {}\nimage      {} {}\nupdated    {}\n",
            p.id,
            p.instance_id,
            p.state,
            p.image_id,
            p.image_name,
            time(p.updated_unix_ms)
        );
        if !p.failure_reason.is_empty() {
            s.push_str(&format!("reason     {}\n", p.failure_reason));
        }
        if !p.last_message.is_empty() {
            s.push_str(&format!("last       {}\n", p.last_message));
        }
        if !p.manifest_path.is_empty() {
            s.push_str(&format!("manifest   {}\n", p.manifest_path));
        }
        for r in &p.resources {
            s.push_str(&format!("resource   {r}\n"));
        }
        Ok(s)
    }

    pub async fn list(socket: PathBuf, as_json: bool) -> anyhow::Result<String> {
        let list = connect(socket)
            .await?
            .list_promotions(ListPromotionsRequest {})
            .await
            .map_err(|s| status_error("list", s))?
            .into_inner()
            .promotions;
        if as_json {
            let v: Vec<_> = list.iter().map(json).collect();
            return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
        }
        if list.is_empty() {
            return Ok("no promotions\n".into());
        }
        let mut s = format!(
            "{:<16}  {:<19}  {:<16}  {:<21}  {}\n",
            "ID", "INSTANCE", "STATE", "IMAGE", "NAME"
        );
        for p in &list {
            s.push_str(&format!(
                "{:<16}  {:<19}  {:<16}  {:<21}  {}\n",
                p.id, p.instance_id, p.state, p.image_id, p.image_name
            ));
        }
        Ok(s)
    }

    pub async fn cancel(socket: PathBuf, id: String) -> anyhow::Result<String> {
        let p = connect(socket)
            .await?
            .cancel_promotion(CancelPromotionRequest { id })
            .await
            .map_err(|s| status_error("cancel", s))?
            .into_inner();
        Ok(format!(
            "cancelling {} (was {}); cleanup follows\n",
            p.id, p.state
        ))
    }

    pub const POLL: Duration = Duration::from_millis(500);
}
