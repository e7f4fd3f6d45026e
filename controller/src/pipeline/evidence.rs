//! The evidence a promotion keeps: the report stored with the image (and
//! hashed into its `amiprep:report-sha256` tag) and the manifest written when
//! it is promoted. Both are serde structs, written and read through the same
//! types. Fields are declared in alphabetical order so the JSON is the same,
//! byte for byte, as the object maps earlier versions wrote (and digested).

use std::collections::BTreeMap;

use amiprep_proto::v1::Report;
use serde::{Deserialize, Serialize};

use crate::{
    state::ResourceKind,
    store::{Event, PromotionRecord},
};

/// The source's identity before prepare reset it; a canary proves its own
/// differs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    #[serde(default)]
    pub host_key_fingerprints: Vec<String>,
    #[serde(default)]
    pub machine_id_sha256: String,
}

/// One credential finding, without the secret (a masked preview and a keyed
/// fingerprint only).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingEvidence {
    pub column: u32,
    pub fingerprint: String,
    pub line: u32,
    pub path: String,
    pub preview: String,
    pub rule: String,
}

/// What is kept with the image: the agent's report plus the source identity.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(default)]
    pub findings: Vec<FindingEvidence>,
    pub promotion: String,
    pub ready: bool,
    /// The agent's own report (its JSON), or its text if it was not JSON.
    #[serde(default)]
    pub report: serde_json::Value,
    #[serde(default)]
    pub source_identity: SourceIdentity,
    pub source_instance: String,
}

impl Evidence {
    pub fn from_report(promotion: &str, source: &str, report: &Report) -> Self {
        Evidence {
            findings: report
                .findings
                .iter()
                .map(|f| FindingEvidence {
                    column: f.column,
                    fingerprint: f.fingerprint.clone(),
                    line: f.line,
                    path: f.path.clone(),
                    preview: f.preview.clone(),
                    rule: f.rule.clone(),
                })
                .collect(),
            promotion: promotion.to_owned(),
            ready: report.ready,
            report: serde_json::from_str(&report.report_json)
                .unwrap_or_else(|_| serde_json::Value::String(report.report_json.clone())),
            source_identity: SourceIdentity {
                host_key_fingerprints: report.source_host_key_fingerprints.clone(),
                machine_id_sha256: report.source_machine_id_sha256.clone(),
            },
            source_instance: source.to_owned(),
        }
    }

    /// The stored form (what the digest covers).
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }

    /// The evidence stored with a record; `None` when there is none or it
    /// cannot be read.
    pub fn of(rec: &PromotionRecord) -> Option<Self> {
        serde_json::from_str(rec.report_json.as_deref()?).ok()
    }
}

/// One snapshot in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSnapshot {
    pub id: String,
    pub region: String,
}

/// The manifest written for a promoted image (`<manifest_dir>/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Region → AMI id (the image and its copies).
    pub amis: BTreeMap<String, String>,
    pub canary: bool,
    pub name: String,
    pub promoted_at: String,
    pub promotion: String,
    pub report_sha256: String,
    pub snapshots: Vec<ManifestSnapshot>,
    pub source_instance: String,
    /// State → milliseconds spent in it.
    pub step_timings_ms: BTreeMap<String, u64>,
}

