//! Scanning a tree beneath a root: the shared safe walker feeds opened files
//! to worker threads that read, deduplicate and match them.
//!
//! The walker runs on the calling thread (it is single-threaded and yields
//! entries in order); each regular file is opened there, by descriptor,
//! with `O_NOFOLLOW|O_NONBLOCK` and `O_NOATIME` where permitted, and the open
//! file goes to a worker. Workers hash each content and scan only the first
//! copy of it; hard links are recognised by `(dev, ino)` before opening.
//! Every path is still reported.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::Instant,
};

use sha2::{Digest, Sha256};

use super::{
    engine::{Engine, Hit, looks_binary},
    report::{Baseline, Finding, ScanReport, ScanStats, apply_baseline},
    rules,
    walker::{Control, Event, Kind, Root, WalkOptions, walk},
};

/// Default size cap: larger files are counted in `skipped_large`, not read.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 << 20;

/// Host directories that hold no files of the image: kernel and runtime
/// state, device nodes.
pub const HOST_SKIP: &[&str] = &["proc", "sys", "dev", "run"];

/// How to scan.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Root-relative starting points; empty means the whole root.
    pub starts: Vec<PathBuf>,
    /// Root-relative paths not entered. Defaults to [`HOST_SKIP`].
    pub skip: Vec<PathBuf>,
    /// Enter other mounts (default: stay on the root's filesystem).
    pub cross_mounts: bool,
    pub max_file_size: u64,
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    pub baseline: Option<Baseline>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            starts: Vec::new(),
            skip: HOST_SKIP.iter().map(PathBuf::from).collect(),
            cross_mounts: false,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            threads: 0,
            baseline: None,
        }
    }
}

/// A file handed to a worker.
struct Job {
    path: usize,
    /// `/` + the path beneath the root, for path-restricted rules.
    rel: String,
    file: File,
    size: u64,
}

#[derive(Default)]
struct Shared {
    /// Content hash (SHA-256, first 128 bits) -> the file whose scan
    /// stands for it.
    contents: HashMap<[u8; 16], usize>,
    /// File id -> its path and the hits in its content (files with hits only).
    hits: HashMap<usize, (String, Vec<Hit>)>,
    /// (file id, path, id of the file whose content it repeats).
    aliases: Vec<(usize, String, usize)>,
    problems: Vec<String>,
}

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    binary: AtomicU64,
    large: AtomicU64,
    errors: AtomicU64,
}

