//! The pipeline's decisions, as pure functions over facts: no cloud call, no
//! store write, no clock. The steps gather the facts (what EC2 says, what
//! the record holds), ask here what to do, and do it; so every choice the
//! pipeline makes — including what a resumed step does with what an earlier
//! run left behind — is unit-tested here.

use std::time::Duration;

use amiprep_proto::v1::{Report, VerifyResult};

use crate::{
    cloud::{ImageFacts, ImageState, InstanceHealth, InstanceState, SnapshotState},
    state::{After, PromotionState, ResourceKind},
    store::{PromotionSpec, Resource},
};

use super::{TAG_PROMOTION, TAG_REPORT, TAG_ROLE, TAG_SOURCE, TAG_STATUS};

/// Before prepare: may the promotion use the source in this state?
/// `Err` is the reason it fails.
pub fn source_usable(
    source: &str,
    region: &str,
    state: Option<&InstanceState>,
) -> Result<(), String> {
    match state {
        None => Err(format!("instance {source} not found in {region}")),
        Some(s) if s.is_gone() => Err(format!("instance {source} is {s}")),
        Some(InstanceState::Running) => Ok(()),
        Some(s) => Err(format!(
            "instance {source} is {s}, not running; promotion needs its agent"
        )),
    }
}

/// What the stop step does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopAction {
    /// Stopped: move on.
    Done,
    /// Ask EC2 to stop it (once per run of the step).
    RequestStop,
    /// On its way; poll again.
    Wait,
    /// It cannot be stopped into an image any more.
    Fail(String),
}

/// The stop step, given the source's state and whether this run of the step
/// has asked EC2 to stop it already.
pub fn stop_action(source: &str, state: &InstanceState, asked: bool) -> StopAction {
    match state {
        InstanceState::Stopped => StopAction::Done,
        s if s.is_gone() => StopAction::Fail(format!("instance {source} was terminated mid-way")),
        InstanceState::Running | InstanceState::Pending if !asked => StopAction::RequestStop,
        _ => StopAction::Wait,
    }
}

/// What to do with the source instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceAction {
    Start,
    Terminate,
}

/// After a successful promotion: `--after` decides.
pub fn after_promotion(after: After) -> Option<SourceAction> {
    match after {
        After::Stop => None,
        After::Start => Some(SourceAction::Start),
        After::Terminate => Some(SourceAction::Terminate),
    }
}

/// After a failure or cancel: what becomes of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The promotion never stopped it.
    Untouched,
    /// It no longer exists.
    Gone,
    /// Start it again (`--after start`).
    Start,
    /// Still stopping under `--after start`: try again once it has stopped.
    WaitStopped,
    /// Left stopped (the default).
    LeftStopped,
    /// Anything else: say what it is.
    Is(InstanceState),
}

/// A promotion that got as far as stopping the source starts it again only
/// under `--after start`; a failed promotion never terminates it.
pub fn settle_source(
    failed_in: Option<PromotionState>,
    state: Option<&InstanceState>,
    after: After,
) -> Settle {
    if matches!(
        failed_in,
        None | Some(PromotionState::Pending | PromotionState::Preparing)
    ) {
        return Settle::Untouched;
    }
    let start = after == After::Start;
    match state {
        None => Settle::Gone,
        Some(InstanceState::Stopped) if start => Settle::Start,
        Some(InstanceState::Stopping) if start => Settle::WaitStopped,
        Some(InstanceState::Stopped | InstanceState::Stopping) => Settle::LeftStopped,
        Some(other) => Settle::Is(other.clone()),
    }
}

/// Whether a prepare report lets the promotion go on: `Err` is the reason
/// it fails.
pub fn report_gate(report: &Report) -> Result<(), String> {
    if !report.error.is_empty() {
        return Err(format!("prepare could not run: {}", report.error));
    }
    if report.ready {
        return Ok(());
    }
    let failed: Vec<String> = report
        .steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| format!("step {} failed: {}", s.name, s.errors.join("; ")))
        .collect();
    let findings: Vec<String> = report
        .findings
        .iter()
        .map(|f| format!("{} at {}:{} ({})", f.rule, f.path, f.line, f.preview))
        .collect();
    let mut reason = String::from("host not ready");
    if !failed.is_empty() {
        reason.push_str(&format!("; {}", failed.join("; ")));
    }
    if !findings.is_empty() {
        reason.push_str(&format!(
            "; {} credential finding(s): {}",
            findings.len(),
            findings.join(", ")
        ));
    }
    Err(reason)
}

