//! The audit pipeline's wiring (`audit` configuration to [`AuditPipeline`]) and the `portcullis
//! audit` commands: `keygen` writes a checkpoint signing key pair, `verify` checks chains.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_audit::checkpoint::read_public_key;
use portcullis_audit::spool::{is_spool_dir, read_spool_lines};
use portcullis_audit::verify::{ChainVerifier, Position, Report};
use portcullis_audit::{AckMode, AuditObserver, AuditPipeline, CheckpointPolicy, CheckpointSigner, PipelineConfig, Transport};
use portcullis_kafka::KafkaTransport;
use tracing::{info, warn};

use crate::config::{AuditConfig, AuditMode};
use crate::metrics::Metrics;

/// Exit code for unusable arguments found after parsing: a key or input that cannot be read
/// (EX_USAGE from sysexits.h).
pub const EXIT_USAGE: u8 = 64;
/// Exit code of `audit verify` when a chain has a problem.
pub const EXIT_PROBLEM: u8 = 1;

/// Extra time the pipeline gives a send beyond Kafka's own delivery deadline before treating it
/// as timed out: librdkafka reports expired records up to about a second late.
const SEND_TIMEOUT_MARGIN: Duration = Duration::from_secs(2);

/// Starts the audit pipeline of the `spool` and `kafka` modes.
pub fn start_pipeline(config: &AuditConfig, metrics: &Arc<Metrics>) -> Result<AuditPipeline, String> {
    let signer = match &config.checkpoint.signing_key_file {
        Some(path) => {
            let signer = CheckpointSigner::from_pem_file(path).map_err(|error| format!("audit.checkpoint.signing_key_file: {error}"))?;
            info!(audit.key_id = signer.key_id(), "audit checkpoints are signed");
            Some(Arc::new(signer))
        }
        None => {
            warn!("audit.checkpoint.signing_key_file is not set: no signed checkpoints are written, so `portcullis audit verify` reports the chain as unsigned; create a key with `portcullis audit keygen`");
            None
        }
    };

    let transport = match &config.kafka {
        Some(settings) => {
            let observer: Arc<dyn portcullis_kafka::RebuildObserver> = Arc::clone(metrics) as _;
            let transport = KafkaTransport::new(settings.clone(), Some(observer)).map_err(|error| format!("audit.kafka: {error}"))?;
            info!(kafka.topic = %settings.topic, "audit records are shipped to Kafka");
            Some(Arc::new(transport) as Arc<dyn Transport>)
        }
        None => None,
    };

    let mut pipeline = PipelineConfig::new(config.instance_id.clone());
    pipeline.ack = if config.mode == AuditMode::Kafka { AckMode::Remote } else { AckMode::Local };
    pipeline.spool = config.spool.clone();
    pipeline.state_file = config.state_file.clone();
    pipeline.delivery_timeout = config.delivery_timeout;
    pipeline.checkpoints = CheckpointPolicy { every: config.checkpoint.every, interval: config.checkpoint.interval, signer };
    if let Some(settings) = &config.kafka {
        pipeline.send_timeout = settings.delivery_timeout + SEND_TIMEOUT_MARGIN;
    }
    if config.spool.is_none() && config.state_file.is_none() {
        warn!("audit.state_file is not set: after a restart this instance starts a new chain, which verify reports as conflicting with the old one");
    }

    info!(audit.mode = config.mode.name(), audit.instance_id = %config.instance_id, "audit pipeline starting");
    AuditPipeline::start(pipeline, transport, Arc::clone(metrics) as Arc<dyn AuditObserver>).map_err(|error| error.to_string())
}

/// `portcullis audit keygen`: writes a new Ed25519 key pair. The private key file is created
/// with mode 0600 and never overwritten.
pub fn keygen(private_key: &Path, public_key: &Path) -> u8 {
    let signer = match CheckpointSigner::generate() {
        Ok(signer) => signer,
        Err(error) => {
            eprintln!("portcullis: {error}");
            return crate::EXIT_FAILURE;
        }
    };
    let (private_pem, public_pem) = match (signer.private_key_pem(), signer.public_key_pem()) {
        (Ok(private_pem), Ok(public_pem)) => (private_pem, public_pem),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("portcullis: {error}");
            return crate::EXIT_FAILURE;
        }
    };

    if let Err(error) = write_new_file(private_key, private_pem.as_bytes(), 0o600) {
        eprintln!("portcullis: cannot create private key file {}: {error}", private_key.display());
        return EXIT_USAGE;
    }
    if let Err(error) = write_new_file(public_key, public_pem.as_bytes(), 0o644) {
        eprintln!("portcullis: cannot create public key file {}: {error}", public_key.display());
        return EXIT_USAGE;
    }
    println!("key id {}", signer.key_id());
    println!("private key: {} (set audit.checkpoint.signing_key_file to it)", private_key.display());
    println!("public key:  {} (give it to `portcullis audit verify --public-key`)", public_key.display());
    0
}

