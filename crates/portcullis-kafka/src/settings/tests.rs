use std::path::PathBuf;
use std::time::Duration;

use super::*;

fn valid() -> KafkaSettings {
    KafkaSettings::new(vec!["127.0.0.1:9092".to_owned()], "audit")
}

fn settings_of(problems: Vec<SettingsProblem>) -> Vec<&'static str> {
    problems.iter().map(|problem| problem.setting).collect()
}

#[test]
fn defaults_are_valid() {
    assert_eq!(valid().validate(), Ok(()));
    assert_eq!(valid().delivery_timeout, Duration::from_secs(2));
    assert_eq!(valid().connection.client_id, "portcullis");
}

#[test]
fn every_invalid_setting_is_reported() {
    let mut settings = valid();
    settings.connection.bootstrap_servers = vec!["kafka".to_owned(), "kafka:0".to_owned(), ":9092".to_owned()];
    settings.connection.client_id = "has space".to_owned();
    settings.topic = "audit/events".to_owned();
    settings.delivery_timeout = Duration::from_millis(50);
    settings.linger = Duration::from_millis(60);
    settings.queue_full_timeout = Duration::from_secs(1);
    settings.max_queued_messages = 0;
    settings.max_queued_bytes = 0;

    let problems = settings.validate().expect_err("invalid settings passed");

    assert_eq!(
        settings_of(problems),
        vec![
            "bootstrap_servers",
            "bootstrap_servers",
            "bootstrap_servers",
            "client_id",
            "topic",
            "delivery_timeout",
            "linger",
            "queue_full_timeout",
            "max_queued_messages",
            "max_queued_bytes",
        ]
    );
}

#[test]
fn broker_address_messages_name_the_address() {
    let mut settings = valid();
    settings.connection.bootstrap_servers = vec!["kafka".to_owned()];

    let problems = settings.validate().expect_err("an address without a port passed");

    assert_eq!(
        problems[0].to_string(),
        "bootstrap_servers: invalid broker address \"kafka\": no port; write HOST:PORT such as kafka-0.kafka:9092"
    );
}

#[test]
fn empty_broker_list_is_rejected() {
    let mut settings = valid();
    settings.connection.bootstrap_servers.clear();

    let problems = settings.validate().expect_err("no brokers passed");

    assert_eq!(problems[0].to_string(), "bootstrap_servers: no broker; list at least one HOST:PORT");
}

#[test]
fn ipv6_broker_address_is_accepted() {
    let mut settings = valid();
    settings.connection.bootstrap_servers = vec!["[::1]:9092".to_owned()];

    assert_eq!(settings.validate(), Ok(()));
}

#[test]
fn client_certificate_needs_its_key() {
    let mut settings = valid();
    settings.connection.tls = Some(TlsSettings { ca_file: None, cert_file: Some(PathBuf::from("client.pem")), key_file: None, rotating_certificate: None });

    let problems = settings.validate().expect_err("a certificate without key passed");

    assert_eq!(settings_of(problems), vec!["tls"]);
}

#[test]
fn producer_config_sets_durability_and_deadlines() {
    let mut settings = valid();
    settings.delivery_timeout = Duration::from_millis(1500);
    settings.linger = Duration::from_millis(3);
    settings.max_queued_bytes = 1025;

    let config = settings.producer_config().expect("config");

    assert_eq!(config.get("acks"), Some("all"));
    assert_eq!(config.get("enable.idempotence"), Some("true"));
    assert_eq!(config.get("message.timeout.ms"), Some("0"));
    assert_eq!(config.get("enable.gapless.guarantee"), Some("true"));
    assert_eq!(config.get("request.timeout.ms"), Some("1500"));
    assert_eq!(config.get("linger.ms"), Some("3"));
    assert_eq!(config.get("queue.buffering.max.kbytes"), Some("2"));
    assert_eq!(config.get("security.protocol"), Some("plaintext"));
    assert_eq!(config.get("client.id"), Some("portcullis"));
}

#[test]
fn security_protocol_follows_tls_and_sasl() {
    let mut connection = ConnectionSettings::new(vec!["127.0.0.1:9092".to_owned()]);
    let sasl = SaslSettings { mechanism: SaslMechanism::ScramSha512, username: "audit".to_owned(), password_file: PathBuf::from("pw") };

    assert_eq!(connection.security_protocol(), "plaintext");
    connection.sasl = Some(sasl);
    assert_eq!(connection.security_protocol(), "sasl_plaintext");
    connection.tls = Some(TlsSettings::default());
    assert_eq!(connection.security_protocol(), "sasl_ssl");
    connection.sasl = None;
    assert_eq!(connection.security_protocol(), "ssl");
}

#[test]
fn sasl_password_is_read_from_its_file() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let password_file = folder.path().join("password");
    std::fs::write(&password_file, "s3cret-value\n").expect("write password");
    let mut connection = ConnectionSettings::new(vec!["127.0.0.1:9092".to_owned()]);
    connection.sasl = Some(SaslSettings { mechanism: SaslMechanism::ScramSha256, username: "audit".to_owned(), password_file });

    let config = connection.client_config().expect("config");

    assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
    assert_eq!(config.get("sasl.username"), Some("audit"));
    assert_eq!(config.get("sasl.password"), Some("s3cret-value"));
    assert!(!format!("{connection:?}").contains("s3cret"));
}

#[test]
fn missing_or_empty_password_file_is_an_error() {
    let folder = tempfile::tempdir().expect("temporary folder");
    let empty = folder.path().join("empty");
    std::fs::write(&empty, "\n").expect("write password");
    let mut connection = ConnectionSettings::new(vec!["127.0.0.1:9092".to_owned()]);

    connection.sasl = Some(SaslSettings { mechanism: SaslMechanism::Plain, username: "audit".to_owned(), password_file: empty.clone() });
    let error = connection.client_config().expect_err("an empty password passed");
    assert_eq!(error, SetupError::PasswordFile { path: empty, reason: "the file is empty".to_owned() });

    let missing = folder.path().join("missing");
    connection.sasl = Some(SaslSettings { mechanism: SaslMechanism::Plain, username: "audit".to_owned(), password_file: missing.clone() });
    let error = connection.client_config().expect_err("a missing file passed");
    assert!(matches!(error, SetupError::PasswordFile { ref path, .. } if *path == missing), "{error}");
}

#[test]
fn password_debug_is_redacted() {
    assert_eq!(format!("{:?}", Password("hunter2".to_owned())), "Password(<redacted>)");
}

#[test]
fn sasl_mechanism_names_round_trip() {
    for name in SaslMechanism::NAMES {
        assert_eq!(SaslMechanism::from_name(name).map(SaslMechanism::name), Some(*name));
    }
    assert_eq!(SaslMechanism::from_name("GSSAPI"), None);
}
