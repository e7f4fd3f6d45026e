//! What a scan reports, and the three ways it is printed (text, JSON,
//! SARIF 2.1.0), plus baselines of accepted findings. Nothing here ever sees
//! a secret value: findings carry a fingerprint and a masked preview.

use std::{io, path::Path};

use serde::{Deserialize, Serialize};

use super::rules::{Rule, Severity};

/// One credential found at one place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    pub rule: String,
    /// Path beneath the scanned root (no leading `/`), for display: bytes
    /// that are not UTF-8 show as U+FFFD.
    pub path: String,
    /// The path's exact bytes as an escaped string (see [`escape_path`]),
    /// present when `path` does not already say them exactly (a name that
    /// is not UTF-8, or holds control characters or `\`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<String>,
    pub line: u64,
    pub column: u64,
    /// Hex HMAC-SHA256, under the report's fingerprint key, over the rule
    /// id and the secret.
    pub fingerprint: String,
    /// A few leading characters of the secret, then `…`.
    pub preview: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    /// Regular files considered (every path, duplicates included).
    pub files: u64,
    /// Bytes read and matched.
    pub bytes: u64,
    /// Binary files: only the rules marked `binary` (keys, prefixed tokens)
    /// were applied to them.
    pub skipped_binary: u64,
    /// Files over the size cap, not read.
    pub skipped_large: u64,
    /// Files scanned inside gzip compression (`bytes` counts what they
    /// decompress to).
    pub gzip: u64,
    /// Entries that could not be walked, opened or read.
    pub errors: u64,
    pub elapsed_ms: u64,
}

/// The result of a scan. Serialises to the documented JSON shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReport {
    /// Findings not accepted by the baseline: these make a host not ready.
    pub findings: Vec<Finding>,
    /// Findings the baseline accepts.
    pub accepted: Vec<Finding>,
    pub stats: ScanStats,
    /// Paths that could not be scanned, in whole or in part (unreadable, an
    /// I/O error, over an explicit size cap, damaged compression), with the
    /// reason, never file content. These make a host not ready.
    pub unscanned: Vec<Unscanned>,
    /// Unscanned paths the policy accepts by path: listed, not blocking.
    pub accepted_unscanned: Vec<Unscanned>,
    /// Id of the key the fingerprints were made under (first 8 bytes of
    /// its SHA-256, hex).
    pub fingerprint_key_id: String,
    /// Set when that key is a random one for this run: fingerprints are
    /// then not comparable with any other run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_note: Option<String>,
}

/// A path the scan could not read to its end, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Unscanned {
    /// Path beneath the scanned root (no leading `/`), for display.
    pub path: String,
    /// Exact bytes, escaped, as in [`Finding::path_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_bytes: Option<String>,
    pub reason: String,
}

impl Finding {
    /// The path's exact bytes.
    pub fn raw_path(&self) -> Vec<u8> {
        raw_path(&self.path, self.path_bytes.as_deref())
    }

    /// Sets `path` and `path_bytes` from a path's exact bytes.
    pub fn set_path(&mut self, raw: &[u8]) {
        (self.path, self.path_bytes) = path_fields(raw);
    }

    /// The path as text output shows it (control characters escaped).
    pub fn shown_path(&self) -> &str {
        self.path_bytes.as_deref().unwrap_or(&self.path)
    }
}

impl Unscanned {
    pub fn new(raw: &[u8], reason: String) -> Unscanned {
        let (path, path_bytes) = path_fields(raw);
        Unscanned {
            path,
            path_bytes,
            reason,
        }
    }

    pub fn raw_path(&self) -> Vec<u8> {
        raw_path(&self.path, self.path_bytes.as_deref())
    }

    pub fn set_path(&mut self, raw: &[u8]) {
        (self.path, self.path_bytes) = path_fields(raw);
    }

    pub fn shown_path(&self) -> &str {
        self.path_bytes.as_deref().unwrap_or(&self.path)
    }
}

