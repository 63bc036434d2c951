//! The file spool: an append-only, ordered log of one instance's records on local disk.
//!
//! Records are JSON lines in segment files named `segment-<first sequence>.jsonl`. The writer
//! appends a batch, fsyncs once (group commit), then confirms the checks of that batch. The
//! shipper reads committed records in order and, after the transport acknowledged them, stores
//! the acknowledged head in `shipped.json` and deletes segments it has fully shipped. The
//! newest segment is never deleted, so the chain head survives a restart.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::Record;
use crate::chain::{ChainHead, record_header, stated_hash};

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";
const SHIPPED_FILE: &str = "shipped.json";

/// Settings of a spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Upper bound of the segment files together; a batch that does not fit is rejected.
    pub max_bytes: u64,
    /// Size after which a new segment is started.
    pub segment_bytes: u64,
    /// fsync each batch before it is acknowledged; `false` only writes to the operating system.
    pub fsync: bool,
}

/// Failure to open or write the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot use spool folder {dir}: {reason}")]
    Open { dir: String, reason: String },
    #[error("spool {dir} holds records of instance {found}, not {expected}; use another folder or instance id")]
    ForeignInstance { dir: String, found: String, expected: String },
    #[error("writing spool {dir} failed: {reason}")]
    Write { dir: String, reason: String },
}

#[derive(Debug, Clone)]
struct Segment {
    first_sequence: u64,
    path: PathBuf,
    bytes: u64,
}

/// The state the writer and the shipper share.
#[derive(Debug)]
struct Index {
    segments: Vec<Segment>,
    total_bytes: u64,
    /// The newest committed record.
    committed: ChainHead,
    /// The newest record the transport acknowledged.
    shipped: ChainHead,
}

/// State of a spool found when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The newest record in the spool, or the genesis head for an empty spool.
    pub head: ChainHead,
    /// The newest record a transport acknowledged in an earlier run.
    pub shipped: ChainHead,
    /// Bytes of a partial last line (a write cut short by a crash) that were removed.
    pub truncated_bytes: u64,
}

/// The writing side of a spool; owned by the pipeline's writer thread.
pub struct Spool {
    config: SpoolConfig,
    index: Arc<Mutex<Index>>,
    active: File,
}

/// The reading side of a spool, for the shipper.
#[derive(Clone)]
pub struct SpoolHandle {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
}

impl Spool {
    /// Opens or creates the spool in `config.dir` for `instance_id`, recovering the chain head
    /// from the newest segment and removing a partial last line.
    pub fn open(config: SpoolConfig, instance_id: &str) -> Result<(Spool, Recovered), SpoolError> {
        let dir_text = config.dir.display().to_string();
        let open_error = |error: io::Error| SpoolError::Open { dir: dir_text.clone(), reason: error.to_string() };
        fs::create_dir_all(&config.dir).map_err(open_error)?;

        let mut segments = list_segments(&config.dir).map_err(open_error)?;
        let shipped = read_shipped(&config.dir).unwrap_or_else(ChainHead::genesis);
        let mut truncated_bytes = 0;
        let mut head = shipped.clone();
        if let Some(last) = segments.last_mut() {
            let (last_record, valid_length) = scan_segment(&last.path).map_err(open_error)?;
            if valid_length < last.bytes {
                truncated_bytes = last.bytes - valid_length;
                let file = OpenOptions::new().write(true).open(&last.path).map_err(open_error)?;
                file.set_len(valid_length).map_err(open_error)?;
                file.sync_all().map_err(open_error)?;
                last.bytes = valid_length;
            }
            if let Some((header_instance, sequence, hash)) = last_record {
                if header_instance != instance_id {
                    return Err(SpoolError::ForeignInstance { dir: dir_text, found: header_instance, expected: instance_id.to_owned() });
                }
                if sequence > head.sequence {
                    head = ChainHead { sequence, hash };
                }
            }
        }

        let next_sequence = head.sequence + 1;
        let active_path = match segments.last() {
            Some(last) if last.bytes < config.segment_bytes => last.path.clone(),
            _ => {
                let path = segment_path(&config.dir, next_sequence);
                segments.push(Segment { first_sequence: next_sequence, path: path.clone(), bytes: 0 });
                path
            }
        };
        let active = OpenOptions::new().create(true).append(true).open(&active_path).map_err(open_error)?;
        sync_dir(&config.dir).map_err(open_error)?;

        let total_bytes = segments.iter().map(|segment| segment.bytes).sum();
        let index = Index { segments, total_bytes, committed: head.clone(), shipped: shipped.clone() };
        let spool = Spool { config, index: Arc::new(Mutex::new(index)), active };
        Ok((spool, Recovered { head, shipped, truncated_bytes }))
    }

