//! Secret scanning: `amiprep-agent scan`, `amiprep-agent rules`, and the
//! library entry point [`scan_root`] that `prepare` and the controller
//! session call as the last step before an image is taken.
//!
//! - [`rules`]: the rules, as data embedded in the binary, with examples.
//! - [`engine`]: matching one buffer (keyword prefilter, regexes, filters).
//! - [`run`]: walking a root with the shared safe walker, on every core.
//! - [`report`]: findings, baselines, text / JSON / SARIF output.
//! - [`key`]: the key fingerprints are made under.
//!
//! A secret value never leaves [`engine`]: findings carry a fingerprint
//! (HMAC-SHA256 under the deployment's key over rule id and secret) and a
//! masked preview.

pub mod engine;
pub mod key;
pub mod report;
pub mod rules;
pub mod run;
mod walker;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

pub use key::FingerprintKey;
pub use report::{
    Baseline, BaselineEntry, BaselineKeyMismatch, Finding, ScanReport, ScanStats, Unscanned,
};
pub use run::{DEFAULT_WINDOW, HOST_SKIP, MIN_WINDOW, ScanOptions, WINDOW_OVERLAP, scan_root};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
    Sarif,
}

#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Root to scan (a live host's `/`, or a mounted image). Reported paths
    /// are relative to it. /proc, /sys, /dev and /run beneath it are skipped.
    #[arg(long, value_name = "DIR", conflicts_with = "paths")]
    pub root: Option<PathBuf>,
    /// Files or directories to scan instead of a whole root.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Accepted findings (JSON, as written by --write-baseline).
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// The deployment's fingerprint key (hex, as `amiprep certs init`
    /// writes it). Without one, fingerprints use a random key for this run
    /// and cannot be compared with another run's or a baseline's.
    #[arg(long, value_name = "FILE", env = key::KEY_FILE_ENV)]
    pub fingerprint_key_file: Option<PathBuf>,
    /// Write every current finding to FILE as an accepted baseline.
    #[arg(long, value_name = "FILE")]
    pub write_baseline: Option<PathBuf>,
    /// The most of one file held in memory per worker: larger files are
    /// scanned in overlapping windows of this size.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_WINDOW)]
    pub window: usize,
    /// An explicit cap: larger files are not read, and are listed as not
    /// scanned. No cap by default.
    #[arg(long, value_name = "BYTES")]
    pub max_file_size: Option<u64>,
    /// Also enter other mounted filesystems.
    #[arg(long)]
    pub cross_mounts: bool,
    /// A path (file, or directory for everything beneath) that may stay
    /// unscanned without failing the scan; repeatable. It is still listed.
    #[arg(long, value_name = "PATH")]
    pub accept_unscanned: Vec<PathBuf>,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// List the rules.
    List,
    /// Check every rule against its examples and negative examples.
    Check,
}

/// Exit status when the baseline was made under another fingerprint key.
pub const EXIT_BASELINE_KEY: u8 = 3;

