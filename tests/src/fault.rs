//! A fault-injecting proxy in front of moto: throttling, 500s, dropped
//! connections, latency, and images held `pending` or turned `failed` —
//! the ways EC2 misbehaves that a promotion must survive.
//!
//! moto does not implement `EnableImageDeprecation`; the proxy answers it
//! as EC2 does (`<return>true</return>`) and records the image and time
//! asked for, so a test can check what the controller sent.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// What to inject. Counters apply to every request through the proxy.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer every Nth request with `RequestLimitExceeded` (HTTP 503).
    pub throttle_every: Option<u64>,
    /// Answer every Nth request with HTTP 500 `InternalError`.
    pub error_every: Option<u64>,
    /// Close the connection without answering every Nth request.
    pub drop_every: Option<u64>,
    /// Delay every request.
    pub latency: Duration,
    /// Report images as `pending` for this long after first being seen.
    pub image_pending_for: Option<Duration>,
    /// Report every image as `failed`.
    pub image_failed: bool,
    /// Hold the response to this action (after EC2 has acted on it) for
    /// this long: the window in which a controller crash leaves a resource
    /// created but unrecorded.
    pub hold_response: Option<(String, Duration)>,
    /// Refuse this action with `UnauthorizedOperation` (HTTP 403), as EC2
    /// does when the IAM policy lacks it.
    pub deny: Option<String>,
    /// Report stopped instances as `stopping`: a stop that never completes.
    pub stop_stuck: bool,
    /// Report every instance's status checks as `impaired`.
    pub status_impaired: bool,
}

/// Counts of what the proxy saw and did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: u64,
    pub throttled: u64,
    pub errors: u64,
    pub dropped: u64,
    /// `(Action, count)` of requests forwarded.
    pub actions: Vec<(String, u64)>,
    /// `(ImageId, DeprecateAt)` of every `EnableImageDeprecation` answered.
    pub deprecations: Vec<(String, String)>,
    /// `(Encrypted, KmsKeyId)` of every `CopyImage` forwarded.
    pub copies: Vec<(String, String)>,
}

struct Shared {
    faults: Faults,
    stats: Stats,
    first_seen: std::collections::HashMap<String, Instant>,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    _thread: std::thread::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let shared = Arc::new(Mutex::new(Shared {
            faults: Faults::default(),
            stats: Stats::default(),
            first_seen: Default::default(),
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let upstream = upstream.to_owned();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let s = s.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let s = s.clone();
                            let upstream = upstream.clone();
                            async move { handle(s, &upstream, req).await }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    });
                }
            });
        });
        FaultProxy {
            addr,
            shared,
            _thread: thread,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, faults: Faults) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.faults = faults;
        s.first_seen.clear();
    }

    pub fn stats(&self) -> Stats {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stats
            .clone()
    }
}

fn ec2_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>amiprep-fault-proxy</RequestID></Response>"
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn action_of(body: &[u8]) -> String {
    param(body, "Action").unwrap_or_else(|| "?".into())
}

/// A form parameter of an EC2 query request, decoded.
fn param(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Updates the counters under the lock.
fn record(shared: &Mutex<Shared>, f: impl FnOnce(&mut Stats)) {
    f(&mut shared.lock().unwrap_or_else(|p| p.into_inner()).stats);
}

async fn handle(
    shared: Arc<Mutex<Shared>>,
    upstream: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let action = action_of(&body);
    let (faults, n) = {
        let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.stats.requests += 1;
        (s.faults.clone(), s.stats.requests)
    };
    let hit = |every: Option<u64>| every.is_some_and(|e| e > 0 && n % e == 0);
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if hit(faults.drop_every) {
        record(&shared, |s| s.dropped += 1);
        return Err(std::io::Error::other("dropped by fault proxy"));
    }
    if hit(faults.throttle_every) {
        record(&shared, |s| s.throttled += 1);
        return Ok(ec2_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        ));
    }
    if hit(faults.error_every) {
        record(&shared, |s| s.errors += 1);
        return Ok(ec2_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "An internal error has occurred.",
        ));
    }
    record(&shared, |s| {
        match s.actions.iter_mut().find(|(a, _)| *a == action) {
            Some((_, c)) => *c += 1,
            None => s.actions.push((action.clone(), 1)),
        }
    });
    if faults.deny.as_deref() == Some(action.as_str()) {
        return Ok(ec2_error(
            StatusCode::FORBIDDEN,
            "UnauthorizedOperation",
            "You are not authorized to perform this operation.",
        ));
    }
    if action == "CopyImage" {
        let copy = (
            param(&body, "Encrypted").unwrap_or_default(),
            param(&body, "KmsKeyId").unwrap_or_default(),
        );
        record(&shared, |s| s.copies.push(copy));
    }
    if action == "EnableImageDeprecation" {
        let image = param(&body, "ImageId").unwrap_or_default();
        let at = param(&body, "DeprecateAt").unwrap_or_default();
        record(&shared, |s| s.deprecations.push((image, at)));
        return Ok(Response::new(Full::new(Bytes::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<EnableImageDeprecationResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>amiprep-fault-proxy</requestId><return>true</return></EnableImageDeprecationResponse>",
        ))));
    }
    // Forward.
    let tcp = tokio::net::TcpStream::connect(upstream).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut fwd = Request::from_parts(parts, Full::new(body));
    fwd.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_str(upstream).map_err(std::io::Error::other)?,
    );
    let resp = sender
        .send_request(fwd)
        .await
        .map_err(std::io::Error::other)?;
    if let Some((held, d)) = &faults.hold_response
        && *held == action
    {
        tokio::time::sleep(*d).await;
    }
    let (mut parts, body) = resp.into_parts();
    let mut bytes = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let rewrite = |bytes: &mut Bytes, parts: &mut http::response::Parts, from: &str, to: &str| {
        let text = String::from_utf8_lossy(bytes).replace(from, to);
        *bytes = Bytes::from(text);
        parts.headers.remove(http::header::CONTENT_LENGTH);
    };
    if action == "DescribeInstances" && faults.stop_stuck {
        rewrite(
            &mut bytes,
            &mut parts,
            "<name>stopped</name>",
            "<name>stopping</name>",
        );
    }
    if action == "DescribeInstanceStatus" && faults.status_impaired {
        rewrite(
            &mut bytes,
            &mut parts,
            "<status>ok</status>",
            "<status>impaired</status>",
        );
    }
    if action == "DescribeImages" && (faults.image_failed || faults.image_pending_for.is_some()) {
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if faults.image_failed {
            text = text.replace(
                "<imageState>available</imageState>",
                "<imageState>failed</imageState><stateReason><code>Client.InternalError</code><message>injected failure</message></stateReason>",
            );
        } else if let Some(hold) = faults.image_pending_for {
            let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = text
                .match_indices("<imageId>")
                .filter_map(|(i, _)| {
                    let rest = &text[i + 9..];
                    rest.find("</imageId>").map(|e| rest[..e].to_owned())
                })
                .collect();
            let now = Instant::now();
            let young = ids.iter().any(|id| {
                let first = *s.first_seen.entry(id.clone()).or_insert(now);
                now.duration_since(first) < hold
            });
            if young {
                text = text.replace(
                    "<imageState>available</imageState>",
                    "<imageState>pending</imageState>",
                );
            }
        }
        bytes = Bytes::from(text);
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(bytes)))
}
