//! The matching engine: finds secrets in one byte buffer.
//!
//! A keyword prefilter (one Aho-Corasick pass, ASCII case-insensitive) picks
//! the rules worth running; only those rules' regexes see the buffer. Every
//! candidate then goes through the rule's filters (allow list, key deny list,
//! placeholders, entropy, structural validator) and overlap resolution
//! (earlier rules win). What leaves this module is a [`Hit`]: position, rule,
//! fingerprint and masked preview, never the secret itself.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use base64::Engine as _;
use regex::bytes::RegexSet;

use super::{
    key::FingerprintKey,
    rules::{Rule, Validator},
};

/// One secret found in a buffer. Holds no secret material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Index into the engine's rules.
    pub rule: usize,
    /// 1-based line of the secret's first byte.
    pub line: u64,
    /// 1-based column, in Unicode code points.
    pub column: u64,
    /// Byte offset of the secret's first byte in the scanned buffer.
    pub offset: usize,
    pub fingerprint: String,
    pub preview: String,
}

/// Bytes of a file inspected to decide whether it is binary.
pub const BINARY_SNIFF: usize = 8192;

/// A NUL byte near the start means binary, as git and ripgrep decide.
pub fn looks_binary(data: &[u8]) -> bool {
    memchr::memchr(0, &data[..data.len().min(BINARY_SNIFF)]).is_some()
}

/// One keyword automaton and the rules each keyword triggers.
struct Prefilter {
    ac: Option<AhoCorasick>,
    /// Keyword pattern index -> rules it triggers.
    keyword_rules: Vec<Vec<usize>>,
    /// Report overlapping occurrences (needed for Standard semantics).
    overlapping: bool,
}

impl Prefilter {
    fn new(rules: &[Rule], case_insensitive: bool, binary_only: bool) -> Prefilter {
        let mut words: Vec<Vec<u8>> = Vec::new();
        let mut keyword_rules: Vec<Vec<usize>> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            if rule.case_insensitive() != case_insensitive || (binary_only && !rule.spec.binary) {
                continue;
            }
            for k in &rule.spec.keywords {
                let k = if case_insensitive {
                    k.to_ascii_lowercase().into_bytes()
                } else {
                    k.clone().into_bytes()
                };
                match words.iter().position(|w| *w == k) {
                    Some(p) => keyword_rules[p].push(i),
                    None => {
                        words.push(k);
                        keyword_rules.push(vec![i]);
                    }
                }
            }
        }
        // A keyword containing another also triggers the other's rules, and
        // longer keywords come first: a leftmost-first search that reports
        // `secret_access_key` has then also seen `secret`.
        let mut pairs: Vec<(Vec<u8>, Vec<usize>)> = words
            .iter()
            .map(|w| {
                let mut rs: Vec<usize> = Vec::new();
                for (o, other) in words.iter().enumerate() {
                    if memchr::memmem::find(w, other).is_some() {
                        rs.extend(&keyword_rules[o]);
                    }
                }
                rs.sort_unstable();
                rs.dedup();
                (w.clone(), rs)
            })
            .collect();
        pairs.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let (words, keyword_rules): (Vec<Vec<u8>>, Vec<Vec<usize>>) = pairs.into_iter().unzip();
        let ac = (!words.is_empty()).then(|| {
            // Case-sensitive keywords: leftmost-first, which lets the
            // automaton use a vectorised (Teddy) prefilter; these keywords
            // are distinctive prefixes that do not overlap one another.
            // Case-insensitive ones (common words) need every overlapping
            // occurrence and get a full DFA.
            let kind = if case_insensitive {
                MatchKind::Standard
            } else {
                MatchKind::LeftmostFirst
            };
            // Building from validated, non-empty literal keywords cannot
            // fail (only pattern sets beyond the size limits can).
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(case_insensitive)
                .match_kind(kind)
                .kind(Some(AhoCorasickKind::DFA))
                .build(&words)
                .expect("keyword automaton within size limits")
        });
        Prefilter {
            ac,
            keyword_rules,
            overlapping: case_insensitive,
        }
    }

    fn hits<'h>(&'h self, data: &'h [u8]) -> Box<dyn Iterator<Item = aho_corasick::Match> + 'h> {
        match &self.ac {
            None => Box::new(std::iter::empty()),
            Some(ac) if self.overlapping => Box::new(ac.find_overlapping_iter(data)),
            Some(ac) => Box::new(ac.find_iter(data)),
        }
    }
}