    /// Returns the reading side for the shipper.
    pub fn handle(&self) -> SpoolHandle {
        SpoolHandle { dir: self.config.dir.clone(), index: Arc::clone(&self.index) }
    }

    /// Returns whether `bytes` more fit within `max_bytes`.
    pub fn fits(&self, bytes: u64) -> bool {
        let index = lock(&self.index);
        index.total_bytes + bytes <= self.config.max_bytes
    }

    /// Appends `records` (consecutive, in order) and fsyncs once when configured. On failure
    /// the active segment is cut back to its length before the batch, so no partial batch stays.
    pub fn append(&mut self, records: &[Record]) -> Result<(), SpoolError> {
        let Some(last) = records.last() else { return Ok(()) };
        if lock(&self.index).segments.last().is_some_and(|segment| segment.bytes >= self.config.segment_bytes) {
            self.rotate(records[0].sequence)?;
        }

        let mut buffer = Vec::with_capacity(records.iter().map(|record| record.bytes.len() + 1).sum());
        for record in records {
            buffer.extend_from_slice(&record.bytes);
            buffer.push(b'\n');
        }
        let before = lock(&self.index).segments.last().map_or(0, |segment| segment.bytes);
        let written = self.active.write_all(&buffer).and_then(|()| if self.config.fsync { self.active.sync_data() } else { Ok(()) });
        if let Err(error) = written {
            // Best effort: a disk that failed the write may fail this too, and recovery at the
            // next start removes a partial line anyway.
            let _ = self.active.set_len(before);
            return Err(self.write_error(error));
        }

        let mut index = lock(&self.index);
        if let Some(segment) = index.segments.last_mut() {
            segment.bytes += buffer.len() as u64;
        }
        index.total_bytes += buffer.len() as u64;
        index.committed = ChainHead {
            sequence: last.sequence,
            hash: stated_hash(&last.bytes).unwrap_or_default().to_owned(),
        };
        Ok(())
    }

    fn rotate(&mut self, first_sequence: u64) -> Result<(), SpoolError> {
        let path = segment_path(&self.config.dir, first_sequence);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|error| self.write_error(error))?;
        sync_dir(&self.config.dir).map_err(|error| self.write_error(error))?;
        self.active = file;
        lock(&self.index).segments.push(Segment { first_sequence, path, bytes: 0 });
        Ok(())
    }

    fn write_error(&self, error: io::Error) -> SpoolError {
        SpoolError::Write { dir: self.config.dir.display().to_string(), reason: error.to_string() }
    }
}

impl SpoolHandle {
    /// Returns the newest committed record.
    pub fn committed(&self) -> ChainHead {
        lock(&self.index).committed.clone()
    }

    /// Returns the newest acknowledged record.
    pub fn shipped(&self) -> ChainHead {
        lock(&self.index).shipped.clone()
    }

    /// Unshipped records and the bytes of all segment files.
    pub fn backlog(&self) -> (u64, u64) {
        let index = lock(&self.index);
        (index.committed.sequence.saturating_sub(index.shipped.sequence), index.total_bytes)
    }

    /// Opens a reader positioned at the first record after `after`.
    pub fn reader(&self, after: u64) -> SpoolReader {
        SpoolReader { handle: self.clone(), next_sequence: after + 1, position: None }
    }

    /// Stores the acknowledged head and deletes segments that are fully shipped, except the
    /// newest one.
    pub fn mark_shipped(&self, head: ChainHead) -> io::Result<()> {
        write_atomically(&self.dir.join(SHIPPED_FILE), &shipped_json(&head))?;

        let mut index = lock(&self.index);
        index.shipped = head.clone();
        while index.segments.len() > 1 && index.segments[1].first_sequence <= head.sequence + 1 {
            let segment = index.segments.remove(0);
            index.total_bytes -= segment.bytes;
            if let Err(error) = fs::remove_file(&segment.path) {
                tracing::warn!(audit.segment = %segment.path.display(), %error, "cannot delete a shipped spool segment");
            }
        }
        Ok(())
    }
}

/// Reads committed records in order, from where the previous read stopped.
pub struct SpoolReader {
    handle: SpoolHandle,
    next_sequence: u64,
    /// The open segment and the sequence its next line holds.
    position: Option<(BufReader<File>, u64)>,
}

