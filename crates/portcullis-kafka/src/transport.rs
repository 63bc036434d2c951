//! The audit transport: an idempotent librdkafka producer behind [`portcullis_audit::Transport`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use portcullis_audit::{Record, Transport, TransportError};
use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafka;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::certificate::CertificatePem;
use crate::settings::{KafkaSettings, SetupError};

/// Interval at which records that wait for room in a full local queue, or for a rebuild to
/// finish, retry entering the queue.
const WAITING_RETRY_INTERVAL: Duration = Duration::from_millis(2);

/// Pause between attempts to replace a producer that failed fatally when building the new one
/// fails too (for example while a rotated certificate is still being written).
const FATAL_REBUILD_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Extra time a rebuild waits, beyond the delivery deadline, for the old producer's records.
/// librdkafka scans for timed-out messages about once a second, so a record can be reported
/// up to that long after its deadline.
const REBUILD_FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Receives a notice after each producer rebuild, for logs and metrics.
pub trait RebuildObserver: Send + Sync + 'static {
    fn producer_rebuilt(&self, event: &RebuildEvent);
}

/// One completed producer rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildEvent {
    pub reason: RebuildReason,
    /// Records that the old producer had neither delivered nor failed when its flush bound
    /// ran out; they were failed as retriable when it was dropped.
    pub undelivered: u64,
    /// Rebuilds of this transport so far, this one included.
    pub rebuilds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuildReason {
    /// [`KafkaTransport::rebuild`] was called, for example after a certificate rotation.
    Requested,
    /// librdkafka raised a fatal error, with its reason.
    FatalError(String),
    /// A new client certificate was installed in the [`crate::RotatingClientCertificate`].
    CertificateRotated,
    /// The audit pipeline reset the transport after a failed send, before resending.
    Reset,
}

/// Sends audit records to one Kafka topic with an idempotent producer (`acks=all`), keyed by
/// instance so that each instance's records stay in one partition in order.
///
/// Every send resolves within the delivery deadline. librdkafka's `message.timeout.ms` is set
/// to it, and the transport's own timer enforces it too. A fatal producer error replaces the
/// producer in the background; [`KafkaTransport::rebuild`] does the same on request. While a
/// producer is replaced, new records wait, in order, and enter the new producer only after the
/// old one has delivered or failed everything it held, so records never overtake each other.
/// Dropping the last clone flushes for up to the delivery deadline on the dropping thread;
/// [`Transport::flush`] beforehand avoids that wait.
#[derive(Clone)]
pub struct KafkaTransport {
    shared: Arc<Shared>,
}

type AuditProducer = FutureProducer<ProducerEvents>;

struct Shared {
    settings: KafkaSettings,
    observer: Option<Arc<dyn RebuildObserver>>,
    state: Mutex<State>,
    /// Serializes rebuilds.
    rebuild_lock: tokio::sync::Mutex<()>,
    /// Woken by the producer's error callback on a fatal error.
    fatal_error: Arc<Notify>,
    runtime: tokio::runtime::Handle,
}

struct State {
    /// `None` while a rebuild replaces the producer.
    producer: Option<LiveProducer>,
    /// Records that could not enter librdkafka's queue yet, oldest first. While this is not
    /// empty every new record joins it, so that records keep their order.
    waiting: VecDeque<WaitingRecord>,
    retry_task_running: bool,
    rebuilds: u64,
}

#[derive(Clone)]
struct LiveProducer {
    producer: AuditProducer,
    fatal_reason: Arc<OnceLock<String>>,
}

struct WaitingRecord {
    key: Arc<str>,
    payload: Bytes,
    /// When the record stops waiting for room in a full queue.
    room_deadline: Instant,
    /// When the whole send times out.
    deadline: Instant,
    reply: oneshot::Sender<Result<Queued, TransportError>>,
}

/// A record inside librdkafka's queue.
struct Queued {
    delivery: DeliveryFuture,
    fatal_reason: Arc<OnceLock<String>>,
}

impl KafkaTransport {
    /// Validates `settings`, builds the producer and starts the task that replaces it after a
    /// fatal error. Must be called inside a Tokio runtime. Connecting to the brokers happens in
    /// the background, so an unreachable cluster is not an error here.
    pub fn new(settings: KafkaSettings, observer: Option<Arc<dyn RebuildObserver>>) -> Result<KafkaTransport, SetupError> {
        settings.validate().map_err(SetupError::Invalid)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| SetupError::Client("the Kafka transport must be created inside a Tokio runtime".to_owned()))?;
        let fatal_error = Arc::new(Notify::new());
        let producer = build_producer(&settings, &fatal_error)?;

