//! The hygiene steps of `prepare`, one module each, and what they share: the
//! action model (a step plans concrete actions, then applies them and reports
//! each result), command execution (chrooted for an offline root), and the
//! planning helpers built on [`crate::safefs`].

pub mod identity;
pub mod logs;
pub mod packages;
pub mod scan;
pub mod services;
pub mod temp;
pub mod user_traces;

use std::{
    ffi::OsStr,
    io::{self, Read},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    policy::Policy,
    safefs::{self, Control, Event, Kind, Root, WalkOptions},
};

/// Names of the steps, in the order they run.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum StepName {
    Packages,
    Services,
    Logs,
    Temp,
    UserTraces,
    Identity,
    /// The secret scan, last, so it sees the final disk.
    Scan,
}

impl StepName {
    pub fn as_str(self) -> &'static str {
        match self {
            StepName::Packages => "packages",
            StepName::Services => "services",
            StepName::Logs => "logs",
            StepName::Temp => "temp",
            StepName::UserTraces => "user-traces",
            StepName::Identity => "identity",
            StepName::Scan => "scan",
        }
    }
}

/// What every step sees.
pub struct Ctx<'a> {
    pub root: &'a Root,
    pub policy: &'a Policy,
    /// The root is the running host's `/`: services are stopped, the journal
    /// is vacuumed through journald, and commands run without chroot.
    pub live: bool,
    /// The deployment's fingerprint key for the scan; `None`: a random key
    /// for this run.
    pub fingerprint_key: Option<crate::scan::FingerprintKey>,
}

/// A command a step runs. Offline, `chroot` commands run inside the target
/// root with `/proc` and `/dev` mounted for the duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub chroot: bool,
    /// The command (and everything it started) is killed after this long.
    pub timeout: Duration,
}

/// Default limit for a command: generous, but a hung command must not hang
/// the preparation (and the promotion waiting for it) forever.
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(600);

impl Cmd {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> Cmd {
        Cmd {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            chroot: false,
            timeout: DEFAULT_CMD_TIMEOUT,
        }
    }

    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }

    pub fn in_target(mut self) -> Cmd {
        self.chroot = true;
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Cmd {
        self.env.push((k.into(), v.into()));
        self
    }

    /// The command line as shown in plans and reports.
    pub fn display(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.env {
            s.push_str(&format!("{k}={v} "));
        }
        s.push_str(&self.argv.join(" "));
        s
    }
}

/// One concrete change.
#[derive(Debug, Clone)]
pub enum Op {
    /// Remove a path and everything beneath it (links as links).
    Remove(PathBuf),
    /// Truncate a regular file in place.
    Truncate(PathBuf),
    /// Write a file atomically (owner and mode of an existing file kept).
    Write {
        rel: PathBuf,
        contents: Vec<u8>,
        mode: u32,
    },
    /// Create a symlink (replacing an existing link or file at `rel`).
    Symlink {
        rel: PathBuf,
        target: PathBuf,
    },
    Run(Cmd),
}

#[derive(Debug, Clone)]
pub struct Action {
    pub op: Op,
    /// Bytes this action frees (removals, truncations) or writes.
    pub bytes: u64,
    pub note: Option<String>,
}

impl Action {
    pub fn new(op: Op, bytes: u64) -> Action {
        Action {
            op,
            bytes,
            note: None,
        }
    }

    pub fn note(mut self, n: impl Into<String>) -> Action {
        self.note = Some(n.into());
        self
    }