/// Exit codes: 0 clean, 1 findings beyond the baseline, 2 error (including
/// paths that could not be scanned and are not accepted: a scan that could
/// not see everything does not call a host clean), 3 a baseline made under
/// another fingerprint key.
pub fn main(args: ScanArgs) -> ExitCode {
    match run_cli(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("amiprep-agent: scan: {e:#}");
            if e.downcast_ref::<BaselineKeyMismatch>().is_some() {
                ExitCode::from(EXIT_BASELINE_KEY)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

fn run_cli(args: &ScanArgs) -> anyhow::Result<u8> {
    use anyhow::Context as _;
    let key = FingerprintKey::from_file_or_random(args.fingerprint_key_file.as_deref())?;
    if key.is_ephemeral() {
        eprintln!("amiprep-agent: scan: note: {}", key::EPHEMERAL_NOTE);
        anyhow::ensure!(
            args.write_baseline.is_none(),
            "--write-baseline needs the deployment's fingerprint key (--fingerprint-key-file or {}): \
             a baseline under a random key would match nothing",
            key::KEY_FILE_ENV
        );
    }
    let baseline = args.baseline.as_deref().map(Baseline::load).transpose()?;
    if let Some(b) = &baseline {
        b.check_key(&key)?;
    }
    let base = ScanOptions {
        fingerprint_key: Some(key.clone()),
        window: args.window,
        max_file_size: args.max_file_size,
        cross_mounts: args.cross_mounts,
        threads: args.threads,
        accept_unscanned: args.accept_unscanned.clone(),
        ..ScanOptions::default()
    };
    let mut report = if args.paths.is_empty() {
        let dir = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let root =
            walker::Root::open(&dir).with_context(|| format!("opening root {}", dir.display()))?;
        scan_root(&root, &base)?
    } else {
        let mut total = ScanReport {
            fingerprint_key_id: key.id().to_owned(),
            fingerprint_note: key.is_ephemeral().then(|| key::EPHEMERAL_NOTE.to_owned()),
            ..ScanReport::default()
        };
        for p in &args.paths {
            let r = scan_path(p, &base)?;
            total.findings.extend(r.findings);
            total.unscanned.extend(r.unscanned);
            let (t, s) = (&mut total.stats, &r.stats);
            t.files += s.files;
            t.bytes += s.bytes;
            t.skipped_binary += s.skipped_binary;
            t.skipped_large += s.skipped_large;
            t.gzip += s.gzip;
            t.errors += s.errors;
            t.elapsed_ms += s.elapsed_ms;
        }
        total.findings.sort();
        total.unscanned.sort();
        total
    };
    // PATH arguments: accepted paths are given as reported (under PATH).
    report.accept_unscanned(&args.accept_unscanned);
    if let Some(out) = &args.write_baseline {
        let mut all = report.findings.clone();
        all.extend(report.accepted.iter().cloned());
        std::fs::write(out, Baseline::from_findings(&all, key.id()).to_json())
            .with_context(|| format!("writing baseline {}", out.display()))?;
    }
    if let Some(b) = &baseline {
        report::apply_baseline(&mut report, b);
    }
    for u in &report.unscanned {
        eprintln!(
            "amiprep-agent: scan: not scanned: {}: {}",
            u.shown_path(),
            u.reason
        );
    }
    let rules = rules::builtin();
    let mut out = std::io::stdout().lock();
    match args.format {
        Format::Text => report::write_text(&mut out, &report, rules)?,
        Format::Json => out.write_all(report::to_json(&report).as_bytes())?,
        Format::Sarif => out.write_all(report::to_sarif(&report, rules).as_bytes())?,
    }
    out.flush()?;
    Ok(if !report.findings.is_empty() {
        1
    } else if !report.unscanned.is_empty() {
        2
    } else {
        0
    })
}

/// One PATH argument: a directory is scanned as its own root (with the host
/// skips only when it is `/`); a file is scanned from its parent. Reported
/// paths are shown under PATH as given.
fn scan_path(p: &Path, base: &ScanOptions) -> anyhow::Result<ScanReport> {
    use anyhow::Context as _;
    let meta = std::fs::symlink_metadata(p).with_context(|| format!("{}", p.display()))?;
    let (dir, start, prefix) = if meta.is_dir() {
        (p.to_path_buf(), PathBuf::new(), p.to_path_buf())
    } else {
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = p
            .file_name()
            .with_context(|| format!("{}: not a file name", p.display()))?;
        (
            parent,
            PathBuf::from(name),
            p.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    };
    let is_host_root = std::fs::canonicalize(&dir).is_ok_and(|c| c == Path::new("/"));
    let opts = ScanOptions {
        starts: vec![start],
        skip: if is_host_root && meta.is_dir() {
            base.skip.clone()
        } else {
            Vec::new()
        },
        ..base.clone()
    };
    let root = walker::Root::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    let mut r = scan_root(&root, &opts)?;
    // Joined as bytes: names need not be UTF-8.
    let under = |raw: &[u8]| -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt as _;
        prefix
            .join(std::ffi::OsStr::from_bytes(raw))
            .as_os_str()
            .as_bytes()
            .to_vec()
    };
    for f in &mut r.findings {
        let raw = under(&f.raw_path());
        f.set_path(&raw);
    }
    for u in &mut r.unscanned {
        let raw = under(&u.raw_path());
        u.set_path(&raw);
    }
    Ok(r)
}

pub fn rules_main(cmd: RulesCommand) -> ExitCode {
    match cmd {
        RulesCommand::List => {
            let mut out = std::io::stdout().lock();
            let mut write = || -> std::io::Result<()> {
                writeln!(
                    out,
                    "{:<30} {:<8} {:<7} {:<6} NAME",
                    "ID", "SEVERITY", "BINARY", "PATH"
                )?;
                for r in rules::builtin() {
                    writeln!(
                        out,
                        "{:<30} {:<8} {:<7} {:<6} {}",
                        r.id(),
                        r.spec.severity.as_str(),
                        if r.spec.binary { "yes" } else { "no" },
                        if r.spec.path.is_some() { "yes" } else { "any" },
                        r.spec.name
                    )?;
                }
                Ok(())
            };
            match write() {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(2),
            }
        }
        RulesCommand::Check => {
            let engine = engine::Engine::new(rules::builtin());
            let failures = rules::check(&engine);
            for f in &failures {
                eprintln!("amiprep-agent: rules: {f}");
            }
            if failures.is_empty() {
                println!(
                    "{} rules: every example found, no negative example reported",
                    engine.rules().len()
                );
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
