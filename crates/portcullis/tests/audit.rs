//! Black-box tests of the audit chain through the `portcullis` binary: `audit keygen`,
//! `audit verify` on good and tampered records, and a spool that survives SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use portcullis_audit::spool::read_spool_lines;
use portcullis_audit::{AuditPipeline, CheckpointPolicy, CheckpointSigner, DecisionSink, NoAuditObserver, PipelineConfig, SpoolConfig};
use tonic::transport::Endpoint;

const BINARY: &str = env!("CARGO_BIN_EXE_portcullis");

const POLICY: &str = "package envoy.authz\n\ndefault allow := false\n\nallow if input.parsed_path[0] == \"open\"\n";

fn run(args: &[&str]) -> Output {
    Command::new(BINARY).args(args).output().unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a key pair with `audit keygen` and returns (private, public).
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let private = dir.join("audit.pem");
    let public = dir.join("audit.pub.pem");
    let output = run(&["audit", "keygen", "--private-key", private.to_str().unwrap(), "--public-key", public.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    (private, public)
}

fn verify(public: &Path, paths: &[&Path], json: bool) -> (Option<i32>, String) {
    let mut command = Command::new(BINARY);
    command.args(["audit", "verify", "--public-key"]).arg(public);
    if json {
        command.arg("--json");
    }
    let output = command.args(paths).output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr))
}

/// Writes a spool of `events` events with the library, closes it, and returns its lines.
async fn spool_lines(dir: &Path, private: &Path, events: u32) -> Vec<String> {
    let spool = dir.join("spool");
    let mut config = PipelineConfig::new("pod-a");
    config.spool = Some(SpoolConfig { dir: spool.clone(), max_bytes: 64 * 1024 * 1024, segment_bytes: 1024 * 1024, fsync: false });
    let signer = Arc::new(CheckpointSigner::from_pem_file(private).unwrap());
    config.checkpoints = CheckpointPolicy { every: 10, interval: Duration::from_secs(3600), signer: Some(signer) };
    let pipeline = AuditPipeline::start(config, None, Arc::new(NoAuditObserver)).unwrap();
    for i in 0..events {
        let event = portcullis_audit::DecisionEvent {
            schema: portcullis_audit::DecisionEvent::SCHEMA,
            event_id: format!("e{i}"),
            decision_id: format!("d{i}"),
            time: "2026-01-01T00:00:00.000000Z".to_owned(),
            request: serde_json::json!({"method": "GET", "path": format!("/open/{i}")}),
            identity: None,
            decision: portcullis_audit::EventDecision { allowed: true, http_status: 200, reason: None },
            policy: portcullis_audit::EventPolicy { bundle_revision: "r".to_owned(), bundle_digest: "sha256:0".to_owned(), decision_path: "envoy/authz/allow".to_owned() },
            latency_us: 1,
            amends: None,
        };
        pipeline.record(&event).await.unwrap();
    }
    pipeline.close().await.unwrap();
    read_spool_lines(&spool).unwrap().into_iter().flat_map(|(_, lines)| lines).map(|line| String::from_utf8(line).unwrap()).collect()
}

#[test]
fn keygen_writes_private_key_0600() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keygen(dir.path());

    assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&private).unwrap().starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(std::fs::read_to_string(&public).unwrap().starts_with("-----BEGIN PUBLIC KEY-----"));

    let again = run(&["audit", "keygen", "--private-key", private.to_str().unwrap(), "--public-key", dir.path().join("other.pem").to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("File exists"), "{}", String::from_utf8_lossy(&again.stderr));
}

#[tokio::test]
async fn verify_accepts_whole_chain_and_names_tampered_record() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keygen(dir.path());
    let lines = spool_lines(dir.path(), &private, 25).await;
    // Start checkpoint, 25 events with a checkpoint after every 10 records, shutdown checkpoint.
    assert_eq!(lines.len(), 29);

    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, lines.join("\n") + "\n").unwrap();
    let (code, output) = verify(&public, &[&good], false);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("chain pod-a: whole: 29 records (sequence 1 to 29), 4 checkpoints"), "{output}");

    let mut altered = lines.clone();
    altered[4] = altered[4].replace("/open/3", "/open/x");
    let tampered = dir.path().join("tampered.jsonl");
    std::fs::write(&tampered, altered.join("\n") + "\n").unwrap();
    let (code, output) = verify(&public, &[&tampered], false);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains(&format!("chain pod-a: PROBLEM (altered): record 5 at {}:5 was altered", tampered.display())), "{output}");

    let mut removed = lines.clone();
    removed.remove(7);
    std::fs::write(&tampered, removed.join("\n") + "\n").unwrap();
    let (code, output) = verify(&public, &[&tampered], true);
    assert_eq!(code, Some(1), "{output}");
    let report: serde_json::Value = serde_json::from_str(&output).unwrap();
    assert_eq!(report["chains"][0]["problem"]["kind"], "missing");
    assert_eq!(report["chains"][0]["problem"]["from"], 8);
    assert_eq!(report["chains"][0]["problem"]["to"], 8);
}

#[tokio::test]
async fn verify_reads_spool_folders_and_rejects_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keygen(dir.path());
    spool_lines(dir.path(), &private, 5).await;
    let spool = dir.path().join("spool");

    let (code, output) = verify(&public, &[&spool], false);
    assert_eq!(code, Some(0), "{output}");

    let other = tempfile::tempdir().unwrap();
    let (_, other_public) = keygen(other.path());
    let (code, output) = verify(&other_public, &[&spool], false);
    assert_eq!(code, Some(1), "{output}");
    assert!(output.contains("PROBLEM (unknown_key): checkpoint 1"), "{output}");
}

