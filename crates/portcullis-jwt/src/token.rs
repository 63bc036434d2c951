//! Parsing of compact JWS tokens, before and independent of signature verification.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::algorithm::SignatureAlgorithm;
use crate::outcome::{InvalidReason, Rejection, shorten};

/// Header parameters that name or embed a verification key. Tokens carrying any of them are
/// rejected with `key_in_token`, because keys come only from the provider's configured source.
/// A token that points elsewhere comes from an issuer set up differently than configured, or
/// tries to make the verifier trust an attacker's key.
pub(crate) const KEY_REFERENCE_HEADERS: [&str; 4] = ["jku", "x5u", "jwk", "x5c"];

/// A compact JWS split into its parts, with header and claims decoded but not yet trusted.
#[derive(Debug)]
pub(crate) struct ParsedToken<'t> {
    /// `BASE64URL(header) . BASE64URL(payload)`, the input of the signature.
    pub signing_input: &'t str,
    /// The third segment, still base64url-encoded.
    pub signature: &'t str,
    pub algorithm: SignatureAlgorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
}

/// SHA-256 of the raw token: the cache key, and the source of the fingerprint.
pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// First 16 hex characters of the token's SHA-256, safe to log.
pub(crate) fn fingerprint(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..8])
}

/// Splits and decodes a token. Errors are `malformed`, `algorithm_not_allowed` or `key_in_token`.
pub(crate) fn parse_token(token: &str) -> Result<ParsedToken<'_>, Rejection> {
    let segments: Vec<&str> = token.split('.').collect();
    match segments.len() {
        3 => {}
        5 => return Err(malformed("encrypted tokens (JWE) are not supported")),
        count => return Err(malformed(format!("token has {count} segments, expected 3"))),
    }
    let (header_segment, payload_segment, signature) = (segments[0], segments[1], segments[2]);
    let signing_input = &token[..header_segment.len() + 1 + payload_segment.len()];

    let header = decode_json_object(header_segment, "header")?;
    let algorithm = header_algorithm(&header)?;
    reject_key_references(&header)?;
    reject_critical_extensions(&header)?;
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(malformed("token header kid is not a string")),
    };

    let claims = decode_json_object(payload_segment, "payload")?;
    if signature.is_empty() {
        return Err(malformed("token has an empty signature"));
    }
    if URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(malformed("token signature is not valid base64url"));
    }

    Ok(ParsedToken {
        signing_input,
        signature,
        algorithm,
        kid,
        claims,
    })
}

/// Decodes the `iss` claim without verifying anything, only to choose the provider.
pub(crate) fn issuer_of(claims: &Map<String, Value>) -> Result<&str, Rejection> {
    match claims.get("iss") {
        Some(Value::String(issuer)) => Ok(issuer),
        None | Some(Value::Null) => Err(Rejection::new(
            InvalidReason::MissingClaim,
            "token has no iss claim",
        )),
        Some(_) => Err(malformed("token iss claim is not a string")),
    }
}

fn decode_json_object(segment: &str, part: &str) -> Result<Map<String, Value>, Rejection> {
    if segment.is_empty() {
        return Err(malformed(format!("token {part} is empty")));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| malformed(format!("token {part} is not valid base64url")))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(malformed(format!("token {part} is not a JSON object"))),
        Err(_) => Err(malformed(format!("token {part} is not valid JSON"))),
    }
}

fn header_algorithm(header: &Map<String, Value>) -> Result<SignatureAlgorithm, Rejection> {
    let name = match header.get("alg") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(malformed("token header alg is not a string")),
        None => return Err(malformed("token header has no alg")),
    };
    if name.eq_ignore_ascii_case("none") {
        return Err(not_allowed(
            "unsigned tokens (alg none) are not accepted".to_owned(),
        ));
    }
    name.parse::<SignatureAlgorithm>()
        .map_err(|_| not_allowed(format!("algorithm {} is not supported", shorten(name))))
}

fn reject_key_references(header: &Map<String, Value>) -> Result<(), Rejection> {
    match KEY_REFERENCE_HEADERS
        .iter()
        .find(|name| header.contains_key(**name))
    {
        Some(name) => Err(Rejection::new(
            InvalidReason::KeyInToken,
            format!(
                "token header parameter {name} is not accepted; keys come only from the provider's key set"
            ),
        )),
        None => Ok(()),
    }
}

/// RFC 7515, section 4.1.11: a recipient must reject a token whose `crit` lists extensions it
/// does not understand. This crate understands none.
fn reject_critical_extensions(header: &Map<String, Value>) -> Result<(), Rejection> {
    if header.contains_key("crit") {
        return Err(malformed(
            "token header lists critical extensions (crit), which are not supported",
        ));
    }
    Ok(())
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::new(InvalidReason::Malformed, message)
}

