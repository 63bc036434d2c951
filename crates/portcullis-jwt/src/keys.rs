//! The key cache of one provider: a lock-free snapshot read on the request path, refreshed in
//! the background and on demand when a token names an unknown `kid`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use reqwest::Url;

use crate::clock::{Clock, elapsed_between};
use crate::config::JwksFetchConfig;
use crate::fetch::{FetchError, FetchLimits, discover_jwks_uri, fetch};
use crate::jwks::{KeyId, ParsedJwks, SkippedKey, VerificationKey, parse_jwks};
use crate::observer::JwtObserver;

/// One immutable generation of a provider's keys.
#[derive(Debug)]
pub(crate) struct KeySet {
    pub keys: Vec<Arc<VerificationKey>>,
    pub ids: HashSet<KeyId>,
    pub skipped: Vec<SkippedKey>,
    pub fetched_at: SystemTime,
}

/// Source of a remote provider's JWKS.
#[derive(Debug, Clone)]
pub(crate) enum RemoteSource {
    Jwks(Url),
    Discovery { issuer: String },
}

/// Status of a provider's keys, from [`crate::Verifier::status`].
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderStatus {
    /// Provider name.
    pub provider: String,
    /// Number of usable keys in the current key set.
    pub key_count: usize,
    /// Keys of the current key set that were skipped, and why.
    pub skipped_keys: Vec<SkippedKey>,
    /// When the current key set was loaded.
    pub keys_loaded_at: Option<SystemTime>,
    /// True when tokens of this provider can be verified now (keys loaded and not stale).
    pub usable: bool,
    /// Number of fetch attempts (remote sources only).
    pub fetch_attempts: u64,
    /// Failed fetches since the last success.
    pub consecutive_failures: u32,
    /// Error of the last failed fetch, cleared by a success.
    pub last_error: Option<FetchError>,
}

#[derive(Debug, Default)]
struct FetchState {
    /// `jwks_uri` from discovery, cleared after a failed JWKS fetch so that discovery runs again.
    discovered_jwks_uri: Option<Url>,
    last_unknown_kid_fetch: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct RefreshStatus {
    fetch_attempts: u64,
    consecutive_failures: u32,
    last_error: Option<FetchError>,
}

struct Remote {
    source: RemoteSource,
    client: reqwest::Client,
    config: JwksFetchConfig,
    /// Held for the whole of a fetch: concurrent callers wait for the running fetch and then
    /// see its result instead of starting their own.
    fetch_state: tokio::sync::Mutex<FetchState>,
    status: Mutex<RefreshStatus>,
}

/// Keys of one provider.
pub(crate) struct ProviderKeys {
    name: String,
    remote: Option<Remote>,
    snapshot: ArcSwapOption<KeySet>,
    generation: AtomicU64,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn JwtObserver>,
}

impl ProviderKeys {
    /// Creates the key cache of a provider whose keys were read from configuration.
    pub fn fixed(
        name: String,
        parsed: ParsedJwks,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn JwtObserver>,
    ) -> Self {
        let keys = Self {
            name,
            remote: None,
            snapshot: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            clock,
            observer,
        };
        keys.install(parsed);
        keys
    }

