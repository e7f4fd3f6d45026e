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
//!
//! On a shared store (PostgreSQL) several controllers run this driver. Each
//! promotion is driven under a lease that the driver renews while it works
//! ([`lease`] decides, [`Pipeline::coordinate`] finds work): a controller
//! takes the unfinished promotions nobody holds, leaves a step that needs
//! an agent to the controller holding that agent's session, gives its
//! leases back when it stops, and loses them when it dies.

pub mod decide;
pub mod evidence;
pub mod lease;
mod steps;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
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
    /// Lease time on a shared store, in seconds.
    lease_secs: AtomicU64,
    /// Set once this controller is stopping: leases are no longer renewed.
    stopping: AtomicBool,
    /// Instance id → the other controller holding its agent's session, as
    /// last read by [`Pipeline::coordinate`].
    remote_agents: Mutex<HashMap<String, String>>,
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
            lease_secs: AtomicU64::new(15),
            stopping: AtomicBool::new(false),
            remote_agents: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the lease time (shared store only).
    pub fn set_lease_secs(&self, secs: u64) {
        self.lease_secs.store(secs.max(1), Ordering::Relaxed);
    }

    /// The lease time on a shared store, in seconds.
    pub fn lease_secs(&self) -> u64 {
        self.lease_secs.load(Ordering::Relaxed)
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs.load(Ordering::Relaxed))
    }

    /// Starts a driver for every promotion that has not finished. On a
    /// shared store this only counts them: [`Pipeline::coordinate`] takes
    /// each one whose lease is free.
    pub fn resume_all(self: &Arc<Self>) -> anyhow::Result<usize> {
        let unfinished = self.store.unfinished()?;
        if !self.store.shared() {
            for rec in &unfinished {
                info!(promotion = %rec.id, state = %rec.state, "resuming promotion");
                self.spawn(&rec.id);
            }
        }
        Ok(unfinished.len())
    }

    /// Shared store: publishes this controller's agent sessions and takes
    /// the promotions it should drive, every lease tick, until stopped.
    pub async fn coordinate(self: Arc<Self>) {
        if !self.store.shared() {
            return;
        }
        let mut tick = tokio::time::interval(lease::tick(self.lease()));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = self.coordinate_once() {
                warn!("coordinating with the other controllers: {e:#}");
            }
        }
    }

    fn coordinate_once(self: &Arc<Self>) -> anyhow::Result<()> {
        self.store.publish_sessions(&self.registry.list())?;
        // A controller that has not published for two lease times is gone.
        let remote = self
            .store
            .remote_sessions(2 * self.lease_secs.load(Ordering::Relaxed))?;
        *self.remote_agents.lock().unwrap_or_else(|p| p.into_inner()) = remote
            .into_iter()
            .map(|s| (s.info.instance_id, s.controller))
            .collect();
        for rec in self.store.unfinished()? {
            if self.is_running(&rec.id) {
                continue;
            }
            let needed = lease::needed_agent(&rec);
            if lease::should_take(
                self.agent_at(needed)
                    .as_ref()
                    .map(|s| s.as_at())
                    .unwrap_or(lease::AgentAt::Here),
            ) == lease::Take::Leave
            {
                continue;
            }
            if self.store.acquire_lease(&rec.id, self.lease().as_secs())? {
                info!(promotion = %rec.id, state = %rec.state, "driving promotion (lease taken)");
                self.spawn(&rec.id);
            }
        }
        Ok(())
    }

    /// Where the agent of `instance` is connected (`None`: none needed).
    fn agent_at(&self, instance: Option<&str>) -> Option<AgentWhere> {
        let instance = instance?;
        if self.registry.session_of(instance).is_some() {
            return Some(AgentWhere::Here);
        }
        Some(
            match self
                .remote_agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(instance)
            {
                Some(c) => AgentWhere::Elsewhere(c.clone()),
                None => AgentWhere::Nowhere,
            },
        )
    }

    /// Orderly shutdown: stop renewing and give every lease back, so the
    /// other controllers take this one's promotions at their next tick.
    pub fn hand_back(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        if !self.store.shared() {
            return;
        }
        match self.store.release_all() {
            Ok(n) => info!("handed {n} promotion lease(s) back"),
            Err(e) => warn!(
                "handing leases back: {e:#} (they expire in {:?})",
                self.lease()
            ),
        }
    }

    fn is_running(&self, id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
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
        if !self.store.shared() {
            self.drive_steps(id).await;
            return;
        }
        let kept = tokio::select! {
            () = self.drive_steps(id) => None,
            k = self.keep_lease(id) => Some(k),
        };
        match kept {
            None | Some(lease::Keep::HandOver(_)) => {
                if let Some(lease::Keep::HandOver(to)) = &kept {
                    info!(promotion = %id, controller = %to, "leaving the promotion to the controller holding its agent");
                }
                if !self.stopping.load(Ordering::Relaxed)
                    && let Err(e) = self.store.release_lease(id)
                {
                    warn!(promotion = %id, "releasing the lease: {e:#}");
                }
            }
            Some(lease::Keep::Lost) => {
                warn!(promotion = %id, "lease lost: another controller may drive this promotion now");
            }
            Some(lease::Keep::Drive) => {}
        }
    }

    /// Renews the lease on `id` every tick; returns when the driver must
    /// stop (lease lost, stopping, or a hand-over).
    async fn keep_lease(&self, id: &str) -> lease::Keep {
        let lease = self.lease();
        let mut failing_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(lease::tick(lease)).await;
            if self.stopping.load(Ordering::Relaxed) {
                return lease::Keep::Lost;
            }
            let renewed = match self.store.acquire_lease(id, lease.as_secs()) {
                Ok(b) => {
                    failing_since = None;
                    Some(b)
                }
                Err(e) => {
                    warn!(promotion = %id, "renewing the lease: {e:#}");
                    failing_since.get_or_insert_with(Instant::now);
                    None
                }
            };
            let rec = self.store.get(id).ok().flatten();
            let agent = rec
                .as_ref()
                .and_then(|r| self.agent_at(lease::needed_agent(r)));
            let unreachable = failing_since.map_or(Duration::ZERO, |t| t.elapsed());
            match lease::after_tick(
                renewed,
                unreachable,
                lease,
                agent
                    .as_ref()
                    .map_or(lease::AgentAt::Here, AgentWhere::as_at),
            ) {
                lease::Keep::Drive => {}
                other => return other,
            }
        }
    }

    async fn drive_steps(&self, id: &str) {
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
                if !self
                    .record(|| self.store.fail(id, rec.state, "cancelled by the operator"))
                    .await
                {
                    return;
                }
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
                    if !self.record(|| self.store.set_state(id, next, &msg)).await {
                        return;
                    }
                    retry_delay = Duration::from_millis(self.cfg.poll_initial_ms);
                    retries = 0;
                }
                Ok(Step::Finish(state, msg)) => {
                    info!(promotion = %id, state = %state, "{msg}");
                    if !self.record(|| self.store.set_state(id, state, &msg)).await {
                        return;
                    }
                }
                Err(StepError::Fatal(reason)) => {
                    warn!(promotion = %id, state = %rec.state, "failed: {reason}");
                    if !self
                        .record(|| self.store.fail(id, rec.state, &reason))
                        .await
                    {
                        return;
                    }
                }
                Err(StepError::Cancelled) => {
                    if !self
                        .record(|| self.store.fail(id, rec.state, "cancelled by the operator"))
                        .await
                    {
                        return;
                    }
                }
                Err(StepError::Retry(why)) => {
                    if let decide::Transient::GiveUp(reason) =
                        decide::on_transient(retries, self.cfg.max_step_retries, &why)
                    {
                        warn!(promotion = %id, state = %rec.state, "failed: {reason}");
                        if !self
                            .record(|| self.store.fail(id, rec.state, &reason))
                            .await
                        {
                            return;
                        }
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
    /// False when the lease is lost: the driver must stop.
    async fn record(&self, f: impl Fn() -> anyhow::Result<()>) -> bool {
        let mut delay = Duration::from_millis(100);
        while let Err(e) = f() {
            if crate::store::is_lease_lost(&e) {
                warn!("not recording: {e}");
                return false;
            }
            warn!("recording state: {e:#}");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        true
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

/// [`lease::AgentAt`] with an owned controller name.
enum AgentWhere {
    Here,
    Elsewhere(String),
    Nowhere,
}

impl AgentWhere {
    fn as_at(&self) -> lease::AgentAt<'_> {
        match self {
            AgentWhere::Here => lease::AgentAt::Here,
            AgentWhere::Elsewhere(c) => lease::AgentAt::Elsewhere(c),
            AgentWhere::Nowhere => lease::AgentAt::Nowhere,
        }
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
