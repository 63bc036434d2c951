//! Hooks for metrics: the binary maps these callbacks onto its Prometheus registry.

use std::time::Duration;

use crate::fetch::FetchError;

/// Callbacks on verification and key refresh events. Every method has an empty default, so an
/// implementation overrides only what it records. Callbacks run on the request path or in the
/// refresh task and must not block.
pub trait JwtObserver: Send + Sync + 'static {
    /// Called once per token checked, and once with `no_token` for a request without tokens.
    /// `outcome` is `valid` or an [`crate::InvalidReason::code`]. `provider` names the provider
    /// that handled the token, when one was selected. `from_cache` is true when the
    /// verified-token cache returned the identity. The combined outcome of a request with several tokens
    /// (`ambiguous`) is not reported here; use [`crate::TokenOutcome::label`] for it.
    fn token_checked(&self, provider: Option<&str>, outcome: &str, from_cache: bool) {
        let _ = (provider, outcome, from_cache);
    }

    /// Reports a successful JWKS fetch with `key_count` usable and `skipped_count` skipped keys.
    fn jwks_refreshed(&self, provider: &str, key_count: usize, skipped_count: usize) {
        let _ = (provider, key_count, skipped_count);
    }

    /// Reports a failed JWKS or discovery fetch. The previous keys stay in use until they are stale.
    fn jwks_refresh_failed(&self, provider: &str, error: &FetchError) {
        let _ = (provider, error);
    }

    /// Reports a token naming an unknown `kid`. `fetched` is false when the rate limit skipped
    /// the fetch.
    fn unknown_kid_refetch(&self, provider: &str, fetched: bool) {
        let _ = (provider, fetched);
    }

    /// Reports the age of the provider's current keys after every refresh attempt.
    fn key_age(&self, provider: &str, age: Duration) {
        let _ = (provider, age);
    }
}

/// An observer that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl JwtObserver for NoopObserver {}
