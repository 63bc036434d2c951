use std::path::Path;
use std::time::Duration;

use super::*;

/// Creates once a folder with the files the test configurations name: `bundle/`, `b/` and `bundle.tar.gz`.
fn base_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bundle")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("bundle.tar.gz"), b"").unwrap();
        dir
    })
    .path()
}

fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    Config::parse(text, base_dir())
}

fn rendered(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

#[test]
fn minimal_config_takes_defaults() {
    let config = parse("listen:\n  address: 127.0.0.1:9191\npolicy:\n  bundle: bundle\n").unwrap();

    assert_eq!(config.listen.address, Some("127.0.0.1:9191".parse().unwrap()));
    assert_eq!(config.listen.unix_socket, None);
    assert_eq!(config.listen.max_message_bytes, 4 * 1024 * 1024);
    assert_eq!(config.admin.address, None);
    assert_eq!(config.policy.bundle, base_dir().join("bundle"));
    assert_eq!(config.policy.decision, "envoy/authz/allow");
    assert_eq!(config.policy.reload_interval, Duration::from_secs(5));
    assert_eq!(config.audit.mode, AuditMode::Stdout);
    assert!(config.audit.fsync);
    assert_eq!(config.audit.timeout, Duration::from_secs(1));
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, LogFormat::Text);
    assert_eq!(config.shutdown.drain, Duration::from_secs(5));
    assert_eq!(config.shutdown.timeout, Duration::from_secs(10));
}

#[test]
fn full_config_is_read() {
    let text = r#"
listen:
  address: "[::1]:9000"
  unix_socket: /run/portcullis/authz.sock
  max_message_bytes: 65536
admin:
  address: 127.0.0.1:9192
policy:
  bundle: bundle.tar.gz
  decision: acme/http/decision
  reload_interval: 0
audit:
  sink: file
  path: audit/decisions.jsonl
  fsync: false
  timeout: 250ms
log:
  level: debug,hyper=info
  format: json
shutdown:
  drain: 1s
  timeout: 2m
"#;
    let config = parse(text).unwrap();

    assert_eq!(config.listen.address, Some("[::1]:9000".parse().unwrap()));
    assert_eq!(config.listen.unix_socket.as_deref(), Some(Path::new("/run/portcullis/authz.sock")));
    assert_eq!(config.listen.max_message_bytes, 65536);
    assert_eq!(config.admin.address, Some("127.0.0.1:9192".parse().unwrap()));
    assert_eq!(config.policy.bundle, base_dir().join("bundle.tar.gz"));
    assert_eq!(config.policy.decision, "acme/http/decision");
    assert_eq!(config.policy.reload_interval, Duration::ZERO);
    assert_eq!(config.audit.mode, AuditMode::File);
    assert_eq!(config.audit.path, Some(base_dir().join("audit/decisions.jsonl")));
    assert!(!config.audit.fsync);
    assert_eq!(config.audit.timeout, Duration::from_millis(250));
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.shutdown.drain, Duration::from_secs(1));
    assert_eq!(config.shutdown.timeout, Duration::from_secs(120));
}

#[test]
fn every_problem_is_reported_with_path_and_line() {
    let text = "\
listen:
  address: localhost
  max_message_bytes: 12
  backlog: 5
policy:
  decision: data/envoy/allow
  reload_interval: soon
audit:
  sink: kafka
log:
  format: yaml
";
    let problems = parse(text).unwrap_err();

    assert_eq!(
        rendered(&problems),
        vec![
            "listen.backlog (line 4): unknown key; expected one of: address, unix_socket, max_message_bytes",
            "listen.address (line 2): invalid address \"localhost\"; expected IP:PORT such as 127.0.0.1:9191 or [::1]:9191",
            "listen.max_message_bytes (line 3): expected an integer from 1024 to 67108864, found 12",
            "policy.bundle (line 6): missing; set it to a bundle folder or .tar.gz",
            "policy.decision (line 6): decision path \"data/envoy/allow\" must not start with data/; it is already relative to data",
            "policy.reload_interval (line 7): invalid duration \"soon\": expected number at 0; write it like 500ms, 5s or 2m",
            "audit.sink (line 9): invalid value \"kafka\"; expected one of: file, stdout, none",
            "log.format (line 11): invalid value \"yaml\"; expected one of: text, json",
        ]
    );
}

