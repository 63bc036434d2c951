//! Results of authenticating one request: a verified identity, no token, or a rejected token.

use std::fmt;
use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::algorithm::SignatureAlgorithm;
use crate::config::TokenLocation;

/// Result of [`crate::Verifier::authenticate`].
#[derive(Debug, Clone, PartialEq)]
pub enum TokenOutcome {
    /// No configured location carried a token. The policy decides, without an identity.
    NoToken,
    /// Every token in the request verified and they name the same caller.
    Valid(Identity),
    /// A token was present but rejected. The request should be denied with 401 and
    /// [`InvalidToken::www_authenticate`], unless [`InvalidReason::is_caller_fault`] is false.
    Invalid(InvalidToken),
}

impl TokenOutcome {
    /// Returns a stable label for metrics and logs: `no_token`, `valid` or the reason code.
    pub fn label(&self) -> &'static str {
        match self {
            TokenOutcome::NoToken => "no_token",
            TokenOutcome::Valid(_) => "valid",
            TokenOutcome::Invalid(invalid) => invalid.reason.code(),
        }
    }
}

/// A verified caller.
///
/// The raw token is never stored here; `token_fingerprint` identifies it in logs and audit events.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Name of the provider that verified the token.
    pub provider: String,
    /// The `iss` claim.
    pub issuer: String,
    /// The `sub` claim, when present.
    pub subject: Option<String>,
    /// The `aud` claim as a list (a string `aud` becomes a one-element list).
    pub audiences: Vec<String>,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
    /// The `kid` of the key that verified the signature, when the token or key named one.
    pub kid: Option<String>,
    /// The signature algorithm.
    pub algorithm: SignatureAlgorithm,
    /// The `exp` claim, when present.
    pub expires_at: Option<SystemTime>,
    /// First 16 hex characters of the SHA-256 of the token.
    pub token_fingerprint: String,
    /// Locations of the token (or of the tokens, when the request carried several).
    pub locations: Vec<TokenLocation>,
}

/// Why a token was rejected: a stable code for metrics, logs and policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InvalidReason {
    /// `exp` is in the past, beyond the clock skew.
    Expired,
    /// `nbf` or `iat` is in the future, beyond the clock skew.
    NotYetValid,
    /// No key of the provider verified the signature.
    BadSignature,
    /// The provider has no key with the token's `kid`, even after a refetch.
    UnknownKey,
    /// No provider is configured for the token's `iss` at the location where it was found.
    IssuerMismatch,
    /// The token's `aud` contains none of the provider's audiences.
    AudienceMismatch,
    /// The algorithm is `none`, unknown, not allowed for the provider, or does not fit the key.
    AlgorithmNotAllowed,
    /// The token header names or embeds a key (`jku`, `x5u`, `jwk` or `x5c`).
    KeyInToken,
    /// The token is not a well-formed compact JWS with JSON header and claims.
    Malformed,
    /// The token is longer than the configured maximum.
    TooLarge,
    /// A required claim is absent.
    MissingClaim,
    /// The request carries several tokens and not all of them verify to the same caller.
    Ambiguous,
    /// The provider has no usable keys (never fetched, or stale beyond the maximum). This is
    /// a server-side failure, not the caller's fault.
    KeysUnavailable,
}

impl InvalidReason {
    /// Returns the stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            InvalidReason::Expired => "expired",
            InvalidReason::NotYetValid => "not_yet_valid",
            InvalidReason::BadSignature => "bad_signature",
            InvalidReason::UnknownKey => "unknown_key",
            InvalidReason::IssuerMismatch => "issuer_mismatch",
            InvalidReason::AudienceMismatch => "audience_mismatch",
            InvalidReason::AlgorithmNotAllowed => "algorithm_not_allowed",
            InvalidReason::KeyInToken => "key_in_token",
            InvalidReason::Malformed => "malformed",
            InvalidReason::TooLarge => "too_large",
            InvalidReason::MissingClaim => "missing_claim",
            InvalidReason::Ambiguous => "ambiguous",
            InvalidReason::KeysUnavailable => "keys_unavailable",
        }
    }

    /// Returns false only for [`InvalidReason::KeysUnavailable`], where the request should be
    /// denied as a server error (for example 503) rather than 401.
    pub fn is_caller_fault(self) -> bool {
        !matches!(self, InvalidReason::KeysUnavailable)
    }
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A rejected token, with what an operator or a client needs and never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidToken {
    /// Stable reason code.
    pub reason: InvalidReason,
    /// Short human-readable explanation, safe to send to the client. Values copied from the
    /// token (issuer, kid) are shortened to 64 characters.
    pub message: String,
    /// Provider that handled the token, when one was selected.
    pub provider: Option<String>,
    /// Location of the rejected token.
    pub location: Option<TokenLocation>,
    /// First 16 hex characters of the SHA-256 of the token, when a token was read.
    pub token_fingerprint: Option<String>,
}

/// A rejection before the provider, location and fingerprint are attached. It is small, so
/// that the `Result`s of the parsing and checking functions stay small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub reason: InvalidReason,
    pub message: String,
}

impl Rejection {
    pub(crate) fn new(reason: InvalidReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<Rejection> for InvalidToken {
    fn from(rejection: Rejection) -> Self {
        Self {
            reason: rejection.reason,
            message: rejection.message,
            provider: None,
            location: None,
            token_fingerprint: None,
        }
    }
}

impl InvalidToken {
    /// Returns the `WWW-Authenticate` value for this rejection.
    pub fn www_authenticate(&self) -> String {
        www_authenticate_invalid_token(&self.message)
    }
}

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.message)
    }
}

/// Builds `Bearer error="invalid_token", error_description="..."` (RFC 6750, section 3).
///
/// The description is written as an HTTP quoted-string: `"` and `\` are escaped with a
/// backslash, and characters outside printable ASCII (control characters, line breaks,
/// non-ASCII) are replaced with `?`, so the value is always a valid header value.
pub fn www_authenticate_invalid_token(description: &str) -> String {
    let mut value = String::with_capacity(description.len() + 48);
    value.push_str("Bearer error=\"invalid_token\", error_description=\"");
    for character in description.chars() {
        match character {
            '"' | '\\' => {
                value.push('\\');
                value.push(character);
            }
            ' '..='~' => value.push(character),
            _ => value.push('?'),
        }
    }
    value.push('"');
    value
}

/// Header changes for the request sent upstream, from [`crate::Verifier::upstream_headers`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamHeaders {
    /// Headers to set (replacing any value sent by the client), in lowercase.
    pub set: Vec<(String, String)>,
    /// Headers to remove, in lowercase: headers that carried a token not to be forwarded, and
    /// claim headers whose claim is absent, so that a client cannot forge them.
    pub remove: Vec<String>,
    /// Query parameters that carried a token not to be forwarded.
    pub remove_query_parameters: Vec<String>,
}

/// Shortens a value copied from a token before it goes into a message.
pub(crate) fn shorten(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    if value.chars().count() <= MAX_CHARS {
        return value.to_owned();
    }
    let mut shortened: String = value.chars().take(MAX_CHARS).collect();
    shortened.push_str("...");
    shortened
}