/// Scan beneath `root`. Fails only when a start cannot be resolved; files
/// that cannot be read are counted in `stats.errors` and listed in
/// `problems`.
pub fn scan_root(root: &Root, opts: &ScanOptions) -> io::Result<ScanReport> {
    let started = Instant::now();
    let engine = Engine::new(rules::builtin());
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let walk_opts = WalkOptions {
        cross_mounts: opts.cross_mounts,
        skip: opts.skip.clone(),
        max_depth: None,
    };
    let shared = Mutex::new(Shared::default());
    let counters = Counters::default();
    let mut files = 0u64;
    let mut walk_errors = 0u64;
    let mut walk_problems: Vec<String> = Vec::new();
    let mut links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut link_aliases: Vec<(String, usize)> = Vec::new();

    let (tx, rx) = mpsc::sync_channel::<Job>(threads * 4);
    let rx = Arc::new(Mutex::new(rx));
    let max = opts.max_file_size;
    let walked: io::Result<()> = std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = Arc::clone(&rx);
            let (engine, shared, counters) = (&engine, &shared, &counters);
            scope.spawn(move || worker(&rx, engine, shared, counters, max));
        }
        let starts: Vec<PathBuf> = if opts.starts.is_empty() {
            vec![PathBuf::new()]
        } else {
            opts.starts.clone()
        };
        let mut result = Ok(());
        for start in &starts {
            let r = walk(root, start, &walk_opts, |ev| {
                match ev {
                    Event::Entry(e) => {
                        if e.meta.kind != Kind::File {
                            return Control::Continue;
                        }
                        let idx = usize::try_from(files).unwrap_or(usize::MAX);
                        files += 1;
                        if e.meta.size > max {
                            counters.large.fetch_add(1, Ordering::Relaxed);
                            return Control::Continue;
                        }
                        if e.meta.nlink > 1 {
                            let key = (e.meta.dev, e.meta.ino);
                            if let Some(&first) = links.get(&key) {
                                link_aliases.push((e.rel.to_string_lossy().into_owned(), first));
                                return Control::Continue;
                            }
                            links.insert(key, idx);
                        }
                        match e.open_file() {
                            Ok(file) => {
                                let job = Job {
                                    path: idx,
                                    rel: format!("/{}", e.rel.to_string_lossy()),
                                    file,
                                    size: e.meta.size,
                                };
                                if tx.send(job).is_err() {
                                    return Control::Stop;
                                }
                            }
                            Err(err) => {
                                walk_errors += 1;
                                walk_problems.push(format!("{}: {err}", e.rel.display()));
                            }
                        }
                    }
                    Event::Error { rel, error } => {
                        walk_errors += 1;
                        walk_problems.push(format!("{}: {error}", rel.display()));
                    }
                    Event::MountPoint { .. } => {}
                }
                Control::Continue
            });
            if let Err(e) = r {
                result = Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", root.path().join(start).display()),
                ));
                break;
            }
        }
        drop(tx);
        result
    });
    walked?;

    let shared = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    let rules = engine.rules();
    let mut findings = Vec::new();
    let mut emit = |path: &str, hits: &[Hit]| {
        for h in hits {
            findings.push(Finding {
                rule: rules[h.rule].id().to_owned(),
                path: path.to_owned(),
                line: h.line,
                column: h.column,
                fingerprint: h.fingerprint.clone(),
                preview: h.preview.clone(),
            });
        }
    };
    for (path, hits) in shared.hits.values() {
        emit(path, hits);
    }
    // A hard link's first path may itself repeat another path's content:
    // follow content aliases once more.
    let alias_map: HashMap<usize, usize> = shared
        .aliases
        .iter()
        .map(|(id, _, src)| (*id, *src))
        .collect();
    let aliases = shared.aliases.iter().map(|(_, p, src)| (p, *src));
    for (alias, first) in aliases.chain(link_aliases.iter().map(|(p, f)| (p, *f))) {
        let source = alias_map.get(&first).copied().unwrap_or(first);
        if let Some((_, hits)) = shared.hits.get(&source) {
            emit(alias, hits);
        }
    }
    findings.sort();
    drop_package_files(root, &mut findings, max);
    let mut problems = walk_problems;
    problems.extend(shared.problems);
    let mut report = ScanReport {
        findings,
        accepted: Vec::new(),
        stats: ScanStats {
            files,
            bytes: counters.bytes.load(Ordering::Relaxed),
            skipped_binary: counters.binary.load(Ordering::Relaxed),
            skipped_large: counters.large.load(Ordering::Relaxed),
            errors: walk_errors + counters.errors.load(Ordering::Relaxed),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        problems,
    };
    if let Some(b) = &opts.baseline {
        apply_baseline(&mut report, b);
    }
    Ok(report)
}

fn worker(
    rx: &Mutex<mpsc::Receiver<Job>>,
    engine: &Engine,
    shared: &Mutex<Shared>,
    counters: &Counters,
    max: u64,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(job) = job else { return };
        buf.clear();
        // Exactly what the walker saw, plus one byte to notice growth: no
        // doubling past the file's size.
        buf.reserve_exact(usize::try_from(job.size.min(max) + 1).unwrap_or(0));
        let read = job.file.take(max + 1).read_to_end(&mut buf);
        if let Err(e) = read {
            counters.errors.fetch_add(1, Ordering::Relaxed);
            lock(shared)
                .problems
                .push(format!("{}: {e}", &job.rel[1..]));
            continue;
        }
        if buf.len() as u64 > max {
            // Grew past the cap since it was walked.
            counters.large.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let full: [u8; 32] = Sha256::digest(&buf).into();
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&full[..16]);
        {
            let mut s = lock(shared);
            if let Some(&first) = s.contents.get(&digest) {
                s.aliases.push((job.path, job.rel[1..].to_owned(), first));
                continue;
            }
            s.contents.insert(digest, job.path);
        }
        let binary = looks_binary(&buf);
        if binary {
            counters.binary.fetch_add(1, Ordering::Relaxed);
        }
        let hits = engine.scan(&job.rel, &buf, binary);
        if !hits.is_empty() {
            lock(shared)
                .hits
                .insert(job.path, (job.rel[1..].to_owned(), hits));
        }
        // The buffer is kept for the next file: freeing and reallocating
        // multi-megabyte buffers fragments the allocator's heap, which costs
        // more resident memory than one buffer per worker at the size cap.
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drop findings in files that are byte-for-byte what a Debian package
/// shipped (per `var/lib/dpkg/info/*.md5sums` beneath the root): such
/// content is published with the package, so it is no host's secret (for
/// example the self-test keys compiled into libgnutls). Only files with
/// findings are checked, so a clean scan pays nothing.
fn drop_package_files(root: &Root, findings: &mut Vec<Finding>, max: u64) {
    use md5::{Digest as _, Md5};
    use std::collections::HashSet;
    if findings.is_empty() {
        return;
    }
    let info = Path::new("var/lib/dpkg/info");
    // dpkg names a file by the path it unpacked it to (`lib/systemd/…`);
    // on a merged-/usr root the walker meets it at `usr/lib/systemd/…`.
    let aliases = top_level_aliases(root);
    let mut wanted: HashMap<String, String> = HashMap::new(); // dpkg name -> finding path
    for f in findings.iter() {
        for name in dpkg_names(&f.path, &aliases) {
            wanted.entry(name).or_insert_with(|| f.path.clone());
        }
    }
    let mut lists = Vec::new();
    let opts = WalkOptions {
        max_depth: Some(1),
        ..WalkOptions::default()
    };
    let listed = walk(root, info, &opts, |ev| {
        if let Event::Entry(e) = ev
            && e.meta.kind == Kind::File
            && e.rel.extension().is_some_and(|x| x == "md5sums")
        {
            lists.push(e.rel.to_path_buf());
        }
        Control::Continue
    });
    if listed.is_err() {
        return;
    }
    let mut expected: HashMap<String, String> = HashMap::new();
    for l in &lists {
        let Ok(text) = crate::safefs::read_beneath(root, l, 64 << 20) else {
            continue;
        };
        for line in text.split(|b| *b == b'\n') {
            let Some((sum, path)) = std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.split_once("  "))
            else {
                continue;
            };
            if let Some(real) = wanted.get(path.trim_start_matches('/')) {
                expected.insert(real.clone(), sum.to_ascii_lowercase());
            }
        }
    }
    let mut shipped: HashSet<String> = HashSet::new();
    for (path, sum) in &expected {
        if let Ok(data) = crate::safefs::read_beneath(root, Path::new(path), max + 1)
            && hex::encode(Md5::digest(&data)) == *sum
        {
            shipped.insert(path.clone());
        }
    }
    findings.retain(|f| !shipped.contains(&f.path));
}