        let shared = Arc::new(Shared {
            settings,
            observer,
            state: Mutex::new(State { producer: Some(producer), waiting: VecDeque::new(), retry_task_running: false, rebuilds: 0 }),
            rebuild_lock: tokio::sync::Mutex::new(()),
            fatal_error,
            runtime,
        });
        shared.runtime.spawn(replace_after_fatal_errors(Arc::downgrade(&shared)));
        if let Some(certificate) = shared.settings.connection.tls.as_ref().and_then(|tls| tls.rotating_certificate.as_ref()) {
            shared.runtime.spawn(replace_after_certificate_rotations(Arc::downgrade(&shared), certificate.subscribe()));
        }
        Ok(KafkaTransport { shared })
    }

    pub fn settings(&self) -> &KafkaSettings {
        &self.shared.settings
    }

    /// Replaces the producer with a new one built from the settings, re-reading the TLS and
    /// SASL files, for example after the client certificate was rotated.
    ///
    /// The old producer is flushed, bounded by the delivery deadline plus one second, before it
    /// is dropped; records still undelivered then fail as retriable. Sends made meanwhile wait
    /// and go to the new producer. When the new producer cannot be built, the old one stays.
    pub async fn rebuild(&self) -> Result<(), SetupError> {
        self.shared.rebuild(RebuildReason::Requested).await
    }

    /// Raises a fatal error in the current producer through librdkafka's test hook, as a
    /// fenced idempotent producer would, so that tests can watch the transport recover.
    #[doc(hidden)]
    pub fn danger_raise_fatal_error(&self, reason: &str) -> bool {
        let Some(live) = self.shared.lock().producer.clone() else { return false };
        let Ok(reason) = std::ffi::CString::new(reason) else { return false };
        // SAFETY: the client pointer is valid while `live` owns the producer, and librdkafka
        // copies the reason string.
        let code = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                live.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
                reason.as_ptr(),
            )
        };
        code == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    }
}

impl Transport for KafkaTransport {
    fn send(&self, record: &Record) -> BoxFuture<'static, Result<(), TransportError>> {
        let shared = &self.shared;
        let delivery_timeout = shared.settings.delivery_timeout;
        let deadline = Instant::now() + delivery_timeout;
        let entered = shared.enqueue(record, deadline);

        async move {
            let queued = match entered {
                Entered::Queued(queued) => queued,
                Entered::Waiting(reply) => match tokio::time::timeout_at(deadline, reply).await {
                    Ok(Ok(Ok(queued))) => queued,
                    Ok(Ok(Err(error))) => return Err(error),
                    Ok(Err(_)) => return Err(TransportError::Retriable("the Kafka transport was dropped".to_owned())),
                    Err(_) => return Err(TransportError::TimedOut(delivery_timeout)),
                },
                Entered::Failed(error) => return Err(error),
            };
            match tokio::time::timeout_at(deadline, queued.delivery).await {
                Ok(Ok(result)) => delivery_outcome(result, &queued.fatal_reason, delivery_timeout),
                Ok(Err(_)) => Err(TransportError::Retriable("the producer was dropped before it reported the record".to_owned())),
                Err(_) => Err(TransportError::TimedOut(delivery_timeout)),
            }
        }
        .boxed()
    }

    /// Rebuilds the producer: the old one is flushed for at most the delivery deadline plus
    /// one second and then dropped with whatever it still holds, so no earlier copy of a
    /// record can reach the topic after a resent one. The new producer also starts with fresh
    /// cluster metadata, which a producer that kept timing out across a broker restart may lack.
    fn reset(&self) -> BoxFuture<'static, Result<(), TransportError>> {
        let shared = Arc::clone(&self.shared);
        async move { shared.rebuild(RebuildReason::Reset).await.map_err(|error| TransportError::Retriable(error.to_string())) }.boxed()
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'static, Result<(), TransportError>> {
        let shared = Arc::clone(&self.shared);
        async move {
            let deadline = Instant::now() + timeout;
            let producer = loop {
                {
                    let state = shared.lock();
                    if state.waiting.is_empty()
                        && let Some(live) = &state.producer
                    {
                        break live.producer.clone();
                    }
                }
                if Instant::now() >= deadline {
                    return Err(TransportError::TimedOut(timeout));
                }
                tokio::time::sleep(WAITING_RETRY_INTERVAL).await;
            };

            let remaining = deadline.saturating_duration_since(Instant::now());
            let flushed = tokio::task::spawn_blocking(move || producer.flush(remaining))
                .await
                .map_err(|error| TransportError::Retriable(format!("the flush task failed: {error}")))?;
            match flushed {
                Ok(()) => Ok(()),
                Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut) => Err(TransportError::TimedOut(timeout)),
                Err(error) => Err(TransportError::Retriable(format!("flushing the Kafka producer failed: {error}"))),
            }
        }
        .boxed()
    }

    fn name(&self) -> &'static str {
        "kafka"
    }
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport").field("settings", &self.shared.settings).finish_non_exhaustive()
    }
}

