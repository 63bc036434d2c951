//! The verifier: finds the tokens of a request, verifies each against its provider, and
//! returns one [`TokenOutcome`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::task::AbortHandle;

use crate::algorithm::SignatureAlgorithm;
use crate::claims::check_claims;
use crate::clock::{Clock, SystemClock, unix_seconds};
use crate::config::VerifierConfig;
use crate::error::ConfigError;
use crate::extract::{TokenSource, tokens_at};
use crate::jwks::{KeyId, VerificationKey};
use crate::keys::ProviderStatus;
use crate::observer::{JwtObserver, NoopObserver};
use crate::outcome::{
    Identity, InvalidReason, InvalidToken, Rejection, TokenOutcome, UpstreamHeaders, shorten,
};
use crate::provider::{LocationEntry, Provider, Setup, build};
use crate::token::{ParsedToken, fingerprint, issuer_of, parse_token, token_digest};
use crate::token_cache::{CachedToken, TokenCache};
use crate::upstream;

/// Most tokens verified for one request. Every token costs a signature check, so a request
/// that repeats a header many times cannot make the verifier do unbounded work.
const MAX_TOKENS_PER_REQUEST: usize = 8;

/// Verifies the tokens of requests against the configured providers.
///
/// Cloning is cheap and clones share keys, caches and background tasks. The background refresh
/// tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    providers: Vec<Provider>,
    locations: Vec<LocationEntry>,
    max_token_bytes: usize,
    token_cache: TokenCache,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn JwtObserver>,
    started: AtomicBool,
    refresh_tasks: Mutex<Vec<AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self
            .refresh_tasks
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let providers: Vec<&str> = self
            .inner
            .providers
            .iter()
            .map(|provider| provider.name.as_str())
            .collect();
        f.debug_struct("Verifier")
            .field("providers", &providers)
            .field("max_token_bytes", &self.inner.max_token_bytes)
            .finish_non_exhaustive()
    }
}

/// Builder of a [`Verifier`] with a custom clock or observer.
pub struct VerifierBuilder {
    config: VerifierConfig,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn JwtObserver>,
}

impl VerifierBuilder {
    /// Replaces the system clock, for tests.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the metrics observer.
    pub fn observer(mut self, observer: Arc<dyn JwtObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// Validates the configuration and reads local keys and secrets. Remote keys are fetched
    /// by [`Verifier::start`].
    pub fn build(self) -> Result<Verifier, ConfigError> {
        let Setup {
            providers,
            locations,
        } = build(&self.config, &self.clock, &self.observer)
            .map_err(|problems| ConfigError { problems })?;
        let inner = Inner {
            providers,
            locations,
            max_token_bytes: self.config.max_token_bytes,
            token_cache: TokenCache::new(self.config.token_cache.max_entries),
            clock: self.clock,
            observer: self.observer,
            started: AtomicBool::new(false),
            refresh_tasks: Mutex::new(Vec::new()),
        };
        Ok(Verifier {
            inner: Arc::new(inner),
        })
    }
}

/// One token read from the request.
struct FoundToken {
    token: String,
    location: usize,
}

/// A token that passed every check.
struct Verified {
    identity: Identity,
    provider: usize,
}

/// Result of a verification attempt that may need fresh keys first.
enum Attempt {
    Done(Result<Verified, InvalidToken>),
    NeedKeys {
        provider: usize,
        kid: Option<String>,
    },
}

impl Verifier {
    /// Builds a verifier with the system clock and no observer.
    pub fn new(config: VerifierConfig) -> Result<Self, ConfigError> {
        Self::builder(config).build()
    }

    /// Starts building a verifier.
    pub fn builder(config: VerifierConfig) -> VerifierBuilder {
        VerifierBuilder {
            config,
            clock: Arc::new(SystemClock),
            observer: Arc::new(NoopObserver),
        }
    }

    /// Fetches the keys of every remote provider once, concurrently, then spawns one refresh
    /// task per remote provider. A provider whose first fetch fails is retried with backoff;
    /// its tokens are rejected with `keys_unavailable` until a fetch succeeds. Returns the
    /// status of every provider. A second call only returns the status.
    ///
    /// Must be called within a Tokio runtime.
    pub async fn start(&self) -> Vec<ProviderStatus> {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return self.status();
        }

        let remote_keys: Vec<_> = self
            .inner
            .providers
            .iter()
            .filter_map(|provider| provider.keys.clone())
            .filter(|keys| keys.is_remote())
            .collect();
        let first_fetches: Vec<_> = remote_keys
            .iter()
            .map(|keys| {
                let keys = keys.clone();
                tokio::spawn(async move {
                    let result = keys.refresh().await;
                    keys.report_key_age();
                    keys.next_refresh_delay(&result)
                })
            })
            .collect();

