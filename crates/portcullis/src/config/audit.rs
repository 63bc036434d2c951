//! The `audit` section: where decision events go, the spool, checkpoints and event contents.

use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis_audit::SpoolConfig;
use portcullis_authz::service::EventOptions;
use portcullis_kafka::KafkaSettings;

use super::fields::{Fields, Problem, problem};
use super::kafka::read_kafka;
use super::yaml::Node;

/// How long a check waits for its decision event to be recorded before denying with 503.
/// Operators should set it below the ext_authz timeout configured in Envoy, so that a slow
/// sink yields portcullis's own 503 with a reason instead of Envoy's timeout error.
const DEFAULT_AUDIT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a check waits for Kafka's acknowledgement in `kafka` mode before it falls back to
/// the spool (or fails without one). Half the audit timeout, so the fallback still fits in it.
const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_millis(500);
/// Spool bound: about 800k events of about 1 KB, hours at a few hundred checks per second.
/// It stays below the Helm chart's default 1 GiB spool emptyDir, so the spool rejects events
/// before kubelet would evict the pod for using too much of the volume.
const DEFAULT_SPOOL_MAX_BYTES: u64 = 768 * 1024 * 1024;
/// Segment size: shipped segments are deleted whole, so this is also how much shipped data
/// may stay on disk.
const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Records between two checkpoints: a checkpoint costs one signature (tens of microseconds),
/// so one per thousand events is negligible, and a verifier never trusts more than a
/// thousand unsigned records.
const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// Maximum time between checkpoints while events are written, so a quiet instance still has
/// its recent records signed within seconds.
const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Headers that carry credentials; they are never copied into events.
const CREDENTIAL_HEADERS: [&str; 4] = ["authorization", "proxy-authorization", "cookie", "set-cookie"];

/// Destination of decision events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditMode {
    /// Chained records fsynced to a local spool before the check gets its response; shipped
    /// to Kafka in the background when `audit.kafka` is set.
    Spool,
    /// Kafka acknowledges each record before the check gets its response.
    Kafka,
    /// Chained JSON lines appended to `audit.path`, without checkpoints.
    File,
    /// Chained JSON lines on standard output, without checkpoints.
    Stdout,
    None,
}

impl AuditMode {
    pub fn name(self) -> &'static str {
        match self {
            AuditMode::Spool => "spool",
            AuditMode::Kafka => "kafka",
            AuditMode::File => "file",
            AuditMode::Stdout => "stdout",
            AuditMode::None => "none",
        }
    }
}

/// Checkpoint settings of the `spool` and `kafka` modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    pub every: u64,
    pub interval: Duration,
    /// PKCS#8 PEM Ed25519 private key; without it no checkpoints are written.
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    pub mode: AuditMode,
    /// The event file of the `file` mode.
    pub path: Option<PathBuf>,
    /// fsync in the `file` mode.
    pub fsync: bool,
    pub timeout: Duration,
    pub delivery_timeout: Duration,
    /// Names this process's chain; from `POD_NAME`, then `HOSTNAME`, unless set.
    pub instance_id: String,
    pub spool: Option<SpoolConfig>,
    /// File that keeps the chain head when there is no spool.
    pub state_file: Option<PathBuf>,
    pub checkpoint: CheckpointConfig,
    pub events: EventOptions,
    pub kafka: Option<KafkaSettings>,
}

const AUDIT_KEYS: &[&str] = &[
    "mode", "sink", "path", "fsync", "timeout", "delivery_timeout", "instance_id", "spool", "state_file", "checkpoint", "events", "kafka",
];