/// The root's own top-level directory symlinks (`lib -> usr/lib`, `bin ->
/// usr/bin`, …), read with `readlinkat` and never followed: (alias, target),
/// both root-relative. Targets leaving the root or not plain paths are
/// ignored.
fn top_level_aliases(root: &Root) -> Vec<(PathBuf, PathBuf)> {
    let mut links = Vec::new();
    let opts = WalkOptions {
        max_depth: Some(1),
        ..WalkOptions::default()
    };
    let _ = walk(root, Path::new(""), &opts, |ev| {
        if let Event::Entry(e) = ev
            && e.meta.kind == Kind::Symlink
            && e.rel.components().count() == 1
            && let Ok(target) = e.read_link()
        {
            links.push((e.rel.to_path_buf(), PathBuf::from(target)));
        }
        Control::Continue
    });
    links
        .into_iter()
        .filter_map(|(alias, target)| {
            let target = target.strip_prefix("/").unwrap_or(&target).to_path_buf();
            let plain = target
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            (plain && target.components().count() > 0).then_some((alias, target))
        })
        .collect()
}

/// The names dpkg may list `path` under: the path itself, and the path
/// through each top-level alias whose target contains it.
fn dpkg_names(path: &str, aliases: &[(PathBuf, PathBuf)]) -> Vec<String> {
    let mut names = vec![path.to_owned()];
    for (alias, target) in aliases {
        if let Ok(rest) = Path::new(path).strip_prefix(target)
            && !rest.as_os_str().is_empty()
        {
            names.push(alias.join(rest).to_string_lossy().into_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_names_follow_merged_usr_aliases() {
        let aliases = vec![
            (PathBuf::from("lib"), PathBuf::from("usr/lib")),
            (PathBuf::from("bin"), PathBuf::from("usr/bin")),
        ];
        assert_eq!(
            dpkg_names("usr/lib/systemd/system/a.service", &aliases),
            [
                "usr/lib/systemd/system/a.service",
                "lib/systemd/system/a.service"
            ]
        );
        assert_eq!(dpkg_names("usr/libexec/x", &aliases), ["usr/libexec/x"]);
        assert_eq!(dpkg_names("etc/x", &aliases), ["etc/x"]);
    }

    #[test]
    fn top_level_aliases_are_read_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("usr/lib")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).expect("symlink");
        std::os::unix::fs::symlink("/usr/bin", dir.path().join("bin")).expect("symlink");
        std::os::unix::fs::symlink("../../etc", dir.path().join("up")).expect("symlink");
        std::fs::create_dir_all(dir.path().join("usr/sub")).expect("mkdir");
        std::os::unix::fs::symlink("/usr/lib", dir.path().join("usr/sub/deep")).expect("symlink");
        let root = Root::open(dir.path()).expect("root");
        let mut a = top_level_aliases(&root);
        a.sort();
        assert_eq!(
            a,
            [
                (PathBuf::from("bin"), PathBuf::from("usr/bin")),
                (PathBuf::from("lib"), PathBuf::from("usr/lib")),
            ]
        );
    }
}