fn write_new_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// A place `audit verify` reads records from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordSource {
    /// A JSON-lines file: a file-mode event file, or records exported from Kafka.
    File(PathBuf),
    /// A spool folder; its segments are read in sequence order.
    Spool(PathBuf),
    /// A Kafka topic, read over plaintext from the earliest offset of every partition up to
    /// the end offsets at the start of the read. Positions read `TOPIC-PARTITION:OFFSET`.
    Kafka { bootstrap_servers: String, topic: String },
}

/// Bound of reading a whole Kafka topic for `audit verify`.
const KAFKA_READ_TIMEOUT: Duration = Duration::from_secs(300);

impl RecordSource {
    /// Picks the source kind of a command-line path.
    pub fn from_path(path: &Path) -> RecordSource {
        if path.is_dir() { RecordSource::Spool(path.to_owned()) } else { RecordSource::File(path.to_owned()) }
    }

    /// Feeds every record line of the source to `verifier`.
    pub fn read_into(&self, verifier: &mut ChainVerifier) -> Result<(), String> {
        match self {
            RecordSource::File(path) => {
                let file = std::fs::File::open(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                let source = path.display().to_string();
                for (index, line) in BufReader::new(file).split(b'\n').enumerate() {
                    let line = line.map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                    if line.is_empty() {
                        continue;
                    }
                    verifier.push(Position { source: source.clone(), line: index as u64 + 1 }, &line);
                }
                Ok(())
            }
            RecordSource::Spool(dir) => {
                if !is_spool_dir(dir) {
                    return Err(format!("{} is not a spool folder: it has no segment-*.jsonl files", dir.display()));
                }
                let files = read_spool_lines(dir).map_err(|error| format!("cannot read spool {}: {error}", dir.display()))?;
                for (path, lines) in files {
                    let source = path.display().to_string();
                    for (index, line) in lines.into_iter().enumerate() {
                        verifier.push(Position { source: source.clone(), line: index as u64 + 1 }, &line);
                    }
                }
                Ok(())
            }
            RecordSource::Kafka { bootstrap_servers, topic } => {
                let servers = bootstrap_servers.split(',').map(|server| server.trim().to_owned()).collect();
                let connection = portcullis_kafka::ConnectionSettings::new(servers);
                let messages = portcullis_kafka::read_topic(&connection, topic, KAFKA_READ_TIMEOUT)
                    .map_err(|error| format!("cannot read Kafka topic {topic:?} from {bootstrap_servers}: {error}"))?;
                for message in messages {
                    let source = format!("{topic}-{}", message.partition);
                    verifier.push(Position { source, line: message.offset as u64 }, &message.payload);
                }
                Ok(())
            }
        }
    }
}

/// `portcullis audit verify`: exits 0 when every chain is whole, 1 when a problem is found,
/// 64 when a key or input cannot be read.
pub fn verify(public_keys: &[PathBuf], json: bool, sources: &[RecordSource]) -> u8 {
    let mut keys = Vec::new();
    for path in public_keys {
        match read_public_key(path) {
            Ok(key) => keys.push(key),
            Err(error) => {
                eprintln!("portcullis: {error}");
                return EXIT_USAGE;
            }
        }
    }

    let mut verifier = ChainVerifier::new(&keys);
    for source in sources {
        if let Err(message) = source.read_into(&mut verifier) {
            eprintln!("portcullis: {message}");
            return EXIT_USAGE;
        }
    }
    let report = verifier.finish();

    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("portcullis: cannot encode the report: {error}");
                return crate::EXIT_FAILURE;
            }
        }
    } else {
        print!("{}", human_report(&report));
    }
    if report.is_whole() { 0 } else { EXIT_PROBLEM }
}

/// Renders a report for people: one line per chain, then one per unreadable line.
pub fn human_report(report: &Report) -> String {
    let mut text = String::new();
    for chain in &report.chains {
        let summary = format!(
            "{} records (sequence {} to {}), {} checkpoints",
            chain.records, chain.first_sequence, chain.last_sequence, chain.checkpoints
        );
        let keys = if chain.key_ids.is_empty() { String::new() } else { format!(" signed by {}", chain.key_ids.join(", ")) };
        let duplicates = if chain.duplicates > 0 { format!(", {} exact duplicates ignored", chain.duplicates) } else { String::new() };
        match &chain.problem {
            None => text.push_str(&format!("chain {}: whole: {summary}{keys}{duplicates}\n", chain.instance_id)),
            Some(problem) => text.push_str(&format!(
                "chain {}: PROBLEM ({}): {problem}\n  verified before it: {summary}{keys}{duplicates}\n",
                chain.instance_id,
                problem.kind()
            )),
        }
    }
    for problem in &report.unreadable {
        text.push_str(&format!("PROBLEM ({}): {problem}\n", problem.kind()));
    }
    let broken = report.chains.iter().filter(|chain| chain.problem.is_some()).count();
    text.push_str(&format!(
        "{} chains, {broken} with a problem, {} unreadable lines\n",
        report.chains.len(),
        report.unreadable.len()
    ));
    text
}