pub fn read_audit(node: Option<&Node>, base_dir: &Path, problems: &mut Vec<Problem>) -> AuditConfig {
    let fields = Fields::new(node, "audit", AUDIT_KEYS, base_dir, problems);
    let mode = read_mode(&fields, problems);

    let path = fields.path("path", problems);
    if mode == AuditMode::File && path.is_none() && fields.node("path").is_none() {
        problems.push(problem("audit.path", node.map(|node| node.line), "missing; the file sink needs a path for its events".to_owned()));
    }
    let timeout = fields.duration("timeout", DEFAULT_AUDIT_TIMEOUT, Duration::from_secs(60), problems);
    let delivery_timeout = fields.duration("delivery_timeout", DEFAULT_DELIVERY_TIMEOUT, Duration::from_secs(60), problems);
    let spool = read_spool(&fields, base_dir, problems);
    let kafka = read_kafka(fields.node("kafka"), base_dir, problems);

    check_mode_sections(&fields, mode, spool.is_some(), problems);
    if mode == AuditMode::Kafka && spool.is_some() && delivery_timeout >= timeout {
        problems.push(problem(
            "audit.delivery_timeout",
            fields.line_of("delivery_timeout"),
            format!(
                "{} must be shorter than audit.timeout ({}), or checks time out before they fall back to the spool",
                humantime::format_duration(delivery_timeout),
                humantime::format_duration(timeout)
            ),
        ));
    }
    // audit.kafka.delivery_timeout may be longer than audit.timeout: a check stops waiting
    // after audit.delivery_timeout, and the pipeline keeps the record and resends it until
    // Kafka acknowledges it, so the producer's deadline never shortens a check.

    AuditConfig {
        mode,
        path,
        fsync: fields.bool("fsync", true, problems),
        timeout,
        delivery_timeout,
        instance_id: read_instance_id(&fields, problems),
        spool,
        state_file: fields.path("state_file", problems),
        checkpoint: read_checkpoint(&fields, base_dir, problems),
        events: read_events(&fields, base_dir, problems),
        kafka,
    }
}

