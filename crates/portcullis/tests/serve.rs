//! Black-box tests of the `portcullis` binary: the command line, the configuration errors
//! and a running sidecar answered over gRPC on TCP and on a Unix socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const BINARY: &str = env!("CARGO_BIN_EXE_portcullis");
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

const POLICY: &str = r#"package envoy.authz

default allow := false

allow := {"allowed": true, "headers": {"x-checked": "yes"}} if input.parsed_path[0] == "open"

allow := {"allowed": false, "http_status": 429, "body": "short and stout"} if input.parsed_path[0] == "teapot"
"#;

/// A bundle folder and a configuration file in a temporary folder.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(policy: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle/envoy/authz");
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(dir.path().join("bundle/.manifest"), r#"{"revision": "test-1", "roots": ["envoy"]}"#).unwrap();
        std::fs::write(bundle.join("policy.rego"), policy).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a configuration with the given listen section and free admin port.
    fn config(&self, listen: &str, admin_port: u16, extra: &str) -> PathBuf {
        let text = format!(
            "listen:\n{listen}\nadmin:\n  address: 127.0.0.1:{admin_port}\npolicy:\n  bundle: bundle\n  reload_interval: 100ms\naudit:\n  sink: file\n  path: decisions.jsonl\nshutdown:\n  drain: 500ms\n{extra}"
        );
        let path = self.path("portcullis.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(args: &[&str]) -> Output {
    Command::new(BINARY).args(args).output().unwrap()
}

/// A running `portcullis serve`, killed when dropped.
struct Sidecar {
    child: Child,
    admin_port: u16,
    log: PathBuf,
}

impl Sidecar {
    fn start(config: &Path, log: PathBuf) -> Sidecar {
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(BINARY)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let admin_port = admin_port_of(config);
        let mut sidecar = Sidecar { child, admin_port, log };
        sidecar.wait_ready();
        sidecar
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("portcullis exited with {status} before it was ready:\n{}", self.log_text());
            }
            if http_get(self.admin_port, "/readyz").map(|(status, _)| status) == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("portcullis was not ready within 20 s:\n{}", self.log_text());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn admin_port_of(config: &Path) -> u16 {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().skip_while(|line| !line.starts_with("admin:")).nth(1).unwrap();
    line.rsplit(':').next().unwrap().trim().parse().unwrap()
}

/// A minimal HTTP/1.1 GET; returns the status and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Some((status, body))
}

fn check_request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> CheckRequest {
    let mut http = HttpRequest {
        id: "test-request".to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        host: "service.test".to_owned(),
        scheme: "http".to_owned(),
        protocol: "HTTP/1.1".to_owned(),
        body: body.to_owned(),
        ..Default::default()
    };
    for (name, value) in headers {
        http.headers.insert((*name).to_owned(), (*value).to_owned());
    }
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.0.0.1", 40000)),
            destination: Some(peer("10.0.0.2", 8080)),
            request: Some(Request { time: None, http: Some(http) }),
            ..Default::default()
        }),
    }
}

fn denied_status(response: &CheckResponse) -> Option<i32> {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => denied.status.as_ref().map(|status| status.code),
        _ => None,
    }
}

fn decision_id(response: &CheckResponse) -> String {
    let metadata = response.dynamic_metadata.as_ref().expect("dynamic metadata");
    match &metadata.fields["decision_id"].kind {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(id)) => id.clone(),
        other => panic!("decision_id is not a string: {other:?}"),
    }
}

async fn tcp_channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap()
}

async fn unix_channel(path: PathBuf) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap()
}