    /// Bytes this action would free (removals and truncations only).
    pub fn frees(&self) -> u64 {
        match self.op {
            Op::Remove(_) | Op::Truncate(_) => self.bytes,
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self.op {
            Op::Remove(_) => "remove",
            Op::Truncate(_) => "truncate",
            Op::Write { .. } => "write",
            Op::Symlink { .. } => "symlink",
            Op::Run(_) => "run",
        }
    }

    /// The path (shown with a leading `/`, beneath the root) or command line.
    pub fn target(&self) -> String {
        match &self.op {
            Op::Remove(p) | Op::Truncate(p) => show(p),
            Op::Write { rel, .. } => show(rel),
            Op::Symlink { rel, target } => format!("{} -> {}", show(rel), target.display()),
            Op::Run(c) => c.display(),
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            op: &'static str,
            target: String,
            bytes: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            note: &'a Option<String>,
        }
        View {
            op: self.kind(),
            target: self.target(),
            bytes: self.bytes,
            note: &self.note,
        }
        .serialize(s)
    }
}

/// A root-relative path for display: leading `/`, non-UTF-8 bytes escaped.
pub fn show(rel: &Path) -> String {
    let b = rel.as_os_str().as_bytes();
    let mut s = String::from("/");
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                s.extend(c.escape_default());
            } else {
                s.push(c);
            }
        }
        for x in chunk.invalid() {
            s.push_str(&format!("\\x{x:02x}"));
        }
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionResult {
    pub ok: bool,
    pub bytes_freed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A step's plan: its actions, and problems found while planning (an error
/// fails the step; a warning is reported only).
#[derive(Debug, Default)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Applied without errors.
    Ok,
    /// Planned only (`--dry-run`), no planning errors.
    Planned,
    Failed,
    /// Not selected (`--only` / `--skip`).
    Skipped,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActionReport {
    #[serde(flatten)]
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ActionResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub name: String,
    pub status: StepStatus,
    pub actions: Vec<ActionReport>,
    /// Bytes planned (dry run) or actually freed.
    pub bytes_freed: u64,
    pub duration_ms: u64,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Step-specific facts (packages: upgraded list, reboot_required).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl StepReport {
    pub fn new(name: &str, status: StepStatus) -> StepReport {
        StepReport {
            name: name.to_string(),
            status,
            actions: Vec::new(),
            bytes_freed: 0,
            duration_ms: 0,
            errors: Vec::new(),
            warnings: Vec::new(),
            details: serde_json::Map::new(),
        }
    }
}

/// Progress of a running preparation.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    StepStarted {
        step: String,
    },
    Action {
        step: String,
        index: usize,
        total: usize,
        target: String,
    },
    StepFinished {
        step: String,
        status: StepStatus,
    },
}

pub trait Step {
    fn name(&self) -> &'static str;
    /// Concrete actions; changes nothing.
    fn plan(&self, cx: &Ctx<'_>) -> Plan;
    /// Performs the plan, filling `out.actions` with each result.
    fn apply(
        &self,
        cx: &Ctx<'_>,
        plan: Plan,
        out: &mut StepReport,
        progress: &mut dyn FnMut(ProgressEvent),
    ) {
        apply_actions(cx, plan.actions, self.name(), out, progress);
    }
}

/// The steps in the order they run. A later step (the secret scan) is
/// appended here.
pub fn all_steps() -> Vec<(StepName, Box<dyn Step>)> {
    vec![
        (StepName::Packages, Box::new(packages::Packages)),
        (StepName::Services, Box::new(services::Services)),
        (StepName::Logs, Box::new(logs::Logs)),
        (StepName::Temp, Box::new(temp::Temp)),
        (StepName::UserTraces, Box::new(user_traces::UserTraces)),
        (StepName::Identity, Box::new(identity::Identity)),
        (StepName::Scan, Box::new(scan::Scan)),
    ]
}

/// Runs each action and records its result; a failure does not stop the
/// remaining actions.
pub fn apply_actions(
    cx: &Ctx<'_>,
    actions: Vec<Action>,
    step: &str,
    out: &mut StepReport,
    progress: &mut dyn FnMut(ProgressEvent),
) {
    let total = actions.len();
    for (index, action) in actions.into_iter().enumerate() {
        progress(ProgressEvent::Action {
            step: step.to_string(),
            index,
            total,
            target: action.target(),
        });
        let result = execute(cx, &action);
        out.bytes_freed += result.bytes_freed;
        if let Some(e) = &result.error {
            out.errors.push(format!("{}: {e}", action.target()));
        }
        out.actions.push(ActionReport {
            action,
            result: Some(result),
        });
    }
}

fn ok(bytes_freed: u64) -> ActionResult {
    ActionResult {
        ok: true,
        bytes_freed,
        error: None,
        detail: None,
    }
}

fn failed(e: impl std::fmt::Display) -> ActionResult {
    ActionResult {
        ok: false,
        bytes_freed: 0,
        error: Some(e.to_string()),
        detail: None,
    }
}

pub fn execute(cx: &Ctx<'_>, action: &Action) -> ActionResult {
    match &action.op {
        Op::Remove(rel) => match safefs::remove_beneath(cx.root, rel) {
            Ok(r) => {
                let mut res = ok(r.bytes_freed);
                let mut msgs: Vec<String> = r
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", show(&e.rel), e.error))
                    .collect();
                if !r.mounts_skipped.is_empty() {
                    let m: Vec<String> = r.mounts_skipped.iter().map(|p| show(p)).collect();
                    res.detail = Some(format!("mount points left alone: {}", m.join(", ")));
                }
                if !msgs.is_empty() {
                    res.ok = false;
                    msgs.truncate(20);
                    res.error = Some(msgs.join("; "));
                }
                res
            }
            Err(e) => failed(e),
        },
        Op::Truncate(rel) => match safefs::truncate_beneath(cx.root, rel) {
            Ok(n) => ok(n),
            Err(e) if e.kind() == io::ErrorKind::NotFound => ok(0),
            Err(e) => failed(e),
        },
        Op::Write {
            rel,
            contents,
            mode,
        } => match safefs::write_file_beneath(cx.root, rel, contents, *mode) {
            Ok(()) => ok(0),
            Err(e) => failed(e),
        },
        Op::Symlink { rel, target } => match safefs::symlink_beneath(cx.root, rel, target) {
            Ok(()) => ok(0),
            Err(e) => failed(e),
        },
        Op::Run(cmd) => match run(cx, cmd) {
            Ok(out) if out.success => {
                let mut r = ok(0);
                r.detail = Some(tail(&out.output, 2000));
                r
            }
            Ok(out) => {
                let mut r = failed(format!("exited with {}", out.status));
                r.detail = Some(tail(&out.output, 4000));
                r
            }
            Err(e) => failed(e),
        },
    }
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[derive(Debug)]
pub struct CmdOutput {
    pub success: bool,
    pub status: String,
    pub code: Option<i32>,
    /// stdout and stderr, lossily decoded.
    pub output: String,
    pub stdout: String,
}

/// Runs `cmd`: on the host, or chrooted into an offline root with `/proc`
/// and `/dev` mounted for the duration (unmounted on every path out).
pub fn run(cx: &Ctx<'_>, cmd: &Cmd) -> io::Result<CmdOutput> {
    let Some((prog, args)) = cmd.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    };
    let _mounts;
    let mut c = if cmd.chroot && !cx.live {
        _mounts = ChrootMounts::new(cx.root)?;
        let mut c = Command::new("chroot");
        c.arg(cx.root.path()).arg(prog).args(args);
        c
    } else {
        let mut c = Command::new(prog);
        c.args(args);
        c
    };
    c.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LC_ALL", "C.UTF-8")
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too
        // (apt's dpkg, maintainer scripts).
        .process_group(0);
    let mut child = c
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", cmd.argv[0])))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err_t = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + cmd.timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout_b = out_t.join().unwrap_or_default();
    let stderr_b = err_t.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&stdout_b).into_owned();
    let mut output = stdout.clone();
    output.push_str(&String::from_utf8_lossy(&stderr_b));
    Ok(CmdOutput {
        success: status.success() && !timed_out,
        status: if timed_out {
            format!("timed out after {} s, killed", cmd.timeout.as_secs())
        } else {
            status.to_string()
        },
        code: if timed_out { None } else { status.code() },
        output,
        stdout,
    })
}