pub struct Engine {
    rules: &'static [Rule],
    /// Keyword automata: case-sensitive and case-insensitive keywords (a
    /// rule's keywords are case-insensitive when its pattern is), for text
    /// files (all rules) and for binary files (rules marked `binary`).
    text: [Prefilter; 2],
    binary: [Prefilter; 2],
    /// Path regexes of path-restricted rules, and which rule each is.
    paths: RegexSet,
    path_rules: Vec<usize>,
    /// Fingerprints are HMACs under this key.
    key: FingerprintKey,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Where a triggered rule's regex runs.
#[derive(Clone)]
enum Scope {
    NotApplicable,
    Applicable,
    /// Run over the whole buffer.
    Whole,
    /// Run over these byte ranges (each keyword hit's line and the next).
    Lines(Vec<(usize, usize)>),
}

impl Engine {
    /// An engine whose fingerprints use a random key (rule checks, tests).
    pub fn new(rules: &'static [Rule]) -> Engine {
        Engine::with_key(rules, FingerprintKey::random())
    }

    pub fn with_key(rules: &'static [Rule], key: FingerprintKey) -> Engine {
        let mut path_src = Vec::new();
        let mut path_rules = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            if let Some(p) = &rule.spec.path {
                path_src.push(p.as_str());
                path_rules.push(i);
            }
        }
        // Each path regex already compiled on its own when the rules loaded.
        let paths = RegexSet::new(path_src).expect("path regexes compiled individually");
        Engine {
            rules,
            text: [
                Prefilter::new(rules, false, false),
                Prefilter::new(rules, true, false),
            ],
            binary: [
                Prefilter::new(rules, false, true),
                Prefilter::new(rules, true, true),
            ],
            paths,
            path_rules,
            key,
        }
    }

    pub fn rules(&self) -> &'static [Rule] {
        self.rules
    }

    /// Scan `data`, the content of the file at `path` (beneath the root,
    /// starting with `/`). In binary data only rules marked `binary` run.
    pub fn scan(&self, path: &str, data: &[u8], binary: bool) -> Vec<Hit> {
        let n = self.rules.len();
        let mut scope = vec![Scope::Applicable; n];
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.spec.path.is_some() || (binary && !rule.spec.binary) {
                scope[i] = Scope::NotApplicable;
            }
        }
        for m in self.paths.matches(path.as_bytes()).iter() {
            let r = self.path_rules[m];
            if !binary || self.rules[r].spec.binary {
                scope[r] = if self.rules[r].spec.keywords.is_empty() {
                    Scope::Whole
                } else {
                    Scope::Applicable
                };
            }
        }
        let prefilters = if binary { &self.binary } else { &self.text };
        for pf in prefilters {
            for m in pf.hits(data) {
                for &r in &pf.keyword_rules[m.pattern().as_usize()] {
                    if self.rules[r].spec.multiline {
                        if matches!(scope[r], Scope::Applicable) {
                            scope[r] = Scope::Whole;
                        }
                        continue;
                    }
                    let (s, e) = line_window(data, m.start());
                    match &mut scope[r] {
                        Scope::Applicable => scope[r] = Scope::Lines(vec![(s, e)]),
                        Scope::Lines(v) => match v.last_mut() {
                            Some(last) if s <= last.1 => last.1 = last.1.max(e),
                            _ => v.push((s, e)),
                        },
                        Scope::NotApplicable | Scope::Whole => {}
                    }
                }
            }
        }

        let mut found: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, rule)
        for (r, rule) in self.rules.iter().enumerate() {
            let whole = [(0, data.len())];
            let ranges: &[(usize, usize)] = match &scope[r] {
                Scope::Whole => &whole,
                Scope::Lines(v) => v,
                Scope::NotApplicable | Scope::Applicable => continue,
            };
            for &(base, end) in ranges {
                self.run_rule(r, rule, data, base, end, &mut found);
            }
        }
        found.sort_unstable();
        let mut hits = Vec::with_capacity(found.len());
        let mut line = 1u64;
        let mut line_start = 0usize;
        let mut pos = 0usize;
        for (s, e, r) in found {
            for nl in memchr::memchr_iter(b'\n', &data[pos..s]) {
                line += 1;
                line_start = pos + nl + 1;
            }
            pos = s;
            let column = 1 + data[line_start..s]
                .iter()
                .filter(|b| (**b & 0xC0) != 0x80)
                .count() as u64;
            let secret = &data[s..e];
            hits.push(Hit {
                rule: r,
                line,
                column,
                offset: s,
                fingerprint: self.key.fingerprint(self.rules[r].id(), secret),
                preview: preview(secret),
            });
        }
        hits
    }
}

