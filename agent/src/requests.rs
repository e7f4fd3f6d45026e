//! What the agent does when the controller asks: prepare this host, or (on a
//! canary) verify that the image it booted from was prepared properly.

use std::path::Path;

use amiprep_proto::v1::Report;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The host identity that must never be baked into an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityFacts {
    /// SHA-256 (hex) of the machine id, if the host has a real one.
    pub machine_id_sha256: Option<String>,
    /// `SHA256:...` fingerprints of the SSH host public keys.
    pub host_key_fingerprints: Vec<String>,
}

/// The identity found when the agent started, before any prepare of this boot.
static BOOT_FACTS: std::sync::OnceLock<IdentityFacts> = std::sync::OnceLock::new();

/// Records the identity at agent start (call once, before serving requests).
pub fn record_boot_identity(root: &Path) {
    let facts = identity_facts(root);
    tracing::info!(
        machine_id = facts.machine_id_sha256.is_some(),
        host_keys = facts.host_key_fingerprints.len(),
        "identity at start recorded"
    );
    let _ = BOOT_FACTS.set(facts);
}

/// The running agent's client key, root-relative, when it lies beneath the
/// root it prepares (a live host): expected in the image, never a finding.
static OWN_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records where the agent's own client key is (call once, at start).
pub fn record_own_key(root: &Path, key: &Path) {
    if let (Ok(root), Ok(key)) = (std::fs::canonicalize(root), std::fs::canonicalize(key))
        && let Ok(rel) = key.strip_prefix(&root)
    {
        let _ = OWN_KEY.set(rel.display().to_string());
    }
}

/// The agent's own client key beneath its root, if any.
pub fn own_key() -> Option<String> {
    OWN_KEY.get().cloned()
}

/// Reads the machine id and SSH host key fingerprints beneath `root`.
pub fn identity_facts(root: &Path) -> IdentityFacts {
    let machine_id = std::fs::read_to_string(root.join("etc/machine-id"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| is_machine_id(s));
    let mut fps = Vec::new();
    if let Ok(dir) = std::fs::read_dir(root.join("etc/ssh")) {
        let mut names: Vec<_> = dir
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key.pub"))
            .collect();
        names.sort();
        for n in names {
            // symlink_metadata: a host key must be a plain file, never followed.
            let p = root.join("etc/ssh").join(&n);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file())
                && let Ok(text) = std::fs::read_to_string(&p)
                && let Some(fp) = key_fingerprint(&text)
            {
                fps.push(fp);
            }
        }
    }
    IdentityFacts {
        machine_id_sha256: machine_id.map(|m| hex::encode(Sha256::digest(m.as_bytes()))),
        host_key_fingerprints: fps,
    }
}

fn is_machine_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// OpenSSH's `SHA256:` fingerprint of a public key line.
pub fn key_fingerprint(line: &str) -> Option<String> {
    let blob = line.split_whitespace().nth(1)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .ok()?;
    Some(format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(bytes))
    ))
}

/// Runs `prepare` for the controller. The identity is captured first, so the
/// report can prove later that a canary's identity differs. `progress`
/// receives `(step, message)` as the steps run.
pub fn prepare(
    root_path: &Path,
    promotion_id: &str,
    policy_toml: &str,
    fingerprint_key: Option<crate::scan::FingerprintKey>,
    progress: &mut dyn FnMut(&str, String),
) -> Report {
    // A repeated request (after a reconnect) finds the identity already
    // reset; the identity this boot started with is the one to report.
    let now = identity_facts(root_path);
    let facts = match BOOT_FACTS.get() {
        Some(boot) if boot.machine_id_sha256.is_some() => boot.clone(),
        _ => now,
    };
    let base = Report {
        promotion_id: promotion_id.to_owned(),
        source_machine_id_sha256: facts.machine_id_sha256.unwrap_or_default(),
        source_host_key_fingerprints: facts.host_key_fingerprints,
        ..Default::default()
    };
    let policy = if policy_toml.trim().is_empty() {
        crate::policy::Policy::default()
    } else {
        match crate::policy::Policy::from_toml(policy_toml, "policy sent by the controller") {
            Ok(p) => p,
            Err(e) => {
                return Report {
                    error: e.to_string(),
                    ..base
                };
            }
        }
    };
    let root = match crate::safefs::Root::open(root_path) {
        Ok(r) => r,
        Err(e) => {
            return Report {
                error: format!("{}: {e}", root_path.display()),
                ..base
            };
        }
    };
    let opts = crate::prepare::PrepareOptions {
        dry_run: false,
        only: Vec::new(),
        skip: Vec::new(),
        live: crate::prepare::is_live_root(root_path),
        fingerprint_key,
    };
    let report = crate::prepare::prepare(&root, &policy, &opts, &mut |ev| match ev {
        crate::steps::ProgressEvent::StepStarted { step } => progress(&step, "started".into()),
        crate::steps::ProgressEvent::Action {
            step,
            index,
            total,
            target,
        } => progress(&step, format!("[{}/{total}] {target}", index + 1)),
        crate::steps::ProgressEvent::StepFinished { step, status } => {
            progress(&step, format!("{status:?}").to_lowercase())
        }
    });
    let steps = report
        .steps
        .iter()
        .map(|s| amiprep_proto::v1::StepReport {
            name: s.name.clone(),
            ok: s.status != crate::steps::StepStatus::Failed,
            actions: u32::try_from(s.actions.len()).unwrap_or(u32::MAX),
            bytes_freed: s.bytes_freed,
            duration_ms: s.duration_ms,
            errors: s.errors.clone(),
        })
        .collect();
    // Findings of the scan step, as masked previews and fingerprints.
    let findings = report
        .steps
        .iter()
        .filter(|s| s.name == "scan")
        .filter_map(|s| s.details.get("findings"))
        .filter_map(|v| serde_json::from_value::<Vec<crate::scan::Finding>>(v.clone()).ok())
        .flatten()
        .map(|f| amiprep_proto::v1::Finding {
            rule: f.rule,
            path: f.path,
            line: u32::try_from(f.line).unwrap_or(u32::MAX),
            column: u32::try_from(f.column).unwrap_or(u32::MAX),
            fingerprint: f.fingerprint,
            preview: f.preview,
        })
        .collect();
    Report {
        ready: report.ready,
        steps,
        findings,
        report_json: serde_json::to_string(&report).unwrap_or_default(),
        ..base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhS8lJ1vQ3c5O2pY3Yv6bJvY2c1bXlFZHRrZ2VuVGVz root@host\n";

    #[test]
    fn fingerprint_matches_openssh_format() {
        let fp = key_fingerprint(KEY).unwrap();
        assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 43, "{fp}");
        assert!(key_fingerprint("garbage").is_none());
    }
}
