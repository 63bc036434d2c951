use std::sync::Arc;

use super::*;
use crate::CheckpointSigner;
use crate::chain::{ChainHead, seal};
use crate::checkpoint::Checkpoint;

/// Builds a chain of `events` decision records with a checkpoint after each sequence in
/// `checkpoint_after` (counted in events), signed by `signer`.
fn chain(events: u64, checkpoint_after: &[u64], signer: &CheckpointSigner) -> Vec<Vec<u8>> {
    let instance: Arc<str> = Arc::from("pod-a");
    let mut head = ChainHead::genesis();
    let mut lines = Vec::new();
    for event in 1..=events {
        let payload = serde_json::json!({"schema": "portcullis.decision.v2", "decision_id": format!("d{event}"), "request": {"path": "/a"}});
        let (record, next) = seal(&instance, &head, payload.to_string().as_bytes()).unwrap();
        lines.push(record.bytes.to_vec());
        head = next;
        if checkpoint_after.contains(&event) {
            let (record, next) = checkpoint(&instance, &head, signer);
            lines.push(record);
            head = next;
        }
    }
    lines
}

fn checkpoint(instance: &Arc<str>, head: &ChainHead, signer: &CheckpointSigner) -> (Vec<u8>, ChainHead) {
    let time = "2026-01-01T00:00:00.000000Z".to_owned();
    let message = signed_message(instance, head.sequence + 1, &head.hash, &time, CheckpointReason::Count);
    let payload = Checkpoint {
        schema: CHECKPOINT_SCHEMA.to_owned(),
        time,
        reason: CheckpointReason::Count,
        key_id: signer.key_id().to_owned(),
        signature: signer.sign(&message),
    };
    let (record, next) = seal(instance, head, &serde_json::to_vec(&payload).unwrap()).unwrap();
    (record.bytes.to_vec(), next)
}

/// Reseals a record after its content was changed, as someone who can write the log would.
fn reseal(line: &[u8], change: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(line).unwrap();
    change(&mut value);
    let object = value.as_object_mut().unwrap();
    object.remove("hash");
    let instance: Arc<str> = Arc::from(object.remove("instance_id").unwrap().as_str().unwrap());
    let sequence = object.remove("sequence").unwrap().as_u64().unwrap();
    let prev_hash = object.remove("prev_hash").unwrap().as_str().unwrap().to_owned();
    let head = ChainHead { sequence: sequence - 1, hash: prev_hash };
    seal(&instance, &head, &serde_json::to_vec(&value).unwrap()).unwrap().0.bytes.to_vec()
}

fn verify(lines: &[Vec<u8>], keys: &[VerifyingKey]) -> Report {
    let positioned = lines.iter().enumerate().map(|(index, line)| (position(index as u64 + 1), line.clone()));
    verify_lines(positioned, keys)
}

fn position(line: u64) -> Position {
    Position { source: "audit.jsonl".to_owned(), line }
}

fn only_problem(report: &Report) -> Option<Problem> {
    assert_eq!(report.chains.len(), 1, "{report:?}");
    report.chains[0].problem.clone()
}

#[test]
fn whole_chain_is_reported_with_counts() {
    let signer = CheckpointSigner::generate().unwrap();
    let lines = chain(10, &[5, 10], &signer);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert!(report.is_whole(), "{report:?}");
    let chain = &report.chains[0];
    assert_eq!(chain.instance_id, "pod-a");
    assert_eq!(chain.records, 12);
    assert_eq!((chain.first_sequence, chain.last_sequence), (1, 12));
    assert_eq!(chain.checkpoints, 2);
    assert_eq!(chain.key_ids, vec![signer.key_id().to_owned()]);
    assert_eq!(chain.duplicates, 0);
}

#[test]
fn altered_event_is_named_by_sequence() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    lines[3] = String::from_utf8(lines[3].clone()).unwrap().replace("\"/a\"", "\"/b\"").into_bytes();

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(only_problem(&report), Some(Problem::Altered { sequence: 4, position: position(4) }));
    assert!(!report.is_whole());
}

#[test]
fn resealed_alteration_breaks_the_next_link() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    lines[3] = reseal(&lines[3], |value| value["request"]["path"] = "/b".into());

    let report = verify(&lines, &[signer.verifying_key()]);

    let Some(Problem::Inserted { sequence, position: at, .. }) = only_problem(&report) else { panic!("{report:?}") };
    assert_eq!((sequence, at), (5, position(5)));
}

#[test]
fn removed_event_is_named_missing() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    lines.remove(4);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(only_problem(&report), Some(Problem::Missing { from: 5, to: 5, position: position(5) }));
}

#[test]
fn swapped_events_are_named_reordered() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    lines.swap(4, 5);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(only_problem(&report), Some(Problem::Reordered { sequence: 5, position: position(6) }));
}

