use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::spool::read_spool_lines;
use crate::test_event as event;
use crate::NoAuditObserver;
use crate::verify::{Position, Report, verify_lines};

/// What the fake transport does with one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Acknowledge,
    Fail,
    /// Never resolves, like a broker that stopped responding.
    Hang,
}

/// A transport that keeps what it acknowledged, in order, and follows a script. Like a Kafka
/// partition, after a failure it rejects every later send until the failed record is sent
/// again, so acknowledged records are always in sequence order.
struct FakeTransport {
    state: StdMutex<FakeState>,
}

struct FakeState {
    script: VecDeque<Behaviour>,
    delivered: Vec<u64>,
    failed_at: Option<u64>,
    sends: usize,
}

impl FakeTransport {
    fn new(script: &[Behaviour]) -> Arc<FakeTransport> {
        Arc::new(FakeTransport {
            state: StdMutex::new(FakeState { script: script.iter().copied().collect(), delivered: Vec::new(), failed_at: None, sends: 0 }),
        })
    }

    fn delivered(&self) -> Vec<u64> {
        self.state.lock().unwrap().delivered.clone()
    }

    fn sends(&self) -> usize {
        self.state.lock().unwrap().sends
    }
}

impl Transport for FakeTransport {
    fn send(&self, record: &Record) -> BoxFuture<'static, Result<(), TransportError>> {
        let mut state = self.state.lock().unwrap();
        state.sends += 1;
        if let Some(failed) = state.failed_at {
            if record.sequence != failed {
                return Box::pin(async { Err(TransportError::Retriable("earlier record failed".to_owned())) });
            }
            state.failed_at = None;
        }
        match state.script.pop_front().unwrap_or(Behaviour::Acknowledge) {
            Behaviour::Acknowledge => {
                state.delivered.push(record.sequence);
                Box::pin(async { Ok(()) })
            }
            Behaviour::Fail => {
                state.failed_at = Some(record.sequence);
                Box::pin(async { Err(TransportError::Retriable("broker unavailable".to_owned())) })
            }
            Behaviour::Hang => {
                state.failed_at = Some(record.sequence);
                Box::pin(futures::future::pending())
            }
        }
    }

    fn flush(&self, _timeout: Duration) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}

/// Counts what the pipeline reports.
#[derive(Default)]
struct CountingObserver {
    failures: StdMutex<Vec<&'static str>>,
    delivered: AtomicUsize,
    backlog_reports: AtomicUsize,
}

impl AuditObserver for CountingObserver {
    fn delivered(&self, _lag: Duration) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
    fn backlog(&self, _records: u64, _bytes: u64, _oldest: Option<Duration>) {
        self.backlog_reports.fetch_add(1, Ordering::Relaxed);
    }
    fn failure(&self, kind: &'static str) {
        self.failures.lock().unwrap().push(kind);
    }
}

impl CountingObserver {
    fn failures(&self, kind: &str) -> usize {
        self.failures.lock().unwrap().iter().filter(|failure| **failure == kind).count()
    }
}

fn spool_config(dir: &Path) -> SpoolConfig {
    SpoolConfig { dir: dir.to_owned(), max_bytes: 64 * 1024 * 1024, segment_bytes: 4096, fsync: true }
}

fn config(signer: &Arc<CheckpointSigner>) -> PipelineConfig {
    let mut config = PipelineConfig::new("pod-a");
    config.checkpoints = CheckpointPolicy { every: 1000, interval: Duration::from_secs(3600), signer: Some(Arc::clone(signer)) };
    config.retry_backoff = (Duration::from_millis(5), Duration::from_millis(20));
    config.send_timeout = Duration::from_millis(200);
    config
}

fn verify_spool(dir: &Path, signer: &CheckpointSigner) -> Report {
    let mut lines = Vec::new();
    for (path, file_lines) in read_spool_lines(dir).unwrap() {
        for (index, line) in file_lines.into_iter().enumerate() {
            lines.push((Position { source: path.display().to_string(), line: index as u64 + 1 }, line));
        }
    }
    verify_lines(lines, &[signer.verifying_key()])
}

