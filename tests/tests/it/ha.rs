//! Several controllers on one PostgreSQL database (Debian's server on
//! loopback), behind one agent address (a round-robin TCP balancer), against
//! moto, with the instance simulator running a real agent per instance.

use std::{process::Command, time::Duration};

use amiprep_controller::{
    state::PromotionState,
    store::{PromotionSpec, Store, is_lease_lost},
};
use amiprep_tests::{
    Controller, ControllerOpts, Moto, Pki, bin,
    fault::{FaultProxy, Faults},
    lb::Balancer,
    postgres::Postgres,
    run,
    sim::{SimConfig, Simulator},
    wait_for,
};
use serde_json::Value;

use crate::{client::runtime, promote::TEST_POLICY};

#[test]
fn leases_fence_writes_expire_on_the_database_clock_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let a = Store::connect_postgres(&pg.url(), "ctl-a").unwrap();
    let b = Store::connect_postgres(&pg.url(), "ctl-b").unwrap();
    assert!(a.shared() && b.shared());
    a.insert("p1", &PromotionSpec::default(), "us-east-1")
        .unwrap();
    // a holds the lease from the insert: b can neither take it nor write.
    assert!(!b.acquire_lease("p1", 30).unwrap());
    let e = b
        .set_state("p1", PromotionState::Preparing, "b")
        .unwrap_err();
    assert!(is_lease_lost(&e), "{e:#}");
    assert!(is_lease_lost(
        &b.add_resource(
            "p1",
            amiprep_controller::state::ResourceKind::Image,
            "r",
            "ami-b"
        )
        .unwrap_err()
    ));
    a.set_state("p1", PromotionState::Preparing, "a").unwrap();
    // Anyone may ask for a cancel; only the driver acts on it.
    assert!(b.request_cancel("p1").unwrap());
    // a renews for one second and then stops renewing: b takes over once
    // the database's clock says it expired, and a's writes are refused.
    assert!(a.acquire_lease("p1", 1).unwrap());
    let took = wait_for(Duration::from_secs(30), || {
        b.acquire_lease("p1", 30).unwrap().then_some(())
    });
    assert!(took.is_some(), "b never took the expired lease");
    assert!(is_lease_lost(
        &a.set_state("p1", PromotionState::Stopping, "a, late")
            .unwrap_err()
    ));
    b.set_state("p1", PromotionState::Stopping, "b").unwrap();
    let rec = a.get("p1").unwrap().unwrap();
    assert_eq!(rec.state, PromotionState::Stopping);
    assert!(rec.cancel_requested);
    assert!(rec.resources.is_empty(), "b's refused write left nothing");
    // An orderly stop gives the lease back at once.
    assert_eq!(b.release_all().unwrap(), 1);
    assert!(a.acquire_lease("p1", 30).unwrap());
    let history: Vec<(String, String)> = a
        .lease_history("p1")
        .unwrap()
        .into_iter()
        .map(|e| (e.owner, e.what))
        .collect();
    let want: Vec<(String, String)> = [
        ("ctl-a", "acquired"),
        ("ctl-b", "taken-over"),
        ("ctl-b", "released"),
        ("ctl-a", "acquired"),
    ]
    .iter()
    .map(|(o, w)| ((*o).into(), (*w).into()))
    .collect();
    assert_eq!(history, want);
    // Both stores read the same counts.
    assert_eq!(
        a.count_by_state().unwrap(),
        vec![(PromotionState::Stopping, 1)]
    );
    assert_eq!(b.unfinished().unwrap().len(), 1);
    // A second start migrates nothing; a newer schema is refused.
    drop((a, b));
    Store::connect_postgres(&pg.url(), "ctl-a").unwrap();
    pg.query("INSERT INTO schema_migrations (version) VALUES (99)");
    let err = Store::connect_postgres(&pg.url(), "ctl-a")
        .err()
        .expect("a newer schema must be refused");
    assert!(format!("{err:#}").contains("newer"), "{err:#}");
    assert!(!format!("{err:#}").contains("password"), "{err:#}");
}

/// Two controllers on one database, one balancer in front of them, and the
/// simulator's agents connecting through the balancer.
struct Fleet {
    pg: Postgres,
    moto: Moto,
    proxy: FaultProxy,
    pki: Pki,
    controllers: Vec<Controller>,
    _lb: Balancer,
    sim: Simulator,
    sources: Vec<String>,
    /// Snapshots moto holds before any promotion.
    snapshots_before: Vec<String>,
    _work: tempfile::TempDir,
}

