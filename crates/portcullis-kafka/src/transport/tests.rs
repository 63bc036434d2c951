use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::types::RDKafkaConfRes;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::*;

const DEADLINE: Duration = Duration::from_millis(1500);

#[test]
fn message_timeout_maps_to_timed_out() {
    let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);

    assert_eq!(transport_error(&error, None, DEADLINE), TransportError::TimedOut(DEADLINE));
}

#[test]
fn broker_rejection_maps_to_retriable() {
    let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);

    let mapped = transport_error(&error, None, DEADLINE);

    assert!(matches!(mapped, TransportError::Retriable(_)), "{mapped:?}");
}

#[test]
fn queue_full_and_purge_map_to_retriable() {
    for code in [RDKafkaErrorCode::QueueFull, RDKafkaErrorCode::PurgeQueue, RDKafkaErrorCode::PurgeInflight] {
        let mapped = transport_error(&KafkaError::MessageProduction(code), None, DEADLINE);

        assert!(matches!(mapped, TransportError::Retriable(_)), "{code:?} mapped to {mapped:?}");
    }
}

#[test]
fn fatal_code_maps_to_fatal() {
    let error = KafkaError::MessageProduction(RDKafkaErrorCode::Fatal);

    let mapped = transport_error(&error, None, DEADLINE);

    assert!(matches!(mapped, TransportError::Fatal(_)), "{mapped:?}");
}

#[test]
fn fatal_producer_overrides_record_code() {
    let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);

    let mapped = transport_error(&error, Some("producer fenced"), DEADLINE);

    assert_eq!(mapped, TransportError::Fatal("the Kafka producer failed fatally: producer fenced".to_owned()));
}

#[test]
fn client_config_error_hides_the_value() {
    let error = KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_INVALID, "bad value".to_owned(), "sasl.password".to_owned(), "hunter2".to_owned());

    let setup = client_error(error);

    assert_eq!(setup, SetupError::Client("invalid property sasl.password: bad value".to_owned()));
}

/// Returns `127.0.0.1:PORT` of a port that was just bound and released, so that connections
/// to it are refused and nothing is ever delivered.
fn unreachable_broker() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    address.to_string()
}

fn record(sequence: u64) -> Record {
    Record { instance_id: Arc::from("instance-a"), sequence, bytes: Bytes::from(format!("record {sequence}")) }
}

#[tokio::test]
async fn send_without_broker_times_out_at_deadline() {
    let mut settings = KafkaSettings::new(vec![unreachable_broker()], "audit");
    settings.delivery_timeout = Duration::from_millis(400);
    let transport = KafkaTransport::new(settings, None).expect("building the transport");

    let started = std::time::Instant::now();
    let result = transport.send(&record(1)).await;
    let elapsed = started.elapsed();

    assert_eq!(result, Err(TransportError::TimedOut(Duration::from_millis(400))));
    assert!(elapsed >= Duration::from_millis(390), "failed early, after {elapsed:?}");
    assert!(elapsed < Duration::from_millis(900), "failed late, after {elapsed:?}");
}

#[tokio::test]
async fn full_queue_fails_waiting_records_after_bound() {
    let mut settings = KafkaSettings::new(vec![unreachable_broker()], "audit");
    settings.delivery_timeout = Duration::from_secs(1);
    settings.queue_full_timeout = Duration::from_millis(200);
    settings.max_queued_messages = 2;
    let transport = KafkaTransport::new(settings, None).expect("building the transport");
    let started = std::time::Instant::now();

    let sends: Vec<_> = (1..=5)
        .map(|sequence| {
            let send = transport.send(&record(sequence));
            async move {
                let result = send.await;
                (result, started.elapsed())
            }
        })
        .collect();
    let outcomes = futures::future::join_all(sends).await;

    let full = TransportError::Retriable("the local Kafka queue stayed full for 200ms".to_owned());
    let results: Vec<&TransportError> = outcomes.iter().map(|(result, _)| result.as_ref().expect_err("nothing can be delivered")).collect();
    assert_eq!(results, vec![&TransportError::TimedOut(Duration::from_secs(1)), &TransportError::TimedOut(Duration::from_secs(1)), &full, &full, &full]);
    for (_, elapsed) in &outcomes[2..] {
        assert!(*elapsed >= Duration::from_millis(190), "a waiting record failed early, after {elapsed:?}");
        assert!(*elapsed < Duration::from_millis(700), "a waiting record failed late, after {elapsed:?}");
    }
}

