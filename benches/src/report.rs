//! The comparison table and the targets.

use std::fmt::Write as _;
use std::time::Duration;

use crate::load::Measurement;
use crate::metrics::Buckets;

/// Figures measured for one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub max_throughput: Measurement,
    /// Open-loop run at half of `max_throughput`.
    pub half_load: Measurement,
    pub ready_after: Duration,
    pub rss_idle_bytes: Option<u64>,
    pub rss_load_bytes: Option<u64>,
}

impl ScenarioResult {
    fn latency(&self, quantile: f64) -> f64 {
        self.half_load.latency_at(quantile) as f64
    }

    /// Returns whether the open loop at half load had a higher median latency than the closed loop
    /// at full load. A server that keeps up with half its maximum rate responds faster than
    /// one with every worker waiting, so this means the server or the load generator fell
    /// behind the schedule, and the latency figures are not comparable.
    pub fn saturated(&self) -> bool {
        self.half_load.latency_at(0.5) > self.max_throughput.latency_at(0.5)
    }
}

/// The floor and peer scenarios that the ratios are taken against.
pub struct Baselines<'a> {
    pub floor: Option<&'a ScenarioResult>,
    pub peer: Option<&'a ScenarioResult>,
}

/// The targets from benches/README.md, checked for one scenario.
pub const TARGET_PEER_THROUGHPUT_RATIO: f64 = 3.0;
pub const TARGET_FLOOR_THROUGHPUT_RATIO: f64 = 0.5;
pub const TARGET_FLOOR_P99_RATIO: f64 = 2.0;
pub const TARGET_RSS_BYTES: u64 = 50 * 1024 * 1024;
/// Delivery lag p99 on a local broker, from recording a decision to Kafka's acknowledgement.
pub const TARGET_DELIVERY_LAG_P99_SECONDS: f64 = 0.050;

/// Whether a row is judged by a throughput target, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    Yes,
    /// The row does work that the target's baseline does not, such as writing audit records.
    No(&'static str),
}

/// The throughput targets that apply to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThroughputTargets {
    pub peer: Judged,
    pub floor: Judged,
}

/// Audit figures of one scenario from portcullis's `/metrics`, each taken over one loop.
#[derive(Debug, Clone)]
pub struct AuditFigures {
    pub name: String,
    /// Delivery lag during the closed loop at maximum throughput.
    pub lag_full: Buckets,
    /// Delivery lag during the open loop at half load.
    pub lag_half: Buckets,
    /// `portcullis_audit_failures_total` growth by kind during each loop.
    pub failures_full: Vec<(String, u64)>,
    pub failures_half: Vec<(String, u64)>,
}

/// Formats `value / base` as `1.23x`, or `-` when there is no base.
pub fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(base) if base > 0.0 => format!("{:.2}x", value / base),
        _ => "-".to_string(),
    }
}

fn megabytes(bytes: Option<u64>) -> String {
    bytes
        .map(|bytes| format!("{:.1}", bytes as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "-".to_string())
}

fn name_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(str::len).max().unwrap_or(8).max(8)
}

/// Renders the absolute figures and the ratios.
pub fn render(results: &[ScenarioResult], baselines: &Baselines<'_>) -> String {
    let mut out = String::new();
    let width = name_width(results.iter().map(|result| result.name.as_str()));

    let _ = writeln!(
        out,
        "Figures (latency in microseconds at 50% of the scenario's maximum throughput, open loop):"
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:>10}  {:>7}  {:>7}  {:>7}  {:>7}  {:>6}  {:>8}  {:>8}  {:>8}",
        "scenario",
        "max chk/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "ready",
        "RSS idle",
        "RSS load",
        "rate"
    );
    let mut any_saturated = false;
    for result in results {
        let errors = result.max_throughput.failed + result.half_load.failed;
        let _ = writeln!(
            out,
            "{:<width$}  {:>10.0}  {:>7}  {:>7}  {:>7}  {:>7}  {:>4}ms  {:>5} MB  {:>5} MB  {:>8.0}{}",
            result.name,
            result.max_throughput.throughput(),
            result.half_load.latency_at(0.5),
            result.half_load.latency_at(0.99),
            result.half_load.latency_at(0.999),
            errors,
            result.ready_after.as_millis(),
            megabytes(result.rss_idle_bytes),
            megabytes(result.rss_load_bytes),
            result.half_load.throughput(),
            if result.saturated() {
                "  SATURATED"
            } else {
                ""
            },
        );
        any_saturated |= result.saturated();
    }
    if any_saturated {
        let _ = writeln!(
            out,
            "SATURATED: the median latency at half load exceeded the closed loop's at full load. The server or the load \
             generator fell behind the schedule (other work on the CPUs, or the generator needing more CPU than the server), \
             so its latency figures are not comparable."
        );
    }

    let _ = writeln!(
        out,
        "\nRatios (throughput: higher is better; latency: lower is better):"
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}",
        "scenario",
        "thr/floor",
        "thr/peer",
        "p50/floor",
        "p50/peer",
        "p99/floor",
        "p99/peer",
        "p999/flr",
        "p999/peer"
    );
    let floor_throughput = baselines
        .floor
        .map(|floor| floor.max_throughput.throughput());
    let peer_throughput = baselines.peer.map(|peer| peer.max_throughput.throughput());
    for result in results {
        let throughput = result.max_throughput.throughput();
        let mut row = format!(
            "{:<width$}  {:>9}  {:>9}",
            result.name,
            ratio(throughput, floor_throughput),
            ratio(throughput, peer_throughput)
        );
        for quantile in [0.5, 0.99, 0.999] {
            let floor = baselines.floor.map(|floor| floor.latency(quantile));
            let peer = baselines.peer.map(|peer| peer.latency(quantile));
            let _ = write!(
                row,
                "  {:>9}  {:>9}",
                ratio(result.latency(quantile), floor),
                ratio(result.latency(quantile), peer)
            );
        }
        let _ = writeln!(out, "{row}");
    }
    out
}

