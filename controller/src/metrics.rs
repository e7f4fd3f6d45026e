//! Prometheus metrics: promotions by state, step durations, EC2 calls and
//! throttles by action (counted per HTTP attempt, so throttles the SDK
//! retried internally are seen too), connected agents.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use aws_sdk_ec2::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::{
    box_error::BoxError,
    client::{interceptors::context::FinalizerInterceptorContextRef, orchestrator::Metadata},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

/// An agent message the controller did not accept, by kind and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

pub struct Metrics {
    registry: Registry,
    pub ec2_calls: Family<ActionLabel, Counter>,
    pub ec2_throttles: Family<ActionLabel, Counter>,
    pub step_seconds: Family<StateLabel, Histogram>,
    pub promotions: Family<StateLabel, Gauge>,
    pub agents: Gauge,
    pub agent_messages_refused: Family<RefusedLabel, Counter>,
}

fn histogram() -> Histogram {
    Histogram::new([0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0])
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("amiprep");
        let ec2_calls = Family::<ActionLabel, Counter>::default();
        let ec2_throttles = Family::<ActionLabel, Counter>::default();
        let step_seconds =
            Family::<StateLabel, Histogram>::new_with_constructor(histogram as fn() -> Histogram);
        let promotions = Family::<StateLabel, Gauge>::default();
        let agents = Gauge::default();
        let agent_messages_refused = Family::<RefusedLabel, Counter>::default();
        registry.register("ec2_calls", "EC2 API attempts by action", ec2_calls.clone());
        registry.register(
            "ec2_throttles",
            "EC2 API attempts answered with throttling (HTTP 503) by action",
            ec2_throttles.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Time spent in each promotion state",
            step_seconds.clone(),
        );
        registry.register(
            "promotions",
            "Promotions by current state",
            promotions.clone(),
        );
        registry.register(
            "agents_connected",
            "Connected agent sessions",
            agents.clone(),
        );
        registry.register(
            "agent_messages_refused",
            "Agent messages about a promotion not accepted from the session that sent them, by kind and reason",
            agent_messages_refused.clone(),
        );
        Metrics {
            agent_messages_refused,
            registry,
            ec2_calls,
            ec2_throttles,
            step_seconds,
            promotions,
            agents,
        }
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Counts every EC2 HTTP attempt and every throttled one, by action.
#[derive(Debug)]
pub struct Ec2Counter;

impl Intercept for Ec2Counter {
    fn name(&self) -> &'static str {
        "amiprep-ec2-metrics"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let action = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let label = ActionLabel { action };
        let m = global();
        m.ec2_calls.get_or_create(&label).inc();
        // EC2 answers RequestLimitExceeded with HTTP 503.
        if context
            .response()
            .is_some_and(|r| r.status().as_u16() == 503)
        {
            m.ec2_throttles.get_or_create(&label).inc();
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr`; `refresh` runs before each scrape to set
/// the gauges that are computed from current state.
pub async fn serve(addr: SocketAddr, refresh: Arc<dyn Fn() + Send + Sync>) -> anyhow::Result<()> {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening");
    loop {
        let (tcp, _) = listener.accept().await?;
        let refresh = refresh.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let refresh = refresh.clone();
                    async move {
                        if req.uri().path() == "/metrics" {
                            refresh();
                            http::Response::builder()
                                .header(
                                    http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(bytes::Bytes::from(global().encode())))
                        } else {
                            http::Response::builder()
                                .status(404)
                                .body(Full::new(bytes::Bytes::new()))
                        }
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}