/// Outcome of handing a record to the transport: queued in librdkafka, waiting, or failed.
enum Entered {
    Queued(Queued),
    Waiting(oneshot::Receiver<Result<Queued, TransportError>>),
    Failed(TransportError),
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves the state consistent: every change is a
        // single push, pop or assignment.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Puts the record into librdkafka's queue, or at the end of the waiting records when the
    /// queue is full, a rebuild is running or other records already wait.
    fn enqueue(self: &Arc<Self>, record: &Record, deadline: Instant) -> Entered {
        let mut state = self.lock();
        if state.waiting.is_empty()
            && let Some(live) = &state.producer
        {
            match live.try_enqueue(&self.settings.topic, &record.instance_id, &record.bytes) {
                Ok(queued) => return Entered::Queued(queued),
                Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {}
                Err(error) => return Entered::Failed(enqueue_error(&error, &live.fatal_reason)),
            }
        }

        let (reply, receiver) = oneshot::channel();
        let room_deadline = Instant::now() + self.settings.queue_full_timeout;
        state.waiting.push_back(WaitingRecord {
            key: Arc::clone(&record.instance_id),
            payload: record.bytes.clone(),
            room_deadline: room_deadline.min(deadline),
            deadline,
            reply,
        });
        if !state.retry_task_running {
            state.retry_task_running = true;
            self.runtime.spawn(retry_waiting_records(Arc::clone(self)));
        }
        Entered::Waiting(receiver)
    }

    /// Moves waiting records into librdkafka's queue, oldest first, and fails them once they
    /// have waited too long. Returns whether records still wait.
    fn retry_waiting(&self) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(live) = &state.producer {
            while let Some(front) = state.waiting.front() {
                match live.try_enqueue(&self.settings.topic, &front.key, &front.payload) {
                    Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => break,
                    outcome => {
                        let waiting = state.waiting.pop_front().expect("the front record exists");
                        let reply = outcome.map_err(|error| enqueue_error(&error, &live.fatal_reason));
                        // The sender may have stopped waiting; the record then stays queued,
                        // like a record whose send future is dropped.
                        let _ = waiting.reply.send(reply);
                    }
                }
            }
        }

        let now = Instant::now();
        let expired = state.waiting.front().and_then(|front| {
            if now >= front.deadline {
                Some(TransportError::TimedOut(self.settings.delivery_timeout))
            } else if state.producer.is_some() && now >= front.room_deadline {
                Some(TransportError::Retriable(format!(
                    "the local Kafka queue stayed full for {:?}",
                    self.settings.queue_full_timeout
                )))
            } else {
                None
            }
        });
        if let Some(error) = expired {
            // Every record behind the expired one fails too: letting a later record into the
            // queue ahead of a retry of the earlier one would break the order.
            tracing::warn!(kafka.records = state.waiting.len(), error = %error, "failing audit records that waited to enter the Kafka producer");
            for waiting in state.waiting.drain(..) {
                let _ = waiting.reply.send(Err(error.clone()));
            }
        }

