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
use crate::config::{AuditConfig, Config, JwtConfig, SinkKind};
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

/// Opens the configured decision sink.
pub fn open_sink(config: &AuditConfig) -> Result<Arc<dyn DecisionSink>, String> {
    Ok(match config.sink {
        SinkKind::None => Arc::new(NullSink),
        SinkKind::Stdout => Arc::new(StdoutSink::new()),
        SinkKind::File => {
            let path = config.path.as_deref().ok_or("audit.path is not set")?;
            Arc::new(FileSink::open(path, config.fsync).map_err(|error| error.to_string())?)
        }
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
    info!(bundle = %config.policy.bundle.display(), bundle.revision = policy.revision(), decision = %config.policy.decision, "policy bundle loaded");

    let sink = match open_sink(&config.audit) {
        Ok(sink) => sink,
        Err(message) => {
            error!(error = %message, "cannot open the decision event sink; stopping");
            return EXIT_FAILURE;
        }
    };

    let metrics = Arc::new(Metrics::new());
    metrics.set_bundle_revision(policy.revision());
    let store = Arc::new(PolicyStore::new(policy));

    let mut authorizer = Authorizer::new(Arc::clone(&store), Arc::clone(&sink), Arc::clone(&metrics) as _, config.audit.timeout);
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

    if let Some(address) = config.listen.address {
        let (local, incoming) = match listener::bind_tcp(address).await {
            Ok(bound) => bound,
            Err(error) => {
                error!(listen.address = %address, %error, "cannot bind the ext_authz listener; is another process using the port?");
                return EXIT_FAILURE;
            }
        };
        info!(listen.address = %local, "ext_authz gRPC listening on TCP");
        let router = Server::builder().layer(GrpcOnlyLayer).add_service(authz.clone()).add_service(health_service.clone());
        servers.spawn(router.serve_with_incoming_shutdown(incoming, stopped(servers_stopped.clone())));
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

    readiness.set(true);
    metrics.set_ready(true);
    info!("ready");

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
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    }

    let flushed = tokio::time::timeout(config.shutdown.timeout, sink.flush()).await;
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
