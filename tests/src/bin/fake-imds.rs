//! A fake EC2 instance metadata service for tests and local runs.
//!
//! Speaks the IMDSv2 token flow only: `PUT /latest/api/token` with a TTL
//! header returns a token; identity GETs without a valid token get 401, as on
//! EC2 with `HttpTokens=required`. Documents are signed with a test key that
//! the controller is configured to trust.
//!
//! `fake-imds keygen --dir DIR` writes `aws-identity.pem`/`.key`;
//! `fake-imds serve ...` serves one instance's identity.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use amiprep_tests::imds::{SigningKey, document};
use base64::Engine;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a signing key and certificate.
    Keygen {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "aws-identity")]
        name: String,
    },
    /// Serve an instance identity.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// File to write the bound port to, once listening.
        #[arg(long)]
        port_file: Option<PathBuf>,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        instance_id: String,
        #[arg(long, default_value = "us-east-1")]
        region: String,
        #[arg(long, default_value = "123456789012")]
        account_id: String,
    },
}

struct State {
    tokens: Mutex<HashSet<String>>,
    document: Vec<u8>,
    rsa2048: String,
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if path == "/latest/api/token" {
        if req.method() != Method::PUT {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        if header("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.parse::<u32>().ok())
            .is_none_or(|ttl| ttl == 0 || ttl > 21600)
        {
            return reply(StatusCode::BAD_REQUEST, "");
        }
        let token = format!("{:032x}", rand::random::<u128>());
        if let Ok(mut t) = state.tokens.lock() {
            t.insert(token.clone());
        }
        return reply(StatusCode::OK, token);
    }
    let authorised = header("x-aws-ec2-metadata-token")
        .is_some_and(|t| state.tokens.lock().is_ok_and(|set| set.contains(t)));
    if !authorised {
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    match path {
        "/latest/dynamic/instance-identity/document" => {
            reply(StatusCode::OK, state.document.clone())
        }
        "/latest/dynamic/instance-identity/rsa2048" => reply(StatusCode::OK, state.rsa2048.clone()),
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keygen { dir, name } => {
            std::fs::create_dir_all(&dir)?;
            let key = SigningKey::generate("amiprep test identity signer")?;
            let (cert, _) = key.write(&dir, &name)?;
            println!("{}", cert.display());
            Ok(())
        }
        Command::Serve {
            listen,
            port_file,
            cert,
            key,
            instance_id,
            region,
            account_id,
        } => {
            let key = SigningKey::load(&cert, &key)?;
            let doc = document(&instance_id, &region, &account_id);
            let signature = key.sign(&doc)?;
            // IMDS serves the PKCS#7 as base64 in 64-column lines.
            let b64 = base64::engine::general_purpose::STANDARD.encode(signature);
            let rsa2048 = b64
                .as_bytes()
                .chunks(64)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("\n");
            let state = Arc::new(State {
                tokens: Mutex::new(HashSet::new()),
                document: doc,
                rsa2048,
            });
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(serve(listen, port_file, state))
        }
    }
}

async fn serve(
    listen: SocketAddr,
    port_file: Option<PathBuf>,
    state: Arc<State>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let port = listener.local_addr()?.port();
    if let Some(p) = port_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, port.to_string())?;
        std::fs::rename(tmp, p)?;
    }
    eprintln!("fake-imds listening on 127.0.0.1:{port}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