/// A path's exact bytes as text that says them exactly: UTF-8 characters
/// as themselves, except control characters (C0, DEL, C1), whose bytes are
/// written `\xNN`, and `\`, written `\\`; bytes that are not UTF-8 are
/// `\xNN`. [`unescape_path`] reverses it.
pub fn escape_path(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    let hex = |out: &mut String, bytes: &[u8]| {
        for b in bytes {
            out.push_str(&format!("\\x{b:02x}"));
        }
    };
    for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else if c.is_control() {
                let mut b = [0u8; 4];
                hex(&mut out, c.encode_utf8(&mut b).as_bytes());
            } else {
                out.push(c);
            }
        }
        hex(&mut out, chunk.invalid());
    }
    out
}

/// The bytes an [`escape_path`] string stands for; `None` if it is not one.
pub fn unescape_path(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b != b'\\' {
            out.push(b);
            rest = tail;
            continue;
        }
        match tail {
            [b'\\', t @ ..] => {
                out.push(b'\\');
                rest = t;
            }
            [b'x', h, l, t @ ..] => {
                let digits = [*h, *l];
                let text = std::str::from_utf8(&digits).ok()?;
                out.push(u8::from_str_radix(text, 16).ok()?);
                rest = t;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// `path` (lossy, for display) and `path_bytes` (exact, when `path` is not).
pub fn path_fields(raw: &[u8]) -> (String, Option<String>) {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let exact = escape_path(raw);
    let bytes = (exact != shown).then_some(exact);
    (shown, bytes)
}

fn raw_path(path: &str, path_bytes: Option<&str>) -> Vec<u8> {
    path_bytes
        .and_then(unescape_path)
        .unwrap_or_else(|| path.as_bytes().to_vec())
}

impl ScanReport {
    /// Nothing found beyond the baseline.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Nothing found beyond the baseline, and every path scanned or
    /// accepted unscanned: what a host needs to be ready.
    pub fn is_ready(&self) -> bool {
        self.findings.is_empty() && self.unscanned.is_empty()
    }

    /// Moves unscanned entries at or beneath one of `accepted` (root-
    /// relative; a leading `/` is ignored) to `accepted_unscanned`.
    pub fn accept_unscanned(&mut self, accepted: &[std::path::PathBuf]) {
        let (yes, no): (Vec<Unscanned>, Vec<Unscanned>) = std::mem::take(&mut self.unscanned)
            .into_iter()
            .partition(|u| {
                let p = Path::new(u.path.trim_start_matches('/'));
                accepted.iter().any(|a| {
                    let a = a.strip_prefix("/").unwrap_or(a);
                    !a.as_os_str().is_empty() && p.starts_with(a)
                })
            });
        self.unscanned = no;
        self.accepted_unscanned.extend(yes);
        self.accepted_unscanned.sort();
    }

    /// Moves private-key findings in exactly the files `expected` names
    /// (root-relative; a leading `/` is ignored) out of `findings`, and
    /// returns them. Other rules in those files, and the same key in any
    /// other file, stay findings.
    pub fn set_aside_expected_keys(&mut self, expected: &[String]) -> Vec<Finding> {
        let (set_aside, keep): (Vec<Finding>, Vec<Finding>) = std::mem::take(&mut self.findings)
            .into_iter()
            .partition(|f| {
                f.rule.starts_with("private-key")
                    && expected
                        .iter()
                        .any(|e| e.trim_start_matches('/') == f.path.trim_start_matches('/'))
            });
        self.findings = keep;
        set_aside
    }
}

/// Accepted findings, matched by fingerprint, rule and path, under the
/// fingerprint key the baseline names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub version: u32,
    /// Id of the fingerprint key its fingerprints were made under; empty in
    /// a version 1 baseline (unkeyed SHA-256 fingerprints).
    #[serde(default)]
    pub key_id: String,
    pub accepted: Vec<BaselineEntry>,
}

/// A baseline whose fingerprints were made under another key than the
/// scan's: none of them could match, so it is refused rather than silently
/// accepting nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.explain())]
pub struct BaselineKeyMismatch {
    /// The baseline's key id (empty: a version 1, unkeyed baseline).
    pub baseline: String,
    pub scan: String,
    /// The scan's key is a random one for this run.
    pub ephemeral: bool,
}

impl BaselineKeyMismatch {
    fn explain(&self) -> String {
        let made = if self.baseline.is_empty() {
            "the baseline has unkeyed fingerprints (version 1)".to_owned()
        } else {
            format!(
                "the baseline was made under fingerprint key {}",
                self.baseline
            )
        };
        if self.ephemeral {
            format!(
                "{made}, and this run has no fingerprint key (a random one, {}): give the \
                 deployment's key (--fingerprint-key-file or {}; the controller sends it)",
                self.scan,
                super::key::KEY_FILE_ENV
            )
        } else {
            format!(
                "{made}, but this scan uses key {}: its fingerprints cannot match; scan with \
                 the key it was made under, or write a new baseline under this key",
                self.scan
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BaselineEntry {
    pub fingerprint: String,
    pub rule: String,
    pub path: String,
}

impl Baseline {
    /// Version 2: keyed fingerprints and `key_id`. Version 1 files still
    /// load, and are refused by [`Baseline::check_key`].
    pub const VERSION: u32 = 2;

    pub fn from_findings(findings: &[Finding], key_id: &str) -> Baseline {
        let mut accepted: Vec<BaselineEntry> = findings
            .iter()
            .map(|f| BaselineEntry {
                fingerprint: f.fingerprint.clone(),
                rule: f.rule.clone(),
                path: f.path.clone(),
            })
            .collect();
        accepted.sort();
        accepted.dedup();
        Baseline {
            version: Self::VERSION,
            key_id: key_id.to_owned(),
            accepted,
        }
    }

    /// Refuses a baseline made under another key than `key`.
    pub fn check_key(&self, key: &super::key::FingerprintKey) -> Result<(), BaselineKeyMismatch> {
        if self.key_id == key.id() && !key.is_ephemeral() {
            return Ok(());
        }
        Err(BaselineKeyMismatch {
            baseline: self.key_id.clone(),
            scan: key.id().to_owned(),
            ephemeral: key.is_ephemeral(),
        })
    }

    pub fn accepts(&self, f: &Finding) -> bool {
        self.accepted
            .iter()
            .any(|a| a.fingerprint == f.fingerprint && a.rule == f.rule && a.path == f.path)
    }

    pub fn load(path: &Path) -> anyhow::Result<Baseline> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading baseline {}", path.display()))?;
        let b: Baseline = serde_json::from_str(&text)
            .with_context(|| format!("parsing baseline {}", path.display()))?;
        anyhow::ensure!(
            b.version == 1 || b.version == Self::VERSION,
            "baseline {}: unsupported version {}",
            path.display(),
            b.version
        );
        Ok(b)
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string_pretty(self).expect("baseline serialises") + "\n"
    }
}

/// Split findings into new and accepted.
pub fn apply_baseline(report: &mut ScanReport, baseline: &Baseline) {
    let (accepted, findings) = std::mem::take(&mut report.findings)
        .into_iter()
        .partition(|f| baseline.accepts(f));
    report.findings = findings;
    report.accepted = accepted;
}

pub fn to_json(report: &ScanReport) -> String {
    // Plain data; serialisation cannot fail.
    serde_json::to_string_pretty(report).expect("report serialises") + "\n"
}

pub fn write_text(out: &mut impl io::Write, report: &ScanReport, rules: &[Rule]) -> io::Result<()> {
    for f in &report.findings {
        let sev = rules
            .iter()
            .find(|r| r.id() == f.rule)
            .map_or("high", |r| r.spec.severity.as_str());
        writeln!(
            out,
            "{}:{}:{}: {} [{}] {} (fingerprint {})",
            f.shown_path(),
            f.line,
            f.column,
            f.rule,
            sev,
            f.preview,
            f.fingerprint
        )?;
    }
    for u in &report.unscanned {
        writeln!(out, "{}: not scanned: {}", u.shown_path(), u.reason)?;
    }
    for u in &report.accepted_unscanned {
        writeln!(
            out,
            "{}: not scanned (accepted): {}",
            u.shown_path(),
            u.reason
        )?;
    }
    let s = &report.stats;
    writeln!(
        out,
        "{} finding(s), {} accepted; {} not scanned, {} accepted; {} files, {} bytes, {} binary, {} gzip, {} over size cap, {} errors, {} ms",
        report.findings.len(),
        report.accepted.len(),
        report.unscanned.len(),
        report.accepted_unscanned.len(),
        s.files,
        s.bytes,
        s.skipped_binary,
        s.gzip,
        s.skipped_large,
        s.errors,
        s.elapsed_ms
    )
}

fn sarif_level(s: Severity) -> &'static str {
    match s {
        Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

/// SARIF 2.1.0, as GitHub code scanning accepts it: rules in the driver,
/// relative artifact URIs, 1-based regions, partial fingerprints.
pub fn to_sarif(report: &ScanReport, rules: &[Rule]) -> String {
    use serde_json::json;
    let driver_rules: Vec<_> = rules
        .iter()
        .map(|r| {
            json!({
                "id": r.id(),
                "name": r.id(),
                "shortDescription": { "text": r.spec.name },
                "fullDescription": { "text": format!("{} ({})", r.spec.name, r.source()) },
                "help": { "text": "Remove the credential from the host (and rotate it), or accept it with a baseline." },
                "defaultConfiguration": { "level": sarif_level(r.spec.severity) },
                "properties": { "tags": ["security", "secret"], "security-severity": match r.spec.severity {
                    Severity::High => "8.0", Severity::Medium => "5.0", Severity::Low => "3.0" } },
            })
        })
        .collect();
    let results: Vec<_> = report
        .findings
        .iter()
        .map(|f| {
            let (index, level) = rules
                .iter()
                .position(|r| r.id() == f.rule)
                .map_or((0, "error"), |i| (i, sarif_level(rules[i].spec.severity)));
            json!({
                "ruleId": f.rule,
                "ruleIndex": index,
                "level": level,
                "message": { "text": format!("{} found (preview {}, fingerprint {})", f.rule, f.preview, f.fingerprint) },
                "locations": [{
                    "physicalLocation": {
                        "artifactLocation": { "uri": uri_escape(&f.raw_path()), "uriBaseId": "ROOT" },
                        "region": { "startLine": f.line, "startColumn": f.column },
                    }
                }],
                "partialFingerprints": { "amiprepSecret/v1": f.fingerprint },
            })
        })
        .collect();
    // Paths not scanned: an error each (they block readiness), a note each
    // when the policy accepts them.
    let notification = |u: &Unscanned, level: &str, text: String| {
        json!({
            "descriptor": { "id": "unscanned" },
            "level": level,
            "message": { "text": text },
            "locations": [{
                "physicalLocation": {
                    "artifactLocation": { "uri": uri_escape(&u.raw_path()), "uriBaseId": "ROOT" },
                }
            }],
        })
    };
    let notifications: Vec<_> = report
        .unscanned
        .iter()
        .map(|u| notification(u, "error", format!("not scanned: {}", u.reason)))
        .chain(report.accepted_unscanned.iter().map(|u| {
            notification(
                u,
                "note",
                format!("not scanned (accepted by the policy): {}", u.reason),
            )
        }))
        .collect();
    let doc = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "amiprep-agent scan",
                "semanticVersion": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/amiprep/amiprep",
                "rules": driver_rules,
            }},
            "originalUriBaseIds": { "ROOT": { "uri": "file:///" } },
            "columnKind": "unicodeCodePoints",
            "invocations": [{
                "executionSuccessful": report.unscanned.is_empty(),
                "toolExecutionNotifications": notifications,
            }],
            "results": results,
        }],
    });
    // A json! value always serialises.
    serde_json::to_string_pretty(&doc).expect("SARIF serialises") + "\n"
}

