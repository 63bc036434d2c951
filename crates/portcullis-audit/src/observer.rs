//! Hooks through which the audit pipeline reports what metrics need.

use std::time::Duration;

/// Receives the audit pipeline's measurements. Every method has an empty default, so an
/// implementation only overrides what it records.
pub trait AuditObserver: Send + Sync {
    /// Records that the transport acknowledged a record; `lag` runs from its recording to the
    /// acknowledgement. Not called for records recovered from an earlier run's spool.
    fn delivered(&self, _lag: Duration) {}

    /// Reports the local log after a change: unshipped records, bytes on disk (spool) or in
    /// memory (queue), and the age of the oldest unshipped record recorded by this process.
    fn backlog(&self, _records: u64, _bytes: u64, _oldest: Option<Duration>) {}

    /// Something went wrong; `kind` is a stable label such as `full`, `write`,
    /// `transport_timeout`, `transport_retriable`, `transport_fatal`, `delivery_timeout` or
    /// `delivery_fallback`.
    fn failure(&self, _kind: &'static str) {}

    /// Counts a written checkpoint record.
    fn checkpoint_written(&self) {}

    /// Reports that a transport replaced its client (for Kafka: a new producer after a fatal
    /// error or a certificate change). Transports call it through the observer they were given.
    fn transport_rebuilt(&self, _transport: &'static str, _reason: &str) {}
}

/// An observer that records nothing.
#[derive(Debug, Default)]
pub struct NoAuditObserver;

impl AuditObserver for NoAuditObserver {}
