//! Support for amiprep's cross-process tests: locating the built binaries,
//! a throwaway PKI, child processes that are killed when a test ends, and the
//! fake IMDS identity signer.
//!
//! Tests start the real `amiprep` and `amiprep-agent` binaries and talk to
//! them over real mTLS on 127.0.0.1. Build them first (`scripts/test` does):
//! `cargo build --workspace --bins`.

pub mod ec2_actions;
pub mod fault;
pub mod imds;
pub mod lb;
pub mod packages;
pub mod postgres;
pub mod sim;
pub mod vm;

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

pub use tempfile::TempDir;

/// Path of a workspace binary, next to the running test's target directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/it-HASH -> target/debug
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins), or run scripts/test",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped. Its stderr goes
/// to a log file that tests can read.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let file = fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. "TERM", "STOP", "CONT") with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits for exit; `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.child.try_wait().ok().flatten())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// The test identity-signing key, generated once per test process (RSA key
/// generation is the slow part).
pub fn identity_key() -> &'static imds::SigningKey {
    static KEY: OnceLock<imds::SigningKey> = OnceLock::new();
    KEY.get_or_init(|| imds::SigningKey::generate("amiprep test identity signer").expect("RSA key"))
}

/// A working directory with a CA, controller / agent / operator certificates
/// and the identity-signing key, all made with the real `amiprep certs`.
pub struct Pki {
    pub dir: TempDir,
}

impl Pki {
    /// A PKI that already exists at `dir` (not removed on drop).
    pub fn at(dir: &Path) -> PkiRef {
        PkiRef(dir.to_owned())
    }

    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("amiprep-test-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki { dir };
        pki.certs(&["init", "--dir", &pki.path_str()]);
        pki.issue("controller", "controller", &["127.0.0.1", "localhost"]);
        pki.issue("agent", "agent", &[]);
        identity_key()
            .write(pki.path(), "aws-identity")
            .expect("writing the identity key");
        pki
    }