impl Manifest {
    pub fn new(rec: &PromotionRecord, events: &[Event], digest: &str, promoted_at: String) -> Self {
        // A state's time runs from its first event to the next state's
        // first event (notes in between, such as progress, do not restart it).
        let mut step_timings_ms = BTreeMap::new();
        let mut entered: Option<&Event> = None;
        for e in events {
            match entered {
                Some(first) if first.state == e.state => {}
                Some(first) => {
                    let ms = e.at_ms.saturating_sub(first.at_ms);
                    *step_timings_ms.entry(first.state.clone()).or_insert(0) += ms;
                    entered = Some(e);
                }
                None => entered = Some(e),
            }
        }
        Manifest {
            amis: rec
                .resources
                .iter()
                .filter(|r| matches!(r.kind, ResourceKind::Image | ResourceKind::Copy))
                .map(|r| (r.region.clone(), r.id.clone()))
                .collect(),
            canary: rec.spec.canary,
            name: rec.spec.name.clone(),
            promoted_at,
            promotion: rec.id.clone(),
            report_sha256: digest.to_owned(),
            snapshots: rec
                .resources
                .iter()
                .filter(|r| matches!(r.kind, ResourceKind::Snapshot | ResourceKind::CopySnapshot))
                .map(|r| ManifestSnapshot {
                    id: r.id.clone(),
                    region: r.region.clone(),
                })
                .collect(),
            source_instance: rec.spec.instance_id.clone(),
            step_timings_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::PromotionState,
        store::{PromotionSpec, Resource},
    };
    use amiprep_proto::v1::Finding;

    /// The struct writes what the earlier `json!` maps wrote, key for key
    /// and byte for byte (so a digest over it is unchanged).
    #[test]
    fn evidence_json_matches_the_earlier_shape() {
        let report = Report {
            ready: false,
            findings: vec![Finding {
                rule: "r".into(),
                path: "/p".into(),
                line: 3,
                column: 4,
                fingerprint: "fp".into(),
                preview: "AK…".into(),
            }],
            report_json: r#"{"steps":[]}"#.into(),
            source_machine_id_sha256: "m".into(),
            source_host_key_fingerprints: vec!["k".into()],
            ..Default::default()
        };
        let e = Evidence::from_report("p1", "i-1", &report);
        let earlier = serde_json::json!({
            "promotion": "p1",
            "source_instance": "i-1",
            "ready": false,
            "source_identity": {
                "machine_id_sha256": "m",
                "host_key_fingerprints": ["k"],
            },
            "findings": [{
                "rule": "r", "path": "/p", "line": 3, "column": 4,
                "fingerprint": "fp", "preview": "AK…",
            }],
            "report": {"steps": []},
        });
        assert_eq!(
            e.to_json().unwrap(),
            serde_json::to_string(&earlier).unwrap()
        );
        let back: Evidence = serde_json::from_str(&e.to_json().unwrap()).unwrap();
        assert_eq!(back, e);
        // A report that is not JSON is kept as text.
        let text = Report {
            report_json: "not json".into(),
            ..Default::default()
        };
        assert_eq!(
            Evidence::from_report("p", "i", &text).report,
            serde_json::Value::String("not json".into())
        );
    }

    #[test]
    fn manifest_lists_amis_snapshots_and_time_per_state() {
        let res = |kind, region: &str, id: &str| Resource {
            kind,
            region: region.into(),
            id: id.into(),
            deleted: false,
        };
        let rec = PromotionRecord {
            id: "p1".into(),
            spec: PromotionSpec {
                instance_id: "i-1".into(),
                name: "web".into(),
                canary: true,
                ..Default::default()
            },
            region: "us-east-1".into(),
            state: PromotionState::Promoting,
            failed_in: None,
            failure_reason: None,
            cancel_requested: false,
            report_json: None,
            report_sha256: None,
            manifest_path: None,
            created_ms: 0,
            updated_ms: 0,
            resources: vec![
                res(ResourceKind::Image, "us-east-1", "ami-1"),
                res(ResourceKind::Snapshot, "us-east-1", "snap-1"),
                res(ResourceKind::Canary, "us-east-1", "i-c"),
                res(ResourceKind::Copy, "us-west-2", "ami-2"),
                res(ResourceKind::CopySnapshot, "us-west-2", "snap-2"),
            ],
            last_message: String::new(),
        };
        let ev = |seq, at_ms, state: &str| Event {
            seq,
            at_ms,
            state: state.into(),
            message: String::new(),
        };
        let events = vec![
            ev(1, 0, "pending"),
            ev(2, 10, "preparing"),
            ev(3, 15, "preparing"),
            ev(4, 40, "stopping"),
            ev(5, 100, "promoting"),
        ];
        let m = Manifest::new(&rec, &events, "d", "2026-01-01T00:00:00Z".into());
        let v: serde_json::Value = serde_json::to_value(&m).unwrap();
        assert_eq!(v["amis"]["us-east-1"], "ami-1");
        assert_eq!(v["amis"]["us-west-2"], "ami-2");
        assert_eq!(v["snapshots"][1]["region"], "us-west-2");
        assert_eq!(v["step_timings_ms"]["pending"], 10);
        assert_eq!(v["step_timings_ms"]["preparing"], 30);
        assert_eq!(v["step_timings_ms"]["stopping"], 60);
        assert_eq!(v["canary"], true);
        assert_eq!(v["source_instance"], "i-1");
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }
}