#[test]
fn forged_event_is_named_inserted() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    // A forged record that links correctly to record 4 and takes sequence 5; the genuine
    // record 5 then no longer fits.
    let forged = reseal(&lines[4], |value| value["decision_id"] = "forged".into());
    lines.insert(4, forged);

    let report = verify(&lines, &[signer.verifying_key()]);

    let Some(Problem::Inserted { sequence, position: at, reason }) = only_problem(&report) else { panic!("{report:?}") };
    assert_eq!((sequence, at), (5, position(6)));
    assert_eq!(reason, "another record with this sequence came earlier");
}

#[test]
fn record_with_skipped_sequence_is_named_inserted() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    lines[4] = reseal(&lines[4], |value| value["sequence"] = 9.into());

    let report = verify(&lines, &[signer.verifying_key()]);

    let Some(Problem::Inserted { sequence, position: at, .. }) = only_problem(&report) else { panic!("{report:?}") };
    assert_eq!((sequence, at), (9, position(5)));
}

#[test]
fn checkpoint_with_bad_signature_is_named() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[5, 10], &signer);
    // Record 6 is the first checkpoint; sign a different message with the right key.
    let wrong = signer.sign(b"something else");
    lines[5] = reseal(&lines[5], |value| value["signature"] = wrong.into());

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(
        only_problem(&report),
        Some(Problem::BadSignature { sequence: 6, position: position(6), key_id: signer.key_id().to_owned() })
    );
}

#[test]
fn checkpoint_signed_by_another_key_is_named() {
    let signer = CheckpointSigner::generate().unwrap();
    let expected = CheckpointSigner::generate().unwrap();
    let lines = chain(10, &[5, 10], &signer);

    let report = verify(&lines, &[expected.verifying_key()]);

    assert_eq!(
        only_problem(&report),
        Some(Problem::UnknownKey { sequence: 6, position: position(6), key_id: signer.key_id().to_owned() })
    );
}

#[test]
fn checkpoint_claiming_the_expected_key_fails_its_signature() {
    let signer = CheckpointSigner::generate().unwrap();
    let expected = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[5, 10], &signer);
    let claimed = expected.key_id().to_owned();
    lines[5] = reseal(&lines[5], |value| value["key_id"] = claimed.clone().into());

    let report = verify(&lines, &[expected.verifying_key()]);

    assert_eq!(only_problem(&report), Some(Problem::BadSignature { sequence: 6, position: position(6), key_id: claimed }));
}

#[test]
fn exact_duplicates_are_counted_and_tolerated() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(10, &[10], &signer);
    // A resend after a lost acknowledgement repeats records 3 to 5.
    let resent: Vec<Vec<u8>> = lines[2..5].to_vec();
    lines.splice(5..5, resent);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert!(report.is_whole(), "{report:?}");
    assert_eq!(report.chains[0].duplicates, 3);
    assert_eq!(report.chains[0].records, 11);
}

#[test]
fn trailing_records_without_checkpoint_are_unsigned() {
    let signer = CheckpointSigner::generate().unwrap();
    let lines = chain(10, &[4], &signer);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(only_problem(&report), Some(Problem::Unsigned { from: 6, to: 11 }));
}

#[test]
fn first_record_must_link_to_genesis() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(3, &[3], &signer);
    lines[0] = reseal(&lines[0], |value| value["prev_hash"] = "1".repeat(64).into());

    let report = verify(&lines, &[signer.verifying_key()]);

    let Some(Problem::Inserted { sequence, reason, .. }) = only_problem(&report) else { panic!("{report:?}") };
    assert_eq!(sequence, 1);
    assert_eq!(reason, "the first record of a chain must link to the genesis hash");
}

#[test]
fn line_that_is_not_a_record_is_unreadable() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(2, &[2], &signer);
    lines.push(b"not json".to_vec());

    let report = verify(&lines, &[signer.verifying_key()]);

    assert!(report.chains[0].problem.is_none(), "{report:?}");
    assert_eq!(report.unreadable.len(), 1);
    assert_eq!(report.unreadable[0].kind(), "unreadable");
    assert!(!report.is_whole());
}

#[test]
fn chains_of_two_instances_are_judged_apart() {
    let signer = CheckpointSigner::generate().unwrap();
    let mut lines = chain(3, &[3], &signer);
    let other: Vec<Vec<u8>> = chain(2, &[2], &signer)
        .into_iter()
        .map(|line| String::from_utf8(line).unwrap().replace("\"pod-a\"", "\"pod-b\"").into_bytes())
        .collect();
    lines.extend(other);

    let report = verify(&lines, &[signer.verifying_key()]);

    assert_eq!(report.chains.len(), 2);
    assert_eq!(report.chains[0].problem, None);
    // Renaming the instance changed the content under the hash.
    assert_eq!(report.chains[1].instance_id, "pod-b");
    assert_eq!(report.chains[1].problem.as_ref().map(Problem::kind), Some("altered"));
}
