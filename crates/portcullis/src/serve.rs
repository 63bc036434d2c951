//! `portcullis serve`: start-up, the listeners, and the shutdown sequence.

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use portcullis_audit::{DecisionSink, FileSink, NullSink, StdoutSink};
use portcullis_authz::grpc::CheckServer;
use portcullis_authz::service::{Authorizer, AuthzService};
use portcullis_policy::{BundleWatcher, Policy, PolicyStore, load_bundle};
use tokio::sync::watch;
use tonic::transport::Server;
use tracing::{error, info, warn};

use crate::admin::{self, Readiness};
use crate::config::{AuditConfig, AuditMode, Config, JwtConfig, TlsConfig, TlsSource};
use portcullis_pki::vault::VaultSession;
use portcullis_kafka::RotatingClientCertificate;
use portcullis_pki::{CertificateRotator, CertificateSource, CertificateStore, Clock, FileSource, PkiObserver, RotatedCertificate, SystemClock};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use portcullis_authz::identity::Authentication;
use portcullis_jwt::{JwtObserver, Verifier};
use crate::metrics::Metrics;
use crate::{EXIT_BUNDLE, EXIT_CONFIG, EXIT_FAILURE, listener, logging};

/// Runs the sidecar until SIGTERM or SIGINT and returns the process exit code.
pub fn run(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("portcullis: {error}");
            return EXIT_CONFIG;
        }
    };
    logging::init(&config.log);

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the async runtime");
            return EXIT_FAILURE;
        }
    };
    runtime.block_on(serve(config))
}

/// Loads and compiles the bundle named by the policy configuration.
pub fn load_policy(bundle: &Path, decision: &str) -> Result<Policy, String> {
    let loaded = load_bundle(bundle).map_err(|error| format!("cannot load policy bundle {}: {error}", bundle.display()))?;
    Policy::compile(&loaded, decision).map_err(|error| format!("cannot compile policy bundle {}: {error}", bundle.display()))
}

/// Builds the token verifier of the `jwt` section and fetches the providers' keys once.
/// A provider whose keys cannot be fetched is logged; its tokens are rejected until a
/// background retry succeeds.
pub async fn start_authentication(jwt: &JwtConfig, observer: Arc<dyn JwtObserver>) -> Result<Authentication, String> {
    let verifier = Verifier::builder(jwt.verifier.clone())
        .observer(observer)
        .build()
        .map_err(|error| error.to_string())?;
    for status in verifier.start().await {
        if status.usable {
            info!(jwt.provider = %status.provider, keys = status.key_count, skipped = status.skipped_keys.len(), "JWT provider keys loaded");
        } else {
            let error = status.last_error.map(|error| error.to_string()).unwrap_or_default();
            warn!(jwt.provider = %status.provider, %error, "JWT provider keys not available yet; its tokens are rejected until a retry succeeds");
        }
        for skipped in &status.skipped_keys {
            warn!(jwt.provider = %status.provider, key = ?skipped, "JWKS key skipped");
        }
    }
    Ok(Authentication { verifier: Arc::new(verifier), on_invalid_token: jwt.invalid_token })
}

/// Opens the configured decision sink: the audit pipeline for the `spool` and `kafka` modes.
/// Must run inside the Tokio runtime, which the pipeline's shipper and timer use.
pub fn open_sink(config: &AuditConfig, metrics: &Arc<Metrics>) -> Result<Arc<dyn DecisionSink>, String> {
    Ok(match config.mode {
        AuditMode::None => Arc::new(NullSink),
        AuditMode::Stdout => Arc::new(StdoutSink::new(&config.instance_id)),
        AuditMode::File => {
            let path = config.path.as_deref().ok_or("audit.path is not set")?;
            Arc::new(FileSink::open(path, config.fsync, &config.instance_id).map_err(|error| error.to_string())?)
        }
        AuditMode::Spool | AuditMode::Kafka => Arc::new(crate::audit::start_pipeline(config, metrics)?),
    })
}

