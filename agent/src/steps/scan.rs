//! scan: the secret scan, last of all steps so it sees the disk as it will
//! be imaged. Findings not accepted by the policy's baseline make the host
//! not ready. Only masked previews and fingerprints are reported.

use super::{Ctx, Plan, ProgressEvent, Step, StepReport};
use crate::{
    policy::Policy,
    safefs::Root,
    scan::{Baseline, Finding, FingerprintKey, ScanOptions, ScanReport, key, scan_root},
};

pub struct Scan;

impl Step for Scan {
    fn name(&self) -> &'static str {
        "scan"
    }

    /// The scan changes nothing, so its plan has no actions.
    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let mut plan = Plan::default();
        let key = scan_key(cx);
        if let Err(e) = policy_baseline(cx.policy, &key) {
            plan.errors.push(e);
        }
        plan
    }

    fn apply(
        &self,
        cx: &Ctx<'_>,
        plan: Plan,
        out: &mut StepReport,
        progress: &mut dyn FnMut(ProgressEvent),
    ) {
        if !plan.errors.is_empty() {
            out.errors.extend(plan.errors);
            return;
        }
        let key = scan_key(cx);
        let baseline = match policy_baseline(cx.policy, &key) {
            Ok(b) => b,
            Err(e) => {
                out.errors.push(e);
                return;
            }
        };
        progress(ProgressEvent::Action {
            step: "scan".into(),
            index: 0,
            total: 1,
            target: "secret scan of the whole root".into(),
        });
        if key.is_ephemeral() {
            out.warnings.push(key::EPHEMERAL_NOTE.to_owned());
        }
        match policy_scan(cx.root, cx.policy, baseline, &[], key) {
            Ok((report, expected)) => {
                if !report.findings.is_empty() {
                    out.errors.push(format!(
                        "{} credential finding(s) not accepted by the baseline",
                        report.findings.len()
                    ));
                }
                // A scan that could not read everything cannot call the host
                // clean, unless the policy accepts those paths.
                if !report.unscanned.is_empty() {
                    out.errors.push(format!(
                        "{} path(s) could not be scanned (listed under `unscanned`; \
                         scan.accept_unscanned accepts a path)",
                        report.unscanned.len()
                    ));
                }
                for u in report.unscanned.iter().take(20) {
                    out.warnings
                        .push(format!("not scanned: {}: {}", u.path, u.reason));
                }
                for (key, value) in [
                    ("findings", serde_json::to_value(&report.findings)),
                    ("accepted", serde_json::to_value(&report.accepted)),
                    ("expected_keys", serde_json::to_value(&expected)),
                    ("stats", serde_json::to_value(&report.stats)),
                    (
                        "fingerprint_key_id",
                        serde_json::to_value(&report.fingerprint_key_id),
                    ),
                    ("unscanned", serde_json::to_value(&report.unscanned)),
                    (
                        "accepted_unscanned",
                        serde_json::to_value(&report.accepted_unscanned),
                    ),
                ] {
                    if let Ok(v) = value {
                        out.details.insert(key.into(), v);
                    }
                }
            }
            Err(e) => out.errors.push(format!("scan failed: {e}")),
        }
    }
}

/// The scan as a policy asks for it, on the prepare step and on a canary:
/// its file size limit and `baseline`, with the private keys the image may
/// carry set aside — the policy's `expected_keys`, the running agent's own
/// client key when it lies beneath the root, and `also_expected`. Returns
/// the report and the findings set aside.
pub fn policy_scan(
    root: &Root,
    policy: &Policy,
    baseline: Option<Baseline>,
    also_expected: &[&str],
    key: FingerprintKey,
) -> std::io::Result<(ScanReport, Vec<Finding>)> {
    let opts = ScanOptions {
        fingerprint_key: Some(key),
        max_file_size: policy.scan.max_file_size,
        baseline,
        accept_unscanned: policy.scan.accept_unscanned.clone(),
        ..ScanOptions::default()
    };
    let mut report = scan_root(root, &opts)?;
    let mut expected: Vec<String> = policy
        .scan
        .expected_keys
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    expected.extend(crate::requests::own_key());
    expected.extend(also_expected.iter().map(|k| (*k).to_owned()));
    let set_aside = report.set_aside_expected_keys(&expected);
    Ok((report, set_aside))
}

/// The key the scan step fingerprints under: the one the request or the
/// command line gave, else a random one for this run.
fn scan_key(cx: &Ctx<'_>) -> FingerprintKey {
    cx.fingerprint_key
        .clone()
        .unwrap_or_else(FingerprintKey::random)
}

/// The policy's baseline, loaded and checked against `key` (a baseline made
/// under another key is refused); `None` when it names none.
pub fn policy_baseline(policy: &Policy, key: &FingerprintKey) -> Result<Option<Baseline>, String> {
    let Some(path) = policy.scan.baseline.as_deref() else {
        return Ok(None);
    };
    let b = load_baseline(path)?;
    b.check_key(key)
        .map_err(|e| format!("scan baseline {}: {e}", path.display()))?;
    Ok(Some(b))
}

fn load_baseline(path: &std::path::Path) -> Result<Baseline, String> {
    Baseline::load(path).map_err(|e| format!("scan baseline: {e:#}"))
}
