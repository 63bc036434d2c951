//! Configuration errors, all reported at once by [`crate::Verifier::new`].

use std::fmt;

use crate::fetch::FetchError;
use crate::jwks::JwksError;

/// Every problem found in a [`crate::VerifierConfig`].
#[derive(Debug)]
pub struct ConfigError {
    /// The problems, in configuration order.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JWT configuration")?;
        for (index, problem) in self.problems.iter().enumerate() {
            let separator = if index == 0 { ": " } else { "; " };
            write!(f, "{separator}{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// One configuration problem, naming the provider and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigProblem {
    /// The build enables no jsonwebtoken crypto backend, or both.
    #[error(
        "jsonwebtoken has no usable crypto backend; enable exactly one of its rust_crypto and aws_lc_rs features"
    )]
    CryptoBackend,
    /// `max_token_bytes` is zero.
    #[error("max_token_bytes must be greater than 0")]
    ZeroMaxTokenBytes,
    /// A provider has no name.
    #[error("provider #{index} has an empty name")]
    EmptyProviderName {
        /// Position in the provider list, from 0.
        index: usize,
    },
    /// Two providers have the same name.
    #[error("provider name {name:?} is used more than once")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A provider has no issuer.
    #[error("provider {provider}: issuer is empty")]
    EmptyIssuer {
        /// Provider name.
        provider: String,
    },
    /// Two providers have the same issuer, so a token could not choose between them.
    #[error("providers {first} and {second} have the same issuer {issuer:?}")]
    DuplicateIssuer {
        /// The repeated issuer.
        issuer: String,
        /// First provider with it.
        first: String,
        /// Second provider with it.
        second: String,
    },
    /// A provider has neither keys nor an HMAC secret.
    #[error("provider {provider}: set keys, hmac_secret_file, or both")]
    NoKeys {
        /// Provider name.
        provider: String,
    },
    /// A JWKS or issuer URL is unusable.
    #[error("provider {provider}: {source}")]
    Url {
        /// Provider name.
        provider: String,
        /// The URL problem.
        source: FetchError,
    },
    /// A key or secret file cannot be read.
    #[error("provider {provider}: cannot read {path}: {reason}")]
    ReadFile {
        /// Provider name.
        provider: String,
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// A configured JWKS (file or inline) has no usable key.
    #[error("provider {provider}: JWKS from {origin} is unusable: {source}")]
    Jwks {
        /// Provider name.
        provider: String,
        /// `inline configuration` or the file path.
        origin: String,
        /// The JWKS problem.
        source: JwksError,
    },
    /// The HMAC secret is shorter than HS256 requires.
    #[error(
        "provider {provider}: HMAC secret in {path} is {length} bytes; at least 32 are required"
    )]
    HmacSecretTooShort {
        /// Provider name.
        provider: String,
        /// The secret file.
        path: String,
        /// Length found, in bytes.
        length: usize,
    },
    /// An HMAC algorithm is allowed but there is no secret.
    #[error("provider {provider}: algorithm {algorithm} needs hmac_secret_file")]
    HmacWithoutSecret {
        /// Provider name.
        provider: String,
        /// The HMAC algorithm.
        algorithm: String,
    },
    /// A header name is not a valid HTTP field name.
    #[error("provider {provider}: invalid header name {name:?}")]
    InvalidHeaderName {
        /// Provider name.
        provider: String,
        /// The rejected name.
        name: String,
    },
    /// A query parameter, cookie or claim name is empty.
    #[error("provider {provider}: {field} name is empty")]
    EmptyField {
        /// Provider name.
        provider: String,
        /// `query parameter`, `cookie` or `claim`.
        field: &'static str,
    },
    /// A JWKS timing or size setting is zero or its bounds are reversed.
    #[error("provider {provider}: {setting}")]
    FetchSetting {
        /// Provider name.
        provider: String,
        /// Description of the problem.
        setting: String,
    },
    /// The HTTP client cannot be built.
    #[error("{0}")]
    HttpClient(String),
}