impl Fleet {
    fn start(sources: usize, lease_secs: u64) -> Fleet {
        let pg = Postgres::start();
        let moto = Moto::start();
        let proxy = FaultProxy::start(&format!("127.0.0.1:{}", moto.port));
        let pki = Pki::new();
        let work = tempfile::tempdir().unwrap();
        let ports = [amiprep_tests::free_port(), amiprep_tests::free_port()];
        let controllers: Vec<Controller> = ["a", "b"]
            .iter()
            .zip(ports)
            .map(|(name, port)| {
                Controller::start_on(
                    &pki,
                    ControllerOpts {
                        ec2_endpoint: Some(proxy.endpoint()),
                        name: format!("-{name}"),
                        extra: format!(
                            "[store]\nurl = {url:?}\ncontroller_id = \"ctl-{name}\"\nlease_secs = {lease_secs}\n\
                             [pipeline]\nmanifest_dir = {m:?}\npoll_initial_ms = 100\npoll_max_ms = 400\n\
                             agent_wait_secs = 120\nprepare_timeout_secs = 240\nstop_timeout_secs = 60\n\
                             image_timeout_secs = 60\ncanary_timeout_secs = 120\n",
                            url = pg.url(),
                            m = pki.file(&format!("manifests-{name}")),
                        ),
                        ..Default::default()
                    },
                    port,
                )
            })
            .collect();
        let lb = Balancer::start(
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
                .collect(),
        );
        let sim = Simulator::start(SimConfig {
            ec2: moto.client(),
            pki: pki.path().to_owned(),
            controller_port: lb.port,
            template_root: amiprep_tests::sim::template_root(work.path()),
            work: work.path().join("instances"),
        });
        let sources: Vec<String> = (0..sources)
            .map(|_| runtime().block_on(moto.run_instance()))
            .collect();
        let fleet = Fleet {
            pg,
            moto,
            proxy,
            pki,
            controllers,
            _lb: lb,
            sim,
            sources,
            snapshots_before: Vec::new(),
            _work: work,
        };
        let mut fleet = fleet;
        fleet.snapshots_before = fleet.snapshots();
        for s in &fleet.sources {
            let on = wait_for(Duration::from_secs(60), || fleet.holder(s));
            assert!(
                on.is_some(),
                "the agent of {s} never connected\n{}",
                fleet.logs()
            );
        }
        fleet
    }

    /// `amiprep ARGS --socket` of controller `c`.
    fn amiprep(&self, c: usize, args: &[&str]) -> std::process::Output {
        run(Command::new(bin("amiprep"))
            .args(args)
            .arg("--socket")
            .arg(&self.controllers[c].socket))
    }

    /// Index of the live controller holding the agent of `instance`.
    fn holder(&self, instance: &str) -> Option<usize> {
        (0..self.controllers.len()).find(|&c| {
            let out = self.amiprep(c, &["agents", "--json"]);
            out.status.success()
                && serde_json::from_slice::<Vec<Value>>(&out.stdout)
                    .unwrap_or_default()
                    .iter()
                    .any(|a| a["instance_id"] == instance && a["controller"] == "")
        })
    }

