//! The agent's configuration file (`/etc/amiprep/agent.toml`).

use std::path::{Path, PathBuf};

use amiprep_proto::{config::ConfigError, tls::TlsFiles};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The controller's agent endpoint, `host:port`.
    pub controller: String,
    /// Name expected in the controller's certificate; defaults to the host
    /// part of `controller`.
    #[serde(default)]
    pub server_name: Option<String>,
    pub tls: TlsSection,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default)]
    pub session: SessionSection,
    /// The root the agent prepares and verifies (`/` on a host; another
    /// directory for a mounted image or a simulated instance).
    #[serde(default = "default_root")]
    pub root: PathBuf,
}

fn default_root() -> PathBuf {
    PathBuf::from("/")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdentitySource {
    /// The signed instance identity document from IMDSv2 (production).
    #[default]
    Imds,
    /// Fixed values from this file: development only, refused by a
    /// controller unless it runs with `--allow-static-identities`.
    Static,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    #[serde(default)]
    pub source: IdentitySource,
    /// IMDS base URL (plain HTTP, as on EC2).
    #[serde(default = "default_imds")]
    pub imds_endpoint: String,
    pub instance_id: Option<String>,
    pub region: Option<String>,
    pub account_id: Option<String>,
}

impl Default for IdentitySection {
    fn default() -> Self {
        IdentitySection {
            source: IdentitySource::Imds,
            imds_endpoint: default_imds(),
            instance_id: None,
            region: None,
            account_id: None,
        }
    }
}

fn default_imds() -> String {
    "http://169.254.169.254".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    /// First reconnect delay; doubles per failed attempt (with full jitter).
    #[serde(default = "default_backoff_initial")]
    pub reconnect_initial_ms: u64,
    /// Upper bound of the reconnect delay.
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
    /// Dial timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
}

impl Default for SessionSection {
    fn default() -> Self {
        SessionSection {
            reconnect_initial_ms: default_backoff_initial(),
            reconnect_max_ms: default_backoff_max(),
            connect_timeout_ms: default_connect_timeout(),
        }
    }
}

fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_connect_timeout() -> u64 {
    10_000
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = amiprep_proto::config::load(path)?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        if self.host_port().is_none() {
            return Err(ConfigError::invalid(
                path,
                "controller",
                format!("expected host:port, got {:?}", self.controller),
            ));
        }
        if self.identity.source == IdentitySource::Static {
            for (key, value) in [
                ("identity.instance_id", &self.identity.instance_id),
                ("identity.region", &self.identity.region),
            ] {
                if value.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(
                        path,
                        key,
                        "required when identity.source = \"static\"",
                    ));
                }
            }
        } else if !self.identity.imds_endpoint.starts_with("http://") {
            return Err(ConfigError::invalid(
                path,
                "identity.imds_endpoint",
                "must be an http:// URL (IMDS does not speak TLS)",
            ));
        }
        let s = &self.session;
        if s.reconnect_initial_ms == 0 || s.reconnect_max_ms < s.reconnect_initial_ms {
            return Err(ConfigError::invalid(
                path,
                "session.reconnect_max_ms",
                "must be at least session.reconnect_initial_ms, which must be above 0",
            ));
        }
        Ok(())
    }

    /// `(host, port)` of the controller.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (host, port) = self.controller.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_owned(), port))
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

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let path = Path::new("agent.toml");
        let c: AgentConfig = amiprep_proto::config::parse(path, text)?;
        c.validate(path)?;
        Ok(c)
    }

    const TLS: &str = "[tls]\nca='ca.pem'\ncert='a.pem'\nkey='a.key'\n";

    #[test]
    fn packaged_example_parses() {
        let c = parse(include_str!("../../packaging/config/agent.toml")).unwrap();
        assert_eq!(c.identity.source, IdentitySource::Imds);
    }

    #[test]
    fn minimal_config_defaults_to_imds() {
        let c = parse(&format!("controller='ctl.example:7443'\n{TLS}")).unwrap();
        assert_eq!(c.identity.source, IdentitySource::Imds);
        assert_eq!(c.host_port(), Some(("ctl.example".into(), 7443)));
    }

    #[test]
    fn static_identity_needs_instance_id() {
        let e = parse(&format!(
            "controller='127.0.0.1:1'\n{TLS}[identity]\nsource='static'\nregion='r'\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("identity.instance_id"), "{e}");
    }

    #[test]
    fn bad_controller_address_is_named() {
        let e = parse(&format!("controller='nohost'\n{TLS}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(": controller: expected host:port"), "{e}");
    }
}
