//! mTLS certificate rotation of the `portcullis serve` binary against the Vault stand-in:
//! continuous Check traffic over one long-lived mTLS connection while certificates rotate,
//! Vault outages, a token that reaches its max TTL, and a CA change.
//!
//! Certificates live seconds instead of hours so that several rotations fit in a test. The
//! tests fail when the portcullis binary has not been built (`cargo build -p portcullis`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use hyper_util::rt::TokioIo;
use portcullis_e2e::vault::{IssuedFiles, VaultFailure, VaultOptions, VaultStandIn};
use portcullis_e2e::{
    HttpRequest as AdminRequest, Portcullis, PortcullisOptions, send, write_bundle,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint, Uri};

const ALLOW_ALL: &str = "package envoy.authz\n\ndefault allow := true\n";

/// The DNS name in portcullis's certificate, which clients check.
const SERVER_NAME: &str = "portcullis.test";

/// The stand-in, portcullis with `tls` from Vault, and a client certificate for the tests.
struct Stack {
    portcullis: Portcullis,
    vault: VaultStandIn,
    client: IssuedFiles,
    dir: TempDir,
}

impl Stack {
    /// Starts the stand-in and portcullis with a `ttl` certificate, and issues a client
    /// certificate valid for an hour.
    async fn start(vault_options: VaultOptions, ttl: &str, vault_auth: &str) -> Stack {
        let dir = tempfile::tempdir().expect("creating a temporary folder failed");
        let vault = VaultStandIn::start(vault_options.clone())
            .await
            .expect("starting the Vault stand-in failed");
        let token_file = dir.path().join("service-account-token");
        std::fs::write(
            &token_file,
            format!("{}\n", vault_options.service_account_jwt),
        )
        .expect("writing the token file failed");
        let bundle = dir.path().join("bundle");
        write_bundle(&bundle, "r1", ALLOW_ALL).expect("writing the bundle failed");

        let mut options = PortcullisOptions::new(&bundle);
        options.log_level = "info,portcullis=debug,portcullis_pki=debug".to_owned();
        let auth = if vault_auth.is_empty() {
            format!(
                "    method: kubernetes\n    role: portcullis\n    service_account_token_file: {:?}\n",
                token_file.display().to_string()
            )
        } else {
            vault_auth.to_owned()
        };
        let ca_file = match vault.server_ca_pem() {
            Some(pem) => {
                let path = dir.path().join("vault-ca.pem");
                std::fs::write(&path, pem).expect("writing Vault's CA failed");
                format!("  ca_file: {:?}\n", path.display().to_string())
            }
            None => String::new(),
        };
        options.extra_config = format!(
            "vault:\n  address: {address:?}\n{ca_file}  timeout: 2s\n  auth:\n{auth}tls:\n  common_name: {SERVER_NAME}\n  spiffe:\n    trust_domain: cluster.local\n    namespace: test\n    service_account: portcullis\n  ttl: {ttl}\n  min_retry: 200ms\n  max_retry: 1s\n  expiry_margin: 1s\n",
            address = vault.address(),
        );
        let binary = Portcullis::binary().unwrap_or_else(|error| panic!("{error}"));
        let portcullis = Portcullis::start(&binary, &options)
            .await
            .unwrap_or_else(|error| panic!("starting portcullis failed: {error}"));
        let client = vault
            .issue_files(
                dir.path(),
                "client",
                &["client.test"],
                Duration::from_secs(3600),
            )
            .expect("issuing the client certificate failed");
        Stack {
            portcullis,
            vault,
            client,
            dir,
        }
    }

    /// Connects a new mTLS channel with the stack's client certificate.
    async fn connect(&self) -> Result<(AuthorizationClient<Channel>, Connections), String> {
        connect(
            self.portcullis.grpc_address(),
            &self.client,
            &self.vault.ca_bundle_pem(),
        )
        .await
    }

