//! Tests of the Kafka audit transport and the topic reader against a real single-node Kafka
//! 4.x broker on 127.0.0.1, one broker per test.
//!
//! Each test skips with a `SKIPPED:` line when Kafka cannot be installed or Java cannot be run,
//! unless `PORTCULLIS_REQUIRE_PEERS=1`.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use portcullis_audit::{Record, Transport, TransportError};
use portcullis_e2e::kafka::{Kafka, KafkaMtls, KafkaOptions};
use portcullis_kafka::{
    ConnectionSettings, KafkaSettings, KafkaTransport, ReadError, RebuildEvent, RebuildObserver, RebuildReason,
    RotatingClientCertificate, SaslMechanism, SaslSettings, TlsSettings, TopicMessage, read_topic,
};

const TOPIC: &str = "audit";

/// Bound of every topic read; a few hundred records take well under a second.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound of the wait for the first acknowledged record after the broker (re)starts, which
/// includes librdkafka's reconnect backoff and the broker's leader election.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);


fn record(instance: &str, sequence: u64) -> Record {
    Record {
        instance_id: Arc::from(instance),
        sequence,
        bytes: Bytes::from(format!(r#"{{"instance":"{instance}","sequence":{sequence},"decision":"allow"}}"#)),
    }
}

/// Writes a figure line to the process's stderr, which libtest does not capture.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Groups the messages by key, keeping their order in the topic.
fn messages_by_key(messages: &[TopicMessage]) -> BTreeMap<String, Vec<&TopicMessage>> {
    let mut by_key: BTreeMap<String, Vec<&TopicMessage>> = BTreeMap::new();
    for message in messages {
        let key = String::from_utf8(message.key.clone().expect("every audit message has a key")).expect("UTF-8 key");
        by_key.entry(key).or_default().push(message);
    }
    by_key
}

/// Sends records until one is acknowledged, proving the transport reaches the broker.
async fn send_until_acknowledged(transport: &KafkaTransport, instance: &str, sequence: u64) -> Duration {
    let started = Instant::now();
    loop {
        match transport.send(&record(instance, sequence)).await {
            Ok(()) => return started.elapsed(),
            Err(error) if started.elapsed() < RECONNECT_TIMEOUT => {
                report(&format!("waiting for the broker: {error}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("no record acknowledged within {RECONNECT_TIMEOUT:?}: {error}"),
        }
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

async fn read_all(connection: &ConnectionSettings, topic: &str) -> Result<Vec<TopicMessage>, ReadError> {
    let connection = connection.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&connection, &topic, READ_TIMEOUT)).await.expect("the reader thread panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_arrive_once_in_order_per_instance() {
    let test = "records_arrive_once_in_order_per_instance";
    let Some(kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else { return };
    kafka.create_topic(TOPIC, 3).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    kafka.create_topic("empty", 2).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}"));
    let settings = KafkaSettings::new(vec![kafka.bootstrap_servers()], TOPIC);
    let transport = KafkaTransport::new(settings.clone(), None).expect("building the transport failed");
    send_until_acknowledged(&transport, "warm-up", 1).await;

    // Interleaved records of four instances, all queued before any acknowledgement is awaited.
    let instances = ["instance-a", "instance-b", "instance-c", "instance-d"];
    let per_instance = 60;
    let mut pending = FuturesOrdered::new();
    for sequence in 1..=per_instance {
        for instance in instances {
            pending.push_back(transport.send(&record(instance, sequence)));
        }
    }
    let results: Vec<Result<(), TransportError>> = pending.collect().await;
    assert!(results.iter().all(Result::is_ok), "failed sends: {:?}", results.iter().filter(|result| result.is_err()).collect::<Vec<_>>());
    transport.flush(Duration::from_secs(5)).await.expect("flush failed");

    // A local queue of four records: the rest wait for room, in order, and all arrive.
    let mut small_queue = settings.clone();
    small_queue.max_queued_messages = 4;
    small_queue.queue_full_timeout = Duration::from_secs(2);
    small_queue.delivery_timeout = Duration::from_secs(5);
    let small_queue_transport = KafkaTransport::new(small_queue, None).expect("building the transport failed");
    let sends: Vec<_> = (1..=200).map(|sequence| small_queue_transport.send(&record("instance-small-queue", sequence))).collect();
    let results = futures::future::join_all(sends).await;
    assert_eq!(results.iter().filter(|result| result.is_err()).count(), 0, "failed sends through a small queue: {results:?}");

    // Delivery lag of awaited sends, one at a time, as checks wait for them.
    let mut lags = Vec::new();
    for sequence in 1..=300 {
        let started = Instant::now();
        transport.send(&record("instance-lag", sequence)).await.expect("send failed");
        lags.push(started.elapsed());
    }
    lags.sort();
    let (p50, p99, max) = (percentile(&lags, 0.50), percentile(&lags, 0.99), lags[lags.len() - 1]);
    report(&format!("{test}: delivery lag of 300 awaited sends on a local broker: p50 {p50:?}, p99 {p99:?}, max {max:?}"));

    let messages = read_all(&settings.connection, TOPIC).await.expect("reading the topic failed");
    let by_key = messages_by_key(&messages);
    assert_eq!(messages.len(), 1 + instances.len() * per_instance as usize + 200 + 300, "every record arrives exactly once");
    for instance in instances {
        let instance_messages = &by_key[instance];
        let payloads: Vec<&[u8]> = instance_messages.iter().map(|message| message.payload.as_slice()).collect();
        let expected: Vec<Bytes> = (1..=per_instance).map(|sequence| record(instance, sequence).bytes).collect();
        let expected: Vec<&[u8]> = expected.iter().map(|bytes| bytes.as_ref()).collect();
        assert_eq!(payloads, expected, "records of {instance} in topic order");
        assert!(instance_messages.iter().all(|message| message.partition == instance_messages[0].partition), "{instance} spans partitions");
    }
    assert_eq!(by_key["instance-lag"].len(), 300);
    let small_queue_sequences: Vec<u64> = by_key["instance-small-queue"].iter().map(|message| sequence_of(&message.payload)).collect();
    assert_eq!(small_queue_sequences, (1..=200).collect::<Vec<u64>>(), "records that waited for room keep their order");
    for pair in messages.windows(2) {
        assert!(
            (pair[0].partition, pair[0].offset) < (pair[1].partition, pair[1].offset),
            "the reader returns partition then offset order without repeats"
        );
    }

    // An empty topic reads as no messages, and a missing one as an error that names it.
    assert_eq!(read_all(&settings.connection, "empty").await.expect("reading an empty topic failed"), vec![]);
    let missing = read_all(&settings.connection, "no-such-topic").await.expect_err("a missing topic was read");
    assert!(matches!(missing, ReadError::TopicNotFound { ref topic, .. } if topic == "no-such-topic"), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_times_out_then_recovers() {
    let test = "broker_outage_times_out_then_recovers";
    let Some(mut kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else { return };
    kafka.create_topic(TOPIC, 1).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let mut settings = KafkaSettings::new(vec![kafka.bootstrap_servers()], TOPIC);
    let deadline = Duration::from_millis(1500);
    settings.delivery_timeout = deadline;
    let transport = KafkaTransport::new(settings.clone(), None).expect("building the transport failed");
    send_until_acknowledged(&transport, "instance-a", 1).await;

    kafka.stop().await.expect("stopping Kafka failed");
    for sequence in 2..=4 {
        let started = Instant::now();
        let result = transport.send(&record("instance-a", sequence)).await;
        let elapsed = started.elapsed();

        report(&format!("{test}: send {sequence} with the broker stopped failed after {elapsed:?}: {result:?}"));
        assert_eq!(result, Err(TransportError::TimedOut(deadline)));
        assert!(elapsed >= deadline - Duration::from_millis(50), "failed before the deadline: {elapsed:?}");
        assert!(elapsed < deadline + Duration::from_secs(2), "send waited {elapsed:?} for a {deadline:?} deadline");
    }
    let flushed = transport.flush(Duration::from_millis(300)).await;
    assert!(matches!(flushed, Ok(()) | Err(TransportError::TimedOut(_))), "{flushed:?}");

    kafka.start_again().await.unwrap_or_else(|error| panic!("starting Kafka again failed: {error}"));
    let reconnect = send_until_acknowledged(&transport, "instance-a", 5).await;
    report(&format!("{test}: first acknowledgement {reconnect:?} after the broker was ready again"));
    for sequence in 6..=20 {
        transport.send(&record("instance-a", sequence)).await.unwrap_or_else(|error| panic!("send {sequence} after the restart failed: {error}"));
    }

    let messages = read_all(&settings.connection, TOPIC).await.expect("reading the topic failed");
    let sequences: Vec<u64> = messages.iter().map(|message| sequence_of(&message.payload)).collect();
    // Sequences 2 to 4 timed out and may or may not have reached the log. Only the
    // acknowledged ones are required, in order.
    let acknowledged: Vec<u64> = sequences.iter().copied().filter(|sequence| !(2..=4).contains(sequence)).collect();
    assert_eq!(acknowledged, [1].into_iter().chain(5..=20).collect::<Vec<u64>>());
}

#[derive(Default)]
struct RecordingObserver {
    events: Mutex<Vec<RebuildEvent>>,
}

impl RebuildObserver for RecordingObserver {
    fn producer_rebuilt(&self, event: &RebuildEvent) {
        self.events.lock().expect("observer lock").push(event.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_load_loses_no_acknowledged_record() {
    let test = "rebuild_under_load_loses_no_acknowledged_record";
    let Some(kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else { return };
    kafka.create_topic(TOPIC, 2).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let settings = KafkaSettings::new(vec![kafka.bootstrap_servers()], TOPIC);
    let observer = Arc::new(RecordingObserver::default());
    let transport = KafkaTransport::new(settings.clone(), Some(observer.clone() as Arc<dyn RebuildObserver>)).expect("building the transport failed");
    send_until_acknowledged(&transport, "instance-a", 1).await;

    // One sender keeps up to 32 records in flight while the producer is replaced three times
    // on request and once after a fatal error.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let transport = transport.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut failed = Vec::new();
            let mut pending = FuturesOrdered::new();
            let mut sequence = 1;
            while !stop.load(Ordering::Relaxed) || !pending.is_empty() {
                if !stop.load(Ordering::Relaxed) && pending.len() < 32 {
                    sequence += 1;
                    let send = transport.send(&record("instance-a", sequence));
                    pending.push_back(async move { (sequence, send.await) });
                    continue;
                }
                if let Some((sequence, result)) = pending.next().await {
                    match result {
                        Ok(()) => acknowledged.push(sequence),
                        Err(error) => {
                            failed.push((sequence, error));
                            // As the pipeline would, instead of spinning on a failed producer.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            (acknowledged, failed)
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        transport.rebuild().await.expect("rebuild failed");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(transport.danger_raise_fatal_error("test: producer fenced"), "raising a fatal error failed");
    let fatal_raised = Instant::now();
    while observer.events.lock().expect("observer lock").len() < 4 && fatal_raised.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let replaced_after = fatal_raised.elapsed();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let (acknowledged, failed) = sender.await.expect("the sender panicked");
    report(&format!("{test}: producer replaced {replaced_after:?} after the fatal error"));

    let events = observer.events.lock().expect("observer lock").clone();
    report(&format!(
        "{test}: {} records acknowledged, {} failed; rebuilds: {events:?}; failures: {:?}",
        acknowledged.len(),
        failed.len(),
        failed.iter().map(|(_, error)| error.to_string()).collect::<std::collections::BTreeSet<_>>()
    ));
    assert_eq!(events.len(), 4, "three requested rebuilds and one after the fatal error: {events:?}");
    assert_eq!(events[..3].iter().map(|event| &event.reason).collect::<Vec<_>>(), vec![&RebuildReason::Requested; 3]);
    assert!(matches!(&events[3].reason, RebuildReason::FatalError(reason) if reason.contains("test: producer fenced")), "{:?}", events[3]);
    assert!(events.iter().all(|event| event.undelivered == 0), "records left in a replaced producer: {events:?}");
    assert!(
        failed.iter().all(|(_, error)| matches!(error, TransportError::Fatal(_))),
        "only the fatal error may fail records: {failed:?}"
    );
    assert!(acknowledged.len() > 100, "only {} records acknowledged", acknowledged.len());
    send_until_acknowledged(&transport, "instance-a", 1_000_000).await;

    let messages = read_all(&settings.connection, TOPIC).await.expect("reading the topic failed");
    let topic_sequences: Vec<u64> = messages.iter().map(|message| sequence_of(&message.payload)).collect();
    let held_set: HashSet<u64> = topic_sequences.iter().copied().collect();
    let acknowledged_set: HashSet<u64> = acknowledged.iter().copied().collect();
    let missing: Vec<u64> = acknowledged.iter().copied().filter(|sequence| !held_set.contains(sequence)).collect();
    assert_eq!(missing, Vec::<u64>::new(), "acknowledged records missing from the topic");
    let acknowledged_in_topic_order: Vec<u64> = topic_sequences.iter().copied().filter(|sequence| acknowledged_set.contains(sequence)).collect();
    assert_eq!(acknowledged_in_topic_order, acknowledged, "acknowledged records keep their order");
}

fn sequence_of(payload: &[u8]) -> u64 {
    let value: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    value["sequence"].as_u64().expect("a sequence number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_authenticates_with_password_file() {
    let test = "sasl_plain_authenticates_with_password_file";
    let options = KafkaOptions { sasl_plain_users: vec![("portcullis".to_owned(), "audit-secret".to_owned())], mtls: None };
    let Some(kafka) = Kafka::start_or_skip(test, options).await else { return };
    kafka.create_topic(TOPIC, 1).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let folder = tempfile::tempdir().expect("temporary folder");
    let right_password = folder.path().join("right");
    let wrong_password = folder.path().join("wrong");
    std::fs::write(&right_password, "audit-secret\n").expect("writing the password file");
    std::fs::write(&wrong_password, "not-the-secret\n").expect("writing the password file");
    let sasl_servers = kafka.sasl_bootstrap_servers().expect("a SASL listener");
    let settings_with = |password_file| {
        let mut settings = KafkaSettings::new(vec![sasl_servers.clone()], TOPIC);
        settings.delivery_timeout = Duration::from_secs(1);
        settings.connection.sasl = Some(SaslSettings { mechanism: SaslMechanism::Plain, username: "portcullis".to_owned(), password_file });
        settings
    };

    let rejected = KafkaTransport::new(settings_with(wrong_password), None).expect("building the transport failed");
    let result = rejected.send(&record("instance-a", 1)).await;
    assert_eq!(result, Err(TransportError::TimedOut(Duration::from_secs(1))), "a wrong password must not deliver");

    let settings = settings_with(right_password);
    let transport = KafkaTransport::new(settings.clone(), None).expect("building the transport failed");
    send_until_acknowledged(&transport, "instance-a", 2).await;
    let messages = read_all(&settings.connection, TOPIC).await.expect("reading over SASL failed");
    // A send that timed out while the connection was set up stays queued in librdkafka and
    // can arrive besides its retry, so record 2 may be there twice; record 1 must be absent.
    let mut sequences: Vec<u64> = messages.iter().map(|message| sequence_of(&message.payload)).collect();
    sequences.dedup();
    assert_eq!(sequences, vec![2]);
}

fn decision_event(index: u32) -> portcullis_audit::DecisionEvent {
    portcullis_audit::DecisionEvent {
        schema: portcullis_audit::DecisionEvent::SCHEMA,
        event_id: format!("event-{index}"),
        decision_id: format!("decision-{index}"),
        time: "2026-01-01T00:00:00.000000Z".to_owned(),
        request: serde_json::json!({"method": "GET", "path": format!("/open/{index}")}),
        identity: None,
        decision: portcullis_audit::EventDecision { allowed: true, http_status: 200, reason: None },
        policy: portcullis_audit::EventPolicy {
            bundle_revision: "r1".to_owned(),
            bundle_digest: "sha256:0".to_owned(),
            decision_path: "envoy/authz/allow".to_owned(),
        },
        latency_us: 1,
        amends: None,
    }
}

/// Runs `portcullis audit verify` on a Kafka topic and returns its exit code and output.
fn verify_topic(public_key: &std::path::Path, bootstrap_servers: &str, topic: &str) -> (Option<i32>, String) {
    let binary = portcullis_e2e::Portcullis::binary().unwrap_or_else(|error| panic!("{error}"));
    let output = std::process::Command::new(binary)
        .args(["audit", "verify", "--public-key"])
        .arg(public_key)
        .args(["--kafka-bootstrap", bootstrap_servers, "--topic", topic])
        .output()
        .expect("running portcullis audit verify failed");
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_chain_from_kafka_topic() {
    use portcullis_audit::{AckMode, AuditPipeline, CheckpointPolicy, CheckpointSigner, DecisionSink, NoAuditObserver, PipelineConfig};

    let test = "verify_reads_chain_from_kafka_topic";
    let Some(kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else { return };
    kafka.create_topic(TOPIC, 2).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    kafka.create_topic("warm-up", 1).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}"));
    let folder = tempfile::tempdir().expect("temporary folder");
    let signer = CheckpointSigner::generate().expect("generating a signing key");
    let key_id = signer.key_id().to_owned();
    let public_key = folder.path().join("audit.pub.pem");
    std::fs::write(&public_key, signer.public_key_pem().expect("public key PEM")).expect("writing the public key");
    let settings = KafkaSettings::new(vec![kafka.bootstrap_servers()], TOPIC);
    let transport = Arc::new(KafkaTransport::new(settings.clone(), None).expect("building the transport failed"));
    // Waits for the broker on another topic, which keeps the audit topic free of other records.
    let warm_up = KafkaTransport::new(KafkaSettings::new(vec![kafka.bootstrap_servers()], "warm-up"), None).expect("building the transport failed");
    send_until_acknowledged(&warm_up, "warm-up", 1).await;

    // The kafka mode of the pipeline: each event is acknowledged by Kafka before it returns.
    let mut config = PipelineConfig::new("pod-a");
    config.ack = AckMode::Remote;
    config.checkpoints = CheckpointPolicy { every: 10, interval: Duration::from_secs(3600), signer: Some(Arc::new(signer)) };
    let pipeline = AuditPipeline::start(config, Some(transport.clone() as Arc<dyn Transport>), Arc::new(NoAuditObserver)).expect("starting the pipeline failed");
    for index in 0..25 {
        pipeline.record(&decision_event(index)).await.unwrap_or_else(|error| panic!("recording event {index} failed: {error}"));
    }
    pipeline.close().await.expect("closing the pipeline failed");

    // A start checkpoint, 25 events with a checkpoint after every 10 records, and the shutdown
    // checkpoint.
    let (code, output) = verify_topic(&public_key, &kafka.bootstrap_servers(), TOPIC);
    assert_eq!(
        output,
        format!("chain pod-a: whole: 29 records (sequence 1 to 29), 4 checkpoints signed by {key_id}\n1 chains, 0 with a problem, 0 unreadable lines\n")
    );
    assert_eq!(code, Some(0));

    // An altered copy of an event, as a tampered broker or a rogue producer would add.
    let messages = read_all(&settings.connection, TOPIC).await.expect("reading the topic failed");
    let original = messages
        .iter()
        .find(|message| String::from_utf8_lossy(&message.payload).contains("/open/7"))
        .expect("event 7 in the topic");
    let altered = String::from_utf8(original.payload.clone()).expect("UTF-8 record").replace("/open/7", "/admin/7");
    let tampered = Record { instance_id: Arc::from("pod-a"), sequence: 0, bytes: Bytes::from(altered) };
    transport.send(&tampered).await.expect("sending the altered record failed");

    let (tampered_code, tampered_output) = verify_topic(&public_key, &kafka.bootstrap_servers(), TOPIC);
    report(&format!("{test}: verify after tampering:\n{tampered_output}"));
    assert_eq!(tampered_code, Some(1), "{tampered_output}");
    assert!(tampered_output.starts_with("chain pod-a: PROBLEM (altered): record 9 at audit-"), "{tampered_output}");
    assert!(tampered_output.contains("was altered: its hash does not match its content"), "{tampered_output}");
}

/// A CA of the mTLS test, able to sign server and client certificates.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("an empty SAN list is valid");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().expect("generating a CA key");
        TestCa { issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("self-signing the CA") }
    }

    /// Returns a certificate and its PKCS#8 key in PEM, for a server on 127.0.0.1 or a client.
    fn issue(&self, common_name: &str, server: bool) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("a valid SAN");
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.extended_key_usages = vec![if server { rcgen::ExtendedKeyUsagePurpose::ServerAuth } else { rcgen::ExtendedKeyUsagePurpose::ClientAuth }];
        let key = rcgen::KeyPair::generate().expect("generating a key");
        let certificate = params.signed_by(&key, &self.issuer).expect("signing the certificate");
        (certificate.pem(), key.serialize_pem())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_certificate_reaches_mtls_broker() {
    let test = "rotated_client_certificate_reaches_mtls_broker";
    let ca = TestCa::new("portcullis test CA");
    let other_ca = TestCa::new("untrusted CA");
    let (server_chain_pem, server_key_pem) = ca.issue("kafka", true);
    let options = KafkaOptions { mtls: Some(KafkaMtls { server_chain_pem, server_key_pem, client_ca_pem: ca.issuer.pem() }), ..KafkaOptions::default() };
    let Some(kafka) = Kafka::start_or_skip(test, options).await else { return };
    kafka.create_topic(TOPIC, 1).await.unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let folder = tempfile::tempdir().expect("temporary folder");
    let ca_file = folder.path().join("kafka-ca.pem");
    std::fs::write(&ca_file, ca.issuer.pem()).expect("writing the CA file");

    let certificate = RotatingClientCertificate::new();
    let (first_chain, first_key) = ca.issue("portcullis-1", false);
    certificate.install(first_chain, first_key);
    let mut settings = KafkaSettings::new(vec![kafka.ssl_bootstrap_servers().expect("an SSL listener")], TOPIC);
    settings.delivery_timeout = Duration::from_secs(2);
    settings.connection.tls = Some(TlsSettings { ca_file: Some(ca_file), rotating_certificate: Some(certificate.clone()), ..TlsSettings::default() });
    let observer = Arc::new(RecordingObserver::default());
    let transport = KafkaTransport::new(settings.clone(), Some(Arc::clone(&observer) as _)).expect("building the transport failed");

    send_until_acknowledged(&transport, "instance-a", 1).await;

    // A certificate from a CA the broker does not trust: the rebuilt producer cannot deliver.
    let (untrusted_chain, untrusted_key) = other_ca.issue("intruder", false);
    certificate.install(untrusted_chain, untrusted_key);
    wait_for_rebuilds(&observer, 1).await;
    let rejected = transport.send(&record("instance-a", 2)).await;
    assert_eq!(rejected, Err(TransportError::TimedOut(Duration::from_secs(2))), "an untrusted client certificate delivered");

    // The next rotation brings a trusted certificate back, and delivery resumes.
    let (second_chain, second_key) = ca.issue("portcullis-2", false);
    certificate.install(second_chain, second_key);
    wait_for_rebuilds(&observer, 2).await;
    let waited = send_until_acknowledged(&transport, "instance-a", 3).await;
    report(&format!("{test}: delivered {} ms after the second rotation", waited.as_millis()));

    let reasons: Vec<RebuildReason> = observer.events.lock().expect("observer lock").iter().map(|event| event.reason.clone()).collect();
    assert_eq!(reasons, vec![RebuildReason::CertificateRotated, RebuildReason::CertificateRotated]);
    let mut plaintext = settings.connection.clone();
    plaintext.bootstrap_servers = vec![kafka.bootstrap_servers()];
    plaintext.tls = None;
    let messages = read_all(&plaintext, TOPIC).await.expect("reading the topic failed");
    // A first send that timed out while the first TLS session was set up may have reached the
    // broker all the same, so record 1 can be there twice; record 2 must be absent.
    let mut sequences: Vec<u64> = messages.iter().map(|message| sequence_of(&message.payload)).collect();
    sequences.dedup();
    assert_eq!(sequences, vec![1, 3]);
}

async fn wait_for_rebuilds(observer: &RecordingObserver, count: usize) {
    for _ in 0..1000 {
        if observer.events.lock().expect("observer lock").len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the producer was not rebuilt {count} times within 10 s");
}