        if state.waiting.is_empty() {
            state.retry_task_running = false;
            return false;
        }
        true
    }

    async fn rebuild(self: &Arc<Self>, reason: RebuildReason) -> Result<(), SetupError> {
        let _only_rebuild = self.rebuild_lock.lock().await;
        let new_producer = build_producer(&self.settings, &self.fatal_error)?;
        let old_producer = self.lock().producer.take();

        let bound = self.settings.delivery_timeout + REBUILD_FLUSH_GRACE;
        let undelivered = match old_producer {
            Some(old) => tokio::task::spawn_blocking(move || flush_and_drop(old, bound)).await.unwrap_or(0),
            None => 0,
        };

        let rebuilds = {
            let mut state = self.lock();
            state.producer = Some(new_producer);
            state.rebuilds += 1;
            state.rebuilds
        };
        let event = RebuildEvent { reason, undelivered, rebuilds };
        tracing::info!(kafka.rebuilds = rebuilds, kafka.undelivered = undelivered, reason = ?event.reason, "replaced the Kafka producer");
        if let Some(observer) = &self.observer {
            observer.producer_rebuilt(&event);
        }
        Ok(())
    }
}

impl Drop for Shared {
    /// Flushes the producer, bounded by the delivery deadline, before librdkafka's drop purges
    /// whatever is left. This blocks the dropping thread; callers that cannot block call
    /// [`Transport::flush`] first, which leaves nothing to wait for here.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(live) = state.producer.take()
            && live.producer.in_flight_count() > 0
        {
            let undelivered = flush_and_drop(live, self.settings.delivery_timeout);
            if undelivered > 0 {
                tracing::warn!(kafka.undelivered = undelivered, "dropped the Kafka transport with undelivered audit records");
            }
        }
        // Wakes the fatal-error task, which then finds the transport gone and ends.
        self.fatal_error.notify_one();
    }
}

impl LiveProducer {
    fn try_enqueue(&self, topic: &str, key: &str, payload: &[u8]) -> Result<Queued, KafkaError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        match self.producer.send_result(record) {
            Ok(delivery) => Ok(Queued { delivery, fatal_reason: Arc::clone(&self.fatal_reason) }),
            Err((error, _record)) => Err(error),
        }
    }
}

/// Flushes the old producer within `bound`, never purging it first, and drops it. Returns the
/// number of records it still held, which the drop then fails.
fn flush_and_drop(old: LiveProducer, bound: Duration) -> u64 {
    if let Err(error) = old.producer.flush(bound) {
        tracing::warn!(error = %error, "flushing the replaced Kafka producer did not finish");
    }
    let undelivered = old.producer.in_flight_count().max(0) as u64;
    drop(old);
    undelivered
}

async fn retry_waiting_records(shared: Arc<Shared>) {
    while shared.retry_waiting() {
        tokio::time::sleep(WAITING_RETRY_INTERVAL).await;
    }
}

/// Rebuilds the producer after each installed client certificate, until the transport is gone.
async fn replace_after_certificate_rotations(shared: Weak<Shared>, mut certificates: watch::Receiver<Option<Arc<CertificatePem>>>) {
    while certificates.changed().await.is_ok() {
        let Some(shared) = shared.upgrade() else { return };
        if let Err(error) = shared.rebuild(RebuildReason::CertificateRotated).await {
            tracing::error!(error = %error, "rebuilding the Kafka producer with the rotated client certificate failed; the old producer stays");
        }
    }
}

/// Replaces the producer whenever its error callback reports a fatal error, until the
/// transport is dropped.
async fn replace_after_fatal_errors(shared: Weak<Shared>) {
    let Some(notify) = shared.upgrade().map(|shared| Arc::clone(&shared.fatal_error)) else { return };
    loop {
        notify.notified().await;
        loop {
            let Some(shared) = shared.upgrade() else { return };
            let reason = shared.lock().producer.as_ref().and_then(|live| live.fatal_reason.get().cloned());
            let Some(reason) = reason else { break };
            match shared.rebuild(RebuildReason::FatalError(reason)).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(error = %error, "replacing the Kafka producer after a fatal error failed; retrying");
                    drop(shared);
                    tokio::time::sleep(FATAL_REBUILD_RETRY_INTERVAL).await;
                }
            }
        }
    }
}