/// `/proc` and `/dev` mounted inside an offline root for chrooted commands.
/// Each mount target is resolved beneath the root (no symlink, same mount)
/// and mounted through its descriptor, so a hostile image cannot redirect the
/// mount onto the host; everything is unmounted on drop.
pub struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    pub fn new(root: &Root) -> io::Result<ChrootMounts> {
        use nix::mount::{MsFlags, mount};
        let mut g = ChrootMounts {
            mounted: Vec::new(),
        };
        let specs: [(&str, Option<&str>, &str, MsFlags); 2] = [
            (
                "proc",
                Some("proc"),
                "proc",
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            ),
            ("dev", None, "/dev", MsFlags::MS_BIND),
        ];
        for (name, fstype, source, flags) in specs {
            let fd = safefs::open_beneath(
                root,
                Path::new(name),
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
            )?;
            let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            mount(Some(source), &via, fstype, flags, None::<&str>)
                .map_err(|e| io::Error::other(format!("mount {name}: {e}")))?;
            g.mounted.push(root.path().join(name));
        }
        Ok(g)
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        use nix::mount::{MntFlags, umount2};
        for p in self.mounted.iter().rev() {
            if let Err(e) = umount2(p, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                tracing::warn!("unmounting {}: {e}", p.display());
            }
        }
    }
}

