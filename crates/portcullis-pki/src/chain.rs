//! Checks of a certificate before it is served: it parses, its key matches, its chain
//! verifies to the trust bundle, and it is valid now.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::CertifiedKey;

use crate::error::ChainError;
use crate::secret::Secret;

/// A certificate as a source returned it, not yet checked.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The leaf certificate in PEM, possibly followed by intermediates.
    pub certificate_pem: String,
    /// The issuing CA chain in PEM, issuer first. With Vault: `ca_chain`, or `issuing_ca`.
    pub ca_chain_pem: Vec<String>,
    pub private_key_pem: Secret<String>,
    /// The expiry the source reported (Vault's `expiration`), for logs only. The rotator
    /// schedules by the certificate's own notAfter.
    pub reported_expiration: Option<SystemTime>,
}

/// A certificate that passed [`check_certificate`], ready for rustls.
#[derive(Clone)]
pub struct CheckedCertificate {
    pub certified_key: Arc<CertifiedKey>,
    /// Serial number in lowercase hexadecimal, colon-separated as Vault writes it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The CA certificates that came with the leaf (trust anchors for peers).
    pub ca_chain: Vec<CertificateDer<'static>>,
    /// Leaf and intermediates in PEM, for clients that take files (such as librdkafka).
    pub certificate_chain_pem: String,
    pub private_key_pem: Secret<String>,
}

impl std::fmt::Debug for CheckedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckedCertificate")
            .field("serial", &self.serial)
            .field("not_before", &humantime::format_rfc3339_seconds(self.not_before))
            .field("not_after", &humantime::format_rfc3339_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CheckedCertificate {
    /// Returns the certificate's lifetime from notBefore to notAfter.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }
}

/// Checks `issued` against `trust_anchors` at time `now` and returns it ready for rustls.
///
/// The leaf must verify for server authentication, because portcullis presents it to Envoy.
/// The same certificate is also presented as a client certificate to Kafka.
pub fn check_certificate(
    issued: &IssuedCertificate,
    trust_anchors: &[CertificateDer<'static>],
    now: SystemTime,
    provider: &Arc<CryptoProvider>,
) -> Result<CheckedCertificate, ChainError> {
    let chain = parse_certificates(&issued.certificate_pem, "certificate")?;
    let ca_chain = issued
        .ca_chain_pem
        .iter()
        .map(|pem| parse_certificates(pem, "CA chain"))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    let key = PrivateKeyDer::from_pem_slice(issued.private_key_pem.expose().as_bytes())
        .map_err(|error| ChainError::InvalidPem { what: "private key", reason: error.to_string() })?;

    let (not_before, not_after, serial) = validity_and_serial(&chain[0])?;
    if now < not_before {
        return Err(ChainError::NotYetValid { not_before, now });
    }
    if now >= not_after {
        return Err(ChainError::Expired { not_after, now });
    }

    let certified_key = match CertifiedKey::from_der(chain.clone(), key, provider) {
        Ok(certified_key) => certified_key,
        Err(rustls::Error::InconsistentKeys(_)) => return Err(ChainError::KeyMismatch),
        Err(error) => return Err(ChainError::UnusableKey { reason: error.to_string() }),
    };

    verify_chain(&chain, &ca_chain, trust_anchors, now, provider)?;

    Ok(CheckedCertificate {
        certified_key: Arc::new(certified_key),
        serial,
        not_before,
        not_after,
        ca_chain,
        certificate_chain_pem: issued.certificate_pem.clone(),
        private_key_pem: issued.private_key_pem.clone(),
    })
}

/// Parses every certificate in a PEM text and requires at least one.
pub(crate) fn parse_certificates(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, ChainError> {
    let certificates = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ChainError::InvalidPem { what, reason: error.to_string() })?;
    if certificates.is_empty() {
        return Err(ChainError::NoCertificate { what });
    }
    Ok(certificates)
}

/// Reads notBefore, notAfter and the serial number of a DER certificate.
pub(crate) fn validity_and_serial(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime, String), ChainError> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|error| ChainError::InvalidCertificate { what: "leaf", reason: error.to_string() })?;
    let validity = certificate.validity();
    let not_before = unix_seconds_to_time(validity.not_before.timestamp());
    let not_after = unix_seconds_to_time(validity.not_after.timestamp());
    let serial = certificate
        .raw_serial()
        .iter()
        .skip_while(|byte| **byte == 0)
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok((not_before, not_after, serial))
}

fn unix_seconds_to_time(seconds: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(seconds as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

fn verify_chain(
    chain: &[CertificateDer<'static>],
    ca_chain: &[CertificateDer<'static>],
    trust_anchors: &[CertificateDer<'static>],
    now: SystemTime,
    provider: &Arc<CryptoProvider>,
) -> Result<(), ChainError> {
    if trust_anchors.is_empty() {
        return Err(ChainError::EmptyTrustBundle);
    }
    let anchors = trust_anchors
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map(|anchor| anchor.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ChainError::InvalidCertificate { what: "trust anchor", reason: format!("{error:?}") })?;
    let intermediates: Vec<CertificateDer<'static>> = chain[1..].iter().chain(ca_chain).cloned().collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|error| ChainError::InvalidCertificate { what: "leaf", reason: format!("{error:?}") })?;
    let seconds = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    leaf.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(seconds),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|error| ChainError::Untrusted { reason: format!("{error:?}") })
}

#[cfg(test)]
mod tests;
