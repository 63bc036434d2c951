//! Vault: authentication, the token's lifecycle, and certificate issuance from a PKI mount.
//!
//! vaultrs supplies the HTTP client, the login and token calls and Vault's error format. It
//! has no renewal or re-login loop of its own, so [`VaultSession`] keeps the token alive. It
//! renews the token at two thirds of its lease, and logs in again when the token cannot be
//! renewed, was rejected, or is close to its max TTL.

mod endpoints;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

pub use endpoints::expiration;
use endpoints::{CaChainRequest, IssueRequest};

use crate::chain::IssuedCertificate;
use crate::clock::Clock;
use crate::error::VaultError;
use crate::rotator::PkiObserver;
use crate::secret::Secret;

/// Path at which Kubernetes mounts the pod's projected service account token.
pub const DEFAULT_KUBERNETES_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Vault's own request timeout: long enough for a busy Vault, short enough that a hung
/// connection does not use up the retry budget of one rotation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection and login settings for Vault.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultSettings {
    /// Base address such as `https://vault.vault.svc:8200`.
    pub address: String,
    /// Sent as `X-Vault-Namespace` on every request (Vault Enterprise and HCP namespaces).
    pub namespace: Option<String>,
    /// CA bundle that Vault's own TLS certificate is verified against, in addition to the
    /// system roots.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub auth: VaultAuth,
}

/// The login method.
#[derive(Debug, Clone, PartialEq)]
pub enum VaultAuth {
    /// `auth/{mount}/login` with the service account token, re-read from `token_file` at
    /// every login because the kubelet replaces the projected token before it expires.
    Kubernetes { mount: String, role: String, token_file: PathBuf },
    /// `auth/{mount}/login` with a role ID and a secret ID read from `secret_id_file`.
    AppRole { mount: String, role_id: String, secret_id_file: PathBuf },
    /// A token read from a file (written by Vault Agent or an operator), re-read at every
    /// login.
    TokenFile { path: PathBuf },
}

impl VaultAuth {
    /// The method name used in logs and metrics.
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Kubernetes { .. } => "kubernetes",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::TokenFile { .. } => "token",
        }
    }
}

/// The certificate request sent to the PKI mount.
#[derive(Debug, Clone, PartialEq)]
pub struct IssueSettings {
    /// Path of the PKI secrets engine, `pki` by default.
    pub mount: String,
    /// The PKI role that allows the names below.
    pub role: String,
    pub common_name: String,
    pub dns_names: Vec<String>,
    /// URI SANs, such as a SPIFFE ID from [`spiffe_id`].
    pub uri_sans: Vec<String>,
    pub ttl: Duration,
}

/// Returns the SPIFFE ID `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>` that
/// Istio gives a Kubernetes workload.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The current Vault token's lease, in wall-clock time.
#[derive(Debug, Clone, Copy)]
struct TokenLease {
    obtained_at: SystemTime,
    /// `None` for a token without a TTL, such as a root token.
    expires_at: Option<SystemTime>,
    renewable: bool,
    /// The lease granted at login; a renewal that grants much less shows the max TTL is near.
    login_lease: Duration,
}

/// A logged-in Vault client that keeps its token valid.
pub struct VaultSession {
    client: VaultClient,
    settings: VaultSettings,
    lease: Option<TokenLease>,
    observer: Arc<dyn PkiObserver>,
    clock: Arc<dyn Clock>,
}

impl VaultSession {
    /// Builds the HTTP client; no request is sent until the first login.
    pub fn new(settings: VaultSettings, observer: Arc<dyn PkiObserver>, clock: Arc<dyn Clock>) -> Result<Self, VaultError> {
        crate::install_default_crypto_provider();
        // Every setting is given explicitly, because vaultrs would otherwise take defaults from
        // VAULT_ADDR, VAULT_TOKEN, VAULT_SKIP_VERIFY, VAULT_CACERT and VAULT_CLIENT_CERT.
        let mut builder = VaultClientSettingsBuilder::default();
        builder
            .address(&settings.address)
            .token("")
            .verify(true)
            .identity(None)
            .timeout(Some(settings.timeout))
            .namespace(settings.namespace.clone())
            .ca_certs(settings.ca_file.iter().map(|path| path.display().to_string()).collect());
        let client_settings = builder.build().map_err(|error| VaultError::Settings { reason: error.to_string() })?;
        let client = VaultClient::new(client_settings).map_err(|error| VaultError::Settings { reason: describe(&error) })?;
        Ok(VaultSession { client, settings, lease: None, observer, clock })
    }

    /// When the token should next be renewed: two thirds into its current lease. `None`
    /// before the first login and for tokens without a TTL.
    pub fn token_renewal_due_at(&self) -> Option<SystemTime> {
        let lease = self.lease?;
        let expires_at = lease.expires_at?;
        let length = expires_at.duration_since(lease.obtained_at).unwrap_or_default();
        Some(lease.obtained_at + length.mul_f64(2.0 / 3.0))
    }

