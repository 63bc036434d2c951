//! The audit pipeline: one ordered writer that chains every record into a local log (a file
//! spool or a bounded memory queue), writes signed checkpoints, and a shipper that sends the
//! log through a [`Transport`] in order.
//!
//! The writer is a dedicated thread, so blocking writes and fsyncs never stall the async
//! workers that respond to checks. It takes commands in arrival order, seals each event with the
//! next sequence number and the previous hash, commits the whole batch at once (group commit)
//! and acknowledges the batch. The shipper is a task that reads committed records in order, keeps
//! every unacknowledged one, and after a failure resends from the first unacknowledged record
//! with exponential backoff, so the remote log receives each instance's chain in order (with
//! possible exact duplicates, which readers drop).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::chain::{ChainHead, seal, stated_hash};
use crate::checkpoint::{CHECKPOINT_SCHEMA, Checkpoint, CheckpointReason, CheckpointSigner, signed_message};
use crate::spool::{Spool, SpoolConfig, SpoolHandle, SpoolReader, read_chain_head, write_chain_head};
use crate::{AuditObserver, DecisionEvent, DecisionSink, Record, SinkError, Transport, TransportError, format_rfc3339};

/// Commands waiting for the writer before `record` waits for room.
const COMMAND_QUEUE: usize = 4096;
/// Most commands handled in one batch, so one fsync acknowledges up to this many events.
const MAX_BATCH: usize = 1024;
/// Most records kept only for the lag and age metrics while the transport is behind; beyond
/// it, newer records are not tracked, so memory stays bounded during a long outage and the
/// oldest tracked record still gives the age of the backlog.
const MAX_TRACKED: usize = 100_000;
/// Most records the shipper has sent but not yet seen acknowledged. Bounds the memory the
/// shipper holds for resending; Kafka producers batch far fewer than this per partition.
const MAX_IN_FLIGHT: usize = 10_000;

/// When a check's `record` resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Once the record is committed to the local log (fsynced spool); shipping is asynchronous.
    Local,
    /// Once the transport acknowledged the record. When that takes longer than the delivery
    /// deadline, the record resolves from the spool if there is one, else it fails.
    Remote,
}

/// Checkpoint settings.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// Records after which a checkpoint is written.
    pub every: u64,
    /// Time after which a checkpoint is written when records were written since the last one.
    pub interval: Duration,
    /// No checkpoints are written without a key.
    pub signer: Option<Arc<CheckpointSigner>>,
}

/// Everything the pipeline needs to start.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub instance_id: String,
    pub ack: AckMode,
    /// The local log; without it, records wait in a memory queue of `queue_capacity` records.
    pub spool: Option<SpoolConfig>,
    pub queue_capacity: usize,
    /// File that stores the acknowledged chain head when there is no spool, so a restart
    /// continues the chain.
    pub state_file: Option<PathBuf>,
    pub checkpoints: CheckpointPolicy,
    /// How long a check waits for the transport in [`AckMode::Remote`].
    pub delivery_timeout: Duration,
    /// Bound on one send; a send without a result by then is treated as timed out.
    pub send_timeout: Duration,
    /// First and longest wait before resending after a transport failure.
    pub retry_backoff: (Duration, Duration),
}

impl PipelineConfig {
    /// Builds a configuration with the defaults documented in docs/configuration.md.
    pub fn new(instance_id: impl Into<String>) -> PipelineConfig {
        PipelineConfig {
            instance_id: instance_id.into(),
            ack: AckMode::Local,
            spool: None,
            queue_capacity: 100_000,
            state_file: None,
            checkpoints: CheckpointPolicy { every: 1000, interval: Duration::from_secs(10), signer: None },
            delivery_timeout: Duration::from_millis(500),
            send_timeout: Duration::from_secs(30),
            retry_backoff: (Duration::from_millis(100), Duration::from_secs(30)),
        }
    }
}

/// Failure to start the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("acknowledgement by a transport was requested but no transport was given")]
    MissingTransport,
    #[error("without a spool or a transport, records would go nowhere")]
    NoDestination,
    #[error("cannot write the start checkpoint: {0}")]
    StartCheckpoint(String),
}

/// An event that is not yet acknowledged by the transport.
struct Pending {
    recorded_at: Instant,
    waiter: Option<oneshot::Sender<()>>,
}