        let mut tasks = Vec::new();
        for (keys, first_fetch) in remote_keys.into_iter().zip(first_fetches) {
            // A panicked first fetch is retried soon by the refresh loop.
            let first_delay = first_fetch.await.unwrap_or(Duration::from_secs(1));
            tasks.push(tokio::spawn(keys.refresh_loop(first_delay)).abort_handle());
        }
        self.inner
            .refresh_tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(tasks);
        self.status()
    }

    /// Returns the key status of every provider, in configuration order.
    pub fn status(&self) -> Vec<ProviderStatus> {
        self.inner
            .providers
            .iter()
            .map(|provider| match &provider.keys {
                Some(keys) => keys.status(),
                None => ProviderStatus {
                    provider: provider.name.clone(),
                    key_count: 0,
                    skipped_keys: Vec::new(),
                    keys_loaded_at: None,
                    usable: provider.hmac_secret.is_some(),
                    fetch_attempts: 0,
                    consecutive_failures: 0,
                    last_error: None,
                },
            })
            .collect()
    }

    /// Authenticates a request.
    ///
    /// Every configured location is read. No token gives [`TokenOutcome::NoToken`]. With one
    /// token, its verification decides. With several (at most 8), every one must verify and
    /// name the same issuer and subject, or the outcome is `ambiguous`.
    ///
    /// The future completes without waiting when the keys are cached. It waits only for a key
    /// fetch after a token names an unknown `kid`, and the fetch timeout bounds that wait.
    pub async fn authenticate<S: TokenSource + ?Sized>(&self, request: &S) -> TokenOutcome {
        let found = self.find_tokens(request);
        if found.is_empty() {
            self.inner.observer.token_checked(None, "no_token", false);
            return TokenOutcome::NoToken;
        }
        if found.len() > MAX_TOKENS_PER_REQUEST {
            self.inner
                .observer
                .token_checked(None, InvalidReason::Ambiguous.code(), false);
            let message = format!(
                "request carries {} tokens, more than the maximum of {MAX_TOKENS_PER_REQUEST}",
                found.len()
            );
            return TokenOutcome::Invalid(Rejection::new(InvalidReason::Ambiguous, message).into());
        }

        let mut results = Vec::with_capacity(found.len());
        for token in &found {
            let result = self.verify_found(token).await.map_err(|mut invalid| {
                invalid.location = Some(self.inner.locations[token.location].location.clone());
                invalid
            });
            results.push(result);
        }
        combine(results, &found, &self.inner.locations)
    }

    /// Returns the header changes for the upstream request: claims copied into headers, the
    /// token removed when its provider does not forward it, and configured claim headers
    /// removed whenever no verified claim fills them, so that a client cannot forge them.
    pub fn upstream_headers<S: TokenSource + ?Sized>(
        &self,
        outcome: &TokenOutcome,
        request: &S,
    ) -> UpstreamHeaders {
        upstream::upstream_headers(&self.inner.providers, outcome, request)
    }

    fn find_tokens<S: TokenSource + ?Sized>(&self, request: &S) -> Vec<FoundToken> {
        let source = SourceRef(request);
        let mut found = Vec::new();
        for (index, entry) in self.inner.locations.iter().enumerate() {
            for token in tokens_at(&source, &entry.location) {
                found.push(FoundToken {
                    token,
                    location: index,
                });
            }
        }
        found
    }