/// Renders what each scenario adds per check to `none` (portcullis with `audit.mode: none`),
/// from figures of the same run: the machine time per check at maximum throughput
/// (`1/throughput`, which on a machine with several CPUs is not the CPU time of one check) and
/// the latency at half load. The half-load rates differ between scenarios, so the latency
/// differences compare each at half of its own maximum.
pub fn render_added_cost(none: &ScenarioResult, others: &[&ScenarioResult]) -> String {
    let heading = format!(
        "Added cost per check against `{}` (same run; microseconds, negative = less):",
        none.name
    );
    render_differences(&heading, none, others)
}

/// Renders the differences of each of `others` to `base`: `1/throughput` at maximum
/// throughput and the latencies at half load, under `heading`.
fn render_differences(heading: &str, base: &ScenarioResult, others: &[&ScenarioResult]) -> String {
    let mut out = String::new();
    let width = name_width(
        others
            .iter()
            .map(|result| result.name.as_str())
            .chain([base.name.as_str()]),
    );
    let _ = writeln!(out, "{heading}");
    let _ = writeln!(
        out,
        "{:<width$}  {:>12}  {:>9}  {:>9}  {:>9}",
        "scenario", "1/thr (µs)", "+1/thr", "+p50", "+p99"
    );
    let per_check = |result: &ScenarioResult| {
        let throughput = result.max_throughput.throughput();
        if throughput > 0.0 {
            1e6 / throughput
        } else {
            f64::NAN
        }
    };
    let base_per_check = per_check(base);
    let _ = writeln!(
        out,
        "{:<width$}  {:>12.1}  {:>9}  {:>9}  {:>9}",
        base.name, base_per_check, "-", "-", "-"
    );
    for result in others {
        let own = per_check(result);
        let _ = writeln!(
            out,
            "{:<width$}  {:>12.1}  {:>+9.1}  {:>+9}  {:>+9}{}",
            result.name,
            own,
            own - base_per_check,
            result.latency(0.5) as i64 - base.latency(0.5) as i64,
            result.latency(0.99) as i64 - base.latency(0.99) as i64,
            if result.saturated() || base.saturated() {
                "  (latency not comparable: SATURATED)"
            } else {
                ""
            },
        );
    }
    out
}

/// Figures of one through-Envoy scenario.
#[derive(Debug, Clone)]
pub struct ThroughEnvoy {
    pub result: ScenarioResult,
    /// Growth of Envoy's ext_authz failure counters over the warm-up and both loops, by kind;
    /// `None` without the ext_authz filter. Envoy denies the request of such a check with 403 itself.
    pub authz_failures: Option<Vec<(String, u64)>>,
}

