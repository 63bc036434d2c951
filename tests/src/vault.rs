//! A Vault stand-in for tests: an HTTP server on 127.0.0.1 that follows Vault's documented
//! HTTP API for the calls portcullis makes, and issues real X.509 certificates from its own CA.
//!
//! Real Vault cannot be installed on the test machines, so this server plays its part.
//! What it follows:
//! - `POST auth/kubernetes/login` (`role`, `jwt`), `POST auth/approle/login` (`role_id`,
//!   `secret_id`): return an `auth` block (`client_token`, `lease_duration`,
//!   `renewable`, ...), as Vault does.
//! - `POST`/`PUT auth/token/renew-self` (`increment`), `GET auth/token/lookup-self`: tokens
//!   have a TTL and a max TTL; a renewal is capped at the max TTL, and an expired token is
//!   rejected with 403 `permission denied`.
//! - `POST pki/issue/:role` (`common_name`, `alt_names`, `uri_sans`, `ttl`): a fresh P-256
//!   key and a certificate signed by the current CA, with the TTL capped at the role's max
//!   TTL. `expiration` is a number, or a quoted string when told to imitate the documentation
//!   sample.
//! - `GET pki/ca_chain`, `GET pki/ca/pem` (bare PEM) and `GET pki/cert/ca_chain` (JSON).
//! - `GET sys/health`: 200 when unsealed, 503 when sealed.
//! - Errors are `{"errors": [...]}` with Vault's status codes; `X-Vault-Token` is required
//!   where Vault requires it, and `X-Vault-Namespace` must match when a namespace is set.
//!
//! The listener speaks plain HTTP, or HTTPS with a certificate for 127.0.0.1 from a separate
//! server CA when [`VaultOptions::https`] is set.
//!
//! Fidelity limits: the Kubernetes login compares the JWT with an expected string instead of
//! asking the Kubernetes TokenReview API; policies are not evaluated (any valid token may
//! issue from any role); the role's allowed names are not checked; there are no leases,
//! no CRLs and no response wrapping; only the paths above exist (anything else is 404). A wrong namespace yields 404 for every path, which real Vault
//! only does for mounts that the namespace lacks.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::LaunchError;

/// Settings of the stand-in: the credentials it accepts and the TTLs it enforces.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// The Kubernetes auth role and the service account token it accepts.
    pub kubernetes_role: String,
    pub service_account_jwt: String,
    pub approle_role_id: String,
    pub approle_secret_id: String,
    /// TTL of tokens from a login, and their max TTL from creation.
    pub token_ttl: Duration,
    pub token_max_ttl: Duration,
    /// PKI mount path and role name.
    pub pki_mount: String,
    pub pki_role: String,
    /// The role's max TTL; a longer requested TTL is capped.
    pub certificate_max_ttl: Duration,
    /// When set, every request must carry this `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// Write `expiration` as a quoted string, as one of Vault's documentation samples does.
    pub expiration_as_string: bool,
    /// Serve HTTPS with a certificate for 127.0.0.1; see [`VaultStandIn::server_ca_pem`].
    pub https: bool,
}

impl Default for VaultOptions {
    fn default() -> Self {
        VaultOptions {
            kubernetes_role: "portcullis".to_owned(),
            service_account_jwt: "service-account-jwt".to_owned(),
            approle_role_id: "portcullis-role-id".to_owned(),
            approle_secret_id: "portcullis-secret-id".to_owned(),
            token_ttl: Duration::from_secs(3600),
            token_max_ttl: Duration::from_secs(24 * 3600),
            pki_mount: "pki".to_owned(),
            pki_role: "portcullis".to_owned(),
            certificate_max_ttl: Duration::from_secs(24 * 3600),
            namespace: None,
            expiration_as_string: false,
            https: false,
        }
    }
}

/// A failure the stand-in imitates on every path except `sys/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultFailure {
    /// 503 `Vault is sealed`.
    Sealed,
    /// 403 `permission denied`.
    Forbidden,
}

/// A certificate and key issued by the stand-in, written to files for a peer such as Envoy.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// Every CA the stand-in lists in its chain.
    pub ca_bundle: PathBuf,
    pub serial: String,
}