type PendingMap = Arc<Mutex<BTreeMap<u64, Pending>>>;
type Reply = oneshot::Sender<Result<Option<oneshot::Receiver<()>>, SinkError>>;

enum Command {
    Event { payload: Vec<u8>, recorded_at: Instant, done: Reply },
    Tick,
    Flush { done: Reply },
    Close { done: Reply },
}

/// The audit pipeline, used as the [`DecisionSink`] of the check path.
pub struct AuditPipeline {
    commands: mpsc::Sender<Command>,
    name: &'static str,
    has_spool: bool,
    delivery_timeout: Duration,
    observer: Arc<dyn AuditObserver>,
    fallbacks: Arc<AtomicU64>,
    acknowledged: Option<watch::Receiver<u64>>,
    committed: Arc<AtomicU64>,
    ticker: tokio::task::JoinHandle<()>,
}

impl AuditPipeline {
    /// Opens the local log, writes a start checkpoint linked to the recovered chain head, and
    /// starts the writer thread, the checkpoint timer and (with a transport) the shipper.
    /// Must be called inside a Tokio runtime.
    pub fn start(
        config: PipelineConfig,
        transport: Option<Arc<dyn Transport>>,
        observer: Arc<dyn AuditObserver>,
    ) -> Result<AuditPipeline, PipelineError> {
        if config.ack == AckMode::Remote && transport.is_none() {
            return Err(PipelineError::MissingTransport);
        }
        if config.spool.is_none() && transport.is_none() {
            return Err(PipelineError::NoDestination);
        }
        let instance_id: Arc<str> = Arc::from(config.instance_id.as_str());

        let (log, head, shipped_head) = open_log(&config, &instance_id)?;
        let pending: PendingMap = Arc::default();
        let committed = Arc::new(AtomicU64::new(head.sequence));
        let (committed_sender, committed_receiver) = watch::channel(head.sequence);
        let (memory_sender, memory_receiver) = mpsc::unbounded_channel();
        let memory = MemoryQueue::new(config.queue_capacity);

        let mut writer = Writer {
            instance_id: Arc::clone(&instance_id),
            head,
            log,
            memory: memory.clone(),
            memory_sender,
            checkpoints: config.checkpoints.clone(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            pending: Arc::clone(&pending),
            tracks_delivery: transport.is_some(),
            ack: config.ack,
            observer: Arc::clone(&observer),
            committed: Arc::clone(&committed),
            committed_sender,
        };
        writer.write_start_checkpoint()?;

        let acknowledged = transport.as_ref().map(|transport| {
            let (acknowledged_sender, acknowledged_receiver) = watch::channel(shipped_head.sequence);
            let source = match writer.log.spool_handle() {
                Some(handle) => Source::Spool { reader: handle.reader(shipped_head.sequence), committed: committed_receiver.clone() },
                None => Source::Memory { queue: memory_receiver, stash: VecDeque::new() },
            };
            let progress = match writer.log.spool_handle() {
                Some(handle) => Progress::Spool(handle),
                None => Progress::StateFile(config.state_file.clone()),
            };
            let shipper = Shipper {
                transport: Arc::clone(transport),
                instance_id: Arc::clone(&instance_id),
                source,
                unacknowledged: VecDeque::new(),
                in_flight: FuturesOrdered::new(),
                pending: Arc::clone(&pending),
                observer: Arc::clone(&observer),
                progress,
                memory: memory.clone(),
                acknowledged: acknowledged_sender,
                send_timeout: config.send_timeout,
                backoff: config.retry_backoff,
                last_acknowledged: None,
            };
            tokio::spawn(shipper.run());
            acknowledged_receiver
        });

        let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
        thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || writer.run(receiver))
            .map_err(|error| PipelineError::StartCheckpoint(format!("cannot start the audit writer thread: {error}")))?;
        let ticker = tokio::spawn(tick(commands.clone(), config.checkpoints.interval));

        Ok(AuditPipeline {
            commands,
            name: if transport.is_some() { "pipeline" } else { "spool" },
            has_spool: config.spool.is_some(),
            delivery_timeout: config.delivery_timeout,
            observer,
            fallbacks: Arc::default(),
            acknowledged,
            committed,
            ticker,
        })
    }