#[test]
fn config_validate_reports_every_problem() {
    let setup = Setup::new(POLICY);
    let path = setup.path("bad.yaml");
    std::fs::write(&path, "listen:\n  address: nowhere\n  backlog: 1\npolicy:\n  bundle: bundle\naudit:\n  sink: kafka\n").unwrap();

    let output = run(&["config", "validate", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);

    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("has 3 problems"), "{stderr}");
    assert!(stderr.contains("listen.backlog (line 3): unknown key"), "{stderr}");
    assert!(stderr.contains("listen.address (line 2): invalid address \"nowhere\""), "{stderr}");
    assert!(stderr.contains("audit.sink (line 7): invalid value \"kafka\""), "{stderr}");
}

#[test]
fn config_validate_accepts_local_default() {
    let output = run(&["config", "validate", &format!("{WORKSPACE}/deploy/local/portcullis.yaml")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("is valid; policy bundle revision"), "{stdout}");
}

#[test]
fn config_validate_reports_broken_bundle() {
    let setup = Setup::new("package envoy.authz\n\nallow if {\n");
    let config = setup.config("  address: 127.0.0.1:0", free_port(), "");

    let output = run(&["config", "validate", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("policy.bundle: cannot compile policy bundle") || stderr.contains("policy.bundle: cannot load policy bundle"), "{stderr}");
}

#[test]
fn serve_with_invalid_config_exits_78() {
    let setup = Setup::new(POLICY);
    let path = setup.path("bad.yaml");
    std::fs::write(&path, "listen: {}\npolicy:\n  bundle: bundle\n").unwrap();

    let output = run(&["serve", "--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("listen (line 1): no listener"), "{stderr}");
}

#[test]
fn serve_with_broken_bundle_exits_65() {
    let setup = Setup::new("package envoy.authz\n\nallow := \n");
    let config = setup.config("  address: 127.0.0.1:0", free_port(), "");

    let output = run(&["serve", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("policy.rego"), "the error names the file: {stderr}");
}

#[test]
fn check_command_prints_input_decision_and_response() {
    let output = run(&[
        "check",
        "--config",
        &format!("{WORKSPACE}/deploy/local/portcullis.yaml"),
        "--request",
        &format!("{WORKSPACE}/deploy/local/requests/admin-denied.json"),
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));

    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["input"]["parsed_path"], serde_json::json!(["admin", "settings"]));
    assert_eq!(report["input"]["parsed_query"], serde_json::json!({"tab": ["users"]}));
    assert_eq!(report["input"]["attributes"]["request"]["http"]["method"], "GET");
    assert_eq!(report["decision"]["allowed"], false);
    assert_eq!(report["response"]["status"]["code"], 7);
    assert_eq!(report["response"]["httpResponse"]["deniedResponse"]["status"], 403);
    assert_eq!(report["response"]["dynamicMetadata"]["decision_id"], report["event"]["decision_id"]);
}

#[test]
fn local_default_verifies_dev_token() {
    let check = |request: &str| {
        let output = run(&[
            "check",
            "--config",
            &format!("{WORKSPACE}/deploy/local/portcullis.yaml"),
            "--request",
            request,
        ]);
        assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let with_token = format!("{WORKSPACE}/deploy/local/requests/public-with-token.json");

    let report = check(&with_token);

    assert_eq!(report["decision"]["allowed"], true);
    assert_eq!(report["input"]["identity"]["provider"], "local");
    assert_eq!(report["input"]["identity"]["subject"], "alice");
    assert_eq!(report["event"]["identity"]["kid"], "local-dev-1");

    // The same request with one character of the signature changed is denied with 401.
    let setup = Setup::new(POLICY);
    let text = std::fs::read_to_string(&with_token).unwrap();
    let token_end = text.find("\",\n          \"x-request-id\"").expect("the token ends before x-request-id");
    // A character inside the signature, not the last one, whose low bits are only padding.
    let position = token_end - 10;
    let original = &text[position..position + 1];
    let tampered = format!("{}{}{}", &text[..position], if original == "A" { "B" } else { "A" }, &text[position + 1..]);
    let tampered_request = setup.path("tampered.json");
    std::fs::write(&tampered_request, tampered).unwrap();

    let report = check(tampered_request.to_str().unwrap());

    assert_eq!(report["decision"]["allowed"], false);
    assert_eq!(report["response"]["httpResponse"]["deniedResponse"]["status"], 401);
}

#[test]
fn check_command_rejects_unknown_request_field() {
    let setup = Setup::new(POLICY);
    let request = setup.path("request.json");
    std::fs::write(&request, r#"{"attributes": {"request": {"http": {"hedaers": {}}}}}"#).unwrap();

    let output = run(&[
        "check",
        "--config",
        &format!("{WORKSPACE}/deploy/local/portcullis.yaml"),
        "--request",
        request.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("hedaers"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_checks_on_tcp_and_unix_socket() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let socket = setup.path("authz.sock");
    let listen = format!("  address: 127.0.0.1:{port}\n  unix_socket: {}", socket.display());
    let config = setup.config(&listen, free_port(), "");
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));

    let mut tcp = AuthorizationClient::new(tcp_channel(port).await);
    let allowed = tcp.check(check_request("GET", "/open/door", &[], "")).await.unwrap().into_inner();
    assert_eq!(allowed.status.as_ref().unwrap().code, 0);
    match &allowed.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            let header = ok.headers[0].header.as_ref().unwrap();
            assert_eq!((header.key.as_str(), header.value.as_str()), ("x-checked", "yes"));
        }
        other => panic!("expected an ok response, got {other:?}"),
    }

    let mut unix = AuthorizationClient::new(unix_channel(socket.clone()).await);
    let denied = unix.check(check_request("GET", "/teapot", &[], "")).await.unwrap().into_inner();
    assert_eq!(denied.status.as_ref().unwrap().code, 7);
    assert_eq!(denied_status(&denied), Some(429));

    let events = std::fs::read_to_string(setup.path("decisions.jsonl")).unwrap();
    let ids: Vec<String> = events
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["decision_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![decision_id(&allowed), decision_id(&denied)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_service_reports_serving() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}"), free_port(), "");
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));

    let mut health = HealthClient::new(tcp_channel(port).await);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let answer = health.check(HealthCheckRequest { service: service.to_owned() }).await.unwrap().into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_body_is_denied_with_400() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}"), free_port(), "");
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));

    let mut client = AuthorizationClient::new(tcp_channel(port).await);
    let request = check_request("POST", "/open/orders", &[("content-type", "application/json")], "{\"quantity\": ");
    let response = client.check(request).await.unwrap().into_inner();

    assert_eq!(denied_status(&response), Some(400));
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => assert!(denied.body.contains("not valid JSON"), "{}", denied.body),
        other => panic!("expected a denied response, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_check_request_is_rejected() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}\n  max_message_bytes: 2048"), free_port(), "");
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));

    let mut client = AuthorizationClient::new(tcp_channel(port).await);
    let big = "x".repeat(4096);
    let error = client.check(check_request("GET", "/open", &[("x-big", &big)], "")).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::OutOfRange, "{error}");

    let small = client.check(check_request("GET", "/open", &[], "")).await.unwrap().into_inner();
    assert_eq!(small.status.unwrap().code, 0);
}

