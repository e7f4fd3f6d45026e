//! `amiprep-agent scan` end to end: the quality gates of the scanner.
//! - a clean Debian root yields nothing but real private keys;
//! - a generated host-like fixture: every planted credential found, by the
//!   expected rule, and no look-alike reported;
//! - no output format (nor stderr) ever contains a planted value;
//! - host-aware walking: hard links and copies reported at every path,
//!   symlinks not followed, FIFOs not opened, the size cap counted;
//! - exit codes, baselines, SARIF structure, `rules list` / `rules check`.

#[path = "scan_support/fixture.rs"]
mod fixture;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_amiprep-agent"))
}

fn run(args: &[&str]) -> Output {
    agent().args(args).output().expect("run amiprep-agent")
}

fn scan_json(root: &Path, extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec![
        "scan",
        "--root",
        root.to_str().expect("utf-8 path"),
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("scan output is not JSON ({e}); stderr: {stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

fn findings(v: &Value, key: &str) -> Vec<Value> {
    v[key].as_array().cloned().unwrap_or_default()
}

fn debian_root() -> PathBuf {
    let p = std::env::var_os("AMIPREP_DEBIAN_ROOT").map_or_else(
        || PathBuf::from("/root/.cache/amiprep-tests/debian-bookworm-minbase"),
        PathBuf::from,
    );
    assert!(
        p.join("etc/debian_version").exists(),
        "no debootstrapped Debian root at {} (set AMIPREP_DEBIAN_ROOT, or run scripts/test-env.sh to build it)",
        p.display()
    );
    p
}

#[test]
fn scan_clean_debian_root_reports_only_private_keys() {
    let root = debian_root();
    let (code, v, stderr) = scan_json(&root, &[]);
    let f = findings(&v, "findings");
    let other: Vec<&Value> = f
        .iter()
        .filter(|x| !x["rule"].as_str().unwrap_or("").starts_with("private-key-"))
        .collect();
    assert!(
        other.is_empty(),
        "findings on a clean Debian root: {other:#?}"
    );
    assert_eq!(code, if f.is_empty() { 0 } else { 1 }, "stderr: {stderr}");
    let files = v["stats"]["files"].as_u64().unwrap_or(0);
    assert!(files > 3000, "only {files} files scanned: {}", v["stats"]);
    assert_eq!(v["stats"]["errors"], 0, "{stderr}");
}

fn systemd_root() -> PathBuf {
    let p = std::env::var_os("AMIPREP_DEBIAN_SYSTEMD_ROOT").map_or_else(
        || PathBuf::from("/root/.cache/amiprep-tests/debian-bookworm-systemd"),
        PathBuf::from,
    );
    assert!(
        p.join("usr/lib/systemd/system/systemd-firstboot.service")
            .exists(),
        "no debootstrapped Debian root with systemd at {} (set AMIPREP_DEBIAN_SYSTEMD_ROOT, or run scripts/test-env.sh to build it)",
        p.display()
    );
    p
}

/// Findings other than host private keys (`prepare` removes those before
/// its scan).
fn beyond_host_keys(v: &Value) -> Vec<Value> {
    findings(v, "findings")
        .into_iter()
        .filter(|x| {
            !x["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("etc/ssh/ssh_host_"))
        })
        .collect()
}

/// Regression (issue 14): on a merged-/usr root with systemd, the units'
/// `LoadCredential=passwd.hashed-password.root` lines were reported, and the
/// dpkg check missed them because dpkg names them `lib/systemd/…`.
#[test]
fn scan_systemd_debian_root_reports_nothing_but_host_keys() {
    let root = systemd_root();
    let (code, v, stderr) = scan_json(&root, &[]);
    let other = beyond_host_keys(&v);
    assert!(
        other.is_empty(),
        "findings on a clean systemd root: {other:#?}"
    );
    assert!(code == 0 || code == 1, "exit {code}, stderr: {stderr}");
    assert_eq!(v["stats"]["errors"], 0, "{stderr}");
}

/// The scanner's own rules carry example credentials; the binary must not
/// be reported for them (issue 14: 18 findings in `usr/bin/amiprep-agent`).
/// The release binary is checked too when it has been built (the packaging
/// test scans the packaged one in every run).
#[test]
fn scan_of_the_agent_binary_itself_is_clean() {
    let debug = PathBuf::from(env!("CARGO_BIN_EXE_amiprep-agent"));
    let mut bins = vec![debug.clone()];
    if let Some(release) = debug
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("release/amiprep-agent"))
        .filter(|p| p.exists())
    {
        bins.push(release);
    }
    for bin in bins {
        // A debug build is larger than the default size cap: read it all.
        let out = run(&[
            "scan",
            "--format",
            "json",
            "--max-file-size",
            "4000000000",
            bin.to_str().expect("utf-8 path"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let size = std::fs::metadata(&bin).expect("binary").len();
        assert_eq!(v["stats"]["files"], 1, "{}: {stderr}", bin.display());
        assert_eq!(
            v["stats"]["bytes"],
            size,
            "{} not read whole",
            bin.display()
        );
        assert_eq!(
            findings(&v, "findings"),
            Vec::<Value>::new(),
            "{} reports itself",
            bin.display()
        );
        assert_eq!(out.status.code(), Some(0), "{stderr}");
    }
}

#[test]
fn scan_fixture_finds_every_planted_credential_and_no_lookalike() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = fixture::generate(dir.path());
    let (code, v, stderr) = scan_json(dir.path(), &[]);
    assert_eq!(code, 1, "stderr: {stderr}");
    let f = findings(&v, "findings");
    let mut missing = Vec::new();
    for p in &fx.planted {
        let hit = f.iter().any(|x| {
            let line = x["line"].as_u64().unwrap_or(0);
            x["path"] == p.path.as_str()
                && x["rule"] == p.rule.as_str()
                && (p.lines.0..=p.lines.1).contains(&line)
        });
        if !hit {
            missing.push(format!("{} {} lines {:?}", p.rule, p.path, p.lines));
        }
    }
    assert!(
        missing.is_empty(),
        "planted credentials not found:\n{}",
        missing.join("\n")
    );
    let planted_rules: BTreeSet<&str> = fx.planted.iter().map(|p| p.rule.as_str()).collect();
    assert!(
        planted_rules.len() >= 40,
        "fixture covers {} rules",
        planted_rules.len()
    );
    let flagged: Vec<&Value> = f
        .iter()
        .filter(|x| fx.lookalikes.iter().any(|l| x["path"] == l.as_str()))
        .collect();
    assert!(flagged.is_empty(), "look-alikes reported: {flagged:#?}");
    // Nothing beyond what was planted.
    assert_eq!(
        f.len(),
        fx.planted.len(),
        "unexpected extra findings: {f:#?}"
    );
    for x in &f {
        assert_eq!(x["fingerprint"].as_str().map(str::len), Some(64));
        assert!(x["preview"].as_str().is_some_and(|p| p.ends_with('…')));
    }
}

#[test]
fn scan_never_prints_a_secret_in_any_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = fixture::generate(dir.path());
    let root = dir.path().to_str().expect("utf-8");
    let base = dir.path().join("baseline.json");
    let keys = tempfile::tempdir().expect("tempdir");
    let key = key_file(keys.path(), "k", 5);
    let mut outputs = Vec::new();
    for format in ["text", "json", "sarif"] {
        let out = agent()
            .env("AMIPREP_FINGERPRINT_KEY_FILE", &key)
            .args([
                "scan",
                "--root",
                root,
                "--format",
                format,
                "--write-baseline",
                base.to_str().expect("utf-8"),
            ])
            .output()
            .expect("run amiprep-agent");
        assert_eq!(out.status.code(), Some(1));
        outputs.push((format.to_owned(), out.stdout));
        outputs.push((format!("{format} stderr"), out.stderr));
        outputs.push((
            "baseline".to_owned(),
            std::fs::read(&base).expect("baseline"),
        ));
    }
    for p in &fx.planted {
        // Multi-line key bodies: check each line of the value.
        for needle in p.value.lines().filter(|l| l.len() >= 6) {
            for (what, bytes) in &outputs {
                assert!(
                    memchr_find(bytes, needle.as_bytes()).is_none(),
                    "{what} output contains the planted {} value",
                    p.rule
                );
            }
        }
    }
}

/// A fingerprint key file (hex of 32 bytes of `fill`), as `amiprep certs
/// init` writes one.
fn key_file(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{}\n", hex::encode([fill; 32]))).expect("write key");
    p
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn scan_exit_codes_and_baseline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::write(root.join("etc/motd"), "welcome\n").expect("write");
    let (code, v, _) = scan_json(&root, &[]);
    assert_eq!(code, 0);
    assert_eq!(findings(&v, "findings").len(), 0);

    std::fs::write(
        root.join("etc/app.conf"),
        "client_secret = Vd4KyZk3Qp9Vt7Lw2Xr5\n",
    )
    .expect("write");
    let base = dir.path().join("baseline.json");
    let b = base.to_str().expect("utf-8");
    let key = key_file(dir.path(), "fingerprint.key", 1);
    let k = key.to_str().expect("utf-8");
    let (code, v, _) = scan_json(&root, &["--fingerprint-key-file", k, "--write-baseline", b]);
    assert_eq!(code, 1);
    assert_eq!(findings(&v, "findings").len(), 1);
    let (code, v, _) = scan_json(&root, &["--fingerprint-key-file", k, "--baseline", b]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(findings(&v, "findings").len(), 0);
    assert_eq!(findings(&v, "accepted").len(), 1);
    assert_eq!(findings(&v, "accepted")[0]["path"], "etc/app.conf");

    // A new secret is not covered by the old baseline.
    std::fs::write(
        root.join("etc/other.conf"),
        "api_key = Kq2ZtW9xLm4VbN8cYp3J\n",
    )
    .expect("write");
    let (code, v, _) = scan_json(&root, &["--fingerprint-key-file", k, "--baseline", b]);
    assert_eq!(code, 1);
    assert_eq!(findings(&v, "findings")[0]["path"], "etc/other.conf");

    // Errors: a missing root is exit 2; a bad baseline too.
    assert_eq!(
        run(&["scan", "--root", "/nonexistent/amiprep"])
            .status
            .code(),
        Some(2)
    );
    std::fs::write(&base, "not json").expect("write");
    assert_eq!(
        run(&[
            "scan",
            "--root",
            root.to_str().expect("utf-8"),
            "--baseline",
            b
        ])
        .status
        .code(),
        Some(2)
    );
}

#[test]
fn scan_dedupes_content_but_reports_every_path_and_stays_safe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::create_dir_all(root.join("home/a")).expect("mkdir");
    let secret = format!("DB_PASSWORD={}\n", "Kq2ZtW9xLm4VbN8c");
    std::fs::write(root.join("etc/app.env"), &secret).expect("write");
    std::fs::hard_link(root.join("etc/app.env"), root.join("home/a/link.env")).expect("link");
    std::fs::write(root.join("home/a/copy.env"), &secret).expect("write");
    // A secret outside the root, reachable only through a symlink.
    let outside = dir.path().join("outside.env");
    std::fs::write(&outside, "API_KEY=Yh8Jn4Bc1R7kq2ZtW9xL\n").expect("write");
    std::os::unix::fs::symlink(&outside, root.join("etc/outside.env")).expect("symlink");
    std::os::unix::fs::symlink(dir.path(), root.join("home/up")).expect("symlink");
    // A FIFO: opening it for reading would block forever.
    let fifo = root.join("etc/pipe");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("cstring");
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A large file over the cap.
    std::fs::write(root.join("etc/big.log"), vec![b'a'; 4096]).expect("write");

    let (code, v, stderr) = scan_json(&root, &["--max-file-size", "1024"]);
    assert_eq!(code, 1, "{stderr}");
    let paths: BTreeSet<String> = findings(&v, "findings")
        .iter()
        .map(|f| f["path"].as_str().unwrap_or("").to_owned())
        .collect();
    let want: BTreeSet<String> = ["etc/app.env", "home/a/copy.env", "home/a/link.env"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(paths, want);
    let fps: BTreeSet<String> = findings(&v, "findings")
        .iter()
        .filter_map(|f| f["fingerprint"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(fps.len(), 1, "one secret, one fingerprint");
    assert_eq!(v["stats"]["skipped_large"], 1);
    assert_eq!(v["stats"]["files"], 4);
    // The copy and the hard link were not read again.
    assert_eq!(v["stats"]["bytes"].as_u64(), Some(2 * secret.len() as u64));
}

#[test]
fn scan_skips_host_pseudo_filesystems() {
    let dir = tempfile::tempdir().expect("tempdir");
    for d in ["proc/1", "sys/kernel", "dev", "run/secrets", "etc"] {
        std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
    }
    for f in ["proc/1/environ", "sys/kernel/x", "dev/x", "run/secrets/db"] {
        std::fs::write(dir.path().join(f), "DB_PASSWORD=Kq2ZtW9xLm4VbN8c\n").expect("write");
    }
    let (code, v, _) = scan_json(dir.path(), &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["stats"]["files"], 0);
}

#[test]
fn scan_paths_and_sarif() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fx = fixture::generate(dir.path());
    let file = dir.path().join("root/.aws/credentials");
    let out = run(&["scan", "--format", "sarif", file.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).expect("SARIF is JSON");
    assert_eq!(v["version"], "2.1.0");
    assert!(v["$schema"].as_str().is_some_and(|s| s.contains("sarif")));
    let run0 = &v["runs"][0];
    let rules = run0["tool"]["driver"]["rules"].as_array().expect("rules");
    assert!(rules.len() >= 40);
    let results = run0["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{results:#?}");
    for r in results {
        let idx = r["ruleIndex"].as_u64().expect("ruleIndex") as usize;
        assert_eq!(rules[idx]["id"], r["ruleId"]);
        assert!(r["message"]["text"].as_str().is_some_and(|t| !t.is_empty()));
        let loc = &r["locations"][0]["physicalLocation"];
        assert!(
            loc["artifactLocation"]["uri"]
                .as_str()
                .is_some_and(|u| u.ends_with("root/.aws/credentials") && !u.starts_with('/'))
        );
        assert!(loc["region"]["startLine"].as_u64().is_some_and(|l| l >= 1));
        assert!(r["partialFingerprints"].is_object());
    }
    let _ = fx;
}

#[test]
fn scan_rules_list_and_check() {
    let out = run(&["rules", "list"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    for id in [
        "aws-secret-access-key",
        "private-key-putty",
        "docker-config-auth",
        "generic-secret",
    ] {
        assert!(text.contains(id), "{id} missing from rules list");
    }
    let out = run(&["rules", "check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the fixture for the benchmark script (scripts/bench-scan.sh):
/// `AMIPREP_SCAN_FIXTURE=DIR cargo test -p amiprep-agent --test scan -- --ignored write_fixture`
#[test]
#[ignore = "writes the benchmark fixture; run by scripts/bench-scan.sh"]
fn write_fixture() {
    let dir = std::env::var_os("AMIPREP_SCAN_FIXTURE").expect("AMIPREP_SCAN_FIXTURE");
    let root = fixture::write_to(Path::new(&dir));
    eprintln!("fixture at {}", root.display());
}

fn github_token() -> String {
    use rand::{Rng, distr::Alphanumeric};
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(36)
        .map(char::from)
        .collect();
    format!("ghp_{tail}")
}

/// Issue 14: files over the old 16 MiB cap were skipped and the host still
/// passed. A 200 MiB log is streamed in bounded windows and a token on its
/// last line is found; so is one straddling the first window boundary of a
/// file that is one long line.
#[test]
fn scan_streams_large_files_and_finds_tokens_at_the_end_and_across_windows() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("var/log")).expect("mkdir");
    let line = b"2026-12-02T10:00:00.123Z web-7 nginx[811]: 10.0.3.4 \"GET /api/v1/items?page=2 HTTP/1.1\" 200 5120\n";
    let lines = (200u64 << 20) / line.len() as u64 + 1;
    let big = root.join("var/log/access.log");
    let end_token = github_token();
    {
        let mut w = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&big).expect("create"),
        );
        for _ in 0..lines {
            w.write_all(line).expect("write");
        }
        writeln!(w, "deploy: export GITHUB_TOKEN={end_token}").expect("write");
        w.flush().expect("flush");
    }
    let big_len = std::fs::metadata(&big).expect("stat").len();
    assert!(big_len > 200 << 20);

    // One line of 9 MiB: a token straddling the 4 MiB window end.
    let window = 4usize << 20;
    let straddle_token = github_token();
    let start = window - 17;
    let mut one = vec![b'='; start - 1];
    one.push(b' ');
    one.extend_from_slice(straddle_token.as_bytes());
    one.push(b' ');
    one.resize(9 << 20, b'=');
    std::fs::write(root.join("var/log/one-line.log"), &one).expect("write");

    let (code, v, stderr) = scan_json(&root, &["--window", &window.to_string()]);
    assert_eq!(code, 1, "{stderr}");
    let mut got: Vec<(String, String, u64, u64)> = findings(&v, "findings")
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap_or("").to_owned(),
                f["path"].as_str().unwrap_or("").to_owned(),
                f["line"].as_u64().unwrap_or(0),
                f["column"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    let col = "deploy: export GITHUB_TOKEN=".len() as u64 + 1;
    assert_eq!(
        got,
        [
            (
                "github-token".into(),
                "var/log/access.log".into(),
                lines + 1,
                col
            ),
            (
                "github-token".into(),
                "var/log/one-line.log".into(),
                1,
                start as u64 + 1
            ),
        ]
    );
    assert_eq!(v["stats"]["bytes"], big_len + one.len() as u64);
    assert_eq!(v["stats"]["skipped_large"], 0);
    for t in [&end_token, &straddle_token] {
        assert!(!v.to_string().contains(t.as_str()));
    }
}

/// Issue 14: rotated logs compressed with gzip are scanned inside, in the
/// same bounded windows, whatever their name.
#[test]
fn scan_reads_inside_gzip_rotated_logs() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("var/log")).expect("mkdir");
    let token = github_token();
    let line = b"Dec  2 10:00:00 web-7 CRON[811]: (root) CMD (command -v debian-sa1 > /dev/null)\n";
    let lines = 100_000u64;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for _ in 0..lines {
        gz.write_all(line).expect("compress");
    }
    writeln!(gz, "Dec  2 10:00:01 web-7 deploy: GITHUB_TOKEN={token}").expect("compress");
    let gz = gz.finish().expect("finish");
    std::fs::write(root.join("var/log/syslog.2.gz"), &gz).expect("write");
    // The same content under a name without `.gz`: detected by its magic.
    std::fs::write(root.join("var/log/syslog.3"), &gz).expect("write");
    let (code, v, stderr) = scan_json(&root, &["--window", "262144"]);
    assert_eq!(code, 1, "{stderr}");
    let f = findings(&v, "findings");
    let mut got: Vec<(String, u64, u64)> = f
        .iter()
        .map(|x| {
            (
                x["path"].as_str().unwrap_or("").to_owned(),
                x["line"].as_u64().unwrap_or(0),
                x["column"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    got.sort();
    let col = "Dec  2 10:00:01 web-7 deploy: GITHUB_TOKEN=".len() as u64 + 1;
    assert_eq!(
        got,
        [
            ("var/log/syslog.2.gz".to_owned(), lines + 1, col),
            ("var/log/syslog.3".to_owned(), lines + 1, col),
        ]
    );
    assert!(f.iter().all(|x| x["rule"] == "github-token"));
    // The copy is recognised by its content: one gzip content, read twice.
    assert_eq!(v["stats"]["gzip"], 1);
    let plain = lines * line.len() as u64 + col - 1 + token.len() as u64 + 1;
    assert_eq!(v["stats"]["bytes"], 2 * plain);
}

/// Issue 14: an unreadable file is listed in every format and fails the
/// scan (exit 2) unless accepted by path. Run without privileges, so that
/// permissions apply.
#[test]
fn scan_lists_unreadable_paths_in_every_format_and_fails_unless_accepted() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    for d in ["etc", "var/lib/app"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/motd"), "welcome\n").expect("write");
    let secret = root.join("var/lib/app/secret.db");
    std::fs::write(&secret, "DB_PASSWORD=Kq2ZtW9xLm4VbN8c\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    for p in [
        dir.path(),
        root.as_path(),
        &root.join("var"),
        &root.join("var/lib"),
        &root.join("var/lib/app"),
        &root.join("etc"),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    std::fs::set_permissions(
        root.join("etc/motd"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let unprivileged = |format: &str, extra: &[&str]| -> Output {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_amiprep-agent"))
        .args([
            "scan",
            "--root",
            root.to_str().expect("utf-8"),
            "--format",
            format,
        ])
        .args(extra);
        c.output().expect("run setpriv")
    };
    let out = unprivileged("json", &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["unscanned"][0]["path"], "var/lib/app/secret.db", "{v}");
    assert!(
        v["unscanned"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ermission denied"))
    );
    assert_eq!(v["stats"]["errors"], 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not scanned: var/lib/app/secret.db"));

    let out = unprivileged("sarif", &[]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).expect("sarif");
    let n = &v["runs"][0]["invocations"][0]["toolExecutionNotifications"][0];
    assert_eq!(n["level"], "error");
    assert_eq!(
        n["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
        "var/lib/app/secret.db"
    );
    assert_eq!(v["runs"][0]["invocations"][0]["executionSuccessful"], false);

    let out = unprivileged("text", &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("var/lib/app/secret.db: not scanned: "));

    let out = unprivileged("json", &["--accept-unscanned", "/var/lib/app"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["unscanned"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["accepted_unscanned"][0]["path"], "var/lib/app/secret.db");
}

/// Issue 14: a name that is not UTF-8 is reported in a form that leads back
/// to the file (JSON `path_bytes`), and text output never prints a name's
/// control characters raw.
#[test]
fn scan_reports_non_utf8_and_control_character_names_exactly_and_safely() {
    use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("srv")).expect("mkdir");
    let names: [&[u8]; 2] = [b"srv/caf\xe9-\xff.env", b"srv/evil\n\x1b[2Jname.env"];
    for n in names {
        std::fs::write(
            root.join(OsStr::from_bytes(n)),
            "DB_PASSWORD=Kq2ZtW9xLm4VbN8c\n",
        )
        .expect("write");
    }
    let (code, v, _) = scan_json(&root, &[]);
    assert_eq!(code, 1);
    let f = findings(&v, "findings");
    assert_eq!(f.len(), 2, "{v}");
    let mut found: Vec<Vec<u8>> = Vec::new();
    for x in &f {
        let escaped = x["path_bytes"]
            .as_str()
            .expect("path_bytes for these names");
        let raw = amiprep_agent::scan::report::unescape_path(escaped).expect("unescapes");
        // It names the real file: reading it through the exact path works.
        assert!(root.join(OsStr::from_bytes(&raw)).is_file(), "{escaped}");
        assert!(x["path"].as_str().is_some_and(|p| !p.is_empty()));
        found.push(raw);
    }
    found.sort();
    let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
    want.sort();
    assert_eq!(found, want);
    // A plain name gets no second field.
    std::fs::write(root.join("srv/plain.env"), "DB_PASSWORD=Kq2ZtW9xLm4VbN8d\n").expect("write");
    let (_, v, _) = scan_json(&root, &[]);
    let plain: Vec<Value> = findings(&v, "findings")
        .into_iter()
        .filter(|x| x["path"] == "srv/plain.env")
        .collect();
    assert_eq!(plain.len(), 1);
    assert!(plain[0].get("path_bytes").is_none());

    let out = run(&["scan", "--root", root.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !out.stdout.contains(&0x1b),
        "raw escape character in text output"
    );
    let text = String::from_utf8(out.stdout).expect("text output is UTF-8");
    assert!(
        text.contains("srv/evil\\x0a\\x1b[2Jname.env:1:13: "),
        "{text}"
    );
    assert!(text.contains("srv/caf\\xe9-\\xff.env:1:13: "), "{text}");
    // One line per finding plus the summary: no name split a line.
    assert_eq!(text.lines().count(), 4, "{text}");
}

/// Issue 14: fingerprints are HMACs under the deployment's key. The same
/// key gives the same fingerprint and its baselines apply; another key's
/// baseline is refused (exit 3); without a key each run's fingerprints
/// differ, and the report says so.
#[test]
fn fingerprints_are_keyed_and_baselines_are_bound_to_their_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::write(
        root.join("etc/app.conf"),
        "client_secret = Vd4KyZk3Qp9Vt7Lw2Xr5\n",
    )
    .expect("write");
    let keys = tempfile::tempdir().expect("tempdir");
    let (k1, k2) = (
        key_file(keys.path(), "one", 1),
        key_file(keys.path(), "two", 2),
    );
    let (k1, k2) = (k1.to_str().expect("utf-8"), k2.to_str().expect("utf-8"));
    let fp = |v: &Value| {
        findings(v, "findings")[0]["fingerprint"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };

    let (_, a, err_a) = scan_json(&root, &["--fingerprint-key-file", k1]);
    let (_, a2, _) = scan_json(&root, &["--fingerprint-key-file", k1]);
    let (_, b, _) = scan_json(&root, &["--fingerprint-key-file", k2]);
    assert_eq!(fp(&a), fp(&a2), "same key, same fingerprint");
    assert_ne!(fp(&a), fp(&b), "another key, another fingerprint");
    assert_eq!(fp(&a).len(), 64);
    assert!(a.get("fingerprint_note").is_none() && !err_a.contains("not comparable"));
    let id = a["fingerprint_key_id"].as_str().expect("key id").to_owned();
    assert_eq!(id.len(), 16);
    assert_ne!(b["fingerprint_key_id"].as_str(), Some(id.as_str()));
    // The key id is the first 8 bytes of the key's SHA-256.
    use sha2::Digest as _;
    assert_eq!(id, hex::encode(&sha2::Sha256::digest([1u8; 32])[..8]));

    // A baseline records its key and applies under the same key only.
    let base = dir.path().join("baseline.json");
    let bpath = base.to_str().expect("utf-8");
    let (code, _, _) = scan_json(
        &root,
        &["--fingerprint-key-file", k1, "--write-baseline", bpath],
    );
    assert_eq!(code, 1);
    let written: Value =
        serde_json::from_slice(&std::fs::read(&base).expect("baseline")).expect("json");
    assert_eq!(written["version"], 2);
    assert_eq!(written["key_id"], id.as_str());
    let (code, v, _) = scan_json(&root, &["--fingerprint-key-file", k1, "--baseline", bpath]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(findings(&v, "accepted").len(), 1);
    // The key from the environment is the same key.
    let out = agent()
        .env("AMIPREP_FINGERPRINT_KEY_FILE", k1)
        .args([
            "scan",
            "--root",
            root.to_str().expect("utf-8"),
            "--baseline",
            bpath,
        ])
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Another key: refused, with exit 3 and a message naming both keys.
    let out = run(&[
        "scan",
        "--root",
        root.to_str().expect("utf-8"),
        "--fingerprint-key-file",
        k2,
        "--baseline",
        bpath,
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id) && err.contains("cannot match"), "{err}");
    assert!(out.stdout.is_empty());
    // No key at all: refused too.
    let out = run(&[
        "scan",
        "--root",
        root.to_str().expect("utf-8"),
        "--baseline",
        bpath,
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fingerprint-key-file"));

    // No key: a random one per run, said on stderr and in the report.
    let (code, n1, err) = scan_json(&root, &[]);
    let (_, n2, _) = scan_json(&root, &[]);
    assert_eq!(code, 1);
    assert_ne!(fp(&n1), fp(&n2), "random per-run keys");
    assert_ne!(fp(&n1), fp(&a));
    assert!(err.contains("not comparable across runs"), "{err}");
    assert!(
        n1["fingerprint_note"]
            .as_str()
            .is_some_and(|n| n.contains("not comparable"))
    );
    // ... and a baseline cannot be written under it.
    let out = run(&[
        "scan",
        "--root",
        root.to_str().expect("utf-8"),
        "--write-baseline",
        bpath,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--write-baseline needs"));
    // A bad key file is an error, not a silent fallback.
    std::fs::write(keys.path().join("short"), "abcd\n").expect("write");
    let short = keys.path().join("short");
    let out = run(&[
        "scan",
        "--root",
        root.to_str().expect("utf-8"),
        "--fingerprint-key-file",
        short.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
}
