//! Typed Kafka client settings, their validation, and their translation into librdkafka
//! properties.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::certificate::RotatingClientCertificate;

/// Default delivery deadline of one record. Checks wait for the acknowledgement, so the
/// deadline must stay below the check deadline that Envoy applies; 2 s leaves a loaded broker
/// time for a leader change while a check still fails well before Envoy's usual timeouts.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Default time librdkafka waits to fill a batch. Every check waits for its record's
/// acknowledgement, so a long linger adds directly to the check latency; 1 ms still batches
/// the records of concurrent checks.
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);

/// Default time a send waits for room in a full local queue before it fails as retriable.
pub const DEFAULT_QUEUE_FULL_TIMEOUT: Duration = Duration::from_millis(200);

/// Default limit of records in the local queue (librdkafka's `queue.buffering.max.messages`).
/// Records are acknowledged within the delivery deadline or failed, so the queue only fills
/// when the broker is slow; 100 000 records of about 1 KiB take about 100 MiB.
pub const DEFAULT_MAX_QUEUED_MESSAGES: u32 = 100_000;

/// Default limit of bytes in the local queue (librdkafka's `queue.buffering.max.kbytes`).
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 128 * 1024 * 1024;

pub const DEFAULT_CLIENT_ID: &str = "portcullis";

/// Shortest accepted delivery deadline. librdkafka checks message timeouts about once a
/// second, so shorter deadlines mostly fail through the transport's own timer.
pub const MIN_DELIVERY_TIMEOUT: Duration = Duration::from_millis(100);

/// Longest accepted delivery deadline; a check waits this long at most for the broker.
pub const MAX_DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest accepted linger; librdkafka accepts up to 900 s, but every check would wait for it.
pub const MAX_LINGER: Duration = Duration::from_secs(1);

/// librdkafka's limits of `queue.buffering.max.messages` and `queue.buffering.max.kbytes`.
pub const MAX_QUEUED_MESSAGES_LIMIT: u32 = 2_147_483_647;
pub const MAX_QUEUED_KBYTES_LIMIT: u64 = 2_147_483_647;

/// Connection to the brokers: addresses, client identity and security.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// `HOST:PORT` of one or more brokers, used only to discover the cluster.
    pub bootstrap_servers: Vec<String>,
    /// Name the brokers log and apply quotas to.
    pub client_id: String,
    /// TLS to the brokers; `None` is plaintext.
    pub tls: Option<TlsSettings>,
    /// SASL authentication; `None` authenticates through the TLS client certificate, if any.
    pub sasl: Option<SaslSettings>,
}

/// TLS files. Files are read whenever a client is built, so a rotated certificate takes
/// effect at the next [`crate::KafkaTransport::rebuild`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// PEM bundle of the CAs that sign the brokers' certificates; `None` uses the system store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS; set together with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// A client certificate rotated elsewhere (the listener's), in place of `cert_file` and
    /// `key_file`.
    pub rotating_certificate: Option<RotatingClientCertificate>,
}

/// SASL credentials. The password is read from `password_file` whenever a client is built and
/// is never stored in the settings, so `Debug` and logs cannot show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl SaslMechanism {
    /// The names accepted in configuration, which are librdkafka's `sasl.mechanism` values.
    pub const NAMES: &'static [&'static str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }

    /// Parses one of [`SaslMechanism::NAMES`]; returns `None` for any other text.
    pub fn from_name(name: &str) -> Option<SaslMechanism> {
        match name {
            "PLAIN" => Some(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Some(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(SaslMechanism::ScramSha512),
            _ => None,
        }
    }
}

/// Settings of the audit transport: the connection plus the topic and the producer's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    pub connection: ConnectionSettings,
    pub topic: String,
    /// Time from a send until its record is acknowledged or reported as timed out by the
    /// transport's own timer. librdkafka keeps the record queued until the producer is reset.
    pub delivery_timeout: Duration,
    /// Time librdkafka waits to fill a batch (`linger.ms`).
    pub linger: Duration,
    /// Time a send waits for room when the local queue is full.
    pub queue_full_timeout: Duration,
    pub max_queued_messages: u32,
    /// Rounded up to whole KiB for librdkafka.
    pub max_queued_bytes: u64,
}

