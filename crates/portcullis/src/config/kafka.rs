//! The `audit.kafka` section: brokers, topic, producer limits, TLS and SASL of the audit
//! transport.

use std::path::Path;

use portcullis_kafka::{
    KafkaSettings, MAX_DELIVERY_TIMEOUT, MAX_LINGER, RotatingClientCertificate, SaslMechanism, SaslSettings, TlsSettings,
};

use super::fields::{Fields, Problem, problem};
use super::yaml::{Node, NodeValue};

const KAFKA_KEYS: &[&str] = &[
    "bootstrap_servers",
    "topic",
    "client_id",
    "delivery_timeout",
    "linger",
    "queue_full_timeout",
    "max_queued_messages",
    "max_queued_bytes",
    "tls",
    "sasl",
];

const PATH: &str = "audit.kafka";

/// Reads `audit.kafka`; `None` when the section is absent. Every problem, including those of
/// [`KafkaSettings::validate`], is pushed with its key path and line.
pub fn read_kafka(node: Option<&Node>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<KafkaSettings> {
    let node = node?;
    let fields = Fields::new(Some(node), PATH, KAFKA_KEYS, base_dir, problems);

    let bootstrap_servers = read_bootstrap_servers(&fields, problems);
    let topic = fields.string("topic", problems);
    if fields.node("topic").is_none() {
        problems.push(problem(&fields.path_of("topic"), Some(node.line), "missing; name the topic the audit records go to".to_owned()));
    }

    let mut settings = KafkaSettings::new(bootstrap_servers, topic.unwrap_or_default());
    if let Some(client_id) = fields.string("client_id", problems) {
        settings.connection.client_id = client_id;
    }
    settings.delivery_timeout = fields.duration("delivery_timeout", settings.delivery_timeout, MAX_DELIVERY_TIMEOUT, problems);
    settings.linger = fields.duration("linger", settings.linger, MAX_LINGER, problems);
    settings.queue_full_timeout = fields.duration("queue_full_timeout", settings.queue_full_timeout, MAX_DELIVERY_TIMEOUT, problems);
    settings.max_queued_messages =
        fields.integer("max_queued_messages", settings.max_queued_messages.into(), 1..=i32::MAX as u64, problems) as u32;
    settings.max_queued_bytes = fields.integer("max_queued_bytes", settings.max_queued_bytes, 1..=(i32::MAX as u64) * 1024, problems);
    settings.connection.tls = read_tls(&fields, base_dir, problems);
    settings.connection.sasl = read_sasl(&fields, base_dir, problems);

    // The library's checks cover values the typed getters accept but that do not fit together
    // (linger against the deadline, a certificate without its key, a malformed address).
    let already_reported = |setting: &str| problems.iter().any(|reported| reported.path == format!("{PATH}.{setting}"));
    let mut library_problems = Vec::new();
    if let Err(found) = settings.validate() {
        for found in found {
            if found.setting == "topic" && fields.node("topic").is_none() || already_reported(found.setting) {
                continue;
            }
            let top_key = found.setting.split('.').next().unwrap_or(found.setting);
            library_problems.push(problem(&format!("{PATH}.{}", found.setting), fields.line_of(top_key), found.message));
        }
    }
    problems.extend(library_problems);
    Some(settings)
}

/// Reads `bootstrap_servers` as a sequence of `HOST:PORT` strings or as one comma-separated
/// string, the form librdkafka and the Kafka tools take.
fn read_bootstrap_servers(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> Vec<String> {
    let Some(node) = fields.node("bootstrap_servers") else {
        problems.push(problem(
            &fields.path_of("bootstrap_servers"),
            fields.line_of("bootstrap_servers"),
            "missing; list the brokers as HOST:PORT".to_owned(),
        ));
        return Vec::new();
    };
    match &node.value {
        NodeValue::String(text) => text.split(',').map(|server| server.trim().to_owned()).collect(),
        _ => fields.strings("bootstrap_servers", problems),
    }
}

fn read_tls(fields: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<TlsSettings> {
    let node = fields.node("tls")?;
    let tls = Fields::new(Some(node), &fields.path_of("tls"), &["ca_file", "cert_file", "key_file", "use_listener_certificate"], base_dir, problems);
    Some(TlsSettings {
        ca_file: tls.path("ca_file", problems),
        cert_file: tls.path("cert_file", problems),
        key_file: tls.path("key_file", problems),
        rotating_certificate: tls.bool("use_listener_certificate", false, problems).then(RotatingClientCertificate::new),
    })
}

fn read_sasl(fields: &Fields<'_>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<SaslSettings> {
    let node = fields.node("sasl")?;
    let sasl = Fields::new(Some(node), &fields.path_of("sasl"), &["mechanism", "username", "password_file"], base_dir, problems);
    let missing = |key: &str, hint: &str, problems: &mut Vec<Problem>| {
        if sasl.node(key).is_none() {
            problems.push(problem(&sasl.path_of(key), Some(node.line), format!("missing; {hint}")));
        }
    };
    missing("mechanism", &format!("choose one of: {}", SaslMechanism::NAMES.join(", ")), problems);
    missing("username", "set the SASL user name", problems);
    missing("password_file", "set the path of a file that contains the password", problems);

    let mechanism = sasl.string("mechanism", problems).and_then(|name| {
        let parsed = SaslMechanism::from_name(&name);
        if parsed.is_none() {
            problems.push(problem(
                &sasl.path_of("mechanism"),
                sasl.line_of("mechanism"),
                format!("invalid value {name:?}; expected one of: {}", SaslMechanism::NAMES.join(", ")),
            ));
        }
        parsed
    });
    let username = sasl.string("username", problems);
    let password_file = sasl.path("password_file", problems);
    Some(SaslSettings { mechanism: mechanism?, username: username?, password_file: password_file? })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::super::yaml;
    use super::*;

    fn read(text: &str) -> (Option<KafkaSettings>, Vec<String>) {
        let root = yaml::parse(text).expect("valid YAML");
        let NodeValue::Mapping(entries) = &root.value else { panic!("not a mapping") };
        let node = entries.iter().find(|(key, _)| key == "kafka").map(|(_, node)| node);
        let mut problems = Vec::new();
        let settings = read_kafka(node, Path::new("/etc/portcullis"), &mut problems);
        (settings, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn absent_section_reads_as_none() {
        assert_eq!(read("other: 1\n"), (None, vec![]));
    }

    #[test]
    fn full_section_is_read() {
        let (settings, problems) = read(
            "kafka:
  bootstrap_servers: [kafka-0:9093, kafka-1:9093]
  topic: portcullis-audit
  client_id: portcullis-orders
  delivery_timeout: 800ms
  linger: 2ms
  queue_full_timeout: 100ms
  max_queued_messages: 5000
  max_queued_bytes: 1048576
  tls:
    ca_file: kafka-ca.pem
    cert_file: /run/tls/client.pem
    key_file: /run/tls/client-key.pem
  sasl:
    mechanism: SCRAM-SHA-512
    username: portcullis
    password_file: kafka-password
",
        );

        assert_eq!(problems, Vec::<String>::new());
        let settings = settings.expect("settings");
        assert_eq!(settings.connection.bootstrap_servers, vec!["kafka-0:9093", "kafka-1:9093"]);
        assert_eq!(settings.topic, "portcullis-audit");
        assert_eq!(settings.connection.client_id, "portcullis-orders");
        assert_eq!(settings.delivery_timeout, Duration::from_millis(800));
        assert_eq!(settings.linger, Duration::from_millis(2));
        assert_eq!(settings.queue_full_timeout, Duration::from_millis(100));
        assert_eq!(settings.max_queued_messages, 5000);
        assert_eq!(settings.max_queued_bytes, 1_048_576);
        assert_eq!(
            settings.connection.tls,
            Some(TlsSettings {
                ca_file: Some(PathBuf::from("/etc/portcullis/kafka-ca.pem")),
                cert_file: Some(PathBuf::from("/run/tls/client.pem")),
                key_file: Some(PathBuf::from("/run/tls/client-key.pem")),
                rotating_certificate: None,
            })
        );
        assert_eq!(
            settings.connection.sasl,
            Some(SaslSettings {
                mechanism: SaslMechanism::ScramSha512,
                username: "portcullis".to_owned(),
                password_file: PathBuf::from("/etc/portcullis/kafka-password"),
            })
        );
    }

    #[test]
    fn listener_certificate_excludes_certificate_files() {
        let (_, problems) = read("kafka:\n  bootstrap_servers: [k:9093]\n  topic: audit\n  tls:\n    use_listener_certificate: true\n    cert_file: client.pem\n    key_file: client-key.pem\n");

        assert_eq!(problems, vec!["audit.kafka.tls (line 5): use_listener_certificate excludes cert_file and key_file; set one or the other"]);
    }

    #[test]
    fn minimal_section_takes_defaults() {
        let (settings, problems) = read("kafka:\n  bootstrap_servers: 127.0.0.1:9092, 127.0.0.1:9093\n  topic: audit\n");

        assert_eq!(problems, Vec::<String>::new());
        let settings = settings.expect("settings");
        assert_eq!(settings, KafkaSettings::new(vec!["127.0.0.1:9092".to_owned(), "127.0.0.1:9093".to_owned()], "audit"));
    }

    #[test]
    fn empty_tls_mapping_enables_tls_with_system_cas() {
        let (settings, problems) = read("kafka:\n  bootstrap_servers: [k:9093]\n  topic: audit\n  tls: {}\n");

        assert_eq!(problems, Vec::<String>::new());
        assert_eq!(settings.expect("settings").connection.tls, Some(TlsSettings::default()));
    }

    #[test]
    fn every_problem_has_path_and_line() {
        let (_, problems) = read(
            "kafka:
  bootstrap_servers: [kafka-0]
  client_id: has space
  delivery_timeout: 2m
  linger: 5s
  max_queued_messages: 0
  partitions: 3
  tls:
    cert_file: client.pem
  sasl:
    mechanism: GSSAPI
    password: hunter2
",
        );

        assert_eq!(
            problems,
            vec![
                "audit.kafka.partitions (line 7): unknown key; expected one of: bootstrap_servers, topic, client_id, delivery_timeout, linger, queue_full_timeout, max_queued_messages, max_queued_bytes, tls, sasl",
                "audit.kafka.topic (line 2): missing; name the topic the audit records go to",
                "audit.kafka.delivery_timeout (line 4): 2m is longer than the maximum of 1m",
                "audit.kafka.linger (line 5): 5s is longer than the maximum of 1s",
                "audit.kafka.max_queued_messages (line 6): expected an integer from 1 to 2147483647, found 0",
                "audit.kafka.sasl.password (line 12): secrets are not accepted inline in the configuration; settings that need a secret take the path of a file that contains it",
                "audit.kafka.sasl.username (line 11): missing; set the SASL user name",
                "audit.kafka.sasl.password_file (line 11): missing; set the path of a file that contains the password",
                "audit.kafka.sasl.mechanism (line 11): invalid value \"GSSAPI\"; expected one of: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                "audit.kafka.bootstrap_servers (line 2): invalid broker address \"kafka-0\": no port; write HOST:PORT such as kafka-0.kafka:9092",
                "audit.kafka.client_id (line 3): invalid client id \"has space\"; use printable ASCII without spaces",
                "audit.kafka.tls (line 9): cert_file and key_file must be set together",
            ]
        );
    }

    #[test]
    fn linger_must_be_shorter_than_delivery_timeout() {
        let (_, problems) = read("kafka:\n  bootstrap_servers: [k:9092]\n  topic: audit\n  delivery_timeout: 500ms\n  linger: 500ms\n");

        assert_eq!(
            problems,
            vec![
                "audit.kafka.linger (line 5): 500ms must be shorter than delivery_timeout (500ms), or every record would time out while it waits for its batch"
            ]
        );
    }

    #[test]
    fn missing_brokers_are_reported_once() {
        let (_, problems) = read("kafka:\n  topic: audit\n");

        assert_eq!(problems, vec!["audit.kafka.bootstrap_servers (line 2): missing; list the brokers as HOST:PORT"]);
    }
}
