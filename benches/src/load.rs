//! Closed-loop and open-loop load, with latencies in HDR histograms (microseconds).
//!
//! The closed loop keeps a fixed number of calls in flight and measures the maximum
//! throughput. The open loop sends at a fixed rate from a pacing thread. It measures each
//! latency from the time the call was due, not from when it was sent, so a stalled server
//! is charged for the calls it delayed (no coordinated omission).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::target::Target;

/// Largest latency the histograms track; longer ones are recorded as this value.
const MAX_LATENCY_MICROS: u64 = 60_000_000;

/// Call counts and latencies of one run, with the first error message for the report.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub latency_micros: Histogram<u64>,
    pub succeeded: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Measurement {
    /// Creates a measurement with no calls yet.
    pub fn empty() -> Measurement {
        Measurement {
            latency_micros: new_histogram(),
            succeeded: 0,
            failed: 0,
            first_error: None,
            elapsed: Duration::ZERO,
        }
    }

    /// Counts one call; the latency of a successful one goes into the histogram.
    pub fn record(&mut self, result: Result<bool, crate::target::CallError>, latency: Duration) {
        match result {
            Ok(_) => {
                self.succeeded += 1;
                let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_MICROS);
                self.latency_micros
                    .saturating_record(micros.clamp(1, MAX_LATENCY_MICROS));
            }
            Err(error) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }

    fn merge(&mut self, other: Measurement) {
        self.latency_micros
            .add(&other.latency_micros)
            .expect("histograms with the same bounds merge");
        self.succeeded += other.succeeded;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Successful calls per second over the run.
    pub fn throughput(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.succeeded as f64 / seconds
        } else {
            0.0
        }
    }

    /// Latency at `quantile` (0.5 for the median) in microseconds.
    pub fn latency_at(&self, quantile: f64) -> u64 {
        self.latency_micros.value_at_quantile(quantile)
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3)
        .expect("constant histogram bounds are valid")
}

/// Runs `concurrency` workers for `duration`, each sending its next call as soon as the
/// previous one returns.
pub async fn closed_loop(
    target: Arc<Target>,
    concurrency: usize,
    duration: Duration,
) -> Measurement {
    let start = Instant::now();
    let deadline = start + duration;
    let sequence = Arc::new(AtomicUsize::new(0));

    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..concurrency.max(1) {
        let target = Arc::clone(&target);
        let sequence = Arc::clone(&sequence);
        workers.spawn(async move {
            let mut measurement = Measurement::empty();
            while Instant::now() < deadline {
                let number = sequence.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                let result = target.call(worker, number).await;
                measurement.record(result, sent.elapsed());
            }
            measurement
        });
    }

    let mut total = Measurement::empty();
    while let Some(joined) = workers.join_next().await {
        total.merge(joined.expect("a load worker does not panic"));
    }
    total.elapsed = start.elapsed();
    total
}

/// Sends `rate` calls per second for `duration`, each in its own task, spread over
/// `connections` connections.
///
/// A dedicated thread paces the sends with `std::thread::sleep`, because tokio's timer has
/// millisecond resolution and would send calls in bursts of a millisecond's worth. Calls that
/// fall due while the thread sleeps or waits for a CPU are sent together when it wakes, and
/// their latency still counts from the time they were due.
///
/// NOTE: how late `std::thread::sleep` wakes on a busy machine was not measured. That
/// lateness is part of every open-loop latency, for the floor and the peer alike.
pub async fn open_loop(
    target: Arc<Target>,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> Measurement {
    let totals = Arc::new(Mutex::new(Measurement::empty()));
    let runtime = tokio::runtime::Handle::current();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let connections = connections.max(1);

    let pacer_totals = Arc::clone(&totals);
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut tasks = Vec::new();
        let mut number = 0usize;
        loop {
            let due = start + interval.mul_f64(number as f64);
            if due >= start + duration {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }

            let target = Arc::clone(&target);
            let totals = Arc::clone(&pacer_totals);
            tasks.push(runtime.spawn(async move {
                let result = target.call(number % connections, number).await;
                let latency = due.elapsed();
                totals
                    .lock()
                    .expect("no task panics while holding the totals")
                    .record(result, latency);
            }));
            number += 1;
        }
        (start, tasks)
    });

    let (start, tasks) = tokio::task::spawn_blocking(move || {
        pacer.join().expect("the pacing thread does not panic")
    })
    .await
    .expect("the pacing thread is joined");
    for task in tasks {
        task.await.expect("a call task does not panic");
    }

    let mut total = std::mem::replace(
        &mut *totals
            .lock()
            .expect("no task panics while holding the totals"),
        Measurement::empty(),
    );
    total.elapsed = start.elapsed();
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement_with(latencies: &[u64]) -> Measurement {
        let mut measurement = Measurement::empty();
        for &micros in latencies {
            measurement.record(Ok(true), Duration::from_micros(micros));
        }
        measurement
    }

    #[test]
    fn throughput_counts_successes_per_second() {
        let mut measurement = measurement_with(&[100, 200, 300, 400]);
        measurement.record(
            Err(crate::target::CallError::Http("connection reset".into())),
            Duration::from_micros(5),
        );
        measurement.elapsed = Duration::from_secs(2);

        assert_eq!(measurement.throughput(), 2.0);
        assert_eq!(measurement.failed, 1);
        assert_eq!(
            measurement.first_error.as_deref(),
            Some("HTTP request to OPA failed: connection reset")
        );
    }

    #[test]
    fn median_latency_is_middle_value() {
        let measurement = measurement_with(&[100, 200, 300]);

        assert_eq!(measurement.latency_at(0.5), 200);
        assert_eq!(measurement.latency_at(1.0), 300);
    }

    #[test]
    fn latency_above_bound_is_clamped() {
        let measurement = measurement_with(&[MAX_LATENCY_MICROS * 2]);

        assert_eq!(measurement.latency_micros.len(), 1);
        assert!(
            measurement.latency_at(1.0) >= MAX_LATENCY_MICROS,
            "{}",
            measurement.latency_at(1.0)
        );
    }

    #[test]
    fn merge_adds_counts_and_keeps_first_error() {
        let mut first = measurement_with(&[100]);
        first.record(
            Err(crate::target::CallError::Http("first".into())),
            Duration::ZERO,
        );
        let mut second = measurement_with(&[300]);
        second.record(
            Err(crate::target::CallError::Http("second".into())),
            Duration::ZERO,
        );

        first.merge(second);

        assert_eq!(first.succeeded, 2);
        assert_eq!(first.failed, 2);
        assert_eq!(
            first.first_error.as_deref(),
            Some("HTTP request to OPA failed: first")
        );
    }
}