    fn send(&self, command: Command, reply: oneshot::Receiver<Result<Option<oneshot::Receiver<()>>, SinkError>>) -> BoxFuture<'static, Result<Option<oneshot::Receiver<()>>, SinkError>> {
        let commands = self.commands.clone();
        Box::pin(async move {
            let stopped = || SinkError::Stopped("audit pipeline".to_owned());
            commands.send(command).await.map_err(|_| stopped())?;
            reply.await.map_err(|_| stopped())?
        })
    }
}

impl Drop for AuditPipeline {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl DecisionSink for AuditPipeline {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        let payload = match serde_json::to_vec(event) {
            Ok(payload) => payload,
            Err(error) => return Box::pin(async move { Err(SinkError::Encode(error.to_string())) }),
        };
        let (done, reply) = oneshot::channel();
        let committed = self.send(Command::Event { payload, recorded_at: Instant::now(), done }, reply);
        let delivery_timeout = self.delivery_timeout;
        let has_spool = self.has_spool;
        let observer = Arc::clone(&self.observer);
        let fallbacks = Arc::clone(&self.fallbacks);
        Box::pin(async move {
            let Some(acknowledged) = committed.await? else { return Ok(()) };
            match tokio::time::timeout(delivery_timeout, acknowledged).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(SinkError::Stopped("audit shipper".to_owned())),
                Err(_) if has_spool => {
                    observer.failure("delivery_fallback");
                    let count = fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
                    if count.is_power_of_two() || count.is_multiple_of(1000) {
                        warn!(audit.fallbacks = count, timeout = ?delivery_timeout, "transport did not acknowledge in time; checks are confirmed from the fsynced spool and their records are shipped later");
                    }
                    Ok(())
                }
                Err(_) => {
                    observer.failure("delivery_timeout");
                    Err(SinkError::NotAcknowledged { timeout: delivery_timeout })
                }
            }
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        let (done, reply) = oneshot::channel();
        let flushed = self.send(Command::Flush { done }, reply);
        Box::pin(async move { flushed.await.map(|_| ()) })
    }

    /// Writes the shutdown checkpoint and stops the writer. Without a spool, also waits until
    /// the transport acknowledged every record, which would otherwise be lost.
    fn close(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        let (done, reply) = oneshot::channel();
        let closed = self.send(Command::Close { done }, reply);
        let wait_for_shipping = (!self.has_spool).then(|| self.acknowledged.clone()).flatten();
        let committed = Arc::clone(&self.committed);
        Box::pin(async move {
            closed.await?;
            if let Some(mut acknowledged) = wait_for_shipping {
                let last = committed.load(Ordering::Acquire);
                acknowledged
                    .wait_for(|sequence| *sequence >= last)
                    .await
                    .map_err(|_| SinkError::Stopped("audit shipper".to_owned()))?;
            }
            Ok(())
        })
    }

