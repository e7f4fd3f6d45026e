//! The aws-sdk-ec2 implementation of [`Cloud`]: adaptive retry, explicit
//! timeouts and an optional endpoint override (a local EC2-compatible
//! endpoint such as moto). EC2's error codes are read here, once, and turned
//! into [`CloudError`] cases; nothing above this module looks at a message.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_ec2::error::ProvideErrorMetadata;

use super::{
    Cloud, CloudError, Ec2Section, ImageFacts, ImageState, InstanceFacts, InstanceHealth,
    InstanceState, SnapshotState, Tags,
};

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
            Duration::from_secs(self.config.attempt_timeout_secs.max(1)),
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
    attempt_timeout: Duration,
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
                .operation_attempt_timeout(attempt_timeout)
                .operation_timeout((attempt_timeout * 4).max(Duration::from_secs(90)))
                .build(),
        );
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    let shared = loader.load().await;
    let config = aws_sdk_ec2::config::Builder::from(&shared)
        .interceptor(crate::metrics::Ec2Counter)
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn tag(key: &str, value: &str) -> aws_sdk_ec2::types::Tag {
    aws_sdk_ec2::types::Tag::builder()
        .key(key)
        .value(value)
        .build()
}

fn tag_spec(
    kind: aws_sdk_ec2::types::ResourceType,
    tags: &Tags,
) -> aws_sdk_ec2::types::TagSpecification {
    let mut b = aws_sdk_ec2::types::TagSpecification::builder().resource_type(kind);
    for (k, v) in tags {
        b = b.tags(tag(k, v));
    }
    b.build()
}

fn filter(name: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(name)
        .values(value)
        .build()
}

/// Maps an SDK error to a [`CloudError`], keeping EC2's error code.
fn sdk_error<E>(
    action: &'static str,
    e: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_ec2::error::SdkError;
    let fallback = aws_sdk_ec2::error::DisplayErrorContext(e).to_string();
    match e {
        // No answer, or one that could not be read: the call may be retried.
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CloudError::Unavailable {
                action,
                message: fallback,
            }
        }
        SdkError::ServiceError(s) if s.raw().status().is_server_error() && e.code().is_none() => {
            CloudError::Unavailable {
                action,
                message: fallback,
            }
        }
        _ => classify(action, e, fallback),
    }
}

fn image_facts(i: &aws_sdk_ec2::types::Image) -> ImageFacts {
    ImageFacts {
        image_id: i.image_id().unwrap_or_default().to_owned(),
        name: i.name().unwrap_or_default().to_owned(),
        state: ImageState::from(i.state().map(|s| s.as_str()).unwrap_or_default()),
        state_reason: i
            .state_reason()
            .and_then(|r| r.message())
            .map(str::to_owned),
        root_device_name: i.root_device_name().map(str::to_owned),
        snapshot_ids: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_owned))
            .collect(),
        ena_support: i.ena_support(),
        boot_mode: i.boot_mode().map(|b| b.as_str().to_owned()),
        encrypted: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs())
            .any(|e| e.encrypted() == Some(true)),
        tags: i
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    }
}

fn instance_facts(
    reservation_owner: Option<&str>,
    i: &aws_sdk_ec2::types::Instance,
) -> InstanceFacts {
    InstanceFacts {
        instance_id: i.instance_id().unwrap_or_default().to_owned(),
        state: InstanceState::from(
            i.state()
                .and_then(|s| s.name())
                .map(|n| n.as_str())
                .unwrap_or_default(),
        ),
        owner_account: reservation_owner.map(str::to_owned),
    }
}

/// The one place EC2's error codes are read.
fn classify<E: ProvideErrorMetadata>(action: &'static str, e: &E, fallback: String) -> CloudError {
    let code = e.code().unwrap_or_default();
    let message = e.message().map(str::to_owned).unwrap_or(fallback);
    let with_code = |message: String| {
        if code.is_empty() {
            message
        } else {
            format!("{code}: {message}")
        }
    };
    match code {
        "UnauthorizedOperation" | "AuthFailure" | "AccessDenied" => {
            CloudError::AccessDenied { action, message }
        }
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => {
            CloudError::Throttled { action, message }
        }
        "InvalidAMIName.Duplicate" => CloudError::NameTaken {
            action,
            message: with_code(message),
        },
        c if c.starts_with("InvalidInstanceID.")
            || c.starts_with("InvalidAMIID.")
            || c == "InvalidSnapshot.NotFound" =>
        {
            CloudError::NotFound {
                action,
                message: with_code(message),
            }
        }
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            CloudError::Unavailable {
                action,
                message: with_code(message),
            }
        }
        _ => CloudError::Other {
            action,
            message: with_code(message),
        },
    }
}