/// While waiting for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageWait {
    Available,
    Wait,
    Fail(String),
}

pub fn image_wait(facts: &ImageFacts) -> ImageWait {
    match &facts.state {
        ImageState::Available => ImageWait::Available,
        s if s.is_broken() => ImageWait::Fail(format!(
            "image {} is {s}{}",
            facts.image_id,
            facts
                .state_reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )),
        _ => ImageWait::Wait,
    }
}

/// What verification requires of an image beyond being usable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageRequirements {
    pub ena: bool,
    pub encrypted: bool,
    pub boot_mode: Option<String>,
}

/// The problems an image's facts show; empty means it passes.
pub fn image_problems(
    facts: &ImageFacts,
    snapshots: &[(String, SnapshotState)],
    req: &ImageRequirements,
) -> Vec<String> {
    let mut problems = Vec::new();
    if facts.state != ImageState::Available {
        problems.push(format!("state is {}", facts.state));
    }
    if facts
        .root_device_name
        .as_deref()
        .unwrap_or_default()
        .is_empty()
    {
        problems.push("no root device".to_owned());
    }
    if facts.snapshot_ids.is_empty() {
        problems.push("no snapshots".to_owned());
    }
    for (id, state) in snapshots {
        if *state != SnapshotState::Completed {
            problems.push(format!("snapshot {id} is {state}"));
        }
    }
    if req.ena && facts.ena_support != Some(true) {
        problems.push("ENA support required".to_owned());
    }
    if req.encrypted && !facts.encrypted {
        problems.push("encryption required".to_owned());
    }
    if let Some(mode) = &req.boot_mode
        && facts.boot_mode.as_deref() != Some(mode.as_str())
    {
        problems.push(format!(
            "boot mode {mode} required, image has {}",
            facts.boot_mode.as_deref().unwrap_or("none")
        ));
    }
    problems
}

/// A canary on its way to serving its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryHealth {
    /// Running with both status checks ok.
    Healthy,
    Wait,
    Fail(String),
}

pub fn canary_health(canary: &str, health: Option<&InstanceHealth>) -> CanaryHealth {
    match health {
        Some(h) if h.state == InstanceState::Running && h.status_ok => CanaryHealth::Healthy,
        Some(h) if h.state.is_gone() => {
            CanaryHealth::Fail(format!("canary {canary} is {}", h.state))
        }
        _ => CanaryHealth::Wait,
    }
}

/// The canary agent's verdict: `Ok` lists the checks that passed, `Err` is
/// why the promotion fails.
pub fn canary_verdict(result: &VerifyResult) -> Result<String, String> {
    if !result.ok {
        let failed: Vec<String> = result
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(format!(
            "canary verification failed: {}{}",
            failed.join("; "),
            if result.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", result.error)
            }
        ));
    }
    Ok(result
        .checks
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", "))
}

/// Where a step that creates a resource stands, given what the record holds
/// and what a lookup by the promotion's tag found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopt {
    /// The record names it: use it.
    Recorded(String),
    /// An earlier run created it but died before recording it: record it.
    Found(String),
    /// Nothing exists yet: create it.
    Create,
}

/// The record wins over a lookup (a lookup just after a create may not see
/// the new resource yet); a lookup wins over creating a second one.
pub fn adopt(recorded: Option<&str>, found: &[String]) -> Adopt {
    match (recorded, found.first()) {
        (Some(id), _) => Adopt::Recorded(id.to_owned()),
        (None, Some(id)) => Adopt::Found(id.clone()),
        (None, None) => Adopt::Create,
    }
}

/// The image name is taken: by this promotion's own image (created by an
/// earlier run that died before recording it, and not yet visible to the
/// tag lookup), which is adopted; or by another image, which fails the
/// promotion.
pub fn name_holder(promotion: &str, name: &str, taken: &ImageFacts) -> Result<String, String> {
    if taken
        .tags
        .iter()
        .any(|(k, v)| k == TAG_PROMOTION && v == promotion)
    {
        Ok(taken.image_id.clone())
    } else {
        Err(format!(
            "AMI name {name:?} is already taken by {}",
            taken.image_id
        ))
    }
}