    /// Without a spool, checks wait for Kafka, so the pipeline is ready once a record of this
    /// run (the start checkpoint comes first) is acknowledged. With a spool it is ready at once.
    fn ready(&self) -> BoxFuture<'static, ()> {
        let waiting = (!self.has_spool).then(|| self.acknowledged.clone()).flatten();
        Box::pin(async move {
            if let Some(mut acknowledged) = waiting {
                let _ = acknowledged.changed().await;
            }
        })
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

/// Asks the writer for an interval checkpoint check every `interval`.
async fn tick(commands: mpsc::Sender<Command>, interval: Duration) {
    if interval.is_zero() {
        return;
    }
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await;
    loop {
        timer.tick().await;
        if commands.send(Command::Tick).await.is_err() {
            return;
        }
    }
}

/// Counts of the memory queue, shared by the writer (adds) and the shipper (removes).
#[derive(Clone)]
struct MemoryQueue {
    records: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    capacity: u64,
}

impl MemoryQueue {
    fn new(capacity: usize) -> MemoryQueue {
        MemoryQueue { records: Arc::default(), bytes: Arc::default(), capacity: capacity as u64 }
    }
}

enum LocalLog {
    Spool(Spool),
    Memory,
}

impl LocalLog {
    fn spool_handle(&self) -> Option<SpoolHandle> {
        match self {
            LocalLog::Spool(spool) => Some(spool.handle()),
            LocalLog::Memory => None,
        }
    }
}

/// Opens the local log and returns it with the chain head to continue from and the head the
/// transport acknowledged before.
fn open_log(config: &PipelineConfig, instance_id: &Arc<str>) -> Result<(LocalLog, ChainHead, ChainHead), PipelineError> {
    match &config.spool {
        Some(spool_config) => {
            let (spool, recovered) = Spool::open(spool_config.clone(), instance_id)?;
            if recovered.truncated_bytes > 0 {
                warn!(audit.spool = %spool_config.dir.display(), bytes = recovered.truncated_bytes, "removed a partial record at the end of the spool, left by an interrupted write; it was never acknowledged");
            }
            info!(
                audit.spool = %spool_config.dir.display(),
                audit.sequence = recovered.head.sequence,
                audit.shipped = recovered.shipped.sequence,
                "audit spool opened; the chain continues from its newest record"
            );
            Ok((LocalLog::Spool(spool), recovered.head, recovered.shipped))
        }
        None => {
            let head = config.state_file.as_deref().and_then(read_chain_head).unwrap_or_else(ChainHead::genesis);
            Ok((LocalLog::Memory, head.clone(), head))
        }
    }
}

/// The state of the writer thread.
struct Writer {
    instance_id: Arc<str>,
    head: ChainHead,
    log: LocalLog,
    memory: MemoryQueue,
    memory_sender: mpsc::UnboundedSender<Record>,
    checkpoints: CheckpointPolicy,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    pending: PendingMap,
    tracks_delivery: bool,
    ack: AckMode,
    observer: Arc<dyn AuditObserver>,
    committed: Arc<AtomicU64>,
    committed_sender: watch::Sender<u64>,
}

/// Reply the writer sends once a batch is committed.
enum Answer {
    Event { done: Reply, sequence: u64, waiter: Option<oneshot::Receiver<()>> },
    Done { done: Reply },
}

impl Writer {
    /// Writes the start checkpoint before any event, so the records of the previous run,
    /// including those after its last checkpoint, are signed.
    fn write_start_checkpoint(&mut self) -> Result<(), PipelineError> {
        let Some(record) = self.checkpoint(CheckpointReason::Start).map_err(PipelineError::StartCheckpoint)? else {
            return Ok(());
        };
        let batch = vec![(record, None)];
        self.commit(&batch).map_err(|error| PipelineError::StartCheckpoint(error.to_string()))
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut commands = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = receiver.blocking_recv() {
            commands.push(first);
            while commands.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(command) => commands.push(command),
                    Err(_) => break,
                }
            }
            let closing = self.handle_batch(std::mem::take(&mut commands));
            if closing {
                info!(audit.sequence = self.head.sequence, "audit writer closed");
                return;
            }
        }
    }

