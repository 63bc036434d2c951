//! Bounded cache of verified tokens, so that a repeated token skips the signature check.
//!
//! Entries are keyed by the SHA-256 of the token, so the raw token is not kept. An entry is
//! used only while the token's `exp` is in the future (the clock skew is not added), and only
//! while the key that verified it is still in the provider's current, non-stale key set. So a
//! key removed from the JWKS invalidates its cached tokens at the next lookup after the refetch.
//! Tokens without `exp` are never cached.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use crate::jwks::KeyId;
use crate::outcome::Identity;

#[derive(Debug, Clone)]
pub(crate) struct CachedToken {
    pub provider: usize,
    /// Key that verified the signature; `None` for HMAC, whose secret cannot change.
    pub key_id: Option<KeyId>,
    /// Unix seconds after which the entry is not used.
    pub expires_at: f64,
    pub identity: Identity,
}

pub(crate) struct TokenCache {
    // NOTE: one mutex for all entries; a lookup holds it for a hash and a map access only.
    entries: Option<Mutex<LruCache<[u8; 32], CachedToken>>>,
}

impl TokenCache {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: NonZeroUsize::new(max_entries)
                .map(|capacity| Mutex::new(LruCache::new(capacity))),
        }
    }

    /// Returns the entry when it has not expired at `now` (Unix seconds); expired entries are
    /// removed.
    pub fn get(&self, digest: &[u8; 32], now: f64) -> Option<CachedToken> {
        let entries = self.entries.as_ref()?;
        let mut entries = entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match entries.get(digest) {
            Some(entry) if now < entry.expires_at => Some(entry.clone()),
            Some(_) => {
                entries.pop(digest);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, digest: [u8; 32], entry: CachedToken) {
        if let Some(entries) = &self.entries {
            entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .put(digest, entry);
        }
    }

    pub fn remove(&self, digest: &[u8; 32]) {
        if let Some(entries) = &self.entries {
            entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop(digest);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries
            .as_ref()
            .map_or(0, |entries| entries.lock().unwrap().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::SignatureAlgorithm;

    fn entry(expires_at: f64) -> CachedToken {
        let identity = Identity {
            provider: "main".to_owned(),
            issuer: "https://issuer.test".to_owned(),
            subject: None,
            audiences: Vec::new(),
            claims: serde_json::Map::new(),
            kid: None,
            algorithm: SignatureAlgorithm::RS256,
            expires_at: None,
            token_fingerprint: "0000000000000000".to_owned(),
            locations: Vec::new(),
        };
        CachedToken {
            provider: 0,
            key_id: None,
            expires_at,
            identity,
        }
    }

    #[test]
    fn least_recently_used_entry_is_evicted_at_capacity() {
        let cache = TokenCache::new(2);
        cache.insert([1; 32], entry(100.0));
        cache.insert([2; 32], entry(100.0));
        assert!(cache.get(&[1; 32], 0.0).is_some());
        cache.insert([3; 32], entry(100.0));

        assert_eq!(cache.len(), 2);
        assert!(cache.get(&[2; 32], 0.0).is_none());
        assert!(cache.get(&[1; 32], 0.0).is_some());
        assert!(cache.get(&[3; 32], 0.0).is_some());
    }

    #[test]
    fn entry_is_dropped_at_its_expiry() {
        let cache = TokenCache::new(10);
        cache.insert([1; 32], entry(100.0));
        assert!(cache.get(&[1; 32], 99.9).is_some());
        assert!(cache.get(&[1; 32], 100.0).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn zero_capacity_disables_the_cache() {
        let cache = TokenCache::new(0);
        cache.insert([1; 32], entry(100.0));
        assert!(cache.get(&[1; 32], 0.0).is_none());
        assert_eq!(cache.len(), 0);
    }
}
