//! The VM-backed instance simulator, beside the directory one
//! ([`crate::sim`]): moto stays the EC2 API the controller calls, and for
//! every instance moto reports this simulator runs a real VM.
//!
//! - a running instance with no VM → a VM from a new overlay of its image:
//!   the base image, or an AMI this simulator saw created;
//! - an instance that stopped → ACPI shutdown through QMP, then the wait for
//!   qemu to exit; started again → a boot of the same disk;
//! - an image moto lists with an `amiprep:source-instance` tag → a copy of
//!   that (stopped) instance's overlay, the AMI's backing file;
//! - an instance terminated → its VM killed by pid, its disk deleted.
//!
//! Each tick reads the images first and the instances second: CreateImage
//! follows StopInstances, so an image seen implies its source's stop is seen
//! in the same tick, and shutdowns are handled before images are copied.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;

use super::{
    image::{BaseImage, overlay},
    qemu::{RootMode, Vm, VmSpec},
};
use crate::{FakeImds, Pki, run};

/// Time a guest gets to power off after the ACPI button.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(300);

struct Running {
    vm: Vm,
    _imds: FakeImds,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    /// Powering off: out of `running`, qemu not yet exited.
    stopping: std::collections::HashSet<String>,
    disks: HashMap<String, PathBuf>,
    /// AMI id → its backing file.
    images: HashMap<String, PathBuf>,
    root_mode: Option<RootMode>,
    log: Vec<String>,
    /// Serial logs of VMs that ended, kept for failure messages.
    ended: Vec<(String, PathBuf)>,
}

/// What the VM simulator needs.
#[derive(Clone)]
pub struct VmSimConfig {
    /// EC2 endpoint to poll (moto).
    pub ec2: aws_sdk_ec2::Client,
    /// The PKI of this test (identity-signing key for the fake IMDS).
    pub pki: PathBuf,
    pub controller_port: u16,
    pub base: &'static BaseImage,
    /// Disks, serial logs, the launch key pair.
    pub work: PathBuf,
    pub memory_mb: u32,
}

pub struct VmSimulator {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The launch key pair every instance gets through IMDS.
    pub launch_key: PathBuf,
}

