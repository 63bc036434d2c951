//! The rotation loop: obtain, check and install certificates, renew them before they expire,
//! retry with backoff, and withdraw a certificate that is about to expire.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::chain::{CheckedCertificate, IssuedCertificate, check_certificate};
use crate::clock::Clock;
use crate::error::PkiError;
use crate::files::FileSource;
use crate::resolve::CertificateStore;
use crate::schedule::{Backoff, RotationSettings, renewal_delay};
use crate::secret::Secret;
use crate::trust::TrustBundle;
use crate::vault::{IssueSettings, VaultSession};

/// The maximum single sleep of the loop, so a wall-clock jump is noticed within a minute.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Receives rotation events, for metrics. Every method defaults to doing nothing.
pub trait PkiObserver: Send + Sync {
    fn certificate_installed(&self, _certificate: &CheckedCertificate) {}
    fn certificate_withdrawn(&self) {}
    fn rotation_failed(&self, _error: &PkiError) {}
    /// `outcome` is `success` or `failure`.
    fn vault_login(&self, _method: &str, _outcome: &str) {}
    /// `outcome` is `success` or `failure`.
    fn vault_token_renewal(&self, _outcome: &str) {}
}

impl PkiObserver for () {}

/// What a rotation hook receives: the new certificate in the forms that clients taking files
/// or PEM text need, such as a Kafka producer that must be rebuilt to use it.
#[derive(Debug, Clone)]
pub struct RotatedCertificate {
    pub serial: String,
    pub not_after: SystemTime,
    /// Leaf and intermediates in PEM.
    pub certificate_chain_pem: String,
    pub private_key_pem: Secret<String>,
    /// Every root peers may chain to, including roots retained from a previous CA.
    pub trust_bundle_pem: String,
}

/// Called after every installed certificate, on the rotator's task: it must return quickly,
/// so slow work (such as rebuilding a Kafka producer) belongs on a task of its own.
pub type RotationHook = Arc<dyn Fn(&RotatedCertificate) + Send + Sync>;

/// The source of certificates.
pub enum CertificateSource {
    Vault { session: Box<VaultSession>, issue: IssueSettings },
    Files(FileSource),
}

/// Keeps the store supplied with a valid certificate.
pub struct CertificateRotator {
    source: CertificateSource,
    store: Arc<CertificateStore>,
    settings: RotationSettings,
    extra_roots: Vec<CertificateDer<'static>>,
    observer: Arc<dyn PkiObserver>,
    hooks: Vec<RotationHook>,
    clock: Arc<dyn Clock>,
    provider: Arc<CryptoProvider>,
    trust: TrustBundle,
    backoff: Backoff,
}

/// The running rotator. Dropping it leaves the task running, and [`RotatorHandle::stop`] ends it.
pub struct RotatorHandle {
    task: JoinHandle<()>,
}

impl RotatorHandle {
    pub fn stop(self) {
        self.task.abort();
    }
}

impl CertificateRotator {
    /// `extra_roots` are trusted in addition to the source's CA chain, for example the root of
    /// a CA that peers' certificates come from but that Vault does not list.
    pub fn new(
        source: CertificateSource,
        store: Arc<CertificateStore>,
        settings: RotationSettings,
        extra_roots: Vec<CertificateDer<'static>>,
        observer: Arc<dyn PkiObserver>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let backoff = Backoff::new(settings.min_retry, settings.max_retry);
        CertificateRotator {
            source,
            store,
            settings,
            extra_roots,
            observer,
            hooks: Vec::new(),
            clock,
            provider: crate::crypto_provider(),
            trust: TrustBundle::default(),
            backoff,
        }
    }

    /// Adds a hook that runs after each installed certificate.
    pub fn on_rotation(&mut self, hook: RotationHook) {
        self.hooks.push(hook);
    }

    /// Obtains, checks and installs one certificate. Returns `Ok(None)` when a file source
    /// is unchanged.
    pub async fn rotate_once(&mut self) -> Result<Option<CheckedCertificate>, PkiError> {
        let issued = match &mut self.source {
            CertificateSource::Vault { session, issue } => session.issue(issue).await?,
            CertificateSource::Files(files) => match files.read_if_changed()? {
                Some(issued) => issued,
                None => return Ok(None),
            },
        };
        match self.install(&issued) {
            Ok(certificate) => Ok(Some(certificate)),
            Err(error) => {
                if let CertificateSource::Files(files) = &mut self.source {
                    files.forget();
                }
                Err(error)
            }
        }
    }

