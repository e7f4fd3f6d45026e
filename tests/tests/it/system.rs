//! The system tier: moto as EC2 and a real qemu VM per instance (see
//! `amiprep_tests::vm`). The agent runs as its packaged systemd unit inside
//! the guest, cloud-init reads the fake IMDS through qemu's user networking,
//! and a stop is a real ACPI shutdown.
//!
//! Budgets are generous ceilings for a loaded 2-core machine, possibly
//! without KVM; every wait ends on the event it waits for.

use std::{process::Command, time::Duration};

use amiprep_tests::{
    Controller, ControllerOpts, Moto, Pki, run,
    vm::{
        image::base_image,
        sim::{VmSimConfig, VmSimulator},
    },
    wait_for,
};
use serde_json::Value;

use crate::client::runtime;

/// A boot of the image to a connected agent (TCG on a busy machine: minutes).
const BOOT: Duration = Duration::from_secs(900);

/// The system tier needs qemu (the VM root is checked by the image builder).
fn require_qemu() {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        qemu,
        "qemu-system-x86_64 is missing: run scripts/test-env.sh (it installs qemu-system-x86)"
    );
}

struct VmWorld {
    moto: Moto,
    /// Holds the controller's configuration, database and socket.
    _pki: Pki,
    controller: Controller,
    sim: VmSimulator,
    _work: tempfile::TempDir,
}

impl VmWorld {
    fn new() -> VmWorld {
        require_qemu();
        let base = base_image();
        let moto = Moto::start();
        let pki = Pki::copy_of(&base.pki);
        let timeout = BOOT.as_secs();
        let controller = Controller::start(
            &pki,
            ControllerOpts {
                ec2_endpoint: Some(moto.endpoint()),
                // Heartbeats from a guest under TCG can be late.
                heartbeat_interval_secs: 5,
                heartbeat_timeout_secs: 60,
                extra: format!(
                    "[pipeline]\nstate_db = {:?}\nmanifest_dir = {:?}\npoll_initial_ms = 500\npoll_max_ms = 2000\nagent_wait_secs = {timeout}\nprepare_timeout_secs = {timeout}\nstop_timeout_secs = {timeout}\nimage_timeout_secs = {timeout}\ncanary_timeout_secs = {timeout}\n",
                    pki.file("state.db"),
                    pki.file("manifests")
                ),
                ..Default::default()
            },
        );
        let work = tempfile::Builder::new()
            .prefix("amiprep-vms-")
            .tempdir()
            .unwrap();
        let sim = VmSimulator::start(VmSimConfig {
            ec2: moto.client(),
            pki: pki.path().to_owned(),
            controller_port: controller.port,
            base,
            work: work.path().to_owned(),
            memory_mb: 768,
        })
        .unwrap();
        VmWorld {
            moto,
            _pki: pki,
            controller,
            sim,
            _work: work,
        }
    }

    fn diagnostics(&self) -> String {
        format!(
            "controller:\n{}\nsimulator:\n{}",
            self.controller.proc.log_text(),
            self.sim.log()
        )
    }

    /// Runs `command` on `instance` as `user` over SSH with the launch key,
    /// through the forwarded port.
    fn ssh(&self, instance: &str, user: &str, command: &str) -> Option<std::process::Output> {
        let port = self.sim.ssh_port(instance)?;
        Some(run(Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args([
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=20",
            ])
            .args(["-o", "LogLevel=ERROR", "-i"])
            .arg(&self.sim.launch_key)
            .args(["-p", &port.to_string()])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)))
    }

    /// Waits until an SSH login with the launch key runs `command`.
    fn wait_login(&self, instance: &str, command: &str) -> String {
        wait_for(Duration::from_secs(600), || {
            let out = self.ssh(instance, "debian", command)?;
            if out.status.success() {
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            } else {
                std::thread::sleep(Duration::from_secs(3));
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "no SSH login into {instance} with the launch key\n{}",
                self.diagnostics()
            )
        })
    }
}

/// The image boots under qemu: its packaged agent unit connects through the
/// guest-forwarded controller address with an IMDS identity, cloud-init
/// authorises the launch key for the default user, and StopInstances is a
/// clean ACPI shutdown.
#[test]
fn a_vm_boots_its_packaged_agent_and_authorises_the_launch_key() {
    let w = VmWorld::new();
    let id = runtime().block_on(w.moto.run_instance());
    assert!(
        w.controller.wait_agent(&id, true, BOOT),
        "the agent in {id} never connected\n{}",
        w.diagnostics()
    );
    let out = w.wait_login(
        &id,
        "systemctl is-active amiprep-agent.service; cat /etc/machine-id",
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("active"), "{out}");
    let machine_id = lines.next().unwrap_or_default();
    assert_eq!(
        machine_id.len(),
        32,
        "machine id after the first boot: {out}"
    );
    // The IMDS identity made it through: the controller knows the instance.
    let agent: Vec<Value> = w.controller.agents();
    assert!(
        agent.iter().any(|a| a["instance_id"] == id.as_str()),
        "{agent:?}"
    );
    let client = w.moto.client();
    runtime().block_on(async {
        client
            .stop_instances()
            .instance_ids(&id)
            .send()
            .await
            .unwrap()
    });
    let off = wait_for(Duration::from_secs(600), || {
        w.sim.running().is_empty().then_some(())
    });
    assert!(off.is_some(), "{id} never powered off\n{}", w.diagnostics());
    let serial = w.sim.serial(&id);
    assert!(
        serial.contains("reboot: Power down"),
        "the guest did not power down cleanly:\n{serial}"
    );
}
