//! A client certificate that another part of portcullis rotates, shared with the producer.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

/// The client certificate of the `tls` section (issued by Vault PKI or read from files),
/// used for mutual TLS to the brokers.
///
/// librdkafka cannot change a client certificate in place, so every [`install`] makes the
/// transport build a new producer with the new certificate. The old producer is flushed
/// first, never purged. Clones share one certificate.
///
/// [`install`]: RotatingClientCertificate::install
#[derive(Clone)]
pub struct RotatingClientCertificate {
    current: Arc<watch::Sender<Option<Arc<CertificatePem>>>>,
}

/// A certificate chain and its private key in PEM.
pub(crate) struct CertificatePem {
    pub(crate) chain: String,
    pub(crate) private_key: String,
}

impl RotatingClientCertificate {
    /// Creates an empty slot. Until the first [`install`](Self::install), producers connect
    /// without a client certificate, which brokers that require one reject.
    pub fn new() -> Self {
        RotatingClientCertificate { current: Arc::new(watch::Sender::new(None)) }
    }

    /// Replaces the certificate; transports that use it rebuild their producer.
    pub fn install(&self, chain_pem: String, private_key_pem: String) {
        self.current.send_replace(Some(Arc::new(CertificatePem { chain: chain_pem, private_key: private_key_pem })));
    }

    pub(crate) fn current(&self) -> Option<Arc<CertificatePem>> {
        self.current.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<CertificatePem>>> {
        self.current.subscribe()
    }
}

impl Default for RotatingClientCertificate {
    fn default() -> Self {
        RotatingClientCertificate::new()
    }
}

/// Shows only whether a certificate is installed: the private key must never reach a log.
impl fmt::Debug for RotatingClientCertificate {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("RotatingClientCertificate").field("installed", &self.current.borrow().is_some()).finish()
    }
}

/// Two handles are equal when they share one slot.
impl PartialEq for RotatingClientCertificate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.current, &other.current)
    }
}

impl Eq for RotatingClientCertificate {}
