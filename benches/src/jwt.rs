//! The bearer token of the JWT scenarios: signed RS256 with the dev-only key in `benches/jwt`
//! and added to every request of the mix.

use std::path::Path;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// The provider the benchmark configures, and the claims its token carries.
pub const ISSUER: &str = "https://issuer.bench.invalid";
pub const AUDIENCE: &str = "portcullis-bench";
pub const SUBJECT: &str = "bench-user";
/// The `kid` of the key in `benches/jwt/jwks.dev-only.json`.
pub const KEY_ID: &str = "bench-rs256-dev-only";
/// 2100-01-01T00:00:00Z: far enough that the token never expires during a run, so after the
/// first request every check finds it in the token cache.
pub const EXPIRES_AT: u64 = 4_102_444_800;

/// A token that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the signing key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },

    #[error("the signing key {path} is not a PEM `RSA PRIVATE KEY` (PKCS#1)")]
    Key { path: String },

    #[error("cannot sign the token: {0}")]
    Sign(jsonwebtoken::errors::Error),
}

/// Signs a token for the benchmark's provider with the RSA private key in `private_key_pem`.
pub fn sign_token(private_key_pem: &Path, issued_at: u64) -> Result<String, TokenError> {
    let path = private_key_pem.display().to_string();
    let pem = std::fs::read(private_key_pem).map_err(|source| TokenError::Read {
        path: path.clone(),
        source,
    })?;
    let der = pkcs1_der(&pem).ok_or(TokenError::Key { path })?;
    let key = EncodingKey::from_rsa_der(&der);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KEY_ID.to_string());
    let claims = serde_json::json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "iat": issued_at,
        "exp": EXPIRES_AT,
    });
    jsonwebtoken::encode(&header, &claims, &key).map_err(TokenError::Sign)
}

/// Decodes the body of a PKCS#1 `RSA PRIVATE KEY` PEM block, the only private key form that
/// jsonwebtoken's `rust_crypto` backend takes (as DER).
fn pkcs1_der(pem: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let text = std::str::from_utf8(pem).ok()?;
    let body = text
        .split_once("-----BEGIN RSA PRIVATE KEY-----")?
        .1
        .split_once("-----END RSA PRIVATE KEY-----")?
        .0;
    let body: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// Returns the requests with `authorization: Bearer TOKEN` added to their HTTP headers.
pub fn with_bearer(requests: &[CheckRequest], token: &str) -> Vec<CheckRequest> {
    requests
        .iter()
        .map(|request| {
            let mut request = request.clone();
            let http = request
                .attributes
                .get_or_insert_with(Default::default)
                .request
                .get_or_insert_with(Default::default)
                .http
                .get_or_insert_with(Default::default);
            http.headers
                .insert("authorization".to_string(), format!("Bearer {token}"));
            request
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use jsonwebtoken::{DecodingKey, Validation};

    fn key_folder() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("jwt")
    }

    #[test]
    fn token_verifies_with_the_checked_in_jwks() {
        let token = sign_token(&key_folder().join("rs256-key.dev-only.pem"), 1_700_000_000)
            .expect("the dev-only key signs");
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(
            &std::fs::read(key_folder().join("jwks.dev-only.json")).expect("the JWKS is readable"),
        )
        .expect("the JWKS parses");
        let jwk = jwks.find(KEY_ID).expect("the JWKS has the bench key");
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);

        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_jwk(jwk).expect("an RSA JWK"),
            &validation,
        )
        .expect("the token verifies");

        assert_eq!(decoded.header.kid.as_deref(), Some(KEY_ID));
        assert_eq!(decoded.claims["sub"], SUBJECT);
        assert_eq!(decoded.claims["exp"], EXPIRES_AT);
    }

    #[test]
    fn pkcs8_key_is_refused_with_its_path() {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("key.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .expect("writing the key");

        let error = sign_token(&path, 0).expect_err("only PKCS#1 is read");

        assert_eq!(
            error.to_string(),
            format!(
                "the signing key {} is not a PEM `RSA PRIVATE KEY` (PKCS#1)",
                path.display()
            )
        );
    }

    #[test]
    fn bearer_header_is_added_to_every_request() {
        let requests = vec![CheckRequest::default(), CheckRequest::default()];

        let with_token = with_bearer(&requests, "abc");

        for request in &with_token {
            let headers = &request
                .attributes
                .as_ref()
                .and_then(|attributes| attributes.request.as_ref())
                .and_then(|request| request.http.as_ref())
                .expect("an HTTP request")
                .headers;
            assert_eq!(
                headers.get("authorization").map(String::as_str),
                Some("Bearer abc")
            );
        }
    }
}