#[test]
fn http1_request_is_rejected_and_logged() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}"), free_port(), "");
    let sidecar = Sidecar::start(&config, setup.path("log.txt"));

    let (status, body) = http_get(port, "/").unwrap();
    assert_eq!(status, 426);
    assert!(body.contains("gRPC (HTTP/2) only"), "{body}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(sidecar.log_text().contains("rejected an HTTP/1.x request"), "{}", sidecar.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_reload_keeps_previous_policy() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let admin = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}"), admin, "");
    let sidecar = Sidecar::start(&config, setup.path("log.txt"));

    std::fs::write(setup.path("bundle/envoy/authz/policy.rego"), "package envoy.authz\n\nallow := {\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(admin, "/metrics").unwrap();
        if metrics.contains("portcullis_bundle_reloads_total{result=\"failure\"} 1") {
            assert!(metrics.contains("portcullis_bundle_last_reload_failed 1"), "{metrics}");
            assert!(metrics.contains("portcullis_bundle_info{revision=\"test-1\"} 1"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "no reload failure reported:\n{metrics}\n{}", sidecar.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut client = AuthorizationClient::new(tcp_channel(port).await);
    let response = client.check(check_request("GET", "/open", &[], "")).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0, "the previous policy still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() {
    let setup = Setup::new(POLICY);
    let port = free_port();
    let admin = free_port();
    let config = setup.config(&format!("  address: 127.0.0.1:{port}"), admin, "");
    let mut sidecar = Sidecar::start(&config, setup.path("log.txt"));
    let mut client = AuthorizationClient::new(tcp_channel(port).await);

    sidecar.terminate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(http_get(admin, "/readyz").map(|(status, _)| status), Some(503), "not ready while draining");
    let during_drain = client.check(check_request("GET", "/open", &[], "")).await.unwrap().into_inner();
    assert_eq!(during_drain.status.unwrap().code, 0, "checks are answered while draining");

    assert_eq!(sidecar.wait_exit(Duration::from_secs(10)), Some(0), "{}", sidecar.log_text());
    let log = sidecar.log_text();
    assert!(log.contains("decision events flushed"), "{log}");
    let events = std::fs::read_to_string(setup.path("decisions.jsonl")).unwrap();
    assert_eq!(events.lines().count(), 1);
}

#[test]
fn check_command_exits_1_on_malformed_decision() {
    let setup = Setup::new("package envoy.authz\n\nallow := {\"allowed\": \"yes\"}\n");
    let config = setup.config("  address: 127.0.0.1:0", free_port(), "");
    let request = setup.path("request.json");
    std::fs::write(&request, r#"{"attributes": {"request": {"http": {"method": "GET", "path": "/"}}}}"#).unwrap();

    let output = run(&["check", "--config", config.to_str().unwrap(), "--request", request.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the policy did not produce a valid decision"), "{stderr}");

    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["decision"]["allowed"], false);
    assert_eq!(report["policy_result"], serde_json::json!({"allowed": "yes"}));
}

// Token verification.

const JWT_POLICY: &str = r#"package envoy.authz

default allow := false

allow if input.identity.subject == "alice"
"#;

const ISSUER: &str = "https://issuer.test";
const FIXTURE_KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../portcullis-jwt/tests/fixtures/keys/rsa-a.pem");

/// Writes a JWKS with the public half of the RSA test key, under kid `k1`.
fn write_jwks(setup: &Setup) -> jsonwebtoken::EncodingKey {
    let pem = std::fs::read(FIXTURE_KEY).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256).unwrap();
    let mut jwk = serde_json::to_value(jwk).unwrap();
    jwk["kid"] = serde_json::json!("k1");
    std::fs::write(setup.path("jwks.json"), serde_json::json!({"keys": [jwk]}).to_string()).unwrap();
    key
}

fn token(key: &jsonwebtoken::EncodingKey, subject: &str, expires_in: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".to_owned());
    let claims = serde_json::json!({"iss": ISSUER, "sub": subject, "aud": "portcullis", "iat": now, "exp": now + expires_in});
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn jwt_config(setup: &Setup, port: u16) -> PathBuf {
    let extra = format!(
        "jwt:\n  providers:\n    - name: test\n      issuer: {ISSUER}\n      audiences: [portcullis]\n      jwks_file: jwks.json\n      claims_to_headers:\n        - {{claim: sub, header: x-jwt-sub}}\n"
    );
    setup.config(&format!("  address: 127.0.0.1:{port}"), free_port(), &extra)
}

fn ok_headers(response: &CheckResponse) -> (Vec<(String, String)>, Vec<String>) {
    match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => (
            ok.headers.iter().filter_map(|option| option.header.as_ref()).map(|h| (h.key.clone(), h.value.clone())).collect(),
            ok.headers_to_remove.clone(),
        ),
        other => panic!("expected an ok response, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_reaches_policy_as_identity() {
    let setup = Setup::new(JWT_POLICY);
    let key = write_jwks(&setup);
    let port = free_port();
    let config = jwt_config(&setup, port);
    let sidecar = Sidecar::start(&config, setup.path("log.txt"));
    let mut client = AuthorizationClient::new(tcp_channel(port).await);

    let alice = token(&key, "alice", 300);
    let bearer = format!("Bearer {alice}");
    let response = client.check(check_request("GET", "/a", &[("authorization", &bearer), ("x-jwt-sub", "forged")], "")).await.unwrap().into_inner();
    assert_eq!(response.status.as_ref().unwrap().code, 0);
    let (headers, removed) = ok_headers(&response);
    assert_eq!(headers, vec![("x-jwt-sub".to_owned(), "alice".to_owned())]);
    assert!(removed.contains(&"authorization".to_owned()), "the token is not forwarded: {removed:?}");

    let bob = format!("Bearer {}", token(&key, "bob", 300));
    let denied = client.check(check_request("GET", "/a", &[("authorization", &bob)], "")).await.unwrap().into_inner();
    assert_eq!(denied_status(&denied), Some(403), "the policy denies other subjects");

    let events = std::fs::read_to_string(setup.path("decisions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(first["identity"]["outcome"], "valid");
    assert_eq!(first["identity"]["subject"], "alice");
    assert_eq!(first["identity"]["kid"], "k1");
    assert_eq!(first["identity"]["token_fingerprint"].as_str().unwrap().len(), 16);
    assert!(!events.contains(&alice), "the raw token is never recorded");
    assert!(!sidecar.log_text().contains(&alice), "the raw token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_token_is_denied_with_401() {
    let setup = Setup::new(JWT_POLICY);
    let key = write_jwks(&setup);
    let port = free_port();
    let config = jwt_config(&setup, port);
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));
    let mut client = AuthorizationClient::new(tcp_channel(port).await);

    let expired = format!("Bearer {}", token(&key, "alice", -3600));
    let response = client.check(check_request("GET", "/a", &[("authorization", &expired)], "")).await.unwrap().into_inner();
    assert_eq!(denied_status(&response), Some(401));
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            let header = denied.headers.iter().filter_map(|option| option.header.as_ref()).find(|h| h.key == "www-authenticate").unwrap();
            assert!(header.value.starts_with("Bearer error=\"invalid_token\", error_description=\""), "{}", header.value);
        }
        other => panic!("expected a denied response, got {other:?}"),
    }

    // Change a character in the middle of the signature; the last one may only hold padding bits.
    let valid = token(&key, "alice", 300);
    let middle = valid.rfind('.').unwrap() + 100;
    let replacement = if &valid[middle..=middle] == "A" { "B" } else { "A" };
    let tampered = format!("{}{replacement}{}", &valid[..middle], &valid[middle + 1..]);
    let response = client.check(check_request("GET", "/a", &[("authorization", &format!("bearer {tampered}"))], "")).await.unwrap().into_inner();
    assert_eq!(denied_status(&response), Some(401), "a bad signature is rejected, whatever the case of the scheme");

    let events = std::fs::read_to_string(setup.path("decisions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(first["identity"]["outcome"], "expired");
    assert_eq!(first["decision"]["http_status"], 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_token_is_left_to_policy() {
    let setup = Setup::new("package envoy.authz\n\nallow if not input.identity\n");
    write_jwks(&setup);
    let port = free_port();
    let config = jwt_config(&setup, port);
    let _sidecar = Sidecar::start(&config, setup.path("log.txt"));
    let mut client = AuthorizationClient::new(tcp_channel(port).await);

    let response = client.check(check_request("GET", "/a", &[], "")).await.unwrap().into_inner();
    assert_eq!(response.status.unwrap().code, 0, "the policy sees no identity and allows");
}