    fn promote(&self, c: usize, instance: &str) -> String {
        let policy = self.pki.file("policy.toml");
        std::fs::write(&policy, TEST_POLICY).unwrap();
        let out = self.amiprep(
            c,
            &[
                "promote",
                instance,
                "--name",
                "ha-{promotion}",
                "--policy",
                policy.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "promote: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Freezes every source's agent (SIGSTOP) and submits a promotion of
    /// each, to the two controllers in turn: every promotion is held in
    /// `preparing` until the agents are thawed.
    fn promote_frozen(&self) -> Vec<String> {
        for s in &self.sources {
            assert!(self.sim.signal_agent(s, "STOP"));
        }
        self.sources
            .iter()
            .enumerate()
            .map(|(n, s)| self.promote(n % 2, s))
            .collect()
    }

    fn status(&self, c: usize, id: &str) -> Value {
        let out = self.amiprep(c, &["status", id, "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn wait_states(
        &self,
        c: usize,
        ids: &[String],
        states: &[&str],
        timeout: Duration,
    ) -> Vec<String> {
        wait_for(timeout, || {
            let now: Vec<String> = ids
                .iter()
                .map(|id| {
                    self.status(c, id)["state"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned()
                })
                .collect();
            now.iter()
                .all(|s| states.contains(&s.as_str()))
                .then_some(now)
        })
        .unwrap_or_else(|| {
            let now: Vec<Value> = ids.iter().map(|id| self.status(c, id)).collect();
            panic!("never all {states:?}: {now:#?}\n{}", self.logs())
        })
    }

    fn images_of(&self, id: &str) -> usize {
        runtime()
            .block_on(self.moto.images_of(id, "us-east-1"))
            .len()
    }

    fn lease_history(&self, id: &str) -> Vec<(String, String)> {
        self.pg
            .query(&format!(
                "SELECT owner || ' ' || what FROM lease_history WHERE promotion_id = '{id}' ORDER BY seq"
            ))
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(o, w)| (o.to_owned(), w.to_owned()))
            .collect()
    }

    /// The controller whose lease on `id` is live according to the history
    /// (its last event is an acquisition), if any.
    fn driver(&self, id: &str) -> Option<usize> {
        let (owner, what) = self.lease_history(id).pop()?;
        (what != "released").then(|| if owner == "ctl-a" { 0 } else { 1 })
    }

    /// Checks, from the event history of every promotion, that no lease was
    /// ever held by two controllers: an acquisition only of a free lease, a
    /// take-over only from another holder, a release only by the holder.
    fn assert_one_holder_at_a_time(&self, ids: &[String]) {
        for id in ids {
            let h = self.lease_history(id);
            let mut holder: Option<&str> = None;
            for (owner, what) in &h {
                match what.as_str() {
                    "acquired" => assert!(holder.is_none(), "{id}: {h:?}"),
                    "taken-over" => {
                        assert!(holder.is_some_and(|o| o != owner), "{id}: {h:?}")
                    }
                    "released" => assert_eq!(holder, Some(owner.as_str()), "{id}: {h:?}"),
                    other => panic!("{id}: unknown lease event {other}: {h:?}"),
                }
                holder = (what != "released").then_some(owner.as_str());
            }
            assert!(!h.is_empty(), "{id}: never leased");
        }
    }

    /// EC2's state name for `instance`.
    fn instance_state(&self, instance: &str) -> String {
        runtime().block_on(self.moto.instance_state(instance))
    }

    /// Starts a stopped source and waits for its agent to connect.
    fn start_source(&self, instance: &str) {
        runtime()
            .block_on(
                self.moto
                    .client()
                    .start_instances()
                    .instance_ids(instance)
                    .send(),
            )
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(60), || self.holder(instance)).is_some(),
            "the agent of {instance} never came back\n{}",
            self.logs()
        );
    }

    fn snapshots(&self) -> Vec<String> {
        let client = self.moto.client();
        runtime().block_on(async {
            client
                .describe_snapshots()
                .owner_ids("self")
                .send()
                .await
                .unwrap()
                .snapshots()
                .iter()
                .filter_map(|s| s.snapshot_id().map(str::to_owned))
                .collect()
        })
    }

    /// What the promotions left behind: instances other than the sources
    /// that are not terminated, and snapshots made since the start that no
    /// image refers to.
    fn orphans(&self) -> Vec<String> {
        let snapshots = self.snapshots();
        let client = self.moto.client();
        runtime().block_on(async {
            let mut left: Vec<String> = client
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
                .filter(|i| !self.sources.contains(i))
                .collect();
            let images = client
                .describe_images()
                .owners("self")
                .send()
                .await
                .unwrap();
            let used: Vec<&str> = images
                .images()
                .iter()
                .flat_map(|i| i.block_device_mappings())
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
                .collect();
            left.extend(
                snapshots
                    .into_iter()
                    .filter(|s| !used.contains(&s.as_str()) && !self.snapshots_before.contains(s)),
            );
            left
        })
    }

    /// Kills controller `c` with SIGKILL.
    fn kill(&mut self, c: usize) {
        let _ = self.controllers[c].proc.child.kill();
        let _ = self.controllers[c].proc.child.wait();
    }

    /// Starts controller `c` again on its port, with its configuration.
    fn restart(&mut self, c: usize) {
        self.controllers[c].restart(&self.pki);
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for c in &self.controllers {
            s += &format!("--- controller {}:\n{}\n", c.port, c.proc.log_text());
        }
        s + "--- sim:\n" + &self.sim.log()
    }
}

#[test]
fn a_controller_killed_mid_promotion_loses_its_leases_and_the_other_finishes_every_promotion() {
    let mut f = Fleet::start(4, 3);
    // Hold every promotion in `preparing`: the agents are frozen.
    let ids = f.promote_frozen();
    f.wait_states(1, &ids, &["preparing"], Duration::from_secs(120));
    // Both controllers show every promotion, wherever it is driven.
    for c in 0..2 {
        let out = f.amiprep(c, &["list", "--json"]);
        assert!(out.status.success());
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        for id in &ids {
            assert!(listed.to_string().contains(id.as_str()), "{c}: {listed}");
        }
    }
    let held_by_a: Vec<String> = ids
        .iter()
        .filter(|id| {
            f.lease_history(id)
                .last()
                .is_some_and(|(o, w)| o == "ctl-a" && w != "released")
        })
        .cloned()
        .collect();
    assert!(
        !held_by_a.is_empty(),
        "ctl-a drives none of the promotions submitted to it\n{}",
        f.logs()
    );
    // SIGKILL: no hand-back; its leases lapse after 3 s.
    let _ = f.controllers[0].proc.child.kill();
    let _ = f.controllers[0].proc.child.wait();
    for s in &f.sources {
        assert!(f.sim.signal_agent(s, "CONT"));
    }
    let states = f.wait_states(
        1,
        &ids,
        &["promoted", "failed", "cancelled"],
        Duration::from_secs(300),
    );
    assert!(
        states.iter().all(|s| s == "promoted"),
        "{states:?}\n{}",
        f.logs()
    );
    for id in &ids {
        assert_eq!(f.images_of(id), 1, "{id}: duplicate or missing image");
    }
    for id in &held_by_a {
        let h = f.lease_history(id);
        assert!(
            h.contains(&("ctl-b".to_owned(), "taken-over".to_owned())),
            "{id}: {h:?}"
        );
    }
}

#[test]
fn a_promotion_moves_to_the_controller_holding_its_agent_and_sigterm_hands_leases_back() {
    // Leases of ten minutes: nothing below may wait for one to expire.
    let f = Fleet::start(4, 600);
    let mut f = f;
    // Every controller lists every agent, with the controller holding it
    // (sessions are published once per lease tick: wait for it).
    for c in 0..2 {
        let other = ["ctl-b", "ctl-a"][c];
        let listed = wait_for(Duration::from_secs(60), || {
            let out = f.amiprep(c, &["agents", "--json"]);
            let agents: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
            let all = f
                .sources
                .iter()
                .all(|s| agents.iter().any(|a| a["instance_id"] == s.as_str()));
            let remote = agents.iter().any(|a| a["controller"] == other);
            (all && remote).then_some(agents)
        });
        assert!(
            listed.is_some(),
            "controller {c} never listed every agent, with {other}'s among them\n{}",
            f.logs()
        );
    }
    // A promotion submitted to ctl-a for an agent ctl-b holds is handed to ctl-b.
    let on_b = f
        .sources
        .iter()
        .find(|s| f.holder(s) == Some(1))
        .cloned()
        .expect("the balancer gave ctl-b no agent");
    let moved = f.promote(0, &on_b);
    let states = f.wait_states(
        0,
        std::slice::from_ref(&moved),
        &["promoted", "failed", "cancelled"],
        Duration::from_secs(300),
    );
    assert_eq!(states, ["promoted"], "{}", f.logs());
    let h = f.lease_history(&moved);
    assert!(
        h.starts_with(&[
            ("ctl-a".to_owned(), "acquired".to_owned()),
            ("ctl-a".to_owned(), "released".to_owned()),
            ("ctl-b".to_owned(), "acquired".to_owned()),
        ]),
        "{h:?}"
    );

    // SIGTERM while driving: ctl-a gives its leases back and ctl-b finishes.
    let on_a = f
        .sources
        .iter()
        .find(|s| f.holder(s) == Some(0))
        .cloned()
        .expect("the balancer gave ctl-a no agent");
    assert!(f.sim.signal_agent(&on_a, "STOP"));
    let held = f.promote(0, &on_a);
    f.wait_states(
        0,
        std::slice::from_ref(&held),
        &["preparing"],
        Duration::from_secs(120),
    );
    f.controllers[0].proc.signal("TERM");
    let exit = f.controllers[0].proc.wait_exit(Duration::from_secs(60));
    assert!(
        exit.is_some_and(|s| s.success()),
        "ctl-a did not stop cleanly: {exit:?}"
    );
    assert_eq!(
        f.lease_history(&held).last(),
        Some(&("ctl-a".to_owned(), "released".to_owned())),
        "{}",
        f.logs()
    );
    assert!(f.sim.signal_agent(&on_a, "CONT"));
    let states = f.wait_states(
        1,
        std::slice::from_ref(&held),
        &["promoted", "failed", "cancelled"],
        Duration::from_secs(300),
    );
    assert_eq!(states, ["promoted"], "{}", f.logs());
    assert_eq!(f.images_of(&held), 1);
    assert!(
        f.lease_history(&held)
            .contains(&("ctl-b".to_owned(), "acquired".to_owned()))
    );
}

#[test]
fn a_driver_killed_at_each_state_is_replaced_without_duplicates_or_orphans() {
    let mut f = Fleet::start(1, 3);
    let source = f.sources[0].clone();
    // Each state is held open by delaying the response of the call it makes,
    // after EC2 has acted on it; the controller driving it is then killed.
    let cases = [
        ("stopping", "StopInstances"),
        ("creating-image", "CreateImage"),
        ("awaiting-image", "DescribeImages"),
        ("launching-canary", "RunInstances"),
        // `distributing` is not held here: without `--copy-to` it makes no
        // call that can be delayed, and passes too fast to be seen.
    ];
    let mut ids = Vec::new();
    for (state, action) in cases {
        if f.instance_state(&source) != "running" {
            f.start_source(&source);
        }
        f.proxy.set(Faults {
            hold_response: Some((action.to_owned(), Duration::from_secs(3))),
            ..Default::default()
        });
        let id = f.promote(ids.len() % 2, &source);
        let live = 1 - ids.len() % 2;
        f.wait_states(
            live,
            std::slice::from_ref(&id),
            &[state],
            Duration::from_secs(120),
        );
        let driver = wait_for(Duration::from_secs(30), || f.driver(&id))
            .unwrap_or_else(|| panic!("{id} has no driver in {state}\n{}", f.logs()));
        f.kill(driver);
        f.proxy.set(Faults::default());
        let survivor = 1 - driver;
        let end = f.wait_states(
            survivor,
            std::slice::from_ref(&id),
            &["promoted", "failed", "cancelled"],
            Duration::from_secs(300),
        );
        assert_eq!(end, ["promoted"], "killed in {state}\n{}", f.logs());
        assert_eq!(
            f.images_of(&id),
            1,
            "killed in {state}: duplicate or missing image"
        );
        let survivor_id = ["ctl-a", "ctl-b"][survivor];
        assert!(
            f.lease_history(&id)
                .contains(&(survivor_id.to_owned(), "taken-over".to_owned())),
            "killed in {state}: {:?}",
            f.lease_history(&id)
        );
        f.restart(driver);
        ids.push(id);
    }
    f.assert_one_holder_at_a_time(&ids);
    assert_eq!(f.orphans(), Vec::<String>::new(), "{}", f.logs());
}

#[test]
fn both_controllers_killed_at_once_resume_every_promotion_when_restarted() {
    let mut f = Fleet::start(4, 3);
    let ids = f.promote_frozen();
    f.wait_states(0, &ids, &["preparing"], Duration::from_secs(120));
    f.kill(0);
    f.kill(1);
    for s in &f.sources {
        assert!(f.sim.signal_agent(s, "CONT"));
    }
    f.restart(0);
    f.restart(1);
    let states = f.wait_states(
        0,
        &ids,
        &["promoted", "failed", "cancelled"],
        Duration::from_secs(300),
    );
    assert!(
        states.iter().all(|s| s == "promoted"),
        "{states:?}\n{}",
        f.logs()
    );
    for id in &ids {
        assert_eq!(f.images_of(id), 1, "{id}: duplicate or missing image");
    }
    f.assert_one_holder_at_a_time(&ids);
    assert_eq!(f.orphans(), Vec::<String>::new(), "{}", f.logs());
}
