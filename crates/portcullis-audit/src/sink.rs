use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::thread;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use std::sync::Arc;

use crate::DecisionEvent;
use crate::chain::{ChainHead, record_header, seal, stated_hash};

/// Number of events waiting for the writer before `record` waits for room. Large enough
/// to absorb a burst while the writer fsyncs, small enough to bound memory (a few MB).
const QUEUE_CAPACITY: usize = 4096;

/// Most events written between two fsyncs; one fsync then acknowledges the whole batch.
const MAX_BATCH: usize = 1024;

/// Destination of decision events.
///
/// `record` resolves once the event is durable for this sink, and the check waits for it
/// before responding to Envoy, so an allowed request never lacks its event.
pub trait DecisionSink: Send + Sync {
    /// Records one event. The future is independent of `self`, so a check can hand it to a
    /// task that outlives a cancelled gRPC call.
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>>;

    /// Waits until every event recorded so far is durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>>;

    /// Ends recording at shutdown: the audit pipeline writes its shutdown checkpoint here.
    /// Other sinks only flush.
    fn close(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        self.flush()
    }

    /// Resolves once the sink can record events, at once for most sinks. The audit pipeline
    /// in `kafka` mode without a spool resolves once Kafka acknowledged a record of this run,
    /// because until then every check would be denied.
    fn ready(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }

    /// Short name for logs and metrics (`file`, `stdout`, `none`).
    fn name(&self) -> &'static str;
}

/// Why an event could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    #[error("cannot open decision event file {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("writing decision events to {target} failed: {reason}")]
    Write { target: String, reason: String },
    #[error("cannot encode decision event: {0}")]
    Encode(String),
    #[error("decision event writer for {0} has stopped")]
    Stopped(String),
    #[error("audit log is full: {reason}")]
    Full { reason: String },
    #[error("decision event not acknowledged by the transport within {timeout:?}")]
    NotAcknowledged { timeout: std::time::Duration },
}

/// Accepts every event and keeps none. For deployments that audit elsewhere, and for tests.
#[derive(Debug, Default)]
pub struct NullSink;

impl DecisionSink for NullSink {
    fn record(&self, _event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "none"
    }
}

/// Appends events as chained JSON lines to a file, with group commit: the writer thread
/// writes every queued event, fsyncs once (when enabled), then acknowledges the whole batch.
/// The chain continues from the file's last record when it belongs to the same instance. The
/// file sink writes no checkpoints; the spool mode of the audit pipeline does.
pub struct FileSink {
    writer: LineWriter,
}

impl FileSink {
    /// Opens (or creates) `path` for appending, creating missing parent folders.
    pub fn open(path: &Path, fsync: bool, instance_id: &str) -> Result<Self, SinkError> {
        let open_error = |error: io::Error| SinkError::Open { path: path.to_owned(), reason: error.to_string() };
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(open_error)?;
        }
        let head = last_chain_head(path, instance_id).map_err(open_error)?;
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(open_error)?;
        let target = Target::File { writer: BufWriter::new(file), fsync };
        Ok(Self { writer: LineWriter::spawn(path.display().to_string(), target, Chain::new(instance_id, head)) })
    }
}

/// Returns the head of `instance_id`'s chain from the last line of an existing file.
fn last_chain_head(path: &Path, instance_id: &str) -> io::Result<ChainHead> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(ChainHead::genesis()),
        Err(error) => return Err(error),
    };
    let last = text.split(|byte| *byte == b'\n').rfind(|line| !line.is_empty());
    let head = last.and_then(|line| {
        let header = record_header(line).ok().filter(|header| header.instance_id == instance_id)?;
        Some(ChainHead { sequence: header.sequence, hash: stated_hash(line)?.to_owned() })
    });
    Ok(head.unwrap_or_else(ChainHead::genesis))
}

/// The chain state of a line writer.
struct Chain {
    instance_id: Arc<str>,
    head: ChainHead,
}

impl Chain {
    fn new(instance_id: &str, head: ChainHead) -> Chain {
        Chain { instance_id: Arc::from(instance_id), head }
    }
}

impl DecisionSink for FileSink {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        self.writer.record(event)
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        self.writer.flush()
    }

    fn name(&self) -> &'static str {
        "file"
    }
}

/// Writes events as JSON lines to standard output, for log collectors that read it.
pub struct StdoutSink {
    writer: LineWriter,
}

impl StdoutSink {
    /// Starts a chain for `instance_id`; each run of the process starts a new chain, since
    /// standard output cannot be read back.
    pub fn new(instance_id: &str) -> Self {
        Self { writer: LineWriter::spawn("stdout".to_owned(), Target::Stdout(io::stdout()), Chain::new(instance_id, ChainHead::genesis())) }
    }
}

impl DecisionSink for StdoutSink {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        self.writer.record(event)
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        self.writer.flush()
    }

    fn name(&self) -> &'static str {
        "stdout"
    }
}

enum Target {
    File { writer: BufWriter<File>, fsync: bool },
    Stdout(io::Stdout),
}

impl Target {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Target::File { writer, .. } => writer.write_all(line),
            Target::Stdout(stdout) => stdout.lock().write_all(line),
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        match self {
            Target::File { writer, fsync } => {
                writer.flush()?;
                if *fsync {
                    writer.get_ref().sync_data()?;
                }
                Ok(())
            }
            Target::Stdout(stdout) => stdout.lock().flush(),
        }
    }
}