    /// A new PKI directory with `other`'s keys and certificates (its CA, its
    /// controller, agent and identity-signing material), so a controller of
    /// this one accepts agents configured for `other` (a VM image's).
    pub fn copy_of(other: &Pki) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("amiprep-test-")
            .tempdir()
            .expect("temp dir");
        for entry in fs::read_dir(other.path()).expect("reading the PKI") {
            let path = entry.expect("reading the PKI").path();
            let keep = path.extension().is_some_and(|e| e == "pem" || e == "key");
            if keep && path.is_file() {
                fs::copy(&path, dir.path().join(path.file_name().expect("file name")))
                    .expect("copying the PKI");
            }
        }
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn certs(&self, args: &[&str]) {
        let out = run(Command::new(bin("amiprep")).arg("certs").args(args));
        assert!(
            out.status.success(),
            "amiprep certs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Issues `NAME.pem`/`NAME.key` of `kind` in this PKI.
    pub fn issue(&self, kind: &str, name: &str, sans: &[&str]) {
        let dir = self.path_str();
        let mut args = vec!["issue", "--dir", &dir, "--kind", kind, "--name", name];
        for s in sans {
            args.extend(["--san", s]);
        }
        self.certs(&args);
    }
}

/// A borrowed view of an existing PKI directory.
pub struct PkiRef(PathBuf);

/// What agents and fake IMDS servers need from a PKI.
pub trait PkiFiles {
    fn file(&self, name: &str) -> PathBuf;
}

impl PkiFiles for Pki {
    fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl PkiFiles for PkiRef {
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// Options for a controller under test.
#[derive(Clone)]
pub struct ControllerOpts {
    /// EC2 endpoint (moto) to cross-check agents' instances against.
    pub ec2_endpoint: Option<String>,
    pub allow_static: bool,
    pub heartbeat_interval_secs: u32,
    pub heartbeat_timeout_secs: u32,
    /// Extra keys of the `[ec2]` table (with `ec2_endpoint`).
    pub ec2_extra: String,
    /// Extra TOML appended to the configuration (e.g. a `[pipeline]` table).
    pub extra: String,
    /// Distinguishes the files of several controllers sharing one PKI
    /// directory (admin socket, configuration).
    pub name: String,
}

impl Default for ControllerOpts {
    fn default() -> Self {
        ControllerOpts {
            ec2_endpoint: None,
            allow_static: false,
            heartbeat_interval_secs: 1,
            heartbeat_timeout_secs: 3,
            ec2_extra: String::new(),
            extra: String::new(),
            name: String::new(),
        }
    }
}

/// A running `amiprep serve`.
pub struct Controller {
    pub proc: Proc,
    pub port: u16,
    pub socket: PathBuf,
    pub config: PathBuf,
    opts: ControllerOpts,
}

impl Controller {
    pub fn start(pki: &Pki, opts: ControllerOpts) -> Controller {
        Self::start_on(pki, opts, free_port())
    }

    pub fn start_on(pki: &Pki, opts: ControllerOpts, port: u16) -> Controller {
        let socket = pki.file(&format!("admin{}.sock", opts.name));
        let config = pki.file(&format!("controller{}.toml", opts.name));
        fs::write(
            &config,
            format!(
                "[listen]\nagents = \"127.0.0.1:{port}\"\nadmin_socket = {socket:?}\n\
                 [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
                 [identity]\naws_certificates = [{aws:?}]\n\
                 [sessions]\nheartbeat_interval_secs = {hi}\nheartbeat_timeout_secs = {ht}\n",
                ca = pki.file("ca.pem"),
                cert = pki.file("controller.pem"),
                key = pki.file("controller.key"),
                aws = pki.file("aws-identity.pem"),
                hi = opts.heartbeat_interval_secs,
                ht = opts.heartbeat_timeout_secs,
            ),
        )
        .expect("controller config");
        if let Some(endpoint) = &opts.ec2_endpoint {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .expect("config");
            std::io::Write::write_all(
                &mut f,
                format!(
                    "[ec2]\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\nmax_attempts = 4\n{}",
                    opts.ec2_extra
                )
                .as_bytes(),
            )
            .expect("config");
        }
        if !opts.extra.is_empty() {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&config)
                .expect("config");
            std::io::Write::write_all(&mut f, opts.extra.as_bytes()).expect("config");
        }
        let mut cmd = Command::new(bin("amiprep"));
        cmd.arg("serve").arg("--config").arg(&config);
        for (k, v) in MOTO_CREDENTIALS {
            cmd.env(k, v);
        }
        if opts.allow_static {
            cmd.arg("--allow-static-identities");
        }
        let log = pki.file(&format!("controller-{port}.log"));
        let proc = Proc::spawn("controller", cmd, log);
        let mut c = Controller {
            proc,
            port,
            socket,
            config,
            opts,
        };
        c.wait_ready();
        c
    }

    fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        let ready = wait_for(Duration::from_secs(20), || {
            if !self.proc.is_running() {
                panic!("controller exited early:\n{}", self.proc.log_text());
            }
            let out = run(Command::new(bin("amiprep"))
                .args(["agents", "--json", "--socket"])
                .arg(&socket));
            out.status.success().then_some(())
        });
        assert!(
            ready.is_some(),
            "controller not ready:\n{}",
            self.proc.log_text()
        );
    }

    /// `amiprep agents --json`, parsed.
    pub fn agents(&self) -> Vec<serde_json::Value> {
        let out = run(Command::new(bin("amiprep"))
            .args(["agents", "--json", "--socket"])
            .arg(&self.socket));
        assert!(
            out.status.success(),
            "amiprep agents: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "agents --json is not a JSON list ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Instance ids of connected agents.
    pub fn instance_ids(&self) -> Vec<String> {
        self.agents()
            .iter()
            .filter_map(|a| a["instance_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `instance` is (or is not) connected.
    pub fn wait_agent(&self, instance: &str, present: bool, timeout: Duration) -> bool {
        wait_for(timeout, || {
            (self.instance_ids().iter().any(|i| i == instance) == present).then_some(())
        })
        .is_some()
    }

    /// Kills the controller with SIGKILL and starts it again on the same port.
    pub fn restart(&mut self, pki: &Pki) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let next = Controller::start_on(pki, self.opts.clone(), self.port);
        *self = next;
    }
}

/// A running fake IMDS serving one instance's identity.
pub struct FakeImds {
    pub proc: Proc,
    pub port: u16,
}

impl FakeImds {
    pub fn start(pki: &impl PkiFiles, instance_id: &str, signing_stem: &str) -> FakeImds {
        Self::start_with(pki, instance_id, signing_stem, &[])
    }

    /// As [`FakeImds::start`], with more `fake-imds serve` arguments (the
    /// launch key, user data).
    pub fn start_with(
        pki: &impl PkiFiles,
        instance_id: &str,
        signing_stem: &str,
        extra: &[String],
    ) -> FakeImds {
        let port_file = pki.file(&format!("imds-{instance_id}.port"));
        let _ = fs::remove_file(&port_file);
        let mut cmd = Command::new(bin("fake-imds"));
        cmd.arg("serve")
            .arg("--port-file")
            .arg(&port_file)
            .arg("--cert")
            .arg(pki.file(&format!("{signing_stem}.pem")))
            .arg("--key")
            .arg(pki.file(&format!("{signing_stem}.key")))
            .args(["--instance-id", instance_id])
            .args(extra);
        let mut proc = Proc::spawn(
            "fake-imds",
            cmd,
            pki.file(&format!("imds-{instance_id}.log")),
        );
        let port = wait_for(Duration::from_secs(10), || {
            fs::read_to_string(&port_file).ok()?.trim().parse().ok()
        });
        let Some(port) = port else {
            let _ = proc.is_running();
            panic!("fake-imds did not start:\n{}", proc.log_text());
        };
        FakeImds { proc, port }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// How a test agent proves its identity.
pub enum AgentIdentity<'a> {
    Imds(&'a FakeImds),
    Static { instance_id: &'a str },
}

/// A running `amiprep-agent run`.
pub struct Agent {
    pub proc: Proc,
}

impl Agent {
    pub fn start(
        pki: &impl PkiFiles,
        controller_port: u16,
        identity: AgentIdentity<'_>,
        tag: &str,
    ) -> Agent {
        Self::start_with_root(pki, controller_port, identity, tag, None)
    }

    /// An agent acting on `root` instead of `/`.
    pub fn start_with_root(
        pki: &impl PkiFiles,
        controller_port: u16,
        identity: AgentIdentity<'_>,
        tag: &str,
        root: Option<&Path>,
    ) -> Agent {
        let config = pki.file(&format!("agent-{tag}.toml"));
        let root_line = root
            .map(|r| format!("root = {:?}\n", r))
            .unwrap_or_default();
        let identity = match identity {
            AgentIdentity::Imds(imds) => format!(
                "[identity]\nsource = \"imds\"\nimds_endpoint = \"{}\"\n",
                imds.endpoint()
            ),
            AgentIdentity::Static { instance_id } => format!(
                "[identity]\nsource = \"static\"\ninstance_id = \"{instance_id}\"\nregion = \"us-east-1\"\naccount_id = \"123456789012\"\n"
            ),
        };
        fs::write(
            &config,
            format!(
                "controller = \"127.0.0.1:{controller_port}\"\n{root_line}\
                 [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
                 {identity}\
                 [session]\nreconnect_initial_ms = 200\nreconnect_max_ms = 2000\n",
                ca = pki.file("ca.pem"),
                cert = pki.file("agent.pem"),
                key = pki.file("agent.key"),
            ),
        )
        .expect("agent config");
        let mut cmd = Command::new(bin("amiprep-agent"));
        cmd.arg("run").arg("--config").arg(&config);
        Agent {
            proc: Proc::spawn("agent", cmd, pki.file(&format!("agent-{tag}.log"))),
        }
    }
}

/// Credentials moto accepts; never real ones.
pub const MOTO_CREDENTIALS: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A moto server on 127.0.0.1: EC2 for tests, reached by the real SDK.
pub struct Moto {
    pub proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

impl Moto {
    /// Starts `moto_server` from `$AMIPREP_MOTO_SERVER` (set up by
    /// `scripts/test-env.sh`).
    pub fn start() -> Moto {
        let server = std::env::var_os("AMIPREP_MOTO_SERVER")
            .map(PathBuf::from)
            .or_else(|| {
                let home = std::env::var_os("HOME")?;
                Some(
                    PathBuf::from(home)
                        .join(".cache/amiprep-tests/venv-moto-5.2.5/bin/moto_server"),
                )
            })
            .filter(|p| p.exists())
            .expect("moto_server not found: run scripts/test-env.sh (or set AMIPREP_MOTO_SERVER)");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut cmd = Command::new(server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut proc = Proc::spawn("moto", cmd, dir.path().join("moto.log"));
        let up = wait_for(Duration::from_secs(60), || {
            if !proc.is_running() {
                panic!("moto exited:\n{}", proc.log_text());
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        });
        assert!(up.is_some(), "moto did not start:\n{}", proc.log_text());
        Moto {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An SDK client for this moto, with test credentials.
    pub fn client(&self) -> aws_sdk_ec2::Client {
        self.client_in("us-east-1")
    }

    /// The same in another region.
    pub fn client_in(&self, region: &str) -> aws_sdk_ec2::Client {
        ec2_client(&self.endpoint(), region)
    }

    /// Launches one instance from moto's first listed image; returns its id.
    pub async fn run_instance(&self) -> String {
        run_instance(&self.client()).await
    }

    /// Images owned by this account carrying promotion `id`'s tag in `region`.
    pub async fn images_of(&self, id: &str, region: &str) -> Vec<String> {
        self.client_in(region)
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
            .expect("DescribeImages")
            .images()
            .iter()
            .filter_map(|i| i.image_id().map(str::to_owned))
            .collect()
    }

    /// EC2's state name for `instance` in us-east-1.
    pub async fn instance_state(&self, instance: &str) -> String {
        self.client()
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .expect("DescribeInstances")
            .reservations()[0]
            .instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default()
    }
}

/// An SDK client for a local EC2-compatible endpoint, with test credentials.
pub fn ec2_client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    use aws_smithy_http_client::{Builder, tls};
    let http = Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .http_client(http)
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// Launches one instance from the endpoint's first listed image; returns its id.
pub async fn run_instance(ec2: &aws_sdk_ec2::Client) -> String {
    run_instance_tagged(ec2, &[]).await
}

/// Launches one instance tagged with `tags` at launch (so the instance
/// simulator sees the tags from its first look).
pub async fn run_instance_tagged(ec2: &aws_sdk_ec2::Client, tags: &[(&str, &str)]) -> String {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let images = ec2.describe_images().send().await.expect("DescribeImages");
    let image = images
        .images()
        .iter()
        .find_map(|i| i.image_id())
        .expect("moto lists images")
        .to_owned();
    let out = ec2
        .run_instances()
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .set_tag_specifications((!tags.is_empty()).then(|| {
            vec![
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(
                        tags.iter()
                            .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                            .collect(),
                    ))
                    .build(),
            ]
        }))
        .send()
        .await
        .expect("RunInstances");
    out.instances()[0]
        .instance_id()
        .expect("instance id")
        .to_owned()
}

/// A syntactically valid OpenSSH public key line with random key material.
/// An OpenSSH private key file the scanner recognises as one (random
/// bytes in the key container's shape, not a usable key).
pub fn fake_private_key() -> String {
    use base64::Engine;
    let mut blob = b"openssh-key-v1\0".to_vec();
    for field in [&b"none"[..], b"none", b""] {
        blob.extend_from_slice(&(field.len() as u32).to_be_bytes());
        blob.extend_from_slice(field);
    }
    blob.extend_from_slice(&1u32.to_be_bytes());
    blob.extend((0..200).map(|_| rand::random::<u8>()));
    let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(70)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

pub fn fake_host_key(kind: &str) -> String {
    use base64::Engine;
    let name = format!("ssh-{kind}");
    let mut blob = Vec::new();
    blob.extend_from_slice(&(name.len() as u32).to_be_bytes());
    blob.extend_from_slice(name.as_bytes());
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&rand::random::<[u8; 32]>());
    format!(
        "{name} {} root@simulated\n",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}
