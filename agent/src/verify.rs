//! `Verify`, on a canary booted from a fresh image: was the source prepared
//! the way the policy asked? Identity regenerated (machine id and SSH host
//! keys differ from the source's), the disk free of credentials, and every
//! service the policy disables masked (and, on a live host, not running).

use std::path::{Path, PathBuf};

use amiprep_proto::v1::{Check, VerifyExpectations, VerifyResult};

use crate::{
    policy::Policy,
    requests::identity_facts,
    safefs::{self, Root},
    steps::StepName,
};

/// Host keys a booted instance generates for itself: expected on a canary
/// (the host-key check proves they are not the source's).
const HOST_PRIVATE_KEYS: [&str; 4] = [
    "etc/ssh/ssh_host_rsa_key",
    "etc/ssh/ssh_host_ecdsa_key",
    "etc/ssh/ssh_host_ed25519_key",
    "etc/ssh/ssh_host_dsa_key",
];

/// Findings listed in a failed check's detail; the count is always given.
const LISTED: usize = 5;

/// Checks the host at `root` against its source and the policy it was
/// prepared with.
pub fn verify(
    root_path: &Path,
    promotion_id: &str,
    exp: &VerifyExpectations,
    fingerprint_key: Option<crate::scan::FingerprintKey>,
) -> VerifyResult {
    let failed = |error: String| VerifyResult {
        promotion_id: promotion_id.to_owned(),
        ok: false,
        checks: Vec::new(),
        error,
    };
    let policy = if exp.policy_toml.trim().is_empty() {
        Policy::default()
    } else {
        match Policy::from_toml(&exp.policy_toml, "policy sent by the controller") {
            Ok(p) => p,
            Err(e) => return failed(e.to_string()),
        }
    };
    let root = match Root::open(root_path) {
        Ok(r) => r,
        Err(e) => return failed(format!("{}: {e}", root_path.display())),
    };
    let live = crate::prepare::is_live_root(root_path);
    let mut checks = identity_checks(root_path, exp);
    checks.push(services_check(&root, &policy, live));
    checks.push(scan_check(&root, &policy, fingerprint_key));
    VerifyResult {
        promotion_id: promotion_id.to_owned(),
        ok: checks.iter().all(|c| c.ok),
        checks,
        error: String::new(),
    }
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

/// Machine id and SSH host keys differ from the source's.
fn identity_checks(root: &Path, exp: &VerifyExpectations) -> Vec<Check> {
    const MID: &str = "machine-id regenerated";
    const KEYS: &str = "ssh host keys regenerated";
    let facts = identity_facts(root);
    let mut checks = Vec::new();
    checks.push(match &facts.machine_id_sha256 {
        None => check(
            MID,
            false,
            "this host has no machine id (still uninitialized?)",
        ),
        Some(_) if exp.source_machine_id_sha256.is_empty() => {
            check(MID, false, "the source's machine id was not recorded")
        }
        Some(h) if *h == exp.source_machine_id_sha256 => {
            check(MID, false, "same machine id as the source instance")
        }
        Some(_) => check(MID, true, "differs from the source's"),
    });
    let reused: Vec<&String> = facts
        .host_key_fingerprints
        .iter()
        .filter(|f| exp.source_host_key_fingerprints.contains(f))
        .collect();
    checks.push(if !reused.is_empty() {
        check(
            KEYS,
            false,
            format!("source host key(s) present: {reused:?}"),
        )
    } else if facts.host_key_fingerprints.is_empty() && !exp.source_host_key_fingerprints.is_empty()
    {
        check(KEYS, false, "the source had host keys; this host has none")
    } else {
        check(
            KEYS,
            true,
            format!(
                "{} key(s), none from the source",
                facts.host_key_fingerprints.len()
            ),
        )
    });
    checks
}

/// Every unit the policy disables is masked (a link to `/dev/null` in
/// `/etc/systemd/system`), so nothing can start it; on a live host it is
/// also not running.
fn services_check(root: &Root, policy: &Policy, live: bool) -> Check {
    const NAME: &str = "services as the policy asked";
    if !policy.steps.selects(StepName::Services) {
        return check(NAME, true, "services step not selected by the policy");
    }
    let units = &policy.services.disable;
    if units.is_empty() {
        return check(NAME, true, "the policy disables no service");
    }
    let mut problems = Vec::new();
    for unit in units {
        let rel = PathBuf::from("etc/systemd/system").join(unit);
        match safefs::read_link_beneath(root, &rel) {
            Ok(Some(t)) if t == Path::new("/dev/null") => {}
            Ok(Some(t)) => {
                problems.push(format!("{unit} is not masked (links to {})", t.display()))
            }
            Ok(None) => problems.push(format!("{unit} is not masked")),
            Err(e) if safefs::os_error(&e) == Some(nix::libc::EINVAL) => {
                problems.push(format!("{unit} is not masked (a unit file overrides it)"))
            }
            Err(e) => problems.push(format!("{unit}: {e}")),
        }
        if live {
            match std::process::Command::new("systemctl")
                .args(["is-active", "--", unit])
                .output()
            {
                Ok(out) => {
                    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    if matches!(
                        state.as_str(),
                        "active" | "activating" | "reloading" | "refreshing"
                    ) {
                        problems.push(format!("{unit} is {state}"));
                    }
                }
                Err(e) => problems.push(format!("{unit}: systemctl is-active: {e}")),
            }
        }
    }
    if problems.is_empty() {
        check(
            NAME,
            true,
            format!("{} unit(s) masked: {}", units.len(), units.join(", ")),
        )
    } else {
        check(NAME, false, problems.join("; "))
    }
}

/// The secret scan of the booted disk finds nothing beyond the policy's
/// baseline and the keys an instance is expected to hold (the agent's
/// client key, its own fresh SSH host keys).
fn scan_check(
    root: &Root,
    policy: &Policy,
    fingerprint_key: Option<crate::scan::FingerprintKey>,
) -> Check {
    const NAME: &str = "scan clean";
    if !policy.steps.selects(StepName::Scan) {
        return check(NAME, true, "scan step not selected by the policy");
    }
    let key = fingerprint_key.unwrap_or_else(crate::scan::FingerprintKey::random);
    let baseline = match crate::steps::scan::policy_baseline(policy, &key) {
        Ok(b) => b,
        Err(e) => return check(NAME, false, e),
    };
    let (report, set_aside) =
        match crate::steps::scan::policy_scan(root, policy, baseline, &HOST_PRIVATE_KEYS, key) {
            Ok(r) => r,
            Err(e) => return check(NAME, false, format!("scan failed: {e}")),
        };
    let mut problems = Vec::new();
    if !report.findings.is_empty() {
        let listed: Vec<String> = report
            .findings
            .iter()
            .take(LISTED)
            .map(|f| format!("{} at {}:{} ({})", f.rule, f.path, f.line, f.preview))
            .collect();
        problems.push(format!(
            "{} credential finding(s): {}{}",
            report.findings.len(),
            listed.join(", "),
            if report.findings.len() > LISTED {
                ", ..."
            } else {
                ""
            }
        ));
    }
    if !report.unscanned.is_empty() {
        let listed: Vec<String> = report
            .unscanned
            .iter()
            .take(LISTED)
            .map(|u| format!("{} ({})", u.path, u.reason))
            .collect();
        problems.push(format!(
            "{} path(s) could not be scanned: {}{}",
            report.unscanned.len(),
            listed.join(", "),
            if report.unscanned.len() > LISTED {
                ", ..."
            } else {
                ""
            }
        ));
    }
    if problems.is_empty() {
        check(
            NAME,
            true,
            format!(
                "{} file(s) scanned, no finding ({} accepted by the baseline, {} expected key(s))",
                report.stats.files,
                report.accepted.len(),
                set_aside.len()
            ),
        )
    } else {
        check(NAME, false, problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhS8lJ1vQ3c5O2pY3Yv6bJvY2c1bXlFZHRrZ2VuVGVz root@host\n";

    /// A PKCS#8 body the private-key rules accept (not a usable key).
    const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVcB/UNPxalR9zDYA\njQIfjojUDiQuGnSJrFEEzZPT/92hRANCAASc7UJtgnF/abqWM60T3XNJEzBv5ez9\n-----END PRIVATE KEY-----\n";

    fn host(machine_id: &str, host_key: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/ssh")).unwrap();
        std::fs::create_dir_all(d.path().join("etc/systemd/system")).unwrap();
        std::fs::write(d.path().join("etc/machine-id"), format!("{machine_id}\n")).unwrap();
        if let Some(k) = host_key {
            std::fs::write(d.path().join("etc/ssh/ssh_host_ed25519_key.pub"), k).unwrap();
        }
        d
    }

    fn expectations(source: &Path, policy: &str) -> VerifyExpectations {
        let facts = identity_facts(source);
        VerifyExpectations {
            source_machine_id_sha256: facts.machine_id_sha256.clone().unwrap(),
            source_host_key_fingerprints: facts.host_key_fingerprints.clone(),
            policy_toml: policy.into(),
        }
    }

    fn failing(r: &VerifyResult) -> Vec<&str> {
        r.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn tells_a_regenerated_identity_from_a_copied_one() {
        let source = host("0123456789abcdef0123456789abcdef", Some(KEY));
        let exp = expectations(source.path(), "");
        // A clone that kept the source's identity fails both identity checks.
        let r = verify(source.path(), "p", &exp, None);
        assert!(!r.ok);
        assert_eq!(
            failing(&r),
            ["machine-id regenerated", "ssh host keys regenerated"]
        );
        // A clone with a new machine id and no host keys fails on the keys.
        let clone = host("fedcba9876543210fedcba9876543210", None);
        let r = verify(clone.path(), "p", &exp, None);
        assert_eq!(failing(&r), ["ssh host keys regenerated"], "{r:?}");
        // ... and passes once it has keys of its own.
        let other = KEY.replace("AAAAIHhS8", "AAAAIHhS9");
        std::fs::write(clone.path().join("etc/ssh/ssh_host_ed25519_key.pub"), other).unwrap();
        let r = verify(clone.path(), "p", &exp, None);
        assert!(r.ok, "{r:?}");
        // An uninitialized machine id is not a regenerated one.
        std::fs::write(clone.path().join("etc/machine-id"), "uninitialized\n").unwrap();
        assert_eq!(
            failing(&verify(clone.path(), "p", &exp, None)),
            ["machine-id regenerated"]
        );
    }

    #[test]
    fn a_credential_on_the_canary_fails_the_scan_check_without_showing_it() {
        let source = host("0123456789abcdef0123456789abcdef", Some(KEY));
        let exp = expectations(source.path(), "");
        let canary = host(
            "fedcba9876543210fedcba9876543210",
            Some(&KEY.replace("AAAAIHhS8", "AAAAIHhS9")),
        );
        // Its own fresh host key and the agent's client key are expected.
        std::fs::write(canary.path().join("etc/ssh/ssh_host_ed25519_key"), PRIVATE).unwrap();
        std::fs::create_dir_all(canary.path().join("etc/amiprep/pki")).unwrap();
        std::fs::write(canary.path().join("etc/amiprep/pki/agent.key"), PRIVATE).unwrap();
        let r = verify(canary.path(), "p", &exp, None);
        assert!(r.ok, "{r:?}");
        let scan = r.checks.iter().find(|c| c.name == "scan clean").unwrap();
        assert!(scan.detail.contains("2 expected key(s)"), "{scan:?}");
        // The same key anywhere else is a finding, and so is a token.
        let secret = format!("{}{}", "ghp_", "R8kLmN3pQ5tV7wX9yZ2aB4cD6eF8gH0iJ1kL");
        std::fs::create_dir_all(canary.path().join("root")).unwrap();
        std::fs::write(canary.path().join("root/id_ecdsa"), PRIVATE).unwrap();
        std::fs::write(
            canary.path().join("root/.netrc"),
            format!("machine github.com login ci password {secret}\n"),
        )
        .unwrap();
        let r = verify(canary.path(), "p", &exp, None);
        assert_eq!(failing(&r), ["scan clean"], "{r:?}");
        let detail = &r.checks.iter().find(|c| !c.ok).unwrap().detail;
        assert!(detail.contains("root/id_ecdsa"), "{detail}");
        assert!(detail.contains("root/.netrc"), "{detail}");
        assert!(!format!("{r:?}").contains(&secret), "secret shown: {r:?}");
        // A policy that skips the scan does not ask for it on the canary.
        let exp = VerifyExpectations {
            policy_toml: "[steps]\nskip = [\"scan\"]\n".into(),
            ..exp
        };
        let r = verify(canary.path(), "p", &exp, None);
        assert!(r.ok, "{r:?}");
    }

    #[test]
    fn services_the_policy_disables_must_be_masked() {
        let source = host("0123456789abcdef0123456789abcdef", None);
        let policy = "[services]\ndisable = [\"cups.service\", \"getty@tty1.service\"]\n";
        let exp = expectations(source.path(), policy);
        let canary = host("fedcba9876543210fedcba9876543210", None);
        let units = canary.path().join("etc/systemd/system");
        std::os::unix::fs::symlink("/dev/null", units.join("cups.service")).unwrap();
        // Not masked at all.
        let r = verify(canary.path(), "p", &exp, None);
        assert_eq!(failing(&r), ["services as the policy asked"]);
        let detail = &r.checks.iter().find(|c| !c.ok).unwrap().detail;
        assert_eq!(detail, "getty@tty1.service is not masked", "{r:?}");
        // A unit file in /etc overrides: not masked either.
        std::fs::write(units.join("getty@tty1.service"), "[Unit]\n").unwrap();
        let r = verify(canary.path(), "p", &exp, None);
        assert!(
            r.checks
                .iter()
                .any(|c| c.detail.contains("a unit file overrides it")),
            "{r:?}"
        );
        std::fs::remove_file(units.join("getty@tty1.service")).unwrap();
        std::os::unix::fs::symlink("/dev/null", units.join("getty@tty1.service")).unwrap();
        let r = verify(canary.path(), "p", &exp, None);
        assert!(r.ok, "{r:?}");
    }

    #[test]
    fn a_bad_policy_is_an_error_not_a_pass() {
        let source = host("0123456789abcdef0123456789abcdef", None);
        let exp = expectations(source.path(), "[nope]\n");
        let r = verify(source.path(), "p", &exp, None);
        assert!(!r.ok);
        assert!(r.error.contains("nope"), "{r:?}");
    }
}