#[tokio::test]
async fn flush_times_out_while_records_are_undelivered() {
    let mut settings = KafkaSettings::new(vec![unreachable_broker()], "audit");
    settings.delivery_timeout = Duration::from_secs(1);
    let transport = KafkaTransport::new(settings, None).expect("building the transport");
    let _pending = transport.send(&record(1));

    let result = transport.flush(Duration::from_millis(200)).await;

    assert_eq!(result, Err(TransportError::TimedOut(Duration::from_millis(200))));
}

#[tokio::test]
async fn rebuild_with_missing_password_file_keeps_producer() {
    let mut settings = KafkaSettings::new(vec![unreachable_broker()], "audit");
    let folder = tempfile::tempdir().expect("temporary folder");
    let password_file = folder.path().join("password");
    std::fs::write(&password_file, "secret\n").expect("writing the password file");
    settings.connection.sasl =
        Some(crate::SaslSettings { mechanism: crate::SaslMechanism::Plain, username: "audit".to_owned(), password_file: password_file.clone() });
    let transport = KafkaTransport::new(settings, None).expect("building the transport");
    std::fs::remove_file(&password_file).expect("removing the password file");

    let error = transport.rebuild().await.expect_err("a rebuild without password passed");

    assert!(matches!(error, SetupError::PasswordFile { ref path, .. } if *path == password_file), "{error}");
    assert!(transport.shared.lock().producer.is_some(), "the old producer must stay");
}

/// Counts rebuilds by reason.
#[derive(Default)]
struct RecordingObserver {
    reasons: std::sync::Mutex<Vec<RebuildReason>>,
}

impl RebuildObserver for RecordingObserver {
    fn producer_rebuilt(&self, event: &RebuildEvent) {
        self.reasons.lock().expect("observer lock").push(event.reason.clone());
    }
}

fn self_signed_pem() -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["portcullis.test".to_owned()]).expect("generating a certificate");
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

#[tokio::test]
async fn installed_client_certificate_rebuilds_producer() {
    let certificate = crate::RotatingClientCertificate::new();
    let mut settings = KafkaSettings::new(vec![unreachable_broker()], "audit");
    settings.delivery_timeout = Duration::from_millis(400);
    settings.connection.tls = Some(crate::TlsSettings { rotating_certificate: Some(certificate.clone()), ..crate::TlsSettings::default() });
    let observer = Arc::new(RecordingObserver::default());
    let transport = KafkaTransport::new(settings.clone(), Some(Arc::clone(&observer) as _)).expect("building the transport");
    let before = settings.connection.client_config().expect("client configuration");
    assert_eq!(before.get("ssl.certificate.pem"), None);

    let (first_chain, first_key) = self_signed_pem();
    certificate.install(first_chain.clone(), first_key.clone());
    wait_for_rebuilds(&observer, 1).await;
    let (second_chain, second_key) = self_signed_pem();
    certificate.install(second_chain.clone(), second_key);
    wait_for_rebuilds(&observer, 2).await;

    assert_eq!(*observer.reasons.lock().expect("observer lock"), vec![RebuildReason::CertificateRotated, RebuildReason::CertificateRotated]);
    let after = settings.connection.client_config().expect("client configuration");
    assert_eq!(after.get("ssl.certificate.pem"), Some(second_chain.as_str()));
    assert!(transport.shared.lock().producer.is_some(), "a producer must be in place");
    assert!(!format!("{settings:?}").contains("PRIVATE KEY"), "Debug output shows the private key");
}

async fn wait_for_rebuilds(observer: &RecordingObserver, count: usize) {
    for _ in 0..500 {
        if observer.reasons.lock().expect("observer lock").len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the producer was not rebuilt {count} times within 5 s");
}
