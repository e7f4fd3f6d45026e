//! The instance simulator: for every instance moto reports running, a real
//! `amiprep-agent` with a fake-IMDS identity over that instance's own root
//! directory. A source instance gets a copy of a template root; a canary (an
//! instance tagged `amiprep:role=canary`) gets a copy of its source's root
//! as it was left by prepare, then "boots": a fresh machine id and host keys,
//! as systemd and the first-boot key generation would make them.
//! An instance tagged [`HAND_DRIVEN_TAG`] gets no agent: a test speaks for it.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{Agent, AgentIdentity, FakeImds, Pki};

struct Running {
    _imds: FakeImds,
    agent: Agent,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    /// Being started by a worker thread.
    starting: HashSet<String>,
    roots: HashMap<String, PathBuf>,
    /// Files every canary's first boot writes (root-relative path, content):
    /// what a boot script that fetches credentials would leave.
    canary_plants: Vec<(PathBuf, String)>,
    /// Canaries boot without an agent (one that never comes up).
    no_canary_agents: bool,
    log: Vec<String>,
}

/// Tag key of instances the simulator leaves alone (any value).
pub const HAND_DRIVEN_TAG: &str = "amiprep-test:hand-driven";

/// Instances started at once: agents and their fake IMDS are processes, and
/// a few hundred instances must come up in seconds, not one after another.
const START_WORKERS: usize = 16;

pub struct Simulator {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the simulator needs to start agents.
#[derive(Clone)]
pub struct SimConfig {
    /// EC2 endpoint to poll (moto, not through the fault proxy).
    pub ec2: aws_sdk_ec2::Client,
    /// PKI directory (agent certificate, identity-signing key).
    pub pki: PathBuf,
    pub controller_port: u16,
    /// Copied for each new source instance.
    pub template_root: PathBuf,
    /// Where instance roots live.
    pub work: PathBuf,
}

impl Simulator {
    pub fn start(cfg: SimConfig) -> Simulator {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(State::default()));
        let (s, st) = (stop.clone(), state.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("simulator runtime");
            while !s.load(Ordering::SeqCst) {
                if let Err(e) = rt.block_on(tick(&cfg, &st)) {
                    st.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .log
                        .push(format!("tick: {e:#}"));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Simulator {
            stop,
            state,
            thread: Some(thread),
        }
    }

    /// The root directory of an instance the simulator has started.
    pub fn root_of(&self, instance: &str) -> Option<PathBuf> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .roots
            .get(instance)
            .cloned()
    }

    /// From now on, every canary's first boot writes `content` at `rel`.
    pub fn plant_in_canaries(&self, rel: &str, content: &str) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .canary_plants
            .push((PathBuf::from(rel), content.to_owned()));
    }

    /// Whether canaries start an agent (default) or never do.
    pub fn canary_agents(&self, on: bool) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .no_canary_agents = !on;
    }

    /// Sends `sig` (as `kill -SIG`) to the agent of `instance`; false if it
    /// has none.
    pub fn signal_agent(&self, instance: &str, sig: &str) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.running.get(instance) {
            Some(r) => {
                r.agent.proc.signal(sig);
                true
            }
            None => false,
        }
    }

    /// Instances with a live agent process.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .running
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn log(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = st.log.join("\n");
        for (id, r) in &st.running {
            s.push_str(&format!("\n--- agent {id}\n{}", r.agent.proc.log_text()));
        }
        s
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn tick(cfg: &SimConfig, state: &Mutex<State>) -> anyhow::Result<()> {
    // Every page: EC2 (and moto, at 100 reservations) pages its answer.
    let mut reservations = Vec::new();
    let mut pages = cfg
        .ec2
        .describe_instances()
        .max_results(1000)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        reservations.extend(page?.reservations().iter().cloned());
    }
    let mut to_start = Vec::new();
    for r in &reservations {
        for i in r.instances() {
            let id = i.instance_id().unwrap_or_default().to_owned();
            let st = i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_owned())
                .unwrap_or_default();
            let tag = |k: &str| {
                i.tags()
                    .iter()
                    .find(|t| t.key() == Some(k))
                    .and_then(|t| t.value())
                    .map(str::to_owned)
            };
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            let known = s.running.contains_key(&id) || s.starting.contains(&id);
            let canary = tag("amiprep:role").as_deref() == Some("canary");
            let wanted = tag(HAND_DRIVEN_TAG).is_none() && !(canary && s.no_canary_agents);
            if st == "running" && !known && wanted {
                s.starting.insert(id.clone());
                to_start.push((
                    id,
                    tag("amiprep:role").as_deref() == Some("canary"),
                    tag("amiprep:source-instance"),
                ));
            } else if st != "running"
                && let Some(r) = s.running.remove(&id)
            {
                let text = r.agent.proc.log_text();
                s.log
                    .push(format!("stopped agent for {id} ({st}); its log:\n{text}"));
            }
        }
    }
    // Sources first: a canary's root is a copy of its source's.
    to_start.sort_by_key(|(_, canary, _)| *canary);
    let queue = Mutex::new(to_start.into_iter());
    std::thread::scope(|scope| {
        for _ in 0..START_WORKERS {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((id, canary, source)) = next else {
                        break;
                    };
                    let started = start_instance(cfg, state, &id, canary, source);
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    s.starting.remove(&id);
                    match started {
                        Ok((root, running)) => {
                            s.log
                                .push(format!("started agent for {id} over {}", root.display()));
                            s.running.insert(id, running);
                        }
                        Err(e) => s.log.push(format!("starting {id}: {e:#}")),
                    }
                }
            });
        }
    });
    Ok(())
}

