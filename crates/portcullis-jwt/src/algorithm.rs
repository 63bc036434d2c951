//! JWS signature algorithms and the key types each one requires.

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::Algorithm;

/// A JWS `alg` value that this crate can verify.
///
/// `none` and ES512 are absent: `none` is never accepted, and the RustCrypto backend of
/// jsonwebtoken 12 has no P-521 support, so ES512 tokens are rejected as `algorithm_not_allowed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// EdDSA on Ed25519.
    EdDSA,
    /// HMAC with SHA-256; only with a configured shared secret.
    HS256,
    /// HMAC with SHA-384; only with a configured shared secret.
    HS384,
    /// HMAC with SHA-512; only with a configured shared secret.
    HS512,
}

/// Key family an algorithm needs, decided by the key and never by the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyFamily {
    Rsa,
    P256,
    P384,
    Ed25519,
    Hmac,
}

impl SignatureAlgorithm {
    /// Every supported asymmetric algorithm, the default allow-list of a provider.
    pub const ASYMMETRIC: [SignatureAlgorithm; 9] = [
        Self::RS256,
        Self::RS384,
        Self::RS512,
        Self::PS256,
        Self::PS384,
        Self::PS512,
        Self::ES256,
        Self::ES384,
        Self::EdDSA,
    ];

    /// The three HMAC algorithms.
    pub const HMAC: [SignatureAlgorithm; 3] = [Self::HS256, Self::HS384, Self::HS512];

    /// Returns the `alg` name as written in a JOSE header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::EdDSA => "EdDSA",
            Self::HS256 => "HS256",
            Self::HS384 => "HS384",
            Self::HS512 => "HS512",
        }
    }

    /// Returns true for HS256, HS384 and HS512.
    pub fn is_hmac(self) -> bool {
        matches!(self, Self::HS256 | Self::HS384 | Self::HS512)
    }

    pub(crate) fn key_family(self) -> KeyFamily {
        match self {
            Self::RS256 | Self::RS384 | Self::RS512 | Self::PS256 | Self::PS384 | Self::PS512 => {
                KeyFamily::Rsa
            }
            Self::ES256 => KeyFamily::P256,
            Self::ES384 => KeyFamily::P384,
            Self::EdDSA => KeyFamily::Ed25519,
            Self::HS256 | Self::HS384 | Self::HS512 => KeyFamily::Hmac,
        }
    }

    /// Minimum HMAC key length in bytes: the hash output size (RFC 7518, section 3.2).
    pub(crate) fn min_hmac_key_bytes(self) -> usize {
        match self {
            Self::HS384 => 48,
            Self::HS512 => 64,
            _ => 32,
        }
    }

    pub(crate) fn to_jsonwebtoken(self) -> Algorithm {
        match self {
            Self::RS256 => Algorithm::RS256,
            Self::RS384 => Algorithm::RS384,
            Self::RS512 => Algorithm::RS512,
            Self::PS256 => Algorithm::PS256,
            Self::PS384 => Algorithm::PS384,
            Self::PS512 => Algorithm::PS512,
            Self::ES256 => Algorithm::ES256,
            Self::ES384 => Algorithm::ES384,
            Self::EdDSA => Algorithm::EdDSA,
            Self::HS256 => Algorithm::HS256,
            Self::HS384 => Algorithm::HS384,
            Self::HS512 => Algorithm::HS512,
        }
    }
}

impl fmt::Display for SignatureAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`SignatureAlgorithm::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported signature algorithm {name:?}")]
pub struct UnsupportedAlgorithm {
    /// The rejected name.
    pub name: String,
}

impl FromStr for SignatureAlgorithm {
    type Err = UnsupportedAlgorithm;

    /// Parses an `alg` name, case-sensitively as RFC 7515 requires.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let algorithm = match name {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "EdDSA" => Self::EdDSA,
            "HS256" => Self::HS256,
            "HS384" => Self::HS384,
            "HS512" => Self::HS512,
            _ => {
                return Err(UnsupportedAlgorithm {
                    name: name.to_owned(),
                });
            }
        };
        Ok(algorithm)
    }
}
