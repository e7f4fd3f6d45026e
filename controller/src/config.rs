//! The controller's configuration file (`/etc/amiprep/controller.toml`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use amiprep_proto::{config::ConfigError, tls::TlsFiles};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    #[serde(default)]
    pub listen: ListenSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default)]
    pub sessions: SessionsSection,
    /// EC2 access; without it, agents' instances are not cross-checked.
    #[serde(default)]
    pub ec2: Option<crate::cloud::Ec2Section>,
    #[serde(default)]
    pub pipeline: PipelineSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Where promotions are kept: SQLite (default) or PostgreSQL.
    #[serde(default)]
    pub store: crate::store::StoreSection,
}

/// `[metrics]`: Prometheus text exposition at `GET /metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// e.g. `127.0.0.1:9464`; unset: no metrics listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[pipeline]`: where promotions are kept and how long each wait may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// SQLite database of promotions.
    #[serde(default = "default_state_db")]
    pub state_db: PathBuf,
    /// Where promotion manifests (JSON) are written.
    #[serde(default = "default_manifest_dir")]
    pub manifest_dir: PathBuf,
    /// How long to wait for an instance's agent to be connected.
    #[serde(default = "d300")]
    pub agent_wait_secs: u64,
    #[serde(default = "d3600")]
    pub prepare_timeout_secs: u64,
    #[serde(default = "d900")]
    pub stop_timeout_secs: u64,
    #[serde(default = "d3600")]
    pub image_timeout_secs: u64,
    /// Canary: running, status checks ok, agent connected and verdict given.
    #[serde(default = "d1200")]
    pub canary_timeout_secs: u64,
    #[serde(default = "default_canary_type")]
    pub canary_instance_type: String,
    /// Polling backoff (with jitter) for every wait.
    #[serde(default = "d2000")]
    pub poll_initial_ms: u64,
    #[serde(default = "d30000")]
    pub poll_max_ms: u64,
    /// A step that keeps failing transiently (after the SDK's own retries)
    /// fails the promotion after this many further attempts.
    #[serde(default = "d10")]
    pub max_step_retries: u32,
    /// Image facts required by verification.
    #[serde(default)]
    pub require_ena: bool,
    #[serde(default)]
    pub require_encrypted: bool,
    #[serde(default)]
    pub require_boot_mode: Option<String>,
    /// The deployment's fingerprint key (`fingerprint.key` from `amiprep
    /// certs init`), sent with each prepare and verify request.
    #[serde(default = "default_fingerprint_key")]
    pub fingerprint_key: PathBuf,
}

impl Default for PipelineSection {
    fn default() -> Self {
        // Deserializing an empty table applies every field default above.
        toml::from_str("").unwrap_or_else(|_| unreachable!("an empty [pipeline] is valid"))
    }
}

fn default_state_db() -> PathBuf {
    PathBuf::from("/var/lib/amiprep/state.db")
}
fn default_manifest_dir() -> PathBuf {
    PathBuf::from("/var/lib/amiprep/manifests")
}
fn default_fingerprint_key() -> PathBuf {
    PathBuf::from("/etc/amiprep/pki/fingerprint.key")
}
fn default_canary_type() -> String {
    "t3.micro".to_owned()
}
fn d10() -> u32 {
    10
}
fn d300() -> u64 {
    300
}
fn d900() -> u64 {
    900
}
fn d1200() -> u64 {
    1200
}
fn d2000() -> u64 {
    2000
}
fn d3600() -> u64 {
    3600
}
fn d30000() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Where agents connect (TLS 1.3, client certificates required).
    #[serde(default = "default_agents_addr")]
    pub agents: SocketAddr,
    /// The admin API's Unix socket (created 0600).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            agents: default_agents_addr(),
            admin_socket: default_admin_socket(),
        }
    }
}

fn default_agents_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}

pub fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/amiprep/admin.sock")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// PEM files with the AWS certificates that sign instance identity
    /// documents (the RSA-2048 certificate of each region in use).
    #[serde(default)]
    pub aws_certificates: Vec<PathBuf>,
    /// Accept `static` identities (development only). Also `--allow-static-identities`.
    #[serde(default)]
    pub allow_static: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSection {
    /// Heartbeat interval asked of agents.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_secs: u32,
    /// A session with no heartbeat for this long is dropped.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_secs: u32,
    /// Time an agent has, after the TLS handshake, to send `Hello`.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_secs: u32,
}

impl Default for SessionsSection {
    fn default() -> Self {
        SessionsSection {
            heartbeat_interval_secs: default_heartbeat_interval(),
            heartbeat_timeout_secs: default_heartbeat_timeout(),
            hello_timeout_secs: default_hello_timeout(),
        }
    }
}

fn default_heartbeat_interval() -> u32 {
    10
}
fn default_heartbeat_timeout() -> u32 {
    35
}
fn default_hello_timeout() -> u32 {
    10
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: ControllerConfig = amiprep_proto::config::load(path)?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let s = &self.sessions;
        if s.heartbeat_interval_secs == 0 {
            return Err(ConfigError::invalid(
                path,
                "sessions.heartbeat_interval_secs",
                "must be at least 1",
            ));
        }
        if s.heartbeat_timeout_secs < 2 * s.heartbeat_interval_secs {
            return Err(ConfigError::invalid(
                path,
                "sessions.heartbeat_timeout_secs",
                "must be at least twice sessions.heartbeat_interval_secs",
            ));
        }
        if s.hello_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                path,
                "sessions.hello_timeout_secs",
                "must be at least 1",
            ));
        }
        if let Some(ec2) = &self.ec2 {
            if ec2.region.is_empty() {
                return Err(ConfigError::invalid(
                    path,
                    "ec2.region",
                    "must not be empty",
                ));
            }
            if let Some(url) = &ec2.endpoint
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(ConfigError::invalid(
                    path,
                    "ec2.endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        let p = &self.pipeline;
        if p.poll_initial_ms == 0 || p.poll_max_ms < p.poll_initial_ms {
            return Err(ConfigError::invalid(
                path,
                "pipeline.poll_max_ms",
                "must be at least pipeline.poll_initial_ms, which must be above 0",
            ));
        }
        if self.listen.admin_socket.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                path,
                "listen.admin_socket",
                "must not be empty",
            ));
        }
        Ok(())
    }

    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.tls.ca.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ControllerConfig, ConfigError> {
        let path = Path::new("controller.toml");
        let c: ControllerConfig = amiprep_proto::config::parse(path, text)?;
        c.validate(path)?;
        Ok(c)
    }

    const TLS: &str = "[tls]\nca='ca.pem'\ncert='c.pem'\nkey='c.key'\n";

    #[test]
    fn packaged_example_parses() {
        let c = parse(include_str!("../../packaging/config/controller.toml")).unwrap();
        assert_eq!(c.ec2.unwrap().region, "us-east-1");
    }

    #[test]
    fn defaults() {
        let c = parse(TLS).unwrap();
        assert_eq!(c.listen.agents.port(), 7443);
        assert!(!c.identity.allow_static);
        assert_eq!(c.sessions.heartbeat_interval_secs, 10);
    }

    #[test]
    fn heartbeat_timeout_must_exceed_two_intervals() {
        let e = parse(&format!(
            "{TLS}[sessions]\nheartbeat_interval_secs=10\nheartbeat_timeout_secs=15\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("sessions.heartbeat_timeout_secs"), "{e}");
    }

    #[test]
    fn bad_listen_address_names_key() {
        let e = parse(&format!("[listen]\nagents='nowhere'\n{TLS}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("controller.toml: listen.agents: "), "{e}");
    }
}