impl Engine {
    /// Run one rule's regex over `data[base..end]`, keeping accepted
    /// candidates that do not overlap an earlier (higher-priority) finding.
    fn run_rule(
        &self,
        r: usize,
        rule: &Rule,
        data: &[u8],
        base: usize,
        end: usize,
        found: &mut Vec<(usize, usize, usize)>,
    ) {
        for caps in rule.regex.captures_iter(&data[base..end]) {
            let (s, e) = rule.secret_range(&caps);
            let (mut s, mut e) = (s + base, e + base);
            // Quoted values: the quotes are not part of the secret.
            if e - s >= 2 && matches!(data[s], b'"' | b'\'') && data[e - 1] == data[s] {
                s += 1;
                e -= 1;
            }
            if s == e || found.iter().any(|&(fs, fe, _)| s < fe && fs < e) {
                continue;
            }
            let whole = caps.get(0).map_or(&[][..], |m| m.as_bytes());
            if accept(rule, &data[s..e], rule.key(&caps), whole) {
                found.push((s, e, r));
            }
        }
    }
}

/// The line holding `pos` and the line after it (a value may follow its
/// key on the next line, as in YAML).
fn line_window(data: &[u8], pos: usize) -> (usize, usize) {
    let start = memchr::memrchr(b'\n', &data[..pos]).map_or(0, |i| i + 1);
    let end = match memchr::memchr(b'\n', &data[pos..]) {
        None => data.len(),
        Some(i) => {
            let next = pos + i + 1;
            memchr::memchr(b'\n', &data[next..]).map_or(data.len(), |j| next + j)
        }
    };
    (start, end)
}

/// Every filter a candidate must pass.
fn accept(rule: &Rule, secret: &[u8], key: Option<&[u8]>, whole: &[u8]) -> bool {
    let spec = &rule.spec;
    if spec.allow.iter().any(|a| a.as_bytes() == secret) {
        return false;
    }
    if let Some(key) = key {
        if looks_encoded(key) {
            return false;
        }
        let key = key.to_ascii_lowercase();
        if spec
            .deny_key
            .iter()
            .any(|d| memchr::memmem::find(&key, d.as_bytes()).is_some())
        {
            return false;
        }
        // A value that reads as a reference to a variable or a call, not a
        // literal.
        if looks_like_identifier(secret) || looks_like_call(secret) {
            return false;
        }
    }
    // Key material is long and structured; placeholders are short.
    if secret.len() < 128 && is_placeholder(secret) {
        return false;
    }
    if let Some(min) = spec.min_entropy
        && shannon_entropy(secret) < min
    {
        return false;
    }
    match spec.validate {
        None => true,
        Some(v) => validate(v, secret, whole),
    }
}

/// Shannon entropy in bits per byte.
pub fn shannon_entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let len = data.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|&c| {
            let p = f64::from(c) / len;
            -p * p.log2()
        })
        .sum()
}

/// Words that make a value documentation or a template's stand-in.
const PLACEHOLDER_WORDS: &[&str] = &[
    "example",
    "placeholder",
    "changeme",
    "change_me",
    "change-me",
    "replace",
    "your",
    "redacted",
    "dummy",
    "insert",
    "fixme",
    "todo",
    "sample",
];

/// Runs of mask characters (`****`, `xxxx`): four in a row almost never
/// occur in a random value.
const MASK_RUNS: &[&str] = &["xxxx", "****", "....", "####", "____", "----"];

const PLACEHOLDER_VALUES: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "secret",
    "token",
    "none",
    "null",
    "nil",
    "true",
    "false",
    "undefined",
    "test",
    "admin",
    "default",
    "empty",
    "required",
    "optional",
    "string",
    "value",
    "hidden",
    "masked",
    "foo",
    "bar",
    "foobar",
    "pwd",
    "apikey",
    "api_key",
    "api-key",
    "key",
    "mypassword",
    "mysecret",
    "secretkey",
    "supersecret",
    "password123",
    "qwerty",
    "letmein",
];