enum Message {
    /// An encoded event, chained by the writer thread.
    Record { line: Vec<u8>, done: oneshot::Sender<Result<(), SinkError>> },
    Flush { done: oneshot::Sender<Result<(), SinkError>> },
}

/// A dedicated thread that owns the output, so blocking writes and fsyncs never stall the
/// async workers that respond to checks.
struct LineWriter {
    target_name: String,
    queue: mpsc::Sender<Message>,
}

impl LineWriter {
    fn spawn(target_name: String, target: Target, chain: Chain) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let thread_target = target_name.clone();
        thread::Builder::new()
            .name("decision-writer".to_owned())
            .spawn(move || write_batches(thread_target, target, chain, receiver))
            .expect("spawning the decision writer thread");
        Self { target_name, queue }
    }

    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        let line = match serde_json::to_vec(event) {
            Ok(line) => line,
            Err(error) => return Box::pin(async move { Err(SinkError::Encode(error.to_string())) }),
        };
        let (done, acknowledged) = oneshot::channel();
        self.send(Message::Record { line, done }, acknowledged)
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        let (done, acknowledged) = oneshot::channel();
        self.send(Message::Flush { done }, acknowledged)
    }

    fn send(
        &self,
        message: Message,
        acknowledged: oneshot::Receiver<Result<(), SinkError>>,
    ) -> BoxFuture<'static, Result<(), SinkError>> {
        let queue = self.queue.clone();
        let target_name = self.target_name.clone();
        Box::pin(async move {
            let stopped = || SinkError::Stopped(target_name.clone());
            queue.send(message).await.map_err(|_| stopped())?;
            acknowledged.await.map_err(|_| stopped())?
        })
    }
}

fn write_batches(target_name: String, mut target: Target, mut chain: Chain, mut receiver: mpsc::Receiver<Message>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }

        let head_before = chain.head.clone();
        let mut outcome = Ok(());
        for message in &batch {
            if let Message::Record { line, .. } = message {
                let sealed = match seal(&chain.instance_id, &chain.head, line) {
                    Ok((record, head)) => {
                        chain.head = head;
                        let mut sealed = record.bytes.to_vec();
                        sealed.push(b'\n');
                        sealed
                    }
                    Err(error) => {
                        outcome = outcome.and_then(|()| Err(io::Error::other(error.to_string())));
                        continue;
                    }
                };
                outcome = outcome.and_then(|()| target.write_line(&sealed));
            }
        }
        let outcome = outcome.and_then(|()| target.commit()).map_err(|error| {
            // The lines may be partly written; continuing from the old head keeps the chain
            // linked to what a reader can verify.
            chain.head = head_before.clone();
            tracing::error!(sink.target = %target_name, %error, "writing decision events failed");
            SinkError::Write { target: target_name.clone(), reason: error.to_string() }
        });

        for message in batch.drain(..) {
            let done = match message {
                Message::Record { done, .. } | Message::Flush { done } => done,
            };
            // A receiver that is gone belongs to a check that no longer waits; nothing to do.
            let _ = done.send(outcome.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_event as event;

    #[tokio::test]
    async fn file_sink_appends_one_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/decisions.jsonl");
        let sink = FileSink::open(&path, true, "pod-a").unwrap();

        let records: Vec<_> = (0..50).map(|i| sink.record(&event(&format!("d{i}")))).collect();
        for record in records {
            record.await.unwrap();
        }

        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["decision_id"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..50).map(|i| format!("d{i}")).collect();
        assert_eq!(ids, expected);
    }

    #[tokio::test]
    async fn file_sink_keeps_existing_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();

        let sink = FileSink::open(&path, false, "pod-a").unwrap();
        sink.record(&event("d1")).await.unwrap();
        sink.flush().await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(text.lines().next().unwrap(), "{\"earlier\":true}");
    }

    #[tokio::test]
    async fn file_sink_chain_continues_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let sink = FileSink::open(&path, false, "pod-a").unwrap();
        sink.record(&event("d1")).await.unwrap();
        sink.record(&event("d2")).await.unwrap();
        drop(sink);

        let sink = FileSink::open(&path, false, "pod-a").unwrap();
        sink.record(&event("d3")).await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<serde_json::Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        let sequences: Vec<u64> = records.iter().map(|record| record["sequence"].as_u64().unwrap()).collect();
        assert_eq!(sequences, vec![1, 2, 3]);
        assert_eq!(records[0]["prev_hash"], crate::chain::GENESIS_HASH);
        assert_eq!(records[2]["prev_hash"], records[1]["hash"]);
        assert_eq!(records[1]["prev_hash"], records[0]["hash"]);
    }

    #[test]
    fn file_sink_reports_unwritable_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();

        let error = FileSink::open(&blocker.join("decisions.jsonl"), true, "pod-a").err().unwrap();
        assert!(matches!(error, SinkError::Open { .. }), "{error}");
    }

    #[tokio::test]
    async fn event_serialises_with_schema_and_omits_missing_reason() {
        let value = serde_json::to_value(event("d1")).unwrap();
        assert_eq!(value["schema"], "portcullis.decision.v2");
        assert_eq!(value["decision"], serde_json::json!({"allowed": true, "http_status": 200}));
        assert_eq!(value["policy"]["bundle_revision"], "r1");
    }
}