/// Percent-encode what may not appear raw in a relative URI reference
/// (every byte of a name that is not UTF-8 included, so the URI names the
/// exact file).
fn uri_escape(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    // Relative to the ROOT base (`file:///`) even for absolute PATH scans.
    let start = path.iter().position(|b| *b != b'/').unwrap_or(path.len());
    for &b in &path[start..] {
        if b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(path: &str) -> Finding {
        Finding {
            rule: "generic-secret".into(),
            path: path.into(),
            path_bytes: None,
            line: 3,
            column: 7,
            fingerprint: "ab".repeat(32),
            preview: "Kq2Z…".into(),
        }
    }

    #[test]
    fn baseline_accepts_by_fingerprint_rule_and_path() {
        let mut r = ScanReport {
            findings: vec![finding("etc/a"), finding("etc/b")],
            ..Default::default()
        };
        let b = Baseline::from_findings(&r.findings[..1], "0123456789abcdef");
        let b: Baseline = serde_json::from_str(&b.to_json()).expect("round trip");
        apply_baseline(&mut r, &b);
        assert_eq!(r.findings, vec![finding("etc/b")]);
        assert_eq!(r.accepted, vec![finding("etc/a")]);
    }

    #[test]
    fn json_shape() {
        let r = ScanReport {
            findings: vec![finding("etc/a")],
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&to_json(&r)).expect("json");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(
            keys,
            [
                "accepted",
                "accepted_unscanned",
                "findings",
                "fingerprint_key_id",
                "stats",
                "unscanned"
            ]
        );
        let f: Vec<&String> = v["findings"][0].as_object().expect("obj").keys().collect();
        assert_eq!(
            f,
            ["column", "fingerprint", "line", "path", "preview", "rule"]
        );
        let s: Vec<&String> = v["stats"].as_object().expect("obj").keys().collect();
        assert_eq!(
            s,
            [
                "bytes",
                "elapsed_ms",
                "errors",
                "files",
                "gzip",
                "skipped_binary",
                "skipped_large"
            ]
        );
    }

    fn unscanned(path: &str) -> Unscanned {
        Unscanned::new(path.as_bytes(), "Permission denied (os error 13)".into())
    }

    #[test]
    fn unscanned_paths_block_readiness_unless_accepted_by_path() {
        let mut r = ScanReport {
            unscanned: vec![
                unscanned("var/lib/app/secret.db"),
                unscanned("var/cache/app/x"),
                unscanned("var/cache/application"),
            ],
            ..Default::default()
        };
        assert!(r.is_clean() && !r.is_ready());
        r.accept_unscanned(&["/var/cache/app".into(), "".into()]);
        assert_eq!(
            r.unscanned,
            [
                unscanned("var/lib/app/secret.db"),
                unscanned("var/cache/application")
            ]
        );
        assert_eq!(r.accepted_unscanned, [unscanned("var/cache/app/x")]);
        r.accept_unscanned(&[
            "var/lib/app/secret.db".into(),
            "var/cache/application".into(),
        ]);
        assert!(r.is_ready());
    }

    #[test]
    fn sarif_lists_unscanned_paths_as_tool_execution_notifications() {
        let r = ScanReport {
            unscanned: vec![unscanned("var/lib/a b")],
            accepted_unscanned: vec![unscanned("var/cache/x")],
            ..Default::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&to_sarif(&r, super::super::rules::builtin())).expect("json");
        let inv = &v["runs"][0]["invocations"][0];
        assert_eq!(inv["executionSuccessful"], false);
        let n = inv["toolExecutionNotifications"].as_array().expect("array");
        assert_eq!(n.len(), 2);
        assert_eq!(n[0]["level"], "error");
        assert_eq!(
            n[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"],
            "var/lib/a%20b"
        );
        assert!(
            n[0]["message"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("Permission denied"))
        );
        assert_eq!(n[1]["level"], "note");
        let mut text = Vec::new();
        write_text(&mut text, &r, &[]).expect("text");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(
            text.contains("var/lib/a b: not scanned: Permission denied"),
            "{text}"
        );
        assert!(
            text.contains("var/cache/x: not scanned (accepted): "),
            "{text}"
        );
    }

    #[test]
    fn escaped_paths_round_trip_and_say_every_byte() {
        let cases: &[(&[u8], &str)] = &[
            (b"etc/app.env", "etc/app.env"),
            (b"home/caf\xc3\xa9/.env", "home/caf\u{e9}/.env"),
            (b"home/caf\xe9/.env", "home/caf\\xe9/.env"),
            (b"tmp/a\nb\x1b[31m", "tmp/a\\x0ab\\x1b[31m"),
            (b"tmp/back\\slash\\x41", "tmp/back\\\\slash\\\\x41"),
            (b"tmp/c1\xc2\x85", "tmp/c1\\xc2\\x85"),
            (b"tmp/\xff\xfe\x00", "tmp/\\xff\\xfe\\x00"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(escape_path(raw), *escaped);
            assert_eq!(unescape_path(escaped).as_deref(), Some(*raw));
            assert!(!escape_path(raw).chars().any(char::is_control));
        }
        // Every byte string round-trips.
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..2000 {
            let raw: Vec<u8> = (0..(x % 24))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x >> 24) as u8
                })
                .collect();
            assert_eq!(unescape_path(&escape_path(&raw)), Some(raw));
        }
        for bad in ["a\\", "a\\x4", "a\\xzz", "a\\n"] {
            assert_eq!(unescape_path(bad), None, "{bad}");
        }
        // A plain UTF-8 name needs no second field.
        assert_eq!(
            path_fields(b"etc/caf\xc3\xa9"),
            ("etc/caf\u{e9}".into(), None)
        );
        let (shown, exact) = path_fields(b"etc/caf\xe9");
        assert_eq!(shown, "etc/caf\u{fffd}");
        assert_eq!(exact.as_deref(), Some("etc/caf\\xe9"));
    }

    #[test]
    fn text_output_escapes_control_characters_in_names() {
        let mut f = finding("x");
        f.set_path(b"tmp/evil\n/etc/shadow:1:1: fake\x1b[2J");
        let r = ScanReport {
            findings: vec![f],
            ..Default::default()
        };
        let mut out = Vec::new();
        write_text(&mut out, &r, &[]).expect("text");
        let text = String::from_utf8(out).expect("utf-8");
        let first = text.lines().next().expect("a line");
        assert!(
            first.starts_with("tmp/evil\\x0a/etc/shadow:1:1: fake\\x1b[2J:3:7: "),
            "{first}"
        );
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn baselines_name_their_key_and_refuse_another() {
        use super::super::key::FingerprintKey;
        let key = FingerprintKey::from_bytes(&[1u8; 32]).expect("key");
        let other = FingerprintKey::from_bytes(&[2u8; 32]).expect("key");
        let b = Baseline::from_findings(&[finding("etc/a")], key.id());
        let b: Baseline = serde_json::from_str(&b.to_json()).expect("round trip");
        assert_eq!(b.version, 2);
        assert!(b.check_key(&key).is_ok());
        let e = b.check_key(&other).expect_err("other key");
        assert!(e.to_string().contains(key.id()) && e.to_string().contains(other.id()));
        let e = b
            .check_key(&FingerprintKey::random())
            .expect_err("random key");
        assert!(e.ephemeral && e.to_string().contains("--fingerprint-key-file"));
        // A version 1 baseline (unkeyed SHA-256 fingerprints) loads and is refused.
        let v1: Baseline = serde_json::from_str(r#"{"version": 1, "accepted": []}"#).expect("v1");
        assert!(
            v1.check_key(&key)
                .expect_err("v1")
                .to_string()
                .contains("unkeyed")
        );
    }

    #[test]
    fn uri_escaping() {
        assert_eq!(uri_escape(b"etc/my file#1"), "etc/my%20file%231");
        assert_eq!(uri_escape(b"/etc/caf\xe9"), "etc/caf%E9");
    }
}
