//! End-to-end tests of the `kafka` audit mode: the real `portcullis serve` binary answers
//! ext_authz checks from several gRPC clients while a real single-node Kafka 4.x broker on
//! 127.0.0.1 takes its decision events. The tests stop the broker or kill portcullis under
//! load, then read the whole topic back and match every response with its event by
//! `decision_id`, and run `portcullis audit verify` on the topic.
//!
//! Each test starts its own broker and skips with a `SKIPPED:` line when Kafka cannot be
//! installed or Java cannot be run, unless `PORTCULLIS_REQUIRE_PEERS=1`. The portcullis binary
//! must be built first (`cargo build -p portcullis`), or named by `PORTCULLIS_BIN`. The tests
//! run one at a time, because two brokers and two loads at once overload a 2-core machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest as CheckHttpRequest, Request,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as CheckHttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use portcullis_e2e::kafka::{Kafka, KafkaOptions};
use portcullis_e2e::{HttpRequest, Portcullis, free_port, send};
use portcullis_kafka::{ConnectionSettings, TopicMessage, read_topic};
use serde_json::Value;
use tonic::transport::{Channel, Endpoint};

const TOPIC: &str = "portcullis-audit";
const INSTANCE_ID: &str = "orders-0";
const DECISION_SCHEMA: &str = "portcullis.decision.v2";
const CHECKPOINT_SCHEMA: &str = "portcullis.checkpoint.v1";
const AUTHORITY: &str = "orders.shop";

/// Allows paths whose first segment is `open` and denies the rest with the default 403.
const POLICY: &str =
    "package envoy.authz\n\ndefault allow := false\n\nallow if input.parsed_path[0] == \"open\"\n";

/// Concurrent gRPC clients; each sends its next check when the previous one is answered.
const CLIENTS: usize = 4;

/// `audit.timeout`: the longest a check waits for its event before a 503.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a response may take beyond the audit deadline that decided it: the gRPC exchange,
/// building the response and scheduling on a loaded 2-core machine.
const RESPONSE_MARGIN: Duration = Duration::from_millis(300);

/// Client-side bound of one check. Every check in these tests gets its response well before it.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bound of the wait for records that the shipper still sends after the broker came back.
const SHIPPING_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound of one read of the whole topic.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serializes the tests of this file; each one runs a broker, portcullis and a load.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Writes a figure line to the process's stderr, which libtest does not capture.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn binary() -> PathBuf {
    Portcullis::binary().unwrap_or_else(|error| panic!("{error}"))
}

/// A folder with the policy bundle, a checkpoint key pair and the configuration.
struct Setup {
    dir: tempfile::TempDir,
    grpc: SocketAddr,
    admin: SocketAddr,
    public_key: PathBuf,
    key_id: String,
}

/// The audit durability of a configuration.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// No spool: `audit.state_file` keeps the chain head, unacknowledged records live in memory.
    StateFile,
    /// A spool, fsynced before a check falls back to it.
    Spool,
}

impl Setup {
    fn new(durability: Durability, delivery_timeout: Duration, kafka: &Kafka) -> Setup {
        // PORTCULLIS_KEEP_TEST_DIRS=1 keeps the folder, with portcullis's log, for a post-mortem.
        let keep = std::env::var_os("PORTCULLIS_KEEP_TEST_DIRS").is_some_and(|value| value == "1");
        let dir = tempfile::Builder::new()
            .prefix("portcullis-audit-kafka-")
            .disable_cleanup(keep)
            .tempdir()
            .expect("temporary folder");
        report(&format!("portcullis folder: {}", dir.path().display()));
        let bundle = dir.path().join("bundle/envoy/authz");
        std::fs::create_dir_all(&bundle).expect("creating the bundle folder");
        std::fs::write(bundle.join("policy.rego"), POLICY).expect("writing the policy");

        let private_key = dir.path().join("audit.pem");
        let public_key = dir.path().join("audit.pub.pem");
        let output = Command::new(binary())
            .args(["audit", "keygen", "--private-key"])
            .arg(&private_key)
            .arg("--public-key")
            .arg(&public_key)
            .output()
            .expect("running portcullis audit keygen failed");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(
            output.status.code(),
            Some(0),
            "audit keygen: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let key_id = stdout
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("key id "))
            .expect("keygen prints the key id")
            .to_owned();

        let grpc = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("free port")));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().expect("free port")));
        let durability_yaml = match durability {
            Durability::StateFile => "  state_file: state/chain-head.json\n".to_owned(),
            Durability::Spool => {
                "  spool:\n    dir: spool\n    max_bytes: 67108864\n    segment_bytes: 65536\n"
                    .to_owned()
            }
        };
        // The producer's own deadline is longer than the check's, so that a check gives up
        // first and the record is still resent until Kafka has it.
        let config = format!(
            "listen:
  address: \"{grpc}\"
admin:
  address: \"{admin}\"
policy:
  bundle: bundle
  decision: envoy/authz/allow
audit:
  mode: kafka
  instance_id: {INSTANCE_ID}
  timeout: {audit_timeout}ms
  delivery_timeout: {delivery_timeout}ms
{durability_yaml}  checkpoint:
    every: 100
    interval: 200ms
    signing_key_file: audit.pem
  kafka:
    bootstrap_servers: [\"{bootstrap}\"]
    topic: {TOPIC}
    delivery_timeout: 1500ms
log:
  level: info
  format: text
shutdown:
  drain: 100ms
",
            audit_timeout = AUDIT_TIMEOUT.as_millis(),
            delivery_timeout = delivery_timeout.as_millis(),
            bootstrap = kafka.bootstrap_servers(),
        );
        std::fs::write(dir.path().join("portcullis.yaml"), config)
            .expect("writing the configuration");
        Setup {
            dir,
            grpc,
            admin,
            public_key,
            key_id,
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.yaml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.log")
    }
}

/// A running `portcullis serve`, killed when dropped. Its output is appended to one log file
/// across restarts.
struct Sidecar {
    child: Child,
    log: PathBuf,
}