#[test]
fn unknown_top_level_key_is_reported() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\npolicies: {}\n").unwrap_err();
    assert_eq!(rendered(&problems), vec!["policies (line 5): unknown key; expected one of: listen, admin, policy, audit, log, shutdown, jwt, tls, vault"]);
}

#[test]
fn inline_secret_is_rejected() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\n  token: abc\npolicy:\n  bundle: b\n").unwrap_err();
    assert_eq!(
        rendered(&problems),
        vec!["listen.token (line 3): secrets are not accepted inline in the configuration; settings that need a secret take the path of a file that contains it"]
    );
}

#[test]
fn missing_listener_is_reported() {
    let problems = parse("policy:\n  bundle: b\n").unwrap_err();
    assert_eq!(rendered(&problems), vec!["listen: no listener: set listen.address, listen.unix_socket or both"]);
}

#[test]
fn file_sink_without_path_is_reported() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\naudit:\n  sink: file\n").unwrap_err();
    assert_eq!(rendered(&problems), vec!["audit.path (line 6): missing; the file sink needs a path for its events"]);
}

#[test]
fn wrong_types_are_reported() {
    let problems = parse("listen: [1, 2]\npolicy:\n  bundle: 7\naudit:\n  fsync: maybe\n").unwrap_err();
    assert_eq!(
        rendered(&problems),
        vec![
            "listen (line 1): expected a mapping, found a sequence",
            "listen (line 1): no listener: set listen.address, listen.unix_socket or both",
            "policy.bundle (line 3): expected a string, found an integer",
            "audit.fsync (line 5): expected true or false, found a string",
        ]
    );
}

#[test]
fn yaml_syntax_error_names_line() {
    let problems = parse("listen:\n  address: [127.0.0.1:1\npolicy: {}\n").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].path, "");
    assert!(problems[0].message.starts_with("invalid YAML at line"), "{}", problems[0].message);
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\n  address: 127.0.0.1:2\npolicy:\n  bundle: b\n").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.starts_with("invalid YAML"), "{}", problems[0].message);
}

#[test]
fn empty_file_reports_what_is_required() {
    let problems = parse("").unwrap_err();
    assert_eq!(
        rendered(&problems),
        vec![
            "listen: no listener: set listen.address, listen.unix_socket or both",
            "policy.bundle: missing; set it to a bundle folder or .tar.gz",
        ]
    );
}

#[test]
fn decision_path_must_be_rego_names() {
    assert!(check_decision_path("envoy/authz/allow").is_ok());
    assert!(check_decision_path("/envoy/authz/allow").is_ok());
    assert!(check_decision_path("envoy/authz/allow-me").is_err());
    assert!(check_decision_path("envoy//allow").is_err());
    assert!(check_decision_path("").is_err());
    assert!(check_decision_path("data").is_err());
}

#[test]
fn missing_bundle_is_reported_with_line() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: no-such-bundle\n").unwrap_err();
    let expected = format!("policy.bundle (line 4): {} not found; set it to a bundle folder or .tar.gz", base_dir().join("no-such-bundle").display());
    assert_eq!(rendered(&problems), vec![expected]);
}

#[test]
fn misspelt_log_level_is_reported() {
    let problems = parse("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\nlog:\n  level: debg\n").unwrap_err();
    assert_eq!(
        rendered(&problems),
        vec!["log.level (line 6): invalid log level \"debg\" in \"debg\"; use trace, debug, info, warn, error or off, or directives such as info,hyper=warn"]
    );
}

