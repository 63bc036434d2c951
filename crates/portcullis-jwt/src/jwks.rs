//! Parsing of JWKS documents key by key.
//!
//! jsonwebtoken's `JwkSet` fails the whole document on one key it cannot parse, and
//! `DecodingKey::from_jwk` ignores `use`, `alg` and `crv`. Here every key is checked on its own:
//! a key that is meant for encryption, of an unknown type, or with bad parameters is skipped and
//! reported, and the other keys stay usable.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::crypto::CryptoProvider;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::algorithm::{KeyFamily, SignatureAlgorithm};

/// Smallest accepted RSA modulus: RFC 7518, section 3.3 requires 2048 bits or more.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus the RustCrypto `rsa` crate (0.10) verifies with.
const MAX_RSA_BITS: usize = 8192;

/// A public key usable for signature verification.
pub(crate) struct VerificationKey {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// The JWK's `alg`, when it has one: tokens must then use exactly this algorithm.
    pub algorithm: Option<SignatureAlgorithm>,
    pub decoding_key: DecodingKey,
    /// Digest of the key type and material, stable across fetches of the same key.
    pub id: KeyId,
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl VerificationKey {
    /// Returns true when this key may verify a token signed with `algorithm`.
    pub fn accepts(&self, algorithm: SignatureAlgorithm) -> bool {
        algorithm.key_family() == self.family
            && self.algorithm.is_none_or(|required| required == algorithm)
    }
}

/// Content digest identifying one key; the verified-token cache uses it to notice removed keys.
pub(crate) type KeyId = [u8; 16];

/// A key of a JWKS document that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    /// Position of the key in the document's `keys` array.
    pub index: usize,
    /// The key's `kid`, when it has a string one.
    pub kid: Option<String>,
    /// Reason the key was skipped.
    pub reason: String,
}

impl fmt::Display for SkippedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kid {
            Some(kid) => write!(f, "key {} (kid {kid:?}): {}", self.index, self.reason),
            None => write!(f, "key {} (no kid): {}", self.index, self.reason),
        }
    }
}

/// Errors that make a whole JWKS document unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// The document is not JSON.
    #[error("JWKS is not valid JSON: {0}")]
    NotJson(String),
    /// The document has no `keys` array.
    #[error("JWKS has no \"keys\" array")]
    NoKeysArray,
    /// No key could be used.
    #[error("JWKS has no usable signing key ({skipped} skipped)")]
    NoUsableKeys {
        /// Number of keys that were skipped.
        skipped: usize,
    },
}

/// The usable keys of one document, plus the skipped ones.
#[derive(Debug)]
pub(crate) struct ParsedJwks {
    pub keys: Vec<Arc<VerificationKey>>,
    pub skipped: Vec<SkippedKey>,
}

impl ParsedJwks {
    pub fn key_ids(&self) -> HashSet<KeyId> {
        self.keys.iter().map(|key| key.id).collect()
    }
}

/// Parses a JWKS document. It fails only when the document is not JSON, has no `keys` array,
/// or has no usable key.
pub(crate) fn parse_jwks(document: &[u8]) -> Result<ParsedJwks, JwksError> {
    let value: Value =
        serde_json::from_slice(document).map_err(|error| JwksError::NotJson(error.to_string()))?;
    let Some(Value::Array(entries)) = value.get("keys") else {
        return Err(JwksError::NoKeysArray);
    };

    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
        match parse_jwk(entry) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(reason) => skipped.push(SkippedKey { index, kid, reason }),
        }
    }

    if keys.is_empty() {
        return Err(JwksError::NoUsableKeys {
            skipped: skipped.len(),
        });
    }
    Ok(ParsedJwks { keys, skipped })
}

fn parse_jwk(entry: &Value) -> Result<VerificationKey, String> {
    let Value::Object(jwk) = entry else {
        return Err("not a JSON object".to_owned());
    };
    let kty = optional_string(jwk, "kty")?.ok_or("missing kty")?;
    let kid = optional_string(jwk, "kid")?.map(str::to_owned);
    check_use(jwk)?;
    check_key_operations(jwk)?;
    let algorithm = key_algorithm(jwk)?;

    let (family, decoding_key, material) = match kty {
        "RSA" => rsa_key(jwk)?,
        "EC" => ec_key(jwk)?,
        "OKP" => okp_key(jwk)?,
        "oct" => {
            return Err(
                "symmetric (oct) keys are not loaded from a JWKS; use hmac_secret_file".to_owned(),
            );
        }
        other => return Err(format!("unsupported kty {other:?}")),
    };

    if let Some(algorithm) = algorithm
        && algorithm.key_family() != family
    {
        return Err(format!(
            "alg {algorithm} does not fit a {kty} key on this curve or of this type"
        ));
    }
    check_backend_accepts(family, &decoding_key)?;

    let mut digest = Sha256::new();
    digest.update(kty.as_bytes());
    digest.update([0]);
    digest.update(kid.as_deref().unwrap_or("").as_bytes());
    digest.update([0]);
    digest.update(&material);
    let id: KeyId = digest.finalize()[..16]
        .try_into()
        .expect("SHA-256 output is 32 bytes");

    Ok(VerificationKey {
        kid,
        family,
        algorithm,
        decoding_key,
        id,
    })
}

fn optional_string<'j>(jwk: &'j Map<String, Value>, name: &str) -> Result<Option<&'j str>, String> {
    match jwk.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(format!("{name} is not a string")),
    }
}

