//! A stand-in for AWS's identity signing: an RSA-2048 key with a self-signed
//! certificate that signs instance identity documents as PKCS#7 SignedData,
//! the way IMDS serves them at `/latest/dynamic/instance-identity/rsa2048`.

use std::path::{Path, PathBuf};

use cms::{
    builder::{SignedDataBuilder, SignerInfoBuilder},
    cert::IssuerAndSerialNumber,
    signed_data::{EncapsulatedContentInfo, SignerIdentifier},
};
use der::{Any, Decode, Encode, Tag, asn1::ObjectIdentifier, pem::LineEnding};
use rsa::{
    RsaPrivateKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey},
};
use sha2::Sha256;
use spki::AlgorithmIdentifierOwned;

const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");

/// An identity-signing key and its certificate.
pub struct SigningKey {
    key: RsaPrivateKey,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl SigningKey {
    /// A fresh RSA-2048 key and a self-signed certificate for it.
    pub fn generate(common_name: &str) -> anyhow::Result<Self> {
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
        Self::from_key(key, common_name)
    }

    fn from_key(key: RsaPrivateKey, common_name: &str) -> anyhow::Result<Self> {
        let pkcs8 = key.to_pkcs8_pem(LineEnding::LF)?;
        let kp = rcgen::KeyPair::from_pem_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365 * 50);
        let cert = params.self_signed(&kp)?;
        Ok(SigningKey {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
        })
    }

    /// Writes `STEM.pem` (certificate) and `STEM.key` (PKCS#8) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        std::fs::write(&key, self.key.to_pkcs8_pem(LineEnding::LF)?.as_bytes())?;
        Ok((cert, key))
    }

    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Self> {
        let key = RsaPrivateKey::from_pkcs8_pem(&std::fs::read_to_string(key)?)?;
        let pem = std::fs::read_to_string(cert)?;
        let (_, der) = der::pem::decode_vec(pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
        Ok(SigningKey {
            key,
            cert_der: der,
            cert_pem: pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// PKCS#7 SignedData (DER) over `document`, with the document attached.
    pub fn sign(&self, document: &[u8]) -> anyhow::Result<Vec<u8>> {
        let cert = x509_cert::Certificate::from_der(&self.cert_der)?;
        let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        });
        let content = EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: Some(Any::new(Tag::OctetString, document.to_vec())?),
        };
        let digest = AlgorithmIdentifierOwned {
            oid: ID_SHA256,
            parameters: None,
        };
        let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(self.key.clone());
        let info = SignerInfoBuilder::new(&signer, sid, digest.clone(), &content, None)
            .map_err(|e| anyhow::anyhow!("signer info: {e}"))?;
        let signed = SignedDataBuilder::new(&content)
            .add_digest_algorithm(digest)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .add_signer_info::<_, rsa::pkcs1v15::Signature>(info)
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(signed.to_der()?)
    }
}

/// An instance identity document shaped like the one EC2 serves.
pub fn document(instance_id: &str, region: &str, account_id: &str) -> Vec<u8> {
    let doc = serde_json::json!({
        "accountId": account_id,
        "architecture": "x86_64",
        "availabilityZone": format!("{region}a"),
        "imageId": "ami-0123456789abcdef0",
        "instanceId": instance_id,
        "instanceType": "t3.micro",
        "pendingTime": "2026-11-28T10:00:00Z",
        "privateIp": "10.0.0.10",
        "region": region,
        "version": "2017-09-30"
    });
    serde_json::to_vec_pretty(&doc).unwrap_or_default()
}