#[test]
fn log_directives_are_accepted() {
    for level in ["info", "WARN", "debug,hyper=info", "portcullis_policy=trace", "off"] {
        let text = format!("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\nlog:\n  level: \"{level}\"\n");
        assert!(parse(&text).is_ok(), "{level}");
    }
}

const JWT_BASE: &str = "listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\n";

#[test]
fn jwt_provider_is_read() {
    let text = format!(
        "{JWT_BASE}jwt:\n  invalid_token: policy\n  providers:\n    - name: kc\n      issuer: https://kc.test/realms/a\n      discovery: true\n      audiences: [api]\n      from_headers: [{{name: Authorization, prefix: \"Bearer \"}}]\n      from_cookies: [session]\n      claims_to_headers: [{{claim: sub, header: X-Sub}}]\n      algorithms: [RS256, ES256]\n      clock_skew: 30s\n"
    );
    let jwt = parse(&text).unwrap().jwt.unwrap();

    assert_eq!(jwt.invalid_token, portcullis_authz::identity::OnInvalidToken::EvaluatePolicy);
    let provider = &jwt.verifier.providers[0];
    assert_eq!(provider.name, "kc");
    assert_eq!(provider.keys, Some(portcullis_jwt::KeySource::OidcDiscovery));
    assert_eq!(provider.audiences, vec!["api"]);
    assert_eq!(
        provider.locations,
        vec![
            portcullis_jwt::TokenLocation::Header { name: "authorization".to_owned(), value_prefix: Some("Bearer ".to_owned()) },
            portcullis_jwt::TokenLocation::Cookie { name: "session".to_owned() },
        ]
    );
    assert_eq!(provider.claim_to_headers[0].header, "x-sub");
    assert_eq!(provider.algorithms.len(), 2);
    assert_eq!(provider.clock_skew, Duration::from_secs(30));
}

#[test]
fn jwt_provider_problems_are_reported() {
    let text = format!(
        "{JWT_BASE}jwt:\n  providers:\n    - name: a\n      issuer: https://a.test\n      discovery: true\n      jwks_uri: https://a.test/jwks\n    - issuer: https://b.test\n      algorithms: [none]\n      audience: x\n"
    );
    let problems = rendered(&parse(&text).unwrap_err());

    assert!(problems.contains(&"jwt.providers[0].discovery (line 9): more than one key source (jwks_uri, discovery); keep exactly one".to_owned()), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("jwt.providers[1].audience (line 13): unknown key")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("jwt.providers[1].name (line 11): missing")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("jwt.providers[1].jwks_uri (line 11): no key source")), "{problems:?}");
    assert!(problems.iter().any(|p| p.starts_with("jwt.providers[1].algorithms (line 12):")), "{problems:?}");
    assert_eq!(problems.len(), 5, "{problems:?}");
}

#[test]
fn jwt_verifier_checks_run_on_valid_file() {
    let text = format!("{JWT_BASE}jwt:\n  providers:\n    - name: a\n      issuer: https://a.test\n      jwks_file: missing.json\n");
    let problems = rendered(&parse(&text).unwrap_err());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("jwt (line 6): "), "{problems:?}");
    assert!(problems[0].contains("missing.json"), "{problems:?}");
}