/// Renders the through-Envoy figures: requests per second at maximum throughput and the
/// latencies at half of it, for each row.
pub fn render_through_envoy(rows: &[ThroughEnvoy]) -> String {
    let mut out = String::new();
    let width = name_width(rows.iter().map(|row| row.result.name.as_str()));
    let _ = writeln!(
        out,
        "Through Envoy (HTTP/1.1 requests to Envoy, routed to a local upstream; latency in microseconds at 50% of the row's maximum throughput, open loop):"
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:>10}  {:>7}  {:>7}  {:>7}  {:>7}  {:>8}  ext_authz failures (Envoy's own 403)",
        "scenario", "max req/s", "p50", "p99", "p99.9", "errors", "rate"
    );
    for row in rows {
        let result = &row.result;
        let failures = match &row.authz_failures {
            None => "- (no ext_authz)".to_string(),
            Some(counts) => failures(
                &counts
                    .iter()
                    .filter(|(_, count)| *count > 0)
                    .cloned()
                    .collect::<Vec<_>>(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>10.0}  {:>7}  {:>7}  {:>7}  {:>7}  {:>8.0}  {}{}",
            result.name,
            result.max_throughput.throughput(),
            result.half_load.latency_at(0.5),
            result.half_load.latency_at(0.99),
            result.half_load.latency_at(0.999),
            result.max_throughput.failed + result.half_load.failed,
            result.half_load.throughput(),
            failures,
            if result.saturated() {
                "  SATURATED"
            } else {
                ""
            },
        );
    }
    out
}

/// Renders what the ext_authz filter adds to a request through Envoy, each row against
/// `proxy_only` (Envoy without the filter) from the same run.
pub fn render_added_by_ext_authz(
    proxy_only: &ScenarioResult,
    others: &[&ScenarioResult],
) -> String {
    let heading = format!(
        "Added by ext_authz per request against `{}` (same run; microseconds, negative = less):",
        proxy_only.name
    );
    render_differences(&heading, proxy_only, others)
}

fn milliseconds(seconds: Option<f64>) -> String {
    seconds
        .map(|seconds| format!("{:.1}", seconds * 1e3))
        .unwrap_or_else(|| "-".to_string())
}

fn failures(counts: &[(String, u64)]) -> String {
    if counts.is_empty() {
        return "none".to_string();
    }
    counts
        .iter()
        .map(|(kind, count)| format!("{kind}={count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Returns the verdict on the delivery-lag target, or `None` without delivered records.
pub fn delivery_lag_verdict(lag: &Buckets) -> Option<String> {
    let p99 = lag.quantile(0.99)?;
    let limit = TARGET_DELIVERY_LAG_P99_SECONDS;
    Some(if p99 < limit {
        format!(
            "met (p99 {} ms < {} ms)",
            milliseconds(Some(p99)),
            limit * 1e3
        )
    } else {
        format!(
            "MISSED (p99 {} ms >= {} ms)",
            milliseconds(Some(p99)),
            limit * 1e3
        )
    })
}

/// Renders the delivery lag and the audit failures of each audit scenario, per loop.
pub fn render_audit_figures(figures: &[AuditFigures]) -> String {
    let mut out = String::new();
    let width = name_width(figures.iter().map(|figure| figure.name.as_str()));
    let _ = writeln!(
        out,
        "Audit delivery lag (recorded to acknowledged by Kafka, from portcullis_audit_delivery_lag_seconds; quantiles \
         estimated by linear interpolation inside its buckets of 1, 2, 4, 8, 16, 32, 64 ms…) and audit failures:"
    );
    let _ = writeln!(
        out,
        "{:<width$}  {:<12}  {:>9}  {:>8}  {:>8}  {:<28}  audit failures",
        "scenario", "loop", "delivered", "p50 ms", "p99 ms", "target p99 < 50 ms"
    );
    for figure in figures {
        for (label, lag, failed) in [
            ("max (closed)", &figure.lag_full, &figure.failures_full),
            ("half (open)", &figure.lag_half, &figure.failures_half),
        ] {
            let _ = writeln!(
                out,
                "{:<width$}  {:<12}  {:>9}  {:>8}  {:>8}  {:<28}  {}",
                figure.name,
                label,
                lag.total(),
                milliseconds(lag.quantile(0.5)),
                milliseconds(lag.quantile(0.99)),
                delivery_lag_verdict(lag).unwrap_or_else(|| "- (nothing shipped)".to_string()),
                failures(failed),
            );
        }
    }
    out
}

/// Checks one scenario against the targets. Each line states `met` or `MISSED` with the
/// figure, or `not judged` with the reason and the figure.
pub fn check_targets(
    result: &ScenarioResult,
    baselines: &Baselines<'_>,
    throughput_targets: ThroughputTargets,
) -> Vec<String> {
    let mut lines = Vec::new();
    let throughput = result.max_throughput.throughput();
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let judge = |judged: Judged, met: bool| match judged {
        Judged::Yes => verdict(met).to_string(),
        Judged::No(reason) => format!("not judged, {reason}"),
    };

    if let Some(peer) = baselines.peer {
        let ratio = throughput / peer.max_throughput.throughput().max(f64::MIN_POSITIVE);
        lines.push(format!(
            "{}: throughput >= {TARGET_PEER_THROUGHPUT_RATIO}x the peer: {} ({ratio:.2}x)",
            result.name,
            judge(
                throughput_targets.peer,
                ratio >= TARGET_PEER_THROUGHPUT_RATIO
            )
        ));
    }
    if let Some(floor) = baselines.floor {
        let ratio = throughput / floor.max_throughput.throughput().max(f64::MIN_POSITIVE);
        lines.push(format!(
            "{}: throughput >= {TARGET_FLOOR_THROUGHPUT_RATIO}x the floor: {} ({ratio:.2}x)",
            result.name,
            judge(
                throughput_targets.floor,
                ratio >= TARGET_FLOOR_THROUGHPUT_RATIO
            )
        ));

        let p99_ratio = result.latency(0.99) / floor.latency(0.99).max(1.0);
        if result.saturated() || floor.saturated() {
            lines.push(format!(
                "{}: p99 at half load <= {TARGET_FLOOR_P99_RATIO}x the floor's: not judged, an open loop was saturated ({p99_ratio:.2}x)",
                result.name
            ));
        } else {
            lines.push(format!(
                "{}: p99 at half load <= {TARGET_FLOOR_P99_RATIO}x the floor's: {} ({p99_ratio:.2}x)",
                result.name,
                verdict(p99_ratio <= TARGET_FLOOR_P99_RATIO)
            ));
        }
    }
    match result.rss_load_bytes {
        Some(bytes) => lines.push(format!(
            "{}: peak RSS under load < {} MB: {} ({} MB)",
            result.name,
            TARGET_RSS_BYTES / (1024 * 1024),
            verdict(bytes < TARGET_RSS_BYTES),
            megabytes(Some(bytes))
        )),
        None => lines.push(format!(
            "{}: peak RSS under load: not measured (no /proc/PID/status)",
            result.name
        )),
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(latencies_micros: &[u64], elapsed: Duration) -> Measurement {
        let mut measurement = Measurement::empty();
        for &micros in latencies_micros {
            measurement.record(Ok(true), Duration::from_micros(micros));
        }
        measurement.elapsed = elapsed;
        measurement
    }

    fn scenario(name: &str, closed_micros: &[u64], open_micros: &[u64]) -> ScenarioResult {
        ScenarioResult {
            name: name.to_string(),
            max_throughput: measurement(closed_micros, Duration::from_secs(1)),
            half_load: measurement(open_micros, Duration::from_secs(1)),
            ready_after: Duration::from_millis(10),
            rss_idle_bytes: Some(10 * 1024 * 1024),
            rss_load_bytes: Some(60 * 1024 * 1024),
        }
    }

    #[test]
    fn half_load_slower_than_full_is_saturated() {
        assert!(scenario("behind", &[500, 500, 500], &[900, 900, 900]).saturated());
        assert!(!scenario("keeping up", &[500, 500, 500], &[100, 100, 100]).saturated());
    }

    #[test]
    fn targets_compare_with_floor_and_peer() {
        let floor = scenario("floor", &[400; 8], &[100, 100]);
        let peer = scenario("peer", &[2000; 2], &[300, 300]);
        let subject = scenario("portcullis", &[500; 6], &[150, 150]);
        let baselines = Baselines {
            floor: Some(&floor),
            peer: Some(&peer),
        };

        let lines = check_targets(&subject, &baselines, ALL_JUDGED);

        assert_eq!(
            lines,
            [
                "portcullis: throughput >= 3x the peer: met (3.00x)",
                "portcullis: throughput >= 0.5x the floor: met (0.75x)",
                "portcullis: p99 at half load <= 2x the floor's: met (1.50x)",
                "portcullis: peak RSS under load < 50 MB: MISSED (60.0 MB)",
            ]
        );
    }

    const ALL_JUDGED: ThroughputTargets = ThroughputTargets {
        peer: Judged::Yes,
        floor: Judged::Yes,
    };

    #[test]
    fn unjudged_throughput_targets_give_reason() {
        let floor = scenario("floor", &[400; 8], &[100, 100]);
        let peer = scenario("peer", &[2000; 2], &[300, 300]);
        let subject = scenario("portcullis", &[500; 2], &[150, 150]);
        let baselines = Baselines {
            floor: Some(&floor),
            peer: Some(&peer),
        };
        let targets = ThroughputTargets {
            peer: Judged::No("the peer verifies no token"),
            floor: Judged::Yes,
        };

        let lines = check_targets(&subject, &baselines, targets);

        assert_eq!(
            lines[0],
            "portcullis: throughput >= 3x the peer: not judged, the peer verifies no token (1.00x)"
        );
        assert_eq!(
            lines[1],
            "portcullis: throughput >= 0.5x the floor: MISSED (0.25x)"
        );
    }

    #[test]
    fn saturated_floor_leaves_p99_unjudged() {
        let floor = scenario("floor", &[400; 8], &[900, 900]);
        let subject = scenario("portcullis", &[500; 6], &[150, 150]);
        let baselines = Baselines {
            floor: Some(&floor),
            peer: None,
        };

        let lines = check_targets(&subject, &baselines, ALL_JUDGED);

        assert_eq!(
            lines[1],
            "portcullis: p99 at half load <= 2x the floor's: not judged, an open loop was saturated (0.17x)"
        );
    }

    #[test]
    fn added_cost_is_the_difference_to_audit_none() {
        // 6 calls in 1 s: 166666.7 µs per check; 3 calls: 333333.3 µs.
        let none = scenario("portcullis, audit none", &[500; 6], &[150, 150]);
        let spool = scenario("portcullis, audit spool", &[600; 3], &[400, 400]);

        let table = render_added_cost(&none, &[&spool]);
        let lines: Vec<&str> = table.lines().collect();

        assert_eq!(
            lines[2],
            "portcullis, audit none       166666.7          -          -          -"
        );
        assert_eq!(
            lines[3],
            "portcullis, audit spool      333333.3  +166666.7       +250       +250"
        );
    }

    #[test]
    fn added_by_ext_authz_subtracts_envoy_only() {
        // 4 requests in 1 s: 250000 µs per request; 2 requests: 500000 µs.
        let proxy_only = scenario("envoy only (no ext_authz)", &[500; 4], &[300, 300]);
        let floor = scenario("envoy + floor", &[600; 2], &[500, 500]);

        let table = render_added_by_ext_authz(&proxy_only, &[&floor]);
        let lines: Vec<&str> = table.lines().collect();

        assert_eq!(
            lines[0],
            "Added by ext_authz per request against `envoy only (no ext_authz)` (same run; microseconds, negative = less):"
        );
        assert_eq!(
            lines[3],
            "envoy + floor                  500000.0  +250000.0       +200       +200"
        );
    }

    #[test]
    fn through_envoy_row_shows_envoy_failures() {
        let rows = [
            ThroughEnvoy {
                result: scenario("envoy only (no ext_authz)", &[500; 4], &[300, 300]),
                authz_failures: None,
            },
            ThroughEnvoy {
                result: scenario("envoy + floor", &[600; 2], &[700, 700]),
                authz_failures: Some(vec![("error".to_string(), 0), ("invalid".to_string(), 3)]),
            },
            ThroughEnvoy {
                result: scenario("envoy + portcullis", &[600; 2], &[400, 400]),
                authz_failures: Some(vec![("error".to_string(), 0)]),
            },
        ];

        let table = render_through_envoy(&rows);
        let lines: Vec<&str> = table.lines().collect();

        assert!(lines[2].ends_with("- (no ext_authz)"), "{}", lines[2]);
        assert!(lines[3].ends_with("invalid=3  SATURATED"), "{}", lines[3]);
        assert!(lines[4].ends_with("  none"), "{}", lines[4]);
    }

    #[test]
    fn delivery_lag_target_is_judged_on_p99() {
        let fast = Buckets {
            bounds: vec![0.001, 0.002, 0.004, f64::INFINITY],
            counts: vec![10, 90, 100, 100],
        };
        let slow = Buckets {
            bounds: vec![0.032, 0.064, f64::INFINITY],
            counts: vec![50, 100, 100],
        };

        assert_eq!(
            delivery_lag_verdict(&fast).as_deref(),
            Some("met (p99 3.8 ms < 50 ms)")
        );
        assert_eq!(
            delivery_lag_verdict(&slow).as_deref(),
            Some("MISSED (p99 63.4 ms >= 50 ms)")
        );
        assert_eq!(delivery_lag_verdict(&Buckets::default()), None);
    }

    #[test]
    fn ratio_divides_by_base() {
        assert_eq!(ratio(300.0, Some(100.0)), "3.00x");
        assert_eq!(ratio(50.0, Some(200.0)), "0.25x");
    }

    #[test]
    fn ratio_without_base_is_dash() {
        assert_eq!(ratio(300.0, None), "-");
        assert_eq!(ratio(300.0, Some(0.0)), "-");
    }

    #[test]
    fn megabytes_have_one_decimal() {
        assert_eq!(megabytes(Some(15 * 1024 * 1024 + 512 * 1024)), "15.5");
        assert_eq!(megabytes(None), "-");
    }
}