    /// Creates the key cache of a remote provider; it is empty until the first fetch.
    pub fn remote(
        name: String,
        source: RemoteSource,
        client: reqwest::Client,
        config: JwksFetchConfig,
        clock: Arc<dyn Clock>,
        observer: Arc<dyn JwtObserver>,
    ) -> Self {
        let remote = Remote {
            source,
            client,
            config,
            fetch_state: tokio::sync::Mutex::new(FetchState::default()),
            status: Mutex::new(RefreshStatus::default()),
        };
        Self {
            name,
            remote: Some(remote),
            snapshot: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            clock,
            observer,
        }
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Returns the current keys, or `None` when none were loaded or they are older than
    /// `max_staleness`.
    pub fn current(&self, now: SystemTime) -> Option<Arc<KeySet>> {
        let snapshot = self.snapshot.load_full()?;
        if let Some(remote) = &self.remote
            && elapsed_between(snapshot.fetched_at, now) > remote.config.max_staleness
        {
            return None;
        }
        Some(snapshot)
    }

    /// Generation of the latest key set; it changes whenever a fetch succeeds.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Fetches the keys now, waiting for a fetch already under way instead of starting another.
    /// Returns the `max-age` of the response on success.
    pub async fn refresh(&self) -> Result<Option<Duration>, FetchError> {
        let Some(remote) = &self.remote else {
            return Ok(None);
        };
        let seen = self.generation();
        let mut state = remote.fetch_state.lock().await;
        if self.generation() != seen {
            // Another caller fetched while this one waited.
            return Ok(None);
        }
        self.fetch_locked(remote, &mut state).await
    }

    /// Fetches the keys after a token named a `kid` missing from the current keys (or when no
    /// usable keys are loaded; `kid` is then `None`). Concurrent callers share one fetch: a
    /// caller that waited for another's fetch returns at once when that fetch brought the key.
    /// Fetches for unknown keys are at most one per `unknown_kid_refetch_interval`. Returns true
    /// when the key (or any usable key set, for `None`) is loaded afterwards.
    pub async fn refetch_for_unknown_kid(&self, kid: Option<&str>) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        let mut state = remote.fetch_state.lock().await;
        if self.has_key(kid) {
            return true;
        }

        let now = self.clock.now();
        let rate_limited = state.last_unknown_kid_fetch.is_some_and(|last| {
            elapsed_between(last, now) < remote.config.unknown_kid_refetch_interval
        });
        if rate_limited {
            self.observer.unknown_kid_refetch(&self.name, false);
            return false;
        }
        state.last_unknown_kid_fetch = Some(now);
        self.observer.unknown_kid_refetch(&self.name, true);
        tracing::debug!(jwt.provider = %self.name, jwt.kid = ?kid, "token names an unknown key; fetching the key set");
        self.fetch_locked(remote, &mut state).await.is_ok() && self.has_key(kid)
    }

    /// Returns true when the current usable keys contain `kid` (any key, for `None`).
    fn has_key(&self, kid: Option<&str>) -> bool {
        match self.current(self.clock.now()) {
            Some(set) => {
                kid.is_none_or(|kid| set.keys.iter().any(|key| key.kid.as_deref() == Some(kid)))
            }
            None => false,
        }
    }

    async fn fetch_locked(
        &self,
        remote: &Remote,
        state: &mut FetchState,
    ) -> Result<Option<Duration>, FetchError> {
        let limits = FetchLimits {
            timeout: remote.config.fetch_timeout,
            max_bytes: remote.config.max_response_bytes,
        };
        let result = self.fetch_document(remote, state, limits).await;

        let mut status = remote
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        status.fetch_attempts += 1;
        match result {
            Ok((parsed, max_age)) => {
                status.consecutive_failures = 0;
                status.last_error = None;
                drop(status);
                self.observer
                    .jwks_refreshed(&self.name, parsed.keys.len(), parsed.skipped.len());
                self.install(parsed);
                Ok(max_age)
            }
            Err(error) => {
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                status.last_error = Some(error.clone());
                let failures = status.consecutive_failures;
                drop(status);
                if matches!(remote.source, RemoteSource::Discovery { .. }) {
                    state.discovered_jwks_uri = None;
                }
                tracing::warn!(
                    jwt.provider = %self.name,
                    jwt.consecutive_failures = failures,
                    error = %error,
                    "JWKS fetch failed; keeping the previous keys until they are stale"
                );
                self.observer.jwks_refresh_failed(&self.name, &error);
                Err(error)
            }
        }
    }

    async fn fetch_document(
        &self,
        remote: &Remote,
        state: &mut FetchState,
        limits: FetchLimits,
    ) -> Result<(ParsedJwks, Option<Duration>), FetchError> {
        let url = match (&remote.source, &state.discovered_jwks_uri) {
            (RemoteSource::Jwks(url), _) => url.clone(),
            (RemoteSource::Discovery { .. }, Some(url)) => url.clone(),
            (RemoteSource::Discovery { issuer }, None) => {
                let url = discover_jwks_uri(
                    &remote.client,
                    issuer,
                    limits,
                    remote.config.allow_http_loopback,
                )
                .await?;
                tracing::debug!(jwt.provider = %self.name, jwks_uri = %url, "discovered the JWKS URL");
                state.discovered_jwks_uri = Some(url.clone());
                url
            }
        };
        let fetched = fetch(&remote.client, &url, limits).await?;
        let parsed = parse_jwks(&fetched.body).map_err(|source| FetchError::Jwks {
            url: url.to_string(),
            source,
        })?;
        Ok((parsed, fetched.max_age))
    }