/// The live (not removed) resource of `kind` in `region` the record names.
pub fn recorded<'a>(
    resources: &'a [Resource],
    kind: ResourceKind,
    region: &str,
) -> Option<&'a str> {
    resources
        .iter()
        .find(|r| r.kind == kind && r.region == region && !r.deleted)
        .map(|r| r.id.as_str())
}

/// The resource a state's step creates, if any.
pub fn creates(state: PromotionState) -> Option<ResourceKind> {
    match state {
        PromotionState::CreatingImage => Some(ResourceKind::Image),
        PromotionState::LaunchingCanary => Some(ResourceKind::Canary),
        PromotionState::Distributing => Some(ResourceKind::Copy),
        _ => None,
    }
}

/// What cleanup does about one kind of resource in one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    /// Found by tag but not in the record: record before removing, so a
    /// crash in between still knows them.
    pub record: Vec<String>,
    /// Remove these (idempotent: removing what is gone succeeds).
    pub remove: Vec<String>,
}

/// Cleanup of `kind` in `region`: everything the record names and has not
/// removed, plus anything a tag lookup found (`found`), except `keep` (the
/// source instance, which carries no promotion tag but is never removed).
pub fn removal(
    resources: &[Resource],
    kind: ResourceKind,
    region: &str,
    found: &[String],
    keep: &str,
) -> Removal {
    let mut out = Removal::default();
    for r in resources
        .iter()
        .filter(|r| r.kind == kind && r.region == region && !r.deleted && r.id != keep)
    {
        if !out.remove.contains(&r.id) {
            out.remove.push(r.id.clone());
        }
    }
    for id in found {
        if id != keep && !out.remove.contains(id) {
            if !resources
                .iter()
                .any(|r| r.kind == kind && r.region == region && &r.id == id)
            {
                out.record.push(id.clone());
            }
            out.remove.push(id.clone());
        }
    }
    out
}

/// Snapshots of an image not yet in the record (recorded, then tagged).
pub fn new_snapshots(resources: &[Resource], kind: ResourceKind, listed: &[String]) -> Vec<String> {
    listed
        .iter()
        .filter(|s| !resources.iter().any(|r| r.kind == kind && &r.id == *s))
        .cloned()
        .collect()
}

/// The tags on everything a promotion creates: the promotion and source
/// tags (how lookups find it again), then the operator's tags (not in the
/// reserved `amiprep:` space), and a `Name` unless the operator gave one.
pub fn resource_tags(id: &str, spec: &PromotionSpec) -> Vec<(String, String)> {
    let mut tags = vec![
        (TAG_PROMOTION.to_owned(), id.to_owned()),
        (TAG_SOURCE.to_owned(), spec.instance_id.clone()),
    ];
    for (k, v) in &spec.tags {
        if !k.starts_with("amiprep:") {
            tags.push((k.clone(), v.clone()));
        }
    }
    if !spec.tags.iter().any(|(k, _)| k == "Name") {
        tags.push(("Name".to_owned(), spec.name.clone()));
    }
    tags
}

/// The canary's tags: the promotion's, with its role and its own `Name`.
pub fn canary_tags(id: &str, spec: &PromotionSpec) -> Vec<(String, String)> {
    let mut tags = resource_tags(id, spec);
    tags.retain(|(k, _)| k != "Name");
    tags.push((TAG_ROLE.to_owned(), "canary".to_owned()));
    tags.push(("Name".to_owned(), format!("amiprep canary {id}")));
    tags
}

/// The tags that mark the images and snapshots as verified.
pub fn verified_tags(id: &str, spec: &PromotionSpec, digest: &str) -> Vec<(String, String)> {
    let mut tags = resource_tags(id, spec);
    tags.push((TAG_STATUS.to_owned(), "verified".to_owned()));
    tags.push((TAG_REPORT.to_owned(), digest.to_owned()));
    tags
}

/// What the verified tags go on, by region: every live image part.
pub fn verified_targets(resources: &[Resource]) -> Vec<(String, Vec<String>)> {
    let mut by_region: Vec<(String, Vec<String>)> = Vec::new();
    for r in resources
        .iter()
        .filter(|r| !r.deleted && r.kind.is_image_part())
    {
        match by_region.iter_mut().find(|(reg, _)| reg == &r.region) {
            Some((_, ids)) => ids.push(r.id.clone()),
            None => by_region.push((r.region.clone(), vec![r.id.clone()])),
        }
    }
    by_region
}

