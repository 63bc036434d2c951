//! Caller identity for portcullis: reads JWTs from a request, verifies them against the JWKS of
//! the configured issuers, and returns a [`TokenOutcome`].
//!
//! Under Istio the ext_authz filter runs before Envoy's `jwt_authn`, so tokens arrive
//! unverified. This crate applies the checks that filter would apply, and some stricter ones:
//!
//! - The provider is chosen by the token's `iss`, read from the unverified payload only for
//!   that purpose. The key is chosen by the provider's key set and the token's `kid`, and the
//!   token's `alg` must fit the key's type, curve and `alg`. The algorithm never chooses the key
//!   family: an HS256 token is checked only against a configured shared secret, never against
//!   a public key.
//! - `none`, ES512 (not supported by the RustCrypto backend of jsonwebtoken 12) and unknown
//!   algorithms are rejected. Tokens whose header names or embeds a key (`jku`, `x5u`, `jwk`,
//!   `x5c`) are rejected with `key_in_token`, and no URL from a token is ever fetched.
//! - `exp` (required by default), `nbf` and `iat` are checked with a clock skew, `iss` exactly,
//!   and `aud` against the provider's audiences.
//! - JWKS documents are parsed key by key. Keys for encryption, of unknown types or with bad
//!   parameters are skipped and reported in [`ProviderStatus::skipped_keys`].
//! - Remote keys are refreshed in the background and read through an `arc_swap` snapshot. A
//!   token with an unknown `kid` triggers one fetch, shared by concurrent requests and rate
//!   limited per provider. Failed fetches keep the last good keys for a bounded time.
//! - Verified tokens are cached by SHA-256 until their `exp`, and only while the key that
//!   verified them stays in the key set.
//!
//! jsonwebtoken is built with its `rust_crypto` backend only. It needs exactly one backend, and
//! the RustCrypto crates build much faster than `aws_lc_rs`, which compiles the AWS-LC C library.
//! The cost is slower signature checks, which the verified-token cache hides for repeated tokens.
//!
//! ```no_run
//! # async fn example() -> Result<(), portcullis_jwt::ConfigError> {
//! use std::collections::HashMap;
//! use portcullis_jwt::{KeySource, ProviderConfig, RequestView, TokenOutcome, Verifier, VerifierConfig};
//!
//! let mut provider = ProviderConfig::new("keycloak", "https://sso.example/realms/main", KeySource::OidcDiscovery);
//! provider.audiences = vec!["orders".to_owned()];
//! let verifier = Verifier::new(VerifierConfig { providers: vec![provider], ..Default::default() })?;
//! verifier.start().await;
//!
//! let headers = HashMap::from([("authorization".to_owned(), "Bearer eyJ...".to_owned())]);
//! match verifier.authenticate(&RequestView::new(&headers, "/orders?page=2")).await {
//!     TokenOutcome::NoToken => {}
//!     TokenOutcome::Valid(identity) => println!("caller {:?}", identity.subject),
//!     TokenOutcome::Invalid(invalid) => println!("401, WWW-Authenticate: {}", invalid.www_authenticate()),
//! }
//! # Ok(())
//! # }
//! ```

mod algorithm;
mod claims;
mod clock;
mod config;
mod error;
mod extract;
mod fetch;
mod jwks;
mod keys;
mod observer;
mod outcome;
mod provider;
mod token;
mod token_cache;
mod upstream;
mod verifier;

pub use algorithm::{SignatureAlgorithm, UnsupportedAlgorithm};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    ClaimToHeader, DEFAULT_CLOCK_SKEW, DEFAULT_MAX_TOKEN_BYTES, DEFAULT_TOKEN_CACHE_ENTRIES,
    HttpClientConfig, JwksFetchConfig, KeySource, ProviderConfig, TokenCacheConfig, TokenLocation,
    VerifierConfig,
};
pub use error::{ConfigError, ConfigProblem};
pub use extract::{RequestView, TokenSource};
pub use fetch::FetchError;
pub use jwks::{JwksError, SkippedKey};
pub use keys::ProviderStatus;
pub use observer::{JwtObserver, NoopObserver};
pub use outcome::{
    Identity, InvalidReason, InvalidToken, TokenOutcome, UpstreamHeaders,
    www_authenticate_invalid_token,
};
pub use verifier::{Verifier, VerifierBuilder};