    async fn verify_found(&self, found: &FoundToken) -> Result<Identity, InvalidToken> {
        let inner = &self.inner;
        let token = found.token.as_str();
        if token.len() > inner.max_token_bytes {
            let invalid = Rejection::new(
                InvalidReason::TooLarge,
                format!(
                    "token is {} bytes, more than the maximum of {}",
                    token.len(),
                    inner.max_token_bytes
                ),
            );
            return Err(self.record_invalid(invalid.into(), None, None));
        }
        if token.is_empty() {
            return Err(self.record_invalid(
                Rejection::new(InvalidReason::Malformed, "token is empty").into(),
                None,
                None,
            ));
        }

        let digest = token_digest(token);
        let fingerprint = fingerprint(&digest);
        let entry = &inner.locations[found.location];
        if let Some(identity) = self.cached_identity(&digest, entry) {
            return Ok(identity);
        }

        let mut attempt = self.verify_uncached(token, &digest, entry, true);
        if let Attempt::NeedKeys { provider, kid } = attempt {
            if let Some(keys) = &inner.providers[provider].keys {
                keys.refetch_for_unknown_kid(kid.as_deref()).await;
            }
            attempt = self.verify_uncached(token, &digest, entry, false);
        }

        match attempt {
            Attempt::Done(Ok(verified)) => {
                inner.observer.token_checked(
                    Some(&inner.providers[verified.provider].name),
                    "valid",
                    false,
                );
                tracing::debug!(
                    jwt.provider = %inner.providers[verified.provider].name,
                    jwt.fingerprint = %fingerprint,
                    jwt.kid = ?verified.identity.kid,
                    "token verified"
                );
                Ok(verified.identity)
            }
            Attempt::Done(Err(invalid)) => {
                Err(self.record_invalid(invalid, None, Some(fingerprint)))
            }
            Attempt::NeedKeys { provider, .. } => {
                let invalid = Rejection::new(
                    InvalidReason::KeysUnavailable,
                    "keys of the token's issuer are not available",
                );
                Err(self.record_invalid(invalid.into(), Some(provider), Some(fingerprint)))
            }
        }
    }

    /// Returns the cached identity when the entry is unexpired, its provider reads this location,
    /// and the key that verified it is still in the provider's current keys.
    fn cached_identity(&self, digest: &[u8; 32], entry: &LocationEntry) -> Option<Identity> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let cached = inner.token_cache.get(digest, unix_seconds(now))?;
        if !entry.providers.contains(&cached.provider) {
            return None;
        }
        let provider = &inner.providers[cached.provider];
        if let Some(key_id) = cached.key_id {
            let key_present = provider
                .keys
                .as_ref()
                .and_then(|keys| keys.current(now))
                .is_some_and(|set| set.ids.contains(&key_id));
            if !key_present {
                inner.token_cache.remove(digest);
                return None;
            }
        }
        inner
            .observer
            .token_checked(Some(&provider.name), "valid", true);
        let mut identity = cached.identity;
        identity.locations = vec![entry.location.clone()];
        Some(identity)
    }

    fn verify_uncached(
        &self,
        token: &str,
        digest: &[u8; 32],
        entry: &LocationEntry,
        may_refetch: bool,
    ) -> Attempt {
        let inner = &self.inner;
        let parsed = match parse_token(token) {
            Ok(parsed) => parsed,
            Err(invalid) => return Attempt::Done(Err(invalid.into())),
        };
        let issuer = match issuer_of(&parsed.claims) {
            Ok(issuer) => issuer,
            Err(invalid) => return Attempt::Done(Err(invalid.into())),
        };
        let Some(&provider_index) = entry
            .providers
            .iter()
            .find(|index| inner.providers[**index].issuer == issuer)
        else {
            let invalid = Rejection::new(
                InvalidReason::IssuerMismatch,
                format!(
                    "no provider accepts issuer {} in {}",
                    shorten(issuer),
                    entry.location
                ),
            );
            return Attempt::Done(Err(invalid.into()));
        };
        let provider = &inner.providers[provider_index];
        let with_provider = |rejection: Rejection| {
            let mut invalid = InvalidToken::from(rejection);
            invalid.provider = Some(provider.name.clone());
            invalid
        };

        let key_id = match self.check_signature(provider, &parsed, may_refetch) {
            Ok(key_id) => key_id,
            Err(SignatureFailure::NeedKeys) => {
                return Attempt::NeedKeys {
                    provider: provider_index,
                    kid: parsed.kid.clone(),
                };
            }
            Err(SignatureFailure::Invalid(invalid)) => {
                return Attempt::Done(Err(with_provider(invalid)));
            }
        };

        let now = unix_seconds(inner.clock.now());
        let checked = match check_claims(&provider.claim_rules, &parsed.claims, now) {
            Ok(checked) => checked,
            Err(invalid) => return Attempt::Done(Err(with_provider(invalid))),
        };

        let identity = Identity {
            provider: provider.name.clone(),
            issuer: issuer.to_owned(),
            subject: checked.subject,
            audiences: checked.audiences,
            kid: parsed.kid.clone(),
            algorithm: parsed.algorithm,
            expires_at: checked
                .expires_at
                .and_then(|exp| UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(exp).ok()?)),
            token_fingerprint: fingerprint(digest),
            locations: vec![entry.location.clone()],
            claims: parsed.claims,
        };
        if let Some(expires_at) = checked.expires_at {
            let cached = CachedToken {
                provider: provider_index,
                key_id,
                expires_at,
                identity: identity.clone(),
            };
            inner.token_cache.insert(*digest, cached);
        }
        Attempt::Done(Ok(Verified {
            identity,
            provider: provider_index,
        }))
    }

    /// Checks the signature with a key chosen by the provider's configuration, never by the
    /// token: HMAC only with a configured secret, otherwise a JWKS key whose type, curve and
    /// `alg` fit the token's `alg`. Returns the id of the key that verified it.
    fn check_signature(
        &self,
        provider: &Provider,
        parsed: &ParsedToken<'_>,
        may_refetch: bool,
    ) -> Result<Option<KeyId>, SignatureFailure> {
        let algorithm = parsed.algorithm;
        if algorithm.is_hmac() {
            verify_hmac(provider, parsed)?;
            return Ok(None);
        }
        if !provider.algorithms.contains(&algorithm) {
            return Err(invalid(
                InvalidReason::AlgorithmNotAllowed,
                format!("algorithm {algorithm} is not allowed"),
            ));
        }
        let Some(keys) = &provider.keys else {
            return Err(invalid(
                InvalidReason::AlgorithmNotAllowed,
                format!("algorithm {algorithm} is not allowed; the provider has no public keys"),
            ));
        };

        let Some(key_set) = keys.current(self.inner.clock.now()) else {
            if may_refetch && keys.is_remote() {
                return Err(SignatureFailure::NeedKeys);
            }
            return Err(invalid(
                InvalidReason::KeysUnavailable,
                "keys of the token's issuer are not available",
            ));
        };

        let candidates = match select_keys(&key_set.keys, parsed.kid.as_deref(), algorithm) {
            Ok(candidates) => candidates,
            Err(KeySelectionError::KidNotFound(_)) if may_refetch && keys.is_remote() => {
                return Err(SignatureFailure::NeedKeys);
            }
            Err(error) => return Err(SignatureFailure::Invalid(error.into_rejection(algorithm))),
        };

        for key in candidates {
            if verify_with(parsed, &key.decoding_key, algorithm) {
                return Ok(Some(key.id));
            }
        }
        Err(invalid(
            InvalidReason::BadSignature,
            "signature does not match any key of the issuer",
        ))
    }

    fn record_invalid(
        &self,
        mut invalid: InvalidToken,
        provider: Option<usize>,
        fingerprint: Option<String>,
    ) -> InvalidToken {
        if invalid.provider.is_none() {
            invalid.provider = provider.map(|index| self.inner.providers[index].name.clone());
        }
        invalid.token_fingerprint = fingerprint;
        self.inner.observer.token_checked(
            invalid.provider.as_deref(),
            invalid.reason.code(),
            false,
        );
        tracing::debug!(
            jwt.provider = ?invalid.provider,
            jwt.fingerprint = ?invalid.token_fingerprint,
            jwt.reason = invalid.reason.code(),
            jwt.message = %invalid.message,
            "token rejected"
        );
        invalid
    }
}

