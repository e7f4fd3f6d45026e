//! Loading TOML configuration strictly: unknown keys and bad values are
//! errors that name the file and the key, so a typo never silently falls back
//! to a default.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that cannot be used. Binaries exit with code 2 on it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        /// Dotted path of the offending key (`.` for the document itself).
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// An error about one key, raised by validation after parsing.
    pub fn invalid(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// Reads and parses `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses `text` (read from `path`, which is used in messages only).
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        key: ".".to_owned(),
        message: one_line(&e.to_string()),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: one_line(&e.into_inner().to_string()),
        }
    })
}

/// toml renders errors over several lines with a source excerpt; keep the
/// message itself and the line number.
fn one_line(msg: &str) -> String {
    let mut location = None;
    let mut last = "";
    for line in msg.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("TOML parse error at ") {
            location = Some(rest.to_owned());
        } else if !line.is_empty()
            && !line.starts_with('|')
            && !line.chars().next().is_some_and(|c| c.is_ascii_digit())
        {
            last = line;
        }
    }
    match location {
        Some(loc) => format!("{last} ({loc})"),
        None => last.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        name: String,
        inner: Inner,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        port: u16,
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse::<Conf>(Path::new("c.toml"), "name='x'\n[inner]\nport=1\nbogus=2\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml: inner.bogus: unknown field `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn bad_value_is_named() {
        let e = parse::<Conf>(Path::new("c.toml"), "name='x'\n[inner]\nport=70000\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml: inner.port: "), "{e}");
    }

    #[test]
    fn syntax_error_has_line() {
        let e = parse::<Conf>(Path::new("c.toml"), "name='x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
