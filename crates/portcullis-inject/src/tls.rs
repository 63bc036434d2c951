//! The webhook's serving certificate, read from PEM files and swapped in when they change.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::error::InjectError;

/// Whether a [`ReloadingCertificate::reload`] found new files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reload {
    Unchanged,
    Replaced,
}

/// Serves the certificate last read from `cert_file` and `key_file`.
pub(crate) struct ReloadingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// The file contents behind `current`, to tell whether a reload has anything new.
    loaded_contents: Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCertificate {
    /// Reads both files; fails when they are missing, invalid or do not belong together.
    pub(crate) fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, InjectError> {
        let cert_pem = read_file(cert_file)?;
        let key_pem = read_file(key_file)?;
        let key = certified_key(cert_file, &cert_pem, key_file, &key_pem, &provider)?;
        Ok(ReloadingCertificate {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(key),
            loaded_contents: Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Reads the files again and serves them from the next handshake on when they changed.
    /// On an error the current certificate stays in use.
    pub(crate) fn reload(&self) -> Result<Reload, InjectError> {
        let cert_pem = read_file(&self.cert_file)?;
        let key_pem = read_file(&self.key_file)?;
        let mut loaded = self
            .loaded_contents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(Reload::Unchanged);
        }

        let key = certified_key(
            &self.cert_file,
            &cert_pem,
            &self.key_file,
            &key_pem,
            &self.provider,
        )?;
        self.current.store(Arc::new(key));
        *loaded = (cert_pem, key_pem);
        Ok(Reload::Replaced)
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for ReloadingCertificate {
    // The private key stays out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, InjectError> {
    std::fs::read(path).map_err(|source| InjectError::ReadTlsFile {
        path: path.to_path_buf(),
        source,
    })
}

fn certified_key(
    cert_file: &Path,
    cert_pem: &[u8],
    key_file: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, InjectError> {
    let invalid_cert = |reason: String| InjectError::InvalidTlsFile {
        path: cert_file.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid_cert(format!("invalid PEM certificate: {error}")))?;
    if chain.is_empty() {
        return Err(invalid_cert("no CERTIFICATE block found".to_owned()));
    }

    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| InjectError::InvalidTlsFile {
            path: key_file.to_path_buf(),
            reason: format!("no usable private key: {error}"),
        })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|error| InjectError::InvalidTlsFile {
        path: key_file.to_path_buf(),
        reason: format!(
            "the private key cannot be used with the certificate in {}: {error}",
            cert_file.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn write_certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .expect("generating a certificate failed");
        let cert_file = dir.join("tls.crt");
        let key_file = dir.join("tls.key");
        std::fs::write(&cert_file, certified.cert.pem()).expect("writing tls.crt failed");
        std::fs::write(&key_file, certified.signing_key.serialize_pem())
            .expect("writing tls.key failed");
        (cert_file, key_file, certified.cert.der().to_vec())
    }

    fn served_der(certificate: &ReloadingCertificate) -> Vec<u8> {
        certificate.current.load().cert[0].to_vec()
    }

    #[test]
    fn reload_swaps_in_changed_files() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let (cert_file, key_file, first_der) = write_certificate(dir.path(), "first.test");
        let certificate =
            ReloadingCertificate::load(&cert_file, &key_file, provider()).expect("load failed");
        assert_eq!(served_der(&certificate), first_der);

        assert_eq!(
            certificate.reload().expect("reload failed"),
            Reload::Unchanged
        );
        let (_, _, second_der) = write_certificate(dir.path(), "second.test");

        assert_eq!(
            certificate.reload().expect("reload failed"),
            Reload::Replaced
        );
        assert_eq!(served_der(&certificate), second_der);
    }

    #[test]
    fn reload_keeps_current_certificate_on_broken_files() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let (cert_file, key_file, first_der) = write_certificate(dir.path(), "first.test");
        let certificate =
            ReloadingCertificate::load(&cert_file, &key_file, provider()).expect("load failed");

        std::fs::write(&cert_file, "not a certificate").expect("writing tls.crt failed");
        let error = certificate
            .reload()
            .expect_err("reload of a broken file succeeded");

        assert_eq!(
            error.to_string(),
            format!(
                "invalid TLS file {}: no CERTIFICATE block found",
                cert_file.display()
            )
        );
        assert_eq!(served_der(&certificate), first_der);
    }

    #[test]
    fn load_rejects_key_of_another_certificate() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let (cert_file, _, _) = write_certificate(dir.path(), "first.test");
        let other = rcgen::KeyPair::generate().expect("generating a key failed");
        let key_file = dir.path().join("other.key");
        std::fs::write(&key_file, other.serialize_pem()).expect("writing other.key failed");

        let error = ReloadingCertificate::load(&cert_file, &key_file, provider())
            .expect_err("a mismatched key was accepted");

        let message = error.to_string();
        assert!(
            message.starts_with(&format!(
                "invalid TLS file {}: the private key cannot be used with the certificate in {}",
                key_file.display(),
                cert_file.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn load_reports_missing_file() {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let missing = dir.path().join("missing.crt");

        let error = ReloadingCertificate::load(&missing, &missing, provider())
            .expect_err("a missing file was accepted");

        assert!(
            matches!(&error, InjectError::ReadTlsFile { path, .. } if path == &missing),
            "{error}"
        );
    }
}