async fn serve(config: Config) -> u8 {
    info!(version = env!("CARGO_PKG_VERSION"), "portcullis starting");

    let policy = match load_policy(&config.policy.bundle, &config.policy.decision) {
        Ok(policy) => policy,
        Err(message) => {
            error!(error = %message, "no valid policy bundle at start-up; stopping");
            eprintln!("portcullis: {message}");
            return EXIT_BUNDLE;
        }
    };
    info!(bundle = %config.policy.bundle.display(), bundle.revision = policy.revision(), decision = %config.policy.decision, policy.engine = policy.engine_name(), "policy bundle loaded");

    let metrics = Arc::new(Metrics::new());
    let sink = match open_sink(&config.audit, &metrics) {
        Ok(sink) => sink,
        Err(message) => {
            error!(error = %message, "cannot open the decision event sink; stopping");
            return EXIT_FAILURE;
        }
    };

    metrics.set_bundle_revision(policy.revision());
    let store = Arc::new(PolicyStore::new(policy));

    let mut authorizer = Authorizer::new(Arc::clone(&store), Arc::clone(&sink), Arc::clone(&metrics) as _, config.audit.timeout)
        .with_event_options(config.audit.events.clone());
    if let Some(jwt) = &config.jwt {
        match start_authentication(jwt, Arc::clone(&metrics) as _).await {
            Ok(authentication) => authorizer = authorizer.with_authentication(authentication),
            Err(message) => {
                error!(error = %message, "invalid JWT configuration; stopping");
                return EXIT_CONFIG;
            }
        }
    }
    let authorizer = Arc::new(authorizer);
    let authz = CheckServer::new(AuthzService::new(authorizer), config.listen.max_message_bytes);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CheckServer>().await;

    let readiness = Arc::new(Readiness::default());
    let (stop_servers, servers_stopped) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();

    let certificates = match &config.tls {
        Some(tls) => match build_certificates(tls, Arc::clone(&metrics) as _) {
            Ok((store, mut rotator)) => {
                // Registered before the rotator starts, so the producer gets the first
                // certificate too.
                if let Some(client_certificate) = kafka_listener_certificate(&config) {
                    rotator.on_rotation(Arc::new(move |rotated: &RotatedCertificate| {
                        client_certificate.install(rotated.certificate_chain_pem.clone(), rotated.private_key_pem.expose().clone());
                    }));
                    info!("the Kafka producer uses the listener's client certificate and is rebuilt after each rotation");
                }
                Some((store, rotator.spawn()))
            }
            Err(message) => {
                error!(error = %message, "cannot start mTLS certificate rotation; stopping");
                return EXIT_CONFIG;
            }
        },
        None => None,
    };

    if let Some(address) = config.listen.address {
        let router = Server::builder().layer(GrpcOnlyLayer).add_service(authz.clone()).add_service(health_service.clone());
        let bound = match &certificates {
            Some((store, _)) => bind_mtls(address, store).await.map(|(local, incoming)| {
                info!(listen.address = %local, "ext_authz gRPC listening on TCP with mTLS");
                servers.spawn(router.serve_with_incoming_shutdown(incoming, stopped(servers_stopped.clone())));
            }),
            None => listener::bind_tcp(address).await.map(|(local, incoming)| {
                if !local.ip().is_loopback() {
                    warn!(listen.address = %local, "ext_authz gRPC listening on a non-loopback address without TLS; any host that reaches this port can ask for decisions, so configure tls or bind to loopback");
                } else {
                    info!(listen.address = %local, "ext_authz gRPC listening on TCP");
                }
                servers.spawn(router.serve_with_incoming_shutdown(incoming, stopped(servers_stopped.clone())));
            }),
        };
        if let Err(error) = bound {
            error!(listen.address = %address, %error, "cannot bind the ext_authz listener; is another process using the port?");
            return EXIT_FAILURE;
        }
    }
    if let Some(path) = &config.listen.unix_socket {
        let incoming = match listener::bind_unix(path) {
            Ok(incoming) => incoming,
            Err(error) => {
                error!(listen.unix_socket = %path.display(), %error, "cannot bind the ext_authz Unix socket");
                return EXIT_FAILURE;
            }
        };
        info!(listen.unix_socket = %path.display(), "ext_authz gRPC listening on a Unix socket");
        let router = Server::builder().layer(GrpcOnlyLayer).add_service(authz.clone()).add_service(health_service.clone());
        servers.spawn(router.serve_with_incoming_shutdown(incoming, stopped(servers_stopped.clone())));
    }

    let admin = match config.admin.address {
        Some(address) => match tokio::net::TcpListener::bind(address).await {
            Ok(bound) => {
                info!(admin.address = %bound.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening");
                Some(tokio::spawn(admin::serve(bound, Arc::clone(&readiness), Arc::clone(&metrics), stopped(servers_stopped.clone()))))
            }
            Err(error) => {
                error!(admin.address = %address, %error, "cannot bind the admin listener");
                return EXIT_FAILURE;
            }
        },
        None => None,
    };

    let watcher = (!config.policy.reload_interval.is_zero()).then(|| {
        BundleWatcher::spawn(
            Arc::clone(&store),
            config.policy.bundle.clone(),
            config.policy.decision.clone(),
            config.policy.reload_interval,
            Arc::clone(&metrics) as _,
        )
    });

    let audit_ready = sink.ready();
    let readiness_follower = match &certificates {
        Some((store, _)) => {
            let served = store.readiness();
            let (readiness, metrics) = (Arc::clone(&readiness), Arc::clone(&metrics));
            Some(tokio::spawn(async move {
                wait_for_audit(audit_ready).await;
                follow_certificate_readiness(served, readiness, metrics).await;
            }))
        }
        None => {
            let (readiness, metrics) = (Arc::clone(&readiness), Arc::clone(&metrics));
            Some(tokio::spawn(async move {
                wait_for_audit(audit_ready).await;
                readiness.set(true);
                metrics.set_ready(true);
                info!("ready");
            }))
        }
    };

    let exit = tokio::select! {
        signal = termination_signal() => {
            info!(signal, drain = ?config.shutdown.drain, "shutting down: not ready, still responding to checks while the drain lasts");
            None
        }
        Some(result) = servers.join_next() => {
            error!(?result, "an ext_authz listener stopped unexpectedly");
            Some(EXIT_FAILURE)
        }
    };

    if let Some(follower) = readiness_follower {
        follower.abort();
    }
    readiness.set(false);
    metrics.set_ready(false);
    health.set_not_serving::<CheckServer>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    if exit.is_none() {
        tokio::select! {
            _ = tokio::time::sleep(config.shutdown.drain) => {}
            signal = termination_signal() => warn!(signal, "second signal: ending the drain early"),
        }
    }

    let _ = stop_servers.send(true);
    let finished = tokio::time::timeout(config.shutdown.timeout, async {
        while let Some(result) = servers.join_next().await {
            if let Ok(Err(error)) = result {
                warn!(%error, "ext_authz listener ended with an error");
            }
        }
    })
    .await;
    if finished.is_err() {
        warn!(timeout = ?config.shutdown.timeout, "checks still in flight at the shutdown timeout were dropped");
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    if let Some((_, rotator)) = certificates {
        rotator.stop();
    }
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    }

    // Closing writes the audit pipeline's shutdown checkpoint; other sinks only flush.
    let flushed = tokio::time::timeout(config.shutdown.timeout, sink.close()).await;
    match flushed {
        Ok(Ok(())) => info!(sink = sink.name(), "decision events flushed"),
        Ok(Err(error)) => error!(sink = sink.name(), %error, "flushing decision events failed"),
        Err(_) => error!(sink = sink.name(), "flushing decision events timed out"),
    }
    if let Some(path) = &config.listen.unix_socket {
        listener::remove_socket(path);
    }
    info!("stopped");
    exit.unwrap_or(0)
}

/// Builds the certificate store and its rotator for the `tls` section. Once spawned, the
/// rotator requests the first certificate at once. Until it is installed, handshakes fail and
/// the sidecar is not ready.
///
/// Clients that cannot use the store's rustls resolvers (a librdkafka producer, which reads
/// PEM and cannot swap its certificate in place) register a hook with
/// `CertificateRotator::on_rotation` before the rotator is spawned, and rebuild themselves
/// there.
fn build_certificates(tls: &TlsConfig, observer: Arc<dyn PkiObserver>) -> Result<(Arc<CertificateStore>, CertificateRotator), String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = CertificateStore::new(Arc::clone(&clock), portcullis_pki::crypto_provider());
    let mut extra_roots = Vec::new();
    for path in &tls.extra_roots_files {
        let pem = std::fs::read_to_string(path).map_err(|error| format!("cannot read tls.extra_roots_files entry {}: {error}", path.display()))?;
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("invalid PEM in tls.extra_roots_files entry {}: {error}", path.display()))?;
        extra_roots.extend(roots);
    }
    let source = match &tls.source {
        TlsSource::Vault { vault, issue } => {
            info!(vault.address = %vault.address, vault.auth = vault.auth.method(), pki.mount = %issue.mount, pki.role = %issue.role, "mTLS certificates come from Vault PKI");
            let session = VaultSession::new(vault.clone(), Arc::clone(&observer), Arc::clone(&clock)).map_err(|error| error.to_string())?;
            CertificateSource::Vault { session: Box::new(session), issue: issue.clone() }
        }
        TlsSource::Files(files) => {
            info!(tls.cert_file = %files.cert_file.display(), "mTLS certificates come from files");
            CertificateSource::Files(FileSource::new(files.clone()))
        }
    };
    let rotator = CertificateRotator::new(source, Arc::clone(&store), tls.rotation.clone(), extra_roots, observer, clock);
    Ok((store, rotator))
}

