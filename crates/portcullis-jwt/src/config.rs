//! Configuration of the verifier: providers, key sources, token locations and cache bounds.
//!
//! Every type here is a plain struct with public fields and a `Default` (or a constructor) that
//! carries the documented defaults, so that a YAML loader can map onto it field by field.
//! [`crate::Verifier::new`] validates the whole tree and reports every problem it finds.

use std::path::PathBuf;
use std::time::Duration;

use crate::algorithm::SignatureAlgorithm;

/// Largest token accepted, in bytes. Larger tokens are rejected before any decoding. 8 KiB is
/// far above the 1 to 2 KiB of typical access tokens and matches common header size limits.
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, the same default as Envoy's `jwt_authn`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Number of verified tokens remembered so that a repeated token skips the signature check.
pub const DEFAULT_TOKEN_CACHE_ENTRIES: usize = 10_000;

/// Top-level configuration of a [`crate::Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Identity providers. A token is matched to the provider whose `issuer` equals its `iss`.
    pub providers: Vec<ProviderConfig>,
    /// Tokens longer than this many bytes are rejected as `too_large` before decoding.
    pub max_token_bytes: usize,
    /// Bounds of the cache of verified tokens.
    pub token_cache: TokenCacheConfig,
    /// HTTP client settings shared by all remote key sources.
    pub http: HttpClientConfig,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            token_cache: TokenCacheConfig::default(),
            http: HttpClientConfig::default(),
        }
    }
}

/// One trusted token issuer.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Name used in logs, metrics and [`crate::Identity::provider`]. Must be unique.
    pub name: String,
    /// Expected `iss` claim, compared byte for byte. Must be unique across providers.
    pub issuer: String,
    /// Accepted audiences. The token's `aud` (a string or an array) must contain at least one of
    /// them. An empty list disables the audience check, as in Envoy's `jwt_authn`.
    pub audiences: Vec<String>,
    /// Source of the public keys. `None` is allowed only with `hmac_secret_file`.
    pub keys: Option<KeySource>,
    /// Locations searched for this provider's tokens. An empty list means
    /// [`TokenLocation::default_locations`].
    pub locations: Vec<TokenLocation>,
    /// Tolerance applied to `exp`, `nbf` and `iat`.
    pub clock_skew: Duration,
    /// Reject tokens without an `exp` claim. Defaults to true; tokens without `exp` are never
    /// put in the verified-token cache.
    pub require_expiration: bool,
    /// Claims that must be present and not null, by top-level name.
    pub required_claims: Vec<String>,
    /// Claims copied into request headers sent upstream.
    pub claim_to_headers: Vec<ClaimToHeader>,
    /// Keep the token in the request sent upstream. When false (the default, as in Envoy's
    /// `jwt_authn`), the header that carried the token is removed.
    pub forward: bool,
    /// File that contains the HMAC shared secret (raw bytes, one trailing newline is removed).
    /// HS256/384/512 tokens are rejected unless this is set. Secrets are never configured inline.
    pub hmac_secret_file: Option<PathBuf>,
    /// Accepted signature algorithms. Empty means every supported asymmetric algorithm, plus
    /// HS256/384/512 when `hmac_secret_file` is set.
    pub algorithms: Vec<SignatureAlgorithm>,
    /// Refresh, retry and staleness settings of a remote key source.
    pub jwks: JwksFetchConfig,
}

impl ProviderConfig {
    /// Creates a provider with the defaults of every optional setting.
    pub fn new(name: impl Into<String>, issuer: impl Into<String>, keys: KeySource) -> Self {
        Self {
            name: name.into(),
            issuer: issuer.into(),
            audiences: Vec::new(),
            keys: Some(keys),
            locations: Vec::new(),
            clock_skew: DEFAULT_CLOCK_SKEW,
            require_expiration: true,
            required_claims: Vec::new(),
            claim_to_headers: Vec::new(),
            forward: false,
            hmac_secret_file: None,
            algorithms: Vec::new(),
            jwks: JwksFetchConfig::default(),
        }
    }
}

/// Source of a provider's public keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS document fetched over HTTPS and refreshed in the background.
    RemoteJwks {
        /// URL of the JWKS document.
        uri: String,
    },
    /// OpenID Connect discovery: `{issuer}/.well-known/openid-configuration` names the
    /// `jwks_uri`, which is then fetched as with [`KeySource::RemoteJwks`].
    OidcDiscovery,
    /// A JWKS document read from a local file once, when the verifier is built.
    // NOTE: the file is not watched, so a changed file takes effect only on restart.
    File {
        /// Path of the JWKS file.
        path: PathBuf,
    },
    /// A JWKS document given as a string in the configuration.
    Inline {
        /// The JWKS JSON text.
        jwks: String,
    },
}