/// Plans the removal of everything inside directory `dir` (which stays),
/// one action per child with its size. Children named in `keep` stay.
/// A missing directory plans nothing; a symlink or mount point in its place
/// is a warning and left alone.
pub fn plan_contents(cx: &Ctx<'_>, dir: &Path, keep: &[&str], plan: &mut Plan) {
    let dir = match safefs::clean_rel(dir) {
        Ok(d) => d,
        Err(e) => return plan.errors.push(e.to_string()),
    };
    match safefs::stat_beneath(cx.root, &dir) {
        Ok(None) => return,
        Ok(Some(m)) if m.kind != Kind::Dir => {
            return plan.warnings.push(format!(
                "{} is a {:?}, not a directory; left alone",
                show(&dir),
                m.kind
            ));
        }
        Ok(Some(m)) if m.mnt_id != cx.root.mnt_id() => return other_mount(cx, &dir, plan),
        Ok(Some(_)) => {}
        Err(e) if is_exdev(&e) => return other_mount(cx, &dir, plan),
        Err(e) => return plan.errors.push(format!("{}: {e}", show(&dir))),
    }
    let mut children = Vec::new();
    let opts = WalkOptions {
        max_depth: Some(1),
        ..Default::default()
    };
    let r = safefs::walk(cx.root, &dir, &opts, |ev| {
        match ev {
            Event::Entry(e) if e.rel != dir => {
                if !keep.iter().any(|k| OsStr::new(k) == e.name) {
                    children.push(e.rel.to_path_buf());
                }
            }
            Event::Entry(_) => {}
            Event::MountPoint { rel } => plan
                .warnings
                .push(format!("{} is a mount point; left alone", show(rel))),
            Event::Error { rel, error } => plan.errors.push(format!("{}: {error}", show(rel))),
        }
        Control::Continue
    });
    if let Err(e) = r {
        plan.errors.push(format!("{}: {e}", show(&dir)));
    }
    for c in children {
        plan_remove(cx, &c, plan);
    }
}

/// A directory the policy names is (or is beneath) another mount, which the
/// agent never crosses. On tmpfs/ramfs that is harmless — nothing there ends
/// up in an image — and only a warning; on any other file system it would
/// leave a persistent volume uncleaned, so it fails the step.
pub fn other_mount(cx: &Ctx<'_>, rel: &Path, plan: &mut Plan) {
    match safefs::is_memory_fs_beneath(cx.root, rel) {
        Ok(true) => plan.warnings.push(format!(
            "{} is on a separate in-memory mount (not part of an image); left alone",
            show(rel)
        )),
        Ok(false) => plan.errors.push(format!(
            "{} is on a separate mount, which is never crossed; \
             prepare that volume with its own --root, or drop it from the policy",
            show(rel)
        )),
        Err(e) => plan.errors.push(format!(
            "{} is on a separate mount, which is never crossed ({e})",
            show(rel)
        )),
    }
}

/// The path crosses a mount point (openat2 `RESOLVE_NO_XDEV`).
pub fn is_exdev(e: &io::Error) -> bool {
    safefs::os_error(e) == Some(libc::EXDEV)
}

/// Plans removing `rel` (a file, link or whole tree) with its size.
pub fn plan_remove(cx: &Ctx<'_>, rel: &Path, plan: &mut Plan) {
    match safefs::usage_beneath(cx.root, rel) {
        Ok(None) => {}
        Ok(Some(u)) => {
            let mut a = Action::new(Op::Remove(rel.to_path_buf()), u.bytes);
            if u.entries > 1 {
                a = a.note(format!("{} entries", u.entries));
            }
            if u.mounts_skipped > 0 {
                plan.warnings.push(format!(
                    "{}: {} mount point(s) inside; left alone",
                    show(rel),
                    u.mounts_skipped
                ));
            }
            plan.actions.push(a);
        }
        Err(e) => plan.errors.push(format!("{}: {e}", show(rel))),
    }
}

/// Plans removing `rel` if it is a regular file (or, with `links`, a
/// symlink). Anything else is left alone.
pub fn plan_remove_file(cx: &Ctx<'_>, rel: &Path, links: bool, plan: &mut Plan) {
    match safefs::stat_beneath(cx.root, rel) {
        Ok(Some(m)) if m.kind == Kind::File => plan
            .actions
            .push(Action::new(Op::Remove(rel.to_path_buf()), m.size)),
        Ok(Some(m)) if m.kind == Kind::Symlink && links => plan
            .actions
            .push(Action::new(Op::Remove(rel.to_path_buf()), 0).note("symlink")),
        Ok(_) => {}
        Err(e) if is_not_dir_or_link(&e) => {}
        Err(e) => plan.errors.push(format!("{}: {e}", show(rel))),
    }
}

/// A path whose parent is a symlink or not a directory simply has nothing to
/// act on beneath it.
pub fn is_not_dir_or_link(e: &io::Error) -> bool {
    matches!(
        safefs::os_error(e),
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
    )
}