impl Sidecar {
    async fn start(setup: &Setup) -> Sidecar {
        let log = setup.log_path();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening the log file");
        let stdout_file = log_file.try_clone().expect("cloning the log file handle");
        let child = Command::new(binary())
            .args(["serve", "--config"])
            .arg(setup.config_path())
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(stdout_file))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("starting portcullis failed");
        let mut sidecar = Sidecar { child, log };

        let started = Instant::now();
        loop {
            if let Some(status) = sidecar.child.try_wait().expect("waiting for portcullis") {
                panic!(
                    "portcullis exited with {status} before it was ready:\n{}",
                    sidecar.log_text()
                );
            }
            if let Ok(response) = send(setup.admin, &HttpRequest::get("/readyz")).await
                && response.status == 200
            {
                return sidecar;
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "portcullis not ready within {READY_TIMEOUT:?}:\n{}",
                sidecar.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits in i32"));
        kill(pid, signal)
            .unwrap_or_else(|error| panic!("sending {signal} to portcullis failed: {error}"));
    }

    async fn wait_for_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for portcullis") {
                return status;
            }
            assert!(
                started.elapsed() < EXIT_TIMEOUT,
                "portcullis did not exit within {EXIT_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and asserts a clean exit with status 0.
    async fn terminate(mut self) -> Duration {
        let started = Instant::now();
        self.signal(Signal::SIGTERM);
        let status = self.wait_for_exit().await;
        assert_eq!(
            status.code(),
            Some(0),
            "portcullis exit status after SIGTERM:\n{}",
            self.log_text()
        );
        started.elapsed()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How portcullis answered one check.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allowed,
    /// Denied with this HTTP status: 403 by the policy, 503 when the event was not recorded.
    Denied(i32),
    /// No CheckResponse: the call failed, as it does when portcullis is killed.
    CallFailed(String),
}

/// One check a client sent.
#[derive(Debug, Clone)]
struct Answer {
    client: usize,
    request_id: String,
    path: String,
    expect_allowed: bool,
    outcome: Outcome,
    decision_id: Option<String>,
    elapsed: Duration,
    /// When the client sent the check, relative to the start of the test's load.
    sent_at: Duration,
}

impl Answer {
    fn is_answered(&self) -> bool {
        !matches!(self.outcome, Outcome::CallFailed(_))
    }

    /// Returns whether the policy's own decision came back: allowed on `/open`, 403 elsewhere.
    fn has_policy_answer(&self) -> bool {
        match self.outcome {
            Outcome::Allowed => self.expect_allowed,
            Outcome::Denied(403) => !self.expect_allowed,
            _ => false,
        }
    }
}

/// Asserts that each check got the policy's own decision, and shows the first five that did
/// not. `label` names the checks in the failure message.
fn assert_policy_answers<'a>(answers: impl IntoIterator<Item = &'a Answer>, label: &str) {
    let unexpected: Vec<&Answer> = answers
        .into_iter()
        .filter(|answer| !answer.has_policy_answer())
        .collect();
    assert_eq!(
        unexpected.len(),
        0,
        "{label} without the policy's answer: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
}

fn check_request(path: &str, request_id: &str) -> CheckRequest {
    let http = CheckHttpRequest {
        method: "GET".to_owned(),
        path: path.to_owned(),
        host: AUTHORITY.to_owned(),
        headers: [("x-request-id".to_owned(), request_id.to_owned())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

fn decision_id_of(response: &CheckResponse) -> Option<String> {
    match &response
        .dynamic_metadata
        .as_ref()?
        .fields
        .get("decision_id")?
        .kind
    {
        Some(Kind::StringValue(id)) => Some(id.clone()),
        _ => None,
    }
}

fn outcome_of(response: &CheckResponse) -> Outcome {
    let code = response.status.as_ref().map_or(0, |status| status.code);
    if code == 0 {
        return Outcome::Allowed;
    }
    match &response.http_response {
        Some(CheckHttpResponse::DeniedResponse(denied)) => {
            Outcome::Denied(denied.status.as_ref().map_or(0, |status| status.code))
        }
        other => Outcome::CallFailed(format!(
            "gRPC status {code} without a denied response: {other:?}"
        )),
    }
}

async fn connect(grpc: SocketAddr) -> AuthorizationClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{grpc}"))
        .expect("valid endpoint")
        .timeout(CHECK_TIMEOUT);
    let started = Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return AuthorizationClient::new(channel),
            Err(error) => {
                assert!(
                    started.elapsed() < READY_TIMEOUT,
                    "connecting to {grpc} failed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Clients that send checks until `finish` stops them, every third one to a denied path.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    /// Checks that got the policy's answer, not a 503.
    policy_answered: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

impl Load {
    /// Starts `clients` clients named `{prefix}{index}`. With `stop_on_failure`, a client stops
    /// at its first failed call instead of panicking, as it must when portcullis is killed.
    async fn start(
        grpc: SocketAddr,
        prefix: &str,
        clients: usize,
        stop_on_failure: bool,
        epoch: Instant,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let policy_answered = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for client in 0..clients {
            let mut connection = connect(grpc).await;
            let stop = Arc::clone(&stop);
            let answered = Arc::clone(&answered);
            let policy_answered = Arc::clone(&policy_answered);
            let name = format!("{prefix}{client}");
            handles.push(tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut index = 0;
                while !stop.load(Ordering::Relaxed) {
                    let expect_allowed = index % 3 != 2;
                    let path = format!(
                        "/{}/{name}/{index}",
                        if expect_allowed { "open" } else { "closed" }
                    );
                    let request_id = format!("{name}-{index}");
                    let started = Instant::now();
                    let result = connection
                        .check(check_request(&format!("{path}?n={index}"), &request_id))
                        .await;
                    let elapsed = started.elapsed();
                    let (outcome, decision_id) = match result {
                        Ok(response) => {
                            let response = response.into_inner();
                            (outcome_of(&response), decision_id_of(&response))
                        }
                        Err(status) => (Outcome::CallFailed(status.to_string()), None),
                    };
                    let failed = matches!(outcome, Outcome::CallFailed(_));
                    if !failed {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    let answer = Answer {
                        client,
                        request_id,
                        path,
                        expect_allowed,
                        outcome,
                        decision_id,
                        elapsed,
                        sent_at: started.duration_since(epoch),
                    };
                    if answer.has_policy_answer() {
                        policy_answered.fetch_add(1, Ordering::Relaxed);
                    }
                    answers.push(answer);
                    if failed && stop_on_failure {
                        break;
                    }
                    index += 1;
                }
                answers
            }));
        }
        Load {
            stop,
            answered,
            policy_answered,
            clients: handles,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    fn policy_answered(&self) -> usize {
        self.policy_answered.load(Ordering::Relaxed)
    }

    /// Waits until at least `count` checks got the policy's answer, or fails after `timeout`.
    async fn wait_for_policy_answers(&self, count: usize, timeout: Duration) {
        let started = Instant::now();
        while self.policy_answered() < count {
            assert!(
                started.elapsed() < timeout,
                "only {} of {count} checks got the policy's answer within {timeout:?}",
                self.policy_answered()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until at least `count` checks are answered, or fails after `timeout`.
    async fn wait_for_answers(&self, count: usize, timeout: Duration) {
        let started = Instant::now();
        while self.answered() < count {
            assert!(
                started.elapsed() < timeout,
                "only {} of {count} checks answered within {timeout:?}",
                self.answered()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> Vec<Answer> {
        self.stop.store(true, Ordering::Relaxed);
        let mut answers = Vec::new();
        for client in self.clients {
            answers.extend(client.await.expect("a load client panicked"));
        }
        answers
    }
}

/// Sends checks one after another until one is allowed, and returns them all.
///
/// A check is answered only once Kafka acknowledged its event, and the producer first has to
/// connect and fetch the topic's metadata. Without a spool, checks that arrive before that get
/// 503 after `audit.delivery_timeout`, although `/readyz` already returns 200.
async fn warm_up(grpc: SocketAddr, epoch: Instant) -> Vec<Answer> {
    let load = Load::start(grpc, "warm-up-", 1, false, epoch).await;
    load.wait_for_policy_answers(1, READY_TIMEOUT).await;
    load.finish().await
}

async fn read_messages(kafka: &Kafka) -> Vec<TopicMessage> {
    let connection = ConnectionSettings::new(vec![kafka.bootstrap_servers()]);
    tokio::task::spawn_blocking(move || read_topic(&connection, TOPIC, READ_TIMEOUT))
        .await
        .expect("the topic reader panicked")
        .unwrap_or_else(|error| panic!("reading the topic failed: {error}"))
}

/// The records of the instance's chain as they are stored in the topic.
struct TopicChain {
    /// Distinct records by sequence, lowest first.
    records: Vec<Value>,
    /// Messages that repeat an earlier record byte for byte.
    duplicates: usize,
    /// Sequences of the repeated records, one entry per repeat.
    duplicated: Vec<u64>,
    /// Decision events by decision id.
    decisions: HashMap<String, Value>,
    /// Records that do not directly follow the highest sequence before them in the topic,
    /// as `partition:offset: sequence S after H`.
    out_of_order: Vec<String>,
    /// Sequence numbers below the highest one that no message contains.
    missing: Vec<u64>,
}

impl TopicChain {
    /// Reads the chain from `messages`, dropping exact duplicates. Asserts that every message
    /// has the instance id as key and that no two records share a sequence with different
    /// content. Order and gaps are collected, so that the caller asserts them last.
    fn from_messages(messages: &[TopicMessage]) -> TopicChain {
        let mut by_sequence: BTreeMap<u64, (&[u8], Value)> = BTreeMap::new();
        let mut duplicated = Vec::new();
        let mut out_of_order = Vec::new();
        let mut highest = 0;
        let partitions: HashSet<i32> = messages.iter().map(|message| message.partition).collect();
        assert!(
            partitions.len() <= 1,
            "one instance's records span partitions {partitions:?}"
        );

        for message in messages {
            let position = format!("{}:{}", message.partition, message.offset);
            assert_eq!(
                message.key.as_deref(),
                Some(INSTANCE_ID.as_bytes()),
                "message key at {position}"
            );
            let record: Value = serde_json::from_slice(&message.payload)
                .unwrap_or_else(|error| panic!("record at {position} is not JSON: {error}"));
            let sequence = record["sequence"]
                .as_u64()
                .unwrap_or_else(|| panic!("record at {position} has no sequence: {record}"));
            assert_eq!(
                record["instance_id"], INSTANCE_ID,
                "instance id of record {sequence}"
            );
            if let Some((earlier, _)) = by_sequence.get(&sequence) {
                assert_eq!(
                    String::from_utf8_lossy(earlier),
                    String::from_utf8_lossy(&message.payload),
                    "record {sequence} at {position} repeats a sequence with other content"
                );
                duplicated.push(sequence);
                continue;
            }
            if sequence != highest + 1 {
                out_of_order.push(format!("{position}: sequence {sequence} after {highest}"));
            }
            highest = highest.max(sequence);
            by_sequence.insert(sequence, (&message.payload, record));
        }

        let missing = (1..=highest)
            .filter(|sequence| !by_sequence.contains_key(sequence))
            .collect();
        let records: Vec<Value> = by_sequence
            .into_values()
            .map(|(_, record)| record)
            .collect();
        let mut decisions = HashMap::new();
        for record in records
            .iter()
            .filter(|record| record["schema"] == DECISION_SCHEMA)
        {
            let decision_id = record["decision_id"]
                .as_str()
                .expect("decision events have a decision_id")
                .to_owned();
            // A check denied with 503 because its record was not acknowledged in time gets a
            // second record, a correction that names the first in `amends`. The correction
            // states the status the caller received, so it is the one kept.
            match decisions.insert(decision_id.clone(), record.clone()) {
                None => {}
                Some(previous) if record["amends"] == previous["event_id"] => {}
                Some(previous) if previous["amends"] == record["event_id"] => {
                    decisions.insert(decision_id, previous);
                }
                Some(_) => {
                    panic!("decision {decision_id} has two events and neither corrects the other")
                }
            }
        }
        TopicChain {
            records,
            duplicates: duplicated.len(),
            duplicated,
            decisions,
            out_of_order,
            missing,
        }
    }

    /// Asserts that the topic contains sequences 1 to the highest without gaps, each first copy
    /// in sequence order, as `audit verify` requires.
    fn assert_gapless_in_order(&self) {
        assert_eq!(
            self.missing,
            Vec::<u64>::new(),
            "sequences missing from the topic"
        );
        assert_eq!(
            self.out_of_order.iter().take(10).collect::<Vec<_>>(),
            Vec::<&String>::new(),
            "{} records out of sequence order in the topic",
            self.out_of_order.len()
        );
    }

    /// Returns the corrections: second records of checks denied with 503 after all.
    fn corrections(&self) -> usize {
        self.records
            .iter()
            .filter(|record| record.get("amends").is_some())
            .count()
    }

    fn checkpoints(&self) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|record| record["schema"] == CHECKPOINT_SCHEMA)
            .collect()
    }

    fn checkpoint_reasons(&self) -> BTreeMap<String, usize> {
        let mut reasons = BTreeMap::new();
        for checkpoint in self.checkpoints() {
            *reasons
                .entry(checkpoint["reason"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        reasons
    }

    fn last_is_checkpoint(&self) -> bool {
        self.records
            .last()
            .is_some_and(|record| record["schema"] == CHECKPOINT_SCHEMA)
    }
}

/// Polls the topic until it contains an event for every id in `decision_ids` and its chain ends
/// with a checkpoint, which the spool-backed shipper sends in the background.
async fn wait_for_shipping(kafka: &Kafka, decision_ids: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let chain = TopicChain::from_messages(&read_messages(kafka).await);
        let missing = decision_ids
            .iter()
            .filter(|id| !chain.decisions.contains_key(**id))
            .count();
        if missing == 0 && chain.last_is_checkpoint() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SHIPPING_TIMEOUT,
            "after {SHIPPING_TIMEOUT:?} the topic still lacks {missing} of {} events (ends with a checkpoint: {})",
            decision_ids.len(),
            chain.last_is_checkpoint()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs `portcullis audit verify` on the topic and returns its exit code and output.
fn verify_topic(setup: &Setup, kafka: &Kafka) -> (Option<i32>, String) {
    let output = Command::new(binary())
        .args(["audit", "verify", "--public-key"])
        .arg(&setup.public_key)
        .args([
            "--kafka-bootstrap",
            &kafka.bootstrap_servers(),
            "--topic",
            TOPIC,
        ])
        .output()
        .expect("running portcullis audit verify failed");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// Returns the report that `audit verify` prints for the whole chain in `chain`.
fn whole_chain_report(setup: &Setup, chain: &TopicChain) -> String {
    let records = chain.records.len();
    let duplicates = if chain.duplicates > 0 {
        format!(", {} exact duplicates ignored", chain.duplicates)
    } else {
        String::new()
    };
    format!(
        "chain {INSTANCE_ID}: whole: {records} records (sequence 1 to {records}), {} checkpoints signed by {}{duplicates}\n\
         1 chains, 0 with a problem, 0 unreadable lines\n",
        chain.checkpoints().len(),
        setup.key_id
    )
}

/// Asserts the documented members of a decision event against the check it records.
fn assert_event_matches(event: &Value, answer: &Answer) {
    let id = &answer.request_id;
    let uuid_v7 = |member: &str| {
        let text = event[member]
            .as_str()
            .unwrap_or_else(|| panic!("{id}: {member} is missing: {event}"));
        let uuid = uuid::Uuid::parse_str(text)
            .unwrap_or_else(|error| panic!("{id}: {member} {text:?} is not a UUID: {error}"));
        assert_eq!(
            uuid.get_version_num(),
            7,
            "{id}: {member} {text:?} is not a UUID v7"
        );
    };
    uuid_v7("event_id");
    uuid_v7("decision_id");
    assert_ne!(
        event["event_id"], event["decision_id"],
        "{id}: event_id and decision_id"
    );
    assert_eq!(event["schema"], DECISION_SCHEMA, "{id}: schema");
    for member in ["prev_hash", "hash"] {
        let hash = event[member].as_str().unwrap_or_default();
        assert!(
            hash.len() == 64
                && hash
                    .bytes()
                    .all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()),
            "{id}: {member} {hash:?}"
        );
    }
    let time = event["time"].as_str().unwrap_or_default();
    assert_eq!(
        time.len(),
        "2026-12-04T19:42:58.123456Z".len(),
        "{id}: time {time:?} is RFC 3339 UTC with microseconds"
    );
    assert!(time.ends_with('Z'), "{id}: time {time:?} is in UTC");
    assert_eq!(&time[10..11], "T", "{id}: time {time:?}");
    assert_eq!(&time[19..20], ".", "{id}: time {time:?}");
    assert!(
        event["latency_us"].is_u64(),
        "{id}: latency_us {}",
        event["latency_us"]
    );
    assert_eq!(
        event["request"]["request_id"],
        answer.request_id.as_str(),
        "{id}: request.request_id"
    );
    assert_eq!(event["request"]["method"], "GET", "{id}: request.method");
    assert_eq!(
        event["request"]["authority"], AUTHORITY,
        "{id}: request.authority"
    );
    assert_eq!(
        event["request"]["path"],
        answer.path.as_str(),
        "{id}: request.path is the path without its query"
    );
    assert!(
        event["request"].get("headers").is_none(),
        "{id}: no header is recorded unless audit.events.headers names it"
    );
    assert!(
        event.get("identity").is_none(),
        "{id}: no identity without a jwt section"
    );
    assert_eq!(
        event["policy"]["decision_path"], "envoy/authz/allow",
        "{id}: policy.decision_path"
    );
    let digest = event["policy"]["bundle_digest"]
        .as_str()
        .unwrap_or_default();
    assert!(
        digest.len() == 64 && digest.bytes().all(|byte| byte.is_ascii_hexdigit()),
        "{id}: policy.bundle_digest {digest:?} is hex SHA-256"
    );
    assert_eq!(
        event["policy"]["bundle_revision"],
        format!("sha256:{digest}"),
        "{id}: policy.bundle_revision of a bundle without a manifest revision"
    );
    // The event records the policy's decision, because it is sealed into the chain before Kafka is asked.
    assert_eq!(
        event["decision"]["allowed"], answer.expect_allowed,
        "{id}: decision.allowed"
    );
    assert_eq!(
        event["decision"]["http_status"],
        if answer.expect_allowed { 200 } else { 403 },
        "{id}: decision.http_status"
    );
}

/// Asserts that each client's checks, which it sent one after another, have increasing
/// sequence numbers in the chain.
fn assert_client_order(answers: &[Answer], chain: &TopicChain) {
    let mut last_sequence: HashMap<usize, (u64, &str)> = HashMap::new();
    for answer in answers {
        let Some(event) = answer
            .decision_id
            .as_ref()
            .and_then(|id| chain.decisions.get(id))
        else {
            continue;
        };
        let sequence = event["sequence"].as_u64().expect("sequence");
        if let Some((previous, previous_id)) = last_sequence.get(&answer.client) {
            assert!(
                sequence > *previous,
                "{} has sequence {sequence}, not after {previous_id} with {previous}",
                answer.request_id
            );
        }
        last_sequence.insert(answer.client, (sequence, &answer.request_id));
    }
}

fn count(answers: &[Answer], predicate: impl Fn(&Answer) -> bool) -> usize {
    answers.iter().filter(|answer| predicate(answer)).count()
}

fn max_elapsed(answers: &[Answer], predicate: impl Fn(&Answer) -> bool) -> Duration {
    answers
        .iter()
        .filter(|answer| predicate(answer))
        .map(|answer| answer.elapsed)
        .max()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_every_decision_in_topic_once_in_order() {
    let test = "steady_load_every_decision_in_topic_once_in_order";
    let _serial = SERIAL.lock().await;
    let Some(kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else {
        return;
    };
    kafka
        .create_topic(TOPIC, 3)
        .await
        .unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let delivery_timeout = Duration::from_millis(500);
    let setup = Setup::new(Durability::StateFile, delivery_timeout, &kafka);
    let sidecar = Sidecar::start(&setup).await;

    let epoch = Instant::now();
    let warm_up = warm_up(setup.grpc, epoch).await;
    let load_started = epoch.elapsed();
    let load = Load::start(setup.grpc, "steady-", CLIENTS, false, epoch).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = load.finish().await;
    let load_time = epoch.elapsed() - load_started;
    let stop_time = sidecar.terminate().await;

    let messages = read_messages(&kafka).await;
    let chain = TopicChain::from_messages(&messages);
    let allowed = count(&steady, |answer| answer.outcome == Outcome::Allowed);
    let denied = count(&steady, |answer| answer.outcome == Outcome::Denied(403));
    let warm_up_unavailable = count(&warm_up, |answer| answer.outcome == Outcome::Denied(503));
    report(&format!(
        "{test}: warm-up: {warm_up_unavailable} checks denied with 503 before the first acknowledgement at {load_started:.1?}; \
         {} checks from {CLIENTS} clients in {load_time:.1?} ({allowed} allowed, {denied} denied with 403), max {:?}; \
         SIGTERM to exit {stop_time:.1?}; topic: {} messages, {} records, {} duplicates, checkpoints {:?}",
        steady.len(),
        max_elapsed(&steady, |_| true),
        messages.len(),
        chain.records.len(),
        chain.duplicates,
        chain.checkpoint_reasons()
    ));

    assert_policy_answers(&steady, "checks");
    assert!(
        allowed >= 20,
        "too little load: {allowed} allowed:\n{}",
        sidecar_log(&setup)
    );
    assert!(
        denied >= 10,
        "too little load: {denied} denied:\n{}",
        sidecar_log(&setup)
    );
    assert!(
        warm_up
            .iter()
            .all(|answer| answer.outcome == Outcome::Denied(503) || answer.has_policy_answer()),
        "warm-up: {warm_up:?}"
    );
    for answer in &steady {
        let id = answer
            .decision_id
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no decision_id", answer.request_id));
        let event = chain
            .decisions
            .get(id)
            .unwrap_or_else(|| panic!("{} ({id}) has no event in the topic", answer.request_id));
        assert_event_matches(event, answer);
    }
    // The events of the warm-up checks denied with 503 were resent until Kafka had them.
    let answers: Vec<Answer> = warm_up.iter().chain(&steady).cloned().collect();
    for answer in &warm_up {
        let id = answer
            .decision_id
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no decision_id", answer.request_id));
        assert!(
            chain.decisions.contains_key(id),
            "warm-up check {} ({id}) has no event in the topic",
            answer.request_id
        );
    }
    assert_eq!(
        chain.decisions.len(),
        answers.len(),
        "decision events in the topic"
    );
    // Records sent before the producer first reached the broker can time out and be resent,
    // and both copies may then arrive. Once Kafka acknowledges, each record is sent once.
    let last_warm_up_sequence = warm_up
        .iter()
        .filter_map(|answer| chain.decisions.get(answer.decision_id.as_deref()?))
        .map(|event| event["sequence"].as_u64().expect("sequence"))
        .max()
        .expect("warm-up events");
    let steady_duplicates: Vec<u64> = chain
        .duplicated
        .iter()
        .copied()
        .filter(|sequence| *sequence > last_warm_up_sequence)
        .collect();
    report(&format!(
        "{test}: duplicated sequences {:?}, the last warm-up event has sequence {last_warm_up_sequence}",
        chain.duplicated
    ));
    assert_eq!(
        steady_duplicates,
        Vec::<u64>::new(),
        "records repeated after the first acknowledgement"
    );
    assert_eq!(
        messages.len(),
        chain.records.len() + chain.duplicates,
        "messages in the topic"
    );
    assert_client_order(&answers, &chain);

    // Decision events, a start checkpoint, one checkpoint per 100 records or 200 ms, and
    // the shutdown checkpoint, which closes the chain because close waits for Kafka here.
    let reasons = chain.checkpoint_reasons();
    assert_eq!(
        chain.records.len(),
        answers.len() + chain.checkpoints().len() + chain.corrections(),
        "records in the chain"
    );
    assert_eq!(chain.records[0]["reason"], "start", "the first record");
    assert_eq!(
        chain.records[0]["prev_hash"],
        "0".repeat(64),
        "the first record links to the genesis hash"
    );
    assert_eq!(
        chain.records.last().map(|record| record["reason"].clone()),
        Some(Value::from("shutdown")),
        "the last record"
    );
    assert_eq!(
        (reasons["start"], reasons["shutdown"]),
        (1, 1),
        "start and shutdown checkpoints"
    );
    let state: Value = serde_json::from_slice(
        &std::fs::read(setup.dir.path().join("state/chain-head.json"))
            .expect("reading the state file"),
    )
    .expect("the state file is JSON");
    assert_eq!(
        state["sequence"],
        chain.records.len(),
        "the state file holds the newest acknowledged record: {state}"
    );

    let (code, output) = verify_topic(&setup, &kafka);
    report(&format!("{test}: audit verify exited {code:?}: {output}"));
    report(&format!(
        "{test}: topic order: {} records out of sequence order (first: {:?}), {} sequences missing",
        chain.out_of_order.len(),
        chain.out_of_order.first(),
        chain.missing.len()
    ));
    chain.assert_gapless_in_order();
    assert_eq!(output, whole_chain_report(&setup, &chain));
    assert_eq!(code, Some(0));
}

fn sidecar_log(setup: &Setup) -> String {
    let text = std::fs::read_to_string(setup.log_path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_without_spool_denies_within_deadline() {
    let test = "broker_stopped_without_spool_denies_within_deadline";
    let _serial = SERIAL.lock().await;
    let Some(mut kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else {
        return;
    };
    kafka
        .create_topic(TOPIC, 1)
        .await
        .unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let delivery_timeout = Duration::from_millis(500);
    let setup = Setup::new(Durability::StateFile, delivery_timeout, &kafka);
    let sidecar = Sidecar::start(&setup).await;

    let epoch = Instant::now();
    let warm_up = warm_up(setup.grpc, epoch).await;
    let load = Load::start(setup.grpc, "outage-", CLIENTS, false, epoch).await;
    load.wait_for_answers(100, Duration::from_secs(20)).await;
    let stopping = epoch.elapsed();
    kafka.stop().await.expect("stopping Kafka failed");
    let stopped = epoch.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarting = epoch.elapsed();
    kafka
        .start_again()
        .await
        .unwrap_or_else(|error| panic!("starting Kafka again failed: {error}"));
    let restarted = epoch.elapsed();

    // The load goes on until at least 40 checks sent after the restart were acknowledged by
    // Kafka. Up to one check per client was sent before the restart and answered after it.
    let recovered_after = load.policy_answered() + 40 + CLIENTS;
    load.wait_for_policy_answers(recovered_after, Duration::from_secs(60))
        .await;
    let answers: Vec<Answer> = warm_up.into_iter().chain(load.finish().await).collect();
    let after_restart: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.sent_at > restarted)
        .collect();
    let stop_time = sidecar.terminate().await;

    let messages = read_messages(&kafka).await;
    let chain = TopicChain::from_messages(&messages);
    let unavailable: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.outcome == Outcome::Denied(503))
        .collect();
    let policy_answers: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.has_policy_answer())
        .collect();
    let late_events = unavailable
        .iter()
        .filter(|answer| {
            answer
                .decision_id
                .as_ref()
                .is_some_and(|id| chain.decisions.contains_key(id))
        })
        .count();
    let late_allowed_events = unavailable
        .iter()
        .filter(|answer| {
            answer.expect_allowed
                && answer
                    .decision_id
                    .as_ref()
                    .is_some_and(|id| chain.decisions.contains_key(id))
        })
        .count();
    let fastest_503 = unavailable
        .iter()
        .map(|answer| answer.elapsed)
        .min()
        .unwrap_or_default();
    report(&format!(
        "{test}: broker stop {stopping:.1?}..{stopped:.1?}, start {restarting:.1?}..{restarted:.1?} after the load began; \
         {} checks: {} with the policy's answer (max {:?}), {} denied with 503 in {fastest_503:?}..{:?} \
         (audit.delivery_timeout {delivery_timeout:?}, audit.timeout {AUDIT_TIMEOUT:?}), first 503 sent at {:.1?}, last at {:.1?}; \
         {} checks sent after the restart ({} answered by the policy); SIGTERM to exit {stop_time:.1?}",
        answers.len(),
        policy_answers.len(),
        max_elapsed(&answers, Answer::has_policy_answer),
        unavailable.len(),
        max_elapsed(&answers, |answer| answer.outcome == Outcome::Denied(503)),
        unavailable
            .first()
            .map(|answer| answer.sent_at)
            .unwrap_or_default(),
        unavailable
            .iter()
            .map(|answer| answer.sent_at)
            .max()
            .unwrap_or_default(),
        after_restart.len(),
        after_restart
            .iter()
            .filter(|answer| answer.has_policy_answer())
            .count(),
    ));
    report(&format!(
        "{test}: topic: {} messages, {} records, {} exact duplicates, checkpoints {:?}; events of 503 checks in the topic: \
         {late_events} of {} ({late_allowed_events} of them record allowed: true, status 200)",
        messages.len(),
        chain.records.len(),
        chain.duplicates,
        chain.checkpoint_reasons(),
        unavailable.len()
    ));

    // Every check got either the policy's answer or a 503, never a gRPC error, and none
    // waited past the audit deadlines.
    let other: Vec<&Answer> = answers
        .iter()
        .filter(|answer| !answer.has_policy_answer() && answer.outcome != Outcome::Denied(503))
        .collect();
    assert_eq!(
        other.len(),
        0,
        "checks with neither the policy's answer nor 503: {:?}",
        &other[..other.len().min(5)]
    );
    assert!(
        unavailable.len() >= CLIENTS,
        "only {} checks denied with 503 while the broker was down:\n{}",
        unavailable.len(),
        sidecar_log(&setup)
    );
    for answer in &unavailable {
        assert!(
            answer.elapsed >= delivery_timeout,
            "{} got 503 after {:?}, before audit.delivery_timeout",
            answer.request_id,
            answer.elapsed
        );
        assert!(
            answer.elapsed < AUDIT_TIMEOUT + RESPONSE_MARGIN,
            "{} got 503 after {:?}",
            answer.request_id,
            answer.elapsed
        );
    }
    for answer in &policy_answers {
        assert!(
            answer.elapsed < delivery_timeout + RESPONSE_MARGIN,
            "{} was answered after {:?}",
            answer.request_id,
            answer.elapsed
        );
    }
    assert!(
        after_restart
            .iter()
            .filter(|answer| answer.has_policy_answer())
            .count()
            >= 40,
        "too few checks answered after the restart"
    );

    // Every answered check has its event, because an answer means Kafka acknowledged it. The
    // events of 503 checks were kept in memory and resent, so they arrive too: close waits
    // for Kafka to acknowledge every record when there is no spool.
    for answer in &policy_answers {
        let id = answer
            .decision_id
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no decision_id", answer.request_id));
        let event = chain.decisions.get(id).unwrap_or_else(|| {
            panic!("{} ({id}) was answered but has no event", answer.request_id)
        });
        assert_event_matches(event, answer);
    }
    assert_eq!(
        late_events,
        unavailable.len(),
        "events of checks denied with 503 that reached the topic later"
    );
    assert_eq!(
        chain.decisions.len(),
        answers.len(),
        "decision events in the topic"
    );
    assert_eq!(
        chain.records.len(),
        answers.len() + chain.checkpoints().len() + chain.corrections(),
        "records in the chain"
    );
    assert_client_order(&answers, &chain);
    assert_eq!(
        chain.records.last().map(|record| record["reason"].clone()),
        Some(Value::from("shutdown")),
        "the last record"
    );

    let (code, output) = verify_topic(&setup, &kafka);
    report(&format!("{test}: audit verify exited {code:?}: {output}"));
    report(&format!(
        "{test}: topic order: {} records out of sequence order (first: {:?}), {} sequences missing",
        chain.out_of_order.len(),
        chain.out_of_order.first(),
        chain.missing.len()
    ));
    chain.assert_gapless_in_order();
    assert_eq!(output, whole_chain_report(&setup, &chain));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_with_spool_loses_and_doubles_nothing() {
    let test = "broker_stopped_with_spool_loses_and_doubles_nothing";
    let _serial = SERIAL.lock().await;
    let Some(mut kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else {
        return;
    };
    kafka
        .create_topic(TOPIC, 1)
        .await
        .unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    let delivery_timeout = Duration::from_millis(300);
    let setup = Setup::new(Durability::Spool, delivery_timeout, &kafka);
    let sidecar = Sidecar::start(&setup).await;

    let epoch = Instant::now();
    let load = Load::start(setup.grpc, "spooled-", CLIENTS, false, epoch).await;
    load.wait_for_answers(100, Duration::from_secs(20)).await;
    let stopping = epoch.elapsed();
    kafka.stop().await.expect("stopping Kafka failed");
    let stopped = epoch.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarting = epoch.elapsed();
    kafka
        .start_again()
        .await
        .unwrap_or_else(|error| panic!("starting Kafka again failed: {error}"));
    let restarted = epoch.elapsed();
    let after_restart_target = load.policy_answered() + 40;
    load.wait_for_policy_answers(after_restart_target, Duration::from_secs(30))
        .await;
    let answers = load.finish().await;

    let decision_ids: Vec<&str> = answers
        .iter()
        .filter_map(|answer| answer.decision_id.as_deref())
        .collect();
    let shipped_after = wait_for_shipping(&kafka, &decision_ids).await;
    let stop_time = sidecar.terminate().await;

    let messages = read_messages(&kafka).await;
    let chain = TopicChain::from_messages(&messages);
    let fallbacks = count(&answers, |answer| answer.elapsed >= delivery_timeout);
    let during_outage = count(&answers, |answer| {
        answer.sent_at > stopped && answer.sent_at < restarting
    });
    report(&format!(
        "{test}: broker stop {stopping:.1?}..{stopped:.1?}, start {restarting:.1?}..{restarted:.1?} after the load began; \
         {} checks ({} sent while the broker was down), {fallbacks} answered after audit.delivery_timeout {delivery_timeout:?} \
         (the spool fallback), max {:?}; the topic held every event {shipped_after:.1?} after the load stopped; \
         SIGTERM to exit {stop_time:.1?}; topic: {} messages, {} records, {} exact duplicates, checkpoints {:?}",
        answers.len(),
        during_outage,
        max_elapsed(&answers, |_| true),
        messages.len(),
        chain.records.len(),
        chain.duplicates,
        chain.checkpoint_reasons()
    ));

    // The spool answers every check while Kafka is away: no 503 and no gRPC error.
    assert_policy_answers(&answers, "checks");
    assert!(
        during_outage >= 2 * CLIENTS,
        "only {during_outage} checks sent while the broker was down"
    );
    assert!(
        fallbacks >= CLIENTS,
        "only {fallbacks} checks fell back to the spool:\n{}",
        sidecar_log(&setup)
    );
    for answer in &answers {
        assert!(
            answer.elapsed < AUDIT_TIMEOUT + RESPONSE_MARGIN,
            "{} was answered after {:?}",
            answer.request_id,
            answer.elapsed
        );
        let id = answer
            .decision_id
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no decision_id", answer.request_id));
        let event = chain
            .decisions
            .get(id)
            .unwrap_or_else(|| panic!("{} ({id}) has no event in the topic", answer.request_id));
        assert_event_matches(event, answer);
    }

    // One event per response, and the topic's chain is gapless and in order. A record can
    // reach the topic twice: the shipper resends every record after the first one without an
    // acknowledgement, and a record whose send timed out may already be in the log. The idempotent
    // producer removes only its own retries, not a resend, which is a new message. Such copies
    // are byte for byte equal, and verify counts and drops them.
    assert_eq!(
        chain.decisions.len(),
        answers.len(),
        "decision events in the topic"
    );
    assert_eq!(
        chain.records.len(),
        answers.len() + chain.checkpoints().len() + chain.corrections(),
        "records in the chain"
    );
    assert_eq!(
        messages.len(),
        chain.records.len() + chain.duplicates,
        "messages in the topic"
    );
    assert_client_order(&answers, &chain);
    assert_eq!(chain.records[0]["reason"], "start", "the first record");

    let (code, output) = verify_topic(&setup, &kafka);
    report(&format!("{test}: audit verify exited {code:?}: {output}"));
    report(&format!(
        "{test}: topic order: {} records out of sequence order (first: {:?}), {} sequences missing",
        chain.out_of_order.len(),
        chain.out_of_order.first(),
        chain.missing.len()
    ));
    chain.assert_gapless_in_order();
    assert_eq!(output, whole_chain_report(&setup, &chain));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_kafka_mode_loses_nothing_acknowledged() {
    let test = "sigkill_in_kafka_mode_loses_nothing_acknowledged";
    let _serial = SERIAL.lock().await;
    let Some(kafka) = Kafka::start_or_skip(test, KafkaOptions::default()).await else {
        return;
    };
    kafka
        .create_topic(TOPIC, 1)
        .await
        .unwrap_or_else(|error| panic!("creating the topic failed: {error}\n{}", kafka.log_tail()));
    // The documented configuration for restarts: a spool, which keeps every acknowledged record
    // and the chain head across a crash.
    let delivery_timeout = Duration::from_millis(300);
    let setup = Setup::new(Durability::Spool, delivery_timeout, &kafka);
    let sidecar = Sidecar::start(&setup).await;

    let epoch = Instant::now();
    let load = Load::start(setup.grpc, "killed-", CLIENTS, true, epoch).await;
    load.wait_for_answers(200, Duration::from_secs(30)).await;
    sidecar.signal(Signal::SIGKILL);
    let killed_at = epoch.elapsed();
    let before_kill = load.finish().await;
    drop(sidecar);

    let sidecar = Sidecar::start(&setup).await;
    let restarted_at = epoch.elapsed();
    let load = Load::start(setup.grpc, "restarted-", 2, false, epoch).await;
    load.wait_for_answers(60, Duration::from_secs(30)).await;
    let after_restart = load.finish().await;

    let answered: Vec<&Answer> = before_kill
        .iter()
        .chain(&after_restart)
        .filter(|answer| answer.is_answered())
        .collect();
    let decision_ids: Vec<&str> = answered
        .iter()
        .filter_map(|answer| answer.decision_id.as_deref())
        .collect();
    let shipped_after = wait_for_shipping(&kafka, &decision_ids).await;
    let stop_time = sidecar.terminate().await;

    let messages = read_messages(&kafka).await;
    let chain = TopicChain::from_messages(&messages);
    let failed_calls: Vec<&Answer> = before_kill
        .iter()
        .filter(|answer| !answer.is_answered())
        .collect();
    let answered_ids: HashSet<&str> = decision_ids.iter().copied().collect();
    let unanswered_events = chain
        .decisions
        .keys()
        .filter(|id| !answered_ids.contains(id.as_str()))
        .count();
    let reasons = chain.checkpoint_reasons();
    report(&format!(
        "{test}: SIGKILL at {killed_at:.1?} after {} answered checks ({} calls cut off by the kill); restart ready at {restarted_at:.1?}; \
         {} checks after the restart; the topic held every event {shipped_after:.1?} after the load stopped; SIGTERM to exit {stop_time:.1?}; \
         topic: {} messages, {} records, {} exact duplicates, checkpoints {reasons:?}, {unanswered_events} events of checks cut off by the kill",
        before_kill
            .iter()
            .filter(|answer| answer.is_answered())
            .count(),
        failed_calls.len(),
        after_restart.len(),
        messages.len(),
        chain.records.len(),
        chain.duplicates,
    ));

    // Each client stops at the call the kill cut off, so at most one per client fails.
    assert!(
        failed_calls.len() <= CLIENTS,
        "calls failed before the kill: {failed_calls:?}"
    );
    assert_policy_answers(answered.iter().copied(), "answered checks");
    assert!(
        after_restart.iter().all(Answer::is_answered),
        "a check after the restart failed"
    );
    for answer in &answered {
        let id = answer
            .decision_id
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no decision_id", answer.request_id));
        let event = chain.decisions.get(id).unwrap_or_else(|| {
            panic!("{} ({id}) was answered but has no event", answer.request_id)
        });
        assert_event_matches(event, answer);
    }
    // A check cut off by the kill may have been committed to the spool before the kill, and
    // is then shipped. No other unanswered check may be in the topic.
    assert!(
        unanswered_events <= failed_calls.len(),
        "{unanswered_events} events of checks that were never sent"
    );
    assert_eq!(
        chain.decisions.len(),
        answered.len() + unanswered_events,
        "decision events in the topic"
    );
    assert_eq!(
        chain.records.len(),
        chain.decisions.len() + chain.checkpoints().len() + chain.corrections(),
        "records in the chain"
    );
    assert_client_order(&before_kill, &chain);
    assert_client_order(&after_restart, &chain);
    assert_eq!(reasons["start"], 2, "one start checkpoint per run");
    let first_after_restart = after_restart
        .iter()
        .filter_map(|answer| {
            answer
                .decision_id
                .as_ref()
                .and_then(|id| chain.decisions.get(id))
        })
        .map(|event| event["sequence"].as_u64().expect("sequence"))
        .min()
        .expect("events after the restart");
    let last_before_kill = chain
        .decisions
        .values()
        .filter(|event| {
            event["request"]["request_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("killed-"))
        })
        .map(|event| event["sequence"].as_u64().expect("sequence"))
        .max()
        .expect("events before the kill");
    let restart_checkpoint = chain
        .records
        .iter()
        .skip(1)
        .find(|record| record["reason"] == "start")
        .expect("the second start checkpoint");
    let restart_sequence = restart_checkpoint["sequence"].as_u64().expect("sequence");
    assert!(
        last_before_kill < restart_sequence && restart_sequence < first_after_restart,
        "the restart's start checkpoint {restart_sequence} comes between the runs ({last_before_kill}, {first_after_restart})"
    );

    let (code, output) = verify_topic(&setup, &kafka);
    report(&format!("{test}: audit verify exited {code:?}: {output}"));
    report(&format!(
        "{test}: topic order: {} records out of sequence order (first: {:?}), {} sequences missing",
        chain.out_of_order.len(),
        chain.out_of_order.first(),
        chain.missing.len()
    ));
    chain.assert_gapless_in_order();
    assert_eq!(output, whole_chain_report(&setup, &chain));
    assert_eq!(code, Some(0));
}