    fn install(&mut self, issued: &IssuedCertificate) -> Result<CheckedCertificate, PkiError> {
        let now = self.clock.now();
        let chain_roots = issued
            .ca_chain_pem
            .iter()
            .map(|pem| crate::chain::parse_certificates(pem, "CA chain"))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .chain(self.extra_roots.iter().cloned());
        let roots: Vec<CertificateDer<'static>> = chain_roots.collect();
        let certificate = check_certificate(issued, &roots, now, &self.provider)?;

        // Old roots stay trusted for one certificate lifetime: peers issued by the same PKI
        // role before the CA change hold certificates that live no longer than ours.
        let trust = self.trust.next(roots, now, certificate.lifetime());
        let withdraw_at = self.settings.withdraw_at(certificate.not_before, certificate.not_after);
        self.store.install(certificate.clone(), withdraw_at, trust.clone())?;
        if trust.retained_count() > 0 && self.trust.retained_count() == 0 {
            info!(trust.roots = trust.len(), trust.retained = trust.retained_count(), "the CA chain changed; trusting the old and the new roots until certificates from the old CA expire");
        }
        self.trust = trust;

        self.observer.certificate_installed(&certificate);
        info!(
            certificate.serial = %certificate.serial,
            certificate.not_after = %humantime::format_rfc3339_seconds(certificate.not_after),
            trust.roots = self.trust.len(),
            "installed a new certificate"
        );
        let rotated = RotatedCertificate {
            serial: certificate.serial.clone(),
            not_after: certificate.not_after,
            certificate_chain_pem: certificate.certificate_chain_pem.clone(),
            private_key_pem: certificate.private_key_pem.clone(),
            trust_bundle_pem: self.trust.pem(),
        };
        for hook in &self.hooks {
            hook(&rotated);
        }
        Ok(certificate)
    }

    /// Starts the rotation loop on the current tokio runtime. The first certificate is
    /// requested at once; watch [`CertificateStore::readiness`] to learn when it is served.
    pub fn spawn(self) -> RotatorHandle {
        RotatorHandle { task: tokio::spawn(self.run()) }
    }

    async fn run(mut self) {
        let mut next_attempt = self.clock.now();
        loop {
            let now = self.clock.now();
            let withdraw_at = self.store.current().map(|served| served.withdraw_at);
            let token_due = match &self.source {
                CertificateSource::Vault { session, .. } => session.token_renewal_due_at(),
                CertificateSource::Files(_) => None,
            };
            let wake = [Some(next_attempt), withdraw_at, token_due].into_iter().flatten().min().unwrap_or(next_attempt);
            let sleep = wake.duration_since(now).unwrap_or_default().min(MAX_SLEEP);
            if !sleep.is_zero() {
                tokio::time::sleep(sleep).await;
            }

            let now = self.clock.now();
            if let Some(withdraw_at) = withdraw_at
                && now >= withdraw_at
                && self.store.current().is_some_and(|served| served.withdraw_at == withdraw_at)
            {
                self.store.withdraw();
                self.observer.certificate_withdrawn();
                error!(
                    withdrawn_at = %humantime::format_rfc3339_seconds(withdraw_at),
                    "the certificate is about to expire and no new one could be obtained; it is no longer served and the sidecar reports not ready"
                );
            }
            if let (Some(due), CertificateSource::Vault { session, .. }) = (token_due, &mut self.source)
                && now >= due
                && let Err(error) = session.maintain_token().await
            {
                warn!(%error, "keeping the Vault token valid failed; the next rotation logs in again");
            }
            if now >= next_attempt {
                next_attempt = self.attempt().await;
            }
        }
    }

    /// Runs one rotation and returns when the next one is due.
    async fn attempt(&mut self) -> SystemTime {
        let result = self.rotate_once().await;
        let now = self.clock.now();
        match result {
            Ok(Some(certificate)) => {
                self.backoff.reset();
                match &self.source {
                    CertificateSource::Files(files) => now + files.reload_interval(),
                    CertificateSource::Vault { .. } => {
                        let delay = renewal_delay(&self.settings, certificate.not_before, certificate.not_after, now, fastrand::f64());
                        info!(renew_in = ?delay, "next certificate renewal scheduled");
                        now + delay
                    }
                }
            }
            Ok(None) => match &self.source {
                CertificateSource::Files(files) => now + files.reload_interval(),
                CertificateSource::Vault { .. } => now,
            },
            Err(error) => {
                self.observer.rotation_failed(&error);
                let delay = self.backoff.next_delay(fastrand::f64());
                let current = self.store.current();
                warn!(
                    %error,
                    attempt = self.backoff.failures(),
                    retry_in = ?delay,
                    certificate.serial = current.as_ref().map(|served| served.certificate.serial.as_str()).unwrap_or("none"),
                    certificate.withdraw_at = %current.as_ref().map(|served| humantime::format_rfc3339_seconds(served.withdraw_at).to_string()).unwrap_or_else(|| "none".to_owned()),
                    "certificate rotation failed; the current certificate keeps serving"
                );
                let retry_at = now + delay;
                match &self.source {
                    // An unchanged bad file is not worth re-reading faster than usual.
                    CertificateSource::Files(files) => retry_at.max(now + files.reload_interval().min(self.settings.max_retry)),
                    CertificateSource::Vault { .. } => retry_at,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