impl SpoolReader {
    /// Reads up to `max` committed records. Returns an empty list when all are read.
    pub fn read(&mut self, instance_id: &Arc<str>, max: usize) -> io::Result<Vec<Record>> {
        let committed = self.handle.committed().sequence;
        let mut records = Vec::new();
        while records.len() < max && self.next_sequence <= committed {
            if self.position.is_none() {
                self.position = Some(self.open_at(self.next_sequence)?);
            }
            let Some((reader, line_sequence)) = self.position.as_mut() else { break };
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                // End of this segment: continue in the next one, or stay at the end of the
                // active segment, where the writer appends.
                if !self.has_segment_after(self.next_sequence) {
                    break;
                }
                self.position = None;
                continue;
            }
            if line.last() != Some(&b'\n') {
                // Only committed records are read, and those are complete lines; reopen to
                // read this one again rather than ship half a record.
                self.position = None;
                break;
            }
            line.pop();
            let sequence = *line_sequence;
            *line_sequence += 1;
            if sequence < self.next_sequence {
                continue;
            }
            records.push(Record { instance_id: Arc::clone(instance_id), sequence, bytes: line.into() });
            self.next_sequence = sequence + 1;
        }
        Ok(records)
    }

    fn has_segment_after(&self, sequence: u64) -> bool {
        lock(&self.handle.index).segments.iter().any(|segment| segment.first_sequence == sequence)
    }

    /// Opens the segment holding `sequence`; lines before it are skipped while reading.
    fn open_at(&self, sequence: u64) -> io::Result<(BufReader<File>, u64)> {
        let segment = {
            let index = lock(&self.handle.index);
            index.segments.iter().rev().find(|segment| segment.first_sequence <= sequence).cloned()
        };
        let Some(segment) = segment else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("spool record {sequence} not found: no segment starts at or before it")));
        };
        let mut file = File::open(&segment.path)?;
        file.seek(SeekFrom::Start(0))?;
        Ok((BufReader::new(file), segment.first_sequence))
    }
}

/// Reads every record line of a spool folder in sequence order, for verification.
pub fn read_spool_lines(dir: &Path) -> io::Result<Vec<(PathBuf, Vec<Vec<u8>>)>> {
    let mut files = Vec::new();
    for segment in list_segments(dir)? {
        let mut text = Vec::new();
        File::open(&segment.path)?.read_to_end(&mut text)?;
        let lines = text.split(|byte| *byte == b'\n').filter(|line| !line.is_empty()).map(<[u8]>::to_vec).collect();
        files.push((segment.path, lines));
    }
    Ok(files)
}

/// Returns whether `dir` looks like a spool folder.
pub fn is_spool_dir(dir: &Path) -> bool {
    list_segments(dir).is_ok_and(|segments| !segments.is_empty())
}

fn list_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first) = name.to_str().and_then(|name| name.strip_prefix(SEGMENT_PREFIX)).and_then(|rest| rest.strip_suffix(SEGMENT_SUFFIX)) else {
            continue;
        };
        let Ok(first_sequence) = first.parse() else { continue };
        segments.push(Segment { first_sequence, path: entry.path(), bytes: entry.metadata()?.len() });
    }
    segments.sort_by_key(|segment| segment.first_sequence);
    Ok(segments)
}

fn segment_path(dir: &Path, first_sequence: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{first_sequence:020}{SEGMENT_SUFFIX}"))
}

/// The instance, sequence and hash of a record.
type RecordId = (String, u64, String);

/// Returns the last complete record of a segment and the length of its complete lines.
fn scan_segment(path: &Path) -> io::Result<(Option<RecordId>, u64)> {
    let mut text = Vec::new();
    File::open(path)?.read_to_end(&mut text)?;
    let valid_length = text.iter().rposition(|byte| *byte == b'\n').map_or(0, |position| position + 1);
    let last_line = text[..valid_length].split(|byte| *byte == b'\n').rfind(|line| !line.is_empty());
    let last = last_line.and_then(|line| {
        let header = record_header(line).ok()?;
        Some((header.instance_id, header.sequence, stated_hash(line)?.to_owned()))
    });
    Ok((last, valid_length as u64))
}

/// Reads a chain head stored by [`write_chain_head`] or [`SpoolHandle::mark_shipped`].
pub fn read_chain_head(path: &Path) -> Option<ChainHead> {
    let text = fs::read(path).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    Some(ChainHead { sequence: value["sequence"].as_u64()?, hash: value["hash"].as_str()?.to_owned() })
}

/// Stores a chain head atomically (write, fsync, rename).
pub fn write_chain_head(path: &Path, head: &ChainHead) -> io::Result<()> {
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    write_atomically(path, &shipped_json(head))
}

fn read_shipped(dir: &Path) -> Option<ChainHead> {
    read_chain_head(&dir.join(SHIPPED_FILE))
}

fn shipped_json(head: &ChainHead) -> Vec<u8> {
    serde_json::json!({"sequence": head.sequence, "hash": head.hash}).to_string().into_bytes()
}

fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(content)?;
    file.sync_data()?;
    fs::rename(&temporary, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn lock(index: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    // The index stays consistent even if a holder panicked: every update is a few assignments.
    index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