/// Counts of the requests the stand-in served, for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VaultCounts {
    pub logins: usize,
    pub renewals: usize,
    pub rejected_renewals: usize,
    /// Serial numbers of issued certificates, in order.
    pub issued: Vec<String>,
    /// Requests that got an imitated failure.
    pub failed_requests: usize,
}

struct Token {
    expires_at: SystemTime,
    max_expires_at: SystemTime,
    creation_ttl: Duration,
    created_at: SystemTime,
    accessor: String,
}

struct State {
    options: VaultOptions,
    /// The CAs in the chain, current last. Older ones stay until [`VaultStandIn::retire_old_cas`].
    cas: Vec<CertifiedIssuer<'static, KeyPair>>,
    tokens: HashMap<String, Token>,
    failure: Option<VaultFailure>,
    delay: Duration,
    counts: VaultCounts,
}

/// The stand-in server; it stops when dropped.
pub struct VaultStandIn {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    /// The HTTPS acceptor and the PEM of the CA that signed its certificate.
    https: Option<(tokio_rustls::TlsAcceptor, String)>,
}

impl VaultStandIn {
    /// Binds 127.0.0.1 on a port the kernel chooses and starts serving with a new CA.
    pub async fn start(options: VaultOptions) -> Result<Self, LaunchError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| {
                LaunchError::io("binding the Vault stand-in on 127.0.0.1:0", source)
            })?;
        let address = listener
            .local_addr()
            .map_err(|source| LaunchError::io("reading the Vault stand-in's address", source))?;
        let state = Arc::new(Mutex::new(State {
            options,
            cas: vec![new_ca(1)],
            tokens: HashMap::new(),
            failure: None,
            delay: Duration::ZERO,
            counts: VaultCounts::default(),
        }));
        let https = if options_https(&state) {
            Some(https_acceptor()?)
        } else {
            None
        };
        let acceptor = https.as_ref().map(|(acceptor, _)| acceptor.clone());
        let accept_task = tokio::spawn(accept_connections(listener, Arc::clone(&state), acceptor));
        Ok(VaultStandIn {
            address,
            state,
            accept_task: Mutex::new(Some(accept_task)),
            https,
        })
    }

    /// Returns the base address, such as `http://127.0.0.1:8200`, without `/v1`.
    pub fn address(&self) -> String {
        let scheme = if self.https.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.address)
    }

    /// Returns the PEM of the CA that signed the HTTPS certificate, or `None` over plain HTTP.
    pub fn server_ca_pem(&self) -> Option<String> {
        self.https.as_ref().map(|(_, pem)| pem.clone())
    }

    /// Makes every request except `sys/health` fail, or ends the failure with `None`.
    pub fn set_failure(&self, failure: Option<VaultFailure>) {
        self.lock().failure = failure;
    }

    /// Delays every answer by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Stops listening and closes open connections, so the port refuses connections.
    pub fn stop_listening(&self) {
        if let Some(task) = self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }

    /// Listens again on the same port after [`VaultStandIn::stop_listening`].
    pub async fn resume_listening(&self) -> Result<(), LaunchError> {
        let listener = TcpListener::bind(self.address).await.map_err(|source| {
            LaunchError::io(
                format!("binding the Vault stand-in on {} again", self.address),
                source,
            )
        })?;
        let acceptor = self.https.as_ref().map(|(acceptor, _)| acceptor.clone());
        let task = tokio::spawn(accept_connections(
            listener,
            Arc::clone(&self.state),
            acceptor,
        ));
        *self
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(())
    }

    /// Switches issuance to a new CA. The old CAs stay in `ca_chain` until
    /// [`VaultStandIn::retire_old_cas`], as they do during a planned CA rotation.
    pub fn rotate_ca(&self) {
        let mut state = self.lock();
        let generation = state.cas.len() + 1;
        state.cas.push(new_ca(generation));
    }

    /// Removes every CA but the current one from `ca_chain`.
    pub fn retire_old_cas(&self) {
        let mut state = self.lock();
        let current = state.cas.pop().expect("the stand-in always has a CA");
        state.cas = vec![current];
    }

    /// Returns the PEM of every CA in the chain, current last.
    pub fn ca_bundle_pem(&self) -> String {
        self.lock().cas.iter().map(|ca| ca.pem()).collect()
    }

    /// Changes the service account token that Kubernetes logins must present.
    pub fn set_service_account_jwt(&self, jwt: &str) {
        self.lock().options.service_account_jwt = jwt.to_owned();
    }

    /// Creates a token with the given TTL and max TTL, as `vault token create` would.
    pub fn create_token(&self, ttl: Duration, max_ttl: Duration) -> String {
        let mut state = self.lock();
        create_token(&mut state, ttl, max_ttl)
    }

    pub fn counts(&self) -> VaultCounts {
        self.lock().counts.clone()
    }

    /// Issues a certificate from the current CA and writes it, its key and the CA bundle to
    /// `dir` as `NAME.crt`, `NAME.key` and `NAME-ca.crt`.
    pub fn issue_files(
        &self,
        dir: &Path,
        name: &str,
        dns_names: &[&str],
        ttl: Duration,
    ) -> Result<IssuedFiles, LaunchError> {
        let (issued, bundle) = {
            let mut state = self.lock();
            let names: Vec<String> = dns_names.iter().map(|name| (*name).to_owned()).collect();
            let issued =
                issue_certificate(&mut state, name, &names, &[], ttl).map_err(|message| {
                    LaunchError::io("issuing a certificate", std::io::Error::other(message))
                })?;
            let bundle: String = state.cas.iter().map(|ca| ca.pem()).collect();
            (issued, bundle)
        };
        let files = IssuedFiles {
            certificate: dir.join(format!("{name}.crt")),
            private_key: dir.join(format!("{name}.key")),
            ca_bundle: dir.join(format!("{name}-ca.crt")),
            serial: issued.serial.clone(),
        };
        for (path, text) in [
            (&files.certificate, &issued.certificate),
            (&files.private_key, &issued.private_key),
            (&files.ca_bundle, &bundle),
        ] {
            std::fs::write(path, text)
                .map_err(|source| LaunchError::io(format!("writing {}", path.display()), source))?;
        }
        Ok(files)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for VaultStandIn {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

/// Creates a CA valid from an hour ago for ten years, named by its generation.
fn new_ca(generation: usize) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list is valid");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Vault stand-in CA {generation}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
    params.not_after = (SystemTime::now() + Duration::from_secs(10 * 365 * 86_400)).into();
    let key = KeyPair::generate().expect("generating a P-256 key");
    CertifiedIssuer::self_signed(params, key).expect("self-signing the stand-in CA")
}

fn options_https(state: &Arc<Mutex<State>>) -> bool {
    state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .options
        .https
}

/// Creates a server CA and a certificate for 127.0.0.1 and `localhost` signed by it, and
/// returns a TLS acceptor that presents it with the CA's PEM.
fn https_acceptor() -> Result<(tokio_rustls::TlsAcceptor, String), LaunchError> {
    let failed = |error: String| {
        LaunchError::io(
            "creating the stand-in's HTTPS certificate",
            std::io::Error::other(error),
        )
    };
    let ca = new_ca(0);
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])
        .map_err(|error| failed(error.to_string()))?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(|error| failed(error.to_string()))?;
    let certificate = params
        .signed_by(&key, &ca)
        .map_err(|error| failed(error.to_string()))?;
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|error| failed(error.to_string()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| failed(error.to_string()))?
    .with_no_client_auth()
    .with_single_cert(vec![certificate.der().clone()], key_der)
    .map_err(|error| failed(error.to_string()))?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem()))
}