    /// Returns a metric's value from `/metrics`, or `None` when the series is missing.
    async fn metric(&self, series: &str) -> Option<f64> {
        let response = send(
            self.portcullis.admin_address(),
            &AdminRequest::get("/metrics"),
        )
        .await
        .ok()?;
        response.body_text().lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    async fn readiness(&self) -> u16 {
        self.portcullis
            .readiness_status()
            .await
            .map(|status| status.as_u16())
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        self.portcullis.log_tail()
    }
}

/// The serial number and notAfter of the server certificate seen by each connection a
/// channel opened.
#[derive(Clone, Default)]
struct Connections(Arc<Mutex<Vec<(String, SystemTime)>>>);

impl Connections {
    fn serials(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("connection log poisoned")
            .iter()
            .map(|(serial, _)| serial.clone())
            .collect()
    }

    fn last_not_after(&self) -> Option<SystemTime> {
        self.0
            .lock()
            .expect("connection log poisoned")
            .last()
            .map(|(_, not_after)| *not_after)
    }
}

/// Opens a tonic channel whose every connection is TLS with `identity` as client certificate,
/// trusting `ca_pem`, and records the serial number of the certificate the server presented.
async fn connect(
    address: SocketAddr,
    identity: &IssuedFiles,
    ca_pem: &str,
) -> Result<(AuthorizationClient<Channel>, Connections), String> {
    let config = Arc::new(client_config(identity, ca_pem)?);
    let connections = Connections::default();
    let log = connections.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let config = Arc::clone(&config);
        let log = log.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            let presented = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(serial_and_not_after);
            log.0
                .lock()
                .expect("connection log poisoned")
                .push(presented.unwrap_or((String::new(), UNIX_EPOCH)));
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_static("http://portcullis.test")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|error| format!("connecting failed: {error:?}"))?;
    Ok((AuthorizationClient::new(channel), connections))
}

fn client_config(identity: &IssuedFiles, ca_pem: &str) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(certificate.map_err(|error| error.to_string())?)
            .map_err(|error| error.to_string())?;
    }
    let chain = CertificateDer::pem_file_iter(&identity.certificate)
        .map_err(|error| error.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| error.to_string())?;
    let key =
        PrivateKeyDer::from_pem_file(&identity.private_key).map_err(|error| error.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|error| error.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Reads a certificate's serial number, formatted as Vault does (lowercase hex pairs joined
/// by colons), and its notAfter.
fn serial_and_not_after(der: &CertificateDer<'_>) -> (String, SystemTime) {
    let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref())
        .expect("the server sent an invalid certificate");
    let serial = certificate
        .raw_serial()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let seconds =
        u64::try_from(certificate.validity().not_after.timestamp()).expect("notAfter after 1970");
    (serial, UNIX_EPOCH + Duration::from_secs(seconds))
}