impl KafkaSettings {
    /// Returns settings with every default for the given brokers and topic.
    pub fn new(bootstrap_servers: Vec<String>, topic: impl Into<String>) -> KafkaSettings {
        KafkaSettings {
            connection: ConnectionSettings::new(bootstrap_servers),
            topic: topic.into(),
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            linger: DEFAULT_LINGER,
            queue_full_timeout: DEFAULT_QUEUE_FULL_TIMEOUT,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }

    /// Checks every value and returns all problems, each naming its setting.
    pub fn validate(&self) -> Result<(), Vec<SettingsProblem>> {
        let mut problems = self.connection.problems();
        let mut push = |setting: &'static str, message: String| problems.push(SettingsProblem { setting, message });

        if let Some(reason) = topic_name_problem(&self.topic) {
            push("topic", reason);
        }
        if self.delivery_timeout < MIN_DELIVERY_TIMEOUT || self.delivery_timeout > MAX_DELIVERY_TIMEOUT {
            push(
                "delivery_timeout",
                format!(
                    "{:?} is outside the accepted range of {MIN_DELIVERY_TIMEOUT:?} to {MAX_DELIVERY_TIMEOUT:?}",
                    self.delivery_timeout
                ),
            );
        }
        if self.linger > MAX_LINGER {
            push("linger", format!("{:?} is longer than the maximum of {MAX_LINGER:?}", self.linger));
        }
        if self.linger >= self.delivery_timeout {
            push(
                "linger",
                format!(
                    "{:?} must be shorter than delivery_timeout ({:?}), or every record would time out while it waits for its batch",
                    self.linger, self.delivery_timeout
                ),
            );
        }
        if self.queue_full_timeout > self.delivery_timeout {
            push(
                "queue_full_timeout",
                format!(
                    "{:?} must not be longer than delivery_timeout ({:?}), which bounds the whole send",
                    self.queue_full_timeout, self.delivery_timeout
                ),
            );
        }
        if self.max_queued_messages == 0 || self.max_queued_messages > MAX_QUEUED_MESSAGES_LIMIT {
            push("max_queued_messages", format!("{} is outside the accepted range of 1 to {MAX_QUEUED_MESSAGES_LIMIT}", self.max_queued_messages));
        }
        let kbytes = self.max_queued_kbytes();
        if self.max_queued_bytes == 0 || kbytes > MAX_QUEUED_KBYTES_LIMIT {
            push(
                "max_queued_bytes",
                format!("{} is outside the accepted range of 1 to {} bytes", self.max_queued_bytes, MAX_QUEUED_KBYTES_LIMIT * 1024),
            );
        }

        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    fn max_queued_kbytes(&self) -> u64 {
        self.max_queued_bytes.div_ceil(1024)
    }

    /// Returns the librdkafka configuration of the audit producer, reading secret files.
    pub(crate) fn producer_config(&self) -> Result<ClientConfig, SetupError> {
        let mut config = self.connection.client_config()?;
        config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // librdkafka never expires a record on its own, because expiry is per record and
            // a record that expired in the queue would let later ones overtake its resend.
            // The transport's timer reports the time-out instead. The pipeline then resets the
            // producer, dropping what it still has queued, before it resends in order.
            .set("message.timeout.ms", "0")
            // Any other failure that could leave a gap stops the producer with a fatal error,
            // which rebuilds it.
            .set("enable.gapless.guarantee", "true")
            // A request must not outlive the record it carries.
            .set("request.timeout.ms", millis(self.delivery_timeout))
            .set("linger.ms", millis(self.linger))
            .set("queue.buffering.max.messages", self.max_queued_messages.to_string())
            .set("queue.buffering.max.kbytes", self.max_queued_kbytes().to_string());
        Ok(config)
    }
}

impl ConnectionSettings {
    pub fn new(bootstrap_servers: Vec<String>) -> ConnectionSettings {
        ConnectionSettings { bootstrap_servers, client_id: DEFAULT_CLIENT_ID.to_owned(), tls: None, sasl: None }
    }

    /// Checks every value and returns all problems, each naming its setting.
    pub fn validate(&self) -> Result<(), Vec<SettingsProblem>> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    fn problems(&self) -> Vec<SettingsProblem> {
        let mut problems = Vec::new();
        let mut push = |setting: &'static str, message: String| problems.push(SettingsProblem { setting, message });

        if self.bootstrap_servers.is_empty() {
            push("bootstrap_servers", "no broker; list at least one HOST:PORT".to_owned());
        }
        for server in &self.bootstrap_servers {
            if let Some(reason) = broker_address_problem(server) {
                push("bootstrap_servers", reason);
            }
        }
        if self.client_id.is_empty() || !self.client_id.chars().all(|c| c.is_ascii_graphic()) {
            push("client_id", format!("invalid client id {:?}; use printable ASCII without spaces", self.client_id));
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            push("tls", "cert_file and key_file must be set together".to_owned());
        }
        if let Some(tls) = &self.tls
            && tls.rotating_certificate.is_some()
            && (tls.cert_file.is_some() || tls.key_file.is_some())
        {
            push("tls", "use_listener_certificate excludes cert_file and key_file; set one or the other".to_owned());
        }
        if let Some(sasl) = &self.sasl
            && (sasl.username.is_empty() || sasl.username.contains(['\0', '\n', '\r']))
        {
            push("sasl.username", "invalid username; it must be non-empty and on one line".to_owned());
        }
        problems
    }

    /// Returns `security.protocol` for the chosen TLS and SASL settings.
    pub fn security_protocol(&self) -> &'static str {
        match (self.tls.is_some(), self.sasl.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        }
    }

    /// Returns the librdkafka configuration shared by producers and readers, reading the SASL
    /// password file.
    pub(crate) fn client_config(&self) -> Result<ClientConfig, SetupError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.bootstrap_servers.join(","))
            .set("client.id", &self.client_id)
            .set("security.protocol", self.security_protocol())
            // librdkafka backs off up to 10 s by default between reconnects, which would keep
            // records failing for that long after a broker comes back.
            .set("reconnect.backoff.max.ms", "1000");