    /// Publishes a new key set and logs skipped keys when they differ from the previous set's.
    fn install(&self, parsed: ParsedJwks) {
        let previous = self.snapshot.load();
        let skipped_changed = previous
            .as_ref()
            .is_none_or(|previous| previous.skipped != parsed.skipped);
        for skipped in &parsed.skipped {
            if skipped_changed {
                tracing::info!(jwt.provider = %self.name, key = %skipped, "skipped a JWKS key");
            } else {
                tracing::debug!(jwt.provider = %self.name, key = %skipped, "skipped a JWKS key");
            }
        }

        let generation = self.generation.load(Ordering::Acquire) + 1;
        let ids = parsed.key_ids();
        let key_set = KeySet {
            keys: parsed.keys,
            ids,
            skipped: parsed.skipped,
            fetched_at: self.clock.now(),
        };
        tracing::debug!(jwt.provider = %self.name, jwt.keys = key_set.keys.len(), jwt.generation = generation, "loaded keys");
        self.snapshot.store(Some(Arc::new(key_set)));
        self.generation.store(generation, Ordering::Release);
    }

    /// Delay before the next scheduled refresh: the response's `max-age` (or the default) within
    /// the configured bounds after a success, an exponential backoff after failures.
    pub fn next_refresh_delay(&self, result: &Result<Option<Duration>, FetchError>) -> Duration {
        let Some(remote) = &self.remote else {
            return Duration::MAX;
        };
        let config = &remote.config;
        match result {
            Ok(max_age) => max_age.unwrap_or(config.default_refresh_interval).clamp(
                config.min_refresh_interval,
                config.max_refresh_interval.max(config.min_refresh_interval),
            ),
            Err(_) => {
                let failures = remote
                    .status
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .consecutive_failures;
                let exponent = failures.saturating_sub(1).min(20);
                config
                    .initial_backoff
                    .saturating_mul(1 << exponent)
                    .min(config.max_backoff)
            }
        }
    }

    /// Runs scheduled refreshes forever; the verifier aborts the task when it is dropped.
    pub async fn refresh_loop(self: Arc<Self>, first_delay: Duration) {
        let mut delay = first_delay;
        loop {
            tokio::time::sleep(with_jitter(delay)).await;
            let result = self.refresh().await;
            delay = self.next_refresh_delay(&result);
            self.report_key_age();
            tracing::debug!(jwt.provider = %self.name, next_refresh_in = ?delay, "scheduled the next JWKS refresh");
        }
    }

    pub fn report_key_age(&self) {
        if let Some(snapshot) = self.snapshot.load().as_ref() {
            self.observer.key_age(
                &self.name,
                elapsed_between(snapshot.fetched_at, self.clock.now()),
            );
        }
    }

    pub fn status(&self) -> ProviderStatus {
        let snapshot = self.snapshot.load_full();
        let (fetch_attempts, consecutive_failures, last_error) = match &self.remote {
            Some(remote) => {
                let status = remote
                    .status
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                (
                    status.fetch_attempts,
                    status.consecutive_failures,
                    status.last_error.clone(),
                )
            }
            None => (0, 0, None),
        };
        ProviderStatus {
            provider: self.name.clone(),
            key_count: snapshot.as_ref().map_or(0, |set| set.keys.len()),
            skipped_keys: snapshot
                .as_ref()
                .map(|set| set.skipped.clone())
                .unwrap_or_default(),
            keys_loaded_at: snapshot.as_ref().map(|set| set.fetched_at),
            usable: self.current(self.clock.now()).is_some(),
            fetch_attempts,
            consecutive_failures,
            last_error,
        }
    }
}

/// Shortens a delay by up to 10 %, so that sidecars that started or failed together spread
/// their fetches over time instead of reaching the issuer at the same moment.
fn with_jitter(delay: Duration) -> Duration {
    use std::hash::BuildHasher;

    let random = std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now());
    let fraction = (random % 1000) as f64 / 10_000.0;
    delay.saturating_sub(delay.mul_f64(fraction))
}
