//! Wall-clock source, replaceable in tests so that expiry can be checked without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Source of the current time for claim checks, cache expiry, key staleness and the
/// unknown-`kid` rate limit. Background refresh scheduling uses the Tokio timer instead.
pub trait Clock: Send + Sync + 'static {
    /// Returns the current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when a test sets or advances it.
#[derive(Debug)]
pub struct ManualClock {
    millis_since_epoch: AtomicU64,
}

impl ManualClock {
    /// Creates a clock showing `seconds` after the Unix epoch.
    pub fn at_unix_seconds(seconds: u64) -> Self {
        Self {
            millis_since_epoch: AtomicU64::new(seconds * 1000),
        }
    }

    /// Sets the time to `seconds` after the Unix epoch.
    pub fn set_unix_seconds(&self, seconds: u64) {
        self.millis_since_epoch
            .store(seconds * 1000, Ordering::SeqCst);
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let millis = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis_since_epoch.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.millis_since_epoch.load(Ordering::SeqCst))
    }
}

/// Seconds since the Unix epoch as a float, the unit of JWT NumericDate values. Times before
/// the epoch map to 0.
pub(crate) fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

/// Time elapsed from `earlier` to `now`, or zero when the clock went backwards.
pub(crate) fn elapsed_between(earlier: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(earlier).unwrap_or(Duration::ZERO)
}
