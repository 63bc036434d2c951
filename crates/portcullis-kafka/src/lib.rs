//! Kafka for the audit chain: [`KafkaTransport`] sends records with an idempotent librdkafka
//! producer and implements [`portcullis_audit::Transport`]; [`read_topic`] reads a topic back
//! whole for verification.

mod certificate;
mod reader;
mod settings;
mod transport;

pub use certificate::RotatingClientCertificate;
pub use reader::{ReadError, TopicMessage, read_topic};
pub use settings::{
    ConnectionSettings, DEFAULT_CLIENT_ID, DEFAULT_DELIVERY_TIMEOUT, DEFAULT_LINGER, DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES, DEFAULT_QUEUE_FULL_TIMEOUT, KafkaSettings, MAX_DELIVERY_TIMEOUT, MAX_LINGER,
    MIN_DELIVERY_TIMEOUT, SaslMechanism, SaslSettings, SettingsProblem, SetupError, TlsSettings,
};
pub use transport::{KafkaTransport, RebuildEvent, RebuildObserver, RebuildReason};
