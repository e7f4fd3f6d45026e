//! Promotions end to end: the real controller against moto (through the
//! fault proxy), with the instance simulator running a real agent for every
//! instance moto reports running.

use std::{path::PathBuf, process::Command, time::Duration};

use amiprep_tests::{
    Controller, ControllerOpts, Moto, Pki, bin,
    fault::{FaultProxy, Faults},
    run,
    sim::{SimConfig, Simulator},
    wait_for,
};
use serde_json::Value;

use crate::client::runtime;

/// A policy that leaves the package manager alone: the simulated roots have
/// no package database and tests never reach a mirror.
pub const TEST_POLICY: &str = "[steps]\nskip = [\"packages\"]\n";

pub struct World {
    pub moto: Moto,
    pub proxy: FaultProxy,
    pub pki: Pki,
    pub controller: Controller,
    pub sim: Simulator,
    pub source: String,
    /// Instance roots live here; removed with the world.
    _work: tempfile::TempDir,
}

impl World {
    pub fn new(extra_pipeline: &str) -> World {
        Self::with_timeouts(30, extra_pipeline)
    }

    /// `timeout` bounds each wait (stop, image, canary); extra `[pipeline]` keys follow.
    pub fn with_timeouts(timeout: u64, extra_pipeline: &str) -> World {
        Self::build(timeout, extra_pipeline, "")
    }

    /// As [`World::with_timeouts`], with extra `[ec2]` keys.
    pub fn build(timeout: u64, extra_pipeline: &str, extra_ec2: &str) -> World {
        let moto = Moto::start();
        let proxy = FaultProxy::start(&format!("127.0.0.1:{}", moto.port));
        let pki = Pki::new();
        let work = tempfile::tempdir().unwrap();
        let controller = Controller::start(
            &pki,
            ControllerOpts {
                ec2_endpoint: Some(proxy.endpoint()),
                ec2_extra: extra_ec2.to_owned(),
                extra: format!(
                    "[pipeline]\nstate_db = {:?}\nmanifest_dir = {:?}\npoll_initial_ms = 100\npoll_max_ms = 400\nagent_wait_secs = {timeout}\nprepare_timeout_secs = {timeout}\nstop_timeout_secs = {timeout}\nimage_timeout_secs = {timeout}\ncanary_timeout_secs = {timeout}\n{extra_pipeline}",
                    pki.file("state.db"),
                    pki.file("manifests")
                ),
                ..Default::default()
            },
        );
        let sim = Simulator::start(SimConfig {
            ec2: moto.client(),
            pki: pki.path().to_owned(),
            controller_port: controller.port,
            template_root: amiprep_tests::sim::template_root(work.path()),
            work: work.path().join("instances"),
        });
        let source = runtime().block_on(moto.run_instance());
        assert!(
            controller.wait_agent(&source, true, Duration::from_secs(30)),
            "source agent never connected\n{}",
            sim.log()
        );
        World {
            moto,
            proxy,
            pki,
            controller,
            sim,
            source,
            _work: work,
        }
    }

    pub fn amiprep(&self, args: &[&str]) -> std::process::Output {
        run(Command::new(bin("amiprep"))
            .args(args)
            .arg("--socket")
            .arg(&self.controller.socket))
    }

    pub fn policy_file(&self) -> PathBuf {
        let p = self.pki.file("policy.toml");
        std::fs::write(&p, TEST_POLICY).unwrap();
        p
    }

