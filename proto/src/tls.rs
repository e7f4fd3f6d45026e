//! Loading PEM certificates and keys, checking their validity window, and the
//! rustls configurations for both ends of an amiprep connection.
//!
//! Both ends insist on TLS 1.3 and on a peer certificate chained to the
//! amiprep CA. The crypto provider is set explicitly (ring) so the build never
//! pulls in a second one.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use der::Decode;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, crypto::CryptoProvider, server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

/// ALPN protocol for gRPC over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM private key ({reason})")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: certificate cannot be parsed: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: certificate expired on {not_after} (subject {subject})")]
    Expired {
        path: PathBuf,
        subject: String,
        not_after: String,
    },
    #[error(
        "{path}: certificate is not valid until {not_before} (subject {subject}); check the clock"
    )]
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The files one end of a connection presents and trusts.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM bundle of CA certificates the peer must chain to.
    pub ca: PathBuf,
    /// This end's certificate (PEM), optionally followed by intermediates.
    pub cert: PathBuf,
    /// This end's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// The crypto provider amiprep uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate in a PEM file and refuses expired or
/// not-yet-valid ones.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    let now = SystemTime::now();
    for cert in &certs {
        check_validity(path, cert, now)?;
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::BadKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Validity window of a certificate.
#[derive(Debug, Clone)]
pub struct Validity {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Parses the subject and validity window of a DER certificate.
pub fn validity(path: &Path, cert: &CertificateDer<'_>) -> Result<Validity, TlsError> {
    let parsed =
        x509_cert::Certificate::from_der(cert.as_ref()).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let v = &parsed.tbs_certificate.validity;
    Ok(Validity {
        subject: parsed.tbs_certificate.subject.to_string(),
        not_before: v.not_before.to_system_time(),
        not_after: v.not_after.to_system_time(),
    })
}

/// Refuses a certificate outside its validity window at `now`.
pub fn check_validity(
    path: &Path,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<(), TlsError> {
    let v = validity(path, cert)?;
    if now > v.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            subject: v.subject,
            not_after: rfc3339(v.not_after),
        });
    }
    if now < v.not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            subject: v.subject,
            not_before: rfc3339(v.not_before),
        });
    }
    Ok(())
}

/// Formats a time as RFC 3339 (UTC), for messages.
pub fn rfc3339(t: SystemTime) -> String {
    // Fixed millisecond precision keeps columns aligned in listings.
    const FORMAT: &[time::format_description::FormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    let t = time::OffsetDateTime::from(t);
    t.format(FORMAT).unwrap_or_else(|_| format!("{t}"))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store
            .add(cert)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

/// Server side: TLS 1.3 only, client certificate required and chained to `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Client side: TLS 1.3 only, presenting `files.cert`, trusting only `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Parses the name a client checks the server certificate against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned())
        .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))
}

/// Subject of the first certificate of a peer chain, for display.
pub fn peer_subject(chain: &[CertificateDer<'_>]) -> Option<String> {
    let first = chain.first()?;
    x509_cert::Certificate::from_der(first.as_ref())
        .ok()
        .map(|c| c.tbs_certificate.subject.to_string())
}

/// Opens a gRPC channel to `addr` (`host:port`) over TLS 1.3 with `config`,
/// checking the server certificate against `server_name`.
///
/// The TLS handshake happens here, in our connector, so both ends use exactly
/// the rustls configuration above rather than tonic's defaults.
pub async fn connect(
    addr: &str,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_owned();
    let service = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The scheme is http because TLS is already done by the connector above.
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector(service)
        .await
}