/// `Ok(None)` for [`CloudError::NotFound`].
fn absent_as_none<T>(r: Result<T, CloudError>) -> Result<Option<T>, CloudError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(CloudError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `Ok(())` for [`CloudError::NotFound`]: removing what is gone is done.
fn absent_as_done(r: Result<(), CloudError>) -> Result<(), CloudError> {
    absent_as_none(r).map(|_| ())
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
        let Some(out) = absent_as_none(out.map_err(|e| sdk_error("DescribeInstances", &e)))? else {
            return Ok(None);
        };
        Ok(out.reservations().iter().find_map(|r| {
            r.instances()
                .iter()
                .find(|i| i.instance_id() == Some(instance_id))
                .map(|i| instance_facts(r.owner_id(), i))
        }))
    }

    async fn stop_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError> {
        self.client(region)
            .await
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StopInstances", &e))?;
        Ok(())
    }

    async fn start_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError> {
        self.client(region)
            .await
            .start_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| sdk_error("StartInstances", &e))?;
        Ok(())
    }

    async fn terminate_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError> {
        absent_as_done(
            self.client(region)
                .await
                .terminate_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error("TerminateInstances", &e)),
        )
    }

    async fn instance_health(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceHealth>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_instance_status()
            .instance_ids(instance_id)
            .include_all_instances(true)
            .send()
            .await;
        let Some(out) = absent_as_none(out.map_err(|e| sdk_error("DescribeInstanceStatus", &e)))?
        else {
            return Ok(None);
        };
        let ok = |s: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| {
            s.and_then(|s| s.status())
                .is_some_and(|st| st.as_str() == "ok")
        };
        Ok(out
            .instance_statuses()
            .iter()
            .find(|s| s.instance_id() == Some(instance_id))
            .map(|s| InstanceHealth {
                state: InstanceState::from(
                    s.instance_state()
                        .and_then(|st| st.name())
                        .map(|n| n.as_str())
                        .unwrap_or_default(),
                ),
                status_ok: ok(s.instance_status()) && ok(s.system_status()),
            }))
    }

    async fn create_image(
        &self,
        region: &str,
        instance_id: &str,
        name: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<String, CloudError> {
        use aws_sdk_ec2::types::ResourceType;
        let out = self
            .client(region)
            .await
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
            .send()
            .await
            .map_err(|e| sdk_error("CreateImage", &e))?;
        out.image_id()
            .map(str::to_owned)
            .ok_or_else(|| CloudError::Other {
                action: "CreateImage",
                message: "no image id in the response".into(),
            })
    }

    async fn describe_image(
        &self,
        region: &str,
        image_id: &str,
    ) -> Result<Option<ImageFacts>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", &e));
        Ok(absent_as_none(out)?.and_then(|out| {
            out.images()
                .iter()
                .find(|i| i.image_id() == Some(image_id))
                .map(image_facts)
        }))
    }

    async fn find_images(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<ImageFacts>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_images()
            .owners("self")
            .filters(filter(&format!("tag:{key}"), value))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", &e))?;
        Ok(out.images().iter().map(image_facts).collect())
    }

    async fn find_image_by_name(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Option<ImageFacts>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_images()
            .owners("self")
            .filters(filter("name", name))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeImages", &e))?;
        Ok(out
            .images()
            .iter()
            .find(|i| i.name() == Some(name))
            .map(image_facts))
    }

    async fn snapshot_states(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<(String, SnapshotState)>, CloudError> {
        if snapshot_ids.is_empty() {
            return Ok(Vec::new());
        }
        let out = self
            .client(region)
            .await
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshot_ids.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeSnapshots", &e))?;
        Ok(out
            .snapshots()
            .iter()
            .map(|s| {
                (
                    s.snapshot_id().unwrap_or_default().to_owned(),
                    SnapshotState::from(s.state().map(|st| st.as_str()).unwrap_or_default()),
                )
            })
            .collect())
    }

    async fn deregister_image(&self, region: &str, image_id: &str) -> Result<(), CloudError> {
        absent_as_done(
            self.client(region)
                .await
                .deregister_image()
                .image_id(image_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error("DeregisterImage", &e)),
        )
    }

    async fn delete_snapshot(&self, region: &str, snapshot_id: &str) -> Result<(), CloudError> {
        absent_as_done(
            self.client(region)
                .await
                .delete_snapshot()
                .snapshot_id(snapshot_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| sdk_error("DeleteSnapshot", &e)),
        )
    }

    async fn run_instance(
        &self,
        region: &str,
        image_id: &str,
        instance_type: &str,
        tags: &Tags,
        client_token: &str,
    ) -> Result<String, CloudError> {
        use aws_sdk_ec2::types::{InstanceType, ResourceType};
        let out = self
            .client(region)
            .await
            .run_instances()
            .image_id(image_id)
            .instance_type(InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .tag_specifications(tag_spec(ResourceType::Instance, tags))
            .client_token(client_token)
            .send()
            .await
            .map_err(|e| sdk_error("RunInstances", &e))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| CloudError::Other {
                action: "RunInstances",
                message: "no instance in the response".into(),
            })
    }

    async fn find_instances(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<InstanceFacts>, CloudError> {
        let out = self
            .client(region)
            .await
            .describe_instances()
            .filters(filter(&format!("tag:{key}"), value))
            .send()
            .await
            .map_err(|e| sdk_error("DescribeInstances", &e))?;
        Ok(out
            .reservations()
            .iter()
            .flat_map(|r| {
                r.instances()
                    .iter()
                    .map(move |i| instance_facts(r.owner_id(), i))
            })
            .filter(|f| f.state != InstanceState::Terminated)
            .collect())
    }

    async fn copy_image(
        &self,
        source_region: &str,
        image_id: &str,
        region: &str,
        name: &str,
        description: &str,
        kms_key_id: Option<&str>,
        client_token: &str,
    ) -> Result<String, CloudError> {
        let mut req = self
            .client(region)
            .await
            .copy_image()
            .source_region(source_region)
            .source_image_id(image_id)
            .name(name)
            .description(description)
            .client_token(client_token);
        if let Some(kms) = kms_key_id {
            req = req.encrypted(true).kms_key_id(kms);
        }
        let out = req.send().await.map_err(|e| sdk_error("CopyImage", &e))?;
        out.image_id()
            .map(str::to_owned)
            .ok_or_else(|| CloudError::Other {
                action: "CopyImage",
                message: "no image id in the response".into(),
            })
    }

    async fn create_tags(
        &self,
        region: &str,
        resource_ids: &[String],
        tags: &Tags,
    ) -> Result<(), CloudError> {
        let mut req = self
            .client(region)
            .await
            .create_tags()
            .set_resources(Some(resource_ids.to_vec()));
        for (k, v) in tags {
            req = req.tags(tag(k, v));
        }
        req.send().await.map_err(|e| sdk_error("CreateTags", &e))?;
        Ok(())
    }

    async fn share_image(
        &self,
        region: &str,
        image_id: &str,
        accounts: &[String],
    ) -> Result<(), CloudError> {
        use aws_sdk_ec2::types::{LaunchPermission, LaunchPermissionModifications};
        let mut mods = LaunchPermissionModifications::builder();
        for a in accounts {
            mods = mods.add(LaunchPermission::builder().user_id(a).build());
        }
        self.client(region)
            .await
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(mods.build())
            .send()
            .await
            .map_err(|e| sdk_error("ModifyImageAttribute", &e))?;
        Ok(())
    }

    async fn deprecate_image(
        &self,
        region: &str,
        image_id: &str,
        at: std::time::SystemTime,
    ) -> Result<(), CloudError> {
        self.client(region)
            .await
            .enable_image_deprecation()
            .image_id(image_id)
            .deprecate_at(aws_sdk_ec2::primitives::DateTime::from(at))
            .send()
            .await
            .map_err(|e| sdk_error("EnableImageDeprecation", &e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::error::ErrorMetadata;

    fn err(code: &str) -> CloudError {
        let meta = ErrorMetadata::builder().code(code).message("m").build();
        classify("Call", &meta, "fallback".into())
    }

    #[test]
    fn error_codes_are_classified_once() {
        assert!(matches!(
            err("UnauthorizedOperation"),
            CloudError::AccessDenied { .. }
        ));
        assert!(matches!(
            err("RequestLimitExceeded"),
            CloudError::Throttled { .. }
        ));
        assert!(matches!(
            err("InvalidAMIName.Duplicate"),
            CloudError::NameTaken { .. }
        ));
        for code in [
            "InvalidInstanceID.NotFound",
            "InvalidInstanceID.Malformed",
            "InvalidAMIID.Unavailable",
            "InvalidSnapshot.NotFound",
        ] {
            assert!(matches!(err(code), CloudError::NotFound { .. }), "{code}");
        }
        assert!(matches!(
            err("InternalError"),
            CloudError::Unavailable { .. }
        ));
        match err("InvalidParameterValue") {
            CloudError::Other { message, .. } => assert_eq!(message, "InvalidParameterValue: m"),
            e => panic!("{e:?}"),
        }
        assert!(!err("AuthFailure").is_retryable());
        assert!(err("RequestLimitExceeded").is_retryable());
    }
}
