//! mTLS certificates for portcullis.
//!
//! A [`CertificateRotator`] obtains a certificate from a [`CertificateSource`] (Vault PKI or
//! files on disk), checks it ([`check_certificate`]), and installs it in a [`CertificateStore`].
//! The store backs rustls through [`ServerCertificateResolver`], [`ClientCertificateResolver`]
//! and [`TrustBundleVerifier`], so new handshakes use the new certificate and trust bundle at
//! once while open connections carry on with the keys they negotiated.
//!
//! The rotator renews at a fraction of the certificate's lifetime with jitter, and retries
//! with exponential backoff while the current certificate keeps serving. It withdraws a
//! certificate shortly before it expires. From then on handshakes fail and the store reports
//! not ready, because serving an expired certificate only moves the failure to the peer.

mod chain;
mod clock;
mod error;
pub mod files;
mod resolve;
mod rotator;
pub mod schedule;
mod secret;
mod trust;
pub mod vault;

pub use chain::{CheckedCertificate, IssuedCertificate, check_certificate};
pub use clock::{Clock, SystemClock, TokioClock};
pub use error::{ChainError, PkiError, VaultError};
pub use files::{FileSettings, FileSource};
pub use resolve::{
    CertificateStore, ClientCertificateResolver, ServerCertificateResolver, TrustBundleVerifier,
    client_config, server_config,
};
pub use rotator::{
    CertificateRotator, CertificateSource, PkiObserver, RotatedCertificate, RotationHook,
    RotatorHandle,
};
pub use schedule::{Backoff, RotationSettings, renewal_delay};
pub use secret::Secret;
pub use trust::TrustBundle;

/// Returns the rustls crypto provider for every handshake and certificate check: ring, which
/// the whole workspace uses because it builds much faster than aws-lc-rs.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider. vaultrs builds its reqwest client
/// without a provider of its own, and reqwest fails to build one unless a default is set.
/// Calling it again, or after another crate installed ring, does nothing.
pub fn install_default_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
