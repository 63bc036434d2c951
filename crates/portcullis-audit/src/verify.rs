//! Chain verification: reads records from any source and reports, per instance, that its
//! chain is whole or the first problem in it.
//!
//! A source is anything that yields record lines with a position: a JSON-lines file, a spool
//! folder, or a Kafka topic (the position is then the partition and offset). Feed lines with
//! [`ChainVerifier::push`] in the order they are stored in the source, then call
//! [`ChainVerifier::finish`]. Exact duplicates (the same record delivered twice after a resend)
//! are counted and otherwise ignored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::chain::{GENESIS_HASH, body_hash, unseal};
use crate::checkpoint::{CHECKPOINT_SCHEMA, CheckpointReason, key_id, signed_message, verify_signature};

/// Position of a record line: a file and line number, or a topic partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    pub source: String,
    /// 1-based line number in a file, or the offset in a Kafka partition.
    pub line: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.line)
    }
}

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The line is not a record: not JSON, or without the chain members.
    Unreadable { position: Position, reason: String },
    /// The record's content does not match its hash.
    Altered { sequence: u64, position: Position },
    /// Records `from` to `to` are absent; noticed at `position`, where a later record came.
    Missing { from: u64, to: u64, position: Position },
    /// Record `sequence` comes later than a record after it; `position` is where it appears.
    Reordered { sequence: u64, position: Position },
    /// A record whose link or sequence does not fit the chain.
    Inserted { sequence: u64, position: Position, reason: String },
    /// A checkpoint whose signature does not verify with the key it names.
    BadSignature { sequence: u64, position: Position, key_id: String },
    /// A checkpoint signed by a key that was not given to the verifier.
    UnknownKey { sequence: u64, position: Position, key_id: String },
    /// Records after the last checkpoint (or a chain without checkpoints): nothing signs them.
    Unsigned { from: u64, to: u64 },
}

impl Problem {
    /// Returns the stable name of the problem, as in the JSON report.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Unreadable { .. } => "unreadable",
            Problem::Altered { .. } => "altered",
            Problem::Missing { .. } => "missing",
            Problem::Reordered { .. } => "reordered",
            Problem::Inserted { .. } => "inserted",
            Problem::BadSignature { .. } => "bad_signature",
            Problem::UnknownKey { .. } => "unknown_key",
            Problem::Unsigned { .. } => "unsigned",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable { position, reason } => write!(f, "unreadable record at {position}: {reason}"),
            Problem::Altered { sequence, position } => write!(f, "record {sequence} at {position} was altered: its hash does not match its content"),
            Problem::Missing { from, to, position } if from == to => write!(f, "record {from} is missing (noticed at {position})"),
            Problem::Missing { from, to, position } => write!(f, "records {from} to {to} are missing (noticed at {position})"),
            Problem::Reordered { sequence, position } => write!(f, "record {sequence} is out of order: it appears at {position}, after a later record"),
            Problem::Inserted { sequence, position, reason } => write!(f, "record {sequence} at {position} does not belong to the chain: {reason}"),
            Problem::BadSignature { sequence, position, key_id } => write!(f, "checkpoint {sequence} at {position} has a bad signature for key {key_id}"),
            Problem::UnknownKey { sequence, position, key_id } => write!(f, "checkpoint {sequence} at {position} is signed by key {key_id}, which was not given"),
            Problem::Unsigned { from, to } => write!(f, "records {from} to {to} are not covered by a signed checkpoint"),
        }
    }
}

/// The verdict on one instance's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub instance_id: String,
    /// Distinct records read, checkpoints included.
    pub records: u64,
    pub duplicates: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub checkpoints: u64,
    /// Keys that signed the checkpoints.
    pub key_ids: Vec<String>,
    /// `None` when the chain is whole.
    pub problem: Option<Problem>,
}

/// The verdict on everything read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub chains: Vec<ChainReport>,
    /// Lines that belong to no chain because they could not be read.
    pub unreadable: Vec<Problem>,
}