fn check_use(jwk: &Map<String, Value>) -> Result<(), String> {
    match optional_string(jwk, "use")? {
        None | Some("sig") => Ok(()),
        Some(other) => Err(format!("use is {other:?}, not \"sig\"")),
    }
}

fn check_key_operations(jwk: &Map<String, Value>) -> Result<(), String> {
    match jwk.get("key_ops") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(operations))
            if operations.iter().any(|op| op.as_str() == Some("verify")) =>
        {
            Ok(())
        }
        Some(_) => Err("key_ops does not include \"verify\"".to_owned()),
    }
}

fn key_algorithm(jwk: &Map<String, Value>) -> Result<Option<SignatureAlgorithm>, String> {
    let Some(name) = optional_string(jwk, "alg")? else {
        return Ok(None);
    };
    let algorithm: SignatureAlgorithm = name
        .parse()
        .map_err(|_| format!("unsupported alg {name:?}"))?;
    if algorithm.is_hmac() {
        return Err(format!("alg {name} is symmetric; use hmac_secret_file"));
    }
    Ok(Some(algorithm))
}

fn base64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let encoded = optional_string(jwk, name)?.ok_or_else(|| format!("missing {name}"))?;
    URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| format!("{name} is not valid base64url"))
}

fn rsa_key(jwk: &Map<String, Value>) -> Result<(KeyFamily, DecodingKey, Vec<u8>), String> {
    let modulus = base64_member(jwk, "n")?;
    let exponent = base64_member(jwk, "e")?;
    let modulus = strip_leading_zeros(&modulus);
    let exponent = strip_leading_zeros(&exponent);

    let bits = bit_length(modulus);
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "RSA modulus has {bits} bits, expected {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        ));
    }
    if modulus.last().is_none_or(|byte| byte % 2 == 0) {
        return Err("RSA modulus is even".to_owned());
    }
    let exponent_value = exponent.iter().try_fold(0u64, |value, byte| {
        if value > u64::MAX >> 8 {
            None
        } else {
            Some(value << 8 | u64::from(*byte))
        }
    });
    match exponent_value {
        Some(value) if value >= 3 && value % 2 == 1 && value <= 1 << 32 => {}
        _ => return Err("RSA exponent must be odd and between 3 and 2^32".to_owned()),
    }

    let mut material = modulus.to_vec();
    material.push(0);
    material.extend_from_slice(exponent);
    Ok((
        KeyFamily::Rsa,
        DecodingKey::from_rsa_raw_components(modulus, exponent),
        material,
    ))
}

fn ec_key(jwk: &Map<String, Value>) -> Result<(KeyFamily, DecodingKey, Vec<u8>), String> {
    let curve = optional_string(jwk, "crv")?.ok_or("missing crv")?;
    let (family, coordinate_bytes) = match curve {
        "P-256" => (KeyFamily::P256, 32),
        "P-384" => (KeyFamily::P384, 48),
        other => return Err(format!("unsupported EC curve {other:?}")),
    };
    let x = base64_member(jwk, "x")?;
    let y = base64_member(jwk, "y")?;
    if x.len() != coordinate_bytes || y.len() != coordinate_bytes {
        return Err(format!(
            "{curve} coordinates must be {coordinate_bytes} bytes each"
        ));
    }

    // An uncompressed SEC1 point, the form the backend expects.
    let mut point = Vec::with_capacity(1 + 2 * coordinate_bytes);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    Ok((family, DecodingKey::from_ec_der(&point), point))
}

fn okp_key(jwk: &Map<String, Value>) -> Result<(KeyFamily, DecodingKey, Vec<u8>), String> {
    let curve = optional_string(jwk, "crv")?.ok_or("missing crv")?;
    if curve != "Ed25519" {
        return Err(format!("unsupported OKP curve {curve:?}"));
    }
    let x = base64_member(jwk, "x")?;
    // The backend slices the first 32 bytes and would panic on a shorter key.
    if x.len() != 32 {
        return Err("Ed25519 x must be 32 bytes".to_owned());
    }
    Ok((KeyFamily::Ed25519, DecodingKey::from_ed_der(&x), x))
}

/// Builds the backend verifier once, so that a point that is not on its curve is found now and
/// not at the first token. The RSA verifier parses its key at each verification, so RSA keys
/// are checked by `rsa_key` instead.
fn check_backend_accepts(family: KeyFamily, key: &DecodingKey) -> Result<(), String> {
    let algorithm = match family {
        KeyFamily::P256 => SignatureAlgorithm::ES256,
        KeyFamily::P384 => SignatureAlgorithm::ES384,
        KeyFamily::Ed25519 => SignatureAlgorithm::EdDSA,
        KeyFamily::Rsa | KeyFamily::Hmac => return Ok(()),
    };
    let provider =
        CryptoProvider::try_get_default().ok_or("no jsonwebtoken crypto backend is enabled")?;
    (provider.verifier_factory)(&algorithm.to_jsonwebtoken(), key)
        .map(drop)
        .map_err(|_| "public key is not a valid point on its curve".to_owned())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(bytes.len());
    &bytes[first..]
}

fn bit_length(big_endian: &[u8]) -> usize {
    match big_endian.first() {
        None => 0,
        Some(first) => big_endian.len() * 8 - first.leading_zeros() as usize,
    }
}