impl VmSimulator {
    pub fn start(cfg: VmSimConfig) -> anyhow::Result<VmSimulator> {
        std::fs::create_dir_all(&cfg.work)?;
        let launch_key = cfg.work.join("launch-key");
        let out = run(Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "amiprep-launch",
                "-f",
            ])
            .arg(&launch_key));
        anyhow::ensure!(out.status.success(), "ssh-keygen failed");
        let public = std::fs::read_to_string(launch_key.with_extension("pub"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State::default()));
        let (s, st) = (stop.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("simulator runtime");
            while !s.load(Ordering::SeqCst) {
                if let Err(e) = rt.block_on(tick(&cfg, &st, &public)) {
                    lock(&st).log.push(format!("tick: {e:#}"));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            // Every VM ends with the simulator (Proc kills qemu by pid).
            lock(&st).running.clear();
        });
        Ok(VmSimulator {
            stop,
            state,
            thread: Some(thread),
            launch_key,
        })
    }

    /// How new VMs have the kernel mount their root (default `ro`).
    pub fn root_mode(&self, mode: RootMode) {
        lock(&self.state).root_mode = Some(mode);
    }

    /// The host port forwarded to `instance`'s SSH port, while it runs.
    pub fn ssh_port(&self, instance: &str) -> Option<u16> {
        lock(&self.state)
            .running
            .get(instance)
            .map(|r| r.vm.ssh_port)
    }

    /// Instances with a qemu process (running, or powering off).
    pub fn running(&self) -> Vec<String> {
        let st = lock(&self.state);
        let mut v: Vec<String> = st
            .running
            .keys()
            .chain(st.stopping.iter())
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Disk files that still exist (instances' overlays and AMI backings).
    pub fn disks(&self) -> Vec<PathBuf> {
        let st = lock(&self.state);
        st.disks
            .values()
            .chain(st.images.values())
            .filter(|p| p.exists())
            .cloned()
            .collect()
    }

    /// The simulator's log and every VM's serial console (the last lines).
    pub fn log(&self) -> String {
        let st = lock(&self.state);
        let mut s = st.log.join("\n");
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        for (id, r) in &st.running {
            s.push_str(&format!(
                "\n--- serial of {id} (running)\n{}",
                tail(&r.vm.serial)
            ));
        }
        for (id, serial) in &st.ended {
            s.push_str(&format!("\n--- serial of {id} (ended)\n{}", tail(serial)));
        }
        s
    }

    /// The whole serial console of `instance`'s latest VM.
    pub fn serial(&self, instance: &str) -> String {
        let st = lock(&self.state);
        let path = st
            .running
            .get(instance)
            .map(|r| r.vm.serial.clone())
            .or_else(|| {
                st.ended
                    .iter()
                    .rev()
                    .find(|(id, _)| id == instance)
                    .map(|(_, p)| p.clone())
            });
        path.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for VmSimulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        lock(&self.state).running.clear();
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

struct Seen {
    id: String,
    state: String,
    image: String,
}

async fn tick(cfg: &VmSimConfig, state: &Mutex<State>, public_key: &str) -> anyhow::Result<()> {
    let images = cfg.ec2.describe_images().owners("self").send().await?;
    let mut new_images = Vec::new();
    for i in images.images() {
        let Some(id) = i.image_id() else { continue };
        let source = i
            .tags()
            .iter()
            .find(|t| t.key() == Some("amiprep:source-instance"))
            .and_then(|t| t.value());
        if let Some(source) = source
            && !lock(state).images.contains_key(id)
        {
            new_images.push((id.to_owned(), source.to_owned()));
        }
    }
    let mut seen = Vec::new();
    let mut pages = cfg
        .ec2
        .describe_instances()
        .max_results(1000)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        for r in page?.reservations() {
            for i in r.instances() {
                seen.push(Seen {
                    id: i.instance_id().unwrap_or_default().to_owned(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_owned())
                        .unwrap_or_default(),
                    image: i.image_id().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    // 1. Stops and terminations.
    for s in &seen {
        if s.state == "running" {
            continue;
        }
        let running = {
            let mut st = lock(state);
            let r = st.running.remove(&s.id);
            if let Some(r) = &r {
                st.stopping.insert(s.id.clone());
                st.ended.push((s.id.clone(), r.vm.serial.clone()));
            }
            r
        };
        if let Some(mut r) = running {
            if s.state == "terminated" {
                lock(state)
                    .log
                    .push(format!("{}: terminated: killing its VM", s.id));
            } else {
                let result = r.vm.shutdown(SHUTDOWN_TIMEOUT);
                lock(state).log.push(match result {
                    Ok(()) => format!("{}: {}: VM powered off", s.id, s.state),
                    Err(e) => format!("{}: {}: {e:#}", s.id, s.state),
                });
            }
            drop(r);
            lock(state).stopping.remove(&s.id);
        }
        if s.state == "terminated" {
            let disk = lock(state).disks.get(&s.id).cloned();
            if let Some(d) = disk
                && d.exists()
            {
                std::fs::remove_file(&d)?;
                lock(state)
                    .log
                    .push(format!("{}: deleted {}", s.id, d.display()));
            }
        }
    }
    // 2. New images: copies of their (stopped) sources' disks.
    for (ami, source) in new_images {
        let disk = lock(state).disks.get(&source).cloned();
        let Some(disk) = disk else {
            lock(state)
                .log
                .push(format!("{ami}: source {source} has no disk here"));
            continue;
        };
        if lock(state).running.contains_key(&source) {
            // Not stopped yet (never the case with the controller's order).
            continue;
        }
        let backing = cfg.work.join(format!("{ami}.qcow2"));
        let out = run(Command::new("cp")
            .arg("--reflink=auto")
            .arg(&disk)
            .arg(&backing));
        anyhow::ensure!(out.status.success(), "copying {}", disk.display());
        let mut st = lock(state);
        st.log
            .push(format!("{ami}: copy of {source}'s stopped disk"));
        st.images.insert(ami, backing);
    }
    // 3. Boots.
    for s in seen {
        if s.state != "running" || lock(state).running.contains_key(&s.id) {
            continue;
        }
        match boot(cfg, state, &s, public_key) {
            Ok(r) => {
                let mut st = lock(state);
                st.log.push(format!(
                    "{}: booting (ssh on 127.0.0.1:{})",
                    s.id, r.vm.ssh_port
                ));
                st.running.insert(s.id, r);
            }
            Err(e) => lock(state).log.push(format!("{}: boot: {e:#}", s.id)),
        }
    }
    Ok(())
}

fn boot(
    cfg: &VmSimConfig,
    state: &Mutex<State>,
    s: &Seen,
    public_key: &str,
) -> anyhow::Result<Running> {
    let known = lock(state).disks.get(&s.id).cloned();
    let disk = match known {
        Some(d) => d,
        None => {
            let backing = lock(state)
                .images
                .get(&s.image)
                .cloned()
                .unwrap_or_else(|| cfg.base.disk.clone());
            let disk = cfg.work.join(format!("{}.qcow2", s.id));
            overlay(&backing, &disk)?;
            lock(state).disks.insert(s.id.clone(), disk.clone());
            disk
        }
    };
    let pki = Pki::at(&cfg.pki);
    let imds = FakeImds::start_with(
        &pki,
        &s.id,
        "aws-identity",
        &[
            "--public-key".to_owned(),
            public_key.trim().to_owned(),
            "--hostname".to_owned(),
            format!("{}.ec2.internal", s.id),
        ],
    );
    let root_mode = lock(state).root_mode.unwrap_or(RootMode::Ro);
    let vm = Vm::start(&VmSpec {
        name: &s.id,
        disk: &disk,
        kernel: &cfg.base.kernel,
        initrd: &cfg.base.initrd,
        root_mode,
        imds_port: imds.port,
        controller_port: cfg.controller_port,
        dir: &cfg.work,
        memory_mb: cfg.memory_mb,
    })
    .context("starting qemu")?;
    Ok(Running { vm, _imds: imds })
}