async fn accept_connections(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    https: Option<tokio_rustls::TlsAcceptor>,
) {
    // Owning the connections here means aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let state = Arc::clone(&state);
                let https = https.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| answer(Arc::clone(&state), request));
                    let http1 = hyper::server::conn::http1::Builder::new();
                    match https {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http1.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http1.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let delay = state.lock().unwrap_or_else(PoisonError::into_inner).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(route(
        &mut state,
        &parts.method,
        parts.uri.path(),
        header("x-vault-token"),
        header("x-vault-namespace"),
        &body,
    ))
}

fn route(
    state: &mut State,
    method: &Method,
    path: &str,
    token: Option<String>,
    namespace: Option<String>,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let Some(path) = path.strip_prefix("/v1/") else {
        return errors(StatusCode::NOT_FOUND, "no handler for route");
    };
    if path == "sys/health" {
        let sealed = state.failure == Some(VaultFailure::Sealed);
        let status = if sealed {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        return json_response(
            status,
            json!({"initialized": true, "sealed": sealed, "standby": false, "version": "stand-in"}),
        );
    }
    if let Some(failure) = state.failure {
        state.counts.failed_requests += 1;
        return match failure {
            VaultFailure::Sealed => errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed"),
            VaultFailure::Forbidden => errors(StatusCode::FORBIDDEN, "permission denied"),
        };
    }
    if state.options.namespace.is_some() && namespace != state.options.namespace {
        return errors(
            StatusCode::NOT_FOUND,
            &format!("no handler for route \"{path}\". route entry not found."),
        );
    }
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(_) => return errors(StatusCode::BAD_REQUEST, "failed to parse JSON input"),
        }
    };
    let mount = state.options.pki_mount.clone();

    match (method.as_str(), path) {
        ("POST" | "PUT", "auth/kubernetes/login") => kubernetes_login(state, &body),
        ("POST" | "PUT", "auth/approle/login") => approle_login(state, &body),
        ("POST" | "PUT", "auth/token/renew-self") => renew_self(state, token, &body),
        ("GET" | "POST", "auth/token/lookup-self") => lookup_self(state, token),
        ("GET", p) if p == format!("{mount}/ca_chain") => {
            pem_response(state.cas.iter().map(|ca| ca.pem()).collect())
        }
        ("GET", p) if p == format!("{mount}/ca/pem") => {
            pem_response(state.cas.last().map(|ca| ca.pem()).unwrap_or_default())
        }
        ("GET", p) if p == format!("{mount}/cert/ca_chain") => {
            let chain: String = state.cas.iter().map(|ca| ca.pem()).collect();
            envelope(json!({"certificate": chain}), Value::Null)
        }
        ("POST" | "PUT", p) if p.starts_with(&format!("{mount}/issue/")) => {
            let role = &p[mount.len() + "/issue/".len()..];
            issue(state, token, role, &body)
        }
        _ => errors(
            StatusCode::NOT_FOUND,
            &format!("no handler for route \"{path}\". route entry not found."),
        ),
    }
}

