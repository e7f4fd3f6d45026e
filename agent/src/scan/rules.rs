//! Secret rules as data: the TOML files under `rules/` are embedded in the
//! binary, parsed and compiled once. Each rule carries its own examples and
//! negative examples; `tests` and `amiprep-agent rules check` check them all.
//!
//! The rule files hold example credentials, so they are embedded masked
//! (every byte XORed with [`MASK`] at compile time) and unmasked only when
//! loaded: no byte sequence of the shipped binary is one of its own
//! examples, and a scan of a host with the agent installed does not report
//! the agent.

use std::sync::OnceLock;

use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

/// The rule files, in priority order: when two rules report overlapping
/// text, the one listed first wins (specific formats before generic ones).
const RULE_FILES: &[(&str, &[u8])] = &[
    ("keys.toml", &mask(include_bytes!("rules/keys.toml"))),
    ("cloud.toml", &mask(include_bytes!("rules/cloud.toml"))),
    ("tokens.toml", &mask(include_bytes!("rules/tokens.toml"))),
    ("files.toml", &mask(include_bytes!("rules/files.toml"))),
    ("generic.toml", &mask(include_bytes!("rules/generic.toml"))),
];

/// Every ASCII letter and digit masks to a control or punctuation byte, so
/// a masked rule file holds no run of credential-alphabet bytes.
const MASK: u8 = 0x5a;

/// Runs at compile time: only the masked copy is emitted into the binary.
const fn mask<const N: usize>(src: &[u8; N]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = src[i] ^ MASK;
        i += 1;
    }
    out
}

fn unmask(masked: &[u8]) -> Vec<u8> {
    masked.iter().map(|b| b ^ MASK).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

/// Structural checks a regex cannot express.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Validator {
    /// Base64 that decodes to `user:password` with a non-empty password.
    Base64Userpass,
    /// Base64 that decodes to a PEM private key.
    Base64PrivateKey,
    /// An OpenSSH key body whose cipher is `none`.
    OpensshUnencrypted,
    /// An encrypted key; for OpenSSH bodies the cipher must not be `none`.
    EncryptedKey,
    /// A JWT whose header decodes to JSON naming an `alg`.
    Jwt,
}

/// One rule as written in a rule file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub id: String,
    pub name: String,
    pub severity: Severity,
    pub pattern: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Regex over `/` + the path beneath the root; the rule applies only there.
    #[serde(default)]
    pub path: Option<String>,
    /// Shannon entropy (bits per byte) the secret must reach.
    #[serde(default)]
    pub min_entropy: Option<f64>,
    /// Also applies to binary files (only for high-specificity formats).
    #[serde(default)]
    pub binary: bool,
    /// The pattern spans lines (key blocks): run it over the whole file
    /// rather than around each keyword's line.
    #[serde(default)]
    pub multiline: bool,
    #[serde(default)]
    pub validate: Option<Validator>,
    /// Key words that make a `key` capture a property, not a secret.
    #[serde(default)]
    pub deny_key: Vec<String>,
    /// Published, known-harmless values (documentation keys).
    #[serde(default)]
    pub allow: Vec<String>,
    pub examples: Vec<String>,
    pub negative_examples: Vec<String>,
    /// Path the examples are checked at, for rules restricted by `path`.
    #[serde(default)]
    pub example_path: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    rules: Vec<RuleSpec>,
}

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    pub regex: Regex,
    pub path: Option<Regex>,
    /// Index of the capture group named `secret`, if any.
    secret_group: Option<usize>,
    key_group: Option<usize>,
    source: &'static str,
}

impl Rule {
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Keywords are matched ignoring ASCII case when the pattern does.
    pub fn case_insensitive(&self) -> bool {
        self.spec.pattern.contains("(?i")
    }

    /// Which rule file the rule came from.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// The byte range of the secret in a match: the `secret` group if it
    /// took part, else the first group that did, else the whole match.
    pub fn secret_range(&self, caps: &regex::bytes::Captures<'_>) -> (usize, usize) {
        if let Some(m) = self.secret_group.and_then(|i| caps.get(i)) {
            return (m.start(), m.end());
        }
        if let Some(m) = caps.iter().skip(1).flatten().next() {
            return (m.start(), m.end());
        }
        // Group 0 always takes part in a match.
        caps.get(0).map_or((0, 0), |m| (m.start(), m.end()))
    }

    pub fn key<'h>(&self, caps: &regex::bytes::Captures<'h>) -> Option<&'h [u8]> {
        self.key_group
            .and_then(|i| caps.get(i))
            .map(|m| m.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("rule file {file}: {source}")]
    Parse {
        file: &'static str,
        source: toml::de::Error,
    },
    #[error("rule {id}: bad {what}: {source}")]
    Regex {
        id: String,
        what: &'static str,
        source: regex::Error,
    },
    #[error("rule {id}: {problem}")]
    Invalid { id: String, problem: &'static str },
}

