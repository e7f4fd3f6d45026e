//! A fake EC2 instance metadata service for tests and local runs.
//!
//! Speaks the IMDSv2 token flow only: `PUT /latest/api/token` with a TTL
//! header returns a token; identity GETs without a valid token get 401, as on
//! EC2 with `HttpTokens=required`. Documents are signed with a test key that
//! the controller is configured to trust.
//!
//! Besides the identity documents it serves the instance metadata tree that
//! cloud-init's Ec2 datasource crawls (`meta-data/` listings, `instance-id`,
//! `placement/region`, `public-keys/0/openssh-key`, `hostname`,
//! `local-ipv4`) and `user-data`, under `latest/` and any dated API version,
//! so a real VM can boot against it.
//!
//! `fake-imds keygen --dir DIR` writes `aws-identity.pem`/`.key`;
//! `fake-imds serve ...` serves one instance's identity.

use std::{
    collections::{BTreeMap, HashSet},
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

// Parsed once at start: the size of the larger variant does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// The launch key pair's public key (one OpenSSH line), served as
        /// `meta-data/public-keys/0/openssh-key`.
        #[arg(long)]
        public_key: Option<String>,
        #[arg(long, default_value = "ip-169-254-0-15.ec2.internal")]
        hostname: String,
        #[arg(long, default_value = "169.254.0.15")]
        local_ipv4: String,
        /// File served as `user-data` (404 without it, as on EC2).
        #[arg(long)]
        user_data: Option<PathBuf>,
    },
}

struct State {
    tokens: Mutex<HashSet<String>>,
    document: Vec<u8>,
    rsa2048: String,
    /// `meta-data/` paths (without the prefix) and their values; a directory
    /// is served as the listing of its children.
    metadata: BTreeMap<String, String>,
    user_data: Option<Vec<u8>>,
}

/// The metadata tree cloud-init's Ec2 datasource reads.
fn metadata_tree(
    instance_id: &str,
    region: &str,
    public_key: Option<&str>,
    hostname: &str,
    local_ipv4: &str,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        m.insert(k.to_owned(), v.to_owned());
    };
    put("instance-id", instance_id);
    put("ami-id", "ami-0123456789abcdef0");
    put("instance-type", "t3.micro");
    put("hostname", hostname);
    put("local-hostname", hostname);
    put("local-ipv4", local_ipv4);
    put("placement/region", region);
    put("placement/availability-zone", &format!("{region}a"));
    if let Some(key) = public_key {
        put("public-keys/0/openssh-key", key.trim());
    }
    m
}

/// The value or directory listing at `rel` under `meta-data/`.
fn metadata_at(tree: &BTreeMap<String, String>, rel: &str) -> Option<String> {
    let rel = rel.trim_end_matches('/');
    if let Some(v) = tree.get(rel) {
        return Some(v.clone());
    }
    let prefix = if rel.is_empty() {
        String::new()
    } else {
        format!("{rel}/")
    };
    let mut children: Vec<String> = Vec::new();
    for key in tree.keys() {
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let child = match rest.split_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => rest.to_owned(),
        };
        // EC2 lists public keys as `INDEX=NAME`.
        let child = if rel == "public-keys" {
            format!("{}=amiprep-launch", child.trim_end_matches('/'))
        } else {
            child
        };
        if children.last() != Some(&child) {
            children.push(child);
        }
    }
    (!children.is_empty()).then(|| children.join("\n"))
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
    // `latest/` or a dated API version (`2021-03-23/`): one tree.
    let Some((_, rest)) = path.trim_start_matches('/').split_once('/') else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    match rest {
        "dynamic/instance-identity/document" => reply(StatusCode::OK, state.document.clone()),
        "dynamic/instance-identity/rsa2048" => reply(StatusCode::OK, state.rsa2048.clone()),
        "dynamic/instance-identity/" | "dynamic/instance-identity" => {
            reply(StatusCode::OK, "document\nrsa2048")
        }
        "user-data" => match &state.user_data {
            Some(data) => reply(StatusCode::OK, data.clone()),
            None => reply(StatusCode::NOT_FOUND, ""),
        },
        "meta-data" => reply(
            StatusCode::OK,
            metadata_at(&state.metadata, "").unwrap_or_default(),
        ),
        _ => match rest
            .strip_prefix("meta-data/")
            .and_then(|rel| metadata_at(&state.metadata, rel))
        {
            Some(v) => reply(StatusCode::OK, v),
            None => reply(StatusCode::NOT_FOUND, ""),
        },
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
            public_key,
            hostname,
            local_ipv4,
            user_data,
        } => {
            let user_data = match user_data {
                Some(p) => {
                    Some(std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
                }
                None => None,
            };
            let metadata = metadata_tree(
                &instance_id,
                &region,
                public_key.as_deref(),
                &hostname,
                &local_ipv4,
            );
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
                metadata,
                user_data,
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