fn decision_ids(dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    for (_, lines) in read_spool_lines(dir).unwrap() {
        for line in lines {
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if let Some(id) = value["decision_id"].as_str() {
                ids.push(id.to_owned());
            }
        }
    }
    ids
}

async fn record_all(pipeline: &AuditPipeline, ids: std::ops::Range<u32>) -> Vec<Result<(), SinkError>> {
    let records: Vec<_> = ids.map(|i| pipeline.record(&event(&format!("d{i}")))).collect();
    futures::future::join_all(records).await
}

#[tokio::test]
async fn spool_group_commits_and_restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut first = config(&signer);
    first.spool = Some(spool_config(dir.path()));
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(first.clone(), None, Arc::clone(&observer) as _).unwrap();
    let results = record_all(&pipeline, 0..300).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // One commit per batch: the 300 concurrent events need fewer commits than events.
    let commits = observer.backlog_reports.load(Ordering::Relaxed);
    assert!(commits < 300, "{commits} commits for 300 events");
    // Dropping without close is what a crash leaves: no shutdown checkpoint.
    drop(pipeline);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let before_restart = verify_spool(dir.path(), &signer);
    assert_eq!(before_restart.chains[0].problem, Some(crate::verify::Problem::Unsigned { from: 2, to: 301 }));

    let pipeline = AuditPipeline::start(first, None, Arc::new(NoAuditObserver)).unwrap();
    record_all(&pipeline, 300..310).await.into_iter().for_each(|result| result.unwrap());
    pipeline.close().await.unwrap();

    let report = verify_spool(dir.path(), &signer);
    assert!(report.is_whole(), "{report:?}");
    let chain = &report.chains[0];
    // Start checkpoint, 300 events, start checkpoint, 10 events, shutdown checkpoint.
    assert_eq!(chain.records, 313);
    assert_eq!(chain.checkpoints, 3);
    // The 300 concurrent events are in the order they reached the writer; the 10 later ones
    // follow them.
    let ids = decision_ids(dir.path());
    let mut concurrent = ids[..300].to_vec();
    concurrent.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("d{i}")).collect();
    expected.sort();
    assert_eq!(concurrent, expected);
    assert_eq!(ids[300..], (300..310).map(|i| format!("d{i}")).collect::<Vec<_>>()[..]);
    assert!(read_spool_lines(dir.path()).unwrap().len() > 1, "segments rotate at segment_bytes");
}

#[tokio::test]
async fn partial_last_line_is_removed_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.spool = Some(spool_config(dir.path()));

    let pipeline = AuditPipeline::start(config.clone(), None, Arc::new(NoAuditObserver)).unwrap();
    record_all(&pipeline, 0..3).await.into_iter().for_each(|result| result.unwrap());
    drop(pipeline);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (last_segment, _) = read_spool_lines(dir.path()).unwrap().pop().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(&last_segment).unwrap();
    std::io::Write::write_all(&mut file, b"{\"instance_id\":\"pod-a\",\"seq").unwrap();

    let pipeline = AuditPipeline::start(config, None, Arc::new(NoAuditObserver)).unwrap();
    pipeline.close().await.unwrap();

    let report = verify_spool(dir.path(), &signer);
    assert!(report.is_whole(), "{report:?}");
    assert_eq!(report.chains[0].records, 6);
}

