//! The steps, one per state: each gathers facts (EC2, the record, the
//! agent), asks [`decide`](super::decide) what they mean, and acts. No
//! choice is made here that is not a call into `decide`.

use std::time::{Duration, Instant, SystemTime};

use amiprep_proto::v1::{Prepare, Verify, VerifyExpectations, controller_message};
use sha2::{Digest, Sha256};

use super::{
    Pipeline, Step, StepError, StepResult, TAG_PROMOTION,
    decide::{self, Adopt, CanaryHealth, ImageWait, Settle, SourceAction, StopAction},
    evidence::{Evidence, Manifest},
    hex, write_atomic,
};
use crate::{
    cloud::CloudError,
    registry::AgentEvent,
    state::{PromotionState, ResourceKind},
    store::PromotionRecord,
};

impl Pipeline {
    pub(super) async fn wait_for_agent(&self, rec: &PromotionRecord) -> StepResult {
        let source = &rec.spec.instance_id;
        let facts = self.cloud.describe_instance(&rec.region, source).await?;
        decide::source_usable(source, &rec.region, facts.as_ref().map(|f| &f.state))
            .map_err(StepError::Fatal)?;
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

    /// The deployment's fingerprint key, read for each request (so a key
    /// put in place later is used without a restart). Missing or unreadable:
    /// none is sent and the agent fingerprints under a random key for the
    /// run, which it says in its report.
    fn fingerprint_key(&self) -> Vec<u8> {
        match crate::certs::load_fingerprint_key(&self.cfg.fingerprint_key) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("{e:#}; fingerprints will not be comparable across runs");
                Vec::new()
            }
        }
    }

    pub(super) async fn prepare(&self, rec: &PromotionRecord) -> StepResult {
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
                        fingerprint_key: self.fingerprint_key(),
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
            let evidence = Evidence::from_report(&rec.id, source, &report)
                .to_json()
                .map_err(|e| StepError::Fatal(format!("encoding the report: {e}")))?;
            let digest = hex(&Sha256::digest(evidence.as_bytes()));
            self.store.set_report(&rec.id, &evidence, &digest)?;
            decide::report_gate(&report).map_err(StepError::Fatal)?;
            return Ok(Step::Next(format!("host ready (report sha256 {digest})")));
        }
    }

    pub(super) async fn stop_source(&self, rec: &PromotionRecord) -> StepResult {
        let source = &rec.spec.instance_id;
        let deadline = self.deadline(rec, self.cfg.stop_timeout_secs);
        let mut attempt = 0;
        let mut asked = false;
        loop {
            let state = match self.cloud.describe_instance(&rec.region, source).await? {
                None => return Err(StepError::Fatal(format!("instance {source} disappeared"))),
                Some(f) => f.state,
            };
            match decide::stop_action(source, &state, asked) {
                StopAction::Done => return Ok(Step::Next(format!("{source} stopped"))),
                StopAction::Fail(why) => return Err(StepError::Fatal(why)),
                StopAction::RequestStop => {
                    self.cloud.stop_instance(&rec.region, source).await?;
                    asked = true;
                }
                StopAction::Wait => {}
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

    pub(super) async fn create_image(&self, rec: &PromotionRecord) -> StepResult {
        // Created by an earlier run of this step (crash after CreateImage)?
        let found: Vec<String> = self
            .cloud
            .find_images(&rec.region, TAG_PROMOTION, &rec.id)
            .await?
            .into_iter()
            .map(|f| f.image_id)
            .collect();
        let recorded = decide::recorded(&rec.resources, ResourceKind::Image, &rec.region);
        match decide::adopt(recorded, &found) {
            Adopt::Recorded(id) => return Ok(Step::Next(format!("image {id} (recorded)"))),
            Adopt::Found(id) => {
                self.store
                    .add_resource(&rec.id, ResourceKind::Image, &rec.region, &id)?;
                return Ok(Step::Next(format!("image {id} (found by tag)")));
            }
            Adopt::Create => {}
        }
        if let Some(taken) = self
            .cloud
            .find_image_by_name(&rec.region, &rec.spec.name)
            .await?
        {
            return match decide::name_holder(&rec.id, &rec.spec.name, &taken) {
                Ok(id) => {
                    self.store
                        .add_resource(&rec.id, ResourceKind::Image, &rec.region, &id)?;
                    Ok(Step::Next(format!("image {id} (found by name)")))
                }
                Err(why) => Err(StepError::Fatal(why)),
            };
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
                &decide::resource_tags(&rec.id, &rec.spec),
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

    pub(super) fn image_id(rec: &PromotionRecord) -> Result<String, StepError> {
        rec.image()
            .map(|r| r.id.clone())
            .ok_or_else(|| StepError::Fatal("no image recorded".into()))
    }

    pub(super) async fn await_image(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let deadline = self.deadline(rec, self.cfg.image_timeout_secs);
        self.wait_available(rec, &rec.region, &image, deadline)
            .await?;
        Ok(Step::Next(format!("image {image} available")))
    }

    /// Waits for an image to be `available`, recording its snapshots.
    pub(super) async fn wait_available(
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
            let new = decide::new_snapshots(&rec.resources, kind, &facts.snapshot_ids);
            if !new.is_empty() {
                for s in &new {
                    self.store.add_resource(&rec.id, kind, region, s)?;
                }
                self.cloud
                    .create_tags(region, &new, &decide::resource_tags(&rec.id, &rec.spec))
                    .await?;
            }
            match decide::image_wait(&facts) {
                ImageWait::Available => return Ok(()),
                ImageWait::Fail(why) => return Err(StepError::Fatal(why)),
                ImageWait::Wait => {}
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

    pub(super) async fn verify_image(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let facts = self
            .cloud
            .describe_image(&rec.region, &image)
            .await?
            .ok_or_else(|| StepError::Fatal(format!("image {image} disappeared")))?;
        let states = self
            .cloud
            .snapshot_states(&rec.region, &facts.snapshot_ids)
            .await?;
        let required = decide::ImageRequirements {
            ena: self.cfg.require_ena,
            encrypted: self.cfg.require_encrypted,
            boot_mode: self.cfg.require_boot_mode.clone(),
        };
        let problems = decide::image_problems(&facts, &states, &required);
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

    pub(super) async fn launch_canary(&self, rec: &PromotionRecord) -> StepResult {
        let image = Self::image_id(rec)?;
        let found: Vec<String> = self
            .cloud
            .find_instances(&rec.region, TAG_PROMOTION, &rec.id)
            .await?
            .into_iter()
            .map(|f| f.instance_id)
            .filter(|i| i != &rec.spec.instance_id)
            .collect();
        let recorded = decide::recorded(&rec.resources, ResourceKind::Canary, &rec.region);
        match decide::adopt(recorded, &found) {
            Adopt::Recorded(id) => return Ok(Step::Next(format!("canary {id} (recorded)"))),
            Adopt::Found(id) => {
                self.store
                    .add_resource(&rec.id, ResourceKind::Canary, &rec.region, &id)?;
                return Ok(Step::Next(format!("canary {id} (found by tag)")));
            }
            Adopt::Create => {}
        }
        let tags = decide::canary_tags(&rec.id, &rec.spec);
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

    pub(super) async fn verify_canary(&self, rec: &PromotionRecord) -> StepResult {
        let canary = rec
            .resources_of(ResourceKind::Canary)
            .find(|r| !r.deleted)
            .map(|r| r.id.clone())
            .ok_or_else(|| StepError::Fatal("no canary recorded".into()))?;
        let deadline = self.deadline(rec, self.cfg.canary_timeout_secs);
        let mut attempt = 0;
        // 1. Running, with both status checks ok.
        loop {
            let health = self.cloud.instance_health(&rec.region, &canary).await?;
            match decide::canary_health(&canary, health.as_ref()) {
                CanaryHealth::Healthy => break,
                CanaryHealth::Fail(why) => return Err(StepError::Fatal(why)),
                CanaryHealth::Wait => {}
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
        let identity = Evidence::of(rec)
            .map(|e| e.source_identity)
            .unwrap_or_default();
        let expectations = VerifyExpectations {
            source_machine_id_sha256: identity.machine_id_sha256,
            source_host_key_fingerprints: identity.host_key_fingerprints,
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
                        fingerprint_key: self.fingerprint_key(),
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
        let checks = decide::canary_verdict(&result).map_err(StepError::Fatal)?;
        Ok(Step::Next(format!("canary {canary} verified: {checks}")))
    }

    /// Terminates this promotion's canaries: the recorded one, and any
    /// second one an endpoint that ignores client tokens launched for a
    /// retried request. Idempotent. Returns how many it terminated.
    pub(super) async fn retire_canaries(&self, rec: &PromotionRecord) -> Result<usize, StepError> {
        let found: Vec<String> = self
            .cloud
            .find_instances(&rec.region, TAG_PROMOTION, &rec.id)
            .await?
            .into_iter()
            .map(|f| f.instance_id)
            .collect();
        let plan = decide::removal(
            &rec.resources,
            ResourceKind::Canary,
            &rec.region,
            &found,
            &rec.spec.instance_id,
        );
        for id in &plan.record {
            self.store
                .add_resource(&rec.id, ResourceKind::Canary, &rec.region, id)?;
        }
        for id in &plan.remove {
            self.cloud.terminate_instance(&rec.region, id).await?;
            self.store
                .mark_deleted(&rec.id, ResourceKind::Canary, &rec.region, id)?;
        }
        Ok(plan.remove.len())
    }

    pub(super) async fn distribute(&self, rec: &PromotionRecord) -> StepResult {
        if rec.spec.canary {
            self.retire_canaries(rec).await?;
        }
        let image = Self::image_id(rec)?;
        let deadline = self.deadline(rec, self.cfg.image_timeout_secs);
        let tags = decide::resource_tags(&rec.id, &rec.spec);
        let mut done = Vec::new();
        for (region, kms) in &rec.spec.copy_to {
            let recorded = decide::recorded(&rec.resources, ResourceKind::Copy, region);
            // The record first; a lookup only when it has nothing.
            let found: Vec<String> = if recorded.is_some() {
                Vec::new()
            } else {
                self.cloud
                    .find_images(region, TAG_PROMOTION, &rec.id)
                    .await?
                    .into_iter()
                    .map(|f| f.image_id)
                    .collect()
            };
            let copy = match decide::adopt(recorded, &found) {
                Adopt::Recorded(id) | Adopt::Found(id) => id,
                Adopt::Create => {
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

    pub(super) async fn promote(&self, rec: &PromotionRecord) -> StepResult {
        let digest = rec.report_sha256.clone().unwrap_or_default();
        let tags = decide::verified_tags(&rec.id, &rec.spec, &digest);
        for (region, ids) in &decide::verified_targets(&rec.resources) {
            self.cloud.create_tags(region, ids, &tags).await?;
        }
        let manifest = self.manifest(rec, &digest)?;
        let path = self.cfg.manifest_dir.join(format!("{}.json", rec.id));
        write_atomic(&path, manifest.as_bytes())
            .map_err(|e| StepError::Retry(format!("writing {}: {e}", path.display())))?;
        self.store
            .set_manifest(&rec.id, &path.display().to_string())?;
        match decide::after_promotion(rec.spec.after) {
            Some(SourceAction::Start) => {
                self.cloud
                    .start_instance(&rec.region, &rec.spec.instance_id)
                    .await?
            }
            Some(SourceAction::Terminate) => {
                self.cloud
                    .terminate_instance(&rec.region, &rec.spec.instance_id)
                    .await?
            }
            None => {}
        }
        Ok(Step::Next(format!(
            "promoted {}; manifest {}",
            Self::image_id(rec)?,
            path.display()
        )))
    }

    pub(super) fn manifest(
        &self,
        rec: &PromotionRecord,
        digest: &str,
    ) -> Result<String, StepError> {
        let events = self.store.events(&rec.id, 0)?;
        let m = Manifest::new(
            rec,
            &events,
            digest,
            amiprep_proto::tls::rfc3339(SystemTime::now()),
        );
        serde_json::to_string_pretty(&m).map_err(|e| StepError::Fatal(e.to_string()))
    }

    pub(super) async fn clean_up(&self, rec: &PromotionRecord) -> StepResult {
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
            let found: Vec<String> = self
                .cloud
                .find_images(region, TAG_PROMOTION, &rec.id)
                .await?
                .into_iter()
                .map(|f| f.image_id)
                .collect();
            let plan = decide::removal(&rec.resources, kind, region, &found, "");
            for id in &plan.record {
                self.store.add_resource(&rec.id, kind, region, id)?;
            }
            for image in &plan.remove {
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
            let snapshots = decide::removal(&fresh.resources, snap_kind, region, &[], "");
            for s in &snapshots.remove {
                self.cloud.delete_snapshot(region, s).await?;
                self.store.mark_deleted(&rec.id, snap_kind, region, s)?;
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
    pub(super) async fn settle_source(&self, rec: &PromotionRecord) -> Result<String, StepError> {
        let source = &rec.spec.instance_id;
        let facts = match rec.failed_in {
            // Never stopped: no need to look.
            None | Some(PromotionState::Pending | PromotionState::Preparing) => None,
            _ => self.cloud.describe_instance(&rec.region, source).await?,
        };
        let state = facts.as_ref().map(|f| &f.state);
        Ok(
            match decide::settle_source(rec.failed_in, state, rec.spec.after) {
                Settle::Untouched => String::new(),
                Settle::Gone => format!("; source {source} no longer exists"),
                Settle::Start => {
                    self.cloud.start_instance(&rec.region, source).await?;
                    format!("; source {source} started again (--after start)")
                }
                Settle::WaitStopped => {
                    return Err(StepError::Retry(format!(
                        "source {source} is still stopping; it is started again once stopped"
                    )));
                }
                Settle::LeftStopped => format!(
                    "; source {source} left stopped (--after start starts it again on failure)"
                ),
                Settle::Is(other) => format!("; source {source} is {other}"),
            },
        )
    }
}
