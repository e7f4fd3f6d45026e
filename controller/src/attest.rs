//! Verifying an agent's claim to be a particular EC2 instance.
//!
//! The proof is the instance identity document with its PKCS#7 signature
//! (IMDS `rsa2048`: CMS SignedData, RSA-2048 with SHA-256). We check the
//! signature against the AWS certificates named in the configuration, then
//! take the instance id, region and account from the *signed* content — never
//! from the unsigned copy the agent also sends.

use std::path::{Path, PathBuf};

use cms::{content_info::ContentInfo, signed_data::SignedData};
use der::{
    Decode, Encode,
    asn1::{ObjectIdentifier, OctetString},
};
use rsa::{RsaPublicKey, pkcs1v15, pkcs8::DecodePublicKey};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use signature::Verifier;

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestError {
    #[error("identity signature is not PKCS#7 SignedData: {0}")]
    Malformed(String),
    #[error("identity signature uses {0}, only SHA-256 is accepted")]
    Digest(String),
    #[error("identity document digest does not match its signature")]
    DigestMismatch,
    #[error("identity document signature does not verify against any configured AWS certificate")]
    BadSignature,
    #[error("identity document is not valid JSON: {0}")]
    Document(String),
    #[error("identity document is for {document}, but the agent claims {claimed}")]
    WrongInstance { claimed: String, document: String },
    #[error("the signed document differs from the document the agent sent")]
    DocumentMismatch,
}

/// The fields of an instance identity document amiprep relies on.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
    #[serde(default)]
    pub image_id: Option<String>,
    #[serde(default)]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub availability_zone: Option<String>,
}

/// Public keys of the AWS certificates that sign identity documents.
#[derive(Debug, Clone, Default)]
pub struct DocumentVerifier {
    keys: Vec<(PathBuf, RsaPublicKey)>,
}

/// Loads every certificate in the given PEM files. Validity dates are not
/// checked: AWS documents verifying with these certificates as plain keys.
pub fn load_aws_certificates(paths: &[PathBuf]) -> anyhow::Result<DocumentVerifier> {
    let mut keys = Vec::new();
    for path in paths {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            keys.push((path.clone(), rsa_key(path, &cert)?));
            found += 1;
        }
        if found == 0 {
            anyhow::bail!("{}: no PEM certificate found", path.display());
        }
    }
    Ok(DocumentVerifier { keys })
}

fn rsa_key(path: &Path, cert: &CertificateDer<'_>) -> anyhow::Result<RsaPublicKey> {
    let parsed = x509_cert::Certificate::from_der(cert.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: certificate cannot be parsed: {e}", path.display()))?;
    let spki = parsed
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    RsaPublicKey::from_public_key_der(&spki)
        .map_err(|e| anyhow::anyhow!("{}: not an RSA certificate: {e}", path.display()))
}

impl DocumentVerifier {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies `pkcs7_der`, checks it signs `document` and that the document
    /// names `claimed_instance`; returns the signed document.
    pub fn verify(
        &self,
        claimed_instance: &str,
        document: &[u8],
        pkcs7_der: &[u8],
    ) -> Result<IdentityDocument, AttestError> {
        let content = self.signed_content(pkcs7_der)?;
        if content.trim_ascii() != document.trim_ascii() {
            return Err(AttestError::DocumentMismatch);
        }
        let doc: IdentityDocument =
            serde_json::from_slice(&content).map_err(|e| AttestError::Document(e.to_string()))?;
        if doc.instance_id != claimed_instance {
            return Err(AttestError::WrongInstance {
                claimed: claimed_instance.to_owned(),
                document: doc.instance_id,
            });
        }
        Ok(doc)
    }

    /// The encapsulated content of a SignedData whose signature verifies
    /// against one of our keys.
    fn signed_content(&self, pkcs7_der: &[u8]) -> Result<Vec<u8>, AttestError> {
        let malformed = |e: der::Error| AttestError::Malformed(e.to_string());
        let info = ContentInfo::from_der(pkcs7_der).map_err(malformed)?;
        if info.content_type != ID_SIGNED_DATA {
            return Err(AttestError::Malformed(format!(
                "content type {}",
                info.content_type
            )));
        }
        let sd: SignedData = info.content.decode_as().map_err(malformed)?;
        if sd.encap_content_info.econtent_type != ID_DATA {
            return Err(AttestError::Malformed("content is not id-data".into()));
        }
        let content = sd
            .encap_content_info
            .econtent
            .as_ref()
            .ok_or_else(|| AttestError::Malformed("no encapsulated content".into()))?
            .decode_as::<OctetString>()
            .map_err(malformed)?
            .into_bytes();
        let content_digest = Sha256::digest(&content);
        for signer in sd.signer_infos.0.iter() {
            if signer.digest_alg.oid != ID_SHA256 {
                return Err(AttestError::Digest(signer.digest_alg.oid.to_string()));
            }
            let signed_bytes = match &signer.signed_attrs {
                Some(attrs) => {
                    let digest = attrs
                        .iter()
                        .find(|a| a.oid == ID_MESSAGE_DIGEST)
                        .and_then(|a| a.values.iter().next())
                        .ok_or_else(|| AttestError::Malformed("no messageDigest".into()))?
                        .decode_as::<OctetString>()
                        .map_err(malformed)?;
                    if digest.as_bytes() != content_digest.as_slice() {
                        return Err(AttestError::DigestMismatch);
                    }
                    // RFC 5652 5.4: the signature covers the DER of the
                    // attributes as an explicit SET OF.
                    attrs.to_der().map_err(malformed)?
                }
                None => content.clone(),
            };
            let Ok(sig) = pkcs1v15::Signature::try_from(signer.signature.as_bytes()) else {
                continue;
            };
            for (_, key) in &self.keys {
                let vk = pkcs1v15::VerifyingKey::<Sha256>::new(key.clone());
                if vk.verify(&signed_bytes, &sig).is_ok() {
                    return Ok(content);
                }
            }
        }
        Err(AttestError::BadSignature)
    }
}
