//! Promotions: prepare → stop → create image → verify → canary → distribute
//! → promote, with cleanup of everything created when anything fails.
//!
//! Each promotion is driven by one task that loads its persisted record, runs
//! the step for the recorded state, and records the outcome before moving
//! on. Steps are idempotent — they look up what a previous run may already
//! have created (by the promotion's tag) before creating anything — so a
//! controller restarted at any point resumes without duplicates or orphans.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use amiprep_proto::v1::{Prepare, Verify, VerifyExpectations, controller_message};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    cloud::{Cloud, CloudError, ImageState, InstanceState, SnapshotState},
    config::PipelineSection,
    registry::{AgentEvent, Registry},
    state::{After, PromotionState, ResourceKind},
    store::{PromotionRecord, PromotionSpec, Store},
};

pub const TAG_PROMOTION: &str = "amiprep:promotion";
pub const TAG_SOURCE: &str = "amiprep:source-instance";
pub const TAG_ROLE: &str = "amiprep:role";
pub const TAG_STATUS: &str = "amiprep:status";
pub const TAG_REPORT: &str = "amiprep:report-sha256";

/// How a step ended.
enum Step {
    /// Move to the next state, with this message.
    Next(String),
    /// Go straight to a terminal state.
    Finish(PromotionState, String),
}

/// Why a step did not succeed.
enum StepError {
    /// The promotion fails: clean up and record this reason.
    Fatal(String),
    /// The operator cancelled.
    Cancelled,
    /// Transient (store busy, throttled past the SDK's retries): run the step again.
    Retry(String),
}

impl From<CloudError> for StepError {
    fn from(e: CloudError) -> Self {
        match e {
            CloudError::AccessDenied { .. } => StepError::Fatal(e.to_string()),
            _ => StepError::Retry(e.to_string()),
        }
    }
}

impl From<anyhow::Error> for StepError {
    fn from(e: anyhow::Error) -> Self {
        StepError::Retry(format!("{e:#}"))
    }
}

type StepResult = Result<Step, StepError>;

/// A change worth telling watchers about.
#[derive(Debug, Clone)]
pub struct Change {
    pub promotion_id: String,
}

pub struct Pipeline {
    pub store: Arc<Store>,
    cloud: Arc<dyn Cloud>,
    registry: Arc<Registry>,
    cfg: PipelineSection,
    region: String,
    running: Mutex<HashSet<String>>,
    pub changes: broadcast::Sender<Change>,
}