    /// Logs in unless the current token is still valid.
    pub async fn ensure_token(&mut self) -> Result<(), VaultError> {
        let now = self.clock.now();
        let valid = self.lease.is_some_and(|lease| lease.expires_at.is_none_or(|expires_at| expires_at > now));
        if valid { Ok(()) } else { self.login().await }
    }

    /// Renews the token, or logs in again when it cannot be renewed or its max TTL is near.
    pub async fn maintain_token(&mut self) -> Result<(), VaultError> {
        let Some(lease) = self.lease else { return self.login().await };
        if !lease.renewable {
            debug!(vault.auth = self.settings.auth.method(), "the Vault token is not renewable; logging in again");
            return self.login().await;
        }

        let increment = format!("{}s", lease.login_lease.as_secs().max(1));
        match vaultrs::token::renew_self(&self.client, Some(&increment)).await {
            Ok(auth) => {
                self.observer.vault_token_renewal("success");
                let granted = Duration::from_secs(auth.lease_duration);
                let now = self.clock.now();
                self.lease = Some(TokenLease {
                    obtained_at: now,
                    expires_at: (!granted.is_zero()).then_some(now + granted),
                    renewable: auth.renewable,
                    login_lease: lease.login_lease,
                });
                if granted < lease.login_lease / 3 {
                    info!(vault.token_ttl = ?granted, "the Vault token is close to its max TTL; logging in again");
                    return self.login().await;
                }
                debug!(vault.token_ttl = ?granted, "Vault token renewed");
                Ok(())
            }
            Err(error) => {
                self.observer.vault_token_renewal("failure");
                let error = vault_error("token renewal", error);
                warn!(%error, "renewing the Vault token failed; logging in again");
                self.login().await
            }
        }
    }

    /// Logs in with the configured method, reading its credential file again.
    pub async fn login(&mut self) -> Result<(), VaultError> {
        let method = self.settings.auth.method();
        let result = self.login_once().await;
        self.observer.vault_login(method, if result.is_ok() { "success" } else { "failure" });
        match &result {
            Ok(()) => info!(vault.auth = method, vault.token_ttl = ?self.lease.and_then(|lease| lease.expires_at).and_then(|at| at.duration_since(self.clock.now()).ok()), "logged in to Vault"),
            Err(error) => warn!(vault.auth = method, %error, "Vault login failed"),
        }
        result
    }

    async fn login_once(&mut self) -> Result<(), VaultError> {
        self.lease = None;
        let (token, lease_duration, renewable) = match &self.settings.auth {
            VaultAuth::Kubernetes { mount, role, token_file } => {
                let jwt = read_credential("the service account token", token_file)?;
                let auth = vaultrs::auth::kubernetes::login(&self.client, mount, role, jwt.expose())
                    .await
                    .map_err(|error| vault_error("Kubernetes login", error))?;
                (Secret::new(auth.client_token), auth.lease_duration, auth.renewable)
            }
            VaultAuth::AppRole { mount, role_id, secret_id_file } => {
                let secret_id = read_credential("the AppRole secret ID", secret_id_file)?;
                let auth = vaultrs::auth::approle::login(&self.client, mount, role_id, secret_id.expose())
                    .await
                    .map_err(|error| vault_error("AppRole login", error))?;
                (Secret::new(auth.client_token), auth.lease_duration, auth.renewable)
            }
            VaultAuth::TokenFile { path } => {
                let token = read_credential("the Vault token", path)?;
                self.client.set_token(token.expose());
                let lookup = vaultrs::token::lookup_self(&self.client)
                    .await
                    .map_err(|error| vault_error("token lookup", error))?;
                (token, lookup.ttl, lookup.renewable.unwrap_or(false))
            }
        };

        self.client.set_token(token.expose());
        let now = self.clock.now();
        let lease = Duration::from_secs(lease_duration);
        self.lease = Some(TokenLease {
            obtained_at: now,
            expires_at: (!lease.is_zero()).then_some(now + lease),
            renewable,
            login_lease: lease,
        });
        Ok(())
    }