fn kubernetes_login(state: &mut State, body: &Value) -> Response<Full<Bytes>> {
    let role = body["role"].as_str().unwrap_or_default();
    let jwt = body["jwt"].as_str().unwrap_or_default();
    if role.is_empty() || jwt.is_empty() {
        return errors(StatusCode::BAD_REQUEST, "missing role or jwt");
    }
    if role != state.options.kubernetes_role {
        return errors(
            StatusCode::BAD_REQUEST,
            &format!("invalid role name \"{role}\""),
        );
    }
    if jwt != state.options.service_account_jwt {
        return errors(StatusCode::FORBIDDEN, "permission denied");
    }
    login(state)
}

fn approle_login(state: &mut State, body: &Value) -> Response<Full<Bytes>> {
    let role_id = body["role_id"].as_str().unwrap_or_default();
    let secret_id = body["secret_id"].as_str().unwrap_or_default();
    if role_id != state.options.approle_role_id || secret_id != state.options.approle_secret_id {
        return errors(StatusCode::BAD_REQUEST, "invalid role or secret ID");
    }
    login(state)
}

fn login(state: &mut State) -> Response<Full<Bytes>> {
    state.counts.logins += 1;
    let (ttl, max_ttl) = (state.options.token_ttl, state.options.token_max_ttl);
    let token = create_token(state, ttl, max_ttl);
    let accessor = state.tokens[&token].accessor.clone();
    envelope(Value::Null, auth_block(&token, &accessor, ttl))
}

