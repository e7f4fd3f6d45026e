//! The preparation policy: what `prepare` does to a host, as TOML.
//!
//! The built-in defaults are the safe, complete set for an image; a policy
//! file only needs the keys it changes. Unknown keys are errors that name the
//! key, because a misspelt `remove_authorized_keys` silently ignored would
//! leave a credential in every image.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Which steps run (on top of `--only` / `--skip` on the command line).
    pub steps: StepsPolicy,
    pub packages: PackagesPolicy,
    pub services: ServicesPolicy,
    pub logs: LogsPolicy,
    pub temp: TempPolicy,
    pub user_traces: UserTracesPolicy,
    pub identity: IdentityPolicy,
    pub scan: ScanPolicy,
}

/// The secret scan that gates readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanPolicy {
    /// Baseline of accepted findings (a file on the host running the agent,
    /// written by `amiprep-agent scan --write-baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<PathBuf>,
    /// An explicit cap: files larger than this are not read (and, being
    /// unscanned, keep the host from being ready). None by default: every
    /// file is scanned, large ones in bounded memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_file_size: Option<u64>,
    /// Private keys an image that carries the agent is expected to hold:
    /// the agent's own client key where the package puts it. Only
    /// private-key findings in exactly these files are set aside (and
    /// listed as expected); the same key anywhere else is a finding.
    pub expected_keys: Vec<PathBuf>,
    /// Paths (files, or directories for everything beneath) that may stay
    /// unscanned — unreadable, over `max_file_size`, damaged compression —
    /// without keeping the host from being ready. They are still listed.
    /// Anything else that cannot be scanned makes the host not ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accept_unscanned: Vec<PathBuf>,
}

/// Where the packaged agent keeps its client key.
pub const AGENT_KEY: &str = "/etc/amiprep/pki/agent.key";

impl Default for ScanPolicy {
    fn default() -> Self {
        ScanPolicy {
            baseline: None,
            max_file_size: None,
            expected_keys: vec![PathBuf::from(AGENT_KEY)],
            accept_unscanned: Vec::new(),
        }
    }
}

/// Step selection carried by the policy, so a policy sent by the controller
/// (or baked into a Packer template) can leave a step out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StepsPolicy {
    /// Run only these steps (empty: all).
    pub only: Vec<crate::steps::StepName>,
    /// Never run these steps.
    pub skip: Vec<crate::steps::StepName>,
}