fn check_request(path: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "pki-test".to_owned(),
                    method: "GET".to_owned(),
                    path: path.to_owned(),
                    host: "service.test".to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Sends one check and returns `Ok` when it was allowed.
async fn check_allowed(client: &mut AuthorizationClient<Channel>) -> Result<(), String> {
    let response = client
        .check(check_request("/items"))
        .await
        .map_err(|status| format!("gRPC error: {status}"))?;
    match response.into_inner().status.map(|status| status.code) {
        Some(0) => Ok(()),
        other => Err(format!("check denied with status {other:?}")),
    }
}

/// Continuous checks over one channel until stopped; counts successes and failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    allowed: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(mut client: AuthorizationClient<Channel>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let allowed = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (stop_flag, allowed_count, failure_log) = (
            Arc::clone(&stop),
            Arc::clone(&allowed),
            Arc::clone(&failures),
        );
        let task = tokio::spawn(async move {
            while !stop_flag.load(Ordering::SeqCst) {
                match check_allowed(&mut client).await {
                    Ok(()) => allowed_count.fetch_add(1, Ordering::SeqCst),
                    Err(error) => {
                        failure_log
                            .lock()
                            .expect("failure log poisoned")
                            .push(error);
                        0
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Traffic {
            stop,
            allowed,
            failures,
            task,
        }
    }

    /// Stops the traffic and returns (allowed checks, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("the traffic task panicked");
        let failures = self.failures.lock().expect("failure log poisoned").clone();
        (self.allowed.load(Ordering::SeqCst), failures)
    }
}

/// Opens a new connection, sends one check and returns the serial portcullis presented.
async fn serial_of_new_connection(stack: &Stack) -> Result<String, String> {
    let (mut client, connections) = stack.connect().await?;
    check_allowed(&mut client).await?;
    connections
        .serials()
        .pop()
        .ok_or_else(|| "no connection was opened".to_owned())
}

/// Polls `condition` every 100 ms until it is true or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_connection_and_changes_serial() {
    let stack = Stack::start(VaultOptions::default(), "6s", "").await;
    let (client, long_lived) = stack
        .connect()
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    let traffic = Traffic::start(client);

    let mut seen = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        match serial_of_new_connection(&stack).await {
            Ok(serial) => seen.push(serial),
            Err(error) => panic!("a new connection failed: {error}\n{}", stack.logs()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (allowed, failures) = traffic.finish().await;

    let issued = stack.vault.counts().issued;
    let distinct: BTreeSet<&String> = seen.iter().collect();
    eprintln!(
        "rotation figures: {allowed} checks allowed over one connection, {} failed; {} new connections saw {} serials; {} certificates issued",
        failures.len(),
        seen.len(),
        distinct.len(),
        issued.len()
    );
    assert_eq!(failures, Vec::<String>::new(), "{}", stack.logs());
    assert!(allowed > 100, "only {allowed} checks passed in 20 s");
    assert_eq!(
        long_lived.serials().len(),
        1,
        "the long-lived channel reconnected: {:?}",
        long_lived.serials()
    );
    assert!(
        distinct.len() >= 4,
        "new connections saw {} serials in 20 s: {distinct:?}",
        distinct.len()
    );
    for serial in &distinct {
        assert!(
            issued.contains(serial),
            "serial {serial} was not issued by the stand-in: {issued:?}"
        );
    }
    let last_seen = seen.last().expect("at least one connection");
    let position = issued
        .iter()
        .position(|serial| serial == last_seen)
        .expect("the last serial was issued");
    assert!(
        position + 2 >= issued.len(),
        "the last connection saw {last_seen}, but {} newer certificates exist",
        issued.len() - position - 1
    );
    let rotations = stack
        .metric("portcullis_certificate_rotations_total")
        .await
        .expect("rotation counter missing");
    assert_eq!(
        rotations as usize,
        issued.len() - 1,
        "one issued certificate is the client's"
    );
    let expiry = stack
        .metric("portcullis_certificate_expiry_timestamp_seconds")
        .await
        .expect("expiry gauge missing");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    assert!(expiry > now, "expiry {expiry} is in the past (now {now})");
    assert!(
        expiry <= now + 6.0,
        "expiry {expiry} is more than 6 s after {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_vault_keeps_current_certificate_until_it_returns() {
    let stack = Stack::start(VaultOptions::default(), "8s", "").await;
    let first = serial_of_new_connection(&stack)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    stack.vault.set_failure(Some(VaultFailure::Sealed));
    let (client, _) = stack.connect().await.expect("connecting failed");
    let traffic = Traffic::start(client);

    let failed = wait_for(Duration::from_secs(10), || async {
        stack
            .metric("portcullis_certificate_rotation_failures_total")
            .await
            .unwrap_or(0.0)
            >= 2.0
    })
    .await;
    assert!(failed, "no failed rotation was counted\n{}", stack.logs());
    assert_eq!(serial_of_new_connection(&stack).await, Ok(first.clone()));
    assert_eq!(stack.readiness().await, 200);
    assert!(
        stack
            .logs()
            .contains("certificate rotation failed; the current certificate keeps serving"),
        "{}",
        stack.logs()
    );
    assert!(stack.vault.counts().failed_requests >= 2);

    stack.vault.set_failure(None);
    let rotated = wait_for(Duration::from_secs(5), || async {
        serial_of_new_connection(&stack)
            .await
            .is_ok_and(|serial| serial != first)
    })
    .await;
    let (allowed, failures) = traffic.finish().await;

    assert!(
        rotated,
        "no new certificate after Vault returned\n{}",
        stack.logs()
    );
    assert_eq!(failures, Vec::<String>::new());
    assert!(allowed > 0);
    assert_eq!(stack.readiness().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_vault_withdraws_certificate_before_it_expires() {
    let stack = Stack::start(VaultOptions::default(), "6s", "").await;
    let (mut client, connections) = stack
        .connect()
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    check_allowed(&mut client)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    let first = connections.serials().pop().expect("one connection");
    let not_after = connections.last_not_after().expect("one connection");
    stack.vault.stop_listening();

    let withdrawn = wait_for(Duration::from_secs(12), || async {
        stack.readiness().await == 503
    })
    .await;
    let withdrawn_at = SystemTime::now();
    assert!(
        withdrawn,
        "portcullis stayed ready without a valid certificate\n{}",
        stack.logs()
    );
    let handshake = serial_of_new_connection(&stack).await;
    let handshake_at = SystemTime::now();
    assert!(
        withdrawn_at < not_after,
        "readiness turned false {:?} after the certificate expired",
        withdrawn_at.duration_since(not_after)
    );
    assert!(
        handshake_at < not_after,
        "the handshake was tried only after expiry; the test machine is too slow to tell"
    );
    assert!(
        handshake.is_err(),
        "a connection got certificate {handshake:?} after it was withdrawn"
    );
    assert_eq!(
        stack
            .metric("portcullis_certificate_expiry_timestamp_seconds")
            .await,
        Some(0.0)
    );
    assert!(
        stack
            .logs()
            .contains("the certificate is about to expire and no new one could be obtained"),
        "{}",
        stack.logs()
    );

    stack
        .vault
        .resume_listening()
        .await
        .expect("listening again failed");
    let ready = wait_for(Duration::from_secs(5), || async {
        stack.readiness().await == 200
    })
    .await;
    assert!(
        ready,
        "portcullis did not become ready after Vault returned\n{}",
        stack.logs()
    );
    let next = serial_of_new_connection(&stack)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    assert_ne!(next, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_at_max_ttl_is_replaced_by_a_new_login() {
    let options = VaultOptions {
        token_ttl: Duration::from_secs(3),
        token_max_ttl: Duration::from_secs(6),
        ..VaultOptions::default()
    };
    let stack = Stack::start(options, "4s", "").await;
    let (client, _) = stack.connect().await.expect("connecting failed");
    let traffic = Traffic::start(client);

    tokio::time::sleep(Duration::from_secs(15)).await;
    let (_, failures) = traffic.finish().await;

    let counts = stack.vault.counts();
    eprintln!(
        "token figures: {} logins, {} renewals, {} certificates issued in 15 s",
        counts.logins,
        counts.renewals,
        counts.issued.len()
    );
    assert_eq!(failures, Vec::<String>::new());
    assert!(
        counts.logins >= 3,
        "{} logins in 15 s with a 6 s max TTL\n{}",
        counts.logins,
        stack.logs()
    );
    assert!(
        counts.renewals >= 2,
        "{} renewals\n{}",
        counts.renewals,
        stack.logs()
    );
    assert!(
        counts.issued.len() >= 5,
        "only {} certificates issued in 15 s\n{}",
        counts.issued.len(),
        stack.logs()
    );
    assert_eq!(
        stack
            .metric("portcullis_vault_logins_total{method=\"kubernetes\",outcome=\"success\"}")
            .await,
        Some(counts.logins as f64)
    );
    let serial = serial_of_new_connection(&stack)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    assert!(stack.vault.counts().issued.contains(&serial));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login_reads_secret_id_from_file() {
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");
    let secret_id_file = dir.path().join("secret-id");
    std::fs::write(&secret_id_file, "portcullis-secret-id\n")
        .expect("writing the secret ID failed");
    let auth = format!(
        "    method: approle\n    role_id: portcullis-role-id\n    secret_id_file: {:?}\n",
        secret_id_file.display().to_string()
    );

    let stack = Stack::start(VaultOptions::default(), "1h", &auth).await;

    assert_eq!(stack.vault.counts().logins, 1);
    assert_eq!(
        serial_of_new_connection(&stack)
            .await
            .map(|serial| stack.vault.counts().issued[0] == serial),
        Ok(true)
    );
    assert_eq!(
        stack
            .metric("portcullis_vault_logins_total{method=\"approle\",outcome=\"success\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_change_with_overlapping_bundle_breaks_no_connection() {
    let stack = Stack::start(VaultOptions::default(), "6s", "").await;
    let old_client = stack.client.clone();
    let (client, long_lived) = stack.connect().await.expect("connecting failed");
    let traffic = Traffic::start(client);

    stack.vault.rotate_ca();
    let new_client = stack
        .vault
        .issue_files(
            stack.dir.path(),
            "client-new-ca",
            &["client.test"],
            Duration::from_secs(3600),
        )
        .expect("issuing failed");
    let both_cas = stack.vault.ca_bundle_pem();
    let issued_before = stack.vault.counts().issued.len();
    let rotated = wait_for(Duration::from_secs(10), || async {
        stack.vault.counts().issued.len() > issued_before
    })
    .await;
    assert!(
        rotated,
        "portcullis did not rotate after the CA change\n{}",
        stack.logs()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Old-CA and new-CA client certificates are both accepted while the chain lists both.
    for (name, identity) in [("old CA", &old_client), ("new CA", &new_client)] {
        let (mut client, _) = connect(stack.portcullis.grpc_address(), identity, &both_cas)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(
            check_allowed(&mut client).await,
            Ok(()),
            "{name}\n{}",
            stack.logs()
        );
    }

    // Vault drops the old CA from its chain. portcullis keeps trusting it for a certificate
    // lifetime, so the old-CA client still connects after the next rotation.
    stack.vault.retire_old_cas();
    let issued_before = stack.vault.counts().issued.len();
    let rotated = wait_for(Duration::from_secs(10), || async {
        stack.vault.counts().issued.len() > issued_before
    })
    .await;
    assert!(
        rotated,
        "no rotation after the old CA was retired\n{}",
        stack.logs()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut client, connections) =
        connect(stack.portcullis.grpc_address(), &old_client, &both_cas)
            .await
            .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(check_allowed(&mut client).await, Ok(()), "{}", stack.logs());
    let (allowed, failures) = traffic.finish().await;

    assert_eq!(failures, Vec::<String>::new());
    assert!(allowed > 50, "only {allowed} checks passed");
    assert_eq!(long_lived.serials().len(), 1);
    assert!(
        stack
            .logs()
            .contains("the CA chain changed; trusting the old and the new roots"),
        "{}",
        stack.logs()
    );
    let serial = connections.serials().pop().expect("one connection");
    assert!(stack.vault.counts().issued.contains(&serial));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_rejected() {
    let stack = Stack::start(VaultOptions::default(), "1h", "").await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(stack.vault.ca_bundle_pem().as_bytes()) {
        roots
            .add(certificate.expect("valid PEM"))
            .expect("valid root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];

    let tcp = tokio::net::TcpStream::connect(stack.portcullis.grpc_address())
        .await
        .expect("connecting failed");
    let name = ServerName::try_from(SERVER_NAME).expect("valid name");
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // TLS 1.3 reports the server's rejection of the missing certificate on the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buffer = [0u8; 16];
        tls.read(&mut buffer).await
    }
    .await;

    assert!(
        result.is_err(),
        "a client without a certificate got {result:?}"
    );
    let rejected = wait_for(Duration::from_secs(2), || async {
        stack.logs().contains("TLS handshake failed")
    })
    .await;
    assert!(rejected, "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_are_reloaded_when_they_change() {
    let dir = tempfile::tempdir().expect("creating a temporary folder failed");
    // The stand-in serves only as a CA here: portcullis reads files and never calls Vault.
    let ca = VaultStandIn::start(VaultOptions::default())
        .await
        .expect("starting the Vault stand-in failed");
    let server = ca
        .issue_files(
            dir.path(),
            "server",
            &[SERVER_NAME],
            Duration::from_secs(3600),
        )
        .expect("issuing failed");
    let client = ca
        .issue_files(
            dir.path(),
            "client",
            &["client.test"],
            Duration::from_secs(3600),
        )
        .expect("issuing failed");
    let bundle = dir.path().join("bundle");
    write_bundle(&bundle, "r1", ALLOW_ALL).expect("writing the bundle failed");
    let mut options = PortcullisOptions::new(&bundle);
    options.log_level = "info,portcullis=debug,portcullis_pki=debug".to_owned();
    options.extra_config = format!(
        "tls:\n  cert_file: {cert:?}\n  key_file: {key:?}\n  ca_file: {ca:?}\n  reload_interval: 200ms\n",
        cert = server.certificate.display().to_string(),
        key = server.private_key.display().to_string(),
        ca = server.ca_bundle.display().to_string(),
    );
    let binary = Portcullis::binary().unwrap_or_else(|error| panic!("{error}"));
    let portcullis = Portcullis::start(&binary, &options)
        .await
        .unwrap_or_else(|error| panic!("starting portcullis failed: {error}"));
    let ca_pem = ca.ca_bundle_pem();
    let (mut first_client, first_connections) =
        connect(portcullis.grpc_address(), &client, &ca_pem)
            .await
            .unwrap_or_else(|error| panic!("{error}\n{}", portcullis.log_tail()));
    assert_eq!(check_allowed(&mut first_client).await, Ok(()));
    let traffic = Traffic::start(first_client);

    let next_dir = tempfile::tempdir().expect("creating a temporary folder failed");
    let next = ca
        .issue_files(
            next_dir.path(),
            "server",
            &[SERVER_NAME],
            Duration::from_secs(3600),
        )
        .expect("issuing failed");
    std::fs::copy(&next.certificate, &server.certificate)
        .expect("replacing the certificate failed");
    std::fs::copy(&next.private_key, &server.private_key).expect("replacing the key failed");
    let reloaded = wait_for(Duration::from_secs(5), || async {
        let Ok((mut client, connections)) =
            connect(portcullis.grpc_address(), &client, &ca_pem).await
        else {
            return false;
        };
        check_allowed(&mut client).await.is_ok()
            && connections.serials() == vec![next.serial.clone()]
    })
    .await;
    let (allowed, failures) = traffic.finish().await;

    assert!(
        reloaded,
        "new connections never saw serial {}\n{}",
        next.serial,
        portcullis.log_tail()
    );
    assert_eq!(first_connections.serials(), vec![server.serial.clone()]);
    assert_eq!(failures, Vec::<String>::new());
    assert!(allowed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_client_is_rejected_on_mtls_listener() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stack = Stack::start(VaultOptions::default(), "1h", "").await;
    let mut tcp = tokio::net::TcpStream::connect(stack.portcullis.grpc_address())
        .await
        .expect("connecting failed");

    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("sending the preface failed");
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut received)).await;

    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection stayed open or sent data: {read:?}"
    );
    assert_eq!(received, Vec::<u8>::new());
    let logged = wait_for(Duration::from_secs(2), || async {
        stack
            .logs()
            .contains("rejected a cleartext connection: this listener requires mTLS")
    })
    .await;
    assert!(logged, "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_over_https_is_verified_with_ca_file() {
    let options = VaultOptions {
        https: true,
        ..VaultOptions::default()
    };

    let stack = Stack::start(options, "1h", "").await;

    assert!(stack.vault.address().starts_with("https://127.0.0.1:"));
    let serial = serial_of_new_connection(&stack)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    assert_eq!(stack.vault.counts().issued.first(), Some(&serial));
    assert_eq!(stack.vault.counts().logins, 1);
}
