//! Tests of the Kafka launcher against a real single-node Kafka 4.x broker on 127.0.0.1. Records
//! produced with keys are read back in order. The broker stops cleanly, and the records survive
//! both a graceful restart and a kill followed by a restart on the same data folder.
//!
//! The test skips with a `SKIPPED:` line when Kafka cannot be installed or Java cannot be run,
//! unless `PORTCULLIS_REQUIRE_PEERS=1`.

use std::time::Duration;

use portcullis_e2e::kafka::{ConsumedRecord, Kafka, KafkaError};
use portcullis_e2e::{LaunchError, peers_required, report_skip};
use tokio::net::TcpStream;

const TEST_NAME: &str = "kafka_records_survive_restart";

const TOPIC: &str = "audit-events";

/// Idle time after which the console consumer stops. The three records arrive well within it.
const CONSUMER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_records_survive_restart() {
    let mut kafka = match Kafka::start().await {
        Ok(kafka) => kafka,
        Err(LaunchError::Unavailable { peer, reason }) if !peers_required() => {
            report_skip(TEST_NAME, &format!("{peer} is not available: {reason}"));
            return;
        }
        Err(error) => panic!("{TEST_NAME}: starting Kafka failed: {error}"),
    };
    let records = [
        ("decision-1", r#"{"decision":"allow","path":"/public/a"}"#),
        ("decision-2", r#"{"decision":"deny","path":"/admin"}"#),
        ("decision-1", r#"{"decision":"allow","path":"/public/b"}"#),
    ];
    let expected: Vec<ConsumedRecord> = records
        .iter()
        .map(|(key, value)| ConsumedRecord::new(key, value))
        .collect();

    kafka
        .create_topic(TOPIC, 1)
        .await
        .unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    kafka
        .produce(TOPIC, &records)
        .await
        .unwrap_or_else(|error| panic!("producing failed: {error}\n{}", kafka.log_tail()));

    let consumed = kafka
        .consume(TOPIC, CONSUMER_IDLE_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("consuming failed: {error}\n{}", kafka.log_tail()));
    assert_eq!(consumed, expected, "records read before the restart");

    let address = kafka.broker_address();
    kafka.stop().await.expect("stopping Kafka failed");
    assert!(!kafka.is_running());
    let connection = TcpStream::connect(address).await;
    assert!(
        connection.is_err(),
        "{address} still accepts connections after stop"
    );

    kafka
        .start_again()
        .await
        .unwrap_or_else(|error| panic!("starting Kafka again failed: {error}"));
    let consumed = kafka
        .consume(TOPIC, CONSUMER_IDLE_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("consuming failed: {error}\n{}", kafka.log_tail()));
    assert_eq!(consumed, expected, "records read after the restart");

    kafka.kill();
    assert!(!kafka.is_running());
    assert!(
        TcpStream::connect(address).await.is_err(),
        "{address} still accepts connections after kill"
    );

    kafka
        .start_again()
        .await
        .unwrap_or_else(|error| panic!("starting Kafka after kill failed: {error}"));
    let consumed = kafka
        .consume(TOPIC, CONSUMER_IDLE_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("consuming failed: {error}\n{}", kafka.log_tail()));
    assert_eq!(consumed, expected, "records read after kill and restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_producing_to_missing_topic_fails() {
    let test_name = "kafka_producing_to_missing_topic_fails";
    let kafka = match Kafka::start().await {
        Ok(kafka) => kafka,
        Err(LaunchError::Unavailable { peer, reason }) if !peers_required() => {
            report_skip(test_name, &format!("{peer} is not available: {reason}"));
            return;
        }
        Err(error) => panic!("{test_name}: starting Kafka failed: {error}"),
    };

    let result = kafka.produce("no-such-topic", &[("k1", "v1")]).await;

    let error = result.expect_err(
        "producing to a topic that was never created succeeded, so topics are auto-created",
    );
    let KafkaError::SendFailed { first_error, .. } = &error else {
        panic!("expected a failed send, got: {error}");
    };
    assert!(
        first_error.contains("no-such-topic"),
        "the first logged error does not name the topic: {first_error}"
    );
}
