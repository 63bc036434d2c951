//! Signed checkpoints: records in the chain that an Ed25519 key signs, so that the stretch of
//! the chain before each checkpoint cannot be rewritten by someone who can only write the log.

use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema identifier of checkpoint records.
pub const CHECKPOINT_SCHEMA: &str = "portcullis.checkpoint.v1";

/// Cause of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointReason {
    /// First record after a start: it signs the chain recovered from the previous run,
    /// including records written after that run's last checkpoint.
    Start,
    /// `checkpoint.every` records were written since the previous checkpoint.
    Count,
    /// `checkpoint.interval` passed since the previous checkpoint with records written.
    Interval,
    /// The pipeline is closing.
    Shutdown,
}

/// The payload of a checkpoint record; the chain members are added when it is sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub schema: String,
    /// RFC 3339 time the checkpoint was written.
    pub time: String,
    pub reason: CheckpointReason,
    /// Identifier of the signing key, see [`key_id`].
    pub key_id: String,
    /// Lowercase hex of the 64-byte Ed25519 signature over [`signed_message`].
    pub signature: String,
}

/// Builds the bytes a checkpoint signs. The previous record's hash commits to the whole chain
/// before the checkpoint, so signing it signs every earlier record.
pub fn signed_message(instance_id: &str, sequence: u64, prev_hash: &str, time: &str, reason: CheckpointReason) -> Vec<u8> {
    let reason = match reason {
        CheckpointReason::Start => "start",
        CheckpointReason::Count => "count",
        CheckpointReason::Interval => "interval",
        CheckpointReason::Shutdown => "shutdown",
    };
    format!("{CHECKPOINT_SCHEMA}\n{instance_id}\n{sequence}\n{prev_hash}\n{time}\n{reason}").into_bytes()
}

/// Derives the identifier of a public key: `ed25519:` and the first 16 hex digits of the SHA-256
/// of its 32 raw bytes, so a verifier can pick the key without trusting a name.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("ed25519:{}", &hex::encode(digest)[..16])
}

/// Failure to read, parse, generate or encode a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("key file {path} is not an Ed25519 {kind} in PEM: {reason}")]
    Parse { path: String, kind: &'static str, reason: String },
    #[error("cannot generate a key: {0}")]
    Random(String),
    #[error("cannot encode the key: {0}")]
    Encode(String),
}

/// The private key that signs checkpoints. `Debug` shows only the key id.
pub struct CheckpointSigner {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CheckpointSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem_file(path: &Path) -> Result<CheckpointSigner, KeyError> {
        let text = read_key_file(path)?;
        let key = SigningKey::from_pkcs8_pem(&text).map_err(|error| KeyError::Parse {
            path: path.display().to_string(),
            kind: "PKCS#8 private key",
            reason: error.to_string(),
        })?;
        Ok(CheckpointSigner::from_key(key))
    }

    /// Generates a new key from the operating system's random source.
    pub fn generate() -> Result<CheckpointSigner, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|error| KeyError::Random(error.to_string()))?;
        let key = SigningKey::from_bytes(&secret);
        secret.fill(0);
        Ok(CheckpointSigner::from_key(key))
    }

    fn from_key(key: SigningKey) -> CheckpointSigner {
        let key_id = key_id(&key.verifying_key());
        CheckpointSigner { key, key_id }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `message` and returns the signature in lowercase hex.
    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }

    /// Encodes the private key as PKCS#8 PEM, for `portcullis audit keygen`.
    pub fn private_key_pem(&self) -> Result<String, KeyError> {
        let pem = self.key.to_pkcs8_pem(LineEnding::LF).map_err(|error| KeyError::Encode(error.to_string()))?;
        Ok(pem.as_str().to_owned())
    }

    /// Encodes the public key as SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn public_key_pem(&self) -> Result<String, KeyError> {
        public_key_pem(&self.verifying_key())
    }
}

/// Encodes a public key as SubjectPublicKeyInfo PEM.
pub fn public_key_pem(key: &VerifyingKey) -> Result<String, KeyError> {
    key.to_public_key_pem(LineEnding::LF).map_err(|error| KeyError::Encode(error.to_string()))
}

/// Reads a public key file: SubjectPublicKeyInfo PEM, or a PKCS#8 private key PEM whose public
/// half is used.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_key_file(path)?;
    if text.contains("PRIVATE KEY") {
        return CheckpointSigner::from_pem_file(path).map(|signer| signer.verifying_key());
    }
    VerifyingKey::from_public_key_pem(&text).map_err(|error| KeyError::Parse {
        path: path.display().to_string(),
        kind: "public key",
        reason: error.to_string(),
    })
}

/// Checks a checkpoint signature given in hex.
pub fn verify_signature(key: &VerifyingKey, message: &[u8], signature_hex: &str) -> bool {
    let Ok(bytes) = hex::decode(signature_hex) else { return false };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
    key.verify(message, &Signature::from_bytes(&bytes)).is_ok()
}

fn read_key_file(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|error| KeyError::Read { path: path.display().to_string(), reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_through_pem() {
        let dir = tempfile::tempdir().unwrap();
        let signer = CheckpointSigner::generate().unwrap();
        std::fs::write(dir.path().join("private.pem"), signer.private_key_pem().unwrap()).unwrap();
        std::fs::write(dir.path().join("public.pem"), signer.public_key_pem().unwrap()).unwrap();

        let read = CheckpointSigner::from_pem_file(&dir.path().join("private.pem")).unwrap();
        let public = read_public_key(&dir.path().join("public.pem")).unwrap();
        assert_eq!(read.key_id(), signer.key_id());
        assert_eq!(key_id(&public), signer.key_id());
        assert!(signer.key_id().starts_with("ed25519:"));
        assert_eq!(signer.key_id().len(), "ed25519:".len() + 16);
    }

    #[test]
    fn signature_verifies_only_for_its_message_and_key() {
        let signer = CheckpointSigner::generate().unwrap();
        let other = CheckpointSigner::generate().unwrap();
        let message = signed_message("pod-a", 7, &"a".repeat(64), "2026-01-01T00:00:00.000000Z", CheckpointReason::Count);
        let signature = signer.sign(&message);

        assert!(verify_signature(&signer.verifying_key(), &message, &signature));
        assert!(!verify_signature(&other.verifying_key(), &message, &signature));
        let changed = signed_message("pod-a", 8, &"a".repeat(64), "2026-01-01T00:00:00.000000Z", CheckpointReason::Count);
        assert!(!verify_signature(&signer.verifying_key(), &changed, &signature));
        assert!(!verify_signature(&signer.verifying_key(), &message, "zz"));
    }

    #[test]
    fn debug_hides_the_private_key() {
        let signer = CheckpointSigner::generate().unwrap();
        let shown = format!("{signer:?}");
        assert!(shown.contains(signer.key_id()), "{shown}");
        assert!(!shown.contains("SigningKey"), "{shown}");
    }

    #[test]
    fn unreadable_key_file_is_reported_with_its_path() {
        let error = CheckpointSigner::from_pem_file(Path::new("/nonexistent/audit.pem")).unwrap_err();
        assert!(error.to_string().starts_with("cannot read key file /nonexistent/audit.pem:"), "{error}");
    }
}
