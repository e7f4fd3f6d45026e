//! Promotions: prepare → stop → create image → verify → canary → distribute
//! → promote, with cleanup of everything created when anything fails.
//!
//! Three layers. This module is the driver: one task per promotion loads
//! the persisted record, runs the step for the recorded state, and records
//! the outcome before moving on; it owns spawning, recording, polling and
//! deadlines. [`steps`] holds one thin I/O wrapper per state. [`decide`]
//! holds every choice as a pure function over facts, unit-tested there;
//! [`tests`] drives whole promotions over the in-memory `FakeCloud`, with
//! crashes injected at every cloud call. Steps are idempotent —
//! they look up what a previous run may already have created (by the
//! record, then by the promotion's tag) before creating anything — so a
//! controller restarted at any point resumes without duplicates or orphans.

pub mod decide;
pub mod evidence;
mod steps;
#[cfg(test)]
mod tests;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rand::Rng;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    cloud::{Cloud, CloudError},
    config::PipelineSection,
    registry::{Registry, unix_ms},
    state::PromotionState,
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
            let Some(result) = self.run_step(&rec).await else {
                return;
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
                Err(StepError::Retry(why)) => {
                    if let decide::Transient::GiveUp(reason) =
                        decide::on_transient(retries, self.cfg.max_step_retries, &why)
                    {
                        warn!(promotion = %id, state = %rec.state, "failed: {reason}");
                        self.record(|| self.store.fail(id, rec.state, &reason))
                            .await;
                        retries = 0;
                        self.notify(id);
                        continue;
                    }
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

    /// Runs the step of the recorded state; `None` for a terminal state.
    async fn run_step(&self, rec: &PromotionRecord) -> Option<StepResult> {
        Some(match rec.state {
            PromotionState::Pending => self.wait_for_agent(rec).await,
            PromotionState::Preparing => self.prepare(rec).await,
            PromotionState::Stopping => self.stop_source(rec).await,
            PromotionState::CreatingImage => self.create_image(rec).await,
            PromotionState::AwaitingImage => self.await_image(rec).await,
            PromotionState::VerifyingImage => self.verify_image(rec).await,
            PromotionState::LaunchingCanary => self.launch_canary(rec).await,
            PromotionState::VerifyingCanary => self.verify_canary(rec).await,
            PromotionState::Distributing => self.distribute(rec).await,
            PromotionState::Promoting => self.promote(rec).await,
            PromotionState::CleaningUp => self.clean_up(rec).await,
            PromotionState::Promoted | PromotionState::Failed | PromotionState::Cancelled => {
                return None;
            }
        })
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
        let ceiling =
            decide::poll_ceiling_ms(self.cfg.poll_initial_ms, self.cfg.poll_max_ms, *attempt);
        let ms = rand::rng().random_range(ceiling / 2..=ceiling);
        *attempt += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(Duration::from_millis(ms).min(left)).await;
        Ok(())
    }

    /// Deadline for a state entered at `rec.updated_ms`.
    fn deadline(&self, rec: &PromotionRecord, secs: u64) -> Instant {
        let now = unix_ms(std::time::SystemTime::now());
        Instant::now() + decide::time_left(rec.updated_ms, now, Duration::from_secs(secs))
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
