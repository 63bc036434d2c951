//! Certificates from files on disk, for users without Vault (cert-manager, an operator's
//! own CA). The files are read again when their content changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::chain::IssuedCertificate;
use crate::error::PkiError;
use crate::secret::Secret;

/// Checking three small files every ten seconds costs nothing and picks up a Secret update
/// well within the minute the kubelet takes to project it.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct FileSettings {
    /// The leaf certificate in PEM, optionally followed by intermediates.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The roots that client certificates must chain to (and that the leaf is checked
    /// against).
    pub ca_file: PathBuf,
    pub reload_interval: Duration,
}

/// Reads the three files and reports whether they changed since the last read.
#[derive(Debug)]
pub struct FileSource {
    settings: FileSettings,
    last: Option<(String, Secret<String>, String)>,
}

impl FileSource {
    pub fn new(settings: FileSettings) -> Self {
        FileSource { settings, last: None }
    }

    pub fn reload_interval(&self) -> Duration {
        self.settings.reload_interval
    }

    /// Returns the certificate when any file changed since the last successful call, and
    /// `None` when all three are unchanged.
    pub fn read_if_changed(&mut self) -> Result<Option<IssuedCertificate>, PkiError> {
        let certificate = read(&self.settings.cert_file)?;
        let key = Secret::new(read(&self.settings.key_file)?);
        let ca = read(&self.settings.ca_file)?;
        let contents = (certificate, key, ca);
        if self.last.as_ref() == Some(&contents) {
            return Ok(None);
        }
        let issued = IssuedCertificate {
            certificate_pem: contents.0.clone(),
            ca_chain_pem: vec![contents.2.clone()],
            private_key_pem: contents.1.clone(),
            reported_expiration: None,
        };
        self.last = Some(contents);
        Ok(Some(issued))
    }

    /// Forgets the last content, so a rejected change is read and reported again.
    pub fn forget(&mut self) {
        self.last = None;
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|error| PkiError::File { path: path.display().to_string(), reason: error.to_string() })
}
