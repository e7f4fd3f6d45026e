//! IMDSv2 client: the signed instance identity document.
//!
//! Token flow only (PUT `/latest/api/token`, then GETs with the token); there
//! is deliberately no IMDSv1 fallback, since an unauthenticated GET is what
//! SSRF attacks against instance metadata rely on.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const TOKEN_PATH: &str = "/latest/api/token";
const DOCUMENT_PATH: &str = "/latest/dynamic/instance-identity/document";
const RSA2048_PATH: &str = "/latest/dynamic/instance-identity/rsa2048";
const TOKEN_TTL_SECS: &str = "300";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS endpoint {0:?} is not a valid http:// URL")]
    Endpoint(String),
    #[error("IMDS {path}: {source}")]
    Io {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("IMDS {path}: HTTP error: {message}")]
    Http { path: &'static str, message: String },
    #[error("IMDS {path}: status {status}")]
    Status {
        path: &'static str,
        status: StatusCode,
    },
    #[error("IMDS {path}: timed out after {REQUEST_TIMEOUT:?}")]
    Timeout { path: &'static str },
    #[error("IMDS rsa2048 signature is not base64: {0}")]
    Signature(base64::DecodeError),
}

/// The instance identity document and its PKCS#7 signature.
#[derive(Debug, Clone)]
pub struct SignedIdentity {
    pub document: Vec<u8>,
    pub pkcs7_der: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Imds {
    authority: String,
}

impl Imds {
    pub fn new(endpoint: &str) -> Result<Self, ImdsError> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| ImdsError::Endpoint(endpoint.to_owned()))?;
        if uri.scheme_str() != Some("http") {
            return Err(ImdsError::Endpoint(endpoint.to_owned()));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| ImdsError::Endpoint(endpoint.to_owned()))?;
        let authority = if authority.port().is_some() {
            authority.to_string()
        } else {
            format!("{}:80", authority.host())
        };
        Ok(Imds { authority })
    }

    /// Fetches a session token, then the document and its rsa2048 signature.
    pub async fn signed_identity(&self) -> Result<SignedIdentity, ImdsError> {
        let token = self
            .request(
                Method::PUT,
                TOKEN_PATH,
                ("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS),
            )
            .await?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let document = self
            .request(
                Method::GET,
                DOCUMENT_PATH,
                ("x-aws-ec2-metadata-token", &token),
            )
            .await?;
        let signature = self
            .request(
                Method::GET,
                RSA2048_PATH,
                ("x-aws-ec2-metadata-token", &token),
            )
            .await?;
        Ok(SignedIdentity {
            document: document.to_vec(),
            pkcs7_der: decode_pkcs7(&signature)?,
        })
    }

    async fn request(
        &self,
        method: Method,
        path: &'static str,
        header: (&str, &str),
    ) -> Result<Bytes, ImdsError> {
        let fut = async {
            let tcp = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|source| ImdsError::Io { path, source })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| http_error(path, e))?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, &self.authority)
                .header(header.0, header.1)
                .body(Empty::<Bytes>::new())
                .map_err(|e| ImdsError::Http {
                    path,
                    message: e.to_string(),
                })?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http_error(path, e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(ImdsError::Status { path, status });
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http_error(path, e))?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ImdsError::Timeout { path })?
    }
}

fn http_error(path: &'static str, e: hyper::Error) -> ImdsError {
    ImdsError::Http {
        path,
        message: e.to_string(),
    }
}

/// IMDS serves the PKCS#7 as bare base64 lines; tolerate PEM armour too.
pub fn decode_pkcs7(text: &[u8]) -> Result<Vec<u8>, ImdsError> {
    let text = String::from_utf8_lossy(text);
    let b64: String = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(ImdsError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkcs7_decodes_with_or_without_armour() {
        let bare = b"MIIB\nAAAA\n";
        let armoured = b"-----BEGIN PKCS7-----\nMIIB\nAAAA\n-----END PKCS7-----\n";
        assert_eq!(decode_pkcs7(bare).unwrap(), decode_pkcs7(armoured).unwrap());
        assert!(decode_pkcs7(b"not base64!").is_err());
    }

    #[test]
    fn endpoint_must_be_plain_http() {
        assert!(Imds::new("https://169.254.169.254").is_err());
        assert_eq!(
            Imds::new("http://169.254.169.254").unwrap().authority,
            "169.254.169.254:80"
        );
        assert_eq!(
            Imds::new("http://127.0.0.1:8080/").unwrap().authority,
            "127.0.0.1:8080"
        );
    }
}