fn create_token(state: &mut State, ttl: Duration, max_ttl: Duration) -> String {
    let token = format!("hvs.{}", uuid::Uuid::new_v4().simple());
    let now = SystemTime::now();
    let entry = Token {
        expires_at: now + ttl.min(max_ttl),
        max_expires_at: now + max_ttl,
        creation_ttl: ttl,
        created_at: now,
        accessor: uuid::Uuid::new_v4().simple().to_string(),
    };
    state.tokens.insert(token.clone(), entry);
    token
}

fn auth_block(token: &str, accessor: &str, lease: Duration) -> Value {
    json!({
        "client_token": token,
        "accessor": accessor,
        "policies": ["default", "portcullis"],
        "token_policies": ["default", "portcullis"],
        "metadata": {"role": "portcullis"},
        "lease_duration": lease.as_secs(),
        "renewable": true,
        "entity_id": "",
        "token_type": "service",
        "orphan": true
    })
}

/// Returns the token's entry when it exists and has not expired.
fn valid_token<'a>(state: &'a State, token: &Option<String>) -> Option<(&'a String, &'a Token)> {
    let token = token.as_ref()?;
    let (key, entry) = state.tokens.get_key_value(token)?;
    (entry.expires_at > SystemTime::now()).then_some((key, entry))
}

fn renew_self(state: &mut State, token: Option<String>, body: &Value) -> Response<Full<Bytes>> {
    let Some((key, entry)) = valid_token(state, &token) else {
        state.counts.rejected_renewals += 1;
        return errors(StatusCode::FORBIDDEN, "permission denied");
    };
    let increment = body["increment"]
        .as_str()
        .and_then(parse_duration)
        .unwrap_or(entry.creation_ttl);
    let now = SystemTime::now();
    let remaining_max = entry.max_expires_at.duration_since(now).unwrap_or_default();
    let granted = Duration::from_secs(increment.min(remaining_max).as_secs());
    let (key, accessor) = (key.clone(), entry.accessor.clone());
    if let Some(entry) = state.tokens.get_mut(&key) {
        entry.expires_at = now + granted;
    }
    state.counts.renewals += 1;
    let mut response = json!({"request_id": uuid::Uuid::new_v4().to_string(), "lease_id": "", "renewable": false, "lease_duration": 0, "data": null, "wrap_info": null, "warnings": null, "auth": auth_block(&key, &accessor, granted)});
    if granted < increment {
        response["warnings"] = json!([format!(
            "TTL of \"{}s\" exceeded the effective max_ttl of \"{}s\"; TTL value is capped accordingly",
            increment.as_secs(),
            granted.as_secs()
        )]);
    }
    json_response(StatusCode::OK, response)
}

fn lookup_self(state: &mut State, token: Option<String>) -> Response<Full<Bytes>> {
    let Some((key, entry)) = valid_token(state, &token) else {
        return errors(StatusCode::FORBIDDEN, "permission denied");
    };
    let now = SystemTime::now();
    let ttl = entry
        .expires_at
        .duration_since(now)
        .unwrap_or_default()
        .as_secs();
    envelope(
        json!({
            "accessor": entry.accessor,
            "creation_time": unix_seconds(entry.created_at),
            "creation_ttl": entry.creation_ttl.as_secs(),
            "display_name": "token",
            "entity_id": "",
            "expire_time": humantime::format_rfc3339_seconds(entry.expires_at).to_string(),
            "explicit_max_ttl": entry.max_expires_at.duration_since(entry.created_at).unwrap_or_default().as_secs(),
            "id": key,
            "issue_time": humantime::format_rfc3339_seconds(entry.created_at).to_string(),
            "meta": null,
            "num_uses": 0,
            "orphan": true,
            "path": "auth/token/create",
            "policies": ["default", "portcullis"],
            "renewable": true,
            "ttl": ttl,
            "type": "service"
        }),
        Value::Null,
    )
}

struct Issued {
    certificate: String,
    private_key: String,
    serial: String,
    not_after: SystemTime,
}

