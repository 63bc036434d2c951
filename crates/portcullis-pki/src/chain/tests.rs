use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use super::*;

/// A CA and a way to issue leaves from it, with validity relative to `now`.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
        params.not_after = (SystemTime::now() + Duration::from_secs(24 * 3600)).into();
        TestCa { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a leaf valid from `not_before` to `not_after` and returns it with its key.
    fn issue(&self, not_before: SystemTime, not_after: SystemTime) -> (String, KeyPair) {
        let mut params = CertificateParams::new(vec!["portcullis.test".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(vec![0x00, 0x1f, 0xa2].into());
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key)
    }

    fn issued(&self, not_before: SystemTime, not_after: SystemTime) -> IssuedCertificate {
        let (certificate_pem, key) = self.issue(not_before, not_after);
        IssuedCertificate {
            certificate_pem,
            ca_chain_pem: vec![self.pem()],
            private_key_pem: Secret::new(key.serialize_pem()),
            reported_expiration: None,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    crate::crypto_provider()
}

/// Whole seconds, because certificates store their validity in seconds.
fn now() -> SystemTime {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    UNIX_EPOCH + Duration::from_secs(seconds)
}

#[test]
fn valid_certificate_passes_with_its_validity_and_serial() {
    let ca = TestCa::new("test CA");
    let now = now();
    let issued = ca.issued(now - Duration::from_secs(60), now + Duration::from_secs(600));

    let checked = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap();

    assert_eq!(checked.serial, "1f:a2");
    assert_eq!(checked.not_before, now - Duration::from_secs(60));
    assert_eq!(checked.not_after, now + Duration::from_secs(600));
    assert_eq!(checked.lifetime(), Duration::from_secs(660));
    assert_eq!(checked.ca_chain, vec![ca.der()]);
    assert_eq!(checked.certified_key.cert.len(), 1);
}

#[test]
fn key_of_another_certificate_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.private_key_pem = Secret::new(KeyPair::generate().unwrap().serialize_pem());

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::KeyMismatch);
}

#[test]
fn expired_certificate_is_rejected_with_its_expiry() {
    let ca = TestCa::new("test CA");
    let now = now();
    let not_after = now - Duration::from_secs(1);
    let issued = ca.issued(now - Duration::from_secs(600), not_after);

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::Expired { not_after, now });
}

#[test]
fn certificate_from_the_future_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let not_before = now + Duration::from_secs(300);
    let issued = ca.issued(not_before, now + Duration::from_secs(600));

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::NotYetValid { not_before, now });
}

#[test]
fn certificate_from_an_untrusted_issuer_is_rejected() {
    let ca = TestCa::new("test CA");
    let other = TestCa::new("other CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.ca_chain_pem = Vec::new();

    let error = check_certificate(&issued, &[other.der()], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::Untrusted { reason: "UnknownIssuer".to_owned() });
}

#[test]
fn chain_claiming_a_wrong_issuer_is_rejected() {
    let ca = TestCa::new("test CA");
    let other = TestCa::new("test CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.ca_chain_pem = vec![other.pem()];

    let error = check_certificate(&issued, &[other.der()], now, &provider()).unwrap_err();

    assert!(matches!(error, ChainError::Untrusted { .. }), "{error}");
}

#[test]
fn garbage_pem_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.certificate_pem = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n".to_owned();

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert!(matches!(error, ChainError::InvalidPem { what: "certificate", .. }), "{error}");
}

#[test]
fn text_without_a_certificate_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.certificate_pem = "hello".to_owned();

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::NoCertificate { what: "certificate" });
}

#[test]
fn missing_private_key_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let mut issued = ca.issued(now, now + Duration::from_secs(600));
    issued.private_key_pem = Secret::new(String::new());

    let error = check_certificate(&issued, &[ca.der()], now, &provider()).unwrap_err();

    assert!(matches!(error, ChainError::InvalidPem { what: "private key", .. }), "{error}");
}

#[test]
fn empty_trust_bundle_is_rejected() {
    let ca = TestCa::new("test CA");
    let now = now();
    let issued = ca.issued(now, now + Duration::from_secs(600));

    let error = check_certificate(&issued, &[], now, &provider()).unwrap_err();

    assert_eq!(error, ChainError::EmptyTrustBundle);
}