impl Report {
    /// Returns whether every chain is whole and every line was readable.
    pub fn is_whole(&self) -> bool {
        self.unreadable.is_empty() && self.chains.iter().all(|chain| chain.problem.is_none())
    }
}

/// The members a verifier reads from a record body.
#[derive(Deserialize)]
struct Header {
    instance_id: String,
    sequence: u64,
    prev_hash: String,
    schema: String,
    #[serde(default)]
    time: String,
    #[serde(default)]
    reason: Option<CheckpointReason>,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    signature: Option<String>,
}

/// Facts a verifier keeps of one record.
struct Entry {
    sequence: u64,
    prev_hash: String,
    stated_hash: String,
    hash_matches: bool,
    position: Position,
    checkpoint: Option<CheckpointCheck>,
}

enum CheckpointCheck {
    Valid { key_id: String },
    BadSignature { key_id: String },
    UnknownKey { key_id: String },
}

/// Collects records and judges each instance's chain.
pub struct ChainVerifier {
    keys: HashMap<String, VerifyingKey>,
    chains: BTreeMap<String, Vec<Entry>>,
    unreadable: Vec<Problem>,
}

impl ChainVerifier {
    /// Creates a verifier that accepts checkpoints signed by any of `keys`.
    pub fn new(keys: &[VerifyingKey]) -> ChainVerifier {
        let keys = keys.iter().map(|key| (key_id(key), *key)).collect();
        ChainVerifier { keys, chains: BTreeMap::new(), unreadable: Vec::new() }
    }

    /// Reads one record line (without its line ending).
    pub fn push(&mut self, position: Position, line: &[u8]) {
        let header: Header = match serde_json::from_slice(line) {
            Ok(header) => header,
            Err(error) => {
                self.unreadable.push(Problem::Unreadable { position, reason: format!("not a chained record: {error}") });
                return;
            }
        };
        let (stated_hash, hash_matches) = match unseal(line) {
            Some(unsealed) => (unsealed.stated_hash.to_owned(), body_hash(&unsealed.body) == unsealed.stated_hash),
            None => (String::new(), false),
        };
        let checkpoint = (header.schema == CHECKPOINT_SCHEMA).then(|| self.check_checkpoint(&header));
        let entry = Entry { sequence: header.sequence, prev_hash: header.prev_hash, stated_hash, hash_matches, position, checkpoint };
        self.chains.entry(header.instance_id).or_default().push(entry);
    }

    fn check_checkpoint(&self, header: &Header) -> CheckpointCheck {
        let key_id = header.key_id.clone().unwrap_or_default();
        let Some(key) = self.keys.get(&key_id) else { return CheckpointCheck::UnknownKey { key_id } };
        let (Some(reason), Some(signature)) = (header.reason, header.signature.as_deref()) else {
            return CheckpointCheck::BadSignature { key_id };
        };
        let message = signed_message(&header.instance_id, header.sequence, &header.prev_hash, &header.time, reason);
        if verify_signature(key, &message, signature) {
            CheckpointCheck::Valid { key_id }
        } else {
            CheckpointCheck::BadSignature { key_id }
        }
    }

    /// Judges every chain read so far.
    pub fn finish(self) -> Report {
        let chains = self.chains.into_iter().map(|(instance_id, entries)| judge(instance_id, &entries)).collect();
        Report { chains, unreadable: self.unreadable }
    }
}

/// Verifies records from any source of lines in one call.
pub fn verify_lines<I>(lines: I, keys: &[VerifyingKey]) -> Report
where
    I: IntoIterator<Item = (Position, Vec<u8>)>,
{
    let mut verifier = ChainVerifier::new(keys);
    for (position, line) in lines {
        verifier.push(position, &line);
    }
    verifier.finish()
}