fn issue(
    state: &mut State,
    token: Option<String>,
    role: &str,
    body: &Value,
) -> Response<Full<Bytes>> {
    if valid_token(state, &token).is_none() {
        return errors(StatusCode::FORBIDDEN, "permission denied");
    }
    if role != state.options.pki_role {
        return errors(StatusCode::BAD_REQUEST, &format!("unknown role: {role}"));
    }

    let Some(common_name) = body["common_name"].as_str().filter(|name| !name.is_empty()) else {
        return errors(
            StatusCode::BAD_REQUEST,
            "the common_name field is required, or must be provided in a CSR with \"use_csr_common_name\" set to true, unless \"require_cn\" is set to false",
        );
    };
    let split = |key: &str| -> Vec<String> {
        body[key]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let ttl = match body["ttl"].as_str() {
        None => state.options.certificate_max_ttl,
        Some(text) => match parse_duration(text) {
            Some(ttl) => ttl,
            None => return errors(StatusCode::BAD_REQUEST, &format!("invalid ttl {text:?}")),
        },
    };

    let mut warnings = Vec::new();
    if ttl > state.options.certificate_max_ttl {
        warnings.push(format!(
            "TTL \"{}s\" is longer than the role's max_ttl \"{}s\"; capped",
            ttl.as_secs(),
            state.options.certificate_max_ttl.as_secs()
        ));
    }
    let ttl = ttl.min(state.options.certificate_max_ttl);
    let issued = match issue_certificate(
        state,
        common_name,
        &split("alt_names"),
        &split("uri_sans"),
        ttl,
    ) {
        Ok(issued) => issued,
        Err(message) => return errors(StatusCode::BAD_REQUEST, &message),
    };

    let issuing_ca = state.cas.last().map(|ca| ca.pem()).unwrap_or_default();
    let expiration = if state.options.expiration_as_string {
        json!(unix_seconds(issued.not_after).to_string())
    } else {
        json!(unix_seconds(issued.not_after))
    };
    let mut response = json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": {
            "certificate": issued.certificate,
            "issuing_ca": issuing_ca,
            "ca_chain": [issuing_ca],
            "private_key": issued.private_key,
            "private_key_type": "ec",
            "serial_number": issued.serial,
            "expiration": expiration
        },
        "wrap_info": null,
        "warnings": null,
        "auth": null
    });
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings);
    }
    json_response(StatusCode::OK, response)
}

/// Signs a new leaf with the current CA: server and client authentication, the common name
/// also as a DNS SAN (Vault's default), capped at the CA's own expiry.
fn issue_certificate(
    state: &mut State,
    common_name: &str,
    dns_names: &[String],
    uri_sans: &[String],
    ttl: Duration,
) -> Result<Issued, String> {
    let ca = state.cas.last().ok_or("no CA")?;
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|error| error.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let mut names = vec![common_name.to_owned()];
    names.extend(
        dns_names
            .iter()
            .filter(|name| name.as_str() != common_name)
            .cloned(),
    );
    for name in names {
        params.subject_alt_names.push(SanType::DnsName(
            name.clone()
                .try_into()
                .map_err(|_| format!("invalid DNS name {name:?}"))?,
        ));
    }
    for uri in uri_sans {
        params.subject_alt_names.push(SanType::URI(
            uri.clone()
                .try_into()
                .map_err(|_| format!("invalid URI SAN {uri:?}"))?,
        ));
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Vault backdates by 30 s so that peers with slow clocks accept a brand-new certificate.
    let now = SystemTime::now();
    let not_after = UNIX_EPOCH + Duration::from_secs(unix_seconds(now + ttl));
    params.not_before = (now - Duration::from_secs(30)).into();
    params.not_after = not_after.into();
    let serial_bytes = *uuid::Uuid::new_v4().as_bytes();
    let serial_bytes = [&[0x01u8][..], &serial_bytes[..15]].concat();
    params.serial_number = Some(serial_bytes.clone().into());
    let key = KeyPair::generate().map_err(|error| error.to_string())?;
    let certificate = params
        .signed_by(&key, ca)
        .map_err(|error| error.to_string())?;
    let serial = serial_bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    state.counts.issued.push(serial.clone());
    Ok(Issued {
        certificate: certificate.pem(),
        private_key: key.serialize_pem(),
        serial,
        not_after,
    })
}

/// Reads a Vault duration: plain seconds, or a number with an `s`, `m` or `h` suffix.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((index, _)) => text.split_at(index),
        None => (text, "s"),
    };
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Wraps `data` and `auth` in Vault's response envelope.
fn envelope(data: Value, auth: Value) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        json!({
            "request_id": uuid::Uuid::new_v4().to_string(),
            "lease_id": "",
            "renewable": false,
            "lease_duration": 0,
            "data": data,
            "wrap_info": null,
            "warnings": null,
            "auth": auth
        }),
    )
}