/// Values that stand for a secret rather than being one: templates,
/// variables, documentation values, masks, empty-ish strings. Decided by
/// the value's shape (a whole template expression, an embedded reference
/// such as `${NAME}`, a mask run, a documentation word) and never by its
/// first character: a random key may well start with `%`, `@` or `*`, or
/// contain `%s`.
pub fn is_placeholder(secret: &[u8]) -> bool {
    let s = String::from_utf8_lossy(secret).to_ascii_lowercase();
    let t = s.trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace());
    if t.is_empty() || is_template(t) || contains_reference(t) || looks_like_path(t) {
        return true;
    }
    // Elided: `sk-ant-...`, `AKIA…`.
    if t.ends_with("...") || t.contains('…') {
        return true;
    }
    if PLACEHOLDER_WORDS.iter().any(|w| t.contains(w)) || MASK_RUNS.iter().any(|w| t.contains(w)) {
        return true;
    }
    if PLACEHOLDER_VALUES.contains(&t) {
        return true;
    }
    if t.ends_with("here") {
        return true;
    }
    let mut distinct: Vec<char> = t.chars().collect();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() <= 2 {
        return true;
    }
    // Environment-variable style names: `DB_PASSWORD`, `REPLACE_ME`.
    let raw = String::from_utf8_lossy(secret);
    raw.contains('_')
        && raw
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// A reference to a file holding the secret: `/run/secrets/db`,
/// `./db.pass`, `~/.pgpass`, `file:/etc/app/key`. Absolute paths need two
/// components of file-name characters (a base64 value has `+`, `=`, and
/// rarely such shape).
fn looks_like_path(t: &str) -> bool {
    let rest = t.strip_prefix("file:").unwrap_or(t);
    let (rel, min) = if let Some(r) = rest.strip_prefix("~/").or_else(|| rest.strip_prefix("./")) {
        (r, 1)
    } else if let Some(r) = rest.strip_prefix("../") {
        (r, 1)
    } else if let Some(r) = rest.strip_prefix('/') {
        (r, 2)
    } else {
        return false;
    };
    let parts: Vec<&str> = rel.split('/').collect();
    parts.len() >= min
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ' '))
}

/// The whole value is one template expression or variable reference:
/// `$NAME`, `${NAME}`, `$(cmd)`, `{{ name }}`, `<name>`, `%(name)s`,
/// `%NAME%`, `@NAME@`, `#{name}`, `<%= name %>`, `[name]`.
fn is_template(t: &str) -> bool {
    let inner = |open: &str, close: &str| {
        t.strip_prefix(open)
            .and_then(|r| r.strip_suffix(close))
            .map(str::trim)
    };
    if let Some(name) = t.strip_prefix('$')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return true;
    }
    // A shell expansion cut off at a space: `$(cat /run/secrets/db)`
    // seen as `$(cat`, `${DB_PASS:-x}` as `${DB_PASS:-x}`. The word after
    // `$`, `$(` or `${` is a name (letters and `_`), not random characters.
    let after = [("$(", &[')'][..]), ("${", &['}', ':']), ("$", &['/', ':'])]
        .into_iter()
        .find_map(|(p, tails)| t.strip_prefix(p).map(|r| (r, tails)));
    if let Some((rest, tails)) = after {
        let word = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(rest, |i| &rest[..i]);
        let tail = &rest[word.len()..];
        if word.len() >= 2
            && word.chars().all(|c| c.is_ascii_alphabetic() || c == '_')
            && (tail.is_empty() || tail.starts_with(tails))
        {
            return true;
        }
    }
    // Expansions and template tags: whatever they enclose is evaluated.
    if [
        ("${", "}"),
        ("$(", ")"),
        ("{{", "}}"),
        ("<%", "%>"),
        ("{%", "%}"),
    ]
    .iter()
    .any(|(o, c)| inner(o, c).is_some_and(|n| !n.is_empty()))
    {
        return true;
    }
    [
        ("<", ">"),
        ("%(", ")s"),
        ("%", "%"),
        ("@", "@"),
        ("#{", "}"),
        ("[", "]"),
        ("{", "}"),
    ]
    .iter()
    .any(|(o, c)| inner(o, c).is_some_and(|n| is_name(n) || n.contains('|') || n.contains(':')))
}

