//! Reading portcullis's `/metrics` text: the audit delivery-lag histogram and the audit
//! failure counters, taken before and after a measurement so that only its records count.

/// Name of the histogram of the time from recording an audit record to the transport's
/// acknowledgement, in seconds.
pub const DELIVERY_LAG: &str = "portcullis_audit_delivery_lag_seconds";

/// Name of the counter of audit failures, labelled by `kind`.
pub const AUDIT_FAILURES: &str = "portcullis_audit_failures_total";

/// Cumulative bucket counts of one histogram, by upper bound in seconds; the last bound is
/// infinite.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Buckets {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Buckets {
    /// Reads the `NAME_bucket{le="…"} COUNT` lines of `name` from a Prometheus text page.
    pub fn parse(text: &str, name: &str) -> Buckets {
        let prefix = format!("{name}_bucket{{");
        let mut pairs: Vec<(f64, u64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(&prefix)?;
                let (labels, value) = rest.split_once("} ")?;
                let bound = labels
                    .split(',')
                    .find_map(|label| label.strip_prefix("le=\""))?
                    .trim_end_matches('"');
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                let count = value.trim().parse::<f64>().ok()? as u64;
                Some((bound, count))
            })
            .collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        Buckets {
            bounds: pairs.iter().map(|pair| pair.0).collect(),
            counts: pairs.iter().map(|pair| pair.1).collect(),
        }
    }

    /// Returns the counts of `self` minus those of `earlier`, bucket by bucket; an empty
    /// `earlier` (no records yet) counts as zero.
    pub fn since(&self, earlier: &Buckets) -> Buckets {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .map(|(index, count)| {
                let before = if earlier.bounds.get(index) == self.bounds.get(index) {
                    earlier.counts.get(index).copied().unwrap_or(0)
                } else {
                    0
                };
                count.saturating_sub(before)
            })
            .collect();
        Buckets {
            bounds: self.bounds.clone(),
            counts,
        }
    }

    /// Number of observations.
    pub fn total(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    /// Estimates the value at `quantile` in seconds as Prometheus's `histogram_quantile` does:
    /// linear interpolation inside the bucket that holds it, from 0 for the first bucket. A
    /// quantile in the infinite bucket returns the largest finite bound. `None` without
    /// observations.
    pub fn quantile(&self, quantile: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = quantile * total as f64;
        let mut lower_bound = 0.0;
        let mut lower_count = 0u64;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if *count as f64 >= rank && *count > lower_count {
                if bound.is_infinite() {
                    return Some(lower_bound);
                }
                let share = (rank - lower_count as f64) / (*count - lower_count) as f64;
                return Some(lower_bound + (bound - lower_bound) * share);
            }
            lower_bound = *bound;
            lower_count = *count;
        }
        Some(lower_bound)
    }
}

/// Sums every series of the counter `name` by its `kind` label, sorted by kind.
pub fn counters_by_kind(text: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}{{");
    let mut sums: Vec<(String, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(kind) = labels
            .split(',')
            .find_map(|label| label.strip_prefix("kind=\""))
            .map(|kind| kind.trim_end_matches('"').to_string())
        else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        match sums.iter_mut().find(|(known, _)| *known == kind) {
            Some((_, sum)) => *sum += value as u64,
            None => sums.push((kind, value as u64)),
        }
    }
    sums.sort();
    sums
}

/// Returns the counters of `after` minus those of `before`, leaving out those that did not grow.
pub fn counters_since(after: &[(String, u64)], before: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .filter_map(|(kind, count)| {
            let earlier = before
                .iter()
                .find(|(known, _)| known == kind)
                .map_or(0, |(_, count)| *count);
            let grown = count.saturating_sub(earlier);
            (grown > 0).then(|| (kind.clone(), grown))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP portcullis_audit_delivery_lag_seconds time from recording an audit record to its acknowledgement by the transport.
# TYPE portcullis_audit_delivery_lag_seconds histogram
portcullis_audit_delivery_lag_seconds_sum 0.9
portcullis_audit_delivery_lag_seconds_count 100
portcullis_audit_delivery_lag_seconds_bucket{le=\"0.001\"} 0
portcullis_audit_delivery_lag_seconds_bucket{le=\"0.002\"} 40
portcullis_audit_delivery_lag_seconds_bucket{le=\"0.004\"} 90
portcullis_audit_delivery_lag_seconds_bucket{le=\"0.008\"} 99
portcullis_audit_delivery_lag_seconds_bucket{le=\"+Inf\"} 100
portcullis_audit_failures_total{kind=\"delivery_fallback\"} 3
portcullis_audit_failures_total{kind=\"full\"} 0
";

    #[test]
    fn buckets_are_read_in_order_of_bound() {
        let buckets = Buckets::parse(PAGE, DELIVERY_LAG);

        assert_eq!(buckets.bounds, [0.001, 0.002, 0.004, 0.008, f64::INFINITY]);
        assert_eq!(buckets.counts, [0, 40, 90, 99, 100]);
        assert_eq!(buckets.total(), 100);
    }

    #[test]
    fn quantile_interpolates_inside_its_bucket() {
        let buckets = Buckets::parse(PAGE, DELIVERY_LAG);

        // The 50th of 100 observations is the 10th of the 50 in (2 ms, 4 ms].
        let median = buckets.quantile(0.5).expect("observations");
        assert!((median - 0.0024).abs() < 1e-12, "{median}");
        // The 99th is the last of the 9 in (4 ms, 8 ms].
        let p99 = buckets.quantile(0.99).expect("observations");
        assert!((p99 - 0.008).abs() < 1e-12, "{p99}");
    }

    #[test]
    fn quantile_in_the_infinite_bucket_is_the_largest_bound() {
        let buckets = Buckets::parse(PAGE, DELIVERY_LAG);

        assert_eq!(buckets.quantile(0.999), Some(0.008));
    }

    #[test]
    fn quantile_without_observations_is_none() {
        assert_eq!(Buckets::parse("", DELIVERY_LAG).quantile(0.5), None);
    }

    #[test]
    fn difference_counts_only_new_observations() {
        let after = Buckets::parse(PAGE, DELIVERY_LAG);
        let before = Buckets {
            bounds: after.bounds.clone(),
            counts: vec![0, 40, 40, 40, 40],
        };

        let window = after.since(&before);

        assert_eq!(window.counts, [0, 0, 50, 59, 60]);
        assert_eq!(after.since(&Buckets::default()).counts, after.counts);
    }

    #[test]
    fn failure_counters_grow_by_kind() {
        let after = counters_by_kind(PAGE, AUDIT_FAILURES);
        let before = vec![("delivery_fallback".to_string(), 1)];

        assert_eq!(
            after,
            [
                ("delivery_fallback".to_string(), 3),
                ("full".to_string(), 0)
            ]
        );
        assert_eq!(
            counters_since(&after, &before),
            [("delivery_fallback".to_string(), 2)]
        );
    }
}
