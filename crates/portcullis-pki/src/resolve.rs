//! The certificate store behind rustls: the serving certificate and the trust bundle, both
//! swapped atomically. Handshakes read them without locks, and open connections keep the
//! keys they negotiated.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::sync::watch;

use crate::chain::CheckedCertificate;
use crate::clock::Clock;
use crate::error::PkiError;
use crate::trust::TrustBundle;

/// The certificate being served and the moment it stops being served.
#[derive(Debug)]
pub struct ServedCertificate {
    pub certificate: CheckedCertificate,
    pub withdraw_at: SystemTime,
}

/// The current certificate and trust bundle, shared by the rotator and every handshake.
pub struct CertificateStore {
    current: ArcSwapOption<ServedCertificate>,
    trust: ArcSwap<TrustBundle>,
    verifier: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
    ready: watch::Sender<bool>,
    clock: Arc<dyn Clock>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for CertificateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateStore")
            .field("current", &self.current.load().as_ref().map(|served| served.certificate.serial.clone()))
            .field("trust_roots", &self.trust.load().len())
            .finish()
    }
}

impl CertificateStore {
    pub fn new(clock: Arc<dyn Clock>, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(CertificateStore {
            current: ArcSwapOption::empty(),
            trust: ArcSwap::from_pointee(TrustBundle::default()),
            verifier: ArcSwapOption::empty(),
            ready: watch::channel(false).0,
            clock,
            provider,
        })
    }

    /// Swaps in a new certificate and trust bundle. The bundle is checked first, so a bundle
    /// that rustls rejects leaves the current state in place.
    pub fn install(&self, certificate: CheckedCertificate, withdraw_at: SystemTime, trust: TrustBundle) -> Result<(), PkiError> {
        let verifier = self.build_verifier(&trust)?;
        self.verifier.store(Some(Arc::new(verifier)));
        self.trust.store(Arc::new(trust));
        self.current.store(Some(Arc::new(ServedCertificate { certificate, withdraw_at })));
        self.ready.send_replace(true);
        Ok(())
    }

    /// Stops serving the current certificate: later handshakes fail until a new one arrives.
    pub fn withdraw(&self) {
        self.current.store(None);
        self.ready.send_replace(false);
    }

    pub fn current(&self) -> Option<Arc<ServedCertificate>> {
        self.current.load_full()
    }

    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.trust.load_full()
    }

    /// Returns whether a certificate is being served.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows readiness changes, for the admin `/readyz`.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Returns the key to present now, or `None` once the certificate reached its withdrawal time,
    /// even if the rotator has not run yet.
    fn serving_key(&self) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        let served = current.as_ref()?;
        if self.clock.now() >= served.withdraw_at {
            return None;
        }
        Some(Arc::clone(&served.certificate.certified_key))
    }

    fn build_verifier(&self, trust: &TrustBundle) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
        let roots = root_store(trust)?;
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
            .build()
            .map_err(|error| PkiError::TrustBundle { reason: error.to_string() })
    }
}

fn root_store(trust: &TrustBundle) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for der in trust.roots() {
        roots.add(der).map_err(|error| PkiError::TrustBundle { reason: error.to_string() })?;
    }
    Ok(roots)
}

/// Presents the store's current certificate to clients.
#[derive(Debug)]
pub struct ServerCertificateResolver(pub Arc<CertificateStore>);

impl ResolvesServerCert for ServerCertificateResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.serving_key()
    }
}

/// Presents the store's current certificate to servers (for outgoing mTLS connections).
#[derive(Debug)]
pub struct ClientCertificateResolver(pub Arc<CertificateStore>);

impl ResolvesClientCert for ClientCertificateResolver {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.serving_key()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies client certificates against the store's current trust bundle, so a CA change
/// takes effect at the next handshake. Client certificates are required.
///
/// NOTE: it sends no CA names in the CertificateRequest (they would have to outlive a bundle
/// swap). Clients with a single certificate, such as Envoy, send it regardless.
#[derive(Debug)]
pub struct TrustBundleVerifier(pub Arc<CertificateStore>);

impl TrustBundleVerifier {
    fn current(&self) -> Result<Arc<Arc<dyn ClientCertVerifier>>, rustls::Error> {
        self.0.verifier.load_full().ok_or_else(|| rustls::Error::General("no trust bundle loaded yet".to_owned()))
    }
}

impl ClientCertVerifier for TrustBundleVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds a rustls server configuration that presents the store's certificate, requires client
/// certificates that chain to the store's trust bundle, and offers HTTP/2 through ALPN.
pub fn server_config(store: &Arc<CertificateStore>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&store.provider))
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(TrustBundleVerifier(Arc::clone(store))))
        .with_cert_resolver(Arc::new(ServerCertificateResolver(Arc::clone(store))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Builds a rustls client configuration that presents the store's current certificate and verifies
/// servers against the trust bundle as it is now. The client certificate follows rotations;
/// the server verifier does not, so rebuild the configuration from a rotation hook.
pub fn client_config(store: &Arc<CertificateStore>) -> Result<rustls::ClientConfig, PkiError> {
    let roots = root_store(&store.trust_bundle())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&store.provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| PkiError::TrustBundle { reason: error.to_string() })?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(ClientCertificateResolver(Arc::clone(store))));
    Ok(config)
}