/// An embedded reference to a variable: `postgres://u:${DB_PASS}@db`,
/// `{{ vault_token }}`, `%(password)s`. A random value holding `%s` or `$(`
/// is not one: the reference must enclose a name.
fn contains_reference(t: &str) -> bool {
    for (open, close) in [
        ("${", "}"),
        ("{{", "}}"),
        ("#{", "}"),
        ("%(", ")s"),
        ("<%", "%>"),
    ] {
        let mut rest = t;
        while let Some(i) = rest.find(open) {
            let after = &rest[i + open.len()..];
            if let Some(j) = after.find(close)
                && is_name(after[..j].trim())
            {
                return true;
            }
            rest = after;
        }
    }
    // `<token>`, `<your-api-key>`: a word of four or more letters (a
    // random value with `<` and `>` rarely encloses one).
    t.split('<').skip(1).any(|r| {
        r.split_once('>').is_some_and(|(w, _)| {
            w.len() >= 4
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || matches!(c, '-' | '_'))
        })
    })
}

/// A "key" of 32 or more characters with no `_`, `.` or `-` is not a name
/// anybody writes: it is a run of encoded data, such as the base64 blob of
/// an OpenSSH public key, that happens to hold a credential word
/// (`...PwD...`) and to end in `=` padding.
fn looks_encoded(key: &[u8]) -> bool {
    key.len() >= 32 && !key.iter().any(|b| matches!(*b, b'_' | b'.' | b'-'))
}

/// `self.password`, `get_token`, `os.environ`: code, not a value.
fn looks_like_identifier(secret: &[u8]) -> bool {
    let s = secret;
    let lower_ident = s
        .iter()
        .all(|b| b.is_ascii_lowercase() || *b == b'_' || *b == b'.');
    let camel_ident = s
        .iter()
        .all(|b| b.is_ascii_alphabetic() || *b == b'.' || *b == b'_')
        && s.contains(&b'.');
    (lower_ident && s.iter().any(|b| matches!(*b, b'_' | b'.' | b'-')))
        || camel_ident
        || dotted_name(s)
}

/// `getpass(prompt)`, `get_token(request)`: a name of three or more
/// characters, then names in parentheses to the end.
fn looks_like_call(s: &[u8]) -> bool {
    let name = s
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(*b, b'_' | b'.')))
        .unwrap_or(s.len());
    let Some(args) = s
        .get(name..)
        .and_then(|r| r.strip_prefix(b"("))
        .and_then(|r| r.strip_suffix(b")"))
    else {
        return false;
    };
    name >= 3
        && s[0].is_ascii_alphabetic()
        && args
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(*b, b'_' | b'.' | b','))
}

/// `passwd.hashed-password.root`, `db.password-file`: two or more
/// dot-separated words (letters joined by `-` or `_`, digits only at a
/// word's end), the shape of a credential's name in systemd's
/// `LoadCredential=` and of configuration keys, never of a random value.
fn dotted_name(s: &[u8]) -> bool {
    let mut words = 0;
    for word in s.split(|b| *b == b'.') {
        let letters_end = word
            .iter()
            .position(|b| !(b.is_ascii_alphabetic() || matches!(*b, b'-' | b'_')))
            .unwrap_or(word.len());
        let (letters, digits) = word.split_at(letters_end);
        if !letters.first().is_some_and(u8::is_ascii_alphabetic)
            || !digits.iter().all(u8::is_ascii_digit)
            || letters
                .windows(2)
                .any(|w| !w[0].is_ascii_alphabetic() && !w[1].is_ascii_alphabetic())
        {
            return false;
        }
        words += 1;
    }
    words >= 2
}

fn b64_decode(text: &[u8], url: bool) -> Option<Vec<u8>> {
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    let engine = if url {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
    } else {
        base64::engine::general_purpose::STANDARD_NO_PAD
    };
    // Trailing bits that do not form a byte are dropped rather than refused.
    let usable = clean.len() - clean.len() % 4;
    let mut out = engine.decode(&clean[..usable]).ok()?;
    if clean.len() % 4 >= 2
        && let Ok(tail) = engine.decode(&clean[usable..])
    {
        out.extend(tail);
    }
    Some(out)
}

/// The cipher named in an OpenSSH private key body, if it parses that far.
fn openssh_cipher(body: &[u8]) -> Option<String> {
    let clean: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .take(64)
        .collect();
    let raw = b64_decode(&clean, false)?;
    let rest = raw.strip_prefix(b"openssh-key-v1\0")?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let name = rest.get(4..4 + len)?;
    Some(String::from_utf8_lossy(name).into_owned())
}

