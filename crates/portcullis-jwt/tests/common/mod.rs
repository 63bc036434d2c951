//! Helpers shared by the integration tests: test-only keys, token signing, and a JWKS server on
//! 127.0.0.1 whose responses the test controls.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "orders";
/// Unix time used as "now" by tests with a manual clock.
pub const NOW: u64 = 1_700_000_000;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A test-only private key from `tests/fixtures/keys`, with the public JWK derived from it.
#[derive(Clone)]
pub struct TestKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    public_jwk: Value,
}

impl TestKey {
    pub fn load(file: &str, kid: &str, algorithm: Algorithm) -> Self {
        let pem = std::fs::read(fixture_path(&format!("keys/{file}.pem")))
            .expect("test key file is readable");
        let encoding = match algorithm {
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .expect("test key parses");
        let jwk = Jwk::from_encoding_key(&encoding, algorithm)
            .expect("public JWK derives from the test key");
        let mut public_jwk = serde_json::to_value(jwk).expect("JWK serializes");
        public_jwk["kid"] = json!(kid);
        public_jwk["use"] = json!("sig");
        Self {
            kid: kid.to_owned(),
            algorithm,
            encoding,
            public_jwk,
        }
    }

    pub fn rsa(kid: &str) -> Self {
        Self::load("rsa-a", kid, Algorithm::RS256)
    }

    /// Returns the public JWK with `kid`, `use: sig` and `alg`.
    pub fn jwk(&self) -> Value {
        self.public_jwk.clone()
    }

    /// Returns the public JWK without `alg`, so that only its type and curve restrict the algorithm.
    pub fn jwk_without_alg(&self) -> Value {
        let mut jwk = self.public_jwk.clone();
        jwk.as_object_mut().unwrap().remove("alg");
        jwk
    }

    /// Signs `claims` with the default header `{alg, kid, typ: JWT}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": alg_name(self.algorithm), "kid": self.kid, "typ": "JWT"});
        sign_raw(&header, claims, &self.encoding, self.algorithm)
    }

    /// Signs `claims` with the key's algorithm under an arbitrary header.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        sign_raw(header, claims, &self.encoding, self.algorithm)
    }
}

pub fn alg_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        other => panic!("no name for {other:?}"),
    }
}

/// Builds a compact JWS from any header, signing with `key` under `algorithm`.
pub fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, algorithm: Algorithm) -> String {
    let signing_input = format!("{}.{}", encode_json(header), encode_json(claims));
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, algorithm)
        .expect("test token signs");
    format!("{signing_input}.{signature}")
}

pub fn encode_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Claims valid at [`NOW`] for [`ISSUER`] and [`AUDIENCE`].
pub fn valid_claims() -> Value {
    json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": NOW - 10,
        "exp": NOW + 300,
    })
}

/// Claims valid now by the system clock.
pub fn claims_now(issuer: &str, subject: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({"iss": issuer, "sub": subject, "aud": AUDIENCE, "iat": now, "exp": now + 600})
}

pub fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// The JWKS server's response at a given moment.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub cache_control: Option<String>,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: String) -> Self {
        Self {
            status: 200,
            body,
            cache_control: None,
            delay: Duration::ZERO,
        }
    }
}

struct ServerState {
    jwks: Mutex<Reply>,
    discovery_issuer: Mutex<Option<String>>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
}

/// An HTTP or HTTPS server on 127.0.0.1 serving `/jwks` and `/.well-known/openid-configuration`.
pub struct JwksServer {
    pub address: SocketAddr,
    scheme: &'static str,
    state: Arc<ServerState>,
    task: JoinHandle<()>,
}

impl JwksServer {
    /// Starts a plain HTTP server.
    pub async fn start(reply: Reply) -> Self {
        Self::start_with(reply, None).await
    }

    /// Starts an HTTPS server with the test-only certificate for 127.0.0.1 from
    /// `tests/fixtures/tls`, signed by the test-only CA in `ca.pem`.
    pub async fn start_tls(reply: Reply) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let certificates = CertificateDer::pem_file_iter(fixture_path("tls/server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(fixture_path("tls/server-key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .expect("test certificate and key match");
        Self::start_with(
            reply,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn start_with(reply: Reply, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            jwks: Mutex::new(reply),
            discovery_issuer: Mutex::new(None),
            jwks_fetches: AtomicUsize::new(0),
            discovery_fetches: AtomicUsize::new(0),
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = served.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| answer(state.clone(), request));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self {
            address,
            scheme,
            state,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.address)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base_url())
    }

    pub fn set_reply(&self, reply: Reply) {
        *self.state.jwks.lock().unwrap() = reply;
    }

    pub fn set_jwks(&self, body: String) {
        self.set_reply(Reply::ok(body));
    }

    /// Serves a discovery document naming `issuer` and this server's `/jwks`.
    pub fn serve_discovery(&self, issuer: &str) {
        *self.state.discovery_issuer.lock().unwrap() = Some(issuer.to_owned());
    }

    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    pub fn discovery_fetches(&self) -> usize {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    state: Arc<ServerState>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let local = request
        .headers()
        .get("host")
        .and_then(|host| host.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    if path.ends_with("/.well-known/openid-configuration") {
        state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
        let issuer = state.discovery_issuer.lock().unwrap().clone();
        return Ok(match issuer {
            Some(issuer) => {
                let document =
                    json!({"issuer": issuer, "jwks_uri": format!("http://{local}/jwks")});
                Response::new(Full::new(Bytes::from(document.to_string())))
            }
            None => status_response(404, ""),
        });
    }
    if path != "/jwks" {
        return Ok(status_response(404, ""));
    }

    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let reply = state.jwks.lock().unwrap().clone();
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = status_response(reply.status, &reply.body);
    if let Some(cache_control) = reply.cache_control {
        response
            .headers_mut()
            .insert("cache-control", cache_control.parse().unwrap());
    }
    Ok(response)
}

fn status_response(status: u16, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}