/// A place in the request where a token may be found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenLocation {
    /// A request header. Repeated headers joined by commas are split, because a JWT never
    /// contains a comma, so each part is a separate token.
    Header {
        /// Header name; matched in lowercase.
        name: String,
        /// Scheme or prefix before the token, such as `Bearer `. It is matched ignoring ASCII
        /// case, and spaces after it are skipped. A value without the prefix is not a token.
        value_prefix: Option<String>,
    },
    /// A query parameter, matched by exact name after percent-decoding.
    QueryParameter {
        /// Parameter name.
        name: String,
    },
    /// A cookie, matched by exact name in the `cookie` header.
    Cookie {
        /// Cookie name.
        name: String,
    },
}

impl TokenLocation {
    /// Returns the `Authorization: Bearer <token>` location.
    pub fn authorization_bearer() -> Self {
        TokenLocation::Header {
            name: "authorization".to_owned(),
            value_prefix: Some("Bearer ".to_owned()),
        }
    }

    /// Returns the locations Envoy's `jwt_authn` reads when none are configured: the
    /// `Authorization` header with the `Bearer` scheme, then the `access_token` query parameter.
    pub fn default_locations() -> Vec<Self> {
        vec![
            Self::authorization_bearer(),
            TokenLocation::QueryParameter {
                name: "access_token".to_owned(),
            },
        ]
    }
}

impl std::fmt::Display for TokenLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenLocation::Header { name, .. } => write!(f, "header {name}"),
            TokenLocation::QueryParameter { name } => write!(f, "query parameter {name}"),
            TokenLocation::Cookie { name } => write!(f, "cookie {name}"),
        }
    }
}

/// Copy of one claim into one upstream request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToHeader {
    /// Top-level claim name.
    pub claim: String,
    /// Header name, stored in lowercase.
    pub header: String,
}

/// Refresh, retry and staleness settings of a remote JWKS.
#[derive(Debug, Clone)]
pub struct JwksFetchConfig {
    /// Refresh interval when the response has no `Cache-Control: max-age`.
    pub default_refresh_interval: Duration,
    /// Lower bound applied to `max-age`, so that a tiny `max-age` cannot flood the issuer.
    pub min_refresh_interval: Duration,
    /// Upper bound applied to `max-age`, so that rotated keys are picked up within this time.
    pub max_refresh_interval: Duration,
    /// Minimum time between two fetches triggered by tokens naming an unknown `kid`.
    pub unknown_kid_refetch_interval: Duration,
    /// How long the last good keys stay usable while every refresh fails. After this, tokens
    /// of the provider are rejected with `keys_unavailable` until a fetch succeeds.
    pub max_staleness: Duration,
    /// Time limit of one HTTP request, body included.
    pub fetch_timeout: Duration,
    /// Largest accepted response body.
    pub max_response_bytes: usize,
    /// First retry delay after a failed fetch. It doubles after every further failure.
    pub initial_backoff: Duration,
    /// Upper bound of the retry delay.
    pub max_backoff: Duration,
    /// Allow plain `http://` URLs whose host is a loopback address (127.0.0.0/8, `::1` or
    /// `localhost`). Every other URL must use `https://`.
    pub allow_http_loopback: bool,
}

impl Default for JwksFetchConfig {
    fn default() -> Self {
        Self {
            default_refresh_interval: Duration::from_secs(5 * 60),
            min_refresh_interval: Duration::from_secs(30),
            max_refresh_interval: Duration::from_secs(24 * 60 * 60),
            unknown_kid_refetch_interval: Duration::from_secs(10),
            // One day rides out an overnight outage of the issuer. Keys that the issuer removes
            // during an outage cannot be seen anyway.
            max_staleness: Duration::from_secs(24 * 60 * 60),
            fetch_timeout: Duration::from_secs(5),
            max_response_bytes: 1024 * 1024,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            allow_http_loopback: false,
        }
    }
}

/// Bounds of the verified-token cache.
#[derive(Debug, Clone)]
pub struct TokenCacheConfig {
    /// Maximum number of entries; the least recently used entry is evicted first. 0 disables
    /// the cache.
    pub max_entries: usize,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_TOKEN_CACHE_ENTRIES,
        }
    }
}

/// HTTP client settings for JWKS and discovery requests.
#[derive(Debug, Clone, Default)]
pub struct HttpClientConfig {
    /// PEM file with extra trusted CA certificates, added to the system trust store.
    pub extra_ca_file: Option<PathBuf>,
}