    /// Seals, commits and acknowledges one batch. Returns whether it closed the pipeline.
    fn handle_batch(&mut self, commands: Vec<Command>) -> bool {
        let head_before = self.head.clone();
        let since_before = self.since_checkpoint;
        let mut records: Vec<(Record, Option<Instant>)> = Vec::new();
        let mut answers = Vec::new();
        let mut batch_bytes = 0u64;
        let mut closing = false;

        for command in commands {
            match command {
                Command::Event { payload, recorded_at, done } => {
                    let (record, head) = match seal(&self.instance_id, &self.head, &payload) {
                        Ok(sealed) => sealed,
                        Err(error) => {
                            let _ = done.send(Err(SinkError::Encode(error.to_string())));
                            continue;
                        }
                    };
                    if let Err(reason) = self.check_room(batch_bytes, records.len() as u64, record.bytes.len() as u64) {
                        self.reject_full(&payload, &reason);
                        let _ = done.send(Err(SinkError::Full { reason }));
                        continue;
                    }
                    batch_bytes += record.bytes.len() as u64 + 1;
                    self.head = head;
                    self.since_checkpoint += 1;
                    answers.push(Answer::Event { done, sequence: record.sequence, waiter: None });
                    records.push((record, Some(recorded_at)));
                    if self.since_checkpoint >= self.checkpoints.every {
                        self.push_checkpoint(CheckpointReason::Count, &mut records);
                    }
                }
                Command::Tick => {
                    if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.checkpoints.interval {
                        self.push_checkpoint(CheckpointReason::Interval, &mut records);
                    }
                }
                Command::Flush { done } => answers.push(Answer::Done { done }),
                Command::Close { done } => {
                    self.push_checkpoint(CheckpointReason::Shutdown, &mut records);
                    answers.push(Answer::Done { done });
                    closing = true;
                    break;
                }
            }
        }

        // Register the waiters before the shipper can see the records, so every
        // acknowledgement finds its waiter.
        if self.tracks_delivery {
            let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for answer in &mut answers {
                if let Answer::Event { sequence, waiter, .. } = answer {
                    let (sender, receiver) = oneshot::channel();
                    let recorded_at = records.iter().find(|(record, _)| record.sequence == *sequence).and_then(|(_, at)| *at).unwrap_or_else(Instant::now);
                    let sender = (self.ack == AckMode::Remote).then_some(sender);
                    if sender.is_some() {
                        *waiter = Some(receiver);
                    } else if pending.len() >= MAX_TRACKED {
                        continue;
                    }
                    pending.insert(*sequence, Pending { recorded_at, waiter: sender });
                }
            }
        }

        let outcome = self.commit(&records);
        if let Err(error) = &outcome {
            error!(%error, records = records.len(), "writing audit records failed; the checks of this batch are denied with 503");
            self.observer.failure("write");
            self.head = head_before;
            self.since_checkpoint = since_before;
            let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (record, _) in &records {
                pending.remove(&record.sequence);
            }
        }

        for answer in answers {
            match answer {
                Answer::Event { done, waiter, .. } => {
                    let _ = done.send(outcome.clone().map(|()| waiter));
                }
                Answer::Done { done } => {
                    let _ = done.send(outcome.clone().map(|()| None));
                }
            }
        }
        closing
    }

    fn check_room(&self, batch_bytes: u64, batch_records: u64, record_bytes: u64) -> Result<(), String> {
        match &self.log {
            LocalLog::Spool(spool) if !spool.fits(batch_bytes + record_bytes + 1) => Err("the spool reached audit.spool.max_bytes".to_owned()),
            LocalLog::Memory if self.memory.records.load(Ordering::Acquire) + batch_records >= self.memory.capacity => {
                Err(format!("{} records wait for the transport", self.memory.capacity))
            }
            _ => Ok(()),
        }
    }

    /// Logs an event that could not be recorded, so that it does not disappear silently.
    fn reject_full(&self, payload: &[u8], reason: &str) {
        self.observer.failure("full");
        error!(
            audit.event = %String::from_utf8_lossy(payload),
            reason,
            "audit log full: the check is denied with 503 and its event is only in this log line"
        );
    }

    fn push_checkpoint(&mut self, reason: CheckpointReason, records: &mut Vec<(Record, Option<Instant>)>) {
        match self.checkpoint(reason) {
            Ok(Some(record)) => records.push((record, None)),
            Ok(None) => {}
            Err(message) => error!(error = %message, "cannot write an audit checkpoint"),
        }
    }

    /// Seals a signed checkpoint after the current head; `None` without a signing key.
    fn checkpoint(&mut self, reason: CheckpointReason) -> Result<Option<Record>, String> {
        let Some(signer) = self.checkpoints.signer.clone() else { return Ok(None) };
        let time = format_rfc3339(SystemTime::now());
        let sequence = self.head.sequence + 1;
        let message = signed_message(&self.instance_id, sequence, &self.head.hash, &time, reason);
        let checkpoint = Checkpoint {
            schema: CHECKPOINT_SCHEMA.to_owned(),
            time,
            reason,
            key_id: signer.key_id().to_owned(),
            signature: signer.sign(&message),
        };
        let payload = serde_json::to_vec(&checkpoint).map_err(|error| error.to_string())?;
        let (record, head) = seal(&self.instance_id, &self.head, &payload).map_err(|error| error.to_string())?;
        self.head = head;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.observer.checkpoint_written();
        Ok(Some(record))
    }