/// Reads `audit.mode`, or the older `audit.sink` that names the same file, stdout and none
/// modes.
fn read_mode(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> AuditMode {
    if fields.node("mode").is_some() && fields.node("sink").is_some() {
        problems.push(problem("audit.sink", fields.line_of("sink"), "set either audit.mode or the older audit.sink, not both".to_owned()));
    }
    let name = if fields.node("mode").is_none() && fields.node("sink").is_some() {
        fields.choice("sink", &["file", "stdout", "none"], "stdout", problems)
    } else {
        fields.choice("mode", &["spool", "kafka", "file", "stdout", "none"], "stdout", problems)
    };
    match name.as_str() {
        "spool" => AuditMode::Spool,
        "kafka" => AuditMode::Kafka,
        "file" => AuditMode::File,
        "none" => AuditMode::None,
        _ => AuditMode::Stdout,
    }
}

/// Reports sections that the mode needs but lacks, or has but does not use.
fn check_mode_sections(fields: &Fields<'_>, mode: AuditMode, has_spool: bool, problems: &mut Vec<Problem>) {
    let pipeline = matches!(mode, AuditMode::Spool | AuditMode::Kafka);
    if mode == AuditMode::Spool && fields.node("spool").is_none() {
        problems.push(problem("audit.spool", fields.line_of("mode"), "missing; the spool mode needs audit.spool.dir".to_owned()));
    }
    if mode == AuditMode::Kafka && fields.node("kafka").is_none() {
        problems.push(problem("audit.kafka", fields.line_of("mode"), "missing; the kafka mode needs audit.kafka.bootstrap_servers and audit.kafka.topic".to_owned()));
    }
    for key in ["spool", "kafka", "checkpoint", "state_file"] {
        if !pipeline && fields.node(key).is_some() {
            problems.push(problem(
                &fields.path_of(key),
                fields.line_of(key),
                format!("only used by the spool and kafka modes, but audit.mode is {}", mode.name()),
            ));
        }
    }
    if mode != AuditMode::File && fields.node("path").is_some() {
        problems.push(problem("audit.path", fields.line_of("path"), format!("only used by the file mode, but audit.mode is {}", mode.name())));
    }
    if pipeline && has_spool && fields.node("state_file").is_some() {
        problems.push(problem("audit.state_file", fields.line_of("state_file"), "not used with a spool, which keeps the chain head itself".to_owned()));
    }
}

fn read_spool(fields: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<SpoolConfig> {
    let node = fields.node("spool")?;
    let spool = Fields::new(Some(node), "audit.spool", &["dir", "max_bytes", "segment_bytes", "fsync"], base_dir, problems);
    let dir = spool.path("dir", problems);
    if spool.node("dir").is_none() {
        problems.push(problem("audit.spool.dir", Some(node.line), "missing; set the folder of the spool".to_owned()));
    }
    let max_bytes = spool.integer("max_bytes", DEFAULT_SPOOL_MAX_BYTES, 64 * 1024..=u64::MAX >> 1, problems);
    let segment_bytes = spool.integer("segment_bytes", DEFAULT_SEGMENT_BYTES.min(max_bytes / 4), 4096..=1024 * 1024 * 1024, problems);
    if segment_bytes > max_bytes / 2 {
        problems.push(problem(
            "audit.spool.segment_bytes",
            spool.line_of("segment_bytes"),
            format!("{segment_bytes} is more than half of max_bytes ({max_bytes}); shipped data is deleted by whole segments, so the spool would fill up"),
        ));
    }
    Some(SpoolConfig { dir: dir?, max_bytes, segment_bytes, fsync: spool.bool("fsync", true, problems) })
}

fn read_checkpoint(fields: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> CheckpointConfig {
    let checkpoint = Fields::new(fields.node("checkpoint"), "audit.checkpoint", &["every", "interval", "signing_key_file"], base_dir, problems);
    CheckpointConfig {
        every: checkpoint.integer("every", DEFAULT_CHECKPOINT_EVERY, 1..=1_000_000, problems),
        interval: checkpoint.duration("interval", DEFAULT_CHECKPOINT_INTERVAL, Duration::from_secs(3600), problems),
        signing_key_file: checkpoint.path("signing_key_file", problems),
    }
}

fn read_events(fields: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> EventOptions {
    let events = Fields::new(fields.node("events"), "audit.events", &["headers", "redact"], base_dir, problems);
    let headers: Vec<String> = events.strings("headers", problems).into_iter().map(|name| name.to_ascii_lowercase()).collect();
    for (index, name) in headers.iter().enumerate() {
        if CREDENTIAL_HEADERS.contains(&name.as_str()) {
            problems.push(problem(
                &format!("audit.events.headers[{index}]"),
                events.line_of("headers"),
                format!("{name} carries credentials and is never recorded; remove it"),
            ));
        }
    }
    let redact = events.strings("redact", problems);
    for (index, path) in redact.iter().enumerate() {
        let valid = path == "decision.reason"
            || path.strip_prefix("request.").or_else(|| path.strip_prefix("identity.")).is_some_and(|rest| !rest.is_empty());
        if !valid {
            problems.push(problem(
                &format!("audit.events.redact[{index}]"),
                events.line_of("redact"),
                format!("invalid path {path:?}; expected request.<member>, identity.<member> or decision.reason, such as request.path"),
            ));
        }
    }
    EventOptions { headers, redact }
}

/// Reads `audit.instance_id`, defaulting to the pod name, then the host name.
fn read_instance_id(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> String {
    let configured = fields.string("instance_id", problems);
    let instance_id = configured.clone().unwrap_or_else(default_instance_id);
    let valid = !instance_id.is_empty() && instance_id.len() <= 253 && instance_id.bytes().all(|byte| byte.is_ascii_graphic());
    if !valid {
        let source = if configured.is_some() { "" } else { " (taken from POD_NAME or HOSTNAME)" };
        problems.push(problem(
            "audit.instance_id",
            fields.line_of("instance_id"),
            format!("invalid instance id {instance_id:?}{source}; use 1 to 253 printable ASCII characters without spaces"),
        ));
    }
    instance_id
}

fn default_instance_id() -> String {
    let from_env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    from_env("POD_NAME")
        .or_else(|| from_env("HOSTNAME"))
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|name| name.trim().to_owned()))
        .unwrap_or_else(|| "portcullis".to_owned())
}