/// Walks one instance's records in source order and stops at the first problem.
fn judge(instance_id: String, entries: &[Entry]) -> ChainReport {
    let mut report = ChainReport {
        instance_id,
        records: 0,
        duplicates: 0,
        first_sequence: entries.first().map_or(0, |entry| entry.sequence),
        last_sequence: 0,
        checkpoints: 0,
        key_ids: Vec::new(),
        problem: None,
    };
    let mut seen: HashMap<u64, &str> = HashMap::new();
    let mut expected = report.first_sequence;
    // The hash the next record must link to; unknown when the source starts after the genesis.
    let mut previous_hash: Option<&str> = (expected == 1).then_some(GENESIS_HASH);
    let mut last_signed = report.first_sequence.saturating_sub(1);
    let mut key_ids = HashSet::new();

    for (index, entry) in entries.iter().enumerate() {
        if !entry.hash_matches {
            report.problem = Some(Problem::Altered { sequence: entry.sequence, position: entry.position.clone() });
            break;
        }
        if let Some(earlier) = seen.get(&entry.sequence) {
            if *earlier == entry.stated_hash {
                report.duplicates += 1;
                continue;
            }
            report.problem = Some(Problem::Inserted {
                sequence: entry.sequence,
                position: entry.position.clone(),
                reason: "another record with this sequence came earlier".to_owned(),
            });
            break;
        }
        if entry.sequence != expected {
            report.problem = Some(out_of_place(entry, expected, previous_hash, &entries[index + 1..]));
            break;
        }
        if let Some(previous) = previous_hash.filter(|previous| *previous != entry.prev_hash) {
            let reason = if entry.sequence == 1 {
                "the first record of a chain must link to the genesis hash".to_owned()
            } else {
                format!("prev_hash does not match record {}, whose hash is {previous}", entry.sequence - 1)
            };
            report.problem = Some(Problem::Inserted { sequence: entry.sequence, position: entry.position.clone(), reason });
            break;
        }
        match &entry.checkpoint {
            Some(CheckpointCheck::Valid { key_id }) => {
                report.checkpoints += 1;
                last_signed = entry.sequence;
                if key_ids.insert(key_id.clone()) {
                    report.key_ids.push(key_id.clone());
                }
            }
            Some(CheckpointCheck::BadSignature { key_id }) => {
                report.problem = Some(Problem::BadSignature { sequence: entry.sequence, position: entry.position.clone(), key_id: key_id.clone() });
                break;
            }
            Some(CheckpointCheck::UnknownKey { key_id }) => {
                report.problem = Some(Problem::UnknownKey { sequence: entry.sequence, position: entry.position.clone(), key_id: key_id.clone() });
                break;
            }
            None => {}
        }

        seen.insert(entry.sequence, &entry.stated_hash);
        previous_hash = Some(&entry.stated_hash);
        report.records += 1;
        report.last_sequence = entry.sequence;
        expected += 1;
    }

    if report.problem.is_none() && report.last_sequence > last_signed {
        report.problem = Some(Problem::Unsigned { from: last_signed + 1, to: report.last_sequence });
    }
    report
}

/// Names the problem of a record whose sequence is not the expected one.
fn out_of_place(entry: &Entry, expected: u64, previous_hash: Option<&str>, later: &[Entry]) -> Problem {
    let position = entry.position.clone();
    if entry.sequence < expected {
        return Problem::Reordered { sequence: entry.sequence, position };
    }
    if previous_hash == Some(entry.prev_hash.as_str()) {
        return Problem::Inserted {
            sequence: entry.sequence,
            position,
            reason: format!("it links to record {} but its sequence skips to {}", expected - 1, entry.sequence),
        };
    }
    if let Some(found) = later.iter().find(|later| later.sequence == expected) {
        return Problem::Reordered { sequence: expected, position: found.position.clone() };
    }
    Problem::Missing { from: expected, to: entry.sequence - 1, position }
}

#[cfg(test)]
mod tests;