    /// Issues a certificate. A token that Vault rejects with 403 is replaced by a fresh
    /// login and the request is sent once more.
    pub async fn issue(&mut self, issue: &IssueSettings) -> Result<IssuedCertificate, VaultError> {
        self.ensure_token().await?;
        let response = match self.issue_once(issue).await {
            Err(error) if error.is_permission_denied() => {
                warn!(%error, "Vault rejected the token while issuing; logging in again");
                self.login().await?;
                self.issue_once(issue).await?
            }
            other => other?,
        };

        let mut ca_chain_pem = match response.ca_chain {
            Some(chain) if !chain.is_empty() => chain,
            _ if !response.issuing_ca.is_empty() => vec![response.issuing_ca],
            _ => Vec::new(),
        };
        // The mount's chain can list more CAs than the issue response, such as an old root
        // kept in the chain during a CA change, whose certificates peers may still present.
        match self.ca_chain(&issue.mount).await {
            Ok(chain) => ca_chain_pem.push(chain),
            Err(error) => warn!(%error, "reading the PKI mount's CA chain failed; trusting the chain of the issued certificate only"),
        }
        debug!(certificate.serial = %response.serial_number, "Vault issued a certificate");
        Ok(IssuedCertificate {
            certificate_pem: response.certificate,
            ca_chain_pem,
            private_key_pem: Secret::new(response.private_key),
            reported_expiration: response.expiration,
        })
    }

    async fn issue_once(&self, issue: &IssueSettings) -> Result<endpoints::IssueResponse, VaultError> {
        let request = IssueRequest {
            mount: issue.mount.clone(),
            role: issue.role.clone(),
            common_name: issue.common_name.clone(),
            alt_names: issue.dns_names.join(","),
            uri_sans: issue.uri_sans.join(","),
            ttl: format!("{}s", issue.ttl.as_secs()),
            format: "pem",
            private_key_format: "pkcs8",
        };
        vaultrs::api::exec_with_result(&self.client, request)
            .await
            .map_err(|error| vault_error(&format!("{}/issue/{}", issue.mount, issue.role), error))
    }

    /// Reads the PKI mount's CA chain as PEM.
    pub async fn ca_chain(&self, mount: &str) -> Result<String, VaultError> {
        let request = CaChainRequest { mount: mount.to_owned() };
        vaultrs::api::exec_with_result(&self.client, request)
            .await
            .map(|response| response.certificate)
            .map_err(|error| vault_error(&format!("{mount}/cert/ca_chain"), error))
    }
}

/// Reads a credential file and trims the line break that editors and `echo` leave.
fn read_credential(what: &'static str, path: &std::path::Path) -> Result<Secret<String>, VaultError> {
    let text = std::fs::read_to_string(path).map_err(|error| VaultError::CredentialFile {
        what,
        path: path.display().to_string(),
        reason: error.to_string(),
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(VaultError::CredentialFile { what, path: path.display().to_string(), reason: "the file is empty".to_owned() });
    }
    Ok(Secret::new(trimmed.to_owned()))
}

/// Converts a vaultrs error, keeping Vault's own error messages and the transport cause.
fn vault_error(operation: &str, error: ClientError) -> VaultError {
    let operation = operation.to_owned();
    match error {
        ClientError::APIError { code, errors } => VaultError::Status { operation, status: code, errors },
        ClientError::RestClientError { source: rustify::errors::ClientError::ServerResponseError { code, content } } => {
            VaultError::Status { operation, status: code, errors: error_list(content.as_deref()) }
        }
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError | ClientError::JsonParseError { .. } => {
            VaultError::InvalidResponse { reason: describe(&error), operation }
        }
        ClientError::RestClientError { source: rustify::errors::ClientError::ResponseParseError { .. } } => {
            VaultError::InvalidResponse { reason: describe(&error), operation }
        }
        other => VaultError::Transport { reason: describe(&other), operation },
    }
}

/// Reads `{"errors": [...]}`; anything else is kept as one message.
fn error_list(content: Option<&str>) -> Vec<String> {
    let Some(content) = content.filter(|content| !content.trim().is_empty()) else { return Vec::new() };
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    match serde_json::from_str::<Errors>(content) {
        Ok(parsed) => parsed.errors,
        Err(_) => vec![content.chars().take(200).collect()],
    }
}

/// Joins an error with its causes, because vaultrs's own messages omit them.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_has_istio_layout() {
        assert_eq!(spiffe_id("cluster.local", "shop", "cart"), "spiffe://cluster.local/ns/shop/sa/cart");
    }

    #[test]
    fn vault_error_list_is_kept() {
        assert_eq!(error_list(Some(r#"{"errors":["permission denied"]}"#)), vec!["permission denied".to_owned()]);
        assert_eq!(error_list(Some("upstream connect error")), vec!["upstream connect error".to_owned()]);
        assert_eq!(error_list(Some("")), Vec::<String>::new());
    }

    #[test]
    fn credential_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "hvs.abc\n").unwrap();
        assert_eq!(read_credential("the Vault token", &path).unwrap().expose(), "hvs.abc");

        std::fs::write(&path, "\n").unwrap();
        let error = read_credential("the Vault token", &path).unwrap_err();
        assert_eq!(error.to_string(), format!("cannot read the Vault token from {}: the file is empty", path.display()));
    }
}