    pub fn status(&self, id: &str) -> Value {
        let out = self.amiprep(&["status", id, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn wait_state(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        wait_for(timeout, || {
            let s = self.status(id);
            states.contains(&s["state"].as_str()?).then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "{id} never reached {states:?}: {}\ncontroller:\n{}\nsim:\n{}",
                self.status(id),
                self.controller.proc.log_text(),
                self.sim.log()
            )
        })
    }

    /// Images owned by this account carrying the promotion's tag, per region.
    pub fn images_of(&self, id: &str, region: &str) -> Vec<String> {
        runtime().block_on(self.moto.images_of(id, region))
    }

    /// Instances (not terminated) other than the source.
    pub fn live_others(&self) -> Vec<String> {
        let client = self.moto.client();
        runtime().block_on(async {
            client
                .describe_instances()
                .send()
                .await
                .unwrap()
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter(|i| {
                    i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated")
                })
                .filter_map(|i| i.instance_id().map(str::to_owned))
                .filter(|i| *i != self.source)
                .collect()
        })
    }

    pub fn source_state(&self) -> String {
        runtime().block_on(self.moto.instance_state(&self.source))
    }

    pub fn source_root(&self) -> PathBuf {
        self.sim.root_of(&self.source).expect("source root")
    }

    /// A moment into the current state, kills the controller (SIGKILL) and
    /// starts it again on the same port, database and configuration.
    pub fn kill_controller_and_restart(&mut self) {
        std::thread::sleep(Duration::from_millis(500));
        self.controller.restart(&self.pki);
    }

    /// Starts the source again (after a promotion stopped it) and waits for its agent.
    pub fn restart_source(&self) {
        runtime()
            .block_on(
                self.moto
                    .client()
                    .start_instances()
                    .instance_ids(&self.source)
                    .send(),
            )
            .unwrap();
        assert!(
            self.controller
                .wait_agent(&self.source, true, Duration::from_secs(30))
        );
    }

    pub fn snapshots_left(&self) -> usize {
        let client = self.moto.client();
        runtime().block_on(async {
            client
                .describe_snapshots()
                .owner_ids("self")
                .send()
                .await
                .unwrap()
                .snapshots()
                .len()
        })
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn happy_path_with_canary_and_copy_to_second_region() {
    let metrics_port = amiprep_tests::free_port();
    let w = World::new(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    let policy = w.pki.file("policy-services.toml");
    std::fs::write(
        &policy,
        format!("{TEST_POLICY}[services]\ndisable = [\"cups.service\"]\n"),
    )
    .unwrap();
    let out = w.amiprep(&[
        "promote",
        &w.source,
        "--name",
        "web-{date}-{promotion}",
        "--tag",
        "team=platform",
        "--copy-to",
        "us-west-2:alias/amiprep-west",
        "--share-with",
        "111122223333",
        "--deprecate-after",
        "30",
        "--policy",
        policy.to_str().unwrap(),
        "--wait",
    ]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "promote failed: {text}\n{}\ncontroller:\n{}\nsim:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.controller.proc.log_text(),
        w.sim.log()
    );
    let id = text.lines().next().unwrap().trim().to_owned();
    let status = w.status(&id);
    assert_eq!(status["state"], "promoted");
    let manifest_path = status["manifest_path"].as_str().unwrap();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["promotion"], id.as_str());
    assert_eq!(manifest["source_instance"], w.source.as_str());
    let east = manifest["amis"]["us-east-1"].as_str().unwrap();
    let west = manifest["amis"]["us-west-2"].as_str().unwrap();
    assert_eq!(w.images_of(&id, "us-east-1"), vec![east.to_owned()]);
    assert_eq!(w.images_of(&id, "us-west-2"), vec![west.to_owned()]);
    assert_eq!(manifest["report_sha256"].as_str().unwrap().len(), 64);
    assert!(text.contains(&format!("promoted {east}")), "{text}");
    // Tagged verified with the report digest.
    let client = w.moto.client();
    let tags: Vec<(String, String)> = runtime().block_on(async {
        client
            .describe_images()
            .image_ids(east)
            .send()
            .await
            .unwrap()
            .images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect()
    });
    for (k, v) in [
        ("amiprep:status", "verified"),
        ("amiprep:promotion", id.as_str()),
        ("amiprep:source-instance", w.source.as_str()),
        ("team", "platform"),
    ] {
        assert!(
            tags.contains(&(k.to_owned(), v.to_owned())),
            "{k}={v} missing in {tags:?}"
        );
    }
    // The canary ran (its agent verified) and is gone; the source is stopped.
    let resources = status["resources"].as_array().unwrap();
    assert!(
        resources
            .iter()
            .any(|r| r.as_str().unwrap().starts_with("canary ")
                && r.as_str().unwrap().ends_with("(removed)")),
        "{resources:?}"
    );
    assert!(w.live_others().is_empty(), "{:?}", w.live_others());
    assert_eq!(w.source_state(), "stopped");
    // The canary's agent checked every line of the policy, including the
    // service the policy disables and a scan of its booted disk (its own
    // new host private keys are expected there).
    let history = String::from_utf8_lossy(&out.stderr);
    assert!(
        history.contains(
            "verified: machine-id regenerated, ssh host keys regenerated, services as the policy asked, scan clean"
        ),
        "{history}"
    );
    let masked =
        std::fs::read_link(w.source_root().join("etc/systemd/system/cups.service")).unwrap();
    assert_eq!(masked, PathBuf::from("/dev/null"));
    // The copy was asked encrypted with the region's key, and both images
    // may be launched by the shared account.
    assert_eq!(
        w.proxy.stats().copies,
        vec![("true".to_owned(), "alias/amiprep-west".to_owned())]
    );
    for (region, image) in [("us-east-1", east), ("us-west-2", west)] {
        let client = w.moto.client_in(region);
        let users: Vec<String> = runtime().block_on(async {
            client
                .describe_image_attribute()
                .image_id(image)
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send()
                .await
                .unwrap()
                .launch_permissions()
                .iter()
                .filter_map(|p| p.user_id().map(str::to_owned))
                .collect()
        });
        assert_eq!(users, ["111122223333"], "{region} {image}");
    }
    // Both images got a deprecation time 30 days out.
    let deprecations = w.proxy.stats().deprecations;
    let day = |d: time::OffsetDateTime| {
        d.format(&time::format_description::well_known::Rfc3339)
            .unwrap()[..10]
            .to_owned()
    };
    let in_30 = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    let mut images: Vec<&str> = deprecations.iter().map(|(i, _)| i.as_str()).collect();
    images.sort();
    let mut want = vec![east, west];
    want.sort();
    assert_eq!(images, want, "{deprecations:?}");
    for (_, at) in &deprecations {
        // Either side of midnight while the test ran.
        let near = [day(in_30 - time::Duration::hours(1)), day(in_30)];
        assert!(
            near.iter().any(|d| at.starts_with(d.as_str())),
            "{at} vs {near:?}"
        );
    }

    // Prometheus metrics reflect the promotion.
    let metrics = scrape(metrics_port);
    for needle in [
        "amiprep_promotions{state=\"promoted\"} 1",
        "amiprep_ec2_calls_total{action=\"CreateImage\"} 1",
        "amiprep_ec2_calls_total{action=\"CopyImage\"} 1",
        "amiprep_step_duration_seconds_count{state=\"verifying-canary\"} 1",
        "amiprep_agents_connected ",
    ] {
        assert!(metrics.contains(needle), "{needle} missing in\n{metrics}");
    }
}

pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// Runs `amiprep promote SOURCE ...` with the test policy.
pub fn promote(w: &World, extra: &[&str]) -> (std::process::Output, String) {
    promote_as(w, &w.source, "img-{promotion}", extra)
}

/// Runs `amiprep promote INSTANCE --name NAME ...` with the test policy;
/// returns the output and the promotion id it printed.
fn promote_as(
    w: &World,
    instance: &str,
    name: &str,
    extra: &[&str],
) -> (std::process::Output, String) {
    let policy = w.policy_file();
    let mut args = vec![
        "promote",
        instance,
        "--name",
        name,
        "--policy",
        policy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = w.amiprep(&args);
    let id = stdout(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    (out, id)
}

#[test]
fn failed_image_is_cleaned_up() {
    let w = World::new("");
    let snapshots_before = w.snapshots_left();
    w.proxy.set(Faults {
        image_failed: true,
        ..Default::default()
    });
    let (out, id) = promote(&w, &["--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = w.status(&id);
    assert_eq!(s["state"], "failed");
    assert!(
        s["failure_reason"]
            .as_str()
            .unwrap()
            .contains("is failed: injected failure"),
        "{s}"
    );
    w.proxy.set(Faults::default());
    assert!(
        w.images_of(&id, "us-east-1").is_empty(),
        "image left behind"
    );
    assert_eq!(w.snapshots_left(), snapshots_before, "snapshot left behind");
    assert!(w.live_others().is_empty());
    let removed = s["resources"].as_array().unwrap();
    assert!(
        removed
            .iter()
            .all(|r| r.as_str().unwrap().ends_with("(removed)")),
        "{removed:?}"
    );
    // The source was stopped for the image and is left so by default; the
    // status says so.
    assert_eq!(w.source_state(), "stopped");
    let last = s["last_message"].as_str().unwrap();
    assert!(
        last.contains(&format!("source {} left stopped", w.source)),
        "{last}"
    );
    assert!(last.contains("removed"), "{last}");
}

#[test]
fn keep_on_failure_keeps_and_lists_what_was_created() {
    let w = World::new("");
    w.proxy.set(Faults {
        image_failed: true,
        ..Default::default()
    });
    let (out, id) = promote(&w, &["--keep-on-failure", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    w.proxy.set(Faults::default());
    let s = w.status(&id);
    assert_eq!(s["state"], "failed", "{s}");
    let kept = w.images_of(&id, "us-east-1");
    assert_eq!(kept.len(), 1, "{s}");
    let last = s["last_message"].as_str().unwrap();
    assert!(
        last.contains(&format!(
            "kept (--keep-on-failure): image {} (us-east-1)",
            kept[0]
        )),
        "{last}"
    );
    assert!(last.contains("snapshot snap-"), "{last}");
    assert!(
        s["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| !r.as_str().unwrap().ends_with("(removed)")),
        "{s}"
    );
}

#[test]
fn a_credential_appearing_on_the_canary_fails_and_the_source_is_started_again() {
    let w = World::new("");
    let snapshots_before = w.snapshots_left();
    // Something in the image writes a key at first boot: the source's scan
    // cannot see it, the canary's must.
    let key = amiprep_tests::fake_private_key();
    w.sim.plant_in_canaries("root/.ssh/id_ed25519", &key);
    let (out, id) = promote(&w, &["--after", "start", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = w.status(&id);
    assert_eq!(s["state"], "failed", "{s}");
    let reason = s["failure_reason"].as_str().unwrap();
    assert!(reason.contains("canary verification failed"), "{reason}");
    assert!(reason.contains("scan clean"), "{reason}");
    assert!(reason.contains("root/.ssh/id_ed25519"), "{reason}");
    let body: String = key.lines().nth(1).unwrap().chars().take(40).collect();
    let everything = format!("{s}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !everything.contains(&body),
        "key material shown: {everything}"
    );
    // Everything created is gone, and the source runs again.
    assert!(w.images_of(&id, "us-east-1").is_empty());
    assert_eq!(w.snapshots_left(), snapshots_before);
    assert!(w.live_others().is_empty(), "{:?}", w.live_others());
    let last = s["last_message"].as_str().unwrap();
    assert!(
        last.contains(&format!(
            "source {} started again (--after start)",
            w.source
        )),
        "{last}"
    );
    assert!(
        amiprep_tests::wait_for(Duration::from_secs(30), || (w.source_state() == "running")
            .then_some(()))
        .is_some(),
        "source is {}",
        w.source_state()
    );
}

#[test]
fn credentials_on_the_host_fail_the_promotion_before_anything_is_created() {
    let w = World::new("");
    let secret = format!("{}{}", "wJalrXUtnFEMI/K7MDENG/", "bPxRfiCYzQ8mQ3cRtPlM");
    let aws = w.source_root().join("root/.aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        format!(
            "[default]\naws_access_key_id = AKIA{}\naws_secret_access_key = {secret}\n",
            "Q4RZT7KWJX2PLM3N"
        ),
    )
    .unwrap();
    let (out, id) = promote(&w, &["--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let s = w.status(&id);
    let reason = s["failure_reason"].as_str().unwrap();
    assert_eq!(s["state"], "failed");
    assert!(reason.contains("credential finding"), "{reason}");
    assert!(reason.contains("root/.aws/credentials"), "{reason}");
    let everything = format!(
        "{s}{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !everything.contains(&secret),
        "the secret leaked: {everything}"
    );
    assert!(w.images_of(&id, "us-east-1").is_empty());
    assert_eq!(
        w.source_state(),
        "running",
        "nothing happened to the source"
    );
    assert!(s["resources"].as_array().unwrap().is_empty(), "{s}");
}

#[test]
fn cancel_mid_way_cleans_up() {
    let w = World::new("");
    let snapshots_before = w.snapshots_left();
    w.proxy.set(Faults {
        image_pending_for: Some(Duration::from_secs(120)),
        ..Default::default()
    });
    let (out, id) = promote(&w, &[]);
    assert!(out.status.success());
    w.wait_state(&id, &["awaiting-image"], Duration::from_secs(30));
    let out = w.amiprep(&["cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = w.wait_state(
        &id,
        &["cancelled", "failed", "promoted"],
        Duration::from_secs(30),
    );
    assert_eq!(s["state"], "cancelled", "{s}");
    w.proxy.set(Faults::default());
    assert!(w.images_of(&id, "us-east-1").is_empty());
    assert_eq!(w.snapshots_left(), snapshots_before);
    // Cancelling again is refused: it already ended.
    let again = w.amiprep(&["cancel", &id]);
    assert_eq!(again.status.code(), Some(2));
}

#[test]
fn throttling_storm_completes() {
    // Adaptive retry slows the client down while throttled: give it time.
    let w = World::with_timeouts(180, "");
    w.proxy.set(Faults {
        throttle_every: Some(3),
        error_every: Some(7),
        ..Default::default()
    });
    let (out, id) = promote(&w, &["--wait"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.controller.proc.log_text()
    );
    let stats = w.proxy.stats();
    assert!(stats.throttled >= 5, "{stats:?}");
    assert!(stats.errors >= 1, "{stats:?}");
    w.proxy.set(Faults::default());
    assert_eq!(w.images_of(&id, "us-east-1").len(), 1);
}

#[test]
fn a_retried_launch_leaves_no_second_canary() {
    // Each RunInstances answer comes after the attempt's time limit, so the
    // SDK retries a request EC2 has already acted on. moto ignores client
    // tokens (EC2 honours them), so every attempt launches an instance:
    // the promotion must still end with none of them running.
    let w = World::build(30, "", "attempt_timeout_secs = 1\n");
    w.proxy.set(Faults {
        hold_response: Some(("RunInstances".to_owned(), Duration::from_millis(1500))),
        ..Default::default()
    });
    let (out, id) = promote(&w, &["--wait"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.controller.proc.log_text()
    );
    let launches = w
        .proxy
        .stats()
        .actions
        .iter()
        .find(|(a, _)| a == "RunInstances")
        .map(|(_, n)| *n)
        .unwrap_or_default();
    assert!(launches >= 2, "the launch was not retried: {launches}");
    w.proxy.set(Faults::default());
    let s = w.status(&id);
    assert_eq!(s["state"], "promoted", "{s}");
    let live = w.live_others();
    assert!(live.is_empty(), "canaries left running: {live:?}");
    let canaries = s["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.as_str().unwrap().starts_with("canary "))
        .count();
    assert!(canaries >= 2, "{s}");
}

#[test]
fn controller_killed_at_each_state_resumes_without_duplicates_or_orphans() {
    let w = World::new("");
    // Each state is held open by delaying the response of the call it makes,
    // after EC2 has acted on it: the crash window that creates orphans.
    // `preparing` is held by freezing the source's agent instead.
    let cases = [
        ("pending", "DescribeInstances"),
        ("preparing", ""),
        ("stopping", "StopInstances"),
        ("creating-image", "CreateImage"),
        ("awaiting-image", "DescribeImages"),
        ("verifying-image", "DescribeSnapshots"),
        ("launching-canary", "RunInstances"),
        ("verifying-canary", "DescribeInstanceStatus"),
        ("distributing", "CopyImage"),
        ("promoting", "CreateTags"),
    ];
    let mut controller_restarts = 0;
    let mut w = w;
    for (state, action) in cases {
        if w.source_state() != "running" {
            w.restart_source();
        }
        let frozen = action.is_empty();
        if frozen {
            assert!(w.sim.signal_agent(&w.source, "STOP"));
        } else {
            w.proxy.set(Faults {
                hold_response: Some((action.to_owned(), Duration::from_secs(3))),
                ..Default::default()
            });
        }
        let (out, id) = promote(&w, &["--copy-to", "us-west-2"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        w.wait_state(&id, &[state], Duration::from_secs(60));
        w.kill_controller_and_restart();
        controller_restarts += 1;
        w.proxy.set(Faults::default());
        if frozen {
            // The agent wakes to a dead session, reconnects, and is asked again.
            assert!(w.sim.signal_agent(&w.source, "CONT"));
        }
        let s = w.wait_state(
            &id,
            &["promoted", "failed", "cancelled"],
            Duration::from_secs(90),
        );
        assert_eq!(
            s["state"],
            "promoted",
            "killed in {state}: {s}\n{}\nsim:\n{}",
            w.controller.proc.log_text(),
            w.sim.log()
        );
        assert_eq!(
            w.images_of(&id, "us-east-1").len(),
            1,
            "killed in {state}: duplicate or missing image"
        );
        assert_eq!(
            w.images_of(&id, "us-west-2").len(),
            1,
            "killed in {state}: duplicate or missing copy"
        );
        assert!(
            w.live_others().is_empty(),
            "killed in {state}: orphaned canary {:?}",
            w.live_others()
        );
    }
    assert_eq!(controller_restarts, cases.len());

    // Killed while cleaning up after a failure: the restarted controller
    // finishes the cleanup, and nothing is left.
    w.restart_source();
    let snapshots_before = w.snapshots_left();
    w.proxy.set(Faults {
        image_failed: true,
        hold_response: Some(("DeregisterImage".to_owned(), Duration::from_secs(3))),
        ..Default::default()
    });
    let (out, id) = promote(&w, &["--copy-to", "us-west-2"]);
    assert!(out.status.success());
    w.wait_state(&id, &["cleaning-up"], Duration::from_secs(60));
    w.kill_controller_and_restart();
    w.proxy.set(Faults::default());
    let s = w.wait_state(
        &id,
        &["promoted", "failed", "cancelled"],
        Duration::from_secs(90),
    );
    assert_eq!(s["state"], "failed", "{s}");
    assert!(w.images_of(&id, "us-east-1").is_empty(), "{s}");
    assert!(w.images_of(&id, "us-west-2").is_empty(), "{s}");
    assert_eq!(w.snapshots_left(), snapshots_before, "{s}");
    assert!(w.live_others().is_empty(), "{:?}", w.live_others());
}

#[test]
fn each_failure_has_a_clear_reason() {
    let w = World::with_timeouts(8, "");
    let fail = |instance: &str, name: &str, extra: &[&str]| -> String {
        let mut args = vec!["--wait"];
        args.extend_from_slice(extra);
        let (out, id) = promote_as(&w, instance, name, &args);
        let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{text}");
        let s = w.status(&id);
        assert_eq!(s["state"], "failed", "{s}");
        assert!(w.live_others().is_empty(), "{:?}", w.live_others());
        assert!(w.images_of(&id, "us-east-1").is_empty());
        s["failure_reason"].as_str().unwrap().to_owned()
    };

    // No such instance.
    let r = fail("i-0123456789abcdef0", "a-{promotion}", &[]);
    assert!(
        r.contains("instance i-0123456789abcdef0 not found in us-east-1"),
        "{r}"
    );

    // The IAM policy lacks CreateImage: fails at once, no retries.
    w.proxy.set(Faults {
        deny: Some("CreateImage".into()),
        ..Default::default()
    });
    let r = fail(&w.source, "b-{promotion}", &[]);
    assert!(r.contains("EC2 CreateImage: access denied"), "{r}");
    w.proxy.set(Faults::default());

    // The source is stopped now: a promotion needs it running.
    let r = fail(&w.source, "c-{promotion}", &[]);
    assert!(
        r.contains(&format!(
            "instance {} is stopped, not running; promotion needs its agent",
            w.source
        )),
        "{r}"
    );

    // The canary boots but its agent never comes up.
    w.restart_source();
    w.sim.canary_agents(false);
    let r = fail(&w.source, "d-{promotion}", &[]);
    assert!(r.contains("never connected and verified within 8 s"), "{r}");
    w.sim.canary_agents(true);

    // The canary's status checks never pass.
    w.restart_source();
    w.proxy.set(Faults {
        status_impaired: true,
        ..Default::default()
    });
    let r = fail(&w.source, "e-{promotion}", &[]);
    assert!(r.contains("never became healthy within 8 s"), "{r}");
    w.proxy.set(Faults::default());

    // The stop never completes.
    w.restart_source();
    w.proxy.set(Faults {
        stop_stuck: true,
        ..Default::default()
    });
    let r = fail(&w.source, "f-{promotion}", &[]);
    assert!(
        r.contains(&format!(
            "instance {} did not stop within 8 s (last state stopping)",
            w.source
        )),
        "{r}"
    );
    w.proxy.set(Faults::default());

    // The name is already taken by an earlier image.
    w.restart_source();
    let (out, _) = promote_as(&w, &w.source, "taken-name", &["--no-canary", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.restart_source();
    let r = fail(&w.source, "taken-name", &["--no-canary"]);
    assert!(
        r.contains("AMI name \"taken-name\" is already taken by ami-"),
        "{r}"
    );
}
