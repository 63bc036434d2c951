//! The HTTPS server of the webhook: `POST /mutate` and `GET /healthz`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{InjectorConfig, InjectorOptions};
use crate::error::InjectError;
use crate::review::mutate;
use crate::tls::{Reload, ReloadingCertificate};

/// Largest AdmissionReview accepted. The API server limits an object to about 3 MiB and a
/// review carries at most the object and its old version, so 8 MiB leaves room for both.
const MAX_REVIEW_BYTES: usize = 8 * 1024 * 1024;
/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send the request headers on HTTP/1.1.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time requests in flight may take to finish after the shutdown signal. The API server's
/// webhook timeout is at most 30 seconds, so a longer wait would not save any request.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (such as too many open files), so that the loop does not
/// spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// A bound webhook server; [`Injector::run`] serves it.
pub struct Injector {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: TlsAcceptor,
    certificate: Arc<ReloadingCertificate>,
    reload_interval: Duration,
    config: Arc<InjectorConfig>,
}

/// Binds the webhook listener and serves AdmissionReviews until `shutdown` completes.
///
/// Returns an error when the certificate cannot be loaded or the address cannot be bound.
/// After `shutdown`, requests in flight get up to 30 seconds to finish.
pub async fn serve(
    options: InjectorOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InjectError> {
    Injector::bind(options).await?.run(shutdown).await
}

impl Injector {
    /// Loads the certificate and binds `options.listen.address` (port 0 picks a free port).
    pub async fn bind(options: InjectorOptions) -> Result<Self, InjectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(ReloadingCertificate::load(
            &options.tls.cert_file,
            &options.tls.key_file,
            Arc::clone(&provider),
        )?);

        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let address = options.listen.address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| InjectError::Bind { address, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| InjectError::Bind { address, source })?;

        Ok(Injector {
            listener,
            local_addr,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            certificate,
            reload_interval: options.tls.reload_interval,
            config: Arc::new(options.injection),
        })
    }

    /// Returns the bound address, with the port the system picked for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves connections until `shutdown` completes, then waits for requests in flight.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), InjectError> {
        let graceful = GracefulShutdown::new();
        let mut reload = tokio::time::interval_at(
            tokio::time::Instant::now() + self.reload_interval,
            self.reload_interval,
        );
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        tracing::info!(listen.address = %self.local_addr, "admission webhook listening");

        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = reload.tick() => self.reload_certificate(),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.spawn_connection(stream, peer, &graceful),
                    Err(error) => {
                        tracing::warn!(listen.address = %self.local_addr, %error, "accepting a connection failed");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    }
                },
            }
        }

        tracing::info!("admission webhook stopping; waiting for requests in flight");
        drop(self.listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?DRAIN_TIMEOUT,
                "requests still in flight after the drain timeout were dropped"
            );
        }
        Ok(())
    }

    fn reload_certificate(&self) {
        match self.certificate.reload() {
            Ok(Reload::Replaced) => tracing::info!("serving a renewed webhook certificate"),
            Ok(Reload::Unchanged) => {}
            Err(error) => tracing::warn!(
                %error,
                "reloading the webhook certificate failed; the previous one stays in use"
            ),
        }
    }

    fn spawn_connection(&self, stream: TcpStream, peer: SocketAddr, graceful: &GracefulShutdown) {
        let acceptor = self.acceptor.clone();
        let config = Arc::clone(&self.config);
        let watcher = graceful.watcher();

        tokio::spawn(async move {
            let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(error)) => {
                    tracing::warn!(client.address = %peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(client.address = %peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                    return;
                }
            };

            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let service = service_fn(move |request| handle(request, Arc::clone(&config)));
            let connection = builder.serve_connection(TokioIo::new(tls_stream), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(client.address = %peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    config: Arc<InjectorConfig>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::POST, "/mutate") => review(request, &config).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (_, "/mutate") | (_, "/healthz") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the webhook serves POST /mutate and GET /healthz\n",
        ),
    };
    Ok(response)
}

async fn review(request: Request<Incoming>, config: &InjectorConfig) -> Response<Full<Bytes>> {
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            tracing::warn!(
                limit = MAX_REVIEW_BYTES,
                "rejected an AdmissionReview above the size limit"
            );
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is larger than {MAX_REVIEW_BYTES} bytes\n"),
            );
        }
        Err(error) => {
            tracing::warn!(%error, "reading an AdmissionReview failed");
            return text(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body failed: {error}\n"),
            );
        }
    };
    let review: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => {
            tracing::warn!(%error, "received a request body that is not JSON");
            return text(
                StatusCode::BAD_REQUEST,
                &format!("the request body is not a JSON AdmissionReview: {error}\n"),
            );
        }
    };

    let answer = mutate(&review, config);
    let body =
        serde_json::to_vec(&answer).expect("serializing a JSON value to a vector cannot fail");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