fn build_producer(settings: &KafkaSettings, fatal_error: &Arc<Notify>) -> Result<LiveProducer, SetupError> {
    let config = settings.producer_config()?;
    let fatal_reason = Arc::new(OnceLock::new());
    let client = Arc::new(AtomicPtr::new(std::ptr::null_mut()));
    let events = ProducerEvents { client: Arc::clone(&client), fatal_reason: Arc::clone(&fatal_reason), fatal_error: Arc::clone(fatal_error) };
    let producer = AuditProducer::from_config_and_context(&config, events).map_err(client_error)?;
    client.store(producer.client().native_ptr(), Ordering::Release);
    Ok(LiveProducer { producer, fatal_reason })
}

/// Describes a client creation error without the configured value, which may be a password.
pub(crate) fn client_error(error: KafkaError) -> SetupError {
    match error {
        KafkaError::ClientConfig(_, description, key, _value) => SetupError::Client(format!("invalid property {key}: {description}")),
        other => SetupError::Client(other.to_string()),
    }
}

/// librdkafka callbacks of one producer: its log lines go to `tracing`, and a fatal error is
/// stored and reported so the transport replaces the producer.
struct ProducerEvents {
    /// The producer's librdkafka handle, null until creation returns.
    client: Arc<AtomicPtr<RDKafka>>,
    fatal_reason: Arc<OnceLock<String>>,
    fatal_error: Arc<Notify>,
}

impl ProducerEvents {
    /// Returns librdkafka's fatal error of this producer, if one was raised.
    ///
    /// The error event of a fatal error carries the underlying code (for example
    /// `ProducerFenced`), not `Fatal`, and rdkafka does not pass on the event's fatal flag, so
    /// the handle itself is asked.
    fn fatal_error(&self) -> Option<String> {
        let client = self.client.load(Ordering::Acquire);
        if client.is_null() {
            return None;
        }
        let mut buffer = [0 as std::ffi::c_char; 512];
        // SAFETY: librdkafka calls this context only while the producer, and so its handle, is
        // alive; the buffer length passed is the buffer's own.
        let code = unsafe { rdkafka::bindings::rd_kafka_fatal_error(client, buffer.as_mut_ptr(), buffer.len()) };
        if code == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: librdkafka writes a NUL-terminated string that fits the buffer.
        let reason = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) };
        Some(format!("{}: {}", RDKafkaErrorCode::from(code), reason.to_string_lossy()))
    }
}

impl ClientContext for ProducerEvents {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = match self.fatal_error() {
            Some(fatal) => Some(fatal),
            None if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => Some(reason.to_owned()),
            None => None,
        };
        match fatal {
            Some(fatal) => {
                tracing::error!(reason = %fatal, "the Kafka producer failed fatally; replacing it");
                let _ = self.fatal_reason.set(fatal);
                self.fatal_error.notify_one();
            }
            None => tracing::warn!(error = %error, reason, "Kafka client error"),
        }
    }
}

pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

fn delivery_outcome(result: OwnedDeliveryResult, fatal_reason: &OnceLock<String>, delivery_timeout: Duration) -> Result<(), TransportError> {
    match result {
        Ok(_) => Ok(()),
        Err((error, _message)) => Err(transport_error(&error, fatal_reason.get().map(String::as_str), delivery_timeout)),
    }
}

/// Maps an error of `send_result`, which never reports a timeout, so no deadline is needed.
fn enqueue_error(error: &KafkaError, fatal_reason: &OnceLock<String>) -> TransportError {
    transport_error(error, fatal_reason.get().map(String::as_str), Duration::ZERO)
}

/// Maps a librdkafka error of one record to the pipeline's error kinds. `fatal_reason` is set
/// once the producer has failed fatally, whatever code the record itself carries.
pub(crate) fn transport_error(error: &KafkaError, fatal_reason: Option<&str>, delivery_timeout: Duration) -> TransportError {
    if let Some(reason) = fatal_reason {
        return TransportError::Fatal(format!("the Kafka producer failed fatally: {reason}"));
    }
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => TransportError::TimedOut(delivery_timeout),
        Some(RDKafkaErrorCode::Fatal) => TransportError::Fatal(format!("the Kafka producer failed fatally: {error}")),
        Some(RDKafkaErrorCode::QueueFull) => TransportError::Retriable("the local Kafka queue is full".to_owned()),
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => {
            TransportError::Retriable("the record was dropped with a replaced Kafka producer".to_owned())
        }
        _ => TransportError::Retriable(format!("Kafka did not take the record: {error}")),
    }
}

#[cfg(test)]
mod tests;