fn errors(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({"errors": [message]}))
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn pem_response(pem: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(pem)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/pem-certificate-chain"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HttpRequest, send};

    fn host(vault: &VaultStandIn) -> SocketAddr {
        vault.address
    }

    #[test]
    fn durations_follow_vault_units() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("8s"), Some(Duration::from_secs(8)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[tokio::test]
    async fn issue_without_token_is_forbidden() {
        let vault = VaultStandIn::start(VaultOptions::default()).await.unwrap();

        let response = send(
            host(&vault),
            &HttpRequest::post("/v1/pki/issue/portcullis", r#"{"common_name":"a"}"#),
        )
        .await
        .unwrap();

        assert_eq!(response.status, 403);
        assert_eq!(response.body_text(), r#"{"errors":["permission denied"]}"#);
    }

    #[tokio::test]
    async fn sealed_vault_answers_503_and_health_says_sealed() {
        let vault = VaultStandIn::start(VaultOptions::default()).await.unwrap();
        vault.set_failure(Some(VaultFailure::Sealed));

        let login = send(
            host(&vault),
            &HttpRequest::post(
                "/v1/auth/kubernetes/login",
                r#"{"role":"portcullis","jwt":"service-account-jwt"}"#,
            ),
        )
        .await
        .unwrap();
        let health = send(host(&vault), &HttpRequest::get("/v1/sys/health"))
            .await
            .unwrap();

        assert_eq!(login.status, 503);
        assert_eq!(login.body_text(), r#"{"errors":["Vault is sealed"]}"#);
        assert_eq!(health.status, 503);
    }

    #[tokio::test]
    async fn renewal_is_capped_at_the_max_ttl() {
        let vault = VaultStandIn::start(VaultOptions::default()).await.unwrap();
        let token = vault.create_token(Duration::from_secs(60), Duration::from_secs(100));

        let response = send(
            host(&vault),
            &HttpRequest::post("/v1/auth/token/renew-self", r#"{"increment":"1h"}"#)
                .with_header("X-Vault-Token", token),
        )
        .await
        .unwrap();

        let body: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(response.status, 200);
        let lease = body["auth"]["lease_duration"].as_u64().unwrap();
        assert!((99..=100).contains(&lease), "{body}");
    }

    #[tokio::test]
    async fn wrong_namespace_finds_no_route() {
        let options = VaultOptions {
            namespace: Some("team-a".to_owned()),
            ..VaultOptions::default()
        };
        let vault = VaultStandIn::start(options).await.unwrap();

        let without = send(host(&vault), &HttpRequest::get("/v1/pki/cert/ca_chain"))
            .await
            .unwrap();
        let with = send(
            host(&vault),
            &HttpRequest::get("/v1/pki/cert/ca_chain").with_header("X-Vault-Namespace", "team-a"),
        )
        .await
        .unwrap();

        assert_eq!(without.status, 404);
        assert_eq!(with.status, 200);
    }

    #[tokio::test]
    async fn ca_chain_lists_old_and_new_ca_until_retired() {
        let vault = VaultStandIn::start(VaultOptions::default()).await.unwrap();
        vault.rotate_ca();

        let overlap = send(host(&vault), &HttpRequest::get("/v1/pki/ca_chain"))
            .await
            .unwrap();
        vault.retire_old_cas();
        let after = send(host(&vault), &HttpRequest::get("/v1/pki/ca_chain"))
            .await
            .unwrap();

        assert_eq!(overlap.body_text().matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(after.body_text().matches("BEGIN CERTIFICATE").count(), 1);
    }
}