/// Failure to find a key that can check a token's signature.
enum KeySelectionError {
    /// No key has the token's `kid`, and no key without a `kid` fits the algorithm.
    KidNotFound(String),
    /// Keys with the token's `kid` exist, but none accepts the token's algorithm.
    KidRejectsAlgorithm(String),
    /// The token has no `kid`, and no key accepts its algorithm.
    NoKeyForAlgorithm,
}

impl KeySelectionError {
    fn into_rejection(self, algorithm: SignatureAlgorithm) -> Rejection {
        match self {
            KeySelectionError::KidNotFound(kid) => Rejection::new(
                InvalidReason::UnknownKey,
                format!("no key with kid {}", shorten(&kid)),
            ),
            KeySelectionError::KidRejectsAlgorithm(kid) => Rejection::new(
                InvalidReason::AlgorithmNotAllowed,
                format!(
                    "key {} does not accept algorithm {algorithm}",
                    shorten(&kid)
                ),
            ),
            KeySelectionError::NoKeyForAlgorithm => Rejection::new(
                InvalidReason::UnknownKey,
                format!("no key accepts algorithm {algorithm}"),
            ),
        }
    }
}

/// Chooses the keys that may verify a token. A token with a `kid` uses the keys with that
/// `kid` plus the keys without one, as Envoy's `jwt_authn` does. A token without a `kid` uses
/// every key. In both cases only keys whose type, curve and `alg` fit the algorithm are kept.
fn select_keys<'k>(
    keys: &'k [Arc<VerificationKey>],
    kid: Option<&str>,
    algorithm: SignatureAlgorithm,
) -> Result<Vec<&'k Arc<VerificationKey>>, KeySelectionError> {
    let fitting: Vec<_> = keys
        .iter()
        .filter(|key| key.accepts(algorithm))
        .filter(|key| kid.is_none() || key.kid.is_none() || key.kid.as_deref() == kid)
        .collect();
    if !fitting.is_empty() {
        return Ok(fitting);
    }
    let Some(kid) = kid else {
        return Err(KeySelectionError::NoKeyForAlgorithm);
    };
    if keys.iter().any(|key| key.kid.as_deref() == Some(kid)) {
        Err(KeySelectionError::KidRejectsAlgorithm(kid.to_owned()))
    } else {
        Err(KeySelectionError::KidNotFound(kid.to_owned()))
    }
}

