//! scan: the secret scan, last of all steps so it sees the disk as it will
//! be imaged. Findings not accepted by the policy's baseline make the host
//! not ready. Only masked previews and fingerprints are reported.

use super::{Ctx, Plan, ProgressEvent, Step, StepReport};
use crate::scan::{Baseline, ScanOptions, scan_root};

pub struct Scan;

impl Step for Scan {
    fn name(&self) -> &'static str {
        "scan"
    }

    /// The scan changes nothing, so its plan has no actions.
    fn plan(&self, cx: &Ctx<'_>) -> Plan {
        let mut plan = Plan::default();
        if let Some(path) = &cx.policy.scan.baseline
            && let Err(e) = load_baseline(path)
        {
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
        let baseline = match cx.policy.scan.baseline.as_deref().map(load_baseline) {
            Some(Ok(b)) => Some(b),
            Some(Err(e)) => {
                out.errors.push(e);
                return;
            }
            None => None,
        };
        progress(ProgressEvent::Action {
            step: "scan".into(),
            index: 0,
            total: 1,
            target: "secret scan of the whole root".into(),
        });
        let opts = ScanOptions {
            max_file_size: cx.policy.scan.max_file_size,
            baseline,
            ..ScanOptions::default()
        };
        match scan_root(cx.root, &opts) {
            Ok(mut report) => {
                let expected = report.set_aside_expected_keys(&expected_keys(cx.policy));
                if !report.findings.is_empty() {
                    out.errors.push(format!(
                        "{} credential finding(s) not accepted by the baseline",
                        report.findings.len()
                    ));
                }
                // A scan that could not read everything cannot call the host clean.
                if report.stats.errors > 0 {
                    out.errors.push(format!(
                        "{} path(s) could not be scanned",
                        report.stats.errors
                    ));
                }
                for p in report.problems.iter().take(20) {
                    out.warnings.push(p.clone());
                }
                for (key, value) in [
                    ("findings", serde_json::to_value(&report.findings)),
                    ("accepted", serde_json::to_value(&report.accepted)),
                    ("expected_keys", serde_json::to_value(&expected)),
                    ("stats", serde_json::to_value(&report.stats)),
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

/// The private keys the image may carry: the policy's, plus the running
/// agent's own client key when it lies beneath the root being prepared.
pub fn expected_keys(policy: &crate::policy::Policy) -> Vec<String> {
    let mut keys: Vec<String> = policy
        .scan
        .expected_keys
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if let Some(own) = crate::requests::own_key() {
        keys.push(own);
    }
    keys
}

pub fn load_baseline(path: &std::path::Path) -> Result<Baseline, String> {
    Baseline::load(path).map_err(|e| format!("scan baseline: {e:#}"))
}