    /// Makes a batch durable in the local log and visible to the shipper.
    fn commit(&mut self, records: &[(Record, Option<Instant>)]) -> Result<(), SinkError> {
        let Some((last, _)) = records.last() else { return Ok(()) };
        let last_sequence = last.sequence;
        match &mut self.log {
            LocalLog::Spool(spool) => {
                let batch: Vec<Record> = records.iter().map(|(record, _)| record.clone()).collect();
                spool.append(&batch).map_err(|error| SinkError::Write { target: "audit spool".to_owned(), reason: error.to_string() })?;
                if let Some(handle) = self.log.spool_handle() {
                    let (records, bytes) = handle.backlog();
                    self.observer.backlog(records, bytes, None);
                }
            }
            LocalLog::Memory => {
                for (record, _) in records {
                    self.memory.records.fetch_add(1, Ordering::AcqRel);
                    self.memory.bytes.fetch_add(record.bytes.len() as u64, Ordering::AcqRel);
                    // The shipper only stops when the runtime shuts down; records are then lost
                    // with the process either way.
                    let _ = self.memory_sender.send(record.clone());
                }
            }
        }
        self.committed.store(last_sequence, Ordering::Release);
        let _ = self.committed_sender.send(last_sequence);
        Ok(())
    }
}

/// Source of the records the shipper sends.
enum Source {
    Spool { reader: SpoolReader, committed: watch::Receiver<u64> },
    Memory { queue: mpsc::UnboundedReceiver<Record>, stash: VecDeque<Record> },
}

impl Source {
    /// Returns up to `max` records that are ready now.
    ///
    /// NOTE: the spool is read on the async worker; the segments were just written, so reads
    /// normally come from the page cache, but a cold read of a large backlog blocks a worker.
    fn ready(&mut self, instance_id: &Arc<str>, max: usize) -> Vec<Record> {
        match self {
            Source::Spool { reader, .. } => reader.read(instance_id, max).unwrap_or_else(|error| {
                error!(%error, "reading the audit spool failed; shipping pauses until new records are committed");
                Vec::new()
            }),
            Source::Memory { queue, stash } => {
                let mut records: Vec<Record> = stash.drain(..).collect();
                while records.len() < max {
                    match queue.try_recv() {
                        Ok(record) => records.push(record),
                        Err(_) => break,
                    }
                }
                records
            }
        }
    }

    /// Waits until more records may be ready; `false` when none will come again.
    async fn wait(&mut self) -> bool {
        match self {
            Source::Spool { committed, .. } => committed.changed().await.is_ok(),
            Source::Memory { queue, stash } => match queue.recv().await {
                Some(record) => {
                    stash.push_back(record);
                    true
                }
                None => false,
            },
        }
    }
}

/// Store of how far the transport acknowledged.
enum Progress {
    Spool(SpoolHandle),
    StateFile(Option<PathBuf>),
}

type SendResult = (u64, Result<(), TransportError>);

struct Shipper {
    transport: Arc<dyn Transport>,
    instance_id: Arc<str>,
    source: Source,
    unacknowledged: VecDeque<Record>,
    in_flight: FuturesOrdered<BoxFuture<'static, SendResult>>,
    pending: PendingMap,
    observer: Arc<dyn AuditObserver>,
    progress: Progress,
    memory: MemoryQueue,
    acknowledged: watch::Sender<u64>,
    send_timeout: Duration,
    backoff: (Duration, Duration),
    last_acknowledged: Option<ChainHead>,
}