fn not_allowed(message: String) -> Rejection {
    Rejection::new(InvalidReason::AlgorithmNotAllowed, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    fn token(header: &str, payload: &str) -> String {
        format!("{}.{}.c2lnbmF0dXJl", segment(header), segment(payload))
    }

    fn reason_and_message(token: &str) -> (InvalidReason, String) {
        let error = parse_token(token).expect_err("token should be rejected");
        (error.reason, error.message)
    }

    #[test]
    fn well_formed_token_is_split() {
        let raw = token(
            r#"{"alg":"RS256","kid":"k1"}"#,
            r#"{"iss":"https://issuer"}"#,
        );
        let parsed = parse_token(&raw).expect("token parses");
        assert_eq!(parsed.algorithm, SignatureAlgorithm::RS256);
        assert_eq!(parsed.kid.as_deref(), Some("k1"));
        assert_eq!(parsed.signature, "c2lnbmF0dXJl");
        assert_eq!(parsed.signing_input, raw.rsplit_once('.').unwrap().0);
        assert_eq!(issuer_of(&parsed.claims), Ok("https://issuer"));
    }

    #[test]
    fn wrong_segment_counts_are_malformed() {
        assert_eq!(
            reason_and_message("abc"),
            (
                InvalidReason::Malformed,
                "token has 1 segments, expected 3".to_owned()
            )
        );
        assert_eq!(
            reason_and_message("a.b"),
            (
                InvalidReason::Malformed,
                "token has 2 segments, expected 3".to_owned()
            )
        );
        assert_eq!(
            reason_and_message("a.b.c.d"),
            (
                InvalidReason::Malformed,
                "token has 4 segments, expected 3".to_owned()
            )
        );
        assert_eq!(
            reason_and_message("a.b.c.d.e"),
            (
                InvalidReason::Malformed,
                "encrypted tokens (JWE) are not supported".to_owned()
            )
        );
    }

    #[test]
    fn bad_base64_header_is_malformed() {
        let raw = format!("ey*!.{}.c2ln", segment("{}"));
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token header is not valid base64url".to_owned()
            )
        );
    }

    #[test]
    fn padded_base64_is_malformed() {
        let raw = format!("{}=.{}.c2ln", segment(r#"{"alg":"RS256"}"#), segment("{}"));
        assert_eq!(reason_and_message(&raw).0, InvalidReason::Malformed);
    }

    #[test]
    fn bad_json_payload_is_malformed() {
        let raw = token(r#"{"alg":"RS256"}"#, r#"{"iss":"#);
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token payload is not valid JSON".to_owned()
            )
        );
        let raw = token(r#"{"alg":"RS256"}"#, r#"["iss"]"#);
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token payload is not a JSON object".to_owned()
            )
        );
    }

    #[test]
    fn empty_or_bad_signature_is_malformed() {
        let raw = format!("{}.{}.", segment(r#"{"alg":"RS256"}"#), segment("{}"));
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token has an empty signature".to_owned()
            )
        );
        let raw = format!("{}.{}.a+b/", segment(r#"{"alg":"RS256"}"#), segment("{}"));
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token signature is not valid base64url".to_owned()
            )
        );
    }

    #[test]
    fn alg_none_is_not_allowed_in_any_case() {
        for alg in ["none", "None", "NONE"] {
            let raw = format!(
                "{}.{}.",
                segment(&format!(r#"{{"alg":"{alg}"}}"#)),
                segment("{}")
            );
            assert_eq!(
                reason_and_message(&raw),
                (
                    InvalidReason::AlgorithmNotAllowed,
                    "unsigned tokens (alg none) are not accepted".to_owned()
                )
            );
        }
    }

    #[test]
    fn unsupported_algorithms_are_not_allowed() {
        for alg in ["ES512", "RS1", "rs256"] {
            let raw = token(&format!(r#"{{"alg":"{alg}"}}"#), "{}");
            assert_eq!(
                reason_and_message(&raw),
                (
                    InvalidReason::AlgorithmNotAllowed,
                    format!("algorithm {alg} is not supported")
                )
            );
        }
    }

    #[test]
    fn key_reference_headers_are_rejected() {
        for (name, value) in [
            ("jku", r#""https://attacker.example/jwks""#),
            ("x5u", r#""https://attacker.example/cert""#),
            ("jwk", r#"{"kty":"oct","k":"c2VjcmV0"}"#),
            ("x5c", r#"["MIIB"]"#),
        ] {
            let raw = token(&format!(r#"{{"alg":"RS256","{name}":{value}}}"#), "{}");
            assert_eq!(
                reason_and_message(&raw),
                (
                    InvalidReason::KeyInToken,
                    format!(
                        "token header parameter {name} is not accepted; keys come only from the provider's key set"
                    )
                )
            );
        }
    }

    #[test]
    fn critical_extensions_are_rejected() {
        let raw = token(r#"{"alg":"RS256","crit":["b64"],"b64":false}"#, "{}");
        assert_eq!(reason_and_message(&raw).0, InvalidReason::Malformed);
    }

    #[test]
    fn non_string_kid_is_malformed() {
        let raw = token(r#"{"alg":"RS256","kid":7}"#, "{}");
        assert_eq!(
            reason_and_message(&raw),
            (
                InvalidReason::Malformed,
                "token header kid is not a string".to_owned()
            )
        );
    }

    #[test]
    fn missing_or_non_string_issuer_is_rejected() {
        let mut claims = Map::new();
        assert_eq!(
            issuer_of(&claims).unwrap_err().reason,
            InvalidReason::MissingClaim
        );
        claims.insert("iss".to_owned(), Value::from(5));
        assert_eq!(
            issuer_of(&claims).unwrap_err().reason,
            InvalidReason::Malformed
        );
    }

    #[test]
    fn fingerprint_is_first_sixteen_hex_characters() {
        let digest = token_digest("abc");
        assert_eq!(fingerprint(&digest), "ba7816bf8f01cfea");
    }
}
