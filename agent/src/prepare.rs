//! Host preparation: `amiprep-agent prepare` and `amiprep-agent policy show`,
//! and [`prepare`], the library entry point the controller session calls.
//!
//! Each step plans concrete actions, then applies them; the report lists, per
//! step, every action with its result, the bytes freed, the duration and the
//! errors. A step that fails does not stop the others: the report is more
//! useful complete, and `ready` is false anyway.

use std::{
    io::{IsTerminal, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use serde::Serialize;

use crate::{
    policy::Policy,
    safefs::Root,
    steps::{self, Ctx, ProgressEvent, StepName, StepReport, StepStatus},
};

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// Prepare a mounted image at DIR instead of the running host.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Policy file (TOML); built-in defaults otherwise.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Print the actions that would be taken; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Run only these steps (repeatable).
    #[arg(long, value_name = "STEP", value_enum)]
    pub only: Vec<StepName>,
    /// Skip these steps (repeatable).
    #[arg(long, value_name = "STEP", value_enum)]
    pub skip: Vec<StepName>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// The deployment's fingerprint key for the scan step (hex, as `amiprep
    /// certs init` writes it); without one, a random key for this run.
    #[arg(long, value_name = "FILE", env = crate::scan::key::KEY_FILE_ENV)]
    pub fingerprint_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the effective policy (TOML).
    Show {
        /// Policy file (TOML); built-in defaults otherwise.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct PrepareOptions {
    /// Plan only.
    pub dry_run: bool,
    /// Steps to run; empty: all.
    pub only: Vec<StepName>,
    pub skip: Vec<StepName>,
    /// The root is the running host's `/`.
    pub live: bool,
    /// The scan's fingerprint key; `None`: a random one for the run.
    pub fingerprint_key: Option<crate::scan::FingerprintKey>,
}

impl PrepareOptions {
    /// Selected by the command line and by the policy's `[steps]`.
    fn selected(&self, s: StepName, policy: &Policy) -> bool {
        let cli = crate::policy::StepsPolicy {
            only: self.only.clone(),
            skip: self.skip.clone(),
        };
        cli.selects(s) && policy.steps.selects(s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    /// Every selected step succeeded (dry run: planned without errors).
    pub ready: bool,
    pub root: String,
    pub live: bool,
    pub dry_run: bool,
    pub steps: Vec<StepReport>,
    pub bytes_freed: u64,
    pub duration_ms: u64,
}

/// Prepares the host or image at `root`: every selected step, in order,
/// planned and (unless `dry_run`) applied.
pub fn prepare(
    root: &Root,
    policy: &Policy,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(ProgressEvent),
) -> PrepareReport {
    let started = Instant::now();
    let cx = Ctx {
        root,
        policy,
        live: opts.live,
        fingerprint_key: opts.fingerprint_key.clone(),
    };
    let mut reports = Vec::new();
    for (name, step) in steps::all_steps() {
        if !opts.selected(name, policy) {
            reports.push(StepReport::new(step.name(), StepStatus::Skipped));
            continue;
        }
        progress(ProgressEvent::StepStarted {
            step: step.name().into(),
        });
        let t = Instant::now();
        let plan = step.plan(&cx);
        let mut out = StepReport::new(step.name(), StepStatus::Ok);
        out.errors.extend(plan.errors.iter().cloned());
        out.warnings.extend(plan.warnings.iter().cloned());
        if opts.dry_run {
            out.bytes_freed = plan.actions.iter().map(|a| a.frees()).sum();
            out.actions = plan
                .actions
                .into_iter()
                .map(|action| steps::ActionReport {
                    action,
                    result: None,
                })
                .collect();
        } else {
            step.apply(&cx, plan, &mut out, progress);
        }
        out.status = match (out.errors.is_empty(), opts.dry_run) {
            (false, _) => StepStatus::Failed,
            (true, true) => StepStatus::Planned,
            (true, false) => StepStatus::Ok,
        };
        out.duration_ms = t.elapsed().as_millis() as u64;
        progress(ProgressEvent::StepFinished {
            step: out.name.clone(),
            status: out.status,
        });
        reports.push(out);
    }
    PrepareReport {
        ready: reports.iter().all(|r| r.status != StepStatus::Failed),
        root: root.path().display().to_string(),
        live: opts.live,
        dry_run: opts.dry_run,
        bytes_freed: reports.iter().map(|r| r.bytes_freed).sum(),
        steps: reports,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

pub fn is_live_root(p: &Path) -> bool {
    std::fs::canonicalize(p).is_ok_and(|c| c == Path::new("/"))
}

pub fn main(args: PrepareArgs) -> ExitCode {
    let policy = match Policy::load(args.policy.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("amiprep-agent: policy: {e}");
            return ExitCode::from(2);
        }
    };
    let fingerprint_key = match args.fingerprint_key_file.as_deref() {
        None => None,
        Some(p) => match crate::scan::FingerprintKey::from_file(p) {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("amiprep-agent: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let root_path = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let root = match Root::open(&root_path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("amiprep-agent: --root {}: {e}", root_path.display());
            return ExitCode::from(2);
        }
    };
    let opts = PrepareOptions {
        dry_run: args.dry_run,
        only: args.only,
        skip: args.skip,
        live: is_live_root(&root_path),
        fingerprint_key,
    };
    let show_progress = args.format == Format::Text && std::io::stderr().is_terminal();
    let mut progress = |ev: ProgressEvent| {
        if !show_progress {
            return;
        }
        match ev {
            ProgressEvent::StepStarted { step } => eprintln!("==> {step}"),
            ProgressEvent::Action {
                index,
                total,
                target,
                ..
            } => eprint!("\r\x1b[K    [{}/{total}] {target}", index + 1),
            ProgressEvent::StepFinished { step, status } => {
                eprintln!("\r\x1b[K    {step}: {status:?}")
            }
        }
    };
    let report = prepare(&root, &policy, &opts, &mut progress);
    let mut stdout = std::io::stdout().lock();
    let written = match args.format {
        Format::Json => serde_json::to_writer_pretty(&mut stdout, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(stdout)),
        Format::Text => stdout.write_all(render_text(&report).as_bytes()),
    };
    if let Err(e) = written.and_then(|()| stdout.flush()) {
        eprintln!("amiprep-agent: writing the report: {e}");
        return ExitCode::from(1);
    }
    if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Human-readable report: per step, its actions (with results once applied).
pub fn render_text(r: &PrepareReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mode = if r.dry_run { " (dry run)" } else { "" };
    let _ = writeln!(s, "prepare {}{mode}", r.root);
    for st in &r.steps {
        let _ = writeln!(
            s,
            "\n[{}] {:?}  {} actions, {} bytes, {} ms",
            st.name,
            st.status,
            st.actions.len(),
            st.bytes_freed,
            st.duration_ms
        );
        for a in &st.actions {
            let res = match &a.result {
                None => String::new(),
                Some(x) if x.ok => "  ok".into(),
                Some(x) => format!("  FAILED: {}", x.error.as_deref().unwrap_or("")),
            };
            let _ = writeln!(
                s,
                "  {:<8} {} ({} bytes){res}",
                serde_json::to_value(&a.action)
                    .ok()
                    .and_then(|v| v["op"].as_str().map(str::to_string))
                    .unwrap_or_default(),
                a.action.target(),
                a.action.bytes
            );
        }
        for (k, v) in &st.details {
            let _ = writeln!(s, "  {k}: {v}");
        }
        for w in &st.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        for e in &st.errors {
            let _ = writeln!(s, "  error: {e}");
        }
    }
    let _ = writeln!(
        s,
        "\n{}: {} bytes {}, {} ms",
        if r.ready { "READY" } else { "NOT READY" },
        r.bytes_freed,
        if r.dry_run { "to free" } else { "freed" },
        r.duration_ms
    );
    s
}

pub fn policy_main(cmd: PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Show { policy } => match Policy::load(policy.as_deref()) {
            Ok(p) => {
                print!("{}", p.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("amiprep-agent: policy: {e}");
                ExitCode::from(2)
            }
        },
    }
}