/// After a transient failure: try again, or give up?
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transient {
    Retry,
    GiveUp(String),
}

/// A step that failed transiently `retries` times already gives up at
/// `max` with this reason.
pub fn on_transient(retries: u32, max: u32, why: &str) -> Transient {
    if retries >= max {
        Transient::GiveUp(format!("gave up after {retries} retries: {why}"))
    } else {
        Transient::Retry
    }
}

/// The ceiling of poll `attempt`'s wait: exponential from `initial_ms`,
/// capped at `max_ms` (the wait is drawn between half of it and all of it).
pub fn poll_ceiling_ms(initial_ms: u64, max_ms: u64, attempt: u32) -> u64 {
    initial_ms.saturating_mul(1 << attempt.min(16)).min(max_ms)
}

/// Time left of a `limit` for a state entered at `entered_ms`; a resumed
/// step gets what remains, not a fresh budget.
pub fn time_left(entered_ms: u64, now_ms: u64, limit: Duration) -> Duration {
    limit.saturating_sub(Duration::from_millis(now_ms.saturating_sub(entered_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ALL;
    use amiprep_proto::v1::{Finding, StepReport};

    const INSTANCE_STATES: [InstanceState; 6] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
    ];

    fn res(kind: ResourceKind, region: &str, id: &str, deleted: bool) -> Resource {
        Resource {
            kind,
            region: region.into(),
            id: id.into(),
            deleted,
        }
    }

    fn image(state: &str) -> ImageFacts {
        ImageFacts {
            image_id: "ami-1".into(),
            name: "web".into(),
            state: state.into(),
            state_reason: None,
            root_device_name: Some("/dev/xvda".into()),
            snapshot_ids: vec!["snap-1".into()],
            ena_support: Some(true),
            boot_mode: Some("uefi".into()),
            encrypted: true,
            tags: Vec::new(),
        }
    }

    #[test]
    fn only_a_running_source_can_be_prepared() {
        assert!(
            source_usable("i-1", "r", None)
                .unwrap_err()
                .contains("not found in r")
        );
        for s in INSTANCE_STATES {
            let got = source_usable("i-1", "r", Some(&s));
            match s {
                InstanceState::Running => assert_eq!(got, Ok(())),
                InstanceState::ShuttingDown | InstanceState::Terminated => {
                    assert_eq!(got, Err(format!("instance i-1 is {s}")))
                }
                _ => assert!(got.unwrap_err().contains("not running")),
            }
        }
        assert!(source_usable("i-1", "r", Some(&"weird".into())).is_err());
    }

    #[test]
    fn stop_asks_once_and_waits_for_stopped() {
        use InstanceState::*;
        for asked in [false, true] {
            for s in INSTANCE_STATES {
                let want = match (&s, asked) {
                    (Stopped, _) => StopAction::Done,
                    (ShuttingDown | Terminated, _) => {
                        StopAction::Fail("instance i-1 was terminated mid-way".into())
                    }
                    (Running | Pending, false) => StopAction::RequestStop,
                    _ => StopAction::Wait,
                };
                assert_eq!(stop_action("i-1", &s, asked), want, "{s} asked={asked}");
            }
        }
    }

    #[test]
    fn after_decides_what_a_promoted_source_becomes() {
        assert_eq!(after_promotion(After::Stop), None);
        assert_eq!(after_promotion(After::Start), Some(SourceAction::Start));
        assert_eq!(
            after_promotion(After::Terminate),
            Some(SourceAction::Terminate)
        );
    }

    #[test]
    fn a_failed_promotion_never_terminates_its_source() {
        for failed_in in ALL.into_iter().map(Some).chain([None]) {
            for after in [After::Stop, After::Start, After::Terminate] {
                for state in INSTANCE_STATES.iter().map(Some).chain([None]) {
                    let got = settle_source(failed_in, state, after);
                    let untouched = matches!(
                        failed_in,
                        None | Some(PromotionState::Pending | PromotionState::Preparing)
                    );
                    let want = if untouched {
                        Settle::Untouched
                    } else {
                        match (state, after) {
                            (None, _) => Settle::Gone,
                            (Some(InstanceState::Stopped), After::Start) => Settle::Start,
                            (Some(InstanceState::Stopping), After::Start) => Settle::WaitStopped,
                            (Some(InstanceState::Stopped | InstanceState::Stopping), _) => {
                                Settle::LeftStopped
                            }
                            (Some(s), _) => Settle::Is(s.clone()),
                        }
                    };
                    assert_eq!(got, want, "{failed_in:?} {after} {state:?}");
                }
            }
        }
    }

    #[test]
    fn report_gate_names_failed_steps_and_findings() {
        let ok = Report {
            ready: true,
            ..Default::default()
        };
        assert_eq!(report_gate(&ok), Ok(()));
        let broken = Report {
            ready: true,
            error: "bad policy".into(),
            ..Default::default()
        };
        assert_eq!(
            report_gate(&broken),
            Err("prepare could not run: bad policy".into())
        );
        let dirty = Report {
            ready: false,
            steps: vec![
                StepReport {
                    name: "packages".into(),
                    ok: false,
                    errors: vec!["apt failed".into()],
                    ..Default::default()
                },
                StepReport {
                    name: "cleanup".into(),
                    ok: true,
                    ..Default::default()
                },
            ],
            findings: vec![Finding {
                rule: "aws-key".into(),
                path: "/root/.aws/credentials".into(),
                line: 2,
                preview: "AKIA…".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            report_gate(&dirty),
            Err("host not ready; step packages failed: apt failed; 1 credential finding(s): aws-key at /root/.aws/credentials:2 (AKIA…)".into())
        );
        let not_ready = Report::default();
        assert_eq!(report_gate(&not_ready), Err("host not ready".into()));
    }

    #[test]
    fn canary_health_waits_for_running_and_ok() {
        let h = |state: &str, ok| InstanceHealth {
            state: state.into(),
            status_ok: ok,
        };
        assert_eq!(canary_health("i-c", None), CanaryHealth::Wait);
        assert_eq!(
            canary_health("i-c", Some(&h("pending", false))),
            CanaryHealth::Wait
        );
        assert_eq!(
            canary_health("i-c", Some(&h("running", false))),
            CanaryHealth::Wait
        );
        assert_eq!(
            canary_health("i-c", Some(&h("running", true))),
            CanaryHealth::Healthy
        );
        assert_eq!(
            canary_health("i-c", Some(&h("terminated", false))),
            CanaryHealth::Fail("canary i-c is terminated".into())
        );
        assert!(matches!(
            canary_health("i-c", Some(&h("shutting-down", true))),
            CanaryHealth::Fail(_)
        ));
    }

    #[test]
    fn canary_verdict_names_failed_checks() {
        use amiprep_proto::v1::Check;
        let check = |name: &str, ok| Check {
            name: name.into(),
            ok,
            detail: format!("{name} detail"),
        };
        let good = VerifyResult {
            ok: true,
            checks: vec![check("identity", true), check("boot", true)],
            ..Default::default()
        };
        assert_eq!(canary_verdict(&good), Ok("identity, boot".into()));
        let bad = VerifyResult {
            ok: false,
            checks: vec![check("identity", true), check("sshd", false)],
            error: "partial".into(),
            ..Default::default()
        };
        assert_eq!(
            canary_verdict(&bad),
            Err("canary verification failed: sshd: sshd detail (partial)".into())
        );
    }

    #[test]
    fn image_wait_fails_fast_on_broken_states() {
        assert_eq!(image_wait(&image("available")), ImageWait::Available);
        assert_eq!(image_wait(&image("pending")), ImageWait::Wait);
        assert_eq!(image_wait(&image("transient")), ImageWait::Wait);
        for s in ["failed", "error", "invalid", "deregistered"] {
            let mut f = image(s);
            f.state_reason = Some("quota".into());
            assert_eq!(
                image_wait(&f),
                ImageWait::Fail(format!("image ami-1 is {s}: quota"))
            );
        }
    }

    #[test]
    fn image_problems_lists_each_unmet_fact() {
        let done = vec![("snap-1".to_owned(), SnapshotState::Completed)];
        let all = ImageRequirements {
            ena: true,
            encrypted: true,
            boot_mode: Some("uefi".into()),
        };
        assert!(image_problems(&image("available"), &done, &all).is_empty());
        let mut bad = image("pending");
        bad.root_device_name = None;
        bad.ena_support = None;
        bad.encrypted = false;
        bad.boot_mode = None;
        let pending = vec![("snap-1".to_owned(), SnapshotState::Pending)];
        assert_eq!(
            image_problems(&bad, &pending, &all),
            vec![
                "state is pending",
                "no root device",
                "snapshot snap-1 is pending",
                "ENA support required",
                "encryption required",
                "boot mode uefi required, image has none",
            ]
        );
        // Not required: not a problem.
        assert_eq!(
            image_problems(&bad, &done, &ImageRequirements::default()),
            vec!["state is pending", "no root device"]
        );
        let mut none = image("available");
        none.snapshot_ids.clear();
        assert_eq!(
            image_problems(&none, &[], &ImageRequirements::default()),
            vec!["no snapshots"]
        );
    }

    /// Every state × resource recorded / found by tag / absent: the step of
    /// a state that creates something adopts what exists (record first,
    /// then tag) and creates only when neither has it; cleanup after a
    /// failure in that state removes exactly the union, recording what only
    /// the lookup knew; the source instance is never removed.
    #[test]
    fn resume_and_cleanup_at_every_state() {
        let region = "us-east-1";
        let source = "i-source";
        for state in ALL {
            for kind in ResourceKind::ALL {
                for (rec_live, rec_deleted, found) in [
                    (false, false, vec![]),
                    (true, false, vec![]),
                    (false, false, vec!["x-found".to_owned()]),
                    (true, false, vec!["x-rec".to_owned()]),
                    (true, false, vec!["x-found".to_owned()]),
                    (false, true, vec![]),
                    (false, true, vec!["x-rec".to_owned()]),
                    (false, false, vec![source.to_owned()]),
                ] {
                    let mut resources = vec![res(ResourceKind::Image, "other", "ami-o", false)];
                    if rec_live || rec_deleted {
                        resources.push(res(kind, region, "x-rec", rec_deleted));
                    }
                    let ctx = format!(
                        "{state} {kind} live={rec_live} deleted={rec_deleted} found={found:?}"
                    );
                    if creates(state) == Some(kind) {
                        let got = adopt(recorded(&resources, kind, region), &found);
                        let want = if rec_live {
                            Adopt::Recorded("x-rec".into())
                        } else if let Some(f) = found.first() {
                            Adopt::Found(f.clone())
                        } else {
                            Adopt::Create
                        };
                        assert_eq!(got, want, "{ctx}");
                    }
                    let plan = removal(&resources, kind, region, &found, source);
                    let mut want: Vec<String> = Vec::new();
                    if rec_live {
                        want.push("x-rec".into());
                    }
                    for f in &found {
                        if f != source && !want.contains(f) {
                            want.push(f.clone());
                        }
                    }
                    assert_eq!(plan.remove, want, "{ctx}");
                    let in_record = rec_live || rec_deleted;
                    let unknown: Vec<String> = found
                        .iter()
                        .filter(|f| *f != source && !(in_record && *f == "x-rec"))
                        .cloned()
                        .collect();
                    assert_eq!(plan.record, unknown, "{ctx}");
                    assert!(!plan.remove.iter().any(|r| r == source), "{ctx}");
                    assert!(!plan.remove.contains(&"ami-o".to_owned()), "{ctx}");
                }
            }
        }
    }

    #[test]
    fn a_taken_name_is_adopted_only_from_this_promotion() {
        let mut mine = image("pending");
        mine.tags = vec![(TAG_PROMOTION.into(), "p1".into())];
        assert_eq!(name_holder("p1", "web", &mine), Ok("ami-1".into()));
        assert_eq!(
            name_holder("p2", "web", &mine),
            Err("AMI name \"web\" is already taken by ami-1".into())
        );
        assert!(name_holder("p1", "web", &image("available")).is_err());
    }

    #[test]
    fn only_image_canary_and_copy_steps_create() {
        let creators: Vec<_> = ALL.into_iter().filter_map(creates).collect();
        assert_eq!(
            creators,
            vec![
                ResourceKind::Image,
                ResourceKind::Canary,
                ResourceKind::Copy
            ]
        );
    }

    #[test]
    fn snapshots_are_recorded_once() {
        let resources = vec![
            res(ResourceKind::Snapshot, "r", "snap-1", false),
            res(ResourceKind::CopySnapshot, "r2", "snap-2", false),
        ];
        let listed = vec![
            "snap-1".to_owned(),
            "snap-2".to_owned(),
            "snap-3".to_owned(),
        ];
        assert_eq!(
            new_snapshots(&resources, ResourceKind::Snapshot, &listed),
            vec!["snap-2", "snap-3"]
        );
        assert_eq!(
            new_snapshots(&resources, ResourceKind::CopySnapshot, &listed),
            vec!["snap-1", "snap-3"]
        );
    }

    #[test]
    fn tags_keep_the_reserved_space_and_a_name() {
        let spec = PromotionSpec {
            instance_id: "i-1".into(),
            name: "web-1".into(),
            tags: vec![
                ("team".into(), "a".into()),
                ("amiprep:status".into(), "verified".into()),
            ],
            ..Default::default()
        };
        let t = resource_tags("p1", &spec);
        assert_eq!(
            t,
            vec![
                (TAG_PROMOTION.to_owned(), "p1".to_owned()),
                (TAG_SOURCE.to_owned(), "i-1".to_owned()),
                ("team".to_owned(), "a".to_owned()),
                ("Name".to_owned(), "web-1".to_owned()),
            ]
        );
        let mut named = spec.clone();
        named.tags.push(("Name".into(), "mine".into()));
        let t = resource_tags("p1", &named);
        assert_eq!(t.iter().filter(|(k, _)| k == "Name").count(), 1);
        assert!(t.contains(&("Name".into(), "mine".into())));
        let c = canary_tags("p1", &named);
        assert!(c.contains(&("Name".into(), "amiprep canary p1".into())));
        assert!(c.contains(&(TAG_ROLE.into(), "canary".into())));
        assert_eq!(c.iter().filter(|(k, _)| k == "Name").count(), 1);
        let v = verified_tags("p1", &spec, "abc");
        assert!(v.contains(&(TAG_STATUS.into(), "verified".into())));
        assert!(v.contains(&(TAG_REPORT.into(), "abc".into())));
    }

    #[test]
    fn verified_tags_go_on_live_image_parts_by_region() {
        let resources = vec![
            res(ResourceKind::Image, "a", "ami-1", false),
            res(ResourceKind::Snapshot, "a", "snap-1", false),
            res(ResourceKind::Canary, "a", "i-c", true),
            res(ResourceKind::Copy, "b", "ami-2", false),
            res(ResourceKind::CopySnapshot, "b", "snap-2", false),
            res(ResourceKind::Snapshot, "a", "snap-old", true),
        ];
        assert_eq!(
            verified_targets(&resources),
            vec![
                (
                    "a".to_owned(),
                    vec!["ami-1".to_owned(), "snap-1".to_owned()]
                ),
                (
                    "b".to_owned(),
                    vec!["ami-2".to_owned(), "snap-2".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn gives_up_after_max_retries() {
        assert_eq!(on_transient(0, 3, "x"), Transient::Retry);
        assert_eq!(on_transient(2, 3, "x"), Transient::Retry);
        assert_eq!(
            on_transient(3, 3, "throttled"),
            Transient::GiveUp("gave up after 3 retries: throttled".into())
        );
        assert!(matches!(on_transient(0, 0, "x"), Transient::GiveUp(_)));
    }

    #[test]
    fn poll_backoff_and_deadlines() {
        assert_eq!(poll_ceiling_ms(100, 1000, 0), 100);
        assert_eq!(poll_ceiling_ms(100, 1000, 3), 800);
        assert_eq!(poll_ceiling_ms(100, 1000, 4), 1000);
        assert_eq!(poll_ceiling_ms(100, 1000, 99), 1000);
        assert_eq!(poll_ceiling_ms(u64::MAX, u64::MAX, 16), u64::MAX);
        let limit = Duration::from_secs(10);
        assert_eq!(time_left(1000, 1000, limit), limit);
        assert_eq!(time_left(1000, 4000, limit), Duration::from_secs(7));
        assert_eq!(time_left(1000, 99_000, limit), Duration::ZERO);
        // A clock that went backwards gives the full budget, not more.
        assert_eq!(time_left(5000, 1000, limit), limit);
    }
}
