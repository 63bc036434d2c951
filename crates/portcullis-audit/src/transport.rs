use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

/// One entry of an instance's audit chain (a decision event or a checkpoint), encoded once.
///
/// The bytes are the record's JSON text without a line ending. The chain hashes exactly these
/// bytes, so every copy of a record (spool line, Kafka message) carries them unchanged.
#[derive(Debug, Clone)]
pub struct Record {
    /// The instance whose chain contains this record. It is the Kafka message key, so each
    /// instance's records stay in one partition, in order.
    pub instance_id: Arc<str>,
    /// Position in the instance's chain, starting at 1 and without gaps.
    pub sequence: u64,
    pub bytes: Bytes,
}

/// A remote log that keeps records in the order they are sent (Kafka in production).
///
/// The audit pipeline sends each instance's records in sequence order and resends from the
/// first unacknowledged record after a failure, so an implementation only has to keep the
/// order of the records it is given and report each one's fate.
pub trait Transport: Send + Sync + 'static {
    /// Hands one record to the transport. The record is queued before this returns, so calls
    /// made one after another keep their order; the future resolves when the remote log has
    /// acknowledged the record, or with the reason it did not within the transport's own
    /// delivery deadline.
    fn send(&self, record: &Record) -> BoxFuture<'static, Result<(), TransportError>>;

    /// Waits up to `timeout` for every record sent so far to be acknowledged or failed.
    fn flush(&self, timeout: Duration) -> BoxFuture<'static, Result<(), TransportError>>;

    /// Discards whatever the transport still has queued from earlier sends, so that no earlier copy
    /// of a record can reach the remote log after this resolves. The pipeline calls it after a
    /// failed send, once every send in flight has ended, and before it resends from the first
    /// unacknowledged record; without it a copy queued before the failure could overtake the
    /// resent records. The default does nothing, for transports that hold nothing.
    fn reset(&self) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    /// Short name for logs and metrics, such as `kafka`.
    fn name(&self) -> &'static str;
}

/// Why a transport did not take a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Not acknowledged within the delivery deadline; the record may or may not have reached
    /// the remote log, so it is sent again and readers drop exact duplicates.
    #[error("not acknowledged within {0:?}")]
    TimedOut(Duration),
    /// The remote log refused the record or the connection failed; sending again may succeed.
    #[error("{0}")]
    Retriable(String),
    /// The client cannot go on (for example an idempotent producer fenced by the broker); the
    /// transport must be rebuilt before sending again.
    #[error("{0}")]
    Fatal(String),
}