/// Boots one instance: its root, its fake IMDS, its agent.
fn start_instance(
    cfg: &SimConfig,
    state: &Mutex<State>,
    id: &str,
    canary: bool,
    source: Option<String>,
) -> anyhow::Result<(PathBuf, Running)> {
    let root = instance_root(cfg, state, id, canary, source)?;
    let pki = Pki::at(&cfg.pki);
    let imds = FakeImds::start(&pki, id, "aws-identity");
    let agent = Agent::start_with_root(
        &pki,
        cfg.controller_port,
        AgentIdentity::Imds(&imds),
        id,
        Some(&root),
    );
    Ok((root, Running { _imds: imds, agent }))
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    anyhow::ensure!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
    Ok(())
}

fn instance_root(
    cfg: &SimConfig,
    state: &Mutex<State>,
    id: &str,
    canary: bool,
    source: Option<String>,
) -> anyhow::Result<PathBuf> {
    let known = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .roots
        .get(id)
        .cloned();
    if let Some(r) = known {
        // A restarted instance boots again from the same disk.
        first_boot(&r)?;
        return Ok(r);
    }
    let root = cfg.work.join(id);
    if canary {
        let src = source
            .and_then(|s| {
                state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .roots
                    .get(&s)
                    .cloned()
            })
            .ok_or_else(|| anyhow::anyhow!("canary {id}: source root unknown"))?;
        copy_tree(&src, &root)?;
        first_boot(&root)?;
        let plants = state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .canary_plants
            .clone();
        for (rel, content) in plants {
            let path = root.join(rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(path, content)?;
        }
    } else {
        copy_tree(&cfg.template_root, &root)?;
    }
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .roots
        .insert(id.to_owned(), root.clone());
    Ok(root)
}

/// What a first boot does to identity: systemd writes a machine id when
/// /etc/machine-id is `uninitialized` (or empty), and the first-boot key
/// generation creates host key pairs that are missing.
fn first_boot(root: &Path) -> anyhow::Result<()> {
    let mid = root.join("etc/machine-id");
    let current = std::fs::read_to_string(&mid).unwrap_or_default();
    if current.trim().is_empty() || current.trim() == "uninitialized" {
        std::fs::write(&mid, format!("{:032x}\n", rand::random::<u128>()))?;
    }
    let ssh = root.join("etc/ssh");
    if ssh.is_dir() {
        for kind in ["ed25519", "ecdsa", "rsa"] {
            let pubkey = ssh.join(format!("ssh_host_{kind}_key.pub"));
            if !pubkey.exists() {
                std::fs::write(&pubkey, crate::fake_host_key(kind))?;
                std::fs::write(
                    ssh.join(format!("ssh_host_{kind}_key")),
                    crate::fake_private_key(),
                )?;
            }
        }
    }
    Ok(())
}

/// A small host root: identity, logs, temp files, a history.
pub fn template_root(dir: &Path) -> PathBuf {
    let root = dir.join("template");
    for d in [
        "etc/ssh",
        "var/log",
        "tmp",
        "var/tmp",
        "root",
        "home/alice",
        "var/lib/dbus",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("writing the template root");
    }
    std::fs::write(
        root.join("etc/os-release"),
        "ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
    )
    .expect("writing the template root");
    std::fs::write(root.join("etc/hostname"), "source-host\n").expect("writing the template root");
    // A systemd host with ssh-keygen: prepare installs its first-boot key
    // generation unit, which the simulator's "boot" stands in for.
    std::fs::create_dir_all(root.join("usr/lib/systemd")).expect("writing the template root");
    std::fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants"))
        .expect("writing the template root");
    std::fs::create_dir_all(root.join("usr/bin")).expect("writing the template root");
    std::fs::write(root.join("usr/lib/systemd/systemd"), "").expect("writing the template root");
    std::fs::write(root.join("usr/bin/ssh-keygen"), "").expect("writing the template root");
    // A service a policy may disable.
    std::fs::create_dir_all(root.join("usr/lib/systemd/system"))
        .expect("writing the template root");
    std::fs::write(
        root.join("usr/lib/systemd/system/cups.service"),
        "[Unit]\nDescription=print spooler\n[Service]\nExecStart=/usr/sbin/cupsd -f\n[Install]\nWantedBy=multi-user.target\n",
    )
    .expect("writing the template root");
    std::fs::write(
        root.join("etc/machine-id"),
        format!("{:032x}\n", rand::random::<u128>()),
    )
    .expect("writing the template root");
    std::fs::write(
        root.join("etc/ssh/ssh_host_ed25519_key.pub"),
        crate::fake_host_key("ed25519"),
    )
    .expect("writing the template root");
    std::fs::write(
        root.join("etc/ssh/ssh_host_ed25519_key"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .expect("writing the template root");
    std::fs::write(root.join("var/log/syslog"), "Nov 28 host kernel: boot\n")
        .expect("writing the template root");
    std::fs::write(root.join("var/log/syslog.1"), "old\n").expect("writing the template root");
    std::fs::write(root.join("tmp/build.tmp"), "scratch\n").expect("writing the template root");
    std::fs::write(root.join("root/.bash_history"), "ls\nuptime\n")
        .expect("writing the template root");
    std::fs::write(root.join("home/alice/.bash_history"), "vim notes\n")
        .expect("writing the template root");
    root
}
