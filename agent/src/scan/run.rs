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
    os::unix::ffi::OsStrExt as _,
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
    key::{EPHEMERAL_NOTE, FingerprintKey},
    report::{Baseline, Finding, ScanReport, ScanStats, Unscanned, apply_baseline},
    rules,
    walker::{Control, Event, Kind, Root, WalkOptions, walk},
};

/// Default window: the most of one file a worker holds in memory at once.
/// Larger files are scanned in overlapping windows of this size.
pub const DEFAULT_WINDOW: usize = 4 << 20;

/// Bytes shared by consecutive windows: a match starting in one window and
/// ending within this many bytes of it is seen whole by one of them. Every
/// rule's longest realistic match (a PEM private key block is under 4 KiB,
/// a JWT a few KiB) is well within it.
pub const WINDOW_OVERLAP: usize = 64 << 10;

/// The smallest window accepted: below it the overlap would dominate.
pub const MIN_WINDOW: usize = 4 * WINDOW_OVERLAP;

/// A gzip member starts with its magic and the deflate method byte.
const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];

/// How far a gzip file is decompressed: this many bytes per compressed
/// byte, and at least [`MIN_DECOMPRESSED_LIMIT`]. Rotated logs compress 5 to
/// 50 times; a file that expands beyond the limit (a decompression bomb) is
/// scanned up to it and listed as not fully scanned.
pub const DECOMPRESSION_RATIO_LIMIT: u64 = 128;
pub const MIN_DECOMPRESSED_LIMIT: u64 = 1 << 30;

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
    /// The most of one file a worker holds in memory (at least
    /// [`MIN_WINDOW`]); larger files are streamed through windows of this
    /// size.
    pub window: usize,
    /// An explicit cap: files larger than this are not read. `None` (the
    /// default) reads every file, whatever its size.
    pub max_file_size: Option<u64>,
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    pub baseline: Option<Baseline>,
    /// Root-relative paths (files, or directories for everything beneath)
    /// that may stay unscanned without blocking readiness.
    pub accept_unscanned: Vec<PathBuf>,
    /// The deployment's fingerprint key; `None`: a random key for this run.
    pub fingerprint_key: Option<FingerprintKey>,
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions {
            starts: Vec::new(),
            skip: HOST_SKIP.iter().map(PathBuf::from).collect(),
            cross_mounts: false,
            window: DEFAULT_WINDOW,
            max_file_size: None,
            threads: 0,
            baseline: None,
            accept_unscanned: Vec::new(),
            fingerprint_key: None,
        }
    }
}

/// A file handed to a worker.
struct Job {
    path: usize,
    /// The path beneath the root, exact bytes.
    raw: Vec<u8>,
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
    /// File id -> its path (exact bytes) and the hits in its content
    /// (files with hits only).
    hits: HashMap<usize, (Vec<u8>, Vec<Hit>)>,
    /// (file id, path, id of the file whose content it repeats).
    aliases: Vec<(usize, Vec<u8>, usize)>,
    problems: Vec<Unscanned>,
}

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    binary: AtomicU64,
    large: AtomicU64,
    gzip: AtomicU64,
    errors: AtomicU64,
}