        if let Some(tls) = &self.tls {
            if let Some(ca_file) = &tls.ca_file {
                config.set("ssl.ca.location", path_text(ca_file, "tls.ca_file")?);
            }
            if let (Some(cert_file), Some(key_file)) = (&tls.cert_file, &tls.key_file) {
                config
                    .set("ssl.certificate.location", path_text(cert_file, "tls.cert_file")?)
                    .set("ssl.key.location", path_text(key_file, "tls.key_file")?);
            }
            // Without an installed certificate yet, the producer connects without one; the
            // first installation rebuilds it.
            if let Some(certificate) = tls.rotating_certificate.as_ref().and_then(RotatingClientCertificate::current) {
                config.set("ssl.certificate.pem", &certificate.chain).set("ssl.key.pem", &certificate.private_key);
            }
        }
        if let Some(sasl) = &self.sasl {
            let password = read_password(&sasl.password_file)?;
            config
                .set("sasl.mechanism", sasl.mechanism.name())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", password.0);
        }
        Ok(config)
    }
}

/// One invalid setting, named by its key under `audit.kafka`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsProblem {
    pub setting: &'static str,
    pub message: String,
}

impl fmt::Display for SettingsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.message)
    }
}

/// Failure to build a Kafka client from settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("invalid Kafka settings: {}", join_problems(.0))]
    Invalid(Vec<SettingsProblem>),
    #[error("reading the SASL password file {path} failed: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
    #[error("{setting}: the path {path} is not valid UTF-8, which librdkafka needs")]
    NonUtf8Path { setting: &'static str, path: PathBuf },
    /// librdkafka rejected the configuration or could not create the client. The message never
    /// contains a configured value, so it cannot show the password.
    #[error("creating the Kafka client failed: {0}")]
    Client(String),
}

fn join_problems(problems: &[SettingsProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// The SASL password, kept out of `Debug`.
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Reads the password file, dropping one trailing line ending as editors and `echo` add it.
fn read_password(path: &Path) -> Result<Password, SetupError> {
    let failed = |reason: String| SetupError::PasswordFile { path: path.to_path_buf(), reason };
    let text = fs::read_to_string(path).map_err(|error| failed(error.to_string()))?;
    let password = text.strip_suffix('\n').map(|rest| rest.strip_suffix('\r').unwrap_or(rest)).unwrap_or(&text);
    if password.is_empty() {
        return Err(failed("the file is empty".to_owned()));
    }
    if password.contains(['\0', '\n', '\r']) {
        return Err(failed("the password spans several lines or contains a NUL byte".to_owned()));
    }
    Ok(Password(password.to_owned()))
}

fn path_text<'a>(path: &'a Path, setting: &'static str) -> Result<&'a str, SetupError> {
    path.to_str().ok_or_else(|| SetupError::NonUtf8Path { setting, path: path.to_path_buf() })
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

/// Returns why `server` is not a `HOST:PORT` broker address, or `None` when it is one.
fn broker_address_problem(server: &str) -> Option<String> {
    let invalid = |reason: &str| Some(format!("invalid broker address {server:?}: {reason}; write HOST:PORT such as kafka-0.kafka:9092"));
    let Some((host, port)) = server.rsplit_once(':') else {
        return invalid("no port");
    };
    if host.is_empty() || host.contains([',', ' ', '/']) {
        return invalid("no host name");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => invalid("the port is not a number from 1 to 65535"),
        Ok(_) => None,
    }
}

/// Returns why `topic` is not a legal Kafka topic name, or `None` when it is one. Kafka allows
/// ASCII letters, digits, `.`, `_` and `-`, up to 249 characters, other than `.` and `..`.
fn topic_name_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("missing; name the topic the audit records go to".to_owned());
    }
    if topic == "." || topic == ".." || topic.len() > 249 || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Some(format!("invalid topic name {topic:?}; use up to 249 ASCII letters, digits, '.', '_' and '-'"));
    }
    None
}

#[cfg(test)]
mod tests;
