//! `amiprep certs`: a private CA for amiprep and the leaf certificates it issues.
//!
//! Kinds are told apart by the subject's organizational unit
//! (`amiprep-controller`, `amiprep-agent`, `amiprep-operator`) and by extended
//! key usage: only a controller certificate may serve, only agent and operator
//! certificates may act as clients. Keys are ECDSA P-256.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// The deployment's fingerprint key: 32 random bytes, hex. It keys the
/// HMAC fingerprints of scan findings; the controller sends it with each
/// request and it is never written to a host.
pub const FINGERPRINT_KEY: &str = "fingerprint.key";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Controller,
    Agent,
    Operator,
}

impl Kind {
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Controller => "amiprep-controller",
            Kind::Agent => "amiprep-agent",
            Kind::Operator => "amiprep-operator",
        }
    }
}

/// Writes `ca.pem`, `ca.key` (0600) and `fingerprint.key` (0600) into
/// `dir`; refuses to overwrite.
pub fn init(dir: &Path, days: u32) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let fp_path = dir.join(FINGERPRINT_KEY);
    for p in [&cert_path, &key_path, &fp_path] {
        if p.exists() {
            bail!("{} already exists; refusing to replace a CA", p.display());
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name("amiprep CA", "amiprep-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let key = KeyPair::generate().context("generating the CA key")?;
    let cert = params.self_signed(&key).context("signing the CA")?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    write_fingerprint_key(&fp_path)?;
    Ok(cert_path)
}

/// Creates a fingerprint key at `path`: 32 random bytes as hex, created
/// with `O_EXCL` and mode 0600 (never replacing a key: baselines name it).
pub fn write_fingerprint_key(path: &Path) -> anyhow::Result<()> {
    let key: [u8; 32] = rand::random();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads a fingerprint key file (hex, at least 32 bytes) into its bytes.
pub fn load_fingerprint_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading fingerprint key {}", path.display()))?;
    let key = hex::decode(text.trim())
        .with_context(|| format!("fingerprint key {}: not hex", path.display()))?;
    anyhow::ensure!(
        key.len() >= 32,
        "fingerprint key {}: {} bytes, at least 32 needed",
        path.display(),
        key.len()
    );
    Ok(key)
}

/// Issues a leaf certificate signed by the CA in `dir`: `NAME.pem`, `NAME.key`.
pub fn issue(
    dir: &Path,
    kind: Kind,
    name_: &str,
    sans: &[String],
    days: u32,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if name_.is_empty()
        || !name_
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name_.starts_with('.')
    {
        bail!("--name {name_:?}: use letters, digits, '-', '_' and '.' (it names the files)");
    }
    // NAME.pem / NAME.key would overwrite the CA's own files.
    if format!("{name_}.pem") == CA_CERT || format!("{name_}.key") == CA_KEY {
        bail!("--name {name_:?} is reserved: it would overwrite the CA certificate and key");
    }
    let ca_cert_path = dir.join(CA_CERT);
    // Refuses an expired or not-yet-valid CA with a message that says so.
    amiprep_proto::tls::load_certs(&ca_cert_path)?;
    let ca_pem = fs::read_to_string(&ca_cert_path)
        .with_context(|| format!("reading {}", ca_cert_path.display()))?;
    let ca_key_path = dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(
        &fs::read_to_string(&ca_key_path)
            .with_context(|| format!("reading {}", ca_key_path.display()))?,
    )
    .with_context(|| format!("{}: not a usable private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .with_context(|| format!("{}: not a usable CA certificate", ca_cert_path.display()))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = name(name_, kind.unit());
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        Kind::Controller => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Kind::Agent | Kind::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let mut alt = vec![san(name_)?];
    for s in sans {
        let s = san(s)?;
        if !alt.contains(&s) {
            alt.push(s);
        }
    }
    params.subject_alt_names = alt;
    validity(&mut params, days);
    let key = KeyPair::generate().context("generating the key")?;
    let cert = params.signed_by(&key, &issuer).context("signing")?;
    let cert_path = dir.join(format!("{name_}.pem"));
    let key_path = dir.join(format!("{name_}.key"));
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok((cert_path, key_path))
}

fn name(cn: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "amiprep");
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, cn);
    dn
}

fn san(s: &str) -> anyhow::Result<SanType> {
    Ok(match s.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(
            s.try_into()
                .with_context(|| format!("--san {s:?} is neither an IP address nor a DNS name"))?,
        ),
    })
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack for hosts whose clocks run slightly behind.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                // Re-issuing replaces the key; keep it 0600 from the first byte.
                fs::remove_file(path)?;
                fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
            } else {
                Err(e)
            }
        })
        .with_context(|| format!("creating {}", path.display()))?;
    // The umask cannot widen 0600, but a pre-set default ACL or odd umask
    // could narrow it oddly; set it explicitly.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        assert!(init(dir.path(), 30).is_err(), "a CA is never replaced");
        let (cert, key) = issue(
            dir.path(),
            Kind::Controller,
            "ctl",
            &["127.0.0.1".into(), "ctl.example".into()],
            10,
        )
        .unwrap();
        for k in [&key, &dir.path().join(CA_KEY)] {
            let mode = fs::metadata(k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        let chain = amiprep_proto::tls::load_certs(&cert).unwrap();
        let subject = amiprep_proto::tls::peer_subject(&chain).unwrap();
        assert!(subject.contains("OU=amiprep-controller"), "{subject}");
        assert!(subject.contains("CN=ctl"), "{subject}");
    }

    #[test]
    fn init_creates_a_private_fingerprint_key_and_never_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        let p = dir.path().join(FINGERPRINT_KEY);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = load_fingerprint_key(&p).unwrap();
        assert_eq!(key.len(), 32);
        assert!(
            write_fingerprint_key(&p).is_err(),
            "O_EXCL: an existing key is kept"
        );
        assert_eq!(load_fingerprint_key(&p).unwrap(), key);
        // A second deployment gets another key.
        let other = tempfile::tempdir().unwrap();
        init(other.path(), 30).unwrap();
        assert_ne!(
            load_fingerprint_key(&other.path().join(FINGERPRINT_KEY)).unwrap(),
            key
        );
        // An existing fingerprint key alone makes init refuse.
        let third = tempfile::tempdir().unwrap();
        write_fingerprint_key(&third.path().join(FINGERPRINT_KEY)).unwrap();
        assert!(init(third.path(), 30).is_err());
        assert!(!third.path().join(CA_KEY).exists());
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), 30).unwrap();
        let ca_before = fs::read(dir.path().join(CA_KEY)).unwrap();
        let e = issue(dir.path(), Kind::Agent, "ca", &[], 1).unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        assert_eq!(fs::read(dir.path().join(CA_KEY)).unwrap(), ca_before);
        for bad in ["", "../x", ".hidden", "a b"] {
            assert!(
                issue(dir.path(), Kind::Agent, bad, &[], 1).is_err(),
                "{bad:?}"
            );
        }
    }
}
