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
    pki: Pki,
    controllers: Vec<Controller>,
    _lb: Balancer,
    sim: Simulator,
    sources: Vec<String>,
    _work: tempfile::TempDir,
}

impl Fleet {
    fn start(sources: usize, lease_secs: u64) -> Fleet {
        let pg = Postgres::start();
        let moto = Moto::start();
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
                        ec2_endpoint: Some(moto.endpoint()),
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
            pki,
            controllers,
            _lb: lb,
            sim,
            sources,
            _work: work,
        };
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
        let client = self.moto.client();
        runtime().block_on(async {
            client
                .describe_images()
                .owners("self")
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:amiprep:promotion")
                        .values(id)
                        .build(),
                )
                .send()
                .await
                .unwrap()
                .images()
                .len()
        })
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
    for s in &f.sources {
        assert!(f.sim.signal_agent(s, "STOP"));
    }
    let ids: Vec<String> = f
        .sources
        .iter()
        .enumerate()
        .map(|(n, s)| f.promote(n % 2, s))
        .collect();
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