fn validate(v: Validator, secret: &[u8], whole: &[u8]) -> bool {
    match v {
        Validator::Base64Userpass => b64_decode(secret, false)
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|s| s.split_once(':').map(|(_, p)| p.to_owned()))
            .is_some_and(|p| !p.is_empty() && !is_placeholder(p.as_bytes())),
        Validator::Base64PrivateKey => b64_decode(secret, false)
            .is_some_and(|d| memchr::memmem::find(&d, b"PRIVATE KEY-----").is_some()),
        Validator::OpensshUnencrypted => openssh_cipher(secret).as_deref() == Some("none"),
        Validator::EncryptedKey => {
            if whole.starts_with(b"-----BEGIN OPENSSH") {
                openssh_cipher(secret).is_some_and(|c| c != "none")
            } else {
                true
            }
        }
        Validator::Jwt => {
            let header = secret.split(|b| *b == b'.').next().unwrap_or_default();
            b64_decode(header, true).is_some_and(|h| {
                h.first() == Some(&b'{') && memchr::memmem::find(&h, b"\"alg\"").is_some()
            })
        }
    }
}

/// A few leading characters, then `…`: at most 4, and at most a quarter of
/// the secret, so short passwords reveal almost nothing.
pub fn preview(secret: &[u8]) -> String {
    let text = String::from_utf8_lossy(secret);
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    let shown = (chars.len() / 4).min(4);
    let mut out: String = chars[..shown]
        .iter()
        .map(|c| if c.is_control() { '?' } else { *c })
        .collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_masks_most_of_the_secret() {
        assert_eq!(preview(b"AKIAQ3EGUJH5RZTVD6WN"), "AKIA…");
        assert_eq!(preview(b"hunter2"), "h…");
        assert_eq!(preview(b"abc"), "…");
    }

    #[test]
    fn placeholders() {
        for p in [
            "changeme",
            "${DB_PASSWORD}",
            "{{ vault_token }}",
            "<your-api-key>",
            "your-secret-here",
            "",
            "xxxxxxxx",
            "AKIAIOSFODNN7EXAMPLE",
            "DB_PASSWORD",
        ] {
            assert!(is_placeholder(p.as_bytes()), "{p}");
        }
        for s in ["Kq2ZtW9xLm4VbN8c", "Sup3r-S3cret-Passw0rd!"] {
            assert!(!is_placeholder(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn dotted_names_are_not_values() {
        for n in [
            "passwd.hashed-password.root",
            "db.password-file",
            "a.b",
            "tls.key2",
        ] {
            assert!(dotted_name(n.as_bytes()), "{n}");
            assert!(looks_like_identifier(n.as_bytes()), "{n}");
        }
        for v in [
            "Kq2ZtW9x.Lm4VbN8c",
            "abc",
            "a..b",
            ".a.b",
            "x9y.z",
            "Sup3r.S3cret",
        ] {
            assert!(!dotted_name(v.as_bytes()), "{v}");
        }
    }

    #[test]
    fn placeholders_by_shape_not_first_character() {
        for p in [
            "%(db_password)s",
            "@DB_PASSWORD@",
            "%DB_PASSWORD%",
            "$DB_PASSWORD",
            "postgres://app:${DB_PASS}@db/app",
            "********",
            "<%= @password %>",
            "[secret]",
        ] {
            assert!(is_placeholder(p.as_bytes()), "{p}");
        }
        for s in [
            "%k2#zq9&vbn8-c!x3w^t1m+r",
            "@9vK2m!qz#7x^tR4&bw-1nL",
            "*j4!m9x^2qz#kv8&t-1bwr7",
            "a8%sK2vb#9qz!x4^mt-7w&n",
            "$(k2x9!vq4#zm^8t&b-1w",
        ] {
            assert!(!is_placeholder(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn entropy() {
        assert!(shannon_entropy(b"aaaaaaaa") < 0.1);
        assert!(shannon_entropy(b"Kq2ZtW9xLm4VbN8c") > 3.5);
    }

    #[test]
    fn binary_sniff() {
        assert!(looks_binary(b"\x7fELF\0\0"));
        assert!(!looks_binary(b"plain text\n"));
    }
}