/// Returns the Kafka client certificate slot when `audit.kafka.tls.use_listener_certificate`
/// is set.
fn kafka_listener_certificate(config: &Config) -> Option<RotatingClientCertificate> {
    config.audit.kafka.as_ref()?.connection.tls.as_ref()?.rotating_certificate.clone()
}

/// Binds the mTLS listener with a rustls configuration backed by the certificate store.
async fn bind_mtls(
    address: std::net::SocketAddr,
    store: &Arc<CertificateStore>,
) -> std::io::Result<(std::net::SocketAddr, listener::Incoming<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>)> {
    let config = portcullis_pki::server_config(store).map_err(std::io::Error::other)?;
    listener::bind_tcp_tls(address, tokio_rustls::TlsAcceptor::from(Arc::new(config))).await
}

/// Waits until the decision sink can record events, saying why readiness waits when that
/// takes a while (Kafka not reachable in `kafka` mode without a spool).
async fn wait_for_audit(ready: futures::future::BoxFuture<'static, ()>) {
    let mut ready = ready;
    if tokio::time::timeout(std::time::Duration::from_secs(1), &mut ready).await.is_err() {
        warn!("not ready: waiting for Kafka to acknowledge the first audit record");
        ready.await;
    }
}

/// Keeps readiness equal to whether a certificate is served: false until the first one is
/// installed, and false again if one is withdrawn before its replacement arrives.
async fn follow_certificate_readiness(mut served: watch::Receiver<bool>, readiness: Arc<Readiness>, metrics: Arc<Metrics>) {
    loop {
        let ready = *served.borrow_and_update();
        readiness.set(ready);
        metrics.set_ready(ready);
        if ready {
            info!("ready");
        } else {
            warn!("not ready: no valid mTLS certificate to serve");
        }
        if served.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when the stop flag is set.
async fn stopped(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// Waits for SIGTERM or SIGINT and names it.
pub async fn termination_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("cannot install signal handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// Rejects HTTP/2 requests that are not gRPC (no `application/grpc` content type) with
/// 415 and a log line, instead of letting them fail deep inside the gRPC codec.
#[derive(Clone, Copy)]
struct GrpcOnlyLayer;

impl<S> tower::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcOnly { inner }
    }
}

#[derive(Clone)]
struct GrpcOnly<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcOnly<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let content_type = request.headers().get(http::header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("");
        if content_type.starts_with("application/grpc") {
            return Box::pin(self.inner.call(request));
        }
        warn!(
            http.method = %request.method(),
            http.path = %request.uri().path(),
            content_type,
            "rejected an HTTP/2 request that is not gRPC; this listener serves ext_authz over gRPC only"
        );
        let mut response = http::Response::new(tonic::body::Body::empty());
        *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
        Box::pin(async move { Ok(response) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_bundle_is_reported_with_its_path() {
        let error = load_policy(Path::new("/nonexistent/bundle"), "envoy/authz/allow").err().unwrap();
        assert!(error.starts_with("cannot load policy bundle /nonexistent/bundle:"), "{error}");
    }
}
