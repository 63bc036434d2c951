//! The hash chain that makes an instance's records tamper-evident.
//!
//! A record's *body* is its compact JSON object without the `hash` member. The hash is the
//! lowercase hex SHA-256 of the body bytes, and the stored record is the body with
//! `,"hash":"<hex>"` inserted before its final `}`. Every record carries the hash of the
//! previous record of the same instance in `prev_hash` ([`GENESIS_HASH`] for the first one), so
//! changing, removing or moving a record breaks the chain at that point.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Record;

/// `prev_hash` of the first record of an instance's chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Length of the suffix appended to a body to store it: `,"hash":"` (9 bytes), 64 hex digits, `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// The end of an instance's chain: the sequence and hash of its newest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Sequence of the newest record; 0 before the first record.
    pub sequence: u64,
    pub hash: String,
}

impl ChainHead {
    /// Returns the head of an empty chain.
    pub fn genesis() -> ChainHead {
        ChainHead { sequence: 0, hash: GENESIS_HASH.to_owned() }
    }
}

/// The chain members every record starts with.
#[derive(Serialize)]
struct Link<'a> {
    instance_id: &'a str,
    sequence: u64,
    prev_hash: &'a str,
}

/// Failure to turn a payload into a record.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("cannot encode the audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot encode the audit record: the payload is not a non-empty JSON object")]
    NotAnObject,
}

/// Encodes `payload` (an already serialized, non-empty JSON object) as the record that follows
/// `head`, and returns it with the new head.
pub fn seal(instance_id: &Arc<str>, head: &ChainHead, payload: &[u8]) -> Result<(Record, ChainHead), SealError> {
    if payload.len() < 3 || payload[0] != b'{' || payload[payload.len() - 1] != b'}' {
        return Err(SealError::NotAnObject);
    }
    let sequence = head.sequence + 1;

    let mut body = Vec::with_capacity(payload.len() + 200);
    serde_json::to_writer(&mut body, &Link { instance_id, sequence, prev_hash: &head.hash })?;
    body.pop();
    body.push(b',');
    body.extend_from_slice(&payload[1..]);

    let hash = hex::encode(Sha256::digest(&body));
    body.pop();
    body.extend_from_slice(b",\"hash\":\"");
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}");

    let record = Record { instance_id: Arc::clone(instance_id), sequence, bytes: Bytes::from(body) };
    Ok((record, ChainHead { sequence, hash }))
}

/// A stored record split into its body and the hash it states, before any check.
pub struct Unsealed<'a> {
    /// The body as hashed: the record without its `hash` member.
    pub body: Vec<u8>,
    pub stated_hash: &'a str,
}

/// Splits a stored record into body and stated hash; `None` when the record does not end with
/// a `hash` member in the form [`seal`] writes.
pub fn unseal(line: &[u8]) -> Option<Unsealed<'_>> {
    let split = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let (head, suffix) = line.split_at(split);
    let hex_digits = suffix.strip_prefix(b",\"hash\":\"")?.strip_suffix(b"\"}")?;
    if hex_digits.len() != 64 || !hex_digits.iter().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut body = Vec::with_capacity(head.len() + 1);
    body.extend_from_slice(head);
    body.push(b'}');
    let stated_hash = std::str::from_utf8(hex_digits).ok()?;
    Some(Unsealed { body, stated_hash })
}

/// Returns the lowercase hex SHA-256 of a record body.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Returns the hash a stored record states, without checking it.
pub fn stated_hash(line: &[u8]) -> Option<&str> {
    let split = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let hex_digits = line[split..].strip_prefix(b",\"hash\":\"")?.strip_suffix(b"\"}")?;
    std::str::from_utf8(hex_digits).ok()
}

/// The members of a record that the chain and its readers need.
#[derive(Debug, Clone, Deserialize)]
pub struct RecordHeader {
    pub instance_id: String,
    pub sequence: u64,
    pub prev_hash: String,
    pub schema: String,
}

/// Parses the chain members of a stored record.
pub fn record_header(line: &[u8]) -> Result<RecordHeader, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Arc<str> {
        Arc::from("pod-a")
    }

    #[test]
    fn seal_puts_link_first_and_hash_last() {
        let (record, head) = seal(&instance(), &ChainHead::genesis(), br#"{"schema":"s","x":1}"#).unwrap();

        let expected_body = format!(r#"{{"instance_id":"pod-a","sequence":1,"prev_hash":"{GENESIS_HASH}","schema":"s","x":1}}"#);
        let expected_hash = hex::encode(Sha256::digest(expected_body.as_bytes()));
        let text = std::str::from_utf8(&record.bytes).unwrap();
        assert_eq!(text, format!("{},\"hash\":\"{expected_hash}\"}}", &expected_body[..expected_body.len() - 1]));
        assert_eq!(head, ChainHead { sequence: 1, hash: expected_hash });
        assert_eq!(record.sequence, 1);
    }

    #[test]
    fn second_record_links_to_first() {
        let (_, first) = seal(&instance(), &ChainHead::genesis(), br#"{"schema":"s"}"#).unwrap();
        let (record, second) = seal(&instance(), &first, br#"{"schema":"s"}"#).unwrap();

        let header = record_header(&record.bytes).unwrap();
        assert_eq!(header.sequence, 2);
        assert_eq!(header.prev_hash, first.hash);
        assert_eq!(stated_hash(&record.bytes), Some(second.hash.as_str()));
    }

    #[test]
    fn unseal_recovers_the_hashed_body() {
        let (record, head) = seal(&instance(), &ChainHead::genesis(), br#"{"schema":"s","path":"/a"}"#).unwrap();

        let unsealed = unseal(&record.bytes).unwrap();
        assert_eq!(unsealed.stated_hash, head.hash);
        assert_eq!(body_hash(&unsealed.body), head.hash);
        assert!(!String::from_utf8(unsealed.body).unwrap().contains("\"hash\""));
    }

    #[test]
    fn unseal_rejects_records_without_hash() {
        assert!(unseal(br#"{"schema":"s"}"#).is_none());
        assert!(unseal(b"").is_none());
        let upper = format!(r#"{{"a":1,"hash":"{}"}}"#, "A".repeat(64));
        assert!(unseal(upper.as_bytes()).is_none());
    }

    #[test]
    fn seal_rejects_payload_that_is_not_an_object() {
        assert!(matches!(seal(&instance(), &ChainHead::genesis(), b"[1]"), Err(SealError::NotAnObject)));
        assert!(matches!(seal(&instance(), &ChainHead::genesis(), b"{}"), Err(SealError::NotAnObject)));
    }
}
