//! Reads a whole topic once, for verifying the audit chains it holds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::settings::{ConnectionSettings, SetupError};
use crate::transport::{client_error, log_librdkafka};

/// Maximum wait of one poll, so that the deadline is checked often.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// One message of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("the topic {topic:?} does not exist: {reason}")]
    TopicNotFound { topic: String, reason: String },
    #[error("{action} failed: {error}")]
    Kafka { action: String, error: KafkaError },
    #[error(
        "reading {topic:?} timed out after {timeout:?} with {read} messages read and partitions {unfinished:?} unfinished{}",
        last_error.as_ref().map(|error| format!("; last error: {error}")).unwrap_or_default()
    )]
    TimedOut { topic: String, timeout: Duration, read: usize, unfinished: Vec<i32>, last_error: Option<String> },
}

/// Reads every message of `topic`, on all partitions, from the earliest offset each partition
/// still holds up to its end offset at the time of the call. Messages produced during the call
/// are left out. Returns the messages ordered by partition, then offset, or fails when the
/// whole read takes longer than `timeout`.
///
/// The reader assigns partitions directly and commits nothing, so it joins no consumer group
/// and leaves no offsets behind. This call blocks; async callers run it with
/// `tokio::task::spawn_blocking`.
pub fn read_topic(connection: &ConnectionSettings, topic: &str, timeout: Duration) -> Result<Vec<TopicMessage>, ReadError> {
    connection.validate().map_err(SetupError::Invalid)?;
    let deadline = Instant::now() + timeout;
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let consumer = build_consumer(connection)?;

    let end_offsets = end_offsets(&consumer, topic, remaining)?;
    let mut assignment = TopicPartitionList::new();
    let mut unfinished: BTreeMap<i32, i64> = BTreeMap::new();
    for (&partition, &(low, high)) in &end_offsets {
        if high > low {
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(low))
                .map_err(|error| kafka_error("assigning partitions", error))?;
            unfinished.insert(partition, high);
        }
    }
    consumer.assign(&assignment).map_err(|error| kafka_error("assigning partitions", error))?;

    let mut messages = Vec::new();
    let mut last_error = None;
    while !unfinished.is_empty() {
        let wait = remaining();
        if wait.is_zero() {
            return Err(ReadError::TimedOut {
                topic: topic.to_owned(),
                timeout,
                read: messages.len(),
                unfinished: unfinished.keys().copied().collect(),
                last_error,
            });
        }
        match consumer.poll(wait.min(POLL_INTERVAL)) {
            None => {}
            Some(Ok(message)) => {
                let partition = message.partition();
                let Some(&end) = unfinished.get(&partition) else { continue };
                if message.offset() < end {
                    messages.push(TopicMessage {
                        partition,
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    });
                }
                if message.offset() + 1 >= end {
                    unfinished.remove(&partition);
                }
            }
            // The end of a partition, at or after the end offset taken at the start. Offsets
            // before it may be missing when the log was compacted or contains control records.
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                unfinished.remove(&partition);
            }
            // librdkafka retries connection errors itself; the deadline bounds the wait.
            Some(Err(error)) => last_error = Some(error.to_string()),
        }
    }

    messages.sort_by_key(|message| (message.partition, message.offset));
    Ok(messages)
}

/// Returns the low and high watermark of every partition of `topic`.
fn end_offsets(consumer: &BaseConsumer<ReaderEvents>, topic: &str, remaining: impl Fn() -> Duration) -> Result<BTreeMap<i32, (i64, i64)>, ReadError> {
    let metadata = consumer.fetch_metadata(Some(topic), remaining()).map_err(|error| kafka_error("fetching the topic's metadata", error))?;
    let Some(topic_metadata) = metadata.topics().iter().find(|candidate| candidate.name() == topic) else {
        return Err(ReadError::TopicNotFound { topic: topic.to_owned(), reason: "the broker returned no metadata for it".to_owned() });
    };
    if let Some(error) = topic_metadata.error() {
        let code = RDKafkaErrorCode::from(error);
        return Err(ReadError::TopicNotFound { topic: topic.to_owned(), reason: code.to_string() });
    }

    let mut offsets = BTreeMap::new();
    for partition in topic_metadata.partitions() {
        let id = partition.id();
        let watermarks = consumer
            .fetch_watermarks(topic, id, remaining())
            .map_err(|error| kafka_error(&format!("fetching the offsets of partition {id}"), error))?;
        offsets.insert(id, watermarks);
    }
    Ok(offsets)
}

fn build_consumer(connection: &ConnectionSettings) -> Result<BaseConsumer<ReaderEvents>, ReadError> {
    let mut config = connection.client_config()?;
    config
        // librdkafka needs a group id for a consumer even when it only assigns partitions.
        .set("group.id", format!("{}-audit-reader", connection.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    Ok(BaseConsumer::from_config_and_context(&config, ReaderEvents).map_err(client_error)?)
}

fn kafka_error(action: &str, error: KafkaError) -> ReadError {
    ReadError::Kafka { action: action.to_owned(), error }
}

/// Sends the reader's librdkafka log lines to `tracing`.
struct ReaderEvents;

impl ClientContext for ReaderEvents {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "Kafka reader error");
    }
}

impl ConsumerContext for ReaderEvents {}