/// Whether `rel` exists beneath the root (as anything, links not followed).
pub fn exists(cx: &Ctx<'_>, rel: &str) -> bool {
    matches!(safefs::stat_beneath(cx.root, Path::new(rel)), Ok(Some(_)))
}

/// Names of the entries directly in `dir` with their metadata; empty when
/// it is missing or not a directory on the root's mount.
pub fn list_dir(cx: &Ctx<'_>, dir: &Path) -> Vec<(PathBuf, safefs::Meta)> {
    let mut out = Vec::new();
    let Ok(Some(m)) = safefs::stat_beneath(cx.root, dir) else {
        return out;
    };
    if m.kind != Kind::Dir || m.mnt_id != cx.root.mnt_id() {
        return out;
    }
    let opts = WalkOptions {
        max_depth: Some(1),
        ..Default::default()
    };
    let _ = safefs::walk(cx.root, dir, &opts, |ev| {
        if let Event::Entry(e) = ev
            && e.rel != dir
        {
            out.push((e.rel.to_path_buf(), e.meta));
        }
        Control::Continue
    });
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_hung_command_is_killed_with_its_children() {
        let t = tempfile::tempdir().unwrap();
        let root = Root::open(t.path()).unwrap();
        let policy = Policy::default();
        let cx = Ctx {
            root: &root,
            policy: &policy,
            live: true,
            fingerprint_key: None,
        };
        let started = Instant::now();
        let cmd = Cmd::new(["sh", "-c", "echo started; sleep 30 & wait"])
            .timeout(Duration::from_millis(300));
        let out = run(&cx, &cmd).unwrap();
        assert!(!out.success);
        assert!(out.status.contains("timed out"), "{}", out.status);
        assert_eq!(out.stdout, "started\n");
        // The backgrounded sleep held the pipe open: returning at all means it
        // was killed with its group.
        assert!(started.elapsed() < Duration::from_secs(10));
        let ok = run(
            &cx,
            &Cmd::new(["sh", "-c", "echo out; echo err >&2; exit 3"]),
        )
        .unwrap();
        assert_eq!((ok.success, ok.code), (false, Some(3)));
        assert_eq!(ok.output, "out\nerr\n");
    }

    #[test]
    fn shown_paths_escape_what_a_terminal_would_interpret() {
        let p = Path::new(OsStr::from_bytes(b"tmp/bad\xffname\n\x1b[31m"));
        assert_eq!(show(p), "/tmp/bad\\xffname\\n\\u{1b}[31m");
        assert_eq!(show(Path::new("var/log/syslog")), "/var/log/syslog");
    }
}

#[cfg(test)]
mod live_plan_tests {
    #![allow(clippy::unwrap_used)]
    //! Plans for a live host, made against a temp root (never applied).

    use super::*;

    fn target(plan: &Plan) -> Vec<String> {
        plan.actions.iter().map(Action::target).collect()
    }

    #[test]
    fn live_and_offline_plans_differ_where_they_must() {
        let t = tempfile::tempdir().unwrap();
        let j = t.path().join("var/log/journal/0123");
        std::fs::create_dir_all(&j).unwrap();
        std::fs::write(j.join("system.journal"), [0u8; 64]).unwrap();
        std::fs::create_dir_all(t.path().join("usr/lib/systemd/system")).unwrap();
        std::fs::write(t.path().join("usr/lib/systemd/system/cups.service"), "").unwrap();
        let root = Root::open(t.path()).unwrap();
        let mut policy = Policy::default();
        policy.services.disable = vec!["cups.service".into()];
        let live = Ctx {
            root: &root,
            policy: &policy,
            live: true,
            fingerprint_key: None,
        };
        let offline = Ctx {
            root: &root,
            policy: &policy,
            live: false,
            fingerprint_key: None,
        };

        let l = target(&logs::Logs.plan(&live));
        assert_eq!(l, ["journalctl --rotate", "journalctl --vacuum-time=1s"]);
        let o = target(&logs::Logs.plan(&offline));
        assert_eq!(o, ["/var/log/journal/0123"]);

        let l = target(&services::Services.plan(&live));
        assert_eq!(
            l,
            [
                "systemctl stop -- cups.service",
                "systemctl disable -- cups.service",
                "systemctl mask -- cups.service"
            ]
        );
        let o = target(&services::Services.plan(&offline));
        let r = format!("--root={}", t.path().display());
        assert_eq!(
            o,
            [
                format!("systemctl {r} disable -- cups.service"),
                format!("systemctl {r} mask -- cups.service")
            ]
        );
    }
}