#[tokio::test]
async fn full_spool_rejects_events() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.spool = Some(SpoolConfig { max_bytes: 4000, ..spool_config(dir.path()) });
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(config, None, Arc::clone(&observer) as _).unwrap();
    let mut accepted = 0;
    let mut rejected = 0;
    for i in 0..100 {
        match pipeline.record(&event(&format!("d{i}"))).await {
            Ok(()) => accepted += 1,
            Err(SinkError::Full { reason }) => {
                assert_eq!(reason, "the spool reached audit.spool.max_bytes");
                rejected += 1;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    pipeline.close().await.unwrap();

    assert!(accepted > 0, "accepted {accepted}, rejected {rejected}");
    assert!(rejected > 0, "accepted {accepted}, rejected {rejected}");
    assert_eq!(accepted + rejected, 100);
    assert_eq!(observer.failures("full"), rejected);
    assert_eq!(decision_ids(dir.path()).len(), accepted);
    let report = verify_spool(dir.path(), &signer);
    assert!(report.is_whole(), "{report:?}");
}

#[tokio::test]
async fn remote_ack_keeps_order() {
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.delivery_timeout = Duration::from_secs(5);
    let transport = FakeTransport::new(&[]);
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::clone(&observer) as _).unwrap();
    record_all(&pipeline, 0..50).await.into_iter().for_each(|result| result.unwrap());

    // Every event resolved only after its acknowledgement: start checkpoint and 50 events.
    let delivered = transport.delivered();
    assert!(delivered.len() >= 51, "{delivered:?}");
    assert_eq!(delivered[..51], (1..=51).collect::<Vec<u64>>()[..]);
    assert_eq!(observer.delivered.load(Ordering::Relaxed), 50);
    pipeline.close().await.unwrap();
    assert_eq!(transport.delivered(), (1..=52).collect::<Vec<u64>>());
}

#[tokio::test]
async fn transport_failures_resend_from_the_first_unacknowledged_record() {
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.delivery_timeout = Duration::from_secs(5);
    // Record 1 (the start checkpoint) goes through, record 2 fails twice, then all succeed.
    let transport = FakeTransport::new(&[Behaviour::Acknowledge, Behaviour::Fail, Behaviour::Fail]);
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::clone(&observer) as _).unwrap();
    record_all(&pipeline, 0..20).await.into_iter().for_each(|result| result.unwrap());
    pipeline.close().await.unwrap();

    assert_eq!(transport.delivered(), (1..=22).collect::<Vec<u64>>(), "every record once, in order");
    assert_eq!(observer.failures("transport_retriable"), 2);
    assert!(transport.sends() > 22, "failed records were sent again");
}

#[tokio::test]
async fn hung_transport_without_spool_recovers() {
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.delivery_timeout = Duration::from_millis(100);
    // The start checkpoint is acknowledged; the first event's send never resolves.
    let transport = FakeTransport::new(&[Behaviour::Acknowledge, Behaviour::Hang]);
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::clone(&observer) as _).unwrap();
    let first = pipeline.record(&event("d0")).await;
    assert!(matches!(first, Err(SinkError::NotAcknowledged { timeout }) if timeout == Duration::from_millis(100)), "{first:?}");
    assert_eq!(observer.failures("delivery_timeout"), 1);

    // The send timeout gives up on the hung send and resends the record of the failed check.
    let deadline = Instant::now() + Duration::from_secs(5);
    while transport.delivered() != vec![1, 2] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pipeline.record(&event("d1")).await.unwrap();
    pipeline.close().await.unwrap();

    assert_eq!(transport.delivered(), vec![1, 2, 3, 4], "the failed check's event was still shipped, in order");
    assert_eq!(observer.failures("transport_timeout"), 1);
}

#[tokio::test]
async fn hung_transport_falls_back_to_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.delivery_timeout = Duration::from_millis(100);
    config.spool = Some(spool_config(dir.path()));
    let transport = FakeTransport::new(&[Behaviour::Acknowledge, Behaviour::Hang]);
    let observer = Arc::new(CountingObserver::default());

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::clone(&observer) as _).unwrap();
    pipeline.record(&event("d0")).await.unwrap();
    assert_eq!(observer.failures("delivery_fallback"), 1);

    pipeline.record(&event("d1")).await.unwrap();
    assert_eq!(decision_ids(dir.path()), vec!["d0", "d1"]);
    // Shipping goes on in the background once the send timeout gave up on the hung send.
    let deadline = Instant::now() + Duration::from_secs(5);
    while transport.delivered() != vec![1, 2, 3] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(transport.delivered(), vec![1, 2, 3]);
    assert_eq!(observer.failures("transport_timeout"), 1);
}

