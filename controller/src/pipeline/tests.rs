//! Whole promotions over [`FakeCloud`], with the agents played by a scripted
//! stand-in at the registry level (reports and verdicts delivered as the
//! gateway delivers them): crash at every cloud call and resume, cleanup of
//! everything created, throttling.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use amiprep_proto::v1::{AgentInfo, Check, Report, VerifyResult, controller_message};
use tokio::sync::mpsc;

use super::{Pipeline, Step, TAG_PROMOTION, TAG_ROLE, TAG_STATUS};
use crate::{
    cloud::{Cloud, ImageState, InstanceState, fake::FakeCloud},
    config::PipelineSection,
    registry::{AgentEvent, Registry, SessionHandle},
    state::PromotionState,
    store::{PromotionRecord, PromotionSpec, Store},
};

const REGION: &str = "us-east-1";
const COPY_REGION: &str = "us-west-2";
const SOURCE: &str = "i-source";

struct World {
    cloud: Arc<FakeCloud>,
    store: Arc<Store>,
    registry: Arc<Registry>,
    cfg: PipelineSection,
    verdict_ok: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
    agents: tokio::task::JoinHandle<()>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.agents.abort();
    }
}

fn spec(canary: bool, copy: bool) -> PromotionSpec {
    PromotionSpec {
        instance_id: SOURCE.into(),
        name: "web-1".into(),
        canary,
        copy_to: if copy {
            vec![(COPY_REGION.into(), String::new())]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

impl World {
    fn new(max_step_retries: u32) -> World {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PipelineSection {
            state_db: dir.path().join("state.db"),
            manifest_dir: dir.path().join("manifests"),
            poll_initial_ms: 1,
            poll_max_ms: 4,
            max_step_retries,
            fingerprint_key: dir.path().join("fingerprint.key"),
            ..Default::default()
        };
        crate::certs::write_fingerprint_key(&cfg.fingerprint_key).unwrap();
        let cloud = Arc::new(FakeCloud::new(Default::default()));
        cloud.add_instance(REGION, SOURCE);
        let store = Arc::new(Store::open(&cfg.state_db).unwrap());
        let registry = Arc::new(Registry::default());
        let verdict_ok = Arc::new(AtomicBool::new(true));
        let agents = tokio::spawn(play_agents(
            cloud.clone(),
            registry.clone(),
            verdict_ok.clone(),
        ));
        World {
            cloud,
            store,
            registry,
            cfg,
            verdict_ok,
            _dir: dir,
            agents,
        }
    }

    /// A controller: a fresh pipeline over the same store, cloud and agents.
    fn controller(&self) -> Arc<Pipeline> {
        Pipeline::new(
            self.store.clone(),
            self.cloud.clone() as Arc<dyn Cloud>,
            self.registry.clone(),
            self.cfg.clone(),
            REGION.into(),
        )
    }

    async fn until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn record(&self, id: &str) -> PromotionRecord {
        self.store.get(id).unwrap().unwrap()
    }

    /// Submits, and when the injected crash kills the driver, starts a new
    /// controller that resumes; returns the finished record.
    async fn run(&self, id: &str, spec: &PromotionSpec) -> PromotionRecord {
        let first = self.controller();
        first.submit(id, spec).unwrap();
        let store = self.store.clone();
        let cloud = self.cloud.clone();
        self.until("the promotion to finish or crash", || {
            cloud.crashed() || store.get(id).unwrap().unwrap().state.is_terminal()
        })
        .await;
        if self.cloud.crashed() && !self.record(id).state.is_terminal() {
            // The panicking task is gone; a restarted controller resumes.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let second = self.controller();
            assert_eq!(second.resume_all().unwrap(), 1);
        }
        self.until("the promotion to finish", || {
            store.get(id).unwrap().unwrap().state.is_terminal()
        })
        .await;
        self.record(id)
    }

    /// What of this promotion is left in the cloud: live images, snapshots,
    /// live instances other than the source.
    fn left_over(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let images: Vec<String> = self.cloud.images().into_keys().collect();
        let snapshots: Vec<String> = self.cloud.snapshots().into_keys().collect();
        let instances: Vec<String> = self
            .cloud
            .instances()
            .into_iter()
            .filter(|(id, i)| id != SOURCE && !i.state.is_gone())
            .map(|(id, _)| id)
            .collect();
        (images, snapshots, instances)
    }

    /// Promoted: exactly one AMI per region, recorded, available and tagged
    /// verified; every snapshot belongs to one of them; no canary left.
    fn assert_promoted_once(&self, rec: &PromotionRecord, regions: usize, ctx: &str) {
        assert_eq!(
            rec.state,
            PromotionState::Promoted,
            "{ctx}: {:?} {}",
            rec.failure_reason,
            rec.last_message
        );
        let images = self.cloud.images();
        assert_eq!(images.len(), regions, "{ctx}: images {images:?}");
        for (id, img) in &images {
            assert_eq!(img.state, ImageState::Available, "{ctx}");
            assert!(
                rec.resources.iter().any(|r| &r.id == id && !r.deleted),
                "{ctx}: {id} not recorded"
            );
            assert!(
                img.tags
                    .iter()
                    .any(|(k, v)| k == TAG_STATUS && v == "verified"),
                "{ctx}: {id} not tagged verified"
            );
        }
        for (snap, s) in self.cloud.snapshots() {
            assert!(
                images.values().any(|i| i.snapshot_ids.contains(&snap)),
                "{ctx}: orphan snapshot {snap}"
            );
            assert!(
                s.tags
                    .iter()
                    .any(|(k, v)| k == TAG_PROMOTION && v == &rec.id),
                "{ctx}: snapshot {snap} untagged"
            );
        }
        let (_, _, instances) = self.left_over();
        assert!(instances.is_empty(), "{ctx}: canaries left {instances:?}");
        assert_eq!(
            self.cloud.instance_state(SOURCE),
            Some(InstanceState::Stopped),
            "{ctx}"
        );
        assert!(rec.manifest_path.is_some(), "{ctx}");
    }

    fn assert_nothing_left(&self, rec: &PromotionRecord, ctx: &str) {
        assert!(
            matches!(
                rec.state,
                PromotionState::Failed | PromotionState::Cancelled
            ),
            "{ctx}: {}",
            rec.state
        );
        let (images, snapshots, instances) = self.left_over();
        assert!(images.is_empty(), "{ctx}: images left {images:?}");
        assert!(snapshots.is_empty(), "{ctx}: snapshots left {snapshots:?}");
        assert!(instances.is_empty(), "{ctx}: instances left {instances:?}");
        assert!(
            rec.resources.iter().all(|r| r.deleted),
            "{ctx}: {:?}",
            rec.resources
        );
    }
}

/// Connects an agent for every running instance that would have one (the
/// source, and canaries booted from its image) and answers as the real
/// agent does: a ready report to `Prepare`, a verdict to `Verify`. An
/// instance that stops running loses its session.
async fn play_agents(cloud: Arc<FakeCloud>, registry: Arc<Registry>, verdict_ok: Arc<AtomicBool>) {
    let mut sessions: HashMap<String, SessionHandle> = HashMap::new();
    let mut n = 0u64;
    loop {
        for (id, inst) in cloud.instances() {
            let agent = id == SOURCE
                || inst
                    .tags
                    .iter()
                    .any(|(k, v)| k == TAG_ROLE && v == "canary");
            let running = inst.state == InstanceState::Running;
            if agent && running && !sessions.contains_key(&id) {
                n += 1;
                let (tx, rx) = mpsc::channel(16);
                let handle = registry.register_with(
                    AgentInfo {
                        instance_id: id.clone(),
                        session_id: format!("s{n}"),
                        region: REGION.into(),
                        ..Default::default()
                    },
                    Some(tx),
                );
                tokio::spawn(answer(
                    rx,
                    registry.clone(),
                    handle.clone(),
                    verdict_ok.clone(),
                ));
                sessions.insert(id, handle);
            } else if !running && let Some(h) = sessions.remove(&id) {
                registry.remove(&h);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn answer(
    mut rx: mpsc::Receiver<Result<amiprep_proto::v1::ControllerMessage, tonic::Status>>,
    registry: Arc<Registry>,
    session: SessionHandle,
    verdict_ok: Arc<AtomicBool>,
) {
    while let Some(Ok(m)) = rx.recv().await {
        match m.msg {
            Some(controller_message::Msg::Prepare(p)) => {
                assert_eq!(
                    p.fingerprint_key.len(),
                    32,
                    "the deployment's fingerprint key is sent with prepare"
                );
                let _ = registry.deliver(
                    &session,
                    &p.promotion_id,
                    AgentEvent::Report(Report {
                        promotion_id: p.promotion_id.clone(),
                        ready: true,
                        report_json: r#"{"steps":[]}"#.into(),
                        source_machine_id_sha256: "machine".into(),
                        source_host_key_fingerprints: vec!["SHA256:key".into()],
                        ..Default::default()
                    }),
                );
            }
            Some(controller_message::Msg::Verify(v)) => {
                assert_eq!(
                    v.fingerprint_key.len(),
                    32,
                    "the deployment's fingerprint key is sent with verify"
                );
                assert_eq!(
                    v.expectations
                        .as_ref()
                        .map(|e| e.source_machine_id_sha256.as_str()),
                    Some("machine"),
                    "the canary is asked to differ from the recorded source identity"
                );
                let ok = verdict_ok.load(Ordering::SeqCst);
                // A late answer after the waiter went is refused as
                // nobody-waiting, as the gateway would; nothing to do then.
                let _ = registry.deliver(
                    &session,
                    &v.promotion_id,
                    AgentEvent::Verify(VerifyResult {
                        promotion_id: v.promotion_id.clone(),
                        ok,
                        checks: vec![Check {
                            name: "identity".into(),
                            ok,
                            detail: if ok { "regenerated" } else { "same machine-id" }.into(),
                        }],
                        error: String::new(),
                    }),
                );
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotes_with_and_without_canary_and_copies() {
    for (canary, copy) in [(true, true), (false, false), (true, false)] {
        let w = World::new(5);
        let rec = w.run("p1", &spec(canary, copy)).await;
        let ctx = format!("canary={canary} copy={copy}");
        w.assert_promoted_once(&rec, if copy { 2 } else { 1 }, &ctx);
        assert_eq!(w.cloud.calls_of("CreateImage"), 1, "{ctx}");
        assert_eq!(
            w.cloud.calls_of("RunInstances"),
            usize::from(canary),
            "{ctx}"
        );
        assert_eq!(w.cloud.calls_of("CopyImage"), usize::from(copy), "{ctx}");
    }
}

/// A controller killed at each cloud call of a promotion (the call acted,
/// its answer was lost) and restarted: every run ends promoted with exactly
/// one AMI per region and nothing orphaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_crash_at_every_cloud_call() {
    let clean = World::new(5);
    clean.run("p1", &spec(true, true)).await;
    let calls = clean.cloud.call_count();
    assert!(calls > 20, "a promotion makes {calls} calls");
    let mut crashed = 0;
    for n in 1..=calls {
        let w = World::new(5);
        w.cloud.panic_at_call(n);
        let rec = w.run("p1", &spec(true, true)).await;
        crashed += usize::from(w.cloud.crashed());
        w.assert_promoted_once(&rec, 2, &format!("crash at call {n} of {calls}"));
    }
    // Polls vary a little between runs; nearly every run did crash.
    assert!(
        crashed >= calls * 3 / 4,
        "{crashed} of {calls} runs crashed"
    );
}

/// A canary that gives a bad verdict fails the promotion, and cleanup
/// removes the canary, the AMI, its copy and every snapshot — also when the
/// controller is killed at any call on the way, cleanup included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_everything_created_even_after_a_crash() {
    let clean = World::new(5);
    clean.verdict_ok.store(false, Ordering::SeqCst);
    let rec = clean.run("p1", &spec(true, false)).await;
    clean.assert_nothing_left(&rec, "clean run");
    assert!(
        rec.failure_reason
            .as_deref()
            .unwrap_or_default()
            .contains("canary verification failed: identity: same machine-id"),
        "{:?}",
        rec.failure_reason
    );
    assert_eq!(rec.failed_in, Some(PromotionState::VerifyingCanary));
    let calls = clean.cloud.call_count();
    for n in 1..=calls {
        let w = World::new(5);
        w.verdict_ok.store(false, Ordering::SeqCst);
        w.cloud.panic_at_call(n);
        let rec = w.run("p1", &spec(true, false)).await;
        w.assert_nothing_left(&rec, &format!("crash at call {n} of {calls}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_image_is_removed_with_its_snapshots() {
    let w = World::new(5);
    w.cloud.fail_next_image();
    let rec = w.run("p1", &spec(true, false)).await;
    w.assert_nothing_left(&rec, "failed image");
    assert_eq!(rec.failed_in, Some(PromotionState::AwaitingImage));
    assert!(
        rec.failure_reason
            .as_deref()
            .unwrap_or_default()
            .contains("is failed: snapshot creation failed"),
        "{:?}",
        rec.failure_reason
    );
    assert_eq!(w.cloud.calls_of("RunInstances"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_within_the_retry_budget_is_ridden_out() {
    let w = World::new(5);
    w.cloud.throttle(4);
    let rec = w.run("p1", &spec(true, false)).await;
    w.assert_promoted_once(&rec, 1, "throttled 4 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_past_the_retry_budget_fails_and_still_cleans_up() {
    let w = World::new(3);
    // Four attempts of the first step are throttled: it gives up; the
    // first cleanup attempts are throttled too, then cleanup finishes.
    w.cloud.throttle(6);
    let rec = w.run("p1", &spec(true, false)).await;
    w.assert_nothing_left(&rec, "throttled");
    let reason = rec.failure_reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("gave up after 3 retries: EC2 DescribeInstances: throttled"),
        "{reason}"
    );
    assert_eq!(rec.failed_in, Some(PromotionState::Pending));
    assert_eq!(w.cloud.calls_of("StopInstances"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_way_removes_what_was_created() {
    let w = World::new(5);
    let p = w.controller();
    p.submit("p1", &spec(true, false)).unwrap();
    let cloud = w.cloud.clone();
    w.until("an image to exist", || !cloud.images().is_empty())
        .await;
    assert!(p.cancel("p1").unwrap());
    let store = w.store.clone();
    w.until("the promotion to end", || {
        store.get("p1").unwrap().unwrap().state.is_terminal()
    })
    .await;
    let rec = w.record("p1");
    assert_eq!(rec.state, PromotionState::Cancelled);
    w.assert_nothing_left(&rec, "cancelled");
}

/// Every step run twice over the same record (as after a crash just before
/// its transition was written) creates nothing twice: the second run ends
/// the same way and the cloud holds what one run made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_is_idempotent() {
    let w = World::new(5);
    let p = w.controller();
    w.store.insert("p1", &spec(true, true), REGION).unwrap();
    let mut seen = Vec::new();
    loop {
        let rec = w.record("p1");
        if rec.state.is_terminal() {
            break;
        }
        seen.push(rec.state);
        let first = p.run_step(&rec).await.unwrap();
        let made = (w.cloud.images().len(), w.cloud.instances().len());
        let again = p.run_step(&w.record("p1")).await.unwrap();
        let ctx = format!("step {}", rec.state);
        assert_eq!(
            (w.cloud.images().len(), w.cloud.instances().len()),
            made,
            "{ctx} created again"
        );
        let next = match (first, again) {
            (Ok(Step::Next(_)), Ok(Step::Next(_))) => rec.state.next(true).unwrap(),
            (a, b) => panic!("{ctx}: {:?} then {:?}", a.is_ok(), b.is_ok()),
        };
        w.store.set_state("p1", next, "next").unwrap();
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
    let rec = w.record("p1");
    w.assert_promoted_once(&rec, 2, "each step twice");
    assert_eq!(w.cloud.calls_of("CreateImage"), 1);
    assert_eq!(w.cloud.calls_of("RunInstances"), 1);
    assert_eq!(w.cloud.calls_of("CopyImage"), 1);
}