impl Pipeline {
    pub fn new(
        store: Arc<Store>,
        cloud: Arc<dyn Cloud>,
        registry: Arc<Registry>,
        cfg: PipelineSection,
        region: String,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Pipeline {
            store,
            cloud,
            registry,
            cfg,
            region,
            running: Mutex::new(HashSet::new()),
            changes,
        })
    }

    /// Starts a driver for every promotion that has not finished.
    pub fn resume_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let mut n = 0;
        for rec in self.store.list()? {
            if !rec.state.is_terminal() {
                info!(promotion = %rec.id, state = %rec.state, "resuming promotion");
                self.spawn(&rec.id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records a new promotion and starts driving it.
    pub fn submit(self: &Arc<Self>, id: &str, spec: &PromotionSpec) -> anyhow::Result<()> {
        self.store.insert(id, spec, &self.region)?;
        self.notify(id);
        self.spawn(id);
        Ok(())
    }

    pub fn cancel(self: &Arc<Self>, id: &str) -> anyhow::Result<bool> {
        let found = self.store.request_cancel(id)?;
        if found {
            self.notify(id);
        }
        Ok(found)
    }

    fn notify(&self, id: &str) {
        let _ = self.changes.send(Change {
            promotion_id: id.to_owned(),
        });
    }

    fn spawn(self: &Arc<Self>, id: &str) {
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned())
        {
            return;
        }
        let this = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            this.drive(&id).await;
            this.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    async fn drive(&self, id: &str) {
        let mut retry_delay = Duration::from_millis(self.cfg.poll_initial_ms);
        let mut retries = 0u32;
        loop {
            let rec = match self.store.get(id) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    warn!(promotion = %id, "reading state: {e:#}");
                    tokio::time::sleep(retry_delay).await;
                    continue;
                }
            };
            if rec.state.is_terminal() {
                return;
            }
            if rec.cancel_requested && rec.state != PromotionState::CleaningUp {
                self.record(|| self.store.fail(id, rec.state, "cancelled by the operator"))
                    .await;
                continue;
            }
            let started = Instant::now();
            let result = match rec.state {
                PromotionState::Pending => self.wait_for_agent(&rec).await,
                PromotionState::Preparing => self.prepare(&rec).await,
                PromotionState::Stopping => self.stop_source(&rec).await,
                PromotionState::CreatingImage => self.create_image(&rec).await,
                PromotionState::AwaitingImage => self.await_image(&rec).await,
                PromotionState::VerifyingImage => self.verify_image(&rec).await,
                PromotionState::LaunchingCanary => self.launch_canary(&rec).await,
                PromotionState::VerifyingCanary => self.verify_canary(&rec).await,
                PromotionState::Distributing => self.distribute(&rec).await,
                PromotionState::Promoting => self.promote(&rec).await,
                PromotionState::CleaningUp => self.clean_up(&rec).await,
                PromotionState::Promoted | PromotionState::Failed | PromotionState::Cancelled => {
                    return;
                }
            };
            let took = started.elapsed();
            crate::metrics::global()
                .step_seconds
                .get_or_create(&crate::metrics::StateLabel {
                    state: rec.state.as_str().to_owned(),
                })
                .observe(took.as_secs_f64());
            match result {
                Ok(Step::Next(msg)) => {
                    let Some(next) = rec.state.next(rec.spec.canary) else {
                        return;
                    };
                    info!(promotion = %id, from = %rec.state, to = %next, took_ms = took.as_millis() as u64, "{msg}");
                    self.record(|| self.store.set_state(id, next, &msg)).await;
                    retry_delay = Duration::from_millis(self.cfg.poll_initial_ms);
                    retries = 0;
                }
                Ok(Step::Finish(state, msg)) => {
                    info!(promotion = %id, state = %state, "{msg}");
                    self.record(|| self.store.set_state(id, state, &msg)).await;
                }
                Err(StepError::Fatal(reason)) => {
                    warn!(promotion = %id, state = %rec.state, "failed: {reason}");
                    self.record(|| self.store.fail(id, rec.state, &reason))
                        .await;
                }
                Err(StepError::Cancelled) => {
                    self.record(|| self.store.fail(id, rec.state, "cancelled by the operator"))
                        .await;
                }
                Err(StepError::Retry(why)) if retries >= self.cfg.max_step_retries => {
                    let reason = format!("gave up after {retries} retries: {why}");
                    warn!(promotion = %id, state = %rec.state, "failed: {reason}");
                    self.record(|| self.store.fail(id, rec.state, &reason))
                        .await;
                    retries = 0;
                }
                Err(StepError::Retry(why)) => {
                    retries += 1;
                    warn!(promotion = %id, state = %rec.state, "will retry: {why}");
                    let _ = self.store.note(id, rec.state, &format!("retrying: {why}"));
                    tokio::time::sleep(retry_delay).await;
                    retry_delay =
                        (retry_delay * 2).min(Duration::from_millis(self.cfg.poll_max_ms));
                }
            }
            self.notify(id);
        }
    }

    /// Persists a transition, retrying until the store accepts it: moving on
    /// without the record would break resumption.
    async fn record(&self, f: impl Fn() -> anyhow::Result<()>) {
        let mut delay = Duration::from_millis(100);
        while let Err(e) = f() {
            warn!("recording state: {e:#}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Sleeps one poll interval (exponential with full jitter), failing on
    /// cancel or when `deadline` has passed.
    async fn poll_wait(
        &self,
        id: &str,
        attempt: &mut u32,
        deadline: Instant,
        what: &str,
    ) -> Result<(), StepError> {
        if self.store.get(id)?.is_some_and(|r| r.cancel_requested) {
            return Err(StepError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(StepError::Fatal(what.to_owned()));
        }
        let ceiling = self
            .cfg
            .poll_initial_ms
            .saturating_mul(1 << (*attempt).min(16))
            .min(self.cfg.poll_max_ms);
        let ms = rand::rng().random_range(ceiling / 2..=ceiling);
        *attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_millis(ms).min(left)).await;
        Ok(())
    }

    /// Deadline for a state entered at `rec.updated_ms`.
    fn deadline(&self, rec: &PromotionRecord, secs: u64) -> Instant {
        let entered = std::time::UNIX_EPOCH + Duration::from_millis(rec.updated_ms);
        let spent = SystemTime::now()
            .duration_since(entered)
            .unwrap_or_default();
        Instant::now() + Duration::from_secs(secs).saturating_sub(spent)
    }

    fn tags(&self, rec: &PromotionRecord) -> Vec<(String, String)> {
        let mut tags = vec![
            (TAG_PROMOTION.to_owned(), rec.id.clone()),
            (TAG_SOURCE.to_owned(), rec.spec.instance_id.clone()),
        ];
        for (k, v) in &rec.spec.tags {
            if !k.starts_with("amiprep:") {
                tags.push((k.clone(), v.clone()));
            }
        }
        if !rec.spec.tags.iter().any(|(k, _)| k == "Name") {
            tags.push(("Name".to_owned(), rec.spec.name.clone()));
        }
        tags
    }

    // --- steps -------------------------------------------------------------

    async fn wait_for_agent(&self, rec: &PromotionRecord) -> StepResult {
        let source = &rec.spec.instance_id;
        match self.cloud.describe_instance(&rec.region, source).await? {
            None => {
                return Err(StepError::Fatal(format!(
                    "instance {source} not found in {}",
                    rec.region
                )));
            }
            Some(f) if f.state.is_gone() => {
                return Err(StepError::Fatal(format!(
                    "instance {source} is {}",
                    f.state
                )));
            }
            Some(f) if f.state != InstanceState::Running => {
                return Err(StepError::Fatal(format!(
                    "instance {source} is {}, not running; promotion needs its agent",
                    f.state
                )));
            }
            Some(_) => {}
        }
        let deadline = self.deadline(rec, self.cfg.agent_wait_secs);
        let mut attempt = 0;
        while self.registry.session_of(source).is_none() {
            self.poll_wait(
                &rec.id,
                &mut attempt,
                deadline,
                &format!(
                    "the agent of {source} did not connect within {} s",
                    self.cfg.agent_wait_secs
                ),
            )
            .await?;
        }
        Ok(Step::Next(format!("agent of {source} connected")))
    }

    async fn prepare(&self, rec: &PromotionRecord) -> StepResult {
        let source = &rec.spec.instance_id;
        let deadline = self.deadline(rec, self.cfg.prepare_timeout_secs);
        let mut attempt = 0;
        loop {
            let sent = self
                .registry
                .request(
                    source,
                    &rec.id,
                    controller_message::Msg::Prepare(Prepare {
                        promotion_id: rec.id.clone(),
                        policy_toml: rec.spec.policy_toml.clone(),
                    }),
                )
                .await;
            let Some((session, mut events)) = sent else {
                self.poll_wait(
                    &rec.id,
                    &mut attempt,
                    deadline,
                    &format!("the agent of {source} is not connected"),
                )
                .await?;
                continue;
            };
            let mut last_progress = Instant::now() - Duration::from_secs(60);
            let outcome = loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Some(AgentEvent::Progress(p)) => {
                            // Progress is for watchers; keep the history short.
                            if last_progress.elapsed() >= Duration::from_secs(1) {
                                last_progress = Instant::now();
                                let _ = self.store.note(&rec.id, rec.state, &format!("{}: {}", p.step, p.message));
                                self.notify(&rec.id);
                            }
                        }
                        Some(AgentEvent::Report(r)) => break Some(r),
                        Some(AgentEvent::Verify(_)) => {}
                        None => break None,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if self.registry.session_of(source).as_deref() != Some(session.as_str()) {
                            break None; // session lost: ask again on the next one
                        }
                        if self.store.get(&rec.id)?.is_some_and(|r| r.cancel_requested) {
                            self.registry.forget(&rec.id);
                            return Err(StepError::Cancelled);
                        }
                        if Instant::now() >= deadline {
                            self.registry.forget(&rec.id);
                            return Err(StepError::Fatal(format!("prepare did not finish within {} s", self.cfg.prepare_timeout_secs)));
                        }
                    }
                }
            };
            self.registry.forget(&rec.id);
            let Some(report) = outcome else {
                let _ = self.store.note(
                    &rec.id,
                    rec.state,
                    "agent session lost during prepare; asking again",
                );
                continue;
            };
            // The evidence kept with the image: the agent's report plus the
            // identity the source had before it was reset.
            let agent_report: serde_json::Value = serde_json::from_str(&report.report_json)
                .unwrap_or_else(|_| serde_json::Value::String(report.report_json.clone()));
            let evidence = serde_json::json!({
                "promotion": rec.id,
                "source_instance": source,
                "ready": report.ready,
                "source_identity": {
                    "machine_id_sha256": report.source_machine_id_sha256,
                    "host_key_fingerprints": report.source_host_key_fingerprints,
                },
                "findings": report.findings.iter().map(|f| serde_json::json!({
                    "rule": f.rule, "path": f.path, "line": f.line, "column": f.column,
                    "fingerprint": f.fingerprint, "preview": f.preview,
                })).collect::<Vec<_>>(),
                "report": agent_report,
            });
            let evidence = serde_json::to_string(&evidence)
                .map_err(|e| StepError::Fatal(format!("encoding the report: {e}")))?;
            let digest = hex(&Sha256::digest(evidence.as_bytes()));
            self.store.set_report(&rec.id, &evidence, &digest)?;
            if !report.error.is_empty() {
                return Err(StepError::Fatal(format!(
                    "prepare could not run: {}",
                    report.error
                )));
            }
            if !report.ready {
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
                return Err(StepError::Fatal(reason));
            }
            return Ok(Step::Next(format!("host ready (report sha256 {digest})")));
        }
    }

    async fn stop_source(&self, rec: &PromotionRecord) -> StepResult {
        let source = &rec.spec.instance_id;
        let deadline = self.deadline(rec, self.cfg.stop_timeout_secs);
        let mut attempt = 0;
        let mut asked = false;
        loop {
            let state = match self.cloud.describe_instance(&rec.region, source).await? {
                None => return Err(StepError::Fatal(format!("instance {source} disappeared"))),
                Some(f) => f.state,
            };
            match state {
                InstanceState::Stopped => return Ok(Step::Next(format!("{source} stopped"))),
                InstanceState::Terminated | InstanceState::ShuttingDown => {
                    return Err(StepError::Fatal(format!(
                        "instance {source} was terminated mid-way"
                    )));
                }
                InstanceState::Running | InstanceState::Pending if !asked => {
                    self.cloud.stop_instance(&rec.region, source).await?;
                    asked = true;
                }
                _ => {}
            }
            self.poll_wait(
                &rec.id,
                &mut attempt,
                deadline,
                &format!(
                    "instance {source} did not stop within {} s (last state {state})",
                    self.cfg.stop_timeout_secs
                ),
            )
            .await?;
        }
    }

    async fn create_image(&self, rec: &PromotionRecord) -> StepResult {
        // Created by an earlier run of this step (crash after CreateImage)?
        let mine = self
            .cloud
            .find_images(&rec.region, TAG_PROMOTION, &rec.id)
            .await?;
        if let Some(img) = mine.first() {
            self.store
                .add_resource(&rec.id, ResourceKind::Image, &rec.region, &img.image_id)?;
            return Ok(Step::Next(format!("image {} (found by tag)", img.image_id)));
        }
        if let Some(taken) = self
            .cloud
            .find_image_by_name(&rec.region, &rec.spec.name)
            .await?
        {
            return Err(StepError::Fatal(format!(
                "AMI name {:?} is already taken by {}",
                rec.spec.name, taken.image_id
            )));
        }
        let description = if rec.spec.description.is_empty() {
            format!("amiprep promotion {} of {}", rec.id, rec.spec.instance_id)
        } else {
            rec.spec.description.clone()
        };
        let image_id = match self
            .cloud
            .create_image(
                &rec.region,
                &rec.spec.instance_id,
                &rec.spec.name,
                &description,
                &self.tags(rec),
            )
            .await
        {
            Ok(id) => id,
            Err(CloudError::NameTaken { message, .. }) => {
                return Err(StepError::Retry(format!(
                    "name collision, checking again: {message}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // Recorded before any wait, so cleanup and resumption know it.
        self.store
            .add_resource(&rec.id, ResourceKind::Image, &rec.region, &image_id)?;
        Ok(Step::Next(format!("image {image_id} created")))
    }

    fn image_id(rec: &PromotionRecord) -> Result<String, StepError> {
        rec.image()
            .map(|r| r.id.clone())
            .ok_or_else(|| StepError::Fatal("no image recorded".into()))
    }

    async fn await_image(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let deadline = self.deadline(rec, self.cfg.image_timeout_secs);
        self.wait_available(rec, &rec.region, &image, deadline)
            .await?;
        Ok(Step::Next(format!("image {image} available")))
    }

    /// Waits for an image to be `available`, recording its snapshots.
    async fn wait_available(
        &self,
        rec: &PromotionRecord,
        region: &str,
        image: &str,
        deadline: Instant,
    ) -> Result<(), StepError> {
        let mut attempt = 0;
        loop {
            let facts = self.cloud.describe_image(region, image).await?;
            let Some(facts) = facts else {
                return Err(StepError::Fatal(format!("image {image} disappeared")));
            };
            let kind = ResourceKind::snapshot_in(region, &rec.region);
            let known: Vec<&str> = rec
                .resources
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| r.id.as_str())
                .collect();
            let new: Vec<String> = facts
                .snapshot_ids
                .iter()
                .filter(|s| !known.contains(&s.as_str()))
                .cloned()
                .collect();
            if !new.is_empty() {
                for s in &new {
                    self.store.add_resource(&rec.id, kind, region, s)?;
                }
                self.cloud
                    .create_tags(region, &new, &self.tags(rec))
                    .await?;
            }
            match &facts.state {
                ImageState::Available => return Ok(()),
                s if s.is_broken() => {
                    return Err(StepError::Fatal(format!(
                        "image {image} is {}{}",
                        facts.state,
                        facts
                            .state_reason
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    )));
                }
                _ => {}
            }
            self.poll_wait(
                &rec.id,
                &mut attempt,
                deadline,
                &format!(
                    "image {image} not available within {} s (last state {})",
                    self.cfg.image_timeout_secs, facts.state
                ),
            )
            .await?;
        }
    }

    async fn verify_image(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let facts = self
            .cloud
            .describe_image(&rec.region, &image)
            .await?
            .ok_or_else(|| StepError::Fatal(format!("image {image} disappeared")))?;
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
        let states = self
            .cloud
            .snapshot_states(&rec.region, &facts.snapshot_ids)
            .await?;
        for (id, state) in &states {
            if *state != SnapshotState::Completed {
                problems.push(format!("snapshot {id} is {state}"));
            }
        }
        if self.cfg.require_ena && facts.ena_support != Some(true) {
            problems.push("ENA support required".to_owned());
        }
        if self.cfg.require_encrypted && !facts.encrypted {
            problems.push("encryption required".to_owned());
        }
        if let Some(mode) = &self.cfg.require_boot_mode
            && facts.boot_mode.as_deref() != Some(mode.as_str())
        {
            problems.push(format!(
                "boot mode {mode} required, image has {}",
                facts.boot_mode.as_deref().unwrap_or("none")
            ));
        }
        if !problems.is_empty() {
            return Err(StepError::Fatal(format!(
                "image {image} failed verification: {}",
                problems.join("; ")
            )));
        }
        Ok(Step::Next(format!(
            "image {image} verified ({} snapshot(s) completed)",
            states.len()
        )))
    }

    async fn launch_canary(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let existing = self
            .cloud
            .find_instances(&rec.region, TAG_PROMOTION, &rec.id)
            .await?;
        if let Some(c) = existing.first() {
            self.store
                .add_resource(&rec.id, ResourceKind::Canary, &rec.region, &c.instance_id)?;
            return Ok(Step::Next(format!(
                "canary {} (found by tag)",
                c.instance_id
            )));
        }
        let mut tags = self.tags(rec);
        tags.retain(|(k, _)| k != "Name");
        tags.push((TAG_ROLE.to_owned(), "canary".to_owned()));
        tags.push(("Name".to_owned(), format!("amiprep canary {}", rec.id)));
        let canary = self
            .cloud
            .run_instance(
                &rec.region,
                &image,
                &self.cfg.canary_instance_type,
                &tags,
                &format!("{}-canary", rec.id),
            )
            .await?;
        self.store
            .add_resource(&rec.id, ResourceKind::Canary, &rec.region, &canary)?;
        Ok(Step::Next(format!("canary {canary} launched from {image}")))
    }

    async fn verify_canary(&self, rec: &PromotionRecord) -> StepResult {
        let canary = rec
            .resources_of(ResourceKind::Canary)
            .find(|r| !r.deleted)
            .map(|r| r.id.clone())
            .ok_or_else(|| StepError::Fatal("no canary recorded".into()))?;
        let deadline = self.deadline(rec, self.cfg.canary_timeout_secs);
        let mut attempt = 0;
        // 1. Running, with both status checks ok.
        loop {
            match self.cloud.instance_health(&rec.region, &canary).await? {
                Some(h) if h.state == InstanceState::Running && h.status_ok => break,
                Some(h) if h.state.is_gone() => {
                    return Err(StepError::Fatal(format!("canary {canary} is {}", h.state)));
                }
                _ => {}
            }
            self.poll_wait(
                &rec.id,
                &mut attempt,
                deadline,
                &format!(
                    "canary {canary} never became healthy within {} s",
                    self.cfg.canary_timeout_secs
                ),
            )
            .await?;
        }
        // 2. Its own agent connects and gives its verdict.
        let report: serde_json::Value = rec
            .report_json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let expectations = VerifyExpectations {
            source_machine_id_sha256: report["source_identity"]["machine_id_sha256"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            source_host_key_fingerprints: report["source_identity"]["host_key_fingerprints"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            policy_toml: rec.spec.policy_toml.clone(),
        };
        let verify_id = format!("{}/verify", rec.id);
        let result = loop {
            let sent = self
                .registry
                .request(
                    &canary,
                    &verify_id,
                    controller_message::Msg::Verify(Verify {
                        promotion_id: verify_id.clone(),
                        expectations: Some(expectations.clone()),
                    }),
                )
                .await;
            if let Some((session, mut events)) = sent {
                let got = loop {
                    tokio::select! {
                        ev = events.recv() => match ev {
                            Some(AgentEvent::Verify(v)) => break Some(v),
                            Some(_) => {}
                            None => break None,
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if self.registry.session_of(&canary).as_deref() != Some(session.as_str()) {
                                break None;
                            }
                            if Instant::now() >= deadline {
                                break None;
                            }
                        }
                    }
                };
                self.registry.forget(&verify_id);
                if let Some(v) = got {
                    break v;
                }
            }
            self.poll_wait(
                &rec.id,
                &mut attempt,
                deadline,
                &format!(
                    "the canary's agent ({canary}) never connected and verified within {} s",
                    self.cfg.canary_timeout_secs
                ),
            )
            .await?;
        };
        // 3. A failed verdict fails the promotion (cleanup terminates the
        // canary). A good one is recorded by the transition; the next step
        // terminates the canary, so a restart in between neither loses the
        // verdict nor needs the canary again.
        if !result.ok {
            let failed: Vec<String> = result
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect();
            return Err(StepError::Fatal(format!(
                "canary verification failed: {}{}",
                failed.join("; "),
                if result.error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", result.error)
                }
            )));
        }
        Ok(Step::Next(format!(
            "canary {canary} verified: {}",
            result
                .checks
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Terminates this promotion's canaries: the recorded one, and any
    /// second one an endpoint that ignores client tokens launched for a
    /// retried request. Idempotent. Returns how many it terminated.
    async fn retire_canaries(&self, rec: &PromotionRecord) -> Result<usize, StepError> {
        let mut ids: Vec<String> = rec
            .resources_of(ResourceKind::Canary)
            .filter(|r| !r.deleted)
            .map(|r| r.id.clone())
            .collect();
        for f in self
            .cloud
            .find_instances(&rec.region, TAG_PROMOTION, &rec.id)
            .await?
        {
            if f.instance_id != rec.spec.instance_id && !ids.contains(&f.instance_id) {
                self.store.add_resource(
                    &rec.id,
                    ResourceKind::Canary,
                    &rec.region,
                    &f.instance_id,
                )?;
                ids.push(f.instance_id);
            }
        }
        for id in &ids {
            self.cloud.terminate_instance(&rec.region, id).await?;
            self.store
                .mark_deleted(&rec.id, ResourceKind::Canary, &rec.region, id)?;
        }
        Ok(ids.len())
    }

    async fn distribute(&self, rec: &PromotionRecord) -> StepResult {
        if rec.spec.canary {
            self.retire_canaries(rec).await?;
        }
        let image = Self::image_id(rec)?;
        let deadline = self.deadline(rec, self.cfg.image_timeout_secs);
        let tags = self.tags(rec);
        let mut done = Vec::new();
        for (region, kms) in &rec.spec.copy_to {
            let copy = match rec
                .resources_of(ResourceKind::Copy)
                .find(|r| &r.region == region)
            {
                Some(r) => r.id.clone(),
                None => {
                    let found = self
                        .cloud
                        .find_images(region, TAG_PROMOTION, &rec.id)
                        .await?;
                    match found.first() {
                        Some(f) => f.image_id.clone(),
                        None => {
                            let id = self
                                .cloud
                                .copy_image(
                                    &rec.region,
                                    &image,
                                    region,
                                    &rec.spec.name,
                                    &format!("amiprep promotion {} (copy of {image})", rec.id),
                                    (!kms.is_empty()).then_some(kms.as_str()),
                                    &format!("{}-copy-{region}", rec.id),
                                )
                                .await?;
                            // Recorded before tagging or waiting.
                            self.store
                                .add_resource(&rec.id, ResourceKind::Copy, region, &id)?;
                            id
                        }
                    }
                }
            };
            self.store
                .add_resource(&rec.id, ResourceKind::Copy, region, &copy)?;
            self.cloud
                .create_tags(region, std::slice::from_ref(&copy), &tags)
                .await?;
            self.wait_available(rec, region, &copy, deadline).await?;
            done.push((region.clone(), copy));
        }
        let mut all = vec![(rec.region.clone(), image.clone())];
        all.extend(done.iter().cloned());
        if !rec.spec.share_with.is_empty() {
            for (region, id) in &all {
                self.cloud
                    .share_image(region, id, &rec.spec.share_with)
                    .await?;
            }
        }
        if rec.spec.deprecate_after_days > 0 {
            let at = SystemTime::now()
                + Duration::from_secs(u64::from(rec.spec.deprecate_after_days) * 86_400);
            for (region, id) in &all {
                self.cloud.deprecate_image(region, id, at).await?;
            }
        }
        Ok(Step::Next(format!(
            "distributed to {} region(s)",
            all.len()
        )))
    }

    async fn promote(&self, rec: &PromotionRecord) -> StepResult {
        let digest = rec.report_sha256.clone().unwrap_or_default();
        let mut tags = self.tags(rec);
        tags.push((TAG_STATUS.to_owned(), "verified".to_owned()));
        tags.push((TAG_REPORT.to_owned(), digest.clone()));
        let mut by_region: Vec<(String, Vec<String>)> = Vec::new();
        for r in rec.resources.iter().filter(|r| {
            !r.deleted
                && matches!(
                    r.kind,
                    ResourceKind::Image
                        | ResourceKind::Snapshot
                        | ResourceKind::Copy
                        | ResourceKind::CopySnapshot
                )
        }) {
            match by_region.iter_mut().find(|(reg, _)| reg == &r.region) {
                Some((_, ids)) => ids.push(r.id.clone()),
                None => by_region.push((r.region.clone(), vec![r.id.clone()])),
            }
        }
        for (region, ids) in &by_region {
            self.cloud.create_tags(region, ids, &tags).await?;
        }
        let manifest = self.manifest(rec, &digest)?;
        let path = self.cfg.manifest_dir.join(format!("{}.json", rec.id));
        write_atomic(&path, manifest.as_bytes())
            .map_err(|e| StepError::Retry(format!("writing {}: {e}", path.display())))?;
        self.store
            .set_manifest(&rec.id, &path.display().to_string())?;
        match rec.spec.after {
            After::Start => {
                self.cloud
                    .start_instance(&rec.region, &rec.spec.instance_id)
                    .await?
            }
            After::Terminate => {
                self.cloud
                    .terminate_instance(&rec.region, &rec.spec.instance_id)
                    .await?
            }
            _ => {}
        }
        Ok(Step::Next(format!(
            "promoted {}; manifest {}",
            Self::image_id(rec)?,
            path.display()
        )))
    }

    fn manifest(&self, rec: &PromotionRecord, digest: &str) -> Result<String, StepError> {
        let events = self.store.events(&rec.id, 0)?;
        let mut timings = serde_json::Map::new();
        for pair in events.windows(2) {
            if pair[0].state != pair[1].state {
                let ms = pair[1].at_ms.saturating_sub(pair[0].at_ms);
                let slot = timings
                    .entry(pair[0].state.clone())
                    .or_insert(serde_json::json!(0));
                *slot = serde_json::json!(slot.as_u64().unwrap_or(0) + ms);
            }
        }
        let mut amis = serde_json::Map::new();
        for r in rec
            .resources
            .iter()
            .filter(|r| matches!(r.kind, ResourceKind::Image | ResourceKind::Copy))
        {
            amis.insert(r.region.clone(), serde_json::json!(r.id));
        }
        let snapshots: Vec<serde_json::Value> = rec
            .resources
            .iter()
            .filter(|r| matches!(r.kind, ResourceKind::Snapshot | ResourceKind::CopySnapshot))
            .map(|r| serde_json::json!({"region": r.region, "id": r.id}))
            .collect();
        let m = serde_json::json!({
            "promotion": rec.id,
            "source_instance": rec.spec.instance_id,
            "name": rec.spec.name,
            "amis": amis,
            "snapshots": snapshots,
            "report_sha256": digest,
            "step_timings_ms": timings,
            "canary": rec.spec.canary,
            "promoted_at": amiprep_proto::tls::rfc3339(SystemTime::now()),
        });
        serde_json::to_string_pretty(&m).map_err(|e| StepError::Fatal(e.to_string()))
    }

    async fn clean_up(&self, rec: &PromotionRecord) -> StepResult {
        let final_state = if rec.cancel_requested {
            PromotionState::Cancelled
        } else {
            PromotionState::Failed
        };
        let reason = rec.failure_reason.clone().unwrap_or_default();
        if rec.spec.keep_on_failure {
            let source = self.settle_source(rec).await?;
            let kept: Vec<String> = rec
                .resources
                .iter()
                .filter(|r| !r.deleted)
                .map(|r| format!("{} {} ({})", r.kind, r.id, r.region))
                .collect();
            return Ok(Step::Finish(
                final_state,
                format!(
                    "{reason}; kept (--keep-on-failure): {}{source}",
                    if kept.is_empty() {
                        "nothing".into()
                    } else {
                        kept.join(", ")
                    }
                ),
            ));
        }
        // Canaries: recorded ones and any found by tag.
        let mut removed = self.retire_canaries(rec).await?;
        // Images (primary and copies): recorded ones and any found by tag,
        // each with its snapshots, which are recorded before deregistering.
        let mut regions = vec![rec.region.clone()];
        regions.extend(rec.spec.copy_to.iter().map(|(r, _)| r.clone()));
        for region in &regions {
            let kind = ResourceKind::image_in(region, &rec.region);
            let snap_kind = ResourceKind::snapshot_in(region, &rec.region);
            let mut images: Vec<String> = rec
                .resources
                .iter()
                .filter(|r| r.kind == kind && &r.region == region && !r.deleted)
                .map(|r| r.id.clone())
                .collect();
            for f in self
                .cloud
                .find_images(region, TAG_PROMOTION, &rec.id)
                .await?
            {
                if !images.contains(&f.image_id) {
                    self.store
                        .add_resource(&rec.id, kind, region, &f.image_id)?;
                    images.push(f.image_id);
                }
            }
            for image in &images {
                if let Some(f) = self.cloud.describe_image(region, image).await? {
                    for s in &f.snapshot_ids {
                        self.store.add_resource(&rec.id, snap_kind, region, s)?;
                    }
                }
                self.cloud.deregister_image(region, image).await?;
                self.store.mark_deleted(&rec.id, kind, region, image)?;
                removed += 1;
            }
            let fresh = self.store.get(&rec.id)?.unwrap_or_else(|| rec.clone());
            for s in fresh
                .resources
                .iter()
                .filter(|r| r.kind == snap_kind && &r.region == region && !r.deleted)
            {
                self.cloud.delete_snapshot(region, &s.id).await?;
                self.store.mark_deleted(&rec.id, snap_kind, region, &s.id)?;
                removed += 1;
            }
        }
        let source = self.settle_source(rec).await?;
        Ok(Step::Finish(
            final_state,
            format!("{reason}; removed {removed} resource(s) this promotion created{source}"),
        ))
    }

    /// After a failure or cancel, says what became of the source instance.
    /// A promotion that got as far as stopping it starts it again only under
    /// `--after start`; a failed promotion never terminates it.
    async fn settle_source(&self, rec: &PromotionRecord) -> Result<String, StepError> {
        let source = &rec.spec.instance_id;
        if matches!(
            rec.failed_in,
            None | Some(PromotionState::Pending | PromotionState::Preparing)
        ) {
            return Ok(String::new()); // never stopped
        }
        let Some(facts) = self.cloud.describe_instance(&rec.region, source).await? else {
            return Ok(format!("; source {source} no longer exists"));
        };
        let start = rec.spec.after == After::Start;
        Ok(match facts.state {
            InstanceState::Stopped if start => {
                self.cloud.start_instance(&rec.region, source).await?;
                format!("; source {source} started again (--after start)")
            }
            InstanceState::Stopping if start => {
                return Err(StepError::Retry(format!(
                    "source {source} is still stopping; it is started again once stopped"
                )));
            }
            InstanceState::Stopped | InstanceState::Stopping => {
                format!("; source {source} left stopped (--after start starts it again on failure)")
            }
            other => format!("; source {source} is {other}"),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes via a temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