#[tokio::test]
async fn unshipped_spool_is_shipped_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.spool = Some(spool_config(dir.path()));

    // First run: the transport fails everything after the start checkpoint.
    let down = FakeTransport::new(&[Behaviour::Acknowledge, Behaviour::Fail]);
    let pipeline = AuditPipeline::start(config.clone(), Some(down.clone()), Arc::new(NoAuditObserver)).unwrap();
    record_all(&pipeline, 0..30).await.into_iter().for_each(|result| result.unwrap());
    pipeline.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let shipped_first = down.delivered();
    assert_eq!(shipped_first[0], 1);

    // Second run: everything after what the first run shipped arrives, in order.
    let up = FakeTransport::new(&[]);
    let pipeline = AuditPipeline::start(config, Some(up.clone()), Arc::new(NoAuditObserver)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.delivered().last() != Some(&33) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = *shipped_first.last().unwrap();
    assert_eq!(up.delivered(), (after + 1..=33).collect::<Vec<u64>>());
    drop(pipeline);
}

#[tokio::test]
async fn state_file_continues_chain() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.state_file = Some(dir.path().join("head.json"));
    let transport = FakeTransport::new(&[]);

    let pipeline = AuditPipeline::start(config.clone(), Some(transport.clone()), Arc::new(NoAuditObserver)).unwrap();
    record_all(&pipeline, 0..5).await.into_iter().for_each(|result| result.unwrap());
    pipeline.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::new(NoAuditObserver)).unwrap();
    pipeline.record(&event("again")).await.unwrap();
    pipeline.close().await.unwrap();

    // Start, 5 events, shutdown; then start, 1 event, shutdown: one chain without gaps.
    assert_eq!(transport.delivered(), (1..=10).collect::<Vec<u64>>());
    assert_eq!(read_chain_head(&dir.path().join("head.json")).unwrap().sequence, 10);
}

#[test]
fn remote_ack_without_transport_is_rejected() {
    let mut config = PipelineConfig::new("pod-a");
    config.ack = AckMode::Remote;
    let error = AuditPipeline::start(config, None, Arc::new(NoAuditObserver)).err().unwrap();
    assert!(matches!(error, PipelineError::MissingTransport), "{error}");
}

#[tokio::test]
async fn remote_ack_without_spool_is_ready_after_first_acknowledgement() {
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.ack = AckMode::Remote;
    config.delivery_timeout = Duration::from_millis(100);
    config.send_timeout = Duration::from_millis(200);
    // The first send of the start checkpoint hangs; its resend is acknowledged.
    let transport = FakeTransport::new(&[Behaviour::Hang, Behaviour::Acknowledge]);

    let pipeline = AuditPipeline::start(config, Some(transport.clone()), Arc::new(NoAuditObserver)).unwrap();
    let mut ready = pipeline.ready();
    let early = tokio::time::timeout(Duration::from_millis(50), &mut ready).await;

    assert!(early.is_err(), "ready before any acknowledgement");
    tokio::time::timeout(Duration::from_secs(5), ready).await.expect("ready once the start checkpoint is acknowledged");
    assert_eq!(transport.delivered(), vec![1]);
}

#[tokio::test]
async fn spool_pipeline_is_ready_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(CheckpointSigner::generate().unwrap());
    let mut config = config(&signer);
    config.spool = Some(spool_config(dir.path()));
    let transport = FakeTransport::new(&[Behaviour::Hang]);

    let pipeline = AuditPipeline::start(config, Some(transport), Arc::new(NoAuditObserver)).unwrap();

    tokio::time::timeout(Duration::from_millis(50), pipeline.ready()).await.expect("a spool pipeline is ready at once");
}
