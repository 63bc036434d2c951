//! When to renew a certificate, and how long to wait after a failed attempt.

use std::time::{Duration, SystemTime};

/// Renew at two thirds of the lifetime: a third of the lifetime is left for retries when
/// Vault is down, which for a 24 h certificate is 8 h.
pub const DEFAULT_RENEW_FRACTION: f64 = 2.0 / 3.0;
/// Up to a tenth of the lifetime earlier, so sidecars started together do not all ask Vault
/// at the same second.
pub const DEFAULT_JITTER_FRACTION: f64 = 0.1;
/// First retry after one second: a Vault leader election usually completes within seconds.
pub const DEFAULT_MIN_RETRY: Duration = Duration::from_secs(1);
/// Retries are at least this frequent, so a recovered Vault is noticed within a minute.
pub const DEFAULT_MAX_RETRY: Duration = Duration::from_secs(60);
/// A certificate is withdrawn this long before its notAfter, because peers whose clocks run
/// ahead reject it already. It is capped at a tenth of the lifetime for short-lived
/// certificates.
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// The rotation schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationSettings {
    /// Fraction of the lifetime after which the certificate is renewed, in (0, 1).
    pub renew_fraction: f64,
    /// Fraction of the lifetime by which renewal may happen earlier, at random, in [0, 1).
    pub jitter_fraction: f64,
    pub min_retry: Duration,
    pub max_retry: Duration,
    pub expiry_margin: Duration,
}

impl Default for RotationSettings {
    fn default() -> Self {
        RotationSettings {
            renew_fraction: DEFAULT_RENEW_FRACTION,
            jitter_fraction: DEFAULT_JITTER_FRACTION,
            min_retry: DEFAULT_MIN_RETRY,
            max_retry: DEFAULT_MAX_RETRY,
            expiry_margin: DEFAULT_EXPIRY_MARGIN,
        }
    }
}

impl RotationSettings {
    /// Returns the moment a certificate valid from `not_before` to `not_after` stops being
    /// served: `expiry_margin` before notAfter, with the margin capped at a tenth of the lifetime.
    pub fn withdraw_at(&self, not_before: SystemTime, not_after: SystemTime) -> SystemTime {
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        not_after - self.expiry_margin.min(lifetime / 10)
    }
}

/// Returns how long after `now` (the moment the certificate was installed) a certificate valid
/// until `not_after` should be renewed. `random` is a number in [0, 1) that picks the jitter;
/// renewal happens between `(renew_fraction - jitter_fraction)` and `renew_fraction` of the
/// lifetime, never later.
///
/// The lifetime counts from the later of notBefore and `now`, because Vault backdates
/// notBefore (by 30 s unless the role sets another value), which for short TTLs would otherwise
/// put the renewal before issuance.
pub fn renewal_delay(settings: &RotationSettings, not_before: SystemTime, not_after: SystemTime, now: SystemTime, random: f64) -> Duration {
    let start = not_before.max(now);
    let lifetime = not_after.duration_since(start).unwrap_or_default();
    let fraction = (settings.renew_fraction - settings.jitter_fraction * random.clamp(0.0, 1.0)).max(0.0);
    let renew_at = start + lifetime.mul_f64(fraction);
    renew_at.duration_since(now).unwrap_or_default()
}

/// Exponential backoff with jitter: the n-th consecutive failure waits a random time between
/// half and all of `min_retry * 2^(n-1)`, capped at `max_retry`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), failures: 0 }
    }

    /// Records a failure and returns the wait before the next attempt; `random` is in [0, 1).
    pub fn next_delay(&mut self, random: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exponent = (self.failures - 1).min(30);
        let ceiling = self.min.saturating_mul(1u32 << exponent).min(self.max);
        ceiling.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn at(seconds: u64) -> SystemTime {
        T0 + Duration::from_secs(seconds)
    }

    #[test]
    fn renewal_without_jitter_is_at_two_thirds() {
        let settings = RotationSettings::default();

        let delay = renewal_delay(&settings, at(1000), at(1900), at(1000), 0.0);

        assert_eq!(delay, Duration::from_secs(600));
    }

    #[test]
    fn full_jitter_moves_renewal_a_tenth_earlier() {
        let settings = RotationSettings::default();

        let delay = renewal_delay(&settings, at(1000), at(1900), at(1000), 1.0);

        assert_eq!(delay.as_millis(), 510_000);
    }

    #[test]
    fn backdated_not_before_counts_from_installation() {
        let settings = RotationSettings { jitter_fraction: 0.0, ..RotationSettings::default() };

        assert_eq!(renewal_delay(&settings, at(970), at(1006), at(1000), 0.5), Duration::from_secs(4));
        assert_eq!(renewal_delay(&settings, at(1000), at(1900), at(1300), 0.5), Duration::from_secs(400));
        assert_eq!(renewal_delay(&settings, at(1000), at(1900), at(1900), 0.5), Duration::ZERO);
    }

    #[test]
    fn withdrawal_margin_is_capped_at_a_tenth_of_the_lifetime() {
        let settings = RotationSettings::default();

        assert_eq!(settings.withdraw_at(at(0), at(24 * 3600)), at(24 * 3600 - 30));
        assert_eq!(settings.withdraw_at(at(0), at(10)), at(9));
    }

    #[test]
    fn backoff_doubles_within_its_bounds() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

        let upper: Vec<Duration> = (0..8).map(|_| backoff.next_delay(1.0)).collect();

        let seconds: Vec<u64> = upper.iter().map(Duration::as_secs).collect();
        assert_eq!(seconds, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff.failures(), 8);
    }

    #[test]
    fn backoff_jitter_stays_above_half_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(60));

        assert_eq!(backoff.next_delay(0.0), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(0.0), Duration::from_secs(2));
        backoff.reset();
        assert_eq!(backoff.next_delay(0.5), Duration::from_millis(1500));
    }

    #[test]
    fn backoff_survives_many_failures() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

        for _ in 0..1000 {
            assert!(backoff.next_delay(1.0) <= Duration::from_secs(60));
        }
        assert_eq!(backoff.failures(), 1000);
    }
}