#[test]
fn verify_reports_unreadable_inputs_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keygen(dir.path());

    let (code, output) = verify(&public, &[&dir.path().join("missing.jsonl")], false);
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("cannot read"), "{output}");

    let (code, output) = verify(&dir.path().join("no-key.pem"), &[&public], false);
    assert_eq!(code, Some(64), "{output}");
    assert!(output.contains("cannot read key file"), "{output}");
}

/// A running `portcullis serve`, killed when dropped.
struct Sidecar {
    child: Child,
    log: PathBuf,
}

impl Sidecar {
    fn start(config: &Path, admin_port: u16, log: PathBuf) -> Sidecar {
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(BINARY).args(["serve", "--config"]).arg(config).stdout(Stdio::null()).stderr(log_file).spawn().unwrap();
        let mut sidecar = Sidecar { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                panic!("portcullis exited with {status}:\n{}", sidecar.log_text());
            }
            if ready(admin_port) {
                return sidecar;
            }
            assert!(Instant::now() < deadline, "not ready within 20 s:\n{}", sidecar.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        assert!(Command::new("kill").args([name, &self.child.id().to_string()]).status().unwrap().success());
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn check_request(path: &str) -> CheckRequest {
    let http = HttpRequest { method: "GET".to_owned(), path: path.to_owned(), host: "service.test".to_owned(), ..Default::default() };
    CheckRequest { attributes: Some(AttributeContext { request: Some(Request { time: None, http: Some(http) }), ..Default::default() }) }
}

fn decision_id(response: &CheckResponse) -> String {
    let metadata = response.dynamic_metadata.as_ref().expect("dynamic metadata");
    match &metadata.fields["decision_id"].kind {
        Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(id)) => id.clone(),
        other => panic!("decision_id is not a string: {other:?}"),
    }
}

/// Sends up to `limit` checks one after another, stopping at the first error; returns the
/// decision ids of the checks that got a response.
async fn checks_until_error(port: u16, prefix: String, limit: usize) -> Vec<String> {
    let Ok(channel) = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await else { return Vec::new() };
    let mut client = AuthorizationClient::new(channel);
    let mut answered = Vec::new();
    for i in 0..limit {
        match client.check(check_request(&format!("/open/{prefix}{i}"))).await {
            Ok(response) => {
                let response = response.into_inner();
                assert_eq!(response.status.as_ref().map(|status| status.code), Some(0), "the check is allowed");
                answered.push(decision_id(&response));
            }
            Err(_) => break,
        }
    }
    answered
}

fn spool_decision_ids(spool: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for (_, lines) in read_spool_lines(spool).unwrap() {
        for line in lines {
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if let Some(id) = value["decision_id"].as_str() {
                ids.push(id.to_owned());
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spool_keeps_every_answered_check_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle/envoy/authz");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("policy.rego"), POLICY).unwrap();
    let (private, public) = keygen(dir.path());
    let port = free_port();
    let admin = free_port();
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  address: 127.0.0.1:{port}\nadmin:\n  address: 127.0.0.1:{admin}\npolicy:\n  bundle: bundle\naudit:\n  mode: spool\n  instance_id: test-pod\n  spool:\n    dir: spool\n    max_bytes: 16777216\n    segment_bytes: 65536\n  checkpoint:\n    every: 100\n    interval: 200ms\n    signing_key_file: {}\nshutdown:\n  drain: 100ms\n",
            private.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log.txt");

    // Four clients send checks continuously; the process is killed while they run.
    let sidecar = Sidecar::start(&config, admin, log.clone());
    let clients: Vec<_> = (0..4).map(|client| tokio::spawn(checks_until_error(port, format!("c{client}-"), 100_000))).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while spool_decision_ids(&dir.path().join("spool")).len() < 400 {
        assert!(Instant::now() < deadline, "too few checks answered:\n{}", sidecar.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sidecar.signal("-KILL");
    let mut answered = Vec::new();
    for client in clients {
        answered.extend(client.await.unwrap());
    }
    drop(sidecar);
    assert!(answered.len() >= 400, "{} checks got a response", answered.len());
    println!("{} checks got a response before SIGKILL", answered.len());

    // Every check that got a response before the kill has its event in the spool.
    let recorded: std::collections::HashSet<String> = spool_decision_ids(&dir.path().join("spool")).into_iter().collect();
    let lost: Vec<&String> = answered.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(lost.is_empty(), "{} of {} checks with a response have no event: {:?}", lost.len(), answered.len(), &lost[..lost.len().min(5)]);
    println!("{} events in the spool after SIGKILL", recorded.len());

    // The restart signs the stretch written after the last checkpoint, and a clean stop adds
    // the shutdown checkpoint.
    let sidecar = Sidecar::start(&config, admin, log.clone());
    let after_restart = checks_until_error(port, "after-".to_owned(), 20).await;
    assert_eq!(after_restart.len(), 20);
    sidecar.signal("-TERM");
    let mut sidecar = sidecar;
    let status = sidecar.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", sidecar.log_text());

    let (code, output) = verify(&public, &[&dir.path().join("spool")], false);
    assert_eq!(code, Some(0), "{output}\n{}", sidecar.log_text());
    assert!(output.contains("chain test-pod: whole:"), "{output}");
    let ids = spool_decision_ids(&dir.path().join("spool"));
    assert!(ids.ends_with(&after_restart), "the events after the restart come last, in order");
}