#[test]
fn audit_spool_mode_is_read() {
    let text = "\
listen:
  address: 127.0.0.1:1
policy:
  bundle: b
audit:
  mode: spool
  instance_id: pod-7
  spool:
    dir: spool
    max_bytes: 1048576
    segment_bytes: 65536
    fsync: false
  checkpoint:
    every: 50
    interval: 2s
    signing_key_file: keys/audit.pem
  events:
    headers: [X-Tenant]
    redact: [request.path, identity.subject]
";
    let audit = parse(text).unwrap().audit;

    assert_eq!(audit.mode, AuditMode::Spool);
    assert_eq!(audit.instance_id, "pod-7");
    assert_eq!(
        audit.spool,
        Some(portcullis_audit::SpoolConfig { dir: base_dir().join("spool"), max_bytes: 1_048_576, segment_bytes: 65_536, fsync: false })
    );
    assert_eq!(audit.checkpoint.every, 50);
    assert_eq!(audit.checkpoint.interval, Duration::from_secs(2));
    assert_eq!(audit.checkpoint.signing_key_file, Some(base_dir().join("keys/audit.pem")));
    assert_eq!(audit.events.headers, vec!["x-tenant"]);
    assert_eq!(audit.events.redact, vec!["request.path", "identity.subject"]);
    assert_eq!(audit.delivery_timeout, Duration::from_millis(500));
    assert_eq!(audit.kafka, None);
}

#[test]
fn audit_problems_are_reported_with_path_and_line() {
    let text = "\
listen:
  address: 127.0.0.1:1
policy:
  bundle: b
audit:
  mode: spool
  sink: file
  instance_id: has space
  checkpoint:
    every: 0
  events:
    headers: [authorization]
    redact: [body]
";
    let problems = parse(text).unwrap_err();

    assert_eq!(
        rendered(&problems),
        vec![
            "audit.sink (line 7): set either audit.mode or the older audit.sink, not both",
            "audit.spool (line 6): missing; the spool mode needs audit.spool.dir",
            "audit.instance_id (line 8): invalid instance id \"has space\"; use 1 to 253 printable ASCII characters without spaces",
            "audit.checkpoint.every (line 10): expected an integer from 1 to 1000000, found 0",
            "audit.events.headers[0] (line 12): authorization carries credentials and is never recorded; remove it",
            "audit.events.redact[0] (line 13): invalid path \"body\"; expected request.<member>, identity.<member> or decision.reason, such as request.path",
        ]
    );
}

#[test]
fn audit_kafka_mode_needs_its_section_and_a_short_delivery_timeout() {
    let missing = parse("listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\naudit:\n  mode: kafka\n").unwrap_err();
    assert_eq!(
        rendered(&missing),
        vec!["audit.kafka (line 6): missing; the kafka mode needs audit.kafka.bootstrap_servers and audit.kafka.topic"]
    );

    let text = "\
listen:
  address: 127.0.0.1:1
policy:
  bundle: b
audit:
  mode: kafka
  timeout: 1s
  delivery_timeout: 2s
  spool:
    dir: spool
  kafka:
    bootstrap_servers: [127.0.0.1:9092]
    topic: audit
";
    let problems = parse(text).unwrap_err();
    assert_eq!(
        rendered(&problems),
        vec!["audit.delivery_timeout (line 8): 2s must be shorter than audit.timeout (1s), or checks time out before they fall back to the spool"]
    );
}

#[test]
fn audit_sections_of_other_modes_are_rejected() {
    let text = "listen:\n  address: 127.0.0.1:1\npolicy:\n  bundle: b\naudit:\n  mode: stdout\n  spool:\n    dir: spool\n";
    let problems = parse(text).unwrap_err();
    assert_eq!(rendered(&problems), vec!["audit.spool (line 8): only used by the spool and kafka modes, but audit.mode is stdout"]);
}

#[test]
fn kafka_listener_certificate_needs_tls_section() {
    let text = "\
listen:
  address: 127.0.0.1:1
policy:
  bundle: b
audit:
  mode: kafka
  kafka:
    bootstrap_servers: [127.0.0.1:9093]
    topic: audit
    tls:
      use_listener_certificate: true
";

    let problems = parse(text).unwrap_err();

    assert_eq!(
        rendered(&problems),
        vec!["audit.kafka.tls.use_listener_certificate (line 6): needs the `tls` section, whose certificate it reuses; add `tls` or set cert_file and key_file"]
    );
}