impl StepsPolicy {
    /// Whether this selection lets step `s` run.
    pub fn selects(&self, s: crate::steps::StepName) -> bool {
        (self.only.is_empty() || self.only.contains(&s)) && !self.skip.contains(&s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackagesPolicy {
    /// Refresh the package lists and upgrade installed packages.
    pub upgrade: bool,
    /// Upgrade only from security sources.
    pub security_only: bool,
    /// How long to wait for another package manager to release its lock.
    pub lock_timeout_secs: u64,
    /// Clean the package manager's caches afterwards.
    pub clean_cache: bool,
    /// A package-manager command still running after this long is killed
    /// (with everything it started) and the step fails.
    pub command_timeout_secs: u64,
}

impl Default for PackagesPolicy {
    fn default() -> Self {
        PackagesPolicy {
            upgrade: true,
            security_only: false,
            lock_timeout_secs: 300,
            clean_cache: true,
            command_timeout_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesPolicy {
    /// Units to stop (live host), disable and mask. A unit that does not
    /// exist is an error.
    pub disable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogsPolicy {
    /// Remove rotated and compressed logs (`syslog.1`, `*.gz`, ...).
    pub remove_rotated: bool,
    /// Truncate active logs in place (wtmp, btmp and lastlog included).
    pub truncate_active: bool,
    /// Rotate and vacuum the journal (live) or remove its files (offline).
    pub journal: bool,
    /// Remove cloud-init's logs.
    pub cloud_init: bool,
    /// Log directories, root-relative.
    pub dirs: Vec<PathBuf>,
}

impl Default for LogsPolicy {
    fn default() -> Self {
        LogsPolicy {
            remove_rotated: true,
            truncate_active: true,
            journal: true,
            cloud_init: true,
            dirs: vec!["/var/log".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TempPolicy {
    /// Directories whose contents are removed (the directories stay).
    pub dirs: Vec<PathBuf>,
}

impl Default for TempPolicy {
    fn default() -> Self {
        TempPolicy {
            dirs: vec![
                "/tmp".into(),
                "/var/tmp".into(),
                "/var/crash".into(),
                "/var/lib/systemd/coredump".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserTracesPolicy {
    /// History files, relative to each home (root's and every `/home/*`).
    pub histories: Vec<PathBuf>,
    /// Remove `~/.ssh/authorized_keys` (and `authorized_keys2`).
    pub remove_authorized_keys: bool,
    /// Cache directories relative to each home; their contents are removed.
    pub home_caches: Vec<PathBuf>,
    /// Package-manager cache directories (root-relative); contents removed.
    pub package_caches: Vec<PathBuf>,
}

impl Default for UserTracesPolicy {
    fn default() -> Self {
        let h = |s: &str| PathBuf::from(s);
        UserTracesPolicy {
            histories: [
                ".bash_history",
                ".zsh_history",
                ".zhistory",
                ".histfile",
                ".sh_history",
                ".local/share/fish/fish_history",
                ".python_history",
                ".mysql_history",
                ".psql_history",
                ".sqlite_history",
                ".node_repl_history",
                ".rediscli_history",
                ".irb_history",
                ".lesshst",
                ".viminfo",
                ".wget-hsts",
            ]
            .into_iter()
            .map(h)
            .collect(),
            remove_authorized_keys: true,
            home_caches: vec![h(".cache/pip"), h(".npm/_cacache")],
            package_caches: vec![
                h("/var/cache/apt"),
                h("/var/cache/dnf"),
                h("/var/cache/yum"),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityPolicy {
    /// Set /etc/machine-id to `uninitialized` and remove the D-Bus copy.
    pub machine_id: bool,
    /// Remove SSH host keys (regeneration at first boot is ensured).
    pub ssh_host_keys: bool,
    /// Where neither cloud-init nor sshd-keygen regenerates host keys,
    /// install a first-boot unit that does; otherwise refuse.
    pub install_ssh_keygen_unit: bool,
    /// Remove cloud-init's instance state (`seed/` is kept).
    pub cloud_init: bool,
    /// Remove DHCP leases (dhclient, NetworkManager, systemd-networkd).
    pub dhcp_leases: bool,
    /// Remove udev persistent network rules.
    pub udev_persistent_net: bool,
    /// Remove the systemd random seed and credential secret.
    pub random_seed: bool,
    /// Set /etc/hostname to this; absent: keep it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl Default for IdentityPolicy {
    fn default() -> Self {
        IdentityPolicy {
            machine_id: true,
            ssh_host_keys: true,
            install_ssh_keygen_unit: true,
            cloud_init: true,
            dhcp_leases: true,
            udev_persistent_net: true,
            random_seed: true,
            hostname: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

impl Policy {
    /// Parses a policy; the error names the offending key.
    pub fn from_toml(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let invalid = |key: String, message: String| PolicyError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), e.message().to_string()))?;
        let policy: Policy = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            invalid(key, e.into_inner().message().to_string())
        })?;
        policy.validate().map_err(|(k, m)| invalid(k, m))?;
        Ok(policy)
    }

    /// The built-in defaults, or the file's policy on top of them.
    pub fn load(path: Option<&Path>) -> Result<Policy, PolicyError> {
        match path {
            None => Ok(Policy::default()),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| PolicyError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Policy::from_toml(&text, &p.display().to_string())
            }
        }
    }

    pub fn to_toml(&self) -> String {
        // Serialising plain structs of strings, bools and lists cannot fail.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let paths = self
            .logs
            .dirs
            .iter()
            .map(|p| ("logs.dirs", p))
            .chain(self.temp.dirs.iter().map(|p| ("temp.dirs", p)))
            .chain(
                self.user_traces
                    .histories
                    .iter()
                    .map(|p| ("user_traces.histories", p)),
            )
            .chain(
                self.user_traces
                    .home_caches
                    .iter()
                    .map(|p| ("user_traces.home_caches", p)),
            )
            .chain(
                self.user_traces
                    .package_caches
                    .iter()
                    .map(|p| ("user_traces.package_caches", p)),
            )
            .chain(
                self.scan
                    .expected_keys
                    .iter()
                    .map(|p| ("scan.expected_keys", p)),
            );
        for (key, p) in paths {
            let rel = crate::safefs::clean_rel(p).map_err(|e| (key.to_string(), e.to_string()))?;
            if rel.as_os_str().is_empty() {
                return Err((key.into(), "the root itself is not allowed here".into()));
            }
        }
        for u in &self.services.disable {
            if u.is_empty() || u.contains('/') || u.starts_with('-') {
                return Err(("services.disable".into(), format!("not a unit name: {u:?}")));
            }
        }
        if let Some(h) = &self.identity.hostname {
            let ok = !h.is_empty()
                && h.len() <= 64
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !h.starts_with('-');
            if !ok {
                return Err(("identity.hostname".into(), format!("not a hostname: {h:?}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_round_trip() {
        let p = Policy::default();
        let back = Policy::from_toml(&p.to_toml(), "default").unwrap();
        assert_eq!(p, back);
        assert!(p.user_traces.remove_authorized_keys);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let p = Policy::from_toml(
            "[services]\ndisable = [\"cups.service\"]\n[identity]\nhostname = \"base\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(p.services.disable, vec!["cups.service"]);
        assert_eq!(p.identity.hostname.as_deref(), Some("base"));
        assert_eq!(p.logs, LogsPolicy::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e =
            Policy::from_toml("[user_traces]\nremove_authorised_keys = false\n", "t").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("user_traces.remove_authorised_keys"), "{s}");
        let e = Policy::from_toml("[identity]\nmachine_id = \"yes\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("identity.machine_id"), "{e}");
        let e = Policy::from_toml("[bogus]\n", "t").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn unsafe_values_are_rejected() {
        let e = Policy::from_toml("[temp]\ndirs = [\"/tmp/../etc\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("temp.dirs"), "{e}");
        let e = Policy::from_toml("[temp]\ndirs = [\"/\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("temp.dirs"), "{e}");
        let e = Policy::from_toml("[services]\ndisable = [\"--root=/\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("services.disable"), "{e}");
    }
}
