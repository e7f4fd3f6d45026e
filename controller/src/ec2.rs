//! EC2 access. Everything the controller asks of EC2 goes through the
//! [`Cloud`] trait, so the decision logic is testable without AWS; the real
//! implementation uses aws-sdk-ec2 with adaptive retry, explicit timeouts and
//! an optional endpoint override (a local EC2-compatible endpoint such as
//! moto).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use serde::Deserialize;

/// `[ec2]` in the controller configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Section {
    /// Default region (agents' verified documents name their own).
    pub region: String,
    /// Endpoint override, e.g. `http://127.0.0.1:5000` for a local endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Admit an agent only if DescribeInstances shows its instance running.
    #[serde(default = "yes")]
    pub verify_instances: bool,
    /// Maximum attempts per call (adaptive retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn yes() -> bool {
    true
}
fn default_attempts() -> u32 {
    5
}

/// What the controller needs to know about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceFacts {
    pub instance_id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    pub owner_account: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CloudError {
    #[error("EC2 {action}: access denied: {message}")]
    AccessDenied {
        action: &'static str,
        message: String,
    },
    #[error("EC2 {action}: throttled: {message}")]
    Throttled {
        action: &'static str,
        message: String,
    },
    #[error("EC2 {action}: {message}")]
    Other {
        action: &'static str,
        message: String,
    },
}

impl CloudError {
    /// Worth trying again later (the SDK already retried within the call).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CloudError::Throttled { .. } | CloudError::Other { .. }
        )
    }
}

#[tonic::async_trait]
pub trait Cloud: Send + Sync {
    /// `Ok(None)` when the instance does not exist in `region`.
    async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceFacts>, CloudError>;
}

/// aws-sdk-ec2 behind [`Cloud`], one client per region.
pub struct Ec2 {
    config: Ec2Section,
    clients: Mutex<HashMap<String, aws_sdk_ec2::Client>>,
}

impl Ec2 {
    pub fn new(config: Ec2Section) -> Self {
        Ec2 {
            config,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub async fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        if let Some(c) = self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(region)
        {
            return c.clone();
        }
        let c = client(
            region,
            self.config.endpoint.as_deref(),
            self.config.max_attempts,
        )
        .await;
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(region.to_owned(), c.clone());
        c
    }
}

/// An EC2 client for `region`: rustls + ring HTTPS, adaptive retry, timeouts,
/// credentials from the standard chain (environment, profile, instance role).
pub async fn client(
    region: &str,
    endpoint: Option<&str>,
    max_attempts: u32,
) -> aws_sdk_ec2::Client {
    use aws_smithy_http_client::{Builder, tls};
    let http = Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(region.to_owned()))
        .retry_config(RetryConfig::adaptive().with_max_attempts(max_attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(20))
                .operation_timeout(Duration::from_secs(90))
                .build(),
        );
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    aws_sdk_ec2::Client::new(&loader.load().await)
}

fn classify<E: ProvideErrorMetadata>(action: &'static str, e: &E, fallback: String) -> CloudError {
    let code = e.code().unwrap_or_default();
    let message = e.message().map(str::to_owned).unwrap_or(fallback);
    match code {
        "UnauthorizedOperation" | "AuthFailure" | "AccessDenied" => {
            CloudError::AccessDenied { action, message }
        }
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            CloudError::Throttled { action, message }
        }
        _ => CloudError::Other {
            action,
            message: if code.is_empty() {
                message
            } else {
                format!("{code}: {message}")
            },
        },
    }
}

#[tonic::async_trait]
impl Cloud for Ec2 {
    async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceFacts>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let fallback = aws_sdk_ec2::error::DisplayErrorContext(&e).to_string();
                let code = e.code().unwrap_or_default();
                if code.starts_with("InvalidInstanceID.") {
                    return Ok(None);
                }
                return Err(classify("DescribeInstances", &e, fallback));
            }
        };
        for reservation in out.reservations() {
            for instance in reservation.instances() {
                if instance.instance_id() == Some(instance_id) {
                    return Ok(Some(InstanceFacts {
                        instance_id: instance_id.to_owned(),
                        state: instance
                            .state()
                            .and_then(|s| s.name())
                            .map(|n| n.as_str().to_owned())
                            .unwrap_or_default(),
                        owner_account: reservation.owner_id().map(str::to_owned),
                    }));
                }
            }
        }
        Ok(None)
    }
}
