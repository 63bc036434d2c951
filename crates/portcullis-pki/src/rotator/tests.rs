use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::UNIX_EPOCH;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use super::*;
use crate::clock::TokioClock;
use crate::files::FileSettings;

/// Returns the wall-clock start of every test, a whole second because certificates store seconds.
fn origin() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs())
}

struct Files {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Files {
    fn new(origin: SystemTime) -> Files {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = (origin - Duration::from_secs(3600)).into();
        params.not_after = (origin + Duration::from_secs(86_400)).into();
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Files { dir, ca }
    }

    /// Writes a leaf with the given serial, valid from `not_before` to `not_after`.
    fn write_leaf(&self, serial: u8, not_before: SystemTime, not_after: SystemTime) {
        let mut params = CertificateParams::new(vec!["portcullis.test".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(vec![serial].into());
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.path("cert.pem"), certificate.pem()).unwrap();
        std::fs::write(self.path("key.pem"), key.serialize_pem()).unwrap();
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn settings(&self) -> FileSettings {
        FileSettings {
            cert_file: self.path("cert.pem"),
            key_file: self.path("key.pem"),
            ca_file: self.path("ca.pem"),
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Default)]
struct Recorder {
    installed: Mutex<Vec<String>>,
    failures: AtomicUsize,
    withdrawals: AtomicUsize,
}

impl PkiObserver for Recorder {
    fn certificate_installed(&self, certificate: &CheckedCertificate) {
        self.installed.lock().unwrap().push(certificate.serial.clone());
    }

    fn certificate_withdrawn(&self) {
        self.withdrawals.fetch_add(1, Ordering::SeqCst);
    }

    fn rotation_failed(&self, _error: &PkiError) {
        self.failures.fetch_add(1, Ordering::SeqCst);
    }
}

fn start(files: &Files, origin: SystemTime, recorder: &Arc<Recorder>) -> (Arc<CertificateStore>, RotatorHandle) {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(origin));
    let store = CertificateStore::new(Arc::clone(&clock), crate::crypto_provider());
    let settings = RotationSettings { expiry_margin: Duration::from_secs(5), ..RotationSettings::default() };
    let rotator = CertificateRotator::new(
        CertificateSource::Files(FileSource::new(files.settings())),
        Arc::clone(&store),
        settings,
        Vec::new(),
        Arc::clone(recorder) as Arc<dyn PkiObserver>,
        clock,
    );
    (store, rotator.spawn())
}

fn serial_of(store: &CertificateStore) -> Option<String> {
    store.current().map(|served| served.certificate.serial.clone())
}

fn key_served(store: &Arc<CertificateStore>) -> bool {
    use rustls::client::ResolvesClientCert;
    crate::ClientCertificateResolver(Arc::clone(store)).resolve(&[], &[]).is_some()
}

#[tokio::test(start_paused = true)]
async fn certificate_is_withdrawn_before_it_expires() {
    let origin = origin();
    let files = Files::new(origin);
    files.write_leaf(1, origin - Duration::from_secs(10), origin + Duration::from_secs(100));
    let recorder = Arc::new(Recorder::default());
    let (store, rotator) = start(&files, origin, &recorder);

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(serial_of(&store).as_deref(), Some("01"));
    assert!(store.is_ready());

    tokio::time::sleep(Duration::from_secs(93)).await;
    assert!(store.is_ready(), "withdrawn too early");
    assert!(key_served(&store));

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!store.is_ready());
    assert!(!key_served(&store));
    assert_eq!(recorder.withdrawals.load(Ordering::SeqCst), 1);
    rotator.stop();
}

#[tokio::test(start_paused = true)]
async fn changed_files_are_installed_at_the_next_reload() {
    let origin = origin();
    let files = Files::new(origin);
    files.write_leaf(1, origin - Duration::from_secs(10), origin + Duration::from_secs(600));
    let recorder = Arc::new(Recorder::default());
    let (store, rotator) = start(&files, origin, &recorder);
    tokio::time::sleep(Duration::from_secs(1)).await;

    files.write_leaf(2, origin - Duration::from_secs(10), origin + Duration::from_secs(900));
    tokio::time::sleep(Duration::from_secs(10)).await;

    assert_eq!(serial_of(&store).as_deref(), Some("02"));
    assert_eq!(*recorder.installed.lock().unwrap(), vec!["01".to_owned(), "02".to_owned()]);
    rotator.stop();
}

#[tokio::test(start_paused = true)]
async fn rejected_files_leave_the_current_certificate_serving() {
    let origin = origin();
    let files = Files::new(origin);
    files.write_leaf(1, origin - Duration::from_secs(10), origin + Duration::from_secs(600));
    let recorder = Arc::new(Recorder::default());
    let (store, rotator) = start(&files, origin, &recorder);
    tokio::time::sleep(Duration::from_secs(1)).await;

    std::fs::write(files.path("key.pem"), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    tokio::time::sleep(Duration::from_secs(25)).await;

    assert_eq!(serial_of(&store).as_deref(), Some("01"));
    assert!(store.is_ready());
    assert_eq!(recorder.failures.load(Ordering::SeqCst), 2);
    rotator.stop();
}

#[tokio::test(start_paused = true)]
async fn hook_receives_the_new_certificate_and_bundle() {
    let origin = origin();
    let files = Files::new(origin);
    files.write_leaf(7, origin - Duration::from_secs(10), origin + Duration::from_secs(600));
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(origin));
    let store = CertificateStore::new(Arc::clone(&clock), crate::crypto_provider());
    let mut rotator = CertificateRotator::new(
        CertificateSource::Files(FileSource::new(files.settings())),
        Arc::clone(&store),
        RotationSettings::default(),
        Vec::new(),
        Arc::new(()),
        clock,
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    rotator.on_rotation(Arc::new(move |rotated: &RotatedCertificate| {
        recorded.lock().unwrap().push((rotated.serial.clone(), rotated.trust_bundle_pem.clone()));
    }));

    rotator.rotate_once().await.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "07");
    assert_eq!(seen[0].1, files.ca.pem().replace("\r\n", "\n"));
    assert!(Path::new(&files.path("ca.pem")).exists());
}