impl Shipper {
    async fn run(mut self) {
        let mut backoff = self.backoff.0;
        let mut source_open = true;
        loop {
            self.fill_window();
            if !source_open && self.in_flight.is_empty() {
                return;
            }

            tokio::select! {
                Some((sequence, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => match result {
                    Ok(()) => {
                        self.acknowledge(sequence);
                        while let Some(Some((sequence, Ok(())))) = futures::FutureExt::now_or_never(self.in_flight.next()) {
                            self.acknowledge(sequence);
                        }
                        self.store_progress().await;
                        backoff = self.backoff.0;
                    }
                    Err(error) => {
                        self.report_failure(sequence, &error, backoff);
                        self.settle_in_flight().await;
                        if let Err(error) = self.transport.reset().await {
                            warn!(audit.transport = self.transport.name(), %error, "resetting the audit transport failed; resending anyway");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.backoff.1);
                        let resend: Vec<Record> = self.unacknowledged.iter().cloned().collect();
                        for record in &resend {
                            self.send(record);
                        }
                    }
                },
                more = self.source.wait(), if source_open => source_open = more,
            }
        }
    }

    /// Waits until every send still in flight has ended (each ends within the send timeout),
    /// keeping the acknowledgements that continue the acknowledged prefix. Later results of
    /// records behind the failed one are ignored, so those records are resent.
    async fn settle_in_flight(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        let results: Vec<SendResult> = in_flight.collect().await;
        for (sequence, result) in results {
            if result.is_ok() {
                self.acknowledge(sequence);
            }
        }
    }

    /// Sends ready records until the window is full.
    fn fill_window(&mut self) {
        while self.unacknowledged.len() < MAX_IN_FLIGHT {
            let records = self.source.ready(&self.instance_id, MAX_IN_FLIGHT - self.unacknowledged.len());
            if records.is_empty() {
                return;
            }
            for record in records {
                self.send(&record);
                self.unacknowledged.push_back(record);
            }
        }
    }

    fn send(&mut self, record: &Record) {
        let sequence = record.sequence;
        let sent = self.transport.send(record);
        let limit = self.send_timeout;
        self.in_flight.push_back(Box::pin(async move {
            match tokio::time::timeout(limit, sent).await {
                Ok(result) => (sequence, result),
                Err(_) => (sequence, Err(TransportError::TimedOut(limit))),
            }
        }));
    }

    fn acknowledge(&mut self, sequence: u64) {
        let Some(front) = self.unacknowledged.front() else { return };
        if front.sequence != sequence {
            // Results arrive in send order and every resend starts at the front. So this is a
            // late result of a send that was given up, and it is ignored.
            return;
        }
        let Some(record) = self.unacknowledged.pop_front() else { return };
        if matches!(self.progress, Progress::StateFile(_)) {
            self.memory.records.fetch_sub(1, Ordering::AcqRel);
            self.memory.bytes.fetch_sub(record.bytes.len() as u64, Ordering::AcqRel);
        }
        if let Some(hash) = stated_hash(&record.bytes) {
            self.last_acknowledged = Some(ChainHead { sequence, hash: hash.to_owned() });
        }
        let pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&sequence);
        if let Some(pending) = pending {
            self.observer.delivered(pending.recorded_at.elapsed());
            if let Some(waiter) = pending.waiter {
                let _ = waiter.send(());
            }
        }
    }

    fn report_failure(&self, sequence: u64, error: &TransportError, backoff: Duration) {
        let kind = match error {
            TransportError::TimedOut(_) => "transport_timeout",
            TransportError::Retriable(_) => "transport_retriable",
            TransportError::Fatal(_) => "transport_fatal",
        };
        self.observer.failure(kind);
        warn!(
            audit.transport = self.transport.name(),
            audit.sequence = sequence,
            audit.unacknowledged = self.unacknowledged.len(),
            retry_in = ?backoff,
            %error,
            "audit transport failed; resending from the first unacknowledged record"
        );
    }

    /// Stores the newest acknowledged record, so a restart neither resends much nor loses the
    /// chain head, and reports the backlog.
    async fn store_progress(&mut self) {
        let Some(head) = self.last_acknowledged.clone() else { return };
        let sequence = head.sequence;
        let oldest = {
            let pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.values().next().map(|pending| pending.recorded_at.elapsed())
        };
        match &self.progress {
            Progress::Spool(handle) => {
                let handle = handle.clone();
                let stored = tokio::task::spawn_blocking(move || handle.mark_shipped(head)).await;
                if let Ok(Err(error)) = stored {
                    warn!(%error, "cannot store the shipped position of the audit spool; a restart resends more records");
                }
                if let Progress::Spool(handle) = &self.progress {
                    let (records, bytes) = handle.backlog();
                    self.observer.backlog(records, bytes, oldest);
                }
            }
            Progress::StateFile(path) => {
                if let Some(path) = path.clone() {
                    let stored = tokio::task::spawn_blocking(move || write_chain_head(&path, &head)).await;
                    if let Ok(Err(error)) = stored {
                        warn!(%error, "cannot store the audit chain head; a restart would start a new chain");
                    }
                }
                let records = self.memory.records.load(Ordering::Acquire);
                self.observer.backlog(records, self.memory.bytes.load(Ordering::Acquire), oldest);
            }
        }
        // Published after storing, so `close` returns only once the head is stored.
        self.acknowledged.send_replace(sequence);
    }
}

#[cfg(test)]
mod tests;