enum SignatureFailure {
    Invalid(Rejection),
    NeedKeys,
}

fn invalid(reason: InvalidReason, message: impl Into<String>) -> SignatureFailure {
    SignatureFailure::Invalid(Rejection::new(reason, message))
}

fn verify_hmac(provider: &Provider, parsed: &ParsedToken<'_>) -> Result<(), SignatureFailure> {
    let algorithm = parsed.algorithm;
    let Some(secret) = &provider.hmac_secret else {
        return Err(invalid(
            InvalidReason::AlgorithmNotAllowed,
            format!("algorithm {algorithm} is not allowed; the provider has no shared secret"),
        ));
    };
    if !provider.algorithms.contains(&algorithm) {
        return Err(invalid(
            InvalidReason::AlgorithmNotAllowed,
            format!("algorithm {algorithm} is not allowed"),
        ));
    }
    if secret.length < algorithm.min_hmac_key_bytes() {
        return Err(invalid(
            InvalidReason::AlgorithmNotAllowed,
            format!(
                "algorithm {algorithm} needs a secret of at least {} bytes",
                algorithm.min_hmac_key_bytes()
            ),
        ));
    }
    if verify_with(parsed, &secret.key, algorithm) {
        Ok(())
    } else {
        Err(invalid(
            InvalidReason::BadSignature,
            "signature does not match the shared secret",
        ))
    }
}

fn verify_with(
    parsed: &ParsedToken<'_>,
    key: &jsonwebtoken::DecodingKey,
    algorithm: SignatureAlgorithm,
) -> bool {
    jsonwebtoken::crypto::verify(
        parsed.signature,
        parsed.signing_input.as_bytes(),
        key,
        algorithm.to_jsonwebtoken(),
    )
    .unwrap_or(false)
}

/// Merges the per-token results of one request into one outcome.
fn combine(
    results: Vec<Result<Identity, InvalidToken>>,
    found: &[FoundToken],
    locations: &[LocationEntry],
) -> TokenOutcome {
    let count = results.len();
    if count == 1 {
        return match results.into_iter().next() {
            Some(Ok(identity)) => TokenOutcome::Valid(identity),
            Some(Err(invalid)) => TokenOutcome::Invalid(invalid),
            None => TokenOutcome::NoToken,
        };
    }

    let mut identities = Vec::with_capacity(count);
    for result in results {
        match result {
            Ok(identity) => identities.push(identity),
            Err(invalid) => {
                let where_found = invalid
                    .location
                    .as_ref()
                    .map_or_else(String::new, |location| format!(" in {location}"));
                return TokenOutcome::Invalid(InvalidToken {
                    reason: InvalidReason::Ambiguous,
                    message: format!(
                        "request carries {count} tokens and the one{where_found} is invalid ({})",
                        invalid.reason
                    ),
                    ..invalid
                });
            }
        }
    }

    let first = identities.remove(0);
    if let Some(other) = identities
        .iter()
        .find(|other| other.issuer != first.issuer || other.subject != first.subject)
    {
        return TokenOutcome::Invalid(InvalidToken {
            reason: InvalidReason::Ambiguous,
            message: format!("request carries {count} tokens for different callers"),
            provider: Some(other.provider.clone()),
            location: other.locations.first().cloned(),
            token_fingerprint: Some(other.token_fingerprint.clone()),
        });
    }
    let mut identity = first;
    identity.locations.clear();
    for token in found {
        let location = &locations[token.location].location;
        if !identity.locations.contains(location) {
            identity.locations.push(location.clone());
        }
    }
    TokenOutcome::Valid(identity)
}

/// Adapts a possibly unsized source to `&dyn TokenSource`.
struct SourceRef<'s, S: ?Sized>(&'s S);

impl<S: TokenSource + ?Sized> TokenSource for SourceRef<'_, S> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.header(name)
    }

    fn query(&self) -> Option<&str> {
        self.0.query()
    }
}