/// Scan beneath `root`. Fails only when a start cannot be resolved, or the
/// baseline was made under another fingerprint key (an `InvalidInput` error
/// wrapping [`super::BaselineKeyMismatch`]); paths
/// that cannot be read (or only in part) are counted in `stats.errors` and
/// listed in `unscanned`, as are files over an explicit size cap.
pub fn scan_root(root: &Root, opts: &ScanOptions) -> io::Result<ScanReport> {
    let started = Instant::now();
    let key = opts
        .fingerprint_key
        .clone()
        .unwrap_or_else(FingerprintKey::random);
    if let Some(b) = &opts.baseline {
        b.check_key(&key)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    }
    let (key_id, ephemeral) = (key.id().to_owned(), key.is_ephemeral());
    let engine = Engine::with_key(rules::builtin(), key);
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
    let mut walk_problems: Vec<Unscanned> = Vec::new();
    let mut links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut link_aliases: Vec<(Vec<u8>, usize)> = Vec::new();

    let (tx, rx) = mpsc::sync_channel::<Job>(threads * 4);
    let rx = Arc::new(Mutex::new(rx));
    let max = opts.max_file_size.unwrap_or(u64::MAX);
    let window = opts.window.max(MIN_WINDOW);
    let walked: io::Result<()> = std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = Arc::clone(&rx);
            let (engine, shared, counters) = (&engine, &shared, &counters);
            scope.spawn(move || worker(&rx, engine, shared, counters, window));
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
                            walk_problems.push(Unscanned::new(
                                e.rel.as_os_str().as_bytes(),
                                format!("{} bytes, over the size cap of {max} bytes", e.meta.size),
                            ));
                            return Control::Continue;
                        }
                        if e.meta.nlink > 1 {
                            let key = (e.meta.dev, e.meta.ino);
                            if let Some(&first) = links.get(&key) {
                                link_aliases.push((e.rel.as_os_str().as_bytes().to_vec(), first));
                                return Control::Continue;
                            }
                            links.insert(key, idx);
                        }
                        match e.open_file() {
                            Ok(file) => {
                                let job = Job {
                                    path: idx,
                                    raw: e.rel.as_os_str().as_bytes().to_vec(),
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
                                walk_problems.push(Unscanned::new(
                                    e.rel.as_os_str().as_bytes(),
                                    err.to_string(),
                                ));
                            }
                        }
                    }
                    Event::Error { rel, error } => {
                        walk_errors += 1;
                        walk_problems.push(Unscanned::new(
                            rel.as_os_str().as_bytes(),
                            error.to_string(),
                        ));
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
    let mut emit = |raw: &[u8], hits: &[Hit]| {
        for h in hits {
            let (path, path_bytes) = super::report::path_fields(raw);
            findings.push(Finding {
                rule: rules[h.rule].id().to_owned(),
                path,
                path_bytes,
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
    drop_package_files(root, &mut findings);
    let mut problems = walk_problems;
    problems.extend(shared.problems);
    problems.sort();
    let mut report = ScanReport {
        findings,
        accepted: Vec::new(),
        stats: ScanStats {
            files,
            bytes: counters.bytes.load(Ordering::Relaxed),
            skipped_binary: counters.binary.load(Ordering::Relaxed),
            skipped_large: counters.large.load(Ordering::Relaxed),
            gzip: counters.gzip.load(Ordering::Relaxed),
            errors: walk_errors + counters.errors.load(Ordering::Relaxed),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        unscanned: problems,
        accepted_unscanned: Vec::new(),
        fingerprint_key_id: key_id,
        fingerprint_note: ephemeral.then(|| EPHEMERAL_NOTE.to_owned()),
    };
    if let Some(b) = &opts.baseline {
        apply_baseline(&mut report, b);
    }
    report.accept_unscanned(&opts.accept_unscanned);
    Ok(report)
}

fn worker(
    rx: &Mutex<mpsc::Receiver<Job>>,
    engine: &Engine,
    shared: &Mutex<Shared>,
    counters: &Counters,
    window: usize,
) {
    // One buffer per worker, grown to the largest window it has needed and
    // kept: freeing and reallocating multi-megabyte buffers fragments the
    // allocator's heap, which costs more resident memory than keeping one.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let job = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(job) = job else { return };
        // A content already scanned is not matched again (checked before
        // matching when the content fits in one window).
        let seen = |d: &[u8; 16]| lock(shared).contents.contains_key(d);
        let scanned = scan_file(
            engine,
            &job.rel,
            job.file,
            job.size,
            (window, MIN_DECOMPRESSED_LIMIT),
            &mut buf,
            &seen,
        );
        counters.bytes.fetch_add(scanned.bytes, Ordering::Relaxed);
        if let Some(e) = &scanned.error {
            // What was read before the error is still reported; the file
            // is listed as not (fully) scanned.
            counters.errors.fetch_add(1, Ordering::Relaxed);
            let mut s = lock(shared);
            s.problems.push(Unscanned::new(&job.raw, e.to_string()));
            if !scanned.hits.is_empty() {
                s.hits.insert(job.path, (job.raw, scanned.hits));
            }
            continue;
        }
        {
            let mut s = lock(shared);
            if let Some(&first) = s.contents.get(&scanned.digest) {
                s.aliases.push((job.path, job.raw, first));
                continue;
            }
            s.contents.insert(scanned.digest, job.path);
        }
        if scanned.gzip {
            counters.gzip.fetch_add(1, Ordering::Relaxed);
        }
        if scanned.binary {
            counters.binary.fetch_add(1, Ordering::Relaxed);
        }
        if !scanned.hits.is_empty() {
            lock(shared).hits.insert(job.path, (job.raw, scanned.hits));
        }
    }
}

/// Scan one opened file: the file's bytes, or, when it starts with the gzip
/// magic, what it decompresses to (every member, streamed through the same
/// windows). `limits`: the window, and the least a gzip file may
/// decompress to before it counts as a bomb.
fn scan_file(
    engine: &Engine,
    rel: &str,
    mut file: File,
    size: u64,
    (window, min_inflated): (usize, u64),
    buf: &mut Vec<u8>,
    seen: &dyn Fn(&[u8; 16]) -> bool,
) -> Scanned {
    let mut head = [0u8; 3];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Scanned::failed(e),
        }
    }
    let mut raw = io::Cursor::new(head).take(n as u64).chain(file);
    if head[..n] != GZIP_MAGIC {
        return scan_stream(engine, rel, &mut raw, size, window, buf, seen);
    }
    let limit = size
        .saturating_mul(DECOMPRESSION_RATIO_LIMIT)
        .max(min_inflated);
    let mut inflated = Bounded {
        inner: flate2::read::MultiGzDecoder::new(raw),
        left: limit,
    };
    let mut s = scan_stream(engine, rel, &mut inflated, size, window, buf, seen);
    s.gzip = true;
    if s.error.is_none() && inflated.left == 0 {
        let mut probe = [0u8; 1];
        if matches!(inflated.inner.read(&mut probe), Ok(1..)) {
            s.error = Some(io::Error::other(format!(
                "gzip: decompresses to more than {limit} bytes (scanned up to there)"
            )));
        }
    }
    if let Some(e) = s.error.take() {
        s.error = Some(io::Error::new(e.kind(), format!("inside gzip: {e}")));
    }
    s
}

fn digest16(full: [u8; 32]) -> [u8; 16] {
    let mut d = [0u8; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// At most `left` bytes of `inner`.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(b.len());
        if n == 0 {
            return Ok(0);
        }
        let k = self.inner.read(&mut b[..n])?;
        self.left -= k as u64;
        Ok(k)
    }
}

/// What scanning one stream found.
#[derive(Debug)]
pub(crate) struct Scanned {
    /// Hits in what was read (up to `error`, if any).
    pub hits: Vec<Hit>,
    /// Why the stream could not be read to its end.
    pub error: Option<io::Error>,
    /// The content was gzip-compressed and scanned decompressed.
    pub gzip: bool,
    /// First 128 bits of the SHA-256 of every byte scanned.
    pub digest: [u8; 16],
    pub bytes: u64,
    /// Whether the first window looked binary (then only binary rules ran).
    pub binary: bool,
}

impl Scanned {
    fn failed(e: io::Error) -> Scanned {
        Scanned {
            hits: Vec::new(),
            error: Some(e),
            gzip: false,
            digest: [0; 16],
            bytes: 0,
            binary: false,
        }
    }
}

/// Scan everything `reader` yields, holding at most `window` bytes at once.
///
/// A stream that fits in one window is matched as one buffer. A longer one
/// is matched window by window; consecutive windows share at least
/// [`WINDOW_OVERLAP`] bytes, and each window reports only the hits that
/// start before the next window does (the next one sees the rest, with
/// their context). The next window starts at a line start when one falls
/// in the overlap zone (else at a word start), so anchored patterns see
/// what they would in the whole file. Lines and columns are those of the whole stream.
/// `size_hint` (the size the walker saw) sizes the first read only. A
/// stream that fits in one window is not matched when `seen` says its
/// digest was already scanned.
pub(crate) fn scan_stream(
    engine: &Engine,
    rel: &str,
    reader: &mut dyn Read,
    size_hint: u64,
    window: usize,
    buf: &mut Vec<u8>,
    seen: &dyn Fn(&[u8; 16]) -> bool,
) -> Scanned {
    let window = window.max(MIN_WINDOW);
    // One byte more than expected, to notice growth without a second pass.
    let mut target = usize::try_from(size_hint.saturating_add(1))
        .unwrap_or(window)
        .clamp(1, window);
    let mut hasher = Sha256::new();
    let mut hits = Vec::new();
    let mut len = 0usize; // valid bytes in buf
    let mut consumed = 0u64; // stream bytes before buf[0]
    let mut base_line = 0u64; // newlines before buf[0]
    let mut col_carry = 0u64; // code points between the last line start and buf[0]
    let mut binary = None;
    let mut error = None;
    loop {
        // Fill the window, growing the buffer only as far as needed.
        let eof = loop {
            if len == target {
                if target >= window {
                    break false;
                }
                target = (target * 2).min(window);
            }
            if buf.len() < target {
                buf.resize(target, 0);
            }
            match reader.read(&mut buf[len..target]) {
                Ok(0) => break true,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Scan what was read, then stop.
                    error = Some(e);
                    break true;
                }
            }
        };
        let data = &buf[..len];
        if eof && consumed == 0 && error.is_none() {
            let d = digest16(Sha256::digest(data).into());
            if seen(&d) {
                return Scanned {
                    hits: Vec::new(),
                    error: None,
                    gzip: false,
                    digest: d,
                    bytes: len as u64,
                    binary: looks_binary(data),
                };
            }
        }
        let binary = *binary.get_or_insert_with(|| looks_binary(data));
        // Where the next window starts: everything before it is reported
        // from this one.
        let cut = if eof {
            len
        } else {
            // A line start, else a word start (so `^` and `\b` at the
            // window's start mean what they do in the file), else anywhere.
            let from = len - 2 * WINDOW_OVERLAP;
            let zone = &data[from..len - WINDOW_OVERLAP];
            memchr::memrchr(b'\n', zone)
                .or_else(|| memchr::memrchr2(b' ', b'\t', zone))
                .map_or(len - WINDOW_OVERLAP, |i| from + i + 1)
        };
        for mut h in engine.scan(rel, data, binary) {
            if h.offset >= cut {
                continue;
            }
            if h.line == 1 {
                h.column += col_carry;
            }
            h.line += base_line;
            h.offset = h
                .offset
                .saturating_add(usize::try_from(consumed).unwrap_or(usize::MAX));
            hits.push(h);
        }
        let done = &data[..cut];
        hasher.update(done);
        let newlines = memchr::memchr_iter(b'\n', done).count() as u64;
        let line_start = memchr::memrchr(b'\n', done).map_or(0, |i| i + 1);
        let tail_chars = done[line_start..]
            .iter()
            .filter(|b| (**b & 0xC0) != 0x80)
            .count() as u64;
        col_carry = if newlines > 0 {
            tail_chars
        } else {
            col_carry + tail_chars
        };
        base_line += newlines;
        consumed += cut as u64;
        if eof {
            break;
        }
        buf.copy_within(cut..len, 0);
        len -= cut;
    }
    Scanned {
        hits,
        error,
        gzip: false,
        digest: digest16(hasher.finalize().into()),
        bytes: consumed,
        binary: binary.unwrap_or(false),
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
fn drop_package_files(root: &Root, findings: &mut Vec<Finding>) {
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
        // Streamed: a file with a finding may be of any size.
        let mut md5 = Md5::new();
        let hashed = crate::safefs::open_regular_beneath(root, Path::new(path))
            .and_then(|mut f| io::copy(&mut f, &mut DigestWriter(&mut md5)));
        if hashed.is_ok() && hex::encode(md5.finalize()) == *sum {
            shipped.insert(path.clone());
        }
    }
    findings.retain(|f| !shipped.contains(&f.path));
}

/// Feeds written bytes to a digest.
struct DigestWriter<'a, D>(&'a mut D);

impl<D: md5::Digest> io::Write for DigestWriter<'_, D> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

    /// At most `n` bytes per `read`, as pipes and decompressors return.
    struct Trickle<R>(R, usize);

    impl<R: Read> Read for Trickle<R> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.1);
            self.0.read(&mut b[..n])
        }
    }

    fn token() -> String {
        // Assembled here so no complete token sits in the source.
        format!("ghp_{}", "Zq4Lm8Vt2Xr6Kp0Nw3Yb7Jc1Hd5Gf9Sa2Qe7")
    }

    /// Every hit of `data` scanned as one stream in `window`-byte windows,
    /// as (rule, line, column, offset).
    fn stream_hits(engine: &Engine, data: &[u8], window: usize) -> Vec<(String, u64, u64, usize)> {
        let mut buf = Vec::new();
        let mut r = Trickle(io::Cursor::new(data), 70_000);
        let s = scan_stream(
            engine,
            "/var/log/app.log",
            &mut r,
            0,
            window,
            &mut buf,
            &|_| false,
        );
        assert!(s.error.is_none());
        assert_eq!(s.bytes, data.len() as u64);
        assert!(
            buf.len() <= window.max(MIN_WINDOW),
            "buffer grew to {}",
            buf.len()
        );
        s.hits
            .iter()
            .map(|h| {
                (
                    engine.rules()[h.rule].id().to_owned(),
                    h.line,
                    h.column,
                    h.offset,
                )
            })
            .collect()
    }

    #[test]
    fn a_token_across_any_window_boundary_is_found_once_with_its_position() {
        let engine = Engine::new(rules::builtin());
        let tok = token();
        let w = MIN_WINDOW;
        // The first window ends at `w`; without line starts nearby, the
        // next begins at `w - WINDOW_OVERLAP`. Tokens around both points,
        // and around the second window's end.
        let second_end = w - WINDOW_OVERLAP + w;
        let cut = w - WINDOW_OVERLAP;
        let mut at = Vec::new();
        for edge in [cut, w, second_end, 2 * cut] {
            for d in [-41i64, -40, -20, -1, 0, 1, 20] {
                at.push((edge as i64 + d) as usize);
            }
        }
        for long_lines in [true, false] {
            for &p in &at {
                let mut data: Vec<u8> = if long_lines {
                    // One line of filler: no line start to align to.
                    vec![b'.'; p]
                } else {
                    let line = b"2026-12-02T10:00:00Z app[42]: GET /items 200\n";
                    line.iter().copied().cycle().take(p).collect()
                };
                data.push(b' ');
                data.extend_from_slice(tok.as_bytes());
                data.push(b' ');
                data.resize(data.len() + 3 * w, b'.');
                let hits = stream_hits(&engine, &data, w);
                let line = 1 + data[..=p].iter().filter(|b| **b == b'\n').count() as u64;
                let line_start = data[..=p]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let col = (p + 1 - line_start + 1) as u64;
                assert_eq!(
                    hits,
                    [("github-token".to_owned(), line, col, p + 1)],
                    "token at byte {p} (long lines: {long_lines})"
                );
                // The same as one buffer.
                let whole = engine.scan("/var/log/app.log", &data, false);
                assert_eq!(whole.len(), 1);
                assert_eq!((whole[0].line, whole[0].column), (line, col));
            }
        }
    }

    fn gzip(parts: &[&[u8]]) -> tempfile::NamedTempFile {
        use std::io::Write as _;
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        for p in parts {
            // Each part its own member, as `cat a.gz b.gz` makes.
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(p).expect("compress");
            f.write_all(&enc.finish().expect("finish")).expect("write");
        }
        f
    }

    fn scan_gz(f: &tempfile::NamedTempFile, min_inflated: u64) -> Scanned {
        let engine = Engine::new(rules::builtin());
        let file = File::open(f.path()).expect("open");
        let size = file.metadata().expect("stat").len();
        let mut buf = Vec::new();
        let s = scan_file(
            &engine,
            "/var/log/app.log.2.gz",
            file,
            size,
            (MIN_WINDOW, min_inflated),
            &mut buf,
            &|_| false,
        );
        assert!(buf.len() <= MIN_WINDOW);
        s
    }

    #[test]
    fn gzip_members_are_scanned_inside_in_windows() {
        let log: Vec<u8> = b"2026-12-02T10:00:00Z app[42]: GET /items 200\n"
            .iter()
            .copied()
            .cycle()
            .take(45 * 30_000)
            .collect();
        let last = format!("export GITHUB_TOKEN={}\n", token());
        let f = gzip(&[&log, &log, last.as_bytes()]);
        let s = scan_gz(&f, 1 << 30);
        assert!(s.gzip);
        assert!(s.error.is_none(), "{:?}", s.error);
        assert!(!s.binary, "decompressed text is text");
        assert_eq!(s.bytes, 2 * log.len() as u64 + last.len() as u64);
        assert_eq!(s.hits.len(), 1);
        assert_eq!((s.hits[0].line, s.hits[0].column), (2 * 30_000 + 1, 21));
    }

    #[test]
    fn a_truncated_gzip_reports_what_it_read_and_the_error() {
        let first = format!("GITHUB_TOKEN={}\n", token());
        let tail: Vec<u8> = (0..400_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let f = gzip(&[first.as_bytes(), &tail]);
        let len = f.as_file().metadata().expect("stat").len();
        f.as_file().set_len(len - 1000).expect("truncate");
        let s = scan_gz(&f, 1 << 30);
        assert_eq!(s.hits.len(), 1, "the token before the damage is reported");
        let e = s.error.expect("a truncated gzip is an error").to_string();
        assert!(e.contains("inside gzip"), "{e}");
    }

    #[test]
    fn a_gzip_bomb_is_scanned_up_to_the_limit_and_reported() {
        let zeros = vec![b'\n'; 8 << 20];
        let f = gzip(&[&zeros]);
        let size = f.as_file().metadata().expect("stat").len();
        let limit = (size * DECOMPRESSION_RATIO_LIMIT).max(1 << 20);
        assert!(limit < 8 << 20, "{size} bytes compressed");
        let s = scan_gz(&f, 1 << 20);
        assert_eq!(s.bytes, limit);
        let e = s.error.expect("over the limit").to_string();
        assert!(e.contains("decompresses to more than"), "{e}");
        // Under the limit it is read to the end.
        let s = scan_gz(&f, 16 << 20);
        assert!(s.error.is_none());
        assert_eq!(s.bytes, 8 << 20);
    }

    #[test]
    fn a_file_merely_starting_like_gzip_magic_bytes_is_plain() {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        use std::io::Write as _;
        f.write_all(&[0x1f, 0x8b]).expect("write");
        f.write_all(format!("no, GITHUB_TOKEN={}\n", token()).as_bytes())
            .expect("write");
        let s = scan_gz(&f, 1 << 30);
        assert!(!s.gzip);
        assert!(s.error.is_none());
        assert_eq!(s.hits.len(), 1);
    }

    #[test]
    fn streaming_hashes_the_whole_stream() {
        let engine = Engine::new(rules::builtin());
        let data: Vec<u8> = (0..3 * MIN_WINDOW + 17)
            .map(|i| (i % 251) as u8 | 1)
            .collect();
        let mut buf = Vec::new();
        let s = scan_stream(
            &engine,
            "/x",
            &mut io::Cursor::new(&data),
            0,
            MIN_WINDOW,
            &mut buf,
            &|_| false,
        );
        let full: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(s.digest[..], full[..16]);
        assert_eq!(s.bytes, data.len() as u64);
    }

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
