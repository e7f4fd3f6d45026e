//! Fingerprint keys: findings are fingerprinted with HMAC-SHA256 under a
//! per-deployment key, so a report or SARIF file cannot be used to confirm a
//! guessed password offline (a plain hash of a short password can).
//!
//! The key never lives in an image: the controller holds it (created with
//! the CA by `amiprep certs init`) and sends it with each request; the agent
//! keeps it in memory for that request only. One-shot `scan` / `prepare`
//! read it from `--fingerprint-key-file` or `AMIPREP_FINGERPRINT_KEY_FILE`.
//! Without one, a random key is made for the run, and fingerprints are then
//! not comparable across runs. A key is known by its id (the first 8 bytes
//! of its SHA-256, hex), which baselines record.

use std::path::Path;

use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

/// The least key length accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// Environment variable naming the key file for one-shot runs.
pub const KEY_FILE_ENV: &str = "AMIPREP_FINGERPRINT_KEY_FILE";

/// What the report says when the key is a random one for this run.
pub const EPHEMERAL_NOTE: &str = "no fingerprint key given (--fingerprint-key-file or \
     AMIPREP_FINGERPRINT_KEY_FILE): fingerprints use a random key for this run and are not \
     comparable across runs";

#[derive(Clone)]
pub struct FingerprintKey {
    key: Vec<u8>,
    id: String,
    ephemeral: bool,
}

/// Never prints the key.
impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FingerprintKey")
            .field("id", &self.id)
            .field("ephemeral", &self.ephemeral)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("fingerprint key is {0} bytes; at least {MIN_KEY_LEN} are needed")]
    TooShort(usize),
    #[error("fingerprint key file {path}: {reason}")]
    File { path: String, reason: String },
}

impl FingerprintKey {
    /// A key from its bytes (as the controller sends it).
    pub fn from_bytes(key: &[u8]) -> Result<FingerprintKey, KeyError> {
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(key.len()));
        }
        Ok(FingerprintKey {
            key: key.to_vec(),
            id: key_id(key),
            ephemeral: false,
        })
    }

    /// A random key for this run only.
    pub fn random() -> FingerprintKey {
        let key: [u8; 32] = rand::random();
        FingerprintKey {
            key: key.to_vec(),
            id: key_id(&key),
            ephemeral: true,
        }
    }

    /// A key file as `amiprep certs init` writes it: the key in hex (at
    /// least 64 digits), surrounding whitespace ignored.
    pub fn from_file(path: &Path) -> Result<FingerprintKey, KeyError> {
        let err = |reason: String| KeyError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let key = hex::decode(text.trim()).map_err(|e| err(format!("not hex ({e})")))?;
        FingerprintKey::from_bytes(&key).map_err(|e| err(e.to_string()))
    }

    /// `--fingerprint-key-file` when given, else a random key for the run.
    pub fn from_file_or_random(path: Option<&Path>) -> Result<FingerprintKey, KeyError> {
        path.map_or_else(|| Ok(FingerprintKey::random()), FingerprintKey::from_file)
    }

    /// First 8 bytes of the key's SHA-256, hex: names the key, reveals nothing.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Made at random for this run: its fingerprints match no other run's.
    pub fn is_ephemeral(&self) -> bool {
        self.ephemeral
    }

    /// HMAC-SHA256 under this key over the rule id, a NUL byte and the
    /// secret with ASCII whitespace removed (a key re-wrapped or with other
    /// line endings keeps its fingerprint), hex.
    pub fn fingerprint(&self, rule_id: &str, secret: &[u8]) -> String {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts any key");
        mac.update(rule_id.as_bytes());
        mac.update(&[0u8]);
        for chunk in secret.split(|b| b.is_ascii_whitespace()) {
            mac.update(chunk);
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_and_ignore_line_wrapping() {
        let a = FingerprintKey::from_bytes(&[7u8; 32]).expect("key");
        let b = FingerprintKey::from_bytes(&[8u8; 32]).expect("key");
        assert_eq!(a.fingerprint("r", b"ab\ncd"), a.fingerprint("r", b"abcd"));
        assert_ne!(a.fingerprint("r", b"abcd"), a.fingerprint("s", b"abcd"));
        assert_ne!(a.fingerprint("r", b"abcd"), b.fingerprint("r", b"abcd"));
        assert_eq!(a.fingerprint("r", b"abcd").len(), 64);
        // Not the unkeyed hash a guess could be checked against.
        let mut plain = Sha256::new();
        plain.update(b"r\0abcd");
        assert_ne!(a.fingerprint("r", b"abcd"), hex::encode(plain.finalize()));
        // HMAC-SHA256 itself, over rule id, NUL, secret.
        let mut mac = Hmac::<Sha256>::new_from_slice(&[7u8; 32]).expect("key");
        mac.update(b"r\0abcd");
        assert_eq!(
            a.fingerprint("r", b"abcd"),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn ids_name_keys_and_random_keys_differ() {
        let a = FingerprintKey::from_bytes(&[7u8; 32]).expect("key");
        assert_eq!(a.id().len(), 16);
        assert_eq!(
            a.id(),
            FingerprintKey::from_bytes(&[7u8; 32]).expect("key").id()
        );
        let (r1, r2) = (FingerprintKey::random(), FingerprintKey::random());
        assert!(r1.is_ephemeral() && !a.is_ephemeral());
        assert_ne!(r1.id(), r2.id());
        assert_ne!(r1.fingerprint("r", b"x"), r2.fingerprint("r", b"x"));
        assert!(!format!("{a:?}").contains("0707"));
    }

    #[test]
    fn key_files_are_hex_of_at_least_32_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("k");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).expect("write");
        let k = FingerprintKey::from_file(&good).expect("key");
        assert_eq!(
            k.id(),
            FingerprintKey::from_bytes(&[0xab; 32]).expect("key").id()
        );
        std::fs::write(&good, "ab".repeat(16)).expect("write");
        assert!(FingerprintKey::from_file(&good).is_err());
        std::fs::write(
            &good,
            "not hex at all, not hex at all, not hex at all, not hex",
        )
        .expect("write");
        assert!(FingerprintKey::from_file(&good).is_err());
        assert!(FingerprintKey::from_file(&dir.path().join("missing")).is_err());
    }
}
