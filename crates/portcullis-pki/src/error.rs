//! Errors of certificate issuance, checking and rotation.

use std::time::SystemTime;

/// The reason an issued certificate was rejected before use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("invalid PEM in {what}: {reason}")]
    InvalidPem { what: &'static str, reason: String },

    #[error("no certificate in {what}")]
    NoCertificate { what: &'static str },

    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,

    #[error("the private key cannot be used: {reason}")]
    UnusableKey { reason: String },

    #[error("invalid certificate {what}: {reason}")]
    InvalidCertificate { what: &'static str, reason: String },

    #[error("the certificate is not valid before {not_before} (clock: {now})", not_before = humantime::format_rfc3339_seconds(*.not_before), now = humantime::format_rfc3339_seconds(*.now))]
    NotYetValid { not_before: SystemTime, now: SystemTime },

    #[error("the certificate expired at {not_after} (clock: {now})", not_after = humantime::format_rfc3339_seconds(*.not_after), now = humantime::format_rfc3339_seconds(*.now))]
    Expired { not_after: SystemTime, now: SystemTime },

    #[error("the trust bundle is empty, so no chain can be verified")]
    EmptyTrustBundle,

    #[error("the certificate chain does not verify to the trust bundle: {reason}")]
    Untrusted { reason: String },
}

/// A failed exchange with Vault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// Vault returned an error status. `errors` is its `{"errors": [...]}` list.
    #[error("Vault returned HTTP {status} for {operation}: {}", if errors.is_empty() { "no error message".to_owned() } else { errors.join("; ") })]
    Status { operation: String, status: u16, errors: Vec<String> },

    #[error("Vault request for {operation} failed: {reason}")]
    Transport { operation: String, reason: String },

    #[error("invalid Vault response to {operation}: {reason}")]
    InvalidResponse { operation: String, reason: String },

    #[error("cannot read {what} from {path}: {reason}")]
    CredentialFile { what: &'static str, path: String, reason: String },

    #[error("invalid Vault client settings: {reason}")]
    Settings { reason: String },
}

impl VaultError {
    /// Tells whether Vault rejected the token itself, so a fresh login may help.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, VaultError::Status { status: 403, .. })
    }
}

/// Any failure of a rotation attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Vault(#[from] VaultError),

    #[error("the issued certificate was rejected: {0}")]
    Chain(#[from] ChainError),

    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },

    #[error("rustls rejected the trust bundle: {reason}")]
    TrustBundle { reason: String },
}