/// Parse and compile every embedded rule.
pub fn load_builtin() -> Result<Vec<Rule>, RuleError> {
    let mut rules: Vec<Rule> = Vec::new();
    for (file, masked) in RULE_FILES {
        let text = String::from_utf8(unmask(masked)).map_err(|_| RuleError::Invalid {
            id: (*file).to_owned(),
            problem: "rule file is not UTF-8",
        })?;
        let parsed: RuleFile =
            toml::from_str(&text).map_err(|source| RuleError::Parse { file, source })?;
        for spec in parsed.rules {
            if rules.iter().any(|r| r.spec.id == spec.id) {
                return Err(RuleError::Invalid {
                    id: spec.id,
                    problem: "duplicate id",
                });
            }
            if spec.keywords.is_empty() && spec.path.is_none() {
                return Err(RuleError::Invalid {
                    id: spec.id,
                    problem: "a rule without keywords must be restricted by path",
                });
            }
            if spec.keywords.iter().any(|k| k.len() < 3) {
                return Err(RuleError::Invalid {
                    id: spec.id,
                    problem: "keywords must be at least 3 bytes",
                });
            }
            let regex = regex::bytes::RegexBuilder::new(&spec.pattern)
                .size_limit(64 << 20)
                .build()
                .map_err(|source| RuleError::Regex {
                    id: spec.id.clone(),
                    what: "pattern",
                    source,
                })?;
            let path = spec
                .path
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|source| RuleError::Regex {
                    id: spec.id.clone(),
                    what: "path",
                    source,
                })?;
            let names: Vec<Option<&str>> = regex.capture_names().collect();
            let secret_group = names.iter().position(|n| *n == Some("secret"));
            let key_group = names.iter().position(|n| *n == Some("key"));
            rules.push(Rule {
                spec,
                regex,
                path,
                secret_group,
                key_group,
                source: file,
            });
        }
    }
    Ok(rules)
}

/// The embedded rules, compiled once per process.
pub fn builtin() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| match load_builtin() {
        Ok(r) => r,
        // The rule files are compiled into the binary and checked by the
        // tests; a failure here is a build defect, not a runtime condition.
        Err(e) => panic!("embedded secret rules are invalid: {e}"),
    })
}

/// Check every rule against its own examples: each example is reported by
/// its rule and no other, and no negative example is reported at all.
/// Returns one message per failure.
pub fn check(engine: &crate::scan::engine::Engine) -> Vec<String> {
    let rules = engine.rules();
    let id = |h: &crate::scan::engine::Hit| rules[h.rule].id().to_owned();
    let mut failures = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let at = r
            .spec
            .example_path
            .clone()
            .unwrap_or_else(|| "/etc/app/config".to_owned());
        if r.spec.examples.is_empty() || r.spec.negative_examples.is_empty() {
            failures.push(format!("{}: needs examples and negative examples", r.id()));
        }
        if let Some(p) = &r.path
            && !p.is_match(at.as_bytes())
        {
            failures.push(format!(
                "{}: example_path {at} is outside the rule's path",
                r.id()
            ));
        }
        for (n, ex) in r.spec.examples.iter().enumerate() {
            let hits = engine.scan(&at, ex.as_bytes(), false);
            if !hits.iter().any(|h| h.rule == i) || !hits.iter().all(|h| h.rule == i) {
                let ids: Vec<String> = hits.iter().map(id).collect();
                failures.push(format!("{}: example {} reported as {ids:?}", r.id(), n + 1));
            }
        }
        for (n, ex) in r.spec.negative_examples.iter().enumerate() {
            let hits = engine.scan(&at, ex.as_bytes(), false);
            if !hits.is_empty() {
                let ids: Vec<String> = hits.iter().map(id).collect();
                failures.push(format!(
                    "{}: negative example {} reported as {ids:?}",
                    r.id(),
                    n + 1
                ));
            }
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::engine::Engine;

    fn engine() -> Engine {
        Engine::new(builtin())
    }

    fn path_of(rule: &Rule) -> String {
        rule.spec
            .example_path
            .clone()
            .unwrap_or_else(|| "/etc/app/config".to_owned())
    }

    #[test]
    fn rules_load_and_every_rule_has_examples() {
        let rules = builtin();
        assert!(rules.len() >= 40, "only {} rules", rules.len());
        for r in rules {
            assert!(!r.spec.examples.is_empty(), "{} has no examples", r.id());
            assert!(
                !r.spec.negative_examples.is_empty(),
                "{} has no negative examples",
                r.id()
            );
            if let Some(p) = &r.path {
                let at = path_of(r);
                assert!(p.is_match(at.as_bytes()), "{}: example_path {at}", r.id());
            }
        }
    }

    /// Every example is reported, and only by its own rule (so an
    /// encrypted key is told apart from a plain one); no negative example
    /// is reported by any rule.
    #[test]
    fn examples_and_negative_examples() {
        let failures = check(&engine());
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn key_rules_apply_to_binary_files() {
        let e = engine();
        let key = builtin()
            .iter()
            .find(|r| r.id() == "private-key-openssh")
            .map(|r| r.spec.examples[0].clone())
            .unwrap_or_default();
        let mut data = b"\x7fELF\0\0\0\0".to_vec();
        data.extend_from_slice(key.as_bytes());
        data.extend_from_slice(b"\0password = Kq2ZtW9xLm4VbN8c\0");
        let hits = e.scan("/usr/lib/libx.so", &data, true);
        let ids: Vec<&str> = hits.iter().map(|h| builtin()[h.rule].id()).collect();
        assert_eq!(ids, ["private-key-openssh"]);
    }
}
