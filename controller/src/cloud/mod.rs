//! Cloud access. Everything the controller asks of EC2 goes through the
//! [`Cloud`] trait and its typed facts, so the pipeline's decisions work on
//! [`InstanceState`], [`ImageState`] and [`CloudError`] cases rather than on
//! strings. [`ec2`] is the aws-sdk-ec2 implementation; [`fake`] keeps a cloud
//! in memory, with the transitions EC2 has and moto lacks, for unit tests.

pub mod ec2;
#[cfg(test)]
pub mod fake;

use std::fmt;

use serde::Deserialize;

pub use ec2::Ec2;

/// A closed set of states as EC2 names them, plus `Other` for a name this
/// version does not know (kept, so it can be shown and is never mistaken
/// for a known one).
macro_rules! ec2_states {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
            /// A state this version does not know, as EC2 spelled it.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(s) => s.as_str(),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($text => $name::$variant,)+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

ec2_states! {
    /// An EC2 instance's lifecycle state.
    InstanceState {
        Pending = "pending",
        Running = "running",
        Stopping = "stopping",
        Stopped = "stopped",
        ShuttingDown = "shutting-down",
        Terminated = "terminated",
    }
}

impl InstanceState {
    /// Terminated or on its way there: nothing will bring it back.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            InstanceState::ShuttingDown | InstanceState::Terminated
        )
    }
}

ec2_states! {
    /// An AMI's state.
    ImageState {
        Pending = "pending",
        Available = "available",
        Invalid = "invalid",
        Deregistered = "deregistered",
        Transient = "transient",
        Failed = "failed",
        Error = "error",
        Disabled = "disabled",
    }
}

impl ImageState {
    /// A state an image does not leave on its way to `available`.
    pub fn is_broken(&self) -> bool {
        matches!(
            self,
            ImageState::Failed | ImageState::Error | ImageState::Invalid | ImageState::Deregistered
        )
    }
}

ec2_states! {
    /// An EBS snapshot's state.
    SnapshotState {
        Pending = "pending",
        Completed = "completed",
        Error = "error",
        Recoverable = "recoverable",
        Recovering = "recovering",
    }
}

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
    /// The AWS account promotions run in; agents of other accounts are refused.
    #[serde(default)]
    pub account_id: Option<String>,
    /// Maximum attempts per call (adaptive retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// One attempt's time limit; a slower answer is retried.
    #[serde(default = "default_attempt_timeout")]
    pub attempt_timeout_secs: u64,
}

fn default_attempt_timeout() -> u64 {
    20
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
    pub state: InstanceState,
    pub owner_account: Option<String>,
}

/// Why a cloud call failed, classified once where the SDK's error is read,
/// so callers branch on the case and never on a message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CloudError {
    /// Missing IAM permission or bad credentials: retrying will not help.
    #[error("EC2 {action}: access denied: {message}")]
    AccessDenied {
        action: &'static str,
        message: String,
    },
    /// Request rate exceeded past the SDK's own retries.
    #[error("EC2 {action}: throttled: {message}")]
    Throttled {
        action: &'static str,
        message: String,
    },
    /// CreateImage or CopyImage: an image of this name exists already.
    #[error("EC2 {action}: name taken: {message}")]
    NameTaken {
        action: &'static str,
        message: String,
    },
    /// The resource named in the request does not exist (or not any more).
    #[error("EC2 {action}: not found: {message}")]
    NotFound {
        action: &'static str,
        message: String,
    },
    /// The service could not answer (5xx, timeout, connection): try later.
    #[error("EC2 {action}: unavailable: {message}")]
    Unavailable {
        action: &'static str,
        message: String,
    },
    /// Anything else, with EC2's error code in the message.
    #[error("EC2 {action}: {message}")]
    Other {
        action: &'static str,
        message: String,
    },
}

impl CloudError {
    /// Worth trying again later (the SDK already retried within the call).
    /// Unclassified errors count as transient: a step that keeps failing
    /// gives up after `max_step_retries`.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, CloudError::AccessDenied { .. })
    }
}

/// What the controller needs to know about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub image_id: String,
    pub name: String,
    pub state: ImageState,
    pub state_reason: Option<String>,
    pub root_device_name: Option<String>,
    pub snapshot_ids: Vec<String>,
    pub ena_support: Option<bool>,
    pub boot_mode: Option<String>,
    pub encrypted: bool,
    pub tags: Vec<(String, String)>,
}

/// Health of a (canary) instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceHealth {
    pub state: InstanceState,
    /// Both the instance and system status checks report `ok`.
    pub status_ok: bool,
}

/// Tags are `(key, value)` pairs.
pub type Tags = [(String, String)];

#[tonic::async_trait]
pub trait Cloud: Send + Sync {
    /// `Ok(None)` when the instance does not exist in `region`.
    async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceFacts>, CloudError>;
    async fn stop_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError>;
    async fn start_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError>;
    async fn terminate_instance(&self, region: &str, instance_id: &str) -> Result<(), CloudError>;
    /// Instance and system status checks of a running instance.
    async fn instance_health(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<InstanceHealth>, CloudError>;
    /// Creates an image, tagged; returns its id. Snapshots are tagged with
    /// [`Cloud::create_tags`] once the image lists them (not every EC2
    /// implementation accepts snapshot tags on CreateImage).
    async fn create_image(
        &self,
        region: &str,
        instance_id: &str,
        name: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<String, CloudError>;
    async fn describe_image(
        &self,
        region: &str,
        image_id: &str,
    ) -> Result<Option<ImageFacts>, CloudError>;
    /// Images owned by this account carrying tag `key=value`.
    async fn find_images(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<ImageFacts>, CloudError>;
    /// An image owned by this account with exactly this name.
    async fn find_image_by_name(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Option<ImageFacts>, CloudError>;
    /// `(snapshot id, state)` for each id.
    async fn snapshot_states(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<(String, SnapshotState)>, CloudError>;
    async fn deregister_image(&self, region: &str, image_id: &str) -> Result<(), CloudError>;
    async fn delete_snapshot(&self, region: &str, snapshot_id: &str) -> Result<(), CloudError>;
    /// Launches one instance from `image_id`, tagged; returns its id.
    /// `client_token` makes a retried request (an attempt that timed out
    /// after EC2 acted) return the same instance instead of a second one.
    async fn run_instance(
        &self,
        region: &str,
        image_id: &str,
        instance_type: &str,
        tags: &Tags,
        client_token: &str,
    ) -> Result<String, CloudError>;
    /// Instances (not terminated) carrying tag `key=value`.
    async fn find_instances(
        &self,
        region: &str,
        key: &str,
        value: &str,
    ) -> Result<Vec<InstanceFacts>, CloudError>;
    /// Copies `image_id` from `source_region` into `region`; returns the
    /// copy's id. `client_token` as for [`Cloud::run_instance`].
    #[allow(clippy::too_many_arguments)]
    async fn copy_image(
        &self,
        source_region: &str,
        image_id: &str,
        region: &str,
        name: &str,
        description: &str,
        kms_key_id: Option<&str>,
        client_token: &str,
    ) -> Result<String, CloudError>;
    async fn create_tags(
        &self,
        region: &str,
        resource_ids: &[String],
        tags: &Tags,
    ) -> Result<(), CloudError>;
    async fn share_image(
        &self,
        region: &str,
        image_id: &str,
        accounts: &[String],
    ) -> Result<(), CloudError>;
    async fn deprecate_image(
        &self,
        region: &str,
        image_id: &str,
        at: std::time::SystemTime,
    ) -> Result<(), CloudError>;
}
